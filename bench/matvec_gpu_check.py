"""The CUDA one-row matmul (llama_jax/gpu_matvec.py) against its contract, `matvec_reference` (XLA, float32
sums at full precision), on one GPU: every scheme (bf16; int8 per channel and in groups; int4 with and
without zero points), every input mode (plain, through the RMSNorm, through the SwiGLU, with the residual
added), K of 4096 and 11008, three weights a launch. One JSON line each: the relative L2 error.

    python bench/matvec_gpu_check.py
"""
import json

import jax
import jax.numpy as jnp

from llama_jax import gpu_matvec
from llama_jax import quantize as Q

SCHEMES = [(8, None, False), (8, 64, False), (4, 64, True), (4, 32, False), (16, None, False)]  # bits, group, zeros


def main():
    device = jax.devices()[0].device_kind
    x = jax.random.normal(jax.random.key(1), (1, 11008)).astype(jnp.bfloat16)
    norm = (1 + 0.1 * jax.random.normal(jax.random.key(7), (4, 4096))).astype(jnp.bfloat16)
    for bits, group, zeros in SCHEMES:
        for k, ns in [(4096, (4096, 1024, 1024)), (11008, (4096,))]:
            ws = []
            for i, n in enumerate(ns):
                w = jax.random.normal(jax.random.key(i + 3), (4, k, n)) * 0.02
                ws.append(w.astype(jnp.bfloat16) if bits == 16 else Q.quantize(w, bits, group, stacked=True,
                                                                                zero_point=zeros))
            modes = ({"plain": {}, "norm": dict(norm=norm, eps=1e-5)} if k == 4096 else
                     {"plain": {}, "swiglu": dict(up=x * 0.5),
                      "swiglu+residual (bf16 out)": dict(up=x * 0.5, residual=x[:, :4096], out_dtype=jnp.bfloat16)})
            for mode, kw in modes.items():
                outs = gpu_matvec.matvec(x[:, :k], tuple(ws), jnp.int32(2), **kw)
                refs = gpu_matvec.matvec_reference(x[:, :k], tuple(ws), jnp.int32(2), **kw)
                err = max(float(jnp.linalg.norm(o.astype(jnp.float32) - r.astype(jnp.float32))
                                / jnp.linalg.norm(r.astype(jnp.float32))) for o, r in zip(outs, refs))
                print(json.dumps(dict(bits=bits, group=group, zero_points=zeros, K=k, N=list(ns), mode=mode,
                                      rel_l2_vs_reference=err, device=device)), flush=True)


if __name__ == "__main__":
    main()
