"""PoSE (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via Positional
Skip-wise Training"): train at the base length with position ids that skip, so that the
relative distances the model sees cover a target length it never holds in memory.

Each document piece of n tokens in a packed row is cut into `chunks` contiguous chunks at
random points; chunk j keeps its tokens' order and has its position ids shifted by a skip
s_j, with 0 <= s_0 <= s_1 <= ... <= target_length - n drawn uniformly (the reference code
draws the two offsets lt <= rt the same way), so the ids stay increasing, start anywhere in
[0, target_length - n] and end below target_length. Pieces are independent, so packing and
per-document positions are untouched: the skipped ids simply replace the row's `positions`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoseConfig:
    """target_length: the context the position ids cover (0 disables PoSE); chunks: pieces
    per document, each with its own skip (2 in the paper)."""

    target_length: int = 0
    chunks: int = 2

    def check(self, seq_len: int) -> None:
        if self.target_length and self.target_length < seq_len:
            raise ValueError(
                f"train.pose.target_length={self.target_length} must be >= data.seq_len "
                f"({seq_len}), e.g. 4 * seq_len; 0 disables PoSE."
            )
        if self.chunks < 1:
            raise ValueError(f"train.pose.chunks={self.chunks} must be >= 1 (2 in the paper).")

    @classmethod
    def from_config(cls, cfg) -> PoseConfig:
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        return cls(**values)


def pose_positions(positions: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator,
                   *, target_length: int, chunks: int) -> np.ndarray:  # fmt: skip
    """positions, segment_ids: int [T] of one packed row -> skipped positions int32 [T].

    Every segment's ids start at 0 and step by 1 (as the packer writes them); padding
    (segment 0) keeps its ids."""
    out = np.asarray(positions, np.int32).copy()
    for segment in np.unique(segment_ids[segment_ids > 0]):
        where = np.flatnonzero(segment_ids == segment)
        n = len(where)
        room = target_length - n
        if room <= 0:
            continue
        parts = min(chunks, n)
        cuts = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False)) if n > 1 else []
        skips = np.sort(rng.integers(0, room + 1, size=parts))
        shift = np.zeros(n, np.int32)
        for start, skip in zip(np.concatenate([[0], cuts]), skips, strict=True):
            shift[int(start) :] = skip
        out[where] = np.arange(n, dtype=np.int32) + shift
    return out


def pose_row(row: dict[str, np.ndarray], rng: np.random.Generator, *, target_length: int,
             chunks: int) -> dict[str, np.ndarray]:  # fmt: skip
    """A batch [b, T] (or a row [T]) with PoSE positions."""
    positions, segments = row["positions"], row["segment_ids"]
    if positions.ndim == 1:
        new = pose_positions(positions, segments, rng, target_length=target_length, chunks=chunks)
    else:
        new = np.stack(
            [
                pose_positions(p, s, rng, target_length=target_length, chunks=chunks)
                for p, s in zip(positions, segments, strict=True)
            ]
        )
    return {**row, "positions": new}
