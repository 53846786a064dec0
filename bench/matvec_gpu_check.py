"""The CUDA one-row matmul (llama_jax/ops/cuda_matvec.py) against its contract, `matvec_reference` (XLA, float32
sums at full precision), on one GPU: every scheme (bf16; int8 per channel and in groups; int4 with and
without zero points), every input mode (plain, through the RMSNorm, through the SwiGLU, with the residual
added), K of 4096 and 11008, three weights a launch. One JSON line each: the relative L2 error.

Then the fused decoder layer against the model's own layer (`check_layers`), for Llama-2-7B's layer and a
grouped-query one with head_dim 64, every scheme, four layers in one step.

    python bench/matvec_gpu_check.py
"""
import functools
import json

import jax
import jax.numpy as jnp

import llama_jax as lj
from llama_jax import quantize as Q
from llama_jax.model import apply
from llama_jax.ops import Kernels, cuda_matvec
from llama_jax.qarray import quantize

SCHEMES = [(8, None, False), (8, 64, False), (4, 64, True), (4, 32, False), (16, None, False)]  # bits, group, zeros


def main():
    if not cuda_matvec.available():
        raise SystemExit("the CUDA library did not build (see the warning above)")
    device = jax.devices()[0].device_kind
    x = jax.random.normal(jax.random.key(1), (1, 11008)).astype(jnp.bfloat16)
    norm = (1 + 0.1 * jax.random.normal(jax.random.key(7), (4, 4096))).astype(jnp.bfloat16)
    for bits, group, zeros in SCHEMES:
        for k, ns in [(4096, (4096, 1024, 1024)), (11008, (4096,))]:
            ws = []
            for i, n in enumerate(ns):
                w = jax.random.normal(jax.random.key(i + 3), (4, k, n)) * 0.02
                ws.append(w.astype(jnp.bfloat16) if bits == 16 else quantize(w, bits, group, stacked=True, zero_point=zeros))
            modes = ({"plain": {}, "norm": dict(norm=norm, eps=1e-5)} if k == 4096 else
                     {"plain": {}, "swiglu": dict(up=x * 0.5),
                      "swiglu+residual (bf16 out)": dict(up=x * 0.5, residual=x[:, :4096], out_dtype=jnp.bfloat16)})
            for mode, kw in modes.items():
                outs = cuda_matvec.matvec(x[:, :k], tuple(ws), jnp.int32(2), **kw)
                refs = cuda_matvec.matvec_reference(x[:, :k], tuple(ws), jnp.int32(2), **kw)
                err = max(float(jnp.linalg.norm(o.astype(jnp.float32) - r.astype(jnp.float32))
                                / jnp.linalg.norm(r.astype(jnp.float32))) for o, r in zip(outs, refs))
                print(json.dumps(dict(bits=bits, group=group, zero_points=zeros, K=k, N=list(ns), mode=mode,
                                      rel_l2_vs_reference=err, device=device)), flush=True)


# name: dim, heads, kv_heads, head_dim, ffn_dim
LAYERS = {"llama2-7b": (4096, 32, 32, 128, 11008), "gqa, head_dim 64": (2048, 32, 8, 64, 5632)}
LAYER_SCHEMES = [(16, None, False), (8, None, False), (4, 128, False), (4, 64, True)]


def check_layers():
    """The fused decode layer (ops/layer.py: cuda_matvec.decode_layer, six launches from one call, for
    quantized weights each a programmatic dependent of the one before) against its reference, the model's
    own layer: one decode step of four layers at batch 1 with Kernels.auto() and with Kernels.xla(), the
    cache filled to slot 200. The relative L2 error of the final hidden state and of the cache slots
    written, and how many cache elements outside those slots changed (none may)."""
    device = jax.devices()[0].device_kind
    n_layers, max_len, start = 4, 256, 200
    auto = Kernels.auto()
    for name, (d, heads, kv_heads, head_dim, f) in LAYERS.items():
        cfg = lj.LlamaConfig(vocab_size=512, dim=d, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads,
                             head_dim=head_dim, ffn_dim=f, max_seq_len=max_len, param_dtype="bfloat16",
                             compute_dtype="bfloat16")
        bf16 = lj.init_params(cfg, jax.random.key(11))
        keys = iter(jax.random.split(jax.random.key(12), 4))
        shape = (n_layers, 1, max_len, kv_heads, head_dim)
        cache = lj.KVCache(*(jax.random.normal(next(keys), shape).astype(jnp.bfloat16) for _ in range(2)),
                           jnp.ones((1, max_len), bool), jnp.int32(start))
        token = jnp.full((1, 1), 7, jnp.int32)
        for bits, group, zeros in LAYER_SCHEMES:
            params = bf16 if bits == 16 else Q.quantize_params(bf16, cfg, bits=bits, group=group, zero_point=zeros)

            def run(params, cache, kernels):
                hidden, cache = apply(params, token, cfg, cache=cache, kernels=kernels, return_hidden=True)
                return hidden, cache.k, cache.v

            got = jax.jit(functools.partial(run, kernels=auto))(params, cache)
            ref = jax.jit(functools.partial(run, kernels=Kernels.xla()))(params, cache)
            err = float(jnp.linalg.norm(got[0].astype(jnp.float32) - ref[0].astype(jnp.float32))
                        / jnp.linalg.norm(ref[0].astype(jnp.float32)))
            slot = lambda c: c[:, :, start].astype(jnp.float32)  # noqa: E731 - the slot each layer wrote
            slot_err = max(float(jnp.linalg.norm(slot(g) - slot(r)) / jnp.linalg.norm(slot(r)))
                           for g, r in zip(got[1:], ref[1:]))
            others = jnp.arange(max_len) != start
            stray = int(sum(jnp.sum(g[:, :, others] != c[:, :, others]) for g, c in zip(got[1:], (cache.k, cache.v))))
            print(json.dumps(dict(layer=name, bits=bits, group=group, zero_points=zeros, layers_in_a_row=n_layers,
                                  kernels=auto.describe(), rel_l2_vs_model_layer=err, written_slots_rel_l2=slot_err,
                                  other_cache_elements_changed=stray, device=device)), flush=True)


if __name__ == "__main__":
    main()
    check_layers()
