"""The serving engine's decode step compiled on this device: its memory (does the donated KV pool alias the
output, or is it copied?) and the copies of pool-sized arrays in the optimized program, for the kernel policy
and XLA's, the layer scan unrolled or not. One JSON line per variant.

    python bench/engine_step_memory.py [--layers 2] [--rows 256] [--time]
"""
import argparse
import dataclasses
import json
import re
import time

import jax
import numpy as np

import llama_jax as lj
from llama_jax import engine as E
from llama_jax.ops import Kernels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--kv-blocks", type=int, default=4097)
    p.add_argument("--time", action="store_true", help="also time the step (auto kernels, unrolled)")
    p.add_argument("--variants", nargs="+", default=["auto-unrolled", "auto-rolled", "xla-unrolled"])
    a = p.parse_args()
    cfg = lj.PRESETS["llama2-7b"].replace(n_layers=a.layers, param_dtype="bfloat16", compute_dtype="bfloat16",
                                          max_seq_len=256)
    params = lj.init_params(cfg, jax.random.key(0))
    auto = Kernels.auto()
    for name, kernels, unroll in (("auto-unrolled", auto, True), ("auto-rolled", auto, 1),
                                  ("xla-unrolled", dataclasses.replace(Kernels.xla(), decode_unroll=True), True)):
        if name not in a.variants:
            continue
        eng = E.Engine(params, cfg, eos_id=-1, max_batch=a.rows, kv_blocks=a.kv_blocks, kernels=kernels)
        width = eng._decode_width or 16
        rows = a.rows
        args = (params, eng._pool.k, eng._pool.v, eng._slot_tokens,
                np.tile(np.arange(1, 1 + width, dtype=np.int32), (rows, 1)), np.zeros((rows, 1), np.int32),
                np.zeros(rows, bool), np.arange(rows, dtype=np.int32), np.full((rows, 1), 100, np.int32),
                np.ones((rows, 1), bool), np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32))
        t0 = time.perf_counter()
        c = E.forward_and_sample.lower(*args, cfg=cfg, kernels=kernels, unroll=unroll, greedy=True).compile()
        compile_s = time.perf_counter() - t0
        m = c.memory_analysis()
        text = c.as_text()
        pool_shape = ",".join(str(d) for d in eng._pool.k.shape)
        pool_type = r"\w+\[" + pool_shape + r"\]"
        copies = [l.strip()[:160] for l in text.splitlines()
                  if re.search(r"^\s*(ROOT )?%[\w.-]*copy[\w.-]* = " + pool_type, l) or re.search(pool_type + r"\{[^}]*\} copy\(", l)]
        line = dict(variant=name, layers=a.layers, rows=rows, width=width, pool_gib=round(eng._pool.k.nbytes * 2 / 2**30, 2),
                    argument_gib=round(m.argument_size_in_bytes / 2**30, 2), output_gib=round(m.output_size_in_bytes / 2**30, 2),
                    alias_gib=round(m.alias_size_in_bytes / 2**30, 2), temp_gib=round(m.temp_size_in_bytes / 2**30, 2),
                    pool_copies=len(copies), first_copies=copies[:3], compile_s=round(compile_s, 1),
                    device=jax.devices()[0].device_kind)
        if a.time and name == "auto-unrolled":
            k, v, slots = eng._pool.k, eng._pool.v, eng._slot_tokens
            out = c(params, k, v, slots, *args[4:])
            jax.block_until_ready(out)
            t0 = time.perf_counter()
            for _ in range(10):
                out = c(params, out[1], out[2], out[3], *args[4:])
            jax.block_until_ready(out)
            line["step_ms"] = round((time.perf_counter() - t0) / 10 * 1e3, 3)
        print(json.dumps(line), flush=True)
        del eng


if __name__ == "__main__":
    main()
