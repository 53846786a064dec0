"""The CUDA one-row matmul (llama_jax/ops/cuda_matvec.py): its sources build, its decoding arithmetic is
exact to the dequantized weights, the kernel policy chooses it only on one Hopper GPU, and the fused
decode layer built on it (ops/layer.py, one cuda_matvec.decode_layer call) equals the model's own layer,
its reference. The kernels themselves run only on a GPU: bench/matvec_gpu_check.py checks the matmul
there against x @ dequantize(w) in float32 and the layer against the model's, and bench/decode.py the
whole step against XLA's."""
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import model, qarray
from llama_jax.generate import next_logits, prefill
from llama_jax.ops import Kernels, cuda_matvec


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs CUDA's nvcc (the CI machine has it)")
def test_cuda_source_builds(tmp_path):
    """The library compiles for Hopper with the flags cuda_matvec uses (no GPU needed to compile)."""
    out = tmp_path / "matvec_gpu.so"
    r = subprocess.run(["nvcc", *cuda_matvec.nvcc_flags("90"), *map(str, cuda_matvec.SOURCES), "-o", str(out)],
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
    q = qarray.quantize(jnp.asarray(w), bits, group, zero_point=zero_point)
    x = rng.standard_normal(k).astype(np.float32)
    exact = x.astype(np.float64) @ np.asarray(q.dequantize(jnp.float32), np.float64)
    got = _dot_as_kernel(x, q)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-5


def test_chosen_on_one_hopper_gpu_only():
    """The kernel policy chooses the CUDA kernel only for one device of compute capability 9.0 or more
    (clusters), and only where the library is available; never on the CPU, an older GPU or a sharded run."""
    cpu = jax.devices()[0]
    assert not cuda_matvec.is_hopper(cpu)
    assert Kernels.auto().matvec == "xla"
    gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc)  # noqa: E731
    assert cuda_matvec.is_hopper(gpu("9.0")) and not cuda_matvec.is_hopper(gpu("8.0"))
    assert Kernels.auto(devices=[gpu("8.0")]).matvec == "xla"  # an A100: the Pallas kernels
    assert Kernels.auto(devices=[gpu("9.0"), gpu("9.0")]).matvec == "xla"  # two H100s: XLA, partitionable


def test_split_rule_for_llama2_7b():
    """Parts of K per launch for the 7B decode weights, as tuned on an H100 (BENCHMARKS.md): column
    blocks of 128 (bf16) or 256 (int8, int4) columns, doubled until MIN_BLOCKS blocks."""
    assert cuda_matvec.k_split(96, 4096 // 8, 16) == 1     # bf16 q/k/v: 96 blocks, whole K
    assert cuda_matvec.k_split(172, 4096 // 8, 16) == 1    # bf16 gate/up
    assert cuda_matvec.k_split(32, 11008 // 8, 16) == 4    # bf16 down
    assert cuda_matvec.k_split(16, 4096 // 8, 8) == 8      # int8 o
    assert cuda_matvec.k_split(48, 2048 // 16, 4) == 4     # int4 q/k/v: 2048 stored rows, chunks of 16
    assert cuda_matvec.k_split(86, 2048 // 16, 4) == 2     # int4 gate/up: 172 blocks, one wave (4 parts: 344)
    assert cuda_matvec.k_split(16, 64, 4) == 4             # few rows: a part of K keeps a chunk a lane


def _attention_as_kernel(q, k, v, cos, sin, cache_k, cache_v, layer, start, mask):
    """What decode_layer's attention launch computes, in XLA: q [1, heads, head_dim], k and v [1, kv_heads,
    head_dim] bf16 (q and k before rotary: Hugging Face's half split, rounded to bf16), cos and sin [1,
    head_dim / 2]; the new k and v written at slot `start` of layer `layer`; a float32 softmax over the
    slots that mask [1, max_len] allows. -> (out [1, heads, head_dim] bf16, cache_k, cache_v)."""
    f32 = jnp.float32
    rope = (cos[:, None, :].astype(f32), sin[:, None, :].astype(f32))  # over the heads
    q, k = model.apply_rope(q, rope), model.apply_rope(k, rope)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None, :, None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None, :, None].astype(cache_v.dtype), (layer, 0, start, 0, 0))
    rep = q.shape[1] // k.shape[1]
    keys = jnp.repeat(cache_k[layer].astype(f32), rep, axis=2)  # [1, slots, heads, head_dim]
    values = jnp.repeat(cache_v[layer].astype(f32), rep, axis=2)
    scores = jnp.einsum("bhd,bshd->bhs", q.astype(f32), keys, precision="highest") / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, :], scores, -jnp.inf)
    out = jnp.einsum("bhs,bshd->bhd", jax.nn.softmax(scores, -1), values, precision="highest")
    return out.astype(q.dtype), cache_k, cache_v


def _decode_layer_as_kernel(x, ws, norms, layer, rope, cache_k, cache_v, start, mask, *, eps: float, head_dim: int):
    """What cuda_matvec.decode_layer computes from its exact operands, its six launches in XLA: q/k/v
    through the RMSNorm (matvec_reference), the attention launch, o with the residual, gate/up through the
    MLP's RMSNorm, down through the SwiGLU with the residual, each rounded to bf16 where the kernel rounds.
    Stands in for the CUDA call on the CPU."""
    bf16 = jnp.bfloat16
    q, k, v = cuda_matvec.matvec_reference(x, ws[:3], layer, out_dtype=bf16, norm=norms[0], eps=eps)
    cos, sin = (t.reshape(1, head_dim // 2) for t in rope)
    attended, cache_k, cache_v = _attention_as_kernel(
        q.reshape(1, -1, head_dim), k.reshape(1, -1, head_dim), v.reshape(1, -1, head_dim), cos, sin, cache_k,
        cache_v, layer, start, mask.reshape(1, -1))
    h = cuda_matvec.matvec_reference(attended.reshape(1, -1), ws[3:4], layer, out_dtype=bf16, residual=x)[0]
    gate, up = cuda_matvec.matvec_reference(h, ws[4:6], layer, out_dtype=bf16, norm=norms[1], eps=eps)
    return cuda_matvec.matvec_reference(gate, ws[6:], layer, out_dtype=bf16, up=up, residual=h)[0], cache_k, cache_v


def test_fused_decode_layer_equals_the_layer(monkeypatch):
    """The fused decode layer (ops.decode_layer: a decode step's layer as one cuda_matvec.decode_layer call,
    with the RMSNorms, the SwiGLU and the residual adds folded into the matmuls), chosen by
    Kernels(matvec="cuda") at batch 1 in bf16, gives the logits of the model's own layer (Kernels.xla()),
    step after step with the same tokens: run on the CPU with the call's operands handed to an XLA
    emulation of what the kernel computes (_decode_layer_as_kernel), and the lm_head's matvec to
    matvec_reference."""
    cfg = lj.PRESETS["tiny-gqa"].replace(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
                                         param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(0))
    prompt = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 9)), jnp.int32)
    layers, heads = [], []

    def decode_layer(x, ws, norms, layer, *args, **kwargs):
        layers.append((x.shape, tuple(w.shape for w in ws), tuple(n.shape for n in norms)))
        return _decode_layer_as_kernel(x, ws, norms, layer, *args, **kwargs)

    def matvec(x, ws, *args, **kwargs):
        heads.append(tuple(w.shape for w in ws))
        return cuda_matvec.matvec_reference(x, ws, *args, **kwargs)

    monkeypatch.setattr(cuda_matvec, "decode_layer", decode_layer)
    monkeypatch.setattr(cuda_matvec, "matvec", matvec)
    monkeypatch.setattr(cuda_matvec, "available", lambda device=None: True)  # no nvcc needed: the kernel is emulated
    step = jax.jit(next_logits, static_argnames=("cfg", "kernels"))

    def decode(kernels: Kernels, tokens=None, steps: int = 4):
        cache = lj.KVCache.zeros(cfg, 1, 16)
        logits, cache, position = prefill(params, prompt, jnp.ones(prompt.shape, bool), cache, cfg=cfg,
                                          kernels=kernels)
        out, chosen = [logits], []
        for t in range(steps):  # the same tokens for both runs: the first run's greedy choices
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32) if tokens is None else tokens[t]
            chosen.append(token)
            logits, cache = step(params, token, position, cache, cfg, kernels)
            out.append(logits)
            position = position + 1
        return np.asarray(jnp.stack(out), np.float32), chosen

    plain, tokens = decode(Kernels.xla())
    assert layers == [] and heads == []
    fused, _ = decode(Kernels(matvec="cuda"), tokens)
    # the fused path ran: one call per trace of the (rolled) layer scan, with every layer's whole stacks
    n, d, f, L = cfg.n_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    assert layers == [((1, d), ((L, d, n), (L, d, kv), (L, d, kv), (L, n, d), (L, d, f), (L, d, f), (L, f, d)),
                       ((L, d), (L, d)))]
    assert heads == [((d, cfg.vocab_size),)]  # and the lm_head's one-row product
    assert np.abs(fused - plain).max() < 0.01 * np.abs(plain).max()  # bf16 roundings
    assert (fused.argmax(-1) == plain.argmax(-1)).mean() >= 0.8


def test_layer_supported_refuses_what_the_layer_does_not_take():
    """`layer_supported` accepts Llama-shaped stacks (grouped-query heads too)
    and refuses what decode_layer's kernels would reject: a head_dim other than 64 or 128, several rows, a
    float32 cache, query heads not a multiple of the kv heads, q/k/v widths that disagree with the heads."""
    d, f, layers = 256, 512, 2
    bf = lambda k, n: jnp.ones((layers, k, n), jnp.bfloat16)  # noqa: E731

    def stacks(heads, kv_heads, head_dim):
        return (bf(d, heads * head_dim), bf(d, kv_heads * head_dim), bf(d, kv_heads * head_dim),
                bf(heads * head_dim, d), bf(d, f), bf(d, f), bf(f, d))

    def cache(kv_heads, head_dim, batch=1, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((layers, batch, 32, kv_heads, head_dim), dtype)

    x = jnp.ones((1, d), jnp.bfloat16)
    assert cuda_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(2, 64))
    assert cuda_matvec.layer_supported(stacks(2, 2, 128), x, 2, 128, cache(2, 128))
    int4 = tuple(qarray.quantize(w.astype(jnp.float32), 4, 64, stacked=True) for w in stacks(4, 2, 64))
    assert cuda_matvec.layer_supported(int4, x, 4, 64, cache(2, 64))
    assert not cuda_matvec.layer_supported(stacks(8, 4, 32), x, 8, 32, cache(4, 32))  # head_dim 32
    assert not cuda_matvec.layer_supported(stacks(4, 2, 64), jnp.ones((2, d), jnp.bfloat16), 4, 64, cache(2, 64, 2))
    assert not cuda_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(2, 64, dtype=jnp.float32))
    assert not cuda_matvec.layer_supported(stacks(3, 2, 64), x, 3, 64, cache(2, 64))  # 3 heads, 2 kv heads
    assert not cuda_matvec.layer_supported(stacks(4, 2, 64), x, 4, 64, cache(1, 64))  # k/v wider than the cache


def test_supported_refuses_what_the_kernel_does_not_take():
    """`supported` accepts the 7B shapes and refuses what the kernel would reject (so the ops fall back
    instead of failing): K not a multiple of the chunk, N not a multiple of 8, mixed schemes or K, more
    than three weights, several rows, float32 activations."""
    x = jnp.ones((1, 256), jnp.bfloat16)
    bf = lambda k, n: jnp.ones((2, k, n), jnp.bfloat16)  # noqa: E731
    w = jnp.ones((2, 256, 64), jnp.float32)
    assert cuda_matvec.supported((bf(256, 64),) * 3, x)
    assert not cuda_matvec.supported((bf(256, 64),) * 4, x)
    assert not cuda_matvec.supported((bf(256, 60),), x)
    assert not cuda_matvec.supported((bf(252, 64),), jnp.ones((1, 252), jnp.bfloat16))
    assert not cuda_matvec.supported((bf(256, 64),), jnp.ones((2, 256), jnp.bfloat16))
    assert not cuda_matvec.supported((bf(256, 64),), jnp.ones((1, 256), jnp.float32))
    int8, int4 = qarray.quantize(w, 8, None, stacked=True), qarray.quantize(w, 4, 32, stacked=True)
    assert cuda_matvec.supported((int8,), x) and cuda_matvec.supported((int4, int4), x)
    assert not cuda_matvec.supported((int8, int4), x)
    assert not cuda_matvec.supported((int4, qarray.quantize(w[:, :128], 4, 32, stacked=True)), x)  # two K
    assert cuda_matvec.supported((qarray.quantize(w, 8, 32, stacked=True),), x)  # int8 in groups
