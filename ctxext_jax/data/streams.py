"""The global training batch, the same for any number of hosts, each host reading only its part.

The global batch of B rows is cut into S streams (S = the largest divisor of B up to
`MAX_STREAMS`): stream s packs the documents `[s::S]` into its own rows, and always fills
rows s·B/S ... (s+1)·B/S - 1 of every global batch. Host p of P owns the streams whose rows
land on its devices (P must divide S), so it reads only those documents, and the global batch
and its order depend on B and the seed alone: 1, 2 or 16 hosts train on the same batches.

Each stream's iterator state is checkpointed in a file of its own (`stream_<s>-of-<S>.json` in
the step's `data` item), so a checkpoint written by P hosts resumes on any host count that
divides S.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ctxext_jax.data.config import DataConfig
from ctxext_jax.data.pipeline import train_iterator

# Streams are whole Grain pipelines (a shuffle window, packing bins and read threads each).
MAX_STREAMS = 64


def stream_count(global_batch_size: int) -> int:
    """S: the largest divisor of the global batch that is at most MAX_STREAMS."""
    return max(d for d in range(1, min(global_batch_size, MAX_STREAMS) + 1)
               if global_batch_size % d == 0)  # fmt: skip


class GlobalBatchIterator:
    """This host's rows of the global batch: its streams' rows, concatenated in stream order."""

    def __init__(self, streams: dict[int, Any], num_streams: int):
        self.streams, self.num_streams = streams, num_streams

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.streams[s]) for s in sorted(self.streams)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {str(s): it.get_state() for s, it in self.streams.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        for s, it in self.streams.items():
            it.set_state(state[str(s)])


def global_train_iterator(
    cfg: DataConfig,
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    **kwargs,
) -> GlobalBatchIterator:
    """Infinite iterator of this host's rows of each global batch, [B / P, T] per key.

    kwargs go to `pipeline.train_iterator` (each stream is one of its shards)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count}: need 0 <= index < count.")
    if global_batch_size % process_count:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {process_count} "
            "processes; make it a multiple of jax.process_count()."
        )
    num_streams = stream_count(global_batch_size)
    if num_streams % process_count:
        raise ValueError(
            f"train.batch_size={global_batch_size} is read as {num_streams} data streams, which "
            f"the {process_count} processes cannot share evenly; use a batch size whose largest "
            f"divisor up to {MAX_STREAMS} is a multiple of {process_count} (e.g. "
            f"{process_count * (MAX_STREAMS // process_count or 1)})."
        )
    per_host = num_streams // process_count
    # Grain worker processes are shared out between this host's streams.
    cfg = dataclasses.replace(cfg, num_workers=cfg.num_workers // per_host)
    mine = range(process_index * per_host, (process_index + 1) * per_host)
    streams = {
        s: train_iterator(
            cfg,
            global_batch_size=global_batch_size,
            seq_len=seq_len,
            seed=seed,
            shard_index=s,
            shard_count=num_streams,
            **kwargs,
        )  # fmt: skip
        for s in mine
    }
    return GlobalBatchIterator(streams, num_streams)


class StreamCheckpointHandler(grain.checkpoint.CheckpointHandler):
    """Orbax handler for the `data` item: one JSON file per stream, written by its host."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None):
        it = item or args.item
        for s, state in it.get_state().items():
            (directory / f"stream_{s}-of-{it.num_streams}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None):
        it = item or args.item
        states = {}
        for s in it.streams:
            path = directory / f"stream_{s}-of-{it.num_streams}.json"
            if not path.exists():
                saved = sorted(p.name for p in directory.glob("*.json"))[:3]
                raise ValueError(
                    f"{path.name} is missing from {directory} (it holds {saved}): the data "
                    f"state was saved for another train.batch_size (this run reads "
                    f"{it.num_streams} streams) or by an older version; resume with the "
                    "batch size it was saved with."
                )
            states[str(s)] = json.loads(path.read_text())
        it.set_state(states)
        for stream in it.streams.values():
            if hasattr(stream, "start_prefetch"):
                stream.start_prefetch()
        return it


@ocp.args.register_with_handler(StreamCheckpointHandler, for_save=True)
@dataclasses.dataclass
class StreamSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(StreamCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class StreamRestore(ocp.args.CheckpointArgs):
    item: Any
