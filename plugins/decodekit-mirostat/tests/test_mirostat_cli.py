"""Mirostat from the command line, with no change to decodekit: ``decode sampler=mirostat tau=...``
and ``decode strategy=mirostat`` make the tokens the library makes with the same settings and seed
(the command's default strategy included, as its output file records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("decodekit.cli.main")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

import decodekit  # noqa: E402
from decodekit.models import load_model  # noqa: E402
from decodekit.models.gpt import GPT, GPTConfig  # noqa: E402
from decodekit.text import generate_text  # noqa: E402
from decodekit.tokenization import load_tokenizer  # noqa: E402
from decodekit_mirostat import Mirostat  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random byte-level GPT saved as safetensors with its config."""
    args = dict(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    folder = tmp_path_factory.mktemp("tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": args, "tokenizer": {"kind": "byte", "eos_token_id": 256}}))
    return folder


CASES = {  # name: (arguments, the tau and eta they should give)
    "sampler": (["sampler=mirostat", "tau=2.0", "eta=0.5"], 2.0, 0.5),
    "strategy": (["strategy=mirostat"], 5.0, 0.1),
}


@pytest.fixture(scope="module")
def runs(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command of this module, started at once (start-up dominates), then waited for."""
    environ = {k: v for k, v in os.environ.items() if k != "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD"}
    model = ["model=checkpoint", f"model.path={checkpoint}", "prompt=ab"]
    commands = {name: [*model, "max_new_tokens=12", "seed=1", "output_file=out.jsonl", *args] for name, (args, _, _) in CASES.items()}
    commands["bad_tau"] = [*model, "sampler=mirostat", "tau=0"]
    started = {}
    for name, args in commands.items():
        cwd = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen([sys.executable, "-m", "decodekit.cli.main", *args], cwd=cwd, env=environ, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        started[name] = (proc, args, cwd)
    done = {}
    for name, (proc, args, cwd) in started.items():
        out, err = proc.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(args, proc.returncode, out, err), cwd)
    return done


def library_run(folder: Path, settings: dict, seed: int):
    """What the library makes from the settings the command recorded (its strategy's included)."""
    registry = decodekit.get_registry()
    own = {k: v for k, v in settings.items() if k in registry.owners}
    model, extras = load_model(folder, device="cpu")
    tokenizer = load_tokenizer("auto", extras)
    chain = registry.build_chain(own)
    sampler = registry.build_sampler(settings["sampler"], own)
    assert isinstance(sampler, Mirostat)
    return generate_text(model, tokenizer, "ab", processors=chain, sampler=sampler, max_new_tokens=12, seed=seed)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_decode_with_mirostat_makes_what_the_library_makes(checkpoint: Path, runs, case: str) -> None:
    run, cwd = runs[case]
    _, tau, eta = CASES[case]
    assert run.returncode == 0, run.stderr
    record = json.loads((cwd / "out.jsonl").read_text())
    settings = record["settings"]
    assert (settings["sampler"], settings["tau"], settings.get("eta")) == ("mirostat", tau, eta)
    expected = library_run(checkpoint, settings, seed=1)
    assert record["token_ids"] == list(expected.tokens)  # the same tokens, hence the same text
    assert record["continuation"] == expected.text and run.stdout.startswith("ab")


def test_a_bad_tau_on_the_command_line_is_one_clear_line(runs) -> None:
    run, _ = runs["bad_tau"]
    assert run.returncode != 0
    assert "tau=0" in run.stderr and "must be > 0" in run.stderr
    assert "Traceback" not in run.stderr
