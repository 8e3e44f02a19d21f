"""The one device computation every long-context metric needs: scoring tokens in place.

`make_scorer` jits `(inputs [B, T], targets [B, T]) -> (loss [B, T], argmax == target [B, T])`
so neither the [B, T, V] logits nor the vocabulary ever leave the device. Perplexity sums the
losses; retrieval scores a key by teacher-forced argmax equality, which is exactly greedy
decoding's exact match: greedy emits the key iff at every key position the argmax given the
prompt and the previous key tokens is the next key token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ctxext_jax.steps import token_scores

Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _shards(sharding: NamedSharding | None, dim: int) -> int:
    """How many pieces `sharding` cuts array dimension `dim` into (1 when unsharded)."""
    if sharding is None or dim >= len(sharding.spec) or sharding.spec[dim] is None:
        return 1
    axes = sharding.spec[dim]
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(sharding.mesh.shape[a] for a in axes)


@functools.lru_cache(maxsize=8)
def _jitted_score(apply: Callable, out_sharding: NamedSharding | None) -> Callable:
    """One jitted scorer per model function, reused across calls (the trainer calls often)."""

    def score(params, inputs, targets):
        return token_scores(apply, params, inputs, targets)

    if out_sharding is None:
        return jax.jit(score)
    return jax.jit(score, out_shardings=(out_sharding, out_sharding))


def make_scorer(
    apply: Callable, params, *, batch_sharding: NamedSharding | None = None, pad_id: int = 0
) -> Scorer:
    """-> score(inputs, targets) on numpy int arrays [B, T] -> (loss float32 [B, T],
    correct bool [B, T]) as numpy.

    apply(params, tokens [B, T]) -> logits [B, T, V] (positions 0..T-1, one segment per row);
    a model apply that takes `targets=` scores chunk by chunk, never building the logits.
    batch_sharding: how [B, T] arrays are laid out on the mesh (the trainer's
    ("batch", "length") sharding); rows are padded to a multiple of its batch shards and the
    length to a multiple of its sequence shards. Padding goes after the real tokens, which a
    causal model never attends to, and is cut off before returning.
    """

    replicated = None
    if batch_sharding is not None:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    jitted = _jitted_score(apply, replicated)
    row_multiple, length_multiple = _shards(batch_sharding, 0), _shards(batch_sharding, 1)
    if length_multiple > 1:  # context parallelism's zigzag layout holds two chunks per device
        length_multiple *= 2

    def run(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        B, T = inputs.shape
        rows, length = (
            -(-B // row_multiple) * row_multiple,
            -(-T // length_multiple) * length_multiple,
        )
        padded = [np.full((rows, length), pad_id, np.int32) for _ in range(2)]
        padded[0][:B, :T], padded[1][:B, :T] = inputs, targets
        if batch_sharding is not None:
            # Every host holds the same rows; each device takes its own slice of them.
            padded = [
                jax.make_array_from_callback(x.shape, batch_sharding, lambda idx, x=x: x[idx])
                for x in padded
            ]
        losses, correct = jitted(params, *padded)
        return np.asarray(losses)[:B, :T], np.asarray(correct)[:B, :T]

    return run
