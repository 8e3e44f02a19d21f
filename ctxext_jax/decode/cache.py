"""KV caches: one per layer, a pytree that goes into the jitted step (donated) and comes back.

Shape letters: B batch, T new tokens, S cache slots, K kv heads (never the H repeated query
heads), D head dim, R rotary dims.

A layer's cache holds S slots of keys and values [B, S, K, D] and the absolute position each
slot holds, pos [B, S] (-1: empty). The first `sinks` slots hold positions 0 .. sinks-1 and are
never evicted; the other S - sinks slots are a ring: position p >= sinks lives in slot
sinks + (p - sinks) % (S - sinks). Each layer gets only what its mask can read:

    G (global)   S = capacity (no slot is ever reused: positions past it are refused up front)
    L (window w) S = sinks + w: the w most recent positions, the sinks kept
    C (chunk c)  S = sinks + c: a new chunk overwrites the previous one
    streaming    every layer at most sinks + window slots (StreamingLLM), G included

(a ring that would not be smaller than `capacity` is a plain full cache). Attention over the
cache is the model's own: the layer's `Mask` evaluated on the slots' absolute positions, empty
slots excluded by segment id 0, computed by `attention.kernels.attention`. A ring therefore
cannot change what a query sees: window, chunk and sink semantics are those of the full
forward, whatever the order of the slots.

Writing T new tokens: each row writes only its tokens that can still be read later (positions
< sinks and the last S - sinks of the row), so no two tokens of one write share a slot, however
long the chunk. A single token is written before attending (its slot held a position the mask
no longer allows); a longer chunk attends over [cache before the chunk | the chunk] and is then
written, so a chunk longer than the ring keeps exact window semantics for every one of its
queries.

Keys are stored rotated (RoPE applied at write time), except when they must be rotated at read
time ("raw"): length-dependent rope types (`dynamic`, `dynamic_yarn`, `longrope`) under
`rope_decode="consistent"` rotate every cached key with the frequencies of the current length,
and streaming assigns positions inside the cache (sinks 0 .. n-1, then the window in order).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ctxext_jax.attention.kernels import attention
from ctxext_jax.attention.masks import Mask
from ctxext_jax.positions.alibi import alibi_bias, alibi_slopes
from ctxext_jax.positions.rope import apply_rope, parse_rope
from ctxext_jax.sharding import constrain

KV_AXES = ("cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")
POS_AXES = ("cache_batch", "cache_sequence")
ROPE_DECODE_MODES = ("hf", "consistent")


@dataclasses.dataclass(frozen=True)
class CacheMode:
    """How every layer's cache is laid out: the static choices of one decode."""

    capacity: int  # slots of a G layer (the longest prompt + new tokens it can hold)
    rope_decode: str = "hf"  # "hf" | "consistent" (length-dependent rope types only)
    streaming: bool = False
    stream_sinks: int = 4
    stream_window: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values. k, v: [B, S, K, D]; pos: [B, S] int32, -1 = empty."""

    k: Array
    v: Array
    pos: Array
    sinks: int = dataclasses.field(metadata=dict(static=True))
    raw: bool = dataclasses.field(default=False, metadata=dict(static=True))
    streaming: bool = dataclasses.field(default=False, metadata=dict(static=True))
    rope_length: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def slots(self) -> int:
        return self.k.shape[-3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """The new tokens of one call. positions: [B, T] int32 absolute; valid: [B, T] bool (False
    for padding: such a token is neither written nor visible). fresh: the caches are empty and
    positions are 0 .. T-1 in every row, padding only after each row's tokens (a first prompt
    piece), so attention needs only the new keys."""

    positions: Array
    valid: Array
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))


def _scaling(cfg, kind):
    return parse_rope(cfg.rope_for(kind), head_dim=cfg.head_dim)


def layer_layout(cfg, kind: str, mode: CacheMode) -> dict:
    """Static layout of one layer's cache: sinks, slots, raw, streaming, rope_length."""
    scaling = _scaling(cfg, kind)
    if kind == "global":
        sinks, ring = (mode.stream_sinks, mode.stream_window) if mode.streaming else (0, 0)
    elif kind == "local":
        sinks, ring = cfg.sinks, cfg.window
    else:
        sinks, ring = cfg.sinks, cfg.chunk
    if not mode.streaming and (ring == 0 or sinks + ring >= mode.capacity):
        sinks, ring = 0, mode.capacity  # nothing to evict: a plain full cache
    raw = mode.streaming or (mode.rope_decode == "consistent" and scaling.depends_on_length)
    slots = sinks + ring
    rope_length = slots if mode.streaming else mode.capacity
    return dict(sinks=sinks, slots=slots, raw=raw, streaming=mode.streaming,
                rope_length=rope_length)  # fmt: skip


def init_layer(cfg, kind: str, mode: CacheMode, batch: int, *, repeats: int | None = None):
    """An empty cache for one layer ([R] leading axis on every array when `repeats`)."""
    layout = layer_layout(cfg, kind, mode)
    lead = () if repeats is None else (repeats,)
    shape = (*lead, batch, layout.pop("slots"), cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return LayerCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full(shape[:-2], -1, jnp.int32),
        **layout,
    )


def init_caches(cfg, mode: CacheMode, batch: int) -> list[LayerCache]:
    """Every layer's empty cache, in the model's layout: one per layer of the pattern group
    stacked over the repeats (scanned layers), or one per layer (unscanned)."""
    if cfg.scan_layers:
        group = cfg.layer_kinds[: len(cfg.layer_pattern)]
        repeats = cfg.n_layers // len(group)
        return [init_layer(cfg, kind, mode, batch, repeats=repeats) for kind in group]
    return [init_layer(cfg, kind, mode, batch) for kind in cfg.layer_kinds]


def cache_axes(caches: list[LayerCache]) -> list[LayerCache]:
    """The same tree with each array replaced by its logical axes (stacked axes unsharded)."""

    def axes(cache: LayerCache) -> LayerCache:
        lead = (None,) * (cache.pos.ndim - 2)
        return dataclasses.replace(cache, k=lead + KV_AXES, v=lead + KV_AXES, pos=lead + POS_AXES)

    return [axes(c) for c in caches]


def cache_bytes(caches: list[LayerCache]) -> int:
    """Bytes held by all the caches (keys, values and slot positions)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches)))


# ------------------------------------------------------------------------------ frequencies
@functools.lru_cache(maxsize=64)
def _frequency_table(cfg, kind: str, max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """inv_freq [N, R/2], attention factor [N] for lengths lo .. lo + N - 1, and lo.

    The length-dependent types are constant up to their original length (dynamic NTK below
    max_position_embeddings, dynamic YaRN and longrope below original_max_position_embeddings):
    the table starts there. A two-level type (longrope: short / long) keeps two rows.
    """
    scaling = _scaling(cfg, kind)
    mpe = cfg.max_position_embeddings
    lo = min(mpe, getattr(scaling, "original_max_position_embeddings", mpe))
    rows = [
        scaling.frequencies(cfg.head_dim, max_position_embeddings=mpe, seq_len=length)
        for length in range(lo, max(lo, max_length) + 1)
    ]
    inv = np.stack([np.asarray(r[0], np.float32) for r in rows])
    factor = np.asarray([r[1] for r in rows], np.float32)
    if len(rows) > 2 and np.array_equal(inv[1], inv[-1]) and factor[1] == factor[-1]:
        inv, factor = inv[:2], factor[:2]
    return inv, factor, lo


def rope_at(cfg, kind: str, length: Array, max_length: int):
    """Frequencies for rows whose current total length is `length` [B]: (inv_freq, factor),
    static numpy for the static types, [B, 1, R/2] and [B, 1, 1] for the length-dependent."""
    scaling = _scaling(cfg, kind)
    if not scaling.depends_on_length:
        inv, factor = scaling.frequencies(
            cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings
        )
        return np.asarray(inv, np.float32), float(factor)
    inv, factor, lo = _frequency_table(cfg, kind, max_length)
    index = jnp.clip(length, lo, lo + len(inv) - 1) - lo
    return jnp.asarray(inv)[index][:, None, :], jnp.asarray(factor)[index][:, None, None]


# -------------------------------------------------------------------------------- attention
def _write(cache: LayerCache, k, v, step: DecodeStep, end: Array) -> LayerCache:
    """Writes the tokens that can still be read later; each goes to its own slot."""
    B = step.positions.shape[0]
    pos, n, S = step.positions, cache.sinks, cache.slots
    ring = S - n
    keep = step.valid & ((pos < n) | (pos >= end[:, None] - ring))
    slot = jnp.where(pos < n, pos, n + (pos - n) % ring)
    slot = jnp.where(keep, slot, S)  # out of range: dropped
    rows = jnp.arange(B)[:, None]

    def put(buf, new, axes):
        buf = buf.at[rows, slot].set(new.astype(buf.dtype), mode="drop")
        return constrain(buf, axes)

    return dataclasses.replace(
        cache,
        k=put(cache.k, k, KV_AXES),
        v=put(cache.v, v, KV_AXES),
        pos=put(cache.pos, pos, POS_AXES),
    )


def cached_attention(q, k, v, cache: LayerCache, step: DecodeStep, *, cfg, kind: str):
    """Attention of new tokens over this layer's cache, which it updates.

    q: [B, T, H, D], k, v: [B, T, K, D] before RoPE -> ([B, T, H, D], updated cache).
    """
    T = q.shape[1]
    pos, valid = step.positions, step.valid
    n, ring = cache.sinks, cache.slots - cache.sinks
    end = jnp.max(jnp.where(valid, pos + 1, 0), axis=1)  # [B] total length after this call

    if cache.streaming:
        # Positions inside the cache: sinks keep theirs, the window follows them in order.
        shift = jnp.maximum(end - n - ring, 0)

        def rank(p):
            return jnp.where(p < n, p, p - shift[:, None])

        length = end - shift
    else:

        def rank(p):
            return p

        length = end
    inv_freq, factor = rope_at(cfg, kind, length, cache.rope_length)

    def rotate(x, p):
        return apply_rope(x, p, inv_freq=inv_freq, attention_factor=factor)

    q = rotate(q, rank(pos))
    k_store = k if cache.raw else rotate(k, pos)
    new_cache = _write(cache, k_store, v, step, end)
    if T == 1:
        # The slot written held a position the new query may no longer see.
        keys, values, kv_pos = new_cache.k, new_cache.v, new_cache.pos
    else:
        keys = jnp.concatenate([cache.k, k_store.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        kv_pos = jnp.concatenate([cache.pos, jnp.where(valid, pos, -1)], axis=1)
    if cache.raw:
        keys = rotate(keys, rank(kv_pos))

    if cache.streaming and kind == "global":
        window, sinks = ring, n
    else:
        window = cfg.window if kind == "local" else None
        sinks = cfg.sinks if kind != "global" else 0
    chunk = cfg.chunk if kind == "chunked" else None
    if step.fresh and not cache.streaming:
        # A first prompt piece over empty caches: the piece attends to itself alone, at the
        # default positions and without slot or position vectors in the mask, which lets
        # `auto` run a fused kernel (cuDNN on a GPU) for the prefill. Padding trails each row,
        # so no real query sees it under the causal mask.
        keys, values = (rotate(k, pos) if cache.raw else k_store), v
        mask = Mask(causal=True, window=window, chunk=chunk, sinks=sinks)
    else:
        mask = Mask(
            causal=True,
            window=window,
            chunk=chunk,
            sinks=sinks,
            q_segment_ids=jnp.ones(pos.shape, jnp.int32),
            kv_segment_ids=(kv_pos >= 0).astype(jnp.int32),
            q_positions=pos,
            kv_positions=kv_pos,
        )
    slopes = bias = None
    if cfg.alibi:
        slopes = alibi_slopes(cfg.n_heads)
        if cache.streaming:  # distances inside the cache, as the rotary positions
            bias, slopes = alibi_bias(slopes, rank(pos), rank(kv_pos)), None
    impl = cfg.attention_impl if cfg.attention_impl in ("xla", "blockwise") else "auto"
    out = attention(q, keys, values, mask=mask, bias=bias, alibi_slopes=slopes, implementation=impl)
    return out, new_cache
