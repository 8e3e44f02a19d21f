"""The run-config schema (defaults) and `validate`, which turns every bad value into one error.

Config flows one way: `configs/x.py:get_config(arg)` builds on `defaults()`, the command line
overrides fields (`--config.train.lr=3e-4`), `validate()` checks the whole thing before anything
is built, and the trainer hands small frozen dataclasses to the model, data and optimiser.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import ml_collections

from ctxext_jax import sharding
from ctxext_jax.attention.kernels import IMPLEMENTATIONS
from ctxext_jax.errors import ConfigError, fail
from ctxext_jax.model import LAYER_KINDS, REMAT_POLICIES
from ctxext_jax.positions.rope import validate_rope


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
        context_parallel="all_gather",  # all_gather | ring: attention when mesh.sequence > 1
        context_parallel_balance="zigzag",  # zigzag | none: causal work equal per device
        attention_bias=False,
        qk_norm=False,
        rms_eps=1e-5,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        remat="none",  # none | full | dots | residual | offload (see the README's Memory)
        loss_chunk=2048,  # positions per cross-entropy chunk (no [B, T, V] logits); 0: all
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
        on_undecodable="count",  # text that is not UTF-8: "count" (read with U+FFFD) | "refuse"
        mixture={},  # {source: weight}: "text" (the dataset) and tasks (data/tasks.py)
        task=dict(facts=8, value_len=5, hops=3, filler="text", min_length=0, keys=64, values=64),
    )
    c.train = dict(
        steps=200,
        batch_size=16,  # global, in sequences
        grad_accum=1,
        seed=0,
        log_every=10,
        max_nonfinite=3,  # consecutive non-finite steps (each skipped) before the run stops
        pose=dict(target_length=0, chunks=2),  # PoSE position skipping (data/pose.py); 0: off
        stages=(),  # staged schedule (stages.py): dicts of steps + per-stage overrides
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> Callable:
    def check(value) -> str | None:
        if not _is_int(value) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            return f"must be {kind}, got {value!r}."
        return None

    return check


def _number(low: float, high: float = math.inf, *, open_low=False, open_high=False) -> Callable:
    def check(value) -> str | None:
        if not _is_number(value):
            return f"must be a finite number, got {value!r}."
        if (value <= low if open_low else value < low) or (
            value >= high if open_high else value > high
        ):
            if high == math.inf:
                return f"must be {'>' if open_low else '>='} {low:g}, got {value!r}."
            bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            return f"must be in {bounds}, got {value!r}."
        return None

    return check


def _of_type(kind: type, name: str) -> Callable:
    def check(value) -> str | None:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        return None if ok else f"must be {name}, got {value!r}."

    return check


def _lengths(value) -> str | None:
    if not isinstance(value, tuple | list) or not all(_is_int(n) and n > 0 for n in value):
        return f"must be a list of positive integers, got {value!r}."
    return None


_POSITIVE, _COUNT = _integer(1), _integer(0)
_BOOL, _STR = _of_type(bool, "true or false"), _of_type(str, "a string")
_POSITIVE_NUMBER = _number(0, open_low=True)
_FRACTION = _number(0, 1, open_high=True)  # Adam's betas: 1 would never forget

# The type and range of every field defaults() defines; fields other modules add check themselves.
FIELD_CHECKS: dict[str, Callable] = {
    **dict.fromkeys(
        ["model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
         "model.n_kv_heads", "model.head_dim", "model.mlp_dim", "model.max_position_embeddings",
         "data.seq_len", "train.steps", "train.batch_size", "train.grad_accum",
         "train.log_every", "checkpoint.every", "checkpoint.keep", "eval.every", "eval.batches",
         "eval.batch_size", "eval.long_passkey_trials"],
        _POSITIVE,
    ),
    **dict.fromkeys(
        ["model.window", "model.chunk", "model.sinks", "data.seed", "data.num_workers",
         "train.seed", "train.max_nonfinite", "optim.warmup_steps", "optim.decay_steps",
         "eval.every_long"],
        _COUNT,
    ),
    **dict.fromkeys(
        ["model.alibi", "model.attention_bias", "model.qk_norm", "model.tie_embeddings",
         "model.scan_layers"],
        _BOOL,
    ),
    **dict.fromkeys(
        ["model.layer_pattern", "model.attention_impl", "model.dtype", "model.param_dtype",
         "model.remat", "data.dataset", "data.data_dir", "data.files", "data.text_key",
         "data.train_split", "data.eval_split", "data.tokenizer", "data.on_undecodable",
         "optim.schedule",
         "checkpoint.init_from"],
        _STR,
    ),
    "model.rms_eps": _POSITIVE_NUMBER,
    "model.init_std": _POSITIVE_NUMBER,
    "optim.lr": _POSITIVE_NUMBER,
    "optim.eps": _POSITIVE_NUMBER,  # 0 divides 0 by 0 for a parameter with no gradient yet
    "optim.b1": _FRACTION,
    "optim.b2": _FRACTION,
    "optim.min_lr_ratio": _number(0, 1),
    "optim.weight_decay": _number(0),
    "optim.grad_clip": _number(0),
    "eval.long_lengths": _lengths,
}  # fmt: skip


def _check_fields(config) -> None:
    for key, check in FIELD_CHECKS.items():
        group, name = key.split(".")
        if group in config and name in config[group]:
            problem = check(config[group][name])
            if problem:
                fail(key, problem)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> list[str]:
    """Raises ConfigError naming the first bad key and how to fix it; returns the warnings
    (`config_warnings`). Pure: nothing is read from disk (the data, tokenizer and init_from
    checks run where those are read: `data.preflight`, `checkpoint.check_init_from`)."""
    import jax

    m, t, o = config.model, config.train, config.optim
    _check_fields(config)
    if m.n_heads % m.n_kv_heads:
        fail(
            "model.n_heads",
            f"{m.n_heads} query heads are not a multiple of model.n_kv_heads={m.n_kv_heads}; "
            "grouped-query attention needs n_heads = n_kv_heads * group size.",
        )
    if m.head_dim % 2:
        fail("model.head_dim", f"RoPE rotates pairs of dims; {m.head_dim} must be even.")
    _validate_positions(m)
    _validate_attention(m)
    for key, value, allowed in [
        ("model.remat", m.remat, REMAT_POLICIES),
        ("model.dtype", m.dtype, ("float32", "bfloat16", "float16")),
        ("model.param_dtype", m.param_dtype, ("float32", "bfloat16")),
        ("optim.schedule", o.schedule, ("cosine", "linear", "constant")),
        ("data.on_undecodable", config.data.on_undecodable, ("count", "refuse")),
    ]:
        if value not in allowed:
            fail(key, f"unknown value {value!r}; choose one of {sorted(allowed)}.")
    if not isinstance(m.loss_chunk, int) or isinstance(m.loss_chunk, bool) or m.loss_chunk < 0:
        fail(
            "model.loss_chunk",
            f"must be an integer >= 0 (positions per cross-entropy chunk; 0: the whole length "
            f"at once), got {m.loss_chunk!r}.",
        )
    if t.batch_size % t.grad_accum:
        fail(
            "train.grad_accum",
            f"train.batch_size={t.batch_size} is not divisible by {t.grad_accum} micro-steps.",
        )
    _validate_mesh(config, num_devices or jax.device_count(), jax.process_count())
    _validate_data(config)
    stage_warnings = _validate_recipes(config, num_devices)
    return config_warnings(config) + stage_warnings


def config_warnings(config) -> list[str]:
    """Settings that are legal but do nothing, or not what was likely meant: `<key>: <why>`."""
    m, t, o = config.model, config.train, config.optim
    pattern, found = set(m.layer_pattern), []
    local = pattern & {"L", "C"}
    if m.sinks and not local:
        found.append(
            f"model.sinks: {m.sinks} sink tokens are unused: only sliding-window (L) and "
            f"chunked (C) layers keep sinks, and layer_pattern is {m.layer_pattern!r}."
        )
    if m.window and "L" not in pattern:
        found.append(
            f"model.window: {m.window} is unused: no sliding-window (L) layer in "
            f"layer_pattern {m.layer_pattern!r}."
        )
    if m.chunk and "C" not in pattern:
        found.append(
            f"model.chunk: {m.chunk} is unused: no chunked (C) layer in layer_pattern "
            f"{m.layer_pattern!r}."
        )
    if m.local_rope and not local:
        found.append(
            "model.local_rope: unused: no local (L) or chunked (C) layer in "
            f"layer_pattern {m.layer_pattern!r}."
        )
    rope = _as_dict(m.rope)
    rope_type = rope.get("rope_type", "default")
    seq_len = config.data.seq_len
    if not m.alibi and rope_type == "default" and seq_len > m.max_position_embeddings:
        found.append(
            f"data.seq_len: {seq_len} is beyond model.max_position_embeddings="
            f"{m.max_position_embeddings} with unscaled RoPE (rope_type 'default'): positions past "
            f"it were never trained; set a scaling, e.g. --config.model.rope.rope_type=yarn "
            f"--config.model.rope.factor={seq_len / m.max_position_embeddings:g}."
        )
    elif (
        rope.get("factor")
        and rope.get("original_max_position_embeddings")
        and not rope_type.startswith("dynamic")
    ):
        reach = rope["factor"] * rope["original_max_position_embeddings"]
        if seq_len > reach:
            found.append(
                f"data.seq_len: {seq_len} is beyond the rope scaling's reach (factor "
                f"{rope['factor']:g} x original_max_position_embeddings "
                f"{rope['original_max_position_embeddings']} = {reach:g}); raise model.rope.factor."
            )
    schedule_steps = o.decay_steps or t.steps
    if o.warmup_steps >= schedule_steps:
        found.append(
            f"optim.warmup_steps: {o.warmup_steps} is not shorter than the schedule "
            f"({schedule_steps} steps); clipped to {max(schedule_steps - 1, 0)}."
        )
    return found


def _as_dict(value) -> dict:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def _validate_positions(m) -> None:
    for key in ("rope", "local_rope"):
        if not isinstance(m[key], dict | ml_collections.ConfigDict):
            fail(
                f"model.{key}",
                f"expected a dict of Hugging Face rope keys, got {m[key]!r}; e.g. "
                '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}.',
            )
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
            fail(
                key,
                "ALiBi replaces RoPE: with model.alibi=True set rope_type to 'nope' "
                f"(got {rope.get('rope_type')!r}).",
            )


def _validate_attention(m) -> None:
    if not m.layer_pattern or set(m.layer_pattern) - set(LAYER_KINDS):
        fail(
            "model.layer_pattern",
            f"{m.layer_pattern!r} must be a non-empty string of {sorted(LAYER_KINDS)} "
            "(G global, L sliding window, C chunked), e.g. 'LLLLLG'.",
        )
    if "L" in m.layer_pattern and m.window <= 0:
        fail("model.window", "local (L) layers need a sliding window size > 0.")
    if "C" in m.layer_pattern and m.chunk <= 0:
        fail("model.chunk", "chunked (C) layers need a chunk size > 0.")
    if m.window < 0 or m.chunk < 0 or m.sinks < 0:
        fail("model.window", "window, chunk and sinks must be >= 0.")
    if m.scan_layers and m.n_layers % len(m.layer_pattern):
        fail(
            "model.n_layers",
            f"{m.n_layers} layers are not a whole number of repeats of layer_pattern "
            f"{m.layer_pattern!r}; change one, or set model.scan_layers=False.",
        )
    if m.attention_impl not in IMPLEMENTATIONS:
        fail(
            "model.attention_impl", f"unknown {m.attention_impl!r}; choose from {IMPLEMENTATIONS}."
        )


def _check_mesh_fields(mesh) -> None:
    """mesh.shape sizes are integers; mesh.rules pairs a known logical axis with mesh axes."""
    for axis, size in mesh.shape.items():
        if not _is_int(size):
            fail(
                f"mesh.shape.{axis}",
                f"must be an integer (-1: the remaining devices), got {size!r}.",
            )
    rules = mesh.rules
    example = "e.g. [('batch', ['data', 'fsdp']), ('embed', 'fsdp'), ('norm', None)]"
    if not isinstance(rules, list | tuple) or not all(
        isinstance(rule, list | tuple) and len(rule) == 2 for rule in rules
    ):
        fail("mesh.rules", f"must be a list of (logical axis, mesh axes) pairs, {example}; "
             f"got {rules!r}.")  # fmt: skip
    logical_axes = [name for name, _ in sharding.DEFAULT_RULES]
    for logical, axes in rules:
        if logical not in logical_axes:
            fail("mesh.rules", f"unknown logical axis {logical!r}; the model's are {logical_axes}.")
        names = [] if axes is None else [axes] if isinstance(axes, str) else axes
        if not isinstance(names, list | tuple) or not all(a in sharding.MESH_AXES for a in names):
            fail("mesh.rules", f"{logical!r} maps to {axes!r}: give mesh axes of "
                 f"{sharding.MESH_AXES} (a name, a list of names or None), {example}.")  # fmt: skip


def _validate_mesh(config, num_devices: int, process_count: int) -> None:
    _check_mesh_fields(config.mesh)
    try:
        mesh_config = sharding.MeshConfig.from_config(config.mesh)
        sizes = mesh_config.resolved_shape(num_devices)
    except KeyError as e:
        fail("mesh.shape", f"missing axis {e}; give sizes for {sharding.MESH_AXES}.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unknown = set(config.mesh.shape) - set(sharding.MESH_AXES)
    if unknown:
        fail(
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
                fail(
                    key,
                    f"{size} is not divisible by the {shards} shards of mesh axes {axes} "
                    f"that the rule for '{name}' maps it to (mesh {sizes}); change the size, "
                    "the mesh.shape or mesh.rules.",
                )
    _validate_context_parallel(config, mesh_config, sizes)
    if micro_batch % process_count:
        fail(
            "train.batch_size",
            f"per-step batch {micro_batch} must split over {process_count} hosts.",
        )
    if config.eval.every_long < 0 or any(n <= 0 for n in config.eval.long_lengths):
        fail("eval.every_long", "every_long must be >= 0 and long_lengths positive integers.")
    if config.eval.batch_size % math.prod(
        sizes[a] for a in dict(mesh_config.rules).get("batch", ())
    ):
        fail("eval.batch_size", "must be divisible by the mesh axes that shard 'batch'.")


# Why a backend cannot be a context-parallel strategy's local kernel.
_CP_NEEDS = {
    "ring": (
        "the ring merges hops by a float32 log-sum-exp and differentiates against the merged "
        "one (cuDNN returns it in the input dtype with no gradient entry for it; splash's is "
        "not differentiable), so every platform runs the blockwise kernel on its tiles"
    ),
    "all_gather": (
        "each device's queries sit at per-device offsets (two chunks under zigzag) that "
        "cuDNN's public API cannot express without a dense [T/n, T] mask (xla neither); "
        "all_gather runs splash (TPU) or blockwise"
    ),
}


def _validate_context_parallel(config, mesh_config, sizes) -> None:
    from ctxext_jax.attention import context_parallel as cp
    from ctxext_jax.attention import sequence_layout

    m = config.model
    for key, value, allowed in [
        ("model.context_parallel", m.context_parallel, cp.STRATEGIES),
        ("model.context_parallel_balance", m.context_parallel_balance, sequence_layout.BALANCES),
    ]:
        if value not in allowed:
            fail(key, f"unknown value {value!r}; choose one of {list(allowed)}.")
    active = [a for a in dict(mesh_config.rules).get("length", ()) if sizes.get(a, 1) > 1]
    if len(active) > 1:
        fail(
            "mesh.rules",
            f"'length' maps to several sharded mesh axes {active}; context parallelism runs "
            "over one axis (map 'length' to 'sequence' only).",
        )
    if not active:
        return
    n = sizes[active[0]]
    local_kernels = ("auto", "blockwise") + (
        ("splash",) if m.context_parallel == "all_gather" else ()
    )
    if m.attention_impl not in local_kernels:
        fail(
            "model.attention_impl",
            f"{m.attention_impl!r} cannot run under model.context_parallel="
            f"{m.context_parallel!r} (mesh.shape.{active[0]}={n}): "
            f"{_CP_NEEDS[m.context_parallel]}; set one of {list(local_kernels)}, or "
            "mesh.shape.sequence=1.",
        )
    try:  # evaluation pads its windows to whole chunks itself
        sequence_layout.check_length(
            config.data.seq_len, n, m.context_parallel_balance, key="length"
        )
    except ValueError as e:
        fail("data.seq_len", str(e))


def _validate_recipes(config, num_devices: int | None) -> list[str]:
    """train.pose and train.stages (each stage is validated as the run config it becomes);
    -> the stages' warnings, each prefixed with its stage."""
    from ctxext_jax.data.pose import PoseConfig
    from ctxext_jax.stages import plan_stages

    try:
        PoseConfig.from_config(config.train.pose).check(config.data.seq_len)
    except TypeError as e:
        fail("train.pose", f"{e}; give dict(target_length=N, chunks=2).")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not config.train.stages:
        return []
    try:
        plan = plan_stages(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    found = []
    for stage in plan:
        try:
            found += [f"train.stages[{stage.index}]: {w}" for w in
                      validate(stage.config, num_devices=num_devices)]  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"train.stages[{stage.index}]: {e}") from None
    return found


def _validate_data(config) -> None:
    from ctxext_jax.data import DataConfig
    from ctxext_jax.data.tasks import min_length

    d = config.data
    if d.dataset == "files" and not d.files:
        fail(
            "data.files", "dataset 'files' needs a glob of .txt / .jsonl files, e.g. 'docs/*.txt'."
        )
    try:
        data_cfg = DataConfig.from_config(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    for name in data_cfg.source_names:
        if name != "text" and max(min_length(name, data_cfg.task),
                                  data_cfg.task.min_length) > d.seq_len + 1:  # fmt: skip
            fail("data.task", f"task {name!r} does not fit in data.seq_len={d.seq_len}; "
                 "lower data.task.facts / value_len or raise seq_len.")  # fmt: skip


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """This module as a config file: the schema defaults, for CLIs whose checkpoint supplies
    the model (generate's --config default, so --config.mesh.* works without a file)."""
    del arg
    return defaults()


# Fields that may change when a run resumes: they do not change what the next updates compute
# (where and how it runs, what is logged, evaluated and kept). Everything else is refused.
RESUME_MAY_CHANGE = (
    "mesh.", "checkpoint.", "eval.", "train.log_every", "train.max_nonfinite", "train.grad_accum",
    "train.seed", "data.num_workers", "data.data_dir", "data.eval_split", "model.attention_impl",
    "model.remat", "model.loss_chunk", "model.context_parallel",
)  # fmt: skip


def _flat(tree: dict) -> dict:
    """{"model": {"d_model": 8, "rope": {...}}} -> {"model.d_model": 8, "model.rope": {...}}:
    groups are flattened one level; values inside a field (a rope block) compare whole."""
    return {
        f"{group}.{name}": value
        for group, fields in tree.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
    }


def _schedule_view(flat: dict) -> dict:
    """train.steps matters only as the schedule's length when optim.decay_steps is 0."""
    view = dict(flat)
    steps = view.pop("train.steps", None)
    view["optim.decay_steps"] = view.get("optim.decay_steps") or steps
    return view


def trajectory_changes(saved: dict, current: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{key: (saved value, current value)} for each field that changes the training trajectory
    (schedule, optimizer, batch, data order, model) between a checkpoint's config and this
    run's. A field the checkpoint lacks (added since) counts only if it differs from defaults."""
    now = json.loads(current.to_json_best_effort())
    base = _flat(json.loads(defaults().to_json_best_effort()))
    old, new = _schedule_view(_flat(saved)), _schedule_view(_flat(now))
    changes = {}
    for key, value in new.items():
        if key.startswith(RESUME_MAY_CHANGE):
            continue
        before = old.get(key, base.get(key, value))
        if before != value:
            changes[key] = (before, value)
    return changes
