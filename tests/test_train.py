"""The training backbone: sharded steps equal single-device ones, exact resume, loss goes down."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from ctxext_jax import sharding
from ctxext_jax.config import validate
from ctxext_jax.metrics import read_metrics
from ctxext_jax.model import ModelConfig
from ctxext_jax.optim import OptimConfig, learning_rate_schedule
from ctxext_jax.train import build_program, device_batch, train_and_evaluate


def _random_batch(rng, batch, seq_len, vocab):
    """Rows of two or three packed documents each, with per-document positions."""
    inputs = rng.integers(3, vocab, (batch, seq_len), dtype=np.int32)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        cuts = np.sort(
            rng.choice(np.arange(8, seq_len - 8), size=rng.integers(1, 3), replace=False)
        )
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [seq_len - 4]])  # the last 4 tokens are padding
        for seg, (a, b) in enumerate(zip(starts, ends, strict=True), start=1):
            segment_ids[row, a:b] = seg
            positions[row, a:b] = np.arange(b - a)
    targets = np.roll(inputs, -1, axis=1)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def _program(config, mesh_shape, devices):
    config.mesh.shape.update(mesh_shape)
    validate(config, num_devices=len(devices))
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    return build_program(
        ModelConfig.from_config(config.model),
        OptimConfig.from_config(config.optim, train_steps=config.train.steps),
        mesh,
        mesh_cfg.rules,
        grad_accum=config.train.grad_accum,
        seed=0,
    )


def _steps(program, batches):
    """-> [(state before, state after, metrics)] on the host, from a fresh init."""
    state = program.init_state(program.init_params())
    out = []
    for batch in batches:
        before = jax.device_get(state)
        state, metrics = program.train_step(state, device_batch(batch, program.batch_sharding))
        out.append((before, jax.device_get(state), jax.device_get(metrics)))
    return out


def _run(config, mesh_shape, batches, devices, program=None):
    program = program or _program(config, mesh_shape, devices)
    steps = _steps(program, batches)
    return [float(m["loss"]) for _, _, m in steps], steps[-1][1]["params"]


@pytest.fixture(scope="module")
def step_config():
    config = tiny.get_config("test")
    config.model.layer_pattern = "GL"
    config.model.window = 24
    return config


@pytest.fixture(scope="module")
def step_batches():
    rng = np.random.default_rng(0)
    return [_random_batch(rng, 8, 64, 259) for _ in range(2)]


@pytest.fixture(scope="module")
def single_device_program(step_config):
    single = {"data": 1, "fsdp": 1, "tensor": 1}
    return _program(step_config.copy_and_resolve_references(), single, jax.devices()[:1])


@pytest.fixture(scope="module")
def single_device_run(step_batches, single_device_program):
    return _run(None, None, step_batches, None, single_device_program)


@pytest.mark.parametrize(
    "mesh_shape",
    [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 1, "fsdp": 4, "tensor": 2},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ],
    ids=["data8", "fsdp8", "fsdp4-tensor2", "data2-fsdp2-tensor2"],
)
def test_sharded_step_equals_single_device(step_config, step_batches, single_device_run,
                                           mesh_shape):  # fmt: skip
    reference_losses, reference = single_device_run
    losses, params = _run(step_config.copy_and_resolve_references(), mesh_shape, step_batches,
                          jax.devices())  # fmt: skip
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, reference)  # fmt: skip


@pytest.mark.parametrize("accum,mesh_shape,devices", [
    (4, {"data": 1, "fsdp": 1, "tensor": 1}, 1),
    (2, {"data": 2, "fsdp": 2, "tensor": 1}, 4),
])  # fmt: skip
def test_gradient_accumulation_equals_whole_batch(step_config, step_batches, single_device_run,
                                                  accum, mesh_shape, devices):  # fmt: skip
    config = step_config.copy_and_resolve_references()
    config.train.grad_accum = accum
    losses, params = _run(config, mesh_shape, step_batches, jax.devices()[:devices])
    reference_losses, reference = single_device_run
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, reference)  # fmt: skip


def test_a_skipped_step_applies_nothing_and_the_schedule_follows_the_step(
    step_config, step_batches, single_device_program
):
    """A NaN loss weight at step 2 makes its loss non-finite: parameters and optimizer state
    (Adam's moments and count) come out of it bit-identical, the learning rate logged at each
    step is the schedule's at that step, and step 3 makes the update the run without the bad
    batch makes at its step 2, scaled by the two steps' learning rates (AdamW's update is
    linear in it): the schedule did not fall behind."""
    good, good2 = step_batches
    bad = dict(good2, loss_mask=good2["loss_mask"].copy())
    bad["loss_mask"][3, 10] = np.nan
    skipped = _steps(single_device_program, [good, bad, good2])
    straight = _steps(single_device_program, [good, good2])

    assert [int(m["nonfinite"]) for _, _, m in skipped] == [0, 1, 0]
    assert not np.isfinite(skipped[1][2]["loss"])
    before, after, _ = skipped[1]
    assert int(after["step"]) == int(before["step"]) + 1
    unchanged = lambda state: (state["params"], state["opt_state"])  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, unchanged(after), unchanged(before))
    schedule = learning_rate_schedule(
        OptimConfig.from_config(step_config.optim, train_steps=step_config.train.steps)
    )
    lrs = [float(m["learning_rate"]) for _, _, m in skipped]
    np.testing.assert_allclose(lrs, [float(schedule(s)) for s in range(3)], rtol=1e-6)
    assert lrs[2] != lrs[1] > 0  # the test tells the two schedules apart

    def update(before, after):
        return jax.tree.map(np.subtract, after["params"], before["params"])

    want = jax.tree.map(lambda u: u * (lrs[2] / lrs[1]), update(*straight[1][:2]))
    # atol: float32 rounding of parameters near 1 (the updates are ~1e-3)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-7),
                 update(*skipped[2][:2]), want)  # fmt: skip


def _run_config(steps):
    config = tiny.get_config("test")
    config.train.steps = steps
    config.optim.decay_steps = 8
    config.checkpoint.every = 4
    config.eval.update(every=4, batches=2)
    return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 uninterrupted steps of the embedded default (tiny:test), evaluated at 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    final = train_and_evaluate(_run_config(8), workdir)
    return workdir, final


def test_resume_gives_the_same_losses(straight_run, tmp_path):
    """4 steps, stop, restart the same run to step 8 == 8 uninterrupted steps, also when the
    restart runs on another mesh (the checkpoint is resharded onto it)."""
    train_and_evaluate(_run_config(4), str(tmp_path))
    resharded = _run_config(8)
    resharded.mesh.shape.update(data=1, fsdp=4, tensor=2)
    train_and_evaluate(resharded, str(tmp_path))
    straight = {m["step"]: m["loss"] for m in read_metrics(straight_run[0]) if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in read_metrics(str(tmp_path)) if "loss" in m}
    assert sorted(resumed) == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in range(5, 9)],
                               [straight[s] for s in range(5, 9)], rtol=1e-5)  # fmt: skip


def test_embedded_run_lowers_validation_loss_and_writes_artifacts(straight_run):
    workdir, final = straight_run
    records = read_metrics(workdir)
    evals = [m["eval_loss"] for m in records if "eval_loss" in m]
    assert len(evals) == 2
    assert evals[-1] < evals[0] - 0.2, evals
    assert evals[0] < np.log(259)  # below a uniform guess over the byte vocabulary
    assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]), rel=1e-5)
    assert list(Path(workdir, "tensorboard").glob("events.out.tfevents.*"))
    assert {m["step"] for m in records} == set(range(1, 9))
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu"} <= set(records[-2])


def test_init_from_changes_length_and_rope(straight_run, tmp_path):
    """Weights carry over to a 4x longer YaRN run: its first loss is far below a fresh model's."""
    config = _run_config(1)
    config.data.seq_len = config.model.max_position_embeddings = 256
    config.model.rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64}  # fmt: skip
    config.checkpoint.init_from = os.path.relpath(straight_run[0])  # as typed on a command line
    config.eval.update(every_long=1, long_lengths=(512,), long_passkey_trials=1)
    final = train_and_evaluate(config, str(tmp_path))
    assert {"ppl_len_512", "passkey_acc_len_512"} <= set(final)  # the long-context check ran
    first = read_metrics(str(tmp_path))[0]
    assert first["step"] == 1
    fresh_first = read_metrics(straight_run[0])[0]["loss"]
    assert first["loss"] < fresh_first - 0.5


def test_damaged_checkpoint_is_one_short_error(straight_run, tmp_path):
    """A truncated array file in the latest step: exit 2, one line naming the step, no traceback
    (Orbax's background loop once printed one at exit) and no multi-kB TensorStore spec."""
    import shutil
    import subprocess
    import sys

    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    data_file = next(p for p in (workdir / "checkpoints/8/params/d").iterdir() if p.is_file())
    data_file.write_bytes(data_file.read_bytes()[:10])
    result = subprocess.run(
        [sys.executable, "-m", "ctxext_jax.train", "--config", "configs/tiny.py:test",
         "--workdir", str(workdir), "--config.train.steps=9", "--config.optim.decay_steps=8",
         "--config.eval.batches=2"],
        capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""), timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint step 8 "), result.stderr
    assert "Traceback" not in result.stderr and len(lines[0]) < 1000


def test_divergence_skips_updates_and_stops_with_finite_checkpoints(tmp_path):
    """optim.lr=1e12: the first blown-up steps are skipped (counted, printed), the run stops
    after train.max_nonfinite of them with one error naming the steps and the learning rate
    (exit code 3), and every checkpoint left holds finite parameters."""
    import orbax.checkpoint as ocp

    from ctxext_jax.divergence import NonFiniteError

    config = _run_config(8)
    config.optim.lr = 1e12
    config.checkpoint.update(every=2, keep=1)
    config.eval.every = 100  # no evaluation before the run stops
    with pytest.raises(NonFiniteError) as error:
        train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert error.value.exit_code == 3 and "\n" not in message
    assert message.startswith("train.max_nonfinite: steps ") and "optim.lr=1e+12" in message
    records = [m for m in read_metrics(str(tmp_path)) if "skipped_steps" in m]
    assert records[-1]["skipped_steps"] >= 1 and not np.isfinite(records[-1]["loss"])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "the last finite checkpoint was deleted"
    for step in steps:
        params = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "params")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step


def test_resume_refuses_a_changed_trajectory(straight_run, tmp_path):
    """The config saved with the checkpoint is compared on resume: a new learning rate is
    refused with the key named, before any step; --allow_config_change records it."""
    import json
    import shutil

    from ctxext_jax.config import ConfigError, trajectory_changes

    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    changed = _run_config(9)
    changed.optim.lr = 1e-3
    with pytest.raises(ConfigError, match=r"^optim.lr: the checkpoint at step 8 .*0.003 -> 0.001"):
        train_and_evaluate(changed, str(workdir))
    assert max(m["step"] for m in read_metrics(str(workdir))) == 8
    train_and_evaluate(changed, str(workdir), allow_config_change=True)
    record = json.loads((workdir / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 8 and record["changes"] == {"optim.lr": [0.003, 0.001]}
    assert max(m["step"] for m in read_metrics(str(workdir))) == 9
    saved = json.loads(_run_config(8).to_json_best_effort())
    same = _run_config(16)  # optim.decay_steps=8 keeps the schedule: training longer is fine
    same.eval.every, same.mesh.shape.data = 2, 2
    assert trajectory_changes(saved, same) == {}
    longer = _run_config(16)
    longer.optim.decay_steps, longer.data.seed, longer.model.rope.rope_theta = 0, 1, 5e5
    assert set(trajectory_changes(saved, longer)) == {
        "optim.decay_steps", "data.seed", "model.rope"
    }  # fmt: skip


def test_export_carries_the_byte_tokenizer(straight_run, tmp_path):
    """A run on the bytes tokenizer exports a tokenizer.json that tokenizes the same way, so
    `evaluate --checkpoint <export>` works on the exported folder."""
    from ctxext_jax import convert
    from ctxext_jax.data import ByteTokenizer, make_tokenizer
    from ctxext_jax.evals.suite import EvalOptions
    from ctxext_jax.evaluate import evaluate

    out = convert.export_checkpoint(straight_run[0], str(tmp_path / "hf"))
    text = "déjà vu\n\t<s> 日本 "
    assert make_tokenizer(f"hf:{out}").encode(text) == ByteTokenizer().encode(text)
    options = EvalOptions(lengths=(64,), metrics=("ppl",), ppl_tokens=256)
    results = evaluate(tiny.get_config("test"), out, str(tmp_path / "eval"), options,
                       progress=False)  # fmt: skip
    assert results["data"]["tokenizer"] == f"hf:{out}" and np.isfinite(
        results["perplexity"][0]["ppl"]
    )
