"""Long-context evaluation: `python -m ctxext_jax.evaluate --config configs/x.py --checkpoint P
--workdir W` writes W/eval/report.md, W/eval/results.json and PNG plots.

    python -m ctxext_jax.evaluate --config configs/tiny.py --checkpoint runs/tiny \\
        --workdir runs/tiny --lengths 256,512,1024,2048
    python -m ctxext_jax.evaluate --config configs/tiny.py:extend --checkpoint runs/tiny \\
        --workdir runs/tiny-as-yarn        # the base model evaluated under the YaRN positions
    python -m ctxext_jax.evaluate --workdir runs/cmp --compare runs/tiny runs/tiny-4x

The checkpoint (a run's workdir or step folder, or a Hugging Face folder: config.json +
safetensors, read by `ctxext_jax.hf`) supplies the architecture; for an HF folder the tokenizer
is the folder's own unless data.tokenizer is set. The config supplies the data, and its
positional fields (rope, local_rope, max_position_embeddings, window, chunk, sinks,
attention_impl) replace the checkpoint's wherever the config sets them to something other
than the schema default: one trained model can be evaluated under PI, YaRN, etc.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ctxext_jax import data, decode, restore, sharding
from ctxext_jax.cli import exit_on_user_error, parse_flags
from ctxext_jax.evals.report import compare_runs, write_report
from ctxext_jax.evals.retrieval import VARIANTS
from ctxext_jax.evals.scoring import make_scorer
from ctxext_jax.evals.suite import METRICS, EvalOptions, run_suite
from ctxext_jax.restore import POSITIONAL_FIELDS, plain
from ctxext_jax.steps import build_model


def attention_impl_for(configured: str, length: int, *, blockwise_above: int) -> str:
    """The dense `xla` backend materialises [T, T] scores: windows longer than
    `blockwise_above` switch it to the memory-efficient blockwise kernel. `auto` already
    picks a memory-efficient kernel for long inputs (cuDNN / splash on GPU / TPU, blockwise
    on CPU beyond a few hundred tokens), and named fused kernels are kept as they are."""
    if configured == "xla" and length > blockwise_above:
        return "blockwise"
    return configured


def evaluate(
    config: ml_collections.ConfigDict,
    checkpoint_path: str,
    workdir: str,
    options: EvalOptions | None = None,
    *,
    name: str | None = None,
    blockwise_above: int = 2048,
    progress: bool = True,
    generate: bool = False,
    rope_decode: str = "hf",
) -> dict:
    """Runs the suite on the checkpoint and writes W/eval/{report.md, results.json, *.png}.
    options=None evaluates at 1, 2, 4 and 8 times the trained length. generate=True scores
    passkey and needles by greedy generation through the KV cache (`--decode`) instead of
    teacher forcing; rope_decode is its mode for the length-dependent rope types."""
    resolved = restore.resolve(config, checkpoint_path)
    model_cfg, trained_length = resolved.model_cfg, resolved.trained_length
    if options is None:
        lengths = tuple(trained_length * f for f in (1, 2, 4, 8))
        options = EvalOptions(lengths=lengths, ppl_tokens=max(32768, 4 * lengths[-1] + 1))
    data_fields, tokenizer = resolved.data_fields, resolved.tokenizer
    data_cfg = data.DataConfig.from_config(data_fields)
    model, mesh, rules = restore.load(resolved)
    params = model.params
    batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules)

    impls = {
        n: attention_impl_for(model_cfg.attention_impl, n, blockwise_above=blockwise_above)
        for n in options.lengths
    }
    applies = {model_cfg.attention_impl: model.apply}

    def scorer_for(length: int):
        impl = impls[length]
        if impl not in applies:
            applies[impl] = build_model(
                dataclasses.replace(model_cfg, attention_impl=impl), mesh, rules, seed=0
            )[0]
        return make_scorer(
            applies[impl], params, batch_sharding=batch_sharding, pad_id=tokenizer.pad_id
        )

    def generator_for(length: int):
        def generator(prompts, max_new_tokens):
            out = decode.generate(model, [p.tolist() for p in prompts],
                                  max_new_tokens=max_new_tokens, ignore_eos=True,
                                  rope_decode=rope_decode, mesh=mesh, rules=rules)  # fmt: skip
            return out.new_ids

        return generator

    results = run_suite(
        scorer_for,
        tokenizer,
        data_cfg,
        options,
        progress=progress,
        generator_for=generator_for if generate else None,
    )
    results.update(
        name=name or os.path.basename(os.path.normpath(workdir)),
        checkpoint=os.path.abspath(checkpoint_path),
        source=resolved.source,
        trained_length=trained_length,
        positions={k: plain(getattr(model_cfg, k)) for k in POSITIONAL_FIELDS},
        overrides=resolved.overrides,
        model=json.loads(model_cfg.to_json()),
        data={k: data_fields[k] for k in ("dataset", "eval_split", "tokenizer")},
        options=dataclasses.asdict(options),
        attention_impl={str(n): impls[n] for n in options.lengths},
        retrieval_scoring=f"generation (rope_decode={rope_decode})"
        if generate
        else "teacher forcing",
        devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    )
    if jax.process_index() == 0:
        write_report(results, os.path.join(workdir, "eval"))
    return results


# --------------------------------------------------------------------------- command line
def define_flags() -> None:
    """The CLI flags; defined only when run as a program, so that importing this module next
    to `ctxext_jax.train` (which owns --config and --workdir there) never clashes."""
    config_flags.DEFINE_config_file("config", None, "Run config: configs/x.py[:arg].")
    flags.DEFINE_string("checkpoint", None, "Run workdir, step folder or HF folder.")
    flags.DEFINE_string("workdir", None, "Results go to WORKDIR/eval.")
    flags.DEFINE_string("name", None, "Run name in reports; default: basename of workdir.")
    flags.DEFINE_list("lengths", None, "Window lengths; default 1,2,4,8 x trained length.")
    flags.DEFINE_list("metrics", list(METRICS), f"Subset of {METRICS}.")
    flags.DEFINE_float("stride", 0.5, "Sliding-window stride: tokens, or fraction if < 1.")
    flags.DEFINE_integer(
        "ppl_tokens", None, "Eval-split tokens scored per length; default max(32768, 4 x longest)."
    )
    flags.DEFINE_integer("buckets", 16, "Position buckets for loss by position.")
    flags.DEFINE_integer("passkey_trials", 5, "Seeded keys per length x depth.")
    flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Key depths in [0, 1].")
    flags.DEFINE_integer("needle_trials", 2, "Trials per needle grid cell.")
    flags.DEFINE_list("needle_variants", list(VARIANTS), f"Subset of {VARIANTS}.")
    flags.DEFINE_integer("needles", 3, "Needles in the multi / distractor variants.")
    flags.DEFINE_integer("batch_tokens", 16384, "Tokens per forward pass.")
    flags.DEFINE_integer(
        "blockwise_above", 2048, "attention_impl=xla switches to blockwise for longer windows."
    )
    flags.DEFINE_integer("seed", 0, "Seed of passkeys, needles and haystack offsets.")
    flags.DEFINE_bool(
        "decode", False, "Score passkey and needles by greedy generation through the KV cache."
    )
    flags.DEFINE_enum(
        "rope_decode", "hf", ["hf", "consistent"], "With --decode: dynamic rope types' mode."
    )
    flags.DEFINE_list("compare", None, "Eval workdirs (W1,W2 or W1 W2) for one table and plots.")


def _options() -> EvalOptions | None:
    f = flags.FLAGS
    if f.lengths is None:
        return None
    try:
        lengths = tuple(int(n) for n in f.lengths)
        depths = tuple(float(d) for d in f.depths)
    except ValueError as e:
        raise ValueError(f"--lengths / --depths: {e}; give comma-separated numbers.") from None
    ppl_tokens = f.ppl_tokens or max(32768, 4 * max(lengths) + 1)
    return EvalOptions(
        lengths=lengths,
        metrics=tuple(f.metrics),
        stride=f.stride,
        ppl_tokens=ppl_tokens,
        buckets=f.buckets,
        passkey_trials=f.passkey_trials,
        depths=depths,
        needle_trials=f.needle_trials,
        needle_variants=tuple(f.needle_variants),
        needles=f.needles,
        batch_tokens=f.batch_tokens,
        seed=f.seed,
    )


def main(argv):
    f, extra = flags.FLAGS, argv[1:]  # `--compare W1 W2 W3` leaves W2 W3 as arguments
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax / TFDS info lines drown the progress line
    with exit_on_user_error():
        if not f.workdir:
            raise ValueError("--workdir is required (results go to WORKDIR/eval).")
        if extra and not f.compare:
            raise ValueError(f"unexpected arguments {extra}; only --compare takes several.")
        if f.compare:
            written = compare_runs(f.compare + extra, os.path.join(f.workdir, "eval"))
        else:
            config = f.config
            if config is None or not f.checkpoint:
                raise ValueError("--config and --checkpoint are required (or give --compare).")
            evaluate(
                config,
                f.checkpoint,
                f.workdir,
                _options(),
                name=f.name,
                blockwise_above=f.blockwise_above,
                generate=f.decode,
                rope_decode=f.rope_decode,
            )
            written = ["report.md", "results.json", "*.png"]
        print(f"wrote {', '.join(written)} to {os.path.join(f.workdir, 'eval')}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
