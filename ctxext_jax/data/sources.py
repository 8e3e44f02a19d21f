"""Random-access document sources: a split of a dataset as `len()` + `[i] -> str`.

TFDS datasets (the embedded builders or any dataset the user prepared in array_record format)
are read through `builder.as_data_source` (what `tfds.data_source` returns); a glob of local
.txt / .jsonl files is indexed in memory (path, byte offset, length per document) and read on
demand, so Grain can shuffle and shard any of them by index.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctxext_jax.data.config import EMBEDDED, FILES, SYNTHETIC, DataConfig
from ctxext_jax.data.splits import split_of


class TextSource:
    """Wraps a TFDS data source, keeping only the text feature, decoded to str."""

    def __init__(self, records: Any, text_key: str, *, where: str, strict: bool = False):
        self._records = records
        self._text_key = text_key
        self._where = where
        self._errors = "strict" if strict else "replace"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        try:
            record = self._records[int(index)]
        except Exception as e:  # array_record raises RuntimeError and others for a bad shard
            raise ValueError(
                f"{self._where}: record {index} cannot be read ({str(e).splitlines()[0][:200]}); "
                "a shard is damaged: delete the dataset's folder and prepare it again."
            ) from None
        if self._text_key not in record:
            raise ValueError(
                f"data.text_key={self._text_key!r} is not a feature of {self._where}; "
                f"its features are {sorted(record)}."
            )
        text = record[self._text_key]
        if not isinstance(text, bytes):
            return str(text)
        try:
            return text.decode("utf-8", errors=self._errors)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"data.on_undecodable='refuse': record {index} of {self._where} is not UTF-8 "
                f"(byte {e.start}); set data.on_undecodable='count' to read it with U+FFFD."
            ) from None

    def __repr__(self) -> str:
        return f"TextSource({self._where}, key={self._text_key!r}, n={len(self)})"


class FilesSource:
    """Documents from local files: a whole .txt file, or one JSON object per .jsonl line.

    documents: sequence of (path, byte offset, byte length, is_jsonl).
    """

    def __init__(self, documents: Sequence[tuple[str, int, int, bool]], text_key: str, *,
                 strict: bool = False):  # fmt: skip
        self._documents = list(documents)
        self._text_key = text_key
        self._errors = "strict" if strict else "replace"

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index: int) -> str:
        path, offset, length, is_jsonl = self._documents[int(index)]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
        except OSError as e:
            raise ValueError(
                f"data.files: {path} cannot be read any more ({e.strerror}); restore it, or "
                "drop it from the glob and resume."
            ) from None
        try:
            text = raw.decode("utf-8", errors=self._errors)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"data.on_undecodable='refuse': byte {offset + e.start} of {path} is not UTF-8; "
                "fix the file or set data.on_undecodable='count' to read it with U+FFFD."
            ) from None
        if offset == 0:
            text = text.removeprefix("\ufeff")  # a byte order mark is not text
        if not is_jsonl:
            return text
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"data.files: the line at byte {offset} of {path} is not valid JSON ({e}); fix "
                "or drop that line (a .jsonl file holds one JSON object per line)."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(self._text_key), str):
            raise ValueError(
                f"data.text_key={self._text_key!r}: line at byte {offset} of {path} has no string "
                f"field {self._text_key!r}; set data.text_key to the JSON key holding the text."
            )
        return record[self._text_key]

    def __repr__(self) -> str:
        return f"FilesSource(n={len(self)})"


def _index_files(pattern: str) -> list[tuple[str, int, int, bool, str]]:
    """(path, offset, length, is_jsonl, split key) for every document the glob names."""
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    paths = [p for p in paths if p.endswith((".txt", ".jsonl"))]
    if not paths:
        raise ValueError(
            f"data.files={pattern!r} matches no .txt or .jsonl file; give a glob such as "
            "'/data/books/**/*.txt' or '/data/c4/*.jsonl'."
        )
    documents = []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    for path in paths:
        rel = os.path.relpath(os.path.abspath(path), root)
        if path.endswith(".txt"):
            size = os.path.getsize(path)
            if size:
                documents.append((path, 0, size, False, rel))
            continue
        offset = 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f):
                if line.strip():
                    documents.append((path, offset, len(line), True, f"{rel}:{line_no}"))
                offset += len(line)
    if not documents:
        raise ValueError(
            f"data.files={pattern!r} matches {len(paths)} files but they hold no text (empty "
            "files and blank .jsonl lines are skipped); point it at non-empty documents."
        )
    return documents


def files_split(pattern: str, text_key: str, split: str, *, key: str = "split",
                strict: bool = False) -> FilesSource:  # fmt: skip
    """The "train" or "validation" documents of a glob, split by a hash of path(:line)."""
    if split not in ("train", "validation"):
        raise ValueError(
            f"{key}={split!r} is not a split of data.dataset='files': use 'train' or "
            "'validation' (about 5% of the documents, chosen by a hash of their path and "
            "line, are validation)."
        )
    documents = [d[:4] for d in _index_files(pattern) if split_of(d[4]) == split]
    return FilesSource(documents, text_key, strict=strict)


def prepared_builder(cfg: DataConfig):
    """The embedded / synthetic builder, prepared into data_dir on first use, or a TFDS
    dataset the user prepared (never downloaded here: pg19 alone is 11 GB)."""
    import tensorflow_datasets as tfds

    from ctxext_jax.data import builders

    if cfg.dataset in (EMBEDDED, SYNTHETIC):
        cls = builders.CtxextEmbedded if cfg.dataset == EMBEDDED else builders.CtxextSynthetic
        builder = cls(data_dir=cfg.data_dir or None, file_format="array_record")
        try:
            builder.download_and_prepare()
        except OSError:
            # Another host of the same job on a shared disk renamed its copy into place first.
            builder = cls(data_dir=cfg.data_dir or None, file_format="array_record")
            if not builder.is_prepared():
                raise
        return builder
    where = f"data.dataset={cfg.dataset!r} in data.data_dir={cfg.data_dir or '(TFDS default)'!r}"
    fix = (
        f"prepare it first with `tfds build {cfg.dataset} --file_format=array_record"
        + (f" --data_dir={cfg.data_dir}`" if cfg.data_dir else "`")
        + " (a tfrecord copy converts with `tfds convert_format`), or set data.dataset to "
        "'embedded', 'synthetic', 'files' or another prepared TFDS name."
    )
    try:
        builder = tfds.builder(cfg.dataset, data_dir=cfg.data_dir or None)
    except Exception as e:  # TFDS raises several types, with its whole catalogue attached.
        raise ValueError(f"{where} is neither a TFDS dataset name nor prepared there; {fix}") from e
    if not builder.is_prepared():
        raise ValueError(f"{where} is not prepared; {fix}")
    return builder


def _tfds_split(cfg: DataConfig, split: str) -> tuple[TextSource, dict]:
    builder = prepared_builder(cfg)
    where = f"data.dataset={cfg.dataset!r} ({builder.info.full_name})"
    try:
        records = builder.as_data_source(split=split)
    except Exception as e:  # An unknown split or a tfrecord-only copy.
        raise ValueError(
            f"{where}: cannot open split {split!r} for random access ({e}); set "
            f"data.train_split / data.eval_split to one of {sorted(builder.info.splits)} "
            "(slices like 'train[:5%]' work) and make sure the files are array_record."
        ) from e
    text_key = "text" if cfg.dataset in (EMBEDDED, SYNTHETIC) else cfg.text_key
    info = {
        "name": builder.info.full_name,
        "description": builder.info.description,
        "provenance": dict(builder.info.metadata or {}),
        "data_dir": str(builder.data_dir),
    }
    strict = cfg.on_undecodable == "refuse"
    return TextSource(records, text_key, where=where, strict=strict), info


def open_split(cfg: DataConfig, split: str) -> tuple[Sequence[str], dict]:
    """(documents of `split`, description) for any configured dataset.

    Raises ValueError naming the config key for an unknown dataset, an unmatched glob or an
    empty split.
    """
    key = {cfg.eval_split: "data.eval_split", cfg.train_split: "data.train_split"}.get(
        split, "split"
    )
    if cfg.dataset == FILES:
        source = files_split(
            cfg.files, cfg.text_key, split, key=key, strict=cfg.on_undecodable == "refuse"
        )
        info = {"name": "files", "files": cfg.files}
    else:
        source, info = _tfds_split(cfg, split)
    if len(source) == 0:
        more = " or add more files (about 5% become validation)" if cfg.dataset == FILES else ""
        raise ValueError(
            f"{key}={split!r} of data.dataset={cfg.dataset!r} has no documents; choose a "
            f"split that has some{more}."
        )
    return source, info


def document_tokens(tokenizer: Any, text: str) -> np.ndarray:
    """[bos] + tokens + [eos] as int32 [N + 2]."""
    body = tokenizer.encode_array(text)
    return np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int32)
