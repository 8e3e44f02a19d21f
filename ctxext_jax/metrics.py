"""Metrics: `workdir/metrics.jsonl`, TensorBoard event files, a console progress line, MFU."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device, from vendor data sheets (no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best achieved FLOP/s of an n x n float32 matmul on device 0: the CPU stand-in for a
    data-sheet peak (the best of several runs, so a busy moment does not lower the bar)."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for the local device kind."""
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{name} data sheet"
    if jax.default_backend() == "cpu":
        # Forced host devices share the same cores: one measured matmul peak for the whole host.
        return measured_matmul_flops() / jax.device_count(), "measured CPU matmul"
    return 0.0, f"unknown device {kind!r}"


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, float(value), int(step))
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One console line per log step: step, loss, tokens/s, MFU and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start_step, self.start = total_steps, start_step, time.perf_counter()

    def line(self, step: int, scalars: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self.start
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total - step)
        parts = [f"step {step}/{self.total}", f"loss {scalars['loss']:.4f}"]
        if "tokens_per_sec" in scalars:
            parts.append(f"{scalars['tokens_per_sec']:,.0f} tok/s")
        if "mfu" in scalars:
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        parts.append(f"ETA {_clock(eta)}")
        return " | ".join(parts)

    def print(self, step: int, scalars: dict[str, float]) -> None:
        if jax.process_index() == 0:
            print(self.line(step, scalars), file=sys.stdout, flush=True)


def perplexity(mean_loss: float) -> float:
    return float(np.exp(min(mean_loss, 80.0)))
