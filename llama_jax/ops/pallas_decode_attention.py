"""A decode step's attention for one layer as one Pallas (Triton) kernel for GPUs: rotary on the new
query and key, the new key and value written into the cache in place, and attention over the cache's
slots read where they lie. XLA spends about ten small kernels on the same (ops/attention.py holds that
reference, and chooses this kernel where the kernel policy says "pallas" and `supported`)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu




def _decode_kernel(layer_ref, start_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, mask_ref, cache_k_in, cache_v_in,
                   *out_refs, block, chunk, rep, scale):
    """Program (b, h, c): query head h of row b against kv head g = h // rep of the cache's layer, over
    chunk c (`chunk` blocks of `block` slots), one block at a time with an online softmax, up to the
    block that holds slot `start`.

    q and the new k arrive unrotated: the program rotates them (Hugging Face's half split, each half
    loaded on its own) and rounds them to the cache dtype, as the XLA path does. The new token's k and v
    replace slot `start` in registers, so no program depends on another's write; the program of head
    g * rep in the chunk holding `start` writes them to the cache (aliased in and out).
    One chunk: the program writes the output. Several: its unnormalised sum, running max and total."""
    layer, start = layer_ref[0], start_ref[0]
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = h // rep
    half = q_ref.shape[-1] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    cos, sin = cos_ref[b, :], sin_ref[b, :]  # [half] float32
    dt = cache_k_in.dtype

    def rotate(ref, head):  # -> both halves, rotated and rounded to the cache dtype, as float32
        x1, x2 = ref[b, head, lo].astype(jnp.float32), ref[b, head, hi].astype(jnp.float32)
        return ((x1 * cos - x2 * sin).astype(dt).astype(jnp.float32),
                (x2 * cos + x1 * sin).astype(dt).astype(jnp.float32))

    q1, q2 = rotate(q_ref, h)
    q1, q2 = q1 * scale, q2 * scale
    k1_new, k2_new = rotate(k_ref, g)
    v_new = v_ref[b, g, :].astype(jnp.float32)

    def body(t, carry):
        m, total, acc = carry
        slots = pl.ds(t * block, block)
        here = (t * block + jnp.arange(block) == start)[:, None]  # [block, 1]: the new token's slot
        k1 = jnp.where(here, k1_new[None, :], cache_k_in[layer, b, slots, g, lo].astype(jnp.float32))
        k2 = jnp.where(here, k2_new[None, :], cache_k_in[layer, b, slots, g, hi].astype(jnp.float32))
        ok = mask_ref[b, slots] != 0  # [block]
        s = jnp.where(ok, jnp.sum(k1 * q1[None, :], axis=1) + jnp.sum(k2 * q2[None, :], axis=1), _NEG)
        m_new = jnp.maximum(m, jnp.max(s))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)  # masked slots stay 0 even while m_new is _NEG
        alpha = jnp.exp(m - m_new)
        v = jnp.where(here, v_new[None, :], cache_v_in[layer, b, slots, g, :].astype(jnp.float32))
        return m_new, total * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v, axis=0)

    init = (jnp.float32(_NEG), jnp.float32(0.0), jnp.zeros(v_new.shape, jnp.float32))
    last = jnp.minimum((c + 1) * chunk, start // block + 1)
    m, total, acc = jax.lax.fori_loop(c * chunk, last, body, init)

    *outs, cache_k_out, cache_v_out = out_refs

    @pl.when((h % rep == 0) & (c == start // (block * chunk)))
    def _():
        cache_k_out[layer, b, start, g, lo] = k1_new.astype(dt)
        cache_k_out[layer, b, start, g, hi] = k2_new.astype(dt)
        cache_v_out[layer, b, start, g, :] = v_new.astype(dt)

    if len(outs) == 1:
        outs[0][...] = (acc / total).astype(outs[0].dtype)
    else:
        acc_ref, m_ref, total_ref = outs
        acc_ref[...] = acc
        m_ref[...] = jnp.broadcast_to(m, (1,))
        total_ref[...] = jnp.broadcast_to(total, (1,))


_NEG = -1e30  # a finite "minus infinity": exp(_NEG - _NEG) stays finite for a block of padding only
FILL_PROGRAMS = 264  # split the cache over programs (flash-decoding) until about two per SM of an H100


def decode_block(max_len: int, programs: int = 1) -> int | None:
    """Slots a program reads at a time: 64, or 32 once batch x heads programs fill the GPU without splitting
    the cache. A program then reads up to its new token's block alone, and a smaller last block wastes
    fewer slots past the token (a bf16 7B step at batch 16 on an H100: 6.116 ms against 6.314 with 64)."""
    sizes = (32, 16) if programs >= FILL_PROGRAMS else (64, 32, 16)
    return next((b for b in sizes if max_len % b == 0), None)


def supported(q: jax.Array, cache_k: jax.Array) -> bool:
    """Whether `decode_attention` takes these: one 16-bit query per row, a cache of the same dtype whose
    length a block (16 slots or more) divides, head_dim a multiple of 32."""
    return (q.shape[1] == 1
            and q.dtype in (jnp.bfloat16, jnp.float16) and cache_k.dtype == q.dtype
            and decode_block(cache_k.shape[2]) is not None and q.shape[-1] % 32 == 0)


def decode_attention(
    q: jax.Array,  # [batch, 1, heads, head_dim], before rotary
    k: jax.Array,  # [batch, 1, kv_heads, head_dim], before rotary
    v: jax.Array,  # [batch, 1, kv_heads, head_dim]
    rope: tuple[jax.Array, jax.Array],  # cos, sin [batch, 1, 1, head_dim / 2] float32 (model.rope_tables)
    cache_k: jax.Array,  # [layers, batch, max_len, kv_heads, head_dim]
    cache_v: jax.Array,  # like cache_k
    layer: jax.Array,  # int32 scalar: the layer
    start: jax.Array,  # int32 scalar: the new token's slot
    mask: jax.Array,  # [batch, 1, max_len] bool, True = may attend (slots after `start` are False)
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [batch, 1, heads, head_dim], cache_k, cache_v
    """One decode step's attention for one layer, as one Pallas kernel (see `_decode_kernel`): rotary
    on q and k, the new k and v written into the cache in place, attention over the layer's slots up
    to `start` read where they lie. XLA spends about ten small kernels on this; `supported` says which
    shapes it takes. Caches longer than a few blocks are split over programs and combined here."""
    batch, _, heads, head_dim = q.shape
    max_len, kv_heads = cache_k.shape[2], cache_k.shape[3]
    programs = batch * heads  # before the cache is split over more
    block = decode_block(max_len, programs)
    n_blocks = max_len // block
    chunk = pl.cdiv(n_blocks, min(n_blocks, pl.cdiv(FILL_PROGRAMS, programs)))  # blocks per program
    chunks = pl.cdiv(n_blocks, chunk)
    kernel = functools.partial(_decode_kernel, block=block, chunk=chunk, rep=heads // kv_heads,
                               scale=1.0 / math.sqrt(head_dim))
    if chunks == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, heads, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, head_dim), lambda b, h, c: (b, h, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((chunks, batch, heads, n), jnp.float32) for n in (head_dim, 1, 1)]
        out_specs = [pl.BlockSpec((None, None, None, n), lambda b, h, c: (c, b, h, 0)) for n in (head_dim, 1, 1)]
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (cache_k, cache_v)]  # aliased: updated in place
    out_specs += [pl.no_block_spec, pl.no_block_spec]
    n_out = len(out_shape)
    kw = {}
    if not interpret:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    cos, sin = (t.reshape(batch, head_dim // 2) for t in rope)
    scalars = (jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(start, jnp.int32).reshape(1))
    *out, cache_k, cache_v = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(batch, heads, chunks),
        in_specs=[pl.no_block_spec] * 10,
        out_specs=tuple(out_specs),
        input_output_aliases={8: n_out - 2, 9: n_out - 1},
        interpret=interpret,
        **kw,
    )(*scalars, q[:, 0], k[:, 0], v[:, 0], cos, sin, mask[:, 0].astype(jnp.int32), cache_k, cache_v)
    if chunks == 1:
        out = out[0]
    else:
        acc, m, total = out  # chunks past `start` hold m = _NEG and zeros: their weight below is 0
        weight = jnp.exp(m - m.max(axis=0))  # [chunks, batch, heads, 1]
        out = ((acc * weight).sum(0) / (total * weight).sum(0)).astype(q.dtype)
    return out[:, None], cache_k, cache_v
