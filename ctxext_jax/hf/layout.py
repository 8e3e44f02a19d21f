"""Hugging Face names and layouts shared by import (load.py) and export (export.py).

Layer i of the HF model is block i % P at repeat i // P of our stack (P = len(layer_pattern)
with scan_layers, else P = n_layers and no repeat axis). Weight layouts, HF -> ours:
  q/k/v_proj.weight [N*D, E] -> [E, N, D]    o_proj.weight [E, H*D] -> [H, D, E]
  q/k/v_proj.bias   [N*D]    -> [N, D]       gate/up/down_proj.weight [out, in] -> [in, out]
  lm_head.weight    [V, E]   -> head [E, V]  norms, embed_tokens: as they are
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# rope_type values transformers' modelling code computes (ROPE_INIT_FUNCTIONS plus default).
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


# ------------------------------------------------------------------------------ tensor names
# Our path inside a block -> (HF name after "model.layers.{i}.", layout kind).
_BLOCK = {
    ("attn", "wq"): ("self_attn.q_proj.weight", "in_heads"),
    ("attn", "wk"): ("self_attn.k_proj.weight", "in_heads"),
    ("attn", "wv"): ("self_attn.v_proj.weight", "in_heads"),
    ("attn", "wo"): ("self_attn.o_proj.weight", "out_heads"),
    ("attn", "bq"): ("self_attn.q_proj.bias", "bias"),
    ("attn", "bk"): ("self_attn.k_proj.bias", "bias"),
    ("attn", "bv"): ("self_attn.v_proj.bias", "bias"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "same"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "same"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same"),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", "transpose"),
    ("mlp", "w_up"): ("mlp.up_proj.weight", "transpose"),
    ("mlp", "w_down"): ("mlp.down_proj.weight", "transpose"),
}
_TOP = {
    ("embed",): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("head",): ("lm_head.weight", "transpose"),
}


def to_ours(kind: str, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of one HF tensor in our layout `shape` (no copy: reshapes and transposes)."""
    if kind == "in_heads":  # [N*D, E] -> [E, N, D]
        E, N, D = shape
        return hf.reshape(N, D, E).transpose(2, 0, 1)
    if kind == "out_heads":  # [E, H*D] -> [H, D, E]
        H, D, E = shape
        return hf.reshape(E, H, D).transpose(1, 2, 0)
    if kind == "bias":
        return hf.reshape(shape)
    return hf.T if kind == "transpose" else hf


def to_hf(kind: str, ours: np.ndarray) -> np.ndarray:
    if kind == "in_heads":
        return ours.reshape(ours.shape[0], -1).T
    if kind == "out_heads":
        return ours.reshape(-1, ours.shape[-1]).T
    if kind == "bias":
        return ours.reshape(-1)
    return ours.T if kind == "transpose" else ours


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_hf(kind, np.broadcast_to(np.zeros((), np.float32), shape)).shape


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Where one of our parameters lives in the HF checkpoint: one name per stacked repeat."""

    names: tuple[str, ...]
    kind: str
    stacked: bool


def leaf_plan(params: Any) -> dict[tuple, Leaf]:
    """Our parameter tree (arrays or ShapeDtypeStructs) -> {path: Leaf} for every leaf."""
    blocks = params["layers"]["blocks"]
    stacked = blocks[0]["attn_norm"]["scale"].ndim == 2
    P = len(blocks)
    repeats = blocks[0]["attn_norm"]["scale"].shape[0] if stacked else 1
    plan = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if keys[:2] == ("layers", "blocks"):
            name, kind = _BLOCK[keys[3:]]
            layers = [r * P + keys[2] for r in range(repeats)]
            plan[keys] = Leaf(tuple(f"model.layers.{i}.{name}" for i in layers), kind, stacked)
        else:
            name, kind = _TOP[keys]
            plan[keys] = Leaf((name,), kind, False)
    return plan


def get_path(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def set_path(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value
