"""Few-row matmuls over 32 stacked Llama-2-7B weights: bf16 (XLA), XLA's dequantize-then-dot on
QArrays, and the fused kernel of llama_jax/ops/pallas_qmatmul.py with a sweep of its block settings. One JSON
line per figure: ms for all 32 matrices and GB/s of stored bytes read.

    python bench/quantize_matvec.py [--rows 1] [--shape 4096 11008] [--sweep]   # GPU; on CPU it only checks
    python bench/quantize_matvec.py --rows 64 --variants bf16_kernel --sweep --shape 4096 4096

Every kernel result is checked against x @ dequantize(q) in float32 on fresh random inputs first.
`bf16_kernel` is qmatmul.matmul on the bf16 stack. The sweep varies the column block and warps, with one
row on the CUDA cores and padded to 16 rows for the tensor cores (`tensor_cores`), and the K split and
pipeline depth on the tensor-core path; with --rows above 1 it sweeps the column block and the K split
({} is the kernel's own choice: pallas_qmatmul.pick_dense_blocks for bf16, pick_blocks for
quantized weights), against XLA's GEMM on the same stack.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp

from llama_jax import qarray
from llama_jax import quantize as Q
from llama_jax.ops.pallas_qmatmul import matmul, qmatmul

INTERPRET = jax.default_backend() == "cpu"


def timed(f, n=20):
    jax.block_until_ready(f())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    p.add_argument("--sweep", action="store_true", help="time many block settings (GPU)")
    p.add_argument("--stages", type=int, nargs="*", default=[], help="also time these software-pipeline depths")
    p.add_argument("--variants", nargs="*", default=None, help="time only these (int8, int4_g64, int4_g32_zp, bf16_kernel)")
    a = p.parse_args()
    L, (K, N) = (2, (512, 256)) if INTERPRET else (32, a.shape)
    w = jax.random.normal(jax.random.key(0), (L, K, N), jnp.float32) * 0.02
    variants = {"int8": qarray.quantize(w, 8, None, stacked=True), "int4_g64": qarray.quantize(w, 4, 64, stacked=True),
                "int4_g32_zp": qarray.quantize(w, 4, 32, stacked=True, zero_point=True)}
    dense = w.astype(jnp.bfloat16)
    variants["bf16_kernel"] = dense  # qmatmul.matmul, as the decode step runs `o`
    del w
    x = jax.random.normal(jax.random.key(1), (a.rows, K), jnp.bfloat16)
    device = jax.devices()[0].device_kind

    def over_layers(f):  # the 32 layers one after another, like a decode step
        @jax.jit
        def run(x, w):
            def body(acc, i):
                return acc + f(x, w, i)[:, :1].astype(jnp.float32), None
            return jax.lax.scan(body, jnp.zeros((x.shape[0], 1)), jnp.arange(L), unroll=True)[0]
        return run

    @jax.jit
    def xla_dense(x, w):  # the scan slices the stack, as the model's does for bf16 weights
        def body(acc, wl):
            return acc + (x @ wl)[:, :1].astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros((x.shape[0], 1)), w, unroll=True)[0]

    xla_deq = over_layers(lambda x, q, i: x @ q.take(i).dequantize(jnp.bfloat16))
    t = timed(lambda: xla_dense(x, dense))
    print(json.dumps(dict(impl="xla", variant="bf16", m=a.rows, K=K, N=N, ms=round(t * 1e3, 3),
                          gbps=round(dense.nbytes / t / 1e9, 1), device=device)), flush=True)
    configs = [{}, dict(split=1), dict(split=2), dict(tensor_cores=False), dict(tensor_cores=True)]
    configs += [dict(num_stages=st) for st in a.stages]
    if a.sweep and not INTERPRET:  # one row through the CUDA cores or padded to 16 for the tensor cores
        configs = [{}] + [dict(tensor_cores=tc, bn=bn, num_warps=nw) for tc in (False, True) for bn in (64, 128, 256)
                          for nw in (4, 8)] + [dict(tensor_cores=True, split=sp) for sp in (2, 4, 8, 16)]
        configs += [dict(tensor_cores=True, num_stages=st) for st in (2, 4, 5)]
        variants.pop("int4_g32_zp")
    if a.sweep and not INTERPRET and a.rows > 1:  # the tensor-core path: column block x parts of K
        units = K // 128
        configs = [{}] + [dict(bn=bn, split=sp) for bn in (32, 64, 128) for sp in (1, 2, 4, 8, 16, 32, 43, 86)
                          if N % bn == 0 and units % sp == 0]
        configs += [dict(num_stages=st) for st in (2, 4, 5)] + [dict(num_warps=8)]  # around the pick
    variants = {k: v for k, v in variants.items() if a.variants is None or k in a.variants}
    for name, q in variants.items():
        dense_kernel = name == "bf16_kernel"
        kernel = matmul if dense_kernel else qmatmul
        nb = q.nbytes if dense_kernel else Q.param_bytes(q)
        if not INTERPRET and not dense_kernel:
            t = timed(lambda: xla_deq(x, q))
            print(json.dumps(dict(impl="xla-dequant-dot", variant=name, m=a.rows, ms=round(t * 1e3, 3),
                                  gbps=round(nb / t / 1e9, 1))), flush=True)
        for cfg in configs:
            try:
                xr = jax.random.normal(jax.random.key(7), (a.rows, K), jnp.bfloat16)
                w1 = q[1].astype(jnp.float32) if dense_kernel else q.take(1).dequantize(jnp.float32)
                ref = xr.astype(jnp.float32) @ w1
                got = kernel(xr, q, 1, interpret=INTERPRET, **cfg)
                err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                run = over_layers(lambda x, q, i: kernel(x, q, i, interpret=INTERPRET, **cfg))
                t = timed(lambda: run(x, q), n=3 if INTERPRET else 10)
                print(json.dumps(dict(impl="qmatmul", variant=name, m=a.rows, **cfg, rel_err=round(err, 7),
                                      ms=round(t * 1e3, 3), gbps=round(nb / t / 1e9, 1))), flush=True)
            except Exception as e:  # a block setting Triton rejects must not end the sweep
                print(json.dumps(dict(impl="qmatmul", variant=name, **cfg,
                                      error=(type(e).__name__ + ": " + str(e))[:800])), flush=True)


if __name__ == "__main__":
    main()
