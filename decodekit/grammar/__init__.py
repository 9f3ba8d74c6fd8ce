"""The grammar backends of structured output: specs to grammars, our tokenizers to their vocabularies.

Structured output (:class:`decodekit.processors.structured.Structured`) forces a row's new tokens
into a JSON schema, a regular expression, a grammar (Lark or GBNF) or one of a list of strings.
The work per token is done by a backend behind a small interface (:func:`backend` gives one):

- ``vocabulary(tokenizer, vocab_size, eos)``: the backend's view of our vocabulary, built once per
  tokenizer (special tokens are never text);
- ``matcher(vocabulary, kind, value)``: a fresh matcher of a spec, the grammar compiled once; a
  grammar the backend refuses is a :class:`ConfigError` naming ``kind``;
- ``fill_masks([(matcher, row), ...], masks)``: each matcher's allowed tokens into ``masks[row]``
  (int32 bits, bit ``i % 32`` of word ``i // 32``), in parallel;
- ``consume([(matcher, token), ...])``: each matcher takes its token, in parallel.

A matcher has ``consume_token``, ``consume_tokens``, ``is_accepting`` (EOS may come now),
``is_stopped``, ``is_error`` (it was given a token outside its grammar) and ``deep_copy``.

Backends (``structured_backend=``): ``llguidance`` (the default, ``pip install
"decodekit[grammar]"``) and ``xgrammar`` (``pip install "decodekit[xgrammar]"``; it pulls in
transformers and triton). Asking for one that is not installed is one line saying what to install.

A spec is ``(kind, value)`` with ``kind`` one of ``json_schema``, ``regex``, ``grammar``,
``choice``. ``@path`` reads a schema or a grammar from a file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decodekit.errors import ConfigError

KINDS = ("json_schema", "regex", "grammar", "choice")
BACKENDS = ("llguidance", "xgrammar")
DEFAULT_BACKEND = "llguidance"


def backend(name: str = DEFAULT_BACKEND) -> Any:
    """A backend by name; one line saying what to install when its package is missing."""
    if name == "llguidance":
        from decodekit.grammar.llguidance import LLGuidanceBackend

        return LLGuidanceBackend()
    if name == "xgrammar":
        from decodekit.grammar.xgrammar import XGrammarBackend

        return XGrammarBackend()
    raise ConfigError(f"structured_backend={name!r} is not allowed: one of {', '.join(BACKENDS)}")


def read_spec(kind: str, value: Any) -> Any:
    """The spec's value with ``@file`` read (and a JSON schema parsed), checked; one-line errors."""
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise ConfigError(f"choice={value!r} is not allowed: give a non-empty list of strings")
        if any(not isinstance(c, str) or not c for c in value):
            raise ConfigError(f"choice={list(value)!r} is not allowed: every choice must be a non-empty string")
        return list(value)
    if kind == "json_schema" and isinstance(value, (dict, bool)):
        return _schema(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{kind}={value!r} is not allowed: give the {kind} as text or as @file")
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{kind}={value}: cannot read {path} ({type(e).__name__}: {e})") from None
    if kind != "json_schema":
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"json_schema: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"json_schema: a schema is a JSON object, got {type(schema).__name__}")
    return _schema(schema)


def _schema(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """A schema object: ``true`` is ``{}`` (any JSON); ``false`` (nothing matches) is refused."""
    if schema is False:
        raise ConfigError("json_schema=false matches no JSON value, so no output can match; give a schema object "
                          "(true or {} allows any JSON)")
    return {} if schema is True else schema


def choice_lark(choices: list[str]) -> str:
    """A Lark grammar whose sentences are exactly ``choices``."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def is_gbnf(grammar: str) -> bool:
    """GBNF (llama.cpp's format) is told from Lark by its ``::=``."""
    return "::=" in grammar


def first_line(message: str) -> str:
    """A backend's error message as one short line (a C++ ``[time] file:line:`` prefix dropped)."""
    lines = [re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line.strip()) for line in message.splitlines() if line.strip()]
    return " ".join(lines[:3])[:300] if lines else "refused by the grammar backend"
