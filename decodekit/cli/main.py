"""The `decode` console script: Hydra's entry point, with every error reported in one line.

``main()`` fills Hydra's ConfigStore from the registry, then composes and validates every job the
command line asks for (each job of a sweep too) before Hydra runs any of them, so a bad value
stops the command with one line on stderr and exit status 2, and no traceback. Then Hydra runs
:func:`decode` once per job.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TextIO

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import decodekit
from decodekit.cli.config import (
    compose_config,
    expand_sweep,
    hydra_context,
    register_configs,
    strategy_overrides,
    validate_config,
)
from decodekit.cli.listing import listing, settings_help
from decodekit.cli.output import check_output_file
from decodekit.errors import ConfigError, DecodekitError
from decodekit.registry import get_registry

EXIT_CONFIG = 2  # a bad setting or command line
EXIT_RUNTIME = 1  # a model that does not load, a file that cannot be written, ...
EXIT_INTERRUPTED = 130


def fail(message: str, code: int) -> NoReturn:
    print(f"decode: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextmanager
def reported() -> Iterator[None]:
    """decodekit's errors, file errors and Ctrl-C as one line on stderr and an exit status."""
    try:
        yield
    except ConfigError as e:
        fail(str(e), EXIT_CONFIG)
    except DecodekitError as e:
        fail(str(e), EXIT_RUNTIME)
    except BrokenPipeError:  # the reader went away (decode ... | head): stop quietly
        _stdout_to_devnull()
        raise SystemExit(EXIT_RUNTIME) from None
    except OSError as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        fail("interrupted", EXIT_INTERRUPTED)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again on the closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _PipeGuard:
    """stdout that ends the command quietly when its reader has gone (``decode --help | head -2``).

    Hydra catches and prints the exceptions of what it runs (``--cfg``, ``--info``) as tracebacks;
    a SystemExit passes through it.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> NoReturn:
        _stdout_to_devnull()
        raise SystemExit(EXIT_RUNTIME)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"decode: warning: {message}", file=sys.stderr, flush=True)


_TMPDIR: list[str] = []


def _sweep_dir() -> str:
    """A temporary folder for Hydra's sweep bookkeeping, removed when the command ends."""
    if not _TMPDIR:
        _TMPDIR.append(tempfile.mkdtemp(prefix="decode-sweep-"))
        atexit.register(shutil.rmtree, _TMPDIR[0], True)
    return _TMPDIR[0]


def _flags_only(argv: list[str], overrides: list[str]) -> list[str]:
    """``argv`` without the overrides (Hydra's parser wants them after the flags)."""
    rest, pending = [], list(overrides)
    for token in argv:
        if pending and token == pending[0]:
            pending.pop(0)
        else:
            rest.append(token)
    return rest


# free-text settings taken as written, like the prompt: a regex's braces, a schema's JSON
TEXT_SETTINGS = ("prompt", "json_schema", "regex", "grammar")


def literal_prompt(token: str) -> str:
    """``prompt=Hello, world`` (or ``regex=[0-9]{3}``, ``json_schema={"type": "array"}``: any of
    ``TEXT_SETTINGS``) as Hydra's quoted string, so the text is taken as written.

    Hydra would read the comma as a sweep (or ``[...]`` as a list, ``${...}`` as an interpolation,
    ``42`` as a number). A value already in quotes (Hydra's own way) is left alone, and so is
    ``null`` for a setting other than the prompt (it turns the setting off).
    """
    key, _, value = token.partition("=")
    if key.lstrip("+") not in TEXT_SETTINGS or (key != "prompt" and value == "null") or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
        return token
    try:
        if "${" not in value and OverridesParser.create().parse_override(token).value() == value:
            return token
    except HydraException:  # not parseable as written: quote it
        pass
    text = value.replace("${", "\\${")  # OmegaConf's escape: a literal ${
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"{key}='{text}'"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("decodekit_tmpdir", _sweep_dir, replace=True)
    OmegaConf.register_new_resolver("decodekit_version", lambda: decodekit.__version__, replace=True)
    OmegaConf.register_new_resolver("decodekit_settings_help", lambda: settings_help(get_registry()), replace=True)


@hydra.main(config_path="pkg://decodekit.conf", config_name="config", version_base="1.3")
def decode(cfg: DictConfig) -> None:
    """One job: validate the composed config, then list, loop interactively, or decode."""
    from decodekit.cli.interactive import run_interactive
    from decodekit.cli.job_run import is_job, run_job_command
    from decodekit.cli.run import run

    with reported():
        registry = get_registry()
        container = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(container, dict)
        config = validate_config(container, registry)
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        multirun = hc.mode == RunMode.MULTIRUN
        if config.list_components:
            print(listing(registry))
        elif is_job(config):
            run_job_command(config)
        elif config.interactive:
            run_interactive(overrides, config, registry)
        else:
            heading = f"job {hc.job.num}: {' '.join(overrides)}" if multirun else None
            run(config, registry, heading=heading)


def main(argv: list[str] | None = None) -> None:
    """The console script ``decode``."""
    from hydra._internal.utils import get_args_parser

    argv = [literal_prompt(a) for a in (sys.argv[1:] if argv is None else argv)]
    warnings.showwarning = _show_warning
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars would mix with the text
    with reported():
        registry = get_registry()
        register_configs(registry)
        register_resolvers()
        args = get_args_parser().parse_intermixed_args(argv)
        argv_overrides = strategy_overrides(args.overrides)
        argv = [*_flags_only(argv, args.overrides), *argv_overrides]  # Hydra wants the overrides last
        if args.run or args.multirun or args.cfg or not (args.help or args.hydra_help or args.info or args.shell_completion):
            with hydra_context():
                for job in expand_sweep(argv_overrides) if args.multirun else [argv_overrides]:
                    _, config = compose_config(job, registry)
                    if args.multirun and config.interactive:
                        raise ConfigError("interactive=true: a prompt loop cannot be swept; drop -m (or interactive=true)")
                    if not (args.cfg or config.list_components):
                        check_output_file(config)  # every job's, before the first job runs
    sys.argv = [sys.argv[0], *argv]
    sys.stdout = _PipeGuard(sys.stdout)  # Hydra prints --help, --cfg, --info itself, outside reported()
    decode()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
