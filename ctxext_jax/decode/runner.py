"""The model as decoding sees it, and the jitted functions that run it against KV caches.

`Model` is what `hf.from_pretrained` / `restore.load` return (config, params) plus the mesh and
logical rules the caches shard by. The jitted functions take the config, mesh and rules as
static arguments and live at module level, so every call with the same shapes reuses one
compilation.

Shape letters: B batch, T new tokens, V vocab, N generated-token buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ctxext_jax import sharding
from ctxext_jax.decode.cache import CacheMode, DecodeStep, cache_axes, init_caches
from ctxext_jax.decode.sampling import Sampling, sample
from ctxext_jax.model import Decoder, ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder to generate with: its config, parameters, and the mesh / rules they live on."""

    config: ModelConfig
    params: Any
    mesh: Mesh
    rules: tuple = sharding.DEFAULT_RULES


def as_model(model, *, mesh: Mesh | None = None, rules=None) -> Model:
    """A `Model`, an `hf.HFModel` or anything with `.config` and `.params` -> `Model`. The mesh
    defaults to the one the parameters are sharded on."""
    if isinstance(model, Model) and mesh is None and rules is None:
        return model
    if not hasattr(model, "config") or not hasattr(model, "params"):
        raise TypeError(
            f"decode needs a model with .config (ModelConfig) and .params, got "
            f"{type(model).__name__}; use hf.from_pretrained(path), restore.load(...) or "
            "decode.Model(config, params, mesh)."
        )
    mesh = mesh or getattr(model, "mesh", None)
    if mesh is None:
        leaf_sharding = getattr(jax.tree.leaves(model.params)[0], "sharding", None)
        mesh = getattr(leaf_sharding, "mesh", None)
        if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != sharding.MESH_AXES:
            from ctxext_jax.hf import single_device_mesh

            mesh = single_device_mesh()
    rules = sharding.normalize_rules(rules or getattr(model, "rules", sharding.DEFAULT_RULES))
    return Model(config=model.config, params=model.params, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------ jitted
@functools.lru_cache(maxsize=32)
def _parts(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _decoder(cfg: ModelConfig, params) -> Decoder:
    graphdef, abstract_state = _parts(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules", "mode", "batch"))
def _init(*, cfg, mesh, rules, mode: CacheMode, batch: int):
    caches = init_caches(cfg, mode, batch)
    axes = cache_axes(caches)
    with sharding.use_mesh(mesh, rules):
        return jax.tree.map(
            sharding.constrain,
            caches,
            axes,
            is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x),
        )


def init_cache_arrays(model: Model, mode: CacheMode, batch: int):
    """Empty caches for `batch` rows, sharded by the model's logical rules."""
    return _init(cfg=model.config, mesh=model.mesh, rules=model.rules, mode=mode, batch=batch)


def _under_mesh(fn):
    """fn(*args, cfg, **kw) -> the same with `mesh` and `rules` keywords, traced with the logical
    rules active on the mesh (jit them as static arguments)."""

    def wrapped(*args, cfg, mesh, rules, **kwargs):
        with sharding.use_mesh(mesh, rules):
            return fn(*args, cfg=cfg, **kwargs)

    # jit maps donate / static argument names through the signature: keep fn's.
    signature = inspect.signature(fn)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ("mesh", "rules")]
    wrapped.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    wrapped.__name__ = fn.__name__.lstrip("_")
    return wrapped


def _forward_all(params, caches, tokens, positions, valid, *, cfg, fresh=False):
    """tokens, positions [B, T], valid [B, T] bool -> (float32 logits [B, T, V], caches)."""
    model = _decoder(cfg, params)
    hidden, caches = model.decode(tokens, DecodeStep(positions, valid, fresh), caches)
    return model.logits(hidden), caches


def _prefill_chunk(params, caches, tokens, start, prompt_len, last_logits, *, cfg, fresh=False):
    """One prompt piece: tokens [B, T] at positions start + arange(T), padding past prompt_len
    [B]. last_logits [B, V] takes the logits of each row's last prompt token when it is here.
    fresh (static): the first piece (start 0) into empty caches (see DecodeStep)."""
    B, T = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = positions < prompt_len[:, None]
    model = _decoder(cfg, params)
    hidden, caches = model.decode(tokens, DecodeStep(positions, valid, fresh), caches)
    last = prompt_len - 1 - start  # [B] index of the row's last prompt token in this piece
    here = (last >= 0) & (last < T)
    picked = jnp.take_along_axis(hidden, jnp.clip(last, 0, T - 1)[:, None, None], axis=1)[:, 0]
    return caches, jnp.where(here[:, None], model.logits(picked), last_logits)


def _score_chunk(params, caches, tokens, targets, start, count, *, cfg):
    """Losses of `targets` [B, T] after tokens [B, T] at start + arange(T); the first `count`
    tokens are real. -> (caches, float32 losses [B, T], 0 past count)."""
    B, T = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = jnp.broadcast_to(jnp.arange(T)[None, :] < count, (B, T))
    model = _decoder(cfg, params)
    hidden, caches = model.decode(tokens, DecodeStep(positions, valid), caches)
    losses = optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), targets)
    return caches, jnp.where(valid, losses, 0.0)


def _decode_loop(params, caches, logits, prompt_len, keys, max_new, eos, ignore_eos, *, cfg,
                 sampling: Sampling, buffer: int):  # fmt: skip
    """Samples up to max_new tokens per row in one `lax.while_loop` of a fixed-shape step.

    logits [B, V]: those of each row's last prompt token; prompt_len [B]; keys [B] one PRNG key
    per row; eos [E] stop ids (-1 pads). -> (tokens [B, N], their log-probs [B, N] under the
    model, count [B]: tokens generated per row, eos included, caches).
    """
    B = logits.shape[0]
    model = _decoder(cfg, params)

    def cond(carry):
        t, _, _, _, _, done, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, logits, caches, out, logprobs, done, count = carry
        token = sample(logits, jax.vmap(lambda key: jax.random.fold_in(key, t))(keys), sampling)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
        out = out.at[:, t].set(token)
        logprobs = logprobs.at[:, t].set(logprob)
        count = jnp.where(done, count, t + 1)
        done = done | (~ignore_eos & jnp.any(token[:, None] == eos[None, :], axis=1))
        step = DecodeStep((prompt_len + t)[:, None], jnp.ones((B, 1), bool))
        hidden, caches = model.decode(token[:, None], step, caches)
        return t + 1, model.logits(hidden[:, 0]), caches, out, logprobs, done, count

    carry = (
        jnp.zeros((), jnp.int32),
        logits,
        caches,
        jnp.zeros((B, buffer), jnp.int32),
        jnp.zeros((B, buffer), jnp.float32),
        jnp.zeros((B,), bool),
        jnp.zeros((B,), jnp.int32),
    )
    _, _, caches, out, logprobs, _, count = jax.lax.while_loop(cond, body, carry)
    return out, logprobs, count, caches


_STATIC = ("cfg", "mesh", "rules")
forward_all = jax.jit(
    _under_mesh(_forward_all), static_argnames=(*_STATIC, "fresh"), donate_argnames=("caches",)
)
prefill_chunk = jax.jit(
    _under_mesh(_prefill_chunk),
    static_argnames=(*_STATIC, "fresh"),
    donate_argnames=("caches", "last_logits"),
)
score_chunk = jax.jit(
    _under_mesh(_score_chunk), static_argnames=_STATIC, donate_argnames=("caches",)
)
decode_loop = jax.jit(
    _under_mesh(_decode_loop),
    static_argnames=(*_STATIC, "sampling", "buffer"),
    donate_argnames=("caches",),
)
