"""Where `decode` puts what it makes: stdout, the JSONL ``output_file``, the progress line on stderr.

``output_file`` is never lost by accident. An existing file that is not empty is refused unless
``overwrite=true`` (replace it) or ``append=true`` (add to it), before the model loads; the file
is opened only when the first record is ready, so a run that fails or is interrupted before then
leaves it as it was. Each record is written as one line with one unbuffered ``os.write``, so an
interrupt keeps every complete line and never leaves a partial one. The jobs of a sweep that name
the same file add to it: the first job starts it, by the rule above.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from decodekit.cli.config import CommandConfig
from decodekit.errors import ConfigError

_STARTED: set[str] = set()  # output files this process has written to (a sweep's later jobs add to them)


class Output:
    """stdout (or another stream), flushed after every write so streaming shows at once."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet

    def write(self, text: str) -> None:
        if not self.quiet and text:
            self.stream.write(text)
            self.stream.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")


class JsonlWriter:
    """``output_file``: one JSON object per line, each written on its own as soon as it is made."""

    def __init__(self, path: str, *, append: bool = False) -> None:
        self.path = path
        self.append = append
        self.fd: int | None = None
        self.size = 0  # bytes of complete lines in the file

    @classmethod
    def for_config(cls, config: CommandConfig) -> JsonlWriter | None:
        """The writer ``config`` asks for (None without ``output_file``), after :func:`check_output_file`."""
        if config.output_file is None:
            return None
        check_output_file(config)
        started = _key(config.output_file) in _STARTED
        return cls(config.output_file, append=config.append or started)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self._write_line((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def _write_line(self, data: bytes) -> None:
        if self.fd is None:
            self._open()
        assert self.fd is not None
        start = self.size
        try:
            view = memoryview(data)
            while view:  # a regular file takes it all at once; the loop is for the rare short write
                view = view[os.write(self.fd, view) :]
        except BaseException:
            os.ftruncate(self.fd, start)  # no partial line, whatever stopped the write
            raise
        self.size = start + len(data)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.append else os.O_TRUNC)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise ConfigError(f"output_file={self.path!r}: cannot write it ({e.strerror})") from None
        self.size = os.fstat(self.fd).st_size
        _STARTED.add(_key(self.path))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_output_file(config: CommandConfig) -> None:
    """Refuse, in one line, an ``output_file`` that cannot be written or would lose what it holds."""
    if config.output_file is None or _key(config.output_file) in _STARTED:
        return
    path = Path(config.output_file)
    name = f"output_file={config.output_file!r}"
    if path.is_dir():
        raise ConfigError(f"{name}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{name}: folder {str(path.parent)!r} does not exist")
    if config.overwrite or config.append or not path.exists():
        return
    size = path.stat().st_size
    if size:
        raise ConfigError(
            f"{name}: the file exists ({size} bytes); set overwrite=true to replace it or append=true to add to it"
        )


def _key(path: str) -> str:
    return os.path.realpath(path)


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, one line per batch otherwise."""

    def __init__(self, enabled: bool, batches: int, steps: int, stream: TextIO | None = None, unit: str = "batch") -> None:
        self.stream = stream or sys.stderr
        self.unit = unit
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.batches, self.steps = batches, steps
        self.batch = 0
        self.start = self.last_draw = time.perf_counter()

    @classmethod
    def for_run(cls, config: CommandConfig, batches: int, unit: str = "batch") -> Progress:
        if config.progress is not None:
            enabled = config.progress
        else:  # on its own terminal line only: stderr is a terminal and stdout is not (or is quiet)
            long_run = batches > 1 or config.max_new_tokens >= 256
            enabled = sys.stderr.isatty() and (config.quiet or not sys.stdout.isatty()) and long_run
        return cls(enabled, batches, config.max_new_tokens, unit=unit)

    def step(self, step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.enabled and self.tty and now - self.last_draw > 0.1:
            self.last_draw = now
            self._draw(self.batch + (step + 1) / self.steps, f"step {step + 1}/{self.steps}")

    def batch_done(self, rows: int) -> None:
        self.batch += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            self._draw(self.batch, "")
        else:
            samples = f"{rows} sample" + ("s" if rows != 1 else "")
            detail = f"{samples}, {elapsed:.1f} s" if self.unit == "batch" else f"{elapsed:.1f} s"
            self.stream.write(f"decode: {self.unit} {self.batch}/{self.batches} done ({detail})\n")
            self.stream.flush()

    def _draw(self, done: float, detail: str) -> None:
        width = 30
        filled = int(width * done / self.batches)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r[{bar}] batch {min(self.batch + 1, self.batches)}/{self.batches} {detail} {elapsed:.1f} s\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def logprob_settings(config: CommandConfig) -> dict[str, Any]:
    """The logprobs a run asks for, as :func:`decodekit.text.generate_text` and requests take them."""
    return {"logprobs": config.logprobs, "logprobs_mode": config.logprobs_mode, "prompt_logprobs": config.prompt_logprobs}
