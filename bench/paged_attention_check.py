"""The paged-attention kernel on the GPU: correct against the XLA reference, and how fast.

    python bench/paged_attention_check.py
    python bench/paged_attention_check.py --timing-only --block-sizes 16 32 64

1. Values: ops/pallas_paged_attention.py in bf16 against the XLA reference (ops/paged_attention.py) run in
   float32 on the same inputs, relative L2, for the Llama-2-7B layer (32 heads of 128) at batch 256 with
   random lengths up to 256, for grouped heads (32 over 8), and for a small batch of long rows (the split
   path). Padding rows (length 0) must come back as zeros.
2. Time: one layer's decode attention at batch 256 and 192 tokens a row on average, the kernel against the
   reference (which gathers every row's blocks into a dense copy first), median of 50 runs, for each pool
   block size of --block-sizes (default 16, the engine's) and pool dtype of --pool-dtypes (default bf16;
   float8_e4m3fn halves the bytes read), and for each kernel setting of --variants
   (GROUP:WARPS:STAGES[:BLOCKS[:DOTS]], query heads a program, Triton's num_warps and num_stages, pool
   blocks a loop step reads, default 1, and 1 for the loop's dot form on tensor cores, default 0; default
   the shipped).
3. The engine: greedy tokens of a small float32 model (head_dim 64, so the kernel takes it) through the
   engine with Kernels.auto() against `generate_tokens` with Kernels.xla(), and whether the kernel was in
   the engine's decode step.
One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import llama_jax as lj
from llama_jax.engine import Engine, Request
from llama_jax.model import apply_rope
from llama_jax.ops import Kernels, pallas_paged_attention

paged = importlib.import_module("llama_jax.ops.paged_attention")  # the module (ops exports the function too)
DEVICE = jax.devices()[0].device_kind


def case(seed, batch, heads, kv_heads, max_len, head_dim=128, block=16, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, batch)
    lengths[0] = 0  # a padding row
    width = 1 << (int(-(-max_len // block)) - 1).bit_length()
    blocks = int(sum(-(-n // block) for n in lengths)) + 1
    pool_k, pool_v = (jnp.asarray(rng.normal(size=(2, blocks, block, kv_heads, head_dim)), dtype) for _ in range(2))
    owned = iter(rng.permutation(np.arange(1, blocks)))
    tables = np.zeros((batch, width), np.int32)
    for b, n in enumerate(lengths):
        tables[b, :-(-n // block)] = [next(owned) for _ in range(-(-n // block))]
    q = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), dtype)
    return q, pool_k, pool_v, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


def reference(q, pool_k, pool_v, tables, lengths):
    return paged.reference(q[:, None], pool_k, pool_v, 1, tables, jnp.maximum(lengths, 1)[:, None] - 1)[:, 0]


kernel = jax.jit(lambda q, k, v, t, n: pallas_paged_attention.paged_attention(q, k, v, jnp.int32(1), t, n))
SHIPPED = (f"{pallas_paged_attention.HEADS_PER_PROGRAM}:{pallas_paged_attention.NUM_WARPS}:"
           f"{pallas_paged_attention.NUM_STAGES}:{pallas_paged_attention.BLOCKS_PER_STEP}")  # the vector form


def setting(variant: str) -> tuple[int, ...]:
    """GROUP:WARPS:STAGES[:BLOCKS[:DOTS]] -> (group, warps, stages, blocks a step, tensor cores)."""
    parts = list(map(int, variant.split(":")))
    return tuple(parts + [1, 0][len(parts) - 3:])


def kernel_with(variant: str):
    group, warps, stages, per_step, dots = setting(variant)
    return jax.jit(lambda q, k, v, t, n: pallas_paged_attention.paged_attention(
        q, k, v, jnp.int32(1), t, n, group=group, num_warps=warps, num_stages=stages, blocks_per_step=per_step,
        tensor_cores=bool(dots)))
xla = jax.jit(reference)


def values() -> None:
    for name, args in (("7b-batch256", (0, 256, 32, 32, 256)), ("gqa-32-over-8", (1, 64, 32, 8, 512)),
                       ("long-rows-batch4", (2, 4, 32, 32, 4096))):
        q, pool_k, pool_v, tables, lengths = case(*args)
        assert pallas_paged_attention.supported(q[:, None], pool_k)
        got = np.asarray(kernel(q, pool_k, pool_v, tables, lengths), np.float32)
        f32 = [x.astype(jnp.float32) for x in (q, pool_k, pool_v)]
        want = np.asarray(xla(*f32, tables, lengths))
        rel = float(np.linalg.norm(got[1:] - want[1:]) / np.linalg.norm(want[1:]))
        print(json.dumps(dict(check="paged-attention-values", case=name, rel_l2_vs_f32_reference=round(rel, 5),
                              within_bf16_tolerance=rel < 1e-2, padding_row_zero=bool(np.all(got[0] == 0)),
                              nan=bool(np.isnan(got).any()), device=DEVICE)), flush=True)


def timing(block: int, variants, pool_dtype: str = "bfloat16", kv_heads: int = 32) -> None:
    q, pool_k, pool_v, tables, lengths = case(3, 256, 32, kv_heads, 384, block=block)
    pool_k, pool_v = (p.astype(pool_dtype) for p in (pool_k, pool_v))
    cache_bytes = int(2 * jnp.sum(lengths)) * kv_heads * 128 * jnp.dtype(pool_dtype).itemsize

    def median_ms(fn):
        fn(q, pool_k, pool_v, tables, lengths).block_until_ready()
        runs = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn(q, pool_k, pool_v, tables, lengths).block_until_ready()
            runs.append(time.perf_counter() - t0)
        return float(np.median(runs)) * 1e3

    x_ms = median_ms(xla)
    want = np.asarray(xla(*(x.astype(jnp.float32) for x in (q, pool_k, pool_v)), tables, lengths))[1:]
    for variant in variants:
        try:
            fn = kernel_with(variant)
            k_ms = median_ms(fn)
            got = np.asarray(fn(q, pool_k, pool_v, tables, lengths), np.float32)[1:]
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        except Exception as e:  # a setting Triton cannot build (registers, shared memory): say so, go on
            print(json.dumps(dict(check="paged-attention-time", block_size=block, variant=variant,
                                  error=str(e).splitlines()[0][:200])), flush=True)
            continue
        print(json.dumps(dict(check="paged-attention-time", block_size=block, variant=variant, pool_dtype=pool_dtype,
                              shipped=setting(variant) == setting(SHIPPED), batch=q.shape[0], kv_heads=kv_heads,
                              mean_len=round(float(jnp.mean(lengths)), 1),
                              rel_l2_vs_f32_reference=round(rel, 5),
                              kernel_ms=round(k_ms, 4), xla_reference_ms=round(x_ms, 4),
                              kernel_cache_gbps=round(cache_bytes / k_ms / 1e6, 1), speedup=round(x_ms / k_ms, 2),
                              device=DEVICE)), flush=True)


def engine() -> None:
    cfg = lj.PRESETS["tiny-gqa"].replace(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
                                         param_dtype="float32", compute_dtype="float32")
    params = lj.init_params(cfg, jax.random.key(2))
    prompts = [list(map(int, np.random.default_rng(i).integers(3, cfg.vocab_size, 5 + 7 * i))) for i in range(4)]
    want = lj.generate_tokens(params, cfg, prompts, max_new_tokens=32, eos_id=-1, kernels=Kernels.xla())
    auto = Kernels.auto()
    eng = Engine(params, cfg, eos_id=-1, max_batch=8, kv_blocks=64, prefill_tokens=32, kernels=auto)
    outs = {}
    for i, p in enumerate(prompts):
        eng.submit(p, Request(max_tokens=32), lambda t, f, i=i: outs.setdefault(i, []).extend(t))
        eng.step()
    while not eng.idle:
        eng.step()
    match = float(np.mean([a == b for i in range(4) for a, b in zip(outs[i], want[i])]))
    print(json.dumps(dict(check="engine-greedy-vs-generate", kernels=auto.describe(), greedy_token_match=match,
                          paged_kernel_in_program=kernel_in_program(auto), device=DEVICE)), flush=True)


def kernel_in_program(kernels) -> bool:
    """Whether ops.paged_attention's compiled decode step holds the Triton kernel (a custom call)."""
    q, kv = jnp.zeros((8, 1, 4, 64)), jnp.zeros((8, 1, 2, 64))
    rope, pool = (jnp.ones((8, 1, 1, 32)), jnp.zeros((8, 1, 1, 32))), jnp.zeros((1, 64, 16, 2, 64))
    step = jax.jit(lambda *args: paged.paged_attention(kernels, *args, rotate=apply_rope)[0])
    return "triton" in step.lower(q, kv, kv, rope, pool, pool, jnp.int32(0), jnp.zeros((8, 8), jnp.int32),
                                  jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1), bool)).as_text()

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16], help="the pool's block sizes to time")
    p.add_argument("--variants", nargs="+", default=[SHIPPED],
                   help="kernel settings GROUP:WARPS:STAGES[:BLOCKS[:DOTS]] to time")
    p.add_argument("--pool-dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float8_e4m3fn"],
                   help="the pool's dtypes to time (float8_e4m3fn: serve --cache-dtype)")
    p.add_argument("--kv-heads", type=int, default=32,
                   help="kv heads of the timed layer (32 query heads; 8: grouped like Llama-3-8B's)")
    p.add_argument("--timing-only", action="store_true")
    a = p.parse_args()
    if not a.timing_only:
        values()
    for block in a.block_sizes:
        for pool_dtype in a.pool_dtypes:
            timing(block, a.variants, pool_dtype, a.kv_heads)
    if not a.timing_only:
        engine()
