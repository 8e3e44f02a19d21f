"""The reproduction study: the context-extension methods side by side on one base model.

  python -m ctxext_jax.study --config configs/study.py --workdir runs/study
  python -m ctxext_jax.study --config configs/study.py:quick --workdir /tmp/study-quick
  python -m ctxext_jax.study --config configs/study.py:gpu --workdir runs/study-gpu

The base model (2 layers, d 256, 8 heads with QK-norm, RoPE θ 10,000: the smallest shape that
gets past the induction plateau on multi-query associative recall in minutes on a CPU; QK-norm
is what makes it hold at every distance of its window, README, Does it work?) trains at base
length 64 in three stages (see `_curriculum`): the `kv` task without filler, `kv` with filler,
then text + `kv` + `textcopy`.
Every arm is then evaluated at 1x, 2x, 4x and 8x the base length. What the recipe reaches and
what it does not is in the README (Does it work?).

Variants: `default` (CPU, 2 seeds in two worker processes), `short` (the default with one
seed), `quick` (a tiny model and few steps: checks the machinery in CI, not the thresholds),
`gpu` (a 114M-parameter model at base length 2048, one seed and 7 arms: ~5 minutes of one GPU).
Override anything: `--config.study.seeds=0, --config.study.trials=20 --config.study.workers=1`.
"""

import ml_collections

from ctxext_jax.config import defaults
from ctxext_jax.data import tasks

ARMS = (
    "base", "pi_zeroshot", "ntk_zeroshot", "dynamic_ntk_zeroshot", "yarn_zeroshot",
    "dynamic_yarn_zeroshot", "pi_finetune", "yarn_finetune", "no_scaling_finetune", "pose",
    "staged", "alibi", "window_sinks",
)  # fmt: skip
# RoPE θ of every base run: with QK-norm, a smaller θ (200-3,000) keeps the base on the
# induction plateau (README, Does it work?).
THETA = 10000.0
# quick: one arm of each kind (the base run, a zero-shot evaluation, a fine-tune from the base).
QUICK_ARMS = ("base", "yarn_zeroshot", "yarn_finetune")
# gpu: what fits ~5 minutes of one GPU (every training arm compiles its own step).
GPU_ARMS = ("base", "pi_zeroshot", "ntk_zeroshot", "dynamic_ntk_zeroshot", "yarn_zeroshot",
            "yarn_finetune", "no_scaling_finetune")  # fmt: skip


def _base(L: int, *, d: int, layers: int, heads: int, mlp: int, steps: int, batch: int,
          lr: float, dtype: str = "float32", weight_decay: float = 0.1, stages=(),
          mixture=None):  # fmt: skip
    c = defaults()
    c.model.update(
        vocab_size=320, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads,
        head_dim=d // heads, mlp_dim=mlp, max_position_embeddings=L, dtype=dtype,
        rope={"rope_type": "default", "rope_theta": THETA}, qk_norm=True,
    )  # fmt: skip
    c.data.update(seq_len=L, mixture=mixture or {"text": 0.3, "kv": 0.7})
    steps = sum(stage["steps"] for stage in stages) if stages else steps
    c.train.update(
        stages=tuple(stages), steps=steps, batch_size=batch, log_every=max(1, steps // 20)
    )
    c.optim.update(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=weight_decay)
    c.checkpoint.update(every=max(1, steps // 4), keep=2)
    c.eval.update(every=steps, batches=4, batch_size=min(16, batch), every_long=0)
    return c


def _curriculum(L: int, task: dict, *, retrieval_steps: int, filler_steps: int,
                mixed_steps: int, mixture: dict, batch: int):  # fmt: skip
    """The base run's three stages. (1) `kv` alone with every instance at its shortest (no
    filler: the facts and the questions abut), which is what breaks the induction plateau in
    minutes (README, Does it work?); (2) `kv` alone at the base length with filler, instances
    of 3/4 of the base length or more, which carries the circuit to the distances it has not
    seen; (3) the full mixture at a lower learning rate, for the language model that the
    perplexity arms score (and `textcopy`, the copying that repeated text needs). `batch` is
    the rows per step of stages 2 and 3; stage 1 takes 64 rows of the shortest instance.
    """
    shortest = tasks.min_length("kv", tasks.TaskConfig(**task)) - 1
    return (
        dict(steps=retrieval_steps, seq_len=shortest, batch_size=64, mixture={"kv": 1.0},
             lr=1e-3, warmup_steps=100),
        dict(steps=filler_steps, seq_len=L, batch_size=batch, mixture={"kv": 1.0}, lr=1e-3,
             warmup_steps=20, task=task | {"min_length": (3 * L) // 4}),
        dict(steps=mixed_steps, seq_len=L, batch_size=batch, mixture=mixture, lr=3e-4,
             warmup_steps=10),
    )  # fmt: skip


def _arms(L: int, *, F: int, finetune_steps: int, finetune_batch: int, finetune_lr: float,
          beta_fast: float = 32.0, alibi_stages=None):  # fmt: skip
    """Every arm; `F` is the extension factor the scaled arms are built for, `beta_fast`
    YaRN's: dimensions that turn at least this many times over the base length are left as
    trained (32, YaRN's default, is set for 4k contexts). `alibi_stages`: the ALiBi base run's
    own schedule (default: the RoPE base run's)."""
    yarn = {"rope_type": "yarn", "rope_theta": THETA, "factor": float(F),
            "original_max_position_embeddings": L, "beta_fast": beta_fast}  # fmt: skip
    pi = {"rope_type": "linear", "rope_theta": THETA, "factor": float(F)}
    warm = max(1, finetune_steps // 10)

    def finetune(rope):
        return dict(
            data=dict(seq_len=F * L),
            model=dict(max_position_embeddings=F * L, rope=rope),
            train=dict(steps=finetune_steps, batch_size=finetune_batch, stages=(),
                       log_every=max(1, finetune_steps // 10)),
            optim=dict(lr=finetune_lr, warmup_steps=warm),
            checkpoint=dict(every=finetune_steps),
            eval=dict(every=finetune_steps, batch_size=finetune_batch),
        )  # fmt: skip

    def zeroshot(**model):
        return dict(train=False, init="base", overrides={}, eval_model=model)

    alibi = dict(model=dict(alibi=True, rope={"rope_type": "nope"}))
    if alibi_stages:
        alibi["train"] = dict(stages=tuple(alibi_stages),
                              steps=sum(stage["steps"] for stage in alibi_stages))  # fmt: skip
    half = max(1, finetune_steps // 2)
    staged = dict(
        train=dict(
            steps=finetune_steps,
            stages=(
                dict(steps=half, seq_len=2 * L, batch_size=2 * finetune_batch, lr=finetune_lr,
                     warmup_steps=half // 10,
                     rope={"rope_type": "default", "rope_theta": THETA * 4}),
                dict(steps=finetune_steps - half, seq_len=F * L, batch_size=finetune_batch,
                     lr=finetune_lr, warmup_steps=half // 10,
                     rope={"rope_type": "default", "rope_theta": THETA * 16}),
            ),
            log_every=max(1, finetune_steps // 10),
        ),
        checkpoint=dict(every=finetune_steps),
        eval=dict(every=finetune_steps, batch_size=finetune_batch),
    )  # fmt: skip
    return {
        "base": dict(train=True, init="scratch", overrides={}, eval_model={}),
        "pi_zeroshot": zeroshot(rope=pi),
        "ntk_zeroshot": zeroshot(
            rope={"rope_type": "ntk", "rope_theta": THETA, "factor": float(F)}
        ),  # fmt: skip
        "dynamic_ntk_zeroshot": zeroshot(
            rope={"rope_type": "dynamic", "rope_theta": THETA, "factor": 1.0}
        ),  # fmt: skip
        "yarn_zeroshot": zeroshot(rope=yarn),
        "dynamic_yarn_zeroshot": zeroshot(  # scales with the length itself: no factor
            rope={k: v for k, v in yarn.items() if k != "factor"} | {"rope_type": "dynamic_yarn"}
        ),
        "pi_finetune": dict(train=True, init="base", overrides=finetune(pi), eval_model={}),
        "yarn_finetune": dict(train=True, init="base", overrides=finetune(yarn), eval_model={}),
        "no_scaling_finetune": dict(
            train=True,
            init="base",
            eval_model={},
            overrides=finetune({"rope_type": "default", "rope_theta": THETA}),
        ),  # fmt: skip
        # PoSE: base-length rows whose position ids cover F x L, with YaRN's positions.
        "pose": dict(
            train=True,
            init="base",
            eval_model={},
            overrides=dict(
                model=dict(rope=yarn),
                train=dict(
                    steps=finetune_steps,
                    batch_size=F * finetune_batch,
                    pose=dict(target_length=F * L, chunks=2),
                    stages=(),
                    log_every=max(1, finetune_steps // 10),
                ),
                optim=dict(lr=finetune_lr, warmup_steps=warm),
                checkpoint=dict(every=finetune_steps),
                eval=dict(every=finetune_steps),
            ),
        ),  # fmt: skip
        # ProLong-style progressive schedule: 2x with theta x4, then 4x with theta x16.
        "staged": dict(train=True, init="base", overrides=staged, eval_model={}),
        # ALiBi trains its own base model (its positions are not RoPE's).
        "alibi": dict(train=True, init="scratch", eval_model={}, overrides=alibi),
        # StreamingLLM: a sliding window of the base length plus 4 attention sinks, zero-shot.
        "window_sinks": zeroshot(layer_pattern="L", window=L, sinks=4),
    }


def get_config(arg: str = "default"):
    c = ml_collections.ConfigDict()
    if arg in ("default", "short"):
        L = 64
        # 8 facts over 64 keys / 64 values in random filler: 33 tokens without filler.
        task = dict(facts=8, keys=64, values=64, filler="random")
        # Text, kv retrieval, and copying text (what repeated text needs): the base run's
        # last stage and the fine-tunes.
        mixture = {"text": 0.3, "kv": 0.5, "textcopy": 0.2}
        # 2.59M tokens: 500 steps of 64 x 33, then 300 + 1,200 of 16 x 64.
        stages = _curriculum(L, task, retrieval_steps=500, filler_steps=300,
                             mixed_steps=1200, mixture=mixture, batch=16)  # fmt: skip
        c.base = _base(L, d=256, layers=2, heads=8, mlp=512, steps=0, batch=16, lr=5e-4,
                       stages=stages, mixture=mixture)  # fmt: skip
        c.base.data.task.update(task)
        c.base.model.scan_layers = False  # two layers: the unrolled step is faster on CPU
        # One CPU device per worker here; where there are more, they split the model (8 heads),
        # not the batch: the fine-tunes' 4 rows would not split 8 ways.
        c.base.mesh.shape.update(data=1, tensor=-1)
        # ALiBi learns retrieval in ~100 steps (RoPE: ~250) and no threshold rests on it: a
        # shorter schedule (1.58M tokens) keeps the study within 30 minutes.
        alibi_stages = _curriculum(L, task, retrieval_steps=300, filler_steps=200,
                                   mixed_steps=600, mixture=mixture, batch=16)  # fmt: skip
        # Fine-tunes: 100 steps of 4 x 256 tokens, 3.9% of the base run's tokens.
        # At L = 64 the fastest RoPE pair turns only 10 times: with YaRN's beta_fast 32 the
        # ramp starts there and interpolates all but it; 4 leaves the two fastest as trained.
        arms = _arms(L, F=4, finetune_steps=100, finetune_batch=4, finetune_lr=5e-4,
                     beta_fast=4.0, alibi_stages=alibi_stages)  # fmt: skip
        # Two worker processes, one per core: ~1.2x the throughput of one process on both.
        c.study = dict(seeds=(0, 1) if arg == "default" else (0,), factors=(1, 2, 4, 8),
                       task="kv", depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=10,
                       ppl_tokens=4096, stride=0.5, repeat_period=0, batch_tokens=8192,
                       arms=ARMS, workers=2)  # fmt: skip
    elif arg == "quick":  # seconds per arm: checks the machinery, not the thresholds
        L = 32
        c.base = _base(L, d=32, layers=2, heads=2, mlp=64, steps=6, batch=8, lr=3e-3)
        c.base.data.task.facts = 3
        c.base.eval.batches = 1
        arms = _arms(L, F=4, finetune_steps=2, finetune_batch=8, finetune_lr=1e-3)  # fmt: skip
        c.study = dict(seeds=(0,), factors=(1, 2, 4, 8), task="kv", depths=(0.0, 1.0),
                       trials=2, ppl_tokens=1024, stride=0.5, repeat_period=0,
                       batch_tokens=1024, arms=QUICK_ARMS, workers=1)  # fmt: skip
    elif arg == "gpu":  # one GPU, ~5 min: a 114M-parameter model at base length 2048
        L = 2048
        c.base = _base(L, d=768, layers=12, heads=12, mlp=3072, steps=500, batch=32,
                       lr=6e-4, dtype="bfloat16")  # fmt: skip
        c.base.model.remat = "dots"
        c.base.data.task.facts = 16
        arms = _arms(L, F=4, finetune_steps=60, finetune_batch=8, finetune_lr=2e-4)  # fmt: skip
        c.study = dict(seeds=(0,), factors=(1, 2, 4, 8), task="kv",
                       depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=10, ppl_tokens=65536,
                       stride=0.5, repeat_period=0, batch_tokens=65536, arms=GPU_ARMS,
                       workers=1)  # fmt: skip
    else:
        raise ValueError(
            f"configs/study.py: unknown variant {arg!r}; use default, short, quick or gpu."
        )
    c.arms = arms
    return c
