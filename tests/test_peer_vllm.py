"""vLLM's expected outcomes: the cases of its tests/v1/sample/test_sampler.py, run on decodekit's
processors. Upstream: vllm-project/vllm at commit 0c586818053c5fc5703c3c5ea7378498c5402637.

vLLM's tests build random ``SamplingMetadata`` (prompts of 1 to 63 tokens, 20 output tokens,
a vocabulary of 1024, logits all ``1e-2``) and check which tokens a penalty or mask touched; the
same construction runs here, with a seeded generator, prompts left-padded with ``-1`` and given to
``begin`` (vLLM pads prompts with ``vocab_size``), for batches of 1, 2 and 32 as upstream.
vLLM passes per-request values as ``[B]`` tensors; decodekit's processors take them per row.
"""

from __future__ import annotations

import random

import pytest
import torch

from decodekit.processors import (
    AllowedTokenIds,
    BadWords,
    FrequencyPenalty,
    LogitBias,
    MinNewTokens,
    MinP,
    PresencePenalty,
    RepetitionPenalty,
)

VOCAB_SIZE = 1024
NUM_OUTPUT_TOKENS = 20
MAX_NUM_PROMPT_TOKENS = 64
BATCH_SIZES = [1, 2, 32]
INF = float("-inf")


def fake_logits(batch_size: int) -> torch.Tensor:
    """``_create_fake_logits``: every token ``1e-2``."""
    return torch.full((batch_size, VOCAB_SIZE), 1e-2, dtype=torch.float)


def requests(rng: random.Random, batch_size: int, outputs: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_create_default_sampling_metadata``'s prompts and output tokens, as decodekit's
    ``(prompts [B, T0], history [B, T])``: rows right-aligned, left-padded with ``-1``."""
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, MAX_NUM_PROMPT_TOKENS - 1))] for _ in range(batch_size)]
    if outputs is None:
        outputs = [[rng.randrange(VOCAB_SIZE) for _ in range(NUM_OUTPUT_TOKENS)] for _ in range(batch_size)]
    t0 = max(len(p) for p in prompts)
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    prompt_rows = [[-1] * (t0 - len(p)) + p for p in prompts]
    history = [[-1] * (width - len(p) - len(o)) + p + o for p, o in zip(prompts, outputs)]
    return torch.tensor(prompt_rows), torch.tensor(history)


def run(processor, prompts: torch.Tensor, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    processor.begin(prompts)
    return processor(history, logits)


def output_tokens(history: torch.Tensor, row: int) -> list[int]:
    return history[row, -NUM_OUTPUT_TOKENS:].tolist()


def all_tokens(history: torch.Tensor, row: int) -> list[int]:
    return [t for t in history[row].tolist() if t >= 0]


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("presence_penalty", [-2.0, 2.0])
def test_sampler_presence_penalty(batch_size: int, presence_penalty: float) -> None:
    """test_sampler_presence_penalty: the least likely token is an output token, the most likely is not
    (and the other way round for a negative penalty)."""
    prompts, history = requests(random.Random(batch_size), batch_size)
    logits = run(PresencePenalty([presence_penalty] * batch_size), prompts, history, fake_logits(batch_size))
    for b in range(batch_size):
        best, worst = int(logits[b].argmax()), int(logits[b].argmin())
        penalised, favoured = (worst, best) if presence_penalty > 0 else (best, worst)
        assert penalised in output_tokens(history, b) and favoured not in output_tokens(history, b)


def weighted_outputs(rng: random.Random, batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``_create_weighted_output_token_list``: distinct tokens, the i-th repeated i + 1 times."""
    outputs, distinct = [], []
    for _ in range(batch_size):
        tokens = rng.sample(range(VOCAB_SIZE), rng.randint(1, 9))
        distinct.append(tokens)
        outputs.append([t for i, t in enumerate(tokens) for _ in range(i + 1)])
    return outputs, distinct


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("frequency_penalty", [-2.0, 2.0])
def test_sampler_frequency_penalty(batch_size: int, frequency_penalty: float) -> None:
    """test_sampler_frequency_penalty: the most frequent output token is the most penalised (or the
    most favoured, for a negative penalty), and the other extreme never occurred."""
    rng = random.Random(100 + batch_size)
    outputs, distinct = weighted_outputs(rng, batch_size)
    prompts, history = requests(rng, batch_size, outputs)
    logits = run(FrequencyPenalty([frequency_penalty] * batch_size), prompts, history, fake_logits(batch_size))
    for b in range(batch_size):
        best, worst = int(logits[b].argmax()), int(logits[b].argmin())
        most_frequent = distinct[b][-1]
        if frequency_penalty > 0:
            assert best not in distinct[b] and worst == most_frequent
        else:
            assert best == most_frequent and worst not in distinct[b]


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("repetition_penalty", [0.1, 1.9])
def test_sampler_repetition_penalty(batch_size: int, repetition_penalty: float) -> None:
    """test_sampler_repetition_penalty: prompt and output tokens both count."""
    prompts, history = requests(random.Random(200 + batch_size), batch_size)
    processor = RepetitionPenalty([repetition_penalty] * batch_size)
    logits = processor(history, fake_logits(batch_size))
    for b in range(batch_size):
        seen = all_tokens(history, b)
        best, worst = int(logits[b].argmax()), int(logits[b].argmin())
        penalised, favoured = (worst, best) if repetition_penalty > 1.0 else (best, worst)
        assert penalised in seen and favoured not in seen


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("min_p", [0.0, 0.1])
def test_sampler_min_p(batch_size: int, min_p: float) -> None:
    """test_sampler_min_p: one dominant token (logit 10); min_p > 0 removes every other."""
    logits = fake_logits(batch_size)
    logits[:, 0] = 10.0
    out = MinP([min_p] * batch_size)(None, logits)
    assert (out[:, 0] != INF).all()
    assert (out[:, 1:] == INF).all() if min_p > 0.0 else (out[:, 1:] != INF).all()


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("bias_value", [-0.1, 1.2])
def test_sampler_logit_bias(batch_size: int, bias_value: float) -> None:
    """test_sampler_logit_bias: row i biases token min(i, V - 1) by ``bias_value``."""
    biases = [{min(i, VOCAB_SIZE - 1): bias_value} for i in range(batch_size)]
    out = LogitBias(biases)(None, fake_logits(batch_size))
    for b in range(batch_size):
        expected = torch.full((VOCAB_SIZE,), 1e-2)
        expected[min(b, VOCAB_SIZE - 1)] = bias_value + 1e-2
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_allowed_token_ids", [0, 1, 2])
def test_sampler_allowed_token_ids(batch_size: int, num_allowed_token_ids: int) -> None:
    """test_sampler_allowed_token_ids: upstream's helper masks ids ``[start, end)`` of each even row
    (``start = min(row, V - 1)``, ``end = min(row + n, V - 1)``) and leaves odd rows alone; the same
    outcome from ``allowed_token_ids`` is every other id allowed in even rows, and no list (off) in
    odd ones."""
    spans = [(min(b, VOCAB_SIZE - 1), min(b + num_allowed_token_ids, VOCAB_SIZE - 1)) for b in range(batch_size)]
    allowed = [[] if b % 2 else [t for t in range(VOCAB_SIZE) if not s <= t < e] for b, (s, e) in enumerate(spans)]
    out = AllowedTokenIds(allowed)(None, fake_logits(batch_size))
    for b, (start, end) in enumerate(spans):
        if b % 2 == 1:
            assert (out[b] != INF).all()
            continue
        removed = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
        removed[start:end] = True
        assert torch.equal(out[b] == INF, removed), b


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("bad_words_lengths", [(1,), (1, 3), (2, 2)])
def test_sampler_bad_words(batch_size: int, bad_words_lengths: tuple[int, ...]) -> None:
    """test_sampler_bad_words: random bad words per row (one row without any), the output's tail
    set to a word's prefix, or away from it; exactly the last tokens of the matched words go."""
    rng = random.Random(300 + batch_size + 7 * len(bad_words_lengths))
    words = {b: [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in bad_words_lengths] for b in range(batch_size)}
    if batch_size >= 2:
        words.pop(rng.randrange(batch_size))
    outputs = [[rng.randrange(VOCAB_SIZE) for _ in range(NUM_OUTPUT_TOKENS)] for _ in range(batch_size)]
    last_tokens: dict[int, list[int]] = {}
    for b, row_words in words.items():  # _update_output_token_ids_for_bad_words
        hits = []
        for word in row_words:
            if len(word) == 1:
                hits.append(word[0])
            elif rng.choice([True, False]):
                outputs[b][-(len(word) - 1) :] = word[:-1]
                hits.append(word[-1])
                break
            else:
                outputs[b][-1] = (word[-2] + 1) % VOCAB_SIZE
        last_tokens[b] = hits
    prompts, history = requests(rng, batch_size, outputs)
    out = run(BadWords([words.get(b, []) for b in range(batch_size)]), prompts, history, fake_logits(batch_size))
    for b in range(batch_size):
        removed = set((out[b] == INF).nonzero().flatten().tolist())
        assert removed == set(last_tokens.get(b, [])), b


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_sampler_min_tokens_penalty(batch_size: int) -> None:
    """test_sampler_min_tokens_penalty: rows whose ``min_tokens`` exceeds the 20 output tokens lose
    their stop tokens, the others keep everything. vLLM gives each row its own stop set; decodekit's
    ``min_new_tokens`` holds back one EOS set for the batch, so one random set serves every row."""
    rng = random.Random(400 + batch_size)
    held = set(rng.sample(range(batch_size), rng.randint(0, batch_size - 1)))
    minimum = [
        rng.randint(NUM_OUTPUT_TOKENS + 1, 2 * NUM_OUTPUT_TOKENS - 1) if b in held else rng.randint(0, NUM_OUTPUT_TOKENS - 1)
        for b in range(batch_size)
    ]
    stop = sorted(set(rng.randrange(VOCAB_SIZE - 1) for _ in range(rng.randint(1, 50))))
    prompts, history = requests(rng, batch_size)
    out = run(MinNewTokens(minimum, eos_token_id=stop), prompts, history, fake_logits(batch_size))
    for b in range(batch_size):
        removed = (out[b] == INF).nonzero().flatten().tolist()
        assert removed == (stop if b in held else []), b
