"""Splash attention (ops/splash_attention.py) in Pallas' interpret mode on the CPU against XLA's attention:
values and gradients for causal, packed and grouped-query calls; sharded under a mesh equals unsharded;
a remat policy built on `is_splash_residual` keeps the forward kernel out of the backward pass."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax.ops.splash_attention import is_splash_residual, splash_attention, supported
from llama_jax.sharding import make_mesh

SEQ, HEAD_DIM = 256, 128
BLOCKS = {"block_q": 128, "block_kv": 128}  # two blocks along seq, so segments and the causal mask cross them

# Row 0: three documents, the second spanning the block boundary at 128, then padding (id 0).
# Row 1: one short document, then one that runs to the end.
PACKED = np.array([[1] * 100 + [2] * 100 + [3] * 40 + [0] * 16,
                   [5] * 30 + [6] * 226], np.int32)  # [2, SEQ]


def _qkv(batch, heads, kv_heads, seed=0, dtype=jnp.float32):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, SEQ, heads, HEAD_DIM), dtype)
    k = jax.random.normal(kk, (batch, SEQ, kv_heads, HEAD_DIM), dtype)
    v = jax.random.normal(kv, (batch, SEQ, kv_heads, HEAD_DIM), dtype)
    w = jax.random.normal(kw, (batch, SEQ, heads, HEAD_DIM), jnp.float32)  # cotangent weights
    return q, k, v, w


def _reference(q, k, v, segment_ids=None, causal=True):
    """XLA attention with an explicit mask; kv heads repeated for grouped-query heads."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    mask = jnp.ones((q.shape[0], SEQ, SEQ), bool)
    if causal:
        mask &= jnp.tril(jnp.ones((SEQ, SEQ), bool))
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def _value_and_grads(attend, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * w)

    return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("heads,kv_heads,packed,causal", [
    (4, 4, False, True),   # plain causal
    (4, 2, True, True),    # packed rows, grouped-query heads
    (4, 1, True, True),    # one kv head for all
    (4, 2, False, False),  # no mask at all
])
def test_values_and_grads_equal_reference(heads, kv_heads, packed, causal):
    q, k, v, w = _qkv(2, heads, kv_heads)
    seg = jnp.asarray(PACKED) if packed else None
    out, grads = jax.jit(lambda q, k, v: _value_and_grads(
        lambda q, k, v: splash_attention(q, k, v, seg, causal=causal, interpret=True, **BLOCKS), q, k, v, w))(q, k, v)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, causal), q, k, v, w)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_segments_do_not_leak():
    # Changing one document's keys and values leaves every other document's output unchanged.
    q, k, v, _ = _qkv(2, 4, 2)
    other = (PACKED != 2)[:, :, None, None]
    k2, v2 = jnp.where(other, k, 3 * k), jnp.where(other, v, -v)
    f = jax.jit(lambda k, v: splash_attention(q, k, v, jnp.asarray(PACKED), interpret=True, **BLOCKS))
    a, b = f(k, v), f(k2, v2)
    np.testing.assert_array_equal(np.where(other, a, 0), np.where(other, b, 0))
    assert np.abs(np.where(other, 0, a - b)).max() > 1e-2


def test_bfloat16_and_default_blocks():
    # The default 512-blocks clip to the sequence; bfloat16 in, bfloat16 out, near the float32 reference.
    q, k, v, _ = _qkv(2, 4, 2, dtype=jnp.bfloat16)
    seg = jnp.asarray(PACKED)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True))(q, k, v)
    ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("sizes,spec", [
    ({"data": 1, "fsdp": 2, "tensor": 2}, P(("fsdp",), None, "tensor", None)),  # batch and heads split
    ({"data": 2, "fsdp": 1, "tensor": 4}, P(("data",), None, None, None)),  # 2 kv heads over 4: heads whole
])
def test_sharded_equals_unsharded(sizes, spec):
    devices = jax.devices()[:sizes["data"] * sizes["fsdp"] * sizes["tensor"]]
    mesh = make_mesh(**sizes, devices=devices)
    q, k, v, w = _qkv(2, 4, 2, seed=1)
    seg = jnp.asarray(PACKED)

    def run(mesh):
        def attend(q, k, v):
            return splash_attention(q, k, v, seg, mesh=mesh, interpret=True, **BLOCKS)

        return jax.jit(lambda q, k, v: _value_and_grads(attend, q, k, v, w))(q, k, v)

    (out, grads), (ref_out, ref_grads) = run(mesh), run(None)
    assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), out.ndim)
    np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def _forward_kernels(policy):
    """How many times the gradient of a checkpointed call runs Splash's forward kernel."""
    q, k, v, _ = _qkv(2, 4, 2)
    seg = jnp.asarray(PACKED)
    f = jax.checkpoint(lambda q, k, v: splash_attention(jnp.sin(q), k, v, seg, interpret=True, **BLOCKS),
                       policy=policy)
    text = str(jax.make_jaxpr(jax.grad(lambda q, k, v: f(q, k, v).sum()))(q, k, v))
    return len(re.findall(r"name=splash_mha_fwd\w*", text))


def test_remat_policy_keeps_residuals():
    def save_matmuls(prim, *args, **params):  # the model's policy with the predicate added
        return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
                or is_splash_residual(prim, *args, **params))

    assert _forward_kernels(save_matmuls) == 1
    assert _forward_kernels(jax.checkpoint_policies.nothing_saveable) == 2


def test_supported():
    def x(seq, heads, dim, dtype=jnp.float32):  # a [2, seq, heads, dim] array's shape
        return jax.ShapeDtypeStruct((2, seq, heads, dim), dtype)

    assert supported(x(256, 4, 128), x(256, 2, 128))
    assert supported(x(1024, 4, 128, jnp.bfloat16), x(1024, 4, 128, jnp.bfloat16))
    assert not supported(x(200, 4, 128), x(200, 2, 128))  # seq not a multiple of 128
    assert not supported(x(640, 4, 128), x(640, 2, 128))  # 640 not a multiple of the 512-block
    assert supported(x(640, 4, 128), x(640, 2, 128), block_q=128, block_kv=128)
    assert not supported(x(256, 4, 64), x(256, 2, 64))  # head_dim 64 on a TPU
    assert supported(x(256, 4, 64), x(256, 2, 64), interpret=True)
    assert not supported(x(256, 4, 128), x(256, 3, 128))  # kv heads do not divide heads
    assert not supported(x(256, 4, 128), x(128, 4, 128))  # not self-attention
    with pytest.raises(ValueError, match="does not take"):
        splash_attention(jnp.zeros((1, 200, 4, 128)), jnp.zeros((1, 200, 4, 128)), jnp.zeros((1, 200, 4, 128)))
