"""validate() turns each bad value into one error naming the key; the CLI prints it alone."""

import dataclasses
import os
import subprocess
import sys

import pytest

from configs import tiny
from ctxext_jax.config import ConfigError, validate
from ctxext_jax.train import preflight

BAD = [
    ("model.n_heads", {"model.n_heads": 6, "model.n_kv_heads": 4}, "not a multiple"),
    ("model.d_model", {"model.d_model": 0}, "positive integer"),
    ("train.batch_size", {"train.batch_size": -8}, "positive integer"),
    ("data.seq_len", {"data.seq_len": 0}, "positive integer"),
    ("model.rope", {"model.rope": {"rope_type": "warp", "rope_theta": 1e4}}, "warp"),
    ("model.rope.factor", {"model.rope": {"rope_type": "linear", "factor": 0.5}}, "factor"),
    ("mesh.shape", {"mesh.shape": {"data": 3, "fsdp": 1, "tensor": 1, "sequence": 1}}, "devices"),
    ("mesh.shape", {"mesh.shape": {"data": -1, "fsdp": -1, "tensor": 1, "sequence": 1}}, "-1"),
    (
        "train.batch_size",
        {"mesh.shape": {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}, "train.batch_size": 12},
        "not divisible",
    ),  # fmt: skip
    (
        "model.n_kv_heads",
        {
            "mesh.shape": {"data": 1, "fsdp": 1, "tensor": 8, "sequence": 1},
            "model.n_heads": 8,
            "model.n_kv_heads": 2,
        },
        "not divisible",
    ),  # fmt: skip
    ("model.layer_pattern", {"model.layer_pattern": "GX"}, "layer_pattern"),
    ("model.window", {"model.layer_pattern": "LG"}, "window"),
    ("model.rope", {"model.alibi": True}, "ALiBi"),
    ("model.vocab_size", {"model.vocab_size": 100}, "tokenizer"),
    ("model.attention_impl", {"model.attention_impl": "flash9"}, "flash9"),
    ("optim.warmup_steps", {"optim.warmup_steps": 1000}, "warmup"),
    ("train.grad_accum", {"train.grad_accum": 3}, "micro-steps"),
    ("checkpoint.init_from", {"checkpoint.init_from": "/nonexistent/run"}, "does not exist"),
    ("data.tokenizer", {"data.tokenizer": "sentencepiece:/nonexistent.model"}, "nonexistent"),
    ("checkpoint.init_from", {"checkpoint.init_from": os.path.abspath(__file__)}, "is a file"),
    ("data.files", {"data.dataset": "files", "data.files": "/nonexistent/*.txt"}, "matches no"),
]


def _config(overrides):
    config = tiny.get_config("test")
    for key, value in overrides.items():
        group, name = key.split(".", 1)
        config[group][name] = value
    return config


def test_tiny_configs_are_valid():
    for arg in ("base", "extend", "test"):
        validate(tiny.get_config(arg))


@pytest.mark.parametrize(
    "key,overrides,fragment", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_validate_names_the_key(key, overrides, fragment):
    with pytest.raises(ConfigError) as error:
        config = _config(overrides)
        validate(config)
        preflight(config)
    message = str(error.value)
    assert message.startswith(key), message
    assert fragment in message, message


def test_init_from_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.init_from: .* holds no checkpoint"):
        preflight(_config({"checkpoint.init_from": str(tmp_path)}))


def test_cli_prints_only_the_message(tmp_path):
    env = dict(os.environ, XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "-m", "ctxext_jax.train", "--config", "configs/tiny.py:test",
         "--workdir", str(tmp_path), "--config.model.n_kv_heads=3"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.n_heads: 4 query heads")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["a_file", "a_file/sub", "gs://bucket/run"])
def test_unusable_workdir_is_one_error(tmp_path, name):
    from ctxext_jax.train import train_and_evaluate

    (tmp_path / "a_file").write_text("")
    workdir = name if "://" in name else str(tmp_path / name)
    with pytest.raises(ValueError, match="--workdir"):
        train_and_evaluate(tiny.get_config("test"), workdir)


def test_init_from_refuses_a_different_layer_stacking():
    """A pattern of another length (scanned) or a scan switch changes the parameter tree."""
    import json

    from ctxext_jax.checkpoint import check_compatible
    from ctxext_jax.model import ModelConfig

    source = ModelConfig.from_config(tiny.get_config("test").model)
    same_length = dataclasses.replace(source, layer_pattern="L", window=8)
    check_compatible(json.loads(source.to_json()), same_length)  # positions/windows may change
    for target in (
        dataclasses.replace(source, layer_pattern="LG", window=8),
        dataclasses.replace(source, scan_layers=False),
    ):
        with pytest.raises(ValueError, match="checkpoint.init_from: .*model.layer_pattern"):
            check_compatible(json.loads(source.to_json()), target)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "configs/tiny.py:bogus"], "error: configs/tiny.py: unknown variant 'bogus'"),
        (
            ["--config", "configs/nonexistent.py"],
            "error: --config: no file 'configs/nonexistent.py'",
        ),
        (["--config", "configs/tiny.py", "--config.model.nosuch=3"], "error: --config: no field"),
    ],
    ids=["variant", "missing-file", "unknown-key"],
)
def test_cli_config_file_errors_are_one_line(tmp_path, args, message):
    """A config file that fails to load is reported by flag parsing: one line, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "ctxext_jax.train", "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.strip().startswith(message), result.stderr
