"""report.md, results.json and PNG plots of one evaluation, and the comparison of several.

Plots (matplotlib, Agg backend, no display needed):
  ppl_vs_length.png        perplexity against window length, trained length marked
  position_loss.png        mean loss by position bucket inside the window, one line per length
  passkey.png              passkey accuracy heatmap, length x depth
  needle_{variant}.png     needle accuracy heatmap, length x depth, per variant
  compare_{metric}.png     (--compare) one line per run against length
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_trained(ax, trained_length: int | None) -> None:
    if trained_length:
        ax.axvline(
            trained_length, color="grey", linestyle="--", linewidth=1, label="trained length"
        )


def _length_axes(ax, lengths, *, log_y: bool) -> None:
    """Log-2 x axis labelled with the evaluated lengths; plain numbers on a log y axis."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(lengths)), [str(n) for n in sorted(set(lengths))])
    ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _heatmap(path: str, grid: Sequence[Sequence[float]], lengths, depths, title: str) -> None:
    plt = _pyplot()
    values = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(depths), 1.2 + 0.5 * len(lengths)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth (fraction of the text before the key)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(results: dict, out_dir: str) -> list[str]:
    plt, written = _pyplot(), []
    trained = results.get("trained_length")
    if "perplexity" in results:
        rows = results["perplexity"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o")
        _length_axes(ax, [r["length"] for r in rows], log_y=True)
        ax.set_xlabel("window length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{results['name']}: perplexity vs context length")
        _mark_trained(ax, trained)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ppl_vs_length.png"), dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            buckets = r["position_loss"]
            centres = [(a + b) / 2 for a, b in zip(buckets["start"], buckets["end"], strict=True)]
            ax.plot(centres, buckets["loss"], marker=".", label=f"L={r['length']}")
        ax.set_xlabel("position in window (tokens)")
        ax.set_ylabel("mean loss (nats)")
        ax.set_title(f"{results['name']}: loss by position")
        _mark_trained(ax, trained)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "position_loss.png"), dpi=100)
        plt.close(fig)
        written += ["ppl_vs_length.png", "position_loss.png"]
    if "passkey" in results:
        p = results["passkey"]
        _heatmap(
            os.path.join(out_dir, "passkey.png"),
            p["accuracy"],
            p["lengths"],
            p["depths"],
            f"{results['name']}: passkey ({p['trials']} trials/cell)",
        )
        written.append("passkey.png")
    for variant, g in results.get("needle", {}).items():
        name = f"needle_{variant}.png"
        _heatmap(
            os.path.join(out_dir, name),
            g["accuracy"],
            g["lengths"],
            g["depths"],
            f"{results['name']}: needle ({variant}, {g['trials']} trials/cell)",
        )
        written.append(name)
    return written


def _grid_table(title: str, grid, lengths, depths) -> list[str]:
    lines = [
        f"**{title}**",
        "",
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
        "|---" * (len(depths) + 2) + "|",
    ]
    for length, row in zip(lengths, grid, strict=True):
        cells = " | ".join(f"{v:.2f}" for v in row)
        lines.append(f"| {length} | {cells} | {np.mean(row):.2f} |")
    return lines + [""]


def markdown(results: dict, plots: Sequence[str]) -> str:
    o = results["options"]
    lines = [
        f"# Long-context evaluation: {results['name']}",
        "",
        f"- checkpoint: `{results['checkpoint']}` ({results['source']})",
        f"- trained length: {results.get('trained_length')}; positions evaluated with: "
        f"`{json.dumps(results['positions'])}`",
        f"- overridden by the config: `{json.dumps(results['overrides'])}`",
        f"- data: `{results['data']['dataset']}` split `{results['data']['eval_split']}`, "
        f"tokenizer `{results['data']['tokenizer']}`",
        f"- attention backend per length: `{json.dumps(results['attention_impl'])}`",
        "- passkey and needle answers scored by "
        f"{results.get('retrieval_scoring', 'teacher forcing')}",
        f"- wall time (s, with compilation): `{json.dumps(results['timings_s'])}`",
        "",
    ]
    if "perplexity" in results:
        lines += [
            f"## Perplexity by context length (sliding windows, stride {o['stride']}, "
            f"{results['perplexity'][0]['tokens']} scored tokens per length)",
            "",
            "| length | stride | windows | loss | perplexity |",
            "|---|---|---|---|---|",
        ]
        for r in results["perplexity"]:
            lines.append(
                f"| {r['length']} | {r['stride']} | {r['windows']} | {r['loss']:.4f} | "
                f"{r['ppl']:.3f} |"
            )
        lines += ["", "Loss by position bucket (mean over every window's positions):", ""]
        longest = results["perplexity"][-1]["position_loss"]
        lines.append(
            "| positions | "
            + " | ".join(f"{a}-{b}" for a, b in zip(longest["start"], longest["end"], strict=True))
            + " |"
        )
        lines.append("|---" * (len(longest["loss"]) + 1) + "|")
        lines.append(
            f"| L={results['perplexity'][-1]['length']} loss | "
            + " | ".join(f"{v:.3f}" for v in longest["loss"])
            + " |"
        )
        lines.append("")
    if "passkey" in results:
        p = results["passkey"]
        lines += ["## Passkey retrieval (exact greedy match)", ""]
        lines += _grid_table(
            f"accuracy over {p['trials']} trials per cell", p["accuracy"], p["lengths"], p["depths"]
        )
    for variant, g in results.get("needle", {}).items():
        lines += [f"## Needle in a haystack: {variant} ({g['needles']} needle(s))", ""]
        lines += _grid_table(
            f"accuracy over {g['trials']} trials per cell", g["accuracy"], g["lengths"], g["depths"]
        )
        if "distractor_rate" in g:
            lines += _grid_table(
                "answered with a distractor's value",
                g["distractor_rate"],
                g["lengths"],
                g["depths"],
            )
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str) -> list[str]:
    """Writes results.json, the plots and report.md into out_dir; returns the file names."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plots = _plots(results, out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(results, plots))
    return ["results.json", "report.md", *plots]


# ------------------------------------------------------------------------------- compare
def load_results(workdir: str) -> dict:
    """A run's results.json from its workdir (`W/eval/results.json`) or eval folder."""
    for path in (
        os.path.join(workdir, "eval", "results.json"),
        os.path.join(workdir, "results.json"),
    ):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise FileNotFoundError(
        f"--compare: {workdir} holds no eval/results.json; run `python -m ctxext_jax.evaluate "
        f"... --workdir {workdir}` first."
    )


def series_of(results: dict) -> dict[str, dict[int, float]]:
    """metric name -> {length: value} for the comparison (accuracies averaged over depth)."""
    out: dict[str, dict[int, float]] = {}
    if "perplexity" in results:
        out["ppl"] = {r["length"]: r["ppl"] for r in results["perplexity"]}
    if "passkey" in results:
        p = results["passkey"]
        out["passkey"] = {
            n: float(np.mean(a)) for n, a in zip(p["lengths"], p["accuracy"], strict=True)
        }
    for variant, g in results.get("needle", {}).items():
        out[f"needle_{variant}"] = {
            n: float(np.mean(a)) for n, a in zip(g["lengths"], g["accuracy"], strict=True)
        }
    return out


def compare_series(
    names: Sequence[str],
    series: Sequence[dict[str, dict[int, float]]],
    out_dir: str,
    *,
    trained_lengths: Sequence[int] = (),
) -> tuple[list[str], list[str]]:
    """Markdown tables and one `compare_<metric>.png` per metric of several runs' series
    (metric -> {length: value}, as `series_of` makes); returns (markdown lines, plot names)."""
    metrics = list(dict.fromkeys(m for s in series for m in s))
    plt, plots, lines = _pyplot(), [], []
    os.makedirs(out_dir, exist_ok=True)
    for metric in metrics:
        lengths = sorted({n for s in series for n in s.get(metric, {})})
        label = "perplexity" if metric == "ppl" else f"{metric} accuracy (mean over depths)"
        lines += [
            f"## {label}",
            "",
            "| run | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, s in zip(names, series, strict=True):
            values = s.get(metric, {})
            lines.append(
                f"| {name} | "
                + " | ".join(f"{values[n]:.3f}" if n in values else "-" for n in lengths)
                + " |"
            )
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", label=name)
        lines.append("")
        _length_axes(ax, lengths, log_y=metric == "ppl")
        if metric != "ppl":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        for t in sorted(set(trained_lengths)):
            ax.axvline(t, color="grey", linestyle="--", linewidth=1)
        ax.legend(fontsize=8)
        ax.set_title(label)
        fig.tight_layout()
        plot = f"compare_{metric}.png"
        fig.savefig(os.path.join(out_dir, plot), dpi=100)
        plt.close(fig)
        plots.append(plot)
    return lines, plots


def compare_runs(workdirs: Sequence[str], out_dir: str) -> list[str]:
    """One table (report.md, compare.json) and one plot per metric over several eval runs."""
    if len(workdirs) < 2:
        raise ValueError(f"--compare needs at least two eval workdirs, got {list(workdirs)}.")
    runs = [load_results(w) for w in workdirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} ({w})" for n, w in zip(names, workdirs, strict=True)]
    series = [series_of(r) for r in runs]
    lines = ["# Comparison of long-context evaluations", ""]
    lines += [
        f"- {n}: `{w}` (trained length {r.get('trained_length')}, positions "
        f"`{json.dumps(r['positions'])}`)"
        for n, w, r in zip(names, workdirs, runs, strict=True)
    ]
    lines.append("")
    trained = [r["trained_length"] for r in runs if r.get("trained_length")]
    tables, plots = compare_series(names, series, out_dir, trained_lengths=trained)
    lines += tables
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(
            {"runs": dict(zip(names, series, strict=True)), "workdirs": list(workdirs)}, f, indent=2
        )
    return ["report.md", "compare.json", *plots]
