"""Batch-1 matvec over 32 stacked Llama-2-7B MLP weights [4096, 11008]: XLA's dequantize-then-dot on
QArrays (what the model runs today) against bf16, and a Pallas (Triton) kernel that reads the codes
directly. One JSON line per figure.

    python bench/quantize_matvec.py          # GPU; on CPU it checks the kernel in interpret mode

Seen on one H100 80GB HBM3 (jax 0.11.2, 2026-11-26), ms for the 32 matrices, GB/s of stored bytes:
  bf16 (XLA dot)                      1.24 ms  2328 GB/s
  XLA dequantize + dot  int8 / int4   2.75 / 2.73 ms   524 / 298 GB/s   (not fused: XLA writes the
                                      bf16 weight to HBM and reads it back; scaling after the dot,
                                      jnp.int4 codes, per-group dots or --xla_gpu_triton_gemm_any
                                      all measured 2.6-3.4 ms)
  XLA multiply + reduce (bf16 products, f32 sum): int8 1.61 ms (898 GB/s), int4 2.90 ms at batch 1;
                                      17 ms at batch 16 (no tensor cores)
  this Pallas kernel    int8 / int4   2.05 / 1.53 ms   706 / 501 GB/s   (bn 128-256, bk 256-512)
The kernel reads the codes once, but its multiply-and-sum over K on CUDA cores is not memory-bound
yet; a tensor-core version (rows padded to 16, tl.dot per group) is the next thing to try.
"""
import functools, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from llama_jax import quantize as Q

INTERPRET = jax.default_backend() == "cpu"


def _kernel(x_ref, c_ref, s_ref, *rest, bits, group, bk, per_channel, has_zero, rows):
    z_ref, o_ref = (rest[0], rest[1]) if has_zero else (None, rest[0])
    g = bk if per_channel else group
    for m in range(rows):
        acc = jnp.zeros((o_ref.shape[-1],), jnp.float32)
        for gi in range(bk // g):
            if bits == 8:
                c = c_ref[pl.ds(gi * g, g), :].astype(jnp.float32)  # [g, bn]
                xg = x_ref[m, pl.ds(gi * g, g)].astype(jnp.float32)  # [g]
                part = jnp.sum(xg[:, None] * c, axis=0)
                xsum = None
            else:
                h = g // 2
                b = c_ref[pl.ds(gi * h, h), :]
                lo = (b & 0x0F).astype(jnp.float32)
                hi = (b >> 4).astype(jnp.float32)
                xl = x_ref[m, pl.ds(gi * g, h)].astype(jnp.float32)
                xh = x_ref[m, pl.ds(gi * g + h, h)].astype(jnp.float32)
                part = jnp.sum(xl[:, None] * lo, axis=0) + jnp.sum(xh[:, None] * hi, axis=0)
                xsum = jnp.sum(xl) + jnp.sum(xh)
            if per_channel:
                acc += part
                continue
            s = s_ref[gi, :].astype(jnp.float32)
            if has_zero:
                acc += part * s + xsum * z_ref[gi, :].astype(jnp.float32)
            elif bits == 4:
                acc += (part - 8.0 * xsum) * s
            else:
                acc += part * s
        if per_channel:
            acc = acc * s_ref[0, :].astype(jnp.float32)
        o_ref[0, m, :] = acc


def qmatvec(x, q, bn=128, bk=256, num_warps=4, num_stages=3):
    """x [M, K] @ q (2-D QArray [K, N], grouped along K) -> [M, N] float32. Grid: N blocks x K blocks;
    each program decodes its [bk, bn] codes in registers, per group, and writes a partial sum (split K)."""
    M, K = x.shape
    Kp, N = q.matrix_shape()[0], q.matrix_shape()[1]
    per_channel = q.bits == 8 and q.group >= K
    kb = K // bk
    vb = bk * q.bits // 8
    in_specs = [pl.BlockSpec((M, bk), lambda n, k: (0, k)),
                pl.BlockSpec((vb, bn), lambda n, k: (k, n))]
    if per_channel:
        in_specs.append(pl.BlockSpec((1, bn), lambda n, k: (0, n)))
    else:
        in_specs.append(pl.BlockSpec((bk // q.group, bn), lambda n, k: (k, n)))
    args = [x, q.values, q.scales]
    if q.zeros is not None:
        in_specs.append(pl.BlockSpec((bk // q.group, bn), lambda n, k: (k, n)))
        args.append(q.zeros)
    kern = functools.partial(_kernel, bits=q.bits, group=q.group, bk=bk, per_channel=per_channel,
                             has_zero=q.zeros is not None, rows=M)
    kw = {}
    if not INTERPRET:
        from jax.experimental.pallas import triton as plgpu
        cp = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
        kw["compiler_params"] = cp(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((kb, M, N), jnp.float32), grid=(N // bn, kb),
                         in_specs=in_specs, out_specs=pl.BlockSpec((1, M, bn), lambda n, k: (k, 0, n)),
                         interpret=INTERPRET, **kw)(*args)
    return out.sum(0)


def timed(f, n=5):
    jax.block_until_ready(f()); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - t0)
    return min(ts)


if __name__ == "__main__":
    small = INTERPRET
    L, K, N = (2, 512, 256) if small else (32, 4096, 11008)
    w = jax.random.normal(jax.random.key(0), (L, K, N), jnp.float32) * 0.02
    variants = {"int8": Q.quantize(w, 8, None, stacked=True), "int4_g64_zp": Q.quantize(w, 4, 64, stacked=True, zero_point=True),
                "int4_g64": Q.quantize(w, 4, 64, stacked=True), "int8_g64": Q.quantize(w, 8, 64, stacked=True)}
    del w
    configs = [dict(bn=128, bk=256)] if small else [dict(bn=128, bk=256), dict(bn=64, bk=512), dict(bn=256, bk=256), dict(bn=128, bk=512, num_warps=8)]
    xb = jnp.ones((1, K), jnp.bfloat16)

    def xla(x, qs):
        def body(acc, ql):
            w = ql if isinstance(ql, jax.Array) else ql.dequantize(jnp.bfloat16)
            return acc + jnp.einsum("bk,kn->bn", x, w.astype(x.dtype))[:, :1].astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros((1, 1)), qs, unroll=True)[0]

    xla = jax.jit(xla)
    for name, q in [("bf16", jnp.zeros((L, K, N), jnp.bfloat16))] + list(variants.items()):
        t = timed(lambda: xla(xb, q))
        print(json.dumps(dict(impl="xla-dequant-dot", variant=name, ms=round(t * 1e3, 3),
                              gbps=round(Q.param_bytes(q) / t / 1e9, 1), device=jax.devices()[0].device_kind)), flush=True)
    for name, q in variants.items():
        q0 = jax.tree.map(lambda a: a[0], q)
        x = jax.random.normal(jax.random.key(1), (1, K), jnp.bfloat16)
        ref = x.astype(jnp.float32) @ q0.dequantize(jnp.float32)
        for cfg in configs:
            try:
                got = jax.jit(lambda x, q: qmatvec(x, q, **cfg))(x, q0)
                err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
                @jax.jit
                def run(x, qs):
                    def body(acc, ql):
                        return acc + qmatvec(x, ql, **cfg)[:, :1], None
                    return jax.lax.scan(body, jnp.zeros((1, 1)), qs, unroll=True)[0]
                t = timed(lambda: run(x, q))
                nb = Q.param_bytes(q)
                print(json.dumps(dict(impl="pallas", variant=name, **cfg, rel_err=round(err, 6), ms=round(t * 1e3, 3), gbps=round(nb / t / 1e9, 1))), flush=True)
            except Exception as e:
                print(json.dumps(dict(impl="pallas", variant=name, **cfg, error=(type(e).__name__ + ": " + str(e))[:600])), flush=True)
