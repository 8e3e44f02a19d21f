"""Launch helpers: the shell launchers parse; the 1B recipe is valid."""

import subprocess
from pathlib import Path

import pytest

from configs import llama_1b
from ctxext_jax.config import validate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_shell_launchers_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


@pytest.mark.parametrize("arg", ["base", "extend", "cpu"])
def test_1b_recipe_is_valid(arg):
    validate(llama_1b.get_config(arg), num_devices=8)
