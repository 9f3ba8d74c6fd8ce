"""Per-request text: streams a request's continuation as text and finds its stop strings.

The engine keeps one :class:`RequestText` per request that has stop strings or whose text is
streamed; requests without either cost nothing here. Text is shown up to where no stop string
could still begin, so a stop string is never streamed.
"""

from __future__ import annotations

from collections.abc import Sequence

from decodekit.tokenization import StreamDecoder, Tokenizer


class RequestText:
    """Decodes one request's tokens as they come; ``push`` says whether a stop string ended it."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.text = ""
        self.shown = 0
        self.stop_string: str | None = None

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns the text now certain to show, and whether a stop string hit."""
        piece = self.decoder.push(token)
        if not piece:
            return "", False
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [(at, s) for at, s in ((self.text.find(s, start), s) for s in self.stop) if at >= 0]
        if found:
            at, self.stop_string = min(found)
            self.text = self.text[:at]
            return self.flush(), True
        return self._show(len(self.text) - self.hold), False

    def flush(self) -> str:
        """The request ended: whatever was held back."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : upto], upto
        return piece
