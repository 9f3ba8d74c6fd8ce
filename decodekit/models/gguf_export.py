"""Write a native :class:`GPT` or :class:`Llama` as a GGUF file that llama.cpp and decodekit load.

:func:`write_gguf` stores the weights as F32, F16, BF16 or Q8_0 (quantised by the ``gguf``
package, as llama.cpp's converter does; norms and biases stay F32, as llama.cpp keeps them) and
a byte-level BPE vocabulary of the model's size (:func:`byte_level_vocab`): the 256 bytes in
GPT-2's byte-to-character mapping, pair merges to fill the vocabulary, ``<|endoftext|>`` last.
For a byte-level model (the embedded default model: 256 bytes and an end-of-text id 256) that
vocabulary *is* its tokenizer (with no merges, which decodekit reads and llama.cpp refuses: it
needs at least one); for other models it only makes the file complete.
``tools/export_gguf.py`` is the command-line form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from decodekit.errors import ConfigError
from decodekit.models.gguf import GPT2_NAMES, LLAMA_NAMES, Q8_0_BLOCK, TENSOR_TYPES, import_gguf, tensor_names
from decodekit.models.gpt import GPT
from decodekit.models.llama import Llama

__all__ = ["byte_level_vocab", "bytes_to_unicode", "write_gguf"]

EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[str]]:
    """Tokens and merges of a byte-level BPE vocabulary of ``vocab_size`` (>= 257) entries."""
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size}: a byte-level vocabulary needs at least 257 tokens")
    alphabet = list(bytes_to_unicode().values())
    merges = [f"{a} {b}" for a in alphabet for b in alphabet][: vocab_size - 257]
    if len(merges) < vocab_size - 257:
        raise ConfigError(f"vocab_size={vocab_size}: at most {257 + len(merges)} tokens")
    return [*alphabet, *(m.replace(" ", "") for m in merges), EOS], merges


def _gguf_array(tensor: torch.Tensor, tensor_type: str, name: str) -> tuple[np.ndarray, object]:
    """The numpy data and GGML type of one tensor, converted as llama.cpp's converter does."""
    gguf = import_gguf()
    data = tensor.detach().float().cpu().contiguous().numpy()
    if tensor.dim() == 1 or tensor_type == "F32":  # norms and biases stay F32
        return data, gguf.GGMLQuantizationType.F32
    if tensor_type == "F16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if tensor_type == "Q8_0" and data.shape[-1] % Q8_0_BLOCK:
        raise ConfigError(f"tensor_type='Q8_0': {name} has rows of {data.shape[-1]} values; Q8_0 needs multiples of 32")
    qtype = gguf.GGMLQuantizationType[tensor_type]
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(model: GPT | Llama, path: str | Path, *, tensor_type: str = "F32", name: str = "decodekit") -> Path:
    """Write ``model`` to ``path`` as GGUF with ``tensor_type`` (F32, F16, BF16, Q8_0) weights."""
    gguf = import_gguf()
    if tensor_type not in TENSOR_TYPES:
        raise ConfigError(f"tensor_type={tensor_type!r} is not allowed: must be one of {', '.join(TENSOR_TYPES)}")
    path, c = Path(path), model.config
    if isinstance(model, GPT):
        if not c.bias or c.activation != "gelu_tanh":
            raise ConfigError("write_gguf: llama.cpp's gpt2 has biases and the tanh GELU; this GPT has "
                              f"bias={c.bias}, activation={c.activation!r}")  # fmt: skip
        arch, names = "gpt2", tensor_names(GPT2_NAMES, c.n_layer)
        del names["output.weight"]  # tied to token_embd: llama.cpp reuses it
    elif isinstance(model, Llama):
        arch, names = "llama", tensor_names(LLAMA_NAMES, c.n_layer)
        if c.tie_embeddings:
            del names["output.weight"]
    else:
        raise ConfigError(f"write_gguf: expected a decodekit GPT or Llama, got {type(model).__name__}")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_layer_norm_eps(c.layer_norm_eps)
    else:
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count_kv(c.n_kv_head)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.rope_dim or c.head_dim)
    tokens, merges = byte_level_vocab(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    state = model.state_dict()
    for gguf_name, native in names.items():
        data, qtype = _gguf_array(state[native], tensor_type, gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
