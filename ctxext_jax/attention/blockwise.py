"""The `blockwise` attention backend: flash attention in plain JAX.

Shapes: q [B, T, H, D]; k, v [B, S, K, D]; H = K * G (q viewed as [B, T, K, G, D]).

Online softmax over key blocks with a custom VJP that recomputes tiles from O and the
logsumexp, so memory stays linear in T + S. Per query block, a static table lists the key
blocks `Mask.key_intervals` may reach (the rest are never visited); packed documents with
sinks add their sink blocks at run time. `kernels.attention` dispatches here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ctxext_jax.attention.masks import Mask


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one blockwise call (hashable: a custom_vjp nondiff argument)."""

    pattern: Mask  # static fields only
    scale: float
    softcap: float | None
    S: int  # true key length; padded keys are masked
    bq: int
    bk: int
    table: tuple[tuple[int, ...], ...]  # [nq, max_blocks] key blocks per query block
    counts: tuple[int, ...]  # [nq] how many entries of each table row are used
    doc_sinks: int  # >0: sinks of per-document positions, whose key blocks are found at run time


def _block_plan(
    mask: Mask, T: int, S: int, bq: int, bk: int, doc_sinks: int
) -> tuple[tuple, tuple]:
    """Per query block, the key blocks the static pattern may reach (the rest are skipped).

    With doc_sinks, the sinks of the document each query block starts in are left to
    `_sink_blocks`; those of documents starting inside the block lie in [q_lo, q_hi - 1 + n),
    which the causal window / chunk range already covers but a non-causal one may not.
    """
    nq = -(-T // bq)
    rows = []
    for i in range(nq):
        q_lo, q_hi = i * bq, min(T, (i + 1) * bq)
        intervals = mask.key_intervals(q_lo, q_hi, T, S)
        if doc_sinks and not mask.causal:
            intervals.append((q_lo, q_hi - 1 + doc_sinks))
        blocks = set()
        for lo, hi in intervals:
            blocks.update(range(lo // bk, -(-min(hi, S) // bk)))
        rows.append(sorted(blocks))
    width = max(1, max(len(r) for r in rows))
    table = tuple(tuple(r + [0] * (width - len(r))) for r in rows)
    return table, tuple(len(r) for r in rows)


def blockwise_attention(q, k, v, mask, bias, alibi_slopes, scale, softcap, *, block_q, block_kv):
    """Flash attention in plain JAX: online softmax over the key blocks each query block needs.

    Memory is O(B * (T + S) * H * D) plus one [B, H, block_q, block_kv] tile: the T x S matrix
    is never stored; the backward pass recomputes tiles from O and the logsumexp. Key blocks
    outside `Mask.key_intervals` are never visited, so a window w costs O(T * w) FLOPs. Lengths
    are padded internally to whole blocks; padded keys are masked.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block_q and block_kv must be >= 1, got {block_q}, {block_kv}.")
    bq, bk = min(block_q, T), min(block_kv, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    # Packed documents with sinks: each document's first tokens sit at a row known only at run
    # time. The static table then covers the window / chunk alone and `_sink_blocks` adds the
    # blocks holding the sinks of the document each query block starts in, so the cost stays
    # O(T * (w + n)) instead of the causal O(T^2 / 2).
    doc_sinks = 0
    if (
        mask.sinks
        and (mask.window or mask.chunk)
        and not mask.default_positions
        and mask.index_aligned(T, S)
    ):
        doc_sinks = mask.sinks
    table, counts = _block_plan(
        dataclasses.replace(mask, sinks=0) if doc_sinks else mask, T, S, bq, bk, doc_sinks
    )
    pattern = dataclasses.replace(
        mask, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None
    )
    plan = _Plan(pattern, scale, softcap or None, S, bq, bk, table, counts, doc_sinks)

    def pad(x, axis, n):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n - x.shape[axis])
        return jnp.pad(x, widths)

    q_pos, kv_pos = mask.positions(T, S)
    segs = (None, None)
    if mask.has_segments:
        segs = (pad(mask.q_segment_ids, 1, Tp), pad(mask.kv_segment_ids, 1, Sp))
    if bias is not None:
        Hb = bias.shape[1]
        bias = pad(pad(bias, 2, Tp), 3, Sp).reshape(
            bias.shape[0], K if Hb == H else 1, H // K if Hb == H else 1, Tp, Sp
        )
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(K, H // K)
    out = _flash(
        plan,
        pad(q, 1, Tp).reshape(B, Tp, K, H // K, D),
        pad(k, 1, Sp),
        pad(v, 1, Sp),
        bias,
        slopes,
        pad(q_pos, 1, Tp),
        pad(kv_pos, 1, Sp),
        *segs,
    )[0]
    return out[:, :T].reshape(B, T, H, D)


def _scores(plan, i, j, q_blk, k, bias, slopes, q_pos, kv_pos, q_seg, kv_seg):
    """Logits of query block i against key block j: s [B, K, G, bq, bk] (masked -> -inf) and
    tanh(raw / softcap) (for the soft-cap derivative) or None."""
    bq, bk = plan.bq, plan.bk
    k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s * plan.scale
    tanh = None
    if plan.softcap:
        tanh = jnp.tanh(s / plan.softcap)
        s = plan.softcap * tanh
    if bias is not None:
        tile = jax.lax.dynamic_slice_in_dim(bias, i * bq, bq, axis=3)
        s = s + jax.lax.dynamic_slice_in_dim(tile, j * bk, bk, axis=4).astype(jnp.float32)
    qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)[:, :, None]
    kp = jax.lax.dynamic_slice_in_dim(kv_pos, j * bk, bk, axis=1)[:, None, :]
    if slopes is not None:
        dist = (qp - kp).astype(jnp.float32)[:, None, None]
        s = s - slopes.astype(jnp.float32)[None, :, :, None, None] * dist
    qs = ks = None
    if q_seg is not None:
        qs = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)[:, :, None]
        ks = jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)[:, None, :]
    keep = plan.pattern.allowed(qp, kp, qs, ks) & (j * bk + jnp.arange(bk) < plan.S)
    return jnp.where(keep[:, None, None], s, -jnp.inf), tanh


def _sink_blocks(plan, i, row, cnt, q_pos):
    """Key blocks holding the first `doc_sinks` rows of the document that each batch row's
    query block i starts in, that the static row does not already visit: (blocks, valid) [B*m].

    Documents starting inside the query block have their sinks in the static row (see
    `_block_plan`).
    """
    bq, bk, n = plan.bq, plan.bk, plan.doc_sinks
    start = i * bq - q_pos[:, i * bq]  # [B or 1] row where that document begins
    m = -(-n // bk) + 1
    blocks = (start[:, None] // bk + jnp.arange(m)[None]).reshape(-1)
    last = jnp.repeat((start + n - 1) // bk, m)
    first_static, last_static = row[0], row[jnp.maximum(cnt - 1, 0)]
    valid = (blocks <= last) & (blocks >= 0) & (blocks * bk < plan.S)
    valid &= (cnt == 0) | (blocks < first_static) | (blocks > last_static)
    # Visit each block once: drop repeats of an earlier valid candidate (other batch rows).
    earlier = jnp.tril(jnp.ones((blocks.size, blocks.size), bool), -1)
    repeat = jnp.any(earlier & (blocks[:, None] == blocks[None]) & valid[None], axis=1)
    return blocks, valid & ~repeat


def _visit(plan, i, row, cnt, q_pos, body, carry):
    """carry = body(j, carry) for every key block j that query block i may attend to."""
    carry = jax.lax.fori_loop(0, cnt, lambda t, c: body(row[t], c), carry)
    if plan.doc_sinks:
        blocks, valid = _sink_blocks(plan, i, row, cnt, q_pos)

        def maybe(t, c):
            return jax.lax.cond(valid[t], lambda c: body(blocks[t], c), lambda c: c, c)

        carry = jax.lax.fori_loop(0, blocks.size, maybe, carry)
    return carry


def _q_blocks(x, bq):
    """[B, Tp, ...] -> [nq, B, bq, ...] for scanning over query blocks."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, bq, *x.shape[2:]), 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg):
    return _flash_fwd(plan, q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_fwd(plan, q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg):
    """q [B, Tp, K, G, D] -> (o [B, Tp, K, G, D], lse [nq, B, K, G, bq]), residuals."""
    table, counts = jnp.asarray(plan.table, jnp.int32), jnp.asarray(plan.counts, jnp.int32)
    o, lse = forward(plan, table, counts, q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg)
    o = o.astype(q.dtype)
    res = (q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg, o, lse)
    return (o, lse), res


def forward(plan, table, counts, q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg):
    """The forward pass with the key-block `table` [nq, width] and `counts` [nq] given as
    (possibly traced) arrays, so a caller can pick a table at run time (context parallelism
    picks one per device and hop). Returns o [B, Tp, K, G, D] float32 and lse
    [nq, B, K, G, bq] (+inf for rows with no visible key)."""
    B, Tp, K, G, D = q.shape
    idx = jnp.arange(len(plan.counts), dtype=jnp.int32)

    def one_block(xs):
        i, row, cnt, q_blk = xs
        stat = jnp.zeros((B, K, G, plan.bq), jnp.float32)
        init = (stat - jnp.inf, stat, jnp.zeros((B, K, G, plan.bq, D), jnp.float32))

        def body(j, carry):
            m, l, acc = carry
            s, _ = _scores(plan, i, j, q_blk, k, bias, slopes, q_pos, kv_pos, q_seg, kv_seg)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all masked so far
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * plan.bk, plan.bk, axis=1)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
            )
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        m, l, acc = _visit(plan, i, row, cnt, q_pos, body, init)
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]
        # Rows with no visible key: o = 0 and lse = +inf, so the backward's p = exp(s - lse) = 0.
        return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)

    o, lse = jax.lax.map(one_block, (idx, table, counts, _q_blocks(q, plan.bq)))
    o = jnp.moveaxis(o, 4, 2).reshape(len(plan.counts), B, plan.bq, K, G, D)
    return jnp.moveaxis(o, 0, 1).reshape(B, Tp, K, G, D), lse


def _flash_bwd(plan, res, cotangents):
    table, counts = jnp.asarray(plan.table, jnp.int32), jnp.asarray(plan.counts, jnp.int32)
    return backward(plan, table, counts, res, cotangents[0]) + (None,) * 4


def backward(plan, table, counts, res, do):
    """Gradients (dq, dk, dv, dbias, dslopes) of `forward`'s o, given the residuals
    (q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg, o, lse) and do = dL/do. o and lse
    may be those of a larger attention this call is one part of (the ring merges hops), so
    the gradients are this part's share; dk, dv, dq come back float32 when do is."""
    q, k, v, bias, slopes, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
    B, Tp, K, G, D = q.shape
    bq, bk = plan.bq, plan.bk
    idx = jnp.arange(len(plan.counts), dtype=jnp.int32)
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij (FlashAttention-2, eq. for dS).
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = jnp.moveaxis(delta.reshape(B, K, G, -1, bq), 3, 0)  # [nq, B, K, G, bq]
    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    acc0 = (
        zeros_kv,
        zeros_kv,
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        None if slopes is None else jnp.zeros(slopes.shape, jnp.float32),
    )

    def one_block(acc, xs):
        i, row, cnt, q_blk, do_blk, lse_blk, delta_blk = xs

        def body(j, carry):
            dq, dk, dv, dbias, dslopes = carry
            s, tanh = _scores(plan, i, j, q_blk, k, bias, slopes, q_pos, kv_pos, q_seg, kv_seg)
            p = jnp.exp(s - lse_blk[..., None])
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            dv_blk = jnp.einsum(
                "bkgqs,bqkgd->bskd", p.astype(do.dtype), do_blk, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])  # d loss / d (capped logits + bias)
            if dbias is not None:
                axes = tuple(a for a in range(3) if dbias.shape[a] == 1)
                tile = jnp.sum(ds, axis=axes, keepdims=True)
                cur = jax.lax.dynamic_slice(dbias, (0, 0, 0, i * bq, j * bk), tile.shape)
                dbias = jax.lax.dynamic_update_slice(dbias, cur + tile, (0, 0, 0, i * bq, j * bk))
            if dslopes is not None:
                qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)[:, :, None]
                kp = jax.lax.dynamic_slice_in_dim(kv_pos, j * bk, bk, axis=1)[:, None, :]
                dist = (qp - kp).astype(jnp.float32)
                dslopes = dslopes - jnp.einsum(
                    "bkgqs,bqs->kg", ds, jnp.broadcast_to(dist, (B, bq, bk))
                )
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = ds * plan.scale
            dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=jnp.float32)
            dk_blk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, 1) + dk_blk, j * bk, 1
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, 1) + dv_blk, j * bk, 1
            )
            return dq, dk, dv, dbias, dslopes

        dq0 = jnp.zeros(q_blk.shape, jnp.float32)
        dq, *acc = _visit(plan, i, row, cnt, q_pos, body, (dq0, *acc))
        return tuple(acc), dq

    xs = (idx, table, counts, _q_blocks(q, bq), _q_blocks(do, bq), lse, delta)
    (dk, dv, dbias, dslopes), dq = jax.lax.scan(one_block, acc0, xs)
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape).astype(q.dtype)
    dbias = None if dbias is None else dbias.astype(bias.dtype)
    dslopes = None if dslopes is None else dslopes.astype(slopes.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dbias, dslopes


_flash.defvjp(_flash_fwd, _flash_bwd)
