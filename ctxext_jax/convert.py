"""Hugging Face folder <-> ctxext_jax checkpoint.

    python -m ctxext_jax.convert --from_hf path/to/hf_model --to ckpt/base
    python -m ctxext_jax.train --config configs/extend_hf.py:path/to/hf_model --workdir runs/x \\
        --config.checkpoint.init_from=ckpt/base
    python -m ctxext_jax.convert --from_ckpt runs/x --to_hf exported/

A converted checkpoint is `CKPT/checkpoints/0/{params,model,config}` (what
`checkpoint.resolve_init_from` and `checkpoint.load_params` read) plus `CKPT/tokenizer/` with the
source's tokenizer files. Its `config` item keeps the source config.json, so an export of it,
or of a run started from it, gets the source's architecture and special token ids back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ctxext_jax import checkpoint, hf, sharding
from ctxext_jax.cli import exit_on_user_error
from ctxext_jax.model import ModelConfig
from ctxext_jax.steps import build_model

# config.json fields carried from the source into an export (they change no weights).
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def import_to_checkpoint(hf_dir: str, ckpt_dir: str) -> str:
    """HF folder -> CKPT/checkpoints/0 in our Orbax layout; returns the step dir."""
    root = epath.Path(os.path.abspath(os.path.expanduser(ckpt_dir)))
    if (root / "checkpoints").exists():
        raise ValueError(f"--to {ckpt_dir} already holds checkpoints; give a new folder.")
    config_json = hf.read_config(hf_dir)
    cfg = hf.config_from_hf(config_json)
    has_tokenizer = any(os.path.isfile(os.path.join(hf_dir, n)) for n in hf.TOKENIZER_FILES[:4])
    if has_tokenizer:
        hf.check_tokenizer(hf.tokenizer_spec(hf_dir), cfg.vocab_size)
    mesh = hf.single_device_mesh()
    _, abstract_params, _ = build_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0)
    params = hf.load_params(hf_dir, abstract_params)
    manager = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(create=True),
        handler_registry=checkpoint.handler_registry(("params", "config", "model")),
    )
    source = {"hf_config": config_json, "hf_source": os.path.abspath(hf_dir)}
    manager.save(
        0,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            config=ocp.args.JsonSave(source),
            model=ocp.args.JsonSave(json.loads(cfg.to_json())),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    if has_tokenizer:
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        hf.copy_tokenizer(hf_dir, os.fspath(root / "tokenizer"))
    return os.fspath(root / "checkpoints" / "0")


def model_config_from_json(meta: dict[str, Any]) -> ModelConfig:
    """The `model` item of a checkpoint -> ModelConfig (rope pairs back to frozen tuples)."""
    return ModelConfig.from_config(ml_collections.ConfigDict(meta))


def _read_json_item(step_dir: epath.Path, item: str) -> dict[str, Any]:
    if not (step_dir / item).is_dir():
        return {}
    return ocp.JsonCheckpointHandler().restore(step_dir / item) or {}


def source_of(step_dir: epath.Path, depth: int = 0) -> tuple[dict[str, Any], str | None]:
    """(source HF config.json or {}, tokenizer folder or None) of a checkpoint: a converted
    one keeps both; a training run points at them through checkpoint.init_from and
    data.tokenizer, followed back through at most three runs."""
    record = _read_json_item(step_dir, "config")
    tokenizer_dir = step_dir.parent.parent / "tokenizer"
    if "hf_config" in record:
        return record["hf_config"], os.fspath(tokenizer_dir) if tokenizer_dir.is_dir() else None
    spec = record.get("data", {}).get("tokenizer", "")
    kind, _, path = spec.partition(":")
    tokenizer = None
    if kind in ("hf", "sentencepiece") and os.path.exists(path):
        tokenizer = path if os.path.isdir(path) else os.path.dirname(path)
    init_from = record.get("checkpoint", {}).get("init_from", "")
    if init_from and hf.is_hf_folder(init_from):
        return hf.read_config(init_from), tokenizer
    if init_from and depth < 3:
        try:
            parent = checkpoint.resolve_init_from(init_from)
        except (FileNotFoundError, ValueError):
            return {}, tokenizer
        source, parent_tokenizer = source_of(parent, depth + 1)
        return source, tokenizer or parent_tokenizer
    return {}, tokenizer


def export_checkpoint(
    ckpt_path: str,
    out_dir: str,
    *,
    architecture: str | None = None,
    torch_dtype: str = "float32",
) -> str:
    """Our checkpoint (a run's workdir, checkpoints/ dir or step dir) -> an HF folder with the
    checkpoint's own rope configuration. The architecture defaults to the source model's."""
    step_dir = checkpoint.resolve_init_from(ckpt_path)
    cfg = model_config_from_json(checkpoint.read_model_json(step_dir))
    source, tokenizer = source_of(step_dir)
    if architecture is None and source.get("architectures"):
        source_arch = source["architectures"][0]
        try:
            hf.config_to_hf(cfg, architecture=source_arch)
            architecture = source_arch
        except ValueError:
            architecture = None  # e.g. a Llama run given sliding windows: pick one that fits
    mesh = hf.single_device_mesh()
    _, abstract_params, _ = build_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0)
    params = checkpoint.load_params(step_dir, abstract_params)
    extra = {k: source[k] for k in CARRIED_FIELDS if k in source}
    out = hf.save_pretrained(
        params,
        cfg,
        out_dir,
        architecture=architecture,
        torch_dtype=torch_dtype,
        extra_config=extra,
        tokenizer_from=tokenizer,
    )
    run = _read_json_item(step_dir, "config")
    if tokenizer is None and run.get("data", {}).get("tokenizer") == "bytes":
        # The run read UTF-8 bytes: the export carries that tokenizer as a tokenizer.json, so
        # `evaluate --checkpoint <export>` and transformers tokenize the same way.
        hf.write_byte_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctxext_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from_hf", help="Hugging Face model folder (config.json + safetensors)")
    source.add_argument("--from_ckpt", help="our run workdir, checkpoints/ dir or step dir")
    parser.add_argument("--to", help="new checkpoint folder (with --from_hf)")
    parser.add_argument("--to_hf", help="new Hugging Face folder (with --from_ckpt)")
    parser.add_argument(
        "--architecture",
        default=None,
        choices=sorted(hf.ARCHITECTURES),
        help="export as this class (default: the source's, else inferred)",
    )
    parser.add_argument("--torch_dtype", default="float32", choices=sorted(hf.TORCH_DTYPES))
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.from_hf:
            if not args.to:
                raise ValueError("--from_hf needs --to CKPT (the checkpoint folder to write).")
            step_dir = import_to_checkpoint(args.from_hf, args.to)
            print(f"wrote checkpoint {step_dir}")
        else:
            if not args.to_hf:
                raise ValueError("--from_ckpt needs --to_hf DIR (the folder to write).")
            out = export_checkpoint(
                args.from_ckpt,
                args.to_hf,
                architecture=args.architecture,
                torch_dtype=args.torch_dtype,
            )
            print(f"wrote Hugging Face model {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
