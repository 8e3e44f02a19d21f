"""Train-step memory: chunked cross-entropy and the remat policies change memory, not results;
MFU counts the keys each layer attends to."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import _random_batch

from configs import tiny
from ctxext_jax import sharding
from ctxext_jax.attention.masks import Mask
from ctxext_jax.loss import token_losses
from ctxext_jax.model import (
    REMAT_POLICIES,
    ModelConfig,
    flops_per_token,
    mean_keys_attended,
    saved_residual,
)
from ctxext_jax.optim import OptimConfig
from ctxext_jax.steps import build_model, loss_sums
from ctxext_jax.train import build_program, device_batch


def _reference_losses(x, head, targets):
    logits = jnp.einsum("BTE,EV->BTV", x, head)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), logits


@pytest.mark.parametrize("chunk", [0, 8, 11])  # whole, dividing T = 40, padded tail
def test_chunked_token_losses_equal_the_whole_logits(chunk):
    keys = jax.random.split(jax.random.key(chunk), 3)
    B, T, E, V = 2, 40, 16, 50
    x = jax.random.normal(keys[0], (B, T, E))
    head = jax.random.normal(keys[1], (E, V)) / 4
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    weights = jax.random.uniform(keys[0], (B, T))  # a loss mask of arbitrary weights

    def objective(fn):
        return lambda x, head: jnp.sum(fn(x, head)[0] * weights)

    chunked = lambda x, head: token_losses(x, head, targets, chunk=chunk)  # noqa: E731
    reference = lambda x, head: _reference_losses(x, head, targets)  # noqa: E731
    losses, correct = jax.jit(chunked)(x, head)
    want, logits = reference(x, head)
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == targets)
    grads = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(x, head)
    want_grads = jax.grad(objective(reference), argnums=(0, 1))(x, head)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_loss_step_holds_no_full_logits():
    """The compiled loss and gradient hold no [B, T, V] buffer, only one chunk of logits."""
    B, T, E, V, chunk = 1, 1024, 32, 512, 64
    x = jax.ShapeDtypeStruct((B, T, E), jnp.float32)
    head = jax.ShapeDtypeStruct((E, V), jnp.float32)
    targets = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def compiled(chunk):
        loss = lambda x, h, t: jnp.sum(token_losses(x, h, t, chunk=chunk)[0])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, head, targets).compile()

    whole, chunked = compiled(0), compiled(chunk)
    assert f"f32[{B},{T},{V}]" in whole.as_text()
    text = chunked.as_text()
    assert f"{T},{V}]" not in text and f"[{T},{V}" not in text
    assert f"[{B},{chunk},{V}]" in text
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(chunked) < B * T * V * 4 / 2 < B * T * V * 4 < temp(whole)


def _run_steps(model_overrides, mesh_shape, batches, *, grad_accum=2):
    config = tiny.get_config("test")
    config.model.update(tie_embeddings=True, layer_pattern="GL", window=24, attention_impl="xla")
    config.model.update(model_overrides)
    config.mesh.shape.update(mesh_shape)
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = sharding.make_mesh(mesh_cfg, devices)
    program = build_program(
        ModelConfig.from_config(config.model),
        OptimConfig.from_config(config.optim, train_steps=config.train.steps),
        mesh, mesh_cfg.rules, grad_accum=grad_accum, seed=0,
    )  # fmt: skip
    state = program.init_state(program.init_params())
    metrics = []
    for batch in batches:
        state, m = program.train_step(state, device_batch(batch, program.batch_sharding))
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, jax.device_get(state["params"])


def test_chunked_loss_trains_like_the_whole_logits():
    """Tied embeddings, padding under loss_mask, 2 accumulated micro-batches; then the same on
    a data x fsdp x tensor mesh with the vocab sharded over `tensor`."""
    rng = np.random.default_rng(3)
    batches = [_random_batch(rng, 8, 64, 259)]
    one = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    want_metrics, want_params = _run_steps({"loss_chunk": 0}, one, batches)
    mesh = {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    metrics, params = _run_steps({"loss_chunk": 16}, mesh, batches)
    np.testing.assert_allclose(metrics[0]["loss"], want_metrics[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["grad_norm"], want_metrics[0]["grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, want_params
    )


def _model(**overrides):
    config = tiny.get_config("test")
    config.model.update(
        layer_pattern="GL", window=24, n_layers=2, loss_chunk=16, attention_impl="xla"
    )
    config.model.update(overrides)
    config.mesh.shape.update(data=1)
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    return build_model(ModelConfig.from_config(config.model), mesh, mesh_cfg.rules, seed=0)


def _loss_and_grads(remat: str, batch):
    apply, _, init = _model(remat=remat)
    params = init()
    fn = jax.jit(jax.value_and_grad(lambda p: loss_sums(apply, p, batch)[0]))
    return fn(params), jax.make_jaxpr(fn)(params)


def test_remat_policies_equal_no_remat():
    batch = _random_batch(np.random.default_rng(4), 2, 64, 259)
    (want_loss, want_grads), _ = _loss_and_grads("none", batch)
    for remat in sorted(set(REMAT_POLICIES) - {"none"}):
        (loss, grads), jaxpr = _loss_and_grads(remat, batch)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads
        )
        if remat == "offload":  # the saved residual stream goes to host memory, on CPU too
            assert "MemorySpace.Host" in str(jaxpr)


@pytest.mark.parametrize(
    "pattern",
    [
        dict(layer_pattern="G"),
        dict(layer_pattern="L", window=7, sinks=0),
        dict(layer_pattern="L", window=7, sinks=3),
        dict(layer_pattern="C", chunk=6, sinks=2),
    ],  # fmt: skip
)
def test_flops_count_the_keys_each_layer_attends_to(pattern):
    T = 40
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                      mlp_dim=8, max_position_embeddings=T, **pattern)  # fmt: skip
    kind = cfg.layer_kinds[0]
    mask = Mask(
        causal=True,
        window=cfg.window if kind == "local" else None,
        chunk=cfg.chunk if kind == "chunked" else None,
        sinks=cfg.sinks if kind != "global" else 0,
    )
    want = float(np.asarray(mask.dense(T, T)).sum()) / T
    assert mean_keys_attended(cfg, kind, T) == pytest.approx(want)
    dense = ModelConfig(**{**cfg.__dict__, "layer_pattern": "G", "window": 0, "chunk": 0})
    attention_part = flops_per_token(cfg, T) - flops_per_token(dense, T) + 12 * 2 * 4 * (T + 1) / 2
    assert attention_part == pytest.approx(12 * 2 * 4 * want)


def test_residual_policy_saves_bf16_stream_as_16_bit_bits():
    """XLA:CPU widens a saved bf16 stack to float32; the policy saves its bits instead."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 16), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2, 8, 16))
    grad = jax.grad(lambda x: jnp.sum(saved_residual(x).astype(jnp.float32) * w))(x)
    np.testing.assert_array_equal(grad, w.astype(jnp.bfloat16))
    apply, abstract_params, _ = _model(remat="residual", dtype="bfloat16")
    batch = _random_batch(np.random.default_rng(5), 2, 64, 259)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_sums(apply, p, batch)[0]))(abstract_params)
    forward_scan = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
    stacks = [str(v.aval) for v in forward_scan.outvars if len(v.aval.shape) == 4]
    # One [R=1, B, T, E] stack per block of the "GL" group, and no other activation saved.
    assert stacks == ["uint16[1,2,64,64]"] * 2
