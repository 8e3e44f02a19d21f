"""Extend an imported Hugging Face model (Llama / Mistral / Qwen2 / Qwen3) to 4x its context
with YaRN, by continued pretraining on long documents.

  python -m ctxext_jax.train --config configs/extend_hf.py:/path/to/hf_model --workdir runs/ext
  python -m ctxext_jax.convert --from_ckpt runs/ext --to_hf runs/ext/hf

The model section comes from the folder's config.json; the weights from the folder itself
(`checkpoint.init_from`, or a checkpoint written by `python -m ctxext_jax.convert --from_hf`);
the tokenizer from its tokenizer.json or tokenizer.model. The rope becomes YaRN with factor 4
over the model's trained length (`original_max_position_embeddings`), as in the YaRN paper;
a model already scaled (llama3 x32, yarn, linear, ...) keeps its scaling with the factor x4
(`extended_rope`); longrope and other types that a factor cannot stretch are refused.
Defaults suit a real 1-8B model on an accelerator; override train.* and data.* for tiny tests.
"""

from ctxext_jax import hf
from ctxext_jax.config import defaults

FACTOR = 4


# Scalings whose reach grows with `factor` over a fixed original length: extending 4x more is
# the same type with factor x 4 (PI of PI is PI; YaRN and llama3 are defined relative to the
# original pretraining length, which stays).
COMPOSABLE = ("linear", "ntk", "dynamic", "yarn", "llama3")


def extended_rope(rope: dict, trained_length: int, folder: str) -> dict:
    """The model's rope block reaching FACTOR x further: an unscaled rope becomes YaRN over the
    trained length; an already scaled one keeps its type with factor x FACTOR (never YaRN over
    the scaled length, which would treat llama3 x32 as if it had been trained unscaled)."""
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return {
            "rope_type": "yarn",
            "rope_theta": rope.get("rope_theta", 10000.0),
            "factor": float(FACTOR),
            "original_max_position_embeddings": trained_length,
            **({"partial_rotary_factor": rope["partial_rotary_factor"]}
               if "partial_rotary_factor" in rope else {}),
        }  # fmt: skip
    if rope_type not in COMPOSABLE:
        raise ValueError(
            f"configs/extend_hf.py: {folder} already uses rope_type {rope_type!r}, which cannot "
            f"be stretched {FACTOR}x by a factor alone; give the new block yourself, e.g. "
            "--config.model.rope='{...}' with its long factors for the new length."
        )
    # An explicit YaRN attention_factor belongs to the old factor: let it follow the new one.
    extended = {k: v for k, v in rope.items() if k != "attention_factor"}
    extended["factor"] = float(rope.get("factor", 1.0)) * FACTOR
    return extended


def get_config(arg: str = ""):
    if not arg:
        raise ValueError(
            "configs/extend_hf.py needs the model folder: --config configs/extend_hf.py:/path/to/hf"
        )
    source = hf.config_from_hf(hf.read_config(arg), dtype="bfloat16")
    original = source.max_position_embeddings
    c = defaults()
    model = {k: getattr(source, k) for k in c.model.keys() if k not in ("rope", "local_rope")}
    c.model.update(model)
    c.model.update(
        rope=extended_rope(dict(source.rope_for("global")), original, arg),
        local_rope={},
        max_position_embeddings=FACTOR * original,
        remat="full",  # long sequences: recompute activations instead of storing them
    )
    c.data.update(tokenizer=hf.tokenizer_spec(arg), seq_len=FACTOR * original)
    c.checkpoint.update(init_from=arg, every=200, keep=2)
    # Continued pretraining: a small constant-ish rate after a short warmup (YaRN used 2e-5
    # for 400 steps of 64 x 64k tokens on Llama 2).
    c.train.update(steps=400, batch_size=8, log_every=10)
    c.optim.update(lr=2e-5, warmup_steps=20, schedule="linear", min_lr_ratio=0.1,
                   weight_decay=0.0)  # fmt: skip
    c.eval.update(every=200, batches=4, batch_size=8)
    return c
