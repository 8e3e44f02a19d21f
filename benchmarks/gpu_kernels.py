"""GPU attention kernels against the dense reference, and packed-document kernels timed.

    python benchmarks/gpu_kernels.py --out cp.jsonl           # on a GPU
    SMOKE=1 python benchmarks/gpu_kernels.py --out cp.jsonl   # CPU: tiny shapes, the
                                                              # cudnn translation through XLA

Correctness (one JSON line per case, `kind: "check"`): bf16 inputs, forward and the gradients
of sum(out * w) for q, k, v, each as max |got - want| / max |want| against `xla` on the same
inputs upcast to float32 (tolerance 2e-2, DESIGN.md's bf16 bound):
- `cudnn` through `attention()`: causal, sliding window, GQA; packed documents (segment ids
  and per-document positions: the dense-mask path, short lengths only).
- `blockwise` on the packed documents (the kernel `auto` picks for packed rows on GPU).
- probes of the two packed-document kernels JAX ships outside its public API surface, for the
  choice of the GPU path: cuDNN's ragged layout (`jax._src.cudnn` `dot_product_attention` with
  per-document `q_offsets` / `q_seqlen`, SM90+) and the Pallas Triton kernel
  (`jax.experimental.pallas.ops.gpu.attention.mha` with segment ids, K/V repeated per group).

Timing (`kind: "time"`): forward + backward of the same packed-document attention at
--lengths, median of --repeats after a warm-up, per kernel, and cuDNN plain causal (one
document per row: the bound a packed kernel can approach).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from ctxext_jax.attention import Mask, attention, kernels

SMOKE = os.environ.get("SMOKE") == "1"
ON_GPU = jax.default_backend() == "gpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSON lines here (and print them)")
    p.add_argument("--lengths", default="256" if SMOKE else "8192,32768")
    p.add_argument("--check-length", type=int, default=256 if SMOKE else 1024)
    p.add_argument("--heads", default="4,2,16" if SMOKE else "16,4,64", help="H,K,D")
    p.add_argument("--repeats", type=int, default=1 if SMOKE else 3)
    return p.parse_args(argv)


def emit(args, row):
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def documents(T: int, B: int, seed: int):
    """Cut points of packed documents per row (lengths 1/16 .. 1/3 of T, the last may be short)
    -> (segment_ids [B, T], positions [B, T], starts list per row)."""
    rng = np.random.default_rng(seed)
    seg, pos, starts = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), []
    for b in range(B):
        cuts, at = [0], 0
        while at < T:
            at = min(T, at + int(rng.integers(max(1, T // 16), max(2, T // 3))))
            cuts.append(at)
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            seg[b, lo:hi], pos[b, lo:hi] = i + 1, np.arange(hi - lo)
        starts.append(cuts)
    return seg, pos, starts


def inputs(B, T, H, K, D, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, D), jnp.bfloat16)
    w = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
    return q, k, v, w


def value_and_grads(fn, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return jax.jit(fn)(q, k, v), grads


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


# ---------------------------------------------------------------------------------------------
# The kernels: the library's backends and the two packed-document probes.
# ---------------------------------------------------------------------------------------------


def library(implementation, mask):
    if implementation == "cudnn" and not ON_GPU:  # CPU smoke: the same translation through XLA
        return lambda q, k, v: kernels._cudnn(q, k, v, mask, None, q.shape[-1] ** -0.5,
                                              dpa_implementation="xla")  # fmt: skip
    return lambda q, k, v: attention(q, k, v, mask=mask, implementation=implementation)


def cudnn_ragged(starts, T):
    """cuDNN's ragged (packed) layout: per-document offsets and lengths, causal within each."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    M = max(len(c) - 1 for c in starts)
    offsets = np.full((len(starts), M + 1), -1, np.int32)
    lengths = np.full((len(starts), M), -1, np.int32)
    for b, cuts in enumerate(starts):
        offsets[b, : len(cuts) - 1] = cuts[:-1]
        lengths[b, : len(cuts) - 1] = np.diff(cuts)
    offsets, lengths = jnp.asarray(offsets), jnp.asarray(lengths)

    def fn(q, k, v):
        return dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                     scale=q.shape[-1] ** -0.5,
                                     mask_type=MaskType.PADDING_CAUSAL)  # fmt: skip

    return fn


def pallas_triton(segment_ids):
    """Pallas (Triton) flash attention with segment ids; K/V repeated to the query heads."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    seg = jnp.asarray(segment_ids)

    def fn(q, k, v):
        G = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        return pallas_attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True,
                                    interpret=not ON_GPU)  # fmt: skip

    return fn


def packed_mask(seg, pos):
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    return Mask(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)


# ---------------------------------------------------------------------------------------------


def checks(args):
    H, K, D = (int(x) for x in args.heads.split(","))
    B, T = 2, args.check_length
    q, k, v, w = inputs(B, T, H, K, D, seed=0)
    seg, pos, starts = documents(T, B, seed=1)
    packed = packed_mask(seg, pos)
    cases = {
        "cudnn causal": (library("cudnn", Mask()), Mask()),
        "cudnn window": (library("cudnn", Mask(window=T // 4)), Mask(window=T // 4)),
        "cudnn packed (dense mask)": (library("cudnn", packed), packed),
        "blockwise packed": (library("blockwise", packed), packed),
        "probe cudnn ragged packed": (lambda *a: cudnn_ragged(starts, T)(*a), packed),
        "probe pallas triton packed": (lambda *a: pallas_triton(seg)(*a), packed),
    }
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for name, (fn, mask) in cases.items():
        row = {"kind": "check", "case": name, "B": B, "T": T, "H": H, "K": K, "D": D,
               "platform": jax.default_backend()}  # fmt: skip
        try:
            want_o, want_g = value_and_grads(
                lambda q, k, v, mask=mask: attention(q, k, v, mask=mask, implementation="xla"),
                *f32, w,
            )  # fmt: skip
            got_o, got_g = value_and_grads(fn, q, k, v, w)
            errs = {"out": rel_err(got_o, want_o)}
            errs.update(
                {f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", got_g, want_g, strict=True)}
            )
            row.update(errors=errs, ok=bool(max(errs.values()) <= 2e-2))
        except Exception as e:  # noqa: BLE001 (report and go on to the next case)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc()
        emit(args, row)


def timings(args):
    H, K, D = (int(x) for x in args.heads.split(","))
    for T in (int(x) for x in args.lengths.split(",")):
        q, k, v, w = inputs(1, T, H, K, D, seed=2)
        seg, pos, starts = documents(T, 1, seed=3)
        packed = packed_mask(seg, pos)
        kernels_ = {
            "blockwise packed": functools.partial(library, "blockwise", packed),
            "probe cudnn ragged packed": functools.partial(cudnn_ragged, starts, T),
            "probe pallas triton packed": functools.partial(pallas_triton, seg),
            "cudnn causal (one document)": functools.partial(library, "cudnn", Mask()),
        }
        for name, make in kernels_.items():
            row = {"kind": "time", "case": name, "T": T, "H": H, "K": K, "D": D,
                   "documents": len(starts[0]) - 1, "platform": jax.default_backend()}  # fmt: skip
            try:
                fn = make()
                loss = lambda q, k, v, fn=fn, w=w: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
                step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                jax.block_until_ready(step(q, k, v))
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(step(q, k, v))
                    times.append((time.perf_counter() - t0) * 1e3)
                row.update(fwd_bwd_ms=round(statistics.median(times), 2), ok=True)
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            emit(args, row)


def main(argv=None):
    args = parse_args(argv)
    checks(args)
    timings(args)


if __name__ == "__main__":
    main()
