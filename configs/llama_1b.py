"""A 1B (0.97B) Llama-3.2-shaped decoder for GPUs and TPU pods; `:cpu` runs the recipe on CPU.

  python -m ctxext_jax.train --config configs/llama_1b.py --workdir /mnt/bucket/llama1b
  python -m ctxext_jax.train --config configs/llama_1b.py:extend --workdir /mnt/bucket/llama1b-32k \
      --config.checkpoint.init_from=/mnt/bucket/llama1b
  python -m ctxext_jax.train --config configs/llama_1b.py:cpu --workdir runs/llama1b-cpu

`base` pretrains at 8k with Llama 3's rope; `extend` continues at 32k with YaRN x4 (the original
length 8k), as Llama 3.1 / Qwen2.5 extend theirs. FSDP over every device, bf16 compute, full
rematerialisation and the memory-efficient attention path keep a 32k sequence per device.
The workdir must be a filesystem path every host sees (a shared disk, or a bucket mounted with
gcsfuse): the trainer does not take gs:// URLs.
"""

from ctxext_jax.config import defaults

BASE_LEN = 8192


def get_config(arg: str = "base"):
    c = defaults()
    c.model.update(
        vocab_size=384,  # the byte tokenizer; use hf:<folder> and its vocabulary for real text
        d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
        max_position_embeddings=BASE_LEN, tie_embeddings=True, rms_eps=1e-5,
        dtype="bfloat16", remat="full", scan_layers=True, attention_impl="auto",
        rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 1.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": BASE_LEN},
    )  # fmt: skip
    c.data.update(seq_len=BASE_LEN, num_workers=8)
    c.train.update(steps=20000, batch_size=256, log_every=50)
    c.optim.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1, grad_clip=1.0)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(every=1000, batches=16, batch_size=64)
    if arg == "extend":
        c.data.seq_len = c.model.max_position_embeddings = 4 * BASE_LEN
        c.model.rope = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                        "original_max_position_embeddings": BASE_LEN}  # fmt: skip
        c.train.update(steps=1000, batch_size=64)
        c.optim.update(lr=2e-5, warmup_steps=50, schedule="linear")
        c.eval.update(every=250, batch_size=16)
    elif arg == "cpu":  # the same recipe, shrunk until one CPU runs it in a minute
        c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32,
                       mlp_dim=512, max_position_embeddings=256, dtype="float32")  # fmt: skip
        c.model.rope.original_max_position_embeddings = 256
        c.data.update(seq_len=256, num_workers=0)
        c.train.update(steps=20, batch_size=8, log_every=5)
        c.optim.update(warmup_steps=5)
        c.mesh.shape.update(fsdp=-1)
        c.eval.update(every=20, batches=2, batch_size=8)
    elif arg != "base":
        raise ValueError(f"configs/llama_1b.py: unknown variant {arg!r}; use base, extend or cpu.")
    return c
