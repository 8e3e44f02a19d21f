"""A Llama-family decoder in Flax NNX: embed, blocks (attention + SwiGLU MLP + RMSNorm), head.

Shape letters: B batch, T length, E embed, H query heads, K kv heads (H = K * G), D head dim,
M mlp hidden, V vocab, R repeats of the layer pattern (the scanned axis).

Parameters are float32 and carry their logical axes as `nnx.Param(..., axes=(...))` metadata;
compute runs in `ModelConfig.dtype` (bf16 by default); logits come back in float32. The positional
scheme and the attention pattern are chosen per layer from a pattern string: `G` global causal,
`L` sliding window, `C` chunked (Llama 4), cycled over the layers ("LLLLLG" = 5 local : 1 global).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ctxext_jax import sharding
from ctxext_jax.attention import context_parallel as cp
from ctxext_jax.attention import sequence_layout
from ctxext_jax.attention.kernels import attention
from ctxext_jax.attention.masks import Mask
from ctxext_jax.loss import token_losses
from ctxext_jax.positions.alibi import alibi_slopes
from ctxext_jax.positions.rope import apply_rope, rope_frequencies
from ctxext_jax.sharding import constrain

LAYER_KINDS = {"G": "global", "L": "local", "C": "chunked"}
# What the backward pass keeps of each scanned group (or unscanned block); the rest is recomputed.
# `residual` keeps the residual stream entering each block (named "residual", compute dtype);
# `offload` moves those same saves to pinned host memory (GPU/TPU; see the README on CPU).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "residual": jax.checkpoint_policies.save_only_these_names("residual"),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("residual",),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _freeze(value: Any) -> Any:
    """JSON-able value -> hashable (dicts to sorted item tuples, lists to tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw_rope(items: tuple) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, and nothing of the run around it."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_position_embeddings: int
    rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))
    local_rope: tuple = ()  # empty: local/chunked layers use `rope`
    alibi: bool = False
    layer_pattern: str = "G"
    window: int = 0
    chunk: int = 0
    sinks: int = 0
    attention_impl: str = "auto"
    context_parallel: str = "all_gather"  # all_gather | ring, on a sequence-sharded mesh
    context_parallel_balance: str = "zigzag"  # zigzag | none
    attention_bias: bool = False  # Qwen2: biases on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    loss_chunk: int = 2048  # positions per cross-entropy chunk; 0: the whole length at once
    scan_layers: bool = True
    init_std: float = 0.02

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_cfg.to_dict().items() if k in fields}
        values["rope"] = _freeze(dict(values.get("rope") or {}))
        values["local_rope"] = _freeze(dict(values.get("local_rope") or {}))
        return cls(**values)

    def rope_for(self, kind: str) -> dict[str, Any]:
        """The HF-style rope dict of a layer kind (local and chunked layers may have their own)."""
        if kind != "global" and self.local_rope:
            return _thaw_rope(self.local_rope)
        return _thaw_rope(self.rope)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """One kind per layer, cycling the pattern."""
        pattern = self.layer_pattern
        return tuple(LAYER_KINDS[pattern[i % len(pattern)]] for i in range(self.n_layers))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _param(rngs: nnx.Rngs, shape, axes, *, std: float, cfg: ModelConfig) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    return nnx.Param(value, axes=axes)


def _ones(shape, axes, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), axes=axes)


def _zeros(shape, axes, cfg: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), axes=axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x: [..., E] normalised in float32 over its last axis, then scaled; returns x.dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def _tag_residual(x: jax.Array) -> jax.Array:
    if x.dtype.itemsize != 2:
        return checkpoint_name(x, "residual")
    bits = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(x, jnp.uint16))
    return jax.lax.bitcast_convert_type(checkpoint_name(bits, "residual"), x.dtype)


@jax.custom_jvp
def saved_residual(x: jax.Array) -> jax.Array:
    """x, tagged "residual" for the remat policies that keep it. A 16-bit stream is saved as its
    bits (behind an optimisation barrier, so XLA keeps them): XLA:CPU, which has no bf16
    arithmetic, widens a saved bf16 [R, B, T, E] stack to float32 before the backward loop and
    holds it twice; integer bits stay 2 bytes per value on every backend."""
    return _tag_residual(x)


@saved_residual.defjvp
def _saved_residual_jvp(primals, tangents):
    # The tag is inlined here (not a nested custom_jvp call) so that the remat policy sees it.
    return _tag_residual(primals[0]), tangents[0]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, axes=("norm",)):
        self.scale = _ones((dim,), axes, cfg)
        self.eps = cfg.rms_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query attention with this layer's positional scheme and mask pattern."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.cfg, self.kind = cfg, kind
        E, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, out_std = cfg.init_std, cfg.init_std / np.sqrt(2 * cfg.n_layers)
        self.wq = _param(rngs, (E, H, D), ("embed", "heads", "head_dim"), std=std, cfg=cfg)
        self.wk = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std, cfg=cfg)
        self.wv = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std, cfg=cfg)
        self.wo = _param(rngs, (H, D, E), ("heads", "head_dim", "embed"), std=out_std, cfg=cfg)
        if cfg.attention_bias:
            self.bq = _zeros((H, D), ("heads", "head_dim"), cfg)
            self.bk = _zeros((K, D), ("kv_heads", "head_dim"), cfg)
            self.bv = _zeros((K, D), ("kv_heads", "head_dim"), cfg)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg, axes=("head_dim",))
            self.k_norm = RMSNorm(D, cfg, axes=("head_dim",))

    def __call__(self, x, positions, segment_ids, *, cache=None, step=None):
        """x: [B, T, E]; positions, segment_ids: [B, T] -> [B, T, E].

        Decoding passes this layer's KV `cache` and the `step` describing the new tokens
        (ctxext_jax.decode.cache; positions and segment_ids are then unused) and gets
        ([B, T, E], the updated cache) back.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        q = jnp.einsum("BTE,EHD->BTHD", x, self.wq[...].astype(dtype))
        k = jnp.einsum("BTE,EKD->BTKD", x, self.wk[...].astype(dtype))
        v = jnp.einsum("BTE,EKD->BTKD", x, self.wv[...].astype(dtype))
        if cfg.attention_bias:
            q, k, v = (
                q + self.bq[...].astype(dtype),
                k + self.bk[...].astype(dtype),
                v + self.bv[...].astype(dtype),
            )
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            # Imported here: the decode package builds on this module.
            from ctxext_jax.decode.cache import cached_attention

            out, cache = cached_attention(q, k, v, cache, step, cfg=cfg, kind=self.kind)
            return jnp.einsum("BTHD,HDE->BTE", out, self.wo[...].astype(dtype)), cache
        inv_freq, attention_factor = rope_frequencies(
            self.cfg.rope_for(self.kind),
            cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            seq_len=x.shape[1],
        )
        q = apply_rope(q, positions, inv_freq=inv_freq, attention_factor=attention_factor)
        k = apply_rope(k, positions, inv_freq=inv_freq, attention_factor=attention_factor)
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        k = constrain(k, ("batch", "length", "activation_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "activation_kv_heads", "head_dim"))
        mask = Mask(
            causal=True,
            window=cfg.window if self.kind == "local" else None,
            chunk=cfg.chunk if self.kind == "chunked" else None,
            sinks=cfg.sinks if self.kind != "global" else 0,
            q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            q_positions=positions,
            kv_positions=positions,
        )
        slopes = alibi_slopes(cfg.n_heads) if cfg.alibi else None
        if (
            sequence_layout.shard_count() > 1
        ):  # rows sharded over `sequence`: see context_parallel.py
            mesh, rules = sharding.active_mesh()
            local = cfg.attention_impl if cfg.attention_impl in cp.LOCAL_KERNELS else "auto"
            out = cp.context_parallel_attention(
                q, k, v, mask=mask, mesh=mesh, rules=rules, alibi_slopes=slopes,
                strategy=cfg.context_parallel, balance=cfg.context_parallel_balance,
                local_kernel=local,
            )  # fmt: skip
        else:
            out = attention(
                q, k, v, mask=mask, alibi_slopes=slopes, implementation=cfg.attention_impl
            )
        return jnp.einsum("BTHD,HDE->BTE", out, self.wo[...].astype(dtype))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, M = cfg.d_model, cfg.mlp_dim
        std, out_std = cfg.init_std, cfg.init_std / np.sqrt(2 * cfg.n_layers)
        self.dtype = jnp.dtype(cfg.dtype)
        self.w_gate = _param(rngs, (E, M), ("embed", "mlp"), std=std, cfg=cfg)
        self.w_up = _param(rngs, (E, M), ("embed", "mlp"), std=std, cfg=cfg)
        self.w_down = _param(rngs, (M, E), ("mlp", "embed"), std=out_std, cfg=cfg)

    def __call__(self, x):
        gate = jnp.einsum("BTE,EM->BTM", x, self.w_gate[...].astype(self.dtype))
        up = jnp.einsum("BTE,EM->BTM", x, self.w_up[...].astype(self.dtype))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "activation_mlp"))
        return jnp.einsum("BTM,ME->BTE", hidden, self.w_down[...].astype(self.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg)
        self.attn = Attention(cfg, kind, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        self.tag_residual = cfg.remat in ("residual", "offload")

    def __call__(self, x, positions, segment_ids):
        if self.tag_residual:  # what the `residual` / `offload` policies keep
            x = saved_residual(x)
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "activation_embed"))

    def decode(self, x, step, cache):
        """The block over new tokens with this layer's KV cache: -> (x, cache)."""
        h, cache = self.attn(self.attn_norm(x), None, None, cache=cache, step=step)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "activation_embed")), cache


class Group(nnx.Module):
    """One repeat of the layer pattern; the unit that scan-over-layers stacks."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in kinds])

    def __call__(self, x, positions, segment_ids):
        for block in self.blocks:
            x = block(x, positions, segment_ids)
        return x

    def decode(self, x, step, caches):
        """caches: one per block, in order -> (x, updated caches)."""
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode(x, step, cache)
            new.append(cache)
        return x, new


class Decoder(nnx.Module):
    """tokens [B, T] int32 -> logits [B, T, V] float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, V = cfg.d_model, cfg.vocab_size
        self.embed = _param(rngs, (V, E), ("vocab", "embed"), std=cfg.init_std, cfg=cfg)
        kinds = cfg.layer_kinds[: len(cfg.layer_pattern)] if cfg.scan_layers else cfg.layer_kinds
        repeats = cfg.n_layers // len(kinds)
        if cfg.scan_layers:
            # Build one group per repeat under vmap so each parameter gains a leading [R] axis.
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Group(cfg, kinds, rngs=nnx.Rngs(0))))
            keys = jax.random.split(rngs.params(), repeats)
            states = jax.vmap(lambda key: nnx.state(Group(cfg, kinds, rngs=nnx.Rngs(key))))(keys)
            self.layers = nnx.merge(graphdef, states)
        else:
            self.layers = Group(cfg, kinds, rngs=rngs)
        self.final_norm = RMSNorm(E, cfg)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (E, V), ("embed", "vocab"), std=cfg.init_std, cfg=cfg)

    def __call__(self, tokens, *, positions=None, segment_ids=None, targets=None):
        """-> logits [B, T, V] float32; with `targets` [B, T] instead (loss float32 [B, T],
        argmax == target bool [B, T]), computed `loss_chunk` positions at a time so that no
        [B, T, V] array exists (see `loss.token_losses`)."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        # Sequence-sharded with zigzag balancing: rows move to the device layout once here and
        # back before the head, so callers see natural order (positions travel with the rows).
        zigzag = sequence_layout.shard_count() > 1 and self.cfg.context_parallel_balance == "zigzag"
        if zigzag:
            tokens, positions, segment_ids = (
                sequence_layout.to_layout(a, ("batch", "length"))
                for a in (tokens, positions, segment_ids)
            )
        x = self._embed(tokens)
        x = self._run_layers(x, positions, segment_ids)
        if zigzag:
            x = sequence_layout.from_layout(x, ("batch", "length", "activation_embed"))
        x = self.final_norm(x)
        if targets is not None:
            head = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
            return token_losses(x, head, targets, chunk=self.cfg.loss_chunk)
        return self.logits(x)

    def decode(self, tokens, step, caches):
        """Runs new tokens [B, T] against the KV caches (ctxext_jax.decode.cache).

        caches: one per layer of the pattern group, each stacked over the R repeats when layers
        are scanned; one per layer otherwise. Returns (final-normed hidden [B, T, E], caches);
        `logits` maps hidden states to float32 logits.
        """
        x = self._embed(tokens)
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, state_and_caches):
                layer_state, layer_caches = state_and_caches
                return nnx.merge(graphdef, layer_state).decode(h, step, layer_caches)

            x, caches = jax.lax.scan(body, x, (state, caches))
        else:
            x, caches = self.layers.decode(x, step, caches)
        return self.final_norm(x), caches

    def _embed(self, tokens):
        # Gather from the vocab-sharded table with its embed dim whole (FSDP gathers every
        # weight anyway): the lookup then shards like the tokens, with no resharding.
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "length", "activation_embed"))

    def logits(self, x):
        """Final-normed hidden [..., E] -> float32 logits [..., V]."""
        dtype = jnp.dtype(self.cfg.dtype)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits = jnp.einsum("...E,EV->...V", x, head.astype(dtype)).astype(jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "length", "activation_vocab"))
        return logits

    def _run_layers(self, x, positions, segment_ids):
        def pure(module):
            """-> (apply(x, state) -> x, state), rematerialised per the config."""
            graphdef, state = nnx.split(module)

            def apply(x, state):
                return nnx.merge(graphdef, state)(x, positions, segment_ids)

            if self.cfg.remat != "none":
                apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat])
            return apply, state

        if self.cfg.scan_layers:
            apply_group, state = pure(self.layers)
            x, _ = jax.lax.scan(lambda h, s: (apply_group(h, s), None), x, state)
            return x
        # Unscanned, the group is the whole stack: one checkpoint around it would hold every
        # layer's activations at once in the backward pass, so each block is its own unit.
        for block in self.layers.blocks:
            apply_block, state = pure(block)
            x = apply_block(x, state)
        return x


def param_axes(state: nnx.State) -> dict:
    """A pure dict of every parameter's logical axes; stacked (scanned) leading dims unsharded."""

    def axes_of(variable: nnx.Variable) -> nnx.Variable:
        axes = tuple(variable.get_metadata().get("axes", ()))
        return variable.replace((None,) * (variable.ndim - len(axes)) + axes)

    return nnx.to_pure_dict(
        jax.tree.map(axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )


def param_count(state: nnx.State) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def mean_keys_attended(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Keys a query of a `kind` layer attends to, averaged over positions 0..seq_len-1 of one
    unpacked row: t + 1 (global), min(t + 1, window) (local), t mod chunk + 1 (chunked), plus the
    sinks outside a local window or chunk."""
    t = np.arange(seq_len, dtype=np.float64)
    if kind == "global":
        return float(np.mean(t + 1))
    if kind == "local":
        keys, visible_start = np.minimum(t + 1, cfg.window), t - cfg.window + 1
    else:
        keys, visible_start = t % cfg.chunk + 1, t - t % cfg.chunk
    sinks = np.clip(np.minimum(cfg.sinks, visible_start), 0, None)  # sinks before the window
    return float(np.mean(keys + sinks))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), the PaLM MFU convention:
    6 * matmul params + 12 * H * D * (keys attended) per layer for attention scores and values,
    where a global layer attends to (T + 1) / 2 keys on average and a local or chunked layer to
    at most its window or chunk (see `mean_keys_attended`). Rematerialisation is not counted."""
    E, H, K, D, M = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = E * (H + 2 * K) * D + H * D * E + 3 * E * M
    matmul_params = cfg.n_layers * per_layer + E * cfg.vocab_size
    keys = sum(mean_keys_attended(cfg, kind, seq_len) for kind in cfg.layer_kinds)
    return 6 * matmul_params + 12 * H * D * keys
