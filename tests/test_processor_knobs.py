"""Dynamic temperature, the penalties' window, allowed tokens: their rules, settings and errors.

The per-row contract and the property suite cover these classes through the registry (see
tests/test_processor_properties.py); the peers' own expected values are in tests/test_peer_*.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit import ConfigError, build_chain
from decodekit.engine import Engine, Request
from decodekit.errors import PluginError
from decodekit.models import load_model
from decodekit.processors import (
    AllowedTokenIds,
    BuildContext,
    FrequencyPenalty,
    LogitsProcessor,
    PrefixAllowedTokens,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
)
from decodekit.registry import Registry, build_row_chain
from decodekit.samplers import Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import load_tokenizer

# --- dynamic temperature ------------------------------------------------------------------------


def test_dynamic_temperature_spans_t_minus_range_to_t_plus_range_by_entropy() -> None:
    """A uniform row (normalised entropy 1) runs at t + d, a near-certain one close to t - d."""
    uniform = torch.zeros(1, 8)
    assert torch.allclose(Temperature(0.8, 0.5)(None, uniform + 2.0), (uniform + 2.0) / 1.3, rtol=1e-6)
    sure = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # entropy ~ 4e-12
    out = Temperature(0.8, 0.5)(None, sure)
    assert torch.allclose(out, sure / 0.3, rtol=1e-6)
    steep = Temperature(0.8, 0.5, 4.0)(None, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # e > 1: nearer t - d
    normalised = _normalised_entropy([1.0, 0.0, 0.0, 0.0])
    assert float(steep[0, 0]) == pytest.approx(1.0 / (0.3 + 1.0 * normalised**4), rel=1e-6)


def _normalised_entropy(logits: list[float]) -> float:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p) / math.log(len(p))


def test_dynamic_temperature_greedy_at_zero_and_a_lone_token_untouched() -> None:
    """T = max(0, t - d) = 0 on a certain row (the others' probabilities underflow: entropy 0) keeps only
    the argmax; a row with one token left is returned as is."""
    x = torch.tensor([[200.0, 0.0, -1.0], [float("-inf"), 3.0, float("-inf")]])
    out = Temperature(0.2, 0.5, 1.0)(None, x)
    assert out[0].tolist() == [200.0, float("-inf"), float("-inf")]
    assert torch.equal(out[1], x[1])


def test_dynamic_temperature_per_row_mixes_with_plain_rows() -> None:
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    mixed = Temperature([0.7, 0.7, 1.0], [0.0, 0.4, 0.0])(None, x)
    assert torch.equal(mixed[0], Temperature(0.7)(None, x[:1])[0])
    assert torch.equal(mixed[1], Temperature(0.7, 0.4)(None, x[1:2])[0])
    assert torch.equal(mixed[2], x[2])


def test_dynatemp_settings_are_validated_and_shown_only_when_on() -> None:
    with pytest.raises(ConfigError, match=r"dynatemp_range=-0.1 is not allowed: must be >= 0"):
        build_chain({"temperature": 0.8, "dynatemp_range": -0.1})
    with pytest.raises(ConfigError, match=r"row 1: dynatemp_exponent=-1 is not allowed: must be >= 0"):
        Temperature(0.8, 0.5, [1.0, -1])
    assert repr(Temperature(0.8)) == "Temperature(temperature=0.8)"
    chain = build_chain({"dynatemp_range": 0.5})  # temperature defaults to 1
    assert [(p.temperature, p.dynatemp_range) for p in chain] == [(1.0, 0.5)] and "dynatemp_range=0.5" in repr(chain)


# --- penalty_last_n: one setting for three penalties ----------------------------------------------


def test_penalty_last_n_reaches_every_penalty_in_the_chain_and_alone_adds_none() -> None:
    chain = build_chain({"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2, "penalty_last_n": 4})
    assert [(type(p), p.penalty_last_n) for p in chain] == [(RepetitionPenalty, 4), (PresencePenalty, 4), (FrequencyPenalty, 4)]
    assert len(build_chain({"penalty_last_n": 4})) == 0
    with pytest.raises(ConfigError, match=r"penalty_last_n=-5 is not allowed: must be >= -1"):
        build_chain({"penalty_last_n": -5})  # checked even alone
    rows = build_row_chain([{"presence_penalty": 1.0, "penalty_last_n": 1}, {"presence_penalty": 1.0}])
    assert rows[0].penalty_last_n.tolist() == [1, -1]  # a row that does not set it gets the whole history


def test_the_window_counts_real_tokens_and_ignores_padding() -> None:
    """Row 0 is left-padded: its last 2 tokens are 7 and 8, not the padding."""
    ids = torch.tensor([[-1, -1, 6, 7, 8], [5, 5, 6, 7, 8]])
    out = FrequencyPenalty([1.0, 1.0], penalty_last_n=[2, 4])(ids, torch.zeros(2, 10))
    assert out[0].tolist() == [0, 0, 0, 0, 0, 0, 0, -1, -1, 0]
    assert out[1].tolist() == [0, 0, 0, 0, 0, -1, -1, -1, -1, 0]


def test_a_shared_setting_must_be_declared_alike_by_every_owner() -> None:
    """Two processors may share a setting only if both declare it shared, with the same field."""

    def penalty(name: str, shared: bool, bound: int) -> type:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            penalty_last_n: int = Field(-1, ge=bound)

        return type(name, (LogitsProcessor,), {"name": name, "Params": Params, "shared_settings": ("penalty_last_n",) if shared else ()})

    registry = Registry()
    registry.add(RepetitionPenalty, "processor", "decodekit")
    registry.add(penalty("alike", True, -1), "processor", "fake")
    assert [c.name for c in registry.sharers["penalty_last_n"]] == ["repetition_penalty", "alike"]
    for name, shared, bound in (("unshared", False, -1), ("other_bound", True, 0)):
        with pytest.raises(PluginError, match="setting 'penalty_last_n' .* is already used by processor 'repetition_penalty'"):
            registry.add(penalty(name, shared, bound), "processor", "fake")


# --- allowed tokens ------------------------------------------------------------------------------


def test_allowed_token_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"allowed_token_ids: token id 9 is outside the vocabulary \(size 5\)"):
        build_chain({"allowed_token_ids": [1, 9]}, context=BuildContext(vocab_size=5))
    with pytest.raises(ConfigError, match=r"token id 9 is outside the vocabulary \(size 5\)"):
        AllowedTokenIds([1, 9])(None, torch.zeros(1, 5))
    with pytest.raises(ConfigError, match=r"allowed_token_ids.0=-1 is not allowed: must be >= 0"):
        AllowedTokenIds([-1])
    x = torch.randn(2, 5)
    assert AllowedTokenIds([]).active is False and torch.equal(build_chain({"allowed_token_ids": []})(None, x), x)


def test_allowed_tokens_already_removed_leave_the_row_as_it_was() -> None:
    x = torch.tensor([[0.0, float("-inf"), 1.0]])
    with pytest.warns(UserWarning, match="allowed_token_ids: would remove every token left in row"):
        assert torch.equal(AllowedTokenIds([1])(None, x), x)


def test_prefix_function_sees_each_row_without_padding_and_its_answer_is_checked() -> None:
    seen = []
    fn = PrefixAllowedTokens(lambda batch_id, ids: seen.append(ids.tolist()) or [int(ids[-1])])
    out = fn(torch.tensor([[-1, 3, 1], [2, 0, 4]]), torch.zeros(2, 5))
    assert seen == [[3, 1], [2, 0, 4]]
    assert (out > float("-inf")).nonzero().tolist() == [[0, 1], [1, 4]]
    with pytest.raises(ConfigError, match=r"returned token id 7, outside the vocabulary \(size 5\)"):
        PrefixAllowedTokens(lambda batch_id, ids: [7])(torch.tensor([[0]]), torch.zeros(1, 5))
    with pytest.raises(ConfigError, match=r"prefix_allowed_tokens_fn=.* must be a Python function"):
        build_chain({"prefix_allowed_tokens_fn": [1, 2]})


# --- through the engine, per request ---------------------------------------------------------------


@pytest.fixture(scope="module")
def default():
    model, extras = load_model("default", device="cpu")
    return model, load_tokenizer("auto", extras)


def test_requests_with_the_new_settings_equal_their_solo_decoding(default) -> None:
    model, tokenizer = default
    settings = [
        {"temperature": 0.8, "dynatemp_range": 0.5},
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "penalty_last_n": 3},
        {"allowed_token_ids": list(range(97, 123))},  # lower-case letters only
        {"temperature": 0.7, "dynatemp_range": 0.3, "dynatemp_exponent": 2.0, "presence_penalty": 1.0, "penalty_last_n": 0},
        {},
    ]
    requests = [Request(prompt="Once upon a time", settings=s, max_new_tokens=12, seed=i) for i, s in enumerate(settings)]
    outputs = Engine(model, tokenizer, max_slots=3).generate(requests)
    context = BuildContext(eos_token_id=tokenizer.eos_token_id, encode=tokenizer.encode, vocab_size=model.vocab_size)
    for request, out in zip(requests, outputs):
        assert out.error is None, out.error
        chain = build_chain(dict(request.settings), context=context) if request.settings else None
        solo = generate_text(model, tokenizer, [request.prompt], processors=chain, sampler=Multinomial(), output=[],
                             max_new_tokens=request.max_new_tokens, seed=request.seed)[0]  # fmt: skip
        assert (out.tokens, out.text) == (solo.tokens, solo.text), request.settings
    assert set(outputs[2].text) <= set("abcdefghijklmnopqrstuvwxyz") and outputs[2].text


def test_a_prefix_function_per_request_is_refused_for_that_request(default) -> None:
    model, tokenizer = default
    outputs = Engine(model, tokenizer, max_slots=2).generate([
        Request(prompt="Once", settings={"prefix_allowed_tokens_fn": lambda b, ids: [97]}, id="fn"),
        Request(prompt="Once", settings={"top_p": 0.9}, max_new_tokens=3, id="fine"),
    ])  # fmt: skip
    by_id = {o.id: o for o in outputs}
    assert "prefix_allowed_tokens" in by_id["fn"].error and "per-row" in by_id["fn"].error
    assert by_id["fine"].error is None and len(by_id["fine"].tokens) == 3
