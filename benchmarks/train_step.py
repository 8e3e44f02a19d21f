"""Memory and speed of the trainer's own train step, per shape, length, remat policy and kernel.

    python benchmarks/train_step.py --shape tiny --lengths 256,1024 --steps 5        # runs steps
    python benchmarks/train_step.py --shape 336m --lengths 8192,32768 --compile_only \\
        --remat full,residual,offload --json                                         # any length
    python benchmarks/train_step.py --shape 336m --lengths 8192,32768 --compare hf   # on a GPU

The step is `train.build_program(...).train_step`: the jitted function the trainer runs (AdamW,
gradient clipping, chunked cross-entropy, sharding constraints), on one device. `--compile_only`
lowers it from abstract shapes and reads the compiled `memory_analysis` / `cost_analysis`
without allocating anything, so a CPU can examine any length; otherwise it also runs `--steps`
steps on random tokens after one warm-up (compiling) step and reports the median step time,
tokens/s and MFU (`model.flops_per_token` against `metrics.peak_flops_per_device`).

peak_bytes = argument + output - alias + temp of the compiled step (parameters, AdamW moments,
the batch and everything the step allocates). XLA:CPU keeps some bf16 buffers as float32, so on
CPU the figures compare policies and lengths; absolute figures need the target device.
`--compare hf` runs transformers' `LlamaForCausalLM` of the same shape in the same process
(torch sdpa, float32 weights under bf16 autocast, AdamW) and prints the tokens/s ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from shapes import SHAPES

from ctxext_jax import sharding
from ctxext_jax.config import defaults
from ctxext_jax.data import BATCH_KEYS
from ctxext_jax.metrics import peak_flops_per_device
from ctxext_jax.model import REMAT_POLICIES, ModelConfig, flops_per_token, param_count
from ctxext_jax.optim import OptimConfig
from ctxext_jax.train import build_program, device_batch

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--lengths", default="256,1024", help="comma-separated sequence lengths T")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--remat", default="full", help=f"comma-separated, of {list(REMAT_POLICIES)}")
    p.add_argument("--attention_impl", default="auto", help="comma-separated kernels")
    p.add_argument("--loss_chunk", type=int, default=2048, help="positions per CE chunk; 0: off")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--compile_only", action="store_true", help="compile and analyse; run nothing")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration")
    p.add_argument("--compare", choices=["hf"], default=None, help="also time transformers' Llama")
    args = p.parse_args(argv)
    for remat in args.remat.split(","):
        if remat not in REMAT_POLICIES:
            p.error(f"--remat {remat!r}: choose from {list(REMAT_POLICIES)}")
    if args.compare and args.compile_only:
        p.error("--compare hf times both models; it cannot be combined with --compile_only")
    return args


def make_program(shape: str, length: int, *, remat: str, attention_impl: str,
                 loss_chunk: int):  # fmt: skip
    """The trainer's program for one configuration on one device."""
    config = defaults()
    config.model.update(SHAPES[shape], max_position_embeddings=length, remat=remat,
                        attention_impl=attention_impl, loss_chunk=loss_chunk)  # fmt: skip
    config.mesh.shape.update(data=1, fsdp=1, tensor=1, sequence=1)
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    model_cfg = ModelConfig.from_config(config.model)
    optim_cfg = OptimConfig.from_config(config.optim, train_steps=1000)
    program = build_program(model_cfg, optim_cfg, mesh, mesh_cfg.rules, grad_accum=1, seed=0)
    return model_cfg, program


def random_batch(rng, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    inputs = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
    return {
        "inputs": inputs[:, :-1],
        "targets": inputs[:, 1:],
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        "loss_mask": np.ones((batch, length), np.float32),
    }


def analyse(compiled, tokens: int) -> dict:
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    row = {"flops": float((cost or {}).get("flops", float("nan")))}
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)  # fmt: skip
        row.update(peak_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
                   bytes_per_token=peak / tokens)  # fmt: skip
    return row


def time_steps(step, state, batch, steps: int):
    """-> (median step seconds, final state); `step(state, batch) -> (state, metrics)`."""
    state, metrics = step(state, batch)  # warm-up: compiles
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times), state


@functools.cache
def _peak_flops() -> float:
    return peak_flops_per_device()[0]


def measure(args, length: int, remat: str, attention_impl: str) -> dict:
    model_cfg, program = make_program(
        args.shape, length, remat=remat, attention_impl=attention_impl,
        loss_chunk=args.loss_chunk,
    )  # fmt: skip
    tokens = args.batch * length
    abstract_batch = {
        k: jax.ShapeDtypeStruct((args.batch, length), jnp.float32 if k == "loss_mask" else
                                jnp.int32, sharding=program.batch_sharding)
        for k in BATCH_KEYS
    }  # fmt: skip
    start = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state, abstract_batch).compile()
    row = {"shape": args.shape, "length": length, "batch": args.batch, "remat": remat,
           "attention_impl": attention_impl, "loss_chunk": args.loss_chunk,
           "params": param_count(program.abstract_params), "device": jax.devices()[0].device_kind,
           "compile_s": round(time.perf_counter() - start, 1),
           **analyse(compiled, tokens)}  # fmt: skip
    row["model_flops"] = flops_per_token(model_cfg, length) * tokens
    if args.compile_only:
        return row
    rng = np.random.default_rng(0)
    batch = device_batch(random_batch(rng, args.batch, length, model_cfg.vocab_size),
                         program.batch_sharding)  # fmt: skip
    state = program.init_state(program.init_params())
    seconds, state = time_steps(compiled, state, batch, args.steps)
    peak = _peak_flops()
    row.update(step_ms=1e3 * seconds, tokens_per_sec=tokens / seconds,
               mfu=row["model_flops"] / seconds / peak if peak else None)  # fmt: skip
    del state
    if args.compare == "hf":
        row.update(hf_compare(model_cfg, args.batch, length, args.steps))
        row["speedup_vs_hf"] = row["tokens_per_sec"] / row["hf_tokens_per_sec"]
    return row


def hf_compare(cfg: ModelConfig, batch: int, length: int, steps: int) -> dict:
    """transformers' Llama of the same shape: torch sdpa, float32 weights under bf16 autocast
    (float32 where our model computes in float32), AdamW; median step time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=length, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(hf_config).to(device)
    if cfg.remat != "none":  # transformers 5 renamed it
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    autocast = cfg.dtype in ("bfloat16", "float16")
    dtype = getattr(torch, cfg.dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=autocast):
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    out = {"hf_step_ms": 1e3 * seconds, "hf_tokens_per_sec": batch * length / seconds}
    if device == "cuda":
        out["hf_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


COLUMNS = [
    ("length", "T", "{}"), ("remat", "remat", "{}"), ("attention_impl", "attention", "{}"),
    ("peak_bytes", "peak GiB", "{:.2f}"), ("temp_bytes", "temp GiB", "{:.2f}"),
    ("bytes_per_token", "KiB/token", "{:.1f}"), ("flops", "compiled TFLOP", "{:.3f}"),
    ("step_ms", "step ms", "{:.1f}"), ("tokens_per_sec", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"), ("hf_tokens_per_sec", "HF tokens/s", "{:,.0f}"),
    ("speedup_vs_hf", "vs HF", "{:.2f}x"),
]  # fmt: skip
SCALE = {"peak_bytes": GiB, "temp_bytes": GiB, "bytes_per_token": 1024, "flops": 1e12}


def format_row(row: dict, cols) -> str:
    cells = []
    for key, _, fmt in cols:
        value = row.get(key)
        if key in SCALE and value is not None:
            value = value / SCALE[key]
        cells.append("-" if value is None else fmt.format(value))
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    args = parse_args(argv)
    if args.compare == "hf" and jax.default_backend() == "cpu":
        print("note: --compare hf on CPU times torch's CPU kernels against XLA:CPU; the ratio is "
              "indicative only, the issue's targets are GPU figures", file=sys.stderr)  # fmt: skip
    skip = set() if not args.compile_only else {"step_ms", "tokens_per_sec", "mfu"}
    if args.compare != "hf":
        skip |= {"hf_tokens_per_sec", "speedup_vs_hf"}
    cols = [c for c in COLUMNS if c[0] not in skip]
    if not args.json:
        print(f"shape {args.shape}, batch {args.batch}, loss_chunk {args.loss_chunk}, "
              f"{jax.devices()[0].device_kind}\n")  # fmt: skip
        print("| " + " | ".join(title for _, title, _ in cols) + " |")
        print("|" + "---|" * len(cols), flush=True)
    for length in (int(n) for n in args.lengths.split(",")):
        for remat in args.remat.split(","):
            for impl in args.attention_impl.split(","):
                row = measure(args, length, remat, impl)
                print(json.dumps(row) if args.json else format_row(row, cols), flush=True)


if __name__ == "__main__":
    main()
