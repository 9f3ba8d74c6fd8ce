"""What `decode --help` and `decode list=true` print: every key, processor, sampler and strategy."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Union

import annotated_types
from pydantic.fields import FieldInfo

from decodekit.cli.config import CommandConfig
from decodekit.cli.strategies import BUILTIN_STRATEGIES, strategy_preset
from decodekit.registry import Component, Registry

_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def type_name(annotation: Any) -> str:
    """``float``, ``list[str | list[int]]``, ``int | None``: a short readable type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def bounds(info: FieldInfo) -> str:
    """``> 0, <= 1`` from a field's constraints."""
    parts = []
    for meta in info.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(meta, cls):
                parts.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, annotated_types.MinLen):
            parts.append("non-empty" if meta.min_length == 1 else f"at least {meta.min_length} items")
    return ", ".join(parts)


def describe_field(info: FieldInfo) -> str:
    """``float, > 0, <= 1``: a field's type and range."""
    text = type_name(info.annotation)
    limits = bounds(info)
    return f"{text}, {limits}" if limits else text


def show_value(value: Any) -> str:
    """A value as it is written on the command line: ``null``, ``true``, ``0.9``, ``["\\n", ":"]``."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _default(info: FieldInfo, kind: str) -> str:
    if info.is_required():
        return "no default (setting it turns the processor on)" if kind == "processor" else "no default"
    return f"default {show_value(info.get_default(call_default_factory=True))}"


def _plugin(component_plugin: str) -> str:
    return "built-in" if component_plugin == "decodekit" else f"plugin {component_plugin}"


def settings_help(registry: Registry) -> str:
    """The key list of ``decode --help``: the command's keys, then every processor and sampler setting."""
    lines = ["Command keys:"]
    for name, info in CommandConfig.model_fields.items():
        if name in ("model", "tokenizer", "strategy"):
            continue
        key = info.alias or name
        default = show_value(info.get_default(call_default_factory=True))
        lines.append(f"  {key:<22} {describe_field(info):<30} {info.description or ''} (default {default})")
    lines.append("  model.path             str                            the checkpoint (model=checkpoint), folder (model=hf) or .gguf file (model=gguf)")
    lines.append("  model.pack_weights     bool | null                    prepacked CPU weights: faster, 2x their memory; null = on for")
    lines.append("                                                        the native GPT, off for transformers models (default null)")
    lines.append("  model.weights          float32 | bf16 | int8 | w8a8   how projections are stored on CPU: bf16 reads 1/2 of the bytes")
    lines.append("                                                        per token, int8 and w8a8 1/4; w8a8 also rounds activations to")
    lines.append("                                                        int8: fastest, least exact (default float32, exact)")
    lines.append("  model.kernels          auto | native | library        a CPU step's few rows through decodekit's AVX-512 kernels")
    lines.append("                                                        (built once on first use) or the library's (default auto:")
    lines.append("                                                        native where they run)")
    lines.append("  model.kv_cache         auto | bf16                    how the key/value cache is stored: bf16 halves its bytes")
    lines.append("                                                        (native GPT and Llama; default auto: the model's dtype)")
    lines.append("  tokenizer.path         str                            tokenizer.json or folder (tokenizer=json / tokenizer=hf)")
    lines.append("")
    lines.append("Processor settings (null = off; set one to put its processor in the chain), in chain order:")
    lines.extend(_setting_lines(*(registry.processors[name] for name in registry.default_order())))
    sampler_lines = _setting_lines(*registry.samplers.values())
    if sampler_lines:
        lines.append("")
        lines.append("Sampler settings (for the sampler that owns them):")
        lines.extend(sampler_lines)
    lines.append("")
    lines.append("Samplers (sampler=NAME): " + ", ".join(sorted(registry.samplers)))
    lines.append("All processors, samplers and strategies with their defaults: decode list=true")
    return "\n".join(lines)


def _setting_lines(*components: Component) -> list[str]:
    """One line per setting; a setting several components share (``penalty_last_n``) once, naming them all."""
    fields: dict[str, tuple[FieldInfo, list[str], str]] = {}
    for component in components:
        for name, info in component.params.model_fields.items():
            owners = fields.setdefault(name, (info, [], component.plugin))[1]
            if name != component.name:
                owners.append(component.name)
    out = []
    for name, (info, owners, plugin) in fields.items():
        owner = f"[{', '.join(owners)}] " if owners else ""
        origin = "" if plugin == "decodekit" else f" ({_plugin(plugin)})"
        out.append(f"  {name:<22} {describe_field(info):<30} {owner}{info.description or ''}{origin}")
    return out


def listing(registry: Registry) -> str:
    """``decode list=true``: every processor, sampler and strategy, its settings and who registered it."""
    lines = ["Processors, in default chain order (a processor runs when one of its settings is set):"]
    for name in registry.default_order():
        c = registry.processors[name]
        lines.append(f"  {c.name}  (order {c.order}, {_plugin(c.plugin)})")
        lines.extend(_params(c))
    lines.append("")
    lines.append("Samplers (sampler=NAME):")
    for name in sorted(registry.samplers):
        c = registry.samplers[name]
        lines.append(f"  {c.name}  ({_plugin(c.plugin)})")
        lines.extend(_params(c))
    lines.append("")
    lines.append("Strategies (strategy=NAME; presets that command-line keys override):")
    names = sorted(set(BUILTIN_STRATEGIES) | set(registry.strategies))
    for name in names:
        preset = strategy_preset(registry, name)
        where = f"plugin {registry.strategy_plugins[name]}" if name in registry.strategies else f"built-in, conf/strategy/{name}.yaml"
        values = " ".join(f"{k}={show_value(v)}" for k, v in preset.items())
        lines.append(f"  {name}  ({where}): {values}")
    return "\n".join(lines)


def _params(component: Component) -> list[str]:
    fields = component.params.model_fields
    if not fields:
        return ["      (no settings)"]
    return [
        f"      {name}: {describe_field(info)}; {_default(info, component.kind)}" + (f"; {info.description}" if info.description else "")
        for name, info in fields.items()
    ]
