"""Hugging Face folders in: config.json -> ModelConfig, safetensors -> our parameter tree.

Reading needs no torch: the safetensors header is parsed here and every tensor is a lazy
`np.memmap` view (bfloat16 and float8 included, which safetensors' numpy API cannot return).
Each device reads only its own slice of each tensor (`jax.make_array_from_callback`), so a model
larger than one host copy loads straight onto its sharding. Tensor names and layouts: layout.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from ctxext_jax import sharding
from ctxext_jax.errors import fail
from ctxext_jax.hf.layout import (
    ARCHITECTURES,
    HF_ROPE_TYPES,
    get_path,
    hf_shape,
    leaf_plan,
    set_path,
    to_ours,
)
from ctxext_jax.model import ModelConfig
from ctxext_jax.positions.rope import parse_rope, rope_from_hf_config
from ctxext_jax.steps import build_model

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


# ------------------------------------------------------------------------------------ config
def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download it.") from None


def is_hf_folder(path: str) -> bool:
    """True for a folder with a config.json and safetensors weights (or their index)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(
        name.endswith((".safetensors", ".safetensors.index.json")) for name in os.listdir(path)
    )


def family_of(config_json: Mapping[str, Any]) -> str:
    """'llama' | 'mistral' | 'qwen2' | 'qwen3', from `architectures` (or `model_type`)."""
    archs = config_json.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            fail(
                "config.json architectures",
                f"{archs[0]!r} is not supported; supported: {sorted(ARCHITECTURES)} "
                "(Gemma, MoE and other families need model changes).",
            )
        return ARCHITECTURES[archs[0]]
    model_type = config_json.get("model_type")
    if model_type not in ARCHITECTURES.values():
        fail(
            "config.json model_type",
            f"{model_type!r} is not supported and no `architectures` is given; supported "
            f"architectures: {sorted(ARCHITECTURES)}.",
        )
    return model_type


def _layer_types(cj: Mapping[str, Any], family: str, n_layers: int) -> tuple[list[str], int]:
    """(one of "full_attention" / "sliding_attention" per layer, window), as transformers."""
    if family == "mistral":
        window = cj.get("sliding_window")
        kind = "sliding_attention" if window else "full_attention"
        return [kind] * n_layers, int(window or 0)
    if family in ("qwen2", "qwen3") and cj.get("use_sliding_window") and cj.get("sliding_window"):
        window = int(cj["sliding_window"])
        types = cj.get("layer_types") or [
            "sliding_attention" if i >= cj.get("max_window_layers", n_layers) else "full_attention"
            for i in range(n_layers)
        ]
        if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
            fail(
                "config.json layer_types",
                f"expected {n_layers} of full/sliding_attention, got {types}",
            )
        return list(types), window
    # Qwen without use_sliding_window: transformers drops sliding_window, every layer is full.
    return ["full_attention"] * n_layers, 0


def _pattern(types: list[str]) -> str:
    """The shortest repeating G/L string whose cycle gives `types` (scan stacks its repeats)."""
    kinds = "".join("L" if t == "sliding_attention" else "G" for t in types)
    n = len(kinds)
    return next(kinds[:p] for p in range(1, n + 1) if n % p == 0 and kinds[:p] * (n // p) == kinds)


def config_from_hf(
    config_json: Mapping[str, Any],
    *,
    dtype: str = "float32",
    attention_impl: str = "auto",
    scan_layers: bool = True,
) -> ModelConfig:
    """A Llama / Mistral / Qwen2 / Qwen3 config.json dict -> ModelConfig (float32 params).
    Raises one ValueError naming the field transformers uses that our decoder cannot run."""
    cj = dict(config_json)
    family = family_of(cj)
    for key in ("quantization_config", "num_experts", "num_local_experts"):
        if cj.get(key):
            fail(
                f"config.json {key}",
                f"is set ({cj[key]!r}); quantized and MoE models are not supported.",
            )
    if cj.get("mlp_bias"):
        fail(
            "config.json mlp_bias",
            "biases on the MLP projections are not supported by the decoder.",
        )
    if family != "qwen2" and cj.get("attention_bias"):
        fail(
            "config.json attention_bias",
            f"{family} puts a bias on o_proj as well as q/k/v; the decoder has q/k/v biases only "
            "(Qwen2's layout).",
        )
    if cj.get("hidden_act", "silu") not in ("silu", "swish"):
        fail(
            "config.json hidden_act",
            f"{cj['hidden_act']!r}; only the SwiGLU MLP (silu) is supported.",
        )
    try:
        hidden, heads = int(cj["hidden_size"]), int(cj["num_attention_heads"])
        n_layers, mlp = int(cj["num_hidden_layers"]), int(cj["intermediate_size"])
        vocab, max_pos = int(cj["vocab_size"]), int(cj["max_position_embeddings"])
    except KeyError as e:
        fail(f"config.json {e.args[0]}", "is missing; a Llama-family config.json always has it.")
    head_dim = int(cj.get("head_dim") or hidden // heads)
    rope = rope_from_hf_config(cj)
    local_rope: dict[str, Any] = {}
    if all(isinstance(v, Mapping) for v in rope.values()):  # nested by layer type
        rope, local_rope = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    blocks = (("rope_parameters", rope), ("rope_parameters.sliding_attention", local_rope))
    for key, block in blocks:
        if block:
            try:
                scaling = parse_rope(block, key=key, head_dim=head_dim)
            except ValueError as e:
                raise ValueError(f"config.json {e}") from None
            if (
                block.get("rope_type", "default") not in HF_ROPE_TYPES
                or getattr(scaling, "partial_rotary_factor", 1.0) != 1.0
            ):
                fail(f"config.json {key}", f"{block} is not computed by {family}'s modelling code.")
    types, window = _layer_types(cj, family, n_layers)
    fields = dict(
        vocab_size=vocab, d_model=hidden, n_layers=n_layers, n_heads=heads,
        n_kv_heads=int(cj.get("num_key_value_heads") or heads), head_dim=head_dim,
        mlp_dim=mlp, max_position_embeddings=max_pos, rope=rope,
        local_rope=local_rope if local_rope != rope else {}, layer_pattern=_pattern(types),
        window=window, attention_impl=attention_impl, attention_bias=family == "qwen2",
        qk_norm=family == "qwen3", rms_eps=float(cj.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cj.get("tie_word_embeddings", False)), dtype=dtype,
        param_dtype="float32", scan_layers=scan_layers,
    )  # fmt: skip
    return ModelConfig.from_config(ml_collections.ConfigDict(fields))


# --------------------------------------------------------------------------------- reading
class SafetensorsFolder:
    """Every tensor of a folder's *.safetensors files (sharded with an index, or not), as lazy
    memory-mapped numpy arrays; nothing is read until a slice is converted."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                names = [n for n, f in weight_map.items() if f == missing[0]]
                raise ValueError(
                    f"{index} names shard {missing[0]!r} (holding {len(names)} tensors, e.g. "
                    f"{names[0]}) but {folder} has no such file"
                    + (f" ({len(missing) - 1} more shards missing)" if len(missing) > 1 else "")
                    + "; download the missing shard(s)."
                )  # fmt: skip
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                raise ValueError(f"{folder} holds no *.safetensors weights (nor an index).")
        self.entries: dict[str, tuple[str, Any, tuple[int, ...], int]] = {}
        for file in files:
            self._read_header(os.path.join(folder, file))

    def _read_header(self, path: str) -> None:
        file_size = os.path.getsize(path)
        # An interrupted download leaves a short file: say so rather than fail in struct/mmap.
        broken = f"{path} is truncated or not a safetensors file"
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{broken}; re-download it.")
            (size,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(size)) if 8 + size <= file_size else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{broken}; re-download it.")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
            if 8 + size + entry["data_offsets"][1] > file_size:
                raise ValueError(f"{broken} (tensor {name} ends past its end); re-download it.")
            offset = 8 + size + entry["data_offsets"][0]
            self.entries[name] = (path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), offset)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def array(self, name: str) -> np.ndarray:
        path, dtype, shape, offset = self.entries[name]
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _prefixed(reader: SafetensorsFolder) -> Callable[[str], str]:
    """Our names assume `model.`-prefixed keys (…ForCausalLM); a bare LlamaModel has none."""
    if "model.embed_tokens.weight" in reader.entries or "embed_tokens.weight" not in reader.entries:
        return lambda name: name
    return lambda name: name.removeprefix("model.")


def load_params(path: str, abstract_params: Any) -> Any:
    """HF folder -> our parameter tree shaped and placed like `abstract_params` (a tree of
    ShapeDtypeStructs, as `steps.build_model` returns; without `.sharding`: default device).
    Each device reads only its slice of each tensor; tensors are cast to the abstract dtype."""
    reader = SafetensorsFolder(path)
    rename = _prefixed(reader)
    cfg_json = read_config(path)
    plan = leaf_plan(abstract_params)
    used = set()
    out = {}
    for keys, leaf in plan.items():
        target = get_path(abstract_params, keys)
        layer_shape = target.shape[1:] if leaf.stacked else target.shape
        expected = hf_shape(leaf.kind, layer_shape)
        views = []
        for name in leaf.names:
            stored = rename(name)
            if stored not in reader.entries:
                raise ValueError(
                    f"tensor {stored} is missing from {path}; its config.json "
                    f"({cfg_json.get('architectures')}, {cfg_json.get('num_hidden_layers')} "
                    "layers) needs it. Is the download complete?"
                )
            if reader.shape(stored) != expected:
                raise ValueError(
                    f"tensor {stored} in {path} has shape {list(reader.shape(stored))} but the "
                    f"model config expects {list(expected)} (parameter {'/'.join(map(str, keys))} "
                    f"{list(target.shape)}); config.json and the weights disagree."
                )
            used.add(stored)
            views.append(to_ours(leaf.kind, reader.array(stored), layer_shape))
        set_path(out, keys, _place(views, leaf.stacked, target))
    ignorable = {rename("lm_head.weight")} if "head" not in abstract_params else set()
    unused = sorted(
        n for n in set(reader.entries) - used - ignorable if not n.endswith("rotary_emb.inv_freq")
    )
    if unused:
        raise ValueError(
            f"{path} has {len(unused)} tensors the model has no place for (e.g. {unused[:3]}); "
            "config.json does not describe these weights (bias or norm the family lacks?)."
        )
    return out


def _place(views: list[np.ndarray], stacked: bool, target) -> jax.Array:
    dtype = np.dtype(target.dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(views[0][index], dtype=dtype)
        repeats = range(len(views))[index[0]]
        return np.stack([np.asarray(views[r][index[1:]], dtype=dtype) for r in repeats])

    target_sharding = getattr(target, "sharding", None)
    if target_sharding is None:
        return jax.device_put(read(tuple(slice(None) for _ in target.shape)))
    return jax.make_array_from_callback(target.shape, target_sharding, read)


# --------------------------------------------------------------------------------- model
def single_device_mesh():
    """A 1-device mesh with our axis names, for loading or exporting without a run config."""
    shape = tuple((name, 1) for name in sharding.MESH_AXES)
    return sharding.make_mesh(sharding.MeshConfig(shape=shape), jax.devices()[:1])


@dataclasses.dataclass
class HFModel:
    """An imported model: `model(tokens)` maps int32 [B, T] to float32 logits [B, T, V]."""

    config: ModelConfig
    params: Any
    apply: Callable  # apply(params, tokens, *, positions=None, segment_ids=None) -> logits
    forward: Callable  # jitted (params, tokens) -> logits

    def __call__(self, tokens) -> jax.Array:
        return self.forward(self.params, jnp.asarray(tokens, jnp.int32))


def from_pretrained(
    path: str,
    *,
    dtype: str = "float32",
    attention_impl: str = "auto",
    scan_layers: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
) -> HFModel:
    """Loads an HF folder onto `mesh` (default: one device) sharded by the logical `rules`."""
    cfg = config_from_hf(
        read_config(path), dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers
    )
    mesh = mesh or single_device_mesh()
    apply, abstract_params, _ = build_model(cfg, mesh, rules, seed=0)
    params = load_params(path, abstract_params)

    return HFModel(config=cfg, params=params, apply=apply, forward=jax.jit(apply))


def model_json(path: str) -> dict[str, Any]:
    """An HF folder's ModelConfig fields as `checkpoint.read_model_json` returns a checkpoint's,
    for `checkpoint.check_compatible(hf.model_json(folder), model_cfg)`."""
    return json.loads(config_from_hf(read_config(path)).to_json())
