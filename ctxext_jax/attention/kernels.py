"""Attention backends behind one function, all consuming the same `Mask`.

Shapes: q [B, T, H, D]; k, v [B, S, K, D]; H = K * G (grouped-query attention: q is viewed as
[B, T, K, G, D] and contracted against k / v directly, never repeating K/V).

Logits, in float32: s = scale * q.k; s = softcap * tanh(s / softcap) if softcap; s += bias;
s += -slope_h * (q_pos - k_pos) for ALiBi; masked pairs get probability 0. Query rows with no
visible key (padding, empty documents) return 0.

Backends: `xla` (dense reference with an explicit boolean mask), `blockwise` (pure-JAX flash
attention in blockwise.py, linear memory, skips key blocks the pattern rules out), `cudnn` (GPU,
jax.nn.dot_product_attention), `splash` (TPU, Pallas splash attention). `auto` picks per
platform among the backends that honour the whole pattern; a backend asked for a pattern it
cannot honour raises ValueError, it never drops part of the mask.

On a mesh (`sharding.use_mesh` active), the fused kernels run inside `jax.shard_map` over the
whole mesh (`on_mesh`): each device runs the kernel on its own batch rows and heads, never
replicated (GSPMD cannot partition a Pallas call). xla and blockwise are plain JAX, which GSPMD
partitions along batch and heads by itself. A mesh that shards the length runs context
parallelism instead (context_parallel.py, which the model calls).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import PartitionSpec as P

from ctxext_jax import sharding
from ctxext_jax.attention.blockwise import blockwise_attention
from ctxext_jax.attention.masks import Mask

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
FUSED = ("cudnn", "splash")  # custom calls: run per device under shard_map on a mesh

# CPU: the dense reference only wins for tiny T x S (benchmarks/attention.py: blockwise is
# already ~3x faster at T = S = 512).
_XLA_MAX_ELEMENTS = 1 << 16
# Any platform: a handful of queries (a decode step) over a long cache. The dense [B, H, T, S]
# logits are small, and a blockwise scan over S / block_kv key blocks would launch a chain of
# tiny kernels per layer (the H200 run in benchmarks/results/h200-2026-11-30.log decoded the
# 336M shape at 5.35 ms/token at a 4k context through blockwise, before this rule).
_XLA_MAX_QUERIES = 16
# cudnn: packed documents / per-document positions need a dense [B, 1, T, S] mask through the
# public jax.nn.dot_product_attention (JAX 0.10 and 0.11 take per-row lengths only; cuDNN's
# per-document offsets are reachable only through jax._src). Allowed up to 8192 x 8192 (short
# evaluation windows); longer packed rows run blockwise.
_CUDNN_DENSE_MASK_MAX = 1 << 26
_SPLASH_BLOCK = 128


def supports(
    implementation: str,
    mask: Mask,
    *,
    platform: str,
    T: int | None = None,
    S: int | None = None,
    dtype=None,
    head_dim: int | None = None,
    bias: bool = False,
    alibi: bool = False,
    softcap: bool = False,
) -> str | None:
    """Whether `implementation` can honour this attention on `platform` ('cpu', 'gpu', 'tpu').

    Returns None when supported, else a sentence saying why not. Shape arguments left None are
    not checked.
    """
    if implementation not in IMPLEMENTATIONS:
        return f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
    if implementation in ("auto", "xla", "blockwise"):
        return None
    local = mask.window is not None or mask.chunk is not None
    if implementation == "cudnn":
        if platform != "gpu":
            return f"cudnn runs only on GPU (platform is {platform!r}); use blockwise"
        if mask.chunk is not None:
            return "cuDNN has no chunked-attention mask; use blockwise"
        if mask.sinks and local:
            return "cuDNN has no attention-sink mask; use blockwise"
        if mask.window is not None and not mask.causal:
            return "cuDNN sliding windows are causal only (left window); use blockwise"
        if alibi:
            return "cudnn takes no ALiBi slopes; use blockwise (or pass ALiBi as a dense bias)"
        if softcap:
            return "cuDNN has no logit soft-capping; use blockwise"
        if dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {dtype}"
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            return f"cuDNN needs head_dim a multiple of 8 and <= 256, got {head_dim}"
        if T is not None and S is not None and _needs_dense_mask(mask, T, S):
            if T * S > _CUDNN_DENSE_MASK_MAX:
                return (
                    "cuDNN through jax.nn.dot_product_attention has no per-document offsets, "
                    "so packed documents (segment ids), per-document positions or a query "
                    f"offset need a dense [B, 1, T, S] mask, refused at T x S = {T} x {S} "
                    f"(> {_CUDNN_DENSE_MASK_MAX:,} elements); use blockwise (what auto picks)"
                )
        return None
    # splash
    if platform != "tpu":
        return f"splash runs only on TPU (platform is {platform!r}); use blockwise"
    if bias or alibi:
        return "splash takes no additive bias or ALiBi; use blockwise"
    if T is not None and S is not None and T != S:
        return f"splash is wired for self-attention (T == S), got T={T}, S={S}; use blockwise"
    if mask.q_offset:
        return "splash is wired for self-attention without q_offset; use blockwise"
    if not mask.default_positions:
        if T is not None and not mask.index_aligned(T, S):
            return (
                "splash masks are static on row indices; per-document positions must be one "
                "array shared by q and kv (see Mask.index_aligned)"
            )
        if mask.chunk is not None or (mask.sinks and local):
            return (
                "splash masks are static on row indices and cannot restart chunks or sinks at "
                "each packed document; use blockwise"
            )
    for name, n in (("T", T), ("S", S)):
        if n is not None and n % _SPLASH_BLOCK:
            return f"splash needs {name} a multiple of {_SPLASH_BLOCK}, got {n}"
    return None


def _platform() -> str:
    return jax.default_backend()


def _needs_dense_mask(mask: Mask, T: int, S: int) -> bool:
    """cudnn expresses causal / window natively; segments and shifted positions need a mask."""
    return mask.has_segments or not (mask.default_positions and mask.q_offset == 0 and T == S)


def choose_implementation(
    mask: Mask, *, platform: str, T: int, S: int, dtype, head_dim: int, **features
) -> str:
    """The backend `auto` runs: the fastest one that honours the whole pattern."""
    kw = dict(platform=platform, T=T, S=S, dtype=dtype, head_dim=head_dim, **features)
    if platform == "gpu" and supports("cudnn", mask, **kw) is None:
        if not _needs_dense_mask(mask, T, S):
            return "cudnn"
    if platform == "tpu" and supports("splash", mask, **kw) is None:
        return "splash"
    if (platform == "cpu" and T * S <= _XLA_MAX_ELEMENTS) or T <= _XLA_MAX_QUERIES:
        return "xla"
    return "blockwise"


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Mask,
    bias: Array | None = None,
    alibi_slopes: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str = "auto",
    block_q: int = 512,
    block_kv: int = 512,
) -> Array:
    """Multi-head / grouped-query attention under `mask`.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H = K * G; bias: [B or 1, H or 1, T, S] additive;
    alibi_slopes: [H] (adds -slope * (q_pos - k_pos)); scale defaults to D**-0.5; softcap
    (Gemma 2): logits = softcap * tanh(logits / softcap), before bias. block_q / block_kv are
    the blockwise backend's tile sizes. Returns [B, T, H, D] in q.dtype (softmax in float32).
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q [B, T, H, D] and k, v [B, S, K, D] of equal shape, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}."
        )
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D or H % K:
        raise ValueError(
            f"attention needs matching batch and head_dim and H a multiple of K, got "
            f"q {q.shape}, k {k.shape}."
        )
    mask.validate(B, T, S)
    if bias is not None:
        if bias.ndim != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H):
            raise ValueError(f"bias must be [B or 1, H or 1, T, S], got {bias.shape}.")
        if bias.shape[2:] != (T, S):
            raise ValueError(f"bias must be [B or 1, H or 1, {T}, {S}], got {bias.shape}.")
    if alibi_slopes is not None and alibi_slopes.shape != (H,):
        raise ValueError(f"alibi_slopes must have shape [H] = [{H}], got {alibi_slopes.shape}.")
    scale = D**-0.5 if scale is None else float(scale)
    features = dict(bias=bias is not None, alibi=alibi_slopes is not None, softcap=bool(softcap))
    platform = _platform()
    if implementation == "auto":
        implementation = choose_implementation(
            mask, platform=platform, T=T, S=S, dtype=q.dtype, head_dim=D, **features
        )
    reason = supports(
        implementation, mask, platform=platform, T=T, S=S, dtype=q.dtype, head_dim=D, **features
    )
    if reason is not None:
        raise ValueError(f"attention(implementation={implementation!r}): {reason}.")
    if implementation == "xla":
        return _xla(q, k, v, mask, bias, alibi_slopes, scale, softcap)
    if implementation == "blockwise":
        return blockwise_attention(
            q, k, v, mask, bias, alibi_slopes, scale, softcap, block_q=block_q, block_kv=block_kv
        )
    if implementation == "cudnn":
        kernel = functools.partial(_local_cudnn, scale=scale)
    else:
        kernel = functools.partial(_local_splash, scale=scale, softcap=softcap)
    active = sharding.active_mesh()
    if active is not None and active[0].size > 1:
        mesh, rules = active
        return on_mesh(kernel, q, k, v, mask=mask, bias=bias, mesh=mesh, rules=rules)
    return kernel(q, k, v, mask, bias, None)


def _local_cudnn(q, k, v, mask, bias, alibi_slopes, *, scale):
    del alibi_slopes  # refused by `supports`
    return _cudnn(q, k, v, mask, bias, scale)


def _local_splash(q, k, v, mask, bias, alibi_slopes, *, scale, softcap):
    del bias, alibi_slopes  # refused by `supports`
    return _splash(q, k, v, mask, scale, softcap)


_MASK_ARRAYS = ("q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions")


def on_mesh(kernel, q, k, v, *, mask: Mask, bias=None, alibi_slopes=None, mesh, rules):
    """`kernel(q, k, v, mask, bias, alibi_slopes) -> [b, T, h, D]` run by every device of
    `mesh` on its own batch rows and heads, inside one `jax.shard_map` over the whole mesh.

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask arrays [B or 1, T or S]; bias [B or 1, H or 1,
    T, S]; alibi_slopes [H]. Batch follows the rule for `batch`, heads the rules for
    `activation_heads` / `activation_kv_heads` (which must name the same mesh axes, so each
    device keeps whole GQA groups); a dimension those axes do not divide stays whole on every
    device. Lengths are whole on every device (a length-sharded mesh uses context parallelism).
    Returns [B, T, H, D] sharded as q.
    """
    B, T, H, D = q.shape
    K = k.shape[2]

    def axes(logical, size):
        """The sharded mesh axes the rule for `logical` maps to, if they divide `size`."""
        spec = sharding.logical_to_spec((logical,), rules)[0]
        names = spec if isinstance(spec, tuple) else (() if spec is None else (spec,))
        names = tuple(a for a in names if mesh.shape[a] > 1)
        if not names or size % math.prod(mesh.shape[a] for a in names):
            return None
        return names[0] if len(names) == 1 else names

    batch = axes("batch", B)
    heads = axes("activation_heads", H)
    if heads is None or heads != axes("activation_kv_heads", K):
        heads = None  # q and kv heads must split alike to keep GQA groups on one device
    q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, heads, None)
    arrays = {name: getattr(mask, name) for name in _MASK_ARRAYS}
    arrays = {name: a for name, a in arrays.items() if a is not None}
    specs = {name: P(batch if a.shape[0] == B else None, None) for name, a in arrays.items()}
    extra, extra_specs = {}, {}
    if bias is not None:
        extra["bias"] = bias
        extra_specs["bias"] = P(batch if bias.shape[0] == B else None,
                                heads if bias.shape[1] == H else None, None, None)  # fmt: skip
    if alibi_slopes is not None:
        extra["alibi_slopes"], extra_specs["alibi_slopes"] = alibi_slopes, P(heads)

    def local(q, k, v, arrays, extra):
        local_mask = dataclasses.replace(mask, **arrays)
        return kernel(q, k, v, local_mask, extra.get("bias"), extra.get("alibi_slopes"))

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, specs, extra_specs),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, arrays, extra)


def _xla(q, k, v, mask, bias, alibi_slopes, scale, softcap):
    """Dense reference: the full [B, K, G, T, S] logits with `mask.dense`."""
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    G = H // K
    qg = q.reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        b = bias.astype(jnp.float32)
        s = s + b.reshape(
            b.shape[0], K if b.shape[1] == H else 1, G if b.shape[1] == H else 1, T, S
        )
    q_pos, kv_pos = mask.positions(T, S)
    if alibi_slopes is not None:
        dist = (q_pos[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)  # [B|1, T, S]
        slopes = alibi_slopes.astype(jnp.float32).reshape(K, G)
        s = s - slopes[None, :, :, None, None] * dist[:, None, None]
    keep = mask.dense(T, S)[:, None, None]  # [B|1, 1, 1, T, S]
    s = jnp.where(keep, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows: avoid -inf - -inf
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(B, T, H, D).astype(q.dtype)


def _cudnn(q, k, v, mask, bias, scale, *, dpa_implementation="cudnn"):
    """jax.nn.dot_product_attention(implementation="cudnn").

    Causal and sliding-window patterns go through is_causal / local_window_size, so cuDNN skips
    the masked tiles. Segment ids and shifted or per-document positions have no native argument
    in jax.nn.dot_product_attention (JAX 0.10/0.11), so they are passed as an explicit
    [B, 1, T, S] boolean mask: exact, at the cost of T x S mask memory (auto prefers blockwise
    then). Query rows with no visible key are zeroed afterwards (cuDNN would average them).
    dpa_implementation="xla" runs the same translation through JAX's XLA path (CPU tests).
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    if _needs_dense_mask(mask, T, S):
        keep = mask.dense(T, S)  # [B|1, T, S]
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=keep[:, None], scale=scale, implementation=dpa_implementation
        )
        return jnp.where(jnp.any(keep, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        scale=scale,
        is_causal=mask.causal,
        local_window_size=window,
        implementation=dpa_implementation,
    ).astype(q.dtype)


def _splash_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class PatternMask(sm._ComputableMask):
        """Our static pattern evaluated inside the splash kernel on row indices; `rows` maps a
        row index to the global row it holds (context parallelism's layouts), None: itself."""

        def __init__(self, shape: tuple[int, int], pattern: Mask, rows=None):
            self.pattern, self.rows = pattern, rows
            to_row = rows or (lambda r: r)
            super().__init__(
                shape=shape, mask_function=lambda qi, ki: pattern.allowed(to_row(qi), to_row(ki))
            )

        def __eq__(self, other):
            return (
                isinstance(other, type(self))
                and self.shape == other.shape
                and self.pattern == other.pattern
                and self.rows == other.rows
            )

        def __hash__(self):
            return hash((type(self), self.shape, self.pattern, self.rows))

    return PatternMask, sm.MultiHeadMask


def splash_pattern_mask(mask: Mask, T: int, S: int, rows=None):
    """The splash 2-D mask for `mask`'s static pattern: a lazily computed [T, S] mask.

    Segment ids travel separately as splash SegmentIds; positions are row indices (splash only
    runs index-aligned self-attention, see `supports`), mapped to global rows by `rows`.
    """
    PatternMask, _ = _splash_mask_class()
    static = dataclasses.replace(
        mask, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None
    )
    return PatternMask((T, S), static, rows)


def splash_kernel(mask: Mask, *, heads: int, T: int, S: int, softcap=None, q_seq_shards=1,
                  rows=None, interpret=False):  # fmt: skip
    """A splash MHA kernel for `mask`'s static pattern over [T, S] rows (`rows`: see
    `splash_pattern_mask`). q_seq_shards > 1 splits its mask tables over query rows, for
    `shard_map` with `kernel.manual_sharding_spec` (context parallelism's all_gather)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, MultiHeadMask = _splash_mask_class()
    pattern = splash_pattern_mask(mask, T, S, rows)
    # The largest tile dividing each device's rows (a multiple of _SPLASH_BLOCK, see
    # `supports`): splash requires every block size to divide the sequence length.
    block = next(b for b in (512, 256, _SPLASH_BLOCK) if (T // q_seq_shards) % b == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        MultiHeadMask([pattern] * heads),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap or None,
        head_shards=1,
        q_seq_shards=q_seq_shards,
        interpret=interpret,
    )


def splash_apply(kernel, q, k, v, q_seg, kv_seg, scale):
    """q [B, T, H, D], k, v [B, S, K, D], segment ids [B, T] / [B, S] or None -> [B, T, H, D]:
    one kernel call per batch row (vmap), heads-first as splash wants, q pre-scaled."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, D], splash does not scale
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
    if q_seg is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        seg = splash.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
        out = jax.vmap(kernel)(qh, kh, vh, segment_ids=seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _splash(q, k, v, mask, scale, softcap, *, interpret=False):
    """Pallas splash attention (TPU), one kernel per batch row via vmap. interpret=True runs
    the Pallas interpreter (CPU tests)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    kernel = splash_kernel(mask, heads=H, T=T, S=S, softcap=softcap, interpret=interpret)
    q_seg = kv_seg = None
    if mask.has_segments:
        q_seg = jnp.broadcast_to(mask.q_segment_ids, (B, T))
        kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (B, S))
    return splash_apply(kernel, q, k, v, q_seg, kv_seg, scale)
