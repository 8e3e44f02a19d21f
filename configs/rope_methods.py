"""The rope-method comparison: the tiny base model extended 4x (256 -> 1024 tokens) by each
position-encoding method, with the same data, steps and learning rate.

  python -m ctxext_jax.train --config configs/tiny.py --workdir runs/tiny      # the base model
  python -m ctxext_jax.sweep --config configs/rope_methods.py --root runs/rope-methods \\
      --config.checkpoint.init_from=runs/tiny

Arms: plain RoPE (no scaling, the baseline), Position Interpolation, static NTK, YaRN, dynamic
NTK and ALiBi (RoPE switched off: the model must relearn positions from the bias). Each arm
logs perplexity and passkey accuracy at 2x and 4x the extended length at its end; the sweep's
summary compares them (`runs/rope-methods/summary.md`, `compare_ppl.png`). `test` is the same
comparison shrunk for the test suite.
"""

from configs.tiny import get_config as tiny_config
from ctxext_jax.sweep import chain

FACTOR = 4


def get_config(arg: str = "extend"):
    if arg == "extend":
        return tiny_config("extend")
    if arg == "test":
        c = tiny_config("test")
        c.data.seq_len = c.model.max_position_embeddings = FACTOR * 64
        c.train.update(steps=2, batch_size=8)
        c.optim.update(warmup_steps=1)
        return c
    raise ValueError(f"configs/rope_methods.py: unknown variant {arg!r}; use extend or test.")


def arms(original: int, factor: float = FACTOR) -> list[dict]:
    """One override dict per method; `original` is the base model's trained length."""
    theta = 10000.0
    return chain(
        [{"model.rope": {"rope_type": "default", "rope_theta": theta}}],
        [{"model.rope": {"rope_type": "linear", "rope_theta": theta, "factor": factor}}],
        [{"model.rope": {"rope_type": "ntk", "rope_theta": theta, "factor": factor}}],
        [
            {
                "model.rope": {
                    "rope_type": "yarn",
                    "rope_theta": theta,
                    "factor": factor,
                    "original_max_position_embeddings": original,
                }
            }
        ],  # fmt: skip
        # Dynamic NTK scales once the length passes max_position_embeddings: keep it at the
        # base model's length.
        [
            {
                "model.rope": {"rope_type": "dynamic", "rope_theta": theta, "factor": factor},
                "model.max_position_embeddings": original,
            }
        ],  # fmt: skip
        [{"model.rope": {"rope_type": "nope"}, "model.alibi": True}],
    )


def get_sweep(arg: str = "extend"):
    return arms(original=64 if arg == "test" else 256)
