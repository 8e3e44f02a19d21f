"""Continued (long-document) pretraining: `python -m ctxext_jax.train --config configs/x.py`.

    python -m ctxext_jax.train --config configs/tiny.py --workdir runs/tiny
    python -m ctxext_jax.train --config configs/tiny.py:extend --workdir runs/tiny-4x \\
        --config.checkpoint.init_from=runs/tiny

Restarting the same command resumes from the latest checkpoint in `workdir`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ctxext_jax import checkpoint, data, hf, sharding, stages
from ctxext_jax.cli import exit_on_user_error, parse_flags
from ctxext_jax.config import trajectory_changes, validate
from ctxext_jax.data.pose import PoseConfig
from ctxext_jax.divergence import NonFiniteGuard
from ctxext_jax.errors import fail
from ctxext_jax.evals import long_eval_subset
from ctxext_jax.metrics import (
    MetricsWriter,
    Progress,
    StepLog,
    peak_flops_per_device,
    perplexity,
)
from ctxext_jax.model import ModelConfig, flops_per_token, param_count
from ctxext_jax.optim import OptimConfig, learning_rate_schedule, make_optimizer
from ctxext_jax.steps import build_model, make_eval_step, make_train_step


def state_shardings(abstract_params, tx, mesh):
    """Optimizer moments mirror their parameters' shardings; counters are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}


class Program(NamedTuple):
    """The jitted functions of a run on one mesh, and the shapes and shardings they use."""

    apply: Callable  # (params, tokens, positions=, segment_ids=) -> logits
    abstract_params: Any  # ShapeDtypeStructs with shardings
    abstract_state: Any
    init_params: Callable  # () -> params, random init, sharded
    init_state: Callable  # params -> train state (donates params)
    train_step: Callable  # (state, batch) -> (state, metrics), donates state
    eval_step: Callable  # (params, batch) -> (loss sums [S], token counts [S]) per source
    batch_sharding: jax.sharding.NamedSharding


@functools.lru_cache(maxsize=8)
def build_program(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh, rules, *,
                  grad_accum: int, seed: int, num_sources: int = 1) -> Program:  # fmt: skip
    """Model, optimizer, shardings and the jitted step functions for `mesh`. Kept per argument
    values, so that training the same program again in one process (a run resumed in place,
    stages that keep the model and optimizer) reuses its compiled steps."""
    apply, abstract_params, init_params = build_model(model_cfg, mesh, rules, seed=seed)
    tx = make_optimizer(optim_cfg)
    shardings = state_shardings(abstract_params, tx, mesh)
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)

    def init_state(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    init_state = jax.jit(init_state, out_shardings=shardings, donate_argnums=0)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_state, abstract_params),
        shardings,
    )
    train_step = make_train_step(
        apply, tx, grad_accum=grad_accum, learning_rate=learning_rate_schedule(optim_cfg)
    )
    train_step = jax.jit(
        sharding.under_mesh(train_step, mesh, rules),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        sharding.under_mesh(make_eval_step(apply, num_sources), mesh, rules),
        in_shardings=(shardings["params"], batch_sharding),
    )
    return Program(apply, abstract_params, abstract_state, init_params, init_state, train_step,
                   eval_step, batch_sharding)  # fmt: skip


def device_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over the batch axes of the mesh."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
        for k in data.BATCH_KEYS
        if k in batch
    }


def evaluate_loss(program: Program, params, data_cfg, eval_cfg, seq_len: int) -> dict:
    """Validation loss on `eval.batches` held-out batches (a shuffled sample of the whole
    split, or of every source of a mixture), overall and per source (`eval_loss/<name>`)."""
    names = data_cfg.source_names
    totals, counts = np.zeros(len(names)), np.zeros(len(names))
    for batch in data.eval_batches(
        data_cfg, batch_size=eval_cfg.batch_size // jax.process_count(), seq_len=seq_len,
        max_batches=eval_cfg.batches, shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    ):  # fmt: skip
        batch_totals, batch_counts = program.eval_step(
            params, device_batch(batch, program.batch_sharding)
        )
        totals, counts = totals + np.asarray(batch_totals), counts + np.asarray(batch_counts)
    loss = float(totals.sum() / max(counts.sum(), 1.0))
    out = {
        "eval_loss": loss,
        "eval_perplexity": perplexity(loss),
        "eval_tokens": float(counts.sum()),
    }
    if data_cfg.mixture:
        for name, total, count in zip(names, totals, counts, strict=True):
            out[f"eval_loss/{name}"] = float(total / max(count, 1.0))
    return out


class Preemption:
    """SIGTERM (what Cloud TPU, SLURM and Kubernetes send) or SIGINT asks the run to stop: the
    trainer finishes the step, saves it on every host and exits 0. With several processes, JAX's
    preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM itself and
    picks the step every host stops at (`reached_preemption_sync_point`); SIGINT is turned into
    a SIGTERM to take the same path. One process stops after the step it is in.

    start_step: the step the run continues from. The sync manager counts steps from 0 until
    told otherwise, so a notice that came while a resumed run restored and compiled would pick
    step 1, which that run never reaches; told the start, it stops after the first step."""

    def __init__(self, start_step: int = 0):
        self.multiprocess = jax.process_count() > 1
        self.requested = False
        signals = [signal.SIGINT] if self.multiprocess else [signal.SIGTERM, signal.SIGINT]
        self.previous = {s: signal.signal(s, self._handle) for s in signals}
        if self.multiprocess:
            multihost_utils.reached_preemption_sync_point(start_step)

    def _handle(self, signum, frame):
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # to the sync manager's handler
        self.requested = True

    def reached(self, step: int) -> bool:
        """True at the step where every host stops (call it at every step, on every host)."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def make_workdir(workdir: str) -> None:
    """Creates `workdir`, or raises ValueError saying why it cannot be one."""
    if "://" in workdir:
        # Metrics, TensorBoard and the checkpoint paths go through the local filesystem API.
        raise ValueError(
            f"--workdir {workdir}: URLs are not supported; mount the bucket (e.g. gcsfuse) or "
            "use a shared filesystem path."
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file; give a directory (new or a run's).")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot create it ({e}).") from None


def preflight(config: ml_collections.ConfigDict) -> None:
    """The checks that read files, run after `validate` and before anything is built: the data
    and tokenizer (`data.preflight`) and the `checkpoint.init_from` source."""
    report = data.preflight(
        data.DataConfig.from_config(config.data),
        vocab_size=config.model.vocab_size,
        hosts=jax.process_count(),
    )
    if report["undecodable"] and jax.process_index() == 0:
        print(
            f"warning: data.on_undecodable: {report['undecodable']} of {report['documents']} "
            f"scanned documents hold bytes that are not UTF-8 (the first in "
            f"{report['first_undecodable']}); they are read with U+FFFD replacements ('refuse' "
            "stops instead).",
            file=sys.stderr,
            flush=True,
        )
    if config.checkpoint.init_from:
        checkpoint.check_init_from(config.checkpoint.init_from)


def check_resume(config, saved: dict, workdir: str, step: int, allow_change: bool) -> None:
    """Refuses to resume with a config that changes the training trajectory (ConfigError naming
    the keys), unless `allow_change`: then the change is printed and appended to
    `workdir/config_changes.jsonl`."""
    changes = trajectory_changes(saved, config)
    if not changes:
        return
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
    if not allow_change:
        fail(
            ", ".join(changes),
            f"the checkpoint at step {step} in {workdir} was trained with other values "
            f"({listing}), which change the training trajectory. Resume with the saved values, "
            "start a new --workdir (checkpoint.init_from=<this run> takes its weights), or pass "
            "--allow_config_change to continue with the change (it is recorded in the run); to "
            "train longer on the same schedule set optim.decay_steps to the old length.",
        )
    print(f"warning: resuming step {step} with a changed config (--allow_config_change): "
          f"{listing}", file=sys.stderr, flush=True)  # fmt: skip
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
            record = {"step": step, "time": time.time(), "changes": changes}
            f.write(json.dumps(record, default=str) + "\n")


def initial_state(program: Program, ckpt: checkpoint.Checkpointer, train_iter, model_cfg,
                  config, *, restore_data: bool = True):  # fmt: skip
    """-> (state, train_iter): resumed from `ckpt`'s latest step (its data state too unless
    `restore_data` is False: a stage boundary, where the next stage's data starts afresh), else
    the weights of `checkpoint.init_from` (a run or a Hugging Face folder) with a fresh
    optimizer, else a random init."""
    if ckpt.latest_step() is not None:
        state, restored = ckpt.restore(program.abstract_state, train_iter if restore_data else None)
        print(f"resumed from step {int(state['step'])} in {ckpt.directory}", flush=True)
        return state, restored if restore_data else train_iter
    init_from = config.checkpoint.init_from
    if not init_from:
        return program.init_state(program.init_params()), train_iter
    if hf.is_hf_folder(init_from):  # a Hugging Face folder: config.json + safetensors
        checkpoint.check_compatible(hf.model_json(init_from), model_cfg)
        params = hf.load_params(init_from, program.abstract_params)
    else:
        init_from = checkpoint.resolve_init_from(init_from)
        checkpoint.check_compatible(checkpoint.read_model_json(init_from), model_cfg)
        params = checkpoint.load_params(init_from, program.abstract_params)
    print(f"initialised weights from {init_from}", flush=True)
    return program.init_state(params), train_iter


def evaluate_at(step: int, config, program: Program, params, data_cfg, tokenizer, *,
                last: int | None = None) -> dict:  # fmt: skip
    """The evaluations due at `step` (validation loss, the long-context subset), printed;
    `last` (default train.steps) is the last step of the stage, which is always evaluated."""
    t, e, seq_len = config.train, config.eval, config.data.seq_len
    last = t.steps if last is None else last
    results: dict[str, float] = {}
    if step % e.every == 0 or step == last:
        metrics = evaluate_loss(program, params, data_cfg, e, seq_len)
        per_source = "".join(
            f" | {k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items()
            if k.startswith("eval_loss/")
        )  # fmt: skip
        print(f"eval step {step}: loss {metrics['eval_loss']:.4f} | "
              f"perplexity {metrics['eval_perplexity']:.3f}{per_source}", flush=True)  # fmt: skip
        results.update(metrics)
    if e.every_long and (step % e.every_long == 0 or step == last):
        metrics = long_eval_subset(
            program.apply, params, tokenizer=tokenizer, data_cfg=data_cfg,
            lengths=list(e.long_lengths) or [2 * seq_len, 4 * seq_len],
            passkey_trials=e.long_passkey_trials, seed=t.seed,
            batch_sharding=program.batch_sharding,
        )  # fmt: skip
        print(f"long eval step {step}: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
              flush=True)  # fmt: skip
        results.update(metrics)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:  # fmt: skip
    """Trains (or resumes) the run in `workdir` through its stages (`train.stages`; the whole
    run is one stage without them); returns the final metrics.
    allow_config_change: resume even if the config changes the trajectory (recorded)."""
    for warning in validate(config):
        if jax.process_index() == 0:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    make_workdir(workdir)
    plan = stages.plan_stages(config)
    checked = set()
    for stage in plan:  # every stage's data (a stage may change the mixture or the tasks)
        key = stage.config.data.to_json_best_effort()
        if key not in checked:
            checked.add(key)
            preflight(stage.config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ----------------------------------------------------------------------- mesh
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules

    # ----------------------------------------------------------------------- checkpoint
    ckpt = checkpoint.Checkpointer(
        workdir, every=config.checkpoint.every, keep=config.checkpoint.keep
    )
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.saved_config(latest)
        if saved is not None:
            check_resume(config, saved, workdir, latest, allow_config_change)

    # ----------------------------------------------------------------------- stages
    writer = MetricsWriter(workdir)
    writer.drop_after(latest or 0)  # rows a killed run logged past its last checkpoint
    preemption = Preemption(start_step=latest or 0)
    state, final = None, {}
    try:  # an error below still lets the checkpoint writes in flight finish
        for stage in plan:
            if latest is not None and latest >= stage.end and stage is not plan[-1]:
                continue  # finished before the restart
            state, final, preempted = train_stage(
                config, stage, len(plan), state, ckpt, writer, preemption, mesh, rules,
                resume_boundary=latest == stage.start and stage.index > 0,
            )  # fmt: skip
            if preempted:
                break
    finally:
        ckpt.close()  # waits for the last save
        preemption.close()
        writer.close()
    return final


def train_stage(run_config, stage: stages.Stage, num_stages: int, state, ckpt, writer,
                preemption: Preemption, mesh, rules, *, resume_boundary: bool):  # fmt: skip
    """Runs one stage's steps (stage.start + 1 .. stage.end). `state` is the previous stage's,
    or None to resume from `ckpt` (without its data state at a stage boundary) or initialise.
    -> (state, final metrics, preempted)."""
    config, t = stage.config, stage.config.train
    seq_len = config.data.seq_len

    # ----------------------------------------------------------------------- data
    data_cfg = data.DataConfig.from_config(config.data)
    tokenizer = data.make_tokenizer(data_cfg.tokenizer)
    train_iter = data.global_train_iterator(
        data_cfg, global_batch_size=t.batch_size, seq_len=seq_len, seed=config.data.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        pose=PoseConfig.from_config(t.pose),
    )  # fmt: skip

    # ----------------------------------------------------------------------- model, shard, step
    model_cfg = ModelConfig.from_config(config.model)
    optim_cfg = OptimConfig.from_config(config.optim, train_steps=t.steps, start_step=stage.start)
    program = build_program(model_cfg, optim_cfg, mesh, rules, grad_accum=t.grad_accum,
                            seed=t.seed, num_sources=len(data_cfg.source_names))  # fmt: skip
    if state is None:
        state, train_iter = initial_state(program, ckpt, train_iter, model_cfg, config,
                                          restore_data=not resume_boundary)  # fmt: skip
    start_step = max(int(state["step"]), stage.start)

    # ----------------------------------------------------------------------- loop
    peak, peak_source = peak_flops_per_device()
    if start_step == stage.start:
        label = f"stage {stage.index + 1}/{num_stages}: " if num_stages > 1 else ""
        print(f"{label}model: {param_count(program.abstract_params) / 1e6:.2f}M params | mesh "
              f"{dict(mesh.shape)} | {t.batch_size}x{seq_len} tokens/step | peak "
              f"{peak / 1e12:.2f} TFLOP/s/device ({peak_source})", flush=True)  # fmt: skip
    guard = NonFiniteGuard(t.max_nonfinite, lr=config.optim.lr, dtype=model_cfg.dtype,
                           latest_saved=ckpt.latest_step)  # fmt: skip
    log = StepLog(writer, guard, Progress(run_config.train.steps, done=start_step),
                  last=stage.end, log_every=t.log_every, start_step=start_step,
                  tokens_per_step=t.batch_size * seq_len,
                  flops_per_token=flops_per_token(model_cfg, seq_len),
                  peak_flops_per_device=peak)  # fmt: skip
    for step in range(start_step + 1, stage.end + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = device_batch(next(train_iter), program.batch_sharding)
            state, metrics = program.train_step(state, batch)
        log.step(step, metrics)
        log.evaluations(step, evaluate_at(step, config, program, state["params"], data_cfg,
                                          tokenizer, last=stage.end))  # fmt: skip
        preempted = preemption.reached(step)  # on every host, at every step
        ckpt.save(step, state, train_iter, config_json=run_config.to_json_best_effort(),
                  model_json=model_cfg.to_json(),
                  force=step == stage.end or preempted)  # fmt: skip
        if preempted:
            if jax.process_index() == 0:
                print(f"preempted: saving step {step}; rerun the same command to resume",
                      flush=True)  # fmt: skip
            return state, log.final, True
    log.finish()
    return state, log.final, False


# --------------------------------------------------------------------------- main
_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/x.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Call jax.distributed.initialize(): 'auto' does when a cluster is detected (Cloud TPU pod, "
    "SLURM) or --coordinator_address / JAX_COORDINATOR_ADDRESS is given.",
)  # fmt: skip
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where no cluster manager tells it."
)
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if the config changes the training trajectory (schedule, optimizer, batch, "
    "data, model); the change is recorded in workdir/config_changes.jsonl.",
)  # fmt: skip
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")


def initialize_distributed() -> None:
    """Joins the multi-process job (every host runs this same program: SPMD)."""
    cluster = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")
    wanted = _DISTRIBUTED.value == "yes" or (
        _DISTRIBUTED.value == "auto"
        and (_COORDINATOR.value or any(v in os.environ for v in cluster))
    )
    if not wanted:
        return
    # CPU processes (tests, laptops) talk over gloo; GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    with exit_on_user_error():
        train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CHANGE.value)  # fmt: skip


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
