"""Generated ids to text, safely: in context, and streamed without splitting a character.

Turning generated ids into text has two traps: a BPE merge or a multi-byte character may
cross the prompt/continuation boundary, and a token may end halfway through a UTF-8
character. :func:`continuation_text` and :class:`StreamDecoder` handle both by decoding
with context and holding back text that ends in an incomplete character. Both work with any
:class:`~decodekit.tokenization.Tokenizer` (and are importable from there too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add after ``prompt_ids``, decoded in context.

    Decoding ``new_ids`` alone goes wrong where a token joins onto the prompt (a BPE merge,
    a leading space SentencePiece drops, a UTF-8 character split across the boundary), so
    this decodes ``prompt + new`` and removes the decoded prompt. When the decoded prompt
    is not a prefix of the whole (its last character was incomplete), what follows their
    longest common prefix is returned.
    """
    whole = tokenizer.decode([*prompt_ids, *new_ids])
    prefix = tokenizer.decode(list(prompt_ids))
    if whole.startswith(prefix):
        return whole[len(prefix):]
    return whole[_common_prefix_length(prefix, whole):]


class StreamDecoder:
    """Text pieces as tokens arrive, never splitting a multi-byte character.

    Text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until
    a later token completes it, or until :meth:`flush`. Each call decodes only the few
    tokens since the last emitted piece, with a little context before them, so a whole
    stream costs linear time. ``"".join(pieces) + flush()`` equals
    ``continuation_text(tokenizer, prompt_ids, all_new_ids)`` for the usual tokenizers.

    Args:
        tokenizer: any :class:`~decodekit.tokenization.Tokenizer`.
        prompt_ids: the prompt; its last few ids give the first token its context and
            are not emitted.
        context: how many earlier ids to decode with each new piece.

    Example::

        stream = StreamDecoder(tokenizer, prompt_ids)
        for token in generated:
            print(stream.push(token), end="")
        print(stream.flush())
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, context: int = 5) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)
        self._read = len(self.ids)  # ids before this are emitted (or belong to the prompt)
        self._prefix = max(0, self._read - context)  # decoding context starts here

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one or more ids; returns the text now complete (possibly ``""``)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if len(self.ids) == self._read:
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if text.endswith(REPLACEMENT) and not final:
            return ""
        start = len(prefix_text) if text.startswith(prefix_text) else _common_prefix_length(prefix_text, text)
        piece = text[start:]
        if not piece and not final:
            return ""  # e.g. a special token: nothing to show yet, keep its context
        self._prefix, self._read = self._read, len(self.ids)
        return piece



def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
