"""Text in, text out: batched decoding of prompts with a tokenizer, stop strings and streaming.

:func:`generate_text` left-pads prompts of different lengths into one batch, runs
:func:`decodekit.generate`, and returns each continuation as text, separately from its prompt
(decoded in context, so a BPE merge across the boundary comes out right), with why it ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodekit.engine.chains import grammar_complete, grammar_reason
from decodekit.engine.request import Request
from decodekit.errors import ConfigError
from decodekit.logprobs import TokenLogprobs, check_logprobs
from decodekit.loop import GenerateOutput, generate
from decodekit.random import row_seeds
from decodekit.scoring import sequence_logprobs
from decodekit.tokenization import StreamDecoder, Tokenizer, check_vocab, continuation_text

# on_text(row, piece): a piece of row ``row``'s continuation, as soon as it is certain.
TextCallback = Callable[[int, str], None]


@dataclass
class TextResult:
    """One continuation.

    Attributes:
        prompt: the prompt text.
        text: the continuation (a stop string that ended it is trimmed off).
        tokens: the new token ids (EOS included when the row ended at EOS).
        finish_reason: ``"eos"``, ``"stop"`` (a stop string), ``"length"``, or ``"incomplete"``:
            structured output (``json_schema``, ``regex``, ``grammar``, ``choice``) that ended
            before its grammar was complete (max_new_tokens, or a stop string cut its text; see
            ``stop_string``), so the text is not a valid output.
        stop_string: the stop string that ended the row, if one did.
        seed: the row's seed.
        prompt_index: which prompt this continues; ``sample_index``: which of its samples.
        sequence_index: which of the sequences a ranking sampler returned for that row (beam
            search with ``num_return_sequences > 1``; best first), else 0.
        score: the sequence's score, for samplers that rank (beam search), else ``None``.
        logprobs: the new tokens' :class:`~decodekit.logprobs.TokenLogprobs` (``logprobs=n``).
        prompt_logprobs: the prompt tokens' raw ones, after the first (``prompt_logprobs=n``).
    """

    prompt: str
    text: str
    tokens: list[int]
    finish_reason: str
    stop_string: str | None
    seed: int
    prompt_index: int = 0
    sample_index: int = 0
    sequence_index: int = 0
    score: float | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], *, pad_token_id: int, max_context: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Token ids of each prompt, left-padded into ``[B, T]`` ids and mask, plus the unpadded ids.

    An empty prompt starts from the tokenizer's BOS (or EOS, as GPT-2 does) token.
    """
    encoded = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(f"prompts[{i}]: expected text, got {type(prompt).__name__}")
        ids = tokenizer.encode(prompt)
        if not ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise ConfigError(f"prompts[{i}] is empty and the tokenizer has no BOS or EOS token to start from")
            ids = [start]
        encoded.append(ids)
    width = max(len(ids) for ids in encoded)
    batch = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, ids in enumerate(encoded):  # host-side packing of the prompts, once per call
        batch[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = True
    return batch, mask, encoded


class StopStrings:
    """A stateless stopping criterion: a row stops when the text of its new tokens holds a stop string.

    It looks at the last tokens of each row it is given, nothing else, so beam search can ask it
    about candidate sequences and steer by it (``stateless = True``): a hypothesis that reaches a
    stop string ends there, as at EOS. :func:`generate_text` adds it for samplers that drive
    their own loop; :class:`TextTracker` still cuts and streams the text.
    """

    stateless = True

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], eos: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.eos = eos
        # Tokens to decode: enough for the longest stop string even at one byte per token (4 per
        # character, the most UTF-8 takes), plus a margin for a token split before its first byte.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 8

    def __call__(self, sequences: torch.Tensor, n_new: int) -> torch.Tensor:
        if not self.stop:
            return torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        tails = sequences[:, sequences.shape[1] - min(n_new, self.window) :].tolist()
        found = []
        for tail in tails:  # text work is per row by nature; runs only when stop strings are given
            text = self.tokenizer.decode([t for t in tail if t not in self.eos])
            found.append(any(s in text for s in self.stop))
        return torch.tensor(found, dtype=torch.bool, device=sequences.device)


class TextTracker:
    """Decodes each row's tokens as they arrive: checks stop strings, streams text pieces.

    Used as a stopping criterion by :func:`generate_text`. Text is streamed up to the point where
    no stop string could still begin, so a stop string is never shown.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        stop: Sequence[str],
        on_text: TextCallback | None,
        eos: set[int],
    ) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.on_text = on_text
        self.eos = eos
        self.decoders = [StreamDecoder(tokenizer, ids) for ids in prompt_ids]
        self.texts = [""] * len(prompt_ids)
        self.shown = [0] * len(prompt_ids)
        self.done = [False] * len(prompt_ids)

    def __call__(self, sequences: torch.Tensor, n_new: int) -> torch.Tensor:
        last = sequences[:, -1].tolist()
        stops = [False] * len(last)
        for row, token in enumerate(last):  # text work is per row by nature; runs only when asked for
            if self.done[row]:
                continue
            if token in self.eos:
                self.finish(row)
                continue
            piece = self.decoders[row].push(token)
            if not piece:
                continue
            start = max(0, len(self.texts[row]) - self.hold)
            self.texts[row] += piece
            found = [(self.texts[row].find(s, start), s) for s in self.stop]
            found = [(at, s) for at, s in found if at >= 0]
            if found:
                at, _ = min(found)
                self.texts[row] = self.texts[row][:at]
                stops[row] = True
                self.finish(row)
            else:
                self._show(row, len(self.texts[row]) - self.hold)
        return torch.tensor(stops, dtype=torch.bool)

    def finish(self, row: int) -> None:
        """The row ended: show whatever was held back."""
        if not self.done[row]:
            self.done[row] = True
            self._show(row, len(self.texts[row]))

    def _show(self, row: int, upto: int) -> None:
        if self.on_text is not None and upto > self.shown[row]:
            self.on_text(row, self.texts[row][self.shown[row] : upto])
            self.shown[row] = upto


def generate_text(
    model: Any,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    *,
    processors: Any = None,
    sampler: Any = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    num_samples: int = 1,
    seed: int | list[int] | None = None,
    on_text: TextCallback | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    output: list[GenerateOutput] | None = None,
    logprobs: int | None = None,
    logprobs_mode: str = "raw",
    prompt_logprobs: int | None = None,
    **kwargs: Any,
) -> list[TextResult]:
    """Continue each prompt; one :class:`TextResult` per prompt and sample, in order.

    Args:
        model: a :class:`~decodekit.models.protocol.CausalLM`.
        tokenizer: a :class:`~decodekit.tokenization.Tokenizer` whose ids fit the model.
        prompts: one prompt or a list; they are decoded as one left-padded batch.
        processors, sampler, max_new_tokens: as for :func:`decodekit.generate`.
        stop: stop strings: a row ends when its text contains one (matched across token
            boundaries); the string is trimmed from the result.
        num_samples: samples per prompt, all in the same batch (rows ``prompt x sample``).
        seed: an int (row ``r`` uses ``seed + r``), one per row, or None.
        on_text: ``on_text(row, piece)`` streams each row's text as it is made.
        eos_token_id: defaults to the tokenizer's EOS.
        output: if a list is given, the raw :class:`GenerateOutput` is appended to it.
        logprobs, logprobs_mode: per new token, its log-probability and the ``logprobs`` most
            likely tokens', raw or processed (see :func:`decodekit.generate`), in each result's
            ``logprobs``.
        prompt_logprobs: the prompt tokens' raw log-probabilities with this many alternatives,
            in each result's ``prompt_logprobs`` (one more forward pass over the prompts).
        **kwargs: passed to :func:`decodekit.generate` (``output_scores``, ``check_every``, ...).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ConfigError("prompts: give at least one prompt")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r} is not allowed: must be an integer >= 1")
    if isinstance(stop, str):
        stop = [stop]
    check_vocab(tokenizer, model)
    check_logprobs(logprobs, logprobs_mode)
    check_logprobs(prompt_logprobs, name="prompt_logprobs")
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos_ids = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)

    rows = [p for p in prompts for _ in range(num_samples)]
    ids, mask, encoded = encode_prompts(tokenizer, rows, pad_token_id=pad)
    seeds = row_seeds(seed, len(rows), torch.device("cpu")).tolist()
    from decodekit.engine.choose import engine_for_rows

    engine = engine_for_rows(model, tokenizer, processors, sampler, longest=max(len(ids) for ids in encoded),
                             max_new_tokens=max_new_tokens, slots=len(encoded), max_queue=len(encoded),
                             eos_token_id=eos_token_id, on_text=on_text)  # fmt: skip
    if engine is not None and output is None and not kwargs:
        requests = [
            Request(prompt_ids=ids_, seed=s, max_new_tokens=max_new_tokens, stop=list(stop), id=(r // num_samples, r % num_samples),
                    logprobs=logprobs, logprobs_mode=logprobs_mode, prompt_logprobs=prompt_logprobs)  # fmt: skip
            for r, (ids_, s) in enumerate(zip(encoded, seeds))
        ]
        return [
            TextResult(
                prompt=rows[o.index], text=o.text or "", tokens=o.tokens, finish_reason=o.finish_reason,
                stop_string=o.stop_string, seed=seeds[o.index], prompt_index=o.id[0], sample_index=o.id[1],
                logprobs=o.logprobs, prompt_logprobs=o.prompt_logprobs,
            )  # fmt: skip
            for o in engine.run(requests)
        ]
    returned = int(getattr(sampler, "num_return_sequences", 1) or 1)  # sequences per row (beam search)
    per_output_row = [ids for ids in encoded for _ in range(returned)]
    tracker = TextTracker(tokenizer, per_output_row, stop, on_text, eos_ids) if (stop or on_text) else None
    stopping: list[Any] = [tracker] if tracker else []
    if stop and getattr(sampler, "drives_loop", False):  # beam search: steer by the stop strings too
        stopping.insert(0, StopStrings(tokenizer, stop, eos_ids))
    out = generate(
        model,
        ids,
        attention_mask=mask,
        processors=processors,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad,
        seed=seeds,
        stopping=stopping,
        logprobs=logprobs,
        logprobs_mode=logprobs_mode,
        **kwargs,
    )
    if output is not None:
        output.append(out)
    results = []
    scores = out.sequence_scores.tolist() if out.sequence_scores is not None else None
    token_logprobs = out.token_logprobs() or [None] * len(per_output_row)
    prompt_lps = [None] * len(encoded) if prompt_logprobs is None else sequence_logprobs(model, encoded, top=prompt_logprobs)
    for i, new in enumerate(out.rows()):
        row = i // returned  # the input row (prompt x sample) this sequence continues
        reason = out.finish_reasons[i]
        content = [t for t in new if t not in eos_ids]
        text = continuation_text(tokenizer, encoded[row], content)
        hit = None
        cut = [(text.find(s), s) for s in stop if s and s in text]
        if cut:
            at, hit = min(cut)
            text, reason = text[:at], "stop"
        reason = grammar_reason(reason, grammar_complete(processors, row, new))
        if tracker is not None:
            tracker.finish(i)
        results.append(
            TextResult(
                prompt=rows[row], text=text, tokens=new, finish_reason=reason, stop_string=hit,
                seed=seeds[row], prompt_index=row // num_samples, sample_index=row % num_samples,
                sequence_index=i % returned, score=None if scores is None else float(scores[i]),
                logprobs=token_logprobs[i], prompt_logprobs=prompt_lps[row],
            )  # fmt: skip
        )
    return results
