"""Staged schedules (`train.stages`): one run, one checkpoint lineage, several training stages.

The ProLong / Qwen2.5-1M progressive recipe trains at 1x, then 2x, then 4x the context with
RoPE theta raised at each step up. A stage is a dict with its `steps` and any of the keys in
`STAGE_KEYS`, which replace the run config's values for that stage:

    c.train.stages = (
        dict(steps=300, seq_len=256),
        dict(steps=100, seq_len=512, batch_size=8, rope={"rope_type": "default",
             "rope_theta": 40000.0}, lr=1e-3, warmup_steps=10),
        dict(steps=100, seq_len=1024, batch_size=4, rope={"rope_type": "default",
             "rope_theta": 160000.0}, lr=1e-3, warmup_steps=10),
    )

Steps count globally (stage 2 above runs steps 301..400); each stage's learning-rate schedule
(warmup, decay) restarts at its first step and spans its own steps; `train.steps` must equal
the sum. A stage that sets `seq_len` but not `max_position_embeddings` trains for that
length. Each stage draws its data with `data.seed + stage index`. The trainer saves at every
stage end, and a restart resumes exactly inside whichever stage it stopped in.
"""

from __future__ import annotations

import dataclasses

import ml_collections

# stage key -> (config group, field)
STAGE_KEYS = {
    "seq_len": ("data", "seq_len"),
    "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "pose": ("train", "pose"),
    "rope": ("model", "rope"),
    "max_position_embeddings": ("model", "max_position_embeddings"),
    "window": ("model", "window"),
    "sinks": ("model", "sinks"),
    "mixture": ("data", "mixture"),
    "task": ("data", "task"),
    "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"),
    "schedule": ("optim", "schedule"),
    "min_lr_ratio": ("optim", "min_lr_ratio"),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """Stage `index` runs global steps start + 1 .. end with `config` (no stages in it)."""

    index: int
    config: ml_collections.ConfigDict
    start: int
    end: int


def _as_dict(value) -> dict:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def plan_stages(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of a run; a run without `train.stages` is one stage of `train.steps`.
    Raises ValueError naming the stage and key for a bad stage."""
    stages = list(config.train.get("stages", ()) or ())
    base = ml_collections.ConfigDict(config.to_dict())
    base.train.stages = ()
    if not stages:
        return [Stage(0, base, 0, config.train.steps)]
    plan, start = [], 0
    for index, raw in enumerate(stages):
        stage = _as_dict(raw)
        where = f"train.stages[{index}]"
        steps = stage.pop("steps", None)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"{where}.steps must be a positive integer, got {steps!r}.")
        unknown = set(stage) - set(STAGE_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)}; a stage sets steps and any of "
                f"{sorted(STAGE_KEYS)}."
            )
        cfg = ml_collections.ConfigDict(base.to_dict())
        for key, value in stage.items():
            group, field = STAGE_KEYS[key]
            if isinstance(value, dict | ml_collections.ConfigDict):
                cfg[group][field] = ml_collections.ConfigDict(_as_dict(value))
            else:
                cfg[group][field] = value
        if "seq_len" in stage and "max_position_embeddings" not in stage:
            cfg.model.max_position_embeddings = stage["seq_len"]
        cfg.train.steps = steps
        cfg.data.seed = config.data.seed + index
        plan.append(Stage(index, cfg, start, start + steps))
        start += steps
    if config.train.steps != start:
        raise ValueError(
            f"train.steps={config.train.steps} but train.stages add up to {start} steps; set "
            f"train.steps={start}."
        )
    return plan
