"""Every config group option composes, validates and instantiates; the registry feeds the config.

In-process checks of the `decode` command's configuration (the subprocess tests of the command
itself are in test_cli.py): each YAML of conf/ composes into a configuration that the pydantic
models accept; each strategy builds its chain and sampler; model and tokenizer options load;
plugin settings and strategies become root keys and group options with no YAML; every bad value
gives one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from decodekit.cli.config import (
    CommandConfig,
    compose_config,
    expand_sweep,
    hydra_context,
    register_configs,
    strategy_overrides,
    strategy_preset,
)
from decodekit.cli.main import literal_prompt
from decodekit.cli.decoder import Decoder
from decodekit.cli.strategies import sampler_note
from decodekit.errors import ConfigError, PluginError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors.base import LogitsProcessor
from decodekit.registry import Registry, build_registry, get_plugin_manager
from decodekit.samplers.base import Sampler

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = [(g, p.stem) for g in ("model", "tokenizer", "strategy") for p in sorted((CONF / g).glob("*.yaml"))]
NEEDS = {("model", "checkpoint"): ["model.path=x.pt"], ("model", "hf"): ["model.path=folder"], ("model", "gguf"): ["model.path=m.gguf"],
         ("tokenizer", "json"): ["tokenizer.path=t.json"], ("tokenizer", "hf"): ["tokenizer.path=folder"]}  # fmt: skip


def write_unigram(folder: Path) -> torch.Tensor:
    """A GPT whose next-token logits ignore the input: 'a' 5, 'b' 4, 'c' 3, ' ' 2, 'd' 1, EOS -10, rest 0.

    Its final LayerNorm has weight 0 and bias e_0, so the logits are the first column of the
    embedding, set here. Saved as safetensors with a config naming a byte tokenizer (EOS 256).
    """
    args = dict(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    logits = torch.zeros(257)
    for rank, ch in enumerate("abc d"):
        logits[ord(ch)] = 5.0 - rank
    logits[256] = -10.0
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = logits
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": args, "tokenizer": {"kind": "byte", "eos_token_id": 256}}))
    return logits


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """The built-ins alone (no installed plugins), in Hydra's ConfigStore, Hydra initialised once.

    What register_configs writes to the ConfigStore is put back as it was afterwards.
    """
    store = ConfigStore.instance()
    touched = ("decodekit_settings.yaml", "strategy")
    saved = {key: copy.deepcopy(store.repo.get(key)) for key in touched}
    GlobalHydra.instance().clear()
    reg = build_registry(get_plugin_manager(autoload=False))
    register_configs(reg)
    with hydra_context():
        yield reg
    for key, value in saved.items():
        if value is None:
            store.repo.pop(key, None)
        else:
            store.repo[key] = value


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(registry: Registry, group: str, option: str) -> None:
    with hydra_context():
        _, config = compose_config([f"{group}={option}", *NEEDS.get((group, option), [])], registry)
    if group == "strategy":
        assert config.strategy == option
        preset = strategy_preset(registry, option)
        assert {k: getattr(config, k) for k in preset} == preset
    else:
        assert config.model_dump(by_alias=True)[group][{"model": "name", "tokenizer": "kind"}[group]] == option


@pytest.mark.parametrize("strategy", [o for g, o in GROUP_OPTIONS if g == "strategy"])
def test_every_strategy_builds_its_chain_and_sampler(registry: Registry, strategy: str) -> None:
    with hydra_context():
        _, config = compose_config([f"strategy={strategy}"], registry)
    chain = registry.build_chain(config.settings())
    sampler = registry.build_sampler(config.sampler, config.settings())
    assert sampler.name == config.sampler
    owners = {registry.owners[k].name for k in config.settings() if registry.owners[k].kind == "processor"}
    assert sorted(p.name for p in chain) == sorted(owners)


def test_defaults_are_the_embedded_model_and_nucleus(registry: Registry) -> None:
    with hydra_context():
        _, config = compose_config([], registry)
    assert config.model == {"name": "default", "pack_weights": None, "weights": "float32", "kernels": "auto", "kv_cache": "auto"}
    assert config.tokenizer == {"kind": "auto"}
    assert config.strategy == "nucleus" and config.sampler == "multinomial"
    preset = strategy_preset(registry, "nucleus")
    assert preset.pop("sampler") == "multinomial"
    assert config.settings() == preset


def test_model_and_tokenizer_options_load_and_decode(registry: Registry, tmp_path: Path) -> None:
    write_unigram(tmp_path / "ckpt")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    # one token per character, with the byte tokenizer's ids (so the model fits it), 256 = EOS
    vocab = {(chr(i) if chr(i).isprintable() else f"<0x{i:02X}>"): i for i in range(256)} | {"<|endoftext|>": 256}
    tok = Tokenizer(WordLevel(vocab, unk_token="<0x00>"))
    tok.pre_tokenizer = Split("", behavior="isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    model = ["model=checkpoint", f"model.path={tmp_path / 'ckpt'}", "device=cpu", "strategy=greedy", "max_new_tokens=3"]
    texts = {}
    with hydra_context():
        for tokenizer in (["tokenizer=auto"], ["tokenizer=byte", "tokenizer.eos_token_id=256"],
                          ["tokenizer=json", f"tokenizer.path={tmp_path / 'tokenizer.json'}"]):  # fmt: skip
            _, config = compose_config([*model, *tokenizer], registry)
            decoder = Decoder.load(config, registry)
            assert decoder.eos_token_id == 256
            ids = decoder.tokenizer.encode("ab")
            out = decoder.model.step(torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                                     cache=decoder.model.new_cache(1, 8))[0]  # fmt: skip
            texts[tokenizer[0]] = decoder.tokenizer.decode([int(out.argmax())])
    assert set(texts.values()) == {"a"}  # the unigram model's favourite, whichever tokenizer reads it


def test_processor_order_and_temperature_last_reach_the_chain(registry: Registry, tmp_path: Path) -> None:
    write_unigram(tmp_path)
    base = ["model=checkpoint", f"model.path={tmp_path}", "device=cpu", "top_k=40", "top_p=0.9", "temperature=0.7", "min_p=0.05"]
    with hydra_context():
        orders = {}
        for extra in ([], ["processor_order=[top_p,top_k]"], ["temperature_last=true"],
                      ["processor_order=[min_p]", "temperature_last=true"]):  # fmt: skip
            _, config = compose_config([*base, *extra], registry)
            orders[" ".join(extra)] = [p.name for p in Decoder.load(config, registry).chain]
    assert orders[""] == ["temperature", "top_k", "top_p", "min_p"]
    assert orders["processor_order=[top_p,top_k]"] == ["top_p", "top_k", "temperature", "min_p"]
    assert orders["temperature_last=true"] == ["top_k", "top_p", "min_p", "temperature"]
    assert orders["processor_order=[min_p] temperature_last=true"] == ["min_p", "top_k", "top_p", "temperature"]


BAD = [
    (["top_p=1.5"], ["top_p=1.5", "<= 1.0"]),
    (["temperature=-1"], ["temperature=-1", ">= 0"]),
    (["strategy=nucleos"], ["strategy='nucleos'", "did you mean 'nucleus'", "known: beam, greedy"]),
    (["strategy=beam", "num_beams=0"], ["num_beams=0", ">= 1"]),
    (["tempreature=0.5"], ["tempreature", "did you mean 'temperature'", "known:"]),
    (["top_k=-2"], ["top_k=-2", ">= -1"]),
    (["num_samples=0"], ["num_samples=0", ">= 1"]),
    (["max_new_tokens=0"], ["max_new_tokens=0", ">= 1"]),
    (["device=tpu"], ["device='tpu'", "pattern"]),
    (["dtype=float64"], ["dtype='float64'", "float32", "bfloat16", "float16"]),
    (["model=gpt2"], ["model='gpt2'", "known: checkpoint, default, gguf, hf", "model=checkpoint model.path=gpt2"]),
    (["model.path=x.pt"], ["model.path", "model=default has no key 'path'"]),
    (["model=checkpoint"], ["model.path", "required"]),
    (["model=checkpoint", "model.pth=x"], ["model.pth", "did you mean 'path'"]),
    (["tokenizer=json"], ["tokenizer.path", "required"]),
    (["sampler=greedyy"], ["sampler='greedyy'", "did you mean 'greedy'", "known:"]),
    (["num_beams=4"], ["num_beams", "sampler 'beam'", "strategy=beam"]),
    (["processor_order=[top_kk]"], ["processor_order", "top_kk", "did you mean 'top_k'"]),
    (["temperature=0.3,0.7"], ["temperature=0.3,0.7", "add -m"]),
    (["prompt=a", "prompt_tokens=[1]"], ["prompt and prompt_tokens", "only one"]),
    (["bad_words=[[]]"], ["bad_words=[[]]", "an entry is empty"]),
    (["top_p=]"], ["top_p=]", "cannot parse"]),
    (["+colour=red"], ["colour", "not a known setting"]),
    (["processor_order=[top_k,top_p]"], ["processor_order: 'top_k' is not in the chain", "set top_k=... to add it"]),
    (["processor_order=[eos_length_penalty]"], ["'eos_length_penalty'", "set one of eos_length_target, eos_length_slope"]),
    (["top_k=true"], ["top_k=true is not allowed: true and false are not numbers"]),
    (["temperature=false"], ["temperature=false is not allowed"]),
    (["max_new_tokens=true"], ["max_new_tokens=true is not allowed"]),
    (["seed=true"], ["seed=true is not allowed"]),
    (["logit_bias={1: true}"], ["logit_bias={1: True} is not allowed"]),
    (["prompt_tokens=[1,true]"], ["prompt_tokens=[1, True] is not allowed"]),
    (["seed=4294967296"], ["seed=4294967296 is not allowed", "must be < 4294967296"]),
    (["overwrite=true", "append=true"], ["overwrite=true and append=true: give one"]),
    (["model.weights=int4"], ["model.weights='int4' is not allowed", "'float32', 'bf16', 'int8' or 'w8a8'"]),
    (["model.kv_cache=fp8"], ["model.kv_cache='fp8' is not allowed", "'auto' or 'bf16'"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_give_one_line_naming_key_value_and_allowed(registry: Registry, overrides: list[str], fragments: list[str]) -> None:
    with hydra_context(), pytest.raises(ConfigError) as caught:
        compose_config(overrides, registry)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_several_bad_values_are_named_in_the_same_line(registry: Registry) -> None:
    with hydra_context(), pytest.raises(ConfigError, match=r"temperature=-1 .*; top_p=1.5 ") as caught:
        compose_config(["top_p=1.5", "temperature=-1"], registry)
    assert "\n" not in str(caught.value)


class FakeXTC(LogitsProcessor):
    name = "fake_xtc"
    order = 950

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        xtc_probability: float = Field(0.0, ge=0.0, le=1.0, description="chance per step")

    def __init__(self, xtc_probability: float = 0.0) -> None:
        self.xtc_probability = xtc_probability

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits


class FakeMirostat(Sampler):
    name = "fake_mirostat"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tau: float = Field(5.0, gt=0.0, description="target surprise")

    def __init__(self, tau: float = 5.0) -> None:
        self.tau = tau


def test_plugin_settings_and_strategies_become_root_keys_and_group_options(registry: Registry) -> None:
    plugged = build_registry(get_plugin_manager(autoload=False))
    plugged.add(FakeXTC, "processor", "fake-plugin")
    plugged.add(FakeMirostat, "sampler", "fake-plugin")
    plugged.add_strategy("fake_miro", {"sampler": "fake_mirostat", "tau": 3.0}, "fake-plugin")
    register_configs(plugged)
    try:
        with hydra_context():
            options = GlobalHydra.instance().config_loader().get_group_options("strategy")
            _, config = compose_config(["strategy=fake_miro", "xtc_probability=0.5"], plugged)
            with pytest.raises(ConfigError, match=r"^xtc_probability=2 is not allowed: must be <= 1"):
                compose_config(["xtc_probability=2"], plugged)
            with pytest.raises(ConfigError, match=r"tau: setting\(s\) of sampler 'fake_mirostat'.*strategy=fake_miro"):
                compose_config(["tau=2"], plugged)
    finally:
        ConfigStore.instance().repo["strategy"].pop("fake_miro.yaml")
        register_configs(registry)
    assert "fake_miro" in options
    assert config.sampler == "fake_mirostat" and config.strategy == "fake_miro"
    assert config.settings() == {"xtc_probability": 0.5, "tau": 3.0}
    assert isinstance(plugged.build_sampler(config.sampler, config.settings()), FakeMirostat)


def test_a_plugin_setting_named_like_a_command_key_is_refused() -> None:
    class Seeded(FakeXTC):
        name = "seeded"

        class Params(BaseModel):
            seed: int = 0

    reg = build_registry(get_plugin_manager(autoload=False))
    reg.add(Seeded, "processor", "clashing-plugin")
    with pytest.raises(PluginError, match="'seed' of processor 'seeded' \\(plugin clashing-plugin\\)"):
        register_configs(reg, ConfigStore())


def test_config_yaml_documents_every_command_key_and_builtin_setting(registry: Registry) -> None:
    text = (CONF / "config.yaml").read_text()
    documented = dict(re.findall(r"^(\w+):.*#\s*(\S.*)$", text, flags=re.MULTILINE))
    command_keys = {f.alias or n for n, f in CommandConfig.model_fields.items()} - {"model", "tokenizer", "strategy"}
    builtin = {s for s, c in registry.owners.items() if c.plugin == "decodekit"}
    assert command_keys | builtin <= set(documented), sorted((command_keys | builtin) - set(documented))


def test_a_sweep_expands_into_one_override_list_per_job(registry: Registry) -> None:
    with hydra_context():
        jobs = expand_sweep(["temperature=0.3,0.7,1.0", "seed=1", "strategy=greedy,nucleus"])
    assert len(jobs) == 6
    assert ["temperature=0.3", "seed=1", "strategy=greedy"] in jobs
    assert all(len(job) == 3 and "seed=1" in job for job in jobs)


@pytest.mark.parametrize(
    "text", ["Once upon a time", "Hello, world", "Don't", "[1,2]", "a\\'b\\", "${oc.env:HOME}", "42", "x=y", "  "]
)
def test_a_prompt_on_the_command_line_is_taken_as_written(registry: Registry, text: str) -> None:
    with hydra_context():
        _, config = compose_config([literal_prompt(f"prompt={text}")], registry)
    assert config.prompt == text


def test_a_prompt_in_hydra_quotes_keeps_hydra_meaning() -> None:
    assert literal_prompt("prompt='Hello, world'") == "prompt='Hello, world'"
    assert literal_prompt("top_p=0.9") == "top_p=0.9"


def doc_commands() -> list[tuple[list[str], str]]:
    """Each ``$ decode ...`` of docs/cli.md: its arguments and the output shown under it."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    found = []
    for block in re.findall(r"```console\n(.*?)```", doc, flags=re.DOTALL):
        for command, output in re.findall(r"^\$ (decode .*)\n((?:(?!\$ ).*\n)*)", block, flags=re.MULTILINE):
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(itertools.takewhile(lambda t: t not in ("|", ";"), lexer))
            found.append((tokens[1:], output))
    return found


DOC_COMMANDS = [c for c in doc_commands() if "--help" not in c[0] and "list=true" not in c[0]]


@pytest.mark.parametrize(("args", "output"), DOC_COMMANDS, ids=[" ".join(a)[:60] for a, _ in DOC_COMMANDS])
def test_every_command_in_the_docs_composes_or_fails_as_shown(registry: Registry, args: list[str], output: str) -> None:
    """docs/cli.md cannot rot: its commands still compose, and its error lines are still the errors."""
    args = [literal_prompt(a) for a in args if a not in ("--cfg", "job")]
    jobs = [args]
    with hydra_context():
        if args[0] == "-m":
            jobs = expand_sweep(args[1:])
        error = re.search(r"^decode: error: (.*)$", output, flags=re.MULTILINE)
        if error is None:
            for job in jobs:
                compose_config(job, registry)
            return
        with pytest.raises(ConfigError) as caught:
            for job in jobs:
                compose_config(job, registry)
    shown = error.group(1)
    assert str(caught.value).split("known:")[0] == shown.split("known:")[0]


# ------------------------------------------------------------------------------ consistent settings


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["stop=best"], "stop", ["best"]),
        (["bad_words=damn"], "bad_words", ["damn"]),
        (["strategy=beam", "must_include=cat"], "must_include", ["cat"]),
        (["top_k=5", "processor_order=top_k"], "processor_order", ["top_k"]),
        (["bad_words=[damn,[1,2]]"], "bad_words", ["damn", [1, 2]]),
        (["guide_attribute=science"], "guide_attribute", "science"),  # a string setting stays a string
    ],
)
def test_one_string_for_a_list_setting_is_a_one_element_list_for_every_such_setting(
    registry: Registry, overrides: list[str], key: str, expected
) -> None:
    _, config = compose_config(overrides, registry)
    assert getattr(config, key) == expected


def test_booleans_are_still_taken_where_a_setting_is_a_boolean(registry: Registry) -> None:
    _, config = compose_config(["strategy=beam", "early_stopping=true", "beam_sample=true", "temperature_last=true"], registry)
    assert (config.early_stopping, config.beam_sample, config.temperature_last) == (True, True, True)
    _, config = compose_config(["~strategy", "top_k=3", "temperature=1"], registry)
    assert config.settings() == {"top_k": 3, "temperature": 1.0}  # numbers are numbers


def test_a_sampler_without_a_strategy_runs_without_the_default_preset(registry: Registry) -> None:
    _, config = compose_config(["sampler=greedy"], registry)
    assert (config.strategy, config.sampler, config.settings()) == ("custom", "greedy", {})
    assert sampler_note(config, registry) is None
    _, config = compose_config(["sampler=multinomial", "temperature=0.5"], registry)
    assert (config.strategy, config.settings()) == ("custom", {"temperature": 0.5})
    # a strategy given as well: its chain stays, and the note says so
    _, config = compose_config(["strategy=nucleus", "sampler=greedy"], registry)
    assert (config.strategy, config.sampler, config.settings()) == ("nucleus", "greedy", {"temperature": 0.8, "top_p": 0.9})
    assert sampler_note(config, registry) == (
        "sampler=greedy replaces strategy nucleus's sampler=multinomial; the strategy's chain stays: top_p=0.9 temperature=0.8"
    )


def test_the_last_strategy_override_counts() -> None:
    assert strategy_overrides(["sampler=greedy"]) == ["sampler=greedy", "~strategy"]
    assert strategy_overrides(["sampler=greedy", "~strategy", "strategy=top_k"]) == ["sampler=greedy", "strategy=top_k"]
    assert strategy_overrides(["top_p=0.5"]) == ["top_p=0.5"]


def test_build_chain_refuses_a_processor_order_naming_a_processor_not_in_the_chain(registry: Registry) -> None:
    with pytest.raises(ConfigError, match=r"^processor_order: 'top_k' is not in the chain, as none of its settings is set"):
        registry.build_chain({"temperature": 0.8, "top_p": 0.9}, processor_order=["top_k", "top_p"])
    chain = registry.build_chain({"temperature": 0.8, "top_p": 0.9}, processor_order=["top_p"])
    assert [p.name for p in chain] == ["top_p", "temperature"]
