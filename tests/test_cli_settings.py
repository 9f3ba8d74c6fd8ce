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
from test_cli import assert_one_line_error, decode, model_args  # noqa: E402
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


# ------------------------------------------------------------------------------ each setting consistent


def test_each_setting_does_what_it_says_or_says_why_not(unigram, tmp_path: Path) -> None:
    args = [*model_args(unigram), "prompt=ab", "max_new_tokens=6", "seed=0"]
    one_word, as_list, sampler_only, greedy, both, order, number, swept = decode(
        [*args, "strategy=greedy", "bad_words=a", "output_file=one.jsonl"],
        [*args, "strategy=greedy", "bad_words=[a]"],
        [*args, "sampler=greedy", "output_file=sampler.jsonl"],
        [*args, "strategy=greedy"],
        [*args, "strategy=top_k", "sampler=greedy", "output_file=both.jsonl"],
        [*args, "processor_order=[top_k,top_p]"],
        [*args, "top_k=true"],
        ["-m", *args, "interactive=true", "temperature=0.5,0.7"],
        cwd=tmp_path,
    )  # fmt: skip
    # a single string for a list setting is a one-element list, for bad_words as for stop
    assert one_word.returncode == 0 and as_list.returncode == 0, one_word.stderr + as_list.stderr
    assert one_word.stdout == as_list.stdout == "abbbbbbb\n"  # 'a' (the likeliest) is banned
    assert json.loads((tmp_path / "one.jsonl").read_text())["settings"]["bad_words"] == ["a"]
    # sampler= alone: no preset under it, and the record says so
    assert sampler_only.returncode == 0 and sampler_only.stderr == "", sampler_only.stderr
    assert sampler_only.stdout == greedy.stdout == "abaaaaaa\n"
    settings = json.loads((tmp_path / "sampler.jsonl").read_text())["settings"]
    assert {k: settings[k] for k in ("strategy", "sampler")} == {"strategy": "custom", "sampler": "greedy"}
    assert "temperature" not in settings and "top_p" not in settings
    # a strategy and another sampler: what stays of the strategy is said, and recorded
    assert both.returncode == 0
    assert both.stderr.splitlines() == [
        "decode: warning: sampler=greedy replaces strategy top_k's sampler=multinomial; "
        "the strategy's chain stays: top_k=40 temperature=1.0"
    ]
    settings = json.loads((tmp_path / "both.jsonl").read_text())["settings"]
    assert {k: settings[k] for k in ("strategy", "sampler", "top_k", "temperature")} == {
        "strategy": "top_k", "sampler": "greedy", "top_k": 40, "temperature": 1.0}  # fmt: skip
    assert_one_line_error(order, "processor_order: 'top_k' is not in the chain", "set top_k=... to add it")
    assert_one_line_error(number, "top_k=true is not allowed: true and false are not numbers")
    assert_one_line_error(swept, "interactive=true: a prompt loop cannot be swept")
