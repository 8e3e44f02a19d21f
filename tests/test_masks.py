"""Mask semantics against an explicit per-pair reference, static block bounds, and the pattern
translations used by the hardware backends (splash mask function, cudnn arguments)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxext_jax.attention import Mask, kernels


def reference_allowed(q_pos, k_pos, q_seg, k_seg, *, causal, window, chunk, sinks):
    """One (query, key) pair, written out as the issue states the rules."""
    if q_seg != k_seg:
        return False
    if causal and k_pos > q_pos:
        return False
    if window is not None and not (
        (q_pos - k_pos < window) if causal else (abs(q_pos - k_pos) < window)
    ):
        return sinks > 0 and k_pos < sinks
    if chunk is not None and q_pos // chunk != k_pos // chunk:
        return sinks > 0 and k_pos < sinks
    return True


def packed(rng, B, L, max_docs=3):
    """Random contiguous documents: segment ids and per-document positions, [B, L] each."""
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), size=rng.integers(0, max_docs), replace=False))
        starts = np.concatenate([[0], cuts])
        for d, (lo, hi) in enumerate(zip(starts, list(cuts) + [L], strict=True)):
            seg[b, lo:hi] = d
            pos[b, lo:hi] = np.arange(hi - lo)
    return seg, pos


PATTERNS = [
    dict(),
    dict(causal=False),
    dict(window=4),
    dict(window=4, causal=False),
    dict(chunk=5),
    dict(chunk=5, causal=False),
    dict(window=3, sinks=2),
    dict(chunk=4, sinks=1),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("layout", ["plain", "offset", "packed"])
def test_dense_matches_reference(pattern, layout):
    rng = np.random.default_rng()
    B, T, S = 2, 13, 13
    kw = dict(pattern)
    q_pos = np.broadcast_to(np.arange(T), (B, T))
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    q_seg = np.zeros((B, T), np.int32)
    k_seg = np.zeros((B, S), np.int32)
    if layout == "offset":
        T = 4
        kw["q_offset"] = S - T
        q_pos = np.broadcast_to(np.arange(T) + S - T, (B, T))
        q_seg = np.zeros((B, T), np.int32)
    if layout == "packed":
        q_seg, q_pos = packed(rng, B, T)
        k_seg, k_pos = q_seg, q_pos
        pj, sj = jnp.asarray(q_pos), jnp.asarray(q_seg)
        kw.update(q_segment_ids=sj, kv_segment_ids=sj, q_positions=pj, kv_positions=pj)
    dense = np.asarray(Mask(**kw).dense(T, S))
    static = {n: kw.get(n, d) for n, d in (("causal", True), ("window", None), ("chunk", None))}
    want = np.array(
        [
            [
                [
                    reference_allowed(
                        q_pos[b, i],
                        k_pos[b, j],
                        q_seg[b, i],
                        k_seg[b, j],
                        sinks=kw.get("sinks", 0),
                        **static,
                    )
                    for j in range(S)
                ]
                for i in range(T)
            ]
            for b in range(B)
        ]
    )
    np.testing.assert_array_equal(np.broadcast_to(dense, want.shape), want)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("block", [1, 4, 7])
def test_key_intervals_cover_every_allowed_pair(pattern, block):
    """Blockwise skips everything outside key_intervals, so they must contain every visible
    key, for default, offset and packed per-document positions."""
    rng = np.random.default_rng()
    T = S = 29
    seg, pos = packed(rng, 1, T)
    sj, pj = jnp.asarray(seg), jnp.asarray(pos)
    masks = [
        (Mask(**pattern), T, S),
        (Mask(**pattern, q_offset=S - 6), 6, S),
        (
            Mask(**pattern, q_segment_ids=sj, kv_segment_ids=sj, q_positions=pj, kv_positions=pj),
            T,
            S,
        ),
    ]
    for mask, t, s in masks:
        dense = np.asarray(mask.dense(t, s))[0]
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            inside = np.zeros(s, bool)
            for a, b in mask.key_intervals(lo, hi, t, s):
                inside[a:b] = True
            assert not (dense[lo:hi] & ~inside).any(), (mask, lo, hi)


def test_key_intervals_make_windows_sparse():
    mask = Mask(window=64, sinks=4)
    covered = sum(b - a for a, b in mask.key_intervals(4096, 4160, 8192, 8192))
    assert covered <= 64 + 64 + 4
    # Distinct position arrays: no static bound may be assumed.
    pos = jnp.arange(16)[None]
    assert Mask(window=2, q_positions=pos, kv_positions=pos + 0).key_intervals(0, 4, 16, 16) == [
        (0, 16)
    ]


@pytest.mark.parametrize(
    "kw",
    [
        dict(window=0),
        dict(chunk=-1),
        dict(window=4, chunk=8),
        dict(sinks=-1),
        dict(q_offset=1.5),
    ],
)
def test_bad_static_fields_raise(kw):
    with pytest.raises(ValueError, match="Mask"):
        Mask(**kw)


def test_bad_arrays_raise():
    seg = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="together"):
        Mask(q_segment_ids=seg).validate(2, 5, 5)
    with pytest.raises(ValueError, match="kv_positions"):
        Mask(kv_positions=jnp.zeros((2, 4), jnp.int32)).validate(2, 5, 5)
    with pytest.raises(ValueError, match="integer"):
        Mask(q_positions=jnp.zeros((2, 5))).validate(2, 5, 5)


def test_mask_is_a_pytree_with_static_pattern():
    seg = jnp.zeros((1, 6), jnp.int32)
    mask = Mask(window=3, sinks=1, q_segment_ids=seg, kv_segment_ids=seg)
    leaves, tree = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.window == 3 and again.sinks == 1
    out = jax.jit(lambda m: m.dense(6, 6))(mask)
    np.testing.assert_array_equal(out, mask.dense(6, 6))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_splash_mask_function_matches_dense(pattern):
    """The splash kernel evaluates Mask.allowed on row indices; its block view must equal the
    dense pattern."""
    T = S = 40
    mask = Mask(**pattern)
    splash = kernels.splash_pattern_mask(mask, T, S)
    np.testing.assert_array_equal(splash[0:T, 0:S], np.asarray(mask.dense(T, S))[0])
    np.testing.assert_array_equal(splash[8:24, 16:40], np.asarray(mask.dense(T, S))[0, 8:24, 16:])


@pytest.mark.parametrize(
    "kw,T,S",
    [
        (dict(), 24, 24),
        (dict(window=5), 24, 24),
        (dict(causal=False), 24, 24),
        (dict(window=5, q_offset=20), 4, 24),
        (dict(window=5, segments=True), 24, 24),
    ],
)
def test_cudnn_translation_matches_reference(kw, T, S):
    """cudnn's argument translation (is_causal, local_window_size, dense mask) run through
    jax.nn.dot_product_attention's XLA path, against our dense reference."""
    kw = dict(kw)
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    q = jax.random.normal(keys[0], (2, T, 4, 16))
    k = jax.random.normal(keys[1], (2, S, 2, 16))
    v = jax.random.normal(keys[2], (2, S, 2, 16))
    if kw.pop("segments", False):
        seg = jnp.asarray(packed(np.random.default_rng(), 2, T)[0])
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    mask = Mask(**kw)
    got = kernels._cudnn(q, k, v, mask, None, 0.25, dpa_implementation="xla")
    want = kernels._xla(q, k, v, mask, None, None, 0.25, None)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
