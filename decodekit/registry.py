"""The registry: names of processors, samplers and strategies, fed by the plugin hooks.

It maps each name to its class and the pydantic model of its parameters, so that a chain can be
built from plain settings, validated: ``build_chain({"temperature": 0.8, "top_p": 0.9})``.
Settings are flat: each processor's parameter names are settings of their own (``top_p``,
``no_repeat_ngram_size``), unique across the registry, so they can be root keys of a config.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

from decodekit import hookspecs
from decodekit.errors import ConfigError, PluginError
from decodekit.processors.base import BuildContext, ProcessorChain
from decodekit.validation import field_model, validate

ENTRY_POINT_GROUP = "decodekit"
DISABLE_AUTOLOAD_ENV = "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; decodekit goes on without it."""


@dataclass(frozen=True)
class Component:
    """One registered processor or sampler."""

    name: str
    kind: Literal["processor", "sampler"]
    cls: type
    params: type[BaseModel]
    plugin: str
    order: int = 1000

    @property
    def settings(self) -> list[str]:
        return list(self.params.model_fields)

    def defaults(self) -> dict[str, Any]:
        return {
            name: (None if f.is_required() else f.get_default(call_default_factory=True))
            for name, f in self.params.model_fields.items()
        }


@dataclass
class Registry:
    """Processors, samplers and strategies by name, each remembering which plugin gave it."""

    processors: dict[str, Component] = field(default_factory=dict)
    samplers: dict[str, Component] = field(default_factory=dict)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    strategy_plugins: dict[str, str] = field(default_factory=dict)
    owners: dict[str, Component] = field(default_factory=dict)  # setting name -> component (the first, if shared)
    sharers: dict[str, list[Component]] = field(default_factory=dict)  # shared setting -> every component taking it

    # --- filling --------------------------------------------------------------------------

    def add(self, cls: type, kind: Literal["processor", "sampler"], plugin: str) -> Component:
        name = getattr(cls, "name", "")
        params = getattr(cls, "Params", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin}: {kind} class {getattr(cls, '__qualname__', repr(cls))} has no `name`")
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"plugin {plugin}: {kind} {name!r} has no pydantic `Params` model")
        table = self.processors if kind == "processor" else self.samplers
        if name in table:
            other = table[name]
            raise PluginError(f"{kind} name {name!r} is registered twice: by plugin {other.plugin} and by plugin {plugin}")
        order = getattr(cls, "order", 1000)
        if not isinstance(order, int) or isinstance(order, bool):
            raise PluginError(f"plugin {plugin}: {kind} {name!r} has order={order!r}; expected an integer")
        component = Component(name, kind, cls, params, plugin, order)
        for setting in component.settings:
            if setting in self.owners and _shared(setting, component, self.owners[setting]):
                continue
            if setting in self.owners or setting in ("sampler", "strategy"):
                other = self.owners.get(setting)
                who = f"{other.kind} {other.name!r} of plugin {other.plugin}" if other else "decodekit itself"
                raise PluginError(
                    f"setting {setting!r} of {kind} {name!r} (plugin {plugin}) is already used by {who}"
                )
        for setting in component.settings:
            self.owners.setdefault(setting, component)
            if setting in getattr(cls, "shared_settings", ()):
                self.sharers.setdefault(setting, []).append(component)
        table[name] = component
        return component

    def add_strategy(self, name: str, settings: Mapping[str, Any], plugin: str) -> None:
        if name in self.strategies:
            raise PluginError(
                f"strategy name {name!r} is registered twice: by plugin {self.strategy_plugins[name]} and by plugin {plugin}"
            )
        self.strategies[name] = dict(settings)
        self.strategy_plugins[name] = plugin

    # --- looking up -----------------------------------------------------------------------

    def processor(self, name: str) -> Component:
        return self._lookup(self.processors, name, "processor")

    def sampler(self, name: str) -> Component:
        return self._lookup(self.samplers, name, "sampler")

    def _lookup(self, table: dict[str, Component], name: str, kind: str) -> Component:
        if name not in table:
            raise ConfigError(f"{kind}={name!r} is not known{_suggest(name, table)}; known: {', '.join(sorted(table))}")
        return table[name]

    @property
    def settings(self) -> list[str]:
        return sorted(self.owners)

    def default_order(self) -> list[str]:
        """Processor names in their default chain order (transformers' order for built-ins)."""
        return [c.name for c in sorted(self.processors.values(), key=lambda c: (c.order, c.name))]

    # --- building -------------------------------------------------------------------------

    def split(self, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Group flat settings by the component that owns them; ``None`` values are left out.

        A shared setting (``penalty_last_n``) goes to every component taking it that another of
        its settings puts in the chain; given alone, it is validated and changes nothing.
        """
        grouped: dict[str, dict[str, Any]] = {}
        shared: dict[str, Any] = {}
        for key, value in settings.items():
            owner = self.owners.get(key)
            if owner is None:
                raise ConfigError(f"{key}: not a known setting{_suggest(key, self.owners)}; known: {', '.join(self.settings)}")
            if value is None:
                continue
            if key in self.sharers:
                shared[key] = value
            else:
                grouped.setdefault(f"{owner.kind}:{owner.name}", {})[key] = value
        for key, value in shared.items():
            takers = [f"{c.kind}:{c.name}" for c in self.sharers[key] if f"{c.kind}:{c.name}" in grouped]
            if not takers:
                validate(field_model(self.owners[key].params, key), **{key: value})
            for taker in takers:
                grouped[taker][key] = value
        return grouped

    def build_chain(
        self,
        settings: Mapping[str, Any],
        *,
        processor_order: list[str] | None = None,
        temperature_last: bool = False,
        context: BuildContext | None = None,
    ) -> ProcessorChain:
        """A chain of the processors whose settings are given (not ``None``), validated.

        Default order: :meth:`default_order`. ``processor_order`` lists names to run first, in that
        order (the rest follow in default order); each must be in the chain (one of its settings
        given), or :class:`ConfigError` says which is not. ``temperature_last`` moves temperature
        to the end, as llama.cpp does. Sampler settings in ``settings`` are ignored here.
        """
        context = context or BuildContext()
        grouped = self.split(settings)
        active = [self.processors[k.split(":", 1)[1]] for k in grouped if k.startswith("processor:")]
        rank = {name: i for i, name in enumerate(self.default_order())}
        if processor_order is not None:
            self.check_order(processor_order, {c.name for c in active})
            first = {name: i for i, name in enumerate(processor_order)}
            key = lambda c: (0, first[c.name]) if c.name in first else (1, rank[c.name])  # noqa: E731
        else:
            key = lambda c: (1, rank[c.name])  # noqa: E731
        active.sort(key=key)
        if temperature_last:
            active.sort(key=lambda c: c.name == "temperature")
        built = []
        for c in active:
            params = validate(c.params, **grouped[f"processor:{c.name}"])
            built.append(c.cls.from_params(params, context))
        return ProcessorChain(built)

    def check_order(self, processor_order: list[str], active: set[str]) -> None:
        """Raise :class:`ConfigError` for a ``processor_order`` name that is unknown or not in the chain."""
        for name in processor_order:
            try:
                component = self.processor(name)
            except ConfigError as e:
                raise ConfigError(f"processor_order: {e}") from None
            if name not in active:
                settings = component.settings
                what = f"set {settings[0]}=..." if len(settings) == 1 else f"set one of {', '.join(settings)}"
                raise ConfigError(
                    f"processor_order: {name!r} is not in the chain, as none of its settings is set; "
                    f"{what} to add it, or leave it out of processor_order"
                )

    def build_sampler(self, name: str, settings: Mapping[str, Any] | None = None, *, context: BuildContext | None = None) -> Any:
        """The sampler ``name`` built from its settings in ``settings`` (others are ignored)."""
        component = self.sampler(name)
        grouped = self.split(settings or {})
        own = grouped.get(f"sampler:{name}", {})
        for key, group in grouped.items():
            kind, other = key.split(":", 1)
            if kind == "sampler" and other != name:
                raise ConfigError(f"{', '.join(group)}: setting(s) of sampler {other!r}, but sampler={name!r}")
        params = validate(component.params, **own)
        return component.cls.from_params(params, context or BuildContext())


def _shared(setting: str, new: Component, owner: Component) -> bool:
    """Whether both components declare ``setting`` shared, with the same type, default and bounds."""
    if setting not in getattr(new.cls, "shared_settings", ()) or setting not in getattr(owner.cls, "shared_settings", ()):
        return False
    a, b = new.params.model_fields[setting], owner.params.model_fields[setting]
    return (a.annotation, a.default, a.metadata) == (b.annotation, b.default, b.metadata)


def _suggest(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the plugin manager -----------------------------------------------------------------------


def get_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A plugin manager with decodekit's hookspecs, its built-ins, and installed plugins.

    Plugins come only from installed entry points of the group ``decodekit``; set the environment
    variable ``DECODEKIT_DISABLE_PLUGIN_AUTOLOAD=1`` (or pass ``autoload=False``) to skip them. A
    plugin that fails to import gives a :class:`PluginWarning` naming it, and the rest keeps working.
    """
    from decodekit import builtins

    pm = pluggy.PluginManager("decodekit")
    pm.add_hookspecs(hookspecs)
    pm.register(builtins, name="decodekit")
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        load_entry_points(pm)
    pm.check_pending()
    return pm


def load_entry_points(pm: pluggy.PluginManager, group: str = ENTRY_POINT_GROUP) -> None:
    """Register every entry point of ``group``; warn about (and skip) any that fails to load."""
    for ep in entry_points(group=group):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # any failure of a third party's import is reported, not fatal
            warnings.warn(
                f"decodekit plugin {ep.name!r} ({ep.value}) failed to load and is skipped: {type(exc).__name__}: {exc}",
                PluginWarning,
                stacklevel=2,
            )


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Collect every plugin's processors, samplers and strategies into a :class:`Registry`.

    A plugin whose hook raises, or returns something other than what the hook promises (a list of
    classes; a mapping of strategy names to settings), gives a :class:`PluginWarning` naming the
    plugin and the hook, and is left out whole; the others are registered as usual.
    """
    hooks = pm.hook
    names = ("decodekit_register_processors", "decodekit_register_samplers", "decodekit_register_strategies")
    results: dict[str, list[tuple[str, Any]]] = {name: [] for name in names}
    broken: set[str] = set()
    for name in names:
        for impl in getattr(hooks, name).get_hookimpls():  # registration order: built-ins first
            if impl.plugin_name in broken:
                continue  # one line per plugin
            try:
                result = _hook_result(name, impl.function())
            except Exception as exc:  # a third party's bug: reported, not fatal
                broken.add(impl.plugin_name)
                warnings.warn(f"decodekit plugin {impl.plugin_name!r}: {name} {_failure(exc)}; the plugin is skipped",
                              PluginWarning, stacklevel=2)  # fmt: skip
                continue
            results[name].append((impl.plugin_name, result))
    registry = Registry()
    for name, kind in zip(names, ("processor", "sampler")):
        for plugin, classes in results[name]:
            if plugin not in broken:
                for cls in classes:
                    registry.add(cls, kind, plugin)  # type: ignore[arg-type]
    for plugin, strategies in results["decodekit_register_strategies"]:
        if plugin not in broken:
            for strategy, settings in strategies.items():
                registry.add_strategy(strategy, settings, plugin)
    return registry


class _BadResult(Exception):
    """A hook returned something it should not have (the message says what)."""


def _hook_result(hook: str, result: Any) -> Any:
    """A hook's result, checked: a list of classes, or a mapping of names to settings."""
    if hook == "decodekit_register_strategies":
        if result is None:
            return {}
        if not isinstance(result, Mapping):
            raise _BadResult(f"returned {_shown(result)}, not a mapping of strategy names to settings")
        for name, settings in result.items():
            if not isinstance(name, str) or not isinstance(settings, Mapping):
                raise _BadResult(f"returned strategy {_shown(name)}: {_shown(settings)}; expected a name and a mapping of settings")
        return result
    if result is None:
        return []
    if not isinstance(result, (list, tuple)):
        raise _BadResult(f"returned {_shown(result)}, not a list of classes")
    for item in result:
        if not isinstance(item, type):
            raise _BadResult(f"returned {_shown(item)} in its list, not a class")
    return list(result)


def _failure(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _BadResult) else f"raised {type(exc).__name__}: {exc}"


def _shown(value: Any) -> str:
    """``'top_p' (a str)``: a value and its type, shortened for a one-line message."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


_REGISTRY: Registry | None = None


def get_registry(*, refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use from :func:`get_plugin_manager`)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry(get_plugin_manager())
    return _REGISTRY


def build_chain(settings: Mapping[str, Any], **kwargs: Any) -> ProcessorChain:
    """:meth:`Registry.build_chain` on the process-wide registry."""
    return get_registry().build_chain(settings, **kwargs)


def build_sampler(name: str, settings: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """:meth:`Registry.build_sampler` on the process-wide registry."""
    return get_registry().build_sampler(name, settings, **kwargs)


def build_row_chain(
    settings: list[Mapping[str, Any]],
    context: BuildContext | None = None,
    order: list[str] | None = None,
    *,
    include: Sequence[str] = (),
) -> ProcessorChain:
    """One chain for a batch whose rows each have their own settings (one dict of flat settings per row).

    A processor is in the chain when some row gives it a value that is not off; rows that do not
    set it get its off value (``row_params``), so their logits pass it unchanged. Processors run in
    the registry's default order, or ``order`` first (as ``processor_order``). A processor without
    per-row support is built once, and only when every row gives it the same settings. Errors name
    the row: ``row 3: top_p=1.5 is not allowed: must be <= 1.0``. ``include`` names processors
    to build even where every row is off (the request engine gives newcomers the structure of
    its live chain so).
    """
    registry = get_registry()
    context = context or BuildContext()
    if isinstance(settings, Mapping) or not settings:
        raise ConfigError(f"settings: {settings!r} is not allowed: give a list with one dict of settings per row")
    grouped = []
    for i, row in enumerate(settings):
        try:
            grouped.append(registry.split(row))
        except ConfigError as exc:
            raise ConfigError(f"row {i}: {exc}") from None
    names = {key.split(":", 1)[1] for g in grouped for key in g if key.startswith("processor:")} | set(include)
    rank = {name: i for i, name in enumerate(registry.default_order())}
    first = {name: i for i, name in enumerate(order or [])}
    for name in first:
        registry.processor(name)
    built = []
    for name in sorted(names, key=lambda n: (0, first[n]) if n in first else (1, rank[n])):
        component = registry.processors[name]
        params = []
        if all(f"processor:{name}" not in g for g in grouped):  # included, set by no row: all off
            built.append(_row_processor(component, [None] * len(grouped), context))
            continue
        for i, g in enumerate(grouped):
            given = g.get(f"processor:{name}")
            try:
                params.append(None if given is None else validate(component.params, **given))
            except ConfigError as exc:
                raise ConfigError(f"row {i}: {exc}") from None
        processor = _row_processor(component, params, context)
        if getattr(processor, "active", True) or name in include:
            built.append(processor)
    return ProcessorChain(built)


def _row_processor(component: Component, params: list[BaseModel | None], context: BuildContext) -> Any:
    """``component`` built for every row: per-row values where it takes them, else one shared build."""
    cls, given = component.cls, [p for p in params if p is not None]
    row_params = getattr(cls, "row_params", {})
    if not given:  # every row off
        if not row_params:
            raise ConfigError(f"{component.name} takes no per-row values: it cannot be off in some rows only")
        return cls.from_row_params({k: [off] * len(params) for k, off in row_params.items()}, {}, context)
    shared = {k: v for k, v in given[0].model_dump().items() if k not in row_params}
    for i, p in enumerate(params):
        if p is not None and {k: v for k, v in p.model_dump().items() if k not in row_params} != shared:
            raise ConfigError(
                f"row {i}: {', '.join(shared)} of {component.name} must be the same in every row that sets it"
            )
    if not row_params:
        if len(given) != len(params) or any(p != given[0] for p in given):
            raise ConfigError(
                f"{component.name} takes no per-row values: give every row the same {', '.join(component.settings)}"
            )
        return cls.from_params(given[0], context)
    values = {k: [off if p is None else getattr(p, k) for p in params] for k, off in row_params.items()}
    return cls.from_row_params(values, shared, context)
