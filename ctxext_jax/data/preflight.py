"""Checks of the data a run will read, done before the first step: one named error instead of
a failure at the first evaluation, after the training work.

`preflight` opens both splits (an empty one is an error), reads a bounded sample of every file
or shard behind them (every document of a .txt / .jsonl file up to `SCAN_BYTES`; the first,
middle and last record of every array_record shard), and checks that the tokenizer loads and
fits the model's vocabulary. Text that is not valid UTF-8 is counted and reported, or refused
with `data.on_undecodable='refuse'`.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from ctxext_jax.data.config import FILES, TEXT_SOURCE, DataConfig
from ctxext_jax.data.sources import open_split, prepared_builder
from ctxext_jax.data.tasks import TaskVocab
from ctxext_jax.data.tokenizer import make_tokenizer
from ctxext_jax.errors import fail

BOM = "\ufeff"  # the byte order mark some editors start a UTF-8 file with: not text
SCAN_BYTES = 64 << 20  # per .txt / .jsonl file: parse every document in its first 64 MiB


def _check_tokenizer(cfg: DataConfig, vocab_size: int):
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
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    outside = {k: v for k, v in specials.items() if not 0 <= v < vocab_size}
    if outside:
        fail(
            "data.tokenizer",
            f"{cfg.tokenizer}: special token ids {outside} lie outside model.vocab_size="
            f"{vocab_size}; raise model.vocab_size or fix the tokenizer's special tokens.",
        )
    return tokenizer


def _scan_file(path: str, text_key: str) -> tuple[int, int, str | None]:
    """(documents read, documents with bytes that are not UTF-8, where the first is) of the
    first SCAN_BYTES of one .txt / .jsonl file; ConfigError for an unreadable file or a line
    that is not a JSON object with a string `text_key`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SCAN_BYTES)
    except OSError as e:
        fail("data.files", f"{path} cannot be read ({e.strerror}); fix its permissions or drop it.")
    if path.endswith(".txt"):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if len(raw) < SCAN_BYTES or e.start < len(raw) - 4:  # not a cut at the scan limit
                return 1, 1, f"{path} (byte {e.start})"
        return 1, 0, None
    read, bad, first_bad, offset = 0, 0, None, 0
    lines = raw.split(b"\n")
    if len(raw) == SCAN_BYTES:
        lines = lines[:-1]  # the last line may be cut by the scan limit
    for line in lines:
        if line.strip():
            read += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
                first_bad = first_bad or f"{path} (line at byte {offset})"
                text = line.decode("utf-8", errors="replace")
            if offset == 0:
                text = text.removeprefix(BOM)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                fail(
                    "data.files",
                    f"the line at byte {offset} of {path} is not valid JSON ({e.msg}); fix or "
                    "drop that line (a .jsonl file holds one JSON object per line).",
                )
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                fail(
                    "data.text_key",
                    f"{text_key!r}: the line at byte {offset} of {path} has no string field "
                    f"{text_key!r}; set data.text_key to the JSON key holding the text.",
                )
        offset += len(line) + 1
    return read, bad, first_bad


def _scan_shards(cfg: DataConfig, split: str) -> tuple[int, int, str | None]:
    """Reads the first, middle and last record of every array_record shard behind `split`."""
    from array_record.python.array_record_module import ArrayRecordReader

    builder = prepared_builder(cfg)
    try:
        instructions = builder.info.splits[split].file_instructions
    except Exception:  # open_split has already named a bad split
        return 0, 0, None
    read = bad = 0
    first_bad = None
    for instruction in instructions:
        path = os.fspath(instruction.filename)
        where = f"data.dataset={cfg.dataset!r}: shard {path}"
        if not os.path.isfile(path):
            fail("data.dataset", f"{where} is missing; re-run `tfds build {cfg.dataset}`.")
        try:
            reader = ArrayRecordReader(path)
            count = reader.num_records()
            picks = sorted({0, count // 2, count - 1}) if count else []
            records = reader.read(picks) if picks else []
            reader.close()
        except Exception as e:  # array_record raises RuntimeError and others
            fail(
                "data.dataset",
                f"{where} is damaged ({str(e).splitlines()[0][:200]}); delete the dataset's "
                f"folder and re-run `tfds build {cfg.dataset} --file_format=array_record`.",
            )
        read += len(records)
    return read, bad, first_bad


def preflight(cfg: DataConfig, *, vocab_size: int, hosts: int = 1) -> dict[str, Any]:
    """Raises ConfigError naming the key (or file) of the first problem; returns what was
    scanned: {"documents": n, "undecodable": n, "first_undecodable": where or None}."""
    if cfg.dataset == FILES and not any(
        p.endswith((".txt", ".jsonl")) and os.path.isfile(p)
        for p in glob.iglob(os.path.expanduser(cfg.files), recursive=True)
    ):
        fail("data.files", f"{cfg.files!r} matches no .txt or .jsonl file; fix the glob.")
    if cfg.data_dir and os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        fail("data.data_dir", f"{cfg.data_dir} exists and is not a directory.")
    tokenizer = _check_tokenizer(cfg, vocab_size)
    if len(cfg.source_names) > 1 or cfg.source_names[0] != TEXT_SOURCE:
        try:  # the tasks reserve ids of this tokenizer for their keys, values and markers
            TaskVocab.for_tokenizer(tokenizer, keys=cfg.task.keys, values=cfg.task.values)
        except ValueError as e:
            fail("data.task", str(e))
    opened = {}
    for split in dict.fromkeys((cfg.train_split, cfg.eval_split)):
        opened[split] = documents = open_split(cfg, split)[0]  # ValueError naming an empty one
        if split == cfg.train_split and len(documents) < hosts:
            fail(
                "data.train_split",
                f"{split!r} has {len(documents)} documents for {hosts} hosts; every host needs "
                "at least one: use fewer hosts or more data.",
            )
    report = {"documents": 0, "undecodable": 0, "first_undecodable": None}
    if cfg.dataset == FILES:
        paths = sorted(
            p for p in glob.glob(os.path.expanduser(cfg.files), recursive=True)
            if os.path.isfile(p) and p.endswith((".txt", ".jsonl"))
        )  # fmt: skip
        scans = [_scan_file(p, cfg.text_key) for p in paths]
    else:
        scans = [_scan_shards(cfg, s) for s in dict.fromkeys((cfg.train_split, cfg.eval_split))]
    for documents in opened.values():
        documents[0]  # noqa: B018  (one document through the reader: a wrong data.text_key)
    for read, bad, where in scans:
        report["documents"] += read
        report["undecodable"] += bad
        report["first_undecodable"] = report["first_undecodable"] or where
    if report["undecodable"] and cfg.on_undecodable == "refuse":
        fail(
            "data.on_undecodable",
            f"'refuse': {report['undecodable']} of {report['documents']} scanned documents hold "
            f"bytes that are not UTF-8, the first in {report['first_undecodable']}; fix or drop "
            "them, or set data.on_undecodable='count' to read them with U+FFFD replacements.",
        )
    return report
