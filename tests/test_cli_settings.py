"""The `decode` command's settings, each consistent and saying what happened: the seed range,
single strings for list settings, processor_order, sampler without a strategy, interactive with a
sweep, and booleans given for numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import assert_one_line_error, decode, model_args, one  # noqa: E402
from test_configs import write_unigram  # noqa: E402


@pytest.fixture(scope="module")
def unigram(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("unigram")
    return folder, write_unigram(folder)

LAST = 2**32 - 1  # the largest seed


# ------------------------------------------------------------------------------ the seed range


def test_a_seed_outside_the_range_is_one_line(unigram, tmp_path: Path) -> None:
    big, negative = decode([*model_args(unigram), "seed=99999999999999999999"], [*model_args(unigram), "seed=-1"], cwd=tmp_path)
    assert_one_line_error(big, "seed=99999999999999999999 is not allowed", "must be < 4294967296")
    assert_one_line_error(negative, "seed=-1 is not allowed", "must be >= 0")


def test_seeds_derived_for_samples_and_batches_wrap_and_each_makes_its_sample_again(unigram, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("ab\nba\n")
    common = [*model_args(unigram), "max_new_tokens=8", "temperature=3"]
    texts, tokens, first, again = decode(
        [*common, "prompt_file=prompts.txt", "batch_size=1", "num_samples=2", f"seed={LAST - 2}", "output_file=out.jsonl"],
        [*common, "prompt_tokens=[97,98]", "num_samples=2", f"seed={LAST}", "output_file=tokens.jsonl"],
        [*common, "prompt=ba", "seed=0", "output_file=first.jsonl"],
        [*common, "prompt=ba", f"seed={LAST}", "output_file=again.jsonl"],
        cwd=tmp_path,
    )  # fmt: skip
    for run in (texts, tokens, first, again):
        assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [LAST - 2, LAST - 1, LAST, 0]
    assert "--- prompt 2/2, sample 2/2 (seed 0) ---" in texts.stdout
    assert [json.loads(line)["seed"] for line in (tmp_path / "tokens.jsonl").read_text().splitlines()] == [LAST, 0]
    assert "--- sample 2/2 (seed 0) ---" in tokens.stdout
    # the samples labelled seed 0 and seed 2**32-1 are the ones `seed=0` and `seed=4294967295` make
    for path, record in (("first.jsonl", records[3]), ("again.jsonl", records[2])):
        (alone,) = [json.loads(line) for line in (tmp_path / path).read_text().splitlines()]
        assert alone["seed"] == record["seed"] and alone["token_ids"] == record["token_ids"], (path, record["seed"])
    assert records[2]["token_ids"] != records[3]["token_ids"]  # the seeds matter here
