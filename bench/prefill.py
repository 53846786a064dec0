"""Prefill of left-padded prompts on one GPU: a batch of prompts of random lengths, left-padded to one
length as `generate` pads them, against the same batch with every prompt at full length. One JSON line per
figure (ms, the best of five calls after a warm-up), for the kernel policy named (default auto: the Pallas
flash kernel takes the padded batch) and for XLA.

    python bench/prefill.py                      # Llama-2-7B shape, bf16, 16 prompts of 1-2048 tokens
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--kernels", nargs="+", default=["auto", "xla"], choices=["auto", "xla"])
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import llama_jax as lj
    from llama_jax.generate import pad_left, prefill
    from llama_jax.ops import Kernels

    cfg = lj.PRESETS[a.preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, a.max_len + 1, a.batch)
    lengths[0] = a.max_len  # the padded batch has the full length too
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    padded = pad_left(prompts)
    full = (np.asarray(rng.integers(3, cfg.vocab_size, (a.batch, a.max_len)), np.int32),
            np.ones((a.batch, a.max_len), bool))
    for name in a.kernels:
        kernels = Kernels.named(name)
        for rows, (tokens, mask) in (("left-padded", padded), ("full-length", full)):
            tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

            def run():
                cache = lj.KVCache.zeros(cfg, a.batch, a.max_len)
                return prefill(params, tokens, mask, cache, cfg, kernels)[0].block_until_ready()

            run()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            print(json.dumps(dict(bench="prefill", preset=a.preset, batch=a.batch, max_len=a.max_len, rows=rows,
                                  prompt_tokens=int(mask.sum()), kernels=name, ms=round(min(times) * 1e3, 2),
                                  device=jax.devices()[0].device_kind, jax=jax.__version__)), flush=True)


if __name__ == "__main__":
    main()
