"""A tiny decoder on the embedded corpus: trains on 2 CPU cores in a few minutes.

  python -m ctxext_jax.train --config configs/tiny.py --workdir runs/tiny
  python -m ctxext_jax.train --config configs/tiny.py:extend --workdir runs/tiny-4x \
      --config.checkpoint.init_from=runs/tiny

`extend` continues pretraining the base model at 4x its sequence length with YaRN (factor 4,
original length = the base run's), the context-extension recipe of the YaRN paper;
`extend_pi` does the same with Position Interpolation; `test` is what the test suite trains.
The base run also logs a cheap long-context check (perplexity at 2x/4x, passkey) at its end.

`get_sweep("extend")` is the learning rate x rope factor sweep of the 4x extension (9 runs):

  python -m ctxext_jax.sweep --config configs/tiny.py:extend --root runs/sweep-lr-factor \
      --config.checkpoint.init_from=runs/tiny
"""

from ctxext_jax.config import defaults
from ctxext_jax.sweep import product, sweep, zip

BASE_LEN = 256


def get_config(arg: str = "base"):
    c = defaults()
    c.model.update(
        vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
        mlp_dim=384, max_position_embeddings=BASE_LEN, dtype="float32",
    )  # fmt: skip
    c.data.seq_len = BASE_LEN
    c.train.update(steps=300, batch_size=16, log_every=10)
    c.optim.update(lr=3e-3, warmup_steps=30)
    c.checkpoint.update(every=100, keep=2)
    c.eval.update(every=100, batches=8, batch_size=16, every_long=300, long_lengths=(512, 1024))
    if arg in ("extend", "extend_pi"):
        factor = 4
        c.data.seq_len = factor * BASE_LEN
        c.model.max_position_embeddings = factor * BASE_LEN
        if arg == "extend":
            c.model.rope = {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": float(factor),
                "original_max_position_embeddings": BASE_LEN,
            }
        else:  # Position Interpolation, for comparing recipes on the same base model
            c.model.rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": float(factor)}
        c.train.update(steps=100, batch_size=8)
        c.optim.update(lr=1e-3, warmup_steps=10)
        c.eval.update(every=50, batch_size=8, long_lengths=(2048, 4096))
    elif arg == "test":  # seconds per step on CPU: what the test suite trains
        c.model.update(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
        c.model.max_position_embeddings = c.data.seq_len = 64
        c.train.update(steps=8, batch_size=8, log_every=1)
        c.optim.update(warmup_steps=2)
        c.checkpoint.update(every=4)
        c.eval.update(every=4, batches=2, batch_size=8, every_long=0)
    elif arg != "base":
        raise ValueError(
            f"configs/tiny.py: unknown variant {arg!r}; use base, extend, extend_pi or test."
        )
    return c


def get_sweep(arg: str = "extend"):
    if arg in ("extend", "extend_pi"):
        return product(
            sweep("optim.lr", [3e-4, 1e-3, 3e-3]), sweep("model.rope.factor", [2.0, 4.0, 8.0])
        )
    if arg == "test":  # two points, one a whole rope block each
        return zip(
            sweep("optim.lr", [3e-3, 1e-3]),
            sweep("model.rope", [
                {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                 "original_max_position_embeddings": 32},
            ]),
        )  # fmt: skip
    raise ValueError(f"configs/tiny.py: no sweep for {arg!r}; use extend, extend_pi or test.")
