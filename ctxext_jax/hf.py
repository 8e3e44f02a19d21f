"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 model folders.

    from ctxext_jax import hf
    model = hf.from_pretrained("path/to/hf_model")      # config.json + *.safetensors
    logits = model(tokens)                              # int32 [B, T] -> float32 [B, T, V]
    hf.save_pretrained(model.params, model.config, "out")   # AutoModelForCausalLM loads it

Reading needs no torch: the safetensors header is parsed here and every tensor is a lazy
`np.memmap` view (bfloat16 and float8 included, which safetensors' numpy API cannot return).
Each device reads only its own slice of each tensor (`jax.make_array_from_callback`), so a model
larger than one host copy loads straight onto its sharding.

Layer i of the HF model is block i % P at repeat i // P of our stack (P = len(layer_pattern)
with scan_layers, else P = n_layers and no repeat axis). Weight layouts, HF -> ours:
  q/k/v_proj.weight [N*D, E] -> [E, N, D]    o_proj.weight [E, H*D] -> [H, D, E]
  q/k/v_proj.bias   [N*D]    -> [N, D]       gate/up/down_proj.weight [out, in] -> [in, out]
  lm_head.weight    [V, E]   -> head [E, V]  norms, embed_tokens: as they are
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from ctxext_jax import sharding
from ctxext_jax.data.tokenizer import make_tokenizer
from ctxext_jax.model import ModelConfig
from ctxext_jax.positions.rope import parse_rope, rope_from_hf_config

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# rope_type values transformers' modelling code computes (ROPE_INIT_FUNCTIONS plus default).
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
TORCH_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ------------------------------------------------------------------------------------ config
def _fail(key: str, message: str):
    raise ValueError(f"config.json {key}: {message}")


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
            _fail(
                "architectures",
                f"{archs[0]!r} is not supported; supported: {sorted(ARCHITECTURES)} "
                "(Gemma, MoE and other families need model changes).",
            )
        return ARCHITECTURES[archs[0]]
    model_type = config_json.get("model_type")
    if model_type not in ARCHITECTURES.values():
        _fail(
            "model_type",
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
            _fail("layer_types", f"expected {n_layers} of full/sliding_attention, got {types}")
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
            _fail(key, f"is set ({cj[key]!r}); quantized and MoE models are not supported.")
    if cj.get("mlp_bias"):
        _fail("mlp_bias", "biases on the MLP projections are not supported by the decoder.")
    if family != "qwen2" and cj.get("attention_bias"):
        _fail(
            "attention_bias",
            f"{family} puts a bias on o_proj as well as q/k/v; the decoder has q/k/v biases only "
            "(Qwen2's layout).",
        )
    if cj.get("hidden_act", "silu") not in ("silu", "swish"):
        _fail("hidden_act", f"{cj['hidden_act']!r}; only the SwiGLU MLP (silu) is supported.")
    try:
        hidden, heads = int(cj["hidden_size"]), int(cj["num_attention_heads"])
        n_layers, mlp = int(cj["num_hidden_layers"]), int(cj["intermediate_size"])
        vocab, max_pos = int(cj["vocab_size"]), int(cj["max_position_embeddings"])
    except KeyError as e:
        _fail(str(e.args[0]), "is missing; a Llama-family config.json always has it.")
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
                _fail(key, f"{block} is not computed by {family}'s modelling code.")
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


def default_architecture(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.attention_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if set(cfg.layer_pattern) == {"L"} else "LlamaForCausalLM"


def config_to_hf(
    cfg: ModelConfig,
    *,
    architecture: str | None = None,
    torch_dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """ModelConfig -> config.json dict of transformers 5 (`rope_parameters` with rope_theta).
    `extra` adds fields such as bos/eos_token_id. Refuses what the architecture cannot express."""
    arch = architecture or default_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture={arch!r} is not one of {sorted(ARCHITECTURES)}.")
    family = ARCHITECTURES[arch]

    def refuse(key: str, why: str):
        raise ValueError(f"model.{key}: {why}; {arch} cannot represent it, so no export.")

    if cfg.alibi:
        refuse("alibi", "ALiBi replaces RoPE")
    if cfg.sinks:
        refuse("sinks", f"attention sinks ({cfg.sinks}) on local layers")
    if "C" in cfg.layer_pattern:
        refuse("layer_pattern", f"chunked (C) layers in {cfg.layer_pattern!r}")
    if cfg.local_rope and cfg.rope_for("local") != cfg.rope_for("global"):
        refuse("local_rope", "a separate rope for local layers")
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: choose one of {sorted(TORCH_DTYPES)}.")
    rope = parse_rope(cfg.rope_for("global"), key="model.rope", head_dim=cfg.head_dim).to_hf()
    if rope["rope_type"] not in HF_ROPE_TYPES:
        refuse("rope", f"rope_type {rope['rope_type']!r} is not one of {HF_ROPE_TYPES}")
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        refuse("rope", "partial_rotary_factor != 1")
    if cfg.attention_bias != (family == "qwen2"):
        refuse("attention_bias", f"{cfg.attention_bias} (only Qwen2 has q/k/v biases)")
    if cfg.qk_norm != (family == "qwen3"):
        refuse("qk_norm", f"{cfg.qk_norm} (only Qwen3 normalises q and k)")
    kinds = cfg.layer_kinds
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": torch_dtype,
    }  # fmt: skip
    if family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
        if "local" in kinds:
            refuse("layer_pattern", f"sliding-window layers ({cfg.layer_pattern!r})")
    elif family == "mistral":
        if len(set(kinds)) > 1:
            refuse("layer_pattern", f"a mix of global and sliding layers ({cfg.layer_pattern!r})")
        out["sliding_window"] = cfg.window if kinds[0] == "local" else None
    else:
        types = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
        sliding = "sliding_attention" in types
        full_prefix = next((i for i, t in enumerate(types) if t == "sliding_attention"), len(types))
        out.update(
            use_sliding_window=sliding,
            sliding_window=cfg.window if sliding else None,
            max_window_layers=full_prefix,
            layer_types=types,
        )
    out.update(extra or {})
    return out


# ------------------------------------------------------------------------------ tensor names
# Our path inside a block -> (HF name after "model.layers.{i}.", layout kind).
_BLOCK = {
    ("attn", "wq"): ("self_attn.q_proj.weight", "in_heads"),
    ("attn", "wk"): ("self_attn.k_proj.weight", "in_heads"),
    ("attn", "wv"): ("self_attn.v_proj.weight", "in_heads"),
    ("attn", "wo"): ("self_attn.o_proj.weight", "out_heads"),
    ("attn", "bq"): ("self_attn.q_proj.bias", "bias"),
    ("attn", "bk"): ("self_attn.k_proj.bias", "bias"),
    ("attn", "bv"): ("self_attn.v_proj.bias", "bias"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "same"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "same"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same"),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", "transpose"),
    ("mlp", "w_up"): ("mlp.up_proj.weight", "transpose"),
    ("mlp", "w_down"): ("mlp.down_proj.weight", "transpose"),
}
_TOP = {
    ("embed",): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("head",): ("lm_head.weight", "transpose"),
}


def _to_ours(kind: str, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of one HF tensor in our layout `shape` (no copy: reshapes and transposes)."""
    if kind == "in_heads":  # [N*D, E] -> [E, N, D]
        E, N, D = shape
        return hf.reshape(N, D, E).transpose(2, 0, 1)
    if kind == "out_heads":  # [E, H*D] -> [H, D, E]
        H, D, E = shape
        return hf.reshape(E, H, D).transpose(1, 2, 0)
    if kind == "bias":
        return hf.reshape(shape)
    return hf.T if kind == "transpose" else hf


def _to_hf(kind: str, ours: np.ndarray) -> np.ndarray:
    if kind == "in_heads":
        return ours.reshape(ours.shape[0], -1).T
    if kind == "out_heads":
        return ours.reshape(-1, ours.shape[-1]).T
    if kind == "bias":
        return ours.reshape(-1)
    return ours.T if kind == "transpose" else ours


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_hf(kind, np.broadcast_to(np.zeros((), np.float32), shape)).shape


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Where one of our parameters lives in the HF checkpoint: one name per stacked repeat."""

    names: tuple[str, ...]
    kind: str
    stacked: bool


def _plan(params: Any) -> dict[tuple, _Leaf]:
    """Our parameter tree (arrays or ShapeDtypeStructs) -> {path: _Leaf} for every leaf."""
    blocks = params["layers"]["blocks"]
    stacked = blocks[0]["attn_norm"]["scale"].ndim == 2
    P = len(blocks)
    repeats = blocks[0]["attn_norm"]["scale"].shape[0] if stacked else 1
    plan = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if keys[:2] == ("layers", "blocks"):
            name, kind = _BLOCK[keys[3:]]
            layers = [r * P + keys[2] for r in range(repeats)]
            plan[keys] = _Leaf(tuple(f"model.layers.{i}.{name}" for i in layers), kind, stacked)
        else:
            name, kind = _TOP[keys]
            plan[keys] = _Leaf((name,), kind, False)
    return plan


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
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
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
    ShapeDtypeStructs, as `train.build_model` returns; without `.sharding`: default device).
    Each device reads only its slice of each tensor; tensors are cast to the abstract dtype."""
    reader = SafetensorsFolder(path)
    rename = _prefixed(reader)
    cfg_json = read_config(path)
    plan = _plan(abstract_params)
    used = set()
    out = {}
    for keys, leaf in plan.items():
        target = _get(abstract_params, keys)
        layer_shape = target.shape[1:] if leaf.stacked else target.shape
        expected = _hf_shape(leaf.kind, layer_shape)
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
            views.append(_to_ours(leaf.kind, reader.array(stored), layer_shape))
        _set(out, keys, _place(views, leaf.stacked, target))
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


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


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
    # Imported here: train imports this module to accept an HF folder as checkpoint.init_from.
    from ctxext_jax.train import build_model

    cfg = config_from_hf(
        read_config(path), dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers
    )
    mesh = mesh or single_device_mesh()
    apply, abstract_params, _ = build_model(cfg, mesh, rules, seed=0)
    params = load_params(path, abstract_params)

    def forward(params, tokens):
        with sharding.use_mesh(mesh, rules):
            return apply(params, tokens)

    return HFModel(config=cfg, params=params, apply=apply, forward=jax.jit(forward))


# --------------------------------------------------------------------------------- export
def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array -> the whole numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    params: Any,
    model_cfg: ModelConfig,
    out_dir: str,
    *,
    architecture: str | None = None,
    torch_dtype: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
    tokenizer_from: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Writes config.json and model.safetensors (or shards + index) that transformers'
    AutoModelForCausalLM loads; copies tokenizer files from the `tokenizer_from` folder.
    Memory holds one shard at a time. Returns out_dir."""
    hf_config = config_to_hf(
        model_cfg, architecture=architecture, torch_dtype=torch_dtype, extra=extra_config
    )
    np_dtype = TORCH_DTYPES[torch_dtype]
    plan = _plan(params)
    names = {}  # HF name -> (our path, repeat index or None, kind)
    for keys, leaf in plan.items():
        for r, name in enumerate(leaf.names):
            names[name] = (keys, r if leaf.stacked else None, leaf.kind)
    sizes = {
        n: math.prod(_get(params, k).shape[1:] if r is not None else _get(params, k).shape)
        * np.dtype(np_dtype).itemsize
        for n, (k, r, _) in names.items()
    }
    shards, current, total = [], [], 0
    for name in names:  # leaf order: each stacked leaf is fetched to the host once
        if current and total + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += sizes[name]
    shards.append(current)
    if tokenizer_from is not None:
        check_tokenizer(tokenizer_spec(tokenizer_from), model_cfg.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
    from safetensors.numpy import save_file

    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    hosted: dict[tuple, np.ndarray] = {}
    for file, shard in zip(files, shards, strict=True):
        tensors = {}
        for name in shard:
            keys, r, kind = names[name]
            if keys not in hosted:  # one stacked leaf feeds several shards' layers
                hosted = {keys: _host(_get(params, keys))}
            value = hosted[keys] if r is None else hosted[keys][r]
            tensors[name] = np.ascontiguousarray(_to_hf(kind, value).astype(np_dtype))
        if jax.process_index() == 0:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if jax.process_index() == 0:
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {n: files[i] for i, shard in enumerate(shards) for n in shard},
            }
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, out_dir)
    return out_dir


# ------------------------------------------------------------------------------ tokenizer
def tokenizer_spec(folder: str) -> str:
    """ "hf:<folder>" (tokenizer.json) or "sentencepiece:<folder>/tokenizer.model"."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return f"hf:{folder}"
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return f"sentencepiece:{os.path.join(folder, 'tokenizer.model')}"
    raise ValueError(
        f"{folder} has neither tokenizer.json nor tokenizer.model; copy the model's tokenizer "
        "files into it or set data.tokenizer explicitly."
    )


def check_tokenizer(spec: str, vocab_size: int) -> None:
    """Raises if the tokenizer can emit ids the embedding table does not have."""
    tokenizer = make_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {spec} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: ids >= {vocab_size} have no embedding; use the model's own tokenizer."
        )


def copy_tokenizer(src: str, out_dir: str) -> list[str]:
    """Copies the tokenizer files `src` has (and generation_config.json); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def model_json(path: str) -> dict[str, Any]:
    """An HF folder's ModelConfig fields as `checkpoint.read_model_json` returns a checkpoint's,
    for `checkpoint.check_compatible(hf.model_json(folder), model_cfg)`."""
    return json.loads(config_from_hf(read_config(path)).to_json())
