"""Keep only some tokens: a fixed set (vLLM's ``allowed_token_ids``), or a set a Python function
gives from each row's tokens so far (transformers' ``prefix_allowed_tokens_fn``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from decodekit.errors import ConfigError
from decodekit.processors.base import NEG_INF, BuildContext, LogitsProcessor, keep_nonempty
from decodekit.processors.rows import row_values
from decodekit.validation import validate

TokenIds = list[Annotated[int, Field(ge=0)]]


class AllowedTokenIds(LogitsProcessor):
    """Keep only the given token ids: every other logit becomes ``-inf``.

    vLLM's ``SamplingParams.allowed_token_ids``. ``[]`` is off (vLLM refuses an empty list; here it
    means "no restriction", the value of rows that do not set it). An id outside the vocabulary is
    refused (at build time when the vocabulary size is known, else at the first call). If every
    allowed token of a row was already removed by an earlier processor, the row is left as it was
    (on CPU a :class:`BanSkippedWarning` says so). transformers has none (its
    ``prefix_allowed_tokens_fn`` with a constant function does the same).

    Per row: one list per row (``[[1, 5], [], [7]]``), held padded as ``[B, K]`` ids (``-1`` past a
    row's entries); each call gathers the allowed logits and scatters them into a row of ``-inf``,
    for all rows at once.
    """

    name = "allowed_token_ids"
    idempotent = True
    order = 45
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    test_params = [lambda v: {"allowed_token_ids": [0, v - 1]}, lambda v: {"allowed_token_ids": [v // 2]}]
    row_test_values = {"allowed_token_ids": [[], [0], [1, 3], [7, 2, 5], [0, 1, 2, 3, 4, 5, 6, 7]]}
    row_fields = ("_ids",)
    row_params = {"allowed_token_ids": []}
    row_padding = {"_ids": -1}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        allowed_token_ids: TokenIds = Field(description="keep only these token ids, e.g. [1,2,3]; [] = off")

    def __init__(self, allowed_token_ids: Sequence[int] | Sequence[Sequence[int]]) -> None:
        def check(ids: Any) -> list[int]:
            return list(dict.fromkeys(validate(self.Params, allowed_token_ids=ids).allowed_token_ids))

        given = allowed_token_ids
        per_row = isinstance(given, (list, tuple)) and bool(given) and all(isinstance(r, (list, tuple)) for r in given)
        rows = row_values(given, check) if per_row else [check(given)]
        self.allowed_token_ids: list[int] | list[list[int]] = rows if per_row else rows[0]
        packed = torch.full((len(rows), max(1, max(len(r) for r in rows))), -1, dtype=torch.long)
        for b, r in enumerate(rows):  # host packing, at construction
            packed[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        # per row: `_ids` moves with reorder/assign; from a scalar: one list for any batch
        self._ids: torch.Tensor | None = packed if per_row else None
        self._shared = None if per_row else packed
        self.rows = len(rows) if per_row else None
        self._biggest = max((i for r in rows for i in r), default=-1)
        self._some_off = per_row and not all(rows)  # host flag: rows without a list keep their logits
        self.active = any(rows)

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> LogitsProcessor:
        processor = cls(**params.model_dump())
        if context.vocab_size is not None:
            processor.check_vocabulary(context.vocab_size)
        return processor

    def check_vocabulary(self, vocab_size: int) -> None:
        if self._biggest >= vocab_size:
            raise ConfigError(f"allowed_token_ids: token id {self._biggest} is outside the vocabulary (size {vocab_size})")

    def any_row_on(self) -> bool:
        return bool((self._ids >= 0).any()) if self._ids is not None else bool(self.allowed_token_ids)

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)  # re-pads to the longer lists
        if self._ids is not None:  # host facts, read at admission (a sync then), not per step
            self._biggest = int(self._ids.max())
            self._some_off = bool((self._ids < 0).all(dim=-1).any())

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        self.check_vocabulary(logits.shape[-1])
        per_row = self._ids is not None
        ids = (self._ids if per_row else self._shared).to(logits.device)  # [B or 1, K]
        # padding repeats the row's first id: the same value scattered twice
        ids = torch.where(ids >= 0, ids, ids[:, :1].clamp(min=0)).expand(logits.shape[0], -1)
        out = torch.full_like(logits, NEG_INF).scatter_(-1, ids, logits.gather(-1, ids))
        if self._some_off:  # rows with no list are off
            out = torch.where((self._ids < 0).all(dim=-1, keepdim=True).to(logits.device), logits, out)
        return keep_nonempty(out, logits, "allowed_token_ids")


PrefixFn = Callable[[int, torch.Tensor], Sequence[int]]


class PrefixAllowedTokens(LogitsProcessor):
    """Keep only the tokens a function allows after each row's tokens so far.

    transformers' ``PrefixConstrainedLogitsProcessor``: ``prefix_allowed_tokens_fn(batch_id,
    input_ids)`` returns the ids allowed next for row ``input_ids`` (a 1-D tensor, its ``-1``
    padding left out), where ``batch_id`` is the row's index divided by ``num_beams``; every other
    logit becomes ``-inf``. An empty answer is an error (transformers raises too), and so is an id
    outside the vocabulary. De Cao et al. 2021, "Autoregressive Entity Retrieval".

    The function is the user's Python code, so it is called once per row per step: this is the
    one processor with a Python loop over rows, and its speed is the function's. The answers are
    gathered into one index tensor, and the allowed logits copied into a batch of ``-inf`` at once. A Python-only setting
    (``build_chain({"prefix_allowed_tokens_fn": fn})``): the command line cannot give a function.
    No per-row values: a batch shares one function (it sees each row's ``batch_id``).
    """

    name = "prefix_allowed_tokens"
    idempotent = True
    order = 46
    negative_padding = True
    test_params = [
        lambda v: {"prefix_allowed_tokens_fn": _first_and_last(v)},
        lambda v: {"prefix_allowed_tokens_fn": _follow_last_token(v)},
    ]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prefix_allowed_tokens_fn: Any = Field(description="Python only: (batch_id, input_ids) -> the token ids allowed next")

        @field_validator("prefix_allowed_tokens_fn")
        @classmethod
        def _callable(cls, value: Any) -> Any:
            if not callable(value):
                raise ValueError(
                    "must be a Python function (batch_id, input_ids) -> allowed token ids, given from Python "
                    "(build_chain, generate); the command line cannot give one"
                )
            return value

    def __init__(self, prefix_allowed_tokens_fn: PrefixFn, num_beams: int = 1) -> None:
        checked = validate(self.Params, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)
        self.prefix_allowed_tokens_fn = checked.prefix_allowed_tokens_fn
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ConfigError(f"num_beams={num_beams!r} is not allowed: must be an integer >= 1")
        self.num_beams = num_beams

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        b, v = logits.shape
        padded = bool((input_ids < 0).any())  # one check per call, not one filter per row
        answers = []
        for row in range(b):  # the user's function, once per row (class docstring)
            ids = input_ids[row][input_ids[row] >= 0] if padded else input_ids[row]
            allowed = torch.as_tensor(self.prefix_allowed_tokens_fn(row // self.num_beams, ids), dtype=torch.long)
            if allowed.numel() == 0:
                raise ConfigError(
                    f"prefix_allowed_tokens_fn returned no token ids for batch_id {row // self.num_beams} "
                    f"(row {row}): the constraint cannot be met; return at least one id"
                )
            answers.append(allowed.flatten().cpu())
        flat = torch.cat(answers)
        low, high = (int(e) for e in torch.aminmax(flat))
        if low < 0 or high >= v:
            bad = low if low < 0 else high
            raise ConfigError(f"prefix_allowed_tokens_fn returned token id {bad}, outside the vocabulary (size {v})")
        rows = torch.repeat_interleave(torch.arange(b), torch.tensor([len(a) for a in answers])).to(logits.device)
        cols = flat.to(logits.device)
        out = torch.full_like(logits, NEG_INF)
        out[rows, cols] = logits[rows, cols]
        return keep_nonempty(out, logits, "prefix_allowed_tokens_fn")


def _first_and_last(vocab_size: int) -> PrefixFn:
    """A test function: tokens 0 and ``V - 1``, whatever the prefix."""
    return lambda batch_id, ids: [0, vocab_size - 1]


def _follow_last_token(vocab_size: int) -> PrefixFn:
    """A test function that reads the prefix: the token after the row's last one, and token 0.

    It leaves ``batch_id`` alone: the property suite checks that a row's result does not depend
    on the rest of the batch, which a function of ``batch_id`` would break by design.
    """
    return lambda batch_id, ids: [(int(ids[-1]) + 1) % vocab_size if len(ids) else 0, 0]
