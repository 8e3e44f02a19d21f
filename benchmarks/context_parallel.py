"""Context parallelism: train-step time and temporary memory per device against the number of
sequence shards, for each strategy (all_gather, ring), at each total length.

    python benchmarks/context_parallel.py                        # CPU, 8 fake devices
    python benchmarks/context_parallel.py --lengths 8192,32768 --shards 1,2,4,8 --json
    python benchmarks/context_parallel.py --model 336m --dtype bfloat16 --lengths 65536  # GPU/TPU

Each row compiles the real train step (model, loss, AdamW) on a mesh with `sequence` = shards
(the other devices unused) and reports the compiled step's temporary memory per device
(`memory_analysis().temp_size_in_bytes`: everything beyond parameters, optimiser state and the
batch) and the median step time over --repeats steps after a warm-up. shards = 1 is the
single-device step (the attention backend `auto` picks). On CPU fake devices share the host's
cores, so step times show the overhead, not a speed-up; memory per device is exact.
--json prints one JSON object per line (strategy, shards, length, temp_bytes_per_device,
step_ms, ...) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# 8 fake CPU devices (the flag only concerns the host platform; GPUs / TPUs are unaffected).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ctxext_jax import sharding  # noqa: E402
from ctxext_jax.config import defaults, validate  # noqa: E402
from ctxext_jax.data import BATCH_KEYS  # noqa: E402
from ctxext_jax.model import ModelConfig  # noqa: E402
from ctxext_jax.optim import OptimConfig  # noqa: E402
from ctxext_jax.train import build_program, device_batch  # noqa: E402

MODELS = {  # d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp_dim
    "small": (128, 2, 8, 4, 16, 512),
    "336m": (1024, 24, 16, 8, 64, 2816),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096", help="comma-separated total lengths T")
    p.add_argument("--shards", default="1,2,4,8", help="comma-separated sequence shard counts")
    p.add_argument("--strategies", default="all_gather,ring")
    p.add_argument("--balance", default="zigzag", choices=["zigzag", "none"])
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--layer-pattern", default="G", help="e.g. LG with --window")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-run", action="store_true", help="compile only: memory, no step time")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # length,shards,strategy
    return p.parse_args(argv)


def _config(args, length, shards, strategy):
    d, layers, heads, kv, hd, mlp = MODELS[args.model]
    c = defaults()
    c.model.update(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                   mlp_dim=mlp, max_position_embeddings=length, dtype=args.dtype,
                   remat=args.remat, layer_pattern=args.layer_pattern, window=args.window,
                   context_parallel=strategy, context_parallel_balance=args.balance)  # fmt: skip
    c.data.seq_len = length
    c.train.batch_size = c.eval.batch_size = 1
    c.optim.warmup_steps = 0
    c.mesh.shape.update(data=1, fsdp=1, tensor=1, sequence=shards)
    return c


def measure(args, length, shards, strategy) -> dict:
    config = _config(args, length, shards, strategy)
    validate(config, num_devices=shards)
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:shards])
    program = build_program(ModelConfig.from_config(config.model),
                            OptimConfig.from_config(config.optim, train_steps=100), mesh,
                            mesh_cfg.rules, grad_accum=1, seed=0)  # fmt: skip
    shapes = {
        k: jax.ShapeDtypeStruct((1, length), jnp.float32 if k == "loss_mask" else jnp.int32,
                                sharding=program.batch_sharding)
        for k in BATCH_KEYS
    }  # fmt: skip
    t0 = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state, shapes).compile()
    row = {
        "strategy": strategy if shards > 1 else "single",
        "shards": shards,
        "length": length,
        "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
        "compile_s": round(time.perf_counter() - t0, 1),
        "step_ms": None,
        "model": args.model,
        "balance": args.balance,
        "platform": jax.devices()[0].platform,
    }
    if not args.no_run:
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, 259, (1, length), dtype=np.int32)
        batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
                 "segment_ids": np.ones((1, length), np.int32),
                 "positions": np.arange(length, dtype=np.int32)[None],
                 "loss_mask": np.ones((1, length), np.float32)}  # fmt: skip
        batch = device_batch(batch, program.batch_sharding)
        state = program.init_state(program.init_params())
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t0) * 1e3)
        row["step_ms"] = round(statistics.median(times), 1)
    return row


def measure_fresh(argv, length, shards, strategy) -> dict:
    """One row in a fresh process, so no compile of an earlier row can affect its figures."""
    command = [sys.executable, __file__, *argv, "--row", f"{length},{shards},{strategy}"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.row:
        length, shards, strategy = args.row.split(",")
        print(json.dumps(measure(args, int(length), int(shards), strategy)))
        return None
    rows = []
    if not args.json:
        print(f"model {args.model}, {args.dtype}, balance {args.balance}, "
              f"{jax.device_count()} x {jax.devices()[0].device_kind}")  # fmt: skip
        print("| strategy | shards | length | temp MiB / device | x shards / single | step ms |")
        print("|---|---:|---:|---:|---:|---:|")
    single = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        for shards in [int(x) for x in args.shards.split(",")]:
            strategies = ["single"] if shards == 1 else args.strategies.split(",")
            for strategy in strategies:
                row = measure_fresh(argv, length, shards, "ring" if shards == 1 else strategy)
                if shards == 1:
                    single[length] = row["temp_bytes_per_device"]
                if length in single:
                    ratio = row["temp_bytes_per_device"] * shards / single[length]
                    row["temp_x_shards_over_single"] = round(ratio, 2)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    ratio = row.get("temp_x_shards_over_single")
                    ratio = "" if ratio is None else f"{ratio:.2f}"
                    step = "" if row["step_ms"] is None else row["step_ms"]
                    mib = row["temp_bytes_per_device"] / 2**20
                    print(f"| {row['strategy']} | {shards} | {length} | {mib:.1f} | {ratio} | "
                          f"{step} |", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
