"""Context parallelism: attention over a sequence sharded along one mesh axis, in `shard_map`.

Shapes (global): q [B, T, H, D]; k, v [B, T, K, D]; H = K * G. Each of the n devices of the
`sequence` axis holds L = T / n rows of every array; the other mesh axes shard batch and heads
as the logical rules say, so every device works on its own (batch, heads, rows) block only.

Strategies (`model.context_parallel`):
- `all_gather`: gather K/V (and their positions and segment ids) along the axis, then each
  device attends its own queries to the gathered keys. One collective per layer; K/V memory
  O(T) per device. The gradient of the gather is a reduce-scatter of dK/dV.
- `ring`: K/V blocks travel around the axis with `ppermute`, one hop at a time, and the
  per-hop results merge by their log-sum-exp (online softmax). A custom VJP sends dK/dV
  around the ring with the blocks, so K/V memory stays O(L) per device. The next hop's
  transfer is issued before the current hop's compute, so XLA can overlap them.

Layouts (`model.context_parallel_balance`: `none` or `zigzag`) are in sequence_layout.py.

Every mask feature of `Mask` holds across shards: positions and segment ids travel with K/V and
the local kernel evaluates the pattern on them (so packed documents may cross shard
boundaries). Which (query block, key block) tiles can hold an allowed pair is decided
statically on global row indices from `Mask.key_intervals` (the packing invariant: within a
document, position distances equal row distances), once per device and hop; tiles ruled out
are never visited, so a causal mask costs half and a window w costs O(T w / n) per device.
The local kernel (`local_kernel`): all_gather runs splash on TPU when it honours the pattern
(one kernel over the whole [T, T] layout mask with its tables split over the query rows,
`q_seq_shards` = n, the mask function mapping layout rows to global rows), otherwise the
blockwise kernel of blockwise.py with per-device tables, on every platform. cuDNN is never the
local kernel: its public API (jax.nn.dot_product_attention) has no query offset, so the
per-device query rows would need a dense [L, T] mask. The ring always runs blockwise: it
merges hops by a float32 log-sum-exp and its backward runs against the merged output and
log-sum-exp, which neither fused kernel offers through a public API (cuDNN's
return_residual gives the log-sum-exp in the input dtype and its VJP recomputes its own;
splash's save_residuals output is not differentiable). Without context parallelism the fused
kernels run per device too (`kernels.on_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ctxext_jax import sharding
from ctxext_jax.attention import blockwise, kernels
from ctxext_jax.attention.masks import Mask
from ctxext_jax.attention.sequence_layout import (
    LayoutRows,
    check_length,
    chunks_per_device,
    layout_permutation,
    layout_starts,
)

STRATEGIES = ("all_gather", "ring")
LOCAL_KERNELS = ("auto", "blockwise", "splash")


# ---------------------------------------------------------------------------------------------
# Static tile tables: which key blocks each query block visits, per device (and hop).
# ---------------------------------------------------------------------------------------------


def _probe(pattern: Mask, T: int, packed: bool) -> Mask:
    """`pattern` over the whole natural sequence, for `key_intervals` on global rows. Packed
    (per-document) positions are stood in for by one shared placeholder array, which tells
    `key_intervals` they obey the packing invariant."""
    if not packed:
        return pattern
    stand_in = np.zeros((1, T), np.int32)
    return dataclasses.replace(pattern, q_positions=stand_in, kv_positions=stand_in)


def _block_rows(starts: list[int], c: int, b: int) -> list[int]:
    """Global start row of each b-row block of a device's local rows (b divides c)."""
    return [s + r for s in starts for r in range(0, c, b)]


def _table(probe: Mask, T: int, q_rows: list[int], k_rows: list[int], b: int):
    """Key blocks (indices into k_rows) each query block may reach: a list of lists."""
    k0 = np.asarray(k_rows)
    rows = []
    for q0 in q_rows:
        hit = np.zeros(len(k0), bool)
        for lo, hi in probe.key_intervals(q0, q0 + b, T, T):
            hit |= (lo < k0 + b) & (k0 < hi)
        rows.append(np.flatnonzero(hit))
    return rows


def _pad(rows_list):
    width = max(1, max((len(r) for rows in rows_list for r in rows), default=1))
    table = np.zeros((len(rows_list), len(rows_list[0]), width), np.int32)
    counts = np.zeros((len(rows_list), len(rows_list[0])), np.int32)
    for a, rows in enumerate(rows_list):
        for i, r in enumerate(rows):
            table[a, i, : len(r)] = r
            counts[a, i] = len(r)
    return table, counts


def _tile(c: int, block: int) -> int:
    """The largest tile size <= block dividing the chunk length c (tiles never span chunks)."""
    return max(d for d in range(1, min(c, block) + 1) if c % d == 0)


def plan_tables(pattern: Mask, *, strategy: str, balance: str, n: int, T: int, block: int,
                packed: bool):  # fmt: skip
    """-> (tile b, table, counts). all_gather: table [n, nq, width] indexing the gathered keys
    (device order); ring: [n, hops, nq, width] indexing the block that hop delivers (from
    device (d - hop) mod n). Hops needed by no device are dropped from the end."""
    m = chunks_per_device(balance)
    c = T // (m * n)
    b = _tile(c, block)
    starts = layout_starts(balance, n, T)
    probe = _probe(pattern, T, packed)
    q_rows = [_block_rows(starts[d], c, b) for d in range(n)]
    if strategy == "all_gather":
        k_rows = [r for d in range(n) for r in q_rows[d]]
        return (b, *_pad([_table(probe, T, q_rows[d], k_rows, b) for d in range(n)]))
    per_hop = [
        [_table(probe, T, q_rows[d], q_rows[(d - s) % n], b) for d in range(n)] for s in range(n)
    ]
    hops = 1 + max(s for s in range(n) if any(len(r) for rows in per_hop[s] for r in rows))
    flat = [per_hop[s][d] for d in range(n) for s in range(hops)]
    table, counts = _pad(flat)
    return b, table.reshape(n, hops, *table.shape[1:]), counts.reshape(n, hops, -1)


def tiles_per_device(pattern: Mask, *, strategy: str, balance: str, n: int, T: int,
                     block: int = 256, packed: bool = True) -> np.ndarray:  # fmt: skip
    """[n] (query block x key block) tiles each device computes in one forward pass: the
    attention FLOPs per device are proportional to it (b^2 * B * H * D * 4 each)."""
    _, _, counts = plan_tables(pattern, strategy=strategy, balance=balance, n=n, T=T,
                               block=block, packed=packed)  # fmt: skip
    return counts.reshape(n, -1).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# The local computations, inside shard_map.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """A numpy table as a static (hashable) argument, compared by identity: nested tuples of
    Python ints cost seconds per million entries at long lengths."""

    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class _CP:
    """Static description of one context-parallel call (a custom_vjp nondiff argument)."""

    kernel: blockwise._Plan  # pattern, scale, softcap, tile sizes; its own table is unused
    axis: str
    n: int
    table: _Static  # plan_tables' table
    counts: _Static

    def tables(self, *index):
        table, counts = jnp.asarray(self.table.value), jnp.asarray(self.counts.value)
        for i in index:
            table, counts = table[i], counts[i]
        return table, counts

    @property
    def hops(self) -> int:
        return self.counts.value.shape[1]


def _rows(lse, b):
    """[nq, B, K, G, b] -> [B, nq * b, K, G, 1]: one value per query row, o's layout."""
    nq, B, K, G, _ = lse.shape
    return jnp.moveaxis(lse, 0, 3).reshape(B, K, G, nq * b).transpose(0, 3, 1, 2)[..., None]


def _unrows(x, nq, b):
    B, L, K, G, _ = x.shape
    return x[..., 0].transpose(0, 2, 3, 1).reshape(B, K, G, nq, b).transpose(3, 0, 1, 2, 4)


# all_gather: one kernel call against the gathered keys, with this device's table.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg):
    return _gathered_fwd(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg)[0]


def _gathered_fwd(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg):
    table, counts = cp.tables(jax.lax.axis_index(cp.axis))
    args = (q, k, v, None, slopes, q_pos, kv_pos, q_seg, kv_seg)
    o, lse = blockwise.forward(cp.kernel, table, counts, *args)
    o = o.astype(q.dtype)
    return o, (*args, o, lse)


def _gathered_bwd(cp, res, do):
    table, counts = cp.tables(jax.lax.axis_index(cp.axis))
    dq, dk, dv, _, dslopes = blockwise.backward(cp.kernel, table, counts, res, do)
    return dq, dk, dv, dslopes, None, None, None, None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


# ring: hop s computes against the block of device (d - s) mod n, merged by log-sum-exp.


def _shift(x, cp, by):
    return jax.lax.ppermute(x, cp.axis, [(i, (i + by) % cp.n) for i in range(cp.n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg):
    return _ring_fwd(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg)[0]


def _ring_fwd(cp, q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg):
    me = jax.lax.axis_index(cp.axis)
    b = cp.kernel.bq
    nq = q.shape[1] // b
    o_acc = jnp.zeros(q.shape, jnp.float32)
    lse_acc = jnp.full((*q.shape[:4], 1), -jnp.inf, jnp.float32)  # [B, L, K, G, 1]

    def hop(s, carry):
        block, o_acc, lse_acc = carry
        # Send this block on before computing with it: the transfer overlaps the compute.
        nxt = _shift(block, cp, 1)
        table, counts = cp.tables(me, s)
        o, lse = blockwise.forward(cp.kernel, table, counts, q, block[0], block[1], None, slopes,
                                   q_pos, block[2], q_seg, block[3])  # fmt: skip
        lse = _rows(lse, b)
        lse = jnp.where(jnp.isposinf(lse), -jnp.inf, lse)  # no visible key in this hop
        top = jnp.maximum(lse_acc, lse)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w_acc, w_new = jnp.exp(lse_acc - top), jnp.exp(lse - top)
        total = w_acc + w_new
        safe = jnp.where(total > 0, total, 1.0)
        o_acc = (o_acc * w_acc + o * w_new) / safe
        lse_acc = jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)
        return nxt, o_acc, lse_acc

    block = (k, v, kv_pos, kv_seg)
    _, o_acc, lse_acc = jax.lax.fori_loop(0, cp.hops, hop, (block, o_acc, lse_acc))
    o = o_acc.astype(q.dtype)
    lse = _unrows(jnp.where(jnp.isneginf(lse_acc), jnp.inf, lse_acc), nq, b)
    return o, (q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _ring_bwd(cp, res, do):
    q, k, v, slopes, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
    me = jax.lax.axis_index(cp.axis)

    def hop(s, carry):
        block, grads, dq, dslopes = carry
        table, counts = cp.tables(me, s)
        parts = (q, block[0], block[1], None, slopes, q_pos, block[2], q_seg, block[3], o, lse)
        dq_s, dk_s, dv_s, _, dsl_s = blockwise.backward(cp.kernel, table, counts, parts, do)
        grads = (grads[0] + dk_s.astype(jnp.float32), grads[1] + dv_s.astype(jnp.float32))
        dq = dq + dq_s.astype(jnp.float32)
        if dslopes is not None:
            dslopes = dslopes + dsl_s.astype(jnp.float32)
        # dK/dV of a block travel with it: whoever holds the block next adds its share.
        return _shift(block, cp, 1), _shift(grads, cp, 1), dq, dslopes

    zeros = jnp.zeros(k.shape, jnp.float32)
    dslopes = None if slopes is None else jnp.zeros(slopes.shape, jnp.float32)
    carry = ((k, v, kv_pos, kv_seg), (zeros, zeros), jnp.zeros(q.shape, jnp.float32), dslopes)
    _, (dk, dv), dq, dslopes = jax.lax.fori_loop(0, cp.hops, hop, carry)
    if cp.hops % cp.n:  # the dK/dV of a block end up `hops` devices past its owner
        dk, dv = _shift((dk, dv), cp, -cp.hops)
    dslopes = None if dslopes is None else dslopes.astype(slopes.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dslopes,
            None, None, None, None)  # fmt: skip


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------


def context_parallel_attention(
    q,
    k,
    v,
    *,
    mask: Mask,
    mesh,
    rules,
    strategy: str = "all_gather",
    balance: str = "zigzag",
    alibi_slopes=None,
    scale: float | None = None,
    softcap: float | None = None,
    block: int = 256,
    local_kernel: str = "auto",
    interpret: bool = False,
):
    """Self-attention of a sequence sharded over the mesh axis that the rule for `length`
    names, computed by every device on its own rows (and batch and head shards).

    q: [B, T, H, D]; k, v: [B, T, K, D]; mask arrays [B, T]; all in the `balance` layout
    (`to_layout`), default positions meaning natural row order. alibi_slopes: [H].
    local_kernel: `auto` (splash under all_gather on TPU when it honours the pattern, else
    blockwise), `blockwise` or `splash` (all_gather only; interpret=True runs it in the Pallas
    interpreter, for CPU tests). Returns [B, T, H, D] in q.dtype, in the same layout.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context_parallel must be one of {STRATEGIES}, got {strategy!r}.")
    B, T, H, D = q.shape
    K = k.shape[2]
    if k.shape[:2] != (B, T) or v.shape != k.shape or H % K:
        raise ValueError(
            f"context-parallel attention is self-attention: q [B, T, H, D], k, v [B, T, K, D]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    mask.validate(B, T, T)
    if mask.q_offset or not mask.index_aligned(T, T):
        raise ValueError(
            "context-parallel attention needs q_offset 0 and one positions array shared by "
            "queries and keys (see Mask.index_aligned)."
        )
    axis, n = sharding.sequence_axis(mesh, rules)
    if n == 1:
        raise ValueError("context_parallel_attention needs a mesh whose 'length' axis is sharded.")
    check_length(T, n, balance)
    packed = not mask.default_positions
    if packed:
        positions = jnp.broadcast_to(mask.q_positions, (B, T)).astype(jnp.int32)
    else:
        perm = layout_permutation(balance, n, T)
        positions = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (B, T))
    segments = (
        jnp.broadcast_to(mask.q_segment_ids, (B, T)).astype(jnp.int32)
        if mask.has_segments
        else jnp.zeros((B, T), jnp.int32)
    )
    pattern = dataclasses.replace(
        mask, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None
    )
    L = T // n
    scale = D**-0.5 if scale is None else float(scale)
    q_spec = sharding.logical_to_spec(("batch", "length", "activation_heads", "head_dim"), rules)
    use_splash = _use_splash(local_kernel, mask, strategy=strategy, T=T, L=L, interpret=interpret,
                             alibi=alibi_slopes is not None)  # fmt: skip
    if use_splash:
        heads = q_spec[2]
        heads = (heads,) if isinstance(heads, str) else (heads or ())
        kernel = kernels.splash_kernel(
            pattern, heads=H // int(np.prod([mesh.shape[a] for a in heads])), T=T, S=T,
            softcap=softcap, q_seq_shards=n, rows=LayoutRows(balance, n, T), interpret=interpret,
        )  # fmt: skip
        return _all_gather_splash(kernel, q, k, v, mask.has_segments, segments, scale=scale,
                                  mesh=mesh, rules=rules, axis=axis)  # fmt: skip
    b, table, counts = plan_tables(pattern, strategy=strategy, balance=balance, n=n, T=T,
                                   block=block, packed=packed)  # fmt: skip
    S = T if strategy == "all_gather" else L
    kernel = blockwise._Plan(pattern, scale, softcap or None, S, b, b, (), (0,) * (L // b), 0)
    cp = _CP(kernel, axis, n, _Static(table), _Static(counts))

    kv_spec = sharding.logical_to_spec(
        ("batch", "length", "activation_kv_heads", "head_dim"), rules
    )
    row_spec = sharding.logical_to_spec(("batch", "length"), rules)
    head_spec = P(q_spec[2])

    def local(q, k, v, slopes, positions, segments):
        b_, L_, h, _ = q.shape
        kh = k.shape[2]
        qg = q.reshape(b_, L_, kh, h // kh, D)
        sl = None if slopes is None else slopes.reshape(kh, h // kh)
        if strategy == "all_gather":
            gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
            out = _gathered(cp, qg, gather(k), gather(v), sl, positions, gather(positions),
                            segments, gather(segments))  # fmt: skip
        else:
            out = _ring(cp, qg, k, v, sl, positions, positions, segments, segments)
        return out.reshape(q.shape)

    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            q_spec,
            kv_spec,
            kv_spec,
            None if slopes is None else head_spec,
            row_spec,
            row_spec,
        ),  # fmt: skip
        out_specs=q_spec,
        check_vma=False,
    )
    return run(q, k, v, slopes, positions, segments)


def _use_splash(local_kernel, mask, *, strategy, T, L, interpret, alibi) -> bool:
    """Whether the local kernel is splash (see the module docstring); raises ValueError when
    `local_kernel='splash'` cannot run here, saying why."""
    if local_kernel not in LOCAL_KERNELS:
        raise ValueError(f"local_kernel must be one of {LOCAL_KERNELS}, got {local_kernel!r}.")
    if local_kernel == "blockwise":
        return False
    platform = "tpu" if interpret else jax.default_backend()
    reason = kernels.supports("splash", mask, platform=platform, T=T, S=T, alibi=alibi)
    if strategy != "all_gather":
        reason = (
            "the ring merges hops by a float32 log-sum-exp and differentiates against the "
            "merged one; splash's log-sum-exp output is not differentiable"
        )
    elif reason is None and L % kernels._SPLASH_BLOCK:
        reason = f"splash needs each device's {L} rows to be a multiple of {kernels._SPLASH_BLOCK}"
    if local_kernel == "splash" and reason is not None:
        raise ValueError(f"context-parallel {strategy} cannot run splash: {reason}.")
    return reason is None


def _all_gather_splash(kernel, q, k, v, has_segments, segments, *, scale, mesh, rules, axis):
    """all_gather with splash: each device's queries against the gathered K/V (and segment
    ids), one kernel whose mask tables are split over the query rows by shard_map; the
    gradient of the gather reduce-scatters dK/dV."""
    q_spec = sharding.logical_to_spec(("batch", "length", "activation_heads", "head_dim"), rules)
    kv_spec = sharding.logical_to_spec(
        ("batch", "length", "activation_kv_heads", "head_dim"), rules
    )
    row_spec = sharding.logical_to_spec(("batch", "length"), rules)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, axis)))

    def local(kernel, q, k, v, segments):
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
        q_seg, kv_seg = (segments, gather(segments)) if has_segments else (None, None)
        return kernels.splash_apply(kernel, q, gather(k), gather(v), q_seg, kv_seg, scale)

    specs = (kernel_spec, q_spec, kv_spec, kv_spec, row_spec)
    run = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
    return run(kernel, q, k, v, segments)


__all__ = [
    "LOCAL_KERNELS",
    "STRATEGIES",
    "context_parallel_attention",
    "tiles_per_device",
]
