"""End-to-end long-context evaluation of a tiny trained model, HF folders, the CLI, --compare."""

import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from configs import tiny
from ctxext_jax import data
from ctxext_jax.config import defaults
from ctxext_jax.evals import EvalOptions, long_eval_subset
from ctxext_jax.evaluate import attention_impl_for, evaluate
from ctxext_jax.restore import effective_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(
    passkey_trials=1, depths=(0.0, 1.0), needle_trials=1, needles=2, ppl_tokens=1500,
    batch_tokens=4096, buckets=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny:test trained for 8 steps (64-token context): -> its workdir."""
    from ctxext_jax.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("tiny"))
    train_and_evaluate(tiny.get_config("test"), workdir)
    return workdir


def _read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    return image


def test_end_to_end_report(trained, tmp_path):
    out = str(tmp_path / "run")
    options = EvalOptions(lengths=(256, 512), **SMALL)
    config = tiny.get_config("test")
    config.model.attention_impl = "xla"  # dense up to blockwise_above, blockwise beyond
    results = evaluate(config, trained, out, options, blockwise_above=256,
                       progress=False)  # fmt: skip
    files = sorted(os.listdir(os.path.join(out, "eval")))
    assert {"report.md", "results.json", "ppl_vs_length.png", "position_loss.png",
            "passkey.png", "needle_single.png", "needle_multi.png",
            "needle_distractor.png"} <= set(files)  # fmt: skip
    for name in files:
        if name.endswith(".png"):
            _read_png(os.path.join(out, "eval", name))
    saved = json.load(open(os.path.join(out, "eval", "results.json")))
    assert saved["trained_length"] == 64 and saved["source"].startswith("ctxext_jax")
    assert saved["attention_impl"] == {"256": "xla", "512": "blockwise"}
    ppl = saved["perplexity"]
    assert [r["length"] for r in ppl] == [256, 512]
    assert ppl[0]["tokens"] == ppl[1]["tokens"] == 1499  # the same tokens at every length
    assert all(np.isfinite(r["ppl"]) and 1 < r["ppl"] < 259 for r in ppl)
    assert np.shape(saved["passkey"]["accuracy"]) == (2, 2)
    assert np.shape(saved["needle"]["distractor"]["distractor_rate"]) == (2, 2)
    report = open(os.path.join(out, "eval", "report.md")).read()
    assert "Perplexity by context length" in report and "![passkey.png](passkey.png)" in report
    # The blockwise path gives the dense path's numbers (every window fits the xla kernel too).
    dense = evaluate(config, trained, str(tmp_path / "dense"),
                     EvalOptions(lengths=(512,), metrics=("ppl",), **SMALL),
                     blockwise_above=4096, progress=False)  # fmt: skip
    assert dense["attention_impl"] == {"512": "xla"}
    assert dense["perplexity"][0]["loss"] == pytest.approx(results["perplexity"][1]["loss"], 1e-4)


def test_cli_yarn_override_and_compare(trained, tmp_path):
    """The CLI evaluates the checkpoint under tiny:extend's YaRN positions (a config override),
    then --compare of the two runs writes one plot per metric."""
    env = dict(os.environ, CTXEXT_TRACEBACK="1")
    base = str(tmp_path / "base")
    options = EvalOptions(lengths=(256, 512), metrics=("ppl", "passkey"), **SMALL)
    evaluate(tiny.get_config("test"), trained, base, options, progress=False)
    yarn = str(tmp_path / "yarn")
    cmd = [sys.executable, "-m", "ctxext_jax.evaluate", "--config", "configs/tiny.py:extend",
           "--checkpoint", trained, "--workdir", yarn, "--lengths", "256,512",
           "--metrics", "ppl,passkey", "--passkey_trials", "1", "--depths", "0,1",
           "--ppl_tokens", "1500", "--batch_tokens", "4096"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "eval 100.0%" in run.stdout
    saved = json.load(open(os.path.join(yarn, "eval", "results.json")))
    assert saved["overrides"]["rope"]["rope_type"] == "yarn"
    assert saved["positions"]["max_position_embeddings"] == 1024
    cmp = str(tmp_path / "cmp")
    cmd = [sys.executable, "-m", "ctxext_jax.evaluate", "--workdir", cmp, "--compare", base]
    cmd.append(yarn)  # space-separated, as `--compare W1 W2` is typed
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("compare_ppl.png", "compare_passkey.png"):
        _read_png(os.path.join(cmp, "eval", name))
    table = open(os.path.join(cmp, "eval", "report.md")).read()
    assert "| base |" in table and "| yarn |" in table


def test_hf_folder(tmp_path):
    from hf_fixtures import make_model, make_tokenizer_files

    folder = str(tmp_path / "llama")
    make_model(folder, "llama", "yarn")
    make_tokenizer_files(folder)
    results = evaluate(defaults(), folder, str(tmp_path / "run"),
                       EvalOptions(lengths=(192,), metrics=("ppl", "passkey", "needle"),
                                   needle_variants=("single",), **SMALL),
                       progress=False)  # fmt: skip
    assert results["source"] == "huggingface" and results["data"]["tokenizer"] == f"hf:{folder}"
    assert results["positions"]["rope"]["rope_type"] == "yarn" and results["overrides"] == {}
    assert np.isfinite(results["perplexity"][0]["ppl"])
    assert os.path.isfile(tmp_path / "run" / "eval" / "needle_single.png")


def test_long_eval_subset(trained):
    from ctxext_jax import checkpoint, sharding
    from ctxext_jax.model import ModelConfig
    from ctxext_jax.steps import build_model

    config = tiny.get_config("test")
    mesh_cfg = sharding.MeshConfig.from_config(config.mesh)
    mesh = sharding.make_mesh(mesh_cfg)
    apply, abstract, _ = build_model(ModelConfig.from_config(config.model), mesh,
                                     mesh_cfg.rules, seed=0)  # fmt: skip
    params = checkpoint.load_params(checkpoint.resolve_init_from(trained), abstract)
    data_cfg = data.DataConfig.from_config(config.data)
    out = long_eval_subset(
        apply, params, tokenizer=data.make_tokenizer("bytes"), data_cfg=data_cfg,
        lengths=[64, 256], passkey_trials=1, seed=0,
        batch_sharding=sharding.named_sharding(mesh, ("batch", "length"), mesh_cfg.rules),
    )  # fmt: skip
    assert set(out) == {"ppl_len_64", "ppl_len_256", "passkey_acc_len_256"}
    assert all(np.isfinite(v) for v in out.values())


def test_positional_overrides_and_backend_choice():
    saved = json.loads(tiny.get_config("test").to_json())["model"]
    saved["rope"] = [["rope_theta", 10000.0], ["rope_type", "default"]]
    saved["local_rope"] = []
    cfg, overrides = effective_model(saved, tiny.get_config("extend").model)
    assert cfg.d_model == 64 and cfg.rope_for("global")["rope_type"] == "yarn"
    assert set(overrides) == {"rope", "max_position_embeddings"}
    _, overrides = effective_model(saved, defaults().model)
    assert overrides == {}
    assert attention_impl_for("xla", 8192, blockwise_above=2048) == "blockwise"
    assert attention_impl_for("xla", 1024, blockwise_above=2048) == "xla"
    assert attention_impl_for("cudnn", 8192, blockwise_above=2048) == "cudnn"
    assert attention_impl_for("auto", 8192, blockwise_above=2048) == "auto"
