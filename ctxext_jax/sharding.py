"""Meshes, logical-axis rules and sharding constraints.

Model code names logical axes only (`batch`, `embed`, `heads`, ...). A run's config maps each
logical axis to zero or more mesh axes (MaxText's `logical_axis_rules`); this module turns those
names into `PartitionSpec`s / `NamedSharding`s on a mesh built from the same config. With no mesh
active, `constrain` is the identity, so the model also runs unsharded on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis -> mesh axes. Parameters use `embed`/`heads`/`mlp`/`vocab`; activations use the
# `activation_*` names, so FSDP can shard a weight's embed dimension without sharding activations.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
    # KV caches (ctxext_jax.decode): [batch, cache slots, kv heads, head dim].
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", ("sequence",)),
    ("cache_kv_heads", ("tensor",)),
    ("cache_head_dim", ()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (one may be -1: the remaining devices) and the logical-axis rules."""

    shape: tuple[tuple[str, int], ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    @classmethod
    def from_config(cls, mesh_cfg) -> MeshConfig:
        shape = tuple((name, int(mesh_cfg.shape[name])) for name in MESH_AXES)
        return cls(shape=shape, rules=normalize_rules(mesh_cfg.rules))

    def resolved_shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 replaced; raises ValueError naming `mesh.shape` if they don't fit."""
        return resolve_mesh_shape(dict(self.shape), num_devices)


def normalize_rules(rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`[(logical, None | "axis" | ("a", "b")), ...]` -> `((logical, (mesh axes...)), ...)`."""
    out = []
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            mesh_axes = ()
        elif isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        out.append((str(logical), tuple(str(a) for a in mesh_axes)))
    return tuple(out)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    sizes = dict(shape)
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(
            f"mesh.shape: only one axis may be -1 (got {unknown}); give the others explicit sizes."
        )
    bad = {name: size for name, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"mesh.shape: axis sizes must be >= 1 or -1, got {bad}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape: the fixed axes {dict(shape)} use {known} devices, which does not "
                f"divide the {num_devices} devices present; choose sizes whose product divides it."
            )
        sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh.shape {dict(shape)} needs {known} devices but {num_devices} are present; "
            "set one axis to -1 to use the remaining devices."
        )
    return sizes


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, sequence), all `AxisType.Auto` (logical rules drive
    the shardings; `jax.make_mesh` would default to Explicit axes)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_config.resolved_shape(len(devices))
    axis_shape = tuple(sizes[name] for name in MESH_AXES)
    device_grid = np.asarray(devices).reshape(axis_shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_grid, MESH_AXES, axis_types=auto)


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Sequence[tuple[str, tuple[str, ...]]]
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        mesh_axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def logical_size(
    logical: str, rules: Sequence[tuple[str, tuple[str, ...]]], mesh_sizes: Mapping[str, int]
) -> int:
    """How many shards a dimension named `logical` is split into."""
    return math.prod(mesh_sizes[a] for a in dict(rules).get(logical, ()))


# ---------------------------------------------------------------------------------------------
# The active mesh and rules, for activation constraints inside model code.
# ---------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "ctxext_active_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, tuple[str, ...]]]) -> Iterator[None]:
    """Makes `constrain` shard activations on `mesh` with `rules` while tracing inside."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def under_mesh(fn, mesh: Mesh, rules):
    """`fn` with `use_mesh(mesh, rules)` active while it runs, i.e. while `jax.jit` traces it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_mesh(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; the identity when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(logical_axes, rules))
    )


def active_mesh() -> tuple[Mesh, tuple] | None:
    """The (mesh, rules) that `use_mesh` made active, or None."""
    return _ACTIVE.get()


def sequence_axis(mesh: Mesh, rules) -> tuple[str | None, int]:
    """(the mesh axis that shards `length`, its size): (None, 1) when lengths are unsharded.

    Context parallelism runs over exactly one mesh axis; a rule that maps `length` to several
    sharded axes is refused here, naming `mesh.rules`.
    """
    axes = [a for a in dict(rules).get("length", ()) if mesh.shape.get(a, 1) > 1]
    if len(axes) > 1:
        raise ValueError(
            f"mesh.rules: 'length' is mapped to several sharded mesh axes {axes}; context "
            "parallelism runs over one axis (the default rule maps it to 'sequence')."
        )
    return (axes[0], mesh.shape[axes[0]]) if axes else (None, 1)


def named_sharding(mesh: Mesh, logical_axes, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def tree_shardings(axes_tree, mesh: Mesh, rules):
    """A tree of logical-axes tuples -> the same tree of NamedShardings."""
    return jax.tree.map(
        lambda axes: named_sharding(mesh, axes, rules),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x),
    )
