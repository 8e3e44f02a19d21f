"""The reproduction study end to end on its `quick` variant (machinery, not thresholds), and
exact resume of a staged schedule inside a stage and at a stage boundary.

The training runs go to subprocesses on one CPU device; they inherit the test run's persistent
compilation cache (tests/conftest.py), so the resumed runs reuse the first run's compiled steps,
which is most of their cost.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import study as study_config
from configs import tiny
from ctxext_jax import stages, study
from ctxext_jax.errors import ConfigError
from ctxext_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """`python -m ctxext_jax.study --config configs/study.py:quick` once: (config, workdir)."""
    workdir = tmp_path_factory.mktemp("study")
    _run(["-m", "ctxext_jax.study", "--config", "configs/study.py:quick",
          "--workdir", str(workdir)])  # fmt: skip
    return study_config.get_config("quick"), workdir


def test_quick_study_writes_the_schema_report_and_plots(quick_study):
    config, workdir = quick_study
    results = json.loads((workdir / "results.json").read_text())
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
    report = (workdir / "report.md").read_text()
    assert "Acceptance checks" in report and "yarn_finetune" in report
    for plot in ("ppl_vs_length.png", "retrieval_vs_length.png"):
        assert (workdir / plot).stat().st_size > 0
    assert list(workdir.glob("heatmap_*.png"))


def test_quick_study_run_again_reuses_every_arm(quick_study, monkeypatch):
    config, workdir = quick_study
    before = json.loads((workdir / "results.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("the second run should reuse every arm")

    monkeypatch.setattr(study, "train_and_evaluate", refuse)
    monkeypatch.setattr(study, "evaluate_arm", refuse)
    assert study.run_study(config, str(workdir))["runs"] == before["runs"]


def test_quick_study_in_two_workers_matches_one_process(quick_study, tmp_path):
    """`study.workers=2`: the base run, then both arms at once in pinned worker processes;
    every number as the one-process study's, each job's output in its own log."""
    config, single = quick_study
    _run(["-m", "ctxext_jax.study", "--config", "configs/study.py:quick",
          "--workdir", str(tmp_path), "--config.study.workers=2"])  # fmt: skip
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    expected = json.loads((single / "results.json").read_text())["runs"]
    assert [list(run["arms"]) for run in runs] == [list(run["arms"]) for run in expected]
    for run, want in zip(runs, expected, strict=True):
        for name, arm in run["arms"].items():
            for measure in ("ppl", "ppl_repeat", "retrieval"):
                np.testing.assert_allclose(list(arm[measure].values()),
                                           list(want["arms"][name][measure].values()),
                                           rtol=1e-3, err_msg=f"{name} {measure}")  # fmt: skip
    for name in config.study.arms:
        log = (tmp_path / "seed0" / name / "study.log").read_text()
        assert f"evaluating {name}" in log


def test_study_workers_refuse_a_bad_count():
    config = study_config.get_config("quick")
    config.study.workers = 0
    with pytest.raises(ConfigError, match="study.workers: 0"):
        study.check_study(config)


def test_study_configs_validate_and_errors_name_the_key():
    for variant in ("default", "short", "gpu"):  # every arm's training config is validated
        study.check_study(study_config.get_config(variant))
    gpu = study_config.get_config("gpu")
    assert gpu.base.data.seq_len >= 2048 and gpu.study.trials * len(gpu.study.depths) >= 50
    assert set(gpu.study.arms) >= {"base", "yarn_zeroshot", "yarn_finetune"}
    config = study_config.get_config("quick")
    config.study.arms = ("base", "nonesuch")
    with pytest.raises(ConfigError, match="study.arms: 'nonesuch'"):
        study.check_study(config)
    config = study_config.get_config("quick")
    config.arms.yarn_finetune.overrides.optim.lr = -1.0
    with pytest.raises(ConfigError, match="arms.yarn_finetune: optim.lr"):
        study.check_study(config)


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


RESUME_FROM = (4, 3)  # inside stage 2, and at the boundary (the end of stage 1)


def staged_runs(root: str) -> None:
    """Straight through, then resumed from each step of RESUME_FROM (in a subprocess)."""
    from ctxext_jax.train import train_and_evaluate

    config = _staged_config()
    straight = os.path.join(root, "straight")
    train_and_evaluate(config, straight)  # saves at 2, 3 (the stage end), 4 and 6
    for keep_until in RESUME_FROM:
        resumed = os.path.join(root, f"from{keep_until}")
        shutil.copytree(straight, resumed)
        for name in os.listdir(os.path.join(resumed, "checkpoints")):
            if name.isdigit() and int(name) > keep_until:
                shutil.rmtree(os.path.join(resumed, "checkpoints", name))
        open(os.path.join(resumed, "metrics.jsonl"), "w").close()
        train_and_evaluate(config, resumed)


def test_stages_resume_exactly_inside_and_at_the_boundary(tmp_path):
    plan = stages.plan_stages(_staged_config())
    assert [(s.start, s.end) for s in plan] == [(0, 3), (3, 6)]
    assert plan[1].config.model.max_position_embeddings == 32
    assert plan[1].config.data.seed == plan[0].config.data.seed + 1
    _run(["-c", "import sys; sys.path.insert(0, 'tests'); import test_study; "
          f"test_study.staged_runs({str(tmp_path)!r})"])  # fmt: skip
    losses = {m["step"]: m["loss"] for m in read_metrics(str(tmp_path / "straight")) if "loss" in m}
    assert sorted(losses) == list(range(1, 7))
    for keep_until in RESUME_FROM:
        metrics = read_metrics(str(tmp_path / f"from{keep_until}"))
        again = {m["step"]: m["loss"] for m in metrics if "loss" in m}
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
    config.train.stages = (dict(steps=3), dict(steps=3, lr=-1.0))
    with pytest.raises(ConfigError, match=r"train.stages\[1\]: optim.lr"):
        from ctxext_jax.config import validate

        validate(config)
