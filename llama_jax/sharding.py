"""Meshes and the logical-axis rules that map parameter and activation axes onto them.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `tensor`
(Megatron-style model parallel). A rule maps a logical axis name to a mesh axis, a tuple of mesh axes,
or None (replicated). One table serves parameters and activations.
"""

from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations: the batch is split over every data-parallel axis; the residual stream's
    # features stay whole on each device (embed's fsdp split is for stored weights only).
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "cache_seq": None,
}


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules | None = None, mesh=None) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once per array (the first
    logical axis claiming it wins), and axes of size 1 in `mesh` are dropped."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1))
        used.update(keep)
        spec.append(keep[0] if len(keep) == 1 else (keep or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules: Rules | None = None) -> jax.Array:
    """Pin activation `x` to the sharding its logical `axes` imply under the mesh in context
    (`jax.set_mesh`); a no-op when there is none, so the model runs unchanged on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_specs(cfg, rules: Rules | None = None, mesh=None):
    """PartitionSpec for every parameter of `cfg`, in the params layout."""
    from llama_jax.model import logical_axes

    return jax.tree.map(lambda a: logical_to_spec(a, rules, mesh), logical_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """NamedSharding for every parameter of `cfg` on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, rules, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
