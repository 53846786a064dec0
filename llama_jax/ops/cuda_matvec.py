"""One-row matmuls of batch-1 decoding on Hopper GPUs: a CUDA kernel (csrc/matvec_gpu.cu) called through
the XLA FFI, for bf16 weights and qarray.py's int8 and int4 QArrays alike, and a whole decoder layer
built from it and a decode-attention kernel (csrc/attention_gpu.cu) in one call.

    outs = matvec(x, (wq, wk, wv), layer)   # x [1, K] bf16; layer `layer` of each stacked weight -> [1, N] each
    q, k, v = matvec(x, (wq, wk, wv), layer, norm=attn_norm, eps=1e-5)   # rmsnorm(x) on the way in
    x = matvec(gate, (wdown,), layer, up=up, residual=x)[0]              # silu(gate) * up in, x + h out
    x, cache_k, cache_v = decode_layer(x, (wq, wk, wv, wo, wgate, wup, wdown), (attn_norm, mlp_norm), layer,
                                       rope, cache_k, cache_v, start, mask, eps=1e-5, head_dim=128)

At batch 1 a decode step reads every weight once, so its speed is the speed at which the matmuls read
HBM. XLA's GEMMs read a Llama-2-7B step's bf16 weights at 2.7 TB/s, and the Pallas kernel of pallas_qmatmul.py
reads int8 codes at 1.7-2.1 TB/s and int4 codes at 0.7-1.0 TB/s (bench/BENCHMARKS.md): Triton gives no
control over how many loads are in flight, and its int4 decoding costs more instructions than the bytes
allow. The CUDA kernel issues a chunk of 16-byte loads before the first use, decodes codes with byte
permutes, and reduces the parts of K across a thread-block cluster (Hopper's distributed shared
memory), so one launch gives the finished product. Like pallas_qmatmul.py it takes whole stacks and a layer
index, so that XLA copies no slices; up to three weights that share x run side by side in one launch.
It also takes the small steps around the matmuls (the fused decode layer, ops/layer.py): the RMSNorm or
the SwiGLU on the way in, the residual add on the way out, each rounded to bf16 where the model rounds,
so a 7B decode step runs 204 kernels instead of 363. `matvec_reference` is the same contract in XLA, for
tests.

`decode_layer` runs a layer's six launches (q/k/v, attention, o, gate/up, down) from one FFI call. For
quantized weights each launch after the first is a programmatic dependent of the one before (Hopper's
programmatic dependent launch): its blocks start while the launch before finishes, issue what does not
depend on it (the attention's cache loads), and wait for its outputs only where they read them. XLA
traces each custom call into a node of its own in the step's CUDA graph, so only launches made in one
call can overlap like this. A Llama-2-7B int4 step took 2.30 ms instead of 2.39; bf16, whose launches
already read near HBM's rate, got slower with it and runs them in order (bench/BENCHMARKS.md).
Its reference is the model's own layer (model.Block), which the tests and bench/matvec_gpu_check.py
hold it to.

The library is compiled on first use with CUDA's nvcc (NVCC, then PATH, CUDA_HOME, /usr/local/cuda) for
the GPU's architecture, into llama-jax's cache folder (native.py) under a name that hashes the sources,
the flags, nvcc's version and jaxlib's. The kernel policy (policy.py) chooses it on one Hopper GPU where
`available()`; without nvcc, on an older GPU (clusters need compute capability 9.0), or when the build
fails, it is not chosen (after one warning where something failed), and the Pallas kernels and XLA run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.ops import native

TARGET = "llama_jax_matvec_gpu"
LAYER_TARGET = "llama_jax_decode_layer_gpu"
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "matvec_gpu.cu", CSRC / "attention_gpu.cu")  # one library
HEADERS = (CSRC / "attention_gpu.h",)
MAX_WEIGHTS = 3  # one launch
ROW_THREADS = 16  # threads across a row in a block, 16 bytes each (the kernel's kRowThreads)
LANES = 16  # rows a block reads at once (the kernel's kLanes)
SMEM_INPUTS = 24 * 1024  # bytes of a block's inputs in shared memory (the kernel allows 28 KB with int4's groups)
# By bits (16: bf16): rows of K a thread reads per chunk (all of a chunk's loads are issued before the
# first use; chunks of 8 are double-buffered), and the blocks a launch aims at (the K split doubles until
# it has them). The best of the 7B decode step on an H100 (bench/decode_step.py, bench/BENCHMARKS.md):
# more blocks cost more in the cluster reduction and in the last wave than they gain (int4 at 192 gave its
# gate/up 4 parts, 344 blocks: 1.3 waves of an H100's 264; bf16 at 96 runs q/k/v as 96 whole-K blocks, not
# 192 halves, 0.8% faster a step).
CHUNK = {16: 8, 8: 8, 4: 16}
MIN_BLOCKS = {16: 96, 8: 128, 4: 128}


def _nvcc() -> str | None:
    for c in (os.environ.get("NVCC"), shutil.which("nvcc"),
              *(os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _arch(device) -> str:
    major, minor = str(device.compute_capability).split(".")
    return f"{major}{minor}"


def nvcc_flags(arch: str) -> list[str]:
    """nvcc's flags for the library, for compute capability `arch` ("90": Hopper)."""
    return ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-diag-suppress", "940,2473",  # warnings from jaxlib's FFI headers
            "-I", jax.ffi.include_dir()]


def _build(arch: str) -> Path:
    """The compiled library (built now unless the cache holds it); raises on failure."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc (set NVCC or CUDA_HOME, or put it on PATH)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return native.build([nvcc, *nvcc_flags(arch)], SOURCES, "matvec_gpu", version, HEADERS)


def is_hopper(device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9.0 or later (thread-block clusters)."""
    try:
        return float(device.compute_capability) >= 9.0
    except (AttributeError, ValueError):  # not a CUDA device
        return False


_registered_for: list[str] = []  # the architecture the library is registered for, once it is


@functools.cache
def _register(arch: str | None) -> bool:
    try:
        if arch is None:
            raise RuntimeError("the device is not a CUDA GPU")
        native.register(_build(arch), {TARGET: "LlamaJaxMatvecGpu", LAYER_TARGET: "LlamaJaxDecodeLayerGpu"}, "CUDA")
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say why
        warnings.warn(f"the CUDA one-row matmul is unavailable, so batch-1 decoding uses the Pallas kernel "
                      f"and XLA (slower); --kernels xla (Kernels.xla()) silences this. Reason: {e}",
                      RuntimeWarning, stacklevel=4)
        return False
    _registered_for.append(arch)
    return True


def available(device=None) -> bool:
    """Whether the library is built and registered with XLA for `device`, once per process. Without a
    device (the ops layer, at trace time): whether it is registered already, as the kernel policy
    (Kernels.auto) leaves it for the device it chose for; else for the first local device. When it cannot
    be, says why once."""
    if device is None:
        if _registered_for:
            return True
        device = jax.local_devices()[0]
    return _register(_arch(device) if hasattr(device, "compute_capability") else None)


def _bits(w) -> int:
    return getattr(w, "bits", 16)  # a QArray's, else a bf16 array


def _stack_shape(w) -> tuple[int, int, int]:
    """[layers, stored rows, N] of a weight as the kernel reads it."""
    if hasattr(w, "bits"):
        return tuple(w.as_stack().values.shape)
    return (1,) * (3 - w.ndim) + tuple(w.shape)


def supported(ws, x) -> bool:
    """Whether the kernel serves x [1, K] @ each of ws: bf16 matrices [(L,) K, N], or QArrays [(L,) K, N]
    grouped along K (int8 per channel or in groups, int4 in groups, each group whole chunks of rows);
    one kind, scheme and K for all, at most three, K a multiple of the chunk, N of 8 (bf16) or 16."""
    ws = tuple(ws) if isinstance(ws, (tuple, list)) else (ws,)
    k = x.shape[-1]
    if not (1 <= len(ws) <= MAX_WEIGHTS) or x.size != k or x.dtype != jnp.bfloat16:
        return False
    bits = {_bits(w) for w in ws}
    if len(bits) != 1:
        return False
    bits = bits.pop()
    if bits == 16:
        return k % CHUNK[16] == 0 and all(w.dtype == jnp.bfloat16 and w.shape[-2] == k and w.shape[-1] % 8 == 0
                                          for w in ws)
    schemes = {(w.group, w.zeros is None, w.scales.dtype) for w in ws}
    rows = k // 2 if bits == 4 else k

    def ok(w):
        grouped_rows = w.group // 2 if bits == 4 else (0 if w.group == k else w.group)
        return (w.axis == -2 and w.matrix_shape()[0] == k and _stack_shape(w)[1] == rows
                and w.matrix_shape()[1] % 16 == 0 and grouped_rows % CHUNK[bits] == 0
                and jnp.dtype(w.scales.dtype) in (jnp.float32, jnp.float16, jnp.bfloat16))

    return len(schemes) == 1 and rows % CHUNK[bits] == 0 and all(ok(w) for w in ws)


def k_split(blocks: int, chunks: int, bits: int, k: int = 0) -> int:
    """Parts of K (a cluster of 1 to 8 blocks): the fewest that give MIN_BLOCKS blocks, while every row
    lane of a block still has a chunk; and enough that the k bf16 inputs a launch stages (the norm's or
    the SwiGLU's; 0 for none) fit a block's shared memory once split."""
    split = 1
    while split < 8 and ((blocks * split < MIN_BLOCKS[bits] and chunks // (2 * split) >= LANES)
                         or 2 * k // split > SMEM_INPUTS):
        split *= 2
    return split


def _staged(k: int, *, norm: bool = False, swiglu: bool = False) -> int:
    """bf16 values a launch of K = k stages in shared memory: x (and the norm's weight beside it) through
    the RMSNorm or the SwiGLU, none for a plain input."""
    return 2 * k if norm else k if swiglu else 0


def _launch_split(ws, staged: int, chunk: int) -> int:
    """The rule's parts of K for one launch of ws (see k_split); staged: the bf16 inputs it stages."""
    bits = _bits(ws[0])
    cols = ROW_THREADS * (8 if bits == 16 else 16)  # columns a block: 16 threads x 8 or 16 columns
    blocks = sum(-(-_stack_shape(w)[2] // cols) for w in ws)
    return k_split(blocks, _stack_shape(ws[0])[1] // chunk, bits, staged)


def _operands(ws) -> list:
    """Each weight as the kernel takes it: codes (or the bf16 stack), scales and zero points (empty where none)."""
    empty = jnp.zeros((0,), jnp.float32)
    operands = []
    for w in ws:
        if _bits(w) == 16:
            operands += [w.reshape(_stack_shape(w)), empty, empty]
        else:
            q = w.as_stack()
            operands += [q.values, q.scales, empty if q.zeros is None else q.zeros]
    return operands


@functools.partial(jax.jit, static_argnames=("out_dtype", "eps", "split", "chunk"))
def matvec(x, ws, layer=None, *, out_dtype=jnp.float32, norm=None, eps=0.0, up=None, residual=None, split=None,
           chunk=None):
    """x [1, K] bf16 @ layer `layer` of each weight in ws (a tuple; each a bf16 array [(L,) K, N] or a
    QArray) -> a tuple of [1, N] in out_dtype (float32 or bfloat16; sums are float32 either way).

    On the way in, the product's input can be rmsnorm(x) (norm: the bf16 RMSNorm weight [(L,) K] of the
    same layer, eps its epsilon) or silu(x) * up (up [1, K] bf16: the SwiGLU); on the way out, `residual`
    [1, N] bf16 can be added (one weight, out_dtype bf16). Each is rounded to bf16 where the model
    rounds. split (parts of K, 1-8) and chunk (rows in flight, 8 or 16): default by shape and scheme."""
    bits = _bits(ws[0])
    operands, ns = _operands(ws), [_stack_shape(w)[2] for w in ws]
    staged = _staged(x.shape[-1], norm=norm is not None, swiglu=up is not None)
    chunk = chunk or CHUNK[bits]
    split = split or _launch_split(ws, staged, chunk)
    empty = jnp.zeros((0,), jnp.float32)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    extra = [empty if a is None else a for a in (up, norm, residual)]
    call = jax.ffi.ffi_call(TARGET, tuple(jax.ShapeDtypeStruct((1, n), out_dtype) for n in ns))
    return tuple(call(x.astype(jnp.bfloat16), layer, *extra, *operands, bits=np.int64(bits),
                      split=np.int64(split), chunk=np.int64(chunk), eps=np.float32(eps)))


def matvec_reference(x, ws, layer=None, *, out_dtype=jnp.float32, norm=None, eps=0.0, up=None, residual=None,
                     split=None, chunk=None):
    """What `matvec` computes, in XLA with float32 sums: its contract, for the tests of the kernel's
    operands (tests/test_cuda_matvec.py) and bench/matvec_gpu_check.py. split and chunk change nothing here."""
    del split, chunk
    f32, bf16 = jnp.float32, jnp.bfloat16
    i = 0 if layer is None else layer
    x = x.astype(f32)
    if norm is not None:  # RMSNorm.__call__, rounded to bf16
        g = (norm[i] if norm.ndim == 2 else norm).astype(f32)
        x = (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g).astype(bf16).astype(f32)
    elif up is not None:  # MLP.__call__'s silu(gate) * up, rounded to bf16
        x = (jax.nn.silu(x) * up.astype(f32)).astype(bf16).astype(f32)
    outs = []
    for w in ws:
        if hasattr(w, "bits"):
            m = w.as_stack().take(i).dequantize(f32).reshape(w.matrix_shape())
        else:
            m = w.reshape(_stack_shape(w))[i].astype(f32)
        out = jnp.dot(x, m, precision=jax.lax.Precision.HIGHEST)
        if residual is not None:  # x + h, h rounded to bf16
            out = out.astype(bf16).astype(f32) + residual.astype(f32)
        outs.append(out.astype(out_dtype))
    return tuple(outs)


def layer_supported(ws, x, heads: int, head_dim: int, cache_k) -> bool:
    """Whether `decode_layer` serves a layer: ws (q, k, v, o, gate, up, down) as `supported` takes them,
    x [1, D] bf16, heads query heads of head_dim 64 or 128, the cache [layers, 1, max_len, kv_heads,
    head_dim] bf16 with kv_heads dividing heads."""
    ws = tuple(ws)
    if len(ws) != 7 or head_dim not in (64, 128) or cache_k.dtype != jnp.bfloat16 or cache_k.ndim != 5:
        return False
    kv_heads = cache_k.shape[3]
    if cache_k.shape[1] != 1 or cache_k.shape[4] != head_dim or heads % kv_heads:
        return False
    ns = [_stack_shape(w)[2] for w in ws]
    if ns[0] != heads * head_dim or ns[1] != ns[2] or ns[1] != kv_heads * head_dim or ns[4] != ns[5]:
        return False
    attended = jax.ShapeDtypeStruct((1, heads * head_dim), x.dtype)
    f = jax.ShapeDtypeStruct((1, ns[4]), x.dtype)
    return (supported(ws[:3], x) and supported(ws[3:4], attended) and supported(ws[4:6], x)
            and supported(ws[6:], f) and ns[3] == ns[6] == x.shape[-1])


@functools.partial(jax.jit, static_argnames=("eps", "head_dim"))
def decode_layer(x, ws, norms, layer, rope, cache_k, cache_v, start, mask, *, eps: float, head_dim: int):
    """A decoder layer for one token, as Block.__call__ computes it, in one call: x [1, D] bf16; ws the
    layer stacks of q, k, v, o, gate, up and down ([L, K, N] bf16 or QArrays, K of o merged over heads);
    norms the RMSNorm weights [L, D] (attention, MLP) with epsilon eps; layer an int32 scalar (of the
    weights and the caches); rope (cos, sin) [1, ..., head_dim / 2]; the caches [L, 1, max_len, kv_heads,
    head_dim] bf16, written at slot `start` in place (aliased); mask [1, max_len] bool.
    -> (x [1, D] bf16, cache_k, cache_v). `layer_supported` says where it serves."""
    ws = tuple(ws)
    bits = _bits(ws[0])
    d, chunk = x.shape[-1], CHUNK[bits]
    ns = [_stack_shape(w)[2] for w in ws]
    bf16, shape = jnp.bfloat16, jax.ShapeDtypeStruct
    results = (shape((1, d), bf16), shape(cache_k.shape, cache_k.dtype), shape(cache_v.shape, cache_v.dtype),
               *(shape((1, n), bf16) for n in ns[:3]), shape((1, ns[0]), bf16), shape((1, d), bf16),
               shape((1, ns[4]), bf16), shape((1, ns[5]), bf16))
    # operands 6 and 7 (the caches) are results 1 and 2: written in place
    call = jax.ffi.ffi_call(LAYER_TARGET, results, input_output_aliases={6: 1, 7: 2})
    cos, sin = (t.reshape(1, head_dim // 2).astype(jnp.float32) for t in rope)
    scalar = lambda a: jnp.asarray(a, jnp.int32).reshape(1)  # noqa: E731
    out = call(x.astype(bf16), scalar(layer), scalar(start), cos, sin, mask.reshape(1, -1).astype(bool), cache_k,
               cache_v, *norms, *_operands(ws), bits=np.int64(bits),
               split_qkv=np.int64(_launch_split(ws[:3], _staged(d, norm=True), chunk)),
               split_o=np.int64(_launch_split(ws[3:4], _staged(ns[0]), chunk)),
               split_gate_up=np.int64(_launch_split(ws[4:6], _staged(d, norm=True), chunk)),
               split_down=np.int64(_launch_split(ws[6:], _staged(ns[4], swiglu=True), chunk)), chunk=np.int64(chunk),
               eps=np.float32(eps))
    return out[0], out[1], out[2]
