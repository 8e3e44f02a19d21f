"""The data section of the run config as a small frozen dataclass (config flows one way)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ctxext_jax.data.tasks import TASKS, TaskConfig

# Built-in dataset names; anything else is looked up as a prepared TFDS dataset.
EMBEDDED = "embedded"
SYNTHETIC = "synthetic"
FILES = "files"
BUILTIN_DATASETS = (EMBEDDED, SYNTHETIC, FILES)
# The configured dataset's name inside data.mixture; other names are synthetic tasks.
TEXT_SOURCE = "text"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read, how to tokenize it and how long a packed row is.

    dataset: "embedded" (stdlib sources), "synthetic" (seeded key-recall documents), "files"
      (a glob of .txt / .jsonl files) or the name of a TFDS dataset prepared in `data_dir`
      in array_record format, optionally with config and version ("pg19", "pg19:0.1.1").
    data_dir: TFDS data_dir; "" uses TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    files: glob for dataset="files"; a .txt file is one document, a .jsonl line is one document.
    text_key: the feature (TFDS) or JSON key (.jsonl) holding the text.
    train_split / eval_split: TFDS split names (slicing such as "train[:90%]" works for TFDS).
    tokenizer: "bytes", "sentencepiece:/path/model" or "hf:/path/tokenizer.json or folder".
    seq_len: packed row length T.
    seed: shuffle seed.
    num_workers: Grain worker processes; 0 reads in-process.
    on_undecodable: text that is not valid UTF-8: "count" (read with U+FFFD replacements; the
      preflight scan reports how many) or "refuse" (an error naming the file).
    mixture: ((source, weight), ...) sorted by name; empty: the dataset alone. "text" is the
      dataset above, other names are tasks of `ctxext_jax.data.tasks` (passkey, multikey, kv,
      vartrack). Weights are relative (normalised), as fractions of pieces in the stream.
    task: the knobs of the synthetic tasks (`tasks.TaskConfig`).
    """

    dataset: str = EMBEDDED
    data_dir: str = ""
    files: str = ""
    text_key: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "bytes"
    seq_len: int = 256
    seed: int = 0
    num_workers: int = 0
    on_undecodable: str = "count"
    mixture: tuple[tuple[str, float], ...] = ()
    task: TaskConfig = TaskConfig()

    @property
    def source_names(self) -> tuple[str, ...]:
        """Source names in `source_ids` order."""
        return tuple(name for name, _ in self.mixture) or (TEXT_SOURCE,)

    def __post_init__(self):
        for name, weight in self.mixture:
            if name != TEXT_SOURCE and name not in TASKS:
                raise ValueError(
                    f"data.mixture: unknown source {name!r}; use {TEXT_SOURCE!r} (data.dataset) "
                    f"or a task of {TASKS}."
                )
            if not (isinstance(weight, int | float) and weight > 0):
                raise ValueError(f"data.mixture.{name}={weight!r}: weights must be > 0.")
        if not self.dataset:
            raise ValueError(
                "data.dataset is empty: set it to 'embedded', 'synthetic', 'files' or a TFDS "
                "dataset name such as 'pg19'."
            )
        if self.dataset == FILES and not self.files:
            raise ValueError(
                "data.files is empty but data.dataset='files': set data.files to a glob such "
                "as '/data/books/**/*.txt' or '/data/corpus/*.jsonl'."
            )
        if not self.text_key:
            raise ValueError(
                "data.text_key is empty: name the feature holding the text, e.g. 'text'."
            )
        for key in ("train_split", "eval_split"):
            if not getattr(self, key):
                raise ValueError(
                    f"data.{key} is empty: name a split such as 'train' or 'validation'."
                )
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be at least 2, e.g. 256.")
        if self.num_workers < 0:
            raise ValueError(
                f"data.num_workers={self.num_workers} must be >= 0 (0 reads in-process)."
            )
        if self.on_undecodable not in ("count", "refuse"):
            raise ValueError(
                f"data.on_undecodable={self.on_undecodable!r}: use 'count' (read with U+FFFD "
                "replacements) or 'refuse'."
            )
        kind = self.tokenizer.split(":", 1)[0]
        if kind not in ("bytes", "sentencepiece", "hf") or (
            kind != "bytes" and ":" not in self.tokenizer
        ):
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r} is not understood: use 'bytes', "
                "'sentencepiece:/path/to/model' or 'hf:/path/to/tokenizer.json' (or its folder)."
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> DataConfig:
        """Builds the dataclass from `cfg.data` (a ConfigDict or a plain mapping).

        Keys the dataclass does not know are ignored (they belong to other readers of the
        section); missing keys take the defaults above.
        """
        names = [field.name for field in dataclasses.fields(cls)]
        values = {name: cfg[name] for name in names if name in cfg}
        mixture = values.get("mixture") or {}
        mixture = mixture.to_dict() if hasattr(mixture, "to_dict") else dict(mixture)
        try:
            values["mixture"] = tuple(sorted((str(k), float(v)) for k, v in mixture.items()))
        except (TypeError, ValueError):
            raise ValueError(
                f"data.mixture={mixture!r}: give {{source: weight}} with numeric weights, e.g. "
                "{'text': 0.5, 'kv': 0.5}."
            ) from None
        values["task"] = TaskConfig.from_config(values.get("task") or {})
        return cls(**values)
