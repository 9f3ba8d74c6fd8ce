"""The `decode` command's output: an existing output_file is never lost, records are written one
at a time (an interrupt keeps every complete line and no partial one), and a closed stdout
(``decode --help | head -2``) ends the command quietly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import COMMAND, assert_one_line_error, decode, env, model_args, start  # noqa: E402
from test_configs import write_unigram  # noqa: E402


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["list=true"]])
def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `head` does once it has its lines; here before anything is written
    with proc.stderr:
        err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert err == "", err
    assert proc.returncode == 1


# ------------------------------------------------------------------------------ output_file


@pytest.fixture(scope="module")
def unigram(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("unigram")
    return folder, write_unigram(folder)


OLD = '{"old": "a record of an earlier run"}\n'


def records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), "a partial line at the end"
    return [json.loads(line) for line in text.splitlines()]


def test_an_existing_output_file_is_refused_or_kept_whatever_stops_the_run(unigram, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    names = ["refused", "missing", "missing_overwrite", "empty_overwrite", "overwrite", "append", "both", "was_empty"]
    for name in names:
        (tmp_path / f"{name}.jsonl").write_text("" if name == "was_empty" else OLD)
    args = [*model_args(unigram), "max_new_tokens=3", "seed=0"]
    runs = dict(zip(names, decode(
        [*args, "prompt=ab", "output_file=refused.jsonl"],
        [*args, "prompt_file=missing.txt", "output_file=missing.jsonl"],
        [*args, "prompt_file=missing.txt", "output_file=missing_overwrite.jsonl", "overwrite=true"],
        [*args, "prompt_file=empty.txt", "output_file=empty_overwrite.jsonl", "overwrite=true"],
        [*args, "prompt=ab", "output_file=overwrite.jsonl", "overwrite=true"],
        [*args, "prompt=ab", "output_file=append.jsonl", "append=true"],
        [*args, "prompt=ab", "output_file=both.jsonl", "append=true", "overwrite=true"],
        [*args, "prompt=ab", "output_file=was_empty.jsonl"],
        cwd=tmp_path,
    )))  # fmt: skip
    assert_one_line_error(runs["refused"], f"output_file='refused.jsonl': the file exists ({len(OLD)} bytes)",
                          "set overwrite=true to replace it or append=true to add to it")  # fmt: skip
    assert_one_line_error(runs["both"], "overwrite=true and append=true")
    for name in ("missing", "missing_overwrite"):
        assert runs[name].returncode == 2 and "Traceback" not in runs[name].stderr, runs[name].stderr
    assert_one_line_error(runs["empty_overwrite"], "prompt_file='empty.txt': holds no prompts")
    for name in ("refused", "missing", "missing_overwrite", "empty_overwrite", "both"):
        assert (tmp_path / f"{name}.jsonl").read_text() == OLD, name  # opened only for a first record
    for name in ("overwrite", "append", "was_empty"):
        assert runs[name].returncode == 0, runs[name].stderr
    assert [r["prompt"] for r in records(tmp_path / "overwrite.jsonl")] == ["ab"]
    assert [r.get("prompt", r.get("old")) for r in records(tmp_path / "append.jsonl")] == ["a record of an earlier run", "ab"]
    assert [r["prompt"] for r in records(tmp_path / "was_empty.jsonl")] == ["ab"]  # nothing to lose


def test_ctrl_c_in_the_first_batch_leaves_the_file_as_it_was(unigram, tmp_path: Path) -> None:
    (tmp_path / "keep.jsonl").write_text(OLD)
    proc = start([*model_args(unigram), "prompt=ab", "max_new_tokens=5000", "output_file=keep.jsonl", "overwrite=true"], tmp_path)
    try:
        assert proc.stdout.read(3)[:2] == "ab" and proc.poll() is None  # the first batch is under way
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.splitlines()[-1] == "decode: error: interrupted", err
    assert (tmp_path / "keep.jsonl").read_text() == OLD


def test_an_interrupt_keeps_every_complete_record_and_no_partial_line(unigram, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("ab\n" * 2000)
    proc = start([*model_args(unigram), "prompt_file=prompts.txt", "batch_size=1", "max_new_tokens=1", "seed=0",
                  "output_file=out.jsonl", "quiet=true"], tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").stat().st_size < 20_000:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)  # while records are being written, one per batch
        proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    written = records(tmp_path / "out.jsonl")
    assert 20_000 // 1000 < len(written) < 2000
    assert [r["prompt_index"] for r in written] == list(range(len(written)))


def test_a_sweep_writes_every_job_to_one_file_and_checks_every_jobs_file_first(unigram, tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_text(OLD)
    (tmp_path / "taken.jsonl").write_text(OLD)
    args = [*model_args(unigram), "prompt=ab", "max_new_tokens=3", "seed=0"]
    swept, refused = decode(
        ["-m", *args, "temperature=0.5,0.9", "output_file=old.jsonl", "overwrite=true"],
        ["-m", *args, "output_file=fresh.jsonl,taken.jsonl"],
        cwd=tmp_path,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    assert [r["settings"]["temperature"] for r in records(tmp_path / "old.jsonl")] == [0.5, 0.9]
    assert_one_line_error(refused, "output_file='taken.jsonl': the file exists")
    assert not (tmp_path / "fresh.jsonl").exists()  # refused before the first job ran
