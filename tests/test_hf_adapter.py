"""Hugging Face GPT-2 folders give transformers' logits, natively converted or through HFCausalLM."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from decodekit.errors import ConfigError, ModelLoadError  # noqa: E402
from decodekit.models import GPT, CausalLM, GPTConfig, HFCausalLM, load_model  # noqa: E402

IDS = torch.tensor([[5, 17, 99, 0, 42, 42, 7, 63], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A small random GPT2LMHeadModel saved with save_pretrained, and the model itself."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # [B, T, V]


def test_gpt2_folder_loads_as_native_gpt_with_the_same_logits(gpt2_folder) -> None:
    folder, hf_model = gpt2_folder
    model, extras = load_model(folder, device="cpu")
    assert isinstance(model, GPT) and extras.format == "hf-gpt2"
    assert (model.vocab_size, model.max_context) == (100, 64)
    torch.testing.assert_close(model(IDS), reference_logits(hf_model, IDS), atol=1e-5, rtol=1e-5)


def test_gpt2_gelu_form_follows_activation_function(gpt2_folder, tmp_path: Path) -> None:
    assert load_model(gpt2_folder[0], device="cpu")[0].config.activation == "gelu_tanh"  # gelu_new
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, activation_function="gelu")
    exact = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # weights large enough for the two GELU forms to differ in the logits
        for p in exact.parameters():
            p.mul_(10.0)
    exact.save_pretrained(tmp_path)
    model, extras = load_model(tmp_path, device="cpu")
    assert isinstance(model, GPT) and extras.format == "hf-gpt2" and model.config.activation == "gelu"
    torch.testing.assert_close(model(IDS), reference_logits(exact, IDS), atol=1e-4, rtol=1e-5)


def test_gpt2_pytorch_model_bin_loads_too(gpt2_folder, tmp_path: Path) -> None:
    folder, hf_model = gpt2_folder
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load_model(tmp_path, device="cpu")
    torch.testing.assert_close(model(IDS), reference_logits(hf_model, IDS), atol=1e-5, rtol=1e-5)


def test_native_cached_steps_match_transformers(gpt2_folder) -> None:
    folder, hf_model = gpt2_folder
    model, _ = load_model(folder, device="cpu")
    expected = reference_logits(hf_model, IDS)
    cache = model.new_cache(2, 8)
    logits, cache = model.step(IDS[:, :5], position_ids=torch.arange(5).expand(2, 5),
                               attention_mask=torch.ones(2, 5, dtype=torch.bool), cache=cache)
    for t in range(5, 8):
        logits, cache = model.step(IDS[:, t : t + 1], position_ids=torch.full((2, 1), t),
                                   attention_mask=torch.ones(2, t + 1, dtype=torch.bool), cache=cache)
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-5)


def test_adapter_steps_match_transformers(gpt2_folder) -> None:
    folder, hf_model = gpt2_folder
    model, extras = load_model(folder, device="cpu", backend="hf")
    assert isinstance(model, HFCausalLM) and isinstance(model, CausalLM) and extras.format == "hf"
    assert (model.vocab_size, model.max_context, model.dtype) == (100, 64, torch.float32)
    expected = reference_logits(hf_model, IDS)
    cache = model.new_cache(2, 8)
    logits, cache = model.step(IDS[:, :6], position_ids=torch.arange(6).expand(2, 6),
                               attention_mask=torch.ones(2, 6, dtype=torch.bool), cache=cache)
    torch.testing.assert_close(logits, expected[:, 5], atol=1e-5, rtol=1e-5)
    cache = model.reorder_cache(cache, torch.tensor([1, 1]))  # both rows now continue row 1
    logits, cache = model.step(IDS[1:, 6:7].expand(2, 1), position_ids=torch.full((2, 1), 6),
                               attention_mask=torch.ones(2, 7, dtype=torch.bool), cache=cache)
    torch.testing.assert_close(logits, expected[1, 6].expand(2, -1), atol=1e-5, rtol=1e-5)


def test_adapter_and_native_agree_on_a_left_padded_batch(gpt2_folder) -> None:
    folder, _ = gpt2_folder
    native, _ = load_model(folder, device="cpu")
    adapter = HFCausalLM.from_pretrained(folder)
    ids = IDS.clone()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # row 0 is a 5-token prompt, left-padded
    position_ids = mask.long().cumsum(-1) - 1
    for model in (native, adapter):
        logits, _ = model.step(ids, position_ids=position_ids, attention_mask=mask, cache=model.new_cache(2, 8))
        alone = native(ids[:1, 3:])[0, -1]
        torch.testing.assert_close(logits[0], alone, atol=1e-5, rtol=1e-5)


class Exploit:
    """Unpickling this would create ``marker`` (it never must)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_backend_hf_refuses_a_pickle_with_code_in_one_line_naming_the_file(gpt2_folder, tmp_path: Path) -> None:
    _, hf_model = gpt2_folder
    folder, marker = tmp_path / "model", tmp_path / "ran"
    hf_model.config.save_pretrained(folder)
    torch.save({**hf_model.state_dict(), "payload": Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"^{folder}/pytorch_model\.bin: refused to load: the checkpoint holds "
                                             r"pickled objects other than tensors \(.*\), which could run code"):
        load_model(folder, device="cpu", backend="hf")
    assert not marker.exists()


def test_backend_hf_needs_a_hugging_face_folder(tmp_path: Path) -> None:
    native = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    torch.save({"model_config": native.config.model_dump(), "model_state_dict": native.state_dict()}, tmp_path / "m.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": native.config.model_dump()}))
    with pytest.raises(ConfigError, match=rf"backend='hf' needs a Hugging Face model folder .*; {tmp_path} has a "
                                          r"config.json without model_type \(decodekit's own GPT format\)"):
        load_model(tmp_path, device="cpu", backend="hf")
    with pytest.raises(ConfigError, match=rf"{tmp_path}/m.pt is a file"):
        load_model(tmp_path / "m.pt", device="cpu", backend="hf")
    with pytest.raises(ConfigError, match="'default' is decodekit's own GPT"):
        load_model("default", device="cpu", backend="hf")


def test_a_transformers_older_than_the_tested_range_is_one_line(gpt2_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.45.2")  # the module import gives now
    with pytest.raises(ModelLoadError, match=r"^Hugging Face models need transformers >= 4\.56; found 4\.45\.2: "
                                             r"pip install -U 'decodekit\[hf\]'$"):
        load_model(gpt2_folder[0], device="cpu", backend="hf")


def test_native_backend_refuses_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="model_type='llama' has no native implementation"):
        load_model(tmp_path, device="cpu", backend="native")


def test_gpt2_variants_the_native_gpt_lacks_go_to_the_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, scale_attn_by_inverse_layer_idx=True)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model, extras = load_model(tmp_path, device="cpu")
    assert isinstance(model, HFCausalLM) and extras.format == "hf"
    logits, _ = model.step(IDS[:, :4] % 50, position_ids=torch.arange(4).expand(2, 4),
                           attention_mask=torch.ones(2, 4, dtype=torch.bool), cache=model.new_cache(2, 4))
    torch.testing.assert_close(logits, reference_logits(hf_model, IDS[:, :4] % 50)[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelLoadError, match="scale_attn_by_inverse_layer_idx=true is not supported natively"):
        load_model(tmp_path, device="cpu", backend="native")


def test_packed_weights_for_a_hugging_face_model_keep_its_logits_and_tokens(tmp_path: Path) -> None:
    """pack_weights turns the adapter's nn.Linear layers into packing ones (off by default):
    same state dict, logits to float rounding, the same greedy tokens; off again frees the packs."""
    from decodekit import generate
    from decodekit.models.packing import Linear

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    plain, _ = load_model(tmp_path, device="cpu", kernels="library")
    packed, _ = load_model(tmp_path, device="cpu", pack_weights=True)
    assert isinstance(packed, HFCausalLM) and not any(isinstance(m, Linear) for m in plain.model.modules())
    layers = [m for m in packed.model.modules() if isinstance(m, Linear)]
    assert len(layers) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert packed.model.state_dict().keys() == plain.model.state_dict().keys()
    for layer in layers:
        layer.min_macs = 0  # pack whatever the size: this model is tiny
    with torch.no_grad():
        torch.testing.assert_close(packed.model(IDS).logits, plain.model(IDS).logits, atol=1e-5, rtol=1e-5)
    assert all(layer._pack is not None for layer in layers)
    a = generate(plain, IDS, max_new_tokens=12)
    b = generate(packed, IDS, max_new_tokens=12)
    assert torch.equal(a.tokens, b.tokens)
    packed.pack_weights(False)
    assert all(layer._pack is None and not layer.packing for layer in layers)
    with pytest.raises(ConfigError, match="pack_weights='yes' is not allowed"):
        load_model(tmp_path, device="cpu", pack_weights="yes")
