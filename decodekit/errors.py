"""decodekit's exceptions: every user-facing failure is one of these, with a one-line message."""

from __future__ import annotations


class DecodekitError(Exception):
    """Base class of every error decodekit raises on purpose."""


class ConfigError(DecodekitError, ValueError):
    """A setting has a bad value: the message names the setting, the value and what is allowed."""


class ModelLoadError(DecodekitError):
    """A model or tokenizer could not be loaded: the message names the file or setting."""


class PluginError(DecodekitError):
    """A plugin misbehaved: two plugins claim one name, or a processor returned bad logits."""


class InvalidLogitsError(DecodekitError, ValueError):
    """Logits hold NaN, +inf, or a row with every token removed."""


class TokenizationError(DecodekitError, ValueError):
    """Text or ids the tokenizer cannot handle: a character outside a char vocabulary, an id out of range."""
