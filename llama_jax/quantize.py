"""Weight-only int8 and int4 quantization, the llama.cpp way: integer codes plus a float scale (and, for
int4, optionally a zero point) per group of weights along the contraction axis.

    qparams = quantize_params(params, cfg, bits=4, group=64)   # every linear weight; embeddings optional
    logits = lj.forward(qparams, tokens, cfg)                   # the model code is unchanged
    params = dequantize_params(qparams)                         # back to float
    model = load_gguf(path)                                     # Q8_0 / Q4_0 / Q4_1 blocks kept as shipped

A quantized weight is a `QArray`, a pytree node standing where the float array stood, so under jit the
integer codes are what lives in memory. The model multiplies by a weight through `QArray.matmul`: on
one GPU, few-row bf16 products (decoding) run a fused dequantize-and-multiply kernel (at batch 1 on a
Hopper GPU the CUDA kernel of gpu_matvec.py, else the Pallas kernel of qmatmul.py),
which reads the codes straight from HBM, and on the CPU few-row float32 ones run the native kernel of
cpu_qmatmul.py; everywhere else the weight is dequantized next to an XLA dot (XLA on an H100 does not
fuse the two: it writes the bf16 weight out and reads it back). `.astype`
dequantizes, for code that wants the float weight. The decode scan hands the model `QLayer`s (a layer
of the stack, not yet sliced), because XLA would copy a slice passed to the kernel.

Layout. A QArray stores its weight as a matrix [*layers, K, N], K the contraction (input) axis and N
the output axis, merging the head axes: q/k/v [D, H, hd] -> [D, H*hd], o [H, hd, D] -> [H*hd, D] (so an
int4 group may span heads when head_dim is smaller than the group). The embedding [V, D] is grouped
along D, its last axis (axis=-1), so that its transpose is the tied lm_head grouped along its
contraction axis; `matmul_transposed` multiplies by that transpose without forming it (on the CPU, the
native kernel's row form reads each logit's row of codes in place). `shape` is the logical shape;
`.astype` reshapes to it.

Schemes (value = what a code decodes to; s = scale, z = zero point, per group of `group` codes):
  int8  codes q in [-127, 127]              value = q * s        per output channel (group = K) or groups
  int4  codes u in [0, 15], symmetric       value = (u - 8) * s   (llama.cpp Q4_0)
        with a zero point                   value = u * s + z     (llama.cpp Q4_1: z is the group's minimum)
int4 codes are packed two per byte, in llama.cpp's order within each group: byte j holds code j in its
low nibble and code j + group/2 in its high nibble. So GGUF Q4 blocks (group 32) become QArrays by moving
bytes, never by decoding them. When `group` does not divide K, K is padded up to a multiple of it
(with copies of the last weight, so no group's range changes); dequantizing cuts the padding off.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig

GROUPS = (32, 64, 128)


# ---------------------------------------------------------------------------------------------
# The quantized array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "zeros"],
                   meta_fields=["bits", "group", "axis", "tail", "split"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A weight as integer codes and per-group scales (see the module docstring for the layout).

    The stored matrix is [*layers, prod(tail[:split]), prod(tail[split:])], grouped along `axis`.
    Stacked weights carry the `layers` axis first on every field, so `lax.scan` slices them like
    arrays; axes are counted from the end for the same reason."""

    values: jax.Array  # int8 codes (bits 8), or uint8 holding two 4-bit codes per byte along `axis`
    scales: jax.Array  # the matrix's shape with the grouped axis divided by `group`
    zeros: jax.Array | None  # like scales (int4 with a zero point), or None (symmetric)
    bits: int  # 8 or 4
    group: int  # codes per scale along `axis`
    axis: int  # -2: grouped along the matrix's rows (K of a linear weight), -1: along its columns
    tail: tuple  # the logical shape of the weight, without the leading layers axis
    split: int  # tail[:split] merge into the matrix's first axis, tail[split:] into its second

    # -- the array-like surface the model uses ----------------------------------------------------

    def __getitem__(self, key):
        if key is Ellipsis:  # nnx: `variable[...]` is the whole value
            return self
        raise TypeError("a QArray supports only [...]; dequantize() it to index it")

    def astype(self, dtype) -> jax.Array:
        return self.dequantize(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-2]) + tuple(self.tail)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)  # what dequantize() gives by default

    @property
    def T(self) -> "QArray":
        """The transpose of a 2-D weight: the tied lm_head [D, V] from the embedding [V, D]."""
        if self.values.ndim != 2:
            raise ValueError("QArray.T is for 2-D weights only")
        t = lambda x: None if x is None else x.T  # noqa: E731
        return QArray(t(self.values), t(self.scales), t(self.zeros), self.bits, self.group, -3 - self.axis,
                      tuple(self.tail[::-1]), len(self.tail) - self.split)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(x) for x in (self.values, self.scales, self.zeros) if x is not None)

    def matrix_shape(self) -> tuple[int, int]:
        return math.prod(self.tail[:self.split]), math.prod(self.tail[self.split:])

    def take(self, layer) -> "QArray":
        """Layer `layer` of a stacked QArray, as a QArray of its own."""
        return jax.tree.map(lambda a: a[layer], self)

    def as_stack(self) -> "QArray":
        """A stacked QArray as it is; a single weight as a stack of one (a reshape, no copy). The kernels
        take a stack and a layer index."""
        return self if self.values.ndim == 3 else jax.tree.map(lambda a: a[None], self)

    def matmul(self, x: jax.Array, layer: jax.Array | None = None, out_dtype=None) -> jax.Array:
        """x [..., *tail[:split]] times this weight (layer `layer` of a stacked one) -> [..., *tail[split:]]
        in out_dtype (default x's dtype; every path sums in float32, so float32 logits lose nothing).
        One-row bf16 products on a Hopper GPU run gpu_matvec's CUDA kernel, few-row ones on one GPU the
        Pallas kernel of qmatmul.py, few-row float32 ones on the CPU the native kernel of cpu_qmatmul.py;
        the rest dequantize next to an XLA dot."""
        from llama_jax import cpu_qmatmul, gpu_matvec, qmatmul

        k, n = self.matrix_shape()
        lead = x.shape[:x.ndim - self.split]
        x2 = x.reshape(-1, k)
        if gpu_matvec.supported((self,), x2):
            out = gpu_matvec.matvec(x2, (self,), layer, out_dtype=out_dtype or x.dtype)[0]
        elif qmatmul.supported(self, x2):
            out = qmatmul.qmatmul(x2, self, layer)
        elif cpu_qmatmul.supported(self, x2):
            out = cpu_qmatmul.qmatmul_cpu(x2, self, layer)
        else:
            q = self if layer is None else self.take(layer)
            out = jnp.dot(x2, q.dequantize(x.dtype).reshape(k, n), preferred_element_type=jnp.float32)
        return out.astype(out_dtype or x.dtype).reshape(lead + tuple(self.tail[self.split:]))

    def matmul_transposed(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x [..., D] times the transpose of this 2-D weight [V, D] -> [..., V] in out_dtype (default x's
        dtype): the tied lm_head from the embedding. Few-row float32 products on the CPU run the native
        kernel's row form, which reads the codes where they lie (`self.T.matmul` would have XLA copy them
        transposed on every call); the rest dequantize next to an XLA dot."""
        from llama_jax import cpu_qmatmul

        if self.values.ndim != 2 or len(self.tail) != 2:
            raise ValueError("matmul_transposed is for 2-D weights only")
        v, d = self.tail
        x2 = x.reshape(-1, d)
        if cpu_qmatmul.supported_rows(self, x2):
            out = cpu_qmatmul.qmatmul_rows_cpu(x2, self)
        else:
            out = jnp.dot(x2, self.dequantize(x.dtype).T, preferred_element_type=jnp.float32)
        return out.astype(out_dtype or x.dtype).reshape(x.shape[:-1] + (v,))

    # -- decoding ---------------------------------------------------------------------------------

    def rows(self, idx: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Rows `idx` (int, any shape) of a 2-D weight grouped along its rows (the embedding), decoded:
        [*idx.shape, D]. The codes are gathered first, so a lookup decodes only the rows it reads."""
        if self.values.ndim != 2 or self.axis != -1:
            raise ValueError("QArray.rows is for 2-D weights grouped along their last axis (the embedding)")
        flat = idx.reshape(-1)
        picked = dataclasses.replace(jax.tree.map(lambda a: a[flat], self), tail=(flat.shape[0], self.tail[1]))
        return picked.dequantize(dtype).reshape(idx.shape + (self.tail[1],))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight in its logical shape. The arithmetic is float32 (then cast), so GGUF
        blocks decode exactly: a 4- or 8-bit code times a float16 scale is exact in float32."""
        a = self.values.ndim + self.axis  # the grouped axis, counted from the front
        codes = self.values
        if self.bits == 4:
            codes = _unpack_nibbles(codes, a, self.group)
        n = codes.shape[a]  # padded to a multiple of the group
        g = min(self.group, n)
        c = codes.reshape(codes.shape[:a] + (n // g, g) + codes.shape[a + 1:]).astype(jnp.float32)
        s = jnp.expand_dims(self.scales.astype(jnp.float32), a + 1)
        if self.zeros is not None:
            w = c * s + jnp.expand_dims(self.zeros.astype(jnp.float32), a + 1)
        elif self.bits == 4:
            w = (c - 8.0) * s
        else:
            w = c * s
        w = w.reshape(codes.shape)
        k = self.matrix_shape()[self.axis]
        if n != k:  # cut the padding
            w = jax.lax.slice_in_dim(w, 0, k, axis=a)
        return w.reshape(self.shape).astype(dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class QLayer:
    """Layer `index` of a stacked QArray, not sliced out: the decode scan hands these to the model,
    so that the GPU kernel reads the layer from the stack (XLA would copy a slice passed to it)."""

    stack: QArray
    index: jax.Array  # int32 scalar

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("a QLayer supports only [...]")

    def astype(self, dtype) -> jax.Array:
        return self.stack.take(self.index).dequantize(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.stack.matmul(x, self.index)


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _unpack_nibbles(packed: jax.Array, a: int, group: int) -> jax.Array:
    """uint8 [..., n/2, ...] -> 4-bit codes uint8 [..., n, ...] along axis `a`. Within each group,
    byte j holds code j (low nibble) and code j + group/2 (high nibble)."""
    half = group // 2
    shape = packed.shape
    p = packed.reshape(shape[:a] + (shape[a] // half, half) + shape[a + 1:])
    codes = jnp.concatenate([p & 0x0F, p >> 4], axis=a + 1)
    return codes.reshape(shape[:a] + (shape[a] * 2,) + shape[a + 1:])


def _pack_nibbles(codes: jax.Array, a: int, group: int) -> jax.Array:
    """The inverse of `_unpack_nibbles`: codes in [0, 15] along axis `a` -> bytes."""
    shape = codes.shape
    c = codes.astype(jnp.uint8).reshape(shape[:a] + (shape[a] // group, 2, group // 2) + shape[a + 1:])
    lo = jax.lax.index_in_dim(c, 0, a + 1, keepdims=False)
    hi = jax.lax.index_in_dim(c, 1, a + 1, keepdims=False)
    return (lo | (hi << 4)).reshape(shape[:a] + (shape[a] // 2,) + shape[a + 1:])


# ---------------------------------------------------------------------------------------------
# Quantizing one matrix


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "zero_point", "scale_dtype"))
def quantize_matrix(w: jax.Array, bits: int, group: int | None, axis: int = -2, zero_point: bool = False,
                    scale_dtype: str = "float16"):
    """Codes, scales and zero points (or None) of w [..., rows, cols], grouped along `axis`.

    group None: one group per row/column (per-channel). A group that does not divide the axis pads it
    with copies of its last element (which leaves every group's range as it was). Codes are computed
    from the *stored* (rounded) scale and zero point, so the error bound |w - decoded| <= scale / 2
    holds for the scale that is stored."""
    a = w.ndim + axis
    k = w.shape[a]
    g = k if group is None else group
    w = w.astype(jnp.float32)
    if k % g:
        w = jnp.pad(w, [(0, 0)] * a + [(0, -k % g)] + [(0, 0)] * (w.ndim - a - 1), mode="edge")
    shape = w.shape
    wg = w.reshape(shape[:a] + (shape[a] // g, g) + shape[a + 1:])
    stored = lambda x: x.astype(scale_dtype).astype(jnp.float32)  # noqa: E731

    def divide(x, s):  # x / s, with all-zero groups (s = 0) coded as 0
        return jnp.where(s == 0, 0.0, x / jnp.where(s == 0, 1.0, s))

    zeros = None
    if bits == 8:
        s = stored(jnp.max(jnp.abs(wg), axis=a + 1, keepdims=True) / 127)
        values = jnp.clip(jnp.round(divide(wg, s)), -127, 127).astype(jnp.int8).reshape(shape)
    elif zero_point:
        lo = jnp.min(wg, axis=a + 1, keepdims=True)
        s = stored((jnp.max(wg, axis=a + 1, keepdims=True) - lo) / 15)
        z = stored(lo)
        codes = jnp.clip(jnp.round(divide(wg - z, s)), 0, 15).reshape(shape)
        values, zeros = _pack_nibbles(codes, a, g), jnp.squeeze(z, a + 1).astype(scale_dtype)
    else:
        s = stored(jnp.max(jnp.abs(wg), axis=a + 1, keepdims=True) / 7)
        codes = (jnp.clip(jnp.round(divide(wg, s)), -8, 7) + 8).reshape(shape)
        values = _pack_nibbles(codes, a, g)
    return values, jnp.squeeze(s, a + 1).astype(scale_dtype), zeros


def quantize(w: jax.Array, bits: int = 8, group: int | None = None, *, split: int = 1, axis: int = -2,
             stacked: bool = False, zero_point: bool = False, scale_dtype: str = "float16") -> QArray:
    """A float weight as a QArray. Its logical axes tail[:split] are the matrix rows (for a linear
    weight: the contraction axes), the rest its columns; `stacked`: a leading layers axis.

    group None is per-channel (int8 only): one scale per output column, over all of K."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS} (or None: per channel, int8 only), got {group!r}")
    if bits == 4 and group is None:
        raise ValueError("int4 needs a group size (32, 64 or 128)")
    if zero_point and bits != 4:
        raise ValueError("a zero point is for int4 only (int8 is symmetric)")
    lead = w.shape[:1] if stacked else ()
    tail = tuple(w.shape[len(lead):])
    rows, cols = math.prod(tail[:split]), math.prod(tail[split:])
    m = w.reshape(lead + (rows, cols))
    f = functools.partial(quantize_matrix, bits=bits, group=group, axis=axis, zero_point=zero_point,
                          scale_dtype=scale_dtype)
    # One layer at a time: the float32 temporaries stay the size of a layer, not of the model.
    values, scales, zeros = jax.lax.map(f, m) if stacked else f(m)
    k = (rows, cols)[axis]
    return QArray(values, scales, zeros, bits, k if group is None else group, axis, tail, split)


# ---------------------------------------------------------------------------------------------
# Whole models

# Quantized leaves: path -> how many leading logical axes (without layers) are the contraction axes.
LINEAR = {
    ("layers", "attn", "q"): 1,  # [D, H, hd]
    ("layers", "attn", "k"): 1,
    ("layers", "attn", "v"): 1,
    ("layers", "attn", "o"): 2,  # [H, hd, D]
    ("layers", "mlp", "gate"): 1,  # [D, F]
    ("layers", "mlp", "up"): 1,
    ("layers", "mlp", "down"): 1,  # [F, D]
}
LM_HEAD = ("lm_head",)  # [D, V]
EMBED = ("embed",)  # [V, D]: grouped along D (axis -1), so its transpose serves as a tied lm_head


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def quantize_params(params, cfg: LlamaConfig, bits: int = 8, group: int | None = None,
                    include_embeddings: bool = False, *, zero_point: bool | None = None,
                    scale_dtype: str = "float16"):
    """params with every linear weight a QArray (a new tree; `params` is left as it is).

    bits 8: per output channel (group None) or groups of 32/64/128 along the contraction axis.
    bits 4: groups (default 64) with a zero point like Q4_1 (the default: on stories260K it loses 7%
    of perplexity where symmetric groups lose 15%), or symmetric like Q4_0 (zero_point=False).
    include_embeddings: the embedding and the lm_head too (the embedding is gathered by row, so it is
    grouped along the model dimension; tied models then reuse it transposed as the lm_head)."""
    if bits == 4 and group is None:
        group = 64
    if zero_point is None:
        zero_point = bits == 4
    out = _copy(params)
    todo = [(p, LINEAR[p], -2, True) for p in LINEAR]
    if include_embeddings:
        todo.append((EMBED, 1, -1, False))
        if not cfg.tie_embeddings:
            todo.append((LM_HEAD, 1, -2, False))
    for path, split, axis, stacked in todo:
        w = _get(out, path)
        if isinstance(w, QArray):
            continue
        _set(out, path, quantize(w, bits, group, split=split, axis=axis, stacked=stacked, zero_point=zero_point,
                                 scale_dtype=scale_dtype))
    return out


def dequantize_params(params, dtype=jnp.float32):
    """Every QArray of `params` decoded to a float array of `dtype` (other leaves unchanged)."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QArray))


def is_quantized(params) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def param_bytes(params) -> int:
    """Bytes of a params tree (arrays or jax.eval_shape's ShapeDtypeStructs), QArrays counted as stored."""
    return sum(_nbytes(x) for x in jax.tree.leaves(params))


def scheme(params) -> dict:
    """How `params` is quantized, for checkpoint metadata: {"a.b.c": {bits, group, axis, split, tail,
    zero_point, scale_dtype}} for every QArray ({} for a float tree). `abstract_quantized` inverts it."""
    out = {}
    for path, leaf in _walk(params):
        if isinstance(leaf, QArray):
            out[".".join(path)] = dict(bits=leaf.bits, group=leaf.group, axis=leaf.axis, split=leaf.split,
                                       tail=list(leaf.tail), zero_point=leaf.zeros is not None,
                                       scale_dtype=str(jnp.dtype(leaf.scales.dtype)))
    return out


def abstract_quantized(cfg: LlamaConfig, scheme_: dict):
    """The params tree (ShapeDtypeStructs, QArrays where `scheme_` says) that `scheme(params)` described."""
    from llama_jax.model import abstract_params

    tree = _copy(abstract_params(cfg))
    for name, s in scheme_.items():
        path = tuple(name.split("."))
        lead = (cfg.n_layers,) if path[0] == "layers" else ()
        tail = tuple(s["tail"])
        m = [math.prod(tail[:s["split"]]), math.prod(tail[s["split"]:])]
        a = s["axis"] + 2
        m[a] = -(-m[a] // s["group"]) * s["group"]  # padded to whole groups
        groups = list(m)
        groups[a] //= s["group"]
        m[a] = m[a] * s["bits"] // 8  # int4: two codes a byte
        sds = lambda shape, dt: jax.ShapeDtypeStruct(lead + tuple(shape), jnp.dtype(dt))  # noqa: E731
        _set(tree, path, QArray(sds(m, jnp.int8 if s["bits"] == 8 else jnp.uint8), sds(groups, s["scale_dtype"]),
                                sds(groups, s["scale_dtype"]) if s["zero_point"] else None,
                                s["bits"], s["group"], s["axis"], tail, s["split"]))
    return tree


def _walk(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, prefix + (k,))
    else:
        yield prefix, tree


# ---------------------------------------------------------------------------------------------
# Sharding: a QArray's fields are sharded like the matrix it stores


def matrix_axes(axes: tuple, leaf: QArray) -> tuple:
    """Logical axes of a QArray's stored matrix, from its weight's logical `axes`: a merged axis is
    named after its leading (major) axis, e.g. q (layers, embed, heads, head_dim) -> (layers, embed,
    heads). Splitting a merged axis over a mesh axis that divides its leading axis keeps whole heads
    on each device."""
    stack = tuple(axes[:len(axes) - len(leaf.tail)])
    tail = tuple(axes[len(stack):])
    return stack + (tail[0], tail[leaf.split])


def param_shardings(params, cfg: LlamaConfig, mesh, rules=None):
    """NamedShardings for a (possibly quantized) params tree: float leaves as in
    sharding.param_shardings; a QArray's values, scales and zeros each get its matrix's spec (an axis
    their shape does not divide is replicated). `jax.device_put(qparams, param_shardings(...))`."""
    from jax.sharding import NamedSharding

    from llama_jax.model import logical_axes
    from llama_jax.sharding import logical_to_spec

    def one(leaf, axes):
        if not isinstance(leaf, QArray):
            return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, tuple(leaf.shape)))
        m = matrix_axes(axes, leaf)
        spec = lambda x: None if x is None else NamedSharding(  # noqa: E731
            mesh, logical_to_spec(m, rules, mesh, tuple(x.shape)))
        return dataclasses.replace(leaf, values=spec(leaf.values), scales=spec(leaf.scales), zeros=spec(leaf.zeros))

    return jax.tree.map(one, params, logical_axes(cfg), is_leaf=lambda x: isinstance(x, (QArray, tuple)))


# ---------------------------------------------------------------------------------------------
# GGUF: Q8_0, Q4_0 and Q4_1 blocks straight into QArrays (moving bytes, decoding nothing)

# ggml block layouts, 32 weights a block along a row (the input axis of an [out, in] weight):
#   Q8_0: f16 d, 32 x int8 q               value = q * d
#   Q4_0: f16 d, 16 bytes of nibbles       value = (u - 8) * d
#   Q4_1: f16 d, f16 m, 16 bytes           value = u * d + m
# Nibbles: byte j holds u_j (low) and u_{j+16} (high), which is QArray's int4 order for group 32.
GGUF_TYPES = {"Q8_0": (8, 34, 2), "Q4_0": (4, 18, 2), "Q4_1": (4, 20, 4)}  # bits, bytes/block, header bytes


def gguf_blocks(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The raw blocks of an [out, in] GGUF tensor (uint8 [out, in/32 * bytes/block], as the gguf
    package gives it) -> codes [out, in/32, 32 int8 | 16 uint8], scales f16 [out, in/32], mins or None."""
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype} cannot be kept quantized (supported: {', '.join(GGUF_TYPES)})")
    bits, size, header = GGUF_TYPES[qtype]
    b = np.asarray(data, np.uint8)
    b = b.reshape(b.shape[0], -1, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if qtype == "Q4_1" else None
    codes = np.ascontiguousarray(b[..., header:])
    return (codes.view(np.int8) if bits == 8 else codes), d, m


def qarray_from_gguf(data: np.ndarray, qtype: str, tail: tuple[int, ...], split: int = 1,
                     embedding: bool = False, permute_heads: int | None = None) -> QArray:
    """One [out, in] GGUF tensor as a QArray in our layout: transposed to [in, out] (grouped along
    `in`, axis -2), or for the embedding kept [vocab, dim] (grouped along dim, axis -1).
    permute_heads: q/k's interleaved rotary rows are reordered to the half-split layout with that
    many heads (a permutation of whole rows, so of whole blocks)."""
    from checkpoints_convert.gguf import _to_half_split

    codes, d, m = gguf_blocks(data, qtype)
    if permute_heads:
        codes, d = _to_half_split(codes, permute_heads), _to_half_split(d, permute_heads)
        m = None if m is None else _to_half_split(m, permute_heads)
    bits = GGUF_TYPES[qtype][0]
    out, nb = d.shape
    if embedding:
        values = codes.reshape(out, -1)
        return QArray(values, d, m, bits, 32, -1, tuple(tail), split)
    # [out, blocks, bytes] -> [blocks, bytes, out] -> rows = the input axis (two codes a byte for int4).
    values = codes.transpose(1, 2, 0).reshape(-1, out)
    return QArray(values, d.T.copy(), None if m is None else m.T.copy(), bits, 32, -2, tuple(tail), split)


# GGUF tensor names of the quantizable leaves (layer leaves take "{i}").
_GGUF_NAMES = {
    ("layers", "attn", "q"): "blk.{i}.attn_q.weight",
    ("layers", "attn", "k"): "blk.{i}.attn_k.weight",
    ("layers", "attn", "v"): "blk.{i}.attn_v.weight",
    ("layers", "attn", "o"): "blk.{i}.attn_output.weight",
    ("layers", "mlp", "gate"): "blk.{i}.ffn_gate.weight",
    ("layers", "mlp", "up"): "blk.{i}.ffn_up.weight",
    ("layers", "mlp", "down"): "blk.{i}.ffn_down.weight",
    EMBED: "token_embd.weight",
    LM_HEAD: "output.weight",
}


def _tails(cfg: LlamaConfig) -> dict:
    d, n, kv, hd, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    return {("layers", "attn", "q"): (d, n, hd), ("layers", "attn", "k"): (d, kv, hd),
            ("layers", "attn", "v"): (d, kv, hd), ("layers", "attn", "o"): (n, hd, d),
            ("layers", "mlp", "gate"): (d, f), ("layers", "mlp", "up"): (d, f), ("layers", "mlp", "down"): (f, d),
            EMBED: (v, d), LM_HEAD: (d, v)}


def params_from_gguf(path: str | Path, include_embeddings: bool = True, dtype: str | None = None):
    """(cfg, params) from a GGUF file with its Q8_0 / Q4_0 / Q4_1 weights kept quantized as shipped:
    each becomes a QArray holding the file's own codes and scales, so decoding it gives exactly what
    llama.cpp (and gguf.quants.dequantize) would. Leaves of other types (F32 norms, or a weight whose
    layers mix types) are read as floats of `dtype` (default: the config's param dtype).
    include_embeddings False: the embedding and lm_head are read as floats too."""
    import gguf

    from checkpoints_convert.gguf import GGUFReader
    from llama_jax.checkpoint import _set as set_leaf
    from llama_jax.checkpoint import leaf_from_reader, param_paths
    from llama_jax.config import from_hf_config

    reader = GGUFReader(path)
    cfg = from_hf_config(reader.config)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    raw = {t.name: t for t in gguf.GGUFReader(Path(path), "r").tensors}
    tails = _tails(cfg)
    params: dict = {}
    for p in param_paths(cfg):
        leaf = None
        if p in LINEAR or (include_embeddings and p in (EMBED, LM_HEAD)):
            leaf = _gguf_leaf(raw, p, cfg, tails[p])
        if leaf is None:
            leaf = jnp.asarray(leaf_from_reader(reader, p, cfg, np.dtype(cfg.param_dtype)))
        set_leaf(params, p, leaf)
    return cfg, params


def _gguf_leaf(raw: dict, path: tuple, cfg: LlamaConfig, tail: tuple) -> QArray | None:
    names = [_GGUF_NAMES[path].format(i=i) for i in range(cfg.n_layers)] if path[0] == "layers" \
        else [_GGUF_NAMES[path]]
    types = {raw[n].tensor_type.name for n in names}
    if len(types) != 1 or next(iter(types)) not in GGUF_TYPES:
        if types - set(GGUF_TYPES) - {"F32", "F16", "BF16"} or len(types) > 1:
            warnings.warn(f"GGUF {names[0]}: types {sorted(types)} are read as float (kept quantized: "
                          f"{', '.join(GGUF_TYPES)}, one type for every layer)", stacklevel=3)
        return None
    qtype = types.pop()
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}.get(path[-1]) if path[:2] == ("layers", "attn") else None
    split = 2 if path[-1] == "o" else 1
    qs = [qarray_from_gguf(raw[n].data, qtype, tail, split, embedding=path == EMBED, permute_heads=heads)
          for n in names]
    if path[0] != "layers":
        q = qs[0]
        return dataclasses.replace(q, values=jnp.asarray(q.values), scales=jnp.asarray(q.scales),
                                   zeros=None if q.zeros is None else jnp.asarray(q.zeros))
    stack = lambda xs: None if xs[0] is None else jnp.asarray(np.stack(xs))  # noqa: E731
    return dataclasses.replace(qs[0], values=stack([q.values for q in qs]), scales=stack([q.scales for q in qs]),
                               zeros=stack([q.zeros for q in qs]))


def load_gguf(path: str | Path, include_embeddings: bool = True, dtype: str | None = None):
    """`llama_jax.load` for a GGUF file, its quantized weights kept as shipped: a Loaded (config,
    params with QArrays, tokenizer)."""
    from llama_jax.checkpoint import Loaded
    from llama_jax.tokenizer import load_tokenizer

    cfg, params = params_from_gguf(path, include_embeddings, dtype)
    return Loaded(cfg, params, load_tokenizer(path))


# ---------------------------------------------------------------------------------------------
# Quantized Orbax checkpoints: the layout of `llama-jax convert` (llama_jax.json + params/ + tokenizer
# files), each QArray stored as a folder of arrays {values, scales[, zeros]}, and the scheme in the
# metadata under "quantization". llama_jax.load reads them through `load_quantized_checkpoint`.


def _as_dicts(params):
    return jax.tree.map(lambda x: {k: v for k, v in (("values", x.values), ("scales", x.scales),
                                                      ("zeros", x.zeros)) if v is not None}
                        if isinstance(x, QArray) else x, params, is_leaf=lambda x: isinstance(x, QArray))


def _from_dicts(tree, template):
    return jax.tree.map(lambda t, x: dataclasses.replace(t, values=x["values"], scales=x["scales"],
                                                         zeros=x.get("zeros")) if isinstance(t, QArray) else x,
                        template, tree, is_leaf=lambda x: isinstance(x, QArray))


def is_quantized_checkpoint(path: str | Path) -> bool:
    import json

    from llama_jax.checkpoint import CHECKPOINT_META, is_checkpoint

    path = Path(path)
    return is_checkpoint(path) and bool(json.loads((path / CHECKPOINT_META).read_text()).get("quantization"))


def save_quantized(model, out_dir: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a Loaded whose params hold QArrays as an Orbax checkpoint at `out_dir` (written beside
    it and renamed when complete, like `convert`). Tokenizer files are copied from `source` (a
    checkpoint or Hugging Face folder) or written from it (a GGUF file)."""
    import shutil

    import orbax.checkpoint as ocp

    from checkpoints_convert.hf import TOKENIZER_FILES
    from llama_jax import checkpoint as ck

    out = Path(out_dir).absolute()
    with ck.staged_output(out, overwrite) as tmp:
        with ck._quiet_absl():
            ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(tmp / "params",
                                                                 args=ocp.args.PyTreeSave(_as_dicts(model.params)))
        if source is not None:
            src = Path(source)
            reader = ck.reader_for(src) if not ck.is_checkpoint(src) else None
            if reader is not None and hasattr(reader, "write_tokenizer"):
                reader.write_tokenizer(tmp)
            else:
                for name in TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copy(src / name, tmp / name)
        ck.write_checkpoint_info(tmp, model.config, str(source or ""), quantization=scheme(model.params))
    return out


def load_quantized_checkpoint(path: str | Path, mesh=None):
    """A Loaded from a checkpoint written by `save_quantized` (QArrays restored as stored; with `mesh`,
    placed by `param_shardings`)."""
    import orbax.checkpoint as ocp

    from llama_jax import checkpoint as ck
    from llama_jax.tokenizer import load_tokenizer

    path = Path(path)
    info = ck.read_checkpoint_info(path)
    if not info.get("quantization"):
        raise ValueError(f"{path}: not a quantized checkpoint (no 'quantization' in {ck.CHECKPOINT_META})")
    cfg = LlamaConfig.from_dict(info["config"])
    template = abstract_quantized(cfg, info["quantization"])
    if mesh is not None:
        shardings = param_shardings(template, cfg, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, template)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _as_dicts(template),
                          _as_dicts(shardings))
    try:
        with ck._quiet_absl():
            tree = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                path / "params", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:
        raise ValueError(f"{path}: unreadable quantized checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for p, want in _walk(target):
        got = _get(tree, p)
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(f"{path}: {'.'.join(p)} stored as {got.dtype}{list(got.shape)}, "
                             f"expected {want.dtype}{list(want.shape)} from {ck.CHECKPOINT_META}")
    has_tokenizer = any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
    return ck.Loaded(cfg, _from_dicts(tree, template), load_tokenizer(path) if has_tokenizer else None)


def load_quantized(path: str | Path | None, keep_gguf: bool = False, mesh=None):
    """The loader hook: a Loaded for a quantized checkpoint, or (keep_gguf) for a GGUF file kept
    quantized as shipped; None for anything else (for llama_jax.load to read as floats)."""
    from checkpoints_convert.gguf import is_gguf

    if path is not None and is_quantized_checkpoint(path):
        return load_quantized_checkpoint(path, mesh)
    if not keep_gguf:
        return None
    if path is None:
        from llama_jax.checkpoint import default_gguf

        path = default_gguf()
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not is_gguf(path):
        raise ValueError(f"{path}: --keep-quantized needs a GGUF file (quantize other models with `llama-jax quantize`)")
    model = load_gguf(path)
    if mesh is not None:
        model.params = jax.device_put(model.params, param_shardings(model.params, model.config, mesh))
    return model
