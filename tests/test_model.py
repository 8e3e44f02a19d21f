"""The decoder: documents packed in a row never see each other, every positional scheme trains."""

import jax
import numpy as np
import pytest

from configs import tiny
from ctxext_jax import sharding
from ctxext_jax.model import ModelConfig
from ctxext_jax.optim import OptimConfig
from ctxext_jax.train import build_program, device_batch

T = 48
DOCS = [(0, 13), (13, 31), (31, 44)]  # three documents, then 4 padding tokens


def _config(**model_overrides):
    config = tiny.get_config("test")
    config.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                        max_position_embeddings=T // 2, n_layers=2)  # fmt: skip
    config.model.update(model_overrides)
    config.optim.update(lr=1e-2, warmup_steps=0)
    return config


def _program(**model_overrides):
    config = _config(**model_overrides)
    config.mesh.shape.update(data=1)
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    model_cfg = ModelConfig.from_config(config.model)
    optim_cfg = OptimConfig.from_config(config.optim, train_steps=100)
    return build_program(model_cfg, optim_cfg, mesh, mesh_cfg.rules, grad_accum=1, seed=0)


def _packed_row(rng, batch=2):
    inputs = rng.integers(3, 259, (batch, T), dtype=np.int32)
    segment_ids = np.zeros((batch, T), np.int32)
    positions = np.zeros((batch, T), np.int32)
    for seg, (a, b) in enumerate(DOCS, start=1):
        segment_ids[:, a:b] = seg
        positions[:, a:b] = np.arange(b - a)
    return inputs, segment_ids, positions


PATTERNS = {
    "global": {},
    "window+sinks": {"layer_pattern": "LG", "window": 5, "sinks": 2},
    "chunked": {"layer_pattern": "CG", "chunk": 8},
    "alibi-window": {
        "alibi": True,
        "rope": {"rope_type": "nope"},
        "layer_pattern": "L",
        "window": 6,
    },  # fmt: skip
}


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=list(PATTERNS))
def test_packed_documents_do_not_see_each_other(pattern, impl):
    program = _program(attention_impl=impl, **PATTERNS[pattern])
    params = program.init_params()
    rng = np.random.default_rng(0)
    inputs, segment_ids, positions = _packed_row(rng)
    changed = inputs.copy()
    a, b = DOCS[1]
    changed[:, a:b] = rng.integers(3, 259, (2, b - a))

    def logits(tokens):
        return np.asarray(
            jax.jit(program.apply)(params, tokens, positions=positions, segment_ids=segment_ids)
        )

    before, after = logits(inputs), logits(changed)
    others = np.r_[0 : DOCS[0][1], DOCS[2][0] : DOCS[2][1]]
    np.testing.assert_allclose(after[:, others], before[:, others], rtol=1e-5, atol=1e-5)
    assert not np.allclose(after[:, a:b], before[:, a:b])
    # A document packed after others equals the same document alone at the start of a row.
    a, b = DOCS[2]
    alone = np.zeros_like(inputs)
    alone[:, : b - a] = inputs[:, a:b]
    alone_logits = np.asarray(
        jax.jit(program.apply)(
            params,
            alone,
            positions=np.broadcast_to(np.arange(T), (2, T)),
            segment_ids=np.where(np.arange(T) < b - a, 1, 2).repeat(2).reshape(T, 2).T,
        )
    )
    np.testing.assert_allclose(before[:, a:b], alone_logits[:, : b - a], rtol=1e-5, atol=1e-5)


def test_scan_and_remat_leave_logits_unchanged():
    rng = np.random.default_rng(1)
    inputs, segment_ids, positions = _packed_row(rng)
    outputs = []
    for overrides in ({}, {"remat": "full"}, {"remat": "dots"}):
        program = _program(**overrides)
        params = program.init_params()
        outputs.append(
            np.asarray(program.apply(params, inputs, positions=positions, segment_ids=segment_ids))
        )
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_checkpoints_each_scanned_group_or_block(scan):
    """Unscanned, a checkpoint around the whole stack would save no memory: one per block."""
    program = _program(remat="full", scan_layers=scan, n_layers=4, layer_pattern="GL", window=8)
    tokens = np.zeros((2, T), np.int32)
    jaxpr = jax.make_jaxpr(program.apply)(program.abstract_params, tokens).jaxpr

    def count_remat(eqns):  # jax.checkpoint's primitive is "remat2" (older: "checkpoint")
        return sum(e.primitive.name in ("remat2", "checkpoint") for e in eqns)

    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    if scan:
        assert count_remat(jaxpr.eqns) == 0 and len(scans) == 1
        assert count_remat(scans[0].params["jaxpr"].jaxpr.eqns) == 1  # one per repeat of "GL"
    else:
        assert count_remat(jaxpr.eqns) == 4


SCHEMES = {
    "default": {"rope": {"rope_type": "default", "rope_theta": 10000.0}},
    "linear": {"rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    "ntk": {"rope": {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 2.0}},
    "dynamic": {"rope": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    "yarn": {
        "rope": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": T // 2,
        }
    },  # fmt: skip
    "dynamic_yarn": {
        "rope": {
            "rope_type": "dynamic_yarn",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": T // 2,
        }
    },  # fmt: skip
    "llama3": {
        "rope": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": T // 2,
        }
    },  # fmt: skip
    "longrope": {
        "rope": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 4,
            "long_factor": [1.5] * 4,
            "original_max_position_embeddings": T // 2,
        }
    },  # fmt: skip
    "partial": {
        "rope": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    },  # fmt: skip
    "nope": {"rope": {"rope_type": "nope"}},
    "alibi": {"rope": {"rope_type": "nope"}, "alibi": True},
    "gemma3-local-global": {
        "layer_pattern": "LG",
        "window": 8,
        "rope": {"rope_type": "default", "rope_theta": 1e6},
        "local_rope": {"rope_type": "default", "rope_theta": 1e4},
    },  # fmt: skip
    "llama4-nope-global": {
        "layer_pattern": "CG",
        "chunk": 16,
        "rope": {"rope_type": "nope"},
        "local_rope": {"rope_type": "default", "rope_theta": 5e5},
    },  # fmt: skip
}


@pytest.mark.parametrize("scheme", SCHEMES, ids=list(SCHEMES))
def test_every_positional_scheme_trains(scheme):
    from ctxext_jax.config import validate

    validate(_config(**SCHEMES[scheme]))  # the scheme is a valid config as written
    program = _program(**SCHEMES[scheme])
    state = program.init_state(program.init_params())
    rng = np.random.default_rng(2)
    inputs, segment_ids, positions = _packed_row(rng, batch=8)
    # A learnable signal: each document repeats a short random motif.
    for a, b in DOCS:
        inputs[:, a:b] = np.resize(rng.integers(3, 259, 5), b - a)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "segment_ids": segment_ids,
             "positions": positions, "loss_mask": (segment_ids > 0).astype(np.float32)}  # fmt: skip
    losses = []
    for _ in range(6):
        state, metrics = program.train_step(state, device_batch(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5, losses
