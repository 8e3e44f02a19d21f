"""The run-config schema (defaults) and `validate`, which turns every bad value into one error.

Config flows one way: `configs/x.py:get_config(arg)` builds on `defaults()`, the command line
overrides fields (`--config.train.lr=3e-4`), `validate()` checks the whole thing before anything
is built, and the trainer hands small frozen dataclasses to the model, data and optimiser.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import sys
from collections.abc import Iterator

import ml_collections

from ctxext_jax import sharding
from ctxext_jax.attention.kernels import IMPLEMENTATIONS
from ctxext_jax.model import LAYER_KINDS, REMAT_POLICIES
from ctxext_jax.positions.rope import validate_rope


class ConfigError(ValueError):
    """A config mistake; the message names the key and the fix."""


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for the CLIs. ml_collections loads the config file and applies the
    `--config.a.b=v` overrides while flags are parsed, so a missing file, an unknown variant
    or override key, or an error raised by `get_config` surfaces here: it prints
    `error: <message>` alone and exits 2 (CTXEXT_TRACEBACK=1 shows the traceback)."""
    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            # A file that failed to load is a stand-in that raises on first attribute access.
            config.keys  # noqa: B018
        return remaining
    except (flags.Error, OSError, AttributeError, KeyError) as e:
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        root = e
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        if isinstance(root, KeyError | AttributeError):
            message = (
                f"--config: no field {root} to override; check the --config.<group>.<key> "
                "names against the config reference in the README."
            )
        elif missing := re.search(r"No such file or directory: '([^']+)'", str(root)):
            message = f"--config: no file {missing[1]!r}; give configs/<name>.py[:variant]."
        else:  # ml_collections embeds the config file's traceback: its last line says it
            lines = [line.strip() for line in str(root).splitlines() if line.strip()]
            message = re.sub(r"^[A-Za-z]*(Error|Exception): ", "", lines[-1])
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line mains: a config, data or checkpoint mistake (ValueError, missing file)
    prints `error: <message>` alone and exits 2; CTXEXT_TRACEBACK=1 shows the traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("CTXEXT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip interpreter teardown: Orbax / TensorStore worker threads can still hold callbacks
        # for an event loop that teardown closes, and print tracebacks about it after the
        # message. Nothing is lost: checkpoints commit atomically, metrics are flushed per line.
        os._exit(2)


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = dict(
        vocab_size=320,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        max_position_embeddings=256,  # the context the model is trained for
        rope={"rope_type": "default", "rope_theta": 10000.0},
        local_rope={},  # empty: local (L) and chunked (C) layers use `rope`
        alibi=False,  # ALiBi instead of RoPE (needs rope_type "nope")
        layer_pattern="G",  # G global, L sliding window, C chunked; cycled over layers
        window=0,
        chunk=0,
        sinks=0,
        attention_impl="auto",
        attention_bias=False,
        qk_norm=False,
        rms_eps=1e-5,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        remat="none",  # none | full | dots
        scan_layers=True,
        init_std=0.02,
    )
    c.data = dict(
        dataset="embedded",
        data_dir="",
        files="",
        text_key="text",
        train_split="train",
        eval_split="validation",
        tokenizer="bytes",
        seq_len=256,
        seed=0,
        num_workers=0,
    )
    c.train = dict(
        steps=200,
        batch_size=16,  # global, in sequences
        grad_accum=1,
        seed=0,
        log_every=10,
    )
    c.optim = dict(
        lr=3e-3,
        warmup_steps=20,
        schedule="cosine",  # cosine | linear | constant
        decay_steps=0,  # length of warmup + decay; 0: train.steps
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
    )
    c.mesh = dict(
        shape=dict(data=-1, fsdp=1, tensor=1, sequence=1),
        rules=[(name, list(axes)) for name, axes in sharding.DEFAULT_RULES],
    )
    c.checkpoint = dict(
        every=100,
        keep=3,
        init_from="",  # another run's workdir or checkpoint dir: start from its weights only
    )
    c.eval = dict(
        every=100,
        batches=8,
        batch_size=16,
        every_long=0,  # > 0: a cheap long-context subset (perplexity, passkey) every N steps
        long_lengths=(),  # its window lengths; empty: 2x and 4x data.seq_len
        long_passkey_trials=2,
    )
    return ml_collections.ConfigDict(c)


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _positive(config, keys: list[str]) -> None:
    for key in keys:
        group, name = key.split(".")
        value = config[group][name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(key, f"must be a positive integer, got {value!r}.")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raises ConfigError naming the first bad key and how to fix it."""
    import jax

    m, t, o = config.model, config.train, config.optim
    _positive(
        config,
        [
            "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
            "model.n_kv_heads", "model.head_dim", "model.mlp_dim",
            "model.max_position_embeddings", "data.seq_len", "train.steps",
            "train.batch_size", "train.grad_accum", "train.log_every", "checkpoint.every",
            "checkpoint.keep", "eval.every", "eval.batches", "eval.batch_size",
        ],
    )  # fmt: skip
    if m.n_heads % m.n_kv_heads:
        _fail(
            "model.n_heads",
            f"{m.n_heads} query heads are not a multiple of model.n_kv_heads={m.n_kv_heads}; "
            "grouped-query attention needs n_heads = n_kv_heads * group size.",
        )
    if m.head_dim % 2:
        _fail("model.head_dim", f"RoPE rotates pairs of dims; {m.head_dim} must be even.")
    _validate_positions(m)
    _validate_attention(m)
    for key, value, allowed in [
        ("model.remat", m.remat, REMAT_POLICIES),
        ("model.dtype", m.dtype, ("float32", "bfloat16", "float16")),
        ("model.param_dtype", m.param_dtype, ("float32", "bfloat16")),
        ("optim.schedule", o.schedule, ("cosine", "linear", "constant")),
    ]:
        if value not in allowed:
            _fail(key, f"unknown value {value!r}; choose one of {sorted(allowed)}.")
    if not o.lr > 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}.")
    schedule_steps = o.decay_steps or t.steps
    if o.decay_steps < 0:
        _fail("optim.decay_steps", f"must be >= 0 (0: train.steps), got {o.decay_steps}.")
    if o.warmup_steps < 0 or o.warmup_steps >= schedule_steps:
        _fail(
            "optim.warmup_steps",
            f"must be in [0, {schedule_steps}) (the schedule's length), got {o.warmup_steps}.",
        )
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}.")
    if o.grad_clip < 0 or o.weight_decay < 0:
        _fail("optim.grad_clip", "grad_clip and weight_decay must be >= 0 (0 disables).")
    if t.batch_size % t.grad_accum:
        _fail(
            "train.grad_accum",
            f"train.batch_size={t.batch_size} is not divisible by {t.grad_accum} micro-steps.",
        )
    _validate_mesh(config, num_devices or jax.device_count(), jax.process_count())
    _validate_data(config)
    if config.checkpoint.init_from:
        from ctxext_jax import hf
        from ctxext_jax.checkpoint import resolve_init_from

        try:
            if hf.is_hf_folder(config.checkpoint.init_from):
                hf.model_json(config.checkpoint.init_from)
            else:
                resolve_init_from(config.checkpoint.init_from)
        except (FileNotFoundError, ValueError) as e:
            _fail("checkpoint.init_from", str(e))


def _as_dict(value) -> dict:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def _validate_positions(m) -> None:
    ropes = [("model.rope", _as_dict(m.rope))]
    if m.local_rope:
        ropes.append(("model.local_rope", _as_dict(m.local_rope)))
    try:
        for key, rope in ropes:
            validate_rope(rope, key=key, head_dim=m.head_dim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, rope in ropes:
        if m.alibi and rope.get("rope_type") != "nope":
            _fail(
                key,
                "ALiBi replaces RoPE: with model.alibi=True set rope_type to 'nope' "
                f"(got {rope.get('rope_type')!r}).",
            )


def _validate_attention(m) -> None:
    if not m.layer_pattern or set(m.layer_pattern) - set(LAYER_KINDS):
        _fail(
            "model.layer_pattern",
            f"{m.layer_pattern!r} must be a non-empty string of {sorted(LAYER_KINDS)} "
            "(G global, L sliding window, C chunked), e.g. 'LLLLLG'.",
        )
    if "L" in m.layer_pattern and m.window <= 0:
        _fail("model.window", "local (L) layers need a sliding window size > 0.")
    if "C" in m.layer_pattern and m.chunk <= 0:
        _fail("model.chunk", "chunked (C) layers need a chunk size > 0.")
    if m.window < 0 or m.chunk < 0 or m.sinks < 0:
        _fail("model.window", "window, chunk and sinks must be >= 0.")
    if m.scan_layers and m.n_layers % len(m.layer_pattern):
        _fail(
            "model.n_layers",
            f"{m.n_layers} layers are not a whole number of repeats of layer_pattern "
            f"{m.layer_pattern!r}; change one, or set model.scan_layers=False.",
        )
    if m.attention_impl not in IMPLEMENTATIONS:
        _fail(
            "model.attention_impl", f"unknown {m.attention_impl!r}; choose from {IMPLEMENTATIONS}."
        )


def _validate_mesh(config, num_devices: int, process_count: int) -> None:
    try:
        mesh_config = sharding.MeshConfig.from_config(config.mesh)
        sizes = mesh_config.resolved_shape(num_devices)
    except KeyError as e:
        _fail("mesh.shape", f"missing axis {e}; give sizes for {sharding.MESH_AXES}.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unknown = set(config.mesh.shape) - set(sharding.MESH_AXES)
    if unknown:
        _fail(
            "mesh.shape", f"unknown axes {sorted(unknown)}; the mesh axes are {sharding.MESH_AXES}."
        )
    m, t = config.model, config.train
    micro_batch = t.batch_size // t.grad_accum
    dims = {
        "batch": ("train.batch_size", micro_batch),
        "length": ("data.seq_len", config.data.seq_len),
        "embed": ("model.d_model", m.d_model),
        "heads": ("model.n_heads", m.n_heads),
        "kv_heads": ("model.n_kv_heads", m.n_kv_heads),
        "mlp": ("model.mlp_dim", m.mlp_dim),
        "vocab": ("model.vocab_size", m.vocab_size),
    }
    for logical, (key, size) in dims.items():
        for name in (logical, f"activation_{logical}"):
            shards = sharding.logical_size(name, mesh_config.rules, sizes)
            if size % shards:
                axes = dict(mesh_config.rules)[name]
                _fail(
                    key,
                    f"{size} is not divisible by the {shards} shards of mesh axes {axes} "
                    f"that the rule for '{name}' maps it to (mesh {sizes}); change the size, "
                    "the mesh.shape or mesh.rules.",
                )
    if micro_batch % process_count:
        _fail(
            "train.batch_size",
            f"per-step batch {micro_batch} must split over {process_count} hosts.",
        )
    if config.eval.every_long < 0 or any(n <= 0 for n in config.eval.long_lengths):
        _fail("eval.every_long", "every_long must be >= 0 and long_lengths positive integers.")
    if config.eval.batch_size % math.prod(
        sizes[a] for a in dict(mesh_config.rules).get("batch", ())
    ):
        _fail("eval.batch_size", "must be divisible by the mesh axes that shard 'batch'.")


def _validate_data(config) -> None:
    d, m = config.data, config.model
    from ctxext_jax.data import make_tokenizer

    if d.dataset == "files" and not d.files:
        _fail(
            "data.files", "dataset 'files' needs a glob of .txt / .jsonl files, e.g. 'docs/*.txt'."
        )
    if d.dataset == "files" and not any(
        p.endswith((".txt", ".jsonl")) and os.path.isfile(p)
        for p in glob.iglob(os.path.expanduser(d.files), recursive=True)
    ):
        _fail("data.files", f"{d.files!r} matches no .txt or .jsonl file; fix the glob.")
    if d.data_dir and os.path.exists(d.data_dir) and not os.path.isdir(d.data_dir):
        _fail("data.data_dir", f"{d.data_dir} exists and is not a directory.")
    try:
        tokenizer = make_tokenizer(d.tokenizer)
    except (OSError, ValueError) as e:
        _fail("data.tokenizer", str(e))
    if tokenizer.vocab_size > m.vocab_size:
        _fail(
            "model.vocab_size",
            f"{m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"({d.tokenizer}); raise it to at least {tokenizer.vocab_size}.",
        )
