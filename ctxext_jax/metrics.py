"""Metrics: `workdir/metrics.jsonl`, TensorBoard event files, a console progress line, MFU."""

from __future__ import annotations

import functools
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


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for the local device kind; measured (on CPU) once
    per process, not once per run or stage."""
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

    def drop_after(self, step: int) -> None:
        """Removes rows past `step` (a resumed run repeats the steps after its checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by a kill
        if len(kept) != len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            if np.isfinite(value):  # a skipped step's NaN stays in metrics.jsonl only
                self.tensorboard.add_scalar(name, float(value), int(step))
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` ([] without one), less a line cut off by a kill."""
    path, rows = os.path.join(workdir, "metrics.jsonl"), []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The console line of a long loop: what is done, and the ETA from the rate so far.

    Training prints one line per log step (`step`): `step 120/300 | loss 1.9 | 10,500 tok/s |
    MFU 14.2% | ETA 0:00:31`, on process 0. Evaluation advances by work units (`advance`) and
    rewrites its line in place on a terminal, every `every_s` seconds otherwise.
    """

    def __init__(self, total: int, *, done: int = 0, label: str = "eval", stream=None,
                 every_s: float = 5.0):  # fmt: skip
        self.total, self.done, self.first, self.label = max(total, 1), done, done, label
        self.stream = stream or sys.stdout
        self.start = self.last = time.perf_counter()
        self.every_s = every_s
        self.tty = self.stream.isatty()

    def eta(self) -> float:
        """Seconds left at the rate since the start (0 before any progress)."""
        done = self.done - self.first
        return (time.perf_counter() - self.start) / done * (self.total - self.done) if done else 0

    def step(self, step: int, scalars: dict[str, float]) -> str:
        """Records training step `step` and prints (process 0) and returns its line."""
        self.done = step
        parts = [f"step {step}/{self.total}", f"loss {scalars['loss']:.4f}"]
        if "tokens_per_sec" in scalars:
            parts.append(f"{scalars['tokens_per_sec']:,.0f} tok/s")
        if "mfu" in scalars:
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        if scalars.get("skipped_steps"):
            parts.append(f"{int(scalars['skipped_steps'])} skipped")
        parts.append(f"ETA {_clock(self.eta())}")
        line = " | ".join(parts)
        if jax.process_index() == 0:
            print(line, file=self.stream, flush=True)
        return line

    def advance(self, units: int, note: str) -> None:
        """Adds `units` of work done; prints when due (always at the end)."""
        self.done = min(self.done + units, self.total)
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        line = (
            f"{self.label} {100 * self.done / self.total:5.1f}% | {note} | "
            f"elapsed {now - self.start:6.1f}s | ETA {self.eta():6.1f}s"
        )
        end = "\n" if not self.tty or self.done >= self.total else ""
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


class StepLog:
    """The training loop's bookkeeping. Each step's metrics reach the non-finite guard (anything
    with `update(step, metrics)` and `skipped`) one step late, so that reading them does not
    stall the device; every `log_every`-th step's and the stage's last go to metrics.jsonl,
    TensorBoard and the progress line, with the throughput (timed from the end of the first,
    compiling step, evaluation time left out) and MFU."""

    def __init__(self, writer: MetricsWriter, guard, progress: Progress, *, last: int,
                 log_every: int, start_step: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops_per_device: float):  # fmt: skip
        self.writer, self.guard, self.progress = writer, guard, progress
        self.last, self.log_every = last, log_every
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops = peak_flops_per_device * jax.device_count()
        self.clock, self.clock_step = None, start_step
        self.pending = None  # the previous step's metrics, checked once the next is dispatched
        self.final: dict[str, float] = {}  # the last logged metrics and evaluations

    def step(self, step: int, metrics) -> None:
        """Takes step `step`'s metrics (device arrays) right after it was dispatched."""
        if self.pending is not None:
            self.guard.update(*self.pending)
        self.pending = (step, metrics)
        if self.clock is None:  # the first step compiles; time from its end
            jax.block_until_ready(metrics)
            self.clock, self.clock_step = time.perf_counter(), step
        if step % self.log_every == 0 or step == self.last:
            self._write(step, jax.device_get(metrics))

    def _write(self, step: int, metrics) -> None:
        self.guard.update(step, metrics)
        self.pending = None
        scalars = {k: float(v) for k, v in metrics.items() if k not in ("tokens", "nonfinite")}
        scalars["skipped_steps"] = self.guard.skipped
        if step > self.clock_step:
            elapsed = time.perf_counter() - self.clock
            tokens_per_sec = (step - self.clock_step) * self.tokens_per_step / elapsed
            scalars["tokens_per_sec"] = tokens_per_sec
            if self.peak_flops:
                scalars["mfu"] = tokens_per_sec * self.flops_per_token / self.peak_flops
        self.writer.write(step, scalars)
        self.progress.step(step, scalars)
        self.clock, self.clock_step, self.final = time.perf_counter(), step, scalars

    def evaluations(self, step: int, results: dict[str, float]) -> None:
        """Records evaluation results at `step` (and restarts the throughput clock after them)."""
        if results:
            self.writer.write(step, results)
            self.final.update(results)
            self.clock, self.clock_step = time.perf_counter(), step

    def finish(self) -> None:
        """Checks the last step's metrics when they were not logged."""
        if self.pending is not None:
            self.guard.update(*self.pending)
            self.pending = None


def perplexity(mean_loss: float) -> float:
    return float(np.exp(min(mean_loss, 80.0)))
