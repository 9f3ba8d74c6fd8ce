"""Read llama.cpp's GGUF files: GPT-2 into the native :class:`GPT`, Llama into the native :class:`Llama`.

``load_model("model.gguf")`` (``decode model=gguf model.path=model.gguf``) comes here. The file
is read with the ``gguf`` package (``pip install 'decodekit[gguf]'``), memory-mapped; the
architecture comes from ``general.architecture`` and the shape from its ``{arch}.*`` keys.
Tensor types F32, F16, BF16 and Q8_0 are read; every weight becomes float32 (Q8_0: each block
of 32 int8 values times its float16 scale, exactly as llama.cpp dequantises it).
:func:`read_q8_0` hands out the int8 values and scales themselves, for a weight-only int8 path
that keeps them. The tokenizer in the file's metadata is named in ``extras.tokenizer``
(:mod:`decodekit.models.gguf_tokenizer`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from decodekit.errors import ModelLoadError
from decodekit.models.checkpoints import ModelExtras, build_gpt, first_line
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.models.llama import Llama, LlamaConfig, Rotary

__all__ = ["ARCHITECTURES", "GGUFFile", "TENSOR_TYPES", "import_gguf", "load_gguf", "read_q8_0"]

ARCHITECTURES = ("gpt2", "llama")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0")
Q8_0_BLOCK = 32  # values per Q8_0 block: one float16 scale, then 32 int8 values (34 bytes)
_MISSING = object()

# GGUF tensor names (llama.cpp's) -> the native models' parameter names; "{i}" is the block
GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{g}.{p}": f"transformer.h.{{i}}.{n}.{p}" for g, n in (
        ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
        ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")) for p in ("weight", "bias")},
}  # fmt: skip
LLAMA_NAMES = {
    "token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight",
    **{f"blk.{{i}}.{g}.weight": f"layers.{{i}}.{n}.weight" for g, n in (
        ("attn_norm", "attention_norm"), ("attn_q", "attention.wq"), ("attn_k", "attention.wk"),
        ("attn_v", "attention.wv"), ("attn_output", "attention.wo"), ("ffn_norm", "ffn_norm"),
        ("ffn_gate", "feed_forward.w1"), ("ffn_up", "feed_forward.w3"), ("ffn_down", "feed_forward.w2"))},
}  # fmt: skip


def import_gguf() -> Any:
    """The ``gguf`` package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("GGUF files need the gguf package: pip install 'decodekit[gguf]'") from None
    return gguf


def tensor_names(table: dict[str, str], n_layer: int) -> dict[str, str]:
    """``table`` with ``{i}`` expanded for every block: GGUF name -> native name."""
    names = {}
    for gguf_name, native in table.items():
        blocks = range(n_layer) if "{i}" in gguf_name else [0]
        names.update({gguf_name.format(i=i): native.format(i=i) for i in blocks})
    return names


class GGUFFile:
    """One GGUF file: its metadata (:meth:`value`) and its tensors as float32 (:meth:`tensor`)."""

    def __init__(self, path: str | Path) -> None:
        gguf = import_gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError, KeyError, OSError... on damaged files
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {first_line(e)})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture"))

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """The metadata value under ``key`` (strings decoded, arrays as lists)."""
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise ModelLoadError(f"{self.path}: the metadata key {key!r} is missing")
            return default
        return field.contents()

    def type_of(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in PyTorch's layout (``[out, in]`` for a weight), as float32."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: the tensor {name!r} is missing")
        kind, shape = t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind == "Q8_0":
            values, scales = read_q8_0(self, name)
            blocks = values.float().unflatten(-1, (-1, Q8_0_BLOCK)) * scales.float()[..., None]
            return blocks.flatten(-2)
        if kind not in TENSOR_TYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has type {kind}, which decodekit does not read: "
                f"expected one of {', '.join(TENSOR_TYPES)} (convert the file with llama.cpp's llama-quantize)"
            )
        data = torch.from_numpy(np.array(t.data))  # a copy: the file stays read-only and mapped
        if kind == "BF16":  # stored as raw bytes
            data = data.view(torch.bfloat16)
        return data.reshape(shape).float()

    def types(self) -> dict[str, int]:
        """How many tensors of each type the file holds, e.g. ``{"Q8_0": 72, "F32": 98}``."""
        return dict(Counter(t.tensor_type.name for t in self.reader.tensors))


def read_q8_0(file: GGUFFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor as int8 values ``[*shape]`` and float16 scales ``[*shape[:-1], shape[-1] / 32]``.

    ``values * scales`` (each scale repeated over its 32 values) is the tensor. This is where a
    weight-only int8 path would take Q8_0 weights without dequantising them.
    """
    t = file.tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    raw = torch.from_numpy(np.array(t.data)).view(-1, 2 + Q8_0_BLOCK)  # [blocks, 34] bytes
    scales = raw[:, :2].contiguous().view(torch.float16).reshape(*shape[:-1], shape[-1] // Q8_0_BLOCK)
    values = raw[:, 2:].contiguous().view(torch.int8).reshape(shape)
    return values, scales


# ------------------------------------------------------------------------------ architectures


def _config(cls: type[Any], where: Path, **fields: Any) -> Any:
    try:
        return cls(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ModelLoadError(f"{where}: bad {cls.__name__[:-6]} shape in the metadata: {problems}") from None


def _state(file: GGUFFile, names: dict[str, str], optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the file under its native name; an unknown or missing tensor is one line."""
    unknown = sorted(set(file.tensors) - set(names))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ModelLoadError(
            f"{file.path}: tensors the {file.architecture} reader does not know: {', '.join(unknown[:3])}{more}"
        )
    missing = sorted(set(names) - set(file.tensors) - set(optional))
    if missing:
        raise ModelLoadError(f"{file.path}: {file.architecture} tensors missing: {', '.join(missing[:3])}")
    return {native: file.tensor(name) for name, native in names.items() if name in file.tensors}


def _gpt2(file: GGUFFile) -> GPT:
    """llama.cpp's gpt2: pre-LayerNorm blocks with biases, the tanh GELU, a fused q/k/v."""
    arch, where = "gpt2", file.path
    n_embd = int(file.value(f"{arch}.embedding_length"))
    n_ff = int(file.value(f"{arch}.feed_forward_length", 4 * n_embd))
    if n_ff != 4 * n_embd:
        raise ModelLoadError(f"{where}: gpt2.feed_forward_length={n_ff}: the native GPT needs 4 x embedding_length ({4 * n_embd})")
    n_layer = int(file.value(f"{arch}.block_count"))
    config = _config(
        GPTConfig, where, block_size=int(file.value(f"{arch}.context_length")), n_layer=n_layer, n_embd=n_embd,
        vocab_size=int(file.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in file.tensors else 1,
        n_head=int(file.value(f"{arch}.attention.head_count")), bias=True, activation="gelu_tanh",
        layer_norm_eps=float(file.value(f"{arch}.attention.layer_norm_epsilon", 1e-5)),
    )  # fmt: skip
    state = _state(file, tensor_names(GPT2_NAMES, n_layer), optional=("output.weight",))
    return build_gpt(config, state, str(where))  # an output.weight must equal token_embd (tied head)


ROPE_SCALINGS = ("none", "linear")


def _llama(file: GGUFFile) -> Llama:
    """llama.cpp's llama: RMSNorm, RoPE on adjacent pairs, SwiGLU, grouped-query attention."""
    arch, where = "llama", file.path
    n_head = int(file.value(f"{arch}.attention.head_count"))
    n_layer = int(file.value(f"{arch}.block_count"))
    scaling = str(file.value(f"{arch}.rope.scaling.type", "none"))
    if scaling not in ROPE_SCALINGS:
        raise ModelLoadError(f"{where}: llama.rope.scaling.type={scaling!r} is not supported: decodekit applies {', '.join(ROPE_SCALINGS)}")
    rope_dim = file.value(f"{arch}.rope.dimension_count", None)
    config = _config(
        LlamaConfig, where, block_size=int(file.value(f"{arch}.context_length")), n_layer=n_layer,
        vocab_size=int(file.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in file.tensors else 1,
        n_embd=int(file.value(f"{arch}.embedding_length")), n_head=n_head,
        n_kv_head=int(file.value(f"{arch}.attention.head_count_kv", n_head)),
        intermediate_size=int(file.value(f"{arch}.feed_forward_length")),
        rms_norm_eps=float(file.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(file.value(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=None if rope_dim is None else int(rope_dim), rope_scaling=scaling,
        rope_scale=float(file.value(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        tie_embeddings="output.weight" not in file.tensors,
    )  # fmt: skip
    names = tensor_names(LLAMA_NAMES, n_layer) | {"rope_freqs.weight": "rope_freqs"}
    state = _state(file, names, optional=("output.weight", "rope_freqs.weight"))
    freq_factors = state.pop("rope_freqs", None)
    with torch.device("meta"):
        model = Llama(config)
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(f"{where}: {key} has shape {tuple(tensor.shape)}; the metadata needs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if freq_factors is not None and freq_factors.numel() != model.rotary.dim // 2:
        raise ModelLoadError(f"{where}: rope_freqs.weight has {freq_factors.numel()} values; expected {model.rotary.dim // 2}")
    model.rotary = Rotary(config, freq_factors)
    return model


READERS = {"gpt2": _gpt2, "llama": _llama}


def load_gguf(path: str | Path) -> tuple[GPT | Llama, ModelExtras]:
    """The model in a GGUF file (float32 weights) and what its metadata says."""
    file = GGUFFile(path)
    arch = file.architecture
    reader = READERS.get(arch)
    if reader is None:
        raise ModelLoadError(f"{file.path}: GGUF architecture {arch!r} is not supported: decodekit reads {', '.join(ARCHITECTURES)}")
    model = reader(file)
    tokenizer = {"kind": "gguf", "path": str(file.path)} if file.value("tokenizer.ggml.model", None) else None
    metadata = {"architecture": arch, "name": file.value("general.name", None), "tensor_types": file.types()}
    return model, ModelExtras(source=str(file.path), format="gguf", tokenizer=tokenizer, metadata=metadata)
