"""A fused dequantize-and-multiply GPU kernel (Pallas on Triton) for the few-row matmuls of decoding.

    out = qmatmul(x, q, layer)   # x [M, K] bfloat16 @ layer `layer` of q (QArray [L, K, N]) -> [M, N] float32
    q, k, v = qmatmul(x, (wq, wk, wv), layer)   # weights sharing x and a scheme: one launch
    out = matmul(x, w, layer)    # the same kernel for a bf16 weight: a layer read where it lies in the stack

Left to XLA, `x @ q.dequantize()` writes the whole bf16 weight to HBM and reads it back, so a quantized
decode step moves more bytes than a bf16 one. Here each program reads its [unit, bn] tile of integer
codes and dequantizes it in registers, so the codes are the only weight bytes that cross HBM. One row
(batch-1 decoding) multiplies and adds on the CUDA cores into a tile-shaped accumulator; more rows are
padded to 16 or more and go through the tensor cores as bf16.

The kernel takes the whole stacked weight and a layer index: handing a custom call a slice of the stack
would make XLA copy the slice first (the model's decode scan passes layer views, see ops/matmul.py).
`matmul` runs the int8 path without scales on bf16 weights: the decode step uses it for the attention
output projection `o` (Kernels.stacked_weights), whose slice XLA copies before its cuBLAS call.

Several weights that multiply the same x (q/k/v, gate/up) can run as one launch, their column blocks
side by side. `supported` allows it for int4, where a [4096, 4096] weight alone must split K 32 ways to
fill 132 SMs; for int8 one launch per weight measured faster (bench/BENCHMARKS.md).

Grid: (sum of N) / bn column blocks x `split` parts of K (so that a [4096, 4096] weight still spreads over
every SM: four programs an SM for quantized weights, `pick_blocks`; one for bf16, `pick_dense_blocks`,
where fewer parts measured faster); each program loops over its K part one `unit` of rows at a time (a
scale group, or for per-channel int8 a fixed tile). With split 1 a program's sum is final (per-channel
scale applied in the kernel); otherwise each part is written as float32 [split, M, N] and XLA adds the
parts up and scales them (`pick_blocks` keeps those parts within PARTS_BYTES where it can: at 64 rows they
outgrow the weight).
Per group of g codes with scale s (and zero point z, else -8 s for symmetric int4; qarray.py):
    x . w = s * (x . codes) + z * sum(x)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 64  # larger matmuls (prefill) are compute-bound: XLA's dequantize-then-dot serves them
_SMS = 132  # H100 SXM; only steers how finely K is split
# Bytes of float32 partial sums a launch may write when it splits K: a third of an H100's 50 MB L2, so the
# sum reads them back from L2 rather than HBM. Every split of a 7B decode step at 16 rows stays below it.
PARTS_BYTES = 16 << 20


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def biased_nibbles(nibbles):
    """uint8 values 0..15 -> bfloat16 128 + value, exactly: the value OR-ed into the mantissa of 128.0
    (0x4300), two bit operations instead of a conversion through float32. An int4 decode step at
    batch 16 went from 5.75 to 5.59 ms on an H100 (bench/BENCHMARKS.md)."""
    return jax.lax.bitcast_convert_type(nibbles.astype(jnp.uint16) | jnp.uint16(0x4300), jnp.bfloat16)


def _tc_sum(l, x_ref, c_ref, s_ref, z_ref, cols, first, *, bits, unit, steps, grouped, finish):
    """Rows padded to >= 16: dequantize [unit, bn] tiles to bf16 and multiply on the tensor cores."""
    bn = cols.size

    def body(t, acc):
        u = first + t
        if bits != 4:
            w = c_ref[l, pl.ds(u * unit, unit), cols].astype(jnp.bfloat16)  # [unit, bn], exact
            part = _dot(x_ref[:, pl.ds(u * unit, unit)], w)  # [rows, bn] float32
            if not grouped:  # per channel: the scale multiplies the final sum
                return acc + part
            return acc + part * s_ref[l, u, cols].astype(jnp.float32)[None, :]
        # int4: byte j of a group holds code j (low nibble) and code j + unit/2 (high nibble). The
        # tile goes to the tensor cores as 128 + code (biased_nibbles), so part = x . codes + 128 sum(x).
        h = unit // 2
        b = c_ref[l, pl.ds(u * h, h), cols]  # uint8 [h, bn]
        x0, x1 = x_ref[:, pl.ds(u * unit, h)], x_ref[:, pl.ds(u * unit + h, h)]
        part = _dot(x0, biased_nibbles(b & 0x0F)) + _dot(x1, biased_nibbles(b >> 4))
        xsum = (jnp.sum(x0.astype(jnp.float32), axis=1) + jnp.sum(x1.astype(jnp.float32), axis=1))[:, None]
        s = s_ref[l, u, cols].astype(jnp.float32)[None, :]
        z = z_ref[l, u, cols].astype(jnp.float32)[None, :] if z_ref is not None else -8.0 * s
        return acc + part * s + xsum * (z - 128.0 * s)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], bn), jnp.float32))
    if finish and not grouped and s_ref is not None:  # K is not split: this is the whole sum, scale it
        acc = acc * s_ref[l, 0, cols].astype(jnp.float32)[None, :]
    return acc


def _row_sum(l, x_ref, c_ref, s_ref, z_ref, cols, first, *, bits, unit, steps, grouped, finish):
    """One row (batch-1 decoding): dequantize a tile to float32 and multiply-add it into a tile-shaped
    accumulator on the CUDA cores; the one reduction over rows comes at the end."""
    bn = cols.size
    h = unit // 2 if bits == 4 else unit  # rows of stored values per step

    def body(t, acc):
        u = first + t
        c = c_ref[l, pl.ds(u * h, h), cols]  # [h, bn]
        if bits != 4:
            w = c.astype(jnp.float32)
            if grouped:
                w = w * s_ref[l, u, cols].astype(jnp.float32)[None, :]
            return acc + x_ref[0, pl.ds(u * unit, unit)].astype(jnp.float32)[:, None] * w
        s = s_ref[l, u, cols].astype(jnp.float32)[None, :]
        z = z_ref[l, u, cols].astype(jnp.float32)[None, :] if z_ref is not None else -8.0 * s
        x0 = x_ref[0, pl.ds(u * unit, h)].astype(jnp.float32)[:, None]
        x1 = x_ref[0, pl.ds(u * unit + h, h)].astype(jnp.float32)[:, None]
        return acc + x0 * ((c & 0x0F).astype(jnp.float32) * s + z) + x1 * ((c >> 4).astype(jnp.float32) * s + z)

    acc = jnp.sum(jax.lax.fori_loop(0, steps, body, jnp.zeros((h, bn), jnp.float32)), axis=0)
    if finish and not grouped and s_ref is not None:
        acc = acc * s_ref[l, 0, cols].astype(jnp.float32)
    return acc[None, :]


def _kernel(layer_ref, x_ref, *refs, blocks, per, **kw):
    """Column block j of the weights laid side by side: weight i owns blocks[i] <= j < blocks[i + 1].
    `per` refs per weight: codes, scales(, zero points); or the bf16 weight alone."""
    o_ref = refs[-1]
    bn = o_ref.shape[-1]
    j = pl.program_id(0)
    first = pl.program_id(1) * kw["steps"]  # this program's first unit along K
    total = _row_sum if o_ref.shape[-2] == 1 else _tc_sum  # one row only when _launch keeps it unpadded
    for i in range(len(blocks) - 1):
        w = refs[per * i:per * (i + 1)]

        def run(w=w, lo=blocks[i]):
            cols = pl.ds((j - lo) * bn, bn)
            scales, zeros = (w[1] if per > 1 else None), (w[2] if per > 2 else None)
            o_ref[...] = total(layer_ref[0], x_ref, w[0], scales, zeros, cols, first, **kw)

        if len(blocks) == 2:
            run()
        else:
            pl.when((j >= blocks[i]) & (j < blocks[i + 1]))(run)


def pick_blocks(k_units: int, ns, rows: int, min_programs: int) -> tuple[int, int]:
    """Column block (dividing every N) and K split for `rows` (padded) rows: at least `min_programs`
    programs, so that every SM stays busy, with the widest block and then the fewest parts of K that
    give them. The parts are float32 [split, rows, sum(ns)]: written, then read back by the sum. Where they
    would exceed PARTS_BYTES (64 rows splitting a 7B weight 32 ways write as many bytes as the weight
    holds), the split is capped to fit and narrower blocks make up the programs, where that can be done."""
    fits = [b for b in (128, 64, 32, 16) if all(n % b == 0 for n in ns)]  # 16 always: supported() asks it
    widths = fits[:1] + [b for b in fits[1:] if b >= 32]  # narrower ones only to make up programs
    splits = [d for d in range(1, k_units + 1) if k_units % d == 0]
    cap = max(1, PARTS_BYTES // (rows * sum(ns) * 4))
    bn = widths[0]
    split = next((d for d in splits if sum(ns) // bn * d >= min_programs), k_units)
    if split <= cap:
        return bn, split
    # Capped: the widest block, then the fewest parts, that still give min_programs; where none does (K's
    # units may have no divisor between a few and many), the parts stay as they are.
    capped = ((b, d) for b in widths for d in splits if d <= cap and sum(ns) // b * d >= min_programs)
    return next(capped, (bn, split))


def pick_dense_blocks(k_units: int, ns) -> tuple[int, int]:
    """Column block (dividing every N) and K split for bf16 weights on the tensor cores (16 to 64 rows): the
    fewest parts of K, then the widest block, that give a program per SM. Here fewer, longer programs beat
    filling the SMs four times over (`pick_blocks`): the float32 parts cost a write, a read back and a sum,
    while one program's bf16 loads already keep its SM's memory pipe full (one H100 at 16 rows: o 0.79 ->
    0.61 ms, gate 1.42 -> 1.25, down 1.57 -> 1.32; bench/BENCHMARKS.md). So few parts are written that
    PARTS_BYTES needs no cap here (at most 2 MB for a 7B launch at 64 rows)."""
    fits = [b for b in (128, 64, 32) if all(n % b == 0 for n in ns)] or [16]
    splits = [d for d in range(1, k_units + 1) if k_units % d == 0]
    programs = ((b, d) for d in splits for b in fits if sum(ns) // b * d >= _SMS)
    return next(programs, (fits[-1], k_units))  # too few columns and K for an SM each: the most programs


def supported(q, x) -> bool:
    """Whether the kernel serves x @ q (q a QArray, or a tuple of QArrays to run in one launch): a GPU,
    bf16 activations, few rows, K grouped along rows, and for a tuple one scheme and K throughout."""
    qs = tuple(q) if isinstance(q, (tuple, list)) else (q,)
    k = qs[0].matrix_shape()[0]
    if not rows_fit(x.size // k, x.dtype):
        return False

    def ok(w):
        return (w.axis == -2 and w.matrix_shape()[0] == k and w.matrix_shape()[1] % 16 == 0
                and w.values.shape[-2] * 8 // w.bits == k and _unit(w, k) is not None)

    same = {(w.bits, w.group, w.zeros is None, w.values.ndim) for w in qs}
    # Several int8 weights in one launch measured slower than one launch each (a 7B decode step on an
    # H100: 4.37 against 4.22 ms), int4 faster (3.95 against 4.63 ms): bench/BENCHMARKS.md.
    one_launch_pays = len(qs) == 1 or qs[0].bits == 4
    return len(same) == 1 and one_launch_pays and all(ok(w) for w in qs)


def rows_fit(rows: int, dtype) -> bool:
    """Whether the kernels take products of `rows` rows of `dtype` activations: bf16, at most MAX_ROWS
    rows. `supported` and `supported_dense` add what each needs of the weights."""
    return dtype == jnp.bfloat16 and rows <= MAX_ROWS


def supported_dense(w, x) -> bool:
    """Whether `matmul` serves x [M, K] @ w (a bf16 weight [(L,) K, N], or a tuple of them sharing K)."""
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    k = x.shape[-1]
    return (rows_fit(x.size // k, x.dtype) and k % 16 == 0
            and all(a.dtype == jnp.bfloat16 and a.shape[-2] == k and a.shape[-1] % 16 == 0 for a in ws))


def _unit(q, k: int, rows: int = 128) -> int | None:
    """Rows of K per loop step: a scale group, or for per-channel int8 `_tile_rows`."""
    if q.bits == 4 or q.group < k:
        return q.group if q.group >= 16 else None
    return _tile_rows(k, rows)


def _default_rows(m: int, tensor_cores: bool) -> int:
    """K rows per loop step for a weight without groups, unless set: 64 for one row on the CUDA cores
    (its accumulator is a [rows, bn] tile), 128 for the tensor cores."""
    return 64 if m == 1 and not tensor_cores else 128


def _tile_rows(k: int, rows: int) -> int | None:
    """Rows of K per loop step for a weight without groups: the largest of `rows`, 64, 32, 16 (none
    above `rows`) that divides K."""
    return next((u for u in (rows, 64, 32, 16) if u <= rows and k % u == 0), None)


@functools.partial(jax.jit, static_argnames=("bn", "split", "rows", "num_warps", "num_stages", "tensor_cores",
                                              "interpret"))
def qmatmul(x, q, layer=None, *, bn=None, split=None, rows=None, num_warps=None, num_stages=3, tensor_cores=False,
            interpret=False):
    """x [M, K] @ q -> float32 [M, N]. q: a 2-D QArray [K, N], or a stacked one [L, K, N] with `layer`;
    or a tuple of such QArrays with one K and scheme (q/k/v, gate/up), multiplied in one launch and
    returned as a tuple. bn, split, rows (K rows per step, per-channel int8), num_warps, num_stages:
    block settings; tensor_cores: pad one row to 16 rows for the tensor cores (slower on an H100, kept
    for the sweep). The defaults are the best of a sweep on an H100 (bench/quantize_matvec.py --sweep,
    bench/BENCHMARKS.md)."""
    many = isinstance(q, (tuple, list))
    qs = tuple(w.as_stack() for w in (q if many else (q,)))
    q0 = qs[0]
    k = x.shape[1]
    unit = _unit(q0, k, rows or _default_rows(x.shape[0], tensor_cores))
    grouped = q0.bits == 4 or q0.group < k
    args = [tuple(a for a in (w.values, w.scales, w.zeros) if a is not None) for w in qs]
    outs, finished = _launch(x, args, [w.matrix_shape()[1] for w in qs], layer, bits=q0.bits, unit=unit,
                             grouped=grouped, bn=bn, split=split, num_warps=num_warps,
                             num_stages=num_stages, interpret=interpret, tensor_cores=tensor_cores)
    if not grouped and not finished:  # per channel with K split: the scale multiplies the summed parts
        outs = [o * w.scales[0 if layer is None else layer, 0].astype(jnp.float32) for o, w in zip(outs, qs)]
    return tuple(outs) if many else outs[0]


@functools.partial(jax.jit, static_argnames=("bn", "split", "rows", "num_warps", "num_stages", "tensor_cores",
                                              "interpret"))
def matmul(x, w, layer=None, *, bn=None, split=None, rows=None, num_warps=None, num_stages=3, tensor_cores=False,
           interpret=False):
    """x [M, K] @ w -> float32 [M, N] for a bf16 weight: [K, N], or layer `layer` of a stack [L, K, N]
    read where it lies (XLA slices a stacked weight into a copy before handing it to cuBLAS); a tuple
    of weights with one K runs in one launch. Settings as in `qmatmul`."""
    many = isinstance(w, (tuple, list))
    ws = tuple(a if a.ndim == 3 else a[None] for a in (w if many else (w,)))
    k = x.shape[1]
    unit = _tile_rows(k, rows or _default_rows(x.shape[0], tensor_cores))
    outs, _ = _launch(x, [(a,) for a in ws], [a.shape[-1] for a in ws], layer, bits=16, unit=unit,
                      grouped=False, bn=bn, split=split, num_warps=num_warps, num_stages=num_stages,
                      interpret=interpret, tensor_cores=tensor_cores)
    return tuple(outs) if many else outs[0]


def _launch(x, args, ns, layer, *, bits, unit, grouped, bn, split, num_warps, num_stages, interpret,
            tensor_cores):
    """One pallas_call over weights given as their operand tuples `args`, of N columns `ns` ->
    ([M, n] float32 per weight, whether each program summed all of K)."""
    m, k = x.shape
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    one_row = m == 1 and not tensor_cores
    mp = 1 if one_row else max(16, pl.next_power_of_2(m))  # the tensor cores want >= 16 rows
    if bits == 16 and not one_row:
        auto_bn, auto_split = pick_dense_blocks(k // unit, ns)
    else:
        auto_bn, auto_split = pick_blocks(k // unit, ns, mp, (2 if one_row and bits == 8 else 4) * _SMS)
    num_warps = num_warps or (8 if one_row else 4)
    bn, split = bn or auto_bn, split or auto_split
    if any(n % bn for n in ns) or (k // unit) % split:
        raise ValueError(f"qmatmul: bn={bn} must divide every N {ns} and split={split} the {k // unit} "
                         f"units of K")
    xp = x.astype(jnp.bfloat16)
    if mp != m:
        xp = jnp.pad(xp, ((0, mp - m), (0, 0)))
    blocks = tuple(int(b) for b in np.cumsum([0] + [n // bn for n in ns]))
    finish = split == 1
    kernel = functools.partial(_kernel, blocks=blocks, per=len(args[0]), bits=bits, unit=unit,
                               steps=k // unit // split, grouped=grouped, finish=finish)
    kw = {}
    if not interpret:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    flat = [a for w in args for a in w]
    parts = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, mp, sum(ns)), jnp.float32),
        grid=(blocks[-1], split),
        in_specs=[pl.no_block_spec] * (2 + len(flat)),
        out_specs=pl.BlockSpec((None, mp, bn), lambda j, s: (s, 0, j)),
        interpret=interpret,
        **kw,
    )(layer, xp, *flat)
    out = parts[0] if finish else parts.sum(0)
    return [out[:m, lo:lo + n] for lo, n in zip(np.cumsum([0] + ns), ns)], finish
