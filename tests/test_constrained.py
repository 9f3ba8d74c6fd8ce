"""Constrained beam search: must_include words always appear when they fit; the constraint state
machine; the bank allocation; clear errors for words the tokenizer cannot write."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit import ConfigError, build_sampler, generate
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import BuildContext, NoRepeatNGram
from decodekit.samplers import BeamSearch
from decodekit.samplers.constrained import Constraints, allocate, tails
from decodekit.tokenization import ByteTokenizer

TOK = ByteTokenizer(eos_token_id=256)
CONTEXT = BuildContext(eos_token_id=256, encode=TOK.encode, vocab_size=257)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32)).eval()


def constrained(words: list, **kwargs) -> BeamSearch:
    return build_sampler("beam", {"must_include": words, **kwargs}, context=CONTEXT)


# ------------------------------------------------------------------------------------ outputs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.text(alphabet="abc xyz", min_size=1, max_size=4).filter(str.strip), min_size=1, max_size=3,
                   unique=True),  # fmt: skip
    slack=st.integers(0, 3),
    beams=st.integers(1, 4),
    length_penalty=st.sampled_from([0.5, 1.0, 2.0]),
    early_stopping=st.booleans(),
    prompt=st.sampled_from(["Hello", "The cat", "z"]),
)
def test_every_word_appears_when_the_words_fit(
    model: GPT, words: list[str], slack: int, beams: int, length_penalty: float, early_stopping: bool, prompt: str
) -> None:
    budget = sum(len(w) for w in words) + slack  # one byte per letter: the words fit one after another
    sampler = constrained(words, num_beams=beams, num_return_sequences=beams, length_penalty=length_penalty,
                          early_stopping=early_stopping)  # fmt: skip
    out = generate(model, [TOK.encode(prompt)], sampler=sampler, max_new_tokens=budget, eos_token_id=256)
    # the best hypothesis always has every word; with a spare token there are enough solutions
    # for every returned one to have them (with none spare there may be fewer than num_beams)
    rows = out.rows() if slack else out.rows()[:1]
    for row in rows:
        text = bytes(t for t in row if t < 256).decode("latin-1")
        for w in words:
            assert w in text, f"{w!r} missing from {text!r} (words {words}, budget {budget})"


def test_words_fit_exactly_in_a_batch_of_prompts(model: GPT) -> None:
    words = ["dog", "sun"]
    prompts = [TOK.encode("Once upon a"), TOK.encode("Hi there!!!")]
    out = generate(model, prompts, sampler=constrained(words, num_beams=3, num_return_sequences=2), max_new_tokens=6,
                   eos_token_id=256)  # fmt: skip
    assert out.tokens.shape == (4, 6)
    for row in out.rows():
        text = TOK.decode(row)
        assert "dog" in text and "sun" in text, text


def test_token_id_phrases_and_the_chain_inside(model: GPT) -> None:
    phrase = [65, 66, 67]  # "ABC"
    out = generate(model, [TOK.encode("abc")], sampler=BeamSearch(3, must_include=[phrase], num_return_sequences=3),
                   processors=NoRepeatNGram(2), max_new_tokens=10, eos_token_id=256)  # fmt: skip
    for row in out.rows():
        assert any(row[i : i + 3] == phrase for i in range(len(row) - 2)), row
        seq = TOK.encode("abc") + row
        assert len(set(zip(seq, seq[1:]))) == len(seq) - 1  # the n-gram block still holds


def test_scores_and_eos_of_constrained_hypotheses(model: GPT) -> None:
    # EOS only after every word is in; reported scores are length-normalised logprob sums
    out = generate(model, [TOK.encode("Hello")], sampler=constrained(["ok"], num_beams=2, num_return_sequences=2),
                   max_new_tokens=8, eos_token_id=256, output_scores=True)  # fmt: skip
    for row, new in enumerate(out.rows()):
        assert "ok" in TOK.decode(new)
        assert out.sequence_scores[row].item() == pytest.approx(out.logprobs[row, : len(new)].sum().item() / len(new), abs=1e-5)


def test_words_that_cannot_fit_still_give_the_best_hypotheses(model: GPT) -> None:
    out = generate(model, [TOK.encode("Hi")], sampler=constrained(["longword"], num_beams=2, num_return_sequences=2),
                   max_new_tokens=3, eos_token_id=256)  # fmt: skip
    assert out.tokens.shape == (2, 3)
    assert torch.isfinite(out.sequence_scores).all()


# ------------------------------------------------------------------------------------ errors


def test_a_word_that_encodes_to_nothing_is_a_clear_error() -> None:
    context = BuildContext(encode=lambda text: [] if not text or "zz" in text else [1], vocab_size=10)
    with pytest.raises(ConfigError, match=r"must_include: 'zz' encodes to no tokens"):
        build_sampler("beam", {"num_beams": 2, "must_include": ["ok", "zz"]}, context=context)


def test_a_word_outside_the_vocabulary_is_a_clear_error() -> None:
    context = BuildContext(encode=TOK.encode, vocab_size=100)
    with pytest.raises(ConfigError, match=r"must_include: 'é' encodes to token id \d+, outside the vocabulary \(size 100\)"):
        build_sampler("beam", {"num_beams": 2, "must_include": ["é"]}, context=context)


def test_token_ids_outside_the_models_vocabulary_are_refused(model: GPT) -> None:
    with pytest.raises(ConfigError, match=r"must_include: token id 999 is outside the vocabulary \(size 257\)"):
        generate(model, [[1, 2]], sampler=BeamSearch(2, must_include=[[5, 999]]), max_new_tokens=4)


def test_words_need_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match="no tokenizer is loaded"):
        build_sampler("beam", {"num_beams": 2, "must_include": ["dog"]})


def test_groups_and_constraints_do_not_mix() -> None:
    with pytest.raises(ConfigError, match="num_beam_groups=2 cannot be combined"):
        BeamSearch(4, num_beam_groups=2, must_include=[[1]])


# ------------------------------------------------------------------------------------ state machine


def test_constraint_state_follows_the_tokens() -> None:
    c = Constraints([[[1, 2, 3]], [[7], [8, 9]]])  # phrase A; phrase B = [7] or [8, 9]
    met, progress = c.start((1,), torch.device("cpu"))
    assert c.need(met, progress).tolist() == [4]  # 3 for A + 1 for B (its shortest form)
    history: list[int] = []
    expected = [  # token -> (met A, met B), progress of [1,2,3], [7], [8,9], need, bank
        (1, (False, False), [1, 0, 0], 3, 1),
        (2, (False, False), [2, 0, 0], 2, 2),
        (8, (False, False), [0, 0, 1], 4, 1),  # the partial match of A is lost; B's second form begun
        (9, (False, True), [0, 0, 0], 3, 2),
        (1, (False, True), [1, 0, 0], 2, 3),
        (2, (False, True), [2, 0, 0], 1, 4),
        (3, (True, True), [0, 0, 0], 0, 5),
    ]
    for token, want_met, want_progress, want_need, want_bank in expected:
        history.append(token)
        seq = torch.tensor([[0, 0] + history])  # a 2-token prompt
        tail = tails(seq, 2, seq.shape[1], c.width)
        met, progress = c.update(met, tail)
        assert tuple(met[0].tolist()) == want_met, token
        assert progress[0].tolist() == want_progress, token
        assert c.need(met, progress).tolist() == [want_need], token
        assert c.bank(met, progress).tolist() == [want_bank], token


def test_prompt_tokens_do_not_count() -> None:
    c = Constraints([[[4, 5]]])
    met, _ = c.start((1,), torch.device("cpu"))
    seq = torch.tensor([[4, 5, 4]])  # prompt [4, 5], one new token 4
    met, progress = c.update(met, tails(seq, 2, 3, c.width))
    assert met.tolist() == [[False]] and progress.tolist() == [[1]]


def test_next_tokens_advance_or_restart_unmet_phrases() -> None:
    c = Constraints([[[1, 2, 3]], [[7]]])
    met = torch.tensor([[False, True]])
    progress = torch.tensor([[2, 0]])
    tokens, valid = c.next_tokens(met, progress)
    assert sorted(t for t, v in zip(tokens[0].tolist(), valid[0].tolist()) if v) == [1, 3]


def test_allocation_is_round_robin_across_banks() -> None:
    score = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -0.5]])
    bank = torch.tensor([[0, 0, 2, 2, 1, 0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    chosen = allocate(score, bank, valid, 5, num_banks=3)
    # best of bank 2, of bank 1, of bank 0, then the second best of bank 2, of bank 0; never the invalid one
    assert chosen.tolist() == [[2, 4, 0, 3, 1]]
