"""A misbehaving plugin is caught by ``decodekit.generate`` at the step where it misbehaves, with an
error naming it and what it returned; its settings are checked by its own pydantic model."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import decodekit
from decodekit import hookimpl
from decodekit.errors import ConfigError, PluginError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors.base import LogitsProcessor
from decodekit.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, build_registry, get_plugin_manager
from decodekit.samplers.base import Sampler

MODULE = __name__  # how the errors name these classes' package


class Faulty(LogitsProcessor):
    """Behaves until step ``fault_step``, then does the thing named by ``fault``."""

    name = "faulty"
    order = 250  # between temperature (200) and top_k (300)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fault: str = Field(pattern="^(raise|shape|nan|posinf|empty|none)$")
        fault_step: int = Field(default=0, ge=0, le=1000)

    def __init__(self, fault: str, fault_step: int = 0) -> None:
        self.fault = fault
        self.fault_step = fault_step
        self._prompt_length = 0

    def begin(self, input_ids: torch.Tensor) -> None:
        self._prompt_length = input_ids.shape[-1]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor):
        if input_ids.shape[-1] - self._prompt_length < self.fault_step:
            return logits
        if self.fault == "raise":
            raise RuntimeError("the plugin's own bug")
        if self.fault == "shape":
            return logits[:, :-1]
        if self.fault == "nan":
            return logits.masked_fill(torch.arange(logits.shape[0])[:, None] == 1, float("nan"))
        if self.fault == "posinf":
            return logits.clone().index_fill_(-1, torch.tensor([3]), float("inf"))
        if self.fault == "empty":
            return torch.full_like(logits, float("-inf"))
        return None


class BadSampler(Sampler):
    """A sampler returning the wrong thing, or raising."""

    name = "bad_sampler"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bad_sampler_fault: str = Field(default="raise", pattern="^(raise|shape|dtype)$")

    def __init__(self, bad_sampler_fault: str = "raise") -> None:
        self.bad_sampler_fault = bad_sampler_fault

    def __call__(self, input_ids, logits, rng):
        if self.bad_sampler_fault == "raise":
            raise ValueError("no token for you")
        if self.bad_sampler_fault == "shape":
            return logits.argmax(dim=-1, keepdim=True)
        return logits.argmax(dim=-1).to(torch.int32)


class FakeEntryPoint:
    name = "decodekit-faulty"
    value = "decodekit_faulty.plugin"
    group = ENTRY_POINT_GROUP

    def load(self) -> types.ModuleType:
        module = types.ModuleType("decodekit_faulty.plugin")
        module.decodekit_register_processors = hookimpl(lambda: [Faulty])
        module.decodekit_register_samplers = hookimpl(lambda: [BadSampler])
        return module


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """A registry built by a fresh plugin manager that loads only the faulty plugin."""
    monkeypatch.setattr("decodekit.registry.entry_points", lambda *, group: [FakeEntryPoint()])
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return build_registry(get_plugin_manager())


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=1, n_head=2, n_embd=32)).eval()


PROMPT = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def run(model, registry, sampler: str = "greedy", **settings):
    chain = registry.build_chain({"temperature": 0.8, "top_k": 10, **settings})
    return decodekit.generate(model, PROMPT, processors=chain, sampler=registry.build_sampler(sampler, settings), max_new_tokens=8)


@pytest.mark.parametrize(
    "fault, step, message",
    [
        ("raise", 0, r"processor faulty \({m}\) raised at step 0: RuntimeError: the plugin's own bug"),
        ("raise", 5, r"processor faulty \({m}\) raised at step 5: RuntimeError: the plugin's own bug"),
        ("shape", 2, r"processor faulty \({m}\) returned \(2, 31\) torch.float32 at step 2; expected \(2, 32\) torch.float32"),
        ("nan", 3, r"processor faulty \({m}\) returned NaN logits in row\(s\) \[1\] at step 3"),
        ("posinf", 1, r"processor faulty \({m}\) returned \+inf logits in row\(s\) \[0, 1\] at step 1"),
        ("empty", 4, r"processor faulty \({m}\) returned no token left \(every logit -inf\) in row\(s\) \[0, 1\] at step 4"),
        ("none", 0, r"processor faulty \({m}\) returned NoneType at step 0"),
    ],
)
def test_a_faulty_processor_is_named_at_the_step_it_fails(model, registry, fault: str, step: int, message: str) -> None:
    with pytest.raises(PluginError, match=message.format(m=MODULE)):
        run(model, registry, fault=fault, fault_step=step)


def test_the_processors_that_behave_are_not_blamed(model, registry) -> None:
    # faulty runs between temperature and top_k; neither is named.
    with pytest.raises(PluginError) as raised:
        run(model, registry, fault="nan", fault_step=1)
    assert "faulty" in str(raised.value)
    assert "temperature" not in str(raised.value) and "top_k" not in str(raised.value)


def test_a_faulty_processor_that_is_last_is_named_too(model, registry) -> None:
    chain = registry.build_chain({"temperature": 0.8, "fault": "none"}, processor_order=["temperature", "faulty"])
    assert type(chain[-1]) is Faulty
    with pytest.raises(PluginError, match=rf"processor faulty \({MODULE}\) returned NoneType at step 0"):
        decodekit.generate(model, PROMPT, processors=chain, max_new_tokens=4)


def test_the_original_exception_is_kept_as_the_cause(model, registry) -> None:
    with pytest.raises(PluginError) as raised:
        run(model, registry, fault="raise")
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_a_processor_that_behaves_until_later_lets_the_earlier_steps_run(model, registry) -> None:
    out = run(model, registry, fault="raise", fault_step=100)
    assert out.tokens.shape == (2, 8)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("raise", r"sampler bad_sampler \({m}\) raised at step 0: ValueError: no token for you"),
        ("shape", r"sampler bad_sampler \({m}\) returned \(2, 1\) torch.int64 at step 0; expected \(2,\) torch.int64"),
        ("dtype", r"sampler bad_sampler \({m}\) returned \(2,\) torch.int32 at step 0; expected \(2,\) torch.int64"),
    ],
)
def test_a_faulty_sampler_is_named_with_what_it_returned(model, registry, fault: str, message: str) -> None:
    with pytest.raises(PluginError, match=message.format(m=MODULE)):
        run(model, registry, sampler="bad_sampler", bad_sampler_fault=fault)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fault": "explode"}, r"fault='explode' is not allowed: string should match pattern"),
        ({"fault": "nan", "fault_step": -1}, r"fault_step=-1 is not allowed: must be >= 0"),
        ({"fault_step": 3}, r"fault: is required"),
        ({"fault": "nan", "fault_typo": 1}, r"fault_typo: not a known setting"),
    ],
)
def test_a_plugins_settings_are_validated_by_its_own_model(registry, settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        registry.build_chain(settings)


def test_a_plugin_sampler_setting_is_validated_too(registry) -> None:
    with pytest.raises(ConfigError, match=r"bad_sampler_fault='often' is not allowed"):
        registry.build_sampler("bad_sampler", {"bad_sampler_fault": "often"})


def test_a_faulty_installed_plugin_is_caught_the_same_way(model) -> None:
    # An installed plugin (decodekit-xtc) wrapped so that it returns NaN: named by its own module.
    xtc_module = pytest.importorskip("decodekit_xtc.xtc")

    class BrokenXTC(xtc_module.XTC):
        def __call__(self, input_ids, logits):
            return super().__call__(input_ids, logits) * float("nan")

    BrokenXTC.__module__ = xtc_module.__name__
    with pytest.raises(PluginError, match=r"processor xtc \(decodekit_xtc.xtc\) returned NaN logits in row\(s\) \[0, 1\] at step 0"):
        decodekit.generate(model, PROMPT, processors=[BrokenXTC(0.5)], max_new_tokens=3)
