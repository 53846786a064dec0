"""One decode step of the Llama-2-7B shape, with the decode kernels switched on or off: what each kernel
is worth inside the step. One JSON line per variant: ms per step (best of three runs of 100 host-loop
steps, cache index reset to 128 before each) and the step's first call (compile + one step).

    python bench/decode_step.py                            # bf16 batch 1: the kernel ablation below
    python bench/decode_step.py --variants 8:1:kernels 4:1:kernels --trace /tmp/t   # int8, int4; a profile

A variant is BITS:BATCH:ATTENTION[:DENSE] with BITS 0 (bf16), 8 or 4, ATTENTION `kernels` (the decode
attention kernel where it serves) or `xla` (rotary, cache write and attention in XLA), and DENSE the
bf16 weights the Pallas matmul reads from the stack, joined by `+` (default `o`; `none` for XLA's
matmuls on scan slices), or `cuda` for the CUDA one-row kernel of cuda_matvec.py on every projection and
the lm_head (what Kernels.auto() chooses at batch 1 on a Hopper GPU; any other DENSE switches it off).
Each variant is a Kernels value (ops/policy.py) passed to the step.
int4 variants use groups of 64 with zero points unless `--group` or `--symmetric` say otherwise.
`--trace DIR` also writes a CSV of the GPU kernels of three steps per variant (name, start ns, duration
ns), read from a jax.profiler trace.
"""
import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp

import llama_jax as lj
from llama_jax import quantize
from llama_jax.generate import next_logits
from llama_jax.ops import Kernels

from kernel_trace import trace_kernels

ABLATION = ["0:1:xla:none", "0:1:kernels:none", "0:1:xla:o", "0:1:kernels:o", "0:1:kernels:o+q+k+v+gate+up+down"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--variants", nargs="+", default=ABLATION)
    p.add_argument("--cache", type=int, default=256, help="cache slots; the step attends over the first 129")
    p.add_argument("--trace", default="", help="directory prefix for a kernel trace of each variant")
    p.add_argument("--group", type=int, default=64, help="int4's quantization group")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    a = p.parse_args()
    int4 = dict(group=a.group, zero_point=not a.symmetric)  # int4's scheme; int8 keeps one scale a channel
    cfg = lj.PRESETS[a.preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    bf16 = lj.init_params(cfg, jax.random.key(0))
    auto = Kernels.auto()
    params_of = {0: bf16}
    for variant in a.variants:
        bits, batch, attention, dense = (variant.split(":") + ["o"])[:4]
        bits, batch = int(bits), int(batch)
        if bits not in params_of:
            params_of = {0: bf16, bits: quantize.quantize_params(bf16, cfg, bits=bits, **(int4 if bits == 4 else {}))}
        kernels = dataclasses.replace(
            auto, decode_attention=auto.decode_attention if attention == "kernels" else "xla",
            stacked_weights=tuple(w for w in dense.split("+") if w not in ("none", "cuda")),
            matvec=auto.matvec if dense == "cuda" else "xla")

        @functools.partial(jax.jit, donate_argnums=(3,))
        def step(params, token, position, cache, kernels=kernels):
            logits, cache = next_logits(params, token, position, cache, cfg, kernels)
            return jnp.argmax(logits, -1).astype(jnp.int32), position + 1, cache

        params = params_of[bits]
        cache = lj.KVCache.zeros(cfg, batch, a.cache)
        cache = dataclasses.replace(cache, index=jnp.int32(128), valid=cache.valid.at[:, :128].set(True))
        token, position = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), 128, jnp.int32)
        t0 = time.perf_counter()
        token, position, cache = step(params, token, position, cache)
        token.block_until_ready()
        first_call_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(3):
            cache, position = dataclasses.replace(cache, index=jnp.int32(128)), jnp.full((batch,), 128, jnp.int32)
            token.block_until_ready()
            t0 = time.perf_counter()
            for _ in range(100):
                token, position, cache = step(params, token, position, cache)
            token.block_until_ready()
            best = min(best, (time.perf_counter() - t0) / 100)
        scheme = dict(group=int4["group"], zero_points=int4["zero_point"]) if bits == 4 else {}
        print(json.dumps(dict(variant=variant, preset=a.preset, bits=bits or 16, **scheme, batch=batch,
                              ms_per_step=round(best * 1e3, 3), tok_s=round(batch / best, 1),
                              first_call_s=round(first_call_s, 1), device=jax.devices()[0].device_kind,
                              jax=jax.__version__)), flush=True)
        if a.trace:
            def three_steps():
                nonlocal token, position, cache
                for _ in range(3):
                    token, position, cache = step(params, token, position, cache)
                token.block_until_ready()

            trace_kernels(three_steps, f"{a.trace}-{variant.replace(':', '_').replace('+', '-')}")


if __name__ == "__main__":
    main()
