"""Hugging Face import/export against transformers' own modelling code (float32, eager)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from hf_fixtures import (
    LENGTH,
    ORIGINAL,
    load_torch,
    make_model,
    make_tokenizer_files,
    random_tokens,
    rel_err,
    torch_logits,
)

from ctxext_jax import convert, hf, sharding
from ctxext_jax.model import ModelConfig

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("llama", "default", {}),
    ("llama", "linear", {}),
    ("llama", "dynamic", {}),
    ("llama", "yarn", {}),
    ("llama", "llama3", {}),
    ("llama", "longrope", {}),
    ("mistral", "default", {"sliding_window": 24}),
    ("mistral", "yarn", {"sliding_window": 48}),
    ("qwen2", "default", {}),
    ("qwen2", "linear", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 2,
                         "num_hidden_layers": 4}),
    ("qwen3", "default", {"tie_word_embeddings": True}),
    ("qwen3", "dynamic", {}),
]  # fmt: skip


@pytest.mark.parametrize("family,rope,overrides", CASES, ids=[f"{f}-{r}" for f, r, _ in CASES])
def test_logits_match_transformers(tmp_path, family, rope, overrides):
    torch_model = make_model(str(tmp_path), family, rope, **overrides)
    # Alternate scan-over-layers so both parameter layouts are exercised.
    model = hf.from_pretrained(str(tmp_path), scan_layers=len(overrides) % 2 == 0)
    assert LENGTH > ORIGINAL
    tokens = random_tokens(seed=len(family) * 7 + len(rope))
    assert rel_err(model(tokens), torch_logits(torch_model, tokens)) < TOL
    if family == "qwen2" and overrides:
        assert model.config.layer_pattern == "GGLL" and model.config.window == 24
    if family == "mistral":
        assert set(model.config.layer_pattern) == {"L"}


def test_sharded_load_matches(tmp_path):
    """Sharded safetensors (index) loaded onto 8 devices (data 2, fsdp 2, tensor 2)."""
    torch_model = make_model(str(tmp_path / "src"), "qwen2", "yarn")
    torch_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    shape = (("data", 2), ("fsdp", 2), ("tensor", 2), ("sequence", 1))
    mesh = sharding.make_mesh(sharding.MeshConfig(shape=shape))
    model = hf.from_pretrained(str(tmp_path / "sharded"), mesh=mesh)
    wq = model.params["layers"]["blocks"][0]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.shape == (
        2,
        32,
        2,
        16,
    )
    tokens = random_tokens(1, batch=4)
    assert rel_err(model(tokens), torch_logits(torch_model, tokens)) < TOL


def test_bfloat16_weights(tmp_path):
    """bf16 safetensors (numpy cannot read them through safetensors) upcast exactly."""
    make_model(str(tmp_path / "f32"), "llama", "llama3")
    load_torch(str(tmp_path / "f32"), torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    reference = load_torch(str(tmp_path / "bf16"), torch.bfloat16).to(torch.float32)
    model = hf.from_pretrained(str(tmp_path / "bf16"))
    tokens = random_tokens(2)
    assert rel_err(model(tokens), torch_logits(reference, tokens)) < TOL
    # ShapeDtypeStructs without shardings load onto the default device.
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
    params = hf.load_params(str(tmp_path / "bf16"), plain)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, model.params))


@pytest.mark.parametrize("family,arch", [("mistral", None), ("qwen3", None), ("qwen2", None),
                                         ("llama", "LlamaForCausalLM")])  # fmt: skip
def test_round_trip(tmp_path, family, arch):
    overrides = {"sliding_window": 24} if family == "mistral" else {}
    overrides |= {"tie_word_embeddings": True} if family == "qwen3" else {}
    torch_model = make_model(str(tmp_path / "src"), family, "longrope", **overrides)
    model = hf.from_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(model.params, model.config, str(tmp_path / "out"), architecture=arch)
    exported = load_torch(str(tmp_path / "out"))
    assert type(exported) is type(torch_model)
    tokens = random_tokens(3)
    assert rel_err(torch_logits(exported, tokens), torch_logits(torch_model, tokens)) < TOL
    src_config = json.load(open(tmp_path / "src" / "config.json"))
    out_config = json.load(open(tmp_path / "out" / "config.json"))
    for key in ("rope_parameters", "sliding_window", "tie_word_embeddings", "head_dim"):
        assert out_config.get(key) == src_config.get(key), key


def test_export_sharded_bfloat16(tmp_path):
    torch_model = make_model(str(tmp_path / "src"), "llama", "yarn")
    model = hf.from_pretrained(str(tmp_path / "src"), scan_layers=False)
    hf.save_pretrained(model.params, model.config, str(tmp_path / "out"), torch_dtype="bfloat16",
                       max_shard_bytes=40_000)  # fmt: skip
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    exported = load_torch(str(tmp_path / "out"), torch.bfloat16).to(torch.float32)
    rounded = torch_model.to(torch.bfloat16).to(torch.float32)
    tokens = random_tokens(4)
    assert rel_err(torch_logits(exported, tokens), torch_logits(rounded, tokens)) < TOL


def test_extend_train_export(tmp_path):
    """Train from an HF folder (checkpoint.init_from=<folder>) a few steps with YaRN 4x
    (configs/extend_hf.py) -> export: transformers' logits equal ours at the new length."""
    from configs.extend_hf import get_config
    from ctxext_jax import checkpoint
    from ctxext_jax.steps import build_model
    from ctxext_jax.train import train_and_evaluate

    src = str(tmp_path / "src")
    make_model(src, "qwen2", "default")
    make_tokenizer_files(src)
    config = get_config(src)
    assert config.model.rope.rope_type == "yarn" and config.data.seq_len == 4 * ORIGINAL
    assert config.checkpoint.init_from == src
    config.model.update(dtype="float32", remat="none")
    config.train.update(steps=3, batch_size=8, log_every=1)
    config.optim.update(lr=1e-2, warmup_steps=1)
    config.eval.update(every=3, batches=1)
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["eval_loss"])
    convert.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"))
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    out_config = json.load(open(tmp_path / "out" / "config.json"))
    assert out_config["architectures"] == ["Qwen2ForCausalLM"]
    assert out_config["rope_parameters"]["rope_type"] == "yarn"

    step_dir = checkpoint.resolve_init_from(str(tmp_path / "run"))
    cfg = convert.model_config_from_json(checkpoint.read_model_json(step_dir))
    apply, abstract, _ = build_model(cfg, hf.single_device_mesh(), sharding.DEFAULT_RULES, seed=0)
    trained = checkpoint.load_params(step_dir, abstract)
    base = hf.load_params(src, abstract)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a - b)).max()), trained, base)
    assert max(jax.tree.leaves(moved)) > 0  # training changed the weights
    tokens = random_tokens(5, length=4 * ORIGINAL)
    ours = jax.jit(apply)(trained, tokens)
    assert rel_err(ours, torch_logits(load_torch(str(tmp_path / "out")), tokens)) < TOL


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ctxext_jax.convert", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_convert_cli(tmp_path):
    torch_model = make_model(str(tmp_path / "src"), "mistral", "yarn", sliding_window=24)
    run = _cli("--from_hf", str(tmp_path / "src"), "--to", str(tmp_path / "ckpt"))
    assert run.returncode == 0, run.stderr
    run = _cli("--from_ckpt", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    tokens = random_tokens(6)
    exported = load_torch(str(tmp_path / "out"))
    assert rel_err(torch_logits(exported, tokens), torch_logits(torch_model, tokens)) < TOL
    run = _cli("--from_hf", str(tmp_path / "nowhere"), "--to", str(tmp_path / "ckpt2"))
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "config.json" in run.stderr


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_bad_folders(tmp_path):
    src = str(tmp_path / "src")
    torch_model = make_model(src, "llama", "default")

    def load(folder):
        return hf.from_pretrained(folder)

    # Missing shard named by the index.
    torch_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "sharded" / victim)
    with pytest.raises(ValueError, match=f"names shard '{victim}'.*no such file"):
        load(str(tmp_path / "sharded"))
    # A tensor of the wrong shape: config.json says a wider MLP than the weights hold.
    shutil.copytree(src, tmp_path / "wide")
    _edit_config(tmp_path / "wide", intermediate_size=128)
    wrong = r"down_proj.weight .* shape \[64, 96\] but the model config expects \[64, 128\]"
    with pytest.raises(ValueError, match=wrong):
        load(str(tmp_path / "wide"))
    # Unknown architecture; unsupported fields.
    for changes, pattern in [
        ({"architectures": ["GemmaForCausalLM"]}, "architectures: 'GemmaForCausalLM' is not"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias: llama puts a bias on o_proj"),
        (
            {"rope_parameters": {"rope_type": "wavy", "rope_theta": 1e4}},
            "rope_type: unknown 'wavy'",
        ),
        (
            {"rope_parameters": {"rope_type": "ntk", "factor": 2.0, "rope_theta": 1e4}},
            "not computed",
        ),  # fmt: skip
    ]:
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(src, tmp_path / "bad")
        _edit_config(tmp_path / "bad", **changes)
        with pytest.raises(ValueError, match=pattern):
            load(str(tmp_path / "bad"))
    # An interrupted download: a truncated or empty safetensors file; a broken config.json.
    weights = tmp_path / "bad" / "model.safetensors"
    for keep in (os.path.getsize(weights) // 2, 4, 0):
        shutil.rmtree(tmp_path / "bad")
        shutil.copytree(src, tmp_path / "bad")
        os.truncate(weights, keep)
        with pytest.raises(ValueError, match="model.safetensors is truncated"):
            load(str(tmp_path / "bad"))
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        hf.tokenizer_spec(src)
    # A tokenizer larger than the vocabulary.
    make_tokenizer_files(str(tmp_path / "tok"), vocab_size=200)
    too_many = "has 200 tokens but the model's vocab_size is 128"
    with pytest.raises(ValueError, match=too_many):
        hf.check_tokenizer(hf.tokenizer_spec(str(tmp_path / "tok")), 128)
    hf.copy_tokenizer(str(tmp_path / "tok"), src)
    with pytest.raises(ValueError, match=too_many):
        convert.import_to_checkpoint(src, str(tmp_path / "ckpt"))


def test_export_refuses_what_hf_cannot_represent():
    base = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, mlp_dim=96, max_position_embeddings=64)  # fmt: skip
    assert hf.config_to_hf(base)["architectures"] == ["LlamaForCausalLM"]
    nope = (("rope_type", "nope"),)
    for changes, pattern in [
        ({"alibi": True, "rope": nope}, "model.alibi"),
        ({"layer_pattern": "GC", "chunk": 8}, "chunked"),
        ({"rope": (("factor", 2.0), ("rope_theta", 1e4), ("rope_type", "ntk"))}, "'ntk'"),
        ({"layer_pattern": "GL", "window": 8}, "mix of global and sliding"),
        ({"sinks": 4, "layer_pattern": "L", "window": 8}, "sinks"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            cfg = dataclasses.replace(base, **changes)
            arch = "MistralForCausalLM" if "mix" in pattern else None
            hf.config_to_hf(cfg, architecture=arch)


def test_extend_hf_composes_an_already_scaled_rope(tmp_path):
    """configs/extend_hf.py keeps llama3 x8 as llama3 x32 over the same original length (never
    YaRN over the scaled length), makes an unscaled rope YaRN, and refuses longrope."""
    from configs.extend_hf import get_config

    llama3 = str(tmp_path / "llama3")
    make_model(llama3, "llama", "llama3")
    make_tokenizer_files(llama3)
    rope = get_config(llama3).model.rope.to_dict()
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert rope["original_max_position_embeddings"] == ORIGINAL
    longrope = str(tmp_path / "longrope")
    make_model(longrope, "llama", "longrope")
    make_tokenizer_files(longrope)
    with pytest.raises(ValueError, match="already uses rope_type 'longrope'"):
        get_config(longrope)
