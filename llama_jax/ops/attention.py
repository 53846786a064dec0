"""Attention, chosen by the kernel policy, each kernel beside its XLA reference.

    out = attention(kernels, q, k, v, causal=True, segment_ids=None)             # training and prefill
    out, cache_k, cache_v = cached_attention(kernels, q, k, v, rope, cache, rotate)   # with a KV cache

`attention` runs causal self-attention through a fused kernel where the policy names one and it takes
the call: over whole rows cuDNN's flash attention on GPUs (Kernels.attention "cudnn"), within packed
documents our Pallas flash kernel (Kernels.masked_attention "pallas", pallas_flash_attention.py: blocks
that the segments leave empty cost nothing), and Splash attention on TPUs for both ("splash",
splash_attention.py). The Pallas kernels run on each device's shard of the mesh in context (sharded.py).
Everything else, and the reference, is `jax.nn.dot_product_attention` in XLA. Grouped-query heads: query head j reads kv head j // (heads /
kv_heads); the softmax runs in float32 whatever the input dtype.

`cached_attention` takes q and k before rotary: a decode step on one GPU (Kernels.decode_attention
"pallas") rotates them, writes the cache and attends in one Pallas kernel (pallas_decode_attention.py);
the reference rotates with the model's own `rotate`, writes the new keys and values into the cache in
place, and attends in XLA.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from llama_jax.ops import pallas_decode_attention, pallas_flash_attention, sharded, splash_attention
from llama_jax.ops.policy import Kernels


def attention(
    kernels: Kernels,
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,  # [batch, q_len]: contiguous runs (packed documents)
    mask: jax.Array | None = None,  # [batch, q_len, kv_len] bool, True = may attend
) -> jax.Array:  # [batch, q_len, heads, head_dim]
    """Scaled dot-product attention with grouped-query heads. With `segment_ids` a query attends only
    to keys of its own segment; the fused kernels take segments as contiguous runs of one id (what
    packing makes), the reference any ids."""
    if causal and mask is None and q.shape[1] == k.shape[1] > 1:
        fused = _fused(kernels, q, k, v, segment_ids)
        if fused is not None:
            return fused
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    if mask is not None:
        mask = mask[:, None, :, :]  # broadcast over heads
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def _fused(kernels: Kernels, q, k, v, segment_ids) -> jax.Array | None:
    """Causal self-attention through the kernel the policy names for it, or None where none takes it."""
    choice = kernels.attention if segment_ids is None else kernels.masked_attention
    if choice == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128, 256):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if choice == "splash" and splash_attention.supported(q, k, interpret=kernels.interpret):
        return splash_attention.splash_attention(q, k, v, segment_ids, mesh=sharded.context_mesh(),
                                                 interpret=kernels.interpret)
    if choice == "pallas" and pallas_flash_attention.supported(q, k):
        def kernel(q, k, v, *segments):
            k_start = pallas_flash_attention.segment_starts(segments[0]) if segments else None
            return pallas_flash_attention.flash_attention(q, k, v, k_start, interpret=kernels.interpret)

        return sharded.per_shard(kernel, q, k, v, () if segment_ids is None else (segment_ids,))
    return None


def is_fused_attention(prim, *args, **params) -> bool:
    """Whether a primitive holds a fused attention kernel's forward results, which a remat policy keeps:
    the backward pass would otherwise run the kernel again for its softmax statistics. cuDNN's forward
    is a primitive of its own; the Pallas kernels tag their output and log-sum-exp by name."""
    return (prim.name.startswith("dot_product_attention_fwd")
            or pallas_flash_attention.is_residual(prim, *args, **params)
            or splash_attention.is_splash_residual(prim, *args, **params))


def cached_attention(
    kernels: Kernels,
    q: jax.Array,  # [batch, seq, heads, head_dim], before rotary
    k: jax.Array,  # [batch, seq, kv_heads, head_dim], before rotary
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    rope: tuple[jax.Array, jax.Array],  # cos, sin [batch, seq, 1, head_dim / 2] float32
    cache_k: jax.Array,  # [layers, batch, max_len, kv_heads, head_dim]
    cache_v: jax.Array,  # like cache_k
    layer: jax.Array,  # int32 scalar
    start: jax.Array,  # int32 scalar: the slot of the first new token
    mask: jax.Array,  # [batch, seq, max_len] bool, True = may attend
    rotate: Callable[[jax.Array, tuple[jax.Array, jax.Array]], jax.Array],  # the model's rotary
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [batch, seq, heads, head_dim], cache_k, cache_v
    """The new tokens' keys and values written into layer `layer` of the cache at slot `start`, and their
    queries' attention over that layer's slots under `mask`. Writing only the new tokens keeps a decode
    step's cache traffic to one read of the layer.

    A prefill into an empty cache (start 0) of left-padded rows is causal attention over the new tokens
    alone, each row's keys starting at its first real token: where the policy has a kernel for packed
    rows and it takes the shapes, that branch runs it (selected at run time on `start`)."""
    if kernels.decode_attention == "pallas" and pallas_decode_attention.supported(q, cache_k):
        return pallas_decode_attention.decode_attention(q, k, v, rope, cache_k, cache_v, layer, start, mask)
    q, k = rotate(q, rope), rotate(k, rope)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, start, 0, 0))

    def over_the_cache():
        return attention(Kernels.xla(), q, cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype),
                         causal=False, mask=mask)

    seq = q.shape[1]
    k16, v16 = (a.astype(cache_k.dtype).astype(q.dtype) for a in (k, v))  # rounded as the cache holds them
    if (seq == 1 or kernels.masked_attention != "pallas"
            or not pallas_flash_attention.supported(q, k16) or seq > mask.shape[-1]):
        return over_the_cache(), cache_k, cache_v

    def fresh_prefill():  # query t of row b reads the new keys from the row's first real token up to t
        real = jax.lax.dynamic_slice_in_dim(mask[:, -1, :], 0, seq, axis=1)  # [batch, seq]: the last query's keys
        first = jnp.argmax(real, axis=1).astype(jnp.int32)  # [batch]
        k_start = jnp.broadcast_to(first[:, None], (q.shape[0], seq))

        def kernel(q, k, v, k_start):
            return pallas_flash_attention.flash_attention(q, k, v, k_start, interpret=kernels.interpret)

        return sharded.per_shard(kernel, q, k16, v16, (k_start,))

    return jax.lax.cond(start == 0, fresh_prefill, over_the_cache), cache_k, cache_v
