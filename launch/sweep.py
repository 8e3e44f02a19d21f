"""Sweep config overrides: one run (and workdir) per point of the grid, run in turn or printed.

  python launch/sweep.py --config configs/tiny.py:extend --root runs/sweep \
      --grid model.rope.rope_type=linear,yarn --grid optim.lr=1e-3,3e-4 \
      -- --config.checkpoint.init_from=runs/tiny
  python launch/sweep.py ... --print   # the commands only, e.g. to submit to a scheduler

Then compare the runs: python -m ctxext_jax.evaluate --compare runs/sweep/*
"""

import argparse
import itertools
import shlex
import subprocess
import sys


def grid_points(grid: list[str]) -> list[list[tuple[str, str]]]:
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(
                f"error: --grid {item!r}: write KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-4)"
            )
        axes.append([(key, v) for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
    parser.add_argument("--root", required=True, help="one workdir per run is made under it")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    parser.add_argument("extra", nargs="*", help="after --: arguments given to every run")
    args = parser.parse_args()
    failed = 0
    for point in grid_points(args.grid):
        name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point) or "run"
        command = [sys.executable, "-m", "ctxext_jax.train", "--config", args.config,
                   "--workdir", f"{args.root}/{name}", *(f"--config.{k}={v}" for k, v in point),
                   *args.extra]  # fmt: skip
        print(shlex.join(command), flush=True)
        if not args.print:
            failed += subprocess.call(command) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
