"""report.md and plots of the reproduction study (`ctxext_jax.study`), from results.json.

The acceptance checks are the issue's, evaluated per seed on the numbers in results.json:
base retrieves at 1x; unscaled RoPE fails past its length; zero-shot YaRN keeps perplexity;
the best extended arm retrieves at 4x; some extended arm uses the longer context.
"""

from __future__ import annotations

import os

import numpy as np

from ctxext_jax.evals.report import _heatmap, _length_axes, _mark_trained, _pyplot

# Arms that extend the context (so may be "the best extended arm").
EXTENDED = (
    "pi_zeroshot", "ntk_zeroshot", "dynamic_ntk_zeroshot", "yarn_zeroshot",
    "dynamic_yarn_zeroshot", "pi_finetune", "yarn_finetune", "no_scaling_finetune", "pose",
    "staged", "alibi", "window_sinks",
)  # fmt: skip


def _get(arms: dict, arm: str, metric: str, length: int) -> float:
    return float(arms.get(arm, {}).get(metric, {}).get(str(length), np.nan))


def acceptance(results: dict) -> list[tuple[str, list[bool | None]]]:
    """[(check, [passed per seed, None where an arm is missing])]."""
    L = results["base_length"]
    checks = []

    def per_seed(fn):
        out = []
        for run in results["runs"]:
            try:
                out.append(bool(fn(run["arms"])))
            except (KeyError, TypeError):  # an arm the check needs is not in the study
                out.append(None)
        return out

    def best_extended_4x(arms):
        candidates = [a for a in EXTENDED if a in arms]
        return max(_get(arms, a, "retrieval", 4 * L) for a in candidates) if candidates else None

    def uses_context(arms):
        return any(
            _get(arms, a, "ppl_repeat", 4 * L) < _get(arms, a, "ppl_repeat", L)
            for a in EXTENDED
            if a in arms
        )

    checks.append(
        (
            "base retrieves at 1x: accuracy >= 0.9",
            per_seed(lambda a: _need(a, "base") and _get(a, "base", "retrieval", L) >= 0.9),
        )
    )
    checks.append(
        (
            "unscaled RoPE fails past it: retrieval(4x) <= 0.5",
            per_seed(lambda a: _need(a, "base") and _get(a, "base", "retrieval", 4 * L) <= 0.5),
        )
    )
    checks.append(
        (
            "unscaled RoPE: ppl(8x) >= 2 x ppl(1x)",
            per_seed(
                lambda a: (
                    _need(a, "base")
                    and _get(a, "base", "ppl", 8 * L) >= 2 * _get(a, "base", "ppl", L)
                )
            ),
        )
    )
    checks.append(
        (
            "zero-shot YaRN: ppl(4x) <= 1.25 x base ppl(1x)",
            per_seed(
                lambda a: (
                    _need(a, "yarn_zeroshot")
                    and _get(a, "yarn_zeroshot", "ppl", 4 * L) <= 1.25 * _get(a, "base", "ppl", L)
                )
            ),
        )
    )
    checks.append(
        (
            "zero-shot ppl(4x): YaRN < NTK < unscaled",
            per_seed(
                lambda a: (
                    _need(a, "yarn_zeroshot", "ntk_zeroshot")
                    and _get(a, "yarn_zeroshot", "ppl", 4 * L)
                    < _get(a, "ntk_zeroshot", "ppl", 4 * L)
                    < _get(a, "base", "ppl", 4 * L)
                )
            ),
        )
    )
    checks.append(
        ("best extended arm retrieves >= 0.8 at 4x", per_seed(lambda a: best_extended_4x(a) >= 0.8))
    )
    checks.append(("an extended arm uses the longer context: ppl_repeat(4x) < ppl_repeat(1x)",
                   per_seed(uses_context)))  # fmt: skip
    return checks


def _need(arms: dict, *names: str) -> bool:
    for name in names:
        if name not in arms:
            raise KeyError(name)
    return True


def _mean_over_seeds(results: dict, arm: str, metric: str, length: int) -> tuple[float, list]:
    values = [_get(run["arms"], arm, metric, length) for run in results["runs"]]
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else np.nan, values


def _table(results: dict, arms: list[str], metric: str, lengths: list[int], fmt: str) -> list:
    L = results["base_length"]
    lines = ["| arm | " + " | ".join(f"{n // L}x ({n})" for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]  # fmt: skip
    for arm in arms:
        cells = []
        for n in lengths:
            mean, values = _mean_over_seeds(results, arm, metric, n)
            seeds = " / ".join(format(v, fmt) for v in values)
            cells.append(f"{mean:{fmt}}" + (f" ({seeds})" if len(values) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _lengths(results: dict) -> list[int]:
    first = next(iter(results["runs"][0]["arms"].values()))
    return sorted(int(n) for n in first["ppl"] or first["retrieval"])


def best_arm(results: dict) -> str:
    """The extended arm with the highest mean retrieval over the lengths past 1x."""
    L, arms = results["base_length"], results["runs"][0]["arms"]
    longer = [n for n in _lengths(results) if n > L]
    scores = {
        a: np.mean([_mean_over_seeds(results, a, "retrieval", n)[0] for n in longer])
        for a in arms
        if a in EXTENDED
    }
    return max(scores, key=lambda a: scores[a]) if scores else "base"


def plots(results: dict, workdir: str) -> list[str]:
    plt, lengths, L = _pyplot(), _lengths(results), results["base_length"]
    arms = list(results["runs"][0]["arms"])
    written = []
    for metric, label, log_y, name in [
        ("ppl", "perplexity (held-out text)", True, "ppl_vs_length.png"),
        ("retrieval", f"{results['task']} retrieval accuracy", False, "retrieval_vs_length.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, arm in enumerate(arms):
            ys = [_mean_over_seeds(results, arm, metric, n)[0] for n in lengths]
            ax.plot(lengths, ys, marker="o", markersize=3, linestyle="-" if i < 10 else "--",
                    label=arm)  # fmt: skip
        _length_axes(ax, lengths, log_y=log_y)
        if metric == "retrieval":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs length (mean of {len(results['runs'])} seed(s))")
        _mark_trained(ax, L)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, name), dpi=80)
        plt.close(fig)
        written.append(name)
    best = best_arm(results)
    grid = np.mean(
        [
            [run["arms"][best]["retrieval_depth"][str(n)] for n in lengths]
            for run in results["runs"]
        ],
        axis=0,
    )
    name = f"heatmap_{best}.png"
    _heatmap(os.path.join(workdir, name), grid, lengths, results["depths"],
             f"{best}: {results['task']} accuracy")  # fmt: skip
    return written + [name]


def write_study_report(results: dict, config, workdir: str) -> list[str]:
    """Writes report.md and the plots into workdir; returns the file names."""
    written = plots(results, workdir)
    lengths, arms = _lengths(results), list(results["runs"][0]["arms"])
    seeds = [run["seed"] for run in results["runs"]]
    total_train = sum(t["train_s"] for t in results["timings_s"].values())
    total_eval = sum(t["eval_s"] for t in results["timings_s"].values())
    lines = [
        "# Context-extension study",
        "",
        f"- base length {results['base_length']}; seeds {seeds}; task `{results['task']}`, "
        f"{results['trials_per_length']} held-out instances per length; devices "
        f"{results['devices']}",
        f"- wall time: training {total_train:.0f} s, evaluation {total_eval:.0f} s (this "
        "invocation and earlier ones that produced the reused parts)",
        "",
        "## Acceptance checks (per seed)",
        "",
        "| check | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---" * (len(seeds) + 1) + "|",
    ]
    for check, passed in acceptance(results):
        cells = ["n/a" if p is None else ("pass" if p else "FAIL") for p in passed]
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    lines += ["", "## Perplexity on held-out text (mean; per seed in brackets)", ""]
    lines += _table(results, arms, "ppl", lengths, ".2f")
    lines += ["## Perplexity on repeated held-out text (distant context helps)", ""]
    lines += _table(results, arms, "ppl_repeat", lengths, ".2f")
    lines += [f"## Retrieval accuracy ({results['task']}, held-out instances)", ""]
    lines += _table(results, arms, "retrieval", lengths, ".2f")
    lines += ["## Wall time per arm (s)", "", "| run | train | eval |", "|---|---|---|"]
    for run, t in results["timings_s"].items():
        lines.append(f"| {run} | {t['train_s']} | {t['eval_s']} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in written] + [""]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return ["report.md", *written]
