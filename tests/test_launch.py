"""Launchers: they parse; tpu_pod.sh and slurm.sbatch issue the right commands (stub gcloud /
srun / scontrol on PATH record their calls); the 1B recipe is valid."""

import json
import os
import signal
import subprocess
import sys
import time
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


# --- the launchers against stub gcloud / srun / scontrol / python that record their calls ----
STUB = """#!{python}
import json, os, signal, subprocess, sys, time
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
log = os.environ["STUB_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"tool": name, "args": args,
                        "procid": os.environ.get("SLURM_PROCID")}}) + "\\n")
state = os.path.join(os.path.dirname(log), "qr_state")
if name == "gcloud":
    if args[:3] == ["compute", "tpus", "queued-resources"] and args[3] == "describe":
        if not os.path.exists(state):
            sys.exit(1)
        print(open(state).read())
    elif args[:3] == ["compute", "tpus", "queued-resources"] and args[3] == "create":
        open(state, "w").write("ACTIVE")
    elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
        sys.exit(0 if os.environ.get("STUB_VM") else 1)
elif name == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("gpu-node-a\\ngpu-node-b")
elif name == "srun":
    if os.environ.get("STUB_SRUN_WAIT"):  # a long run, until the TERM the script passes on
        signal.signal(signal.SIGTERM, lambda *_: (open(log, "a").write('"srun got TERM"\\n'),
                                                  sys.exit(0)))
        open(os.environ["STUB_SRUN_WAIT"], "w").write("running")
        time.sleep(60)
    command = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
    for rank in range(int(os.environ["SLURM_NTASKS"])):
        subprocess.run(command, check=True, env=dict(os.environ, SLURM_PROCID=str(rank)))
"""


def _stubs(tmp_path, *tools):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text(STUB.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log))
    return env, log


def _run(script, *args, env):
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


TRAIN_ARGS = ["--config", "configs/llama_1b.py", "--workdir", "/mnt/gcs/runs/my run"]


def test_tpu_pod_creates_copies_installs_starts_and_follows(tmp_path):
    env, log = _stubs(tmp_path, "gcloud")
    env.update(ACCELERATOR_TYPE="v5litepod-64", POLL_SECONDS="0")
    result = _run("tpu_pod.sh", "pod", "us-west4-a", *TRAIN_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    calls = [c["args"] for c in _calls(log)]
    zone = ["--zone", "us-west4-a"]
    create = next(c for c in calls if c[3:4] == ["create"])
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "pod"]
    assert "--accelerator-type" in create and "v5litepod-64" in create and "us-west4-a" in create
    scp = next(c for c in calls if c[3] == "scp")
    assert scp[-1] == "--worker=all" and scp[5] == "pod:ctxext_jax.tar.gz"
    ssh = [c for c in calls if c[3] == "ssh"]
    assert [c[4:7] for c in ssh] == [["pod", *zone]] * 3
    assert [c[7] for c in ssh] == ["--worker=all", "--worker=all", "--worker=0"]
    assert "pip install -q -e . 'jax[tpu]" in ssh[0][-1]
    start = ssh[1][-1]
    assert "python -m ctxext_jax.train --distributed=yes --config configs/llama_1b.py" in start
    assert "--workdir /mnt/gcs/runs/my\\ run" in start and "nohup" in start
    assert "tail -n +1 -F --pid=$(cat ~/ctxext_jax/train.pid) ~/ctxext_jax/train.log" in ssh[2][-1]
    # The order: create, then copy, install, start, follow host 0.
    order = [c[3] for c in calls if c[3] in ("create", "scp", "ssh")]
    assert order == ["create", "scp", "ssh", "ssh", "ssh"]
    assert "kill -TERM" in result.stdout and "queued-resources delete pod" in result.stdout


def test_tpu_pod_reuses_a_running_vm_and_refuses_without_a_type(tmp_path):
    env, log = _stubs(tmp_path, "gcloud")
    result = _run("tpu_pod.sh", "pod", "zone-a", *TRAIN_ARGS, env=env)
    assert result.returncode == 2 and "set ACCELERATOR_TYPE" in result.stderr
    assert not any(c["args"][3] in ("create", "scp", "ssh") for c in _calls(log))
    log.unlink()
    result = _run("tpu_pod.sh", "pod", "zone-a", *TRAIN_ARGS, env={**env, "STUB_VM": "1"})
    assert result.returncode == 0, result.stderr
    assert not any(c["args"][3] == "create" for c in _calls(log))
    assert "tpu-vm delete pod" in result.stdout


def test_slurm_runs_one_process_per_gpu_with_the_allocation_coordinator(tmp_path):
    env, log = _stubs(tmp_path, "srun", "scontrol", "python")
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_NTASKS="2")
    result = _run("slurm.sbatch", *TRAIN_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    calls = _calls(log)
    srun = next(c["args"] for c in calls if c["tool"] == "srun")
    assert "--gpus-per-task=1" in srun and "--kill-on-bad-exit=1" in srun
    trainers = [c for c in calls if c["tool"] == "python"]
    port = 20000 + 4242 % 20000
    for rank, call in enumerate(trainers):
        assert call["args"] == ["-m", "ctxext_jax.train", "--distributed=yes",
                                f"--coordinator_address=gpu-node-a:{port}", "--num_processes=2",
                                f"--process_id={rank}", *TRAIN_ARGS]  # fmt: skip
    assert len(trainers) == 2
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --gpus-per-node=8" in text


def test_slurm_passes_sigterm_on_and_requeues(tmp_path):
    env, log = _stubs(tmp_path, "srun", "scontrol", "python")
    running = tmp_path / "running"
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NTASKS="1",
               STUB_SRUN_WAIT=str(running))  # fmt: skip
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", *TRAIN_ARGS], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    deadline = time.time() + 30
    while not running.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    lines = log.read_text().splitlines()
    assert '"srun got TERM"' in lines
    assert {"tool": "scontrol", "args": ["requeue", "7"], "procid": None} in [
        json.loads(line) for line in lines if line.startswith("{")
    ]
