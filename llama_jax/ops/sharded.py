"""Running a Pallas attention kernel on each device's shard of a mesh.

A Pallas call is opaque to XLA's partitioner, so under a mesh the attention kernels run inside
`shard_map`: each device takes its rows of the batch (split over the mesh's batch axes that divide it)
and its heads (split over the heads axis when it divides both heads and kv_heads; otherwise every
device takes all heads) and runs the kernel on them alone. Attention mixes neither examples nor kv
groups, so no collective is needed.

    out = per_shard(kernel, q, k, v, row_args)   # row_args: arrays [batch, seq], split like the batch
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes the model's rules split the batch over (sharding.py)
HEAD_AXIS = "tensor"


def shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` without replication checks (a Pallas call is opaque to them); older JAX has it
    only as jax.experimental.shard_map.shard_map, whose flag is check_rep."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7 (the GPU machine's image may be)
    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def batch_spec(batch: int, mesh, batch_axes: Sequence[str] = BATCH_AXES):
    """The mesh's batch axes (in order) while their product divides the batch: a batch that an axis
    does not divide is replicated along it and the axes after it."""
    axes, size = [], 1
    for name in batch_axes:
        n = mesh.shape.get(name, 1)
        if n == 1:
            continue
        if batch % (size * n):
            break
        axes.append(name)
        size *= n
    return tuple(axes) if axes else None


def context_mesh():
    """The mesh that the code being traced runs under (jax.set_mesh / use_abstract_mesh), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def per_shard(kernel: Callable, q, k, v, row_args=(), *, mesh=None, batch_axes: Sequence[str] = BATCH_AXES,
              head_axis: str | None = HEAD_AXIS):
    """kernel(q, k, v, *row_args) run on each device's shard of `mesh` (default: the mesh in context;
    none: called as it is). q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim];
    row_args [batch, ...]; the result is laid out like q."""
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None:
        return kernel(q, k, v, *row_args)
    batch, _, heads, _ = q.shape
    rows = batch_spec(batch, mesh, batch_axes)
    n = mesh.shape.get(head_axis, 1) if head_axis else 1
    head = head_axis if n > 1 and heads % n == 0 and k.shape[2] % n == 0 else None
    spec = P(rows, None, head, None)
    in_specs = (spec, spec, spec) + tuple(P(rows, *(None,) * (a.ndim - 1)) for a in row_args)
    return shard_map(kernel, mesh, in_specs, spec)(q, k, v, *row_args)
