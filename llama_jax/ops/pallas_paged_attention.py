"""A decode step's attention over a paged KV cache, as one Pallas (Triton) kernel for GPUs.

Each sequence's keys and values lie in fixed-size blocks of a pool shared by every sequence, in the order
its block table names them. A program takes several query heads of one row (a kv head's group under
GQA, each block read once for all of them; otherwise HEADS_PER_PROGRAM heads side by side, for longer
contiguous reads) and walks that row's blocks up to its length with an online softmax, reading each
block where it lies, widened to float32 (the pool may hold 8-bit floats: `serve --cache-dtype`). The XLA
reference (paged_attention.py) gathers every row's blocks into a dense copy first, which a decode step
at batch 256 pays for in HBM traffic: the copy is written once and read back. Long rows of a small batch
are split over several programs (flash-decoding), each taking a part of the row's own blocks, and
combined here; the table's width costs nothing.

jax.experimental.pallas.ops.gpu ships a paged attention too, but it is deprecated (importing it warns),
takes one layer's pool laid out head-major ([kv_heads, blocks, block, head_dim]), and pads each kv head's
query group to 16 rows for its dot. The decode scan carries every layer's pool, and XLA copies a slice it
hands to a custom call, so this kernel takes the whole pool and a layer index, in our layout
([layers, blocks, block, kv_heads, head_dim]), and one query row per program with vector products.
HEADS_PER_PROGRAM, NUM_WARPS and NUM_STAGES are the fastest of a sweep on an H100 (bench/BENCHMARKS.md).
A loop step can read several blocks, their loads independent so that more bytes are in flight a program:
BLOCKS_PER_STEP stays 1, level with a bf16 pool in a sweep on an H100 (`bench/paged_attention_check.py
--variants`; 9-11% faster with an 8-bit pool, not yet tried end to end).

`tensor_cores` chooses a second form of the loop (`_dot_kernel`; ops/paged_attention.dot_form picks it
where query heads share kv heads, 2.9x the vector form there on an H100): the block's keys as one 2-D tile
[block * heads, head_dim] and the program's queries padded to 16 rows, so that scores and the weighted
values are two `dot`s on tensor cores. Without GQA each query head has its own keys, so the scores
[16, block * heads] hold every head against every head's keys, and a mask keeps each head's own; the
waste is in tensor-core work, and without GQA it measured 4-57% slower than the vector form. Under GQA
the vector form repeats each block's products for every query head of its program, the dot form not.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30  # a finite "minus infinity": exp(_NEG - _NEG) stays finite for a split with no keys
FILL_PROGRAMS = 264  # split the rows over programs until about two per SM of an H100 or H200
HEADS_PER_PROGRAM = 8  # query heads a program takes where they read distinct kv heads (no GQA)
NUM_WARPS, NUM_STAGES = 4, 2
BLOCKS_PER_STEP = 1  # pool blocks a loop step reads
DOT_ROWS = 16  # the least M of a Triton dot: a program's query heads are padded to it


def _kernel(layer_ref, tables_ref, lengths_ref, q_ref, k_ref, v_ref, *out_refs, block, splits, group, rep,
            per_step, scale):
    """Program (b, j, c): query heads j * group .. (j + 1) * group - 1 of row b, over part c of `splits` of
    the row's blocks that hold keys (slot < length), `per_step` blocks a loop step (their loads independent
    of each other, so they are in flight together). The parts divide each row's own blocks, not the table's
    width, so a wide table costs nothing. With group <= rep the program's heads share one kv head, read
    once; otherwise (rep 1) each reads its own, side by side. One split: the program writes the output.
    Several: its unnormalised sums, running maxima and totals."""
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, length = layer_ref[0], lengths_ref[b]
    q = q_ref[b, pl.ds(j * group, group), :].astype(jnp.float32) * scale  # [group, head_dim]
    shared = group <= rep

    def read(ref, page):  # -> [block, 1, head_dim] (one kv head for all) or [block, group, head_dim]
        if shared:
            return ref[layer, page, :, (j * group) // rep, :].astype(jnp.float32)[:, None, :]
        return ref[layer, page, :, pl.ds(j * group, group), :].astype(jnp.float32)

    def body(i, carry):
        m, total, acc = carry  # [group], [group], [group, head_dim]
        firsts = [(i * per_step + n) * block for n in range(per_step)]  # each block's first slot
        ids = [tables_ref[b, i * per_step + n] for n in range(per_step)]
        oks = [(first + jnp.arange(block) < length)[:, None] for first in firsts]  # [block, 1] each
        scores = [jnp.where(ok, jnp.sum(read(k_ref, page) * q[None], axis=2), _NEG)  # [block, group] each
                  for ok, page in zip(oks, ids)]
        m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=0) for s in scores], m)
        alpha = jnp.exp(m - m_new)
        total, acc = total * alpha, acc * alpha[:, None]
        for ok, s, page in zip(oks, scores, ids):
            p = jnp.where(ok, jnp.exp(s - m_new[None, :]), 0.0)  # padding slots stay 0 even while m_new is _NEG
            total = total + jnp.sum(p, axis=0)
            acc = acc + jnp.sum(p[:, :, None] * read(v_ref, page), axis=0)  # [group, head_dim]
        return m_new, total, acc

    _walk(body, out_refs, q.shape, length, c, block=block, splits=splits, per_step=per_step)


def _walk(body, out_refs, shape, length, c, *, block, splits, per_step):
    """Run `body` over loop steps of `per_step` blocks: this program's part c of `splits` of the row's
    blocks that hold keys (slot < length), from an empty online softmax over `shape` [rows, head_dim];
    then write. One split: the program's output. Several: its unnormalised sums, running maxima and
    totals."""
    rows, _ = shape
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros(shape, jnp.float32))
    used = (length + block - 1) // block  # the row's blocks
    part = (used + splits * per_step - 1) // (splits * per_step) * per_step  # blocks a program, whole loop steps
    last = jnp.minimum((c + 1) * part, used)  # slots past the row's keys in the last step are masked
    m, total, acc = jax.lax.fori_loop(c * part // per_step, (last + per_step - 1) // per_step, body, init)
    if len(out_refs) == 1:  # a row of no keys (padding) gets zeros, not 0 / 0
        out_refs[0][...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_refs[0].dtype)
    else:
        acc_ref, m_ref, total_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m[:, None]
        total_ref[...] = total[:, None]


def _dot_kernel(layer_ref, tables_ref, lengths_ref, q_ref, k_ref, v_ref, *out_refs, block, splits, group, rep,
                per_step, dtype):
    """Program (b, j, c) as in `_kernel`, its products as dots: q_ref holds each program's query heads
    already scaled and padded to `rows` (zero rows past `group`), and the outputs keep the padding rows,
    which the caller drops. With group <= rep the heads share one kv head: scores [rows, block] a block.
    Otherwise the keys of the program's heads form one tile [block * group, head_dim], and column
    t * group + h of the scores is head h's key t: row h keeps only its own columns."""
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, length = layer_ref[0], lengths_ref[b]
    q = q_ref[b, j].astype(dtype)  # [rows, head_dim]
    rows, head_dim = q.shape
    shared = group <= rep
    cols = block if shared else block * group
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    slot = col if shared else col // group  # each column's slot in the block
    mine = True if shared else col % group == jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)

    def read(ref, page):  # -> [cols, head_dim]
        if shared:
            return ref[layer, page, :, (j * group) // rep, :].astype(dtype)
        return ref[layer, page, :, pl.ds(j * group, group), :].astype(dtype).reshape(cols, head_dim)

    def body(i, carry):
        m, total, acc = carry  # [rows], [rows], [rows, head_dim]
        ids = [tables_ref[b, i * per_step + n] for n in range(per_step)]
        oks = [((i * per_step + n) * block + slot < length) & mine for n in range(per_step)]  # [rows, cols]
        scores = [jnp.where(ok, jax.lax.dot_general(q, read(k_ref, page), (((1,), (1,)), ((), ())),
                                                    preferred_element_type=jnp.float32), _NEG)
                  for ok, page in zip(oks, ids)]
        m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=1) for s in scores], m)
        alpha = jnp.exp(m - m_new)
        total, acc = total * alpha, acc * alpha[:, None]
        for ok, s, page in zip(oks, scores, ids):
            p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
            total = total + jnp.sum(p, axis=1)
            acc = acc + jnp.dot(p.astype(dtype), read(v_ref, page), preferred_element_type=jnp.float32)
        return m_new, total, acc

    _walk(body, out_refs, q.shape, length, c, block=block, splits=splits, per_step=per_step)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(q: jax.Array, pool_k: jax.Array, tensor_cores: bool = False) -> bool:
    """Whether `paged_attention` takes these: one query per row, a pool of q's dtype or of 8-bit floats
    (float8_e4m3fn: read and widened to float32 in the kernel), and a block size and head_dim that are
    powers of two (Triton's tiles), head_dim at least 16; for the dot form (`tensor_cores`) blocks of at
    least DOT_ROWS slots."""
    return (q.ndim == 4 and q.shape[1] == 1 and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
            and pool_k.dtype in (q.dtype, jnp.float8_e4m3fn) and _pow2(pool_k.shape[2]) and _pow2(q.shape[-1])
            and q.shape[-1] >= 16 and (not tensor_cores or pool_k.shape[2] >= DOT_ROWS))


def heads_per_program(heads: int, kv_heads: int) -> int:
    """A kv head's query heads together (each block read once for all of them); without GQA,
    HEADS_PER_PROGRAM heads side by side (longer contiguous reads, fewer loop steps in all)."""
    rep = heads // kv_heads
    group = rep if rep > 1 else HEADS_PER_PROGRAM
    while heads % group or not _pow2(group):
        group //= 2
    return max(group, 1)


def paged_attention(
    q: jax.Array,  # [batch, heads, head_dim], after rotary
    pool_k: jax.Array,  # [layers, blocks, block, kv_heads, head_dim]
    pool_v: jax.Array,  # like pool_k
    layer: jax.Array,  # int32 scalar
    tables: jax.Array,  # int32 [batch, width]: each row's blocks, in order
    lengths: jax.Array,  # int32 [batch]: keys per row (slots 0 .. length - 1); 0 for padding rows
    *,
    group: int | None = None,  # query heads a program takes (default: heads_per_program)
    blocks_per_step: int = BLOCKS_PER_STEP,  # a power of two, at most the table's width
    tensor_cores: bool = False,  # the dot form
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:  # [batch, heads, head_dim]
    """Each row's query heads against the first `length` slots of its blocks in layer `layer` of the pool."""
    batch, heads, head_dim = q.shape
    block, kv_heads = pool_k.shape[2], pool_k.shape[3]
    rep = heads // kv_heads
    group = group or heads_per_program(heads, kv_heads)
    if heads % group or not _pow2(group) or (group > rep and rep > 1) or (group < rep and rep % group):
        raise ValueError(f"group={group}: expected a power of two dividing the {heads} heads, at most the "
                         f"{rep} query heads of a kv head unless there is one each")
    width = tables.shape[1]
    if not _pow2(blocks_per_step) or width % blocks_per_step:
        raise ValueError(f"blocks_per_step={blocks_per_step}: expected a power of two dividing the block "
                         f"tables' width {width}")
    if tensor_cores and block < DOT_ROWS:
        raise ValueError(f"tensor_cores: a pool block of {block} slots; a dot needs at least {DOT_ROWS}")
    programs = batch * (heads // group)
    splits = min(width // blocks_per_step, pl.cdiv(FILL_PROGRAMS, programs))
    # The outputs' rows a program: its query heads, padded to DOT_ROWS in the dot form (dropped below).
    rows = max(group, DOT_ROWS) if tensor_cores else group
    if tensor_cores:
        # The dots' inputs: float16 for an 8-bit pool, which widens to it in one instruction a pair (to bf16
        # it takes several; bench/kernel_build.py: 874 loop instructions against 1,276), q's dtype otherwise.
        # float16 holds e4m3 exactly, softmax weights in [0, 1], and queries below its 65,504.
        dtype = jnp.float32 if q.dtype == jnp.float32 else (
            jnp.float16 if pool_k.dtype == jnp.float8_e4m3fn else jnp.bfloat16)
        kernel = functools.partial(_dot_kernel, block=block, splits=splits, group=group, rep=rep,
                                   per_step=blocks_per_step, dtype=dtype)
        q_in = (q.astype(jnp.float32) / math.sqrt(head_dim)).reshape(batch, heads // group, group, head_dim)
        q_in = jnp.pad(q_in, ((0, 0), (0, 0), (0, rows - group), (0, 0))).astype(q.dtype)
    else:
        kernel = functools.partial(_kernel, block=block, splits=splits, group=group, rep=rep, per_step=blocks_per_step,
                                   scale=1.0 / math.sqrt(head_dim))
        q_in = q
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, heads // group, rows, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, j, c: (b, j, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, batch, heads // group, rows, n), jnp.float32)
                     for n in (head_dim, 1, 1)]
        out_specs = [pl.BlockSpec((None, None, None, rows, n), lambda b, j, c: (c, b, j, 0, 0))
                     for n in (head_dim, 1, 1)]
    kw = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
    out = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(batch, heads // group, splits),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=tuple(out_specs),
        interpret=interpret,
        **kw,
    )(jnp.asarray(layer, jnp.int32).reshape(1), tables.astype(jnp.int32), lengths.astype(jnp.int32), q_in,
      pool_k, pool_v)
    out = [x[..., :group, :].reshape(*x.shape[:-3], heads, x.shape[-1]) for x in out]  # padding rows dropped
    if splits == 1:
        return out[0]
    acc, m, total = out  # splits past a row's length hold m = _NEG and zeros: their weight below is 0
    weight = jnp.exp(m - m.max(axis=0))  # [splits, batch, heads, 1]
    total = (total * weight).sum(0)
    return ((acc * weight).sum(0) / jnp.where(total > 0, total, 1.0)).astype(q.dtype)
