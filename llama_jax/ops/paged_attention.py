"""Attention over a paged KV cache (the serving engine's), chosen by the kernel policy.

    out, pool_k, pool_v = paged_attention(kernels, q, k, v, rope, pool_k, pool_v, layer, tables, positions,
                                          token_mask, rotate)

The pool holds every layer's keys and values in fixed-size blocks, [layers, blocks, block, kv_heads,
head_dim], shared by all sequences. Row b of a batch owns the blocks `tables[b]` names, in order: the key of
its token at position p lies in block tables[b, p // block], slot p % block. So a sequence's memory grows a
block at a time with its tokens, and rows of any lengths share one batch without padding in the cache.

The op rotates q and k (the model's own `rotate`), writes the new keys and values at their positions
(tokens under token_mask False, a batch's padding, go to block 0, which no sequence owns), then attends:
each query reads its row's slots up to its own position. The reference gathers each row's blocks into a
dense [batch, width * block] copy and runs XLA's attention over it; for a decode step (one token a row) on
one GPU the policy's kernel (Kernels.paged_attention "pallas", pallas_paged_attention.py) reads the blocks
where they lie, in its tensor-core form where query heads share kv heads (`dot_form`). A prefill chunk
(several tokens a row) always takes the reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from llama_jax.ops import pallas_paged_attention
from llama_jax.ops.policy import Kernels

NO_BLOCK = 0  # the block padding tokens write to: the engine never hands it to a sequence


def paged_attention(
    kernels: Kernels,
    q: jax.Array,  # [batch, seq, heads, head_dim], before rotary
    k: jax.Array,  # [batch, seq, kv_heads, head_dim], before rotary
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    rope: tuple[jax.Array, jax.Array],  # cos, sin [batch, seq, 1, head_dim / 2] float32
    pool_k: jax.Array,  # [layers, blocks, block, kv_heads, head_dim]
    pool_v: jax.Array,  # like pool_k
    layer: jax.Array,  # int32 scalar
    tables: jax.Array,  # int32 [batch, width]: each row's blocks, in order
    positions: jax.Array,  # int32 [batch, seq]: each new token's position in its sequence
    token_mask: jax.Array,  # bool [batch, seq]: False for padding (not written; its output is garbage)
    rotate: Callable[[jax.Array, tuple[jax.Array, jax.Array]], jax.Array],  # the model's rotary
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [batch, seq, heads, head_dim], pool_k, pool_v
    """The new tokens' keys and values written into layer `layer` of the pool, and each query's attention
    over its row's positions 0 .. its own."""
    q, k = rotate(q, rope), rotate(k, rope)
    pool_k, pool_v = write(pool_k, pool_v, layer, k, v, tables, positions, token_mask)
    if q.shape[1] == 1 and decode_reads_in_place(kernels, pool_k, q.shape[2], q.dtype):
        lengths = jnp.where(token_mask[:, 0], positions[:, 0] + 1, 0)
        out = pallas_paged_attention.paged_attention(q[:, 0], pool_k, pool_v, layer, tables, lengths,
                                                     tensor_cores=dot_form(kernels, q.shape[2], pool_k),
                                                     interpret=kernels.interpret)
        return out[:, None], pool_k, pool_v
    return reference(q, pool_k, pool_v, layer, tables, positions), pool_k, pool_v


def decode_reads_in_place(kernels: Kernels, pool_k: jax.Array, heads: int, dtype) -> bool:
    """Whether a decode step over this pool, with queries of `heads` heads in `dtype`, reads each row's
    blocks where they lie (the policy's kernel takes it). Its cost then does not grow with the block
    tables' width, so a caller may give every decode step one width (one compiled program); the reference
    gathers `width` blocks a row, so there the width is worth keeping near the longest row's."""
    q = jax.ShapeDtypeStruct((1, 1, heads, pool_k.shape[-1]), dtype)
    return kernels.paged_attention != "xla" and pallas_paged_attention.supported(
        q, pool_k, tensor_cores=dot_form(kernels, heads, pool_k))


def dot_form(kernels: Kernels, heads: int, pool_k: jax.Array) -> bool:
    """Whether the kernel runs its loop as tensor-core dots: asked for ("pallas_dots"), or under "pallas"
    where query heads share a kv head and a block fills a dot's rows. There the vector form repeats each
    block's arithmetic for every query head of a program; the dot form took 0.197 ms against 0.570 for 32
    query heads over 8 kv heads, and 0.487-0.63 against 0.443 without grouping (one H100, batch 256;
    bench/BENCHMARKS.md)."""
    kv_heads, block = pool_k.shape[3], pool_k.shape[2]
    grouped = heads > kv_heads and block >= pallas_paged_attention.DOT_ROWS
    return kernels.paged_attention == "pallas_dots" or (kernels.paged_attention == "pallas" and grouped)


def write(pool_k, pool_v, layer, k, v, tables, positions, token_mask):
    """k, v [batch, seq, kv_heads, head_dim] into layer `layer` of the pools at each token's position;
    padding into block NO_BLOCK. Scattered in place: the pools are the decode scan's carry."""
    block = pool_k.shape[2]
    blocks = jnp.take_along_axis(tables, positions // block, axis=1, mode="clip")
    blocks = jnp.where(token_mask, blocks, NO_BLOCK)
    slots = positions % block
    pool_k = pool_k.at[layer, blocks, slots].set(k.astype(pool_k.dtype))
    pool_v = pool_v.at[layer, blocks, slots].set(v.astype(pool_v.dtype))
    return pool_k, pool_v


def reference(q, pool_k, pool_v, layer, tables, positions):
    """XLA: each row's blocks gathered into a dense copy [batch, width * block, kv_heads, head_dim], and
    `jax.nn.dot_product_attention` over it, query t reading the slots up to positions[:, t]."""
    batch, width = tables.shape
    block, kv_heads, head_dim = pool_k.shape[2:]
    keys = pool_k[layer, tables].reshape(batch, width * block, kv_heads, head_dim).astype(q.dtype)
    values = pool_v[layer, tables].reshape(batch, width * block, kv_heads, head_dim).astype(q.dtype)
    mask = jnp.arange(width * block)[None, None, :] <= positions[:, :, None]  # [batch, seq, width * block]
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")
