"""RoPE: HF-style rope dicts -> frequencies, the rotation itself, and config.json reading.

A RoPE configuration is a flat dict with Hugging Face's key names (`rope_type`, `rope_theta`,
`factor`, `original_max_position_embeddings`, ...), so the `rope_scaling` / `rope_parameters`
block of a model's config.json can be pasted as is. `parse_rope` turns it into a frozen
dataclass of the registered type (every constant a field; the types live in scalings.py);
`rope_frequencies` returns what transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, device,
seq_len)` returns for the same config: inverse frequencies [R/2] and the attention factor that
multiplies cos and sin. `rope_from_hf_config` reads the block out of a whole config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctxext_jax.positions.scalings import REGISTRY, RopeScaling

__all__ = [
    "REGISTRY",
    "RopeScaling",
    "apply_rope",
    "parse_rope",
    "rope_frequencies",
    "rope_from_hf_config",
    "validate_rope",
]


def parse_rope(
    rope: Mapping[str, Any] | RopeScaling, *, key: str = "rope", head_dim: int | None = None
) -> RopeScaling:
    """HF-style rope dict -> frozen dataclass of the registered type; errors name `key.<field>`."""
    if isinstance(rope, RopeScaling):
        rope.check(key=key, head_dim=head_dim)
        return rope
    return RopeScaling.from_hf(rope, key=key, head_dim=head_dim)


def validate_rope(
    rope: Mapping[str, Any] | RopeScaling, *, key: str = "model.rope", head_dim: int | None = None
) -> None:
    """Raises one ValueError naming `key.<field>` and the fix; with head_dim, also checks the
    rotary dim and the length of longrope's factor lists."""
    parse_rope(rope, key=key, head_dim=head_dim)


def rope_frequencies(
    rope: Mapping[str, Any] | RopeScaling,
    head_dim: int,
    *,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """inv_freq [R/2] float32 (R = rotary dims; head_dim for `proportional`) and the attention
    factor, as transformers' ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len) returns
    them. seq_len is the current length for the dynamic types and longrope (None: the
    configured one). `nope` -> (zeros [0], 1.0)."""
    scaling = parse_rope(rope, head_dim=head_dim)
    inv_freq, attention_factor = scaling.frequencies(
        head_dim, max_position_embeddings=max_position_embeddings, seq_len=seq_len
    )
    return np.asarray(inv_freq, np.float32), float(attention_factor)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    inv_freq: np.ndarray | jax.Array,
    attention_factor: float | jax.Array = 1.0,
    interleaved: bool = False,
) -> jax.Array:
    """Rotates the first R = 2 * len(inv_freq) dims of each head; the rest pass through.

    x: [B, T, N, D]; positions: [B, T] int; inv_freq: [R/2], or [B, 1, R/2] with
    attention_factor [B, 1, 1] for per-row frequencies (decoding rows of different lengths under
    a length-dependent rope). Half layout (Hugging Face) pairs dim i with i + R/2; interleaved
    layout (Meta, complex) pairs 2i with 2i+1. cos/sin are computed in float32, multiplied by
    attention_factor, then cast to x.dtype, as transformers.
    """
    half = int(np.shape(inv_freq)[-1])
    if half == 0:
        return x
    if positions.ndim != 2:
        raise ValueError(f"positions: expected [B, T] ints, got shape {positions.shape}")
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"inv_freq has {half} entries, needs {rot} rotary dims > D={x.shape[-1]}")
    # A broadcast product, not a matmul: TPUs run float32 matmuls at bf16 precision by default.
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(angles) * attention_factor).astype(x.dtype)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor).astype(x.dtype)[:, :, None, :]
    x_rot = x[..., :rot]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        out = out.reshape(x_rot.shape)
    else:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, x[..., rot:]], axis=-1) if rot < x.shape[-1] else out


def _standardize_hf(block: Mapping[str, Any], config_json: Mapping[str, Any]) -> dict[str, Any]:
    """One flat block -> our rope dict, filling what transformers' standardize_rope_params fills."""
    rope = dict(block)
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope["rope_type"] = rope_type
    rope.setdefault("rope_theta", config_json.get("rope_theta", 10_000.0))
    if config_json.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", config_json["partial_rotary_factor"])
    if rope_type in ("llama3", "yarn", "longrope"):
        if config_json.get("original_max_position_embeddings") is not None:
            # Phi-3 keeps it outside the block; transformers gives that value priority.
            rope["original_max_position_embeddings"] = config_json[
                "original_max_position_embeddings"
            ]
        elif rope.get("original_max_position_embeddings") is None:
            rope["original_max_position_embeddings"] = config_json["max_position_embeddings"]
    if rope_type == "yarn":
        if rope.get("factor") is None:
            # transformers' implied factor (DeepSeek-V3 style configs).
            rope["factor"] = (
                config_json["max_position_embeddings"] / rope["original_max_position_embeddings"]
            )
        if "truncate" in rope and rope["truncate"] is None:
            rope["truncate"] = False  # transformers reads a null truncate as falsy
    return rope


def rope_from_hf_config(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """A model's config.json -> our HF-style rope dict (rope_theta, partial_rotary_factor and
    original_max_position_embeddings merged in as transformers does). A block nested by layer
    type (e.g. {"full_attention": {...}, "sliding_attention": {...}}) gives {layer_type: dict};
    a null layer entry means NoPE."""
    block = config_json.get("rope_parameters") or config_json.get("rope_scaling") or {}
    values = list(block.values())
    if values and all(v is None or isinstance(v, Mapping) for v in values):
        return {
            layer: {"rope_type": "nope"} if sub is None else _standardize_hf(sub, config_json)
            for layer, sub in block.items()
        }
    return _standardize_hf(block, config_json)
