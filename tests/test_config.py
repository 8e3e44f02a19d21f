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
    ("optim.warmup_steps", {"optim.warmup_steps": -1}, "integer >= 0"),
    ("train.grad_accum", {"train.grad_accum": 3}, "micro-steps"),
    ("checkpoint.init_from", {"checkpoint.init_from": "/nonexistent/run"}, "does not exist"),
    ("data.tokenizer", {"data.tokenizer": "sentencepiece:/nonexistent.model"}, "nonexistent"),
    ("checkpoint.init_from", {"checkpoint.init_from": os.path.abspath(__file__)}, "is a file"),
    ("data.files", {"data.dataset": "files", "data.files": "/nonexistent/*.txt"}, "matches no"),
    # every field typed and ranged
    ("optim.b1", {"optim.b1": 1.5}, "[0, 1)"),
    ("optim.b1", {"optim.b1": -0.1}, "[0, 1)"),
    ("optim.b2", {"optim.b2": 1.0}, "[0, 1)"),
    ("optim.eps", {"optim.eps": -1e-8}, "> 0"),
    ("optim.eps", {"optim.eps": 0.0}, "> 0"),
    ("model.rms_eps", {"model.rms_eps": -1.0}, "> 0"),
    ("model.init_std", {"model.init_std": -0.02}, "> 0"),
    ("model.init_std", {"model.init_std": 0.0}, "> 0"),
    ("optim.lr", {"optim.lr": 0.0}, "> 0"),
    ("optim.lr", {"optim.lr": float("nan")}, "finite"),
    ("optim.lr", {"optim.lr": "fast"}, "finite number"),
    ("optim.min_lr_ratio", {"optim.min_lr_ratio": 1.5}, "[0, 1]"),
    ("optim.weight_decay", {"optim.weight_decay": -0.1}, ">= 0"),
    ("optim.grad_clip", {"optim.grad_clip": -1.0}, ">= 0"),
    ("optim.decay_steps", {"optim.decay_steps": -1}, "integer >= 0"),
    ("train.steps", {"train.steps": "abc"}, "positive integer, got 'abc'"),
    ("train.steps", {"train.steps": 2.5}, "positive integer, got 2.5"),
    ("train.batch_size", {"train.batch_size": True}, "positive integer"),
    ("train.max_nonfinite", {"train.max_nonfinite": -1}, "integer >= 0"),
    ("train.log_every", {"train.log_every": 0}, "positive integer"),
    ("train.seed", {"train.seed": -1}, "integer >= 0"),
    ("data.seed", {"data.seed": -1}, "integer >= 0"),
    ("data.num_workers", {"data.num_workers": -1}, "integer >= 0"),
    ("model.window", {"model.window": -1}, "integer >= 0"),
    ("model.sinks", {"model.sinks": -2}, "integer >= 0"),
    ("model.alibi", {"model.alibi": "yes"}, "true or false"),
    ("model.scan_layers", {"model.scan_layers": 1}, "true or false"),
    ("model.qk_norm", {"model.qk_norm": "no"}, "true or false"),
    ("model.dtype", {"model.dtype": "float64"}, "unknown value"),
    ("model.param_dtype", {"model.param_dtype": "float16"}, "unknown value"),
    ("model.remat", {"model.remat": "sometimes"}, "unknown value"),
    ("optim.schedule", {"optim.schedule": "exp"}, "unknown value"),
    ("data.on_undecodable", {"data.on_undecodable": "ignore"}, "unknown value"),
    ("data.tokenizer", {"data.tokenizer": 3}, "a string"),
    ("eval.long_lengths", {"eval.long_lengths": (0,)}, "positive integers"),
    ("eval.every_long", {"eval.every_long": -1}, "integer >= 0"),
    ("eval.long_passkey_trials", {"eval.long_passkey_trials": 0}, "positive integer"),
    ("checkpoint.keep", {"checkpoint.keep": 0}, "positive integer"),
    ("checkpoint.every", {"checkpoint.every": -5}, "positive integer"),
    ("eval.batch_size", {"eval.batch_size": 0}, "positive integer"),
    ("model.head_dim", {"model.head_dim": 15}, "pairs"),
    ("model.layer_pattern", {"model.layer_pattern": ""}, "non-empty"),
    ("model.chunk", {"model.layer_pattern": "C"}, "chunk size"),
    ("model.n_layers", {"model.layer_pattern": "GGG"}, "whole number"),
    ("model.rope.original_max_position_embeddings",
     {"model.rope": {"rope_type": "yarn", "factor": 4.0}}, "required"),
    ("model.local_rope.factor",
     {"model.layer_pattern": "L", "model.window": 8,
      "model.local_rope": {"rope_type": "linear", "factor": 0.5}}, "factor"),
    ("model.rope", {"model.rope": "yarn"}, "dict"),
    ("eval.batch_size",
     {"mesh.shape": {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}, "eval.batch_size": 4},
     "divisible"),
    ("mesh.shape", {"mesh.shape": {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1,
                    "rows": 1}}, "unknown axes"),
    ("mesh.shape.data", {"mesh.shape": {"data": 1.5, "fsdp": 1, "tensor": 1, "sequence": 1}},
     "must be an integer"),
    ("mesh.shape.fsdp", {"mesh.shape": {"data": -1, "fsdp": "x", "tensor": 1, "sequence": 1}},
     "must be an integer"),
    ("mesh.rules", {"mesh.rules": [("batch", ["rows"])]}, "mesh axes of"),
    ("mesh.rules", {"mesh.rules": [("embd", "fsdp")]}, "unknown logical axis 'embd'"),
    ("mesh.rules", {"mesh.rules": "batch=data"}, "(logical axis, mesh axes) pairs"),
    ("data.task.hops", {"data.task": {"hops": "3"}}, "must be an integer >= 1"),
    ("data.task.min_length", {"data.task": {"min_length": -1}}, "must be an integer >= 0"),
    # what the preflight reads
    ("data.files", {"data.dataset": "files", "data.files": ""}, "needs a glob"),
    ("data.tokenizer", {"data.tokenizer": "wordpiece"}, "not understood"),
    ("data.tokenizer", {"data.tokenizer": "hf:/nonexistent/tokenizer.json"}, "does not exist"),
    ("data.text_key", {"data.text_key": ""}, "empty"),
    ("data.dataset", {"data.dataset": ""}, "empty"),
    ("data.eval_split", {"data.eval_split": ""}, "empty"),
    ("data.data_dir", {"data.data_dir": os.path.abspath(__file__)}, "not a directory"),
]  # fmt: skip


def _config(overrides):
    """tiny:test with `overrides`, each value taking its own type (as a config file could)."""
    import ml_collections

    tree = tiny.get_config("test").to_dict()
    for key, value in overrides.items():
        group, name = key.split(".", 1)
        tree[group][name] = value
    return ml_collections.ConfigDict(tree)


def test_tiny_configs_are_valid():
    for arg in ("base", "extend", "test"):
        validate(tiny.get_config(arg))


@pytest.mark.parametrize(
    "key,overrides,fragment", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_validate_names_the_key(key, overrides, fragment, cli_outcome):
    """Exit code 2, one line `error: <key>: ...` with the fragment, as the CLI prints it."""
    config = _config(overrides)
    code, lines = cli_outcome(lambda: (validate(config), preflight(config)))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {key}"), lines[0]
    assert fragment in lines[0], lines[0]


def test_bad_config_table_size():
    assert len(BAD) >= 60


def test_warnings_for_unused_or_unlikely_settings():
    from ctxext_jax.optim import OptimConfig

    config = _config({"model.sinks": 4, "model.chunk": 8,
                      "model.local_rope": {"rope_type": "default"}, "data.seq_len": 128,
                      "optim.warmup_steps": 100})  # fmt: skip
    warnings = validate(config)
    keys = [w.split(":")[0] for w in warnings]
    assert keys == ["model.sinks", "model.chunk", "model.local_rope", "data.seq_len",
                    "optim.warmup_steps"], warnings  # fmt: skip
    assert "rope_type=yarn" in warnings[3] and "clipped to 7" in warnings[4]
    assert OptimConfig.from_config(config.optim, train_steps=8).warmup_steps == 7
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    reach = validate(_config({"model.rope": yarn, "data.seq_len": 128}))
    assert [w.split(":")[0] for w in reach] == ["data.seq_len"] and "reach" in reach[0]
    assert (
        validate(_config({"model.layer_pattern": "LG", "model.window": 8, "model.sinks": 2})) == []
    )


def test_rope_blocks_and_mixtures_on_the_command_line():
    from ctxext_jax.cli import apply_dict_flags, split_dict_flags

    argv, ropes = split_dict_flags(["train", "--config.model.rope.rope_type=yarn",
                                    "--config.model.rope.factor=4",
                                    "--config.model.rope.original_max_position_embeddings=64",
                                    "--config.train.steps=3"])  # fmt: skip
    assert argv == ["train", "--config.train.steps=3"]
    config = tiny.get_config("test")
    apply_dict_flags(config, ropes)
    assert config.model.rope.to_dict() == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4,
        "original_max_position_embeddings": 64,
    }
    validate(config)
    block = '{"rope_type": "linear", "factor": 2.0}'
    apply_dict_flags(config, split_dict_flags([f"--config.model.rope={block}"])[1])
    assert config.model.rope.to_dict() == {"rope_type": "linear", "factor": 2.0}
    apply_dict_flags(
        config, split_dict_flags(["--config.model.local_rope={'rope_type': 'nope'}"])[1]
    )
    assert config.model.local_rope.to_dict() == {"rope_type": "nope"}
    with pytest.raises(ConfigError, match="^model.rope: expected a JSON object"):
        apply_dict_flags(config, split_dict_flags(["--config.model.rope=yarn"])[1])
    # a mixture's {source: weight} the same way
    apply_dict_flags(config, split_dict_flags(["--config.data.mixture.text=0.7",
                                               "--config.data.mixture.kv=0.3"])[1])  # fmt: skip
    assert config.data.mixture.to_dict() == {"text": 0.7, "kv": 0.3}
    apply_dict_flags(config, split_dict_flags(['--config.data.mixture={"passkey": 1}'])[1])
    assert config.data.mixture.to_dict() == {"passkey": 1}


TINY = ["--config", "configs/tiny.py:test"]


@pytest.mark.parametrize(
    "args,code,first",
    [
        ([*TINY, "--help"], 0, None),
        ([*TINY, "--config.train.steps=abc"], 2,
         "error: train.steps: expected an integer, got 'abc'"),
        ([*TINY, "--config.optim.b1=x"], 2, "error: optim.b1: expected a number, got 'x'"),
        ([*TINY, "--config.model.rope.rope_type=yarn", "--config.model.rope.factor=0.5",
          "--config.model.rope.original_max_position_embeddings=64"], 2,
         "error: model.rope.factor: got 0.5"),
        (["--config", "configs/tiny.py:bogus"], 2,
         "error: configs/tiny.py: unknown variant 'bogus'"),
        (["--config", "configs/nonexistent.py"], 2,
         "error: --config: no file 'configs/nonexistent.py'"),
        ([*TINY, "--config.model.nosuch=3"], 2, "error: --config: no field"),
    ],
    ids=["help", "int", "float", "rope-field", "variant", "missing-file", "unknown-key"],
)  # fmt: skip
def test_flag_parsing_contract(args, code, first, capsys, monkeypatch):
    """What the CLIs' flag parser does with --help, ill-typed overrides and a config file that
    does not load (one line, exit 2), in-process, as
    `python -m ctxext_jax.train` would: the trainer is the main module (absl's help prints the
    main module's docstring, which would otherwise be whatever started pytest) and argv[0] names
    the module its flags were defined in (for the flag listing)."""
    from ctxext_jax import train  # (defines the trainer's flags)
    from ctxext_jax.cli import parse_flags

    argv = [train.__name__, "--workdir", "/nonexistent", *args]
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.setitem(sys.modules, "__main__", train)

    def parse_and_validate():
        from absl import flags

        parse_flags(list(argv))
        validate(flags.FLAGS.config)

    with pytest.raises(SystemExit) as stop:
        try:
            parse_and_validate()
        except ConfigError as e:  # what main reports the same way
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    out = capsys.readouterr()
    assert stop.value.code == code
    if first is None:
        assert out.out.startswith(train.__doc__) and "--workdir: Where checkpoints" in out.out
    else:
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first), lines


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
