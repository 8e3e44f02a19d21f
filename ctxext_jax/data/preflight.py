"""Checks of the data a run will read, done before the first step: one named error instead of
a failure at the first evaluation, after the training work."""

from __future__ import annotations

import glob
import os

from ctxext_jax.data.config import FILES, DataConfig
from ctxext_jax.data.tokenizer import make_tokenizer
from ctxext_jax.errors import fail


def preflight(cfg: DataConfig, *, vocab_size: int) -> None:
    """Raises ConfigError naming the key (or file) of the first problem: a glob that matches
    nothing, a data_dir that is a file, a tokenizer that does not load or does not fit the
    model's vocabulary."""
    if cfg.dataset == FILES and not any(
        p.endswith((".txt", ".jsonl")) and os.path.isfile(p)
        for p in glob.iglob(os.path.expanduser(cfg.files), recursive=True)
    ):
        fail("data.files", f"{cfg.files!r} matches no .txt or .jsonl file; fix the glob.")
    if cfg.data_dir and os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        fail("data.data_dir", f"{cfg.data_dir} exists and is not a directory.")
    try:
        tokenizer = make_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        fail("data.tokenizer", str(e))
    if tokenizer.vocab_size > vocab_size:
        fail(
            "model.vocab_size",
            f"{vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"({cfg.tokenizer}); raise it to at least {tokenizer.vocab_size}.",
        )
