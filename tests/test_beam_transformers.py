"""Beam search against transformers on small random GPT-2s: same sequences, same scores.

Plain beam search runs against the installed transformers (5.x); diverse (group) beam search,
which transformers 5 no longer has, against transformers 4.56's outputs kept in
tests/fixtures/group_beam/ (tools/make_group_beam_fixture.py regenerates them), so that part needs
no transformers at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decodekit import generate
from decodekit.models import load_model
from decodekit.models.hf import HFCausalLM
from decodekit.samplers import BeamSearch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "group_beam"
PROMPTS = torch.tensor([[5, 17, 42, 8], [11, 2, 3, 4], [9, 9, 30, 31]])
PAD = 1  # not in PROMPTS: transformers would take it for padding
MAX_NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """transformers' GPT-2 (random, seeded, peaked weights), our native GPT with the same weights,
    and an EOS id that greedy decoding emits a few tokens in, so hypotheses end at EOS."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = Path(tmp_path_factory.mktemp("gpt2"))
    hf.save_pretrained(path)
    ours, _ = load_model(path, device="cpu")
    greedy = hf.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False, max_new_tokens=4, pad_token_id=PAD)
    eos = int(greedy[1, PROMPTS.shape[1] + 2])
    assert eos not in PROMPTS.tolist()[1] and eos != PAD
    return hf, ours, eos


def theirs(hf, eos: int, prompts: torch.Tensor, mask: torch.Tensor, **kwargs):
    out = hf.generate(
        prompts, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD,
        return_dict_in_generate=True, output_scores=True, **kwargs,
    )  # fmt: skip
    return out.sequences[:, prompts.shape[1] :], out.sequences_scores


def check_same(ours_out, their_tokens: torch.Tensor, their_scores: torch.Tensor) -> None:
    assert torch.equal(ours_out.tokens, their_tokens), f"\nours:\n{ours_out.tokens}\ntheirs:\n{their_tokens}"
    assert torch.allclose(ours_out.sequence_scores, their_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_same_sequences_and_scores_as_transformers(models, num_beams: int, length_penalty: float, early_stopping: bool) -> None:
    hf, ours, eos = models
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=num_beams)  # fmt: skip
    their_tokens, their_scores = theirs(hf, eos, PROMPTS, torch.ones_like(PROMPTS), **settings)
    out = generate(ours, PROMPTS, sampler=BeamSearch(**settings), max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    check_same(out, their_tokens, their_scores)


def test_early_stopping_never_matches_too(models) -> None:
    hf, ours, eos = models
    settings = dict(num_beams=3, length_penalty=2.0, early_stopping="never", num_return_sequences=2)
    their_tokens, their_scores = theirs(hf, eos, PROMPTS, torch.ones_like(PROMPTS), **settings)
    out = generate(ours, PROMPTS, sampler=BeamSearch(**settings), max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    check_same(out, their_tokens, their_scores)


def test_the_chosen_eos_ends_some_hypotheses(models) -> None:
    _, ours, eos = models
    out = generate(ours, PROMPTS, sampler=BeamSearch(2, num_return_sequences=2), max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert "eos" in out.finish_reasons and "length" in out.finish_reasons


def test_left_padded_batch_through_the_hf_adapter_matches(models) -> None:
    hf, _, eos = models
    prompts = torch.tensor([[PAD, PAD, 17, 42], [11, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    settings = dict(num_beams=3, length_penalty=1.0, early_stopping=False, num_return_sequences=3)
    their_tokens, their_scores = theirs(hf, eos, prompts, mask, **settings)
    out = generate(HFCausalLM(hf), prompts, attention_mask=mask, sampler=BeamSearch(**settings), max_new_tokens=MAX_NEW,
                   eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
    check_same(out, their_tokens, their_scores)


# ------------------------------------------------------------------------------------ diverse beams (4.x fixture)

GROUP_BEAM = json.loads((FIXTURE / "cases.json").read_text())


def case_id(case: dict) -> str:
    s = case["settings"]
    return (f"beams{s['num_beams']}-groups{s['num_beam_groups']}-div{s['diversity_penalty']}-lp{s['length_penalty']}"
            f"-es{s['early_stopping']}-eos{'+'.join(map(str, case['eos_token_id']))}")  # fmt: skip


@pytest.fixture(scope="module")
def fixture_model():
    """The fixture's GPT-2, loaded by the native GPT (no transformers needed)."""
    model, extras = load_model(FIXTURE, device="cpu")
    assert extras.format == "hf-gpt2"
    return model


@pytest.mark.parametrize("case", GROUP_BEAM["cases"], ids=case_id)
def test_group_beam_search_matches_transformers_4(fixture_model, case: dict) -> None:
    prompts = torch.tensor(GROUP_BEAM["prompts"])
    out = generate(fixture_model, prompts, sampler=BeamSearch(**case["settings"]), max_new_tokens=GROUP_BEAM["max_new_tokens"],
                   eos_token_id=case["eos_token_id"], pad_token_id=GROUP_BEAM["pad_token_id"])  # fmt: skip
    their_tokens = torch.tensor(case["tokens"])
    n = out.tokens.shape[1]  # transformers pads every row to the longest plus one (the EOS it appends)
    assert (their_tokens[:, n:] == GROUP_BEAM["pad_token_id"]).all()
    # transformers 4 writes the first EOS id where any EOS id ended a hypothesis; we keep the one chosen
    ended = torch.tensor([reason == "eos" for reason in out.finish_reasons])
    assert torch.isin(out.tokens[ended, out.lengths[ended] - 1], torch.tensor(case["eos_token_id"])).all()
    out.tokens[ended, out.lengths[ended] - 1] = case["eos_token_id"][0]
    check_same(out, their_tokens[:, :n], torch.tensor(case["scores"]))


def test_group_beam_fixture_covers_groups_that_finish_early() -> None:
    cases = GROUP_BEAM["cases"]
    assert sum(case["groups_done_early"] > 0 for case in cases) >= len(cases) // 2
    assert {case["settings"]["early_stopping"] for case in cases} == {True, False, "never"}
    assert any(len(case["eos_token_id"]) > 1 for case in cases)


def test_group_beam_search_takes_a_pad_id_outside_the_vocabulary(fixture_model) -> None:
    """transformers 4 counts a done group's beams as pad tokens; a pad the model cannot emit counts nowhere."""
    case = next(c for c in GROUP_BEAM["cases"] if c["groups_done_early"] >= 3 and c["settings"]["early_stopping"] is True)
    pad = fixture_model.vocab_size + 3
    out = generate(fixture_model, torch.tensor(GROUP_BEAM["prompts"]), sampler=BeamSearch(**case["settings"]),
                   max_new_tokens=GROUP_BEAM["max_new_tokens"], eos_token_id=case["eos_token_id"], pad_token_id=pad)  # fmt: skip
    short = out.lengths < out.tokens.shape[1]
    assert short.any() and (out.tokens[short, -1] == pad).all()
    assert torch.isfinite(out.sequence_scores).all()
