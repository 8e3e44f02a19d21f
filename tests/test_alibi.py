"""ALiBi slopes against the paper's recursive rule; the bias in every calling pattern."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ctxext_jax.positions import alibi_bias, alibi_slopes


def _paper_slopes(n):
    """The reference code of the ALiBi repository (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", range(1, 65))
def test_slopes_match_paper_rule(num_heads):
    ours = alibi_slopes(num_heads)
    assert ours.shape == (num_heads,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.asarray(_paper_slopes(num_heads)), rtol=1e-6)


def test_slopes_reject_bad_head_counts():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="num_heads"):
            alibi_slopes(bad)


def test_bias_formula_and_decoding_step():
    rng = np.random.default_rng()
    heads, length = 12, 33
    slopes = alibi_slopes(heads)
    offsets = rng.integers(0, 1000, size=(2,))
    positions = offsets[:, None] + np.arange(length)[None]  # [B, T]
    full = np.asarray(alibi_bias(slopes, jnp.asarray(positions), jnp.asarray(positions)))
    ref = -slopes[None, :, None, None] * (positions[:, None, :, None] - positions[:, None, None, :])
    assert full.shape == (2, heads, length, length)
    np.testing.assert_allclose(full, ref, rtol=1e-6)
    # One decoding step: a single query at the last position against the whole cache.
    step = alibi_bias(slopes, jnp.asarray(positions[:, -1:]), jnp.asarray(positions))
    np.testing.assert_array_equal(np.asarray(step), full[:, :, -1:, :])
    # A prefill chunk at an offset gives the matching rows.
    chunk = alibi_bias(slopes, jnp.asarray(positions[:, 20:27]), jnp.asarray(positions))
    np.testing.assert_array_equal(np.asarray(chunk), full[:, :, 20:27, :])


def test_bias_for_rolling_window_slots():
    # A rolling KV window of 8 slots holding positions in ring order: slot j holds position p
    # with p % 8 == j. The bias per slot equals the full bias at those key positions.
    slopes = alibi_slopes(6)
    query = 29
    window = np.arange(query - 7, query + 1)
    slots = np.zeros(8, int)
    slots[window % 8] = window
    full = np.asarray(alibi_bias(slopes, jnp.asarray([[query]]), jnp.arange(query + 1)[None]))
    ring = np.asarray(alibi_bias(slopes, jnp.asarray([[query]]), jnp.asarray(slots[None])))
    np.testing.assert_array_equal(ring, full[..., slots])
