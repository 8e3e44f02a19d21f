"""Attention: one mask description (`Mask`) and backends behind `attention`."""

from ctxext_jax.attention.kernels import (
    IMPLEMENTATIONS,
    attention,
    choose_implementation,
    supports,
)
from ctxext_jax.attention.masks import Mask

__all__ = ["IMPLEMENTATIONS", "Mask", "attention", "choose_implementation", "supports"]
