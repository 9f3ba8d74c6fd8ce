"""Models decodekit can decode: the protocol, the native GPT, the Hugging Face adapter, the loader."""

from decodekit.models.gpt import GPT, GPTConfig, KVCache
from decodekit.models.hf import HFCausalLM
from decodekit.models.loading import ModelExtras, find_latest_checkpoint, load_model
from decodekit.models.protocol import CausalLM

__all__ = [
    "GPT",
    "CausalLM",
    "GPTConfig",
    "HFCausalLM",
    "KVCache",
    "ModelExtras",
    "find_latest_checkpoint",
    "load_model",
]
