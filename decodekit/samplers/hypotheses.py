"""Finished hypotheses of beam search: keeping the best ones, and returning them.

:class:`KeptHypotheses` holds, per prompt and beam group, the ``k`` best finished hypotheses
(``[B, G, k, ...]`` tensors) and merges each step's new ones in. :func:`group_done` is diverse beam
search's per-group stopping rule. :func:`beam_output` picks the ``num_return_sequences`` best kept
hypotheses per prompt and builds the :class:`~decodekit.loop.GenerateOutput`, replaying stopping
criteria and the streaming callback over the returned rows (:func:`replay`). The search itself is
:class:`decodekit.samplers.BeamSearch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

NEG = -1.0e9  # an impossible score, as transformers writes it (finite, so sums stay ordered)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], ...]`` for ``x [B, M, ...]`` and ``index [B, J]``: ``[B, J, ...]``."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


@dataclass
class KeptHypotheses:
    """The best finished hypotheses, ``k`` per prompt and group: ``[B, G, k, ...]`` tensors.

    ``score`` is length-normalised (``NEG`` for an empty slot, ``done`` False), ``length`` counts
    new tokens, ``eos`` says the hypothesis ended at EOS (else at ``max_new_tokens``).
    """

    seq: torch.Tensor
    logp: torch.Tensor
    score: torch.Tensor
    done: torch.Tensor
    length: torch.Tensor
    eos: torch.Tensor

    @classmethod
    def empty(cls, seq: torch.Tensor, logp: torch.Tensor) -> KeptHypotheses:
        slots = seq.shape[:3]
        return cls(
            seq=seq.clone(), logp=logp.clone(), score=torch.full(slots, NEG, device=seq.device),
            done=torch.zeros(slots, dtype=torch.bool, device=seq.device),
            length=torch.zeros(slots, dtype=torch.long, device=seq.device),
            eos=torch.zeros(slots, dtype=torch.bool, device=seq.device),
        )  # fmt: skip

    def merge(
        self, g: int, seq: torch.Tensor, logp: torch.Tensor, score: torch.Tensor, done: torch.Tensor,
        length: int, eos: torch.Tensor,
    ) -> None:  # fmt: skip
        """Add group ``g``'s candidates ``[B, M, ...]`` (``score`` already ``NEG``-masked) and keep the k best."""
        k = self.score.shape[2]
        best = torch.cat([self.score[:, g], score], dim=1).topk(k, dim=-1).indices  # [B, k]
        self.seq[:, g] = take(torch.cat([self.seq[:, g], seq], dim=1), best)
        self.logp[:, g] = take(torch.cat([self.logp[:, g], logp], dim=1), best)
        self.score[:, g] = take(torch.cat([self.score[:, g], score], dim=1), best)
        self.done[:, g] = take(torch.cat([self.done[:, g], done], dim=1), best)
        new_length = torch.full_like(done, length, dtype=torch.long)
        self.length[:, g] = take(torch.cat([self.length[:, g], new_length], dim=1), best)
        self.eos[:, g] = take(torch.cat([self.eos[:, g], eos], dim=1), best)


def group_done(
    kept_score: torch.Tensor, kept_done: torch.Tensor, best: torch.Tensor, length: int, max_length: int,
    early_stopping: bool | str, length_penalty: float,
) -> torch.Tensor:  # fmt: skip
    """``[B]``: is a group of diverse beam search done (transformers 4's ``BeamHypotheses.is_done``)?

    Once it holds ``k`` hypotheses: with ``early_stopping=True`` at once, otherwise when its
    worst one scores at least ``best`` (the step's top candidate score, EOS or not) divided by
    ``length ** length_penalty`` (``max_length`` for ``"never"`` with ``length_penalty > 0``).
    A done group adds no hypotheses and its beams count as pads in later groups' penalty.
    """
    full = kept_done.all(-1)
    if early_stopping is True:
        return full
    if early_stopping == "never" and length_penalty > 0.0:
        length = max_length
    return full & (kept_score.amin(-1) >= best / (length**length_penalty))


def beam_output(
    ids: torch.Tensor, kept: KeptHypotheses, fallback: dict[str, torch.Tensor] | None, r: int, pad: int,
    stopping: Sequence[Any], on_token: Any, output_scores: bool,
) -> Any:  # fmt: skip
    """The ``r`` (``num_return_sequences``) best kept hypotheses per prompt as a ``GenerateOutput``.

    ``fallback`` (``must_include``): last-step candidates that missed a constraint, returned only
    after every hypothesis that met them all
    (:func:`~decodekit.samplers.constrained.fallback_hypotheses`).
    """
    from decodekit.loop import FINISH_REASONS, GenerateOutput

    B, T0 = ids.shape
    G, k, L = kept.seq.shape[1:4]
    seqs, scores = kept.seq.view(B, G * k, L), kept.score.view(B, G * k)
    lengths, ends_eos = kept.length.view(B, G * k), kept.eos.view(B, G * k)
    logps, done = kept.logp.view(B, G * k, -1), kept.done.view(B, G * k)
    if fallback is not None:  # must_include: hypotheses that met every constraint first, best first
        seqs = torch.cat([seqs, fallback["seq"]], dim=1)
        scores = torch.cat([scores, fallback["score"]], dim=1)
        lengths = torch.cat([lengths, fallback["len"]], dim=1)
        ends_eos = torch.cat([ends_eos, fallback["eos"]], dim=1)
        logps = torch.cat([logps, fallback["logp"]], dim=1)
        tier = torch.cat([(~done).long(), torch.ones_like(fallback["len"])], dim=1)
        by_score = scores.argsort(dim=-1, descending=True, stable=True)
        order = by_score.gather(1, tier.gather(1, by_score).argsort(dim=-1, stable=True))[:, :r]
    else:
        order = scores.argsort(dim=-1, descending=True, stable=True)[:, :r]  # already sorted when G == 1
    seqs, scores = take(seqs, order).reshape(B * r, L), scores.gather(1, order).reshape(B * r)
    lengths, ends_eos = lengths.gather(1, order).reshape(B * r), ends_eos.gather(1, order).reshape(B * r)
    logps = take(logps, order).reshape(B * r, -1)
    reason = ends_eos.to(torch.int8)  # 1 = eos, 0 = length
    n = int(lengths.max())
    tokens = seqs[:, T0 : T0 + n]
    if stopping or on_token is not None:
        prompts = ids.repeat_interleave(r, dim=0)
        tokens, lengths, reason = replay(prompts, tokens, lengths, reason, stopping, on_token, pad)
        n = int(lengths.max())
        tokens = tokens[:, :n]
    logprobs = None
    if output_scores:
        logprobs = torch.where(torch.arange(n, device=tokens.device) < lengths[:, None], logps[:, :n], 0.0)
    return GenerateOutput(
        tokens=tokens,
        lengths=lengths,
        finish_reasons=[FINISH_REASONS[c] for c in reason.tolist()],
        sequences=torch.cat([ids.repeat_interleave(r, dim=0), tokens], dim=1),
        logprobs=logprobs,
        scores=None,
        sequence_scores=scores,
    )


def replay(
    prompts: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, reason: torch.Tensor,
    stopping: Sequence[Any], on_token: Any, pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Run stopping criteria and the streaming callback over the returned rows, step by step, as
    the sampling loop would have: a criterion that fires cuts its row there (reason ``"stop"``)."""
    R, n = tokens.shape
    sequences = torch.cat([prompts, tokens], dim=1)
    T0 = prompts.shape[1]
    finished = torch.zeros(R, dtype=torch.bool, device=tokens.device)
    for step in range(n):
        token = torch.where(finished, pad, tokens[:, step])
        sequences[:, T0 + step] = token
        finished = finished | ((lengths == step + 1) & (reason == 1))  # ended at EOS
        for criterion in stopping:
            stop = criterion(sequences[:, : T0 + step + 1], step + 1).to(tokens.device) & ~finished
            lengths = torch.where(stop, step + 1, lengths)
            reason = torch.where(stop, torch.full_like(reason, 2), reason)
            finished = finished | stop
        if on_token is not None:
            on_token(step, token, finished)
        finished = finished | (lengths == step + 1)
        if bool(finished.all()):
            break
    tokens = torch.where(torch.arange(n, device=tokens.device) < lengths[:, None], tokens, pad)
    return tokens, lengths, reason
