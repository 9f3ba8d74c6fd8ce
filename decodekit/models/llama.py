"""A native Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention) with a KV cache.

:class:`Llama` follows :class:`decodekit.models.protocol.CausalLM` and uses the same caches as
the native GPT (:class:`~decodekit.models.cache.KVCache` for :func:`decodekit.generate`,
:class:`~decodekit.models.cache.SlotCache` for the request engine), so the loop, beam search
and the engine run it unchanged. Its weights come from GGUF files
(:mod:`decodekit.models.gguf`); parameter names are Meta's (``layers.0.attention.wq.weight``).

Rotary positions are applied as llama.cpp applies them to GGUF files: to *adjacent* pairs of
each head's dimensions, ``(x[2i], x[2i+1])`` rotated by ``pos * theta ** (-2i / d)``. GGUF's
converter permutes the rows of Hugging Face's ``q_proj`` / ``k_proj`` so that this equals
Hugging Face's ``rotate_half`` form on the original weights (:func:`permute_for_gguf`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from decodekit.errors import ConfigError
from decodekit.models.cache import KVCache, SlotCache, empty_cache
from decodekit.models.gpt import GPT
from decodekit.models.native import Reads, lookup, step_cache, without_plan
from decodekit.models.packing import Linear, hand_out_contiguous, pack_weights

__all__ = ["Llama", "LlamaConfig", "permute_for_gguf"]


class LlamaConfig(BaseModel):
    """The shape of a Llama; the GGUF key each field is read from is in its description."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(32000, gt=0, description="logits per position (rows of token_embd)")
    block_size: int = Field(2048, gt=0, description="most positions attended over (llama.context_length)")
    n_layer: int = Field(12, gt=0, description="transformer blocks (llama.block_count)")
    n_head: int = Field(12, gt=0, description="query heads (llama.attention.head_count)")
    n_kv_head: int = Field(12, gt=0, description="key/value heads (llama.attention.head_count_kv)")
    n_embd: int = Field(768, gt=0, description="residual width (llama.embedding_length)")
    intermediate_size: int = Field(2048, gt=0, description="SwiGLU width (llama.feed_forward_length)")
    rms_norm_eps: float = Field(1e-5, gt=0.0, description="llama.attention.layer_norm_rms_epsilon")
    rope_theta: float = Field(10000.0, gt=0.0, description="llama.rope.freq_base")
    rope_dim: int | None = Field(None, gt=0, description="rotated dimensions per head (llama.rope.dimension_count); None = all")
    rope_scaling: Literal["none", "linear"] = Field("none", description="llama.rope.scaling.type")
    rope_scale: float = Field(1.0, gt=0.0, description="positions are divided by this (llama.rope.scaling.factor)")
    tie_embeddings: bool = Field(False, description="no output.weight: the head is token_embd")

    @model_validator(mode="after")
    def _heads_fit(self) -> LlamaConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.rope_dim is not None and (self.rope_dim > self.head_dim or self.rope_dim % 2):
            raise ValueError(f"rope_dim={self.rope_dim} must be even and at most the head size {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's ``q_proj`` / ``k_proj`` rows in the order GGUF stores them (llama.cpp's
    ``convert_hf_to_gguf.py``): each head's two halves interleaved, so that rotating adjacent
    pairs equals Hugging Face's ``rotate_half`` on the original rows."""
    out, inp = weight.shape
    return weight.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


class RMSNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """cos / sin of every position's angles, ``[block_size, rope_dim / 2]``, made once."""

    def __init__(self, config: LlamaConfig, freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        dim = config.rope_dim or config.head_dim
        self.dim = dim
        inv_freq = config.rope_theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if freq_factors is not None:  # Llama 3.1's rope_freqs.weight: llama.cpp divides the angles by them
            inv_freq = inv_freq / freq_factors.double()
        positions = torch.arange(config.block_size, dtype=torch.float64) / config.rope_scale
        angles = positions[:, None] * inv_freq[None, :]  # [P, dim / 2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``position_ids`` ``[B, T]``: ``[B, 1, T, rope_dim / 2]`` each."""
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotate adjacent pairs of the first ``dim`` dimensions of ``x`` ``[B, H, T, D]``."""
    rot, rest = x[..., :dim], x[..., dim:]
    pairs = rot.unflatten(-1, (-1, 2))  # [B, H, T, dim / 2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


class Attention(nn.Module):
    """Grouped-query self-attention: ``n_kv_head`` key/value heads shared by ``n_head`` query heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wq = Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.wk = Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wv = Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wo = Linear(config.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        rope: tuple[torch.Tensor, torch.Tensor, int],  # cos, sin [B, 1, T, R/2], R
        mask: torch.Tensor | None,  # [B, 1, T, S] bool; None = plain causal
        cache: KVCache | SlotCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, Hkv, S, D]
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (GGUF: ffn_gate = w1, ffn_up = w3, ffn_down = w2)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w3 = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, int], mask: torch.Tensor | None,
                cache: KVCache | SlotCache | None, layer: int) -> torch.Tensor:  # fmt: skip
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama decoder. :meth:`step` decodes (the CausalLM protocol); :meth:`forward` scores."""

    def __init__(self, config: LlamaConfig, *, freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.kv_dtype: torch.dtype | None = None  # the caches' dtype; None: the model's (set_kv_cache)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.output = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(config, freq_factors)
        hand_out_contiguous(self)  # column-major weights (see column_major), as checkpoint writers expect

    def pack_weights(self, enabled: bool = True) -> Llama:
        """oneDNN-prepacked CPU weights for every linear layer (see :class:`~decodekit.models.packing.Linear`)."""
        pack_weights(self, enabled)
        return self

    # ---------------------------------------------------------------- protocol attributes

    vocab_size = GPT.vocab_size  # both read the config, whose fields are named alike
    max_context = GPT.max_context

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def num_parameters(self) -> int:
        """Parameter count, a tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- scoring and decoding

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
             cache: KVCache | SlotCache | None) -> torch.Tensor:  # fmt: skip
        x = self.tok_embeddings(input_ids)  # [B, T, C]
        cos, sin = self.rotary(position_ids)
        rope = (cos, sin, self.rotary.dim)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, cache, i)
        return x

    def _step_plan(self, input_ids: torch.Tensor) -> tuple[Any, ...] | None:
        """The arguments of the native Llama step (decodekit.kernels) if this step can take it: one
        position per row, up to the projections' ``native_rows`` rows, float32 on CPU, every
        projection (the head's too) set to the same native kernels; else ``None``. Kept between
        steps (:mod:`decodekit.models.native`)."""
        B, T = input_ids.shape
        plan, kernels = lookup(self, T, B, self.tok_embeddings.weight, self.output, "llama_step")
        if kernels is None:
            return plan
        reads = Reads()
        take = reads.take
        rotary = take(self._modules, "rotary")
        tables = [take(rotary._buffers, "cos"), take(rotary._buffers, "sin")]
        layers = take(self._modules, "layers")
        parts: list[torch.Tensor | None] = []
        kinds: list[int] = []
        eps: set[float] = set()
        for i in range(len(layers)):
            block = take(layers._modules, str(i))._modules
            attention, ffn = take(block, "attention"), take(block, "feed_forward")._modules
            names = [(attention._modules, n) for n in ("wq", "wk", "wv", "wo")] + [(ffn, n) for n in ("w1", "w3", "w2")]
            args = reads.projections([take(owner, n) for owner, n in names], kernels)
            if args is None:
                return None
            for name in ("attention_norm", "ffn_norm"):
                norm = take(block, name)
                parts.append(take(norm._parameters, "weight"))
                eps.add(take(norm.__dict__, "eps"))
            parts += [t for _, a in args for t in a]
            kinds += [k for k, _ in args]
        norm, head = take(self._modules, "norm"), reads.projections([take(self._modules, "output")], kernels)
        eps.add(take(norm.__dict__, "eps"))
        embeddings = take(take(self._modules, "tok_embeddings")._parameters, "weight")
        if head is None or len(eps) != 1 or embeddings.dtype != torch.float32:
            return None
        parts += [take(norm._parameters, "weight"), *head[0][1]]
        kinds.append(head[0][0])
        plan = (kernels.ops.llama_step, embeddings, parts, kinds, self.config.n_head, eps.pop(), *tables)
        return reads.keep(self, plan, B)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles make their own native plan
        return without_plan(self.__dict__)

    def _native_step(self, plan: tuple[Any, ...], input_ids: torch.Tensor, position_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, cache: KVCache | SlotCache) -> torch.Tensor:  # fmt: skip
        """Logits ``[B, V]`` for ``B`` rows at one new position each, in one native call: the
        arithmetic of :meth:`step` in float32 (RMSNorm, the rotary angles and SiLU in native loops;
        the kernels' few-row products; attention with each row's new key and value written first),
        equal to it to float32 rounding; the cache advanced."""
        op, embeddings, parts, kinds, heads, eps, cos, sin = plan
        lengths, length, span, attention_mask = step_cache(cache, attention_mask)
        logits = op(input_ids, position_ids, attention_mask, lengths, length, span, embeddings, parts, kinds, cache.k,
                    cache.v, heads, eps, cos, sin)  # fmt: skip
        cache.advance(1)
        return logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position, ``[B, T, V]``, for ``idx`` ``[B, T]`` (no padding, no cache)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ConfigError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        positions = torch.arange(T, device=idx.device).expand(idx.shape[0], T)
        return self.output(self.norm(self._run(idx, positions, None, None)))

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` ``[n_layer, B, n_kv_head, max_length, head_dim]``."""
        return empty_cache(self, batch_size, max_length, self.config.n_kv_head, self.config.head_dim)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        *,
        position_ids: torch.Tensor,  # [B, T] long
        attention_mask: torch.Tensor | None,  # [B, S] bool, True = real token
        cache: KVCache | SlotCache,
    ) -> tuple[torch.Tensor, KVCache | SlotCache]:
        """Run ``T`` new positions; the last one's logits ``[B, V]`` (float32), the cache updated in place."""
        plan = self._step_plan(input_ids)
        if plan is not None:  # one position per row, few rows: the whole step in one native call
            return self._native_step(plan, input_ids, position_ids, attention_mask, cache), cache
        mask = cache.attention_mask(attention_mask, input_ids.shape[1])  # [B, 1, T, S]
        # left padding gets position -1 from cumsum(mask) - 1: any valid index will do there
        x = self._run(input_ids, position_ids.clamp(min=0), mask, cache)
        cache.advance(input_ids.shape[1])
        return self.output(self.norm(x[:, -1, :])).float(), cache  # only the last position

    # the same for any model whose cache is a KVCache / SlotCache
    new_slot_cache = GPT.new_slot_cache
    reorder_cache = GPT.reorder_cache
