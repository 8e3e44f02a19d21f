"""ALiBi (Press et al. 2022): no rotary signal; each query head adds -slope * distance.

Attention kernels take `alibi_slopes` [H] and build the same bias block by block; `alibi_bias` is
the reference formula they are tested against. With GQA the slopes are per query head H.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Slopes [H] float32 by the paper's rule.

    For H a power of two the slopes are the geometric sequence 2^(-8 i / H), i = 1..H. Otherwise
    take the H' = 2^floor(log2 H) slopes of the closest lower power of two, then every other
    slope of the sequence for 2H' (those at odd i), until there are H.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: got {num_heads!r}, must be a positive int")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    base = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    # Odd-indexed slopes of the 2*closest sequence fall between the ones already taken.
    extra = [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * closest + 1, 2)]
    return np.asarray(base + extra[: num_heads - closest], np.float32)


def alibi_bias(
    slopes: np.ndarray | jax.Array, q_positions: jax.Array, kv_positions: jax.Array
) -> jax.Array:
    """Additive logit bias [B, H, T, S] = -slope_h * (q_pos - k_pos), float32.

    slopes: [H]; q_positions: [B, T] int; kv_positions: [B, S] int. Positions are absolute, so a
    decoding step passes q_positions = offset + arange(T) and the cached keys' positions, and a
    rolling window passes the positions its slots hold. Future keys get a positive bias; the
    causal mask removes them.
    """
    # k - q rather than -(q - k): the same value without negative zeros on the diagonal.
    offset = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S], exact in int
    slopes = jnp.asarray(slopes, jnp.float32)[None, :, None, None]
    # A broadcast product, not an einsum: TPUs run float32 dot_generals at bf16 precision.
    return slopes * offset.astype(jnp.float32)[:, None, :, :]
