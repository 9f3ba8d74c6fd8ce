"""GGUF files: small GPT-2 and Llama models written on the fly, read back to the source's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decodekit import ConfigError, ModelLoadError
from decodekit.models import GPT, GPTConfig, load_model
from decodekit.models.gguf import GGUFFile, read_q8_0
from decodekit.models.gguf_export import write_gguf
from decodekit.models.llama import Llama, LlamaConfig

gguf = pytest.importorskip("gguf")

# largest logit error allowed per tensor type against the float32 source, as a fraction of the
# largest |logit|: F32 exact; F16 keeps 11 significant bits, BF16 8, Q8_0 8 per block of 32
# (measured here: F16 3e-4 to 7e-4, BF16 2e-3 to 7e-3, Q8_0 9e-3 to 3.1e-2)
TOLERANCE = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 5e-2}
TYPES = list(TOLERANCE)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_llama(**changes: object) -> Llama:
    torch.manual_seed(0)
    fields = dict(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, rope_theta=500.0)
    model = Llama(LlamaConfig(**(fields | changes))).eval()
    for p in model.parameters():  # a trained model's scale, not torch's default init
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return model


MODELS = {"gpt2": tiny_gpt, "llama": tiny_llama, "llama-tied": lambda: tiny_llama(tie_embeddings=True)}


@pytest.mark.parametrize("tensor_type", TYPES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_gguf_logits_match_the_float32_source(tmp_path: Path, arch: str, tensor_type: str) -> None:
    source = MODELS[arch]()
    path = write_gguf(source, tmp_path / f"{arch}.gguf", tensor_type=tensor_type)
    model, extras = load_model(path, device="cpu")
    assert type(model) is type(source) and extras.format == "gguf"
    assert extras.metadata["architecture"] == arch.split("-")[0]
    assert extras.metadata["tensor_types"].get(tensor_type, 0) >= 2 * 4  # the blocks' weights have that type
    ids = torch.randint(0, 300, (2, 24))
    expected, got = source(ids), model(ids)
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[tensor_type], f"{arch} {tensor_type}: logits differ by {error} of the largest"
    if tensor_type != "F32":
        assert error > 0  # the file really holds the lower precision


def test_gguf_model_decodes_the_same_tokens_as_its_source(tmp_path: Path) -> None:
    from decodekit import generate

    source = tiny_llama()
    model, _ = load_model(write_gguf(source, tmp_path / "m.gguf"), device="cpu")
    prompt = torch.tensor([[1, 5, 9, 200, 7]])
    assert generate(model, prompt, max_new_tokens=12).sequences.tolist() == generate(source, prompt, max_new_tokens=12).sequences.tolist()


def test_q8_0_values_and_scales_are_llama_cpp_blocks(tmp_path: Path) -> None:
    source = tiny_gpt()
    file = GGUFFile(write_gguf(source, tmp_path / "q8.gguf", tensor_type="Q8_0"))
    values, scales = read_q8_0(file, "blk.0.ffn_down.weight")
    weight = source.transformer.h[0].mlp.c_proj.weight  # [32, 128]: 4 blocks of 32 per row
    assert values.dtype == torch.int8 and values.shape == (32, 128) and scales.shape == (32, 4)
    blocks = weight.detach().unflatten(-1, (4, 32))
    # llama.cpp: scale = max |w| / 127 per block, value = round(w / scale)
    torch.testing.assert_close(scales.float(), (blocks.abs().amax(-1) / 127).half().float())
    assert values.abs().amax() == 127
    torch.testing.assert_close(file.tensor("blk.0.ffn_down.weight"), (values.unflatten(-1, (4, 32)).float() * scales.float()[..., None]).flatten(-2))


def test_the_cli_decodes_a_gguf_file_with_its_own_tokenizer(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    path = write_gguf(tiny_gpt(), tmp_path / "m.gguf", tensor_type="Q8_0")
    out = tmp_path / "out.jsonl"
    args = ["model=gguf", f"model.path={path}", "prompt=hello", "strategy=greedy", "max_new_tokens=4", f"output_file={out}", "quiet=true"]
    done = subprocess.run([sys.executable, "-m", "decodekit.cli.main", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"prompt": "hello"' in out.read_text()


def test_byte_level_vocabulary_tokenizes_as_the_byte_tokenizer(tmp_path: Path) -> None:
    from decodekit.tokenization import ByteTokenizer, load_tokenizer

    _, extras = load_model(write_gguf(tiny_gpt(), tmp_path / "m.gguf"), device="cpu")
    tokenizer = load_tokenizer("auto", extras)
    text = "Once upon a time, naïve café\n\t€"
    assert tokenizer.encode(text) == ByteTokenizer().encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == 299


def _write(path: Path, arch: str, tensors: dict[str, object], **keys: object) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "falcon.gguf", "falcon", {"token_embd.weight": torch.zeros(8, 4).numpy()})
    with pytest.raises(ModelLoadError, match=r"architecture 'falcon' is not supported: decodekit reads gpt2, llama"):
        load_model(path, device="cpu")


def test_an_unsupported_tensor_type_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "q4.gguf"
    write_gguf(tiny_gpt(), path, tensor_type="F32")
    file = GGUFFile(path)
    writer = gguf.GGUFWriter(str(tmp_path / "q4_0.gguf"), "gpt2")
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length"):
        getattr(writer, f"add_{key}")(file.value(f"gpt2.{key}"))
    writer.add_head_count(2)
    for name in file.tensors:
        data = file.tensor(name).numpy()
        if name == "blk.1.ffn_up.weight":
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'blk.1.ffn_up.weight' has type Q4_0, which decodekit does not read: expected one of F32, F16, BF16, Q8_0"):
        load_model(tmp_path / "q4_0.gguf", device="cpu")


def test_a_damaged_file_and_unknown_tensors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match=r"bad.gguf: not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf", device="cpu")
    path = _write(tmp_path / "odd.gguf", "llama", {"blk.0.attn_qkv.weight": torch.zeros(8, 4).numpy()},
                  context_length=8, embedding_length=4, block_count=1, head_count=1, feed_forward_length=8)  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"tensors the llama reader does not know: blk.0.attn_qkv.weight"):
        load_model(path, device="cpu")


def test_q8_0_needs_rows_of_whole_blocks() -> None:
    with pytest.raises(ConfigError, match=r"Q8_0 needs multiples of 32"):
        write_gguf(tiny_llama(intermediate_size=48), Path("never-written.gguf"), tensor_type="Q8_0")


def test_export_tool_writes_the_embedded_model_that_loads_back_exactly(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_gguf", Path(__file__).parents[1] / "tools" / "export_gguf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["default", str(tmp_path / "default.gguf")]) == 0
    source, _ = load_model("default", device="cpu")
    model, extras = load_model(tmp_path / "default.gguf", device="cpu")
    ids = torch.randint(0, 257, (2, 30))
    assert torch.equal(model(ids), source(ids))
    assert extras.tokenizer == {"kind": "gguf", "path": str(tmp_path / "default.gguf")}


@pytest.mark.parametrize("arch", ["gpt2", "llama-tied"])
def test_loaded_float32_weights_are_column_major_and_saved_contiguous(tmp_path: Path, arch: str) -> None:
    from safetensors.torch import save_file

    from decodekit import generate
    from decodekit.models.packing import Linear

    source = MODELS[arch]()
    model, _ = load_model(write_gguf(source, tmp_path / "m.gguf"), device="cpu", kernels="library")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)  # [in, out] storage
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())  # the same values
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "m.safetensors"))  # writers take it
    prompt = torch.tensor([[1, 5, 9, 200, 7]])  # one row: each step multiplies by column-major weights
    assert generate(model, prompt, max_new_tokens=12).sequences.tolist() == generate(source, prompt, max_new_tokens=12).sequences.tolist()
