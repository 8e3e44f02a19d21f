"""Context parallelism: a sequence-sharded step equals the single-device one for every mask
feature, packed documents stay isolated across shards, zigzag balances the causal work, ring
memory falls as 1/n with no full-length gather of K/V."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ctxext_jax import sharding
from ctxext_jax.attention import Mask, attention, sequence_layout
from ctxext_jax.attention import context_parallel as cp
from ctxext_jax.config import ConfigError, validate
from ctxext_jax.evals.scoring import make_scorer
from ctxext_jax.model import ModelConfig
from ctxext_jax.optim import OptimConfig
from ctxext_jax.steps import build_model, loss_sums
from ctxext_jax.train import build_program, device_batch

T = 64
MODELS = {
    # causal (G), sliding window (L), chunked (C), sinks on the local layers, RoPE
    "rope-GLC": dict(layer_pattern="GLC", n_layers=3, window=12, chunk=16, sinks=2),
    "alibi-LG": dict(alibi=True, rope={"rope_type": "nope"}, layer_pattern="LG", window=10,
                     sinks=3),
}  # fmt: skip
CASES = {  # mesh, model, strategy, balance: both strategies, both layouts, n in {2, 4, 8}
    "fsdp2-tensor2-seq2-ring-zigzag": (
        {"fsdp": 2, "tensor": 2, "sequence": 2}, "rope-GLC", "ring", "zigzag"),
    "data2-seq4-allgather-none": ({"data": 2, "sequence": 4}, "alibi-LG", "all_gather", "none"),
    "seq8-allgather-zigzag": ({"sequence": 8}, "rope-GLC", "all_gather", "zigzag"),
    "seq8-ring-none": ({"sequence": 8}, "alibi-LG", "ring", "none"),
}  # fmt: skip


def _config(model, strategy="all_gather", balance="zigzag", mesh=None):
    config = tiny.get_config("test")
    config.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, n_layers=2,
                        context_parallel=strategy, context_parallel_balance=balance)  # fmt: skip
    config.model.update(MODELS[model])
    config.mesh.shape.update({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **(mesh or {})})
    config.train.batch_size = 4
    return config


def _mesh(config):
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    devices = jax.devices()[: int(np.prod([v for v in config.mesh.shape.values()]))]
    validate(config, num_devices=len(devices))
    return sharding.make_mesh(mesh_cfg, devices), mesh_cfg.rules


def _batch(seed=0):
    """4 rows of packed documents whose boundaries fall inside shards (T / 8 = 8 rows each)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 259, (4, T), dtype=np.int32)
    segment_ids = np.zeros((4, T), np.int32)
    positions = np.zeros((4, T), np.int32)
    for row, cuts in enumerate([[0, 13, 35, 60], [0, 30, 64], [0, 5, 19, 43, 62], [0, 64]]):
        for seg, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True), start=1):
            segment_ids[row, a:b], positions[row, a:b] = seg, np.arange(b - a)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def _grad_fn(config):
    """-> (params, f(batch) -> (loss sum, grads)) on the config's mesh."""
    mesh, rules = _mesh(config)
    apply, _, init = build_model(ModelConfig.from_config(config.model), mesh, rules, seed=0)
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)
    grads = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(apply, p, b)[0]))
    params = init()
    return lambda batch: jax.device_get(grads(params, device_batch(batch, batch_sharding)))


@pytest.fixture(scope="module")
def references():
    batch = _batch()
    return {name: _grad_fn(_config(name))(batch) for name in MODELS}


def _assert_close(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 got[1], want[1])  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_sequence_sharded_step_equals_single_device_and_documents_stay_apart(case, references):
    """Loss and every gradient equal the single-device ones; then the isolation probe: new
    tokens in one document (crossing shard boundaries) change no other document's loss or
    gradient, so nothing leaks across documents or shards."""
    mesh, model, strategy, balance = CASES[case]
    grads = _grad_fn(_config(model, strategy, balance, mesh))
    batch = _batch()
    _assert_close(grads(batch), references[model])

    probe = {k: v.copy() for k, v in batch.items()}
    rows = np.zeros((4, T), bool)  # documents 13:35 of row 0 and 19:43 of row 2
    rows[0], rows[2] = batch["segment_ids"][0] == 2, batch["segment_ids"][2] == 3
    probe["loss_mask"][rows] = 0.0
    before = grads(probe)
    probe["inputs"][rows] = (probe["inputs"][rows] + 7) % 256 + 3
    probe["targets"][rows] = (probe["targets"][rows] + 11) % 256 + 3
    after = grads(probe)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 after[1], before[1])  # fmt: skip


def test_train_step_on_a_sequence_sharded_mesh(references):
    """The jitted train step (shardings, donation) on data x sequence: its loss and gradient
    norm are the single-device ones."""
    config = _config("alibi-LG", "ring", "zigzag", {"data": 2, "sequence": 4})
    mesh, rules = _mesh(config)
    program = build_program(ModelConfig.from_config(config.model),
                            OptimConfig.from_config(config.optim, train_steps=8), mesh, rules,
                            grad_accum=1, seed=0)  # fmt: skip
    state = program.init_state(program.init_params())
    batch = _batch()
    _, metrics = program.train_step(state, device_batch(batch, program.batch_sharding))
    total, grads = references["alibi-LG"]
    count = batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["loss"]), total / count, rtol=1e-5)
    norm = np.sqrt(sum(np.sum(np.square(g / count)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)


def test_kernel_equals_dense_reference_for_bidirectional_patterns():
    """Patterns the decoder does not use (non-causal window with sinks, soft-capping, ALiBi,
    GQA) against the dense `xla` backend on the natural layout, forward and gradients; the
    ring (the strategy with the merge and the hand-written backward) in the zigzag layout."""
    strategy, balance = "ring", "zigzag"
    B, H, K, D, n = 2, 4, 2, 8, 4
    shape = (("data", 2), ("fsdp", 1), ("tensor", 1), ("sequence", n))
    mesh = sharding.make_mesh(sharding.MeshConfig(shape=shape))
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    segments = jnp.asarray(_batch()["segment_ids"][:B])
    positions = jnp.asarray(_batch()["positions"][:B])
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    kw = dict(alibi_slopes=slopes, softcap=5.0)

    def mask(seg, pos):
        return Mask(causal=False, window=7, sinks=2, q_segment_ids=seg, kv_segment_ids=seg,
                    q_positions=pos, kv_positions=pos)  # fmt: skip

    perm = sequence_layout.layout_permutation(balance, n, T)

    def sharded(q, k, v):
        out = cp.context_parallel_attention(
            q[:, perm], k[:, perm], v[:, perm], mask=mask(segments[:, perm], positions[:, perm]),
            mesh=mesh, rules=sharding.DEFAULT_RULES, strategy=strategy, balance=balance,
            block=4, **kw,
        )  # fmt: skip
        return out[:, np.argsort(perm)]

    def dense(q, k, v):
        return attention(q, k, v, mask=mask(segments, positions), implementation="xla", **kw)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    got = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_zigzag_balances_causal_work_and_windows_skip_tiles():
    """Tiles (hence attention FLOPs) per device, from the same tables the kernel runs: zigzag
    within 10% across devices, the contiguous layout ~2x (max over mean); a window w costs
    O(T w / n) per device."""
    causal = Mask()
    for strategy in cp.STRATEGIES:
        zig = cp.tiles_per_device(causal, strategy=strategy, balance="zigzag", n=8, T=8192)
        flat = cp.tiles_per_device(causal, strategy=strategy, balance="none", n=8, T=8192)
        assert zig.max() / zig.min() <= 1.1, zig
        assert flat.max() / flat.mean() > 1.7, flat
        assert zig.sum() == pytest.approx(flat.sum(), rel=0.1)  # same total work, spread
        window = cp.tiles_per_device(Mask(window=512), strategy=strategy, balance="zigzag",
                                     n=8, T=8192)  # fmt: skip
        # 4 query tiles of 256 rows per device, each meets at most 3 key tiles
        assert window.max() <= 3 * 4 < zig.max() / 5, (window, zig)


def _temp_bytes(n, strategy):
    config = _config("rope-GLC", strategy, "zigzag", {"sequence": n})
    config.model.update(d_model=128, n_heads=8, n_kv_heads=4, head_dim=16, mlp_dim=512,
                        n_layers=2, layer_pattern="G")  # fmt: skip
    config.model.max_position_embeddings = config.data.seq_len = 4096
    config.train.batch_size = 1
    mesh, rules = _mesh(config)
    program = build_program(ModelConfig.from_config(config.model),
                            OptimConfig.from_config(config.optim, train_steps=8), mesh, rules,
                            grad_accum=1, seed=0)  # fmt: skip
    batch = {k: jax.ShapeDtypeStruct((1, 4096), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=program.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}  # fmt: skip
    compiled = program.train_step.lower(program.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


def test_ring_memory_falls_as_one_over_n_and_never_gathers_keys():
    """Compiled train step at T = 4096 (one device vs ring over 4; benchmarks/context_parallel.py
    shows n = 2, 8): temporary memory per device <= 1.3 / n of one device's; the HLO holds no
    all-gather (K/V only ever move as one shard, by collective-permute)."""
    single, _ = _temp_bytes(1, "ring")
    temp, hlo = _temp_bytes(4, "ring")
    assert temp <= 1.3 * single / 4, (temp, single)
    assert "collective-permute" in hlo
    gathers = [line for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]
    assert not gathers, gathers[:3]


def test_evaluation_scores_on_a_sequence_sharded_mesh():
    """The evaluation scorer on a data x sequence mesh (a window length that does not divide
    into 2n chunks is padded) gives the single-device per-token losses."""
    rng = np.random.default_rng(3)
    inputs = rng.integers(3, 259, (2, 50), dtype=np.int32)
    targets = np.roll(inputs, -1, axis=1)
    losses = []
    for mesh_shape in ({}, {"data": 2, "sequence": 4}):
        config = _config("alibi-LG", "all_gather", "zigzag", mesh_shape)
        mesh, rules = _mesh(config)
        apply, _, init = build_model(ModelConfig.from_config(config.model), mesh, rules, seed=0)
        batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)
        losses.append(make_scorer(apply, init(), batch_sharding=batch_sharding)(inputs, targets)[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,key", [
    ({"data.seq_len": 60}, "data.seq_len"),  # not a multiple of 2 x 4 (zigzag)
    ({"model.attention_impl": "xla"}, "model.attention_impl"),
    ({"model.context_parallel": "ulysses"}, "model.context_parallel"),
    ({"model.context_parallel_balance": "striped"}, "model.context_parallel_balance"),
])  # fmt: skip
def test_validate_names_the_context_parallel_key(overrides, key):
    config = _config("rope-GLC", mesh={"data": 2, "sequence": 4})
    for dotted, value in overrides.items():
        group, name = dotted.split(".")
        config[group][name] = value
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(config, num_devices=8)
    if key == "data.seq_len":  # 60 is a multiple of 4: fine without zigzag
        config.model.context_parallel_balance = "none"
        validate(config, num_devices=8)


def test_layout_permutation_round_trips_on_the_mesh():
    """to_layout / from_layout (two ppermutes each) agree with the static permutation."""
    mesh, rules = _mesh(_config("rope-GLC", mesh={"sequence": 4}))
    x = jnp.arange(2 * T).reshape(2, T)
    with sharding.use_mesh(mesh, rules):
        there = jax.jit(lambda x: sequence_layout.to_layout(x, ("batch", "length")))(x)
        back = jax.jit(lambda x: sequence_layout.from_layout(x, ("batch", "length")))(there)
    np.testing.assert_array_equal(there, x[:, sequence_layout.layout_permutation("zigzag", 4, T)])
    np.testing.assert_array_equal(back, x)


def test_all_gather_runs_splash_per_device_and_refuses_the_ring():
    """all_gather with splash as the local kernel (Pallas interpreter; TPU's choice): one kernel
    whose mask tables are split over the query rows, on data x tensor x sequence in the zigzag
    layout, packed documents crossing shards, window + soft-cap + GQA: output and gradients
    equal the dense reference. The ring and ALiBi refuse splash, saying why."""
    B, T, H, K, D, n = 2, 512, 4, 2, 16, 2
    mesh = sharding.make_mesh(
        sharding.MeshConfig(shape=(("data", 2), ("fsdp", 1), ("tensor", 2), ("sequence", n)))
    )
    rng = np.random.default_rng()
    q, w = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(B, T, K, D)).astype(np.float32) for _ in range(2))
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for row, cuts in enumerate([[0, 100, 300, T], [0, 260, T]]):
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            seg[row, a:b], pos[row, a:b] = i + 1, np.arange(b - a)

    def mask(seg, pos):
        seg, pos = jnp.asarray(seg), jnp.asarray(pos)
        return Mask(
            window=70, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos
        )

    perm = sequence_layout.layout_permutation("zigzag", n, T)
    kw = dict(mesh=mesh, rules=sharding.DEFAULT_RULES, softcap=4.0)

    def sharded(q, k, v):
        out = cp.context_parallel_attention(
            q[:, perm],
            k[:, perm],
            v[:, perm],
            mask=mask(seg[:, perm], pos[:, perm]),
            local_kernel="splash",
            interpret=True,
            **kw,
        )
        return out[:, np.argsort(perm)]

    def dense(q, k, v):
        return attention(q, k, v, mask=mask(seg, pos), softcap=4.0, implementation="xla")

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    got = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    for strategy, extra, why in [
        ("ring", {}, "not differentiable"),
        ("all_gather", {"alibi_slopes": jnp.ones(H)}, "ALiBi"),
    ]:
        with pytest.raises(ValueError, match=why):
            cp.context_parallel_attention(
                q,
                k,
                v,
                mask=mask(seg, pos),
                strategy=strategy,
                local_kernel="splash",
                interpret=True,
                **kw,
                **extra,
            )
