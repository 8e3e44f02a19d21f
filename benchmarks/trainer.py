"""Where the trainer's time goes on a small model, per step: the input pipeline alone, the jitted
train step alone, the step fed by the pipeline, and the whole trainer (`train_and_evaluate`).

    python benchmarks/trainer.py                                    # the study's base shape
    python benchmarks/trainer.py --config configs/study.py:default --batch 32
    python benchmarks/trainer.py --config configs/tiny.py --steps 20

A study config (`configs/study.py:<variant>`) is read through its `base` run config (its
mixture, without a curriculum's stages). The parts
run in interleaved rounds (`--rounds`), so a shared machine's load falls on each alike; a row
gives the median over rounds of wall ms/step, of this process's CPU ms/step (all its threads:
XLA's and Grain's) and the tokens/s of the wall time. The trainer row is one fresh run of
`--steps` + 1 steps (its first step compiles and is not timed; no evaluation, no checkpoint
but the last) and reports the trainer's own logged tokens/s. On a loaded machine compare the
rows of one table, never figures of two runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax

from ctxext_jax import data, sharding, sweep
from ctxext_jax.cli import exit_on_user_error
from ctxext_jax.data.pose import PoseConfig
from ctxext_jax.model import ModelConfig
from ctxext_jax.optim import OptimConfig
from ctxext_jax.train import build_program, device_batch, train_and_evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study.py:short",
                   help="configs/x.py[:variant]; a study config's `base` run")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="train.batch_size (default: config)")
    p.add_argument("--seq_len", type=int, default=None, help="data.seq_len (default: config)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per part and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the parts")
    p.add_argument("--no_trainer", action="store_true", help="skip the train_and_evaluate row")
    return p.parse_args(argv)


def load_run_config(spec: str):
    with exit_on_user_error():
        config = sweep.load_config(spec)
    config = config.base if "base" in config else config
    # One shape and one mixture (the run config's own): a curriculum's stages are not timed.
    config.train.stages = ()
    return config


def timed(fn, steps: int) -> tuple[float, float]:
    """-> (wall, CPU) seconds per step of fn(), which runs `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def trainer_tokens_per_sec(config, steps: int) -> float:
    """The trainer's logged tokens/s over steps 2 .. steps + 1 of a fresh run."""
    config = config.copy_and_resolve_references()
    config.train.update(steps=steps + 1, log_every=steps + 1)
    config.checkpoint.update(every=10**9)
    config.eval.update(every=10**9, every_long=0)
    workdir = tempfile.mkdtemp(prefix="bench_trainer_")
    try:
        return train_and_evaluate(config, workdir)["tokens_per_sec"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    config = load_run_config(args.config)
    if args.batch:
        config.train.batch_size = args.batch
    if args.seq_len:
        config.data.seq_len = config.model.max_position_embeddings = args.seq_len
    t, seq_len, n = config.train, config.data.seq_len, args.steps
    tokens = t.batch_size * seq_len

    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg)
    data_cfg = data.DataConfig.from_config(config.data)
    program = build_program(
        ModelConfig.from_config(config.model),
        OptimConfig.from_config(config.optim, train_steps=t.steps),
        mesh, mesh_cfg.rules, grad_accum=t.grad_accum, seed=t.seed,
        num_sources=len(data_cfg.source_names),
    )  # fmt: skip
    clock = time.perf_counter()
    batches = data.global_train_iterator(
        data_cfg, global_batch_size=t.batch_size, seq_len=seq_len, seed=config.data.seed,
        pose=PoseConfig.from_config(t.pose),
    )  # fmt: skip
    first = next(batches)
    pipeline_start_s = time.perf_counter() - clock
    state = program.init_state(program.init_params())
    clock = time.perf_counter()
    state, metrics = program.train_step(state, device_batch(first, program.batch_sharding))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - clock

    # Grain reads ahead (a few batches per stream) while the steps run: the pipeline part reads
    # many more batches than that, so what it times is the reading, not the read-ahead buffer.
    pipeline_batches = 20 * n

    def pipeline():
        for _ in range(pipeline_batches):
            next(batches)

    def step_alone(held):
        def run():
            nonlocal state
            for batch in held:
                state, out = program.train_step(state, device_batch(batch, program.batch_sharding))
            jax.block_until_ready(out)

        return run

    def step_with_pipeline():
        nonlocal state
        for _ in range(n):
            state, out = program.train_step(
                state, device_batch(next(batches), program.batch_sharding)
            )
        jax.block_until_ready(out)

    rows = {"input pipeline alone": [], "train step alone (batches in memory)": [],
            "train step fed by the pipeline": []}  # fmt: skip
    for _ in range(args.rounds):
        held = [next(batches) for _ in range(n)]
        rows["input pipeline alone"].append(timed(pipeline, pipeline_batches))
        rows["train step alone (batches in memory)"].append(timed(step_alone(held), n))
        rows["train step fed by the pipeline"].append(timed(step_with_pipeline, n))
    del state
    trainer = None if args.no_trainer else trainer_tokens_per_sec(config, n * args.rounds)

    print(f"{args.config}: {ModelConfig.from_config(config.model).n_layers} layers, "
          f"d {config.model.d_model}, batch {t.batch_size} x {seq_len} tokens, "
          f"{len(batches.streams)} data streams; step compile {compile_s:.1f} s, pipeline "
          f"start {pipeline_start_s:.1f} s; {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}")  # fmt: skip
    print("| part | wall ms/step | CPU ms/step | tokens/s |")
    print("|---|---|---|---|")
    for name, times in rows.items():
        wall = statistics.median(w for w, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(f"| {name} | {1e3 * wall:.1f} | {1e3 * cpu:.1f} | {tokens / wall:,.0f} |")
    if trainer is not None:
        print(f"| train_and_evaluate (its logged figure) | {1e3 * tokens / trainer:.1f} | - | "
              f"{trainer:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
