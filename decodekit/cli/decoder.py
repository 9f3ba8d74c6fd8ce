"""The model, tokenizer, processor chain and sampler a `decode` configuration asks for.

:class:`Decoder` loads them once (a sweep's runs reuse the model last loaded, and the REPL reuses
the tokenizer while the model stays), checks that tokenizer and model agree, and builds the chain
and the sampler from the registry with what they need to know (EOS, vocabulary, encode/decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from decodekit.cli.config import CommandConfig
from decodekit.cli.summary import placement
from decodekit.errors import ConfigError
from decodekit.models import ModelExtras, load_model
from decodekit.processors.base import BuildContext, ProcessorChain
from decodekit.registry import Registry
from decodekit.tokenization import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer

_LOADED: dict[tuple[Any, ...], tuple[Any, ModelExtras]] = {}  # the model last loaded (a sweep's jobs reuse it)
OWN_THREADS = torch.get_num_threads()  # torch's count when the command started: what threads=null decodes on


def use_threads(threads: int | None) -> None:
    """Decode on ``threads`` CPU threads (``None``: torch's own count), for this run and what follows
    it in the process (a sweep's next job, the session's next text) until another says otherwise."""
    torch.set_num_threads(OWN_THREADS if threads is None else threads)


@dataclass
class Decoder:
    """A loaded model and tokenizer, with the processor chain and sampler a configuration asks for."""

    config: CommandConfig
    model: Any
    extras: ModelExtras
    tokenizer: Tokenizer | None
    chain: ProcessorChain
    sampler: Any
    eos_token_id: int | None

    @classmethod
    def load(cls, config: CommandConfig, registry: Registry, previous: Decoder | None = None) -> Decoder:
        """Load (or reuse) the model and tokenizer, then build the chain and the sampler."""
        model, extras = load_cached(config)
        if previous is not None and previous.model is model and previous.config.tokenizer == config.tokenizer:
            tokenizer = previous.tokenizer
        else:
            tokenizer = make_tokenizer(config.tokenizer, extras, needed=config.prompt_tokens is None)
        if tokenizer is not None:
            check_vocab(tokenizer, model)
        eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is not None and eos >= model.vocab_size:
            raise ConfigError(f"eos_token_id={eos} is not allowed: the model has {model.vocab_size} tokens")
        context = BuildContext(
            eos_token_id=eos,
            encode=text_encoder(tokenizer) if tokenizer else None,
            decode=tokenizer.decode if tokenizer else None,
            vocab_size=model.vocab_size,
            tokenizer=tokenizer,
        )
        settings = config.settings()
        chain = registry.build_chain(
            settings, processor_order=config.processor_order, temperature_last=config.temperature_last, context=context
        )
        sampler = registry.build_sampler(config.sampler, settings, context=context)
        use_threads(config.threads)
        return cls(config, model, extras, tokenizer, chain, sampler, eos)

    @property
    def drives_loop(self) -> bool:
        return bool(getattr(self.sampler, "drives_loop", False))

    def describe(self) -> str:
        """``/path/model.safetensors (safetensors, 257 tokens, cpu with 2 threads, torch.float32); tokenizer: ByteTokenizer``."""
        tok = type(self.tokenizer).__name__ if self.tokenizer is not None else "none"
        shape = f"{self.extras.format}, {self.model.vocab_size} tokens, {placement(self.model.device)}, {self.model.dtype}"
        return f"{self.extras.source} ({shape}); tokenizer: {tok}"


def load_cached(config: CommandConfig) -> tuple[Any, ModelExtras]:
    """``load_model`` for the configuration's model group, reusing the model last loaded."""
    spec = config.model
    source = "default" if spec["name"] == "default" else spec["path"]
    backend, pack, weights = spec.get("backend", "auto"), spec.get("pack_weights"), spec.get("weights", "float32")
    kernels, kv_cache = spec.get("kernels", "auto"), spec.get("kv_cache", "auto")
    key = (source, backend, config.device, config.dtype, pack, weights, kernels, kv_cache)
    if key not in _LOADED:
        _LOADED.clear()  # keep one model in memory
        _LOADED[key] = load_model(source, device=config.device, dtype=config.dtype, backend=backend, pack_weights=pack,
                                  weights=weights, kernels=kernels, kv_cache=kv_cache)
    return _LOADED[key]


def make_tokenizer(spec: dict[str, Any], extras: ModelExtras, *, needed: bool) -> Tokenizer | None:
    """The tokenizer group's choice; ``None`` when ``auto`` finds none and none is needed."""
    kind = spec["kind"]
    if kind == "auto":
        if extras.tokenizer is None and not needed:
            return None
        return load_tokenizer("auto", extras)
    if kind == "byte":
        return ByteTokenizer(**{k: v for k, v in spec.items() if k != "kind"})
    return load_tokenizer({"kind": kind, "path": spec["path"]})


def text_encoder(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """``tokenizer.encode`` without the BOS some tokenizers put first (for ``bad_words`` and such)."""

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        return ids

    return encode
