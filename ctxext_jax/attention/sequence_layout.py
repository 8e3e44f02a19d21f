"""Where each row of a sequence-sharded array lives: the context-parallel layouts.

Layouts (`model.context_parallel_balance`), for n devices on the `sequence` mesh axis, each
holding L = T / n rows:
- `none`: device d holds rows [d L, (d + 1) L).
- `zigzag`: the sequence is cut into 2n chunks of c = T / 2n rows and device d holds chunks d
  and 2n - 1 - d (the dual-chunk layout of EasyContext / Megatron), so every device does the
  same causal work. `to_layout` / `from_layout` move arrays between the natural order and this
  layout with two `ppermute`s (the decoder applies them once at its entry and undoes them
  before its head).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ctxext_jax import sharding

BALANCES = ("zigzag", "none")


def chunks_per_device(balance: str) -> int:
    return 2 if balance == "zigzag" else 1


def layout_starts(balance: str, n: int, T: int) -> list[list[int]]:
    """Per device, the global start row of each of its local chunks (each T / (m n) rows)."""
    if balance not in BALANCES:
        raise ValueError(f"context_parallel_balance must be one of {BALANCES}, got {balance!r}.")
    m = chunks_per_device(balance)
    c = T // (m * n)
    if balance == "zigzag":
        return [[d * c, (2 * n - 1 - d) * c] for d in range(n)]
    return [[d * c] for d in range(n)]


def layout_permutation(balance: str, n: int, T: int) -> np.ndarray:
    """Global row index held at each position of the device layout: x_layout = x[:, perm]."""
    c = T // (chunks_per_device(balance) * n)
    starts = layout_starts(balance, n, T)
    return np.concatenate([np.arange(s, s + c) for dev in starts for s in dev])


@dataclasses.dataclass(frozen=True)
class LayoutRows:
    """Layout row -> the global row it holds (the inverse view of `layout_permutation`), in
    arithmetic that works on numpy and jnp index arrays alike (splash evaluates its mask
    function on both: numpy for its tables, jnp inside the kernel)."""

    balance: str
    n: int
    T: int

    def __call__(self, r):
        if self.balance == "none":
            return r
        L = self.T // self.n
        c = L // 2
        d, local = r // L, r % L
        first = (local < c) * 1
        return first * (d * c + local) + (1 - first) * ((2 * self.n - 1 - d) * c + local - c)


def check_length(T: int, n: int, balance: str, *, key: str = "sequence length") -> None:
    parts = chunks_per_device(balance) * n
    if T % parts:
        raise ValueError(
            f"{key} {T} is not divisible by {parts} = "
            f"{'2 x ' if parts != n else ''}{n} sequence shards"
            f"{' (zigzag holds two chunks per device)' if parts != n else ''}; pick a length "
            "that divides, another mesh.shape.sequence, or model.context_parallel_balance='none'."
        )


def _zigzag_local(x, axis: str, n: int, inverse: bool):
    """Local [b, L, ...] rows from the natural layout to zigzag (or back, `inverse`).

    Natural: device d holds chunks (2d, 2d + 1). Zigzag: device e holds (e, 2n - 1 - e). Even
    chunks move along one permutation and odd chunks along another; device e's own chunk e is
    the even one when e is even.
    """
    home = [c if c < n else 2 * n - 1 - c for c in range(2 * n)]  # zigzag device of chunk c
    even = [(d, home[2 * d]) for d in range(n)]
    odd = [(d, home[2 * d + 1]) for d in range(n)]
    first, second = jnp.split(x, 2, axis=1)
    parity_even = jax.lax.axis_index(axis) % 2 == 0
    if not inverse:
        got_even = jax.lax.ppermute(first, axis, even)
        got_odd = jax.lax.ppermute(second, axis, odd)
        slot0 = jnp.where(parity_even, got_even, got_odd)
        slot1 = jnp.where(parity_even, got_odd, got_even)
        return jnp.concatenate([slot0, slot1], axis=1)
    even_chunk = jnp.where(parity_even, first, second)
    odd_chunk = jnp.where(parity_even, second, first)
    first = jax.lax.ppermute(even_chunk, axis, [(b, a) for a, b in even])
    second = jax.lax.ppermute(odd_chunk, axis, [(b, a) for a, b in odd])
    return jnp.concatenate([first, second], axis=1)


def _relayout(x, logical_axes, *, inverse: bool):
    active = sharding.active_mesh()
    if active is None:
        return x
    mesh, rules = active
    axis, n = sharding.sequence_axis(mesh, rules)
    if n == 1:
        return x
    check_length(x.shape[1], n, "zigzag")
    spec = sharding.logical_to_spec(logical_axes, rules)
    fn = functools.partial(_zigzag_local, axis=axis, n=n, inverse=inverse)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def to_layout(x, logical_axes):
    """x [B, T, ...] in natural row order -> the zigzag device layout on the active mesh (the
    identity without a sequence-sharded mesh). `logical_axes` name x's dims (batch, length...)."""
    return _relayout(x, logical_axes, inverse=False)


def from_layout(x, logical_axes):
    """The inverse of `to_layout`."""
    return _relayout(x, logical_axes, inverse=True)


def shard_count() -> int:
    """How many devices share the sequence on the active mesh (1: no context parallelism)."""
    active = sharding.active_mesh()
    if active is None:
        return 1
    return sharding.sequence_axis(*active)[1]
