"""The reproduction study end to end on its `quick` variant (machinery, not thresholds), and
exact resume of a staged schedule inside a stage and at a stage boundary."""

import json
import shutil

import numpy as np
import pytest

from configs import study as study_config
from configs import tiny
from ctxext_jax import stages, study
from ctxext_jax.metrics import read_metrics
from ctxext_jax.train import train_and_evaluate


def test_quick_study_writes_the_schema_and_resumes(tmp_path, monkeypatch):
    config = study_config.get_config("quick")
    results = study.run_study(config, str(tmp_path))
    L = results["base_length"]
    assert L == config.base.data.seq_len
    lengths = {str(f * L) for f in config.study.factors}
    assert [run["seed"] for run in results["runs"]] == list(config.study.seeds)
    for run in results["runs"]:
        assert set(run["arms"]) == set(config.study.arms)
        for arm in run["arms"].values():
            assert set(arm["ppl"]) == set(arm["retrieval"]) == lengths
            assert all(np.isfinite(v) and v > 1 for v in arm["ppl"].values())
            assert all(0 <= v <= 1 for v in arm["retrieval"].values())
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    report = (tmp_path / "report.md").read_text()
    assert "Acceptance checks" in report and "window_sinks" in report
    for plot in ("ppl_vs_length.png", "retrieval_vs_length.png"):
        assert (tmp_path / plot).stat().st_size > 0
    assert list(tmp_path.glob("heatmap_*.png"))

    # Run again: everything is reused, nothing trains or evaluates.
    def refuse(*args, **kwargs):
        raise AssertionError("the second run should reuse every arm")

    monkeypatch.setattr(study, "train_and_evaluate", refuse)
    monkeypatch.setattr(study, "evaluate_arm", refuse)
    assert study.run_study(config, str(tmp_path))["runs"] == results["runs"]


def test_study_config_errors_name_the_key():
    config = study_config.get_config("quick")
    config.study.arms = ("base", "nonesuch")
    with pytest.raises(ValueError, match="nonesuch"):
        study.check_study(config)
    gpu = study_config.get_config("gpu")
    assert gpu.base.data.seq_len >= 2048 and set(gpu.study.arms) >= {"alibi", "staged", "pose"}


def _staged_config():
    config = tiny.get_config("test")
    config.model.update(d_model=32, mlp_dim=64, head_dim=8)
    config.data.seq_len = config.model.max_position_embeddings = 16
    config.train.steps = 6
    config.train.stages = (
        dict(steps=3, batch_size=8),
        dict(steps=3, seq_len=32, batch_size=8, lr=1e-3, warmup_steps=1,
             rope={"rope_type": "default", "rope_theta": 40000.0}),
    )  # fmt: skip
    config.checkpoint.update(every=2, keep=10)
    config.eval.update(every=100, batches=1, batch_size=8)
    return config


def test_stages_resume_exactly_inside_and_at_the_boundary(tmp_path):
    config = _staged_config()
    plan = stages.plan_stages(config)
    assert [(s.start, s.end) for s in plan] == [(0, 3), (3, 6)]
    assert plan[1].config.model.max_position_embeddings == 32
    straight = tmp_path / "straight"
    train_and_evaluate(config, str(straight))
    losses = {m["step"]: m["loss"] for m in read_metrics(str(straight)) if "loss" in m}
    assert sorted(losses) == list(range(1, 7))
    # Saved at 2, 3 (stage end), 4 and 6. Resume from 4 (inside stage 2) and from 3 (boundary).
    for keep_until in (4, 3):
        resumed = tmp_path / f"from{keep_until}"
        shutil.copytree(straight, resumed)
        for step_dir in (resumed / "checkpoints").iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > keep_until:
                shutil.rmtree(step_dir)
        (resumed / "metrics.jsonl").write_text("")
        train_and_evaluate(config, str(resumed))
        again = {m["step"]: m["loss"] for m in read_metrics(str(resumed)) if "loss" in m}
        assert sorted(again) == list(range(keep_until + 1, 7))
        np.testing.assert_allclose([again[s] for s in again], [losses[s] for s in again],
                                   rtol=1e-5)  # fmt: skip


def test_stage_errors_name_the_stage():
    config = _staged_config()
    config.train.steps = 5
    with pytest.raises(ValueError, match="train.steps=5 but train.stages add up to 6"):
        stages.plan_stages(config)
    config.train.steps = 6
    config.train.stages = (dict(steps=6, bogus=1),)
    with pytest.raises(ValueError, match=r"train.stages\[0\]: unknown keys \['bogus'\]"):
        stages.plan_stages(config)
