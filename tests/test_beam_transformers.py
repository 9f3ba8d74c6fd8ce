"""Beam search against transformers' on the same small random GPT-2: same sequences, same scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from decodekit import generate  # noqa: E402
from decodekit.models import load_model  # noqa: E402
from decodekit.models.hf import HFCausalLM  # noqa: E402
from decodekit.samplers import BeamSearch  # noqa: E402

PROMPTS = torch.tensor([[5, 17, 42, 8], [11, 2, 3, 4], [9, 9, 30, 31]])
PAD = 1  # not in PROMPTS: transformers would take it for padding
MAX_NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """transformers' GPT-2 (random, seeded, peaked weights), our native GPT with the same weights,
    and an EOS id that greedy decoding emits a few tokens in, so hypotheses end at EOS."""
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
