"""The CUDA one-row matmul (llama_jax/gpu_matvec.py) against its contract, `matvec_reference` (XLA, float32
sums at full precision), on one GPU: every scheme (bf16; int8 per channel and in groups; int4 with and
without zero points), every input mode (plain, through the RMSNorm, through the SwiGLU, with the residual
added), K of 4096 and 11008, three weights a launch. One JSON line each: the relative L2 error.

Then the decoder layer (`decode_layer`: six launches from one call, for quantized weights each a
programmatic dependent of the one before) against `decode_layer_reference` (the same contract from
matvec_reference and attention_reference, in XLA), for Llama-2-7B's layer and a grouped-query one with
head_dim 64, every scheme, four layers run one after the other (each layer's output the next one's input,
as in a step): the relative L2 error of the last output and of the cache slots written, and how many cache
elements outside those slots changed (none may).

    python bench/matvec_gpu_check.py
"""
import functools
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


# name: dim, heads, kv_heads, head_dim, ffn_dim
LAYERS = {"llama2-7b": (4096, 32, 32, 128, 11008), "gqa, head_dim 64": (2048, 32, 8, 64, 5632)}
LAYER_SCHEMES = [(16, None, False), (8, None, False), (4, 128, False), (4, 64, True)]


def check_layers():
    device = jax.devices()[0].device_kind
    n_layers, max_len, start = 4, 256, 200
    for name, (d, heads, kv_heads, head_dim, f) in LAYERS.items():
        keys = iter(jax.random.split(jax.random.key(11), 16))
        shapes = [(d, heads * head_dim), (d, kv_heads * head_dim), (d, kv_heads * head_dim), (heads * head_dim, d),
                  (d, f), (d, f), (f, d)]
        dense = [jax.random.normal(next(keys), (n_layers, *s)) * s[0] ** -0.5 for s in shapes]
        norms = tuple((1 + 0.1 * jax.random.normal(next(keys), (n_layers, d))).astype(jnp.bfloat16) for _ in range(2))
        cache = [(jax.random.normal(next(keys), (n_layers, 1, max_len, kv_heads, head_dim))).astype(jnp.bfloat16)
                 for _ in range(2)]
        x0 = jax.random.normal(next(keys), (1, d)).astype(jnp.bfloat16)
        angles = jnp.arange(head_dim // 2, dtype=jnp.float32) * 0.37 * (start + 1) / max_len
        rope = (jnp.cos(angles).reshape(1, 1, 1, -1), jnp.sin(angles).reshape(1, 1, 1, -1))
        mask = (jnp.arange(max_len) <= start).reshape(1, 1, max_len)
        for bits, group, zeros in LAYER_SCHEMES:
            ws = tuple(w.astype(jnp.bfloat16) if bits == 16 else Q.quantize(w, bits, group, stacked=True,
                                                                             zero_point=zeros) for w in dense)

            def run(layer_fn, x, ws, norms, ck, cv):  # everything an argument: closed-over arrays would be
                for i in range(n_layers):          # compiled in as constants (gigabytes of them)
                    x, ck, cv = layer_fn(x, ws, norms, jnp.int32(i), rope, ck, cv, jnp.int32(start), mask,
                                         eps=1e-5, head_dim=head_dim)
                return x, ck, cv

            got = jax.jit(functools.partial(run, gpu_matvec.decode_layer))(x0, ws, norms, *cache)
            ref = jax.jit(functools.partial(run, gpu_matvec.decode_layer_reference))(x0, ws, norms, *cache)
            err = float(jnp.linalg.norm(got[0].astype(jnp.float32) - ref[0].astype(jnp.float32))
                        / jnp.linalg.norm(ref[0].astype(jnp.float32)))
            slot = lambda c: c[:, :, start].astype(jnp.float32)  # noqa: E731 - the slot each layer wrote
            slot_err = max(float(jnp.linalg.norm(slot(g) - slot(r)) / jnp.linalg.norm(slot(r)))
                           for g, r in zip(got[1:], ref[1:]))
            others = jnp.arange(max_len) != start
            stray = int(sum(jnp.sum(g[:, :, others] != c[:, :, others]) for g, c in zip(got[1:], cache)))
            print(json.dumps(dict(layer=name, bits=bits, group=group, zero_points=zeros, layers_in_a_row=n_layers,
                                  rel_l2_vs_reference=err, written_slots_rel_l2=slot_err,
                                  other_cache_elements_changed=stray, device=device)), flush=True)


if __name__ == "__main__":
    main()
    check_layers()
