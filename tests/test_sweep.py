"""Sweeps from config files: point helpers, run names, up-front validation, the per-point
commands, and one real sweep (a point trains, a damaged one fails alone, a rerun skips the
finished one)."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ctxext_jax import sweep
from ctxext_jax.sweep import Plan, chain, point_names, product, zip

REPO = Path(__file__).resolve().parents[1]


def test_helpers_build_plain_override_dicts():
    lrs = sweep.sweep("optim.lr", [1e-3, 3e-4])
    assert lrs == [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]
    grid = product(lrs, sweep.sweep("model.rope.factor", [2.0, 4.0]))
    assert grid[1] == {"optim.lr": 1e-3, "model.rope.factor": 4.0} and len(grid) == 4
    assert zip(lrs, sweep.sweep("train.seed", [0, 1]))[1] == {"optim.lr": 3e-4, "train.seed": 1}
    assert len(chain(lrs, grid)) == 6
    with pytest.raises(ValueError, match="different lengths"):
        zip(lrs, sweep.sweep("train.seed", [0]))
    with pytest.raises(ValueError, match="both set 'optim.lr'"):
        product(lrs, lrs)


def test_names_are_readable_safe_unique_and_stable():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    points = [
        {"optim.lr": 1e-3, "model.rope": yarn},
        {"optim.lr": 3e-4, "model.rope": {"rope_type": "linear", "factor": 4.0}},
        {"data.files": "/data/a b/*.txt"},
        {"data.files": "/data/a_b/*.txt"},  # the same name once made safe
        {"model.rope.factor": 2.0, "model.local_rope.factor": 8.0, "x" * 200: 1},
    ]
    names = point_names(points)
    assert names[0] == "lr-0.001_rope-yarn-4-256"
    assert names[4].startswith("rope.factor-2_local_rope.factor-8_xxx") and len(names[4]) == 96
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9.+=,_-]{1,96}", n) for n in names), names
    assert names[2] != names[3] and names[3].startswith("files-_data_a_b_.txt-")
    assert point_names(points) == names  # stable: a function of the points alone
    assert point_names(list(reversed(points))) == list(reversed(names))


def _write_config(tmp_path, sweep_body: str) -> str:
    path = tmp_path / "exp.py"
    path.write_text(
        "from configs.tiny import get_config\n"
        "from ctxext_jax.sweep import sweep, product\n\n"
        f"def get_sweep(arg):\n    return {sweep_body}\n"
    )
    return f"{path}:test"


def test_every_point_is_validated_before_anything_runs(tmp_path):
    spec = _write_config(
        tmp_path,
        'product(sweep("optim.lr", [1e-3, -1.0]), sweep("model.n_kv_heads", [2, 3]))',
    )
    with pytest.raises(ValueError, match="3 of 4 sweep points are invalid") as e:
        Plan(spec, str(tmp_path / "root"), [])
    message = str(e.value)
    assert "lr--1_n_kv_heads-2: optim.lr: must be > 0" in message
    assert "lr-0.001_n_kv_heads-3: model.n_heads" in message
    assert not (tmp_path / "root").exists()
    spec = _write_config(tmp_path, 'sweep("optim.lrr", [1e-3])')
    with pytest.raises(ValueError, match="no config field 'optim.lrr'"):
        Plan(spec, str(tmp_path / "root"), [])
    spec = _write_config(tmp_path, 'sweep("optim.lr", [1e-3])')
    with pytest.raises(ValueError, match="--config.optim.lr is swept"):
        Plan(spec, str(tmp_path / "root"), ["--config.optim.lr=1"])


def test_print_emits_per_point_commands(tmp_path):
    plan = Plan("configs/rope_methods.py:test", str(tmp_path), ["--config.train.steps=3"])
    local = sweep.print_commands(plan, "local").splitlines()
    assert len(local) == 6
    args = shlex.split(local[5])
    assert args[:3] == ["python", "-m", "ctxext_jax.train"]
    assert "--config.model.alibi=True" in args and "--config.train.steps=3" in args
    assert '--config.model.rope={"rope_type": "nope"}' in args
    script = sweep.print_commands(plan, "slurm")
    assert "#SBATCH --array=0-5" in script and "#SBATCH --requeue" in script
    assert 'exec bash launch/slurm.sbatch "${args[@]}"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    tpu = sweep.print_commands(plan, "tpu").splitlines()
    assert all(line.startswith('launch/tpu_pod.sh "$TPU" "$ZONE" --config') for line in tpu)
    assert len(tpu) == 6


def test_shipped_sweeps_are_valid(tmp_path):
    plan = Plan("configs/tiny.py:extend", str(tmp_path), [])
    assert len(plan.points) == 9 and plan.names[0] == "lr-0.0003_factor-2"
    assert plan.configs[0].model.rope.rope_type == "yarn"
    plan = Plan("configs/rope_methods.py", str(tmp_path), [])
    kinds = [c.model.rope.rope_type for c in plan.configs]
    assert kinds == ["default", "linear", "ntk", "yarn", "dynamic", "nope"]
    assert plan.configs[-1].model.alibi and plan.configs[4].model.max_position_embeddings == 256


def _sweep(root, capsys, monkeypatch):
    """The sweep's main in this process (its points are subprocesses): -> (code, out, err)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = sweep.main(["--config", "configs/tiny.py:test", "--root", str(root), "--parallel", "2",
                       "--config.train.steps=2", "--config.optim.warmup_steps=1",
                       "--config.eval.every=2"])  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_runs_skips_finished_and_reports_failures(tmp_path, capsys, monkeypatch):
    plan = Plan("configs/tiny.py:test", str(tmp_path), [])
    first, second = (tmp_path / n for n in plan.names)
    # The second point has a damaged checkpoint: it fails, the first trains regardless.
    (second / "checkpoints" / "1" / "params").mkdir(parents=True)
    code, out, err = _sweep(tmp_path, capsys, monkeypatch)
    assert code == 1, out + err
    assert f"{second.name} (exit 2): {second}/train.log" in err
    assert "could not be restored" in (second / "train.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {p["name"]: p["status"] for p in summary["points"]}
    assert status == {first.name: "done", second.name: "failed (exit 2)"}
    assert summary["points"][0]["train_loss"] > 0 and summary["points"][0]["eval_loss"] > 0
    assert "| failed (exit 2) |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").stat().st_size > 0

    # The same command again: the finished point is skipped; the damaged one is retried.
    code, out, err = _sweep(tmp_path, capsys, monkeypatch)
    assert code == 1 and f"{second.name} (exit 2)" in err
    assert re.search(rf"{first.name}\s+finished: skip", out)
    assert re.search(rf"{second.name}\s+resume", out)
    assert f"{first.name}: started" not in out and f"{second.name}: started" in out
    config = json.loads((first / "config.json").read_text())
    assert config["model"]["rope"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    assert config["optim"]["lr"] == 3e-3
