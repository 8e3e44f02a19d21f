"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus).

Shape letters: B batch, V vocab. Each row draws with its own key, so a row's tokens depend on
its seed and its own logits only, never on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax; top_k / top_p unused). top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Array, *, temperature: float, top_k: int, top_p: float) -> Array:
    """logits [B, V] -> tempered logits with everything outside top-k / top-p at -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches p (the most
    likely token always stays), as transformers' TopPLogitsWarper.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def sample(logits: Array, keys: Array, sampling: Sampling) -> Array:
    """logits [B, V], keys [B] (one PRNG key per row) -> token ids [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(
        logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
    )
    draw = jax.vmap(lambda key, row: jax.random.categorical(key, row))
    return draw(keys, filtered).astype(jnp.int32)
