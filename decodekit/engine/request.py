"""One request to the engine: what to continue, how, and what came back.

A :class:`Request` carries its own prompt, settings, seed and limits (vLLM's ``SamplingParams``
per request; llama.cpp's per-slot sampler). :class:`RequestOutput` is its result, streamed or at
the end. :func:`validate_request` checks a request alone, so one bad request is refused with its
id and a one-line reason while the others go on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from decodekit.errors import ConfigError
from decodekit.logprobs import TokenLogprobs, check_logprobs
from decodekit.random import SEED_LIMIT

FINISH_REASONS = ("length", "eos", "stop", "error")


@dataclass
class Request:
    """A prompt to continue, with its own settings.

    Attributes:
        prompt: the prompt text (needs the engine's tokenizer), or ``None`` when
            ``prompt_ids`` are given.
        prompt_ids: the prompt's token ids, instead of text.
        settings: flat processor settings for this request alone (``{"temperature": 0.7,
            "top_p": 0.9}``), the names :func:`decodekit.build_chain` takes; empty: the
            engine's defaults.
        seed: this request's random stream (``None``: drawn at submission from torch's
            global generator). The same seed gives the same tokens whatever shares the batch.
        max_new_tokens: the most tokens to add.
        stop: stop strings: the request ends when its text holds one (trimmed from the text).
        eos_token_id: id(s) that end the request (default: the engine's, from the tokenizer).
        id: any label that comes back with the result (default: the submission number).
        logprobs: per new token, its log-probability and the ``logprobs`` most likely tokens'
            (0 to 20); ``None``: none.
        logprobs_mode: ``"raw"`` (the model's distribution) or ``"processed"`` (after this
            request's processors).
        prompt_logprobs: the prompt tokens' raw log-probabilities (after the first), with this
            many alternatives each; ``None``: none.
    """

    prompt: str | None = None
    prompt_ids: Sequence[int] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    max_new_tokens: int = 64
    stop: Sequence[str] = ()
    eos_token_id: int | Sequence[int] | None = None
    id: Any = None
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    prompt_logprobs: int | None = None


@dataclass
class RequestOutput:
    """What a request gave.

    Attributes:
        id: the request's id; ``index``: its submission number (0, 1, ...).
        prompt: its prompt text (``None`` if given as ids); ``prompt_ids``: the ids decoded
            after, cropped as the engine's rule says; ``cropped``: how many ids were dropped.
        tokens: the new token ids (EOS included when it ended at EOS).
        text: the continuation as text (a stop string that ended it trimmed), ``None``
            without a tokenizer.
        finish_reason: ``"eos"``, ``"stop"``, ``"length"``, or ``"error"`` (refused: see ``error``).
        stop_string: the stop string that ended it, if one did.
        seed: the seed its stream used.
        error: why it was refused, one line naming the setting.
        logprobs: the new tokens' :class:`~decodekit.logprobs.TokenLogprobs` (``logprobs`` asked).
        prompt_logprobs: the prompt's (``prompt_logprobs`` asked).
    """

    id: Any
    index: int
    prompt: str | None
    prompt_ids: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str
    stop_string: str | None = None
    seed: int | None = None
    cropped: int = 0
    error: str | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


def validate_request(request: Request, *, has_tokenizer: bool) -> None:
    """Raise :class:`ConfigError` (one line, naming the field) for a malformed request."""
    if not isinstance(request, Request):
        raise ConfigError(f"expected a decodekit.engine.Request, got {type(request).__name__}")
    if (request.prompt is None) == (request.prompt_ids is None):
        raise ConfigError("prompt / prompt_ids: give exactly one of them")
    if request.prompt is not None:
        if not isinstance(request.prompt, str):
            raise ConfigError(f"prompt: expected text, got {type(request.prompt).__name__}")
        if not has_tokenizer:
            raise ConfigError("prompt: text needs a tokenizer; give the engine one, or give prompt_ids")
    else:
        ids = request.prompt_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise ConfigError("prompt_ids: expected a list of integer token ids")
    n = request.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_new_tokens={n!r} is not allowed: must be an integer >= 1")
    seed = request.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ConfigError(f"seed={seed!r} is not allowed: must be an integer in [0, 2**32) or None")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if not all(isinstance(s, str) for s in stop):
        raise ConfigError("stop: expected a list of strings")
    if stop and not has_tokenizer:
        raise ConfigError("stop: stop strings need a tokenizer; give the engine one")
    check_logprobs(request.logprobs, request.logprobs_mode)
    check_logprobs(request.prompt_logprobs, name="prompt_logprobs")
    if not isinstance(request.settings, Mapping):
        raise ConfigError(f"settings: expected a mapping of setting names to values, got {type(request.settings).__name__}")


def eos_list(eos: int | Sequence[int] | None, setting: str) -> list[int]:
    """End-of-sequence ids as a list, each checked (one line naming ``setting`` otherwise)."""
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else list(eos)  # type: ignore[arg-type]
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{setting}={eos!r} is not allowed: must be token id(s) >= 0")
    return ids


def refused(request: Any, index: int, reason: str) -> RequestOutput:
    """The result of a request refused at submission: ``finish_reason="error"`` and why.

    A request's settings are checked as a chain of its own, one row, so a ``row 0: `` that
    names that row is dropped: it means nothing to the caller.
    """
    reason = reason[len("row 0: "):] if reason.startswith("row 0: ") else reason
    rid = getattr(request, "id", None)
    return RequestOutput(
        id=rid if rid is not None else index, index=index, prompt=getattr(request, "prompt", None),
        prompt_ids=[], tokens=[], text=None, finish_reason="error", error=reason,
    )  # fmt: skip
