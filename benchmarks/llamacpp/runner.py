"""llama.cpp through llama-cpp-python's C API: B sequences decoded together in one batch.

This is how llama.cpp's server decodes several requests at once: one context whose KV cache
holds ``B`` sequences (``n_seq_max``, unified cache), a prefill batch with every prompt (each
token tagged with its sequence id), then one batch of ``B`` tokens per step; each sequence's next
token drawn by a sampler chain (greedy, or top-p then a seeded draw) from its own logits row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log lines (model loading, graph reservations) are not printed."""


llama_cpp.llama_log_set(_quiet, None)


class LlamaCpp:
    """One GGUF model in llama.cpp with a context for up to ``batch`` sequences of ``length`` positions."""

    def __init__(self, path: Path, *, batch: int, length: int, threads: int) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = batch * length
        params.n_batch = params.n_ubatch = max(512, batch * length)
        params.n_seq_max = batch
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, batch)

    def set_threads(self, threads: int) -> None:
        llama_cpp.llama_set_n_threads(self.ctx, threads, threads)

    def _fill(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """The batch: (token, position, sequence, wants logits) per entry."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq

    def _decode(self) -> None:
        status = llama_cpp.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def generate(self, prompts: list[list[int]], new_tokens: int, mode: str, seed: int = 0) -> list[list[int]]:
        """``new_tokens`` tokens after each prompt (``mode``: ``greedy`` or ``top_p``, p = 0.9)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if mode == "greedy":
            llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_top_p(0.9, 1))
            llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_dist(seed))
        entries = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        self._fill(entries)
        rows = [i for i, e in enumerate(entries) if e[3]]  # where each sequence's logits are
        out: list[list[int]] = [[] for _ in prompts]
        try:
            self._decode()
            for step in range(new_tokens):
                for s, row in enumerate(rows):
                    out[s].append(llama_cpp.llama_sampler_sample(sampler, self.ctx, row))
                if step + 1 == new_tokens:
                    break
                self._fill([(out[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)])
                rows = list(range(len(prompts)))
                self._decode()
        finally:
            llama_cpp.llama_sampler_free(sampler)
        return out

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
