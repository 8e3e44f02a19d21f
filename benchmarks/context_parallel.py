"""Context parallelism: train-step time and memory per device against the number of sequence
shards, for each strategy (all_gather, ring), at each total length; and the longest length
that trains per device count.

    python benchmarks/context_parallel.py                        # CPU, 8 fake devices
    python benchmarks/context_parallel.py --lengths 8192,32768 --shards 1,2,4,8 --json
    python benchmarks/context_parallel.py --model 336m --lengths 65536 --shards 1  # GPU/TPU
    python benchmarks/context_parallel.py --model 336m --remat full --shards 1,8 \\
        --find-max-length --json                                 # the longest trainable T

Each row compiles the real train step (model, loss, AdamW) on a mesh with `sequence` = shards
(the other devices unused) and reports the compiled step's memory per device
(`memory_analysis()`: temp = everything beyond parameters, optimiser state and the batch;
peak = argument + output - alias + temp) and the median step time over --repeats steps after a
warm-up. shards = 1 is the single-device step (the kernel --attention-impl names; `auto` picks
per platform). On CPU fake devices share the host's cores, so step times show the overhead,
not a speed-up; memory per device is exact. --json prints one JSON object per line (strategy,
shards, length, temp_bytes_per_device, step_ms, ...) instead of the table.

--find-max-length: per shard count and strategy, the longest length (a multiple of
--length-step) whose compiled step fits --device-memory GiB per device (default: the device's
allocator limit). Peak memory is linear in T for the linear-memory kernels, so two compiles
(--probe-lengths) fit the line and one compile at the predicted length checks it (if it does
not fit, the search bisects below it; if the line says the next step would fit too, it walks
up), then one real step at the found length confirms it and gives its time (`--no-run`:
compile only). A length the kernel refuses (cudnn's dense-mask limit) counts as not fitting.
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
from shapes import SHAPES  # noqa: E402

from ctxext_jax import sharding  # noqa: E402
from ctxext_jax.config import ConfigError, defaults, validate  # noqa: E402
from ctxext_jax.data import BATCH_KEYS  # noqa: E402
from ctxext_jax.model import REMAT_POLICIES, ModelConfig  # noqa: E402
from ctxext_jax.optim import OptimConfig  # noqa: E402
from ctxext_jax.train import build_program, device_batch  # noqa: E402

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096", help="comma-separated total lengths T")
    p.add_argument("--shards", default="1,2,4,8", help="comma-separated sequence shard counts")
    p.add_argument("--strategies", default="all_gather,ring")
    p.add_argument("--balance", default="zigzag", choices=["zigzag", "none"])
    p.add_argument("--model", default="small", choices=sorted(SHAPES), help="benchmarks/shapes.py")
    p.add_argument("--layer-pattern", default="G", help="e.g. LG with --window")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the shape's)")  # fmt: skip
    p.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES))
    p.add_argument("--attention-impl", default="auto", help="model.attention_impl")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-run", action="store_true", help="compile only: memory, no step time")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--find-max-length",
        action="store_true",
        help="the longest length whose step fits --device-memory, per shard count",
    )
    p.add_argument(
        "--device-memory",
        type=float,
        default=None,
        help="GiB per device for --find-max-length (default: the allocator limit)",
    )
    p.add_argument(
        "--length-step", type=int, default=4096, help="--find-max-length searches multiples of this"
    )
    p.add_argument(
        "--probe-lengths",
        default="8192,32768",
        help="two lengths (per shard) whose peak memory fits the line",
    )
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # length,shards,strategy
    return p.parse_args(argv)


def _config(args, length, shards, strategy):
    c = defaults()
    c.model.update(SHAPES[args.model])
    c.model.update(max_position_embeddings=length, remat=args.remat,
                   layer_pattern=args.layer_pattern, window=args.window,
                   attention_impl=args.attention_impl, context_parallel=strategy,
                   context_parallel_balance=args.balance)  # fmt: skip
    if args.dtype:
        c.model.dtype = args.dtype
    c.data.seq_len = length
    c.train.batch_size = c.eval.batch_size = 1
    c.optim.warmup_steps = 0
    c.mesh.shape.update(data=1, fsdp=1, tensor=1, sequence=shards)
    return c


def compile_step(args, length, shards, strategy):
    """-> (row with the compiled memory, compiled step, program)."""
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
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)  # fmt: skip
    row = {
        "strategy": strategy if shards > 1 else "single",
        "shards": shards,
        "length": length,
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "peak_bytes_per_device": int(peak),
        "compile_s": round(time.perf_counter() - t0, 1),
        "step_ms": None,
        "model": args.model,
        "remat": args.remat,
        "attention_impl": args.attention_impl,
        "balance": args.balance,
        "platform": jax.devices()[0].platform,
        "device": jax.devices()[0].device_kind,
    }
    return row, compiled, program


def run_step(args, row, compiled, program, length) -> dict:
    """Times --repeats steps after a warm-up; adds step_ms and tokens_per_sec to `row`."""
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
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) * 1e3)
    row["step_ms"] = round(statistics.median(times), 1)
    row["tokens_per_sec"] = round(length / (row["step_ms"] / 1e3), 1)
    row["loss"] = float(metrics["loss"])
    del state
    return row


def measure(args, length, shards, strategy) -> dict:
    row, compiled, program = compile_step(args, length, shards, strategy)
    return row if args.no_run else run_step(args, row, compiled, program, length)


def measure_fresh(argv, length, shards, strategy) -> dict:
    """One row in a fresh process, so no compile of an earlier row can affect its figures."""
    command = [sys.executable, __file__, *argv, "--row", f"{length},{shards},{strategy}"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# --find-max-length
# ---------------------------------------------------------------------------------------------


def device_memory_bytes(args) -> int:
    if args.device_memory is not None:
        return int(args.device_memory * GiB)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise SystemExit(
            "--find-max-length: this device reports no memory limit (CPU); pass --device-memory "
            "GiB per device."
        )
    return int(stats["bytes_limit"])


def find_max_length(args, shards: int, strategy: str, budget: int) -> dict:
    """The longest multiple of --length-step (and of the layout's chunk count) whose compiled
    step's peak per device fits `budget`; see the module docstring. With --json each compile
    prints a `probe` line as it finishes, so a run cut short still leaves its figures."""
    unit = args.length_step
    parts = shards * (2 if args.balance == "zigzag" and shards > 1 else 1)
    if unit % parts:
        raise SystemExit(f"--length-step {unit} must be a multiple of {parts} for {shards} shards")
    probes = {}  # length -> peak bytes (None: refused by validate / the kernel)
    last = {}  # the latest fitting compile, reused for the confirming step

    def peak(length):
        if length not in probes:
            probe = {
                "kind": "probe",
                "strategy": strategy if shards > 1 else "single",
                "shards": shards,
                "length": length,
                "attention_impl": args.attention_impl,
            }
            try:
                row, compiled, program = compile_step(args, length, shards, strategy)
                probes[length] = row["peak_bytes_per_device"]
                probe.update(peak_bytes_per_device=probes[length], compile_s=row["compile_s"])
                if probes[length] <= budget and length >= last.get("length", 0):
                    last.update(length=length, row=row, compiled=compiled, program=program)
            except (ConfigError, ValueError) as e:  # the kernel refuses this length
                probes[length] = None
                probe["refused"] = str(e)[:300]
            print(json.dumps(probe) if args.json else f"  {probe}", flush=True)
        return probes[length]

    def fits(length):
        p = peak(length)
        return p is not None and p <= budget

    def predict(lo, hi):
        """The length where the line through lo's peak and hi's (else the nearest other known
        peak) reaches the budget (a secant step), floored to the unit; None without a line."""
        if hi is not None and probes[hi] is None:
            return None  # refused above: bisect
        other = hi
        if other is None:
            known = [n for n, p in probes.items() if p is not None and n != lo]
            if not known:
                return None
            other = min(known, key=lambda n: abs(n - lo))
        slope = (probes[other] - probes[lo]) / (other - lo)
        return None if slope <= 0 else int(lo + (budget - probes[lo]) / slope) // unit * unit

    lo, hi = 0, None  # the longest length that fits; the shortest that does not
    for n in sorted({max(unit, int(x) * shards // unit * unit)
                     for x in args.probe_lengths.split(",")}):  # fmt: skip
        if hi is None and fits(n):
            lo = n
        elif hi is None:
            hi = n
    trusted = False  # the line, not a compile, says lo + unit does not fit
    while hi is None or hi - lo > unit:
        guess = predict(lo, hi) if lo else None
        if guess is None or guess in probes:
            guess = (lo + hi) // 2 // unit * unit if hi else 2 * max(lo, unit)
        guess = max(lo + unit, guess if hi is None else min(hi - unit, guess))
        if fits(guess):
            lo = guess
            nxt = predict(lo, hi)
            if nxt is not None and nxt < lo + unit:
                hi, trusted = lo + unit, True  # the line says the next step exceeds the budget
        else:
            hi = guess
    result = {
        "kind": "max_length",
        "strategy": strategy if shards > 1 else "single",
        "shards": shards,
        "max_length": lo,
        "budget_bytes_per_device": budget,
        "compiles": len(probes),
        "next_step_by_line": trusted,
        "model": args.model,
        "remat": args.remat,
        "attention_impl": args.attention_impl,
    }
    if lo == 0:
        return result
    if last.get("length") != lo:
        row, compiled, program = compile_step(args, lo, shards, strategy)
    else:
        row, compiled, program = last["row"], last["compiled"], last["program"]
    result.update(peak_bytes_per_device=row["peak_bytes_per_device"], device=row["device"])
    if not args.no_run:
        try:
            run_step(args, row, compiled, program, lo)
            result.update(step_ms=row["step_ms"], tokens_per_sec=row["tokens_per_sec"],
                          loss=row["loss"], ran=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 (report an OOM at run time, do not hide it)
            result.update(ran=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.row:
        length, shards, strategy = args.row.split(",")
        print(json.dumps(measure(args, int(length), int(shards), strategy)))
        return None
    shard_counts = [int(x) for x in args.shards.split(",")]
    if args.find_max_length:
        budget = device_memory_bytes(args)
        rows = []
        for shards in shard_counts:
            for strategy in ["ring"] if shards == 1 else args.strategies.split(","):
                row = find_max_length(args, shards, strategy, budget)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    step = row.get("step_ms", "")
                    print(f"{row['strategy']} x{shards}: max length {row['max_length']} "
                          f"within {budget / GiB:.1f} GiB per device ({row['compiles']} "
                          f"compiles) step {step} ms", flush=True)  # fmt: skip
        return rows
    rows = []
    if not args.json:
        dtype = args.dtype or SHAPES[args.model].get("dtype")
        print(f"model {args.model}, {dtype}, remat {args.remat}, balance {args.balance}, "
              f"{jax.device_count()} x {jax.devices()[0].device_kind}")  # fmt: skip
        print("| strategy | shards | length | temp MiB / device | x shards / single | step ms |")
        print("|---|---:|---:|---:|---:|---:|")
    single = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        for shards in shard_counts:
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
