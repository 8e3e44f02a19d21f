"""The reproduction study: every context-extension method side by side, from one command.

    python -m ctxext_jax.study --config configs/study.py --workdir runs/study
    python -m ctxext_jax.study --config configs/study.py:quick --workdir /tmp/study-quick

For each seed the study trains (or reuses) the base run, trains the arms that need training
(fine-tunes start from the base run's weights; ALiBi trains from scratch) and evaluates every
arm at each multiple of the base length with three measures:

  ppl          perplexity on held-out text (sliding windows, as PI / YaRN measure it)
  ppl_repeat   perplexity on held-out text where distant context helps: each passage of
               1.5x the base length is followed by itself, so the second copy is predictable
               only by a model that sees (and uses) a window longer than the base length
  retrieval    accuracy on held-out instances of the study's task (`data/tasks.py`), over
               depths x trials per length; `retrieval_depth` keeps the length x depth grid

It writes WORKDIR/results.json (`{"base_length": N, "runs": [{"seed": s, "arms": {arm: {"ppl":
{length: value}, "retrieval": {length: accuracy}, ...}}}]}`), report.md (tables, the issue's
acceptance checks per seed, wall times) and plots (ppl_vs_length.png, retrieval_vs_length.png,
heatmap_<best arm>.png). Each arm's training resumes from its checkpoint and each finished
evaluation is kept in WORKDIR/seed<s>/<arm>/study_eval.json, so running the command again
continues where it stopped. With `study.workers` > 1 (CPU hosts) the (seed, arm) jobs run in
that many worker processes, each on its share of the cores (`study_workers.py`).

An arm (`config.arms.<name>`) is: `train` (does it train), `init` ("scratch" or "base": start
from the base run's final weights), `overrides` (nested run-config values for its training,
on top of `config.base`) and `eval_model` (model fields replaced at evaluation time: a
zero-shot RoPE scaling, a window with sinks).
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ctxext_jax import checkpoint, data, sharding, study_workers
from ctxext_jax.cli import exit_on_user_error, parse_flags
from ctxext_jax.config import validate
from ctxext_jax.data import tasks
from ctxext_jax.data.pipeline import task_haystack
from ctxext_jax.errors import ConfigError, fail
from ctxext_jax.evals.perplexity import sliding_perplexity, token_stream
from ctxext_jax.evals.scoring import make_scorer
from ctxext_jax.model import ModelConfig
from ctxext_jax.steps import build_model
from ctxext_jax.study_report import write_study_report
from ctxext_jax.train import train_and_evaluate

EVAL_FILE = "study_eval.json"
TRAIN_TIME_FILE = "study_train_s.json"


def _add_seconds(path: str, seconds: float) -> float:
    """Adds `seconds` to the total kept in `path` (training time across restarts)."""
    total = 0.0
    if os.path.exists(path):
        with open(path) as f:
            total = float(json.load(f))
    if seconds:
        total += seconds
        with open(path, "w") as f:
            json.dump(total, f)
    return total


def _update(cfg: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    """Nested dict of run-config values -> cfg, naming the bad key."""
    for key, value in overrides.items():
        if key not in cfg:
            fail(f"{where}.{key}", "no such run-config field.")
        if (
            isinstance(value, dict)
            and isinstance(cfg[key], ml_collections.ConfigDict)
            and (key not in ("rope", "local_rope", "mixture", "task", "pose"))
        ):
            _update(cfg[key], value, f"{where}.{key}")
        else:
            cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def arm_run_config(config, name: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """The run config that trains arm `name` for `seed`."""
    arm = config.arms[name]
    run = ml_collections.ConfigDict(config.base.to_dict())
    run.train.seed, run.data.seed = seed, seed
    _update(run, _plain(arm.overrides), f"arms.{name}.overrides")
    if arm.init == "base":
        run.checkpoint.init_from = os.path.join(workdir, f"seed{seed}", "base")
    return run


def check_study(config) -> None:
    """One clear error for a bad study config, before anything trains."""
    s = config.study
    if "base" not in config.arms or not config.arms.base.train:
        fail("arms.base", "the study needs a trained 'base' arm.")
    for name in s.arms:
        if name not in config.arms:
            fail("study.arms", f"{name!r} is not defined in config.arms.")
        arm = config.arms[name]
        if arm.init not in ("scratch", "base"):
            fail(f"arms.{name}.init", f"{arm.init!r}: use 'scratch' or 'base'.")
        if not arm.train and arm.init != "base":
            fail(f"arms.{name}", "an arm that does not train must use init='base'.")
    if s.task not in tasks.TASKS:
        fail("study.task", f"{s.task!r}: choose from {tasks.TASKS}.")
    if s.trials * len(s.depths) < 1 or not s.factors or not s.seeds:
        fail("study", "factors, seeds, depths and trials must be non-empty.")
    if not isinstance(s.workers, int) or s.workers < 1:
        fail("study.workers", f"{s.workers!r}: the number of worker processes, 1 or more.")
    validate(config.base)
    for name in s.arms:  # every arm's training and evaluated model, before hours of training
        run = arm_run_config(config, name, 0, "<workdir>")
        eval_model = _plain(config.arms[name].eval_model)
        if eval_model:
            _update(run.model, eval_model, f"arms.{name}.eval_model")
        try:
            validate(run)
        except ConfigError as e:
            raise ConfigError(f"arms.{name}: {e}") from None


# --------------------------------------------------------------------------- training
def _finished(run_dir: str, steps: int) -> bool:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return False
    done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
    return bool(done) and max(done) >= steps


def train_arm(config, name: str, seed: int, workdir: str) -> tuple[str, float]:
    """Trains (or resumes, or reuses) the arm's run; -> (its run dir, seconds spent now)."""
    arm = config.arms[name]
    if not arm.train:
        return os.path.join(workdir, f"seed{seed}", "base"), 0.0
    run_dir = os.path.join(workdir, f"seed{seed}", name)
    run = arm_run_config(config, name, seed, workdir)
    if _finished(run_dir, run.train.steps):
        return run_dir, 0.0
    print(f"== seed {seed}: training {name}", flush=True)
    clock = time.perf_counter()
    train_and_evaluate(run, run_dir)
    if not _finished(run_dir, run.train.steps):  # stopped by SIGTERM / SIGINT: it saved
        print(f"stopped while training {name} (seed {seed}); rerun the same command to "
              "continue the study", flush=True)  # fmt: skip
        raise SystemExit(0)
    return run_dir, time.perf_counter() - clock


# --------------------------------------------------------------------------- evaluation
def repeat_stream(text: np.ndarray, *, period: int, max_tokens: int) -> np.ndarray:
    """text [N] -> [c0 c0 c1 c1 ...] with passages c_i of `period` tokens, <= max_tokens."""
    pairs = min(len(text) // period, max(1, max_tokens // (2 * period)))
    if pairs < 1:
        raise ValueError(f"the eval split has {len(text)} tokens; a repeat needs {period}.")
    passages = text[: pairs * period].reshape(pairs, period)
    return np.concatenate([passages, passages], axis=1).reshape(-1).astype(np.int32)


def eval_fingerprint(config, name: str, step: int) -> dict:
    s = config.study
    return {
        "arm": _plain(config.arms[name]),
        "step": step,
        "study": {
            k: _plain(s[k])
            for k in (
                "factors",
                "task",
                "depths",
                "trials",
                "ppl_tokens",
                "stride",
                "repeat_period",
            )
        },  # fmt: skip
    }


@functools.lru_cache(maxsize=2)
def _eval_text(data_cfg: data.DataConfig, max_tokens: int) -> np.ndarray:
    """The held-out token stream every arm is scored on, read once per process (reading the
    split is a second or more per arm; the array is never modified)."""
    tokenizer = data.make_tokenizer(data_cfg.tokenizer)
    text = token_stream(data.eval_documents(data_cfg), tokenizer, max_tokens=max_tokens)
    text.flags.writeable = False
    return text


def evaluate_arm(config, name: str, seed: int, run_dir: str) -> dict:
    """-> {"ppl": {L: v}, "ppl_repeat": {L: v}, "retrieval": {L: acc},
    "retrieval_depth": {L: [acc per depth]}} of the arm's final weights."""
    s, base = config.study, config.base
    step_dir = checkpoint.resolve_init_from(run_dir)
    saved = checkpoint.read_model_json(step_dir)
    fields = {**saved, **_plain(config.arms[name].eval_model)}
    model_cfg = ModelConfig.from_config(ml_collections.ConfigDict(fields))
    mesh_cfg = sharding.MeshConfig.from_config(base.mesh)
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)
    apply, abstract_params, _ = build_model(model_cfg, mesh, rules, seed=0)
    params = checkpoint.load_params(step_dir, abstract_params)
    data_cfg = data.DataConfig.from_config(base.data)
    tokenizer = data.make_tokenizer(data_cfg.tokenizer)
    scorer = make_scorer(apply, params, batch_sharding=batch_sharding, pad_id=tokenizer.pad_id)
    L = int(base.data.seq_len)
    lengths = [int(f * L) for f in s.factors]
    text = _eval_text(data_cfg, max(s.ppl_tokens, 4 * max(lengths)) + 1)
    period = s.repeat_period or (3 * L) // 2
    repeated = repeat_stream(text, period=period, max_tokens=s.ppl_tokens)
    text = text[: s.ppl_tokens + 1]
    vocab = tasks.TaskVocab.for_tokenizer(
        tokenizer, keys=data_cfg.task.keys, values=data_cfg.task.values
    )
    haystack = task_haystack(data_cfg, data_cfg.eval_split, tokenizer)
    out = {"ppl": {}, "ppl_repeat": {}, "retrieval": {}, "retrieval_depth": {}}
    for length in lengths:
        batch_tokens = max(s.batch_tokens, length)
        stride = max(1, int(s.stride * length))
        for key, stream in (("ppl", text), ("ppl_repeat", repeated)):
            if len(stream) > length:
                result = sliding_perplexity(
                    scorer, stream, length=length, stride=stride, batch_tokens=batch_tokens,
                    buckets=1,
                )  # fmt: skip
                out[key][str(length)] = result["ppl"]
        instances = tasks.eval_instances(
            s.task, data_cfg.task, vocab, length=length + 1, depths=s.depths, trials=s.trials,
            seed=1000 + seed, haystack=haystack, bos=tokenizer.bos_id,
            vocab_size=tokenizer.vocab_size,
        )  # fmt: skip
        hits = tasks.score_instances(
            scorer, instances, pad_id=tokenizer.pad_id, batch_tokens=batch_tokens
        )
        per_instance = hits.mean(axis=1).reshape(len(s.depths), s.trials)
        out["retrieval"][str(length)] = float(per_instance.mean())
        out["retrieval_depth"][str(length)] = per_instance.mean(axis=1).tolist()
    return out


def study_arm(config, name: str, seed: int, workdir: str) -> tuple[dict, dict]:
    """Trains (or reuses) and evaluates (or reuses) one arm of one seed.
    -> (its evaluation, {"train_s", "eval_s"})."""
    run_dir, train_s = train_arm(config, name, seed, workdir)
    arm_dir = os.path.join(workdir, f"seed{seed}", name)
    os.makedirs(arm_dir, exist_ok=True)
    train_total = _add_seconds(os.path.join(arm_dir, TRAIN_TIME_FILE), train_s)
    eval_path = os.path.join(arm_dir, EVAL_FILE)
    step = int(checkpoint.resolve_init_from(run_dir).name)
    fingerprint = json.loads(json.dumps(eval_fingerprint(config, name, step)))
    cached = None
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            cached = json.load(f)
    if cached is None or cached.get("fingerprint") != fingerprint:
        print(f"== seed {seed}: evaluating {name}", flush=True)
        clock = time.perf_counter()
        result = evaluate_arm(config, name, seed, run_dir)
        cached = {"fingerprint": fingerprint, "result": result,
                  "eval_s": time.perf_counter() - clock}  # fmt: skip
        with open(eval_path, "w") as f:
            json.dump(cached, f, indent=1)
    return cached["result"], {"train_s": round(train_total, 1),
                              "eval_s": round(cached["eval_s"], 1)}  # fmt: skip


def run_study(config, workdir: str) -> dict:
    """Trains and evaluates every arm for every seed (reusing what is done), in this process or
    in `study.workers` worker processes; writes the report. -> the results.json dict."""
    check_study(config)
    os.makedirs(workdir, exist_ok=True)
    s = config.study
    # The base run first: every arm that starts from it needs its final checkpoint.
    names = sorted(s.arms, key=lambda n: n != "base")
    jobs = [(int(seed), name) for seed in s.seeds for name in names]
    if s.workers > 1:
        done = study_workers.run_jobs(config, workdir, jobs, workers=s.workers)
    else:
        done = {(seed, name): study_arm(config, name, seed, workdir) for seed, name in jobs}
    runs = [{"seed": int(seed), "arms": {name: done[(int(seed), name)][0] for name in names}}
            for seed in s.seeds]  # fmt: skip
    results = {
        "base_length": int(config.base.data.seq_len),
        "task": s.task,
        "depths": list(s.depths),
        "trials_per_length": int(s.trials * len(s.depths)),
        "runs": runs,
        "timings_s": {f"seed{seed}/{name}": done[(seed, name)][1] for seed, name in jobs},
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_study_report(results, config, workdir)
    return results


# --------------------------------------------------------------------------- main
def use_compilation_cache(workdir: str) -> str:
    """Keeps compiled programs in WORKDIR/jax_cache (or JAX_COMPILATION_CACHE_DIR when set):
    the second seed, the evaluation of every seed and a resumed study load the steps and
    scorers the first seed compiled instead of compiling them again (the programs take the
    seed and the weights as arguments, so they are the same). -> the directory used."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        directory = os.path.join(os.path.abspath(workdir), "jax_cache")
        jax.config.update("jax_compilation_cache_dir", directory)
        # Scorers compile in well under JAX's default 1 s threshold on a fast host.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def main(argv):
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    with exit_on_user_error():
        if f.config is None or not f.workdir:
            raise ValueError("--config and --workdir are required.")
        clock = time.perf_counter()
        use_compilation_cache(f.workdir)
        run_study(f.config, f.workdir)
        print(f"wrote results.json, report.md and plots to {f.workdir} "
              f"({time.perf_counter() - clock:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    # ctxext_jax.train (imported above) may already define --config / --workdir.
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Study config: configs/study.py[:arm].")
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "Where the runs, results.json and report.md go.")
    app.run(main, flags_parser=parse_flags)
