"""The native CPU quantized matmul (llama_jax/ops/cpu_qmatmul.py, csrc/qmatmul_cpu.cc) against
x @ q.dequantize() in float32 (and its row form against x @ q.dequantize().T), the ops layer's use of them
where the kernel policy says "native" (ops.project, ops.head) and its fallback, and the model's quantized
lm_head. The model-level checks (SmolLM2 kept quantized still says " Paris"; quantized decode equals
dequantized decode) are in test_quantize.py, which runs through this kernel on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import ops
from llama_jax import quantize as Q
from llama_jax.ops import Kernels, cpu_qmatmul
from llama_jax.ops.matmul import LayerView
from llama_jax.qarray import QArray, quantize

NATIVE = Kernels(matmul="native")


@pytest.fixture(scope="module", autouse=True)
def native_library():
    """The kernel built and registered with XLA (what Kernels.auto() does on the CPU before choosing it)."""
    assert cpu_qmatmul.available()
    assert Kernels.auto().matmul == "native"

SCHEMES = [  # bits, group, zero point
    (8, None, False),  # per output channel
    (8, 32, False),
    (4, 32, False),  # Q4_0-like
    (4, 64, False),
    (4, 32, True),  # Q4_1-like
]


def _close(out, ref, rtol=1e-5):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32
    # Relative to the output's scale: the kernel sums in another order than XLA's dot.
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * float(np.abs(ref).max()))


def _weights(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bits,group,zero_point", SCHEMES)
def test_kernel_equals_dequantized_matmul(rows, bits, group, zero_point):
    # N = 200: 64-column tiles, a 16-column tile and an 8-column scalar tail.
    q = quantize(_weights((192, 200)), bits, group, zero_point=zero_point)
    x = _weights((rows, 192), seed=1)
    assert cpu_qmatmul.supported(q, x)
    _close(jax.jit(cpu_qmatmul.qmatmul_cpu)(x, q), x @ q.dequantize())


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_scales_stored_in_other_dtypes(scale_dtype):
    q = quantize(_weights((128, 96)), 4, 32, zero_point=True, scale_dtype=scale_dtype)  # N = 96: 64 + 32
    x = _weights((5, 128), seed=1)
    _close(cpu_qmatmul.qmatmul_cpu(x, q), x @ q.dequantize())


def test_layer_of_a_stack_and_quantized_matmul_uses_the_kernel():
    w = _weights((2, 128, 4, 32))  # a stacked q-like weight [layers, D, H, hd]
    q = quantize(w, 4, 32, split=1, stacked=True, zero_point=True)
    x = _weights((1, 2, 128), seed=1)  # [batch, seq, D]
    # a LayerView (the decode scan's view of a layer) reaches the kernel with the whole stack
    f = jax.jit(lambda x, q, i: ops.project(NATIVE, "btd,dhk->bthk", x, LayerView(q, i)))
    for i in (0, 1):
        out = f(x, q, jnp.int32(i))
        assert out.shape == (1, 2, 4, 32)
        _close(out, jnp.einsum("btd,dhk->bthk", x, q.take(i).dequantize()))
    text = f.lower(x, q, jnp.int32(0)).as_text()
    assert cpu_qmatmul.TARGET in text
    assert "tensor<2x64x128xui8>" in text  # the whole stack's codes go in: no slice of them first
    # one layer sliced out (a QArray of its own) reaches it too
    _close(ops.project(NATIVE, "btd,dhk->bthk", x, q.take(1)), jnp.einsum("btd,dhk->bthk", x, q.take(1).dequantize()))


def test_xla_policy_never_calls_the_kernel():
    """Kernels.xla() multiplies by a QArray the kernel serves with the dequantized dot (no native call in
    the program, for the product and the tied head alike), Kernels(matmul="native") with the kernel; the
    results are equal."""
    q = quantize(_weights((128, 128)), 8, None)
    x = _weights((1, 1, 128), seed=1)
    assert cpu_qmatmul.supported(q, x[0])
    e = quantize(_weights((256, 128)), 8, 32, axis=-1)
    assert cpu_qmatmul.supported_rows(e, x[0])
    outs = {}
    for kernels in (Kernels.xla(), NATIVE):
        f = jax.jit(lambda x, q, e, k=kernels: (ops.project(k, "btd,dn->btn", x, q), ops.head(k, x, e, True)))
        text = f.lower(x, q, e).as_text()
        native = kernels.matmul == "native"
        assert (cpu_qmatmul.TARGET in text) == native and (cpu_qmatmul.ROWS_TARGET in text) == native
        outs[native] = f(x, q, e)
    for got, ref in zip(outs[True], outs[False]):
        _close(got, ref)
    _close(outs[False][0][0], x[0] @ q.dequantize())
    _close(outs[False][1][0], x[0] @ e.dequantize().T)


def test_unsupported_cases_are_refused():
    q, x = quantize(_weights((128, 128)), 8, None), _weights((1, 128))
    assert cpu_qmatmul.supported(q, x)
    assert not cpu_qmatmul.supported(q, x.astype(jnp.bfloat16))
    assert not cpu_qmatmul.supported(q, _weights((100, 128)))  # many rows: XLA's dot is as fast
    assert not cpu_qmatmul.supported(quantize(_weights((64, 64)), 8, None), x[:, :64])  # tiny: likewise
    assert not cpu_qmatmul.supported(quantize(_weights((176, 128)), 4, 32), _weights((1, 176)))  # K padded
    assert not cpu_qmatmul.supported(quantize(_weights((128, 128)), 4, 32, axis=-1), x)  # grouped along N


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bits,group,zero_point", SCHEMES)
def test_row_kernel_equals_dequantized_matmul_transposed(rows, bits, group, zero_point):
    # An embedding-like weight [V, D] grouped along D. V = 203: tiles of four rows and three single rows.
    q = quantize(_weights((203, 192)), bits, group, axis=-1, zero_point=zero_point)
    x = _weights((rows, 192), seed=1)
    assert cpu_qmatmul.supported_rows(q, x)
    _close(jax.jit(cpu_qmatmul.qmatmul_rows_cpu)(x, q), x @ q.dequantize().T)


def test_row_kernel_with_other_scale_dtypes_and_through_the_tied_head():
    q = quantize(_weights((256, 128)), 4, 32, axis=-1, zero_point=True, scale_dtype="bfloat16")
    x = _weights((2, 5, 128), seed=1)  # [batch, seq, D]
    f = jax.jit(lambda x, q: ops.head(NATIVE, x, q, True))
    assert cpu_qmatmul.ROWS_TARGET in f.lower(x, q).as_text()
    out = f(x, q)
    assert out.shape == (2, 5, 256)
    _close(out, x @ q.dequantize().T)
    q32 = quantize(_weights((256, 128)), 8, 32, axis=-1, scale_dtype="float32")
    _close(cpu_qmatmul.qmatmul_rows_cpu(x[0], q32), x[0] @ q32.dequantize().T)


def test_row_kernel_refuses_what_it_does_not_serve():
    q, x = quantize(_weights((256, 128)), 8, 32, axis=-1), _weights((1, 128))
    assert cpu_qmatmul.supported_rows(q, x)
    assert not cpu_qmatmul.supported_rows(q, x.astype(jnp.bfloat16))
    assert not cpu_qmatmul.supported_rows(q, _weights((40, 128)))  # many rows
    assert not cpu_qmatmul.supported_rows(quantize(_weights((256, 128)), 8, 32), x)  # grouped along V
    assert not cpu_qmatmul.supported_rows(quantize(_weights((256, 200)), 8, 32, axis=-1), _weights((1, 200)))  # D padded
    assert not cpu_qmatmul.supported_rows(quantize(_weights((256, 200)), 8, None, axis=-1), _weights((1, 200)))  # not whole vectors
    # Where the kernel does not serve it, the tied head is the dequantized product all the same.
    xb = _weights((1, 1, 128), seed=2).astype(jnp.bfloat16)
    out = ops.head(NATIVE, xb, q, True)
    assert out.dtype == jnp.float32
    _close(out[0], xb[0].astype(jnp.float32) @ q.dequantize(jnp.bfloat16).astype(jnp.float32).T)


# A tied model whose embedding (512 x 64) is big enough for the kernel; the layers too.
TIED = lj.PRESETS["tiny"].replace(vocab_size=512, tie_embeddings=True)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_tied_quantized_head_runs_the_row_kernel_and_equals_the_dequantized_model(bits, group):
    params = lj.init_params(TIED, jax.random.key(0))
    qp = Q.quantize_params(params, TIED, bits=bits, group=group, include_embeddings=True)
    embed = qp["embed"]
    assert isinstance(embed, QArray) and "lm_head" not in qp
    tokens = jnp.asarray([[1, 7, 300, 511]], jnp.int32)
    assert cpu_qmatmul.supported_rows(embed, _weights((tokens.size, TIED.dim)))
    f = jax.jit(lambda p, t: lj.forward(p, t, TIED, kernels=NATIVE))
    text = f.lower(qp, tokens).as_text()
    assert cpu_qmatmul.ROWS_TARGET in text
    # The tied head does not transpose the codes: no [D, V] copy of them in the program.
    assert f"tensor<{TIED.dim}x{TIED.vocab_size}xi" not in text
    logits = f(qp, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, TIED.vocab_size)
    ref = lj.forward(Q.dequantize_params(qp), tokens, TIED)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_untied_quantized_head_runs_the_kernel_with_float32_logits():
    cfg = lj.PRESETS["tiny"]  # untied: lm_head [64, 256], grouped along D like any linear weight
    params = lj.init_params(cfg, jax.random.key(0))
    qp = Q.quantize_params(params, cfg, bits=8, include_embeddings=True)
    tokens = jnp.asarray([[1, 7, 200]], jnp.int32)
    f = jax.jit(lambda p, t: lj.forward(p, t, cfg, kernels=NATIVE))
    assert cpu_qmatmul.supported(qp["lm_head"], _weights((3, cfg.dim)))
    assert cpu_qmatmul.TARGET in f.lower(qp, tokens).as_text()
    np.testing.assert_allclose(np.asarray(f(qp, tokens)), np.asarray(lj.forward(Q.dequantize_params(qp), tokens, cfg)),
                               rtol=1e-5, atol=1e-5)
    # bfloat16 compute (no kernel on the CPU takes it): the logits stay float32, as for float weights,
    # untied and tied.
    for c in (cfg.replace(compute_dtype="bfloat16"), TIED.replace(compute_dtype="bfloat16")):
        p = Q.quantize_params(lj.init_params(c, jax.random.key(1)), c, bits=8, include_embeddings=True)
        logits = lj.forward(p, tokens, c, kernels=NATIVE)
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits), np.asarray(lj.forward(Q.dequantize_params(p), tokens, c)),
                                   rtol=1e-6, atol=1e-6)


def test_a_failed_build_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed"):
        cpu_qmatmul.build()
    assert not list((tmp_path / "native").iterdir())

