"""The end-of-run summary on stderr: prompt and new tokens, tokens/s, time to the first token.

``decode: 4 samples, 20 prompt tokens, 256 new tokens in 4.12 s (62.1 tok/s), first token after 0.08 s, on cpu with 2 threads``

The clock starts when decoding starts (the model is loaded by then), so the time to the first
token is the prompt's prefill and the first step; tokens/s counts every new token (EOS included)
over the whole decoding time. ``summary=true`` always prints it, ``false`` never, and the
default (null) prints it when stderr is a terminal, as ``progress`` does.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch


def placement(device: Any) -> str:
    """``cpu with 2 threads`` (the threads torch decodes with: ``threads=``), or the device, ``cuda:0``."""
    device = torch.device(device)
    if device.type != "cpu":
        return str(device)
    n = torch.get_num_threads()
    return f"cpu with {n} thread" + ("s" if n != 1 else "")


class RunSummary:
    """Counts a run's tokens and times it; :meth:`close` prints the line."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, where: str = "") -> None:
        self.enabled = enabled
        self.where = where  # e.g. "cpu with 2 threads"
        self.stream = stream or sys.stderr
        self.samples = self.prompt_tokens = self.new_tokens = 0
        self.start = time.perf_counter()
        self.first: float | None = None

    @classmethod
    def for_run(cls, config: Any, device: Any = None) -> RunSummary:
        """The run's summary; ``device`` (the model's) is named at the end, with the CPU's threads."""
        enabled = config.summary if config.summary is not None else sys.stderr.isatty()
        return cls(bool(enabled), where=placement(device) if device is not None else "")

    def token(self, *_: Any) -> None:
        """A step made tokens (any callback's arguments): the first one stops the first-token clock."""
        if self.first is None:
            self.first = time.perf_counter()

    def add(self, prompt_tokens: int, new_tokens: int) -> None:
        """One finished sample."""
        self.samples += 1
        self.prompt_tokens += prompt_tokens
        self.new_tokens += new_tokens
        if new_tokens:
            self.token()

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        first = f", first token after {self.first - self.start:.2f} s" if self.first is not None else ""
        samples = f"{self.samples} sample" + ("s" if self.samples != 1 else "")
        where = f", on {self.where}" if self.where else ""
        return (f"decode: {samples}, {self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens in "
                f"{seconds:.2f} s ({self.new_tokens / seconds:.1f} tok/s){first}{where}")  # fmt: skip

    def close(self) -> None:
        """Print the line (when enabled and some sample finished)."""
        if self.enabled and self.samples:
            sys.stdout.flush()  # the samples first, where both go to one terminal
            self.stream.write(self.line() + "\n")
            self.stream.flush()
