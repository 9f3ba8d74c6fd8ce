"""Mirostat v2: the conformance suite, its truncation and feedback rule, per-row state and reset."""

from __future__ import annotations

import math

import pytest
import torch

import decodekit
from decodekit.errors import ConfigError
from decodekit.random import RowRandom
from decodekit_mirostat import Mirostat


def test_mirostat_passes_the_conformance_suite(decodekit_check_sampler) -> None:
    decodekit_check_sampler(Mirostat)


def geometric(vocab: int, rate: float, batch: int = 1) -> torch.Tensor:
    return (-rate * torch.arange(vocab, dtype=torch.float32)).expand(batch, vocab).contiguous()


def test_mu_starts_at_twice_tau_for_every_row() -> None:
    sampler = Mirostat(tau=3.0)
    sampler.begin(torch.zeros(5, 2, dtype=torch.long))
    assert sampler.mu.tolist() == [6.0] * 5


def test_only_tokens_with_surprise_at_most_mu_are_drawn_and_mu_follows_the_feedback_rule() -> None:
    logits = geometric(16, 0.5, batch=512)  # p_i ~ exp(-0.5 i)
    logp = logits.log_softmax(-1)[0]
    surprise = -logp / math.log(2)
    tau, eta = 2.0, 0.25
    sampler = Mirostat(tau=tau, eta=eta)
    sampler.begin(torch.zeros(512, 1, dtype=torch.long))
    tokens = sampler(torch.zeros(512, 1, dtype=torch.long), logits, RowRandom(torch.arange(512)))
    allowed = (surprise <= 2 * tau).nonzero().flatten()  # mu = 4 bits at the first step
    assert set(tokens.tolist()) == set(allowed.tolist())  # 512 draws reach every allowed token, and only those
    renormalised = logp[allowed].log_softmax(-1)
    observed = -renormalised[tokens] / math.log(2)  # tokens index `allowed` directly: allowed = 0..k-1
    torch.testing.assert_close(sampler.mu, 2 * tau - eta * (observed - tau))


def test_when_every_token_is_too_surprising_the_most_likely_are_kept() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # surprise of the best: 1.9 bits > mu
    drawn = set()
    for seed in range(64):
        sampler = Mirostat(tau=0.5)  # mu = 1 bit
        sampler.begin(torch.zeros(1, 1, dtype=torch.long))
        drawn.add(int(sampler(torch.zeros(1, 1, dtype=torch.long), logits, RowRandom(torch.tensor([seed])))))
    assert drawn == {0, 1}


def test_feedback_drives_the_realised_surprise_to_tau() -> None:
    logits = geometric(256, 0.1, batch=16)
    logp = logits.log_softmax(-1)
    for tau in (2.0, 4.0):
        sampler = Mirostat(tau=tau, eta=0.1)
        ids = torch.zeros(16, 1, dtype=torch.long)
        sampler.begin(ids)
        rng = RowRandom(torch.arange(16))
        realised = []
        for _ in range(300):
            mu = sampler.mu.clone()
            token = sampler(ids, logits, rng)
            kept = logp.masked_fill(-logp / math.log(2) > mu[:, None], float("-inf")).log_softmax(-1)
            realised.append(-kept.gather(-1, token[:, None]) / math.log(2))
        mean = torch.cat(realised[100:]).mean().item()  # after the warm-up
        assert abs(mean - tau) < 0.25, (tau, mean)


def test_reorder_moves_the_state_with_the_rows() -> None:
    sampler = Mirostat()
    sampler.begin(torch.zeros(3, 1, dtype=torch.long))
    sampler._mu = torch.tensor([1.0, 2.0, 3.0])
    sampler.reorder(torch.tensor([2, 2, 0]))
    assert sampler.mu.tolist() == [3.0, 3.0, 1.0]


# --- in the decoding loop -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from decodekit.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=1, n_head=2, n_embd=32)).eval()


def test_state_is_reset_for_every_call_of_generate(model) -> None:
    sampler = decodekit.build_sampler("mirostat", {"tau": 3.0, "eta": 0.5})
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    first = decodekit.generate(model, prompt, sampler=sampler, max_new_tokens=20, seed=7)
    assert sampler.mu.tolist() != [6.0, 6.0]  # mu moved during the run
    second = decodekit.generate(model, prompt, sampler=sampler, max_new_tokens=20, seed=7)
    assert torch.equal(first.tokens, second.tokens)


def test_a_rows_tokens_do_not_depend_on_the_rest_of_the_batch(model) -> None:
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    batch = decodekit.generate(model, prompt, sampler=Mirostat(3.0, 0.5), max_new_tokens=16, seed=[11, 12, 13])
    for row, seed in enumerate([11, 12, 13]):
        alone = decodekit.generate(model, prompt[row : row + 1], sampler=Mirostat(3.0, 0.5), max_new_tokens=16, seed=seed)
        assert torch.equal(alone.tokens[0], batch.tokens[row])


# --- registry and settings ------------------------------------------------------------------


def test_mirostat_and_its_strategy_are_registered_by_the_entry_point() -> None:
    registry = decodekit.get_registry(refresh=True)
    assert registry.sampler("mirostat").cls is Mirostat and registry.sampler("mirostat").plugin == "decodekit-mirostat"
    assert registry.strategies["mirostat"] == {"sampler": "mirostat", "tau": 5.0, "eta": 0.1}
    assert registry.strategy_plugins["mirostat"] == "decodekit-mirostat"


def test_the_strategys_settings_build_the_sampler() -> None:
    settings = dict(decodekit.get_registry().strategies["mirostat"])
    sampler = decodekit.build_sampler(settings.pop("sampler"), settings)
    assert isinstance(sampler, Mirostat) and (sampler.tau, sampler.eta) == (5.0, 0.1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tau": 0.0}, r"tau=0.0 is not allowed: must be > 0"),
        ({"eta": 1.5}, r"eta=1.5 is not allowed: must be <= 1"),
        ({"tau": float("nan")}, r"tau=nan is not allowed"),
    ],
)
def test_bad_settings_are_rejected_by_mirostats_own_model(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        decodekit.build_sampler("mirostat", settings)


def test_mirostat_settings_with_another_sampler_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"tau: setting\(s\) of sampler 'mirostat', but sampler='multinomial'"):
        decodekit.build_sampler("multinomial", {"tau": 5.0})


def test_per_row_tau_and_eta_give_each_row_its_tokens_alone() -> None:
    logits = torch.linspace(0.0, -6.0, 32).expand(3, 32)
    prompts = torch.zeros(3, 1, dtype=torch.long)
    batched = Mirostat(tau=[1.0, 3.0, 6.0], eta=[0.5, 0.1, 0.0])
    batched.begin(prompts)
    rng = RowRandom(torch.tensor([1, 2, 3]))
    together = torch.stack([batched(prompts, logits, rng) for _ in range(8)], dim=-1)
    for row, (tau, eta) in enumerate([(1.0, 0.5), (3.0, 0.1), (6.0, 0.0)]):
        alone = Mirostat(tau=tau, eta=eta)
        alone.begin(prompts[:1])
        rng_alone = RowRandom(torch.tensor([row + 1]))
        tokens = torch.stack([alone(prompts[:1], logits[:1], rng_alone) for _ in range(8)], dim=-1)
        assert torch.equal(together[row], tokens[0])
    assert batched.mu[2] == 12.0  # eta 0: mu stays at 2 * tau


def test_assign_takes_a_newcomers_tau_eta_and_mu() -> None:
    live = Mirostat(tau=[2.0, 4.0])
    live.begin(torch.zeros(2, 1, dtype=torch.long))
    newcomer = Mirostat(tau=[7.0], eta=[0.3])
    newcomer.begin(torch.zeros(1, 1, dtype=torch.long))
    live.assign(torch.tensor([0]), newcomer)
    assert live.tau.tolist() == [7.0, 4.0] and live.eta.tolist() == [0.3, 0.1] and live.mu.tolist() == [14.0, 8.0]
    with pytest.raises(ConfigError, match=r"^row 1: tau=0.0 is not allowed"):
        Mirostat(tau=[1.0, 0.0])


def test_the_engine_runs_mirostat_for_every_request_as_alone() -> None:
    from decodekit.engine import Engine, Request
    from decodekit.models import load_model
    from decodekit.text import generate_text
    from decodekit.tokenization import load_tokenizer

    model, extras = load_model("default", device="cpu")
    tokenizer = load_tokenizer("auto", extras)
    requests = [Request(prompt=p, max_new_tokens=n, seed=i) for i, (p, n) in enumerate([("Once upon", 12), ("Hi", 5), ("The cat", 9)])]
    # newcomers take a slot mid-run: their mu starts at 2 * tau while the other slot's goes on
    outputs = Engine(model, tokenizer, max_slots=2, sampler=Mirostat(tau=3.0, eta=0.2)).generate(requests)
    for request, out in zip(requests, outputs):
        solo = generate_text(model, tokenizer, [request.prompt], sampler=Mirostat(tau=3.0, eta=0.2), output=[],
                             max_new_tokens=request.max_new_tokens, seed=request.seed)[0]  # fmt: skip
        assert out.error is None and out.tokens == solo.tokens
