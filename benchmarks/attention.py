"""Time and memory of each attention backend per length, forward and forward+backward.

    python benchmarks/attention.py                                   # CPU defaults, < 2 min
    python benchmarks/attention.py --lengths 4096,16384,65536 --dtype bfloat16 \
        --impls xla,blockwise,cudnn --window 4096                    # GPU

Prints a markdown table: median wall time over --repeats runs after one warm-up call
(block_until_ready), the compiled temp memory (`memory_analysis().temp_size_in_bytes`, what the
kernel needs beyond its inputs and outputs) and, on GPU/TPU, the device's peak bytes in use so
far: JAX has no public way to reset that peak, so it is the running maximum over the rows above
(a row's own peak only where the figure rises); the temp columns are per row.
A backend that refuses the pattern (see `supports`) gets a row saying why.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from ctxext_jax.attention import IMPLEMENTATIONS, Mask, attention, supports


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048", help="comma-separated T (= S)")
    p.add_argument("--impls", default=None, help="comma-separated; default: all for the platform")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads K (H %% K == 0)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--window", type=int, default=None, help="sliding window w")
    p.add_argument("--chunk", type=int, default=None, help="chunk size c")
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--block", type=int, default=512, help="blockwise block_q = block_kv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    return p.parse_args(argv)


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (compiled already; first-run effects)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def measure(impl, T, mask, args):
    """One row: {'fwd ms', 'fwd+bwd ms', 'fwd temp MiB', 'fwd+bwd temp MiB', 'peak so far MiB'}."""
    B, H, K, D = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, D), dtype)
    k = jax.random.normal(keys[1], (B, T, K, D), dtype)
    v = jax.random.normal(keys[2], (B, T, K, D), dtype)
    kw = dict(mask=mask, implementation=impl, block_q=args.block, block_kv=args.block)

    def fwd(q, k, v):
        return attention(q, k, v, **kw)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: attention(q, k, v, **kw).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    row = {}
    passes = [("fwd", fwd)] + ([] if args.no_backward else [("fwd+bwd", fwd_bwd)])
    for name, fn in passes:
        compiled = jax.jit(fn).lower(q, k, v).compile()
        mem = compiled.memory_analysis()
        row[f"{name} temp MiB"] = None if mem is None else mem.temp_size_in_bytes / 2**20
        row[f"{name} ms"] = _median_ms(compiled, (q, k, v), args.repeats)
    row["peak so far MiB"] = _peak_mib()
    return row


def _fmt(x):
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def main(argv=None):
    args = parse_args(argv)
    platform = jax.default_backend()
    impls = args.impls.split(",") if args.impls else [i for i in IMPLEMENTATIONS if i != "auto"]
    mask = Mask(causal=not args.non_causal, window=args.window, chunk=args.chunk, sinks=args.sinks)
    cols = ["fwd ms", "fwd+bwd ms", "fwd temp MiB", "fwd+bwd temp MiB", "peak so far MiB"]
    print(
        f"device: {jax.devices()[0].device_kind} ({platform}); B={args.batch} H={args.heads} "
        f"K={args.kv_heads} D={args.head_dim} {args.dtype}; mask: causal={mask.causal} "
        f"window={mask.window} chunk={mask.chunk} sinks={mask.sinks}\n"
    )
    print("| backend | T | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for T in (int(n) for n in args.lengths.split(",")):
        for impl in impls:
            reason = supports(
                impl, mask, platform=platform, T=T, S=T, dtype=args.dtype, head_dim=args.head_dim
            )
            if reason is not None:
                print(f"| {impl} | {T} | refused: {reason} |" + " |" * (len(cols) - 1))
                continue
            row = measure(impl, T, mask, args)
            print(f"| {impl} | {T} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
