"""The `decode` command, driven as a user drives it: a subprocess with key=value arguments.

Most runs use a tiny "unigram" checkpoint written by the tests: its next-token logits ignore the
input ('a' 5, 'b' 4, 'c' 3, ' ' 2, 'd' 1, end-of-text -10, every other byte 0), so what each
processor does to them can be worked out by hand. Where a run samples, its text is compared
with decodekit's library functions given the same chain, sampler and seed.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from decodekit.models import load_model
from decodekit.processors import BadWords, NoRepeatNGram, RepetitionPenalty, Temperature, TopK, TopP
from decodekit.registry import build_registry, get_plugin_manager
from decodekit.samplers import Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_configs import write_unigram  # noqa: E402  (the shared tiny checkpoint)

COMMAND = [sys.executable, "-m", "decodekit.cli.main"]


def env(**extra: str) -> dict[str, str]:
    """The environment of a run: installed plugins off (unless a test turns them on)."""
    return {**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1", **extra}


def start(args: list[str], cwd: Path, environ: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*COMMAND, *args], cwd=cwd, env=environ or env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


def decode(*runs: list[str], cwd: Path, environ: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run the command once per argument list, all at once (start-up dominates), and wait."""
    procs = [start(args, cwd, environ) for args in runs]
    done = []
    for args, proc in zip(runs, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def one(args: list[str], cwd: Path, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return decode(args, cwd=cwd, environ=environ)[0]


@pytest.fixture(scope="module")
def unigram(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("unigram")
    return folder, write_unigram(folder)


@pytest.fixture(scope="module")
def library(unigram: tuple[Path, torch.Tensor]):
    """The same checkpoint loaded in this process: ``library(prompt, processors, sampler, n, seed)`` -> text."""
    model, extras = load_model(unigram[0], device="cpu")
    tokenizer = load_tokenizer("auto", extras)

    def continue_(prompt: str, processors, sampler, max_new_tokens: int, seed: int) -> str:
        return generate_text(model, tokenizer, prompt, processors=processors, sampler=sampler,
                             max_new_tokens=max_new_tokens, seed=seed)[0].text  # fmt: skip

    return continue_


def model_args(unigram: tuple[Path, torch.Tensor]) -> list[str]:
    return ["model=checkpoint", f"model.path={unigram[0]}"]


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("decode: error: "), run.stderr
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------------ the issue's examples


def test_default_model_continues_a_prompt(tmp_path: Path) -> None:
    run = one(["prompt=Once upon a time", "max_new_tokens=20"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Once upon a time") and len(run.stdout.rstrip("\n")) > len("Once upon a time")


def test_nucleus_example_prints_the_sample_the_library_makes(unigram, library, tmp_path: Path) -> None:
    run = one([*model_args(unigram), "prompt=ab", "strategy=nucleus", "top_p=0.9", "temperature=0.8",
               "max_new_tokens=100", "seed=42"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = library("ab", Temperature(0.8) | TopP(0.9), Multinomial(), 100, 42)
    assert run.stdout == "ab" + expected + "\n"


def test_top_k_example_with_penalties_and_bad_words(unigram, library, tmp_path: Path) -> None:
    run = one([*model_args(unigram), "prompt=ab", "strategy=top_k", "top_k=40", "repetition_penalty=1.2",
               "no_repeat_ngram_size=3", """bad_words=[" damn"]""", "max_new_tokens=40", "seed=0",
               "output_file=out.jsonl"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    chain = RepetitionPenalty(1.2) | NoRepeatNGram(3) | BadWords([list(b" damn")]) | Temperature(1.0) | TopK(40)
    expected = library("ab", chain, Multinomial(), 40, 0)
    assert run.stdout == "ab" + expected + "\n"
    ids = list(b"ab") + json.loads((tmp_path / "out.jsonl").read_text())["token_ids"]
    trigrams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    assert len(trigrams) == len(set(trigrams))  # no_repeat_ngram_size=3 held


def test_beam_example_with_a_prompt_hydra_would_misread(unigram, library, tmp_path: Path) -> None:
    prompt = "Don't [stop], ${x}"  # a comma, brackets, a quote, an interpolation: all taken as written
    run = one([*model_args(unigram), f"prompt={prompt}", "strategy=beam", "num_beams=4", "length_penalty=1.0",
               "max_new_tokens=8"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    beam = build_registry(get_plugin_manager(autoload=False)).build_sampler("beam", {"num_beams": 4, "length_penalty": 1.0})
    assert run.stdout == prompt + library(prompt, None, beam, 8, 0) + "\n"


def test_sweep_runs_one_labelled_job_per_value_and_leaves_no_files(unigram, library, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    run = one(["-m", "temperature=0.3,0.7,1.0", "seed=1", *model_args(unigram), "prompt=ab", "max_new_tokens=30"],
              work, env(TMPDIR=str(scratch)))  # fmt: skip
    assert run.returncode == 0, run.stderr
    jobs = re.split(r"^=== job \d+: (.*) ===\n", run.stdout, flags=re.MULTILINE)[1:]
    assert len(jobs) == 6
    for (overrides, text), temperature in zip(zip(jobs[::2], jobs[1::2]), (0.3, 0.7, 1.0)):
        assert f"temperature={temperature}" in overrides.split() and "seed=1" in overrides.split()
        # the nucleus strategy's top_p=0.9 stays; temperature is the job's
        assert text == "ab" + library("ab", Temperature(temperature) | TopP(0.9), Multinomial(), 30, 1) + "\n"
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []  # no outputs/, multirun/, logs


def test_processor_order_and_show_probs_show_what_each_filter_did(unigram, tmp_path: Path) -> None:
    """bad_words removes 'a'; min_p=0.2 runs before temperature=3 (temperature_last): 2 tokens stay."""
    folder, logits = unigram
    run = one([*model_args(unigram), "prompt=ab", "strategy=sampling", "temperature=3", "min_p=0.2",
               "temperature_last=true", """bad_words=["a"]""", "show_probs=true", "show_probs_k=3",
               "max_new_tokens=2", "seed=0"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"chain: BadWords\(.*\) \| MinP\(min_p=0\.2.*\) \| Temperature\(temperature=3\.0\)", lines[0])
    probs = logits.softmax(-1)
    banned = logits.clone()
    banned[ord("a")] = -math.inf
    kept_first = int((banned.softmax(-1) >= 0.2 * banned.softmax(-1).max()).sum())  # min_p, then temperature
    flat = (banned / 3).softmax(-1)
    kept_default = int((flat >= 0.2 * flat.max()).sum())  # temperature, then min_p
    assert (kept_first, kept_default) == (2, 255)  # the order matters here
    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    assert len(steps) == 2
    for i in steps:
        step, model_line, chain_line = lines[i : i + 3]
        assert model_line.startswith(f"  model: 'a' {probs[ord('a')]:.3f}  'b' {probs[ord('b')]:.3f}")
        assert chain_line.startswith("  chain: 'b' ") and "'a'" not in chain_line
        assert chain_line.endswith(f"({kept_first} of 257 tokens left)")
        found = re.fullmatch(r"step \d: '([bc])' \(p=(0\.\d{3}) after the chain, logprob=(-?\d\.\d{3}), model logprob=(-\d\.\d{3})\)", step)
        assert found, step
        chosen, p, logprob, model_logprob = found.groups()
        assert float(logprob) == pytest.approx(math.log(float(p)), abs=2e-3)  # the chain's distribution
        assert float(model_logprob) == pytest.approx(float(probs[ord(chosen)].log()), abs=1e-3)  # the model's
    assert re.fullmatch(r"ab[bc]{2}", lines[-1])


def test_prompt_tokens_on_cpu_in_bfloat16_with_and_without_a_tokenizer(unigram, tmp_path: Path) -> None:
    folder, logits = unigram
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({"model": config["model"]}))  # no tokenizer stored
    args = ["prompt_tokens=[97,98]", "device=cpu", "dtype=bfloat16", "strategy=greedy", "max_new_tokens=4"]
    with_tok, without = decode([*model_args(unigram), *args], ["model=checkpoint", f"model.path={bare}", *args], cwd=tmp_path)
    best = int(logits.argmax())
    assert with_tok.returncode == 0 and without.returncode == 0, with_tok.stderr + without.stderr
    assert without.stdout == f"97 98 | {best} {best} {best} {best}\n"
    assert with_tok.stdout == f"97 98 | {best} {best} {best} {best}\ntext: {chr(best) * 4}\n"


# ------------------------------------------------------------------------------ bad values


def test_each_bad_value_of_the_issue_exits_2_with_one_line(unigram, tmp_path: Path) -> None:
    cases = {
        "top_p=1.5": ("top_p=1.5", "must be <= 1.0"),
        "temperature=-1": ("temperature=-1", "must be >= 0"),
        "strategy=nucleos": ("strategy='nucleos'", "did you mean 'nucleus'", "known: beam, greedy, min_p, nucleus"),
        "num_beams=0": ("num_beams=0", "must be >= 1"),
        "top_k=5 tempreture=0.7": ("tempreture", "did you mean 'temperature'", "known: "),
    }
    runs = decode(*[[*model_args(unigram), "strategy=beam", *case.split()] if "beams" in case
                    else [*model_args(unigram), *case.split()] for case in cases], cwd=tmp_path)  # fmt: skip
    for run, fragments in zip(runs, cases.values()):
        assert_one_line_error(run, *fragments)


def test_model_pack_weights_is_a_validated_model_setting(unigram, tmp_path: Path) -> None:
    args = [*model_args(unigram), "strategy=greedy", "prompt_tokens=[97,98]", "max_new_tokens=4"]
    on, off, bad = decode([*args, "model.pack_weights=true"], [*args, "model.pack_weights=false"],
                          [*args, "model.pack_weights=maybe"], cwd=tmp_path)  # fmt: skip
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and on.stdout.startswith("97 98 | ")
    assert_one_line_error(bad, "model.pack_weights='maybe' is not allowed", "valid boolean")


# ------------------------------------------------------------------------------ output


def test_jsonl_records_every_sample_of_every_batch(unigram, library, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("ab\n\nba\ncab\n")
    run = one([*model_args(unigram), "prompt_file=prompts.txt", "batch_size=2", "num_samples=2", "max_new_tokens=6",
               "seed=5", "output_file=out.jsonl", "progress=true"], tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["prompt_index"], r["sample_index"], r["seed"]) for r in records] == [
        (p, i, s, 5 + 2 * i + s) for i, p in enumerate(["ab", "ba", "cab"]) for s in range(2)
    ]
    for r in records:
        assert r["num_tokens"] == len(r["token_ids"]) == 6 and r["finish_reason"] == "length"
        assert r["settings"] | {"model": None} == {"strategy": "nucleus", "sampler": "multinomial", "temperature": 0.8,
                                                   "top_p": 0.9, "max_new_tokens": 6, "model": None}  # fmt: skip
        # a sample depends on its own seed only, whatever else was in its batch
        assert r["continuation"] == library(r["prompt"], Temperature(0.8) | TopP(0.9), Multinomial(), 6, r["seed"])
        label = f"--- prompt {r['prompt_index'] + 1}/3, sample {r['sample_index'] + 1}/2 (seed {r['seed']}) ---"
        assert f"{label}\n{r['prompt']}{r['continuation']}\n" in run.stdout
    assert re.findall(r"decode: sample (\d)/6 done", run.stderr) == ["1", "2", "3", "4", "5", "6"]  # on the engine


def test_tokens_stream_and_an_interrupt_keeps_the_finished_batches(unigram, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("ab\n" * 40)
    proc = start([*model_args(unigram), "prompt_file=prompts.txt", "batch_size=1", "max_new_tokens=300",
                  "output_file=out.jsonl", "seed=0"], tmp_path)  # fmt: skip
    try:
        head = "--- prompt 1/40 (seed 0) ---\nab"
        assert proc.stdout.read(len(head)) == head
        assert len(proc.stdout.read(1)) == 1 and proc.poll() is None  # new text shows while the run goes on
        deadline = time.monotonic() + 120
        while not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text().count("\n"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.splitlines()[-1] == "decode: error: interrupted" and "Traceback" not in err
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert 1 <= len(records) < 40
    assert [r["prompt_index"] for r in records] == list(range(len(records)))
    assert all(r["num_tokens"] == 300 for r in records)


# ------------------------------------------------------------------------------ discoverability and plugins


PLUGIN = '''
"""A test plugin: a processor that bans token ids, a sampler that takes the second best, a strategy."""
import torch
from pydantic import BaseModel, ConfigDict, Field
from decodekit import LogitsProcessor, Sampler, hookimpl


class TestBan(LogitsProcessor):
    name = "testban"
    order = 990

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        testban_ids: list[int] = Field(min_length=1, description="token ids never chosen")
        testban_weight: float = Field(1.0, ge=0.0, le=1.0, description="how hard; 1 = ban")

    def __init__(self, testban_ids, testban_weight=1.0):
        self.ids = torch.tensor(testban_ids)

    def __call__(self, input_ids, logits):
        return logits.index_fill(-1, self.ids.to(logits.device), float("-inf"))


class SecondBest(Sampler):
    name = "second_best"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        second_best_rank: int = Field(2, ge=1, description="which rank to take")

    def __init__(self, second_best_rank=2):
        self.rank = second_best_rank

    def __call__(self, input_ids, logits, rng):
        return logits.topk(self.rank, dim=-1).indices[:, -1]


@hookimpl
def decodekit_register_processors():
    return [TestBan]


@hookimpl
def decodekit_register_samplers():
    return [SecondBest]


@hookimpl
def decodekit_register_strategies():
    return {"runner_up": {"sampler": "second_best", "second_best_rank": 2}}
'''


def test_plugins_need_no_yaml_and_show_in_list_and_help(unigram, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "decodekit_testplugin-0.1.dist-info").mkdir(parents=True)
    (site / "decodekit_testplugin.py").write_text(textwrap.dedent(PLUGIN))
    (site / "decodekit_testplugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: decodekit-testplugin\nVersion: 0.1\n")
    (site / "decodekit_testplugin-0.1.dist-info" / "entry_points.txt").write_text("[decodekit]\ntestplugin = decodekit_testplugin\n")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed, used, bad, helped = decode(
        ["list=true"],
        [*model_args(unigram), "prompt=ab", "strategy=runner_up", f"testban_ids=[{ord('b')}]", "max_new_tokens=5"],
        [*model_args(unigram), "testban_ids=[1]", "testban_weight=2"],
        ["--help"],
        cwd=tmp_path, environ=environ,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "  testban  (order 990, plugin testplugin)" in listed.stdout
    assert "      testban_ids: list[int], non-empty; no default (setting it turns the processor on); token ids never chosen" in listed.stdout
    assert "      testban_weight: float, >= 0.0, <= 1.0; default 1.0; how hard; 1 = ban" in listed.stdout
    assert "  second_best  (plugin testplugin)" in listed.stdout
    assert "  runner_up  (plugin testplugin): sampler=second_best second_best_rank=2" in listed.stdout
    for builtin in ("  top_p  (order 400, built-in)", "  greedy  (built-in)", "  nucleus  (built-in, conf/strategy/nucleus.yaml)"):
        assert builtin in listed.stdout
    # second best of the unigram's logits is 'b'; with 'b' banned by the plugin processor it is 'c'
    assert used.returncode == 0, used.stderr
    assert used.stdout == "ab" + "c" * 5 + "\n"
    assert_one_line_error(bad, "testban_weight=2", "must be <= 1.0")
    # --help: the groups with their options (the plugin's strategy among them) and the keys
    assert helped.returncode == 0, helped.stderr
    assert "model: checkpoint, default, hf\n" in helped.stdout and "tokenizer: auto, byte, hf, json\n" in helped.stdout
    strategies = re.search(r"^strategy: (.*)$", helped.stdout, flags=re.MULTILINE).group(1).split(", ")
    assert {"beam", "greedy", "min_p", "nucleus", "sampling", "top_k", "typical", "runner_up"} <= set(strategies)
    for key in ("prompt", "max_new_tokens", "seed", "processor_order", "temperature_last", "top_p", "num_beams",
                "device", "dtype", "output_file", "show_probs", "interactive", "list", "testban_ids", "second_best_rank"):  # fmt: skip
        assert re.search(rf"^  {key} +\S", helped.stdout, flags=re.MULTILINE), key


BROKEN_PLUGIN = '''
from decodekit import hookimpl


@hookimpl
def decodekit_register_processors():
    raise RuntimeError("the plugin's own bug")


@hookimpl
def decodekit_register_samplers():
    return ["not a class"]
'''


def test_a_plugin_whose_hooks_misbehave_is_named_in_one_line_and_decode_goes_on(unigram, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "decodekit_broken-0.1.dist-info").mkdir(parents=True)
    (site / "decodekit_broken.py").write_text(BROKEN_PLUGIN)
    (site / "decodekit_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: decodekit-broken\nVersion: 0.1\n")
    (site / "decodekit_broken-0.1.dist-info" / "entry_points.txt").write_text("[decodekit]\nbroken = decodekit_broken\n")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    helped, used = decode(["--help"], [*model_args(unigram), "prompt=ab", "strategy=greedy", "max_new_tokens=3"],
                          cwd=tmp_path, environ=environ)  # fmt: skip
    warning = ("decode: warning: decodekit plugin 'broken': decodekit_register_processors raised RuntimeError: "
               "the plugin's own bug; the plugin is skipped")  # fmt: skip
    for run in (helped, used):
        assert run.returncode == 0, run.stderr
        assert run.stderr.splitlines() == [warning]
    assert helped.stdout.startswith("decode: continue a prompt")
    assert used.stdout == "abaaa\n"
