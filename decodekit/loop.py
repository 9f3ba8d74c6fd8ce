"""The decoding loop: prefill the prompt, then per step process logits, sample, append, check stops.

:func:`generate` drives any model that follows :class:`decodekit.models.protocol.CausalLM`.
Rows stop independently at EOS (or when a stopping criterion says so); the loop ends when every
row has stopped or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodekit.errors import ConfigError, InvalidLogitsError, PluginError
from decodekit.kernels import loop_ops
from decodekit.logprobs import LogprobsRecorder, TokenLogprobs, check_logprobs, to_host
from decodekit.processors.base import ProcessorChain, check_logits, invalid_rows, processor_name
from decodekit.random import RowRandom, row_seeds
from decodekit.samplers.base import Greedy
from decodekit.samplers.rejection import fuse
from decodekit.stepping import DynamicSteps, StaticSteps, prefill_prompt

# A stopping criterion: (sequences [B, T], number of new tokens so far) -> [B] bool, True = stop the row.
StoppingCriterion = Callable[[torch.Tensor, int], torch.Tensor]
# A streaming callback: (step, tokens [B], finished [B]) -> None, called once per new token.
TokenCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

FINISH_REASONS = ("length", "eos", "stop")  # codes 0, 1, 2


@dataclass
class GenerateOutput:
    """What :func:`generate` returns.

    Attributes:
        tokens: ``[B, N]`` the new tokens; after a row finished, ``pad_token_id``.
        lengths: ``[B]`` how many of ``tokens`` each row made (its EOS included).
        finish_reasons: per row ``"eos"``, ``"stop"`` (a stopping criterion) or ``"length"``.
        sequences: ``[B, T0 + N]`` the prompt as given (padding included) then ``tokens``.
        logprobs: ``[B, N]`` log-probability of each chosen token: in ``logprobs_mode`` when
            ``logprobs`` was asked for, else under the processed distribution
            (``output_scores=True``); ``None`` otherwise.
        top_logprobs, top_ids: ``[B, N, n]`` the ``n = logprobs`` most likely tokens of every
            step and their log-probabilities (``logprobs`` asked for only).
        logprobs_mode: ``"raw"`` or ``"processed"``, with ``logprobs``.
        scores: the processed logits ``[B, V]`` of every step (``output_scores=True`` only).
        sequence_scores: ``[B]`` a sequence's score, for samplers that rank (beam search).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finish_reasons: list[str]
    sequences: torch.Tensor
    logprobs: torch.Tensor | None = None
    scores: list[torch.Tensor] | None = None
    sequence_scores: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    logprobs_mode: str | None = None

    def rows(self) -> list[list[int]]:
        """The new tokens of each row as lists, cut at the row's length."""
        lengths = self.lengths.tolist()
        return [row[:n] for row, n in zip(self.tokens.tolist(), lengths)]

    def token_logprobs(self) -> list[TokenLogprobs] | None:
        """Each row's :class:`~decodekit.logprobs.TokenLogprobs`, cut at its length (``logprobs`` only)."""
        if self.top_logprobs is None or self.top_ids is None or self.logprobs is None or self.logprobs_mode is None:
            return None
        return to_host(self.logprobs, self.top_logprobs, self.top_ids, self.rows(), self.logprobs_mode)


def as_chain(processors: Any) -> ProcessorChain:
    """``None``, one processor, a list of them, or a chain: always a :class:`ProcessorChain`."""
    if processors is None:
        return ProcessorChain()
    if isinstance(processors, ProcessorChain):
        return processors
    if callable(processors):
        return ProcessorChain([processors])
    return ProcessorChain(list(processors))


def eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"eos_token_id={eos_token_id!r} is not allowed: must be token id(s) >= 0")
    return torch.tensor(ids, dtype=torch.long, device=device)


def prepare_inputs(
    model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and move the prompt and its mask to the model's device; ``[B, T0]`` each."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} is not allowed: must be an integer >= 1")
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        lengths = {len(row) for row in input_ids}
        if len(lengths) > 1:
            raise ConfigError(
                f"input_ids: rows have different lengths {sorted(lengths)}; left-pad them and pass an attention_mask"
            )
    ids = torch.as_tensor(input_ids, device=model.device)
    if ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"input_ids: must be integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ConfigError(f"input_ids: must be [batch, length] with length >= 1, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= model.vocab_size):
        raise ConfigError(f"input_ids: token ids must be in [0, {model.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(attention_mask, device=model.device).bool()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask: shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    return ids, mask


def generate(
    model: Any,
    input_ids: Any,
    *,
    processors: Any = None,
    sampler: Any = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: Any = None,
    seed: int | list[int] | None = None,
    stopping: Sequence[StoppingCriterion] = (),
    on_token: TokenCallback | None = None,
    output_scores: bool = False,
    check_every: int | None = None,
    logprobs: int | None = None,
    logprobs_mode: str = "raw",
    static_cache: bool = False,
) -> GenerateOutput:
    """Decode up to ``max_new_tokens`` tokens after each row of ``input_ids``.

    Args:
        model: follows :class:`decodekit.models.protocol.CausalLM`.
        input_ids: ``[B, T0]`` (or ``[T0]``) prompt token ids, left-padded when lengths differ.
        processors: a processor, a list of them or a :class:`ProcessorChain` (default: none).
        sampler: a sampler (default :class:`~decodekit.samplers.Greedy`).
        max_new_tokens: the most tokens to add per row.
        eos_token_id: token id(s) that end a row (kept as the row's last token).
        pad_token_id: what fills a row after it finished (default: the first EOS id, else 0).
        attention_mask: ``[B, T0]``, 1 for real tokens, 0 for left padding (default all ones).
        seed: an int (row ``b`` uses ``seed + b``), one int per row, or None (drawn from torch's
            global generator). The same seeds give the same tokens, whatever else is in the batch.
        stopping: extra stopping criteria, ``(sequences, n_new) -> [B] bool``.
        on_token: streaming callback ``(step, tokens [B], finished [B])``, once per step.
        output_scores: also return the processed logits of every step and chosen-token logprobs.
        check_every: how often (in steps) to look at the device for "all rows done" and invalid
            logits; default 1 on CPU, 8 elsewhere (each look is a host-device sync).
        logprobs: per step, the chosen token's log-probability and the ``logprobs`` most likely
            tokens' (0 to 20), gathered on the device and returned in ``logprobs``,
            ``top_logprobs`` and ``top_ids`` (``None``: not computed).
        logprobs_mode: ``"raw"`` (the model's log-softmax) or ``"processed"`` (after the
            processor chain). A sampler that drives its own loop (beam search) gives ``"raw"``
            only: the returned sequences are scored by one forward pass after the search.
        static_cache: steps of fixed shapes over a cache of the whole run's length (native GPT
            and Llama; the run must fit the model's context), captured once as a CUDA graph on
            CUDA; the same tokens as the default (see :mod:`decodekit.stepping`).

    Returns:
        :class:`GenerateOutput`.

    Raises:
        ConfigError: a bad argument (the message names it).
        InvalidLogitsError: the model's logits hold NaN or +inf.
        PluginError: a processor or sampler raised or returned bad values (named).
    """
    ids, mask = prepare_inputs(model, input_ids, attention_mask, max_new_tokens)
    check_logprobs(logprobs, logprobs_mode)
    chain = as_chain(processors)
    sampler = Greedy() if sampler is None else sampler
    if not isinstance(static_cache, bool):
        raise ConfigError(f"static_cache={static_cache!r} is not allowed: must be true or false")
    if getattr(sampler, "drives_loop", False):
        if static_cache:
            raise ConfigError(f"static_cache=True: {processor_name(sampler)} drives its own loop, over a cache of its own")
        if logprobs is not None and logprobs_mode != "raw":
            raise ConfigError(f"logprobs_mode={logprobs_mode!r}: {processor_name(sampler)} drives its own loop; it gives raw logprobs only")
        out = sampler.generate(
            model, ids, processors=chain, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, attention_mask=mask, seed=seed, stopping=stopping,
            on_token=on_token, output_scores=output_scores,
        )  # fmt: skip
        return out if logprobs is None else rescored(model, out, ids, mask, logprobs)
    device = ids.device
    eos = eos_tensor(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 8
    batch, prompt_len = ids.shape
    rng = RowRandom(row_seeds(seed, batch, device))
    chain, sampler = fuse(chain, sampler)  # e.g. top-p then multinomial: drawn without a sort
    processed_logprobs = logprobs is not None and logprobs_mode == "processed"
    nucleus = getattr(sampler, "nucleus", None) if processed_logprobs and not output_scores else None  # top-p's bounds
    record = getattr(sampler, "recorded_filter", None) if output_scores or (processed_logprobs and not nucleus) else None
    recorder = LogprobsRecorder(logprobs, logprobs_mode) if logprobs is not None else None

    # Buffers for the whole run; the loop works on growing views of them.
    seq = torch.full((batch, prompt_len + max_new_tokens), pad, dtype=torch.long, device=device)
    seq[:, :prompt_len] = ids
    full_mask = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.bool, device=device)
    full_mask[:, :prompt_len] = mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    reason = torch.zeros(batch, dtype=torch.int8, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    scores: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = []

    context = getattr(model, "max_context", None)
    if static_cache and context is not None and min(prompt_len, context) + max_new_tokens > context:
        raise ConfigError(f"static_cache=True: the prompt ({min(prompt_len, context)} tokens) and max_new_tokens={max_new_tokens} "
                          f"exceed the model's context of {context}; lower max_new_tokens or use the default cache")  # fmt: skip
    logits, cache, window_mask = prefill_prompt(model, ids, mask, max_new_tokens)  # logits: [B, V]
    stepper = (StaticSteps if static_cache else DynamicSteps)(model, cache, full_mask, window_mask)
    chain.begin(ids)
    if hasattr(sampler, "begin"):
        sampler.begin(ids)

    steps = 0
    for step in range(max_new_tokens):
        end = prompt_len + step
        history = seq[:, :end]  # [B, T] prompt + tokens so far
        raw = logits.float()
        processed = run_chain(chain, history, raw, step)  # [B, V]
        invalid = invalid_rows(processed).any()
        if check_every != 1:
            bad = bad | invalid  # looked at after the loop: no sync per step
        elif bool(invalid):
            diagnose(chain, history, raw, step)
        token = _sample(sampler, history, processed, rng, step)  # [B]
        if record is not None:  # a filter fused into the sampler, applied for the record only
            processed = record(history, processed)
        cut = nucleus(processed, token) if nucleus is not None else None  # its bounds, for logprobs
        token, finished, reason = settle(token, finished, reason, lengths, seq, end, eos, pad)  # EOS stops a row
        if recorder is not None:
            recorder.record(raw, processed, token, cut)
        if output_scores:
            scores.append(processed)
            chosen.append(torch.log_softmax(processed, dim=-1).gather(-1, token[:, None]).squeeze(-1))

        # The caller's stop checks after EOS's; a row keeps its first reason.
        for criterion in stopping:
            stop = criterion(seq[:, : end + 1], step + 1).to(device) & ~finished
            reason = torch.where(stop, torch.full_like(reason, 2), reason)
            finished = finished | stop
        if on_token is not None:
            on_token(step, token, finished)
        steps = step + 1
        if steps == max_new_tokens:
            break
        if (steps % check_every == 0) and bool(finished.all()):
            break

        logits = stepper(token, seq, end)  # the next forward pass: one new position per row

    if bool(bad):
        raise InvalidLogitsError("invalid logits (NaN, +inf or a row with no token left) appeared during decoding; "
                                 "run on CPU, which checks every step, to find the step and processor")
    tokens = seq[:, prompt_len : prompt_len + steps]
    out = GenerateOutput(
        tokens=tokens,
        lengths=lengths,
        finish_reasons=[FINISH_REASONS[r] for r in reason.tolist()],
        sequences=seq[:, : prompt_len + steps],
        logprobs=torch.stack(chosen, dim=1) if output_scores else None,
        scores=scores if output_scores else None,
    )
    if recorder is not None:
        out.logprobs, out.top_logprobs, out.top_ids = recorder.tensors()
        out.logprobs_mode = logprobs_mode
    return out


def rescored(model: Any, out: GenerateOutput, ids: torch.Tensor, mask: torch.Tensor, n: int) -> GenerateOutput:
    """``out`` with raw logprobs of its rows' tokens, from one forward pass over prompt + tokens
    (for samplers that drive their own loop; output row ``r`` continues prompt ``r // (rows / B)``)."""
    from decodekit.scoring import sequence_logprobs

    per_prompt = out.tokens.shape[0] // ids.shape[0]
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]
    rows = out.rows()
    scored = sequence_logprobs(model, [prompts[r // per_prompt] + new for r, new in enumerate(rows)], top=n)
    width = out.tokens.shape[1]
    chosen = torch.zeros(out.tokens.shape, dtype=torch.float32)
    values = torch.zeros((*out.tokens.shape, n), dtype=torch.float32)
    top_ids = torch.zeros((*out.tokens.shape, n), dtype=torch.long)
    for r, (new, lp) in enumerate(zip(rows, scored)):  # host side, once: after the search
        k = len(new)
        if k:
            chosen[r, :k] = torch.tensor(lp.logprobs[-k:])
            values[r, :k] = torch.tensor(lp.top_logprobs[-k:]).reshape(k, n)
            top_ids[r, :k] = torch.tensor(lp.top_ids[-k:], dtype=torch.long).reshape(k, n)
    device = out.tokens.device
    out.logprobs, out.top_logprobs, out.top_ids = chosen[:, :width].to(device), values.to(device), top_ids.to(device)
    out.logprobs_mode = "raw"
    return out


def settle(token: torch.Tensor, finished: torch.Tensor, reason: torch.Tensor, lengths: torch.Tensor,
           seq: torch.Tensor, end: int, eos: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Record a step's tokens ``[B]``: a finished row's becomes ``pad``; each is written at
    ``seq[:, end]`` and an unfinished row's length grows by one (both in place); a row whose token
    is in ``eos`` finishes with reason 1. Returns ``(token, finished, reason)`` as new tensors (a
    callback may keep the old ones). One native operator where the kernels are loaded, on CPU."""
    ops = loop_ops(token.device)
    if ops is not None:
        return ops.settle_rows(token, finished, reason, lengths, seq, end, eos, pad)
    token = torch.where(finished, torch.full_like(token, pad), token)
    seq[:, end] = token
    lengths += (~finished).long()
    hit_eos = torch.isin(token, eos) & ~finished
    return token, finished | hit_eos, torch.where(hit_eos, torch.ones_like(reason), reason)


def run_chain(chain: ProcessorChain, history: torch.Tensor, logits: torch.Tensor, step: int) -> torch.Tensor:
    """Run the chain; if it raises, re-run it checked to name the processor at fault."""
    try:
        out = chain(history, logits)
    except Exception:
        chain.checked(history, logits, step=step)
        raise
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape or out.dtype != logits.dtype:
        chain.checked(history, logits, step=step)
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(f"the processor chain returned {got} at step {step}, expected {tuple(logits.shape)} {logits.dtype}")
    return out


def diagnose(chain: ProcessorChain, history: torch.Tensor, raw: torch.Tensor, step: int) -> None:
    """Find who made this step's logits invalid: the model or a named processor. Always raises."""
    check_logits(raw, f"the model's logits at step {step}")
    chain.checked(history, raw, step=step)
    raise InvalidLogitsError(f"invalid logits after the processor chain at step {step}")


def _sample(sampler: Any, history: torch.Tensor, logits: torch.Tensor, rng: RowRandom, step: int) -> torch.Tensor:
    try:
        token = sampler(history, logits, rng)
    except Exception as exc:
        raise PluginError(f"sampler {processor_name(sampler)} raised at step {step}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(token, torch.Tensor) or token.shape != logits.shape[:1] or token.dtype != torch.long:
        got = f"{tuple(token.shape)} {token.dtype}" if isinstance(token, torch.Tensor) else type(token).__name__
        raise PluginError(
            f"sampler {processor_name(sampler)} returned {got} at step {step}; expected {tuple(logits.shape[:1])} torch.int64"
        )
    return token
