"""The logits-processor contract, the chain that runs processors in order, and shared helpers.

A logits processor is any callable ``(input_ids: LongTensor[B, T], logits: FloatTensor[B, V])
-> FloatTensor[B, V]``: the call shape of transformers' processors, so theirs run in our chains
unchanged. Removed tokens are ``-inf``; a processor never returns NaN or ``+inf`` and never
removes every token of a row. It never changes its input in place.

Two optional methods let a processor see more than one step:

- ``begin(input_ids)``: called once with the prompts ``[B, T0]`` before the first step (the chain
  forwards it). Processors that count *generated* tokens record each row's prompt length here:
  the number of its non-negative ids.
- ``reorder(index)``: rows taken as ``[index]`` (beam search expands and reorders rows this way).

Per-row settings (what a request engine builds on). Every built-in takes, for each setting, a
scalar or one value per row (a list, tuple or 1-D tensor of length ``B``; ``logit_bias`` a list of
dicts, ``bad_words`` a list of lists). Each value is validated like the scalar, and an error names
the row (``row 3: top_p=1.5 is not allowed: ...``). Every setting has an "off" value; a row that is
off gets its logits back bit for bit, and a row's result is exactly the one it gets alone, built
with its own scalar values (the batch adds no Python loop over rows). Temperature 0 keeps only the
row's first maximum (the token ``argmax`` picks). A processor built per row holds ``[B]`` tensors
and is called with batches of ``B`` rows only (another size is a one-line error); one built from
scalars runs on any batch.

- ``row_fields``: names of the tensor attributes with a leading batch dimension (per-row values and
  per-row state such as prompt lengths). ``reorder`` and ``assign`` work generically from them.
- ``row_params``: the constructor arguments that take per-row values, each with the value that
  turns it off (what :func:`decodekit.registry.build_row_chain` gives rows that do not set it).
- ``assign(rows, other)``: ``other`` is a processor of the same class built (and ``begin``-ed) for
  ``k`` rows; its per-row values and state are copied into rows ``rows`` (``LongTensor[k]``) of this
  one, which must be built per row. A request engine admits new requests into batch slots so.
- ``row_padding``: for ``row_fields`` whose rows are padded to a common size (one row's list of
  bad words, another's longer list), the fill value; ``assign`` pads both sides to the larger
  shape before copying rows in.
- ``active``: False when every row is off (known from host values, no sync); a chain skips inactive
  processors. ``assign`` recomputes it (one host sync, at admission, not per step); ``reorder``
  keeps it.
- ``shared_settings``: ``Params`` fields that other processors declare too, identically (the
  penalties' ``penalty_last_n``). The registry lets each of them own the name, and a value given
  as a setting reaches every one of them that is in the chain (it adds none to the chain).
- ``negative_padding``: the processor reads ``input_ids`` and ignores negative ids there (rows may
  be left-padded with ``-1``): they are never counted as present, never part of an n-gram. Positive
  pad ids given by users of ``generate`` keep their meaning (counted, as transformers does). A
  row ``b`` at a call with history ``[B, T]`` has generated
  ``(input_ids[b] >= 0).sum() - prompt_length[b]`` tokens, the last that many columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from decodekit.errors import ConfigError, InvalidLogitsError, PluginError
from decodekit.kernels import logits_ops
from decodekit.processors.rows import column, common_shape, float_rows, int_rows, is_row_list, pad_to, row_values
from decodekit.validation import field_model, validate

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
    row_fields: ClassVar[tuple[str, ...]] = ()  # tensor attributes with a leading batch dimension
    row_params: ClassVar[dict[str, Any]] = {}  # constructor arguments taking per-row values -> their off value
    row_test_values: ClassVar[dict[str, list[Any]]] = {}  # per-row setting -> values the kit gives rows (off first)
    row_padding: ClassVar[dict[str, Any]] = {}  # padded row_fields -> their fill value (assign re-pads)
    negative_padding: ClassVar[bool] = False  # reads input_ids and ignores negative (padding) ids
    shared_settings: ClassVar[tuple[str, ...]] = ()  # settings other processors take too (penalty_last_n)
    active: bool = True  # False when every row is off: a chain skips the processor
    rows: int | None = None  # the batch size when built with per-row values

    @classmethod
    def supports_rows(cls) -> bool:
        """Whether the constructor takes per-row values (declared by ``row_params``)."""
        return bool(cls.row_params)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, input_ids: torch.Tensor) -> None:
        """Called once with the prompt ``[B, T0]`` before the first step. Default: nothing."""

    def reorder(self, index: torch.Tensor) -> None:
        """Rows taken as ``[index]``: every ``row_fields`` tensor is indexed; scalars are kept."""
        for field in self.row_fields:
            value = getattr(self, field, None)
            if isinstance(value, torch.Tensor):
                setattr(self, field, value[index.to(value.device)])
        if self.rows is not None:
            self.rows = int(index.shape[0])

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        """Copy ``other``'s per-row values and state (built for ``len(rows)`` rows) into rows ``rows``."""
        if type(other) is not type(self):
            raise ConfigError(f"{self.name}: assign needs a {type(self).__name__}, got {type(other).__name__}")
        if self.rows is None:
            raise ConfigError(f"{self.name}: assign needs a processor built with per-row values")
        for field in self.row_fields:
            mine, theirs = getattr(self, field, None), getattr(other, field, None)
            if not isinstance(mine, torch.Tensor):
                continue  # state not started yet (no begin)
            if theirs is None:
                raise ConfigError(f"{self.name}: assign: the new rows have no {field.lstrip('_')} (call begin first)")
            theirs = torch.as_tensor(theirs).to(device=mine.device, dtype=mine.dtype)
            if field in self.row_padding:  # padded rows: both sides to the larger shape
                shape = common_shape(mine, theirs)
                mine, theirs = pad_to(mine, shape, self.row_padding[field]), pad_to(theirs, shape, self.row_padding[field])
            updated = mine.clone()
            updated[rows.to(mine.device)] = theirs
            setattr(self, field, updated)
        self.active = self.any_row_on()

    def any_row_on(self) -> bool:
        """Whether some row is not off, from host values (a sync when they live on a device)."""
        return True

    def init_setting(self, name: str, value: Any, kind: type = float) -> None:
        """Set ``self.<name>`` from a scalar or from per-row values, each validated by ``Params``."""

        # the whole Params (its validators too) where the others have defaults, else the field alone
        others_required = any(f.is_required() for n, f in self.Params.model_fields.items() if n != name)
        model = field_model(self.Params, name) if others_required else self.Params

        def check(v: Any) -> Any:
            return kind(getattr(validate(model, **{name: v}), name))

        if not is_row_list(value):
            setattr(self, name, check(value))
            return
        values = row_values(value, check)
        if self.rows is not None and len(values) != self.rows:
            raise ConfigError(f"{self.name}: {name} has {len(values)} per-row values, another setting {self.rows}")
        setattr(self, name, float_rows(values) if kind is float else int_rows(values))
        self.rows = len(values)

    def value(self, name: str, like: torch.Tensor) -> Any:
        """A setting as a Python scalar, or per row as a ``[B, 1]`` column on ``like``'s device."""
        v = getattr(self, name)
        return column(v, like) if isinstance(v, torch.Tensor) else v

    def check_batch(self, logits: torch.Tensor) -> None:
        """One line when a processor built for ``rows`` rows is called with another batch size."""
        if self.rows is not None and logits.shape[0] != self.rows:
            raise ConfigError(
                f"{self.name}: built with per-row values for {self.rows} rows, called with a batch of {logits.shape[0]}"
            )

    def __or__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([self, other])

    def __ror__(self, other: Processor) -> ProcessorChain:
        return ProcessorChain([other, self])

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> LogitsProcessor:
        """Build from validated params; override when the constructor needs the context."""
        return cls(**params.model_dump())

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: BuildContext) -> LogitsProcessor:
        """Build from per-row values (one list per ``row_params`` name) and settings shared by every row."""
        return cls(**values, **shared)

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("active", "rows")}
        fields = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({fields})"


class BuildContext:
    """What a processor may need from the surroundings when built from settings.

    ``encode`` turns text into token ids (for ``bad_words`` given as strings), ``decode`` turns
    them back (to check that the tokens mean the text), ``eos_token_id`` names the
    end-of-sequence token(s), and ``tokenizer`` is the tokenizer itself (structured output
    builds its grammar backend's vocabulary from it).
    """

    def __init__(
        self,
        *,
        eos_token_id: int | list[int] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        vocab_size: int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
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
            if getattr(p, "active", True):
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

    def assign(self, rows: torch.Tensor, other: ProcessorChain) -> None:  # type: ignore[override]
        """Processor by processor, :meth:`LogitsProcessor.assign`; ``other`` has the same structure."""
        if not isinstance(other, ProcessorChain) or [type(p) for p in other] != [type(p) for p in self]:
            raise ConfigError(f"assign: the chains differ ({self!r} and {other!r})")
        for mine, theirs in zip(self.processors, other.processors):
            mine.assign(rows, theirs)  # type: ignore[attr-defined]
        self._steps = _fuse(self.processors)

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
            if not getattr(p, "active", True):
                continue
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

    Only when both act and are built from scalars: an "off" value (``top_k <= 0``, ``top_p = 1``),
    ``top_p = 0`` or per-row values run as they are.
    """
    from decodekit.processors.truncation import TopK, TopKTopP, TopP

    out: list[Processor] = []
    i = 0
    while i < len(processors):
        p = processors[i]
        nxt = processors[i + 1] if i + 1 < len(processors) else None
        if type(p) is TopK and type(nxt) is TopP and p.rows is None and nxt.rows is None and p.top_k > 0 and 0.0 < nxt.top_p < 1.0:
            out.append(TopKTopP(p, nxt))
            i += 2
        else:
            out.append(p)
            i += 1
    return out


# --- helpers shared by the built-in processors -------------------------------------------


def invalid_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows holding NaN or ``+inf``, or with every token removed (no sync).

    All three show in the row maximum (NaN propagates through ``amax``): one reduction (one
    operator, where this process has loaded decodekit's native CPU kernels and the logits are
    float32 on CPU: fewer operators for a step run after the weights have flushed the caches).
    """
    ops = logits_ops(logits)
    if ops is not None:
        return ops.invalid_rows(logits)
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
