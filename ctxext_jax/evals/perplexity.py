"""Perplexity against context length by sliding windows, as the PI and YaRN papers measure it.

The eval split is read as one token stream: every document becomes `[bos] + tokens + [eos]`
(as in training) and documents are concatenated in dataset order up to `max_tokens`. One
stream serves every length, so each length scores the same tokens and the numbers compare.
Concatenation (rather than keeping only documents longer than L) is what lets corpora of short
documents reach long contexts; the separators tell the model where a document starts.

Windows of L tokens start every S (stride) tokens; a window scores only the targets that no
earlier window scored (the first window scores all of its L), and the last window is moved
back to end exactly at the stream's end so that every window has the same shape. Every target
is therefore scored exactly once, with between L - S and L tokens of context (fewer only in
the first window). Loss by position uses every position of every window: the mean loss of
the token predicted at position p of a window, over all windows, in equal-width buckets.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ctxext_jax.data.sources import document_tokens
from ctxext_jax.evals.scoring import Scorer
from ctxext_jax.metrics import Progress


def token_stream(documents: Iterable[str], tokenizer, *, max_tokens: int) -> np.ndarray:
    """Documents -> int32 [N] (N <= max_tokens): `[bos] doc [eos]` concatenated in order."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 (one input and one target).")
    pieces, total = [], 0
    for text in documents:
        tokens = document_tokens(tokenizer, text)[: max_tokens - total]
        pieces.append(tokens)
        total += len(tokens)
        if total >= max_tokens:
            break
    if not pieces:
        raise ValueError("the evaluation split holds no documents; choose another data.eval_split.")
    return np.concatenate(pieces).astype(np.int32)


def resolve_stride(stride: float, length: int) -> int:
    """`stride` in tokens (>= 1) or as a fraction of `length` (0 < stride < 1)."""
    if 0 < stride < 1:
        return max(1, int(round(stride * length)))
    if stride >= 1 and float(stride).is_integer() and stride <= length:
        return int(stride)
    raise ValueError(
        f"stride={stride!r} for length {length}: give a whole number of tokens in [1, {length}] "
        "or a fraction of the window in (0, 1), e.g. --stride=0.5 or --stride=256."
    )


def window_plan(n: int, *, length: int, stride: int) -> np.ndarray:
    """-> int64 [W, 2]: (begin, first scored offset) of each window over n targets.

    Window w covers targets [begin, begin + length) and scores offsets [first, length).
    """
    if not 1 <= stride <= length:
        raise ValueError(
            f"stride={stride} must be in [1, length={length}] so no target is skipped."
        )
    if n < length:
        raise ValueError(
            f"length {length} needs at least {length + 1} tokens of evaluation text but the "
            f"stream has {n + 1}; raise --ppl_tokens or use a dataset with more text."
        )
    begins = list(range(0, n - length + 1, stride))
    if begins[-1] + length < n:
        begins.append(n - length)
    plan, scored_until = [], 0
    for begin in begins:
        plan.append((begin, scored_until - begin))
        scored_until = begin + length
    return np.asarray(plan, dtype=np.int64)


def sliding_perplexity(
    scorer: Scorer,
    stream: np.ndarray,
    *,
    length: int,
    stride: int,
    batch_tokens: int,
    buckets: int = 16,
    progress: Progress | None = None,
) -> dict:
    """Mean loss, perplexity and loss by position bucket of `stream` [N] at window `length`.

    batch_tokens: windows per forward pass = max(1, batch_tokens // length).
    """
    inputs, targets = stream[:-1], stream[1:]
    plan = window_plan(len(inputs), length=length, stride=stride)
    rows = max(1, batch_tokens // length)
    total, count = 0.0, 0
    position_sum = np.zeros(length, np.float64)
    for start in range(0, len(plan), rows):
        chunk = plan[start : start + rows]
        index = chunk[:, :1] + np.arange(length)[None, :]
        if len(plan) > rows:  # a short last batch repeats a window: one shape, one compilation
            index = np.concatenate([index, np.repeat(index[-1:], rows - len(chunk), axis=0)])
        losses, _ = scorer(inputs[index], targets[index])
        losses = losses[: len(chunk)]
        scored = np.arange(length)[None, :] >= chunk[:, 1:]
        total += float(np.sum(losses, where=scored, dtype=np.float64))
        count += int(scored.sum())
        position_sum += losses.sum(axis=0, dtype=np.float64)
        if progress is not None:
            progress.advance(len(chunk) * length, f"perplexity L={length}")
    position_loss = position_sum / len(plan)
    edges = np.linspace(0, length, min(buckets, length) + 1).astype(int)
    loss = total / count
    return {
        "length": length,
        "stride": stride,
        "loss": loss,
        "ppl": float(np.exp(min(loss, 80.0))),
        "tokens": count,
        "windows": len(plan),
        "position_loss": {
            "start": edges[:-1].tolist(),
            "end": edges[1:].tolist(),
            "loss": [
                float(position_loss[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)
            ],
        },
    }
