"""The logits-processor contract, the chain that runs processors in order, and shared helpers.

A logits processor is any callable ``(input_ids: LongTensor[B, T], logits: FloatTensor[B, V])
-> FloatTensor[B, V]``: the call shape of transformers' processors, so theirs run in our chains
unchanged. Removed tokens are ``-inf``; a processor never returns NaN or ``+inf`` and never
removes every token of a row. It never changes its input in place.

Two optional methods let a processor see more than one step:

- ``begin(input_ids)``: called once with the prompt before the first step (the chain forwards
  it). Processors that count *generated* tokens (presence and frequency penalties, min new
  tokens) learn the prompt length here.
- ``reorder(index)``: called by beam search when rows are re-ordered, for processors that keep
  per-row state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from decodekit.errors import ConfigError, InvalidLogitsError, PluginError

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NEG_INF = float("-inf")


class NoParams(BaseModel):
    """Parameters of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class LogitsProcessor:
    """Base class for decodekit's processors (optional for plugins: any callable works).

    Class attributes used by the registry:

    - ``name``: the registry name (``"top_p"``), also the key of ``processor_order``.
    - ``Params``: a pydantic model of the constructor's keyword arguments. Its field names
      are the setting names a user writes (``top_p=0.9``); they are unique across the registry.
    - ``order``: the default position in a chain built from settings (lower runs first).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    order: ClassVar[int] = 1000
    idempotent: ClassVar[bool] = False  # filters whose second pass removes nothing more
    test_params: ClassVar[list[Any]] = []  # constructor kwargs (or vocab_size -> kwargs) for the property suite

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, input_ids: torch.Tensor) -> None:
        """Called once with the prompt ``[B, T0]`` before the first step. Default: nothing."""

    def __or__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([self, other])

    def __ror__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([other, self])

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> LogitsProcessor:
        """Build from validated params; override when the constructor needs the context."""
        return cls(**params.model_dump())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class BuildContext:
    """What a processor may need from the surroundings when built from settings.

    ``encode`` turns text into token ids (for ``bad_words`` given as strings), ``decode`` turns
    them back (to check that the tokens mean the text), and ``eos_token_id`` names the
    end-of-sequence token(s).
    """

    def __init__(
        self,
        *,
        eos_token_id: int | list[int] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        vocab_size: int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.eos_token_id = eos_token_id
        self.encode = encode
        self.vocab_size = vocab_size
        self.decode = decode

    def eos_ids(self, setting: str) -> list[int]:
        if self.eos_token_id is None:
            raise ConfigError(f"{setting}: needs an end-of-sequence token, and none is known (set eos_token_id)")
        ids = [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
        return ids

    def tokens(self, setting: str, text: str) -> list[int]:
        if self.encode is None:
            raise ConfigError(f"{setting}: {text!r} is text, but no tokenizer is loaded; give token ids instead")
        ids = list(self.encode(text))
        if not ids:
            raise ConfigError(f"{setting}: {text!r} encodes to no tokens")
        if self.decode is not None:
            back = self.decode(ids)
            if back != text and back.strip() != text.strip():  # some tokenizers drop a leading space
                raise ConfigError(
                    f"{setting}: {text!r} is not what its tokens {ids} decode to ({back!r}): the tokenizer "
                    "cannot encode it, and banning those tokens would ban something else"
                )
        return ids


def processor_name(processor: Any) -> str:
    """A readable name for a processor or sampler in error messages: its name and module."""
    if hasattr(processor, "__call__") and hasattr(processor, "__qualname__"):  # a plain function
        name, module = processor.__name__, getattr(processor, "__module__", "") or ""
    else:
        name = getattr(processor, "name", "") or type(processor).__qualname__
        module = type(processor).__module__
    return name if module.startswith("decodekit.") else f"{name} ({module})"


class ProcessorChain(LogitsProcessor):
    """Processors run in the order given; itself a processor, composable with ``|``.

    ``RepetitionPenalty(1.2) | Temperature(0.8) | TopP(0.9)`` builds a chain of three. A chain
    is a plain loop over its processors. Adjacent ``TopK`` then ``TopP`` run fused: ``TopP`` then
    sorts only the ``k`` candidates ``TopK`` left, with the same result as running both.
    """

    name = "chain"

    def __init__(self, processors: Iterable[Processor] = ()) -> None:
        flat: list[Processor] = []
        for p in processors:
            if isinstance(p, ProcessorChain):
                flat.extend(p.processors)
            elif callable(p):
                flat.append(p)
            else:
                raise ConfigError(f"processors: {p!r} is not callable; a processor is (input_ids, logits) -> logits")
        self.processors: list[Processor] = flat
        self._steps: list[Processor] = _fuse(flat)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        for p in self._steps:
            logits = p(input_ids, logits)
        return logits

    def begin(self, input_ids: torch.Tensor) -> None:
        for p in self.processors:
            begin = getattr(p, "begin", None)
            if begin is not None:
                begin(input_ids)

    def reorder(self, index: torch.Tensor) -> None:
        for p in self.processors:
            reorder = getattr(p, "reorder", None)
            if reorder is not None:
                reorder(index)

    def __or__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([*self.processors, other])

    def __ror__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([other, *self.processors])

    def __iter__(self) -> Iterator[Processor]:
        return iter(self.processors)

    def __len__(self) -> int:
        return len(self.processors)

    def __getitem__(self, i: int) -> Processor:
        return self.processors[i]

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.processors) if self.processors else "ProcessorChain([])"

    def checked(self, input_ids: torch.Tensor, logits: torch.Tensor, *, step: int | None = None) -> torch.Tensor:
        """Run the chain, checking every processor's output; for diagnosing a bad step.

        Raises :class:`PluginError` naming the first processor that raised, changed the shape
        or dtype, or returned NaN, ``+inf`` or a row with no token left.
        """
        where = f" at step {step}" if step is not None else ""
        for p in self.processors:
            try:
                out = p(input_ids, logits)
            except Exception as exc:  # a plugin's failure is reported with its name
                raise PluginError(f"processor {processor_name(p)} raised{where}: {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape or out.dtype != logits.dtype:
                got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise PluginError(
                    f"processor {processor_name(p)} returned {got}{where}; "
                    f"expected {tuple(logits.shape)} {logits.dtype}"
                )
            problem = describe_invalid(out)
            if problem:
                raise PluginError(f"processor {processor_name(p)} returned {problem}{where}")
            logits = out
        return logits


def _fuse(processors: list[Processor]) -> list[Processor]:
    """Replace ``TopK`` directly followed by ``TopP`` with the equivalent fused processor.

    Only when both act: an "off" value (``top_k <= 0``, ``top_p = 1``) or ``top_p = 0`` runs as is.
    """
    from decodekit.processors.truncation import TopK, TopKTopP, TopP

    out: list[Processor] = []
    i = 0
    while i < len(processors):
        p = processors[i]
        nxt = processors[i + 1] if i + 1 < len(processors) else None
        if type(p) is TopK and type(nxt) is TopP and p.top_k > 0 and 0.0 < nxt.top_p < 1.0:
            out.append(TopKTopP(p, nxt))
            i += 2
        else:
            out.append(p)
            i += 1
    return out


# --- helpers shared by the built-in processors -------------------------------------------


def invalid_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows holding NaN or ``+inf``, or with every token removed (no sync).

    All three show in the row maximum (NaN propagates through ``amax``): one reduction.
    """
    return ~torch.isfinite(logits.amax(dim=-1))


def describe_invalid(logits: torch.Tensor) -> str:
    """An empty string for valid logits, else what is wrong with them (syncs with the device)."""
    if torch.isnan(logits).any():
        rows = torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist()
        return f"NaN logits in row(s) {rows[:8]}"
    if (logits == float("inf")).any():
        rows = (logits == float("inf")).any(dim=-1).nonzero().flatten().tolist()
        return f"+inf logits in row(s) {rows[:8]}"
    empty = (logits == NEG_INF).all(dim=-1)
    if empty.any():
        return f"no token left (every logit -inf) in row(s) {empty.nonzero().flatten().tolist()[:8]}"
    return ""


def check_logits(logits: torch.Tensor, what: str = "logits") -> None:
    """Raise :class:`InvalidLogitsError` if ``logits`` hold NaN, ``+inf`` or an empty row."""
    problem = describe_invalid(logits)
    if problem:
        raise InvalidLogitsError(f"{what}: {problem}")


def to_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cast a float32 result ``x`` to the dtype of the input ``like``, keeping the contract.

    For processors that rescale or shift (they remove nothing). float32: ``+inf`` from overflow
    is clamped to the largest finite value (in place; ``x`` must be a fresh tensor). Half types:
    tokens removed in ``like`` stay ``-inf``, every other token stays finite: each row is first
    shifted so its maximum is 0 (the distribution is unchanged), then clamped into the type's
    range, so no ``+inf`` appears and no row is emptied.
    """
    if like.dtype == torch.float32:
        return x.clamp_(max=_F32_MAX)
    info = torch.finfo(like.dtype)
    removed = like == NEG_INF
    if like.dtype in (torch.float16, torch.bfloat16):
        kept = torch.where(removed, NEG_INF, x)
        row_max = kept.amax(dim=-1, keepdim=True).clamp(min=-info.max, max=info.max)
        x = x - row_max
    out = torch.where(removed, NEG_INF, x.clamp(min=info.min, max=info.max))
    return out.to(like.dtype)


_F32_MAX = float(torch.finfo(torch.float32).max)


class BanSkippedWarning(UserWarning):
    """A ban would have removed every token left in a row, so that row was left as it was."""


def keep_nonempty(new: torch.Tensor, old: torch.Tensor, setting: str = "") -> torch.Tensor:
    """Rows of ``new`` that lost every token fall back to ``old`` (a ban never empties a row).

    On CPU, where a sync is free, this is said in a :class:`BanSkippedWarning` naming ``setting``
    and the rows; on an accelerator it happens silently (checking would sync every step).
    """
    empty = new.amax(dim=-1, keepdim=True) == NEG_INF  # [B, 1]
    if new.device.type == "cpu":
        if not bool(empty.any()):  # the usual case; a sync is free on CPU
            return new
        rows = empty.flatten().nonzero().flatten().tolist()
        warnings.warn(
            f"{setting or 'a ban'}: would remove every token left in row(s) {rows[:8]}; not applied there",
            BanSkippedWarning,
            stacklevel=3,
        )
    return torch.where(empty, old, new)
