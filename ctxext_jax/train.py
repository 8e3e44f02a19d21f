"""Continued (long-document) pretraining: `python -m ctxext_jax.train --config configs/x.py`.

    python -m ctxext_jax.train --config configs/tiny.py --workdir runs/tiny
    python -m ctxext_jax.train --config configs/tiny.py:extend --workdir runs/tiny-4x \\
        --config.checkpoint.init_from=runs/tiny

Restarting the same command resumes from the latest checkpoint in `workdir`.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ctxext_jax import checkpoint, data, sharding
from ctxext_jax.config import ConfigError, validate
from ctxext_jax.metrics import MetricsWriter, Progress, peak_flops_per_device, perplexity
from ctxext_jax.model import Decoder, ModelConfig, flops_per_token, param_axes, param_count
from ctxext_jax.optim import OptimConfig, learning_rate_schedule, make_optimizer
from ctxext_jax.steps import BATCH_KEYS, make_apply, make_eval_step, make_train_step


def build_model(model_cfg: ModelConfig, mesh, rules, *, seed: int):
    """-> (apply, abstract params with shardings, jitted init). Nothing is materialised yet."""
    abstract_model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = sharding.tree_shardings(param_axes(abstract_state), mesh, rules)
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        shardings,
    )

    def init():
        return nnx.to_pure_dict(nnx.state(Decoder(model_cfg, rngs=nnx.Rngs(seed))))

    init = jax.jit(init, out_shardings=shardings)
    return make_apply(graphdef, abstract_state), abstract_params, init


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


def device_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over the batch axes of the mesh."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
        for k in BATCH_KEYS
    }


def evaluate_loss(eval_step, params, data_cfg, eval_cfg, seq_len, batch_sharding) -> dict:
    total, count = 0.0, 0.0
    for batch in data.eval_batches(
        data_cfg, batch_size=eval_cfg.batch_size // jax.process_count(), seq_len=seq_len,
        max_batches=eval_cfg.batches,
    ):  # fmt: skip
        batch_total, batch_count = eval_step(params, device_batch(batch, batch_sharding))
        total, count = total + float(batch_total), count + float(batch_count)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss), "eval_tokens": count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final metrics."""
    validate(config)
    t, seq_len = config.train, config.data.seq_len
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ----------------------------------------------------------------------- mesh
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)

    # ----------------------------------------------------------------------- data
    data_cfg = data.DataConfig.from_config(config.data)
    train_iter = data.train_iterator(
        data_cfg, global_batch_size=t.batch_size, seq_len=seq_len, seed=config.data.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    )  # fmt: skip

    # ----------------------------------------------------------------------- model
    model_cfg = ModelConfig.from_config(config.model)
    apply, abstract_params, init_params = build_model(model_cfg, mesh, rules, seed=t.seed)
    optim_cfg = OptimConfig.from_config(config.optim, total_steps=t.steps)
    tx = make_optimizer(optim_cfg)

    # ----------------------------------------------------------------------- shard
    shardings = state_shardings(abstract_params, tx, mesh)

    def init_state(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    init_state = jax.jit(init_state, out_shardings=shardings, donate_argnums=0)
    abstract_state = jax.eval_shape(init_state, abstract_params)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )

    # ----------------------------------------------------------------------- step
    with sharding.use_mesh(mesh, rules):
        train_step = jax.jit(
            make_train_step(
                apply, tx, grad_accum=t.grad_accum, learning_rate=learning_rate_schedule(optim_cfg)
            ),  # fmt: skip
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(
            make_eval_step(apply), in_shardings=(shardings["params"], batch_sharding)
        )

    # ----------------------------------------------------------------------- checkpoint
    ckpt = checkpoint.Checkpointer(
        workdir, every=config.checkpoint.every, keep=config.checkpoint.keep
    )
    model_json = model_cfg.to_json()
    if ckpt.latest_step() is not None:
        state, train_iter = ckpt.restore(abstract_state, train_iter)
        print(f"resumed from step {int(state['step'])} in {ckpt.directory}", flush=True)
    elif config.checkpoint.init_from:
        source = checkpoint.resolve_init_from(config.checkpoint.init_from)
        checkpoint.check_compatible(checkpoint.read_model_json(source), model_cfg)
        state = init_state(checkpoint.load_params(source, abstract_params))
        print(f"initialised weights from {source}", flush=True)
    else:
        state = init_state(init_params())
    start_step = int(state["step"])

    # ----------------------------------------------------------------------- loop
    writer = MetricsWriter(workdir)
    peak, peak_source = peak_flops_per_device()
    flops_token = flops_per_token(model_cfg, seq_len)
    if start_step == 0:
        print(
            f"model: {param_count(abstract_params) / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
            f"{t.batch_size}x{seq_len} tokens/step | peak {peak / 1e12:.2f} TFLOP/s/device "
            f"({peak_source})",
            flush=True,
        )
    progress, last_time, last_step, window_tokens = (
        Progress(t.steps, start_step),
        None,
        start_step,
        0.0,
    )
    final: dict[str, float] = {}
    for step in range(start_step + 1, t.steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = device_batch(next(train_iter), batch_sharding)
            state, metrics = train_step(state, batch)
        if last_time is None:  # the first step compiles; time from its end
            jax.block_until_ready(metrics)
            last_time, last_step = time.perf_counter(), step
        window_tokens += t.batch_size * seq_len
        if step % t.log_every == 0 or step == t.steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - last_time
            scalars = {k: float(v) for k, v in metrics.items() if k != "tokens"}
            if step > last_step:
                tokens_per_sec = (step - last_step) * t.batch_size * seq_len / elapsed
                scalars["tokens_per_sec"] = tokens_per_sec
                if peak:
                    scalars["mfu"] = tokens_per_sec * flops_token / (peak * jax.device_count())
            writer.write(step, scalars)
            progress.print(step, scalars)
            last_time, last_step, final = time.perf_counter(), step, scalars
        if step % config.eval.every == 0 or step == t.steps:
            eval_metrics = evaluate_loss(
                eval_step, state["params"], data_cfg, config.eval, seq_len, batch_sharding
            )
            writer.write(step, eval_metrics)
            print(f"eval step {step}: loss {eval_metrics['eval_loss']:.4f} | "
                  f"perplexity {eval_metrics['eval_perplexity']:.3f}", flush=True)  # fmt: skip
            final.update(eval_metrics)
            last_time = time.perf_counter()
        ckpt.save(step, state, train_iter, config_json=config.to_json_best_effort(),
                  model_json=model_json, force=step == t.steps)  # fmt: skip
    ckpt.close()
    writer.close()
    return final


# --------------------------------------------------------------------------- main
_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/x.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "jax.distributed.initialize(): 'auto' when a cluster is detected (Cloud TPU, SLURM, "
    "JAX_COORDINATOR_ADDRESS).",
)  # fmt: skip


def _wants_distributed() -> bool:
    if _DISTRIBUTED.value != "auto":
        return _DISTRIBUTED.value == "yes"
    return any(
        v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_ID")
    )


def main(argv):
    del argv
    if _wants_distributed():
        jax.distributed.initialize()
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Config, data and checkpoint mistakes carry their own fix; no traceback for those.
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
