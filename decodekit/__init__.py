"""decodekit: clear, composable, verified decoding for causal language models.

Start here::

    from decodekit import generate, ProcessorChain
    from decodekit.processors import RepetitionPenalty, Temperature, TopP
    from decodekit.samplers import Multinomial

    chain = RepetitionPenalty(1.2) | Temperature(0.8) | TopP(0.9)
    out = generate(model, input_ids, processors=chain, sampler=Multinomial(), max_new_tokens=50, seed=0)
"""

from decodekit.errors import ConfigError, DecodekitError, InvalidLogitsError, ModelLoadError, PluginError
from decodekit.hookspecs import hookimpl
from decodekit.loop import GenerateOutput, generate
from decodekit.processors.base import LogitsProcessor, ProcessorChain
from decodekit.registry import build_chain, build_sampler, get_plugin_manager, get_registry
from decodekit.samplers.base import Sampler

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecodekitError",
    "GenerateOutput",
    "InvalidLogitsError",
    "LogitsProcessor",
    "ModelLoadError",
    "PluginError",
    "ProcessorChain",
    "Sampler",
    "build_chain",
    "build_sampler",
    "generate",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
]
