"""Must-include constraints for beam search: which words a beam has written, how far into the next.

:class:`Constraints` holds the phrases (each with one or more alternative token sequences) as
padded tensors and answers, for many candidate beams at once, the questions constrained beam
search asks each step: which constraints are now met, how many tokens of a partly written phrase
are in place, how many tokens are still needed at least, which tokens would advance a phrase, and
which "bank" (amount of constraint progress) a beam belongs to. :func:`allocate` then picks the
beams that continue, round-robin across banks. :func:`constrained_candidates` is one step of
constrained beam search for :class:`~decodekit.samplers.BeamSearch` (``must_include``) and
:func:`fallback_hypotheses` the last-step candidates returned when too few hypotheses met every
constraint. Everything is tensor ops over ``[..., candidates]``; no Python loop over beams, rows or
phrases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext
from decodekit.processors.guidance import word_variants
from decodekit.samplers.hypotheses import NEG, take

_PAD = -2  # in patterns: matches nothing (real tokens are >= 0, "no token" in a tail is -1)


def phrases_from_setting(
    must_include: Sequence[str | Sequence[int]], context: BuildContext | None
) -> list[list[list[int]]]:
    """Turn the ``must_include`` setting into alternatives per phrase.

    A string becomes up to two alternatives, its tokenization with and without a leading space
    (``"dog"`` and ``" dog"`` are different tokens in BPE vocabularies; either one puts the word in
    the text; see :func:`~decodekit.processors.guidance.word_variants`). A list of token ids is one
    alternative as given.
    """
    if not must_include:
        raise ConfigError("must_include: give at least one word or token-id list")
    vocab = context.vocab_size if context is not None else None
    phrases: list[list[list[int]]] = []
    for item in must_include:
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(f"must_include: {item!r} is blank")
            if context is None or context.encode is None:
                raise ConfigError(f"must_include: {item!r} is text, but no tokenizer is loaded; give token ids instead")
            alts = word_variants(context.encode, item)
            if not alts:
                raise ConfigError(f"must_include: {item!r} encodes to no tokens; the tokenizer cannot write it")
        else:
            ids = [int(i) for i in item]
            if not ids or any(i < 0 for i in ids):
                raise ConfigError(f"must_include: {list(item)!r} must be a non-empty list of token ids >= 0")
            alts = [ids]
        if vocab is not None:  # a spelling the model cannot write is dropped; none left is an error
            fitting = [ids for ids in alts if max(ids) < vocab]
            if not fitting:
                biggest = max(max(ids) for ids in alts)
                raise ConfigError(
                    f"must_include: {item!r} encodes to token id {biggest}, outside the vocabulary (size {vocab})"
                )
            alts = fitting
        phrases.append(alts)
    return phrases


class Constraints:
    """Phrases that must each appear in the generated tokens (not the prompt), as tensors.

    ``phrases[c]`` lists the alternative token sequences of constraint ``c``; the constraint is
    met once any alternative has been generated contiguously. Per beam the state is
    ``met [..., C]`` (sticky) and ``progress [..., P]``: for every alternative ``p`` the length of
    the longest proper prefix of it that the generated tokens end with.

    Derived quantities (all per beam):

    - ``need = sum_{c unmet} f_c - max_{c unmet} (f_c - r_c)`` with ``f_c = min_{p in c} len_p``
      and ``r_c = min_{p in c} (len_p - progress_p)``: the length of a plan that surely meets
      every constraint (one phrase goes on from its partial match, the others are written
      afresh). Following the plan lowers it by one per token, so a beam whose need fits the
      steps left always has a candidate that keeps it fitting.
    - ``bank = sum_c (met_c ? max_{p in c} len_p : max_{p in c} progress_p)``: constraint tokens
      in place, the bank of transformers' constrained beam search.
    """

    def __init__(self, phrases: Sequence[Sequence[Sequence[int]]]) -> None:
        if not phrases or any(not alts for alts in phrases) or any(not a for alts in phrases for a in alts):
            raise ConfigError("must_include: every phrase needs at least one non-empty token sequence")
        self.phrases = [[list(a) for a in alts] for alts in phrases]
        alts = [a for group in self.phrases for a in group]
        owner = [c for c, group in enumerate(self.phrases) for _ in group]
        width = max(len(a) for a in alts)
        self.width = width
        self.num_constraints = len(self.phrases)
        # alternatives, left-aligned [P, W] (for "next token") and right-aligned (for "ends with")
        self.alt_left = torch.tensor([a + [_PAD] * (width - len(a)) for a in alts])
        self.alt_right = torch.tensor([[_PAD] * (width - len(a)) + a for a in alts])
        self.alt_len = torch.tensor([len(a) for a in alts])
        self.owner = torch.nn.functional.one_hot(torch.tensor(owner), len(self.phrases)).bool()  # [P, C]
        # every proper prefix alt[:j], 1 <= j < len, right-aligned: [Q, W], with its alternative and j
        # (with only one-token phrases, Q = 0)
        prefixes = [(p, j) for p, a in enumerate(alts) for j in range(1, len(a))]
        self.prefix_right = torch.tensor([[_PAD] * (width - j) + alts[p][:j] for p, j in prefixes], dtype=torch.long)
        self.prefix_right = self.prefix_right.reshape(len(prefixes), width)
        self.prefix_alt = torch.zeros((len(prefixes), len(alts)), dtype=torch.bool)  # [Q, P]
        self.prefix_alt[torch.arange(len(prefixes)), torch.tensor([p for p, _ in prefixes], dtype=torch.long)] = True
        self.prefix_len = torch.tensor([j for _, j in prefixes], dtype=torch.long)
        self.max_len = torch.tensor([max(len(a) for a in group) for group in self.phrases])  # [C]
        self.num_banks = int(self.max_len.sum()) + 1  # banks 0 .. sum of phrase lengths
        self._device: torch.device | None = None

    @property
    def num_alternatives(self) -> int:
        return self.alt_left.shape[0]

    def to(self, device: torch.device) -> Constraints:
        if self._device != device:
            names = ("alt_left", "alt_right", "alt_len", "owner", "prefix_right", "prefix_alt", "prefix_len", "max_len")
            for name in names:
                setattr(self, name, getattr(self, name).to(device))
            self._device = device
        return self

    def check_vocab(self, vocab_size: int) -> None:
        biggest = max(max(a) for group in self.phrases for a in group)
        if biggest >= vocab_size:
            raise ConfigError(f"must_include: token id {biggest} is outside the vocabulary (size {vocab_size})")

    def start(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The state before any token: nothing met, no progress. ``met [*shape, C]``, ``progress [*shape, P]``."""
        met = torch.zeros((*shape, self.num_constraints), dtype=torch.bool, device=device)
        return met, torch.zeros((*shape, self.num_alternatives), dtype=torch.long, device=device)

    def update(self, met: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The state after a token: ``tail [..., W]`` holds the last ``W`` generated tokens (``-1``
        where there were fewer), the new one last; ``met [..., C]`` is the state before it."""
        ends = ((tail[..., None, :] == self.alt_right) | (self.alt_right == _PAD)).all(-1)  # [..., P]
        met = met | (ends[..., :, None] & self.owner).any(-2)  # [..., C]
        if self.prefix_len.numel() == 0:  # only one-token phrases: nothing is ever partly written
            return met, torch.zeros((*tail.shape[:-1], self.num_alternatives), dtype=torch.long, device=tail.device)
        on = ((tail[..., None, :] == self.prefix_right) | (self.prefix_right == _PAD)).all(-1)  # [..., Q]
        length = torch.where(on, self.prefix_len, 0)  # [..., Q]
        progress = torch.where(self.prefix_alt, length[..., :, None], 0).amax(-2)  # [..., P]
        return met, progress

    def need(self, met: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """``[...]`` tokens that surely finish every unmet phrase: at most one phrase goes on from
        its partial match (the one that saves most), the others are written afresh, one after
        another. An achievable plan, so never too few; overlapping phrases may need fewer."""
        big = torch.iinfo(torch.long).max // 4
        fresh = torch.where(self.owner, self.alt_len[:, None], big).amin(-2)  # [C]
        rest = torch.where(self.owner, (self.alt_len - progress)[..., :, None], big).amin(-2)  # [..., C]
        saving = torch.where(met, 0, fresh - rest)
        return torch.where(met, 0, fresh).sum(-1) - saving.amax(-1)

    def bank(self, met: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """``[...]`` constraint tokens in place (the bank)."""
        partial = torch.where(self.owner, progress[..., :, None], 0).amax(-2)  # [..., C]
        return torch.where(met, self.max_len, partial).sum(-1)

    def next_tokens(self, met: torch.Tensor, progress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens that advance an unmet phrase: for each alternative its next token after the
        current progress, and its first token (to start it afresh). ``tokens, valid [..., 2P]``."""
        unmet = (~met[..., None, :] & self.owner).any(-1)  # [..., P]
        nxt = self.alt_left.expand(*progress.shape[:-1], -1, -1).gather(-1, progress[..., None]).squeeze(-1)
        first = self.alt_left[:, 0].expand_as(nxt)
        tokens = torch.cat([nxt, first], dim=-1)
        valid = torch.cat([unmet, unmet & (progress > 0)], dim=-1)
        return tokens.clamp(min=0), valid


def tails(sequences: torch.Tensor, prompt_length: int, end: int, width: int) -> torch.Tensor:
    """The last ``width`` generated tokens before position ``end`` of ``sequences [..., L]``,
    ``-1`` where fewer were generated: ``[..., width]``."""
    pos = torch.arange(end - width, end, device=sequences.device)
    out = sequences.index_select(-1, pos.clamp(min=0))
    return torch.where(pos >= prompt_length, out, -1)


def allocate(score: torch.Tensor, bank: torch.Tensor, valid: torch.Tensor, k: int, num_banks: int) -> torch.Tensor:
    """Pick ``k`` of ``M`` candidates per row, round-robin across banks: ``[R, k]`` indices.

    Candidates are ranked within their bank by score; the best of the highest bank comes first,
    then the best of the next bank, and so on, then every bank's second best, ... (transformers'
    constrained beam search order). Invalid candidates come last. ``score, bank, valid: [R, M]``;
    banks are ``0 .. num_banks - 1``.
    """
    m = score.shape[-1]
    idx = torch.arange(m, device=score.device)
    same = bank[..., :, None] == bank[..., None, :]  # [R, M, M]: [i, j] j in i's bank
    ahead = (score[..., None, :] > score[..., :, None]) | (
        (score[..., None, :] == score[..., :, None]) & (idx[None, :] < idx[:, None])
    )
    rank = (same & ahead & valid[..., None, :]).sum(-1)  # [R, M]
    key = rank * num_banks + (num_banks - 1 - bank)
    key = torch.where(valid, key, torch.iinfo(torch.long).max)
    return key.argsort(dim=-1, stable=True)[..., :k]


def constrained_candidates(
    constraints: Constraints, scored: torch.Tensor, run_score: torch.Tensor, run_seq: torch.Tensor,
    met: torch.Tensor, progress: torch.Tensor, eos: torch.Tensor, K: int, k: int, T0: int, step: int, N: int,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """One step of constrained beam search for one group of beams ``[B, k]``.

    Candidates: the ``K`` best continuations (EOS only for beams that met every constraint) plus,
    for every beam, its own best continuation and each token that advances an unmet phrase (so
    every beam that can still meet its constraints in time has a candidate that does). A
    candidate is dropped when its need exceeds the steps left (while some candidate of the prompt
    still fits); the ``k`` that go on are allocated round-robin across banks (:func:`allocate`).
    Returns beam, token, score, hits, may_finish, chosen, next scores, next met / progress, and
    which candidates are fallbacks.
    """
    B, _, V = scored.shape
    all_met = met.all(-1)  # [B, k]
    acc = scored + run_score[..., None]
    is_eos = torch.zeros(V, dtype=torch.bool, device=scored.device)
    is_eos[eos[eos < V]] = True
    acc = acc.masked_fill(is_eos & ~all_met[..., None], float("-inf"))
    acc = acc.masked_fill((run_score < NEG / 2)[..., None], float("-inf"))  # beams that never started
    flat = acc.reshape(B, k * V)
    top_index = flat.topk(K, dim=-1).indices  # [B, K]
    adv_token, adv_valid = constraints.next_tokens(met, progress)  # [B, k, 2P]
    offset = torch.arange(k, device=scored.device)[:, None] * V  # [k, 1]
    adv_index = (offset + adv_token).reshape(B, -1)
    own_index = offset.T + acc.argmax(-1)  # [B, k]: every beam's own best continuation
    index = torch.cat([top_index, own_index, adv_index], dim=1)  # [B, M]
    score = flat.gather(1, index)
    valid = torch.cat([torch.ones_like(top_index, dtype=torch.bool), torch.ones_like(own_index, dtype=torch.bool),
                       adv_valid.reshape(B, -1)], dim=1)  # fmt: skip
    m = index.shape[1]
    earlier = torch.arange(m, device=index.device)[None, :] < torch.arange(m, device=index.device)[:, None]
    valid = valid & torch.isfinite(score)
    duplicate = ((index[:, :, None] == index[:, None, :]) & earlier & valid[:, None, :]).any(-1)  # of a valid one
    valid = valid & ~duplicate
    beam, token = index // V, index % V

    # Constraint state after each candidate's token.
    end = T0 + step
    parent_seq = run_seq.gather(1, beam[..., None].expand(-1, -1, run_seq.shape[-1]))
    tail = tails(parent_seq, T0, end, constraints.width - 1)
    tail = torch.cat([tail, token[..., None]], dim=-1)  # [B, M, W]
    new_met, new_progress = constraints.update(met.gather(1, beam[..., None].expand(-1, -1, met.shape[-1])), tail)
    need = constraints.need(new_met, new_progress)
    bank = constraints.bank(new_met, new_progress)
    done = new_met.all(-1)
    hits = torch.isin(token, eos) | (step + 1 == N)
    fits = need <= N - (step + 1)
    fits = fits | ~(fits & valid & ~hits).any(-1, keepdim=True)  # force only while something still fits
    go_on = valid & ~hits & fits
    chosen = allocate(torch.where(go_on, score, float("-inf")), bank, go_on, k, constraints.num_banks)
    next_score = torch.where(go_on.gather(1, chosen), score.gather(1, chosen), NEG)
    may_finish = hits & valid & done
    fallback_ok = hits & valid & ~done
    score = torch.where(valid, score, NEG)
    next_met = new_met.gather(1, chosen[..., None].expand(-1, -1, new_met.shape[-1]))
    next_progress = new_progress.gather(1, chosen[..., None].expand(-1, -1, new_progress.shape[-1]))
    return beam, token, score, hits, may_finish, chosen, next_score, next_met, next_progress, fallback_ok


def fallback_hypotheses(
    norm: torch.Tensor, ok: torch.Tensor, seq: torch.Tensor, logp: torch.Tensor, r: int, length: int, eos: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The ``r`` best last-step candidates that missed a constraint, for prompts with too few
    hypotheses that met them all (returned after those, as transformers does)."""
    key = torch.where(ok, norm, float("-inf"))
    best = key.topk(r, dim=-1).indices
    return {
        "seq": take(seq, best),
        "logp": take(logp, best),
        "score": torch.where(ok.gather(1, best), norm.gather(1, best), NEG),
        "len": torch.full_like(best, length),
        "eos": eos.gather(1, best),
    }
