"""Perplexity of a long stream decoded through the KV cache: dense vs window vs StreamingLLM.

    python benchmarks/streaming.py --config configs/tiny.py --checkpoint runs/tiny
    python benchmarks/streaming.py --config configs/tiny.py --checkpoint runs/tiny \\
        --lengths 256,2048,4096 --sinks 4

The eval split is read as one token stream (`[bos] doc [eos]` concatenated, as evaluate's
perplexity reads it) and its first N tokens are fed through the cache (`decode.score_stream`),
each token predicted from everything the cache still holds. Three caches, as in the
StreamingLLM paper (Xiao et al. 2023, Table/Figure 3):

  dense      every token kept, positions 0 .. N-1: past the trained length the positions
             are ones the model never saw, and perplexity explodes
  window     the last W tokens only (a ring, positions inside the cache): the first tokens,
             which soak up attention ("attention sinks"), are evicted
  streaming  `sinks` first tokens + the last W - sinks, positions inside the cache: bounded
             memory, perplexity stays near the in-length value however long the stream

and the in-length reference on the same tokens, `recompute`: the model at its trained length L
(no cache), windows of L every L/2 tokens recomputed from scratch, each token scored once with
L/2 .. L tokens of context (evaluate's perplexity protocol).

The window and streaming caches are fed one token at a time (--chunk 1), so every token sees
exactly its window. Prints one markdown row per cache: perplexity over the whole stream of each
length and over its last `--tail` tokens (where the difference shows), and the cache slots.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ctxext_jax import data, decode, restore, sweep
from ctxext_jax.cli import exit_on_user_error
from ctxext_jax.evals.perplexity import token_stream, window_plan
from ctxext_jax.evals.scoring import make_scorer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py", help="configs/x.py[:variant]")
    p.add_argument("--checkpoint", default="runs/tiny", help="run workdir, step or HF folder")
    p.add_argument("--lengths", default=None, help="stream lengths; default 1, 8, 16 x trained")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink slots of 'streaming'")
    p.add_argument("--window", type=int, default=None,
                   help="slots of window and streaming; default the trained length")  # fmt: skip
    p.add_argument("--tail", type=int, default=256, help="last tokens scored separately")
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens per update of window / streaming (1: exact)")  # fmt: skip
    return p.parse_args(argv)


def perplexities(losses: np.ndarray, tail: int) -> tuple[float, float]:
    """(perplexity of all losses, of the last `tail`)."""
    return float(np.exp(losses.mean())), float(np.exp(losses[-tail:].mean()))


def recompute_losses(scorer, ids: np.ndarray, length: int) -> np.ndarray:
    """Per-token losses [N - 1] from windows of `length` every length / 2 tokens, each target
    taken from the first window that scores it (evaluate's sliding-window protocol)."""
    inputs, targets = ids[:-1], ids[1:]
    if len(inputs) <= length:
        return scorer(inputs[None], targets[None])[0][0]
    losses = np.zeros(len(inputs), np.float32)
    for begin, first in window_plan(len(inputs), length=length, stride=length // 2):
        window = slice(begin, begin + length)
        scored = scorer(inputs[None, window], targets[None, window])[0][0]
        losses[begin + first : begin + length] = scored[first:]
    return losses


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        resolved = restore.resolve(sweep.load_config(args.config), args.checkpoint)
        trained = resolved.trained_length
        lengths = (
            [int(n) for n in args.lengths.split(",")]
            if args.lengths
            else [trained, 8 * trained, 16 * trained]
        )
        window = args.window or trained
        if not 0 <= args.sinks < window:
            raise ValueError(f"--sinks={args.sinks} must be in [0, window={window}).")
        tokenizer = resolved.tokenizer
        stream = token_stream(
            data.eval_documents(data.DataConfig.from_config(resolved.data_fields)),
            tokenizer,
            max_tokens=max(lengths),
        )
        if len(stream) < max(lengths):
            raise ValueError(
                f"the eval split holds {len(stream)} tokens, fewer than --lengths {max(lengths)}."
            )
        loaded, mesh, rules = restore.load(resolved)
        model = decode.Model(config=loaded.config, params=loaded.params, mesh=mesh, rules=rules)
    caches = {  # the dense cache is exact for any chunk: feed it a trained length at a time
        "dense": dict(cache="full", chunk=trained),
        "window": dict(cache="streaming", sinks=0, window=window, chunk=args.chunk),
        "streaming": dict(
            cache="streaming", sinks=args.sinks, window=window - args.sinks, chunk=args.chunk
        ),
    }
    slots = {
        "recompute": f"{trained}, recomputed",
        "dense": "N",
        "window": str(window),
        "streaming": f"{args.sinks} + {window - args.sinks}",
    }
    scorer = make_scorer(loaded.apply, loaded.params)
    print(
        f"model: {args.checkpoint} ({resolved.source}), trained length {trained}; stream: the "
        f"eval split of {resolved.data_fields['dataset']}; perplexity over the whole stream | "
        f"over its last {args.tail} tokens\n"
    )
    header = " | ".join(f"N={n} ({n / trained:g}x)" for n in lengths)
    print(f"| cache | slots per layer | {header} | seconds |")
    print("|" + "---|" * (len(lengths) + 3))
    for name in ["recompute", *caches]:
        start, cells = time.perf_counter(), []
        for n in lengths:
            if name == "recompute":
                losses = recompute_losses(scorer, stream[:n], trained)
            else:
                losses = decode.score_stream(model, stream[:n].tolist(), **caches[name])
            whole, tail = perplexities(losses, min(args.tail, n - 1))
            cells.append(f"{whole:.2f} \\| {tail:.2f}")
        seconds = time.perf_counter() - start
        print(f"| {name} | {slots[name]} | " + " | ".join(cells) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
