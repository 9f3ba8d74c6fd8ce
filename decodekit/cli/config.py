"""The `decode` command's configuration: Hydra composition, keys made from the registry, validation.

Hydra composes ``conf/config.yaml`` with the ``model``, ``tokenizer`` and ``strategy`` groups; the
result is validated once, by :func:`validate_config`, against pydantic models with
``extra="forbid"``. Root keys come from two places:

- the command's own keys (:class:`CommandConfig`: prompt, max_new_tokens, seed, device, ...);
- every setting of every registered processor and sampler (``get_registry().owners``), plugins'
  included, stored by :func:`register_configs` as a null root key through Hydra's ConfigStore,
  typed from the component's ``Params`` (so ``top_p=1.5`` is refused before anything loads).
  Strategies that plugins register become options of the ``strategy`` group the same way: a
  plugin needs no YAML of its own.

Every failure, Hydra's included (an unknown group option, a misspelt key, bad override syntax),
becomes one :class:`~decodekit.errors.ConfigError` line naming the key, the value and what is
allowed (for unknown names: the known ones, and the closest).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from decodekit.cli.strategies import BUILTIN_STRATEGIES, strategy_hint, strategy_preset
from decodekit.cli.values import normalize_values
from decodekit.errors import ConfigError, PluginError
from decodekit.jobs.spec import parse_job
from decodekit.random import SEED_LIMIT
from decodekit.registry import Registry
from decodekit.validation import validate

CONFIG_MODULE = "decodekit.conf"
CONFIG_NAME = "config"
SETTINGS_NODE = "decodekit_settings"  # the ConfigStore node holding one null key per registry setting
GROUPS = ("model", "strategy", "tokenizer")


# ------------------------------------------------------------------------------ schema


class CommandConfig(BaseModel):
    """The command's own root keys (the processor and sampler settings are added per registry)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, coerce_numbers_to_str=True)

    prompt: Optional[str] = Field(None, description="text to continue (none given: an empty prompt)")
    prompt_tokens: Optional[list[Annotated[int, Field(ge=0)]]] = Field(
        None, min_length=1, description="the prompt as token ids, e.g. [1,2,3]"
    )
    prompt_file: Optional[str] = Field(None, description="many prompts: one per line, or .jsonl; - reads stdin")
    max_new_tokens: int = Field(64, ge=1, description="most tokens added per sample")
    num_samples: int = Field(1, ge=1, description="samples per prompt, in one batch")
    batch_size: int = Field(8, ge=1, description="prompts per batch with prompt_file")
    seed: Optional[int] = Field(
        None, ge=0, lt=SEED_LIMIT, description="0 <= seed < 2**32; sample i uses seed + i (mod 2**32); null = random"
    )
    stop: list[str] = Field(default_factory=list, description='stop strings, e.g. \'["\\n\\n"]\'')
    eos_token_id: Optional[int] = Field(None, ge=0, description="end-of-text id (default: the tokenizer's)")
    strategy: str = Field("custom", description="the strategy that preset the knobs")
    sampler: str = Field("multinomial", description="greedy | multinomial | beam | plugins' samplers")
    processor_order: Optional[list[str]] = Field(None, description="processors to run first, in order")
    temperature_last: bool = Field(False, description="run temperature after every other processor")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model precision")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads decoding uses; null = torch's default")
    output_file: Optional[str] = Field(None, description="JSONL file, one object per sample")
    overwrite: bool = Field(False, description="replace an output_file that exists")
    append: bool = Field(False, description="add to an output_file that exists")
    quiet: bool = Field(False, description="print no samples on stdout")
    show_probs: bool = Field(False, description="top candidates per step, before and after the chain")
    show_probs_k: int = Field(5, ge=1, description="candidates show_probs prints")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="per new token its logprob and n alternatives'")
    logprobs_mode: Literal["raw", "processed"] = Field("raw", description="raw | processed (after the chain)")
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20, description="the prompt tokens' raw logprobs")
    score: bool = Field(False, description="score the prompts: per-token logprobs, total, perplexity")
    progress: Optional[bool] = Field(None, description="progress bar on stderr; null = on long runs in a terminal")
    summary: Optional[bool] = Field(
        None, description="end-of-run line on stderr: tokens, tok/s, time to first token; null = in a terminal"
    )
    interactive: bool = Field(False, description="a prompt loop (/help lists its commands)")
    list_components: bool = Field(False, alias="list", description="list processors, samplers, strategies")
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "default"}, description="the model group")
    tokenizer: dict[str, Any] = Field(default_factory=lambda: {"kind": "auto"}, description="the tokenizer group")
    job: dict[str, Any] = Field(default_factory=dict, description="a job: a file of prompts to a folder of results")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def settings(self) -> dict[str, Any]:
        """The processor and sampler settings that are set (not null)."""
        own = set(CommandConfig.model_fields)
        return {k: v for k, v in self if k not in own and v is not None}


class DefaultModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["default"]
    pack_weights: Optional[bool] = None
    weights: Literal["float32", "bf16", "int8", "w8a8"] = "float32"
    kernels: Literal["auto", "native", "library"] = "auto"
    kv_cache: Literal["auto", "bf16"] = "auto"


class CheckpointModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["checkpoint", "hf"]
    path: Optional[str] = None
    backend: Literal["auto", "native", "hf"] = "auto"
    pack_weights: Optional[bool] = None
    weights: Literal["float32", "bf16", "int8", "w8a8"] = "float32"
    kernels: Literal["auto", "native", "library"] = "auto"
    kv_cache: Literal["auto", "bf16"] = "auto"


class GGUFModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["gguf"]
    path: Optional[str] = None
    pack_weights: Optional[bool] = None
    weights: Literal["float32", "bf16", "int8", "w8a8"] = "float32"
    kernels: Literal["auto", "native", "library"] = "auto"
    kv_cache: Literal["auto", "bf16"] = "auto"


class ByteTokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["byte"]
    eos_token_id: Optional[int] = Field(None, ge=256)
    bos_token_id: Optional[int] = Field(None, ge=256)
    add_bos: bool = False


class AutoTokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["auto"]


class PathTokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["json", "hf"]
    path: Optional[str] = None


MODEL_SCHEMAS: dict[str, type[BaseModel]] = {
    "default": DefaultModel, "checkpoint": CheckpointModel, "hf": CheckpointModel, "gguf": GGUFModel,
}  # fmt: skip
TOKENIZER_SCHEMAS: dict[str, type[BaseModel]] = {
    "auto": AutoTokenizerConfig,
    "byte": ByteTokenizerConfig,
    "json": PathTokenizerConfig,
    "hf": PathTokenizerConfig,
}


def setting_field(registry: Registry, name: str) -> tuple[Any, Any]:
    """A registry setting as an optional root field, typed and constrained as its owner's Params."""
    info = registry.owners[name].params.model_fields[name]
    annotation = info.annotation if info.annotation is not None else Any
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return Optional[annotation], Field(None, description=info.description)


_MODELS: dict[int, tuple[Registry, dict[str, Any], type[CommandConfig]]] = {}


def config_model(registry: Registry) -> type[CommandConfig]:
    """The pydantic model of the whole composed configuration for ``registry`` (cached)."""
    cached = _MODELS.get(id(registry))
    if cached is None or cached[0] is not registry or cached[1] != registry.owners:
        cached = _MODELS[id(registry)] = (registry, dict(registry.owners), _build_config_model(registry))
    return cached[2]


def _build_config_model(registry: Registry) -> type[CommandConfig]:
    clash = sorted(set(registry.owners) & (set(CommandConfig.model_fields) | {"list"}))
    if clash:
        owner = registry.owners[clash[0]]
        raise PluginError(
            f"setting {clash[0]!r} of {owner.kind} {owner.name!r} (plugin {owner.plugin}) "
            "is a key of the decode command itself; rename it"
        )
    fields = {name: setting_field(registry, name) for name in registry.owners}
    return create_model("DecodeConfig", __base__=CommandConfig, **fields)


def root_keys(registry: Registry) -> list[str]:
    """Every key the command accepts at the root of its configuration."""
    keys = {f.alias or name for name, f in CommandConfig.model_fields.items()} | set(registry.owners)
    return sorted(keys)


# ------------------------------------------------------------------------------ ConfigStore


def register_configs(registry: Registry, store: ConfigStore | None = None) -> None:
    """Store the registry's settings (null root keys) and plugin strategies in Hydra's ConfigStore."""
    store = store or ConfigStore.instance()
    config_model(registry)  # a setting named like a command key fails here, with the plugin named
    store.store(name=SETTINGS_NODE, node={name: None for name in registry.settings}, provider="decodekit")
    for name, preset in registry.strategies.items():
        if name in BUILTIN_STRATEGIES:
            raise PluginError(
                f"strategy name {name!r} (plugin {registry.strategy_plugins[name]}) is a built-in strategy of decode"
            )
        node = {"strategy": name, "sampler": "multinomial", **dict(preset)}
        store.store(group="strategy", name=name, node=node, package="_global_", provider=registry.strategy_plugins[name])


# ------------------------------------------------------------------------------ validation


def validate_config(container: Mapping[str, Any], registry: Registry) -> CommandConfig:
    """The composed configuration as a validated :class:`CommandConfig` (with the registry's keys).

    Raises :class:`ConfigError` with one line naming each bad key, its value and what is allowed.
    """
    values = dict(container)
    sampler = values.get("sampler")
    if isinstance(sampler, str) and sampler not in registry.samplers:
        strategy = values.get("strategy")
        via = f" (set by strategy={strategy})" if strategy_preset(registry, strategy).get("sampler") == sampler else ""
        raise ConfigError(
            f"sampler={sampler!r}{via} is not known{suggest(sampler, registry.samplers)}; "
            f"known: {', '.join(sorted(registry.samplers))}"
        )
    model_type = config_model(registry)
    config = validate(model_type, **normalize_values(values, model_type))
    model = config.model
    schema = MODEL_SCHEMAS.get(model.get("name"))
    if schema is None:
        raise ConfigError(f"model.name={model.get('name')!r} is not allowed: must be one of {', '.join(MODEL_SCHEMAS)}")
    validate(schema, "model.", **model)
    if model["name"] != "default" and not model.get("path"):
        raise ConfigError(f"model.path: is required with model={model['name']} (a checkpoint file or folder)")
    tok = config.tokenizer
    schema = TOKENIZER_SCHEMAS.get(tok.get("kind"))
    if schema is None:
        raise ConfigError(f"tokenizer.kind={tok.get('kind')!r} is not allowed: must be one of {', '.join(TOKENIZER_SCHEMAS)}")
    validate(schema, "tokenizer.", **tok)
    if tok["kind"] in ("json", "hf") and not tok.get("path"):
        raise ConfigError(f"tokenizer.path: is required with tokenizer={tok['kind']}")
    parse_job(config.job)
    if config.overwrite and config.append:
        raise ConfigError("overwrite=true and append=true: give one (replace the output_file, or add to it)")
    given = [k for k in ("prompt", "prompt_tokens", "prompt_file") if getattr(config, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: give only one of prompt, prompt_tokens, prompt_file")
    settings = config.settings()
    if config.processor_order:
        active = {key.split(":", 1)[1] for key in registry.split(settings) if key.startswith("processor:")}
        registry.check_order(config.processor_order, active)
    for key, group in registry.split(settings).items():
        kind, name = key.split(":", 1)
        component = registry.processors[name] if kind == "processor" else registry.samplers[name]
        if kind == "sampler" and name != config.sampler:
            raise ConfigError(
                f"{', '.join(group)}: setting(s) of sampler {name!r}, but sampler={config.sampler!r}"
                f"{strategy_hint(registry, name)}"
            )
        validate(component.params, **group)
    if config.show_probs and getattr(registry.samplers[config.sampler].cls, "drives_loop", False):
        raise ConfigError(f"show_probs=true: works with step-by-step samplers, not with sampler={config.sampler!r}")
    return config


def suggest(name: Any, known: Sequence[str] | Mapping[str, Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------ composition


@contextmanager
def hydra_context() -> Iterator[None]:
    """Hydra initialised on ``decodekit.conf`` (reuses the running app's when there is one)."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="decode"):
        yield


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's parse of command-line overrides; bad syntax becomes one ConfigError line."""
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as e:
            raise ConfigError(f"{line}: cannot parse: {_first_line(e)}") from None
    return parsed


def strategy_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides``, with the default strategy dropped when a sampler is chosen without a strategy.

    ``sampler=X`` alone means sampler X and no preset (strategy ``custom``): not X under the
    default strategy's temperature and top_p, recorded as that strategy. Of several strategy
    overrides (``~strategy``, then ``/set strategy=greedy`` in a session) the last one counts.
    """
    parsed = parse_overrides(overrides)
    strategies = [i for i, o in enumerate(parsed) if o.key_or_group == "strategy"]
    if strategies:
        return [line for i, line in enumerate(overrides) if i not in strategies[:-1]]
    if any(o.key_or_group == "sampler" and not o.is_delete() for o in parsed):
        return [*overrides, "~strategy"]
    return list(overrides)


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job of a sweep (``-m temperature=0.3,0.7`` -> two lists)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        return BasicSweeper.split_arguments(parse_overrides(overrides), None)[0]
    except HydraException as e:
        raise ConfigError(_first_line(e)) from None


def compose_config(overrides: Sequence[str], registry: Registry) -> tuple[DictConfig, CommandConfig]:
    """Compose ``config`` with ``overrides`` and validate it; inside :func:`hydra_context`.

    Unknown group options and keys are caught before Hydra sees them, so each gets a precise line.
    """
    overrides = strategy_overrides(overrides)
    parsed = parse_overrides(overrides)
    loader = GlobalHydra.instance().config_loader()
    group_overrides, key_overrides = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override():
            raise ConfigError(
                f"{o.input_line}: several values are a sweep: add -m to run one job per value "
                "(a list value is written in brackets: key=[a,b])"
            )
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key in GROUPS or (o.package is None and key in loader.list_groups("")):
            group_overrides.append(o)
        else:
            key_overrides.append(o)
    for o in group_overrides:
        _check_option(loader, o)
    added = [o for o in key_overrides if o.is_add() or o.is_force_add()]
    try:
        cfg = compose(CONFIG_NAME, overrides=list(overrides))
        container = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        _check_keys(group_overrides, key_overrides, registry)  # a precise line for an unknown key
        raise ConfigError(_first_line(e)) from None
    if added:  # keys added with + compose fine; name the unknown ones as such
        _check_keys(group_overrides, added, registry)
    assert isinstance(container, dict)
    return cfg, validate_config(container, registry)


def _check_keys(group_overrides: list[Override], key_overrides: list[Override], registry: Registry) -> None:
    """Raise a ConfigError for the first key override naming a key the configuration lacks."""
    try:
        base = compose(CONFIG_NAME, overrides=[o.input_line for o in group_overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_first_line(e)) from None
    for o in key_overrides:
        if not o.is_delete():
            _check_key(base, o.key_or_group, registry)


def _check_option(loader: Any, o: Override) -> None:
    group, value = o.key_or_group, o.value()
    options = sorted(loader.get_group_options(group))
    if o.is_delete() or (isinstance(value, str) and value in options):
        return
    if value is None:
        raise ConfigError(f"{group}=null: to use no {group} option write ~{group}; known: {', '.join(options)}")
    hint = ""
    if group == "model" and isinstance(value, str):
        hint = f" (for a checkpoint: model=checkpoint model.path={value})"
    elif group == "tokenizer" and isinstance(value, str):
        hint = f" (for a file: tokenizer=json tokenizer.path={value})"
    raise ConfigError(
        f"{group}={value!r} is not known{suggest(value, options)}; known: {', '.join(options)}{hint}"
    )


def _check_key(base: DictConfig, key: str, registry: Registry) -> None:
    parts = key.split(".")
    node: Any = base
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        if depth == 0:
            known = root_keys(registry)
            raise ConfigError(f"{key}: not a known setting{suggest(part, known)}; known: {', '.join(known)}")
        parent = ".".join(parts[:depth])
        if isinstance(node, DictConfig):
            known = [str(k) for k in node.keys()]
            where = f"{parent}={node.get('name', node.get('kind'))}" if parent in ("model", "tokenizer") else parent
            extra = ""
            if parent == "model" and part == "path":
                extra = " (model=checkpoint and model=hf take a path)"
            elif parent == "tokenizer" and part == "path":
                extra = " (tokenizer=json and tokenizer=hf take a path)"
            raise ConfigError(
                f"{key}: {where} has no key {part!r}{suggest(part, known)}; its keys: {', '.join(known)}{extra}"
            )
        raise ConfigError(f"{key}: {parent} is not a group of keys")


def _first_line(e: BaseException) -> str:
    """The first meaningful line of an exception (Hydra's messages span several)."""
    text = str(e) or (str(e.__cause__) if e.__cause__ else "") or type(e).__name__
    lines = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(e).__name__
