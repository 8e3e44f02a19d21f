"""Multi-host: the global batch does not depend on the process count, each process reads only
its own documents, and CPU processes joined by jax.distributed (launch/local.sh) train the same
losses as one process, stop on SIGTERM at one step on every host, and resume on one process."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from configs import tiny
from ctxext_jax.data import BATCH_KEYS, DataConfig, pipeline
from ctxext_jax.data.streams import StreamCheckpointHandler, global_train_iterator, stream_count
from ctxext_jax.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


class _Recorded:
    """A document sequence that records which indices were read."""

    def __init__(self, documents, seen):
        self.documents, self.seen = documents, seen

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, i):
        self.seen.add(int(i))
        return self.documents[i]


def test_global_batch_is_independent_of_the_process_count(tmp_path, monkeypatch):
    texts = [f"document {i}: " + "lorem ipsum " * (i % 13 + 1) for i in range(90)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i:03d}.txt").write_text(text)
    cfg = DataConfig(dataset="files", files=str(tmp_path / "*.txt"))
    seen: dict[tuple[int, int], set] = {}
    open_split = pipeline.open_split
    current = {}

    def recording_open_split(cfg, split):
        documents, info = open_split(cfg, split)
        return _Recorded(documents, seen.setdefault(current["who"], set())), info

    monkeypatch.setattr(pipeline, "open_split", recording_open_split)

    def host(index, count):
        current["who"] = (index, count)
        return global_train_iterator(cfg, global_batch_size=8, seq_len=32, seed=3,
                                     process_index=index, process_count=count)  # fmt: skip

    one, two = host(0, 1), [host(0, 2), host(1, 2)]
    for _ in range(6):
        whole, parts = next(one), [next(it) for it in two]
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    # Each process read only its own documents; together they read what one process read.
    assert not seen[(0, 2)] & seen[(1, 2)]
    assert seen[(0, 2)] | seen[(1, 2)] == seen[(0, 1)]

    # The two processes' data states (one file per stream) resume on one process.
    step = epath.Path(tmp_path / "data")
    step.mkdir()
    for it in two:
        StreamCheckpointHandler().save(step, item=it)
    assert len(list(step.glob("stream_*-of-8.json"))) == stream_count(8) == 8
    restored = StreamCheckpointHandler().restore(step, item=host(0, 1))
    for _ in range(3):
        np.testing.assert_array_equal(next(restored)["inputs"], next(one)["inputs"])


STEPS = 12


def _train_args(workdir):
    return ["--config", "configs/tiny.py:test", "--workdir", str(workdir),
            f"--config.train.steps={STEPS}", f"--config.optim.decay_steps={STEPS}",
            "--config.checkpoint.every=100", "--config.eval.every=100"]  # fmt: skip


def _config():
    config = tiny.get_config("test")
    config.train.steps = config.optim.decay_steps = STEPS
    config.checkpoint.every = config.eval.every = 100
    return config


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # every step once: none repeated
    return np.array([r["loss"] for r in rows if "loss" in r])


def _logged_step_2(workdir) -> bool:
    metrics = workdir / "metrics.jsonl"
    return metrics.exists() and '"step": 2,' in metrics.read_text()


def _stop_step(out):
    assert "preempted: saving step" in out, out
    return int(out.split("preempted: saving step ")[1].split(";")[0])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process (this one, 8 devices): SIGTERM once step 2 is logged, then (with the debris
    of an interrupted later save planted) the same run again.
    -> (workdir, stop step, first output, second output)."""
    workdir = tmp_path_factory.mktemp("one")

    def notify():
        while not _logged_step_2(workdir):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=notify, daemon=True).start()
    outputs = []
    for attempt in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            train_and_evaluate(_config(), str(workdir))
        outputs.append(out.getvalue())
        if attempt == 0:  # what a kill -9 in the middle of a later save leaves behind
            stop = _stop_step(outputs[0])
            partial = workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1700000000"
            shutil.copytree(workdir / "checkpoints" / str(stop), partial)
            for item in ("params", "opt_state"):
                shutil.rmtree(partial / item)
    return workdir, _stop_step(outputs[0]), *outputs


def test_sigterm_saves_the_step_and_the_same_command_resumes(one_process):
    workdir, stop, _, resumed = one_process
    assert 2 <= stop < STEPS and (workdir / "checkpoints" / str(stop)).is_dir()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    assert f"resumed from step {stop}" in resumed  # not from the half-written save
    _losses(workdir)  # every step logged once


def test_two_processes_equal_one_stop_on_sigterm_and_resume_on_one(tmp_path, one_process):
    """launch/local.sh 2 (x 4 CPU devices, the same 8-device mesh): SIGTERM to the job -> both
    processes save one step and exit 0; one process resumes that checkpoint; the losses equal
    the one-process run's."""
    workdir = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), DEVICES_PER_PROCESS="4",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # fmt: skip
    proc = subprocess.Popen(["bash", "launch/local.sh", "2", *_train_args(workdir)], cwd=REPO,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if _logged_step_2(workdir):
            # Freeze the job while the notice is sent, so it lands well before the last step.
            os.killpg(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, signal.SIGTERM)  # local.sh passes it on to both processes
            os.killpg(proc.pid, signal.SIGCONT)
            break
        time.sleep(0.05)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out  # both processes exit 0
    stop = _stop_step(out)
    assert 2 <= stop < STEPS
    assert out.count("preempted: saving step") == 1  # process 0 speaks for all
    saved = sorted(p.name for p in (workdir / "checkpoints" / str(stop) / "data").glob("str*"))
    assert saved == [f"stream_{s}-of-8.json" for s in range(8)]  # written by both hosts

    # One process (this one: 8 devices) continues that checkpoint, resharded onto its devices.
    with contextlib.redirect_stdout(io.StringIO()) as resumed:
        train_and_evaluate(_config(), str(workdir))
    assert f"resumed from step {stop}" in resumed.getvalue()
    np.testing.assert_allclose(_losses(workdir), _losses(one_process[0]), rtol=2e-5)
