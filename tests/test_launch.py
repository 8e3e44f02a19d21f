"""Launch helpers: the sweep expands its grid; the shell launchers parse; the 1B recipe is valid."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import llama_1b
from ctxext_jax.config import validate

REPO = Path(__file__).resolve().parents[1]


def test_sweep_prints_one_run_per_grid_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/sweep.py", "--config", "configs/tiny.py", "--root", str(tmp_path),
         "--grid", "optim.lr=1e-3,3e-4", "--grid", "model.rope.rope_theta=1e4,4e4", "--print",
         "--", "--config.train.steps=5"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert f"--workdir {tmp_path}/lr-3e-4_rope_theta-4e4" in lines[-1]
    assert all(line.endswith("--config.train.steps=5") for line in lines)


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_shell_launchers_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


@pytest.mark.parametrize("arg", ["base", "extend", "cpu"])
def test_1b_recipe_is_valid(arg):
    validate(llama_1b.get_config(arg), num_devices=8)
