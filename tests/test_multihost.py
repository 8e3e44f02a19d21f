"""Several CPU processes on 127.0.0.1 stand in for a multi-host job (jax.distributed + gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, steps, processes=2, devices_per_process=4):
    port = _free_port()
    devices = f"--xla_force_host_platform_device_count={devices_per_process}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=devices)
    args = [sys.executable, "-m", "ctxext_jax.train", "--config", "configs/tiny.py:test",
            "--workdir", str(workdir), f"--config.train.steps={steps}",
            "--config.checkpoint.every=2", "--config.optim.decay_steps=6",
            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]  # fmt: skip
    procs = [
        subprocess.Popen(
            args + [f"--process_id={i}"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return outputs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    outputs = _launch(tmp_path, steps=4)
    assert "step 4/4" in outputs[0]
    assert "step 4/4" not in outputs[1]  # only process 0 prints and writes metrics
    step_dir = tmp_path / "checkpoints" / "4"
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    outputs = _launch(tmp_path, steps=6)
    assert "resumed from step 4" in outputs[0] and "resumed from step 4" in outputs[1]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 7))
    assert np.isfinite(list(losses.values())).all()
    assert losses[6] < losses[1]
