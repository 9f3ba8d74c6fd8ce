"""`decode` on the request engine: many prompts and samples decode on slots, with the batch path's output.

The reference is the same command on the batch path (``decodekit.cli.run.engine_for`` forced to
``None``), in a subprocess like every `decode` test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = (
    "import sys, decodekit.cli.run as r\n"
    "if sys.argv[1] == 'batch':\n"
    "    r.engine_for = lambda *a: None\n"
    "else:\n"
    "    import decodekit.engine.engine as e\n"
    "    step = e.Engine.step\n"
    "    e.Engine.step = lambda self: print('ENGINE-STEP', file=sys.stderr) or step(self) if not self.steps else step(self)\n"
    "from decodekit.cli.main import main\n"
    "sys.argv = ['decode', *sys.argv[2:]]\n"
    "main()\n"
)


def decode(path: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-c", RUN, path, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


@pytest.mark.parametrize("args", [
    ["prompt=Once upon a time", "num_samples=3", "max_new_tokens=30", "seed=5"],
    ["prompt_file=prompts.txt", "num_samples=2", "batch_size=2", "max_new_tokens=25", "seed=1", "stop=[.]"],
    ["prompt_file=prompts.txt", "strategy=greedy", "max_new_tokens=20", "seed=3", "batch_size=1"],
    ["prompt_file=prompts.txt", "temperature=0.7", "top_k=20", "repetition_penalty=1.2", "max_new_tokens=15", "seed=9"],
], ids=["samples", "prompt-file-stop", "greedy", "chain"])  # fmt: skip
def test_decode_runs_on_the_engine_with_the_batch_paths_output(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "prompts.txt").write_text("Once upon a time\nThe meaning of life\nWhy\n")
    on_engine = decode("engine", [*args, "output_file=engine.jsonl"], tmp_path)
    on_batches = decode("batch", [*args, "output_file=batch.jsonl"], tmp_path)
    assert on_engine.returncode == 0 and on_batches.returncode == 0, on_engine.stderr + on_batches.stderr
    assert "ENGINE-STEP" in on_engine.stderr  # it did run on the engine
    assert on_engine.stdout == on_batches.stdout
    records = [json.loads(line) for line in (tmp_path / "engine.jsonl").read_text().splitlines()]
    assert records == [json.loads(line) for line in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == sorted((r["prompt_index"], r["sample_index"]) for r in records)
