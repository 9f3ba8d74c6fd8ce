"""load_model reads every supported checkpoint layout, refuses unsafe pickles, and fails in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from decodekit.errors import ConfigError, ModelLoadError
from decodekit.models import GPT, GPTConfig, find_latest_checkpoint, load_model
from decodekit.tokenization import ByteTokenizer, check_vocab, load_tokenizer

ARGS = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, bias=True)
IDS = torch.tensor([[1, 5, 7, 2, 22, 0]])


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**ARGS)).eval()


def with_exact_gelu(model: GPT) -> GPT:
    """The same weights with nanoGPT's exact GELU (what a nanoGPT checkpoint of them runs with)."""
    exact = GPT(model.config.model_copy(update={"activation": "gelu"})).eval()
    exact.load_state_dict(model.state_dict())
    return exact


def assert_same_model(loaded, reference: GPT) -> None:
    assert isinstance(loaded, GPT) and not loaded.training
    torch.testing.assert_close(loaded(IDS), reference(IDS))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def nanogpt_checkpoint(model: GPT, **extra) -> dict:
    """What nanoGPT's train.py saves after torch.compile: prefixed keys, optimizer, config."""
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    return {
        "model": state,
        "model_args": dict(ARGS, dropout=0.1),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "iter_num": 500,
        "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": "shakespeare_char", "compile": True},
        **extra,
    }


# ------------------------------------------------------------------------------ formats


def test_nanogpt_checkpoint_with_orig_mod_prefix_and_char_vocab(tiny: GPT, tmp_path: Path) -> None:
    itos = {i: c for i, c in enumerate("abcdefghijklmnopqrstuvw")}
    path = tmp_path / "ckpt.pt"
    torch.save(nanogpt_checkpoint(tiny, itos=itos, stoi={c: i for i, c in itos.items()}), path)
    model, extras = load_model(path, device="cpu")
    assert_same_model(model, with_exact_gelu(tiny))
    assert extras.format == "nanogpt" and extras.source == str(path)
    assert extras.tokenizer == {"kind": "char", "vocab": list("abcdefghijklmnopqrstuvw")}
    assert extras.metadata["iter_num"] == 500 and "optimizer" not in extras.metadata
    tok = load_tokenizer("auto", extras)
    check_vocab(tok, model)
    assert tok.decode(tok.encode("cab")) == "cab"


def test_nanogpt_mask_buffers_are_dropped(tiny: GPT, tmp_path: Path) -> None:
    checkpoint = nanogpt_checkpoint(tiny)
    for i in range(ARGS["n_layer"]):  # nanoGPT registers these when flash attention is missing
        checkpoint["model"][f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    assert_same_model(load_model(tmp_path / "ckpt.pt", device="cpu")[0], with_exact_gelu(tiny))


def nanogpt_forward(state: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's model.py forward in eval mode, written out over a state dict: LayerNorm with
    eps 1e-5, the manual causal attention, ``nn.GELU()`` (the exact erf form), the head tied
    to ``wte``; logits at every position."""

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state.get(name + ".bias"), 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, state[name + ".weight"], state.get(name + ".bias"))

    B, T = idx.shape
    C, n_head = args["n_embd"], args["n_head"]
    causal = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(layer_norm(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(causal == 0, float("-inf")), dim=-1)
        x = x + linear((att @ v).transpose(1, 2).contiguous().view(B, T, C), p + "attn.c_proj")
        h = linear(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")
        x = x + linear(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0))), p + "mlp.c_proj")
    return F.linear(layer_norm(x, "transformer.ln_f"), state["transformer.wte.weight"])


def test_nanogpt_checkpoint_gives_nanogpts_logits_with_the_exact_gelu(tmp_path: Path) -> None:
    # weights far from GPT-2's 0.02 init, where the tanh GELU drifts from the exact one by ~1e-3
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.3 for k, v in GPT(GPTConfig(**ARGS)).state_dict().items()}
    for k in state:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[k] += 1.0
    state["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save({"model_args": dict(ARGS, dropout=0.0), "model": state}, tmp_path / "ckpt.pt")
    model, _ = load_model(tmp_path / "ckpt.pt", device="cpu")
    ids = torch.randint(0, ARGS["vocab_size"], (2, ARGS["block_size"]))
    expected = nanogpt_forward(state, ARGS, ids)
    assert model.config.activation == "gelu"
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
    logits, _ = model.step(ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids),
                           attention_mask=torch.ones_like(ids, dtype=torch.bool), cache=model.new_cache(2, 16))
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-5)
    tanh_form = GPT(GPTConfig(**ARGS)).eval()
    tanh_form.load_state_dict(state)
    assert (tanh_form(ids) - expected).abs().max() > 1e-4  # the check above can tell the two apart


def test_decodekit_formats_keep_the_tanh_gelu_unless_their_config_names_one(tiny: GPT, tmp_path: Path) -> None:
    torch.save({"model_config": ARGS, "model_state_dict": tiny.state_dict()}, tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt", device="cpu")[0].config.activation == "gelu_tanh"
    torch.save({"model_config": dict(ARGS, activation="gelu"), "model_state_dict": tiny.state_dict()}, tmp_path / "exact.pt")
    assert load_model(tmp_path / "exact.pt", device="cpu")[0].config.activation == "gelu"
    torch.save({"model_args": dict(ARGS, activation="gelu_tanh"), "model": tiny.state_dict()}, tmp_path / "ckpt.pt")
    assert_same_model(load_model(tmp_path / "ckpt.pt", device="cpu")[0], tiny)  # model_args may say so too
    torch.save({"model_config": dict(ARGS, activation="relu"), "model_state_dict": tiny.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match=r"bad\.pt: bad GPT config: activation: Input should be 'gelu_tanh' or 'gelu'"):
        load_model(tmp_path / "bad.pt", device="cpu")


def test_plain_torch_layout(tiny: GPT, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model_config": ARGS, "model_state_dict": tiny.state_dict(), "vocab": list("abcdefghijklmnopqrstuvw")}, path)
    model, extras = load_model(path, device="cpu")
    assert_same_model(model, tiny)
    assert extras.format == "torch" and extras.tokenizer["kind"] == "char"


def test_safetensors_folder_with_config_json_in_half_precision(tiny: GPT, tmp_path: Path) -> None:
    state = {k: v.half() for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    tokenizer = {"kind": "byte", "eos_token_id": 22, "bos_token_id": 22, "add_bos": True}
    (tmp_path / "config.json").write_text(json.dumps({"model": ARGS, "tokenizer": tokenizer, "training": {"steps": 3}}))
    with pytest.raises(ConfigError, match=">= 256"):  # a byte tokenizer cannot live in 23 ids
        load_tokenizer("auto", load_model(tmp_path, device="cpu")[1])
    model, extras = load_model(tmp_path, device="cpu")
    assert model.dtype == torch.float32  # stored in float16, loaded as asked
    torch.testing.assert_close(model(IDS), tiny(IDS), atol=2e-3, rtol=2e-3)
    assert extras.format == "safetensors" and extras.metadata == {"training": {"steps": 3}}


def test_safetensors_file_with_sibling_json_and_flat_config(tiny: GPT, tmp_path: Path) -> None:
    state = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "weights.safetensors"))
    (tmp_path / "weights.json").write_text(json.dumps(ARGS))
    model, _ = load_model(tmp_path / "weights.safetensors", device="cpu")
    assert_same_model(model, tiny)


def test_dtype_and_device_are_applied(tiny: GPT, tmp_path: Path) -> None:
    torch.save(nanogpt_checkpoint(tiny), tmp_path / "ckpt.pt")
    model, _ = load_model(tmp_path / "ckpt.pt", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")


# ------------------------------------------------------------------------------ snapshot folders


def test_snapshot_folder_takes_the_highest_step(tiny: GPT, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    other = GPT(GPTConfig(**ARGS))
    for step in (100, 900, 20000):
        model = tiny if step == 20000 else other
        torch.save(nanogpt_checkpoint(model), snapshots / f"snapshot_{step:06d}.pt")
    os.utime(snapshots / "snapshot_020000.pt", (1, 1))  # oldest mtime: the step number wins
    torch.save(nanogpt_checkpoint(other), tmp_path / "ckpt.pt")  # no step number: ranks last
    caplog.set_level("INFO", logger="decodekit.models.loading")
    model, extras = load_model(tmp_path, device="cpu")
    assert extras.source == str(snapshots / "snapshot_020000.pt")
    assert "snapshot_020000.pt" in caplog.text
    assert_same_model(model, with_exact_gelu(tiny))


def test_snapshot_ties_are_broken_by_mtime(tmp_path: Path) -> None:
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"")
    now = time.time()
    os.utime(tmp_path / "a.pt", (now, now))
    os.utime(tmp_path / "b.pt", (now - 100, now - 100))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "a.pt"


# ------------------------------------------------------------------------------ safety


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_runs_code_is_refused_and_never_run(tiny: GPT, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save(nanogpt_checkpoint(tiny, payload=Exploit(marker)), path)
    with pytest.raises(ModelLoadError, match=r"ckpt\.pt: refused to load: .*system") as info:
        load_model(path, device="cpu")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_nanogpt_meta_pkl_is_never_unpickled(tiny: GPT, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    torch.save(nanogpt_checkpoint(tiny), tmp_path / "ckpt.pt")
    model, extras = load_model(tmp_path, device="cpu")
    assert extras.tokenizer is None and not marker.exists()


# ------------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dtype": "float64"}, ConfigError, "dtype='float64': expected one of float32, bfloat16, float16"),
        ({"device": "tpu"}, ConfigError, "device='tpu': expected 'auto', 'cpu', 'cuda'"),
        ({"backend": "jax"}, ConfigError, "backend='jax'"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        load_model("default", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model("default", device="cuda")


def test_a_missing_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match=f"^model not found: no file or folder at {tmp_path}/nope.pt; models are"):
        load_model(tmp_path / "nope.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"^model not found: no file or folder at gpt7 \({tmp_path}/gpt7\); "
                                             r"nor is 'gpt7' a model name \(the one built in is 'default'\)"):
        load_model("gpt7")


def test_backend_hf_without_transformers_says_how_to_install_it(tiny: GPT, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": ARGS}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    for source in (tmp_path, "default", tmp_path / "missing"):  # never a native fallback
        with pytest.raises(ModelLoadError, match=r"^Hugging Face models need transformers: pip install decodekit\[hf\]$"):
            load_model(source, device="cpu", backend="hf")
    assert isinstance(load_model(tmp_path, device="cpu")[0], GPT)  # backend='auto' needs no transformers here


def test_wrong_formats_name_the_file(tiny: GPT, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.txt: unknown model file type '\.txt'"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match=r"garbage\.pt: not a"):
        load_model(tmp_path / "garbage.pt")
    torch.save({"weights": tiny.state_dict()}, tmp_path / "odd.pt")
    with pytest.raises(ModelLoadError, match=r"odd\.pt: unrecognised checkpoint layout.*found keys weights"):
        load_model(tmp_path / "odd.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model found"):
        load_model(empty)


def test_weights_that_do_not_fit_the_config(tiny: GPT, tmp_path: Path) -> None:
    torch.save({"model_args": dict(ARGS, n_embd=32), "model": tiny.state_dict()}, tmp_path / "a.pt")
    with pytest.raises(ModelLoadError, match=r"a\.pt: transformer\.wte\.weight has shape \(23, 16\); the config needs \(23, 32\)"):
        load_model(tmp_path / "a.pt")
    torch.save({"model_args": dict(ARGS, n_layer=3), "model": tiny.state_dict()}, tmp_path / "b.pt")
    with pytest.raises(ModelLoadError, match=r"b\.pt: the weights do not match the config \(missing transformer\.h\.2"):
        load_model(tmp_path / "b.pt")
    torch.save({"model_args": dict(ARGS, n_heads=2), "model": tiny.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(ModelLoadError, match=r"c\.pt: bad GPT config: n_heads: Extra inputs are not permitted"):
        load_model(tmp_path / "c.pt")


# ------------------------------------------------------------------------------ tokenizer fit


def small_tokenizer_json(path: Path) -> Path:
    """A ``tokenizer.json`` of 28 ids: one per lower-case letter, space, and [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26, "[UNK]": 27}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_much_smaller_than_the_model_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=257, n_layer=1, n_head=1, n_embd=8))
    small = load_tokenizer(str(small_tokenizer_json(tmp_path / "tokenizer.json")))
    with pytest.raises(ConfigError, match=r"^the tokenizer \(JSONTokenizer\) has 28 ids but the model has 257 logits: "
                                          r"it would sample ids the tokenizer cannot decode"):
        check_vocab(small, model)
    check_vocab(ByteTokenizer(), model)  # one spare logit
    padded = GPT(GPTConfig(block_size=8, vocab_size=256 + 64, n_layer=1, n_head=1, n_embd=8))
    check_vocab(ByteTokenizer(), padded)  # padding up to 64 extra logits is normal (nanoGPT pads to a multiple of 64)
    with pytest.raises(ConfigError, match="has 256 ids but the model has 321 logits"):
        check_vocab(ByteTokenizer(), GPT(GPTConfig(block_size=8, vocab_size=321, n_layer=1, n_head=1, n_embd=8)))


def test_decode_refuses_a_misfit_tokenizer_before_any_output(tmp_path: Path) -> None:
    path = small_tokenizer_json(tmp_path / "tokenizer.json")
    run = subprocess.run([sys.executable, "-m", "decodekit.cli.main", "tokenizer=json", f"tokenizer.path={path}",
                          "prompt=ab", "max_new_tokens=40", "seed=1", "device=cpu"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "decode: error: the tokenizer (JSONTokenizer) has 28 ids but the model has 257 logits: "
        "it would sample ids the tokenizer cannot decode; they do not belong together"
    ]


# ------------------------------------------------------------------------------ the default model


def test_default_model_loads_and_its_tokenizer_fits() -> None:
    model, extras = load_model("default", device="cpu")
    tokenizer = load_tokenizer("auto", extras)
    check_vocab(tokenizer, model)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id == 256
    assert model.dtype == torch.float32 and extras.format == "default"
    assert model.config.activation == "gelu_tanh"  # the form tools/train_default_model.py trained it with
    assert extras.metadata["training"]["val_perplexity"] < 10
    ids = torch.tensor([tokenizer.encode("The meaning of life is")])
    logits, _ = model.step(ids, position_ids=torch.arange(ids.shape[1])[None],
                           attention_mask=torch.ones_like(ids, dtype=torch.bool), cache=model.new_cache(1, 32))
    assert logits.shape == (1, 257) and torch.isfinite(logits).all()
