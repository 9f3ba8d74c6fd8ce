"""Samplers: turn processed logits into tokens."""

from decodekit.samplers.base import Greedy, Multinomial, Sampler
from decodekit.samplers.beam import BeamSearch

__all__ = ["BeamSearch", "Greedy", "Multinomial", "Sampler"]
