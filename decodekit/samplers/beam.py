"""Beam search: the ``beam`` sampler, with beam sampling, diverse (group) beams and must-include words.

:class:`BeamSearch` drives its own loop (``drives_loop = True``): :func:`decodekit.generate` hands
it the whole job. Batch items and beams are rows of one batch (``B * num_beams`` rows); each step is
a handful of tensor ops over ``[B, beams, vocab]``. Python loops run only over steps and, for
diverse beam search, over beam groups (a group's penalty depends on the tokens earlier groups just
chose). The bookkeeping follows transformers 5's vectorised ``_beam_search`` step for step, and
diverse beam search follows transformers 4's group beam search (which transformers 5 dropped), so
the same model and prompt give the same sequences and scores.

This module holds the search loop and the model side (:class:`_Runner`); the kept hypotheses and
the returned output are in :mod:`decodekit.samplers.hypotheses`, the ``must_include`` steps in
:mod:`decodekit.samplers.constrained`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext, invalid_rows
from decodekit.random import RowRandom, row_seeds
from decodekit.samplers.base import Sampler
from decodekit.samplers.constrained import (
    Constraints,
    constrained_candidates,
    fallback_hypotheses,
    phrases_from_setting,
)
from decodekit.samplers.hypotheses import NEG, KeptHypotheses, beam_output, group_done, take
from decodekit.validation import validate

class BeamSearch(Sampler):
    """Keep the ``num_beams`` best partial sequences per prompt; return the best finished ones.

    Each step, for every beam ``j`` with score ``s_j`` (the sum of its tokens' log-probabilities)
    and every token ``v``: ``s_j + log softmax(chain(x_j))_v``, where ``chain`` is the processor
    chain run on the beam's own history (penalties, n-gram blocking, bad words act per beam).
    The ``2 * num_beams`` best of these (``(1 + #eos) * num_beams`` with several EOS ids) over all
    beams are kept: those ending in EOS (or reaching ``max_new_tokens``) and ranked among the first
    ``num_beams`` become finished hypotheses, the best ``num_beams`` others go on.

    A finished hypothesis of ``n`` new tokens (its EOS included) scores
    ``sum_logprobs / n ** length_penalty``; ``length_penalty > 0`` favours longer outputs, ``< 0``
    shorter ones. Each prompt keeps its ``num_beams`` best hypotheses; the
    ``num_return_sequences`` best are returned, best first, with that score as
    ``sequence_scores``. Stopping (transformers' ``early_stopping``): ``True`` stops a prompt as
    soon as it has ``num_beams`` hypotheses; ``False`` stops when the best running beam, scored at
    its current length, can no longer beat the worst kept hypothesis; ``"never"`` does the same
    but, with ``length_penalty > 0``, scores the running beam at ``max_new_tokens`` (the bound
    canonical beam search uses). Search also ends at ``max_new_tokens``.

    Options:

    - ``beam_sample``: draw the ``2 * num_beams`` continuations without replacement from
      ``softmax`` of the accumulated scores over all beams and tokens (transformers'
      ``do_sample=True`` with beams), by the Gumbel-top-k trick on the per-prompt random stream
      of the ``seed``; temperature and truncation processors in the chain shape the draw. With
      one beam the first draw goes on (transformers then samples plainly), so
      ``BeamSearch(1, beam_sample=True)`` gives :class:`~decodekit.samplers.Multinomial`'s tokens,
      as ``BeamSearch(1)`` gives greedy's (one beam always stops at its first EOS).
    - ``num_beam_groups`` / ``diversity_penalty``: diverse beam search (Vijayakumar et al. 2016,
      transformers' former group beam search): beams are split into groups that search one
      after the other within a step; a group's log-probabilities lose
      ``diversity_penalty * (times the token was just chosen by earlier groups for this
      prompt)`` (Hamming diversity), and that penalty is part of its scores. The bookkeeping is
      transformers 4's group beam search: each group keeps its own ``k = num_beams /
      num_beam_groups`` hypotheses and is done on its own
      (:func:`~decodekit.samplers.hypotheses.group_done`: its top candidate, EOS or not, is the
      bound); a done group adds nothing and its beams count as ``pad_token_id`` in later groups'
      penalty; at ``max_new_tokens`` the EOS candidates among a group's first ``k`` finish, then,
      if the group is still open, its ``k`` best other candidates.
    - ``must_include``: words (or token-id lists) that must each appear in the output:
      constrained beam search (see :mod:`decodekit.samplers.constrained` and docs/beam.md).

    Differences from transformers: the chain runs on the raw logits and is then normalised,
    ``log_softmax(chain(x))`` (transformers runs its processors on ``log_softmax(x)`` and does not
    renormalise); with no processors, or only ones that remove tokens, the chosen sequences are
    the same. Stopping criteria and ``on_token`` are replayed over the returned rows after the
    search (a criterion can cut a returned row, finish reason ``"stop"``). A criterion marked
    ``stateless = True`` (a pure function of the sequences it is given, as
    :class:`decodekit.text.StopStrings`) also steers the search, without ``must_include``: a
    candidate it stops is a finished hypothesis, as one ending in EOS is, and does not go on.
    ``output_scores`` gives per-token ``logprobs`` of the returned rows, not ``scores``. With
    several EOS ids, transformers 4's group beam search writes the first EOS id wherever any
    ended a hypothesis; the returned row here keeps the EOS that was chosen (and scored).
    """

    name = "beam"
    drives_loop: ClassVar[bool] = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_beams: int = Field(ge=1, description="beams kept per prompt; 1 = greedy")
        length_penalty: float = Field(1.0, allow_inf_nan=False, description="score = logprob sum / length ** this")
        early_stopping: bool | Literal["never"] = Field(
            False, description="true, false or 'never' (transformers' meaning)"
        )
        num_return_sequences: int = Field(1, ge=1, description="best hypotheses returned per prompt, <= num_beams")
        beam_sample: bool = Field(False, description="draw continuations from the beam scores, not the best")
        num_beam_groups: int = Field(1, ge=1, description="diverse beam search: groups of beams; divides num_beams")
        diversity_penalty: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="Hamming penalty between groups")
        must_include: list[str | list[int]] | None = Field(
            None, min_length=1, description="words or token-id lists that must each appear in the output"
        )

    def __init__(
        self,
        num_beams: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        beam_sample: bool = False,
        num_beam_groups: int = 1,
        diversity_penalty: float = 0.0,
        must_include: Sequence[str | Sequence[int]] | None = None,
        *,
        context: BuildContext | None = None,
    ) -> None:
        p = validate(
            self.Params, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, beam_sample=beam_sample, num_beam_groups=num_beam_groups,
            diversity_penalty=diversity_penalty,
            must_include=None if must_include is None else [w if isinstance(w, str) else list(w) for w in must_include],
        )  # fmt: skip
        if p.num_return_sequences > p.num_beams:
            raise ConfigError(
                f"num_return_sequences={p.num_return_sequences} is not allowed: must be <= num_beams={p.num_beams}"
            )
        if p.num_beams % p.num_beam_groups:
            raise ConfigError(
                f"num_beam_groups={p.num_beam_groups} is not allowed: must divide num_beams={p.num_beams}"
            )
        if p.diversity_penalty > 0 and p.num_beam_groups == 1:
            raise ConfigError(
                f"diversity_penalty={p.diversity_penalty} needs num_beam_groups > 1 "
                "(it penalises groups against each other)"
            )
        if p.num_beam_groups > 1 and (p.beam_sample or p.must_include):
            raise ConfigError(
                f"num_beam_groups={p.num_beam_groups} cannot be combined with beam_sample or must_include"
            )
        if p.beam_sample and p.must_include:
            raise ConfigError("beam_sample cannot be combined with must_include")
        self.num_beams = p.num_beams
        self.length_penalty = p.length_penalty
        self.early_stopping: bool | str = p.early_stopping
        self.num_return_sequences = p.num_return_sequences
        self.beam_sample = p.beam_sample
        self.num_beam_groups = p.num_beam_groups
        self.diversity_penalty = p.diversity_penalty
        self.must_include = p.must_include
        self._constraints = (
            None if p.must_include is None else Constraints(phrases_from_setting(p.must_include, context))
        )

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext | None) -> BeamSearch:
        return cls(**params.model_dump(), context=context)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        raise ConfigError(
            "beam search drives its own loop: call decodekit.generate(model, ids, sampler=BeamSearch(...))"
        )

    # ------------------------------------------------------------------------------------ search

    def generate(
        self,
        model: Any,
        input_ids: Any,
        *,
        processors: Any = None,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        attention_mask: Any = None,
        seed: int | list[int] | None = None,
        stopping: Sequence[Any] = (),
        on_token: Any = None,
        output_scores: bool = False,
    ) -> Any:
        """Beam search after each row of ``input_ids``; arguments as :func:`decodekit.generate`.

        Returns a :class:`~decodekit.loop.GenerateOutput` with ``B * num_return_sequences`` rows
        (prompt ``b``'s hypotheses are rows ``b * num_return_sequences ...``, best first) and
        ``sequence_scores``.
        """
        from decodekit import loop  # here: decodekit.loop imports the samplers package

        ids, mask = loop.prepare_inputs(model, input_ids, attention_mask, max_new_tokens)
        chain = loop.as_chain(processors)
        device = ids.device
        eos = loop.eos_tensor(eos_token_id, device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        vocab = model.vocab_size
        if vocab < 2:
            raise ConfigError(f"num_beams: beam search needs a vocabulary of at least 2 tokens, the model has {vocab}")
        constraints = self._constraints.to(device) if self._constraints is not None else None
        if constraints is not None:
            constraints.check_vocab(vocab)

        B, T0 = ids.shape
        N, L = max_new_tokens, T0 + max_new_tokens
        G, nb = self.num_beam_groups, self.num_beams
        k = nb // G  # beams per group
        K = max(2, 1 + eos.numel()) * k  # candidates kept per step and group
        rows = B * nb
        lp = self.length_penalty
        es = True if nb == 1 else self.early_stopping  # one beam: stop at the first EOS, as greedy does
        rng = RowRandom(row_seeds(seed, B, device)) if self.beam_sample else None

        runner = _Runner(model, ids, mask, nb, N)
        chain.begin(ids.repeat_interleave(nb, dim=0))

        # Running beams [B, G, k, ...] (a group's first beam starts at 0) and kept hypotheses.
        run_seq = torch.full((B, G, k, L), pad, dtype=torch.long, device=device)
        run_seq[..., :T0] = ids[:, None, None, :]
        run_score = torch.zeros((B, G, k), device=device)
        run_score[..., 1:] = NEG
        run_logp = torch.zeros((B, G, k, N), device=device)
        kept = KeptHypotheses.empty(run_seq, run_logp)
        unsatisfied = torch.ones((B, G), dtype=torch.bool, device=device)  # can still improve (groups: not done)
        by_group = G > 1  # transformers 4's group beam search bookkeeping (see group_done)
        may_finish_rank = torch.arange(K, device=device) < k  # only the top k candidates may finish
        one_sample = self.beam_sample and nb == 1
        draw_order = -torch.arange(K, device=device, dtype=torch.float32)
        met = progress = None
        fallback = None
        steering = [c for c in stopping if getattr(c, "stateless", False)]  # stop candidates, not just rows
        if constraints is not None:
            met, progress = constraints.start((B, k), device)

        for step in range(N):
            end = T0 + step  # the position this step fills
            last = step + 1 == N
            history = run_seq.view(rows, L)[:, :end]  # [rows, T]
            raw = runner.logits.float()  # [rows, V]
            processed = loop.run_chain(chain, history, raw, step)
            invalid = invalid_rows(processed).any()
            logp = torch.log_softmax(processed, dim=-1).view(B, G, k, vocab)
            # tokens earlier groups chose this step; index ``vocab`` collects a pad outside the vocabulary
            counts = torch.zeros((B, vocab + 1), device=device) if by_group and self.diversity_penalty > 0 else None
            source = torch.empty((B, G, k), dtype=torch.long, device=device)
            all_hits = []
            for g in range(G):
                logp_g = logp[:, g]  # [B, k, V]
                scored = logp_g if counts is None else logp_g - self.diversity_penalty * counts[:, None, :vocab]
                if constraints is None:
                    beam, token, score = self._candidates(scored, run_score[:, g], K, rng)  # [B, K] each
                    cand_seq = _extend(run_seq[:, g], beam, token, end)  # [B, K, L]
                    hits = torch.isin(token, eos) | (last and not by_group)  # groups: running beams end below
                    if steering:  # a candidate a stateless criterion stops is finished, as at EOS
                        hits = hits | _stopped(steering, cand_seq.view(B * K, L)[:, : end + 1], step + 1).view(B, K)
                    may_finish = hits & may_finish_rank
                    keys = score + hits.to(torch.float32) * NEG
                    if one_sample:  # one sampled beam goes on with its first draw: plain sampling
                        chosen = (draw_order + hits.to(torch.float32) * NEG).topk(k, dim=-1).indices
                    else:
                        chosen = keys.topk(k, dim=-1).indices  # [B, k]
                    next_score = keys.gather(1, chosen)
                else:
                    found = constrained_candidates(
                        constraints, scored, run_score[:, 0], run_seq[:, 0], met, progress, eos, K, k, T0, step, N
                    )
                    beam, token, score, hits, may_finish, chosen, next_score, met, progress, fallback_ok = found
                    cand_seq = _extend(run_seq[:, g], beam, token, end)
                cand_logp = run_logp[:, g].gather(1, beam[..., None].expand(-1, -1, N))
                cand_logp[:, :, step] = logp_g.reshape(B, k * vocab).gather(1, beam * vocab + token)

                # Finished hypotheses: merge the new ones into the kept ones, keep the k best.
                norm = score / ((step + 1) ** lp)
                full = kept.done[:, g].all(-1, keepdim=True) & (es is True)
                norm = norm + full.to(torch.float32) * NEG
                norm = norm + (~unsatisfied[:, g, None]).to(torch.float32) * NEG
                norm = norm + (~may_finish).to(torch.float32) * NEG
                kept.merge(g, cand_seq, cand_logp, norm, may_finish, step + 1, torch.isin(token, eos))
                if constraints is not None and last:
                    fallback = fallback_hypotheses(
                        score / ((step + 1) ** lp), fallback_ok, cand_seq, cand_logp,
                        self.num_return_sequences, step + 1, torch.isin(token, eos),
                    )  # fmt: skip

                # Running beams for the next step.
                run_seq[:, g] = take(cand_seq, chosen)
                run_logp[:, g] = take(cand_logp, chosen)
                run_score[:, g] = next_score
                source[:, g] = beam.gather(1, chosen)
                open_g = unsatisfied[:, g, None].clone()  # [B, 1]: open before this step's verdict
                if by_group:  # done now? (then at the last step the open groups' running beams finish)
                    done = group_done(kept.score[:, g], kept.done[:, g], score[:, 0], step + 1, N, es, lp)
                    unsatisfied[:, g] &= ~done
                    if last:
                        still = unsatisfied[:, g, None].expand(B, k)
                        norm = next_score / (N**lp) + (~still).to(torch.float32) * NEG
                        kept.merge(g, run_seq[:, g], run_logp[:, g], norm, still, N, torch.zeros_like(still))
                if counts is not None:  # a group done before this step counts as k pads (transformers 4)
                    counted = torch.where(open_g, token.gather(1, chosen), pad)
                    counted = torch.where((counted >= 0) & (counted < vocab), counted, vocab)
                    counts.scatter_add_(1, counted, torch.ones((B, k), device=device))
                all_hits.append(hits)

            # Can any prompt still improve? (transformers' early-stopping heuristic)
            best_length = N if (es == "never" and lp > 0.0) else step + 1
            best_running = run_score.amax(-1, keepdim=True) / (best_length**lp)  # [B, G, 1]
            worst_kept = torch.where(kept.done, kept.score.amin(-1, keepdim=True), NEG)  # [B, G, k]
            if not by_group:
                unsatisfied = unsatisfied & (best_running > worst_kept).any(-1)
            going = unsatisfied.any() & ~(kept.done.all() & (es is True)) & ~torch.stack(all_hits).all()
            if last or bool(~going | invalid):  # the one host sync per step
                break
            flat_source = (torch.arange(B * G, device=device).view(B, G, 1) * k + source).view(rows)
            chain.reorder(flat_source)
            runner.advance(run_seq.view(rows, L), end, flat_source)

        if bool(invalid):
            loop.diagnose(chain, history, raw, step)
        return beam_output(ids, kept, fallback, self.num_return_sequences, pad, stopping, on_token, output_scores)

    def _candidates(
        self, scored: torch.Tensor, run_score: torch.Tensor, K: int, rng: RowRandom | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``K`` best (or, sampling, drawn) continuations over all beams: beam, token, score ``[B, K]``."""
        B, k, V = scored.shape
        acc = (scored + run_score[..., None]).reshape(B, k * V)  # [B, k * V]
        if rng is None:
            score, index = acc.topk(K, dim=-1)
        else:  # Gumbel-top-k: K draws without replacement from softmax(acc), in draw order
            index = (acc - torch.log(rng.exponential(k * V))).topk(K, dim=-1).indices
            score = acc.gather(1, index)
        return index // V, index % V, score


# ---------------------------------------------------------------------------------------- helpers


class _Runner:
    """The model side of beam search: prefill each prompt once, copy its cache to the beams, then
    one position per step for every beam (reordered first), sliding the window at the context limit
    (:class:`~decodekit.stepping.DynamicSteps`, as :func:`decodekit.generate` steps)."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, beams: int, max_new_tokens: int) -> None:
        from decodekit.stepping import DynamicSteps, prefill_prompt

        B, T0 = ids.shape
        expand = torch.arange(B, device=ids.device).repeat_interleave(beams)
        logits, cache, window_mask = prefill_prompt(model, ids, mask, max_new_tokens)
        self.logits = logits.index_select(0, expand)  # [rows, V]
        full_mask = torch.ones((B * beams, T0 + max_new_tokens), dtype=torch.bool, device=ids.device)
        full_mask[:, :T0] = mask.index_select(0, expand)
        self.steps = DynamicSteps(model, model.reorder_cache(cache, expand), full_mask, window_mask.index_select(0, expand))

    def advance(self, seq: torch.Tensor, end: int, source: torch.Tensor) -> None:
        """Beams now descend from rows ``source``; run the token each placed at ``end``."""
        self.steps.reorder(source)
        self.logits = self.steps(seq[:, end], seq, end)


def _extend(seq: torch.Tensor, beam: torch.Tensor, token: torch.Tensor, end: int) -> torch.Tensor:
    """Candidates ``[B, K, L]``: the running sequences ``seq[:, beam]`` with ``token`` at ``end``."""
    out = seq.gather(1, beam[..., None].expand(-1, -1, seq.shape[-1]))
    out[:, :, end] = token
    return out


def _stopped(criteria: Sequence[Any], sequences: torch.Tensor, n_new: int) -> torch.Tensor:
    """``[rows]`` bool: rows any of ``criteria`` stops."""
    stop = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    for criterion in criteria:
        stop = stop | criterion(sequences, n_new).to(sequences.device).bool()
    return stop
