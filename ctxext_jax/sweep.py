"""Sweeps defined in config files: `python -m ctxext_jax.sweep --config configs/x.py:arg --root R`.

A config file may define `get_sweep(arg)` beside `get_config(arg)`. It returns the sweep's
points as plain override dicts keyed by dotted config paths; any key may be swept, including
a whole block such as `model.rope`:

    def get_sweep(arg):
        return product(sweep("optim.lr", [1e-3, 3e-3]), sweep("model.rope.factor", [2.0, 4.0]))

Each point trains in its own run directory `R/<name>`, named from its overrides
(`lr-0.001_factor-2.0`). Every point is validated before any runs; finished points are
skipped and interrupted ones resume (the trainer resumes from a run directory's latest
checkpoint), so the same command continues a sweep; a failing point does not stop the
others. At the end (or with --summary): R/summary.md, R/summary.json and R/summary.png.

    python -m ctxext_jax.sweep --config configs/tiny.py:extend --root runs/sweep \\
        --config.checkpoint.init_from=runs/tiny [--parallel 2] [--dry_run] [--print slurm]
"""

from __future__ import annotations

import argparse
import ast
import builtins
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from ctxext_jax.cli import DICT_FIELDS

Point = dict[str, Any]


# ----------------------------------------------------------------------------- building points
def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `key`: sweep("optim.lr", [1e-3, 3e-4])."""
    return [{key: v} for v in values]


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of the given sweeps' points (the first varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip(*sweeps: Sequence[Point]) -> list[Point]:  # noqa: A001 (big_vision's name)
    """Points taken together in lockstep; the sweeps must have the same length."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zip: the sweeps have different lengths {sorted(lengths)}.")
    return [_merge(combo) for combo in builtins.zip(*sweeps, strict=True)]


def chain(*sweeps: Sequence[Point]) -> list[Point]:
    """The sweeps' points one after another."""
    return [dict(p) for s in sweeps for p in s]


def _merge(points: Iterable[Point]) -> Point:
    out: Point = {}
    for p in points:
        for k in p:
            if k in out:
                raise ValueError(f"the combined sweeps both set {k!r}.")
        out.update(p)
    return out


# ----------------------------------------------------------------------------- naming
def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(_format_value(v) for v in value.values())
    if isinstance(value, list | tuple):
        return "-".join(_format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def point_name(point: Point, all_keys: Sequence[str] | None = None, limit: int = 96) -> str:
    """A readable, filesystem-safe directory name from the point's overrides, e.g.
    `lr-0.001_rope-yarn-10000-4-256`. Long names are cut and end in a hash of the point."""
    if not point:
        return "default"
    short = _short_keys(sorted(all_keys or point))
    name = "_".join(f"{short[k]}-{_format_value(v)}" for k, v in point.items())
    name = re.sub(r"[^A-Za-z0-9.+=,-]+", "_", name).strip("._") or "point"
    if len(name) > limit:
        name = name[: limit - 9].rstrip("._-") + "-" + _digest(point)
    return name


def _digest(point: Point) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]


def point_names(points: Sequence[Point]) -> list[str]:
    """Unique names: points whose readable names collide get their hash appended."""
    keys = sorted({k for p in points for k in p})
    names = [point_name(p, keys) for p in points]
    return [
        f"{name}-{_digest(p)}" if names.count(name) > 1 and not name.endswith(_digest(p)) else name
        for name, p in builtins.zip(names, points, strict=True)
    ]


# ----------------------------------------------------------------------------- config
def load_config_module(spec: str):
    """configs/x.py[:arg] -> (module, arg or None)."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    if not os.path.isfile(path):
        raise ValueError(f"--config: no file {path!r}; give configs/<name>.py[:variant].")
    module_spec = importlib.util.spec_from_file_location(
        "sweep_config_" + _digest({"p": path}), path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, (arg if ".py:" in spec else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """configs/x.py[:arg] -> its get_config(arg)."""
    module, arg = load_config_module(spec)
    return _call(module.get_config, arg)


def _call(fn, arg):
    return fn() if arg is None else fn(arg)


def _parse_override(raw: str) -> tuple[str, str]:
    key, sep, value = raw.removeprefix("--config.").partition("=")
    if not sep or not key:
        raise ValueError(f"{raw!r}: write --config.<group>.<key>=<value>.")
    return key, value


def _cli_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """What ml_collections makes of `--config.key=text`: a string field takes the text."""
    current = _get(config, key)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Point) -> None:
    """Sets each dotted key (raising ValueError naming an unknown key or a wrong type)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        if ".".join(parents) in DICT_FIELDS:  # a rope block or mixture takes any key, as on the CLI
            block = _get(config, ".".join(parents))
            block = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else {}
            config[parents[0]][parents[1]] = {**block, leaf: value}
            continue
        try:
            node = _get(config, ".".join(parents)) if parents else config
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                raise KeyError(key)
            node[leaf] = value
        except KeyError:
            raise ValueError(
                f"no config field {key!r}; sweep keys are dotted config paths such as "
                "'optim.lr' or 'model.rope'."
            ) from None
        except TypeError as e:
            raise ValueError(f"{key}={value!r}: {e}") from None


def command_value(key: str, value: Any) -> str:
    """A point's value as a `--config.key=` argument the trainer parses back to it: rope blocks,
    mixtures and their fields as JSON (`ctxext_jax.cli`), other fields as Python literals."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, str):
        return value
    if key in DICT_FIELDS or key.rpartition(".")[0] in DICT_FIELDS:
        return json.dumps(value)
    return repr(value)


class Plan:
    """The points of a sweep, validated, with their names, run dirs and train commands."""

    def __init__(self, config_spec: str, root: str, overrides: Sequence[str], *,
                 num_devices: int | None = None):  # fmt: skip
        from ctxext_jax.config import validate
        from ctxext_jax.train import preflight

        module, arg = load_config_module(config_spec)
        if not hasattr(module, "get_sweep"):
            raise ValueError(
                f"--config {config_spec}: the file defines no get_sweep(arg); add one returning "
                "a list of override dicts (see ctxext_jax/sweep.py)."
            )
        points = _call(module.get_sweep, arg)
        if not isinstance(points, list | tuple) or not points:
            raise ValueError(f"get_sweep({arg!r}) returned {points!r}; return a non-empty list.")
        for i, p in enumerate(points):
            if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
                raise ValueError(f"get_sweep point {i} is {p!r}; each point is a dict.")
        self.config_spec, self.root, self.points = config_spec, root, [dict(p) for p in points]
        self.names = point_names(self.points)
        self.cli = [_parse_override(o) for o in overrides]
        for key, _ in self.cli:
            if any(key == k or key.startswith(k + ".") for p in self.points for k in p):
                raise ValueError(
                    f"--config.{key} is swept by get_sweep in {config_spec}; drop it from the "
                    "command line or from the sweep."
                )
        seen: dict[str, int] = {}
        for i, p in enumerate(self.points):
            key = json.dumps(p, sort_keys=True, default=str)
            if key in seen:
                raise ValueError(f"get_sweep points {seen[key]} and {i} are the same: {p}.")
            seen[key] = i
        self.configs = []
        errors, checked = [], set()
        for name, point in builtins.zip(self.names, self.points, strict=True):
            config = _call(module.get_config, arg)
            try:
                apply_overrides(config, {k: _cli_value(config, k, v) for k, v in self.cli})
                apply_overrides(config, point)
                validate(config, num_devices=num_devices)
                # The file checks (data, tokenizer, init_from), once per distinct setting.
                reads = [config.data.to_dict(), config.model.vocab_size,
                         config.checkpoint.init_from]  # fmt: skip
                reads = json.dumps(reads, sort_keys=True, default=str)
                if reads not in checked:
                    preflight(config)
                    checked.add(reads)
            except (ValueError, FileNotFoundError) as e:
                errors.append(f"  {name}: {e}")
            self.configs.append(config)
        if errors:
            raise ValueError(
                f"{len(errors)} of {len(self.points)} sweep points are invalid (nothing was "
                "run):\n" + "\n".join(errors)
            )

    def workdir(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])

    def command(self, i: int, python: str = sys.executable) -> list[str]:
        return [
            python, "-m", "ctxext_jax.train", "--config", self.config_spec,
            "--workdir", self.workdir(i),
            *(f"--config.{k}={v}" for k, v in self.cli),
            *(f"--config.{k}={command_value(k, v)}" for k, v in self.points[i].items()),
        ]  # fmt: skip

    def status(self, i: int) -> str:
        """'done' (final checkpoint written), 'partial', or 'new'."""
        workdir = self.workdir(i)
        steps = self.configs[i].train.steps
        if os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
            return "done"
        return "partial" if os.path.exists(workdir) else "new"


# ----------------------------------------------------------------------------- printing
def print_commands(plan: Plan, kind: str) -> str:
    """Per-point commands: `local` shell lines, a `slurm` array script, or `tpu` queue lines."""
    commands = [plan.command(i, python="python") for i in range(len(plan.points))]
    if kind == "local":
        return "\n".join(
            shlex.join(c) + f" >> {shlex.quote(plan.workdir(i))}.log 2>&1"
            for i, c in enumerate(commands)
        )
    if kind == "tpu":  # one pod job per point, run in turn on a queued resource / TPU VM
        return "\n".join('launch/tpu_pod.sh "$TPU" "$ZONE" ' + shlex.join(c[3:]) for c in commands)
    lines = [
        "#!/usr/bin/env bash",
        f"# {len(commands)} sweep points of {plan.config_spec}; submit: ... --print slurm | sbatch",
        f"#SBATCH --job-name=sweep-{os.path.basename(os.path.normpath(plan.root))}",
        f"#SBATCH --array=0-{len(commands) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@300",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=%x-%A_%a.out",
        "set -euo pipefail",
        "points=(",
        *(f"  {shlex.quote(shlex.join(c[3:]))}" for c in commands),
        ")",
        'eval "args=(${points[$SLURM_ARRAY_TASK_ID]})"',
        "# One process per GPU, coordinator from the allocation, requeue on SIGTERM:",
        'exec bash launch/slurm.sbatch "${args[@]}"',
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
def device_sets(parallel: int) -> list[dict]:
    """Per-slot process settings: GPUs split into `parallel` sets, else CPU cores split."""
    gpus = _visible_gpus()
    if gpus:
        if len(gpus) < parallel:
            raise ValueError(f"--parallel {parallel}: only {len(gpus)} GPUs are visible.")
        size = len(gpus) // parallel
        return [
            {"env": {"CUDA_VISIBLE_DEVICES": ",".join(gpus[s * size : (s + 1) * size])}}
            for s in range(parallel)
        ]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < parallel:
        return [{} for _ in range(parallel)]  # share the cores
    size = len(cores) // parallel
    return [{"cores": set(cores[s * size : (s + 1) * size])} for s in range(parallel)]


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def run_points(plan: Plan, indices: Sequence[int], parallel: int) -> dict[int, int]:
    """Runs the points' train commands, `parallel` at a time; -> {index: exit code}. A SIGTERM
    or Ctrl-C is passed on to the running points, which save a checkpoint and stop."""
    slots = device_sets(parallel)
    free, running, codes = list(range(parallel)), {}, {}
    queue = list(indices)
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and free and not stopping:
                i, slot = queue.pop(0), free.pop(0)
                settings = slots[slot]
                os.makedirs(plan.workdir(i), exist_ok=True)
                log = open(os.path.join(plan.workdir(i), "train.log"), "a")  # noqa: SIM115
                log.write(f"$ {shlex.join(plan.command(i))}\n")
                log.flush()
                cores = settings.get("cores")
                proc = subprocess.Popen(
                    plan.command(i),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **settings.get("env", {})},
                    preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None,
                )
                print(f"[{len(codes) + len(running) + 1}/{len(indices)}] {plan.names[i]}: "
                      f"started (log {plan.workdir(i)}/train.log)", flush=True)  # fmt: skip
                running[i] = (proc, slot, log)
            if stopping and not queue and not running:
                break
            if stopping:
                queue.clear()
            time.sleep(0.2)
            for i, (proc, slot, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    codes[i] = proc.returncode
                    free.append(slot)
                    del running[i]
                    verdict = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                    print(f"    {plan.names[i]}: {verdict}", flush=True)
    except KeyboardInterrupt:  # the points got the SIGINT too: they save and stop
        stop(signal.SIGINT, None)
        for proc, _, log in running.values():
            proc.wait()
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes


# ----------------------------------------------------------------------------- summary
def point_results(workdir: str) -> dict[str, Any]:
    """Final train / eval metrics, median tokens/s and long-context metrics of one run."""
    from ctxext_jax.evals.report import series_of
    from ctxext_jax.metrics import read_metrics

    out: dict[str, Any] = {}
    rows = read_metrics(workdir)
    train = [r for r in rows if "loss" in r]
    if train:
        out["step"] = train[-1]["step"]
        out["train_loss"] = train[-1]["loss"]
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        out["eval_loss"] = evals[-1]["eval_loss"]
        out["eval_perplexity"] = evals[-1]["eval_perplexity"]
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    if speeds:
        out["tokens_per_sec"] = float(sorted(speeds)[len(speeds) // 2])
    series: dict[str, dict[int, float]] = {}
    for r in rows:  # the in-training long-context check: ppl_len_L, passkey_acc_len_L
        for k, v in r.items():
            if m := re.fullmatch(r"(ppl|passkey)(?:_acc)?_len_(\d+)", k):
                series.setdefault(m[1], {})[int(m[2])] = v
    results = os.path.join(workdir, "eval", "results.json")
    if os.path.isfile(results):  # a full `evaluate` run supersedes the in-training check
        with open(results) as f:
            series.update(series_of(json.load(f)))
    if series:
        out["long"] = series
    return out


def write_summary(plan: Plan, failures: dict[int, int] | None = None) -> list[str]:
    """root/summary.md, summary.json, summary.png (+ compare_<metric>.png for long context)."""
    from ctxext_jax.evals.report import _pyplot, compare_series

    failures = failures or {}
    os.makedirs(plan.root, exist_ok=True)
    points = []
    for i, name in enumerate(plan.names):
        status = plan.status(i)
        if i in failures:
            status = f"failed (exit {failures[i]})"
        points.append({
            "name": name, "overrides": plan.points[i], "workdir": plan.workdir(i),
            "status": status, "log": os.path.join(plan.workdir(i), "train.log"),
            "steps": plan.configs[i].train.steps, **point_results(plan.workdir(i)),
        })  # fmt: skip
    with open(os.path.join(plan.root, "summary.json"), "w") as f:
        json.dump({"config": plan.config_spec, "points": points}, f, indent=2, default=str)

    columns = [("train_loss", "train loss"), ("eval_loss", "eval loss"),
               ("eval_perplexity", "eval ppl"), ("tokens_per_sec", "tokens/s")]  # fmt: skip
    lines = [f"# Sweep `{plan.config_spec}`", "",
             "| point | status | step | " + " | ".join(c[1] for c in columns) + " |",
             "|---" * (len(columns) + 3) + "|"]  # fmt: skip
    for p in points:
        values = [
            f"{p[k]:,.0f}" if k == "tokens_per_sec" and k in p else
            f"{p[k]:.4f}" if k in p else "-" for k, _ in columns
        ]  # fmt: skip
        lines.append(f"| {p['name']} | {p['status']} | {p.get('step', 0)}/{p['steps']} | "
                     + " | ".join(values) + " |")  # fmt: skip
    lines.append("")
    plt = _pyplot()
    shown = [(k, label) for k, label in columns if any(k in p for p in points)]
    plots = []
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 0.4 * len(points) + 1.5),
                                 squeeze=False)  # fmt: skip
        for ax, (key, label) in builtins.zip(axes[0], shown, strict=True):
            values = [p.get(key, math.nan) for p in points]
            bars = ax.barh([p["name"] for p in points], values)
            ax.bar_label(bars, fmt="%.4g", padding=2, fontsize=8)
            finite = [v for v in values if math.isfinite(v)]
            if finite and key != "tokens_per_sec":  # losses differ in the decimals: zoom in
                low, high = min(finite), max(finite)
                ax.set_xlim(max(0.0, low - 0.5 * (high - low) - 0.05 * high), high * 1.15)
            ax.set_title(label)
            ax.invert_yaxis()
            if ax is not axes[0][0]:
                ax.set_yticklabels([])
        fig.tight_layout()
        fig.savefig(os.path.join(plan.root, "summary.png"), dpi=100)
        plt.close(fig)
        plots.append("summary.png")
    with_long = [p for p in points if p.get("long")]
    if with_long:
        trained = [c.data.seq_len for c in plan.configs]
        tables, long_plots = compare_series(
            [p["name"] for p in with_long], [p["long"] for p in with_long], plan.root,
            trained_lengths=sorted(set(trained)),
        )  # fmt: skip
        lines += ["# Long context", ""] + tables
        plots += long_plots
    failed = [p for p in points if p["status"].startswith("failed")]
    if failed:
        lines += ["# Failed points", ""] + [f"- {p['name']}: see `{p['log']}`" for p in failed]
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots] + [""]
    with open(os.path.join(plan.root, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    return ["summary.md", "summary.json", *plots]


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m ctxext_jax.sweep", description=__doc__.split("\n")[0],
        epilog="Other arguments --config.<group>.<key>=<value> apply to every point.",
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="configs/x.py[:arg] with get_sweep(arg)")
    parser.add_argument("--root", required=True, help="one run directory per point under it")
    parser.add_argument("--parallel", type=int, default=1, help="points run at once")
    parser.add_argument("--dry_run", action="store_true", help="validate and list, run nothing")
    parser.add_argument("--print", choices=["local", "slurm", "tpu"], dest="print_kind",
                        help="print the per-point commands instead of running them")  # fmt: skip
    parser.add_argument("--summary", action="store_true", help="write the summary, run nothing")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices each point runs on, for checking mesh shapes "
                        "(default: this machine's share)")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments {bad}; overrides are --config.<group>.<key>=<v>")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give 1 or more.")
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    # Validation runs here on CPU: the accelerators belong to the points' processes.
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    # The points are started with fork + exec at once, which JAX's fork warning does not mean.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    num_devices = args.devices
    if num_devices is None and args.print_kind is None:
        gpus = _visible_gpus()
        num_devices = len(gpus) // args.parallel if gpus else None
    try:
        plan = Plan(args.config, args.root, overrides, num_devices=num_devices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_kind:
        print(print_commands(plan, args.print_kind))
        return 0
    statuses = [plan.status(i) for i in range(len(plan.points))]
    if args.summary:
        written = write_summary(plan)
        print(f"wrote {', '.join(os.path.join(plan.root, w) for w in written)}")
        return 0
    print(f"sweep {args.config}: {len(plan.points)} points under {plan.root}")
    for name, status in builtins.zip(plan.names, statuses, strict=True):
        print(f"  {name:<50} {dict(done='finished: skip', partial='resume', new='run')[status]}")
    if args.dry_run:
        return 0
    todo = [i for i, s in enumerate(statuses) if s != "done"]
    try:
        codes = run_points(plan, todo, args.parallel)
    except KeyboardInterrupt:
        print("interrupted: the running points saved a checkpoint; rerun the same command to "
              "resume the sweep.", flush=True)  # fmt: skip
        return 130
    failures = {i: c for i, c in codes.items() if c != 0}
    written = write_summary(plan, failures)
    print(f"summary: {os.path.join(plan.root, written[0])}")
    unfinished = [i for i in todo if i not in codes]
    if unfinished:
        print(f"stopped: {len(unfinished)} points not run; rerun the same command to continue.")
    if failures:
        print(f"{len(failures)} of {len(plan.points)} points failed:", file=sys.stderr)
        for i, code in failures.items():
            print(f"  {plan.names[i]} (exit {code}): {plan.workdir(i)}/train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
