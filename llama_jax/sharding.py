"""Meshes, the logical-axis rules that map parameter and activation axes onto them, and batch placement.

Three mesh axes, innermost last (so `tensor` stays inside a host's fast interconnect):
  data    pure data parallel: parameters replicated, batch split
  fsdp    data parallel with parameters (and optimizer state) sharded, gathered layer by layer
  tensor  Megatron-style model parallel: heads, mlp and vocab split

Every parameter and activation names its dimensions with logical axes ("embed", "heads", "batch", ...).
A rules table maps each logical axis to a mesh axis, a tuple of mesh axes, or None (replicated). One
table serves parameters and activations (DEFAULT_RULES):

    mesh = make_mesh(fsdp=-1, tensor=2)                     # -1: the remaining devices
    params = init_params(cfg, key, mesh)                    # each device creates only its shards
    with jax.set_mesh(mesh):                                # activation constraints see the mesh here
        logits = forward(params, place_batch(tokens, mesh), cfg)

Custom rules: pass `rules=` to `param_shardings` / `init_params`, and trace inside `use_rules(rules)`
so the model's activation constraints follow the same table. Rules are read when a function is traced
and jit's cache does not see them: set them before a jitted function's first call, not between calls
(or call `jax.clear_caches()`). That context is this module's only state; the mesh is JAX's own.

A dimension that its mesh axes don't divide (vocab 32000 over tensor=3, 2 kv heads over tensor=4, a
batch of 1 over fsdp=8) is not split over the axes that don't divide it: it is replicated along them
instead (XLA cannot shard unevenly). For parameters this emits a `ShardingFallbackWarning` naming the
dimension and the axis; `warnings.simplefilter("error", ShardingFallbackWarning)` turns it into an error
for those who would rather be told than replicate. GQA with fewer kv heads than `tensor` thus works
with the k/v projections replicated across tensor (as Megatron does).

Multi-host: every process builds the same mesh over all devices (make_mesh), reads the rows
`local_batch_rows(global_batch, mesh)` of each batch, and `place_batch` joins them into global arrays.

Stable API (train.py, generate.py and users build on it): make_mesh, param_shardings, batch_sharding,
place_batch, local_batch_rows, constrain, use_rules, DEFAULT_RULES.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from llama_jax import params as table

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
    # Norm weights are embed-sized vectors: FSDP shards them like every other weight (ZeRO-3), so no
    # device holds a whole parameter; gathering them costs nothing next to the matrices.
    "norm": "fsdp",
    # activations: the batch is split over every data-parallel axis; the residual stream's
    # features stay whole on each device (embed's fsdp split is for stored weights only).
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "cache_seq": None,
}


class ShardingFallbackWarning(UserWarning):
    """A parameter dimension is replicated along a mesh axis that does not divide it."""


# ---------------------------------------------------------------------------------------------
# Meshes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              dcn: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all of them, across every process).

    One size may be -1: the devices left over by the others. Axes are `Auto`: XLA propagates
    shardings between the model's constraints (`jax.make_mesh` alone would make Explicit axes).

    Several slices (TPU slices joined by the data-center network, DCN; or hosts, see below): the sizes
    above are those inside one slice (ICI), `dcn` gives each axis's size across slices, and an axis spans
    ici x dcn devices, slices outermost (`mesh_utils.create_hybrid_device_mesh`). Without `dcn`, data
    parallelism crosses the slices (dcn data = the number of slices): its one gradient all-reduce a step
    is what the slow network carries best. Slices are the devices' `slice_index` (TPUs); on devices without
    one (CPUs, GPUs), a `dcn` given explicitly makes each process a slice."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if not (isinstance(v, int) and (v >= 1 or v == -1))]
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes must be positive integers, at most one of them -1; got {', '.join(bad) or sizes}")
    has_slices = all(d.platform == "tpu" for d in devices)  # (CPU devices of a cluster say slice 0, all of them)
    granule = (lambda d: getattr(d, "slice_index", 0)) if has_slices else (lambda d: d.process_index)  # noqa: E731
    n_slices = len({granule(d) for d in devices})
    if dcn is None:
        dcn = {"data": n_slices} if has_slices else {}
    unknown = sorted(set(dcn) - set(MESH_AXES))
    if unknown or any(not (isinstance(v, int) and v >= 1) for v in dcn.values()):
        raise ValueError(f"dcn sizes: axes among {', '.join(MESH_AXES)}, each a positive integer; got "
                         f"{format_mesh(dcn)}")
    dcn_shape = tuple(dcn.get(a, 1) for a in MESH_AXES)
    hybrid = math.prod(dcn_shape) > 1
    if hybrid and math.prod(dcn_shape) != n_slices:
        what = "slices" if has_slices else "processes (each one a slice here)"
        raise ValueError(f"dcn {format_mesh(dict(zip(MESH_AXES, dcn_shape)))} needs {math.prod(dcn_shape)} slices, "
                         f"but the devices form {n_slices} {what}")
    per_slice = len(devices) // n_slices if hybrid else len(devices)
    known = math.prod(v for v in sizes.values() if v != -1)
    where = " per slice" if hybrid else ""
    if free:
        if per_slice % known:
            raise ValueError(f"mesh {format_mesh(sizes)}: {per_slice} devices{where} are not a multiple of {known}")
        sizes[free[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise ValueError(f"mesh {format_mesh(sizes)} needs {math.prod(sizes.values())} devices{where}, "
                         f"but there are {per_slice}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if not hybrid:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices, process_is_granule=not has_slices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=16,tensor=4" -> {"data": 1, "fsdp": 16, "tensor": 4} (axes not named are 1); the same
    syntax gives `make_mesh`'s dcn sizes ("data=2")."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sizes:
            raise ValueError(f"mesh axis {name.strip()!r} unknown (axes: {', '.join(MESH_AXES)})")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name.strip()}: {value!r} is not an integer") from None
    return sizes


def format_mesh(sizes: Mapping[str, int]) -> str:
    """{"data": 1, "fsdp": 16, "tensor": 4} -> "data=1,fsdp=16,tensor=4" (what parse_mesh reads)."""
    return ",".join(f"{k}={v}" for k, v in sizes.items())


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec


def logical_to_spec(
    axes: tuple[str | None, ...],
    rules: Rules | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    shape: tuple[int, ...] | None = None,
    on_fallback=None,
) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules` (default DEFAULT_RULES).

    A mesh axis is used at most once per array (the first logical axis claiming it wins). With `mesh`,
    axes of size 1 are dropped. With `shape` too, a dimension keeps only the mesh axes whose product
    divides it (the rest replicate it); `on_fallback(dim, name, size, mesh_axis, axis_size)` hears of each."""
    rules = DEFAULT_RULES if rules is None else rules
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        keep: list[str] = []
        for t in targets:
            if mesh is not None and t not in sizes:
                raise ValueError(f"rules map {name!r} to mesh axis {t!r}, which the mesh lacks (it has "
                                 f"{', '.join(sizes)})")
            if t in used or (mesh is not None and sizes[t] == 1):
                continue
            if shape is not None and mesh is not None and shape[dim] % (math.prod(sizes[a] for a in keep) * sizes[t]):
                if on_fallback is not None:
                    on_fallback(dim, name, shape[dim], t, sizes[t])
                continue
            keep.append(t)
        used.update(keep)
        spec.append(keep[0] if len(keep) == 1 else (tuple(keep) or None))
    return PartitionSpec(*spec)


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("llama_jax_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules | None) -> Iterator[None]:
    """Activation constraints traced inside this block follow `rules` (None: DEFAULT_RULES)."""
    token = _RULES.set(None if rules is None else dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The rules table in effect: the innermost `use_rules`, else DEFAULT_RULES."""
    rules = _RULES.get()
    return DEFAULT_RULES if rules is None else rules


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules: Rules | None = None) -> jax.Array:
    """Pin activation `x` to the sharding its logical `axes` imply under the mesh in context
    (`jax.set_mesh`); a no-op when there is none, so the model runs unchanged on one device.

    Dimensions a mesh axis does not divide (a batch of 1 while decoding) are left replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        raise ValueError("llama_jax shards through Auto mesh axes; this mesh has Explicit ones. Build it with "
                         "llama_jax.sharding.make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto,) * 3)")
    spec = logical_to_spec(axes, rules or current_rules(), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Parameters


def _warn_fallback(path: str):
    def warn(dim, name, size, axis, axis_size):
        warnings.warn(
            f"{path}: dimension {dim} ({name}={size}) is not divisible by mesh axis {axis}={axis_size}; "
            f"replicating it along {axis}", ShardingFallbackWarning, stacklevel=4)
    return warn


def specs_for(axes_tree, shapes_tree, mesh, rules: Rules | None = None):
    """PartitionSpecs for a pytree of logical-axes tuples and the matching pytree of arrays (or
    ShapeDtypeStructs), replicating dims their mesh axes don't divide. Use it for any state laid
    out like the params (optimizer moments, gradients)."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    flat_axes, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes)
    shapes = treedef.flatten_up_to(shapes_tree)
    specs = [logical_to_spec(axes, rules, mesh, tuple(s.shape), _warn_fallback(jax.tree_util.keystr(path)))
             for (path, axes), s in zip(flat_axes, shapes)]
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_specs(cfg, rules: Rules | None = None, mesh=None):
    """PartitionSpec for every parameter of `cfg`, in the params layout. Without a mesh, the specs
    the rules name (no size checks)."""
    axes = table.logical_axes(cfg)
    if mesh is None:
        return jax.tree.map(lambda a: logical_to_spec(a, rules), axes, is_leaf=lambda x: isinstance(x, tuple))
    return specs_for(axes, table.abstract(cfg), mesh, rules)


def param_shardings(cfg, mesh: jax.sharding.Mesh, rules: Rules | None = None, params=None):
    """NamedSharding for every parameter of `cfg` on `mesh`, in the params layout. Stable API.

    `params`: the tree to place, when they are not the model's float arrays (a quantized tree): a leaf
    that stores its weight in several arrays (a QArray) answers through its `shardings(axes,
    sharding_for)` method, each of its arrays sharded like the matrix it stores."""
    if params is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, rules, mesh),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def sharding_for(axes, shape):
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, tuple(shape)))

    def one(leaf, axes):
        if hasattr(leaf, "shardings"):
            return leaf.shardings(axes, sharding_for)
        return sharding_for(axes, leaf.shape)

    stored = lambda x: hasattr(x, "shardings") or hasattr(x, "shape")  # noqa: E731
    return jax.tree.map(lambda axes, leaf: one(leaf, axes), table.logical_axes(cfg), params,
                        is_leaf=lambda x: isinstance(x, tuple) and not stored(x))


def shard_bytes(shape_dtype, sharding) -> int:
    """Bytes one device holds of an array (or ShapeDtypeStruct) under `sharding`."""
    shard = sharding.shard_shape(tuple(shape_dtype.shape))
    return math.prod(shard) * np.dtype(shape_dtype.dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Batches. A batch is any pytree of arrays whose leading dimension is the batch (tokens, targets,
# loss masks, segment ids): it is split over (data, fsdp) and replicated over tensor.


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a [batch, seq, ...] input: batch over the data-parallel axes. Stable API."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def _batch_blocks(mesh, rules) -> tuple[int, list[int]]:
    """How many blocks the batch is cut into, and which of them this process's devices hold."""
    n = batch_shard_count(mesh, rules)
    index_map = batch_sharding(mesh, 1, rules).addressable_devices_indices_map((n,))
    return n, sorted({idx[0].start or 0 for idx in index_map.values()})


def batch_shard_count(mesh, rules: Rules | None = None) -> int:
    """Into how many blocks `mesh` cuts the batch (data x fsdp under the default rules)."""
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in names)


def local_batch_rows(global_batch: int, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> slice:
    """The rows of a global batch this process supplies to `place_batch`: the block its devices hold.
    Every process runs the same data loader and reads only these rows. Stable API."""
    n, mine = _batch_blocks(mesh, rules)
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the {n} data-parallel shards "
                         f"of mesh {format_mesh(dict(mesh.shape))}")
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError("this process's devices hold batch blocks that are not contiguous; order the mesh's "
                         "devices by process (make_mesh does) so each process reads one block of the batch")
    rows = global_batch // n
    return slice(mine[0] * rows, (mine[-1] + 1) * rows)


def place_batch(local_batch, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """Global jax.Arrays, sharded by `batch_sharding`, from this process's rows of a batch (a pytree of
    arrays whose leading dimension is the batch): the rows `local_batch_rows` names. In a single
    process the local batch is the whole batch. Every process calls it, with its own rows. Stable API."""
    n, mine = _batch_blocks(mesh, rules)

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % len(mine):
            raise ValueError(f"local batch of {x.shape[0]} rows does not split over this process's "
                             f"{len(mine)} batch shards")
        global_shape = (x.shape[0] // len(mine) * n,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x, global_shape)

    return jax.tree.map(place, local_batch)
