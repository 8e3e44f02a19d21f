"""Extend an imported Hugging Face model (Llama / Mistral / Qwen2 / Qwen3) to 4x its context
with YaRN, by continued pretraining on long documents.

  python -m ctxext_jax.train --config configs/extend_hf.py:/path/to/hf_model --workdir runs/ext
  python -m ctxext_jax.convert --from_ckpt runs/ext --to_hf runs/ext/hf

The model section comes from the folder's config.json; the weights from the folder itself
(`checkpoint.init_from`, or a checkpoint written by `python -m ctxext_jax.convert --from_hf`);
the tokenizer from its tokenizer.json or tokenizer.model. The rope becomes YaRN with factor 4
over the model's trained length (`original_max_position_embeddings`), as in the YaRN paper;
a model already scaled (llama3, yarn, ...) is re-scaled from its own max_position_embeddings.
Defaults suit a real 1-8B model on an accelerator; override train.* and data.* for tiny tests.
"""

from ctxext_jax import hf
from ctxext_jax.config import defaults

FACTOR = 4


def get_config(arg: str = ""):
    if not arg:
        raise ValueError(
            "configs/extend_hf.py needs the model folder: --config configs/extend_hf.py:/path/to/hf"
        )
    source = hf.config_from_hf(hf.read_config(arg), dtype="bfloat16")
    original = source.max_position_embeddings
    c = defaults()
    model = {k: getattr(source, k) for k in c.model.keys() if k not in ("rope", "local_rope")}
    rope = source.rope_for("global")
    c.model.update(model)
    c.model.update(
        rope={
            "rope_type": "yarn",
            "rope_theta": rope.get("rope_theta", 10000.0),
            "factor": float(FACTOR),
            "original_max_position_embeddings": original,
        },
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
