"""Multi-host and preemption: the global batch does not depend on the process count and each
process reads only its own documents; a trainer stops on SIGTERM / SIGINT at a saved step and the
same command resumes, also after a kill -9 in the middle of a save; CPU processes joined by
jax.distributed (launch/local.sh) train the same losses as one process, stop on SIGTERM at one
step on every host, and resume on one process."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from configs import tiny
from ctxext_jax.data import BATCH_KEYS, DataConfig, pipeline
from ctxext_jax.data.streams import StreamCheckpointHandler, global_train_iterator, stream_count
from ctxext_jax.metrics import MetricsWriter
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
            "--config.checkpoint.every=2", "--config.eval.every=100"]  # fmt: skip


def _config():
    config = tiny.get_config("test")
    config.train.steps = config.optim.decay_steps = STEPS
    config.checkpoint.every, config.eval.every = 2, 100
    return config


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # every step once: none repeated
    return np.array([r["loss"] for r in rows if "loss" in r])


def _stop_step(out):
    assert "preempted: saving step" in out, out
    return int(out.split("preempted: saving step ")[1].split(";")[0])


def _start(command, log: Path, **env) -> subprocess.Popen:
    """`command` from the repository in its own session, its output going to `log`."""
    env = dict(os.environ, PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _wait_for(proc, done, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not done():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{what} never happened (exit code {proc.poll()})")
        time.sleep(0.01)


def _state(pid) -> str:
    """R, S, D, T (stopped), Z (exited, not yet waited for), ... from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _kill_mid_save(proc, checkpoints: Path) -> int:
    """Waits for an Orbax save in flight (its <step>.orbax-checkpoint-tmp-* folder), freezes the
    process there (SIGSTOP stops all its threads) and, if that save is still unfinished, kills it
    (SIGKILL); a save that finished first lets it run on to the next. -> the killed step."""
    while proc.poll() is None:
        saving = [n for n in os.listdir(checkpoints) if ".orbax-checkpoint-tmp" in n]
        if saving:
            os.kill(proc.pid, signal.SIGSTOP)
            while (state := _state(proc.pid)) not in "TZX":
                time.sleep(0.001)
            step = saving[0].split(".")[0]
            unfinished = (checkpoints / saving[0]).exists() and not (checkpoints / step).exists()
            if state == "T" and unfinished:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return int(step)
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"no save was caught in flight (exit code {proc.returncode})")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process (8 devices) checkpointing every 2 steps, the same run three times:
    (1) in this process, a SIGTERM arriving as step 3 is logged; (2) the CLI in a subprocess,
    killed (SIGKILL) in the middle of a later save; (3) in this process again, to the end.
    -> (workdir, stop step, steps finished at the kill, killed step, output of 3)."""
    workdir = tmp_path_factory.mktemp("one")
    write = MetricsWriter.write

    def write_then_signal(self, step, scalars):  # a real signal, at a known step
        write(self, step, scalars)
        if step == 3 and "loss" in scalars:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.setattr(MetricsWriter, "write", write_then_signal)
        train_and_evaluate(_config(), str(workdir))
    stop = _stop_step(out.getvalue())

    checkpoints = workdir / "checkpoints"
    command = [sys.executable, "-m", "ctxext_jax.train", *_train_args(workdir)]
    killed = _kill_mid_save(_start(command, workdir / "killed.log"), checkpoints)
    finished = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())

    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_and_evaluate(_config(), str(workdir))
    return workdir, stop, finished, killed, out.getvalue()


def test_sigterm_saves_the_step_and_kill_9_mid_save_resumes_the_last_good_one(one_process):
    workdir, stop, finished, killed, resumed = one_process
    assert stop == 3 and 3 in finished  # the step in progress when the signal came (no
    # interval save is due at 3)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer's handler is gone
    assert killed > finished[-1] >= stop  # the kill came in the middle of a later save
    assert f"resumed from step {finished[-1]}" in resumed  # not from the half-written one
    _losses(workdir)  # every step logged once


def test_sigint_asks_for_the_same_stop():
    from ctxext_jax.train import Preemption

    before = signal.getsignal(signal.SIGINT)
    preemption = Preemption()
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a stop after the step
    assert preemption.reached(2)
    preemption.close()
    assert signal.getsignal(signal.SIGINT) is before


def _process(launcher_pid: int, index: int) -> int:
    """The pid of launch/local.sh's process `index`."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        if f"--process_id={index}" in Path(f"/proc/{pid}/cmdline").read_text():
            return int(pid)
    raise AssertionError(f"no process {index} among {children}")


def _two_processes_preempted(workdir: Path, log: Path, ready: Callable[[str], bool]) -> int:
    """Runs launch/local.sh 2 (x 4 CPU devices: the same 8-device mesh) on `workdir`, sends the
    job SIGTERM once `ready(its output so far)`, checks that both processes saved one step and
    exited 0 and returns that step."""
    # C++ warnings on: JAX's preemption notifier says when it has seen the SIGTERM.
    proc = _start(["bash", "launch/local.sh", "2", *_train_args(workdir)], log,
                  DEVICES_PER_PROCESS="4", TF_CPP_MIN_LOG_LEVEL="1")  # fmt: skip
    _wait_for(proc, lambda: ready(log.read_text()), "the moment to signal")
    # JAX's notifier polls for the signal once a second, while steps take milliseconds: hold
    # process 1 (and with it, through the collectives, process 0) until process 0 has seen it.
    second = _process(proc.pid, 1)
    os.kill(second, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGTERM)  # local.sh passes it on to both processes
    with contextlib.suppress(AssertionError):
        _wait_for(proc, lambda: "SIGTERM caught" in log.read_text(), "the notice", timeout=10)
    os.kill(second, signal.SIGCONT)
    assert proc.wait(timeout=600) == 0, log.read_text()  # both processes exit 0
    out = log.read_text()
    assert out.count("preempted: saving step") == 1, out  # process 0 speaks for all
    stop = _stop_step(out)
    saved = sorted(p.name for p in (workdir / "checkpoints" / str(stop) / "data").glob("str*"))
    assert saved == [f"stream_{s}-of-8.json" for s in range(8)]  # written by both hosts
    return stop


def test_two_processes_equal_one_stop_on_sigterm_and_resume_on_one(tmp_path, one_process):
    """Two processes: SIGTERM to the job -> both save one step and exit 0; the same command
    resumes, and a SIGTERM while it starts (restoring, compiling) stops it after its first step;
    one process resumes that checkpoint; the losses equal the one-process run's."""
    workdir = tmp_path / "two"
    metrics = workdir / "metrics.jsonl"
    stop = _two_processes_preempted(
        workdir,
        tmp_path / "two.log",
        lambda _: metrics.exists() and '"step": 2,' in metrics.read_text(),
    )
    assert 2 <= stop < STEPS - 1
    resumed = f"resumed from step {stop}"
    assert (
        _two_processes_preempted(workdir, tmp_path / "again.log", lambda out: resumed in out)
        == stop + 1
    )

    # One process (this one: 8 devices) continues that checkpoint, resharded onto its devices.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_and_evaluate(_config(), str(workdir))
    assert f"resumed from step {stop + 1}" in out.getvalue()
    np.testing.assert_allclose(_losses(workdir), _losses(one_process[0]), rtol=2e-5)
