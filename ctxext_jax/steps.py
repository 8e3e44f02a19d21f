"""The pure step functions: loss, train step with gradient accumulation, eval step.

Train state is a plain pytree: {"step": int32[], "params": pure dict, "opt_state": optax state}.
The model is rebuilt from its graphdef and the parameters inside each traced function, so the
whole state goes in and out of `jax.jit` and into the checkpoint.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ctxext_jax import sharding
from ctxext_jax.model import Decoder, param_axes
from ctxext_jax.optim import with_learning_rate

SOURCE_KEY = "source_ids"  # which data.mixture source each token came from


def make_apply(graphdef: nnx.GraphDef, abstract_state: nnx.State) -> Callable:
    """-> apply(params, inputs, positions, segment_ids) -> float32 logits [B, T, V], or with
    `targets=` [B, T] (loss [B, T], argmax == target [B, T]) without building the logits."""

    def apply(params, inputs, *, positions=None, segment_ids=None, targets=None):
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        return model(inputs, positions=positions, segment_ids=segment_ids, targets=targets)

    return apply


def build_model(model_cfg, mesh, rules, *, seed: int):
    """-> (apply, abstract params with shardings, jitted init); nothing is materialised yet.
    `apply` constrains activations by the logical `rules` on `mesh` wherever it is traced."""
    abstract_model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = sharding.tree_shardings(param_axes(abstract_state), mesh, rules)
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        shardings,
    )

    def init(key_data):
        key = jax.random.wrap_key_data(key_data)
        return nnx.to_pure_dict(nnx.state(Decoder(model_cfg, rngs=nnx.Rngs(key))))

    # The seed is an argument, not a constant of the program: runs that differ only in their
    # seed compile the same init, which the persistent compilation cache then reuses (a host
    # numpy array, so every process of a multi-host job passes the same replicated value).
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    init = jax.jit(init, out_shardings=shardings)
    apply = sharding.under_mesh(make_apply(graphdef, abstract_state), mesh, rules)
    return apply, abstract_params, functools.partial(init, key_data)


def token_scores(apply: Callable, params, inputs, targets, **kwargs):
    """(loss float32 [B, T], argmax == target bool [B, T]) of `apply`: a model apply (one that
    takes `targets=`) computes them chunk by chunk; any other apply returns logits [B, T, V]."""
    if "targets" in inspect.signature(apply).parameters:
        return apply(params, inputs, targets=targets, **kwargs)
    logits = apply(params, inputs, **kwargs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses, jnp.argmax(logits, axis=-1) == targets


def loss_sums(apply: Callable, params, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of scored tokens) of one batch."""
    losses, _ = apply(
        params,
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        targets=batch["targets"],
    )
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def strided_micro_batches(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...], micro-batch i holding rows i, i + count, ...: each
    device keeps an equal share of its own batch-sharded rows in every micro-step, so the
    split moves no data between devices (contiguous blocks would land on a few devices)."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def all_finite(tree) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite everywhere (bool [])."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(
    apply: Callable,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int,
    learning_rate: optax.Schedule,
) -> Callable:
    """-> train_step(state, batch) -> (state, metrics). `tx` is `optim.make_optimizer`'s; its
    learning rate is set to `learning_rate(step)` before each update. With `grad_accum` > 1 the
    batch is split into micro-batches scanned in order; gradients of the summed loss are added
    and divided by the total token count once, so the update equals the one of the whole batch
    at once. metrics["nonfinite"] is 1 where the update was skipped (non-finite loss, gradient
    or result)."""

    def grads_of(params, batch):
        def summed(p):
            total, count = loss_sums(apply, p, batch)
            return total, count

        (total, count), grads = jax.value_and_grad(summed, has_aux=True)(params)
        return total, count, grads

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        params = state["params"]
        if grad_accum == 1:
            total, count, grads = grads_of(params, batch)
        else:
            micro = jax.tree.map(lambda x: strided_micro_batches(x, grad_accum), batch)
            zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                    jax.tree.map(jnp.zeros_like, params))  # fmt: skip

            def accumulate(carry, micro_batch):
                total, count, grads = grads_of(params, micro_batch)
                return jax.tree.map(jnp.add, carry, (total, count, grads)), None

            (total, count, grads), _ = jax.lax.scan(accumulate, zero, micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, grad_norm = total / count, optax.tree.norm(grads)
        lr = learning_rate(state["step"])  # the schedule follows the step number
        opt_state = with_learning_rate(state["opt_state"], lr)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss, gradient or result skips the update: parameters and optimizer
        # state (Adam's moments and count) stay as they were, so no checkpoint ever holds a
        # non-finite state; the step counter, and with it the schedule, moves on with the
        # data, and the trainer counts the skip.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, opt_state))
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr,  # the one this step's update used
            "tokens": count,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(apply: Callable, num_sources: int = 1) -> Callable:
    """-> eval_step(params, batch) -> (loss sums [S], token counts [S]) per data.mixture source
    (batch["source_ids"], int [B, T] in [0, S); all tokens count as source 0 without it)."""

    def eval_step(params, batch):
        losses, _ = apply(
            params,
            batch["inputs"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            targets=batch["targets"],
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        sources = batch.get(SOURCE_KEY, jnp.zeros_like(batch["inputs"]))
        one_hot = jax.nn.one_hot(sources, num_sources, dtype=jnp.float32)  # [B, T, S]
        return (jnp.einsum("bt,bts->s", losses * mask, one_hot),
                jnp.einsum("bt,bts->s", mask, one_hot))  # fmt: skip

    return eval_step
