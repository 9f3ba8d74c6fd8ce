"""The end-of-run summary on stderr and prompts from standard input (`prompt_file=-`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from test_cli import COMMAND, decode, env  # noqa: E402

SUMMARY = re.compile(
    r"decode: (\d+) samples?, (\d+) prompt tokens, (\d+) new tokens in ([\d.]+) s \(([\d.]+) tok/s\), "
    r"first token after ([\d.]+) s, on cpu with (\d+) threads?"
)


def summary_of(stderr: str) -> tuple[int, int, int, float, float, float]:
    lines = [line for line in stderr.splitlines() if line.startswith("decode: ") and "prompt tokens" in line]
    assert len(lines) == 1, stderr
    match = SUMMARY.fullmatch(lines[0])
    assert match, lines[0]
    a, b, c, d, e, f, _ = match.groups()
    return int(a), int(b), int(c), float(d), float(e), float(f)


def threads_of(stderr: str) -> list[int]:
    """The thread count each summary line on ``stderr`` names."""
    return [int(m.group(7)) for m in map(SUMMARY.fullmatch, stderr.splitlines()) if m]


def test_the_summary_counts_what_the_output_file_holds(tmp_path: Path) -> None:
    common = ["max_new_tokens=12", "seed=4", "device=cpu", "num_samples=2", "output_file=o.jsonl"]
    engine, tokens, quiet = decode(
        ["prompt=Once upon", "summary=true", *common],
        ["prompt_tokens=[79,110,99,101]", "summary=true", *common, "output_file=t.jsonl"],
        ["prompt=Once upon", *common, "output_file=q.jsonl"],  # stderr is not a terminal: off by default
        cwd=tmp_path,
    )
    for run in (engine, tokens, quiet):
        assert run.returncode == 0, run.stderr
    assert "prompt tokens" not in quiet.stderr
    for run, name, prompt_length in ((engine, "o.jsonl", len("Once upon")), (tokens, "t.jsonl", 4)):
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        samples, prompt_tokens, new, seconds, rate, first = summary_of(run.stderr)
        assert samples == len(records) == 2
        assert new == sum(r["num_tokens"] for r in records) > 0
        assert prompt_tokens >= 2 * prompt_length  # a tokenizer may add a start token
        assert 0 < first <= seconds and abs(rate - new / seconds) <= 0.05 * rate + 0.1


def test_prompt_file_dash_reads_the_prompts_from_stdin(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("Once upon\n\nThe cat\n")
    args = ["prompt_file=-", "max_new_tokens=8", "seed=2", "device=cpu", "quiet=true"]
    piped = subprocess.run([*COMMAND, *args, "output_file=a.jsonl"], cwd=tmp_path, env=env(), text=True,
                           input="Once upon\n\nThe cat\n", capture_output=True, timeout=300)  # fmt: skip
    (from_file,) = decode(["prompt_file=p.txt", *args[1:], "output_file=b.jsonl"], cwd=tmp_path)
    assert piped.returncode == 0 and from_file.returncode == 0, piped.stderr + from_file.stderr
    a, b = ([json.loads(line) for line in (tmp_path / n).read_text().splitlines()] for n in ("a.jsonl", "b.jsonl"))
    assert [r["prompt"] for r in a] == ["Once upon", "The cat"] and a == b
    empty = subprocess.run([*COMMAND, *args], cwd=tmp_path, env=env(), text=True, input="\n",
                           capture_output=True, timeout=300)  # fmt: skip
    assert empty.returncode == 2 and empty.stderr.strip() == "decode: error: prompt_file='-': holds no prompts"


def test_threads_sets_the_threads_decoding_uses_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    common = ["prompt=Once upon", "max_new_tokens=6", "seed=1", "device=cpu", "summary=true", "quiet=true"]
    (own,) = decode(common, cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    (default,) = threads_of(own.stderr)  # torch's own count (the machine's cores)
    more = default + 1
    one, swept, zero, word = decode(
        [*common, "threads=1", "output_file=one.jsonl"],
        ["-m", *common, f"threads={more},null", "output_file=swept.jsonl"],  # the second job: back to torch's own
        [*common, "threads=0"],
        [*common, "threads=many"],
        cwd=tmp_path,
    )  # fmt: skip
    assert one.returncode == 0 and swept.returncode == 0, one.stderr + swept.stderr
    assert threads_of(one.stderr) == [1]
    assert threads_of(swept.stderr) == [more, default]
    # the same samples whatever the threads (each output summed in one fixed order); a sweep's jobs share its output_file
    records = [json.loads(line) for name in ("one.jsonl", "swept.jsonl") for line in (tmp_path / name).read_text().splitlines()]
    assert len(records) == 3 and records[0]["token_ids"] == records[1]["token_ids"] == records[2]["token_ids"]
    for run, message in ((zero, "threads=0 is not allowed: must be >= 1"),
                         (word, "threads='many' is not allowed: input should be a valid integer")):  # fmt: skip
        assert run.returncode == 2 and run.stdout == "", run.stderr
        assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(f"decode: error: {message}"), run.stderr
