"""Attention on TPUs through Splash attention, the Pallas TPU flash kernel that ships with JAX.

    out = splash_attention(q, k, v, segment_ids, causal=True, mesh=mesh)   # [batch, seq, heads, head_dim]

XLA's attention builds a [batch, heads, seq, seq] score tensor; Splash attention streams blocks of keys
through VMEM and never holds more than a block of scores, forward and backward. Its static mask (causal
here) also tells it which blocks are empty, and it skips them. Segment ids (packed documents) are and-ed
with that mask inside the kernel: a query attends only to keys of its own segment.

Layouts. The model's q is [batch, seq, heads, head_dim] and k, v are [batch, seq, kv_heads, head_dim];
the kernel takes one example at a time as [heads, seq, head_dim] and [kv_heads, seq, head_dim], and reads
kv head h // (heads / kv_heads) for query head h (grouped-query heads, as the model's reference does).
This op transposes into the kernel's layout, vmaps the kernel over the batch, and transposes back. The
softmax scale 1/sqrt(head_dim) is applied to q, since the kernel applies none.

Under a mesh the kernel runs on each device's shard (sharded.py: its rows of the batch and its heads).

Remat. The kernel's forward pass tags its two residuals, the output and the softmax's logsumexp, with
`checkpoint_name(RESIDUAL_NAME)`. A remat policy that keeps what `is_splash_residual` accepts saves them,
so the backward pass does not run the forward kernel again: only its two backward kernels (dkv, dq).

Limits (`supported`): self-attention (q_len == kv_len) with seq a multiple of the blocks, which are
multiples of 128 (the kernel's lane width, also in interpret mode); on a TPU, head_dim a multiple of 128.
`interpret=True` runs the kernel in Pallas' interpreter on any backend (the tests run it on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from llama_jax.ops.sharded import BATCH_AXES, HEAD_AXIS, per_shard

# The name the kernel's forward pass gives its residuals (output and logsumexp) through checkpoint_name.
RESIDUAL_NAME = "splash_attention_residual"

LANES = 128  # every Splash block is a multiple of this


def _block(size: int, seq: int) -> int:
    return min(size, seq)


def supported(q: jax.Array, k: jax.Array, *, block_q: int = 512, block_kv: int = 512,
              interpret: bool = False) -> bool:
    """Whether `splash_attention` takes these shapes: q [batch, seq, heads, head_dim] and k
    [batch, seq, kv_heads, head_dim] with equal lengths, kv_heads dividing heads, seq a multiple of
    the (clipped) blocks and of 128, and on a real TPU head_dim a multiple of 128."""
    if q.ndim != 4 or k.ndim != 4:
        return False
    _, seq, heads, head_dim = q.shape
    _, kv_len, kv_heads, kv_dim = k.shape
    if kv_len != seq or kv_dim != head_dim or heads % kv_heads:
        return False
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    if seq % LANES or any(seq % _block(b, seq) or _block(b, seq) % LANES for b in (block_q, block_kv)):
        return False
    return interpret or head_dim % LANES == 0


def is_splash_residual(prim, *_, **params) -> bool:
    """Whether a remat policy's primitive is one of the kernel's tagged residuals (its output and
    logsumexp): a `name` primitive (checkpoint_name) carrying RESIDUAL_NAME. Takes the policy's
    arguments, (prim, *avals, **params): the tag is in the params, not in the primitive."""
    return prim.name == "name" and params.get("name") == RESIDUAL_NAME


def _kernel(heads: int, seq: int, causal: bool, block_sizes: splash.BlockSizes, interpret: bool):
    """The Splash kernel for one example: q [heads, seq, head_dim], k/v [kv_heads, seq, head_dim]."""
    one = splash_mask.CausalMask((seq, seq)) if causal else splash_mask.FullMask((seq, seq))
    mask = splash_mask.MultiHeadMask([one] * heads)
    return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)


def _local(q, k, v, segment_ids, *, causal, block_sizes, interpret):
    """Splash attention on one device's arrays (model layout in and out)."""
    _, seq, heads, head_dim = q.shape
    q = (q * (1.0 / math.sqrt(head_dim))).astype(q.dtype)
    q = q.transpose(0, 2, 1, 3)  # [batch, heads, seq, head_dim]
    k = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    v = v.transpose(0, 2, 1, 3)
    kernel = _kernel(heads, seq, causal, block_sizes, interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)  # each [batch, seq]
        out = jax.vmap(kernel)(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)  # [batch, seq, heads, head_dim]


def splash_attention(
    q: jax.Array,  # [batch, seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    segment_ids: jax.Array | None = None,  # int32 [batch, seq]: attend only within a segment (packing)
    *,
    causal: bool = True,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    head_axis: str | None = HEAD_AXIS,
    interpret: bool = False,
    block_q: int = 512,
    block_kv: int = 512,
    block_kv_compute: int | None = None,  # default: block_kv
    block_q_bwd: int | None = None,  # default: block_q
    block_kv_bwd: int | None = None,  # default: block_kv
    fused_bwd: bool = False,  # one backward kernel (dq summed over kv blocks) instead of dkv and dq
) -> jax.Array:  # [batch, seq, heads, head_dim], q's dtype
    """Scaled dot-product attention with grouped-query heads, causal and segment masks, in Splash
    attention; under `mesh` in shard_map over its batch axes and `head_axis`. Blocks are clipped to seq."""
    seq = q.shape[1]
    if not supported(q, k, block_q=block_q, block_kv=block_kv, interpret=True):
        raise ValueError(f"splash_attention does not take q {q.shape} {q.dtype}, k {k.shape} "
                         f"with blocks {block_q}x{block_kv} (see supported)")
    bq, bkv = _block(block_q, seq), _block(block_kv, seq)
    bq_bwd, bkv_bwd = _block(block_q_bwd or bq, seq), _block(block_kv_bwd or bkv, seq)
    block_sizes = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=_block(block_kv_compute or bkv, seq),
        block_q_dkv=bq_bwd, block_kv_dkv=bkv_bwd, block_kv_dkv_compute=bkv_bwd,
        block_q_dq=None if fused_bwd else bq_bwd, block_kv_dq=None if fused_bwd else bkv_bwd,
        use_fused_bwd_kernel=fused_bwd)

    def local(q, k, v, segment_ids=None):
        return _local(q, k, v, segment_ids, causal=causal, block_sizes=block_sizes, interpret=interpret)

    rows = () if segment_ids is None else (segment_ids.astype(jnp.int32),)
    if mesh is None:
        return local(q, k, v, *rows)
    return per_shard(local, q, k, v, rows, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis)
