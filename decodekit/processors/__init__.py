"""Built-in logits processors, one module per family."""

from decodekit.processors.allowed import AllowedTokenIds, PrefixAllowedTokens
from decodekit.processors.bans import BadWords, LogitBias, MinNewTokens
from decodekit.processors.base import BanSkippedWarning, BuildContext, LogitsProcessor, ProcessorChain
from decodekit.processors.guidance import BagOfWords, EosLengthPenalty
from decodekit.processors.penalties import FrequencyPenalty, NoRepeatNGram, PresencePenalty, RepetitionPenalty
from decodekit.processors.structured import Structured
from decodekit.processors.temperature import Temperature
from decodekit.processors.cutoffs import EpsilonCutoff, EtaCutoff, MinP, TopNSigma, TypicalP
from decodekit.processors.truncation import TopK, TopP

BUILTIN_PROCESSORS = [
    RepetitionPenalty,
    PresencePenalty,
    FrequencyPenalty,
    NoRepeatNGram,
    AllowedTokenIds,
    PrefixAllowedTokens,
    Structured,
    BadWords,
    LogitBias,
    MinNewTokens,
    EosLengthPenalty,
    BagOfWords,
    Temperature,
    TopK,
    TopP,
    MinP,
    TypicalP,
    EpsilonCutoff,
    EtaCutoff,
    TopNSigma,
]

__all__ = [
    "AllowedTokenIds",
    "BUILTIN_PROCESSORS",
    "BadWords",
    "BanSkippedWarning",
    "BagOfWords",
    "BuildContext",
    "EosLengthPenalty",
    "EpsilonCutoff",
    "EtaCutoff",
    "FrequencyPenalty",
    "LogitBias",
    "LogitsProcessor",
    "MinNewTokens",
    "MinP",
    "NoRepeatNGram",
    "PrefixAllowedTokens",
    "PresencePenalty",
    "ProcessorChain",
    "RepetitionPenalty",
    "Structured",
    "Temperature",
    "TopK",
    "TopNSigma",
    "TopP",
    "TypicalP",
]
