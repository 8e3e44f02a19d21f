"""Text generation: `python -m ctxext_jax.generate`, a thin CLI over `ctxext_jax.decode`.

    python -m ctxext_jax.generate --config configs/tiny.py --checkpoint runs/tiny \\
        --prompt "def main(" --max_new_tokens 64
    python -m ctxext_jax.generate --config configs/tiny.py --checkpoint runs/tiny \\
        --prompts in.jsonl --output out.jsonl --temperature 0.8 --top_p 0.95
    python -m ctxext_jax.generate --checkpoint /models/Llama-3.2-1B --prompts in.jsonl \\
        --output out.jsonl --config.mesh.shape.data=1 --config.mesh.shape.tensor=-1

`--checkpoint` and `--config` mean what they mean for `evaluate`: the checkpoint (a run's
workdir, a step folder or a Hugging Face folder) supplies the architecture and weights, the
config its tokenizer, mesh and positional fields that replace the checkpoint's (so a base
model can generate under YaRN). For an HF folder `--config` may be left out: the schema's
defaults stand in, and `--config.mesh.*` overrides still apply.

An input line is `{"text": "..."}` (encoded as [bos] + tokens; needs a tokenizer) or
`{"ids": [1, 2, 3]}` (used as given); an output line holds `"ids"` (the prompt), `"new_ids"`
(ending with eos when the model stopped there) and, with a tokenizer, `"text"` (the new tokens
decoded), plus `"logprobs"` with --logprobs. Lines come out in input order, a batch at a time.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from ctxext_jax import decode, hf, restore
from ctxext_jax.cli import exit_on_user_error, parse_flags
from ctxext_jax.metrics import Progress

CACHES = ("full", "streaming")
ROPE_DECODE = ("hf", "consistent")


# ---------------------------------------------------------------------------------- input
def prompt_ids(record, where: str, tokenizer, vocab_size: int) -> list[int]:
    """One input object ({"text": ...} or {"ids": [...]}) -> token ids. `where` names it in
    errors ("in.jsonl line 3")."""
    if not isinstance(record, dict) or ("text" in record) == ("ids" in record):
        raise ValueError(
            f'{where}: expected an object with "text" (a string) or "ids" (a list of token '
            f'ids), e.g. {{"text": "Once upon a time"}}; got {json.dumps(record)[:80]}.'
        )
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f'{where}: "text" must be a string, got {type(text).__name__}.')
        if tokenizer is None:
            raise ValueError(
                f'{where}: "text" needs a tokenizer and the checkpoint has none; give "ids", '
                "or set --config.data.tokenizer=hf:/path/tokenizer.json."
            )
        if not text:
            raise ValueError(f"{where}: the prompt is empty; give at least one character.")
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    ids = record["ids"]
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise ValueError(f'{where}: "ids" must be a list of integer token ids.')
    if not ids:
        raise ValueError(f'{where}: the prompt is empty; "ids" needs at least one token id.')
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})."
        )
    return ids


def read_prompts(path: str, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """A JSONL file (one object per line; blank lines skipped) -> (prompts as token ids,
    the line number of each)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: no file {path!r}; give a .jsonl file of prompts.")
    prompts, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno})."
                ) from None
            prompts.append(prompt_ids(record, where, tokenizer, vocab_size))
            lines.append(number)
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts (every line is blank).")
    return prompts, lines


# ---------------------------------------------------------------------------------- output
def output_record(prompt: Sequence[int], new_ids: Sequence[int], tokenizer, logprobs) -> dict:
    record = {"ids": list(prompt), "new_ids": list(new_ids)}
    if tokenizer is not None:
        record["text"] = tokenizer.decode(new_ids)
    if logprobs is not None:
        record["logprobs"] = [round(float(p), 6) for p in logprobs]
    return record


def generate_all(
    model,
    prompts: list[list[int]],
    write,
    *,
    batch_size: int,
    options: dict,
    tokenizer=None,
    progress: Progress | None = None,
) -> None:
    """Generates for `prompts` a batch at a time; write(record) gets each output in order."""
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        out = decode.generate(model, batch, **options)
        logprobs = out.logprobs or [None] * len(batch)
        for prompt, new_ids, lp in zip(batch, out.new_ids, logprobs, strict=True):
            write(output_record(prompt, new_ids, tokenizer, lp))
        if progress is not None:
            done = start + len(batch)
            progress.advance(len(batch), f"{done}/{len(prompts)} prompts")


# ---------------------------------------------------------------------------- command line
def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"),
        "Run config: configs/x.py[:arg]; default the schema's (enough for a Hugging Face folder).",
    )
    flags.DEFINE_string("checkpoint", None, "Run workdir, step folder or HF folder.")
    flags.DEFINE_string("prompts", None, 'JSONL input: {"text": ...} or {"ids": [...]} per line.')
    flags.DEFINE_string("output", None, "JSONL output (default: stdout).")
    flags.DEFINE_string("prompt", None, "One text prompt; the continuation goes to stdout.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt (at most).")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples from softmax(logits / T).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with mass >= p.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (same seed and batch -> same tokens).")
    flags.DEFINE_integer("prefill_chunk", 0, "Prefill in pieces of this many tokens (0 = one).")
    flags.DEFINE_bool("ignore_eos", False, "Keep generating after eos, up to max_new_tokens.")
    flags.DEFINE_integer("eos_id", None, "Stop token; default the tokenizer's (HF: config.json).")
    flags.DEFINE_enum("cache", "full", CACHES, "full, or streaming (sinks + window, unbounded).")
    flags.DEFINE_enum(
        "rope_decode", "hf", ROPE_DECODE, "Dynamic rope types while decoding: hf or consistent."
    )
    flags.DEFINE_integer(
        "capacity", None, "Cache slots of global (G) layers; default longest prompt + new tokens."
    )
    flags.DEFINE_integer("sinks", None, "--cache=streaming: attention-sink slots (default 4).")
    flags.DEFINE_integer(
        "window", None, "--cache=streaming: window slots (default max_position_embeddings - sinks)."
    )
    flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
    flags.DEFINE_bool("logprobs", False, "Add each new token's log-probability to the output.")


def options_from_flags(eos_id: int | None) -> dict:
    """The flags as `decode.generate` keyword arguments, checked with the flag named."""
    f = flags.FLAGS
    for name, ok, rule in [
        ("max_new_tokens", f.max_new_tokens >= 1, ">= 1"),
        ("temperature", f.temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_k", f.top_k >= 0, ">= 0 (0 = off)"),
        ("top_p", 0 < f.top_p <= 1, "in (0, 1] (1 = off)"),
        ("prefill_chunk", f.prefill_chunk >= 0, ">= 0 (0 = the whole prompt at once)"),
        ("batch_size", f.batch_size >= 1, ">= 1"),
        ("capacity", f.capacity is None or f.capacity >= 1, ">= 1"),
        ("sinks", f.sinks is None or f.sinks >= 0, ">= 0"),
        ("window", f.window is None or f.window >= 1, ">= 1"),
    ]:
        if not ok:
            raise ValueError(f"--{name}={getattr(f, name)} must be {rule}.")
    for name in ("sinks", "window"):
        if getattr(f, name) is not None and f.cache != "streaming":
            raise ValueError(f"--{name} sets the streaming cache; add --cache=streaming.")
    return dict(
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
        eos_id=f.eos_id if f.eos_id is not None else eos_id,
        ignore_eos=f.ignore_eos,
        prefill_chunk=f.prefill_chunk,
        cache=f.cache,
        rope_decode=f.rope_decode,
        capacity=f.capacity,
        sinks=f.sinks,
        window=f.window,
        return_logprobs=f.logprobs,
    )


def check_fits(prompts: list[list[int]], options: dict, where, *, global_layers: bool) -> None:
    """The global (G) layers' full cache of an explicit --capacity must hold every prompt and
    its new tokens (window and chunk layers keep rings of their own size)."""
    capacity = options["capacity"]
    if capacity is None or options["cache"] != "full" or not global_layers:
        return
    for i, prompt in enumerate(prompts):
        if len(prompt) + options["max_new_tokens"] > capacity:
            raise ValueError(
                f"{where(i)}: the prompt's {len(prompt)} tokens + --max_new_tokens="
                f"{options['max_new_tokens']} do not fit a full cache of --capacity={capacity}; "
                f"set --capacity={len(prompt) + options['max_new_tokens']} or more (or leave it "
                "unset), or use --cache=streaming."
            )


def main(argv):
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    with exit_on_user_error():
        if argv[1:]:
            raise ValueError(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
        if not f.checkpoint:
            raise ValueError("--checkpoint is required: a run workdir, step folder or HF folder.")
        if (f.prompt is None) == (f.prompts is None):
            raise ValueError('give either --prompt "text" or --prompts in.jsonl.')
        if f.prompt is not None and f.output:
            raise ValueError("--output goes with --prompts; --prompt prints to stdout.")
        if not f["config"].present and not hf.is_hf_folder(f.checkpoint):
            raise ValueError(
                f"--config is required for {f.checkpoint} (a run's checkpoint): give the run's "
                "config (its tokenizer and positions), e.g. --config configs/tiny.py."
            )
        resolved = restore.resolve(f.config, f.checkpoint, tokenizer_required=False)
        tokenizer, vocab = resolved.tokenizer, resolved.model_cfg.vocab_size
        options = options_from_flags(resolved.eos_id)
        global_layers = "global" in resolved.model_cfg.layer_kinds
        if f.prompt is not None:
            prompts = [prompt_ids({"text": f.prompt}, "--prompt", tokenizer, vocab)]
            check_fits(prompts, options, lambda i: "--prompt", global_layers=global_layers)
        else:
            prompts, lines = read_prompts(f.prompts, tokenizer, vocab)
            check_fits(prompts, options, lambda i: f"{f.prompts} line {lines[i]}",
                       global_layers=global_layers)  # fmt: skip
            if f.output and os.path.abspath(f.output) == os.path.abspath(f.prompts):
                raise ValueError("--output must differ from --prompts (it would be overwritten).")
            if f.output and not os.path.isdir(os.path.dirname(os.path.abspath(f.output))):
                raise FileNotFoundError(f"--output: the folder of {f.output} does not exist.")
        loaded, mesh, rules = restore.load(resolved)
        model = decode.Model(config=loaded.config, params=loaded.params, mesh=mesh, rules=rules)

        if f.prompt is not None:
            out = decode.generate(model, prompts, **options)
            print(tokenizer.decode(out.new_ids[0]), flush=True)
            return
        sink = open(f.output, "w", encoding="utf-8") if f.output else sys.stdout
        try:
            bar = Progress(len(prompts), stream=sys.stderr, label="generate")

            def write(record):
                sink.write(json.dumps(record) + "\n")
                sink.flush()

            generate_all(
                model,
                prompts,
                write,
                batch_size=f.batch_size,
                options=options,
                tokenizer=tokenizer,
                progress=bar,
            )
        finally:
            if sink is not sys.stdout:
                sink.close()
        if f.output:
            print(f"wrote {len(prompts)} generations to {f.output}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
