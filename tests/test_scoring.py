"""Scoring text, and logprobs in the command's records and in jobs' output rows.

``score`` is checked against transformers' GPT-2 forward pass on the same weights (native GPT and
the adapter), against a model stepped one position at a time through its cache (any
``CausalLM``), and for independence from what else is in its padded batch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from decodekit import ConfigError
from decodekit.engine import Engine, Request
from decodekit.jobs import JobConfig, read_results, run_job
from decodekit.jobs.io import MANIFEST
from decodekit.models import HFCausalLM, load_model
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.scoring import score, sequence_logprobs
from decodekit.tokenization import ByteTokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import assert_one_line_error, decode  # noqa: E402
from test_jobs import DECODING, assert_same_rows, by_id, good_rows, write_rows  # noqa: E402

TEXTS = ["Once upon a time", "ab", "The quick brown fox jumps over the lazy dog."]


class Stepped:
    """A CausalLM that is neither the native GPT nor the adapter: scored one position at a time."""

    def __init__(self, inner: GPT) -> None:
        self.inner = inner
        self.vocab_size, self.max_context, self.device, self.dtype = inner.vocab_size, inner.max_context, inner.device, inner.dtype

    def new_cache(self, b: int, n: int):
        return self.inner.new_cache(b, n)

    def step(self, input_ids, **kw):
        return self.inner.step(input_ids, **kw)

    def reorder_cache(self, cache, index):
        return self.inner.reorder_cache(cache, index)


@pytest.fixture(scope="module")
def byte_pair(tmp_path_factory: pytest.TempPathFactory):
    """transformers' GPT-2 over bytes (vocabulary 257: EOS 256) and our native GPT with its weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=257, n_positions=64, initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = Path(tmp_path_factory.mktemp("gpt2"))
    hf.save_pretrained(path)
    ours, _ = load_model(path, device="cpu")
    return hf, ours


def test_score_matches_transformers_forward_pass_for_native_adapter_and_stepped_models(byte_pair) -> None:
    hf, ours = byte_pair
    tokenizer = ByteTokenizer(eos_token_id=256)
    for model in (ours, HFCausalLM(hf), Stepped(ours)):
        results = score(model, tokenizer, TEXTS, top_logprobs=3, batch_size=2)
        for text, r in zip(TEXTS, results):
            ids = torch.tensor([[256, *text.encode()]])  # the EOS start token, then the bytes
            with torch.no_grad():
                expected = hf(ids).logits[0, :-1].log_softmax(-1)  # [T - 1, V]
            chosen = expected.gather(-1, ids[0, 1:, None]).squeeze(-1)
            assert r.tokens == ids[0].tolist() and r.num_tokens == len(text.encode())
            assert r.logprobs.logprobs == pytest.approx(chosen.tolist(), abs=1e-4)
            assert r.logprobs.top_ids == expected.topk(3).indices.tolist()
            assert r.total == pytest.approx(float(chosen.sum()), abs=1e-3)
            assert r.perplexity == pytest.approx(math.exp(-float(chosen.sum()) / len(text.encode())), rel=1e-4)


def test_a_texts_score_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()
    tokenizer = ByteTokenizer(eos_token_id=256)
    together = score(model, tokenizer, TEXTS, batch_size=3)
    for text, r in zip(TEXTS, together):
        assert score(model, tokenizer, text)[0].logprobs.logprobs == pytest.approx(r.logprobs.logprobs, abs=1e-5)
    unstarted = score(model, tokenizer, "abc", start_token=False)[0]
    assert unstarted.tokens == [97, 98, 99] and unstarted.num_tokens == 2
    assert sequence_logprobs(model, [[97, 98, 99]])[0].logprobs == unstarted.logprobs.logprobs


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, t: score(m, t, []), "texts: give at least one text"),
    (lambda m, t: score(m, t, ["a"], start_token=False), "texts[0]='a': needs at least 2 tokens to score"),
    (lambda m, t: score(m, t, ["ab", ""]), "texts[1]='': is empty: nothing to score"),
    (lambda m, t: score(m, t, ["a"], top_logprobs=99), "top=99 is not allowed: must be an integer in [0, 20]"),
    (lambda m, t: score(m, t, ["a"], batch_size=0), "batch_size=0 is not allowed: must be an integer >= 1"),
    (lambda m, t: score(m, t, ["x" * 80]), "a sequence of 81 tokens is longer than the model's context of 64; shorten it"),
    (lambda m, t: score(m, ByteTokenizer(), ["ab"]), "start_token=True: the tokenizer has no BOS or EOS token"),
])  # fmt: skip
def test_bad_score_arguments_are_one_line(call, message: str) -> None:
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(ConfigError) as refused:
        call(model, ByteTokenizer(eos_token_id=256))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


# ------------------------------------------------------------------------------ the command


def test_decode_score_writes_one_record_per_text_equal_to_score(tmp_path: Path) -> None:
    (tmp_path / "texts.txt").write_text("Once upon a time\nThe cat sat\n")
    run, empty = decode(["score=true", "prompt_file=texts.txt", "logprobs=2", "output_file=s.jsonl"], ["score=true"], cwd=tmp_path)
    assert_one_line_error(empty, "score=true: give the text to score (prompt=..., prompt_file=... or prompt_tokens=[...])")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    model, extras = load_model("default", device="cpu")
    expected = score(model, load_tokenizer("auto", extras), ["Once upon a time", "The cat sat"], top_logprobs=2)
    assert [r["text"] for r in records] == ["Once upon a time", "The cat sat"]
    for record, r in zip(records, expected):
        assert record["total_logprob"] == pytest.approx(r.total, abs=1e-4) and record["num_tokens"] == r.num_tokens
        assert record["logprobs"]["top_ids"] == r.logprobs.top_ids
        assert f"perplexity {r.perplexity:.4f}, total logprob {r.total:.4f} over {r.num_tokens} tokens: {r.text}" in run.stdout


def test_decode_records_hold_logprobs_of_their_tokens_on_the_engine_and_the_batch_path(tmp_path: Path) -> None:
    args = ["prompt=Once upon", "num_samples=2", "max_new_tokens=6", "seed=4", "logprobs=3", "prompt_logprobs=1",
            "logprobs_mode=processed"]  # fmt: skip
    runs = decode([*args, "output_file=e.jsonl"], [*args, "output_file=b.jsonl", "show_probs=true"], cwd=tmp_path)
    assert all(run.returncode == 0 for run in runs), runs[0].stderr + runs[1].stderr
    engine, batch = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in ("e.jsonl", "b.jsonl"))
    assert len(engine) == len(batch) == 2
    for record in engine + batch:
        lp = record["logprobs"]
        assert lp["mode"] == "processed" and lp["tokens"] == record["token_ids"]
        assert len(lp["logprobs"]) == len(lp["top_ids"]) == record["num_tokens"] and all(len(t) == 3 for t in lp["top_ids"])
        for token, chosen, ids, values in zip(lp["tokens"], lp["logprobs"], lp["top_ids"], lp["top_logprobs"]):
            assert chosen <= values[0] + 1e-6  # the most likely is first
            if token in ids:  # the chosen token among the alternatives: the same figure
                assert chosen == pytest.approx(values[ids.index(token)], abs=1e-6)
        assert record["prompt_logprobs"]["tokens"] == list(b"Once upon")  # after the BOS the tokenizer puts first


# ------------------------------------------------------------------------------ jobs


@pytest.fixture(scope="module")
def loaded():
    model, extras = load_model("default", device="cpu")
    return model, load_tokenizer("auto", extras), str(extras.source)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_job_rows_hold_logprobs_and_resume_exactly_once(tmp_path: Path, loaded, fmt: str) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    src = write_rows(tmp_path / "in.jsonl", good_rows(7))
    config = dict(input=str(src), progress_every=0, part_size=3, slots=2, logprobs=2, logprobs_mode="processed", format=fmt)
    run_job(JobConfig(output=str(tmp_path / "ref"), **config), decoding=DECODING, loaded=loaded)
    reference = by_id(read_results(tmp_path / "ref"))
    model, tokenizer, _ = loaded
    alone = Engine(model, tokenizer, settings=DECODING.settings, max_slots=1)
    for row_id, row in reference.items():
        assert row["logprobs"]["tokens"] == row["tokens"] and row["logprobs"]["mode"] == "processed"
        assert all(len(t) == 2 for t in row["logprobs"]["top_ids"])
        [out] = alone.generate([Request(prompt=f"Row {row_id[1:]} says", seed=row["seed"], max_new_tokens=6, logprobs=2,
                                        logprobs_mode="processed")])  # fmt: skip
        expected = out.logprobs.to_dict()
        assert row["logprobs"]["top_ids"] == expected["top_ids"]
        assert row["logprobs"]["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-5)  # other slots, other sums
        got_top, want_top = row["logprobs"]["top_logprobs"], expected["top_logprobs"]
        assert [[v is None for v in t] for t in got_top] == [[v is None for v in t] for t in want_top]
        assert [v for t in got_top for v in t if v is not None] == pytest.approx(
            [v for t in want_top for v in t if v is not None], abs=1e-4)  # a batch of 2 and a single row round apart
    # a run that stopped after its first part: the rerun decodes the rest, each id once, the same rows
    run_job(JobConfig(output=str(tmp_path / "out"), **config), decoding=DECODING, loaded=loaded)
    manifest = tmp_path / "out" / MANIFEST
    manifest.write_text(manifest.read_text().splitlines(keepends=True)[0])
    run_job(JobConfig(output=str(tmp_path / "out"), **config), decoding=DECODING, loaded=loaded)
    assert_same_rows(read_results(tmp_path / "out"), reference)
    assert len(reference) == 7
