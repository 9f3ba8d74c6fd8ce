"""Hugging Face model folders: GPT-2 converted to the native GPT, anything else through the adapter.

A folder whose ``config.json`` names a ``model_type`` is a Hugging Face folder.
:func:`load_hf_folder` makes the ``backend`` decision: GPT-2 (``model_type: gpt2``) becomes the
native :class:`~decodekit.models.gpt.GPT`, its ``Conv1D`` weights transposed and its GELU form
read from ``activation_function``, unless it uses a variant the native GPT lacks; every other
model, or any model with ``backend="hf"``, is wrapped in :class:`~decodekit.models.hf.HFCausalLM`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from decodekit.errors import ConfigError, ModelLoadError
from decodekit.models.checkpoints import (
    ModelExtras,
    build_gpt,
    first_line,
    is_state_dict,
    read_json,
    ready_for_decoding,
    safe_torch_load,
)
from decodekit.models.gpt import GPTConfig
from decodekit.models.protocol import CausalLM

__all__ = ["Backend", "load_hf_folder", "require_hf_folder"]

Backend = Literal["auto", "native", "hf"]

# Hugging Face GPT-2 stores these four as Conv1D, [in, out]: the transpose of nn.Linear
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face activation_function values -> GPTConfig.activation (gelu_fast is the tanh form too)
HF_GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def require_hf_folder(path: Path, config: dict[str, Any] | None) -> None:
    """For ``backend="hf"``: ``path`` must be a folder whose ``config.json`` has a ``model_type``."""
    if config is not None and "model_type" in config:
        return
    if path.is_file():
        what = "is a file"
    elif config is None:
        what = "has no config.json"
    else:
        what = "has a config.json without model_type (decodekit's own GPT format)"
    raise ConfigError(f"backend='hf' needs a Hugging Face model folder (config.json with model_type); {path} {what}")


def load_hf_folder(
    path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype, backend: Backend
) -> tuple[CausalLM, ModelExtras]:
    """A Hugging Face folder: GPT-2 becomes a native GPT (unless backend='hf'), others the adapter."""
    tokenizer = _hf_tokenizer_spec(path)
    is_gpt2 = config.get("model_type") == "gpt2"
    unsupported = _gpt2_unsupported(config) if is_gpt2 else None
    if backend == "native" or (backend == "auto" and is_gpt2 and unsupported is None):
        if not is_gpt2:
            raise ModelLoadError(
                f"{path}: model_type={config.get('model_type')!r} has no native implementation "
                "(only gpt2): use backend='hf'"
            )
        if unsupported:
            raise ModelLoadError(f"{path / 'config.json'}: {unsupported} is not supported natively: use backend='hf'")
        state = _hf_state_dict(path)
        model = build_gpt(_gpt2_config(config, path / "config.json"), _convert_hf_gpt2(state), str(path))
        extras = ModelExtras(source=str(path), format="hf-gpt2", tokenizer=tokenizer, metadata=config)
        return ready_for_decoding(model, device, dtype), extras
    from decodekit.models.hf import HFCausalLM

    model = HFCausalLM.from_pretrained(path, device=device, dtype=dtype)
    return model, ModelExtras(source=str(path), format="hf", tokenizer=tokenizer, metadata=config)


# ------------------------------------------------------------------------------ configs


def _gpt2_unsupported(config: Mapping[str, Any]) -> str | None:
    """Which GPT-2 variant setting the native GPT lacks, if any (those go to the HF adapter)."""
    activation = config.get("activation_function", "gelu_new")
    if activation not in HF_GELUS:
        return f"activation_function={activation!r}"
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if config.get(flag):
            return f"{flag}=true"
    if config.get("scale_attn_weights") is False:
        return "scale_attn_weights=false"
    if config.get("tie_word_embeddings") is False:
        return "tie_word_embeddings=false"
    return None


def _gpt2_config(config: Mapping[str, Any], where: Path) -> GPTConfig:
    """Hugging Face GPT2Config fields -> GPTConfig."""
    try:
        return GPTConfig(
            block_size=config.get("n_positions", config.get("n_ctx", 1024)),
            vocab_size=config.get("vocab_size", 50257),
            n_layer=config.get("n_layer", 12),
            n_head=config.get("n_head", 12),
            n_embd=config.get("n_embd", 768),
            bias=True,
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation=HF_GELUS[config.get("activation_function", "gelu_new")],
        )
    except ValidationError as e:
        raise ModelLoadError(f"{where}: bad GPT-2 config: {first_line(e)}") from None


def _hf_tokenizer_spec(path: Path) -> dict[str, Any] | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return {"kind": "hf", "path": str(path)} if any((path / n).is_file() for n in names) else None


# ------------------------------------------------------------------------------ weights


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's weights: model.safetensors (sharded or not) or pytorch_model.bin."""
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").is_file():
        state = safe_torch_load(path / "pytorch_model.bin")
        if not is_state_dict(state):
            raise ModelLoadError(f"{path / 'pytorch_model.bin'}: expected a state dict of tensors")
        return state
    raise ModelLoadError(f"{path}: no weights: expected model.safetensors or pytorch_model.bin")


def _convert_hf_gpt2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel / GPT2Model keys -> nanoGPT keys, Conv1D weights transposed."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight":
            out[name] = value
            continue
        if name.endswith(HF_CONV1D):
            value = value.t()
        out["transformer." + name] = value
    return out

