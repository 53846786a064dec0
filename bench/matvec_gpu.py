"""The CUDA one-row matmul (llama_jax/ops/cuda_matvec.py) on the Llama-2-7B decode weights, beside XLA's bf16
GEMM and the Pallas kernel of ops/pallas_qmatmul.py, on one GPU. One JSON line per figure: ms for the 32 layers of
a weight (one launch each, as in a decode step) and GB/s of stored bytes (codes and scales).

    python bench/matvec_gpu.py [--sweep]

Each variant is first checked against x @ dequantize(w) in float32 at layer 5 (relative L2 error).
Weights: q/k/v side by side (one launch), o, gate/up side by side, down, and the lm_head (one matrix).
"""
import argparse
import json

import jax
import jax.numpy as jnp

from llama_jax.ops import cuda_matvec as gpu_matvec
from llama_jax.ops import pallas_qmatmul as qmatmul
from llama_jax import qarray

from quantize_matvec import timed  # the median of 20 calls

L, D, F, V = 32, 4096, 11008, 32000
WEIGHTS = {"qkv": (D, (D, D, D)), "o": (D, (D,)), "gate_up": (D, (F, F)), "down": (F, (D,)), "lm_head": (D, (V,))}


def make(scheme, k, n, layers, key):
    w = jax.random.normal(key, (layers, k, n), jnp.float32) * 0.02
    if scheme == "bf16":
        return w.astype(jnp.bfloat16)
    bits, group, zp = {"int8": (8, None, False), "int4_g64": (4, 64, False), "int4_g64_zp": (4, 64, True)}[scheme]
    return qarray.quantize(w, bits, group, stacked=True, zero_point=zp)


def dense_of(w, layer):
    return (w[layer] if not hasattr(w, "bits") else w.take(layer).dequantize(jnp.float32)).astype(jnp.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4_g64", "int4_g64_zp"])
    p.add_argument("--weights", nargs="+", default=list(WEIGHTS))
    p.add_argument("--sweep", action="store_true", help="also time every split and chunk")
    p.add_argument("--no-peer", action="store_true", help="skip XLA and the Pallas kernel")
    a = p.parse_args()
    device = jax.devices()[0].device_kind
    x = jax.random.normal(jax.random.key(1), (1, F), jnp.float32).astype(jnp.bfloat16)
    for scheme in a.schemes:
        for name in a.weights:
            k, ns = WEIGHTS[name]
            layers = 1 if name == "lm_head" else L
            if name == "lm_head" and scheme != "bf16":
                continue
            ws = tuple(make(scheme, k, n, layers, jax.random.key(i)) for i, n in enumerate(ns))
            xk = x[:, :k]
            total = sum(w.nbytes for w in ws)  # QArray.nbytes: codes, scales and zero points
            layer = min(5, layers - 1)
            ref = [xk.astype(jnp.float32) @ dense_of(w, layer) for w in ws]
            outs = gpu_matvec.matvec(xk, ws, jnp.int32(layer))
            err = max(float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r)) for o, r in zip(outs, ref))
            base = dict(scheme=scheme, weight=name, K=k, N=list(ns), layers=layers, device=device)
            print(json.dumps(dict(base, check="rel_l2_vs_f32", value=err)), flush=True)

            def over_layers(f):
                @jax.jit
                def run(x, ws):
                    def body(acc, i):
                        return acc + sum(o[:, :1].astype(jnp.float32) for o in f(x, ws, i)), None
                    return jax.lax.scan(body, jnp.zeros((1, 1)), jnp.arange(layers), unroll=True)[0]
                return run

            impls = {"cuda": lambda x, ws, i: gpu_matvec.matvec(x, ws, i)}
            if a.sweep:
                for split in (1, 2, 4, 8):
                    for chunk in (8, 16):
                        impls[f"cuda_s{split}_c{chunk}"] = (
                            lambda x, ws, i, s=split, c=chunk: gpu_matvec.matvec(x, ws, i, split=s, chunk=c))
            if not a.no_peer:
                if scheme == "bf16":
                    @jax.jit
                    def xla(x, ws):  # the scan slices the stack, as the model's does for bf16 weights
                        def body(acc, wl):
                            return acc + sum((x @ w)[:, :1].astype(jnp.float32) for w in wl), None
                        return jax.lax.scan(body, jnp.zeros((1, 1)), ws, unroll=True)[0]
                    impls["xla"] = xla
                    impls["pallas"] = lambda x, ws, i: qmatmul.matmul(x, ws, i)
                elif qmatmul.supported(ws, xk):
                    impls["pallas"] = lambda x, ws, i: qmatmul.qmatmul(x, ws, i)
                else:
                    impls["pallas"] = lambda x, ws, i: [qmatmul.qmatmul(x, w, i) for w in ws]
            for impl, f in impls.items():
                run = f if impl == "xla" else over_layers(f)
                try:
                    t = timed(lambda: run(xk, ws))
                except Exception as e:  # noqa: BLE001 - a sweep setting the kernel refuses
                    print(json.dumps(dict(base, impl=impl, error=str(e)[:200])), flush=True)
                    continue
                print(json.dumps(dict(base, impl=impl, ms=round(t * 1e3, 4),
                                      gbps=round(total / t / 1e9, 1))), flush=True)


if __name__ == "__main__":
    main()
