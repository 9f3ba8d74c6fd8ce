"""Tokenizers: text to token ids and back, and turning generated ids into text safely.

A :class:`Tokenizer` is anything with ``encode``, ``decode``, ``vocab_size`` and the three
special ids. decodekit ships four:

- :class:`ByteTokenizer`: UTF-8 bytes (ids 0-255), lossless on any text, plus optional
  special ids from 256 up (the default model uses 256 as its end-of-text / start marker);
- :class:`CharTokenizer`: one id per character, with the vocabulary stored in a checkpoint
  (nanoGPT's character-level models);
- :class:`JSONTokenizer`: a ``tokenizer.json`` from the ``tokenizers`` library;
- :class:`HFTokenizer`: a local Hugging Face tokenizer folder (``AutoTokenizer``).

:func:`load_tokenizer` builds one from a spec or from what :func:`~decodekit.models.load_model`
found in a checkpoint; :func:`check_vocab` says when a tokenizer does not fit a model.

Turning generated ids into text safely (:func:`continuation_text`, :class:`StreamDecoder`) lives
in :mod:`decodekit.detokenize`; both are importable from here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from decodekit.detokenize import StreamDecoder, continuation_text
from decodekit.errors import ConfigError, ModelLoadError, TokenizationError

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "JSONTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "check_vocab",
    "continuation_text",
    "load_tokenizer",
]

# names tried, in order, when a tokenizer.json comes without a tokenizer_config.json
COMMON_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    """What decodekit needs from a tokenizer.

    Attributes:
        vocab_size: ids run from 0 to ``vocab_size - 1``, special tokens included.
        eos_token_id: the id that ends a text, or ``None``.
        bos_token_id: the id that starts one, or ``None``.
        pad_token_id: the id used for padding, or ``None``.
    """

    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with a leading BOS where the tokenizer adds one."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens are left out."""
        ...


# ------------------------------------------------------------------------------ built-ins


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus optional special ids (256 and up).

    ``vocab_size`` is 256, or one more than the highest special id. ``encode`` puts
    ``bos_token_id`` first when ``add_bos`` is true; ``decode`` leaves special ids out and
    replaces invalid UTF-8 with U+FFFD.
    """

    def __init__(
        self,
        *,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
    ) -> None:
        specials = {i for i in (eos_token_id, bos_token_id, pad_token_id) if i is not None}
        if any(not isinstance(i, int) or i < 256 for i in specials):
            raise ConfigError(
                f"byte tokenizer special ids must be integers >= 256 (bytes use 0-255); got {sorted(specials)}"
            )
        if add_bos and bos_token_id is None:
            raise ConfigError("byte tokenizer: add_bos=true needs a bos_token_id")
        self.eos_token_id, self.bos_token_id, self.pad_token_id = eos_token_id, bos_token_id, pad_token_id
        self.add_bos = add_bos
        self.vocab_size = max(specials, default=255) + 1

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids`` (special ids left out)."""
        _check_ids(ids, self.vocab_size)
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"ByteTokenizer(eos_token_id={self.eos_token_id}, bos_token_id={self.bos_token_id}, "
                f"pad_token_id={self.pad_token_id}, add_bos={self.add_bos})")


class CharTokenizer:
    """One id per character, from a vocabulary stored with the model (nanoGPT's ``itos``).

    Args:
        vocab: ``vocab[i]`` is the character of id ``i``; characters must be distinct.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        vocab = list(vocab)
        if not vocab or any(not isinstance(c, str) or len(c) != 1 for c in vocab):
            raise ConfigError("char tokenizer: the vocabulary must be a non-empty list of single characters")
        if len(set(vocab)) != len(vocab):
            raise ConfigError("char tokenizer: the vocabulary repeats a character")
        for name, i in (("eos", eos_token_id), ("bos", bos_token_id), ("pad", pad_token_id)):
            if i is not None and not 0 <= i < len(vocab):
                raise ConfigError(f"char tokenizer: {name}_token_id={i} is outside the vocabulary of {len(vocab)}")
        self.itos = vocab
        self.stoi = {c: i for i, c in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.eos_token_id, self.bos_token_id, self.pad_token_id = eos_token_id, bos_token_id, pad_token_id

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise TokenizationError(
                f"character {c!r} (U+{ord(c):04X}) at position {text.index(c)} is not in the model's "
                f"vocabulary of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        return "".join(self.itos[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class JSONTokenizer:
    """A ``tokenizers`` ``tokenizer.json`` (BPE, WordPiece, Unigram ...).

    Special ids come from the arguments, else from a ``tokenizer_config.json`` beside the
    file, else (EOS only) from common names such as ``<|endoftext|>`` and ``</s>``.

    Args:
        source: the path of a ``tokenizer.json``, or a ``tokenizers.Tokenizer``.
    """

    def __init__(
        self,
        source: str | Path | Any,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ModelLoadError(f"tokenizer file not found: {path}")
            try:
                self._tok = RustTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ModelLoadError(f"{path}: not a tokenizers tokenizer.json ({first})") from None
            names = _special_names(path.with_name("tokenizer_config.json"))
        else:
            self._tok, names = source, {}
        eos_token = eos_token or names.get("eos_token") or next(
            (t for t in COMMON_EOS if self._tok.token_to_id(t) is not None), None
        )
        self.eos_token_id = self._id_of(eos_token)
        self.bos_token_id = self._id_of(bos_token or names.get("bos_token"))
        self.pad_token_id = self._id_of(pad_token or names.get("pad_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"JSONTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


class HFTokenizer:
    """A local Hugging Face tokenizer folder through ``AutoTokenizer`` (never downloads).

    ``encode`` adds the special tokens the tokenizer adds by default (Llama's BOS, ...).
    """

    def __init__(self, path: str | Path) -> None:
        from decodekit.models.hf import import_transformers

        transformers = import_transformers()
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"tokenizer folder not found: {path}")
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelLoadError(f"{path}: transformers could not load a tokenizer ({first.strip()[:200]})") from None
        self.vocab_size: int = len(self._tok)
        self.eos_token_id: int | None = self._tok.eos_token_id
        self.bos_token_id: int | None = self._tok.bos_token_id
        self.pad_token_id: int | None = self._tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self._tok).__name__}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------ loading


def load_tokenizer(spec: Any = None, model_extras: Any = None) -> Tokenizer:
    """A tokenizer from ``spec``, or from what the model's checkpoint says.

    Args:
        spec: ``None`` or ``"auto"`` (the tokenizer the checkpoint names or stores);
            ``"byte"``; ``"char"`` (the character vocabulary stored in the checkpoint); a path
            to a ``tokenizer.json`` or to a tokenizer folder; or a dict such as
            ``{"kind": "byte", "eos_token_id": 256}``, ``{"kind": "char", "vocab": [...]}``,
            ``{"kind": "json", "path": ...}``, ``{"kind": "hf", "path": ...}``,
            ``{"kind": "gguf", "path": ...}`` (the vocabulary in a GGUF file).
        model_extras: the :class:`~decodekit.models.ModelExtras` from ``load_model`` (or its
            ``tokenizer`` dict).

    Raises:
        ConfigError: a spec that names no known tokenizer, or asks for one the checkpoint lacks.
        ModelLoadError: a tokenizer file that is missing or unreadable.
    """
    stored = getattr(model_extras, "tokenizer", model_extras)
    if stored is not None and not isinstance(stored, Mapping):
        raise ConfigError(f"model_extras: expected ModelExtras or a tokenizer dict, got {type(stored).__name__}")
    if spec is None or spec == "auto":
        if stored is None:
            raise ConfigError(
                "tokenizer='auto': the model's checkpoint names no tokenizer; pass one "
                "('byte', a tokenizer.json path, or a tokenizer folder)"
            )
        return _from_dict(dict(stored))
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if stored is None or stored.get("kind") != "char":
            raise ConfigError("tokenizer='char': the model's checkpoint stores no character vocabulary")
        return _from_dict(dict(stored))
    if isinstance(spec, Mapping):
        return _from_dict(dict(spec))
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if path.is_file():
            return JSONTokenizer(path)
        if path.is_dir():
            kind = "hf" if (path / "tokenizer_config.json").is_file() else "json"
            return _from_dict({"kind": kind, "path": str(path)})
        if isinstance(spec, str) and "/" not in spec and not path.suffix:
            raise ConfigError(f"tokenizer={spec!r}: expected 'auto', 'byte', 'char', a path, or a dict with 'kind'")
        raise ModelLoadError(f"tokenizer file not found: {path}")
    raise ConfigError(f"tokenizer={spec!r}: expected 'auto', 'byte', 'char', a path, or a dict with 'kind'")


def _from_dict(spec: dict[str, Any]) -> Tokenizer:
    kind = spec.pop("kind", None)
    try:
        if kind == "byte":
            return ByteTokenizer(**spec)
        if kind == "char":
            return CharTokenizer(spec.pop("vocab", None) or [], **spec)
        if kind == "json":
            path = Path(spec.pop("path"))
            return JSONTokenizer(path / "tokenizer.json" if path.is_dir() else path, **spec)
        if kind == "gguf":  # the vocabulary in a GGUF file's metadata
            from decodekit.models.gguf_tokenizer import gguf_tokenizer

            return gguf_tokenizer(spec.pop("path"), **spec)
        if kind == "hf":
            path = Path(spec.pop("path"))
            try:
                return HFTokenizer(path, **spec)
            except ModelLoadError:
                if (path / "tokenizer.json").is_file() and not _transformers_available():
                    return JSONTokenizer(path / "tokenizer.json")
                raise
    except TypeError as e:  # an unknown key in the spec
        raise ConfigError(f"tokenizer kind {kind!r}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"tokenizer kind {kind!r} needs {e.args[0]!r}") from None
    raise ConfigError(f"tokenizer kind={kind!r}: expected 'byte', 'char', 'json', 'hf' or 'gguf'")


def check_vocab(tokenizer: Tokenizer, model: Any) -> None:
    """Raise a one-line ConfigError, before any decoding, when ``tokenizer`` and ``model`` do not fit.

    They do not fit when the tokenizer has ids the model has no logits for, or when the model
    has many more logits than the tokenizer has ids: it would then sample ids the tokenizer
    cannot decode, found only in the middle of the output. A few more logits are normal, since
    many models pad their vocabulary (nanoGPT's GPT-2 to 50304 for 50257 tokens, GPT-J to
    50400, Phi-2 to 51200 for 50295), so up to ``max(64, model.vocab_size // 32)`` more are
    accepted (:func:`spare_logits`).
    """
    special = [i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None]
    top = max([tokenizer.vocab_size - 1, *special])
    name = type(tokenizer).__name__
    if top >= model.vocab_size:
        raise ConfigError(
            f"the tokenizer ({name}) uses ids up to {top} but the model has only "
            f"{model.vocab_size} logits: they do not belong together"
        )
    if model.vocab_size - (top + 1) > spare_logits(model.vocab_size):
        raise ConfigError(
            f"the tokenizer ({name}) has {top + 1} ids but the model has {model.vocab_size} logits: it "
            f"would sample ids the tokenizer cannot decode; they do not belong together"
        )


def spare_logits(model_vocab_size: int) -> int:
    """How many more logits than tokenizer ids :func:`check_vocab` takes for vocabulary padding."""
    return max(64, model_vocab_size // 32)


# ------------------------------------------------------------------------------ small helpers


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise TokenizationError(f"token id {bad} is outside the tokenizer's vocabulary (0-{vocab_size - 1})")


def _special_names(config_path: Path) -> dict[str, str]:
    """eos/bos/pad token strings from a tokenizer_config.json, if there is one."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    names = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str):
            names[key] = value
    return names


def _transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None
