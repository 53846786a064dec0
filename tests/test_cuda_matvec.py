"""The CUDA one-row matmul (llama_jax/gpu_matvec.py): its sources build, its decoding arithmetic is
exact to the dequantized weights, off a Hopper GPU nothing routes to it, and the model's fused decode
layer built on it (Block._decode_fused, one gpu_matvec.decode_layer call) equals the layer as written.
The kernels themselves run only on a GPU: bench/matvec_gpu_check.py checks the matmul there against
x @ dequantize(w) in float32 and the layer against its float32 contract, and bench/decode.py the whole
step against XLA's."""
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import gpu_matvec
from llama_jax import quantize as Q


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs CUDA's nvcc (the CI machine has it)")
def test_cuda_source_builds(tmp_path):
    """The library compiles for Hopper with the flags gpu_matvec uses (no GPU needed to compile)."""
    out = tmp_path / "matvec_gpu.so"
    r = subprocess.run(["nvcc", *gpu_matvec.nvcc_flags("90"), *map(str, gpu_matvec.SOURCES), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 0


def _nibble_float(nibble):
    """The kernel's NibbleFloat: a 4-bit code in bits 16-23 of 0.5, the float 0.5 + u / 256."""
    return (np.uint32(0x3F000000) | (nibble.astype(np.uint32) << 16)).view(np.float32)


def _dot_as_kernel(x, q):
    """x [K] float32 @ q (a 2-D QArray [K, N] grouped along K) by the kernel's arithmetic, in float32:
    per scale group A = sum x f and X = sum x, then the group's formula."""
    k, n = q.matrix_shape()
    codes, s = np.asarray(q.values), np.asarray(q.scales, np.float32)
    out = np.zeros(n, np.float32)
    for g in range(k // q.group):
        if q.bits == 8:  # the byte in the mantissa of 2^23, less 2^23 + 128: the code itself
            u = (codes[g * q.group:(g + 1) * q.group].astype(np.int16) + 128).astype(np.uint32)  # c ^ 0x80
            c = (np.uint32(0x4B000000) | u).view(np.float32) - np.float32(8388736)
            out += s[g] * (x[g * q.group:(g + 1) * q.group, None] * c).sum(0, dtype=np.float32)
            continue
        h = q.group // 2
        b = codes[g * h:(g + 1) * h]  # byte j: code j (low nibble), code j + group/2 (high nibble)
        x_lo, x_hi = x[g * q.group:g * q.group + h], x[g * q.group + h:(g + 1) * q.group]
        a = (x_lo[:, None] * _nibble_float(b & 0x0F) + x_hi[:, None] * _nibble_float(b >> 4)).sum(0, dtype=np.float32)
        xsum = x_lo.sum(dtype=np.float32) + x_hi.sum(dtype=np.float32)
        if q.zeros is None:
            out += s[g] * (np.float32(256) * a - np.float32(136) * xsum)
        else:
            z = np.asarray(q.zeros, np.float32)[g]
            out += np.float32(256) * s[g] * a + (z - np.float32(128) * s[g]) * xsum
    return out


@pytest.mark.parametrize("bits,group,zero_point", [(8, None, False), (8, 32, False), (4, 64, False), (4, 32, True)])
def test_decoding_arithmetic_matches_dequantize(bits, group, zero_point):
    """The byte-permute floats and the per-group formulas (int4: constants 256, 128, 136) give
    x @ dequantize(q) to float32 accuracy: against float64, within 1e-5 relative."""
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    q = Q.quantize(jnp.asarray(w), bits, group, zero_point=zero_point)
    x = rng.standard_normal(k).astype(np.float32)
    exact = x.astype(np.float64) @ np.asarray(q.dequantize(jnp.float32), np.float64)
    got = _dot_as_kernel(x, q)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-5


def test_not_served_off_a_hopper_gpu():
    """On the CPU the model never routes to the kernel (it falls back to XLA and the CPU kernels)."""
    x = jnp.ones((1, 256), jnp.bfloat16)
    assert not gpu_matvec.serves(1, jnp.bfloat16)
    assert not gpu_matvec.supported((jnp.ones((2, 256, 128), jnp.bfloat16),), x)


def test_split_rule_for_llama2_7b():
    """Parts of K per launch for the 7B decode weights, as tuned on an H100 (BENCHMARKS.md): column
    blocks of 128 (bf16) or 256 (int8, int4) columns, doubled until MIN_BLOCKS blocks."""
    assert gpu_matvec._split(96, 4096 // 8, 16) == 1     # bf16 q/k/v: 96 blocks, whole K
    assert gpu_matvec._split(172, 4096 // 8, 16) == 1    # bf16 gate/up
    assert gpu_matvec._split(32, 11008 // 8, 16) == 4    # bf16 down
    assert gpu_matvec._split(16, 4096 // 8, 8) == 8      # int8 o
    assert gpu_matvec._split(48, 2048 // 16, 4) == 4     # int4 q/k/v: 2048 stored rows, chunks of 16
    assert gpu_matvec._split(86, 2048 // 16, 4) == 2     # int4 gate/up: 172 blocks, one wave (4 parts: 344)
    assert gpu_matvec._split(16, 64, 4) == 4             # few rows: a part of K keeps a chunk a lane


def test_fused_decode_layer_equals_the_layer(monkeypatch):
    """Block._decode_fused (a decode step's layer as one gpu_matvec.decode_layer call, with the RMSNorms, the
    SwiGLU and the residual adds folded into the matmuls) gives the logits of the layer as written, step
    after step: run on the CPU with the call's contract (decode_layer_reference: matvec_reference and
    attention_reference, in XLA) in its place; the layer as written runs the Pallas attention kernel,
    interpreted."""
    import functools

    import jax

    import llama_jax as lj
    from llama_jax import attention as A
    from llama_jax import model
    from llama_jax.generate import _step, prefill

    cfg = lj.PRESETS["tiny-gqa"].replace(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
                                         param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(0))
    prompt = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 9)), jnp.int32)
    monkeypatch.setattr(model, "decode_kernel_serves", lambda q, c: q.shape[1] == 1)
    monkeypatch.setattr(model, "decode_attention", functools.partial(A.decode_attention, interpret=True))
    layers = []

    def reference(x, ws, norms, layer, *args, **kwargs):
        layers.append((x.shape, len(ws), len(norms)))
        return gpu_matvec.decode_layer_reference(x, ws, norms, layer, *args, **kwargs)

    def decode(fused: bool, tokens=None, steps: int = 4):
        monkeypatch.setattr(gpu_matvec, "serves", lambda rows, dtype: fused and rows == 1 and dtype == jnp.bfloat16)
        monkeypatch.setattr(gpu_matvec, "matvec", gpu_matvec.matvec_reference)  # the lm_head
        monkeypatch.setattr(gpu_matvec, "decode_layer", reference)
        cache = lj.KVCache.zeros(cfg, 1, 16)
        logits, cache, position = prefill(params, prompt, jnp.ones(prompt.shape, bool), cache, cfg=cfg)
        out, chosen = [logits], []
        for t in range(steps):  # the same tokens for both runs: the first run's greedy choices
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32) if tokens is None else tokens[t]
            chosen.append(token)
            logits, cache = _step(params, token, position, cache, cfg)
            out.append(logits)
            position = position + 1
        return np.asarray(jnp.stack(out), np.float32), chosen

    plain, tokens = decode(False)
    assert layers == []
    fused, _ = decode(True, tokens)
    assert layers and layers[0] == ((1, cfg.dim), 7, 2)  # the fused path ran
    assert np.abs(fused - plain).max() < 0.01 * np.abs(plain).max()  # 0.6% seen: bf16 roundings
    assert (fused.argmax(-1) == plain.argmax(-1)).mean() >= 0.8


def test_layer_supported_refuses_what_the_layer_does_not_take(monkeypatch):
    """With the GPU taken as served, `layer_supported` accepts Llama-shaped stacks (grouped-query heads too)
    and refuses what decode_layer's kernels would reject: a head_dim other than 64 or 128, several rows, a
    float32 cache, query heads not a multiple of the kv heads, q/k/v widths that disagree with the heads."""
    monkeypatch.setattr(gpu_matvec, "serves", lambda rows, dtype: rows == 1 and dtype == jnp.bfloat16)
    d, f, layers = 256, 512, 2
    bf = lambda k, n: jnp.ones((layers, k, n), jnp.bfloat16)  # noqa: E731

    def stacks(heads, kv_heads, head_dim):
        return (bf(d, heads * head_dim), bf(d, kv_heads * head_dim), bf(d, kv_heads * head_dim),
                bf(heads * head_dim, d), bf(d, f), bf(d, f), bf(f, d))

    def cache(kv_heads, head_dim, batch=1, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((layers, batch, 32, kv_heads, head_dim), dtype)

    import jax

    x = jnp.ones((1, d), jnp.bfloat16)
    assert gpu_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(2, 64))
    assert gpu_matvec.layer_supported(stacks(2, 2, 128), x, 2, 128, cache(2, 128))
    int4 = tuple(Q.quantize(w.astype(jnp.float32), 4, 64, stacked=True) for w in stacks(4, 2, 64))
    assert gpu_matvec.layer_supported(int4, x, 4, 64, cache(2, 64))
    assert not gpu_matvec.layer_supported(stacks(8, 4, 32), x, 8, 32, cache(4, 32))  # head_dim 32
    assert not gpu_matvec.layer_supported(stacks(4, 2, 64), jnp.ones((2, d), jnp.bfloat16), 4, 64, cache(2, 64, 2))
    assert not gpu_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(2, 64, dtype=jnp.float32))
    assert not gpu_matvec.layer_supported(stacks(3, 2, 64), x, 3, 64, cache(2, 64))  # 3 heads, 2 kv heads
    assert not gpu_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(1, 64))  # k/v wider than the cache


def test_supported_refuses_what_the_kernel_does_not_take(monkeypatch):
    """With the GPU taken as served, `supported` accepts the 7B shapes and refuses what the kernel would
    reject (so the model falls back instead of failing): K not a multiple of the chunk, N not a multiple
    of 8, mixed schemes or K, more than three weights, several rows."""
    monkeypatch.setattr(gpu_matvec, "serves", lambda rows, dtype: rows == 1 and dtype == jnp.bfloat16)
    x = jnp.ones((1, 256), jnp.bfloat16)
    bf = lambda k, n: jnp.ones((2, k, n), jnp.bfloat16)  # noqa: E731
    w = jnp.ones((2, 256, 64), jnp.float32)
    assert gpu_matvec.supported((bf(256, 64),) * 3, x)
    assert not gpu_matvec.supported((bf(256, 64),) * 4, x)
    assert not gpu_matvec.supported((bf(256, 60),), x)
    assert not gpu_matvec.supported((bf(252, 64),), jnp.ones((1, 252), jnp.bfloat16))
    assert not gpu_matvec.supported((bf(256, 64),), jnp.ones((2, 256), jnp.bfloat16))
    int8, int4 = Q.quantize(w, 8, None, stacked=True), Q.quantize(w, 4, 32, stacked=True)
    assert gpu_matvec.supported((int8,), x) and gpu_matvec.supported((int4, int4), x)
    assert not gpu_matvec.supported((int8, int4), x)
    assert not gpu_matvec.supported((int4, Q.quantize(w[:, :128], 4, 32, stacked=True)), x)  # two K
    assert gpu_matvec.supported((Q.quantize(w, 8, 32, stacked=True),), x)  # int8 in groups
