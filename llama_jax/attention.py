"""The one attention entry point. Every caller (training, prefill, decode) comes through here, so the
choice of kernel lives in one place: cuDNN's fused flash attention on GPU, XLA elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _implementation(q: jax.Array, masked: bool) -> str:
    # cuDNN's fused kernel needs a GPU, 16-bit inputs and a head_dim it supports; an explicit mask
    # (segments, left padding, a KV cache) goes through XLA, which is also what decode wants:
    # a single query row is a memory-bound matrix-vector product.
    if (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] in (64, 128, 256)
        and not masked
        and q.shape[1] > 1
    ):
        return "cudnn"
    return "xla"


def attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,  # [batch, q_len]: attend only within a segment (packing)
    mask: jax.Array | None = None,  # [batch, q_len, kv_len] bool, True = may attend
) -> jax.Array:  # [batch, q_len, heads, head_dim]
    """Scaled dot-product attention with grouped-query heads (heads % kv_heads == 0: query head j
    reads kv head j // (heads // kv_heads)). Softmax runs in float32 whatever the input dtype."""
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    if mask is not None:
        mask = mask[:, None, :, :]  # broadcast over heads
    impl = _implementation(q, mask is not None)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
