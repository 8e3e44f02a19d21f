"""Grain pipeline: shard, shuffle, tokenize, split, pack and batch documents.

One document becomes `[bos] + tokens + [eos]`; its inputs are all but the last token and its
targets all but the first, so a target is always the next token of the same document. A
document longer than `seq_len` is cut into `seq_len` pieces; pieces and short documents are
packed first-fit into rows. Every row carries, per position:

  inputs      int32 [b, T]   token ids (pad_id on padding)
  targets     int32 [b, T]   next token of the same document (pad_id on padding)
  segment_ids int32 [b, T]   1, 2, ... per piece in the row, 0 on padding
  positions   int32 [b, T]   position within the piece, from 0; the continuation of a long
                             document restarts at 0 in its next row (rows never attend to
                             each other, so a piece is a document of its own to the model)
  loss_mask   float32 [b, T] 1 on scored tokens (all text tokens; a task's answers), 0 on
                             padding
  source_ids  int32 [b, T]   which source of `data.mixture` a token came from (its index in
                             sorted name order; 0 without a mixture)

Training order: documents are sharded by index across hosts (`[shard_index::shard_count]`),
shuffled with a seed that changes every epoch, repeated forever; pieces are shuffled again
within a window of about a million tokens so that a batch does not hold consecutive pieces
of one long file. Everything is deterministic given the seed, and the iterator's state is a
small JSON-serialisable dict (what `grain.checkpoint.CheckpointHandler` stores).

Mixtures (`data.mixture = {"text": 0.7, "kv": 0.3}`): every source yields pieces, Grain mixes
the piece streams by weight (weights are fractions of pieces) and the mixed stream is packed
as above. "text" is the configured dataset; any other name is a synthetic task of
`ctxext_jax.data.tasks`, whose pieces score only the answer tokens. Evaluation batches mix the
held-out side of every source the same way (held-out text, evaluation task instances).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from ctxext_jax.data import tasks
from ctxext_jax.data.config import TEXT_SOURCE, DataConfig
from ctxext_jax.data.pose import PoseConfig, pose_row
from ctxext_jax.data.sources import document_tokens, open_split
from ctxext_jax.data.tokenizer import make_tokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "source_ids")
# Corpus tokens kept as the haystack that task fillers are cut from.
_HAYSTACK_TOKENS = 1 << 18
# Pieces shuffled together: ~1M tokens regardless of seq_len (a few MB of int32 in memory).
_WINDOW_TOKENS = 1 << 20
# Rows packed at once; more bins leave less padding (first-fit emits all bins when a piece
# fits in none of them).
_MIN_PACKING_BINS = 64


class _Tokenize(grain.transforms.Map):
    """text -> {"inputs", "targets": int32 [N + 1], "loss_mask": float32 [N + 1] (ones)}."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        tokens = document_tokens(self._tokenizer, text)
        n = len(tokens) - 1
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": np.ones(n, np.float32)}


class _Tag(grain.transforms.Map):
    """Adds `source_ids` (int32 [n], this source's index) to a piece."""

    def __init__(self, source_id: int):
        self._source_id = source_id

    def map(self, piece: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(piece["inputs"])
        return {**piece, "source_ids": np.full(n, self._source_id, np.int32)}


class _SplitPieces(grain.experimental.FlatMapTransform):
    """A document -> consecutive pieces of at most seq_len tokens (the last may be shorter)."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len
        # Only MapDataset flat-maps need a bound; the IterDataset one takes any fan-out.
        self.max_fan_out = 1 << 30

    def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n, t = len(doc["inputs"]), self._seq_len
        return [{k: v[s : s + t] for k, v in doc.items()} for s in range(0, n, t)]


def _finalize(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["inputs_segment_ids"]
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": segment_ids,
        "positions": row["inputs_positions"],
        "loss_mask": row["loss_mask"] * (segment_ids > 0),
        "source_ids": row["source_ids"],
    }


def _text_pieces(documents: Sequence[str], tokenizer: Any, *, seq_len: int, seed: int,
                 shuffle: bool, num_epochs: int | None, shard_index: int, shard_count: int,
                 source_id: int = 0) -> grain.IterDataset:  # fmt: skip
    """Pieces of at most seq_len tokens of this host's documents, tagged with `source_id`."""
    ds = grain.MapDataset.source(documents)[shard_index::shard_count]
    num_documents = len(ds)
    if num_documents == 0:
        raise ValueError(
            f"host shard {shard_index} of {shard_count} holds no documents (the split has "
            f"{len(documents)}); use fewer hosts or a larger dataset."
        )
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
    it = grain.experimental.FlatMapIterDataset(it, _SplitPieces(seq_len))
    if shuffle:
        # A small corpus gets a window of a few epochs' documents, not a million tokens.
        window = max(16, min(_WINDOW_TOKENS // seq_len, 16 * num_documents))
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=window, seed=seed)
    return it.map(_Tag(source_id))


def _pack(pieces: grain.IterDataset, *, seq_len: int, seed: int, shuffle: bool, num_bins: int,
          pad: int) -> grain.IterDataset:  # fmt: skip
    """Pieces -> packed rows of `BATCH_KEYS` ([T] each)."""
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len, "source_ids": seq_len}
    rows = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct=lengths,
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
        padding_struct={"inputs": pad, "targets": pad, "loss_mask": 0.0, "source_ids": 0},
    )
    return rows.map(_finalize)


def packed_rows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    num_bins: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Rows of `BATCH_KEYS` ([T] each) from a random-access sequence of texts.

    num_epochs=None repeats forever (reshuffled every epoch when `shuffle`).
    """
    pieces = _text_pieces(
        documents, tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
    )  # fmt: skip
    return _pack(pieces, seq_len=seq_len, seed=seed, shuffle=shuffle, num_bins=num_bins,
                 pad=int(tokenizer.pad_id))  # fmt: skip


_HAYSTACKS: dict[tuple, np.ndarray] = {}


def task_haystack(cfg: DataConfig, split: str, tokenizer: Any) -> np.ndarray | None:
    """The filler tokens of `split` for the tasks (task symbols and specials removed); None
    for random filler. Read once per process."""
    if cfg.task.filler != "text":
        return None
    key = (cfg.dataset, cfg.data_dir, cfg.files, cfg.text_key, split, cfg.tokenizer, cfg.task)
    if key not in _HAYSTACKS:
        from ctxext_jax.evals.perplexity import token_stream

        documents, _ = open_split(cfg, split)
        stream = token_stream(
            (documents[i] for i in range(len(documents))), tokenizer, max_tokens=_HAYSTACK_TOKENS
        )
        vocab = tasks.TaskVocab.for_tokenizer(tokenizer, keys=cfg.task.keys, values=cfg.task.values)
        specials = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        _HAYSTACKS[key] = tasks.clean_haystack(stream, vocab, specials)
    return _HAYSTACKS[key]


def _task_pieces(source: Any, *, shard_index: int, shard_count: int,
                 source_id: int) -> grain.IterDataset:  # fmt: skip
    """An endless stream of a task's pieces; host h takes instances h, h + n, ..."""
    ds = grain.MapDataset.range(1 << 40)[shard_index::shard_count].map(source)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)).map(
        _Tag(source_id)
    )


def mixed_pieces(cfg: DataConfig, tokenizer: Any, *, split: str, seq_len: int, seed: int,
                 shuffle: bool, num_epochs: int | None, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:  # fmt: skip
    """The pieces of every source of `cfg.mixture` (or of the dataset alone), mixed by weight.
    `split` is the text split; the tasks take their training or evaluation instances to go
    with it."""
    if not cfg.mixture:
        documents, _ = open_split(cfg, split)
        return _text_pieces(
            documents, tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle,
            num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        )  # fmt: skip
    evaluation = split != cfg.train_split
    streams = []
    for source_id, name in enumerate(cfg.source_names):
        if name == TEXT_SOURCE:
            documents, _ = open_split(cfg, split)
            streams.append(
                _text_pieces(
                    documents,
                    tokenizer,
                    seq_len=seq_len,
                    seed=seed,
                    shuffle=shuffle,
                    num_epochs=num_epochs,
                    shard_index=shard_index,
                    shard_count=shard_count,
                    source_id=source_id,
                )  # fmt: skip
            )
            continue
        source = tasks.TaskSource(
            name, cfg.task, tokenizer, seq_len=seq_len, seed=seed, evaluation=evaluation,
            haystack=task_haystack(cfg, split, tokenizer),
        )  # fmt: skip
        streams.append(
            _task_pieces(
                source, shard_index=shard_index, shard_count=shard_count, source_id=source_id
            )  # fmt: skip
        )
    return grain.IterDataset.mix(streams, [w for _, w in cfg.mixture])


def train_iterator(
    cfg: DataConfig,
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    pose: PoseConfig | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator of this host's batches: dict of `BATCH_KEYS`, each [b, T] with
    b = global_batch_size // shard_count. `pose` with a target_length replaces the positions
    by PoSE's skipped ones (`data.pose`).

    Checkpoint with `it.get_state()` (a JSON-serialisable dict) and `it.set_state(state)` on a
    freshly built iterator with the same arguments, or with `grain.checkpoint.CheckpointHandler`.
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index={shard_index}, shard_count={shard_count}: need "
            "0 <= shard_index < shard_count (jax.process_index(), jax.process_count())."
        )
    if global_batch_size % shard_count:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {shard_count} hosts; "
            "make it a multiple of jax.process_count()."
        )
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be at least 2, e.g. 256.")
    batch = global_batch_size // shard_count
    tokenizer = make_tokenizer(cfg.tokenizer)
    pieces = mixed_pieces(
        cfg, tokenizer, split=cfg.train_split, seq_len=seq_len, seed=seed, shuffle=True,
        num_epochs=None, shard_index=shard_index, shard_count=shard_count,
    )  # fmt: skip
    rows = _pack(pieces, seq_len=seq_len, seed=seed, shuffle=True,
                 num_bins=max(batch, _MIN_PACKING_BINS), pad=int(tokenizer.pad_id))  # fmt: skip
    if pose is not None and pose.target_length:
        pose.check(seq_len)
        rows = rows.random_map(
            functools.partial(pose_row, target_length=pose.target_length, chunks=pose.chunks),
            seed=seed,
        )
    it = rows.batch(batch, drop_remainder=True)
    if cfg.num_workers:
        # Grain 0.2 reads an absl flag when it starts workers; a program that is not an absl
        # app has not parsed flags, so mark them parsed (defaults) as absl.app.run would.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(it)


def _pad_rows(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads a short final batch with empty rows (segment 0, loss_mask 0)."""
    missing = rows - len(batch["inputs"])
    out = {}
    for key, value in batch.items():
        fill = pad_id if key in ("inputs", "targets") else 0
        out[key] = np.concatenate([value, np.full((missing, *value.shape[1:]), fill, value.dtype)])
    return out


def eval_batches(
    cfg: DataConfig,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Held-out batches packed like training; the same batches every call. The documents are
    shuffled with a fixed seed, so the first `max_batches` batches are a fair sample of the
    whole split (not of its first files); with a mixture, the held-out side of every source
    is mixed by the training weights (then `max_batches` bounds the endless task streams).
    Without a mixture and with max_batches=None this is the whole split once. `batch_size` is
    this host's rows: global batches of batch_size * shard_count rows are cut into per-host
    slices, so every host yields the same number of batches. The last batch is padded with
    empty rows (loss_mask 0)."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size per host={batch_size} must be >= 1.")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index}, shard_count={shard_count}: need 0 <= i < n.")
    if cfg.mixture and max_batches is None:
        raise ValueError("eval batches of a data.mixture need max_batches (eval.batches).")
    tokenizer = make_tokenizer(cfg.tokenizer)
    global_rows = batch_size * shard_count
    pieces = mixed_pieces(
        cfg, tokenizer, split=cfg.eval_split, seq_len=seq_len, seed=0, shuffle=True,
        num_epochs=1,
    )  # fmt: skip
    bins = max(global_rows, _MIN_PACKING_BINS)
    rows = _pack(pieces, seq_len=seq_len, seed=0, shuffle=False, num_bins=bins,
                 pad=int(tokenizer.pad_id))  # fmt: skip
    mine = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    for i, batch in enumerate(rows.batch(global_rows, drop_remainder=False)):
        if max_batches is not None and i >= max_batches:
            return
        batch = _pad_rows(batch, global_rows, int(tokenizer.pad_id))
        yield {k: v[mine] for k, v in batch.items()}


def eval_documents(cfg: DataConfig, split: str | None = None) -> Iterator[str]:
    """Raw texts of `split` (default: the eval split) in dataset order, for long-context
    evaluation that needs whole documents."""
    documents, _ = open_split(cfg, split or cfg.eval_split)
    for i in range(len(documents)):
        yield documents[i]
