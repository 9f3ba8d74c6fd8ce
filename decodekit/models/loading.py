"""Load a causal LM from a checkpoint file, a folder, or the name ``"default"``.

:func:`load_model` is the one entry point. It recognises:

- ``"default"``: the small byte-level GPT shipped in ``decodekit/data/default_model/``;
- nanoGPT checkpoints, ``{"model_args": {...}, "model": state_dict, ...}``, with or
  without the ``_orig_mod.`` prefix ``torch.compile`` leaves on parameter names; they run
  with nanoGPT's exact GELU (``activation="gelu"``) unless ``model_args`` says otherwise;
- plain ``.pt`` files, ``{"model_config": {...}, "model_state_dict": {...}}``;
- safetensors weights with a JSON config: a folder holding ``model.safetensors`` and
  ``config.json``, or a ``.safetensors`` file with ``<stem>.json`` or ``config.json`` beside it;
  these two are decodekit's own formats and keep :class:`GPTConfig`'s ``activation`` default
  (the tanh GELU decodekit's GPT trains with) unless their config names one;
- Hugging Face GPT-2 folders (``config.json`` with ``model_type: gpt2``, plus
  ``model.safetensors`` or ``pytorch_model.bin``): converted to the native :class:`GPT`, the
  GELU form read from ``activation_function``;
  any other Hugging Face causal LM folder goes through :class:`~decodekit.models.hf.HFCausalLM`;
- a folder of training snapshots (``snapshots/snapshot_*.pt``, ``ckpt.pt``, ``*.pt``): the
  newest is taken, by the step number in its name, then by modification time;
- llama.cpp's GGUF files (``.gguf``, GPT-2 and Llama; needs ``pip install 'decodekit[gguf]'``):
  read by :mod:`decodekit.models.gguf`, weights dequantised to float32.

Pickled files are only ever read with ``torch.load(..., weights_only=True)``: a checkpoint
holding anything but tensors and plain containers (code, custom classes) is refused, and
nanoGPT's ``meta.pkl`` is never read. Every failure is one :class:`ModelLoadError` or
:class:`ConfigError` line naming the file or the setting.

This module resolves the settings and picks the reader; the readers live in
:mod:`decodekit.models.checkpoints` (decodekit's own formats, nanoGPT included) and
:mod:`decodekit.models.hf_folders` (Hugging Face folders and the ``backend`` decision).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from decodekit.errors import ConfigError, ModelLoadError
from decodekit.kernels import check_kernels, use_kernels
from decodekit.models.cache import check_kv_cache, set_kv_cache
from decodekit.models.checkpoints import (
    ModelExtras,
    folder_safetensors,
    load_default_model,
    load_safetensors,
    load_torch_checkpoint,
    read_json,
    ready_for_decoding,
    sibling_config,
    unpickling_problem,  # noqa: F401  (importable from here, as before the split)
)
from decodekit.models.hf_folders import Backend, load_hf_folder, require_hf_folder
from decodekit.models.protocol import CausalLM
from decodekit.models.weights import check_weights, convert_model_weights

__all__ = ["ModelExtras", "load_model", "resolve_device", "resolve_dtype", "find_latest_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ settings


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", str(device)):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: CUDA is not available on this machine")
        return torch.device(device)
    raise ConfigError(f"device={device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the torch dtype itself)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------ entry point


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    backend: Backend = "auto",
    pack_weights: bool | None = None,
    weights: str = "float32",
    kernels: str = "auto",
    kv_cache: str = "auto",
) -> tuple[CausalLM, ModelExtras]:
    """Load a model and what its checkpoint says about itself.

    Args:
        source: ``"default"``, or a path to a checkpoint file or folder (see the module doc).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; weights stored in another
            precision are converted.
        backend: for Hugging Face folders: ``"auto"`` converts GPT-2 to the native
            :class:`GPT` (unless it uses a variant the native GPT lacks) and wraps anything
            else in :class:`~decodekit.models.hf.HFCausalLM`;
            ``"native"`` insists on the native GPT, ``"hf"`` on the adapter.
        pack_weights: oneDNN-prepacked CPU weights for the linear layers
            (:mod:`decodekit.models.packing`: faster decoding, a second copy of those weights in
            memory). ``None`` keeps the model's default: on for the native GPT, off for
            Hugging Face models through the adapter.
        weights: how the projections' weights are stored on CPU (:mod:`decodekit.models.weights`):
            ``"float32"`` (exact, the default), ``"bf16"``, ``"int8"`` (per-channel scales) or
            ``"w8a8"`` (int8 weights and activations); all but float32 need ``dtype="float32"``
            and make the model inference-only.
        kernels: which kernels a CPU decoding step's few rows take (:mod:`decodekit.kernels`):
            ``"auto"`` (decodekit's native AVX-512 ones where they can run, built once on first
            use; the library's otherwise), ``"native"`` (those or an error) or ``"library"``.
        kv_cache: how the key / value cache is stored (:func:`~decodekit.models.cache.set_kv_cache`):
            ``"auto"`` (in the model's dtype) or ``"bf16"`` (half the bytes of float32; the native
            GPT and Llama only).

    Returns:
        ``(model, extras)``: a model in eval mode following
        :class:`~decodekit.models.protocol.CausalLM`, and :class:`ModelExtras`.

    Raises:
        ConfigError: a bad ``device``, ``dtype``, ``backend``, ``weights``, ``kernels``
            (``"native"`` where they cannot run) or ``kv_cache`` (``"bf16"`` for a model that keeps
            its own cache).
        ModelLoadError: a missing file, an unknown name, an unrecognised or unsafe
            checkpoint, or weights that do not fit their config.
    """
    if pack_weights is not None and not isinstance(pack_weights, bool):
        raise ConfigError(f"pack_weights={pack_weights!r} is not allowed: must be true, false or null")
    check_weights(weights)
    check_kernels(kernels)
    check_kv_cache(kv_cache)
    model, extras = _load(source, device, dtype, backend)
    set_kv_cache(model, kv_cache)
    if pack_weights is not None:
        model.pack_weights(pack_weights)
    convert_model_weights(model, weights)
    use_kernels(model, kernels)
    return model, extras


def _load(source: str | Path, device: str | torch.device, dtype: str | torch.dtype, backend: Backend
          ) -> tuple[CausalLM, ModelExtras]:  # fmt: skip
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if backend not in ("auto", "native", "hf"):
        raise ConfigError(f"backend={backend!r}: expected 'auto', 'native' or 'hf'")
    if backend == "hf":
        from decodekit.models.hf import import_transformers

        import_transformers()  # without it, say how to install it rather than load anything natively
    if isinstance(source, str) and source == DEFAULT_MODEL_NAME:  # a Path named "default" is a path
        if backend == "hf":
            raise ConfigError("backend='hf' needs a Hugging Face model folder; 'default' is decodekit's own GPT")
        model, extras = load_default_model()
        return ready_for_decoding(model, torch_device, torch_dtype), extras

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(_not_found(source, path))
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if backend == "hf":
        require_hf_folder(path, config)

    if path.is_dir():
        if config is not None:
            if "model_type" in config:
                return load_hf_folder(path, config, torch_device, torch_dtype, backend)
            weights = folder_safetensors(path)
            model, extras = load_safetensors(weights, config, path / "config.json")
            return ready_for_decoding(model, torch_device, torch_dtype), extras
        path = find_latest_checkpoint(path)
        logger.info("decodekit: loading the newest checkpoint in the folder: %s", path)
    if path.suffix == ".safetensors":
        config_path = sibling_config(path)
        model, extras = load_safetensors([path], read_json(config_path), config_path)
    elif path.suffix == ".gguf":
        from decodekit.models.gguf import load_gguf

        model, extras = load_gguf(path)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        model, extras = load_torch_checkpoint(path)
    else:
        raise ModelLoadError(
            f"{path}: unknown model file type {path.suffix!r}: expected .safetensors, .gguf or "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return ready_for_decoding(model, torch_device, torch_dtype), extras


def _not_found(source: str | Path, path: Path) -> str:
    """The one line for a source that is no file or folder (and, if it looks like one, no name)."""
    where = str(path) if path.is_absolute() else f"{path} ({path.absolute()})"
    message = f"model not found: no file or folder at {where}"
    if isinstance(source, str) and "/" not in source and "\\" not in source and not path.suffix:
        message += f"; nor is {source!r} a model name (the one built in is {DEFAULT_MODEL_NAME!r})"
    return message + "; models are never downloaded"


def find_latest_checkpoint(folder: Path) -> Path:
    """The newest checkpoint under ``folder`` (two levels deep): highest step number, then mtime.

    The step number is the last run of digits in the file name (``snapshot_001200.pt`` ->
    1200); a name without one (``ckpt.pt``) ranks below any numbered file.
    """
    candidates = [
        p
        for pattern in ("*", "*/*")
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix in (*CHECKPOINT_SUFFIXES, ".safetensors")
    ]
    if not candidates:
        raise ModelLoadError(
            f"{folder}: no model found: expected config.json with weights, or checkpoint files "
            f"({', '.join((*CHECKPOINT_SUFFIXES, '.safetensors'))})"
        )

    def rank(p: Path) -> tuple[int, float, str]:
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.stat().st_mtime, str(p))

    return max(candidates, key=rank)


