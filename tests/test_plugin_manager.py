"""Plugin loading: fake entry points and a fresh plugin manager per test (as pluggy's own tests do)."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import decodekit
from decodekit import hookimpl
from decodekit.errors import ConfigError, PluginError
from decodekit.processors.base import LogitsProcessor
from decodekit.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, PluginWarning, build_registry, get_plugin_manager
from decodekit.samplers.base import Sampler


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points`` yields: a name, a value, and ``load()``."""

    def __init__(self, name: str, plugin: Any = None, error: Exception | None = None) -> None:
        self.name = name
        self.value = f"fake_{name.replace('-', '_')}.plugin"
        self.group = ENTRY_POINT_GROUP
        self._plugin = plugin
        self._error = error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._plugin


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> list[FakeEntryPoint]:
    """The entry points the next plugin manager will see (none of the real ones)."""
    eps: list[FakeEntryPoint] = []

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr("decodekit.registry.entry_points", fake_entry_points)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return eps


def plugin_module(name: str, *, processors=(), samplers=(), strategies=None) -> types.ModuleType:
    """A module with hook implementations, as a third-party package's plugin module would be."""
    module = types.ModuleType(name)
    if processors:
        module.decodekit_register_processors = hookimpl(lambda: list(processors))
    if samplers:
        module.decodekit_register_samplers = hookimpl(lambda: list(samplers))
    if strategies is not None:
        module.decodekit_register_strategies = hookimpl(lambda: dict(strategies))
    return module


class Halve(LogitsProcessor):
    """Divide logits by two (a stand-in third-party processor)."""

    name = "halve"
    order = 250

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        halve_strength: float = Field(gt=0.0, le=1.0)

    def __init__(self, halve_strength: float) -> None:
        self.halve_strength = halve_strength

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits * (1.0 - self.halve_strength / 2)


class FirstToken(Sampler):
    """Always the lowest-numbered token left (a stand-in third-party sampler)."""

    name = "first_token"

    def __call__(self, input_ids, logits, rng):
        return (logits > float("-inf")).float().argmax(dim=-1)


def test_a_third_party_plugin_registers_through_the_same_hooks_as_built_ins(installed) -> None:
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve], samplers=[FirstToken])))
    registry = build_registry(get_plugin_manager())
    assert registry.processor("halve").plugin == "decodekit-halve"
    assert registry.sampler("first_token").plugin == "decodekit-halve"
    assert registry.processor("top_p").plugin == "decodekit"  # built-ins come through the hooks too
    assert registry.owners["halve_strength"].name == "halve"
    chain = registry.build_chain({"halve_strength": 0.5, "temperature": 0.5})
    assert [type(p).__name__ for p in chain] == ["Temperature", "Halve"]  # ordered by `order`
    (halve,) = registry.build_chain({"halve_strength": 0.5})
    assert torch.equal(halve(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4.0, 8.0]])), torch.tensor([[3.0, 6.0]]))


def test_a_plugins_strategy_is_registered_under_its_name(installed) -> None:
    module = plugin_module("halve", processors=[Halve], strategies={"soft": {"halve_strength": 0.2, "sampler": "greedy"}})
    installed.append(FakeEntryPoint("decodekit-halve", module))
    registry = build_registry(get_plugin_manager())
    assert registry.strategies["soft"] == {"halve_strength": 0.2, "sampler": "greedy"}
    assert registry.strategy_plugins["soft"] == "decodekit-halve"


def test_two_plugins_registering_one_name_is_an_error_naming_both(installed) -> None:
    class OtherHalve(Halve):
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            other_strength: float = 1.0

    installed.append(FakeEntryPoint("plugin-a", plugin_module("a", processors=[Halve])))
    installed.append(FakeEntryPoint("plugin-b", plugin_module("b", processors=[OtherHalve])))
    with pytest.raises(PluginError, match=r"processor name 'halve' is registered twice: by plugin plugin-\w and by plugin plugin-\w"):
        build_registry(get_plugin_manager())


def test_a_plugin_reusing_a_built_in_name_is_an_error_naming_both(installed) -> None:
    class MyTopP(Halve):
        name = "top_p"

        class Params(BaseModel):
            mine: float = 1.0

    installed.append(FakeEntryPoint("decodekit-mine", plugin_module("mine", processors=[MyTopP])))
    both = r"by plugin (decodekit|decodekit-mine) and by plugin (decodekit-mine|decodekit)$"
    with pytest.raises(PluginError, match=r"'top_p' is registered twice: " + both):
        build_registry(get_plugin_manager())


def test_two_strategies_of_one_name_are_an_error_naming_both_plugins(installed) -> None:
    installed.append(FakeEntryPoint("plugin-a", plugin_module("a", strategies={"fast": {"sampler": "greedy"}})))
    installed.append(FakeEntryPoint("plugin-b", plugin_module("b", strategies={"fast": {"sampler": "multinomial"}})))
    with pytest.raises(PluginError, match=r"strategy name 'fast' is registered twice: by plugin plugin-. and by plugin plugin-."):
        build_registry(get_plugin_manager())


def test_a_setting_claimed_by_two_plugins_is_an_error_naming_both(installed) -> None:
    class Other(Halve):
        name = "other"

    installed.append(FakeEntryPoint("plugin-a", plugin_module("a", processors=[Halve])))
    installed.append(FakeEntryPoint("plugin-b", plugin_module("b", processors=[Other])))
    message = (
        r"setting 'halve_strength' of processor '(halve|other)' \(plugin plugin-.\) "
        r"is already used by processor '(halve|other)' of plugin plugin-."
    )
    with pytest.raises(PluginError, match=message):
        build_registry(get_plugin_manager())


@pytest.mark.parametrize("setting", ["top_p", "sampler", "strategy"])
def test_a_plugin_setting_that_shadows_decodekits_is_an_error(installed, setting: str) -> None:
    params = type("Params", (BaseModel,), {"__annotations__": {setting: float}})
    cls = type("Shadow", (Halve,), {"name": "shadow", "Params": params})
    installed.append(FakeEntryPoint("decodekit-shadow", plugin_module("shadow", processors=[cls])))
    with pytest.raises(PluginError, match=rf"^setting '{setting}' of ") as raised:
        build_registry(get_plugin_manager())
    message = str(raised.value)
    assert "processor 'shadow'" in message and "plugin decodekit-shadow" in message
    if setting == "top_p":
        assert "processor 'top_p'" in message and "plugin decodekit" in message.replace("decodekit-shadow", "")
    else:
        assert "is already used by decodekit itself" in message


def test_a_class_without_name_or_params_is_an_error_naming_the_plugin(installed) -> None:
    class Nameless(LogitsProcessor):
        pass

    class NoParams:
        name = "no_params"
        Params = dict

    installed.append(FakeEntryPoint("decodekit-bad", plugin_module("bad", processors=[Nameless])))
    with pytest.raises(PluginError, match=r"plugin decodekit-bad: processor class .*Nameless has no `name`"):
        build_registry(get_plugin_manager())
    installed[:] = [FakeEntryPoint("decodekit-bad", plugin_module("bad", samplers=[NoParams]))]
    with pytest.raises(PluginError, match=r"plugin decodekit-bad: sampler 'no_params' has no pydantic `Params` model"):
        build_registry(get_plugin_manager())


def test_a_plugin_that_fails_to_import_warns_with_its_name_and_the_rest_keeps_working(installed) -> None:
    installed.append(FakeEntryPoint("decodekit-broken", error=ModuleNotFoundError("No module named 'numpyy'")))
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve])))
    message = (
        r"decodekit plugin 'decodekit-broken' \(fake_decodekit_broken.plugin\) failed to load and is skipped: "
        r"ModuleNotFoundError: No module named 'numpyy'"
    )
    with pytest.warns(PluginWarning, match=message):
        pm = get_plugin_manager()
    registry = build_registry(pm)
    assert "halve" in registry.processors and "top_p" in registry.processors
    assert pm.get_plugin("decodekit-broken") is None


def test_a_plugin_whose_hook_has_an_unknown_name_is_rejected(installed) -> None:
    module = types.ModuleType("typo")
    module.decodekit_register_procesors = hookimpl(lambda: [Halve])
    installed.append(FakeEntryPoint("decodekit-typo", module))
    with pytest.raises(Exception, match="decodekit_register_procesors"):
        get_plugin_manager()


def test_the_environment_switch_disables_autoloading(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve])))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = build_registry(get_plugin_manager())
    assert "halve" not in registry.processors
    assert "top_p" in registry.processors  # built-ins are not plugins to disable
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    assert "halve" in build_registry(get_plugin_manager()).processors


def test_autoload_false_skips_entry_points(installed) -> None:
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve])))
    assert "halve" not in build_registry(get_plugin_manager(autoload=False)).processors


def test_a_plugin_object_registered_by_hand_joins_the_registry(installed) -> None:
    class Plugin:
        @hookimpl
        def decodekit_register_processors(self):
            return [Halve]

    pm = get_plugin_manager(autoload=False)
    pm.register(Plugin(), name="by-hand")
    assert build_registry(pm).processor("halve").plugin == "by-hand"


def test_a_plugins_params_are_validated_by_its_own_model(installed) -> None:
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve])))
    registry = build_registry(get_plugin_manager())
    with pytest.raises(ConfigError, match=r"^halve_strength=2.0 is not allowed: must be <= 1.0$"):
        registry.build_chain({"halve_strength": 2.0})
    with pytest.raises(ConfigError, match=r"halve_strenght: not a known setting \(did you mean 'halve_strength'\?\)"):
        registry.build_chain({"halve_strenght": 0.5})


@pytest.mark.parametrize(
    "plugin, kind, component",
    [("decodekit-dry", "processor", "dry"), ("decodekit-xtc", "processor", "xtc"), ("decodekit-mirostat", "sampler", "mirostat")],
)
def test_the_plugin_packages_are_found_by_their_entry_points(plugin: str, kind: str, component: str) -> None:
    from importlib.metadata import entry_points

    if plugin not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}:
        pytest.skip(f"{plugin} is not installed (pip install -e plugins/{plugin})")
    registry = decodekit.get_registry(refresh=True)
    table = registry.processors if kind == "processor" else registry.samplers
    assert table[component].plugin == plugin


# --- a plugin whose hooks misbehave is named and left out; the rest keeps working ---------------


def boom() -> list[type]:
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    "hooks, message",
    [
        ({"decodekit_register_processors": boom}, r"decodekit_register_processors raised RuntimeError: boom"),
        ({"decodekit_register_samplers": lambda: ["top_p"]},
         r"decodekit_register_samplers returned 'top_p' \(a str\) in its list, not a class"),
        ({"decodekit_register_processors": lambda: Halve},
         r"decodekit_register_processors returned <class '.*Halve'> \(a .*\), not a list of classes"),
        ({"decodekit_register_strategies": lambda: ["soft"]},
         r"decodekit_register_strategies returned \['soft'\] \(a list\), not a mapping of strategy names to settings"),
        ({"decodekit_register_strategies": lambda: {"soft": 0.5}},
         r"decodekit_register_strategies returned strategy 'soft' \(a str\): 0.5 \(a float\); expected a name"),
    ],
)  # fmt: skip
def test_a_plugin_whose_hook_raises_or_returns_no_classes_is_named_and_skipped(installed, hooks, message: str) -> None:
    broken = plugin_module("broken", samplers=[FirstToken], strategies={"first": {"sampler": "first_token"}})
    for name, function in hooks.items():
        setattr(broken, name, hookimpl(function))
    installed.append(FakeEntryPoint("decodekit-broken", broken))
    installed.append(FakeEntryPoint("decodekit-halve", plugin_module("halve", processors=[Halve])))
    with pytest.warns(PluginWarning, match=rf"^decodekit plugin 'decodekit-broken': {message}.*; the plugin is skipped$"):
        registry = build_registry(get_plugin_manager())
    assert "halve" in registry.processors and "top_p" in registry.processors and "greedy" in registry.samplers
    # the whole plugin is left out, its hooks that behaved too
    assert "first_token" not in registry.samplers and "first" not in registry.strategies


def test_build_chain_from_python_goes_on_without_a_plugin_whose_hook_raises(installed, monkeypatch) -> None:
    broken = plugin_module("broken")
    broken.decodekit_register_processors = hookimpl(boom)
    installed.append(FakeEntryPoint("decodekit-broken", broken))
    monkeypatch.setattr("decodekit.registry._REGISTRY", None)  # the process-wide one, built afresh (restored after)
    with pytest.warns(PluginWarning, match=r"^decodekit plugin 'decodekit-broken': decodekit_register_processors raised"):
        chain = decodekit.build_chain({"temperature": 0.5, "top_k": 3})
    assert [type(p).__name__ for p in chain] == ["Temperature", "TopK"]


def test_a_class_with_an_order_that_is_not_an_integer_is_an_error_naming_the_plugin(installed) -> None:
    class Unordered(Halve):
        order = "first"

    installed.append(FakeEntryPoint("decodekit-bad", plugin_module("bad", processors=[Unordered])))
    with pytest.raises(PluginError, match=r"^plugin decodekit-bad: processor 'halve' has order='first'; expected an integer$"):
        build_registry(get_plugin_manager())
