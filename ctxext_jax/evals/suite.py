"""The whole long-context suite on one model, and the cheap subset the trainer logs.

Both take a scorer (see `scoring.make_scorer`), so the same code evaluates our checkpoints,
imported Hugging Face models and the live parameters of a training run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from ctxext_jax.data import DataConfig, eval_documents
from ctxext_jax.evals.perplexity import (
    resolve_stride,
    sliding_perplexity,
    token_stream,
    window_plan,
)
from ctxext_jax.evals.retrieval import (
    NAMES,
    VARIANTS,
    Generator,
    needle_grid,
    needle_min_length,
    passkey_grid,
    passkey_min_length,
)
from ctxext_jax.evals.scoring import Scorer, make_scorer
from ctxext_jax.metrics import Progress

METRICS = ("ppl", "passkey", "needle")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to measure. stride: tokens, or a fraction of each window when < 1."""

    lengths: tuple[int, ...]
    metrics: tuple[str, ...] = METRICS
    stride: float = 0.5
    ppl_tokens: int = 32768
    buckets: int = 16
    passkey_trials: int = 5
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 2
    needle_variants: tuple[str, ...] = VARIANTS
    needles: int = 3
    batch_tokens: int = 16384
    seed: int = 0

    def __post_init__(self):
        if not self.lengths or any(int(n) < 2 for n in self.lengths):
            raise ValueError(f"--lengths={self.lengths} must be a non-empty list of lengths >= 2.")
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise ValueError(f"--metrics: unknown {sorted(unknown)}; choose from {METRICS}.")
        bad = set(self.needle_variants) - set(VARIANTS)
        if bad:
            raise ValueError(f"--needle_variants: unknown {sorted(bad)}; choose from {VARIANTS}.")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise ValueError(f"--depths={self.depths} must be fractions in [0, 1].")
        for name in (
            "ppl_tokens",
            "buckets",
            "passkey_trials",
            "needle_trials",
            "needles",
            "batch_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1.")
        if self.needles > len(NAMES):
            # Each needle needs its own name; caught here, before any other metric has run.
            raise ValueError(f"--needles={self.needles} must be in [1, {len(NAMES)}].")
        for length in self.lengths:
            resolve_stride(self.stride, length)


def _tokens_of(options: EvalOptions, n_stream: int) -> int:
    """Forward-pass tokens the run will take (for the progress line's ETA)."""
    total = 0
    for length in options.lengths:
        if "ppl" in options.metrics:
            stride = resolve_stride(options.stride, length)
            total += len(window_plan(n_stream - 1, length=length, stride=stride)) * length
        if "passkey" in options.metrics:
            total += len(options.depths) * options.passkey_trials * length
        if "needle" in options.metrics:
            rows = {"single": 1, "multi": options.needles, "distractor": options.needles}
            total += sum(
                rows[v] * len(options.depths) * options.needle_trials * length
                for v in options.needle_variants
            )
    return total


def _eval_tokens(tokenizer, data_cfg: DataConfig, options: EvalOptions):
    """-> (the first ppl_tokens tokens of the eval split, the needle haystack): one read of the
    split serves both, the haystack being the same text without the document separators."""
    longest = max(options.lengths)
    stream = token_stream(
        eval_documents(data_cfg), tokenizer, max_tokens=max(options.ppl_tokens, 2 * longest)
    )
    haystack = stream[(stream != tokenizer.bos_id) & (stream != tokenizer.eos_id)]
    return stream[: options.ppl_tokens], haystack


def _check_lengths(options: EvalOptions, tokenizer, available: int) -> None:
    """Raises ValueError, before any metric runs, where a length cannot be measured: perplexity
    needs more than the longest window of tokens, passkey and needles room for their prompt."""
    longest, shortest = max(options.lengths), min(options.lengths)
    if "ppl" in options.metrics and available <= longest:
        raise ValueError(
            f"--lengths: {longest} needs more than {longest} tokens of the eval split but only "
            f"{available} are there (--ppl_tokens={options.ppl_tokens}); raise --ppl_tokens or "
            "lower the lengths."
        )
    needles = 1 if set(options.needle_variants) == {"single"} else options.needles
    for metric, need in [
        ("passkey", passkey_min_length(tokenizer)),
        ("needle", needle_min_length(tokenizer, needles=needles)),
    ]:
        if metric in options.metrics and shortest < need:
            raise ValueError(
                f"--lengths: {shortest} tokens cannot hold the {metric} prompt ({need} tokens "
                f"without filler with this tokenizer); use lengths >= {need} or drop {metric} "
                "from --metrics."
            )


def _by_length(grids: list[dict], lengths: Sequence[int]) -> dict:
    """One-length grids (one per length, in order) -> one grid over all `lengths`."""
    merged = {**grids[0], "lengths": list(lengths)}
    for key in ("accuracy", "distractor_rate"):
        if key in grids[0]:
            merged[key] = [g[key][0] for g in grids]
    return merged


def run_suite(
    scorer_for: Callable[[int], Scorer],
    tokenizer,
    data_cfg: DataConfig,
    options: EvalOptions,
    *,
    progress: bool = True,
    generator_for: Callable[[int], Generator] | None = None,
) -> dict:
    """-> {"perplexity": [per length], "passkey": grid, "needle": {variant: grid}} for the
    metrics asked for, and "timings_s" per metric. scorer_for(length) gives the scorer to use
    at that window length; generator_for(length), when given, a generator that scores passkey
    and needles by real generation instead of teacher forcing."""
    stream, haystack = _eval_tokens(tokenizer, data_cfg, options)
    _check_lengths(options, tokenizer, len(stream))
    bar = Progress(_tokens_of(options, len(stream))) if progress else None
    o, lengths = options, options.lengths

    def generator(length):
        return generator_for(length) if generator_for else None

    def perplexity():
        return [
            sliding_perplexity(scorer_for(n), stream, length=n,
                               stride=resolve_stride(o.stride, n), batch_tokens=o.batch_tokens,
                               buckets=o.buckets, progress=bar)
            for n in lengths
        ]  # fmt: skip

    def passkey():
        return _by_length([
            passkey_grid(scorer_for(n), tokenizer, lengths=[n], depths=o.depths,
                         trials=o.passkey_trials, seed=o.seed, batch_tokens=o.batch_tokens,
                         progress=bar, generator=generator(n))
            for n in lengths
        ], lengths)  # fmt: skip

    def needle():
        return {
            variant: _by_length([
                needle_grid(scorer_for(n), tokenizer, haystack, lengths=[n], depths=o.depths,
                            trials=o.needle_trials, variant=variant, needles=o.needles,
                            seed=o.seed, batch_tokens=o.batch_tokens, progress=bar,
                            generator=generator(n))
                for n in lengths
            ], lengths)
            for variant in o.needle_variants
        }  # fmt: skip

    measures = {"ppl": ("perplexity", perplexity), "passkey": ("passkey", passkey),
                "needle": ("needle", needle)}  # fmt: skip
    results: dict = {}
    timings: dict[str, float] = {}
    for metric, (key, measure) in measures.items():
        if metric in options.metrics:
            start = time.perf_counter()
            results[key] = measure()
            timings[metric] = round(time.perf_counter() - start, 2)
    results["timings_s"] = timings
    return results


_STREAMS: dict[tuple, np.ndarray] = {}


def _cached_stream(data_cfg: DataConfig, tokenizer, max_tokens: int) -> np.ndarray:
    """The subset's eval tokens, read once per process (the trainer calls every few steps)."""
    key = (data_cfg, getattr(tokenizer, "spec", type(tokenizer).__name__), max_tokens)
    if key not in _STREAMS:
        _STREAMS[key] = token_stream(eval_documents(data_cfg), tokenizer, max_tokens=max_tokens)
    return _STREAMS[key]


def long_eval_subset(
    apply: Callable,
    params,
    *,
    tokenizer,
    data_cfg: DataConfig,
    lengths: Sequence[int],
    passkey_trials: int,
    seed: int,
    batch_sharding=None,
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    windows: int = 4,
    batch_tokens: int = 16384,
) -> dict[str, float]:
    """The cheap subset for training-time logging: `ppl_len_{L}` (half-overlapping windows over
    the first ~`windows` * L tokens of the eval split) and `passkey_acc_len_{L}` (mean over
    `depths` x `passkey_trials` seeded keys) for each L in `lengths` (passkey only where L
    holds the template: about 250 tokens with the byte tokenizer).

    apply(params, tokens) -> logits; batch_sharding: the trainer's ("batch", "length")
    sharding, so rows are laid out like training batches.
    """
    scorer = make_scorer(apply, params, batch_sharding=batch_sharding, pad_id=tokenizer.pad_id)
    stream = _cached_stream(data_cfg, tokenizer, windows * max(lengths) + 1)
    out: dict[str, float] = {}
    for length in lengths:
        if len(stream) > length:
            ppl = sliding_perplexity(
                scorer,
                stream,
                length=length,
                stride=max(1, length // 2),
                batch_tokens=batch_tokens,
                buckets=1,
            )
            out[f"ppl_len_{length}"] = ppl["ppl"]
        if passkey_trials > 0 and length >= passkey_min_length(tokenizer):
            grid = passkey_grid(
                scorer,
                tokenizer,
                lengths=[length],
                depths=depths,
                trials=passkey_trials,
                seed=seed,
                batch_tokens=batch_tokens,
            )
            out[f"passkey_acc_len_{length}"] = float(np.mean(grid["accuracy"][0]))
    return out
