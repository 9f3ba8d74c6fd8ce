"""transformers interop: our chains inside ``model.generate`` and transformers' processors inside
ours give the same tokens and processed scores as the native way."""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import decodekit  # noqa: E402
from decodekit.interop import to_transformers  # noqa: E402
from decodekit.models import HFCausalLM  # noqa: E402
from decodekit.processors import NoRepeatNGram, PresencePenalty, RepetitionPenalty, Temperature, TopK, TopP  # noqa: E402
from decodekit.samplers import Multinomial  # noqa: E402

lp = transformers.generation.logits_process

PROMPT = torch.tensor([[5, 17, 9, 23, 5, 17], [3, 3, 8, 1, 40, 2]])
NEW = 12


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=48, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def hf_generate(model, processors, **kwargs):
    with torch.no_grad():
        out = model.generate(
            PROMPT,
            attention_mask=torch.ones_like(PROMPT),
            logits_processor=transformers.LogitsProcessorList(processors),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, PROMPT.shape[1] :], out.scores


def ours_generate(model, processors, **kwargs):
    out = decodekit.generate(HFCausalLM(model), PROMPT, processors=processors, max_new_tokens=NEW, output_scores=True, **kwargs)
    return out.tokens, out.scores


def assert_same_scores(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a == float("-inf"), b == float("-inf")), f"different tokens removed at step {step}"
        a, b = a.log_softmax(-1), b.log_softmax(-1)  # the same distribution (a shift of a row's logits is allowed)
        torch.testing.assert_close(a.masked_fill(a == float("-inf"), 0), b.masked_fill(b == float("-inf"), 0), atol=1e-4, rtol=1e-4)


def our_chain():
    # Penalties that change the greedy choice, one that counts only generated tokens (needs begin),
    # then a warp and truncations.
    return RepetitionPenalty(1.5) | PresencePenalty(1.0) | NoRepeatNGram(2) | Temperature(0.7) | TopK(10) | TopP(0.9)


def test_our_chain_inside_transformers_generate_matches_decodekit_generate(hf_model) -> None:
    theirs_tokens, theirs_scores = hf_generate(hf_model, [to_transformers(our_chain())])
    ours_tokens, ours_scores = ours_generate(hf_model, our_chain())
    assert torch.equal(ours_tokens, theirs_tokens)
    assert_same_scores(ours_scores, theirs_scores)


def test_the_wrapper_starts_afresh_for_each_generate_call(hf_model) -> None:
    wrapped = to_transformers(our_chain())
    first, _ = hf_generate(hf_model, [wrapped])
    second, _ = hf_generate(hf_model, [wrapped])
    fresh, _ = hf_generate(hf_model, [to_transformers(our_chain())])
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def test_the_wrapper_tells_presence_penalty_where_the_prompt_ends(hf_model) -> None:
    # Without begin(), PresencePenalty would count prompt tokens too and penalise token 5 at once.
    chain = PresencePenalty(2.0)
    wrapped = to_transformers(chain)
    hf_generate(hf_model, [wrapped])
    assert (chain._prompt_length == PROMPT.shape[1]).all()  # one prompt length per row


def transformers_chain():
    return [
        lp.RepetitionPenaltyLogitsProcessor(1.5),
        lp.NoRepeatNGramLogitsProcessor(2),
        lp.TemperatureLogitsWarper(0.7),
        lp.TopKLogitsWarper(10),
        lp.TopPLogitsWarper(0.9),
    ]


def equivalent_chain():
    return RepetitionPenalty(1.5) | NoRepeatNGram(2) | Temperature(0.7) | TopK(10) | TopP(0.9)


def test_transformers_processors_run_in_decodekit_generate_like_ours(hf_model) -> None:
    theirs_tokens, theirs_scores = ours_generate(hf_model, transformers_chain())
    ours_tokens, ours_scores = ours_generate(hf_model, equivalent_chain())
    assert torch.equal(theirs_tokens, ours_tokens)
    assert_same_scores(ours_scores, theirs_scores)


def test_sampling_through_transformers_processors_draws_the_same_tokens(hf_model) -> None:
    theirs, _ = ours_generate(hf_model, transformers_chain(), sampler=Multinomial(), seed=3)
    ours, _ = ours_generate(hf_model, equivalent_chain(), sampler=Multinomial(), seed=3)
    assert torch.equal(theirs, ours)


def test_transformers_processors_compose_with_ours_with_the_pipe(hf_model) -> None:
    mixed = RepetitionPenalty(1.5) | lp.NoRepeatNGramLogitsProcessor(2) | Temperature(0.7)
    mixed = lp.TopKLogitsWarper(10) | mixed  # a transformers processor on the left works too
    assert len(mixed) == 4
    native = TopK(10) | RepetitionPenalty(1.5) | NoRepeatNGram(2) | Temperature(0.7)
    a, a_scores = ours_generate(hf_model, mixed)
    b, b_scores = ours_generate(hf_model, native)
    assert torch.equal(a, b)
    assert_same_scores(a_scores, b_scores)


def test_plugin_processors_run_inside_transformers_generate(hf_model) -> None:
    pytest.importorskip("decodekit_dry")
    chain = decodekit.build_chain({"dry_multiplier": 2.0, "dry_allowed_length": 1, "dry_sequence_breakers": []})
    theirs, theirs_scores = hf_generate(hf_model, [to_transformers(chain)])
    ours, ours_scores = ours_generate(hf_model, chain)
    assert torch.equal(ours, theirs)
    assert_same_scores(ours_scores, theirs_scores)


def test_a_missing_transformers_is_a_clear_import_error(monkeypatch) -> None:
    from decodekit import interop

    interop._wrapper_class.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers", None)
    try:
        with pytest.raises(ImportError, match=r"needs transformers: pip install decodekit\[hf\]"):
            to_transformers(Temperature(0.7))
    finally:
        interop._wrapper_class.cache_clear()
