"""An adapter that lets decodekit decode any local Hugging Face ``AutoModelForCausalLM``.

:class:`HFCausalLM` follows :class:`decodekit.models.protocol.CausalLM`: the cache is the
model's own ``DynamicCache``, passed through ``step`` untouched, and reordered with its
``reorder_cache``. Models are only read from local folders (``local_files_only=True``);
transformers is imported when an adapter is first built (``pip install decodekit[hf]``).
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import ModelLoadError
from decodekit.models.packing import pack_weights

__all__ = ["HFCausalLM", "MIN_TRANSFORMERS", "cache_argument_name", "import_transformers"]

# the oldest transformers the adapter is tested with (docs/models.md): 4.56 brought the
# ``dtype`` argument of from_pretrained and DynamicCache(config=...)
MIN_TRANSFORMERS = (4, 56)


def import_transformers() -> Any:
    """The ``transformers`` module, or a one-line error saying how to install (or upgrade) it."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "Hugging Face models need transformers: pip install decodekit[hf]"
        ) from None
    found = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if found < MIN_TRANSFORMERS:
        raise ModelLoadError(
            f"Hugging Face models need transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}; "
            f"found {transformers.__version__}: pip install -U 'decodekit[hf]'"
        )
    return transformers


def cache_argument_name(model: Any) -> str:
    """The name under which ``model.forward`` takes and returns its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40);
    earlier releases, and models with code of their own, know only ``past_key_values``. Read
    once from the signature, so no step pays for it.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


class HFCausalLM:
    """A Hugging Face causal LM behind the decodekit model protocol.

    Args:
        model: a ``PreTrainedModel`` with a causal LM head (``AutoModelForCausalLM``).
    """

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        config = model.config.get_text_config(decoder=True)
        head = model.get_output_embeddings()
        self.vocab_size: int = head.weight.shape[0] if head is not None else config.vocab_size
        self.max_context: int | None = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        self._cache_name = cache_argument_name(model)

    def pack_weights(self, enabled: bool = True) -> HFCausalLM:
        """Prepacked weights for the model's ``nn.Linear`` layers on CPU, or not (the default).

        See :mod:`decodekit.models.packing`: in float32 without autograd, products of a million
        multiply-adds or more use oneDNN-prepacked copies of the weights: on x86 CPUs about twice
        as fast at batch 8 (benchmarks/bench_hf_adapter.py). Off by default here, because the
        copies double the memory those layers take, and Hugging Face models can be large.
        """
        pack_weights(self.model, enabled)
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HFCausalLM:
        """Load a local folder with ``AutoModelForCausalLM`` (never downloads)."""
        transformers = import_transformers()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json)")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            refused = _unpickling_error(e)  # torch.load(weights_only=True) refused a .bin file
            if refused is not None:
                raise ModelLoadError(_refused_pickle(path, refused)) from None
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelLoadError(f"{path}: transformers could not load it ({first.strip()[:200]})") from None
        model.requires_grad_(False)
        return cls(model.to(device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, batch_size: int, max_length: int) -> Any:
        """An empty ``DynamicCache`` (it grows as needed; the sizes are not used)."""
        transformers = import_transformers()
        return transformers.DynamicCache(config=self.model.config)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        *,
        position_ids: torch.Tensor,  # [B, T] long
        attention_mask: torch.Tensor,  # [B, S] bool
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Run ``T`` new positions through the model; returns last logits ``[B, V]`` and the cache."""
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids.clamp(min=0),  # left padding: any valid position will do
            attention_mask=attention_mask.long(),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: cache},
        )
        return out.logits[:, -1, :].float(), out[self._cache_name]

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any:
        """Rows ``cache[index]``; the ``DynamicCache`` is reordered in place and returned."""
        cache.reorder_cache(index)
        return cache


def _unpickling_error(error: BaseException | None) -> pickle.UnpicklingError | None:
    """The ``UnpicklingError`` behind ``error``: transformers before 5 re-raises it as an OSError."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, pickle.UnpicklingError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _refused_pickle(folder: Path, error: pickle.UnpicklingError) -> str:
    """One line naming the pickled weights file of ``folder`` that ``torch.load`` refused, and why."""
    from decodekit.models.checkpoints import unpickling_problem

    files = sorted(folder.glob("*.bin"))
    where = files[0] if len(files) == 1 else folder / "*.bin"
    return f"{where}: {unpickling_problem(error)}"
