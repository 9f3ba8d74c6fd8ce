"""A native GPT (the GPT-2 / nanoGPT architecture) with a preallocated key/value cache.

:class:`GPT` follows :class:`decodekit.models.protocol.CausalLM`. Its parameter names are
nanoGPT's (``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``, ...), so a
nanoGPT state dict loads as is; GPT-2 weights in Hugging Face's layout load through
:func:`decodekit.models.loading.load_model`, which transposes their ``Conv1D`` weights.

Decoding cost per new token is flat: keys and values of earlier positions live in a
:class:`KVCache` allocated once for the whole generation, and only the last position goes
through ``lm_head``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from decodekit.errors import ConfigError
from decodekit.models.cache import KVCache, SlotCache, empty_cache
from decodekit.models.native import Reads, cache_layer, cache_positions, lookup, step_cache, without_plan
from decodekit.models.packing import Linear, hand_out_contiguous, pack_weights

__all__ = ["GPT", "GPTConfig", "KVCache", "SlotCache"]


class GPTConfig(BaseModel):
    """The shape of a GPT; field names are nanoGPT's ``model_args``.

    ``dropout`` is accepted so nanoGPT checkpoints load, and ignored: this module is for
    inference (and small from-scratch training runs without dropout).

    ``activation`` is the MLP's GELU: ``"gelu_tanh"``, the tanh approximation GPT-2 was trained
    with (Hugging Face's ``gelu_new``), or ``"gelu"``, the exact erf form of ``nn.GELU()`` that
    nanoGPT's ``model.py`` uses. The two differ by up to about 5e-4 per activation, which
    shows in the logits, so a model must run with the form it was trained with:
    :func:`~decodekit.models.loading.load_model` sets ``"gelu"`` for nanoGPT checkpoints and
    reads Hugging Face's ``activation_function``. The default, ``"gelu_tanh"``, is what this
    module has always used, so configs saved without the field (the embedded default model,
    ``.pt`` and safetensors files written from a :class:`GPT`) keep the form they were
    trained with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(1024, gt=0, description="most positions attended over (n_positions)")
    vocab_size: int = Field(50304, gt=0, description="number of logits per position")
    n_layer: int = Field(12, gt=0, description="transformer blocks")
    n_head: int = Field(12, gt=0, description="attention heads per block")
    n_embd: int = Field(768, gt=0, description="width of the residual stream")
    bias: bool = Field(True, description="biases in Linear and LayerNorm layers (GPT-2: True)")
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="ignored (inference only)")
    layer_norm_eps: float = Field(1e-5, gt=0.0, description="LayerNorm epsilon (GPT-2: 1e-5)")
    activation: Literal["gelu_tanh", "gelu"] = Field(
        "gelu_tanh", description="MLP GELU: 'gelu_tanh' (GPT-2's tanh form) or 'gelu' (exact erf, nanoGPT's nn.GELU())"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        return self


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (``torch.nn.LayerNorm`` has no ``bias=False`` on old torch)."""

    def __init__(self, n_embd: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        mask: torch.Tensor | None,  # [B, 1, T, S]: bool (True = may attend) or additive; None = plain causal
        cache: KVCache | SlotCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        y = _native_attention(self.c_attn, qkv, mask, cache, layer, self.n_head) if T == 1 and cache is not None else None
        if y is not None:  # the cache write and attention in one native call
            return self.c_proj(y.view(B, T, C))
        # q, k, v: [B, H, T, D]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(self.n_embd, dim=2))
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, H, S, D]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def _native_attention(layer: nn.Module, qkv: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | SlotCache,
                      index: int, n_head: int) -> torch.Tensor | None:  # fmt: skip
    """Attention for one new position per row through the native kernels (``qkv`` ``[B, 1, 3C]``,
    ``mask`` additive ``[B, 1, 1, S]``; the new keys and values written into layer ``index`` of the
    cache), ``[B, C]``, where the step can take it: float32 on CPU, ``layer`` (the projection) on the
    native kernels, no autograd; else ``None``. Each row and head is summed alone, in float32, as in
    the native blocks."""
    kernels = layer.__dict__.get("kernels")
    if (kernels is None or mask is None or mask.dtype != torch.float32 or qkv.dtype != torch.float32
            or qkv.device.type != "cpu" or qkv.requires_grad or torch.compiler.is_compiling()):  # fmt: skip
        return None
    keys, values = cache_layer(cache, index)
    rows = mask.reshape(mask.shape[0], -1)  # [B, S]
    return kernels.ops.attention_step(qkv, keys, values, cache_positions(cache), rows, n_head)


class MLP(nn.Module):
    """The position-wise feed-forward layer: 4x wider, GELU in the form ``config.activation`` names."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | SlotCache | None, layer: int
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def _retie(module: GPT, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: ``assign=True`` replaces the tied parameter; tie it again."""
    module.tie_embeddings()


class GPT(nn.Module):
    """GPT-2 / nanoGPT decoder with tied input and output embeddings.

    Use :meth:`step` for decoding (the :class:`~decodekit.models.protocol.CausalLM`
    protocol) and :meth:`forward` for training or scoring whole sequences.
    """

    def __init__(self, config: GPTConfig, *, init: bool = True) -> None:
        """``init=False`` skips GPT-2's weight initialisation (the loader fills every weight)."""
        super().__init__()
        self.config = config
        self.kv_dtype: torch.dtype | None = None  # the caches' dtype; None: the model's (set_kv_cache)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        hand_out_contiguous(self)  # the tied embedding and column-major weights, as checkpoint writers expect
        self.register_load_state_dict_post_hook(_retie)
        if init:
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.tie_embeddings()

    def pack_weights(self, enabled: bool = True) -> GPT:
        """Use oneDNN-prepacked weights on CPU (float32, no autograd; the default) or not.

        Packed, decoding GPT-2 124M on one CPU thread runs about 2x faster at batch 8 and 64
        (a batch-1 step, one row, keeps the plain weights: faster there), for a second copy of
        the linear layers' weights in memory (see
        :class:`~decodekit.models.packing.Linear`). ``pack_weights(False)`` frees the copies
        and uses the plain weights.
        """
        pack_weights(self, enabled)
        return self

    def tie_embeddings(self) -> None:
        """Tie ``lm_head.weight`` to ``transformer.wte.weight`` (as GPT-2), stored column-major.

        The shared ``[V, C]`` weight is kept as the transpose of a contiguous ``[C, V]`` tensor:
        the output projection ``x @ W.T`` then reads its matrix in order. On CPU this makes
        GPT-2's 50257 x 768 head about 1.9x faster at batch 1 (6.8 against 12.8 ms, one thread,
        float32) and no slower at larger batches; the embedding lookup, a gather of a few rows,
        does not mind. Called on construction and after every ``load_state_dict``;
        :meth:`state_dict` hands the weight out contiguous, as checkpoint writers expect.
        """
        weight = self.transformer.wte.weight
        if weight.stride() != (1, weight.shape[0]):
            weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
            self.transformer.wte.weight = weight
        if isinstance(self.lm_head, nn.Linear):  # a head converted to bf16 / int8 keeps its own copy
            self.lm_head.weight = weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- protocol attributes

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.block_size

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def num_parameters(self) -> int:
        """Parameter count, tied embeddings counted once."""
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- training / scoring

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position, ``[B, T, V]``, for ``idx`` ``[B, T]`` (no padding, no cache)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ConfigError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None, None, i)
        return self.lm_head(self.transformer.ln_f(x))

    # ---------------------------------------------------------------- decoding

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows and ``max_length`` positions."""
        c = self.config
        return empty_cache(self, batch_size, max_length, c.n_head, c.n_embd // c.n_head)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        *,
        position_ids: torch.Tensor,  # [B, T] long
        attention_mask: torch.Tensor | None,  # [B, S] bool, True = real token
        cache: KVCache | SlotCache,
    ) -> tuple[torch.Tensor, KVCache | SlotCache]:
        """Run ``T`` new positions; returns the last position's logits ``[B, V]`` (float32).

        The cache is updated in place and returned. Each query may attend to earlier
        real tokens and to itself (so a left-padding row never attends to nothing). With a
        :class:`SlotCache`, ``T`` is 1, ``position_ids`` are the rows' lengths, and the cache
        makes the mask itself (``attention_mask`` may be ``None``).
        """
        plan = self._step_plan(input_ids)
        if plan is not None:  # one position per row, few rows: the whole step in one native call
            return self._native_step(plan, input_ids, position_ids, attention_mask, cache), cache
        allowed = cache.attention_mask(attention_mask, input_ids.shape[1])  # [B, 1, T, S] bool
        # additive once per step: given the bool mask, attention would convert it in every layer
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        # left padding gets position -1 from cumsum(mask) - 1: any valid index will do there
        pos = position_ids.clamp(min=0)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)  # [B, T, C]
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        cache.advance(input_ids.shape[1])
        x = self.transformer.ln_f(x[:, -1, :])  # [B, C]: only the last position is needed
        return self.lm_head(x).float(), cache

    def _step_plan(self, input_ids: torch.Tensor) -> tuple[Any, ...] | None:
        """The arguments of the native GPT step (decodekit.kernels) if this step can take it: one
        position per row, up to the projections' ``native_rows`` rows, float32 on CPU, every
        projection (the head's too) set to the same native kernels; else ``None``. Kept between
        steps (:mod:`decodekit.models.native`)."""
        B, T = input_ids.shape
        plan, kernels = lookup(self, T, B, self.transformer.wte.weight, self.lm_head, "gpt_step")
        if kernels is None:
            return plan
        reads = Reads()
        take = reads.take
        transformer = take(self._modules, "transformer")._modules
        blocks = take(transformer, "h")
        parts: list[torch.Tensor | None] = []
        kinds: list[int] = []
        eps: set[float] = set()
        tanh: set[bool] = set()
        for i in range(len(blocks)):
            block = take(blocks._modules, str(i))._modules
            attn, mlp = take(block, "attn")._modules, take(block, "mlp")
            layers = [take(attn, "c_attn"), take(attn, "c_proj"), take(mlp._modules, "c_fc"), take(mlp._modules, "c_proj")]
            args = reads.projections(layers, kernels)
            if args is None:
                return None
            for name in ("ln_1", "ln_2"):
                norm = take(block, name)
                parts += [take(norm._parameters, "weight"), take(norm._parameters, "bias")]
                eps.add(take(norm.__dict__, "eps"))
            parts += [t for _, a in args for t in a]
            kinds += [k for k, _ in args]
            tanh.add(take(mlp.__dict__, "approximate") == "tanh")
        ln_f, head = take(transformer, "ln_f"), reads.projections([take(self._modules, "lm_head")], kernels)
        eps.add(take(ln_f.__dict__, "eps"))
        embeddings = [take(take(transformer, name)._parameters, "weight") for name in ("wte", "wpe")]
        if head is None or len(eps) != 1 or len(tanh) > 1 or any(e.dtype != torch.float32 for e in embeddings):
            return None
        parts += [take(ln_f._parameters, "weight"), take(ln_f._parameters, "bias"), *head[0][1]]
        kinds.append(head[0][0])
        gelu_tanh = tanh.pop() if tanh else True  # (no blocks: either)
        plan = (kernels.ops.gpt_step, *embeddings, parts, kinds, self.config.n_head, eps.pop(), gelu_tanh)
        return reads.keep(self, plan, input_ids.shape[0])

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles make their own native plan
        return without_plan(self.__dict__)

    def _native_step(self, plan: tuple[Any, ...], input_ids: torch.Tensor, position_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, cache: KVCache | SlotCache) -> torch.Tensor:  # fmt: skip
        """Logits ``[B, V]`` for ``B`` rows at one new position each, in one native call: the
        arithmetic of :meth:`step` in float32 (LayerNorm and GELU in native loops, within a few 1e-7
        of torch's; the kernels' few-row products; attention with each row's new key and value
        written first), the cache advanced."""
        op, wte, wpe, parts, kinds, heads, eps, tanh = plan
        lengths, length, span, attention_mask = step_cache(cache, attention_mask)
        logits = op(input_ids, position_ids, attention_mask, lengths, length, span, wte, wpe, parts, kinds, cache.k,
                    cache.v, heads, eps, tanh)  # fmt: skip
        cache.advance(1)
        return logits

    def new_slot_cache(self, slots: int, max_length: int) -> SlotCache:
        """An empty :class:`SlotCache`: ``slots`` rows of up to ``max_length`` positions each."""
        cache = self.new_cache(slots, max_length)
        return SlotCache(cache.k, cache.v, torch.zeros(slots, dtype=torch.long, device=self.device))

    def reorder_cache(self, cache: KVCache, index: torch.Tensor) -> KVCache:
        """A new cache holding rows ``cache[index]`` (rows may repeat)."""
        index = index.to(cache.k.device)
        return KVCache(
            k=cache.k.index_select(1, index), v=cache.v.index_select(1, index), length=cache.length
        )
