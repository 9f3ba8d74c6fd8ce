"""Guidance: steer the output length through the EOS logit, and the topic through a word list.

:class:`EosLengthPenalty` makes ending likelier or less likely with the number of tokens
generated; :class:`BagOfWords` raises the odds of words from a shipped lexicon
(``decodekit/data/lexicons/*.txt``: ``positive``, ``negative``, ``science``, ``nature``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext, LogitsProcessor, to_dtype
from decodekit.validation import validate


class EosLengthPenalty(LogitsProcessor):
    """Prefer outputs of about ``eos_length_target`` tokens: ``x_eos' = x_eos + a * (n - n0)``.

    ``n`` is the number of tokens generated so far, ``n0 = eos_length_target`` and
    ``a = eos_length_slope >= 0``. Before ``n0`` ending is made less likely (the EOS logit loses
    ``a`` per missing token), after it likelier (it gains ``a`` per extra token), so outputs
    gather around ``n0``: a small target gives shorter outputs, a large one longer. Only the EOS
    logit(s) change, so the distribution stays valid for any setting; a removed EOS stays removed.
    ``a`` of 0.1 to 1 nudges, 5 or more all but forces the length. Unlike :class:`MinNewTokens`
    nothing is banned: a model sure enough of ending still ends early.

    transformers' ``ExponentialDecayLengthPenalty`` instead adds ``|x_eos| * (f ** (n - start) - 1)``
    after ``start`` only (it never holds EOS back); this additive form is simpler to reason about
    and symmetric around the target. Used inside beam search it changes the beam scores, as any
    processor in the chain does. Counts tokens after the prompt given to ``begin`` (the loop calls
    it); without ``begin`` every token of ``input_ids`` counts.
    """

    name = "eos_length_penalty"
    order = 75
    test_params = [
        lambda v: {"eos_length_target": 3, "eos_token_id": v - 1},
        {"eos_length_target": 0, "eos_length_slope": 100.0, "eos_token_id": 0},
        lambda v: {"eos_length_target": 50, "eos_length_slope": 0.5, "eos_token_id": [0, v + 3]},
    ]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eos_length_target: int = Field(ge=0, description="preferred number of new tokens (EOS included)")
        eos_length_slope: float = Field(
            1.0, ge=0.0, le=100.0, allow_inf_nan=False, description="EOS logit change per token away from the target"
        )

    def __init__(
        self,
        eos_length_target: int,
        eos_token_id: int | Sequence[int],
        eos_length_slope: float = 1.0,
        prompt_length: int | None = None,
    ) -> None:
        p = validate(self.Params, eos_length_target=eos_length_target, eos_length_slope=eos_length_slope)
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids or any(not isinstance(i, int) or i < 0 for i in ids):
            raise ConfigError(f"eos_length_penalty: eos_token_id={eos_token_id!r} must name token ids >= 0")
        self.eos_length_target = p.eos_length_target
        self.eos_length_slope = p.eos_length_slope
        self.eos_token_id = ids
        self.prompt_length = prompt_length
        self._eos = torch.tensor(ids, dtype=torch.long)

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> EosLengthPenalty:
        return cls(params.eos_length_target, context.eos_ids("eos_length_target"), params.eos_length_slope)

    def begin(self, input_ids: torch.Tensor) -> None:
        self.prompt_length = input_ids.shape[-1]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[-1] - (self.prompt_length or 0)
        bias = self.eos_length_slope * (generated - self.eos_length_target)
        if bias == 0.0:
            return logits
        eos = self._eos.to(logits.device)
        eos = eos[eos < logits.shape[-1]]
        shift = torch.zeros(logits.shape[-1], device=logits.device).index_fill(0, eos, bias)  # [V]
        return to_dtype(logits.float() + shift, logits)


# --- bag-of-words guidance -------------------------------------------------------------------

LEXICON_PACKAGE = "decodekit"
LEXICON_DIR = "data/lexicons"


def known_lexicons() -> list[str]:
    """Names of the shipped lexicons (``decodekit/data/lexicons/<name>.txt``)."""
    folder = resources.files(LEXICON_PACKAGE).joinpath(LEXICON_DIR)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_lexicon(name: str, setting: str = "guide_attribute") -> list[str]:
    """The words of a shipped lexicon, one per line (blank lines and ``#`` comments skipped)."""
    known = known_lexicons()
    if name not in known:
        raise ConfigError(f"{setting}={name!r} is not known; known: {', '.join(known)}")
    text = resources.files(LEXICON_PACKAGE).joinpath(f"{LEXICON_DIR}/{name}.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.strip().startswith("#")]


def word_variants(encode: Callable[[str], list[int]], word: str) -> list[list[int]]:
    """Token ids of ``word`` and of ``" " + word`` (distinct tokens in BPE vocabularies).

    Whatever ``encode("")`` gives (a BOS token some tokenizers add) is stripped. Variants that
    encode to nothing are left out; identical ones are given once.
    """
    base = list(encode(""))
    out: list[list[int]] = []
    for text in ([word] if word[:1].isspace() else [word, " " + word]):
        ids = list(encode(text))
        if base and ids[: len(base)] == base:
            ids = ids[len(base) :]
        if ids and ids not in out:
            out.append(ids)
    return out


class BagOfWords(LogitsProcessor):
    """Guide toward an attribute: ``x_i' = x_i + s`` for every token ``i`` that begins or continues a word of a lexicon.

    ``s = guide_strength``. From settings, each word of the lexicon ``guide_attribute`` is
    tokenized with and without a leading space; the first token of each is boosted at every
    step, and a later token is boosted when the text so far ends with the tokens before it
    (so multi-token words are helped all the way through). A token made only of whitespace is
    not boosted on its own (with byte-level tokenizers it would begin every word), only as part
    of a longer match; when the tokenizer writes the space as a token of its own (byte- and
    character-level ones), a word is boosted only after whitespace, not from its first letter
    anywhere. A token is boosted once, however many words it serves.

    What it does: it raises the odds of on-topic words, by the factor ``e ** s`` before
    renormalisation (``s = 2`` makes each such token about 7 times likelier relative to the
    rest). What it does not do: it is not a classifier and does not judge the text, it does not
    understand negation ("not happy" is boosted like "happy"), and it cannot make a model say
    what it cannot: a small or unsuited model boosted hard gives lexicon words in broken text.
    Plug-and-play language models (Dathathri et al. 2019) steer with the same word lists
    through the hidden state; this is the cheap logit-level variant. Typical ``s``: 1 to 4.
    """

    name = "guide"
    order = 80
    test_params = [
        lambda v: {"sequences": [[0], [v - 1, 0]], "guide_strength": 2.0},
        lambda v: {"sequences": [[0, 0, 0], [1 % v, 0], [v - 1, v - 1]], "guide_strength": 100.0, "neutral": [0]},
        {"sequences": [[0]], "guide_strength": 0.0},
    ]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        guide_attribute: str = Field(description="lexicon to steer toward: positive, negative, science, nature")
        guide_strength: float = Field(
            2.0, ge=0.0, le=100.0, allow_inf_nan=False, description="logit boost for lexicon tokens"
        )

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        guide_strength: float = 2.0,
        *,
        neutral: Sequence[int] = (),
        attribute: str | None = None,
    ) -> None:
        seqs = [list(s) for s in sequences]
        if not seqs or any(not s for s in seqs) or any(not isinstance(t, int) or t < 0 for s in seqs for t in s):
            raise ConfigError("guide: needs at least one non-empty token sequence of ids >= 0")
        p = validate(self.Params, guide_attribute=attribute or "", guide_strength=guide_strength)
        self.guide_strength = float(p.guide_strength)
        self.attribute = attribute
        self.sequences = seqs
        self.neutral = sorted(set(neutral))
        starts = sorted({s[0] for s in seqs} - set(self.neutral))
        self._starts = torch.tensor(starts, dtype=torch.long)
        pairs: dict[int, set[tuple[tuple[int, ...], int]]] = {}
        for s in seqs:
            for j in range(1, len(s)):
                pairs.setdefault(j, set()).add((tuple(s[:j]), s[j]))
        # prefix length -> (prefixes [N, j], next tokens [N])
        self._groups = {
            j: (torch.tensor([p for p, _ in sorted(group)]), torch.tensor([t for _, t in sorted(group)]))
            for j, group in sorted(pairs.items())
        }
        self._on: dict[tuple[int, torch.device], tuple[torch.Tensor, dict]] = {}

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> BagOfWords:
        words = load_lexicon(params.guide_attribute)
        if context.encode is None:
            raise ConfigError(
                f"guide_attribute={params.guide_attribute!r} needs a tokenizer to turn its words into tokens"
            )
        space = word_variants(context.encode, " ")
        neutral = space[0] if len(space) == 1 and len(space[0]) == 1 else []
        sequences = []
        for word in words:
            variants = word_variants(context.encode, word)
            if neutral and len(variants) == 2 and variants[1] == neutral + variants[0]:
                variants = variants[1:]  # space is its own token: boost the word after whitespace only
            sequences.extend(variants)
        if context.vocab_size is not None:
            sequences = [s for s in sequences if max(s) < context.vocab_size]
        if not sequences:
            raise ConfigError(f"guide_attribute={params.guide_attribute!r}: no word of the lexicon fits the tokenizer")
        return cls(sequences, params.guide_strength, neutral=neutral, attribute=params.guide_attribute)

    def __repr__(self) -> str:
        what = f"attribute={self.attribute!r}, " if self.attribute else ""
        return f"BagOfWords({what}guide_strength={self.guide_strength!r}, {len(self.sequences)} token sequences)"

    def _tables(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        key = (vocab, device)
        if key not in self._on:
            starts = torch.zeros(vocab, dtype=torch.bool)
            starts[self._starts[self._starts < vocab]] = True
            groups = {}
            for j, (prefixes, nxt) in self._groups.items():
                keep = nxt < vocab
                groups[j] = (prefixes[keep].to(device), nxt[keep].to(device))
            self._on[key] = (starts.to(device), groups)
        return self._on[key]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.guide_strength == 0.0:
            return logits
        batch, vocab = logits.shape
        starts, groups = self._tables(vocab, logits.device)
        boost = starts.expand(batch, vocab)
        ids = input_ids.to(logits.device)
        t = ids.shape[-1]
        for j, (prefixes, nxt) in groups.items():  # one pass per prefix length, not per word
            if j > t or nxt.numel() == 0:
                continue
            match = (ids[:, t - j :][:, None, :] == prefixes[None, :, :]).all(dim=-1)  # [B, N]
            hits = torch.zeros((batch, vocab), dtype=torch.float32, device=logits.device)
            hits.scatter_add_(-1, nxt.expand(batch, -1), match.float())
            boost = boost | (hits > 0)
        return to_dtype(logits.float() + self.guide_strength * boost.float(), logits)
