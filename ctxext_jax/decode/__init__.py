"""Decoding: KV caches, prefill, the fixed-shape decode loop and sampling (see README, Decoding).

from ctxext_jax import decode, hf
model = hf.from_pretrained("path/to/llama")     # or restore.load(restore.resolve(config, ckpt))[0]
out = decode.generate(model, [[1, 15043, 29892]], max_new_tokens=32)
out.new_ids                                          # [[...32 ids...]]
"""

from ctxext_jax.decode.cache import CacheMode, DecodeStep, LayerCache, cache_bytes
from ctxext_jax.decode.generate import (
    GenerateOutput,
    decode_step,
    generate,
    init_cache,
    prefill,
    score_stream,
)
from ctxext_jax.decode.runner import Model, as_model
from ctxext_jax.decode.sampling import Sampling

__all__ = [
    "CacheMode",
    "DecodeStep",
    "GenerateOutput",
    "LayerCache",
    "Model",
    "Sampling",
    "as_model",
    "cache_bytes",
    "decode_step",
    "generate",
    "init_cache",
    "prefill",
    "score_stream",
]
