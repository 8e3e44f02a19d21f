"""A run config + a checkpoint -> the model, its parameters and tokenizer, for inference.

What `evaluate` and `generate` share. The checkpoint (a run's workdir, its step folder, or a
Hugging Face folder read by `ctxext_jax.hf`) supplies the architecture; for an HF folder the
tokenizer is the folder's own unless data.tokenizer is set. The config supplies the data and
mesh, and its positional fields (rope, local_rope, max_position_embeddings, window, chunk,
sinks, attention_impl) replace the checkpoint's wherever the config sets them to something
other than the schema default: one trained model can be run under PI, YaRN, etc.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from etils import epath

from ctxext_jax import checkpoint, data, hf, sharding
from ctxext_jax.config import defaults, validate
from ctxext_jax.errors import fail
from ctxext_jax.model import ModelConfig
from ctxext_jax.steps import build_model

POSITIONAL_FIELDS = (
    "rope",
    "local_rope",
    "max_position_embeddings",
    "window",
    "chunk",
    "sinks",
    "attention_impl",
)


def plain(value):
    """ConfigDict / saved JSON value -> plain Python (rope pairs -> dict) for comparison."""
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, list | tuple) and all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in value}
    return value


def effective_model(saved: dict, config_model) -> tuple[ModelConfig, dict]:
    """The checkpoint's model fields with the config's non-default positional fields on top.
    -> (ModelConfig, {field: value that replaced the checkpoint's})."""
    schema = defaults().model
    fields = {k: plain(v) for k, v in saved.items()}
    overrides = {}
    for key in POSITIONAL_FIELDS:
        value = plain(config_model[key])
        if value != plain(schema[key]) and value != fields.get(key):
            overrides[key] = value
    fields.update(overrides)
    return ModelConfig.from_config(ml_collections.ConfigDict(fields)), overrides


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a checkpoint + config resolve to, before any weight is read.

    source: "huggingface" or "ctxext_jax step N"; location: the HF folder or the step folder;
    trained_length: the checkpoint's own max_position_embeddings; overrides: the positional
    fields the config replaced; data_fields: the config's data group with the tokenizer
    resolved; tokenizer: None for an HF folder without tokenizer files when data.tokenizer is
    left at its default (ids-only use); eos_id: the tokenizer's, else config.json's."""

    model_cfg: ModelConfig
    mesh_cfg: sharding.MeshConfig
    source: str
    location: str
    trained_length: int
    overrides: dict
    data_fields: dict
    tokenizer: object | None
    eos_id: int | None


def _hf_eos(config_json: dict) -> int | None:
    eos = config_json.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def resolve(
    config: ml_collections.ConfigDict,
    checkpoint_path: str,
    *,
    model_updates: dict | None = None,
    tokenizer_required: bool = True,
) -> Resolved:
    """Reads the checkpoint's model description and validates the run config as it will be
    used (the checkpoint's model with the config's positional fields, the config's data and
    mesh). Cheap: no weight is read, so input can be checked before the model loads.

    model_updates: ModelConfig fields to set after the overrides (e.g. attention_impl).
    tokenizer_required=False lets an HF folder without tokenizer files resolve (tokenizer None).
    """
    data_fields = config.data.to_dict()
    hf_eos, no_tokenizer = None, False
    if hf.is_hf_folder(checkpoint_path):
        config_json = hf.read_config(checkpoint_path)
        saved = json.loads(hf.config_from_hf(config_json).to_json())
        source, location, hf_eos = "huggingface", checkpoint_path, _hf_eos(config_json)
        if data_fields["tokenizer"] == defaults().data.tokenizer:
            try:
                data_fields["tokenizer"] = hf.tokenizer_spec(checkpoint_path)
            except ValueError:
                if tokenizer_required:
                    raise
                no_tokenizer = True
    else:
        try:
            step_dir = checkpoint.resolve_init_from(checkpoint_path)
            saved = checkpoint.read_model_json(step_dir)
        except (FileNotFoundError, ValueError) as e:
            fail("--checkpoint", str(e))
        source = f"ctxext_jax step {step_dir.name}"
        location = str(step_dir)
    model_cfg, overrides = effective_model(saved, config.model)
    if model_updates:
        model_cfg = dataclasses.replace(model_cfg, **model_updates)

    effective = ml_collections.ConfigDict(config.to_dict())
    effective.model = ml_collections.ConfigDict(
        {k: plain(v) for k, v in json.loads(model_cfg.to_json()).items()}
    )
    effective.data = ml_collections.ConfigDict(data_fields)
    validate(effective)
    if not no_tokenizer:  # ids only: no tokenizer to check the data and vocabulary with
        data.preflight(data.DataConfig.from_config(data_fields), vocab_size=model_cfg.vocab_size)
    tokenizer = None if no_tokenizer else data.make_tokenizer(data_fields["tokenizer"])
    return Resolved(
        model_cfg=model_cfg,
        mesh_cfg=sharding.MeshConfig.from_config(config.mesh),
        source=source,
        location=location,
        trained_length=int(saved["max_position_embeddings"]),
        overrides=overrides,
        data_fields=data_fields,
        tokenizer=tokenizer,
        eos_id=tokenizer.eos_id if tokenizer is not None else hf_eos,
    )


def load(resolved: Resolved) -> tuple[hf.HFModel, jax.sharding.Mesh, tuple]:
    """Builds the model on the config's mesh and loads the parameters onto it, each device
    reading its own slice. -> (model, mesh, logical rules)."""
    mesh, rules = sharding.make_mesh(resolved.mesh_cfg), resolved.mesh_cfg.rules
    apply, abstract_params, _ = build_model(resolved.model_cfg, mesh, rules, seed=0)
    if resolved.source == "huggingface":
        params = hf.load_params(resolved.location, abstract_params)
    else:
        params = checkpoint.load_params(epath.Path(resolved.location), abstract_params)
    model = hf.HFModel(
        config=resolved.model_cfg, params=params, apply=apply, forward=jax.jit(apply)
    )
    return model, mesh, rules
