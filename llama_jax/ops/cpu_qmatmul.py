"""A native quantized matmul for XLA's CPU backend (csrc/qmatmul_cpu.cc, called through the XLA FFI).

    out = qmatmul_cpu(x, q, layer)   # x [M, K] float32 @ layer `layer` of q (QArray [L, K, N]) -> [M, N] float32
    out = qmatmul_rows_cpu(x, q)     # x [M, D] float32 @ q.T, q a QArray [V, D] grouped along D -> [M, V]

Left to XLA, `x @ q.dequantize()` writes every weight out as float32 and then runs a float matvec; the
kernel decodes the codes in registers instead (per int4 group: s * x . (codes - 8) + (z + 8 s) * sum(x)),
on XLA's intra-op thread pool. Like pallas_qmatmul.py (the GPU kernel) it takes the whole stacked weight and a layer
index, so the decode scan's layer views (ops/matmul.py) reach it without a copy. The second form is the
tied lm_head: the embedding [V, D] is grouped along D (params.py), so each logit is x times one contiguous row of codes;
a transpose would have XLA copy every code on every call.

The library is compiled on first use with the system C++ compiler (c++ or g++) against jaxlib's FFI
headers, for the CPU's vector ISA (x86-64-v4 with AVX-512, v3 with AVX2 + FMA, else the compiler's
default; never -march=native, which may pick extensions a sandbox forbids), into llama-jax's cache folder
(native.py: LLAMA_JAX_CACHE, ~/.cache/llama-jax) under a name that hashes the source, the
flags and the jaxlib version. The kernel policy (policy.py) chooses it where `available()`; without a
compiler, or when the build fails, it is not chosen (after one warning) and ops/matmul.py dequantizes
next to an XLA dot instead.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.ops import native

TARGET = "llama_jax_qmatmul_cpu"
ROWS_TARGET = "llama_jax_qmatmul_rows_cpu"
SOURCE = Path(__file__).parent / "csrc" / "qmatmul_cpu.cc"
# Where the kernel beats XLA's dequantize-then-dot (measured on 2 cores): up to ~32 rows (more: prompts,
# where XLA's float dot catches up) and from ~16K weights (stories260K's 64 x 172 is as fast in XLA,
# which fuses the dequantization into its dot, as a custom call is).
MAX_ROWS = 32
MIN_WEIGHTS = 1 << 14


def _isa_flags() -> list[str]:
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return []
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return ["-march=x86-64-v4"]
    if {"avx2", "fma"} <= flags:
        return ["-march=x86-64-v3"]
    return []


def build() -> Path:
    """The compiled library (built now unless the cache holds it); raises on failure."""
    cxx = next((c for c in (os.environ.get("CXX"), "c++", "g++") if c and shutil.which(c)), None)
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    flags = ["-O3", "-shared", "-fPIC", "-std=c++17", *_isa_flags(), "-I", jax.ffi.include_dir()]
    return native.build([cxx, *flags], [SOURCE], "qmatmul_cpu")


@functools.cache
def available() -> bool:
    """Whether the kernel can run: built and registered with XLA (once per process). When it cannot,
    says why once."""
    try:
        native.register(build(), {TARGET: "LlamaJaxQMatmulCpu", ROWS_TARGET: "LlamaJaxQMatmulRowsCpu"}, "cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say why
        warnings.warn(f"the native CPU quantized matmul is unavailable, so quantized matmuls on the CPU "
                      f"dequantize next to an XLA dot (slower); --kernels xla (Kernels.xla()) silences this. "
                      f"Reason: {e}", RuntimeWarning, stacklevel=3)
        return False
    return True


def _serves(q, x, k: int) -> bool:
    """What both forms need: float32 activations, few rows of length k (the contraction),
    a weight that is not tiny, scales of a dtype the kernel reads, and K not padded (qarray.py)."""
    return (x.dtype == jnp.float32 and x.size // max(k, 1) <= MAX_ROWS
            and math.prod(q.matrix_shape()) >= MIN_WEIGHTS and k % q.group == 0
            and q.values.shape[q.axis] * 8 // q.bits == k
            and jnp.dtype(q.scales.dtype) in (jnp.float32, jnp.float16, jnp.bfloat16))


def supported(q, x) -> bool:
    """Whether the kernel serves x @ q: as `_serves`, for a weight grouped along K (the rows of the stored
    matrix)."""
    k = q.matrix_shape()[0]
    return q.axis == -2 and (q.bits == 8 or q.group % 2 == 0) and _serves(q, x, k)


def supported_rows(q, x) -> bool:
    """Whether the kernel serves x @ q.T: as `_serves`, for a 2-D weight [V, D] grouped along D (its
    columns) in groups of whole vectors (16 codes; 32 for int4, whose bytes hold two of a group's codes)."""
    d = q.matrix_shape()[1]
    return (q.values.ndim == 2 and q.axis == -1 and q.group % (16 if q.bits == 8 else 32) == 0
            and _serves(q, x, d))


def _operands(q):
    """q's codes and scales, and its zero points or an empty array (the kernel's "none")."""
    zeros = jnp.zeros((0,), q.scales.dtype) if q.zeros is None else q.zeros
    return q.values, q.scales, zeros


def qmatmul_rows_cpu(x, q):
    """x [M, D] float32 @ q.T (q a 2-D QArray [V, D] grouped along D) -> float32 [M, V]."""
    call = jax.ffi.ffi_call(ROWS_TARGET, jax.ShapeDtypeStruct((x.shape[0], q.matrix_shape()[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, *_operands(q), bits=np.int64(q.bits), group=np.int64(q.group))


def qmatmul_cpu(x, q, layer=None):
    """x [M, K] float32 @ q (a 2-D QArray [K, N], or stacked [L, K, N] with `layer`) -> float32 [M, N]."""
    layer = jnp.asarray(0 if q.values.ndim == 2 else layer, jnp.int32).reshape(1)
    out = jax.ShapeDtypeStruct((x.shape[0], q.matrix_shape()[1]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(x, *_operands(q.as_stack()), layer, bits=np.int64(q.bits), group=np.int64(q.group))
