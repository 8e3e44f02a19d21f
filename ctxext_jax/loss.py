"""Cross-entropy over the vocabulary without a [B, T, V] array: the head runs chunk by chunk.

Shape letters: B batch, T length, E embed, V vocab, N chunks, C positions per chunk (T = N * C).

At long context the float32 logits dominate a training step's memory (T * V * 4 bytes per row:
64 GiB at T = 512k, V = 32k). `token_losses` computes the head matmul, the log-sum-exp and the
target logit inside a `lax.map` over chunks of C positions, under `jax.checkpoint`: the forward
keeps only each chunk's losses, and the backward recomputes the chunk's logits from the hidden
states, so at most one [B, C, V] block lives at a time in either direction.

Chunk n holds positions n, n + N, n + 2N, ...: cutting T into (C, N) keeps the C axis sharded
like the length (the `sequence` mesh axis), so no chunk moves data between devices; the vocab
axis of each block stays sharded over `tensor` (`activation_vocab`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ctxext_jax.sharding import constrain


def _block_losses(x, head, targets):
    """x: [B, C, E], head: [E, V] (cast to x.dtype), targets: [B, C] ->
    (loss float32 [B, C], argmax == target bool [B, C])."""
    logits = jnp.einsum("BCE,EV->BCV", x, head.astype(x.dtype)).astype(jnp.float32)
    logits = constrain(logits, ("batch", "length", "activation_vocab"))
    # The target logit as a masked sum, not a gather: it stays local to each vocab shard.
    is_target = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    loss = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return loss, jnp.argmax(logits, axis=-1) == targets


def token_losses(
    x: jax.Array, head: jax.Array, targets: jax.Array, *, chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of every position, and whether its argmax is the target.

    x: [B, T, E] final hidden states (compute dtype); head: [E, V] the output projection (its
    parameter dtype: the gradient accumulates over chunks in it); targets: [B, T] int.
    chunk: positions per chunk C (0, or >= T: the whole length at once).
    Returns (loss float32 [B, T], correct bool [B, T]).
    """
    B, T, E = x.shape
    if chunk <= 0 or chunk >= T:
        return _block_losses(x, head, targets)
    n = -(-T // chunk)
    if n * chunk != T:  # pad the tail; padded positions are cut off below
        x = jnp.pad(x, ((0, 0), (0, n * chunk - T), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * chunk - T)))
    xs = constrain(
        x.reshape(B, chunk, n, E).transpose(2, 0, 1, 3),
        (None, "batch", "length", "activation_embed"),
    )  # [N, B, C, E]
    ts = targets.reshape(B, chunk, n).transpose(2, 0, 1)  # [N, B, C]
    # Nothing inside a chunk is saved for the backward pass: its logits are recomputed there.
    block = jax.checkpoint(_block_losses)
    loss, correct = jax.lax.map(lambda xt: block(xt[0], head, xt[1]), (xs, ts))
    unchunk = lambda a: a.transpose(1, 2, 0).reshape(B, n * chunk)[:, :T]  # noqa: E731
    return unchunk(loss), unchunk(correct)
