"""The Pallas flash-attention kernels (ops/pallas_flash_attention.py), run by Pallas' interpreter on the
CPU in float32, against XLA's attention with an explicit mask (causal, keys at or after k_start, same
segment): outputs and the gradients of q, k and v under a random cotangent, on packed rows, left-padded
rows, grouped-query and plain causal calls; and the block ranges that let the kernels skip blocks the
mask leaves empty."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.ops import pallas_flash_attention as FA

# Small blocks, so that rows of 64-128 tokens span several blocks of every kind; the forward and the two
# backward kernels each cut the row differently.
BLOCKS = (("block_q", 32), ("block_k", 16), ("block_q_dkv", 16), ("block_k_dkv", 32), ("block_q_dq", 32),
          ("block_k_dq", 16))  # hashable: a static argument of the jitted helpers


def _inputs(batch, seq, heads, kv_heads, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim))
    k = rng.standard_normal((batch, seq, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq, kv_heads, head_dim))
    ct = rng.standard_normal((batch, seq, heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, ct))


def _reference(q, k, v, k_start, segment_ids):
    """XLA attention under causal & (key >= k_start) & same segment."""
    seq = q.shape[1]
    pos = jnp.arange(seq)
    mask = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= k_start[:, :, None])
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [batch, q, k]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


@functools.partial(jax.jit, static_argnames="blocks")
def _kernel_and_grads(q, k, v, ct, k_start, blocks=BLOCKS):
    out, vjp = jax.vjp(lambda q, k, v: FA.flash_attention(q, k, v, k_start, interpret=True, **dict(blocks)),
                       q, k, v)
    return out, vjp(ct)


@jax.jit
def _reference_and_grads(q, k, v, ct, k_start, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, k_start, segment_ids), q, k, v)
    return out, vjp(ct)


def _assert_matches(q, k, v, ct, k_start, segment_ids, reads_any=None, blocks=BLOCKS):
    """The kernel's output and gradients equal the reference's. reads_any [batch, seq]: the queries that
    may read a key; the others must give zeros, and their cotangent must change no gradient, so the
    reference sees it zeroed."""
    out, grads = _kernel_and_grads(q, k, v, ct, k_start, blocks)
    if reads_any is None:
        reads_any = np.ones(k_start.shape, bool)
    keep = jnp.asarray(reads_any)[:, :, None, None]
    ref_out, ref_grads = _reference_and_grads(q, k, v, jnp.where(keep, ct, 0.0), k_start, segment_ids)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.where(keep, out, 0.0), np.where(keep, ref_out, 0.0), atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[~reads_any] == 0.0)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5, err_msg=f"d{name}")


def _segments(lengths_per_row):
    return jnp.asarray([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row], jnp.int32)


def test_segment_starts():
    ids = jnp.asarray([[0, 0, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    np.testing.assert_array_equal(FA.segment_starts(ids), [[0, 0, 2, 3, 3, 3, 6, 6], [0] * 8])


def test_packed_rows_match_reference_with_gqa():
    # Row 0: one-token segments at the start, in the middle and at the end, and a segment of 50 that
    # spans key blocks of 16 and query blocks of 32; row 1: two segments meeting inside a block.
    q, k, v, ct = _inputs(2, 128, heads=4, kv_heads=2)
    segment_ids = _segments([[1, 40, 1, 50, 35, 1], [70, 58]])
    _assert_matches(q, k, v, ct, FA.segment_starts(segment_ids), segment_ids)


def test_left_padded_rows_match_reference_padding_gives_zeros():
    # Row 0 has no padding, row 1 starts its prompt at position 37; its padding queries read nothing.
    q, k, v, ct = _inputs(2, 64, heads=4, kv_heads=1)
    first_real = np.array([0, 37])
    k_start = jnp.asarray(np.repeat(first_real[:, None], 64, axis=1), jnp.int32)
    reads_any = np.arange(64)[None, :] >= first_real[:, None]
    _assert_matches(q, k, v, ct, k_start, jnp.zeros((2, 64), jnp.int32), reads_any)


def test_plain_causal_matches_reference():
    q, k, v, ct = _inputs(1, 64, heads=2, kv_heads=2, seed=1)
    blocks = (("block_q", 16), ("block_k", 32), ("block_q_dkv", 32), ("block_k_dkv", 16), ("block_q_dq", 16),
              ("block_k_dq", 16))
    out, grads = _kernel_and_grads(q, k, v, ct, None, blocks)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_vjp(ct)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blocks_left_empty_are_never_read():
    """NaN in every key, value and query the block ranges skip: a kernel that read any of them, even
    masked, would carry the NaN into its output or gradients."""
    q, k, v, ct = _inputs(2, 64, heads=4, kv_heads=2, seed=2)
    first_real = np.array([0, 37])  # row 1: key blocks of 16 over positions 0-31 are never needed
    k_start = jnp.asarray(np.repeat(first_real[:, None], 64, axis=1), jnp.int32)
    poison = jnp.asarray(np.arange(64)[None, :] < np.array([0, 32])[:, None])[:, :, None, None]
    q_bad, k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (q, k, v))
    out, (dq, dk, dv) = _kernel_and_grads(q_bad, k_bad, v_bad, ct, k_start)
    _, (_, dk_clean, _) = _kernel_and_grads(q, k, v, ct, k_start)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(np.asarray(dk)[1, :37], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[1, :37], 0.0)
    np.testing.assert_allclose(dk, dk_clean, atol=0, rtol=0)


def test_block_ranges_skip_empty_blocks():
    # Two documents of 64 in rows of 128, blocks of 32: query blocks 0-1 read key blocks 0-1, query
    # blocks 2-3 key blocks 2-3; the causal triangle has 10 pairs, the packed row 6, of which the 4 on
    # the diagonal apply the mask.
    k_start = FA.segment_starts(_segments([[64, 64], [128]]))
    total, masked = jax.jit(FA.executed_blocks, static_argnums=(1, 2, 3))(k_start, 128, 32, 32)
    np.testing.assert_array_equal(total, [6, 10])
    np.testing.assert_array_equal(masked, [4, 4])
    block_ranges = jax.jit(FA.block_ranges, static_argnums=(1, 2, 3), static_argnames="by_key")
    # (lo, full_lo, full_hi, hi) per query block: key blocks [lo, hi), unmasked on [full_lo, full_hi)
    ranges = np.asarray(block_ranges(k_start, 128, 32, 32))[0]
    np.testing.assert_array_equal(ranges, [[0, 1, 1, 1], [0, 0, 1, 2], [2, 3, 3, 3], [2, 2, 3, 4]])
    by_key = np.asarray(block_ranges(k_start, 128, 32, 32, by_key=True))[0]
    np.testing.assert_array_equal(by_key[:, [0, 3]], [[0, 2], [1, 2], [2, 4], [3, 4]])
    # The default blocks of 128 x 64 over 1024 tokens: documents of 300 tokens run about half the
    # causal triangle of 2 + 4 + ... + 16 = 72 pairs that one document of 1024 runs.
    docs = _segments([[300, 300, 300, 124], [1024]])
    total, _ = jax.jit(FA.executed_blocks, static_argnums=1)(FA.segment_starts(docs), 1024)
    assert int(total[1]) == 72
    assert int(total[0]) < 0.6 * 72


@pytest.mark.parametrize("case, ok", [
    (((2, 128, 4, 64), (2, 128, 2, 64), jnp.bfloat16), True),
    (((2, 256, 8, 128), (2, 256, 1, 128), jnp.float16), True),
    (((2, 96, 4, 64), (2, 96, 2, 64), jnp.bfloat16), False),  # 96: no power-of-two block divides it
    (((2, 128, 4, 80), (2, 128, 2, 80), jnp.bfloat16), False),  # head_dim 80
    (((2, 128, 4, 64), (2, 128, 3, 64), jnp.bfloat16), False),  # 4 heads over 3 kv heads
    (((2, 64, 4, 64), (2, 128, 2, 64), jnp.bfloat16), False),  # causal with q_len != kv_len
])
def test_supported(case, ok):
    q_shape, k_shape, dtype = case
    q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
    assert FA.supported(q, k) is ok
    if not ok:
        with pytest.raises(ValueError):
            FA.flash_attention(q, k, k, interpret=True)


def test_bfloat16_forward_keeps_dtype():
    q, k, v, _ = _inputs(1, 64, heads=2, kv_heads=1, seed=3)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: FA.flash_attention(q, k, v, interpret=True, block_q=32, block_k=16))(q, k, v)
    ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       is_causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)
