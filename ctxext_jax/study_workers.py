"""The study's (seed, arm) jobs in parallel worker processes, each pinned to its share of the
host's CPU cores (`study.workers`).

XLA:CPU keeps two cores only ~60% busy on the study's small model (its ops are too small to
split well), so two single-core processes train ~1.2x more tokens per second than one process
on both cores (benchmark in the README, Does it work?). A job waits for what it needs (an arm
that starts from the base run waits for that run); among the jobs ready to run, the longest go
first (the base runs, then the arms trained from scratch, then fine-tunes, then evaluations).
Each job's output goes to WORKDIR/seed<s>/<arm>/study.log; the terminal shows when each starts
and ends. SIGTERM or Ctrl-C reaches every worker, which saves its checkpoint (as a single run
does): the same command continues the study.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ctxext_jax.errors import ConfigError

LOG_FILE = "study.log"


def log_path(workdir: str, seed: int, name: str) -> str:
    return os.path.join(workdir, f"seed{seed}", name, LOG_FILE)


def _init_worker(shares, cache_dir: str | None) -> None:
    """Pins this worker to its cores before JAX starts (XLA:CPU sizes its thread pool from the
    cores it may use) and points it at the parent's compilation cache."""
    cores = shares.get()
    if cores:
        os.sched_setaffinity(0, cores)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards it as SIGTERM
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@contextlib.contextmanager
def _output_to(path: str):
    """Sends this process's stdout and stderr (file descriptors 1 and 2) to `path`."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def _run_job(config, seed: int, name: str, workdir: str):
    from ctxext_jax import study

    path = log_path(workdir, seed, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _output_to(path):
        return study.study_arm(config, name, seed, workdir)


def run_jobs(config, workdir: str, jobs: list[tuple[int, str]], *, workers: int) -> dict:
    """Runs every (seed, arm) job of `jobs` with `study.study_arm` in `workers` processes.
    -> {(seed, arm): study_arm's result}."""
    import jax

    if jax.default_backend() != "cpu":
        raise ConfigError(
            f"study.workers={workers}: worker processes share this host's CPU cores; on a "
            f"{jax.default_backend()} host they would share one accelerator. Set "
            "--config.study.workers=1."
        )
    arms = config.arms

    def needs(job):  # an arm that starts from the base run (when the study trains it here)
        seed, name = job
        base = (seed, "base")
        return [base] if name != "base" and arms[name].init == "base" and base in jobs else []

    def order(job):  # the longest first: base runs, runs from scratch, fine-tunes, evaluations
        seed, name = job
        arm = arms[name]
        kind = 0 if name == "base" else 1 if arm.init == "scratch" else 2 if arm.train else 3
        return kind, seed

    workers = min(workers, len(jobs))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    context = multiprocessing.get_context("spawn")  # a fresh JAX per worker, never a fork
    shares = context.Queue()
    for i in range(workers):
        shares.put(cores[i::workers] if len(cores) >= workers else [])
    pending, running, done = sorted(jobs, key=order), {}, {}
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(shares, jax.config.jax_compilation_cache_dir))  # fmt: skip

    def stop_workers(signum=None, frame=None):
        for process in list(pool._processes.values()):  # noqa: SLF001 (no public handle)
            if process.is_alive():
                process.terminate()  # SIGTERM: the trainer saves and stops

    previous = signal.signal(signal.SIGTERM, stop_workers)
    failure = None
    try:
        while (pending and failure is None) or running:
            ready = [job for job in pending if all(d in done for d in needs(job))]
            for job in ready[: workers - len(running)] if failure is None else []:
                pending.remove(job)
                running[pool.submit(_run_job, config, *job, workdir)] = (job, time.perf_counter())
                print(f"== seed {job[0]}: {job[1]} started (log: {log_path(workdir, *job)})",
                      flush=True)  # fmt: skip
            try:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop_workers()
                failure = failure or KeyboardInterrupt()
                continue
            for future in finished:
                job, started = running.pop(future)
                error = future.exception()
                if error is None:
                    done[job] = future.result()
                    print(f"== seed {job[0]}: {job[1]} done ({time.perf_counter() - started:.0f}"
                          " s)", flush=True)  # fmt: skip
                elif failure is None:
                    failure = error
                    print(f"== seed {job[0]}: {job[1]} failed (log: {log_path(workdir, *job)})",
                          flush=True)  # fmt: skip
                    stop_workers()
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.shutdown(wait=True, cancel_futures=True)
    if isinstance(failure, (SystemExit, KeyboardInterrupt)):
        print("stopped: the workers saved their checkpoints; rerun the same command to "
              "continue the study", flush=True)  # fmt: skip
        raise SystemExit(0)  # as the one-process study stops on SIGTERM / Ctrl-C
    if failure is not None:
        raise failure
    return done
