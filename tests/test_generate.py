"""Generation against transformers' greedy `generate`, and the `ctxext_jax.generate` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_fixtures import ORIGINAL, make_model, make_tokenizer_files

from ctxext_jax import decode, hf
from ctxext_jax.config import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 24  # new tokens per prompt: the longest prompt + NEW goes past ORIGINAL and the windows
PROMPT_LENGTHS = (9, 45)

# (id, family, rope, HF config overrides, rope_decode)
CASES = [
    ("llama-yarn", "llama", "yarn", {}, "hf"),
    ("llama-dynamic", "llama", "dynamic", {}, "hf"),
    ("mistral-window", "mistral", "default", {"sliding_window": 12}, "hf"),
    ("qwen2-mixed", "qwen2", "linear",
     {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}, "hf"),
]  # fmt: skip


def torch_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate of one prompt (no padding): the new tokens, eos included
    when the model stops there."""
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def prompts_for(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_greedy_equals_transformers(tmp_path, case):
    """One batch of prompts of different lengths, decoded together, gives transformers'
    greedy tokens for each prompt generated alone, eos (id 2) stopping both."""
    name, family, rope, overrides, rope_decode = case
    torch_model = make_model(str(tmp_path), family, rope, **overrides)
    prompts = prompts_for(len(name))
    assert max(PROMPT_LENGTHS) + NEW > ORIGINAL
    expected = [torch_greedy(torch_model, p, NEW) for p in prompts]
    model = hf.from_pretrained(str(tmp_path))
    out = decode.generate(model, prompts, max_new_tokens=NEW, eos_id=2, rope_decode=rope_decode)
    assert out.new_ids == expected
    if family == "qwen2":
        assert model.config.layer_pattern == "GL" and model.config.window == 12
    if family == "mistral":
        assert set(model.config.layer_pattern) == {"L"}


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama HF folder with a tokenizer (vocab 100 < the model's 128)."""
    folder = str(tmp_path_factory.mktemp("llama"))
    make_model(folder, "llama", "default")
    make_tokenizer_files(folder)
    return folder


def run_cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("CTXEXT_TRACEBACK", None)
    result = subprocess.run(
        [sys.executable, "-m", "ctxext_jax.generate", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_jsonl_and_prompt(hf_folder, tmp_path):
    """JSONL in (a text line, an ids line, a blank line) -> JSONL out in order; --prompt prints
    the continuation of the same text, here on a sharded mesh (--config.mesh.* with the
    default config). The library's tokens are checked against transformers above."""
    from ctxext_jax.data import make_tokenizer

    tokenizer = make_tokenizer(f"hf:{hf_folder}")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"text": "abc de_f(x)"}\n\n{"ids": [5, 17, 99, 120, 3]}\n')
    out = tmp_path / "out.jsonl"
    run = run_cli(f"--checkpoint={hf_folder}", f"--prompts={prompts}", f"--output={out}",
                  "--max_new_tokens=6", "--ignore_eos", "--batch_size=1")  # fmt: skip
    assert "generate 100.0% | 2/2 prompts" in run.stderr and "wrote 2 generations" in run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    text_ids = [tokenizer.bos_id, *tokenizer.encode("abc de_f(x)")]
    assert records[0]["ids"] == text_ids and records[1]["ids"] == [5, 17, 99, 120, 3]
    assert all(len(r["new_ids"]) == 6 for r in records)
    assert records[0]["text"] == tokenizer.decode(records[0]["new_ids"])

    # The same prompt on a data x fsdp x tensor mesh gives the same continuation.
    mesh = [f"--config.mesh.shape.{axis}=2" for axis in ("data", "fsdp", "tensor")]
    shown = run_cli(f"--checkpoint={hf_folder}", "--prompt=abc de_f(x)", "--max_new_tokens=6",
                    "--ignore_eos", *mesh)  # fmt: skip
    assert shown.stdout.rstrip("\n") == records[0]["text"]


def test_cli_errors_are_one_line(hf_folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ids": [1, 2]}\n{"ids": [1, 2]\n')
    result = run_cli(f"--checkpoint={hf_folder}", f"--prompts={bad}", check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "line 2" in lines[0], lines


def test_input_errors_name_the_line(tmp_path):
    from ctxext_jax.data import ByteTokenizer
    from ctxext_jax.generate import check_fits, read_prompts

    tok = ByteTokenizer()
    path = tmp_path / "p.jsonl"

    def error_of(text, tokenizer=tok):
        path.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            read_prompts(str(path), tokenizer, 320)
        return str(e.value)

    assert "line 2" in error_of('{"text": "a"}\nnot json\n')
    assert "line 1" in error_of('{"text": ""}\n') and "empty" in error_of('{"text": ""}\n')
    assert "empty" in error_of('{"ids": []}\n')
    message = error_of('{"text": "ok"}\n{"ids": [3, 320]}\n')
    assert "line 2" in message and "320" in message and "[0, 320)" in message
    assert "needs a tokenizer" in error_of('{"text": "a"}\n', tokenizer=None)
    assert '"text" (a string) or "ids"' in error_of('{"prompt": "a"}\n')
    assert "integer" in error_of('{"ids": [1, "2"]}\n')
    assert "no prompts" in error_of("\n\n")
    with pytest.raises(FileNotFoundError, match="no file"):
        read_prompts(str(tmp_path / "absent.jsonl"), tok, 320)
    path.write_text('{"ids": [5]}\n\n{"text": "hi"}\n')
    assert read_prompts(str(path), tok, 320) == ([[5], [tok.bos_id, *tok.encode("hi")]], [1, 3])
    options = dict(capacity=40, cache="full", max_new_tokens=16)
    check_fits([[1] * 24], options, lambda i: f"prompt {i + 1}", global_layers=True)
    with pytest.raises(ValueError, match=r"prompt 2: .*--capacity=41"):
        check_fits([[1] * 24, [1] * 25], options, lambda i: f"prompt {i + 1}", global_layers=True)
    check_fits([[1] * 25], options, lambda i: "", global_layers=False)  # window layers only


# ------------------------------------------------------------------------ evaluate --decode
def test_generated_verdicts_equal_teacher_forcing(hf_folder, tmp_path):
    """Retrieval scored by real generation gives teacher forcing's verdicts on the same model:
    row by row, for the model's own greedy continuation (right), the same with its last token
    changed (wrong) and a prefix of it (right), three rows sharing one prompt and so one
    generation; then whole passkey and distractor-needle grids; then `evaluate --decode`."""
    from ctxext_jax.data import make_tokenizer
    from ctxext_jax.evals import EvalOptions
    from ctxext_jax.evals.retrieval import (
        exact_matches,
        generated_matches,
        needle_grid,
        passkey_grid,
    )
    from ctxext_jax.evals.scoring import make_scorer
    from ctxext_jax.evaluate import evaluate

    model = hf.from_pretrained(hf_folder)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, n).astype(np.int32) for n in (20, 33, 41)]

    def generator(batch, n):
        return decode.generate(model, [p.tolist() for p in batch], max_new_tokens=n,
                               ignore_eos=True).new_ids  # fmt: skip

    rows = []
    for prompt, greedy in zip(prompts, generator(prompts, 4), strict=True):
        greedy = np.asarray(greedy, np.int32)
        wrong = greedy.copy()
        wrong[-1] = (wrong[-1] + 1) % 128
        rows += [(prompt, greedy), (prompt, wrong), (prompt, greedy[:2])]
    expected = [True, False, True] * 3
    scorer = make_scorer(model.apply, model.params)
    assert exact_matches(scorer, rows, pad_id=0, batch_tokens=256).tolist() == expected
    assert generated_matches(generator, rows, batch_tokens=256).tolist() == expected

    tokenizer = make_tokenizer(f"hf:{hf_folder}")
    grid = dict(lengths=[192], depths=[0.0, 1.0], trials=1, seed=0, batch_tokens=1024)
    for way in (None, generator):
        passkey = passkey_grid(scorer, tokenizer, **grid, generator=way)
        needle = needle_grid(scorer, tokenizer, rng.integers(3, 100, 500), variant="distractor",
                             needles=2, **grid, generator=way)  # fmt: skip
        if way is None:
            forward = (passkey, needle)
    assert (passkey, needle) == forward

    options = EvalOptions(lengths=(192,), metrics=("passkey",), passkey_trials=1,
                          depths=(0.0, 1.0), batch_tokens=1024)  # fmt: skip
    results = evaluate(defaults(), hf_folder, str(tmp_path / "run"), options,
                       progress=False, generate=True)  # fmt: skip
    assert results["retrieval_scoring"].startswith("generation")
    assert results["passkey"] == {**forward[0], "lengths": [192]}
