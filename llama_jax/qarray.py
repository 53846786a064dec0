"""The quantized weight: `QArray`, integer codes plus a float scale (and, for int4, optionally a zero
point) per group of weights along the contraction axis, the llama.cpp way; and `quantize`, which makes
one from a float weight. Whole models: quantize.py. Multiplying by one: ops/matmul.py.

A QArray is a pytree node standing where the float array stood, so under jit the integer codes are what
lives in memory. `.astype` dequantizes, for code that wants the float weight.

Layout. A QArray stores its weight as a matrix [*layers, K, N], K the contraction (input) axis and N
the output axis, merging the head axes: q/k/v [D, H, hd] -> [D, H*hd], o [H, hd, D] -> [H*hd, D] (so an
int4 group may span heads when head_dim is smaller than the group). The embedding [V, D] is grouped
along D, its last axis (axis=-1), so that its transpose is the tied lm_head grouped along its
contraction axis. `shape` is the logical shape; `.astype` reshapes to it.

Schemes (value = what a code decodes to; s = scale, z = zero point, per group of `group` codes):
  int8  codes q in [-127, 127]              value = q * s        per output channel (group = K) or groups
  int4  codes u in [0, 15], symmetric       value = (u - 8) * s   (llama.cpp Q4_0)
        with a zero point                   value = u * s + z     (llama.cpp Q4_1: z is the group's minimum)
  nf4   codes u in [0, 15]                  value = NF4[u] * s    (QLoRA's NormalFloat: s is the group's
                                                                   absmax, NF4 the 16 quantiles of a normal)
int4 codes are packed two per byte, in llama.cpp's order within each group: byte j holds code j in its
low nibble and code j + group/2 in its high nibble. So GGUF Q4 blocks (group 32) become QArrays by moving
bytes, never by decoding them. When `group` does not divide K, K is padded up to a multiple of it
(with copies of the last weight, so no group's range changes); dequantizing cuts the padding off.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

GROUPS = (32, 64, 128)

# NormalFloat4 (Dettmers et al., 2023, Appendix E): the 16 values NF4 codes decode to, times the absmax.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
CODEBOOKS = {"nf4": NF4}


# ---------------------------------------------------------------------------------------------
# The quantized array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "zeros"],
                   meta_fields=["bits", "group", "axis", "tail", "split", "codebook"])
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
    codebook: str | None = None  # "nf4": codes index CODEBOOKS[codebook] (no kernel reads these; XLA does)

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
                      tuple(self.tail[::-1]), len(self.tail) - self.split, self.codebook)

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(x) for x in (self.values, self.scales, self.zeros) if x is not None)

    def matrix_shape(self) -> tuple[int, int]:
        return math.prod(self.tail[:self.split]), math.prod(self.tail[self.split:])

    def take(self, layer) -> "QArray":
        """Layer `layer` of a stacked QArray, as a QArray of its own."""
        return jax.tree.map(lambda a: a[layer], self)

    def as_stack(self) -> "QArray":
        """A stacked QArray as it is; a single weight as a stack of one (a reshape, no copy). The kernels
        take a stack and a layer index."""
        return self if self.values.ndim == 3 else jax.tree.map(lambda a: a[None], self)

    def shardings(self, axes: tuple, sharding_for) -> "QArray":
        """This QArray with a sharding in place of each stored array (sharding.param_shardings asks):
        each gets `sharding_for(axes, shape)` for its matrix's logical axes (`matrix_axes`)."""
        m = matrix_axes(axes, self)
        one = lambda x: None if x is None else sharding_for(m, tuple(x.shape))  # noqa: E731
        return dataclasses.replace(self, values=one(self.values), scales=one(self.scales), zeros=one(self.zeros))

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
        if self.codebook is not None:
            w = jnp.asarray(CODEBOOKS[self.codebook], jnp.float32)[c.astype(jnp.int32)] * s
        elif self.zeros is not None:
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


def nbytes_of(x) -> int:
    """Bytes of an array or ShapeDtypeStruct as stored."""
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


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "zero_point", "scale_dtype", "codebook"))
def quantize_matrix(w: jax.Array, bits: int, group: int | None, axis: int = -2, zero_point: bool = False,
                    scale_dtype: str = "float16", codebook: str | None = None):
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
    if codebook is not None:  # the nearest code book value to w / absmax
        s = stored(jnp.max(jnp.abs(wg), axis=a + 1, keepdims=True))
        book = jnp.asarray(CODEBOOKS[codebook], jnp.float32)
        codes = jnp.argmin(jnp.abs(divide(wg, s)[..., None] - book), axis=-1).reshape(shape)
        values = _pack_nibbles(codes, a, g)
    elif bits == 8:
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
             stacked: bool = False, zero_point: bool = False, scale_dtype: str = "float16",
             codebook: str | None = None) -> QArray:
    """A float weight as a QArray. Its logical axes tail[:split] are the matrix rows (for a linear
    weight: the contraction axes), the rest its columns; `stacked`: a leading layers axis.

    group None is per-channel (int8 only): one scale per output column, over all of K. `codebook`
    "nf4": 4-bit NormalFloat codes (symmetric, the group's absmax as its scale)."""
    if codebook is not None and (codebook not in CODEBOOKS or bits != 4 or zero_point):
        raise ValueError(f"codebook {codebook!r}: one of {', '.join(CODEBOOKS)}, with bits 4 and no zero point")
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
                          scale_dtype=scale_dtype, codebook=codebook)
    # One layer at a time: the float32 temporaries stay the size of a layer, not of the model.
    values, scales, zeros = jax.lax.map(f, m) if stacked else f(m)
    k = (rows, cols)[axis]
    return QArray(values, scales, zeros, bits, k if group is None else group, axis, tail, split, codebook)


def matrix_axes(axes: tuple, leaf: QArray) -> tuple:
    """Logical axes of a QArray's stored matrix, from its weight's logical `axes`: a merged axis is
    named after its leading (major) axis, e.g. q (layers, embed, heads, head_dim) -> (layers, embed,
    heads). Splitting a merged axis over a mesh axis that divides its leading axis keeps whole heads
    on each device."""
    stack = tuple(axes[:len(axes) - len(leaf.tail)])
    tail = tuple(axes[len(stack):])
    return stack + (tail[0], tail[leaf.split])
