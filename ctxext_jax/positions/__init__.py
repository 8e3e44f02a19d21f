"""Positional encodings as pure functions: RoPE scalings (HF rope_type registry), ALiBi, NoPE."""

from ctxext_jax.positions.alibi import alibi_bias, alibi_slopes
from ctxext_jax.positions.rope import (
    REGISTRY,
    RopeScaling,
    apply_rope,
    parse_rope,
    rope_frequencies,
    rope_from_hf_config,
    validate_rope,
)

__all__ = [
    "REGISTRY",
    "RopeScaling",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "parse_rope",
    "rope_frequencies",
    "rope_from_hf_config",
    "validate_rope",
]
