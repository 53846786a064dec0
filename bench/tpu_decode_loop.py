"""generate.decode_loop (prefill, then the on-device `lax.while_loop` of decode steps) compiled ahead of
time for one TPU chip with libtpu, on any machine: XLA:TPU's memory analysis, and every copy of a
stacked weight or a KV cache that the compiled program makes (the copies issue 30 asks to remove).

    python bench/tpu_decode_loop.py                       # Llama-2-7B bf16, batch 8, 1024 slots, v5p chip
    python bench/tpu_decode_loop.py --auto-layout         # the params in the layout the compiled program picks
    python bench/tpu_decode_loop.py --topology v5e:1x1 --accelerator v5litepod-1 --auto-layout \
        --cache-dtype float8_e4m3fn                       # what fits one v5e chip
    python bench/tpu_decode_loop.py --no-cache-layout     # the cache's order left to the compiler

One JSON line: arguments and temporaries in GiB (or the compiler's out-of-memory message when the chip
is too small), and the copies: shape, layout, what they copy. The TPU policy pins the cache's order in
memory (Kernels.cache_layout), so prefill and the loop agree and neither cache is copied between them;
`--auto-layout` lets the compiler choose the params' layout (`Layout.AUTO`, through
`generate.compile_decode_loop`; the caller then places them in it, once), and the relaid copies of the stacked q/k/v weights (made once, before the loop) go. A v5e chip
(15.75 GiB usable) cannot hold Llama-2-7B in bf16 (12.55 GiB) and a bf16 cache of batch 8 x 1024 slots
(4.0 GiB) at once, whatever the program does; with an 8-bit cache (2.0 GiB) it can.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import time
from pathlib import Path


BYTES = {"bf16": 2, "f32": 4, "f8e4m3fn": 1, "f8e5m2": 1, "s8": 1}  # HLO element types: bytes each


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:1x1x1")
    p.add_argument("--accelerator", default="v5p-2", help="TPU_ACCELERATOR_TYPE for libtpu (quiets its warnings)")
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=1008, help="new tokens: slots = prompt + new")
    p.add_argument("--unroll", choices=["auto", "0", "1"], default="auto", help="the decode step's layer scan")
    p.add_argument("--auto-layout", action="store_true", help="params in the layout the compiler picks")
    p.add_argument("--cache-dtype", default=None, help="the KV cache's dtype (default bf16), e.g. float8_e4m3fn")
    p.add_argument("--no-cache-layout", action="store_true",
                   help="leave the cache's order in memory to the compiler (Kernels.cache_layout ())")
    p.add_argument("--hlo", default="", help="write the compiled program's HLO text to this file")
    a = p.parse_args()
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU here: libtpu only compiles
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", a.accelerator)

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import llama_jax as lj
    from llama_jax import params as table
    from llama_jax.ops import Kernels
    from llama_jax.sharding import make_mesh

    generate = importlib.import_module("llama_jax.generate")  # the module (lj.generate is the function)
    device = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices[0]
    kernels = Kernels.auto(make_mesh(devices=[device]))
    if a.no_cache_layout:
        kernels = dataclasses.replace(kernels, cache_layout=())
    if a.unroll != "auto":
        kernels = dataclasses.replace(kernels, decode_unroll=a.unroll == "1")
    cfg = lj.PRESETS[a.preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    on_chip = jax.sharding.SingleDeviceSharding(device)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    params = jax.tree.map(lambda x: sds(x.shape, jnp.bfloat16), table.abstract(cfg))

    def run(params, tokens, mask, key, eos_id):
        return generate.decode_loop(params, tokens, mask, key, eos_id, cfg, a.new, kernels=kernels,
                                    cache_dtype=a.cache_dtype)

    def compile_loop():  # -> the compiled program; XLA:TPU raises when it is larger than the chip
        if a.auto_layout:  # the library's way: params in the layouts the compiled loop asks for
            return generate.compile_decode_loop(params, cfg, a.batch, a.prompt, a.new, kernels=kernels,
                                                cache_dtype=a.cache_dtype, device=device)
        loop = jax.jit(run, in_shardings=(on_chip,) * 5)
        return loop.lower(params, sds((a.batch, a.prompt), jnp.int32), sds((a.batch, a.prompt), jnp.bool_),
                          jax.random.key(0), sds((), jnp.int32)).compile()

    out = dict(bench="tpu-aot-decode-loop", topology=a.topology, preset=a.preset, batch=a.batch,
               slots=a.prompt + a.new, decode_unroll=kernels.decode_unroll, auto_layout=a.auto_layout,
               cache_dtype=a.cache_dtype or "bfloat16", cache_layout=kernels.cache_layout,
               jax=jax.__version__)
    t0 = time.perf_counter()
    try:
        compiled = compile_loop()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program larger than the chip
        out.update(compiled=False, error=str(e).splitlines()[0][:300])
        print(json.dumps(out), flush=True)
        return
    mem = compiled.memory_analysis()
    if a.hlo:
        Path(a.hlo).write_text(compiled.as_text())
    stacked = re.compile(rf"= ((\w+)\[{cfg.n_layers},[0-9,]+\])(\{{[^}}]*\}}) copy(?:-start)?\((%[\w.-]+)")
    copies = [dict(shape=m[1], layout=m[3], of=m[4], bytes=math.prod(map(int, m[1].split("[")[1][:-1].split(",")))
                   * BYTES[m[2]]) for m in stacked.finditer(compiled.as_text())]
    out.update(compiled=True, compile_s=round(time.perf_counter() - t0, 1),
               arguments_gib=round(mem.argument_size_in_bytes / 2**30, 2),
               temporaries_gib=round(mem.temp_size_in_bytes / 2**30, 2),
               stacked_copies=[{k: v for k, v in c.items() if k != "bytes"} for c in copies],
               stacked_copies_gib=round(sum(c["bytes"] for c in copies) / 2**30, 2))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
