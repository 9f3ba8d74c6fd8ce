"""`decode interactive=true`: a prompt loop over one loaded model, with /set, /status, /clear.

What you type is added to the session's text and the model continues it; its continuation is
added too, so each turn continues the whole text (the model sees its last ``max_context`` tokens).
``/clear`` starts a fresh text. ``/set key=value`` takes the command line's syntax and is validated
the same way; a bad value is reported in one line and changes nothing. Ctrl-C stops the current
generation (what was made so far is kept) and returns to the prompt; Ctrl-D or ``/quit`` leaves.
"""

from __future__ import annotations

import secrets
import shlex
import sys
import warnings
from typing import TextIO

from decodekit.cli.config import CommandConfig, compose_config, parse_overrides, suggest
from decodekit.cli.main import literal_prompt
from decodekit.cli.strategies import sampler_note
from decodekit.cli.output import JsonlWriter, Output
from decodekit.cli.decoder import Decoder
from decodekit.cli.run import label, settings_record, text_record, unescape
from decodekit.errors import ConfigError, DecodekitError
from decodekit.random import SEED_LIMIT
from decodekit.registry import Registry
from decodekit.text import generate_text

PROMPT = "> "
COMMANDS = {
    "/help": "show this help",
    "/set": "/set key=value ...: change settings, as on the command line (e.g. /set strategy=greedy top_k=5)",
    "/status": "show the model, the settings and the session's text length",
    "/clear": "forget the session's text and start afresh",
    "/quit": "leave (Ctrl-D too)",
}
FIXED = ("interactive", "list", "prompt_file", "prompt_tokens", "output_file", "overwrite", "append")  # keys a session cannot change


class Session:
    """One interactive session: the loaded decoder, the /set overrides, the text so far."""

    def __init__(self, overrides: list[str], config: CommandConfig, registry: Registry, *, stdout: TextIO | None = None) -> None:
        if config.prompt_tokens is not None or config.prompt_file is not None:
            raise ConfigError("interactive=true: reads prompts from the terminal; drop prompt_tokens / prompt_file")
        self.registry = registry
        self.base = list(overrides)
        self.extra: dict[str, str] = {}  # /set overrides by key, in order
        self.config = config
        self.writer = JsonlWriter.for_config(config)  # refused before the model loads if it would lose a file
        self.decoder = Decoder.load(config, registry)
        if self.decoder.tokenizer is None:
            raise ConfigError("interactive=true: needs a tokenizer; this model names none (set tokenizer=...)")
        self.out = Output(stdout)
        self.err = sys.stderr
        self.note(config)
        self.text = ""
        self.turns = 0

    # --- the loop

    def loop(self) -> None:
        self.out.line("decode interactive: type text and the model continues it; /help lists the commands")
        if self.config.prompt:
            self.out.line(PROMPT + self.config.prompt)
            self.generate(self.config.prompt)
        try:
            while True:
                try:
                    line = input(PROMPT)
                except EOFError:
                    self.out.line()
                    return
                except KeyboardInterrupt:
                    self.out.line("\n(/quit or Ctrl-D leaves)")
                    continue
                if line.strip().startswith("/"):
                    if not self.command(line.strip()):
                        return
                elif line:
                    self.generate(line)
        finally:
            if self.writer is not None:
                self.writer.close()

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            for command, text in COMMANDS.items():
                self.out.line(f"  {command:<8} {text}")
            self.out.line("  Settings: every key of `decode --help` (temperature, top_p, strategy, max_new_tokens, ...).")
        elif name == "/set":
            self.set(rest)
        elif name == "/status":
            self.status()
        elif name == "/clear":
            self.text = ""
            self.out.line("(the session's text is cleared)")
        else:
            self.error(f"unknown command {name}{suggest(name, list(COMMANDS))}; /help lists the commands")
        return True

    def error(self, message: str) -> None:
        print(f"error: {message}", file=self.err, flush=True)

    # --- /set and /status

    def set(self, text: str) -> None:
        try:
            items = [literal_prompt(item) for item in shlex.split(text)]  # free text as written, as on the command line
        except ValueError as e:
            self.error(f"/set: {e}")
            return
        if not items:
            self.error("/set needs key=value, e.g. /set temperature=0.7")
            return
        try:
            parsed = parse_overrides(items)
            for o in parsed:
                if o.key_or_group in FIXED:
                    raise ConfigError(f"{o.key_or_group}: cannot be changed inside a session")
            extra = dict(self.extra)
            for o, item in zip(parsed, items):
                extra.pop(o.key_or_group, None)
                extra[o.key_or_group] = item
            _, config = compose_config([*self.base, *extra.values()], self.registry)
            decoder = Decoder.load(config, self.registry, previous=self.decoder)
        except DecodekitError as e:
            self.error(str(e))
            return
        self.extra, self.config, self.decoder = extra, config, decoder
        self.out.line("ok: " + " ".join(items))
        self.note(config)

    def note(self, config: CommandConfig) -> None:
        """Say so when ``sampler=`` replaced the strategy's sampler and its chain stays."""
        note = sampler_note(config, self.registry)
        if note:
            self.out.line(f"note: {note}")

    def status(self) -> None:
        c, d = self.config, self.decoder
        settings = " ".join(f"{k}={v}" for k, v in c.settings().items()) or "(none)"
        ids = d.tokenizer.encode(self.text) if (self.text and d.tokenizer) else []
        window = getattr(d.model, "max_context", None)
        self.out.line(f"model: {d.describe()}")
        self.out.line(f"strategy: {c.strategy}  sampler: {c.sampler}  settings: {settings}")
        order = f"  processor_order={c.processor_order}" if c.processor_order else ""
        last = "  temperature_last=true" if c.temperature_last else ""
        self.out.line(f"chain: {d.chain!r}{order}{last}")
        self.out.line(f"max_new_tokens={c.max_new_tokens} num_samples={c.num_samples} seed={c.seed} stop={[unescape(s) for s in c.stop]!r}")
        self.out.line(f"/set so far: {' '.join(self.extra.values()) or '(nothing)'}")
        seen = f" (the model sees the last {window})" if window is not None and len(ids) > window else ""
        self.out.line(f"text: {len(self.text)} characters, {len(ids)} tokens{seen}")

    # --- a turn

    def generate(self, typed: str) -> None:
        c, d = self.config, self.decoder
        assert d.tokenizer is not None
        context = self.text + typed
        n = c.num_samples
        seed = (c.seed + self.turns * n) % SEED_LIMIT if c.seed is not None else secrets.randbelow(2**31)
        self.turns += 1
        made: list[str] = []

        def show(row: int, piece: str) -> None:
            if row == 0:
                made.append(piece)
                self.out.write(piece)

        stream = not d.drives_loop
        if stream and n > 1:
            self.out.line(label(0, 1, 0, n, seed))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*more than the model's context.*")
                results = generate_text(
                    d.model, d.tokenizer, [context], processors=d.chain, sampler=d.sampler,
                    max_new_tokens=c.max_new_tokens, stop=[unescape(s) for s in c.stop], num_samples=n,
                    seed=seed, eos_token_id=d.eos_token_id, on_text=show if stream else None,
                )  # fmt: skip
        except KeyboardInterrupt:
            self.out.line(" [stopped]")
            self.text = context + "".join(made)
            return
        except DecodekitError as e:
            self.out.line()
            self.error(str(e))
            return
        if stream:
            self.out.line()
        for i, r in enumerate(results):
            if i == 0 and stream:
                continue
            if n > 1:
                self.out.line(label(0, 1, r.sample_index, n, r.seed))
            self.out.line(r.text)
        self.text = context + results[0].text
        if self.writer is not None:
            self.writer.write([text_record(r, self.turns - 1, settings_record(c, d)) for r in results])


def run_interactive(overrides: list[str], config: CommandConfig, registry: Registry) -> None:
    """Start a session on the command line's configuration and loop until /quit or end of input."""
    Session(overrides, config, registry).loop()
