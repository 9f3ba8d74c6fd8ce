"""Regenerate tests/fixtures/group_beam/: transformers 4.x diverse (group) beam search outputs.

transformers 4.56 was the last release with group beam search (``num_beam_groups`` /
``diversity_penalty`` in ``generate``) in its own code: 4.57 loads it from the Hub, 5.x dropped it.
This script builds a tiny random GPT-2 in memory from a fixed seed (nothing is downloaded), saves
it next to the fixture (``config.json``, ``model.safetensors``: decodekit loads that folder with
its native GPT, without transformers), runs transformers' group beam search on a batch of prompts
for a grid of settings and writes the returned sequences and scores to ``cases.json``.

The grid covers several group shapes, diversity penalties, length penalties, every
``early_stopping`` value, ``num_return_sequences``, two EOS ids, and an EOS the model emits
often, so that groups finish before the last step (each case records how many (prompt, group)
pairs did, read from transformers' beam scorer) and a later group's diversity penalty is taken
after an earlier group is done.

Run it from the repository root, in an environment with ``transformers==4.56.2`` (torch and
safetensors too; decodekit is not needed)::

    python3 -m venv /tmp/venv-tf4 && /tmp/venv-tf4/bin/pip install torch transformers==4.56.2 safetensors
    /tmp/venv-tf4/bin/python tools/make_group_beam_fixture.py
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers.generation import beam_search

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "group_beam"
SEED = 0
CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=48, n_positions=32, initializer_range=0.5)
PAD = 1  # never in a prompt: transformers would take it for padding
PROMPTS = [[26, 42, 17, 47, 11], [31, 40, 42, 36, 18], [22, 13, 22, 32, 26]]
FREQUENT = 22  # the token this model puts most probability on, averaged over contexts
RARE = 5  # a token it seldom emits
MAX_NEW = 8

# (num_beams, num_beam_groups, diversity_penalty, num_return_sequences)
SHAPES = [(4, 2, 1.0, 4), (6, 3, 0.5, 3), (6, 2, 2.0, 2), (4, 4, 1.5, 4), (8, 4, 0.25, 2)]
LENGTH_PENALTIES = [0.5, 1.0, 2.0]
EARLY_STOPPING = [True, False, "never"]
EOS = [[FREQUENT], [FREQUENT, RARE]]


def build_model() -> transformers.GPT2LMHeadModel:
    """The seeded random GPT-2 (large initial weights, so its distributions are peaked)."""
    torch.manual_seed(SEED)
    config = transformers.GPT2Config(**CONFIG, bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(config).eval()


class DoneRecorder:
    """Reads transformers' beam scorer while it runs: how many (prompt, group) pairs were done
    before the last step (its ``_done`` flags stay set once set)."""

    def __init__(self) -> None:
        self.done_early = 0
        self._original = beam_search.BeamSearchScorer.process

    def __enter__(self) -> DoneRecorder:
        original = self._original

        def process(scorer, input_ids, *args, **kwargs):
            out = original(scorer, input_ids, *args, **kwargs)
            if input_ids.shape[-1] + 1 < scorer._beam_hyps[0].max_length:  # not the last step
                self.done_early = int(scorer._done.sum())
            return out

        beam_search.BeamSearchScorer.process = process
        return self

    def __exit__(self, *exc: object) -> None:
        beam_search.BeamSearchScorer.process = self._original


def run_case(model: transformers.GPT2LMHeadModel, settings: dict, eos: list[int]) -> dict:
    prompts = torch.tensor(PROMPTS)
    with DoneRecorder() as recorder, torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=MAX_NEW,
            eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True, **settings,
        )  # fmt: skip
    return {
        "settings": settings,
        "eos_token_id": eos,
        "groups_done_early": recorder.done_early,
        "tokens": out.sequences[:, prompts.shape[1] :].tolist(),
        "scores": out.sequences_scores.tolist(),
    }


def to_json(fixture: dict) -> str:
    """The fixture as JSON, one case per line (readable diffs when it is regenerated)."""
    head = "".join(f" {json.dumps(key)}: {json.dumps(value)},\n" for key, value in fixture.items() if key != "cases")
    cases = ",\n".join("  " + json.dumps(case) for case in fixture["cases"])
    return f'{{\n{head} "cases": [\n{cases}\n ]\n}}\n'


def main() -> None:
    if not transformers.__version__.startswith("4.56."):
        sys.exit(f"transformers=={transformers.__version__}: this needs 4.56.x, the last with group beam search in core")
    transformers.logging.set_verbosity_error()
    model = build_model()
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "generation_config.json").unlink(missing_ok=True)
    cases = []
    for (nb, groups, penalty, r), lp, es, eos in itertools.product(SHAPES, LENGTH_PENALTIES, EARLY_STOPPING, EOS):
        settings = dict(num_beams=nb, num_beam_groups=groups, diversity_penalty=penalty, length_penalty=lp,
                        early_stopping=es, num_return_sequences=r)  # fmt: skip
        cases.append(run_case(model, settings, eos))
    fixture = {
        "about": "transformers group beam search outputs; regenerate with tools/make_group_beam_fixture.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": {"seed": SEED, **CONFIG},
        "prompts": PROMPTS,
        "pad_token_id": PAD,
        "max_new_tokens": MAX_NEW,
        "cases": cases,
    }
    (OUT / "cases.json").write_text(to_json(fixture))
    early = sum(c["groups_done_early"] > 0 for c in cases)
    print(f"{len(cases)} cases ({early} with a group done before the last step) -> {OUT}")


if __name__ == "__main__":
    main()
