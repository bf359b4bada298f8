"""The one sharding module: the device mesh and the table mapping logical array axes to mesh axes.

Layers only name logical axes (`("batch", "seq", "act_embed")`); `RULES` says where each lives:
- parameters are FSDP-sharded over (fsdp, sp) on their model dimension ("embed") and tensor-parallel over tp on
  heads / MLP / vocabulary; a layer gathers the FSDP part just before use (`gather_param`);
- activations shard the batch over (dp, fsdp), the sequence over sp, heads / MLP / vocabulary over tp, and the
  residual stream's hidden dimension over tp (it is the one activation kept for every layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lvm.config import MESH_AXES, MeshConfig

LogicalAxes = tuple[str | None, ...]

# logical axis -> mesh axes it is split over (empty: replicated)
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),
    "embed": ("fsdp", "sp"),
    "vocab": ("tp",),
    "heads": ("tp",),
    "kv_heads": ("tp",),
    "head_dim": (),
    "mlp": ("tp",),
    "norm": (),
    # activations
    "batch": ("dp", "fsdp"),
    "seq": ("sp",),
    "act_embed": ("tp",),
    "act_heads": ("tp",),
    "act_kv_heads": ("tp",),
    "act_mlp": ("tp",),
    "act_vocab": ("tp",),
}

# parameter axes that are sharded for storage only (FSDP) and gathered before each use
FSDP_AXES = ("embed",)

# activation layouts used across the model, by name
TOKENS: LogicalAxes = ("batch", "seq")
RESIDUAL: LogicalAxes = ("batch", "seq", "act_embed")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over axes (dp, fsdp, tp, sp) with classic (Auto) axis types; -1 absorbs the remaining devices.

    Where the physical topology has no axis of a requested size (e.g. tp=16 on a TPU v4 4x4x8 slice), the
    mesh splits physical axes instead of failing (`allow_split_physical_axes`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices)).sizes()
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def logical_spec(axes: LogicalAxes) -> P:
    """PartitionSpec of an array whose dimensions carry the logical names `axes` (None: replicated)."""
    parts = []
    for name in axes:
        if name is None:
            parts.append(None)
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to lvm.sharding.RULES")
        mesh_axes = RULES[name]
        parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*parts)


def logical_sharding(mesh: Mesh, axes: LogicalAxes) -> NamedSharding:
    """NamedSharding of an array with logical axes `axes` on `mesh`."""
    return NamedSharding(mesh, logical_spec(axes))


def with_logical_constraint(x: jax.Array, axes: LogicalAxes, mesh: Mesh) -> jax.Array:
    """Constrain `x` (inside jit) to the sharding of its logical axes."""
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes))


def gather_param(x: jax.Array, axes: LogicalAxes, mesh: Mesh) -> jax.Array:
    """A parameter in its compute sharding: FSDP axes gathered, tensor-parallel axes kept."""
    return with_logical_constraint(x, tuple(None if a in FSDP_AXES else a for a in axes), mesh)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, axes_tree):
    """Map a tree whose leaves are logical-axes tuples to a tree of NamedShardings."""
    return jax.tree.map(lambda axes: logical_sharding(mesh, axes), axes_tree, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh` (scalars, metrics)."""
    return NamedSharding(mesh, P())
