"""Samplers: turn processed logits into tokens."""

from decodekit.samplers.base import Greedy, Multinomial, Sampler

__all__ = ["Greedy", "Multinomial", "Sampler"]
