"""`decode score=true`: score the prompts instead of continuing them, one line and one record per text.

Each text (``prompt``, each line of ``prompt_file``, or ``prompt_tokens``) is scored by
:func:`decodekit.scoring.score` (``batch_size`` texts per forward pass): stdout gets its perplexity,
total log-probability and token count, and ``output_file`` one JSON object with the per-token
logprobs (``logprobs``: the number of alternatives per token, default none).
"""

from __future__ import annotations

from typing import Any

from decodekit.errors import ConfigError
from decodekit.scoring import ScoreResult, score, sequence_logprobs


def run_score(decoder: Any, prompts: list[str], out: Any, writer: Any) -> None:
    """Score ``prompts`` (or the configuration's ``prompt_tokens``): print each, write each record."""
    config = decoder.config
    if config.prompt is None and config.prompt_file is None and config.prompt_tokens is None:
        raise ConfigError("score=true: give the text to score (prompt=..., prompt_file=... or prompt_tokens=[...])")
    top = config.logprobs or 0
    if config.prompt_tokens is not None:
        ids = list(config.prompt_tokens)
        lp = sequence_logprobs(decoder.model, [ids], top=top)[0]
        text = decoder.tokenizer.decode(ids) if decoder.tokenizer is not None else None
        results = [ScoreResult(text, ids, lp, lp.total, len(lp.logprobs), lp.perplexity)]
    else:
        results = score(decoder.model, decoder.tokenizer, prompts, top_logprobs=top, batch_size=config.batch_size)
    model = str(decoder.extras.source)
    for i, r in enumerate(results):
        out.line(f"perplexity {r.perplexity:.4f}, total logprob {r.total:.4f} over {r.num_tokens} tokens: {r.text}")
        if writer is not None:
            writer.write([{"prompt_index": i, **r.to_dict(), "model": model}])
