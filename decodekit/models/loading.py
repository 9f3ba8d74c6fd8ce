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
  newest is taken, by the step number in its name, then by modification time.

Pickled files are only ever read with ``torch.load(..., weights_only=True)``: a checkpoint
holding anything but tensors and plain containers (code, custom classes) is refused, and
nanoGPT's ``meta.pkl`` is never read. Every failure is one :class:`ModelLoadError` or
:class:`ConfigError` line naming the file or the setting.
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
from typing import Any, Literal

import torch
from pydantic import ValidationError

from decodekit.errors import ConfigError, ModelLoadError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.models.protocol import CausalLM

__all__ = ["ModelExtras", "load_model", "resolve_device", "resolve_dtype", "find_latest_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Backend = Literal["auto", "native", "hf"]

# keys under which checkpoints keep their model shape and their weights, in order of preference
CONFIG_KEYS = ("model_args", "model_config", "config")
STATE_KEYS = ("model", "model_state_dict", "state_dict")
# Hugging Face GPT-2 stores these four as Conv1D, [in, out]: the transpose of nn.Linear
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face activation_function values -> GPTConfig.activation (gelu_fast is the tanh form too)
HF_GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
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

    Returns:
        ``(model, extras)``: a model in eval mode following
        :class:`~decodekit.models.protocol.CausalLM`, and :class:`ModelExtras`.

    Raises:
        ConfigError: a bad ``device``, ``dtype`` or ``backend``.
        ModelLoadError: a missing file, an unknown name, an unrecognised or unsafe
            checkpoint, or weights that do not fit their config.
    """
    if pack_weights is not None and not isinstance(pack_weights, bool):
        raise ConfigError(f"pack_weights={pack_weights!r} is not allowed: must be true, false or null")
    model, extras = _load(source, device, dtype, backend)
    if pack_weights is not None:
        model.pack_weights(pack_weights)
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
        model, extras = _load_default()
        return _finish(model, torch_device, torch_dtype), extras

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(_not_found(source, path))
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if backend == "hf" and (config is None or "model_type" not in config):
        if path.is_file():
            what = "is a file"
        elif config is None:
            what = "has no config.json"
        else:
            what = "has a config.json without model_type (decodekit's own GPT format)"
        raise ConfigError(f"backend='hf' needs a Hugging Face model folder (config.json with model_type); {path} {what}")

    if path.is_dir():
        if config is not None:
            if "model_type" in config:
                return _load_hf_folder(path, config, torch_device, torch_dtype, backend)
            weights = _folder_safetensors(path)
            model, extras = _load_safetensors(weights, config, path / "config.json")
            return _finish(model, torch_device, torch_dtype), extras
        path = find_latest_checkpoint(path)
        logger.info("decodekit: loading the newest checkpoint in the folder: %s", path)
    if path.suffix == ".safetensors":
        config_path = _sibling_config(path)
        model, extras = _load_safetensors([path], _read_json(config_path), config_path)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        model, extras = _load_torch_checkpoint(path)
    else:
        raise ModelLoadError(
            f"{path}: unknown model file type {path.suffix!r}: expected .safetensors or "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return _finish(model, torch_device, torch_dtype), extras


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


# ------------------------------------------------------------------------------ formats


def _load_default() -> tuple[GPT, ModelExtras]:
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
    model = _build_gpt(_gpt_config(config, str(config_file)), state, str(weights))
    return model, _extras(config, str(weights), "default")


def _load_torch_checkpoint(path: Path) -> tuple[GPT, ModelExtras]:
    """A nanoGPT ``ckpt.pt`` or a plain ``{"model_config", "model_state_dict"}`` file."""
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    config_key = next((k for k in CONFIG_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    state_key = next((k for k in STATE_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if config_key is None or state_key is None:
        if _is_state_dict(checkpoint) and (path.parent / "config.json").is_file():
            config_path = path.parent / "config.json"
            model = _build_gpt(_gpt_config(_read_json(config_path), str(config_path)), checkpoint, str(path))
            return model, _extras(_read_json(config_path), str(path), "torch")
        found = ", ".join(map(str, list(checkpoint)[:8])) or "nothing"
        raise ModelLoadError(
            f"{path}: unrecognised checkpoint layout: expected a config under one of "
            f"{CONFIG_KEYS} and weights under one of {STATE_KEYS}; found keys {found}"
        )
    fmt = "nanogpt" if config_key == "model_args" else "torch"
    args = dict(checkpoint[config_key])
    if fmt == "nanogpt":
        args.setdefault("activation", "gelu")  # nanoGPT's MLP: nn.GELU(), the exact form
    model = _build_gpt(_gpt_config(args, str(path)), checkpoint[state_key], str(path))
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


def _load_safetensors(files: list[Path], config: dict[str, Any], config_path: Path) -> tuple[GPT, ModelExtras]:
    """Native GPT weights in safetensors with a decodekit or flat GPTConfig JSON."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({_first_line(e)})") from None
    model = _build_gpt(_gpt_config(config, str(config_path)), state, str(files[0]))
    return model, _extras(config, str(files[0]), "safetensors")


def _load_hf_folder(
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
        model = _build_gpt(_gpt2_config(config, path / "config.json"), _convert_hf_gpt2(state), str(path))
        extras = ModelExtras(source=str(path), format="hf-gpt2", tokenizer=tokenizer, metadata=config)
        return _finish(model, device, dtype), extras
    from decodekit.models.hf import HFCausalLM

    model = HFCausalLM.from_pretrained(path, device=device, dtype=dtype)
    return model, ModelExtras(source=str(path), format="hf", tokenizer=tokenizer, metadata=config)


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
        raise ModelLoadError(f"{where}: bad GPT-2 config: {_first_line(e)}") from None


def _extras(config: dict[str, Any], source: str, fmt: str) -> ModelExtras:
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


def _hf_tokenizer_spec(path: Path) -> dict[str, Any] | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return {"kind": "hf", "path": str(path)} if any((path / n).is_file() for n in names) else None


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
    return f"not a PyTorch checkpoint weights_only=True can read ({_first_line(detail)})"


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, every failure turned into one ModelLoadError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path}: {unpickling_problem(e)}") from None
    except Exception as e:  # torch raises KeyError, EOFError, RuntimeError... on damaged files
        raise ModelLoadError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})"
        ) from None


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's weights: model.safetensors (sharded or not) or pytorch_model.bin."""
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").is_file():
        state = _torch_load(path / "pytorch_model.bin")
        if not _is_state_dict(state):
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


def _folder_safetensors(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: config.json found but no .safetensors weights beside it")
    return files


def _build_gpt(config: GPTConfig, state: Mapping[str, torch.Tensor], where: str) -> GPT:
    """A GPT holding ``state``: prefixes stripped, mask buffers dropped, tied head filled in."""
    if not _is_state_dict(state):
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


def _finish(model: CausalLM, device: torch.device, dtype: torch.dtype) -> CausalLM:
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype).eval()
        model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------ small helpers


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _sibling_config(weights: Path) -> Path:
    for candidate in (weights.with_suffix(".json"), weights.parent / "config.json"):
        if candidate.is_file():
            return candidate
    expected = weights.with_suffix(".json").name
    raise ModelLoadError(f"{weights}: no config found beside it (expected {expected} or config.json)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON file ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__
