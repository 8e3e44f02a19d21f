"""One description of the attention pattern, consumed by every kernel.

A `Mask` says which (query, key) pairs may attend, in terms of *positions* and *segment ids*:

- causal:  k_pos <= q_pos
- window w (Mistral / Hugging Face convention): a query sees the w most recent keys, itself
  included, i.e. q_pos - k_pos < w (non-causal: |q_pos - k_pos| < w);
- chunk c (Llama 4): q_pos // c == k_pos // c;
- sinks n (StreamingLLM): the first n positions of each document stay visible, i.e. k_pos < n is
  allowed in addition to the window / chunk (still causal and within the same segment);
- segments (packing): attention only between equal segment ids.

Positions default to `arange(T) + q_offset` for queries and `arange(S)` for keys (decoding T new
tokens against a cache of S keys uses `q_offset = S - T`). Packed batches pass per-document
positions that restart at 0 in each document; the kernels rely on the packing invariant that,
within one document, (row index - position) is the same constant for queries and keys, so that
position distances equal index distances there (see `index_aligned`).

`Mask.dense` is the one definition of the pattern; every kernel is tested against it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Attention pattern: static fields describe the pattern, array fields the batch.

    q_segment_ids: [B, T] int, kv_segment_ids: [B, S] int (both or neither).
    q_positions: [B, T] int, kv_positions: [B, S] int (either may be None: default arange).
    """

    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    chunk: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    sinks: int = dataclasses.field(default=0, metadata=dict(static=True))
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    q_positions: Array | None = None
    kv_positions: Array | None = None
    q_offset: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self):
        # Only static fields are checked: pytree unflattening rebuilds the object with
        # placeholder leaves.
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"Mask.window must be a positive int or None, got {self.window!r}.")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"Mask.chunk must be a positive int or None, got {self.chunk!r}.")
        if self.window is not None and self.chunk is not None:
            raise ValueError(
                "Mask.window and Mask.chunk cannot be combined; pick one per layer "
                "(interleave windowed and chunked layers instead)."
            )
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"Mask.sinks must be an int >= 0, got {self.sinks!r}.")
        if not isinstance(self.q_offset, int):
            raise ValueError(
                f"Mask.q_offset must be a static int, got {type(self.q_offset).__name__}; "
                "pass traced offsets as q_positions instead."
            )

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None or self.kv_segment_ids is not None

    @property
    def default_positions(self) -> bool:
        return self.q_positions is None and self.kv_positions is None

    def index_aligned(self, T: int, S: int) -> bool:
        """Whether q_pos - k_pos == q_idx - k_idx + q_offset for every pair that may attend.

        True for default positions, and for self-attention (T == S) where the same positions
        array is given for queries and keys (packing: positions restart per document and segment
        ids separate documents). Kernels that skip blocks or use index-based masks need this;
        build the Mask inside the jitted function with one positions array for both sides.
        """
        if self.default_positions:
            return True
        return T == S and self.q_offset == 0 and self.q_positions is self.kv_positions

    def validate(self, B: int, T: int, S: int) -> None:
        """Checks array fields against q [B, T, ...] and k [B, S, ...]; raises ValueError."""
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError(
                "Mask.q_segment_ids and Mask.kv_segment_ids must be given together "
                "(pass the same array twice for self-attention)."
            )
        for name, arr, L in (
            ("q_segment_ids", self.q_segment_ids, T),
            ("kv_segment_ids", self.kv_segment_ids, S),
            ("q_positions", self.q_positions, T),
            ("kv_positions", self.kv_positions, S),
        ):
            if arr is None:
                continue
            if arr.ndim != 2 or arr.shape[1] != L or arr.shape[0] not in (1, B):
                raise ValueError(
                    f"Mask.{name} must have shape [B or 1, {L}] = [{B} or 1, {L}], "
                    f"got {tuple(arr.shape)}."
                )
            if not jnp.issubdtype(arr.dtype, jnp.integer):
                raise ValueError(f"Mask.{name} must be an integer array, got {arr.dtype}.")

    def positions(self, T: int, S: int) -> tuple[Array, Array]:
        """Returns q_pos [B or 1, T] and kv_pos [B or 1, S] as int32."""
        if self.q_positions is None:
            q_pos = (jnp.arange(T, dtype=jnp.int32) + self.q_offset)[None]
        else:
            q_pos = self.q_positions.astype(jnp.int32)
        if self.kv_positions is None:
            kv_pos = jnp.arange(S, dtype=jnp.int32)[None]
        else:
            kv_pos = self.kv_positions.astype(jnp.int32)
        return q_pos, kv_pos

    def allowed(self, q_pos, k_pos, q_seg=None, k_seg=None):
        """The pattern on broadcastable position / segment arrays (jnp or numpy): bool."""
        # Non-causal starts from an all-true array of the broadcast shape (works for numpy and
        # jnp alike, so splash can evaluate the same function inside its kernel).
        keep = (k_pos <= q_pos) if self.causal else (k_pos - q_pos == k_pos - q_pos)
        if q_seg is not None:
            keep = keep & (q_seg == k_seg)
        local = keep
        if self.window is not None:
            dist = (q_pos - k_pos) if self.causal else abs(q_pos - k_pos)
            local = local & (dist < self.window)
        if self.chunk is not None:
            local = local & (q_pos // self.chunk == k_pos // self.chunk)
        if self.sinks and (self.window is not None or self.chunk is not None):
            local = local | (keep & (k_pos < self.sinks))
        return local

    def dense(self, T: int, S: int) -> Array:
        """The pattern as an explicit boolean matrix: [B or 1, T, S]."""
        q_pos, kv_pos = self.positions(T, S)
        q_seg = k_seg = None
        if self.has_segments:
            q_seg = self.q_segment_ids[:, :, None]
            k_seg = self.kv_segment_ids[:, None, :]
        keep = self.allowed(q_pos[:, :, None], kv_pos[:, None, :], q_seg, k_seg)
        return jnp.broadcast_to(keep, jnp.broadcast_shapes(q_pos[:, :, None].shape, keep.shape))

    def key_intervals(self, q_lo: int, q_hi: int, T: int, S: int) -> list[tuple[int, int]]:
        """Static key-index intervals [lo, hi) that query rows [q_lo, q_hi) may attend to.

        Everything outside them is masked for any segment ids, so kernels may skip it. Without
        `index_aligned` positions no static bound holds and the whole key range is returned.
        """
        if not self.index_aligned(T, S):
            return [(0, S)]
        d_lo = q_lo + self.q_offset  # smallest query position, in key-index units
        d_hi = q_hi - 1 + self.q_offset
        lo, hi = 0, S
        if self.causal:
            hi = min(hi, d_hi + 1)
        causal_hi = hi
        if self.window is not None:
            lo = max(lo, d_lo - self.window + 1)
            if not self.causal:
                hi = min(hi, d_hi + self.window)
        if self.chunk is not None:
            # Same chunk implies |q_pos - k_pos| < c; with default positions the exact chunk
            # edges are known, with per-document positions only the distance bound holds.
            if self.default_positions:
                lo = max(lo, (d_lo // self.chunk) * self.chunk)
                hi = min(hi, (d_hi // self.chunk + 1) * self.chunk)
            else:
                lo = max(lo, d_lo - self.chunk + 1)
                hi = min(hi, d_hi + self.chunk)
        intervals = [(lo, hi)] if lo < hi else []
        if self.sinks and (self.window is not None or self.chunk is not None):
            # Default positions: the sinks are key rows [0, n). Per-document positions: each
            # document's sinks sit at an unknown row before the query, so keep the causal range.
            sink_hi = min(self.sinks, causal_hi) if self.default_positions else causal_hi
            if sink_hi > 0:
                if intervals and intervals[0][0] <= sink_hi:
                    intervals = [(0, max(sink_hi, intervals[0][1]))]
                else:
                    intervals = [(0, sink_hi)] + intervals
        return intervals
