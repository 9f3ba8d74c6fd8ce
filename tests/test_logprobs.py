"""Per-token logprobs: the chosen token's and the top-n alternatives', raw and processed.

Checked against a direct forward pass of the model over prompt + new tokens, and against
transformers' ``compute_transition_scores`` on a GPT-2 with the same weights (through the native
GPT and through the Hugging Face adapter); the request engine gives each request exactly what
:func:`decodekit.generate` gives it alone, whatever its n, its mode and its neighbours.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decodekit import ConfigError, generate
from decodekit.engine import Engine, Request
from decodekit.models import HFCausalLM, load_model
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import RepetitionPenalty, Temperature, TopK, TopP
from decodekit.registry import build_chain
from decodekit.samplers import BeamSearch, Greedy, Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import ByteTokenizer

PROMPTS = torch.tensor([[5, 17, 42, 8], [11, 2, 3, 4]])


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=60, n_layer=2, n_head=2, n_embd=32)
    m = GPT(config).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # peaked enough that top-p and top-k cut something
    return m


def forward_logprobs(model, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``[B, N, V]`` log-softmax of a plain forward pass at the positions that chose the new tokens."""
    with torch.no_grad():
        logits = model(sequences).float()
    return logits[:, prompt_len - 1 : -1].log_softmax(-1)


def check_against(lp, reference: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """``lp``: GenerateOutput; ``reference``: ``[B, N, V]`` log-probabilities the tokens came from."""
    chosen = reference.gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(lp.logprobs, chosen, atol=1e-4), (lp.logprobs - chosen).abs().max()
    values, ids = reference.topk(n, dim=-1)
    assert torch.allclose(lp.top_logprobs, values, atol=1e-4)
    assert torch.equal(lp.top_ids, ids)


@pytest.mark.parametrize("sampler", [Greedy(), Multinomial()])
def test_raw_logprobs_are_the_forward_pass_log_softmax_of_the_chosen_and_top_tokens(model, sampler) -> None:
    chain = RepetitionPenalty(1.3) | Temperature(0.7) | TopK(8)
    out = generate(model, PROMPTS, processors=chain, sampler=sampler, max_new_tokens=7, seed=3, logprobs=4)
    assert out.logprobs_mode == "raw" and out.top_logprobs.shape == (2, 7, 4)
    check_against(out, forward_logprobs(model, out.sequences, PROMPTS.shape[1]), out.tokens, 4)


def test_processed_logprobs_follow_the_chain_the_tokens_were_drawn_from(model) -> None:
    chain = Temperature(0.7) | TopP(0.8)  # top-p is fused into the sampler: applied for the record
    out = generate(model, PROMPTS, processors=chain, sampler=Multinomial(), max_new_tokens=7, seed=1,
                   logprobs=3, logprobs_mode="processed")  # fmt: skip
    scores = generate(model, PROMPTS, processors=chain, sampler=Multinomial(), max_new_tokens=7, seed=1, output_scores=True)
    assert torch.equal(scores.tokens, out.tokens)
    reference = torch.stack(scores.scores, 1).log_softmax(-1)  # [B, N, V] the processed distributions
    chosen = reference.gather(-1, out.tokens[..., None]).squeeze(-1)
    assert torch.allclose(out.logprobs, chosen, atol=1e-5)
    assert torch.allclose(out.logprobs, scores.logprobs, atol=1e-5)  # output_scores' own figure
    cut = (reference == float("-inf")).sum(-1)  # top-p removed tokens at every step
    assert (cut > 0).all()
    # where fewer than 3 tokens are left the rest are -inf with id -1; the kept ones match
    values, ids = reference.topk(3, dim=-1)
    finite = values > float("-inf")
    assert torch.equal(out.top_logprobs == float("-inf"), ~finite) and (out.top_ids[~finite] == -1).all()
    assert torch.allclose(out.top_logprobs[finite], values[finite], atol=1e-5)
    assert torch.equal(out.top_ids[finite], ids[finite])


@pytest.mark.parametrize("scale", [0.05, 2.0, 8.0])
def test_nucleus_logprobs_equal_those_of_the_cut_logits(scale: float) -> None:
    from decodekit.logprobs import nucleus_logprobs, step_logprobs
    from decodekit.samplers.rejection import NucleusMultinomial

    logits = torch.randn(6, 2000, generator=torch.Generator().manual_seed(5)) * scale
    logits[0, :300] = float("-inf")
    top_p = torch.tensor([0.9, 0.9, 0.3, 1.0, 0.0, 0.99])
    sampler = NucleusMultinomial(TopP(top_p))
    cut = TopP(top_p)(None, logits)
    token = torch.multinomial(cut.softmax(-1), 1).squeeze(-1)  # a token of each nucleus
    expected = step_logprobs(cut, token, 5)
    got = nucleus_logprobs(logits, token, 5, *sampler.nucleus(logits, token))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=2e-6)  # -inf where fewer than 5 are kept
    assert torch.equal(got[2], expected[2])
    # a token rounding left under the floor is still the row's: its logprob is finite, its mass counted
    outside = cut[1].eq(float("-inf")).nonzero()[0]
    token[1] = outside.item()
    floor, lse = sampler.nucleus(logits, token)
    assert floor[1, 0] == logits[1, outside] and nucleus_logprobs(logits, token, 0, floor, lse)[0][1] > float("-inf")
    whole_floor, whole_lse = sampler.nucleus(logits, token, whole=torch.tensor([True] * 6))
    torch.testing.assert_close(whole_lse, torch.logsumexp(logits, -1, keepdim=True))  # whole rows: the raw distribution


def test_token_logprobs_are_cut_at_each_rows_length_and_sum_to_the_total(model) -> None:
    out = generate(model, PROMPTS, sampler=Multinomial(), max_new_tokens=12, eos_token_id=[7, 9, 13], seed=0, logprobs=0)
    rows = out.token_logprobs()
    assert [len(r.tokens) for r in rows] == out.lengths.tolist() and min(out.lengths.tolist()) < 12  # one stopped early
    for row, lp, k in zip(out.logprobs, rows, out.lengths.tolist()):
        assert lp.logprobs == pytest.approx(row[:k].tolist()) and lp.top_ids == [[]] * k
        assert lp.total == pytest.approx(float(row[:k].sum()), abs=1e-4)


def test_beam_search_gives_raw_logprobs_of_its_returned_sequences(model) -> None:
    out = generate(model, PROMPTS, sampler=BeamSearch(3, num_return_sequences=2), max_new_tokens=6, logprobs=2)
    assert out.tokens.shape[0] == 4
    prompts = PROMPTS.repeat_interleave(2, 0)
    reference = forward_logprobs(model, torch.cat([prompts, out.tokens], 1), PROMPTS.shape[1])
    check_against(out, reference, out.tokens, 2)
    with pytest.raises(ConfigError, match=r"^logprobs_mode='processed': beam drives its own loop; it gives raw logprobs only$"):
        generate(model, PROMPTS, sampler=BeamSearch(2), max_new_tokens=3, logprobs=2, logprobs_mode="processed")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"logprobs": 21}, "logprobs=21 is not allowed: must be an integer in [0, 20]"),
    ({"logprobs": -1}, "logprobs=-1 is not allowed: must be an integer in [0, 20]"),
    ({"logprobs": True}, "logprobs=True is not allowed: must be an integer in [0, 20]"),
    ({"logprobs": 2, "logprobs_mode": "scaled"}, "logprobs_mode='scaled' is not allowed: must be one of raw, processed"),
])  # fmt: skip
def test_bad_logprobs_settings_are_one_line_naming_the_setting(model, kwargs, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        generate(model, PROMPTS, max_new_tokens=2, **kwargs)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    bad = Engine(model, max_slots=2).generate([Request(prompt_ids=[1, 2], max_new_tokens=2, **kwargs)])[0]
    assert bad.finish_reason == "error" and bad.error.startswith(message)


# ------------------------------------------------------------------------------ the request engine


def alone(model, request: Request, eos: list[int]):
    """``generate`` on this request alone, with its own chain and seed."""
    return generate(
        model, torch.tensor([list(request.prompt_ids)]), processors=build_chain(dict(request.settings)),
        sampler=Multinomial(), max_new_tokens=request.max_new_tokens, eos_token_id=eos, seed=request.seed,
        logprobs=request.logprobs, logprobs_mode=request.logprobs_mode,
    )  # fmt: skip


def test_engine_gives_each_request_its_own_n_and_mode_as_alone(model) -> None:
    eos = [7]
    requests = [
        Request(prompt_ids=[5, 17, 42], settings={"temperature": 0.8, "top_p": 0.9}, seed=1, max_new_tokens=9, logprobs=3, logprobs_mode="processed"),
        Request(prompt_ids=[11, 2], settings={"top_k": 4}, seed=2, max_new_tokens=5),
        Request(prompt_ids=[9, 9, 30, 31, 1], seed=3, max_new_tokens=14, logprobs=5),
        Request(prompt_ids=[3], settings={"temperature": 1.4}, seed=4, max_new_tokens=6, logprobs=0),
        Request(prompt_ids=[8, 8], settings={"top_k": 2}, seed=5, max_new_tokens=11, logprobs=1, logprobs_mode="processed"),
        Request(prompt_ids=[4, 40], settings={"min_p": 0.1}, seed=6, max_new_tokens=4, logprobs=2),
        Request(prompt_ids=[2, 3], seed=7, max_new_tokens=50, logprobs=2),
        Request(prompt_ids=[6], seed=8, settings={"top_k": 3}, max_new_tokens=55, logprobs=4, logprobs_mode="processed"),
        Request(prompt_ids=[1, 2], settings={"top_p": 0.5}, seed=9, max_new_tokens=8, logprobs=2),  # raw beside processed top-p
    ]  # fmt: skip
    engine = Engine(model, max_slots=3, eos_token_id=eos)
    outs = engine.generate(requests)  # slots refill as requests end
    assert engine.steps > 64 and max(len(o.tokens) for o in outs) > 32  # the device buffers grew while in use
    assert outs[1].logprobs is None
    for request, out in zip(requests, outs):
        if request.logprobs is None:
            continue
        ref = alone(model, request, eos).token_logprobs()[0]
        got = out.logprobs
        assert got.tokens == ref.tokens == out.tokens and got.mode == request.logprobs_mode
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
        assert got.top_ids == ref.top_ids and len(got.top_ids[0]) == request.logprobs
        assert torch.allclose(torch.tensor(got.top_logprobs), torch.tensor(ref.top_logprobs), atol=1e-4)


def test_engine_prompt_logprobs_are_the_prompts_forward_pass(model) -> None:
    prompt = [5, 17, 42, 8, 3]
    out = Engine(model, max_slots=2).generate([Request(prompt_ids=prompt, seed=0, max_new_tokens=2, prompt_logprobs=2)])[0]
    reference = forward_logprobs(model, torch.tensor([prompt]), 1)[0]  # predicts prompt[1:]
    assert out.prompt_logprobs.tokens == prompt[1:]
    assert out.prompt_logprobs.logprobs == pytest.approx(reference.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1).tolist(), abs=1e-5)
    assert out.prompt_logprobs.top_ids == reference.topk(2).indices.tolist()


def test_generate_text_gives_the_same_logprobs_on_the_engine_and_on_the_loop(model) -> None:
    tokenizer = ByteTokenizer()
    small = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()
    kwargs = dict(processors=Temperature(0.9) | TopK(20), sampler=Multinomial(), max_new_tokens=6, seed=2, num_samples=2,
                  logprobs=2, logprobs_mode="processed", prompt_logprobs=1)  # fmt: skip
    on_engine = generate_text(small, tokenizer, ["ab", "hello"], **kwargs)
    on_loop = generate_text(small, tokenizer, ["ab", "hello"], output=[], **kwargs)  # `output` takes the loop path
    for a, b in zip(on_engine, on_loop):
        assert a.tokens == b.tokens == a.logprobs.tokens
        assert a.logprobs.logprobs == pytest.approx(b.logprobs.logprobs, abs=1e-4) and a.logprobs.top_ids == b.logprobs.top_ids
        assert a.prompt_logprobs.tokens == list(a.prompt.encode())[1:] and a.prompt_logprobs == b.prompt_logprobs


# ------------------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """transformers' GPT-2 (random, seeded) and our native GPT with the same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     initializer_range=0.5, pad_token_id=1)  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = Path(tmp_path_factory.mktemp("gpt2"))
    hf.save_pretrained(path)
    ours, _ = load_model(path, device="cpu")
    return transformers, hf, ours


def test_engine_waves_on_the_adapter_give_each_request_its_logprobs_as_alone(pair) -> None:
    _, hf, _ = pair
    model = HFCausalLM(hf)  # no slot cache: the engine refills in waves
    requests = [Request(prompt_ids=p, settings={"temperature": 0.9, "top_k": 20}, seed=s, max_new_tokens=m, logprobs=n)
                for p, s, m, n in (([5, 17, 42], 1, 6, 2), ([11, 2], 2, 9, 4), ([9, 30, 31, 1], 3, 4, None))]  # fmt: skip
    outs = Engine(model, max_slots=2).generate(requests)
    for request, out in zip(requests[:2], outs):
        ref = alone(model, request, []).token_logprobs()[0]
        assert out.logprobs.tokens == ref.tokens and out.logprobs.top_ids == ref.top_ids
        assert out.logprobs.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert outs[2].logprobs is None and len(outs[2].tokens) == 4


@pytest.mark.parametrize("backend", ["native", "adapter"])
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_match_transformers_compute_transition_scores(pair, backend: str, mode: str) -> None:
    transformers, hf, ours = pair
    lp = transformers.generation.logits_process
    model = ours if backend == "native" else HFCausalLM(hf)
    new = 8
    with torch.no_grad():
        theirs = hf.generate(
            PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False, max_new_tokens=new, min_new_tokens=new,
            logits_processor=transformers.LogitsProcessorList([
                lp.RepetitionPenaltyLogitsProcessor(1.5), lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(10)]),
            return_dict_in_generate=True, output_scores=True, output_logits=True, pad_token_id=1,
        )  # fmt: skip
    steps = theirs.logits if mode == "raw" else theirs.scores
    expected = hf.compute_transition_scores(theirs.sequences, steps, normalize_logits=True)  # [B, N]
    out = generate(model, PROMPTS, processors=RepetitionPenalty(1.5) | Temperature(0.7) | TopK(10), sampler=Greedy(),
                   max_new_tokens=new, logprobs=5, logprobs_mode=mode)  # fmt: skip
    assert torch.equal(out.tokens, theirs.sequences[:, PROMPTS.shape[1] :])
    assert torch.allclose(out.logprobs, expected, atol=1e-4), (out.logprobs - expected).abs().max()
    top = torch.stack(steps, 1).float().log_softmax(-1).topk(5, dim=-1)
    assert torch.allclose(out.top_logprobs, top.values, atol=1e-4)
    assert torch.equal(out.top_ids, top.indices)


@pytest.mark.parametrize("shape", [(8, 50257), (3, 5, 1000), (2, 300), (4, 257)])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_blocked_topk_is_torch_topk(shape: tuple[int, ...], n: int) -> None:
    from decodekit.logprobs import blocked_topk

    g = torch.Generator().manual_seed(n)
    logits = torch.randn(*shape, generator=g) * 3
    logits[..., ::7] = float("-inf")
    logits[0, ...] = torch.where(torch.arange(shape[-1]) < 2, 1.0, float("-inf"))  # fewer than n tokens left
    values, ids = blocked_topk(logits, n)
    expected = logits.topk(n, dim=-1)
    assert torch.equal(values, expected.values)
    finite = values > float("-inf")  # the order of tied -inf ids is unspecified (reported as -1)
    assert torch.equal(ids[finite], expected.indices[finite])
