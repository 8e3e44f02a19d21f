"""The Optax chain from config: AdamW, warmup then cosine / linear decay, clipping, accumulation."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float
    total_steps: int
    start_step: int = 0  # the schedule starts here (a later stage of train.stages)

    @classmethod
    def from_config(cls, optim_cfg, *, train_steps: int, start_step: int = 0) -> OptimConfig:
        """The schedule spans `optim.decay_steps`, or the whole run (stage) when that is 0; a
        warmup that is not shorter than it is clipped to its length - 1."""
        values = optim_cfg.to_dict()
        total_steps = values.pop("decay_steps") or train_steps
        # A warmup as long as the schedule is clipped (validate warns): the peak is reached.
        values["warmup_steps"] = min(values["warmup_steps"], max(total_steps - 1, 0))
        return cls(**values, total_steps=total_steps, start_step=start_step)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * min_lr_ratio`."""
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    schedule = optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    if not cfg.start_step:
        return schedule
    return lambda count: schedule(count - cfg.start_step)


NO_DECAY = frozenset({"scale", "bq", "bk", "bv"})


def _decay_mask(params):
    """Weight decay on weight matrices and embeddings, not on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY, params
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW at the learning rate held in the state's hyperparameters,
    which the train step sets from the step number (`with_learning_rate`) before each update.
    So the schedule follows the step shown in the metrics, also after skipped (non-finite)
    steps, whose update is dropped while Adam's moments and bias-correction count stay as they
    were (optax.apply_if_finite keeps those the same way, but its schedule would fall one step
    behind per skip). Gradient accumulation is done in the train step itself (a scan over
    micro-batches), so the optimizer always sees one averaged gradient per step."""

    def clipped_adamw(learning_rate):
        parts = []
        if cfg.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip))
        parts.append(
            optax.adamw(
                learning_rate,
                b1=cfg.b1,
                b2=cfg.b2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                mask=_decay_mask,
            )
        )
        return optax.chain(*parts)

    return optax.inject_hyperparams(clipped_adamw)(learning_rate=cfg.lr)


def with_learning_rate(opt_state, learning_rate: jax.Array):
    """`make_optimizer`'s state with the learning rate of its next update set."""
    current = opt_state.hyperparams["learning_rate"]
    hyperparams = {**opt_state.hyperparams, "learning_rate": learning_rate.astype(current.dtype)}
    return opt_state._replace(hyperparams=hyperparams)
