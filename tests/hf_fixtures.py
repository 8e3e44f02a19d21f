"""Tiny randomly initialised transformers models and a tiny tokenizer, saved as HF folders."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

ORIGINAL = 32  # the "trained" context of every tiny model
LENGTH = 80  # tested length: beyond ORIGINAL, so scalings and windows matter

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

ROPES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, ORIGINAL),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, ORIGINAL),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, ORIGINAL),
    "yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.8,
         "mscale_all_dim": 0.6, "original_max_position_embeddings": ORIGINAL},
        4 * ORIGINAL,
    ),
    "llama3": (
        {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
        4 * ORIGINAL,
    ),
    "longrope": (
        {"rope_type": "longrope", "rope_theta": 10000.0,
         "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
         "long_factor": [1.0, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 9.0],
         "original_max_position_embeddings": ORIGINAL},
        4 * ORIGINAL,
    ),
}  # fmt: skip


def make_model(folder: str, family: str, rope: str = "default", *, seed: int = 0, **overrides):
    """Saves a tiny float32 model (hidden 64, 4 heads of 16, 2 kv heads, vocab 128) to `folder`
    with `save_pretrained`; returns the eager-attention torch model."""
    config_cls, model_cls = FAMILIES[family]
    rope_parameters, max_pos = ROPES[rope]
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters),
        tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).to(torch.float32).eval()
    # Norm weights start at 1 and biases at 0: randomise them so a missed one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    model.save_pretrained(folder)
    return load_torch(folder)


def load_torch(folder: str, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=dtype
    )
    return model.eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_tokens(seed: int, batch: int = 2, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length), dtype=np.int32)


def make_tokenizer_files(folder: str, *, vocab_size: int = 100) -> None:
    """A character-level BPE tokenizer.json (+ tokenizer_config.json) of at most vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60
    )
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz_():=[]")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(3000)]
    tok.train_from_iterator([" ".join(words[i : i + 50]) for i in range(0, 3000, 50)], trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
