"""Hugging Face folders out: ModelConfig -> config.json, parameters -> safetensors, tokenizer.

`save_pretrained` writes what transformers' AutoModelForCausalLM loads (one shard in memory at a
time); `config_to_hf` refuses what the architecture cannot express. Tokenizer helpers find,
check and copy a folder's tokenizer files. Tensor names and layouts: layout.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ctxext_jax.data.tokenizer import make_tokenizer
from ctxext_jax.hf.layout import ARCHITECTURES, HF_ROPE_TYPES, get_path, leaf_plan, to_hf
from ctxext_jax.model import ModelConfig
from ctxext_jax.positions.rope import parse_rope

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
TORCH_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def default_architecture(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.attention_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if set(cfg.layer_pattern) == {"L"} else "LlamaForCausalLM"


def config_to_hf(
    cfg: ModelConfig,
    *,
    architecture: str | None = None,
    torch_dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """ModelConfig -> config.json dict of transformers 5 (`rope_parameters` with rope_theta).
    `extra` adds fields such as bos/eos_token_id. Refuses what the architecture cannot express."""
    arch = architecture or default_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture={arch!r} is not one of {sorted(ARCHITECTURES)}.")
    family = ARCHITECTURES[arch]

    def refuse(key: str, why: str):
        raise ValueError(f"model.{key}: {why}; {arch} cannot represent it, so no export.")

    if cfg.alibi:
        refuse("alibi", "ALiBi replaces RoPE")
    if cfg.sinks:
        refuse("sinks", f"attention sinks ({cfg.sinks}) on local layers")
    if "C" in cfg.layer_pattern:
        refuse("layer_pattern", f"chunked (C) layers in {cfg.layer_pattern!r}")
    if cfg.local_rope and cfg.rope_for("local") != cfg.rope_for("global"):
        refuse("local_rope", "a separate rope for local layers")
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: choose one of {sorted(TORCH_DTYPES)}.")
    rope = parse_rope(cfg.rope_for("global"), key="model.rope", head_dim=cfg.head_dim).to_hf()
    if rope["rope_type"] not in HF_ROPE_TYPES:
        refuse("rope", f"rope_type {rope['rope_type']!r} is not one of {HF_ROPE_TYPES}")
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        refuse("rope", "partial_rotary_factor != 1")
    if cfg.attention_bias != (family == "qwen2"):
        refuse("attention_bias", f"{cfg.attention_bias} (only Qwen2 has q/k/v biases)")
    if cfg.qk_norm != (family == "qwen3"):
        refuse("qk_norm", f"{cfg.qk_norm} (only Qwen3 normalises q and k)")
    kinds = cfg.layer_kinds
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": torch_dtype,
    }  # fmt: skip
    if family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
        if "local" in kinds:
            refuse("layer_pattern", f"sliding-window layers ({cfg.layer_pattern!r})")
    elif family == "mistral":
        if len(set(kinds)) > 1:
            refuse("layer_pattern", f"a mix of global and sliding layers ({cfg.layer_pattern!r})")
        out["sliding_window"] = cfg.window if kinds[0] == "local" else None
    else:
        types = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
        sliding = "sliding_attention" in types
        full_prefix = next((i for i, t in enumerate(types) if t == "sliding_attention"), len(types))
        out.update(
            use_sliding_window=sliding,
            sliding_window=cfg.window if sliding else None,
            max_window_layers=full_prefix,
            layer_types=types,
        )
    out.update(extra or {})
    return out


# --------------------------------------------------------------------------------- export
def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array -> the whole numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    params: Any,
    model_cfg: ModelConfig,
    out_dir: str,
    *,
    architecture: str | None = None,
    torch_dtype: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
    tokenizer_from: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Writes config.json and model.safetensors (or shards + index) that transformers'
    AutoModelForCausalLM loads; copies tokenizer files from the `tokenizer_from` folder.
    Memory holds one shard at a time. Returns out_dir."""
    hf_config = config_to_hf(
        model_cfg, architecture=architecture, torch_dtype=torch_dtype, extra=extra_config
    )
    np_dtype = TORCH_DTYPES[torch_dtype]
    plan = leaf_plan(params)
    names = {}  # HF name -> (our path, repeat index or None, kind)
    for keys, leaf in plan.items():
        for r, name in enumerate(leaf.names):
            names[name] = (keys, r if leaf.stacked else None, leaf.kind)
    sizes = {
        n: math.prod(get_path(params, k).shape[1:] if r is not None else get_path(params, k).shape)
        * np.dtype(np_dtype).itemsize
        for n, (k, r, _) in names.items()
    }
    shards, current, total = [], [], 0
    for name in names:  # leaf order: each stacked leaf is fetched to the host once
        if current and total + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += sizes[name]
    shards.append(current)
    if tokenizer_from is not None:
        check_tokenizer(tokenizer_spec(tokenizer_from), model_cfg.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
    from safetensors.numpy import save_file

    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    hosted: dict[tuple, np.ndarray] = {}
    for file, shard in zip(files, shards, strict=True):
        tensors = {}
        for name in shard:
            keys, r, kind = names[name]
            if keys not in hosted:  # one stacked leaf feeds several shards' layers
                hosted = {keys: _host(get_path(params, keys))}
            value = hosted[keys] if r is None else hosted[keys][r]
            tensors[name] = np.ascontiguousarray(to_hf(kind, value).astype(np_dtype))
        if jax.process_index() == 0:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if jax.process_index() == 0:
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {n: files[i] for i, shard in enumerate(shards) for n in shard},
            }
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, out_dir)
    return out_dir


# ------------------------------------------------------------------------------ tokenizer
def tokenizer_spec(folder: str) -> str:
    """ "hf:<folder>" (tokenizer.json) or "sentencepiece:<folder>/tokenizer.model"."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return f"hf:{folder}"
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return f"sentencepiece:{os.path.join(folder, 'tokenizer.model')}"
    raise ValueError(
        f"{folder} has neither tokenizer.json nor tokenizer.model; copy the model's tokenizer "
        "files into it or set data.tokenizer explicitly."
    )


def check_tokenizer(spec: str, vocab_size: int) -> None:
    """Raises if the tokenizer can emit ids the embedding table does not have."""
    tokenizer = make_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {spec} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: ids >= {vocab_size} have no embedding; use the model's own tokenizer."
        )


def copy_tokenizer(src: str, out_dir: str) -> list[str]:
    """Copies the tokenizer files `src` has (and generation_config.json); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level pre-tokenizing uses."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def write_byte_tokenizer(out_dir: str) -> None:
    """Writes tokenizer.json + tokenizer_config.json equal to the `bytes` tokenizer (pad 0, bos 1,
    eos 2, byte b -> b + 3): byte-level pre-tokenizing and a BPE without merges map each UTF-8
    byte to one token, so `hf:<out_dir>` and transformers' fast tokenizer give the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({char: b + 3 for b, char in _bytes_to_unicode().items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The specials stay plain vocabulary entries (not added tokens), so "</s>" in a text is
    # bytes, as with the bytes tokenizer.
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False},
            f, indent=2,
        )  # fmt: skip
