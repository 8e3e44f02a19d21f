"""Prefill and decode speed against context length, with KV-cache bytes per token.

    python benchmarks/decode.py                                   # tiny model, CPU, ~2 min
    python benchmarks/decode.py --shape 336m --lengths 4096,16384,32768 --new_tokens 128
                                                                  # the 336M shape on a GPU

Random weights of a model shape (speed does not depend on the values): `tiny` is
configs/tiny.py's model; `336m` is 24 layers, d 1024, MLP 2816, 16 query / 4 KV heads of 64,
vocabulary 32000 (bfloat16 parameters and compute). Batch --batch, one prompt of C tokens:

  prefill tok/s     C / the time of one prefill of C tokens into an empty cache
  decode ms/token   the fused decode loop (`decode.generate`, one compiled while_loop) at
                    context C: (time of N new tokens - time of 1) / (N - 1), so prefill and
                    the first step cancel
  cache B/token     KV-cache bytes per cached token, all layers (keys, values, positions)

Each time is the fastest of --repeats runs after a warm-up call that compiles. With
--torch (default on CPU), transformers' LlamaForCausalLM of the same shape (eager attention on
CPU, sdpa on a GPU; its DynamicCache, `generate`) is timed the same way in the same run: the
ratio is the meaningful figure on a loaded CPU. Torch runs on one thread by default
(--torch_threads): on a shared 2-core machine its default thread pool spins against the other
processes and was 8x slower per token (490 against 58 ms for the tiny shape at C=256, load
average 15).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from shapes import SHAPES

from ctxext_jax import decode, hf, sharding
from ctxext_jax.model import ModelConfig
from ctxext_jax.steps import build_model

# Decoding keeps bfloat16 parameters for the 336M shape (no optimizer state to hold in float32).
DECODE_FIELDS = {"tiny": dict(max_position_embeddings=256),
                 "336m": dict(max_position_embeddings=4096, param_dtype="bfloat16")}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(DECODE_FIELDS))
    p.add_argument("--lengths", default="256,1024,4096", help="comma-separated contexts C")
    p.add_argument("--new_tokens", type=int, default=256, help="N tokens decoded per timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="time transformers' generate too (default: on CPU only)")  # fmt: skip
    p.add_argument("--torch_threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default; see the docstring)")  # fmt: skip
    return p.parse_args(argv)


def best_s(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after a warm-up call that compiles: the least
    disturbed by other processes on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours(cfg: ModelConfig, length: int, args) -> dict:
    mesh = hf.single_device_mesh()
    _, _, init = build_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0)
    model = decode.Model(config=cfg, params=init(), mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.batch, length)).tolist()
    capacity = length + args.new_tokens
    tokens = np.asarray(prompts, np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)

    def prefill():
        caches = decode.init_cache(model, args.batch, capacity=capacity)
        jax.block_until_ready(decode.prefill(model, caches, tokens, positions, fresh=True)[0])

    def generate(n):
        return lambda: decode.generate(model, prompts, max_new_tokens=n, ignore_eos=True,
                                       capacity=capacity)  # fmt: skip

    prefill_s = best_s(prefill, args.repeats)
    one, many = (
        best_s(generate(1), args.repeats),
        best_s(generate(args.new_tokens), args.repeats),
    )
    caches = decode.init_cache(model, 1, capacity=capacity)
    return {
        "prefill tok/s": args.batch * length / prefill_s,
        "decode ms/token": 1e3 * (many - one) / (args.new_tokens - 1),
        "cache B/token": decode.cache_bytes(caches) / capacity,
    }


def torch_baseline(cfg: ModelConfig, length: int, args) -> dict:
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=max(cfg.max_position_embeddings, length + args.new_tokens),
        tie_word_embeddings=False,
    )  # fmt: skip
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    # Eager attention on CPU (its fastest there); on a GPU, sdpa (flash), without which a long
    # prefill would hold the full [H, C, C] score matrix.
    model.config._attn_implementation = "sdpa" if device == "cuda" else "eager"
    ids = torch.as_tensor(
        np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, length)), device=device
    )
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def generate(n):
        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)  # fmt: skip
            sync()

        return run

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)
        sync()

    prefill_s = best_s(prefill, args.repeats)
    one, many = (
        best_s(generate(1), args.repeats),
        best_s(generate(args.new_tokens), args.repeats),
    )
    return {
        "torch prefill tok/s": args.batch * length / prefill_s,
        "torch decode ms/token": 1e3 * (many - one) / (args.new_tokens - 1),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("error: --new_tokens must be >= 2 (timings subtract a 1-token run).")
    import ml_collections

    from ctxext_jax.config import defaults

    fields = defaults().model.to_dict()
    fields.update(SHAPES[args.shape], **DECODE_FIELDS[args.shape])
    cfg = ModelConfig.from_config(ml_collections.ConfigDict(fields))
    platform = jax.default_backend()
    with_torch = args.torch if args.torch is not None else platform == "cpu"
    cols = ["prefill tok/s", "decode ms/token", "cache B/token"]
    if with_torch:
        cols += ["torch prefill tok/s", "torch decode ms/token"]
    abstract = build_model(cfg, hf.single_device_mesh(), sharding.DEFAULT_RULES, seed=0)[1]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    print(
        f"device: {jax.devices()[0].device_kind} ({platform}); shape {args.shape} "
        f"({params / 1e6:.1f}M parameters, {cfg.dtype}); batch {args.batch}; "
        f"{args.new_tokens} new tokens; best of {args.repeats}\n"
    )
    print("| context | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for length in (int(n) for n in args.lengths.split(",")):
        row = ours(cfg, length, args)
        if with_torch:
            row.update(torch_baseline(cfg, length, args))
        cells = [f"{row[c]:,.0f}" if "tok/s" in c or "B/" in c else f"{row[c]:.2f}" for c in cols]
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
