"""Structured output: where its settings come from (Python per row, the engine per request, jobs per
row, the command line, the REPL) and the one-line errors for bad ones, on every grammar backend."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from test_structured import SCHEMAS, _valid, backend, default  # noqa: E402,F401 (backend, default: fixtures)

from decodekit import ConfigError  # noqa: E402
from decodekit.engine import Engine, Request  # noqa: E402
from decodekit.jobs import Decoding, JobConfig, read_errors, read_results, run_job  # noqa: E402
from decodekit.processors import Structured  # noqa: E402
from decodekit.processors.base import BuildContext  # noqa: E402
from decodekit.registry import build_chain, build_row_chain  # noqa: E402
from decodekit.samplers import Multinomial  # noqa: E402
from decodekit.text import generate_text  # noqa: E402
from decodekit.tokenization import ByteTokenizer  # noqa: E402

ROWS = [{"regex": "[0-9]{4}"}, {}, {"choice": ["left", "right"]}, {"json_schema": json.dumps(SCHEMAS[1])}]


def _check(text: str, row: dict) -> None:
    if "regex" in row:
        assert re.fullmatch("[0-9]{4}", text), text
    elif "choice" in row:
        assert text in row["choice"], text
    elif "json_schema" in row:
        jsonschema.validate(json.loads(text), SCHEMAS[1])


def test_per_row_specs_in_a_batch_and_per_request_in_the_engine(default, backend) -> None:
    model, tok = default
    context = BuildContext(tokenizer=tok, eos_token_id=tok.eos_token_id, vocab_size=model.vocab_size)
    rows = [{**row, "structured_backend": backend} if row else row for row in ROWS]
    chain = build_row_chain(rows, context)
    results = generate_text(model, tok, ["Go: "] * 4, processors=chain, sampler=Multinomial(), max_new_tokens=40, seed=5)
    for r, row in zip(results, rows):
        if row:
            assert r.finish_reason == "eos", r
            _check(r.text, row)
    engine = Engine(model, tok, settings={"temperature": 1.0}, max_slots=2)
    requests = [Request(prompt="Q: ", settings=row, seed=i, max_new_tokens=40) for i, row in enumerate(rows * 2)]
    out = engine.generate(requests)
    assert all(o.finish_reason in ("eos", "length") for o in out), [(o.finish_reason, o.error) for o in out]
    for o, row in zip(out, rows * 2):
        _check(o.text, row)


@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason='xgrammar is not installed: pip install "decodekit[xgrammar]"')
def test_rows_requests_and_job_rows_may_each_use_another_backend(default, tmp_path) -> None:
    """A row's own backend fills its mask; the engine's slots and a job's rows mix them."""
    model, tok = default
    rows = [{**row, "structured_backend": b} for row in ROWS if row for b in ("llguidance", "xgrammar")]
    context = BuildContext(tokenizer=tok, eos_token_id=tok.eos_token_id, vocab_size=model.vocab_size)
    alone = [generate_text(model, tok, "Go: ", processors=build_row_chain([row], context), sampler=Multinomial(),
                           max_new_tokens=40, seed=5)[0].text for row in rows]  # fmt: skip
    together = generate_text(model, tok, ["Go: "] * len(rows), processors=build_row_chain(rows, context),
                             sampler=Multinomial(), max_new_tokens=40, seed=5)  # fmt: skip
    for r, row in zip(together, rows):
        _check(r.text, row)
    assert alone[0::2] == alone[1::2]  # same masks from both backends, same draws
    out = Engine(model, tok, max_slots=3).generate([Request(prompt="Q: ", settings=row, seed=i, max_new_tokens=40) for i, row in enumerate(rows)])
    for o, row in zip(out, rows):
        assert o.finish_reason == "eos", (o.finish_reason, o.error)
        _check(o.text, row)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Q: ", "settings": row}) + "\n" for i, row in enumerate(rows))
                                       + json.dumps({"id": "bad", "prompt": "Q: ", "settings": {"regex": "a[b", "structured_backend": "xgrammar"}}) + "\n")  # fmt: skip
    job = JobConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), part_size=4, progress_every=0)
    run_job(job, "default", Decoding(max_new_tokens=40, seed=1), stream=None)
    results = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert len(results) == len(rows)
    for i, row in enumerate(rows):
        assert results[f"r{i}"]["finish_reason"] == "eos", results[f"r{i}"]
        _check(results[f"r{i}"]["text"], row)
    (error,) = read_errors(tmp_path / "out")
    assert error["id"] == "bad" and error["reason"].startswith("regex: ") and "Unclosed" in error["reason"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"regex": "a[bc"}, "^regex: .*(regex parse error|Regex parsing error)"),
        ({"grammar": "start: ::"}, "^grammar: "),
        ({"json_schema": "{not json"}, "^json_schema: not valid JSON"),
        ({"json_schema": "@/no/such/file.json"}, r"^json_schema=@/no/such/file.json: cannot read"),
        ({"choice": []}, r"^choice=\[\] is not allowed"),
        ({"json_schema": "false"}, r"^json_schema=false matches no JSON value, so no output can match"),
        ({"json_schema": False}, r"^json_schema=false matches no JSON value"),
        ({"regex": "a", "choice": ["a"]}, "^set only one of json_schema, regex, grammar, choice"),
    ],
)
def test_bad_specs_are_one_line_errors(settings, message, backend) -> None:
    context = BuildContext(tokenizer=ByteTokenizer(eos_token_id=256), eos_token_id=256, vocab_size=257)
    with pytest.raises(ConfigError, match=message) as info:
        build_chain({**settings, "structured_backend": backend}, context=context)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("schema", ["true", True])
def test_a_true_schema_allows_any_json(default, backend, schema) -> None:
    model, tok = default
    chain = build_chain({"json_schema": schema, "structured_backend": backend},
                        context=BuildContext(tokenizer=tok, eos_token_id=tok.eos_token_id, vocab_size=model.vocab_size))  # fmt: skip
    (result,) = generate_text(model, tok, ["Data: "], processors=chain, sampler=Multinomial(), max_new_tokens=60, seed=2)
    if result.finish_reason == "eos":  # a whole value: it parses
        json.loads(result.text)
    assert result.text.strip(), result


@pytest.mark.parametrize(("backend", "extra"), [("llguidance", "grammar"), ("xgrammar", "xgrammar")])
def test_without_the_backend_one_line_says_what_to_install(monkeypatch, backend, extra) -> None:
    monkeypatch.setitem(sys.modules, backend, None)
    with pytest.raises(ConfigError, match=rf'pip install "decodekit\[{extra}\]"'):
        Structured(regex="a", structured_backend=backend, tokenizer=ByteTokenizer(eos_token_id=256))


def test_an_unknown_backend_is_a_one_line_error() -> None:
    context = BuildContext(tokenizer=ByteTokenizer(eos_token_id=256), eos_token_id=256, vocab_size=257)
    with pytest.raises(ConfigError, match="^structured_backend=.*outlines.*llguidance.*xgrammar") as info:
        build_chain({"regex": "a", "structured_backend": "outlines"}, context=context)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="^row 0: structured_backend='outlines' is not allowed: one of llguidance, xgrammar$"):
        Structured(regex=["a"], structured_backend=["outlines"], tokenizer=ByteTokenizer(eos_token_id=256))


COMMAND = [sys.executable, "-m", "decodekit.cli.main"]
ENV = {**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}


def test_command_line_settings_and_the_repl(tmp_path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS[1]))
    run = subprocess.run([*COMMAND, "prompt=Numbers: ", f"json_schema=@{tmp_path / 's.json'}", "num_samples=4", "seed=1",
                          "max_new_tokens=60", "output_file=o.jsonl", "quiet=true"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["finish_reason"] for r in rows} <= {"eos", "incomplete"}
    assert all(_valid(r["continuation"], SCHEMAS[1]) == (r["finish_reason"] == "eos") for r in rows)
    run = subprocess.run([*COMMAND, "prompt=A", "regex=a", "choice=[a]"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().splitlines()[-1] == (
        "decode: error: set only one of json_schema, regex, grammar, choice (got regex, choice)"
    )
    script = "/set choice=[yes,no] max_new_tokens=8\nOK? \n"
    run = subprocess.run([*COMMAND, "interactive=true", "seed=0"], input=script, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ok: choice=[yes,no] max_new_tokens=8" in run.stdout and re.search(r"^> (yes|no)$", run.stdout, flags=re.MULTILINE), run.stdout


def test_regex_schema_and_grammar_are_taken_as_written_on_the_command_line_and_in_the_repl(tmp_path, backend) -> None:
    """Braces, quotes and spaces in a regex, an inline schema or a grammar are the text, not Hydra syntax."""
    run = subprocess.run([*COMMAND, "prompt=Id: ", r"regex=[a-c]{2}\d", f"structured_backend={backend}", "num_samples=3", "seed=2",
                          "output_file=o.jsonl", "quiet=true"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    texts = [json.loads(line)["continuation"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(texts) == 3 and all(re.fullmatch(r"[a-c]{2}\d", t) for t in texts), texts
    script = "\n".join([f"/set structured_backend={backend} max_new_tokens=30 regex=\"[0-9]{{3}}\"", "R: ",
                        """/set regex=null 'json_schema={"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}'""", "J: ",
                        """/set json_schema=null 'grammar=start: "ab" | "cd"'""", "G: ", ""])  # fmt: skip
    run = subprocess.run([*COMMAND, "interactive=true", "seed=0"], input=script, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and "error" not in run.stdout + run.stderr, run.stdout + run.stderr
    replies = re.findall(r"^> (?!ok: )(.+)$", run.stdout, flags=re.MULTILINE)
    assert len(replies) == 3, run.stdout
    assert re.fullmatch("[0-9]{3}", replies[0]) and replies[2] in ("ab", "cd"), replies
    jsonschema.validate(json.loads(replies[1]), {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2})


def test_the_engine_refuses_a_request_with_a_bad_grammar_alone(default) -> None:
    model, tok = default
    engine = Engine(model, tok, max_slots=2)
    bad, good = engine.generate([Request(prompt="A", settings={"regex": "a[bc"}, max_new_tokens=5),
                                 Request(prompt="A", settings={"choice": ["x", "y"]}, max_new_tokens=5, seed=1)])  # fmt: skip
    assert bad.finish_reason == "error" and "regex: " in bad.error and "regex parse error" in bad.error
    assert good.finish_reason == "eos" and good.text in ("x", "y")
