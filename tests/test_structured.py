"""Structured output: every output under a JSON schema, regex, grammar or choice is valid, or says it was cut off.

Each output test runs on every grammar backend (``backend`` parameter): llguidance, and xgrammar
where it is installed (CI installs it; elsewhere its cases skip, saying what to install).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from decodekit import ConfigError  # noqa: E402
from decodekit.grammar import BACKENDS  # noqa: E402
from decodekit.models.checkpoints import load_default_model  # noqa: E402
from decodekit.models.gpt import GPT, GPTConfig  # noqa: E402
from decodekit.processors import Structured  # noqa: E402
from decodekit.samplers import BeamSearch, Multinomial  # noqa: E402
from decodekit.testing.strategies import logits as logits_strategy  # noqa: E402
from decodekit.text import generate_text  # noqa: E402
from decodekit.tokenization import ByteTokenizer, CharTokenizer, HFTokenizer, JSONTokenizer, load_tokenizer  # noqa: E402

SCHEMAS = [
    {  # nested objects, arrays, enums, numbers, strings with patterns
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "home": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "lat": {"type": "number"}},
                "required": ["zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "tags", "home"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", 3, None]},
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["ok", "score"],
        "additionalProperties": False,
    },
    {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"},
]
LENGTH_AND_PATTERN = {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$", "maxLength": 20}


XGRAMMAR = 'xgrammar is not installed: pip install "decodekit[xgrammar]"'
BACKEND = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(b) is None, reason=XGRAMMAR)) for b in BACKENDS]


@pytest.fixture(params=BACKEND)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def default() -> tuple[GPT, ByteTokenizer]:
    model, extras = load_default_model()
    return model, load_tokenizer(None, extras)


def _sample(model, tok, n, backend, **spec):
    p = Structured(**spec, structured_backend=backend, tokenizer=tok, vocab_size=model.vocab_size)
    prompts = ["The answer: "] * n
    return generate_text(model, tok, prompts, processors=[p], sampler=Multinomial(), max_new_tokens=160, seed=100)


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


# the embedded model likes long fractions, so outputs with free numbers often run to max_new_tokens
@pytest.mark.parametrize(("schema", "least_finished"), list(zip(SCHEMAS, [0, 6, 6, 0, 6])), ids=["nested", "array", "enum", "numbers", "pattern"])
def test_every_sampled_output_under_a_json_schema_validates_or_says_it_was_cut_off(default, backend, schema, least_finished) -> None:
    model, tok = default
    results = _sample(model, tok, 12, backend, json_schema=schema)
    assert sum(r.finish_reason == "eos" for r in results) >= least_finished, [(r.finish_reason, r.text) for r in results]
    for r in results:
        assert r.finish_reason in ("eos", "incomplete"), r
        assert _valid(r.text, schema) == (r.finish_reason == "eos"), r


def test_a_pattern_with_a_length_is_kept_by_llguidance_and_refused_by_xgrammar(default, backend) -> None:
    model, tok = default
    if backend == "xgrammar":  # it would ignore maxLength (with a warning), so outputs could break the schema
        with pytest.raises(ConfigError, match="^json_schema: xgrammar ignores minLength/maxLength next to a pattern"):
            Structured(json_schema={"type": "array", "items": LENGTH_AND_PATTERN}, structured_backend=backend, tokenizer=tok)
        return
    results = _sample(model, tok, 12, backend, json_schema=LENGTH_AND_PATTERN)
    assert sum(r.finish_reason == "eos" for r in results) >= 6, [(r.finish_reason, r.text) for r in results]
    for r in results:
        assert _valid(r.text, LENGTH_AND_PATTERN) == (r.finish_reason == "eos"), r


def test_regex_outputs_fullmatch_and_choices_are_one_of_the_choices(default, backend) -> None:
    model, tok = default
    pattern = r"[A-Z][a-z]{2,8} \d{1,3}(\.\d)?"
    for r in _sample(model, tok, 10, backend, regex=pattern):
        assert r.finish_reason == "eos" and re.fullmatch(pattern, r.text), r
    choices = ["yes", "no", "maybe so", "yes!"]
    results = _sample(model, tok, 10, backend, choice=choices)
    assert all(r.finish_reason == "eos" and r.text in choices for r in results)


def test_lark_and_gbnf_grammars(default, backend) -> None:
    model, tok = default
    lark = 'start: item ("," item)*\nitem: /[0-9]{1,2}/ | "x"'
    gbnf = 'root ::= item ("," item)*\nitem ::= [0-9] [0-9]? | "x"'
    for grammar in (lark, gbnf):
        for r in _sample(model, tok, 6, backend, grammar=grammar):
            assert re.fullmatch(r"([0-9]{1,2}|x)(,([0-9]{1,2}|x))*", r.text), r
            assert r.finish_reason in ("eos", "length"), r  # cut where the grammar may end: still complete


def test_cut_off_output_is_incomplete_never_valid(default, backend) -> None:
    model, tok = default
    p = Structured(json_schema=SCHEMAS[0], structured_backend=backend, tokenizer=tok, vocab_size=model.vocab_size)
    results = generate_text(model, tok, ["A"] * 3, processors=[p], sampler=Multinomial(), max_new_tokens=5, seed=1)
    assert [r.finish_reason for r in results] == ["incomplete"] * 3
    results = generate_text(model, tok, ["A"], processors=[p], sampler=Multinomial(), max_new_tokens=60, seed=1, stop=['"'])
    assert results[0].finish_reason == "incomplete" and results[0].stop_string == '"'
    free = generate_text(model, tok, ["A"], max_new_tokens=5, seed=1)
    assert free[0].finish_reason == "length"  # without a grammar nothing changes


def test_beam_search_reorder_copies_matcher_state(default, backend) -> None:
    model, tok = default
    p = Structured(regex=r"[a-z]{3,6}-[0-9]{2}", structured_backend=backend, tokenizer=tok, vocab_size=model.vocab_size)
    results = generate_text(model, tok, ["Code: ", "Id: "], processors=[p], sampler=BeamSearch(num_beams=4), max_new_tokens=12)
    for r in results:
        assert re.fullmatch(r"[a-z]{3,6}-[0-9]{2}", r.text), r


def test_char_tokenizer_json_and_hf_folder_vocabularies(tmp_path, backend) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chars = list("abcdefghij0123456789{}[]\":, ") + ["\u2400"]
    char_tok = CharTokenizer(chars, eos_token_id=len(chars) - 1)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(['{"a": 1, "b": [2, 3]}', "hello world"] * 50, trainer)
    json_tok = JSONTokenizer(bpe)
    tokenizers = [char_tok, json_tok]
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        pass
    else:
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path)
        tokenizers.append(HFTokenizer(tmp_path))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    for tok in tokenizers:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)).eval()
        p = Structured(json_schema=schema, structured_backend=backend, tokenizer=tok, vocab_size=model.vocab_size)
        results = generate_text(model, tok, ["a"] * 6, processors=[p], sampler=Multinomial(), max_new_tokens=80, seed=0)
        finished = [r for r in results if r.finish_reason == "eos"]
        assert finished, [(r.finish_reason, r.text) for r in results]
        for r in finished:
            jsonschema.validate(json.loads(r.text), schema)
        assert all(r.finish_reason in ("eos", "incomplete") for r in results)


def test_a_grammar_no_token_can_start_is_a_clear_error(backend) -> None:
    tok = CharTokenizer(list("abc") + ["\u2400"], eos_token_id=3)
    with pytest.raises(ConfigError, match="regex: no token of the vocabulary can start it"):
        Structured(regex="z+", structured_backend=backend, tokenizer=tok)
    with pytest.raises(ConfigError, match="^row 1: choice: no token"):
        Structured(choice=[["a"], ["zz"]], structured_backend=backend, tokenizer=tok)


def test_schema_and_grammar_from_files(tmp_path, default, backend) -> None:
    model, tok = default
    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS[3]))
    (tmp_path / "g.lark").write_text('start: "ab" | "cd"')
    for spec, check in (({"json_schema": f"@{tmp_path / 's.json'}"}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[3])),
                        ({"grammar": f"@{tmp_path / 'g.lark'}"}, lambda t: t in ("ab", "cd"))):  # fmt: skip
        for r in _sample(model, tok, 3, backend, **spec):
            if r.finish_reason == "eos":
                assert check(r.text) is not False


_TOK = CharTokenizer(list("abc{}") + ["\u2400"], eos_token_id=5)


def test_eos_is_allowed_exactly_when_the_grammar_may_end(backend) -> None:
    p = Structured(regex="a(bc)?", structured_backend=backend, tokenizer=_TOK)
    prompt = torch.tensor([[4]])
    p.begin(prompt)
    allowed = []
    for text in ("", "a", "ab", "abc"):
        ids = torch.cat([prompt, torch.tensor([["abc".index(c) for c in text]], dtype=torch.long).reshape(1, -1)], dim=1)
        out = p(ids, torch.zeros(1, 6))
        allowed.append("".join("abc{}$"[i] for i in torch.isfinite(out[0]).nonzero().flatten().tolist()))
    assert allowed == ["a", "b$", "c", "$"]  # $: EOS


@settings(max_examples=60, deadline=None)
@given(x=logits_strategy(vocab=st.just(6)), tokens=st.lists(st.integers(0, 4), max_size=4))
@pytest.mark.parametrize("backend", BACKEND)
def test_the_mask_keeps_the_distribution_valid_and_only_removes_tokens(backend, x, tokens) -> None:
    p = Structured(grammar='start: ("a" | "bc")* "}"', structured_backend=backend, tokenizer=_TOK)
    prompt = torch.zeros((x.shape[0], 1), dtype=torch.long)
    p.begin(prompt)
    ids = torch.cat([prompt, torch.tensor([tokens] * x.shape[0], dtype=torch.long).reshape(x.shape[0], -1)], dim=1)
    out = p(ids, x)
    assert torch.isfinite(out).any(dim=-1).all() and not torch.isnan(out).any()
    kept = torch.isfinite(out)
    same = kept & torch.isfinite(x)
    assert torch.equal(out[same], x[same])  # a kept token keeps its logit
    refilled = (kept & ~torch.isfinite(x)).any(dim=-1)  # rows whose allowed tokens were all removed before
    assert not same[refilled].any()  # ... only those get their allowed tokens back, at logit 0
    assert (out[kept & ~torch.isfinite(x)] == 0).all()
