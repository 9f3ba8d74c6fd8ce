"""Readers for decodekit's own checkpoint formats: nanoGPT ``ckpt.pt``, plain ``.pt``, safetensors.

:func:`decodekit.models.loading.load_model` picks the reader; this module reads the file and
builds the model. It also holds what every reader shares, the Hugging Face GPT-2 reader in
:mod:`decodekit.models.hf_folders` included: :class:`ModelExtras`, the ``weights_only`` torch
loader, and :func:`build_gpt`, which fills a GPT built on the meta device from a state dict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from decodekit.errors import ModelLoadError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.models.packing import column_major
from decodekit.models.protocol import CausalLM

__all__ = [
    "ModelExtras",
    "build_gpt",
    "first_line",
    "folder_safetensors",
    "is_state_dict",
    "load_default_model",
    "load_safetensors",
    "load_torch_checkpoint",
    "read_json",
    "ready_for_decoding",
    "safe_torch_load",
    "sibling_config",
    "unpickling_problem",
]

logger = logging.getLogger(__name__)

# keys under which checkpoints keep their model shape and their weights, in order of preference
CONFIG_KEYS = ("model_args", "model_config", "config")
STATE_KEYS = ("model", "model_state_dict", "state_dict")
# keys a flat config.json may hold beside the GPTConfig fields
NON_MODEL_KEYS = frozenset(
    {"format", "tokenizer", "weights_dtype", "parameters", "corpus", "training", "samples", "metadata"}
)


@dataclass
class ModelExtras:
    """What a checkpoint says besides its weights.

    Attributes:
        source: the file (or folder, for Hugging Face models) actually loaded; for a folder
            of snapshots, the snapshot that was picked.
        format: ``"nanogpt"``, ``"torch"``, ``"safetensors"``, ``"hf-gpt2"``, ``"hf"`` or
            ``"default"``.
        tokenizer: a tokenizer spec for :func:`decodekit.tokenization.load_tokenizer`, when
            the checkpoint names or carries one: ``{"kind": "byte", "eos_token_id": 256}``,
            ``{"kind": "char", "vocab": [...]}``, ``{"kind": "hf", "path": ...}`` ...; else ``None``.
        metadata: the rest of the stored config (training numbers, corpus, ...), as stored.
    """

    source: str
    format: str
    tokenizer: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ formats


def load_default_model() -> tuple[GPT, ModelExtras]:
    """The embedded model, read through importlib.resources (works from a zip too)."""
    from safetensors.torch import load as load_safetensors_bytes

    folder: Traversable = resources.files("decodekit").joinpath("data", "default_model")
    weights, config_file = folder.joinpath("model.safetensors"), folder.joinpath("config.json")
    if not (weights.is_file() and config_file.is_file()):
        raise ModelLoadError(
            f"the default model is missing from the installed package ({folder}): "
            "reinstall decodekit or run tools/train_default_model.py"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    state = load_safetensors_bytes(weights.read_bytes())
    model = build_gpt(_gpt_config(config, str(config_file)), state, str(weights))
    return model, _extras(config, str(weights), "default")


def load_torch_checkpoint(path: Path) -> tuple[GPT, ModelExtras]:
    """A nanoGPT ``ckpt.pt`` or a plain ``{"model_config", "model_state_dict"}`` file."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    config_key = next((k for k in CONFIG_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    state_key = next((k for k in STATE_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if config_key is None or state_key is None:
        if is_state_dict(checkpoint) and (path.parent / "config.json").is_file():
            config_path = path.parent / "config.json"
            model = build_gpt(_gpt_config(read_json(config_path), str(config_path)), checkpoint, str(path))
            return model, _extras(read_json(config_path), str(path), "torch")
        found = ", ".join(map(str, list(checkpoint)[:8])) or "nothing"
        raise ModelLoadError(
            f"{path}: unrecognised checkpoint layout: expected a config under one of "
            f"{CONFIG_KEYS} and weights under one of {STATE_KEYS}; found keys {found}"
        )
    fmt = "nanogpt" if config_key == "model_args" else "torch"
    args = dict(checkpoint[config_key])
    if fmt == "nanogpt":
        args.setdefault("activation", "gelu")  # nanoGPT's MLP: nn.GELU(), the exact form
    model = build_gpt(_gpt_config(args, str(path)), checkpoint[state_key], str(path))
    extras = ModelExtras(source=str(path), format=fmt, tokenizer=_stored_tokenizer(checkpoint, path))
    extras.metadata = {
        k: v for k, v in checkpoint.items() if k not in (state_key, "optimizer") and not torch.is_tensor(v)
    }
    if extras.tokenizer is None and (path.parent / "meta.pkl").exists():
        logger.info(
            "decodekit: %s is a pickle and is not read; store the vocabulary in the checkpoint "
            "('stoi'/'itos' or 'vocab') or pass a tokenizer",
            path.parent / "meta.pkl",
        )
    return model, extras


def load_safetensors(files: list[Path], config: dict[str, Any], config_path: Path) -> tuple[GPT, ModelExtras]:
    """Native GPT weights in safetensors with a decodekit or flat GPTConfig JSON."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({first_line(e)})") from None
    model = build_gpt(_gpt_config(config, str(config_path)), state, str(files[0]))
    return model, _extras(config, str(files[0]), "safetensors")


def folder_safetensors(path: Path) -> list[Path]:
    """The weights of a decodekit folder: ``model.safetensors``, else every ``*.safetensors`` in it."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: config.json found but no .safetensors weights beside it")
    return files


def sibling_config(weights: Path) -> Path:
    """The JSON config beside a ``.safetensors`` file: ``<stem>.json``, else ``config.json``."""
    for candidate in (weights.with_suffix(".json"), weights.parent / "config.json"):
        if candidate.is_file():
            return candidate
    expected = weights.with_suffix(".json").name
    raise ModelLoadError(f"{weights}: no config found beside it (expected {expected} or config.json)")


# ------------------------------------------------------------------------------ configs


def _gpt_config(config: Mapping[str, Any], where: str) -> GPTConfig:
    """A GPTConfig from a decodekit config.json (``{"model": {...}}``) or flat model args."""
    if isinstance(config.get("model"), Mapping):
        args = dict(config["model"])
    else:
        args = {k: v for k, v in config.items() if k not in NON_MODEL_KEYS}
    try:
        return GPTConfig(**args)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ModelLoadError(f"{where}: bad GPT config: {problems}") from None


def _extras(config: dict[str, Any], source: str, fmt: str) -> ModelExtras:
    """ModelExtras from a decodekit config: its tokenizer (stored or named) and the rest as metadata."""
    tokenizer = config.get("tokenizer") if isinstance(config.get("tokenizer"), dict) else None
    if tokenizer is None:
        tokenizer = _stored_tokenizer(config, Path(source))
    metadata = {k: v for k, v in config.items() if k not in ("model", "tokenizer")}
    return ModelExtras(source=source, format=fmt, tokenizer=tokenizer, metadata=metadata)


def _stored_tokenizer(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    """A char vocabulary kept in a checkpoint: ``itos`` / ``stoi`` / ``vocab``, top level or nested."""
    nested = [checkpoint[k] for k in ("meta", "tokenizer", "vocab") if isinstance(checkpoint.get(k), Mapping)]
    places = [checkpoint, *nested]
    for place in places:
        if isinstance(place.get("tokenizer"), Mapping) and "kind" in place["tokenizer"]:
            return dict(place["tokenizer"])
        vocab = None
        if isinstance(place.get("itos"), (Mapping, list, tuple)):
            itos = place["itos"]
            vocab = [itos[i] for i in range(len(itos))] if isinstance(itos, Mapping) else list(itos)
        elif isinstance(place.get("stoi"), Mapping):
            stoi = place["stoi"]
            vocab = [s for s, _ in sorted(stoi.items(), key=lambda kv: kv[1])]
        elif isinstance(place.get("vocab"), (list, tuple)):
            vocab = list(place["vocab"])
        if vocab is not None:
            if not all(isinstance(s, str) for s in vocab):
                raise ModelLoadError(f"{path}: the stored vocabulary must be a list of strings")
            return {"kind": "char", "vocab": vocab}
    return None


# ------------------------------------------------------------------------------ weights


def unpickling_problem(error: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)``'s error says, in one line (the file is named by the caller)."""
    blocked = re.search(r"GLOBAL (\S+)|[Uu]nsupported global:? (?:GLOBAL )?(\S+)", str(error))
    if blocked:
        return (
            "refused to load: the checkpoint holds pickled objects other than tensors "
            f"({blocked.group(1) or blocked.group(2)}), which could run code; "
            "re-save it as a state dict or safetensors"
        )
    detail = str(error).split("WeightsUnpickler error:", 1)[-1]
    return f"not a PyTorch checkpoint weights_only=True can read ({first_line(detail)})"


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, every failure turned into one ModelLoadError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path}: {unpickling_problem(e)}") from None
    except Exception as e:  # torch raises KeyError, EOFError, RuntimeError... on damaged files
        raise ModelLoadError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})"
        ) from None


def build_gpt(config: GPTConfig, state: Mapping[str, torch.Tensor], where: str) -> GPT:
    """A GPT holding ``state``: prefixes stripped, mask buffers dropped, tied head filled in."""
    if not is_state_dict(state):
        raise ModelLoadError(f"{where}: the weights are not a dict of tensors")
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        # causal-mask buffers of nanoGPT (without flash attention) and old transformers
        if key.endswith((".attn.masked_bias", ".attn.bias")) and value.dim() == 4:
            continue
        clean[key] = value
    wte = clean.get("transformer.wte.weight")
    head = clean.setdefault("lm_head.weight", wte) if wte is not None else clean.get("lm_head.weight")
    if wte is not None and head is not None and head is not wte and not torch.equal(head, wte):
        raise ModelLoadError(
            f"{where}: lm_head.weight differs from transformer.wte.weight; only tied embeddings are supported"
        )

    with torch.device("meta"), _no_init():  # no memory, no init: every weight comes from the checkpoint
        model = GPT(config, init=False)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(clean)), sorted(set(clean) - expected)
    if missing or unexpected:
        detail = "; ".join(
            f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise ModelLoadError(f"{where}: the weights do not match the config ({detail})")
    for key, tensor in model.state_dict().items():
        if clean[key].shape != tensor.shape:
            raise ModelLoadError(
                f"{where}: {key} has shape {tuple(clean[key].shape)}; the config needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(clean, strict=True, assign=True)  # GPT's load hook ties the head again
    return model


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch.nn's own weight initialisation while a model is built to be loaded into.

    On meta tensors these initialisers go through torch's reference implementations, which
    import the compiler stack (seconds of start-up) for nothing.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def ready_for_decoding(model: CausalLM, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A torch module moved to ``device`` and ``dtype``, in eval mode, without gradients; float32
    linear weights on CPU column-major (:func:`~decodekit.models.packing.column_major`)."""
    if isinstance(model, torch.nn.Module):
        model = column_major(model.to(device=device, dtype=dtype).eval())  # faster batch-1 steps on CPU
        model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------ small helpers


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of tensors."""
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is one ModelLoadError line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def first_line(e: BaseException) -> str:
    """The first non-blank line of an error's message (at most 200 characters), for one-line errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__
