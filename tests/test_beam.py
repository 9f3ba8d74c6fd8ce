"""Beam search properties: greedy at one beam, scores that are what they claim, per-beam processors,
diverse and sampled beams, batching, the context window, settings and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from decodekit import ConfigError, build_sampler, generate, get_registry
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import BadWords, NoRepeatNGram, RepetitionPenalty, Temperature, TopK
from decodekit.samplers import BeamSearch, Greedy, Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = torch.tensor([[3, 14, 15, 9, 2], [7, 7, 1, 8, 20], [11, 30, 4, 4, 25]])


def tiny_gpt(block_size: int = 64, vocab_size: int = 40, seed: int = 0) -> GPT:
    """A seeded 2-layer GPT with large weights, so its distributions are peaked (clear winners)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt()


@pytest.fixture(scope="module")
def eos(model: GPT) -> int:
    """A token greedy decoding emits early for some prompt, so EOS handling is exercised."""
    out = generate(model, PROMPTS, max_new_tokens=4)
    return int(out.tokens[0, 2])


def sequence_logprob(model: GPT, chain, prompt: list[int], new: list[int]) -> tuple[float, list[float]]:
    """Sum (and list) of log softmax(chain(logits)) of each new token, by full forward passes."""
    chain_begin = getattr(chain, "begin", None)
    if chain_begin is not None:
        chain_begin(torch.tensor([prompt]))
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids)[0]  # [T, V]
    logps = []
    for i, token in enumerate(new):
        t = len(prompt) + i
        processed = chain(ids[:, :t], logits[t - 1 : t]) if chain is not None else logits[t - 1 : t]
        logps.append(float(torch.log_softmax(processed.float(), -1)[0, token]))
    return sum(logps), logps


# ------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("eos_used", [False, True])
def test_one_beam_equals_greedy(model: GPT, eos: int, eos_used: bool) -> None:
    chain = RepetitionPenalty(1.3) | NoRepeatNGram(3)
    eos_id = eos if eos_used else None
    ours = generate(model, PROMPTS, sampler=BeamSearch(1), processors=chain, max_new_tokens=12, eos_token_id=eos_id, pad_token_id=0)
    greedy = generate(model, PROMPTS, sampler=Greedy(), processors=chain, max_new_tokens=12, eos_token_id=eos_id, pad_token_id=0)
    assert ours.rows() == greedy.rows()
    assert ours.finish_reasons == greedy.finish_reasons
    if eos_used:
        assert "eos" in ours.finish_reasons


def test_one_beam_equals_greedy_past_the_context_window() -> None:
    small = tiny_gpt(block_size=12)
    ours = generate(small, PROMPTS[:2], sampler=BeamSearch(1), max_new_tokens=20)
    greedy = generate(small, PROMPTS[:2], max_new_tokens=20)
    assert ours.rows() == greedy.rows()
    assert ours.tokens.shape == (2, 20)


def test_more_beams_run_past_the_context_window() -> None:
    small = tiny_gpt(block_size=12)
    out = generate(small, PROMPTS[:2], sampler=BeamSearch(3, num_return_sequences=2), max_new_tokens=20)
    assert out.tokens.shape == (4, 20)
    assert out.finish_reasons == ["length"] * 4


# ------------------------------------------------------------------------------------ scores


@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
def test_scores_are_length_normalised_logprob_sums_under_the_chain(model: GPT, eos: int, length_penalty: float) -> None:
    chain = RepetitionPenalty(1.2) | Temperature(0.8)
    sampler = BeamSearch(3, length_penalty=length_penalty, num_return_sequences=3)
    out = generate(model, PROMPTS, sampler=sampler, processors=chain, max_new_tokens=8, eos_token_id=eos, output_scores=True)
    assert out.tokens.shape[0] == 9 and out.sequence_scores.shape == (9,)
    for row, new in enumerate(out.rows()):
        prompt = PROMPTS[row // 3].tolist()
        total, logps = sequence_logprob(model, chain, prompt, new)
        assert out.sequence_scores[row].item() == pytest.approx(total / len(new) ** length_penalty, abs=1e-4)
        assert out.logprobs[row, : len(new)].tolist() == pytest.approx(logps, abs=1e-4)
        assert (new[-1] == eos) == (out.finish_reasons[row] == "eos")
    assert "eos" in out.finish_reasons


def test_returned_hypotheses_are_best_first_and_the_first_is_the_single_best(model: GPT, eos: int) -> None:
    many = generate(model, PROMPTS, sampler=BeamSearch(4, num_return_sequences=4), max_new_tokens=8, eos_token_id=eos)
    one = generate(model, PROMPTS, sampler=BeamSearch(4), max_new_tokens=8, eos_token_id=eos)
    scores = many.sequence_scores.view(3, 4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert [many.rows()[4 * b] for b in range(3)] == one.rows()
    assert torch.equal(many.sequences[::4, : PROMPTS.shape[1]], PROMPTS)


# ------------------------------------------------------------------------------------ per-beam processors


def test_processors_act_on_each_beams_own_history(model: GPT) -> None:
    chain = NoRepeatNGram(2) | BadWords([[5]])
    out = generate(model, PROMPTS, sampler=BeamSearch(4, num_return_sequences=4), processors=chain, max_new_tokens=12)
    for row, new in enumerate(out.rows()):
        seq = PROMPTS[row // 4].tolist() + new
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams)), f"row {row} repeats a bigram: {seq}"
        assert 5 not in new


# ------------------------------------------------------------------------------------ batching


def test_a_prompt_gets_the_same_beams_alone_and_left_padded_in_a_batch(model: GPT, eos: int) -> None:
    short = [9, 3, 17]
    batch = torch.tensor([[0, 0] + short, PROMPTS[0].tolist()])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sampler = BeamSearch(3, num_return_sequences=2)
    together = generate(model, batch, attention_mask=mask, sampler=sampler, max_new_tokens=8, eos_token_id=eos)
    alone = generate(model, [short], sampler=sampler, max_new_tokens=8, eos_token_id=eos)
    assert together.rows()[:2] == alone.rows()
    assert torch.allclose(together.sequence_scores[:2], alone.sequence_scores, atol=1e-5)


# ------------------------------------------------------------------------------------ diverse beams


def test_zero_diversity_penalty_groups_repeat_plain_beam_search(model: GPT, eos: int) -> None:
    groups = BeamSearch(4, num_beam_groups=2, diversity_penalty=0.0, num_return_sequences=4)
    plain = BeamSearch(2, num_return_sequences=2)
    g = generate(model, PROMPTS, sampler=groups, max_new_tokens=8, eos_token_id=eos)
    p = generate(model, PROMPTS, sampler=plain, max_new_tokens=8, eos_token_id=eos)
    # each group is a 2-beam search from the same start: every hypothesis comes twice
    expected = [row for b in range(3) for row in (p.rows()[2 * b], p.rows()[2 * b], p.rows()[2 * b + 1], p.rows()[2 * b + 1])]
    assert g.rows() == expected
    assert torch.allclose(g.sequence_scores, p.sequence_scores.repeat_interleave(2), atol=1e-6)


def test_one_group_is_plain_beam_search(model: GPT, eos: int) -> None:
    a = generate(model, PROMPTS, sampler=BeamSearch(3, num_beam_groups=1), max_new_tokens=8, eos_token_id=eos)
    b = generate(model, PROMPTS, sampler=BeamSearch(3), max_new_tokens=8, eos_token_id=eos)
    assert a.rows() == b.rows()


def test_a_diversity_penalty_sends_later_groups_elsewhere(model: GPT) -> None:
    def first_tokens(penalty: float) -> list[set[int]]:
        sampler = BeamSearch(4, num_beam_groups=2, diversity_penalty=penalty, num_return_sequences=4)
        out = generate(model, PROMPTS, sampler=sampler, max_new_tokens=6)
        return [{int(t) for t in out.tokens[4 * b : 4 * b + 4, 0]} for b in range(3)]

    same, diverse = first_tokens(0.0), first_tokens(100.0)
    for b in range(3):
        assert diverse[b] - same[b], f"prompt {b}: no group left the undiversified first tokens {same[b]}"


# ------------------------------------------------------------------------------------ beam sampling


def test_beam_sampling_is_reproducible_and_batch_independent(model: GPT) -> None:
    sampler = BeamSearch(3, beam_sample=True, num_return_sequences=2)
    chain = Temperature(1.5)
    a = generate(model, PROMPTS, sampler=sampler, processors=chain, max_new_tokens=8, seed=5)
    b = generate(model, PROMPTS, sampler=sampler, processors=chain, max_new_tokens=8, seed=5)
    alone = generate(model, PROMPTS[2:], sampler=sampler, processors=chain, max_new_tokens=8, seed=7)
    assert a.rows() == b.rows()
    assert a.rows()[4:] == alone.rows()
    others = [generate(model, PROMPTS, sampler=sampler, processors=chain, max_new_tokens=8, seed=s).rows() for s in (6, 7, 8)]
    assert any(o != a.rows() for o in others), "different seeds never changed the samples"


def test_beam_sampling_scores_are_logprob_sums(model: GPT) -> None:
    chain = Temperature(1.3) | TopK(10)
    out = generate(model, PROMPTS, sampler=BeamSearch(2, beam_sample=True, length_penalty=0.0, num_return_sequences=2),
                   processors=chain, max_new_tokens=6, seed=1)  # fmt: skip
    for row, new in enumerate(out.rows()):
        total, _ = sequence_logprob(model, chain, PROMPTS[row // 2].tolist(), new)
        assert out.sequence_scores[row].item() == pytest.approx(total, abs=1e-4)


def test_one_sampled_beam_is_multinomial_sampling(model: GPT, eos: int) -> None:
    """One sampled beam draws its first token from the processed softmax, as Multinomial does
    (the two draw differently: Gumbel-top-k against inverse transform; the law is the same)."""
    chain = Temperature(1.2)
    n = 3000
    prompts = PROMPTS[:1].expand(n, -1)
    with torch.no_grad():
        logits, _ = model.step(prompts[:1], position_ids=torch.arange(prompts.shape[1])[None],
                               attention_mask=torch.ones_like(prompts[:1], dtype=torch.bool),
                               cache=model.new_cache(1, prompts.shape[1]))  # fmt: skip
    expected = chain(prompts[:1], logits).softmax(-1)[0]
    for sampler in (BeamSearch(1, beam_sample=True), Multinomial()):
        out = generate(model, prompts, sampler=sampler, processors=chain, max_new_tokens=1, eos_token_id=eos,
                       seed=list(range(n)))  # fmt: skip
        freq = torch.bincount(out.tokens[:, 0], minlength=expected.numel()).float() / n
        assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3).all(), sampler


# ------------------------------------------------------------------------------------ stopping and text


def test_stopping_criteria_cut_returned_rows_and_streaming_sees_them(model: GPT) -> None:
    out_plain = generate(model, PROMPTS, sampler=BeamSearch(2), max_new_tokens=8)
    cut_at = int(out_plain.tokens[0, 3])
    seen: list[tuple[int, list[int]]] = []

    def criterion(seqs: torch.Tensor, n: int) -> torch.Tensor:
        return seqs[:, -1] == cut_at

    out = generate(model, PROMPTS, sampler=BeamSearch(2), max_new_tokens=8, stopping=[criterion],
                   on_token=lambda step, tok, fin: seen.append((step, tok.tolist())))  # fmt: skip
    assert out.finish_reasons[0] == "stop"
    first = out_plain.rows()[0]
    assert out.rows()[0] == first[: first.index(cut_at) + 1]
    assert [s for s, _ in seen] == list(range(out.tokens.shape[1]))
    assert [t[0] for _, t in seen[: len(out.rows()[0])]] == out.rows()[0]


def test_generate_text_with_beams_trims_a_stop_string() -> None:
    tok = ByteTokenizer(eos_token_id=256)
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32)).eval()
    free = generate_text(m, tok, ["Hello"], sampler=BeamSearch(2), max_new_tokens=6)[0]
    stop = free.text[2:4]
    res = generate_text(m, tok, ["Hello"], sampler=BeamSearch(2), max_new_tokens=6, stop=[stop])[0]
    assert stop not in res.text and res.tokens and len(res.tokens) <= 6
    if res.finish_reason == "stop":  # its tokens end where the stop string is complete
        assert stop in tok.decode(res.tokens) and stop not in tok.decode(res.tokens[:-1])


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_stop_strings_steer_beam_search_as_an_eos_would(num_beams: int) -> None:
    """A one-character stop string finishes a hypothesis exactly where an EOS token for that
    character would: the same search, the same returned tokens (only the finish reason differs),
    and a different result from the search that does not know the stop string."""
    from decodekit.models import load_model
    from decodekit.text import StopStrings
    from decodekit.tokenization import load_tokenizer

    model, extras = load_model("default", device="cpu")  # real text, with newlines
    tok = load_tokenizer("auto", extras)
    ids = torch.tensor([tok.encode("Love is "), tok.encode("Cats are")])
    steered = generate(model, ids, sampler=BeamSearch(num_beams), max_new_tokens=60, eos_token_id=256,
                       stopping=[StopStrings(tok, ["\n"], {256})])  # fmt: skip
    as_eos = generate(model, ids, sampler=BeamSearch(num_beams), max_new_tokens=60, eos_token_id=[256, 10])
    assert steered.rows() == as_eos.rows()
    assert [r == "stop" for r in steered.finish_reasons] == [row[-1] == 10 for row in steered.rows()]
    texts = generate_text(model, tok, ["Love is ", "Cats are"], sampler=BeamSearch(num_beams), max_new_tokens=60,
                          stop=["\n"])  # fmt: skip
    assert [t.text for t in texts] == [tok.decode([x for x in row if x != 10]) for row in as_eos.rows()]
    if num_beams == 4:  # here the free search returns a hypothesis past a newline
        free = generate(model, ids, sampler=BeamSearch(num_beams), max_new_tokens=60, eos_token_id=256)
        assert free.rows() != steered.rows()


# ------------------------------------------------------------------------------------ settings


def test_registered_with_flat_settings() -> None:
    registry = get_registry()
    assert registry.samplers["beam"].cls is BeamSearch
    for setting in ("num_beams", "length_penalty", "early_stopping", "num_return_sequences", "beam_sample",
                    "num_beam_groups", "diversity_penalty", "must_include"):  # fmt: skip
        assert registry.owners[setting].name == "beam"
    sampler = build_sampler("beam", {"num_beams": 3, "early_stopping": "never", "length_penalty": 0.5})
    assert (sampler.num_beams, sampler.early_stopping, sampler.length_penalty) == (3, "never", 0.5)


def test_built_from_settings_it_decodes_like_the_class(model: GPT, eos: int) -> None:
    built = build_sampler("beam", {"num_beams": 3, "num_return_sequences": 2})
    a = generate(model, PROMPTS, sampler=built, max_new_tokens=6, eos_token_id=eos)
    b = generate(model, PROMPTS, sampler=BeamSearch(3, num_return_sequences=2), max_new_tokens=6, eos_token_id=eos)
    assert a.rows() == b.rows()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_beams": 0}, r"num_beams=0 is not allowed: must be >= 1"),
        ({"num_beams": 2, "num_return_sequences": 3}, r"num_return_sequences=3 .*num_beams=2"),
        ({"num_beams": 4, "num_beam_groups": 3}, r"num_beam_groups=3 .*must divide num_beams=4"),
        ({"num_beams": 4, "diversity_penalty": 0.5}, r"diversity_penalty=0.5 needs num_beam_groups > 1"),
        ({"num_beams": 4, "diversity_penalty": -1.0, "num_beam_groups": 2}, r"diversity_penalty=-1.0 is not allowed"),
        ({"num_beams": 4, "early_stopping": "sometimes"}, r"early_stopping"),
        ({"num_beams": 4, "num_beam_groups": 2, "beam_sample": True}, r"num_beam_groups=2 cannot be combined"),
        ({"num_beams": 4, "beam_sample": True, "must_include": [[1]]}, r"beam_sample cannot be combined"),
    ],
)
def test_bad_settings_give_one_clear_error(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_sampler("beam", settings)


def test_called_as_a_plain_sampler_it_says_how_to_use_it() -> None:
    with pytest.raises(ConfigError, match="drives its own loop"):
        BeamSearch(2)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 5), None)


def test_docs_page_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "beam.md").read_text(), flags=re.S)
    assert blocks
    namespace: dict[str, object] = {"__name__": "docs_beam"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/beam.md[block {i}]", "exec"), namespace)
        except Exception as exc:  # report which block broke
            raise AssertionError(f"docs/beam.md block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc
