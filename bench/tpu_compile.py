"""The train step compiled ahead of time for a TPU topology, on any machine: libtpu (PyPI `libtpu`;
0.0.50.* pairs with jax 0.12.0.1) gives `jax.experimental.topologies` the chips, XLA's TPU compiler
compiles for them, and its memory analysis says what a chip would hold. One JSON line per kernel policy:
the per-chip figures, whether they fit the chip's HBM, and whether the compiled program holds any
[seq, seq] buffer (the attention scores that XLA's attention materialises and Splash never does).

    pip install 'libtpu==0.0.50.*'
    python bench/tpu_compile.py                                   # Llama-2-7B, seq 8192, fsdp over a v5p-8
    python bench/tpu_compile.py --topology v5p:2x2x1 --seq 16384 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.74, "v6e": 32.0}  # per chip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--topology", default="v5p:2x2x1", help="a TPU topology name (v5p:2x2x1 is a v5p-8: 4 chips)")
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4, help="global rows (one a chip by default)")
    p.add_argument("--remat", default="save_matmuls")
    p.add_argument("--kernels", nargs="+", default=["auto", "xla"], choices=["auto", "xla"])
    a = p.parse_args()
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU here: libtpu only compiles

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from llama_jax import sharding, train
    from llama_jax.config import PRESETS
    from llama_jax.ops import Kernels

    topo = topologies.get_topology_desc(platform="tpu", topology_name=a.topology)
    chips = len(topo.devices)
    mesh = sharding.make_mesh(data=1, fsdp=chips, tensor=1, devices=topo.devices)
    cfg = PRESETS[a.preset].replace(max_seq_len=max(a.seq, PRESETS[a.preset].max_seq_len))
    optimizer = train.make_optimizer()
    shardings = train.state_shardings(cfg, optimizer, mesh)
    abstract = jax.eval_shape(lambda: train.init_train_state(cfg, optimizer, jax.random.key(0)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch = {"tokens": jax.ShapeDtypeStruct((a.batch, a.seq + 1), jnp.int32, sharding=sharding.batch_sharding(mesh)),
             "segment_ids": jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32, sharding=sharding.batch_sharding(mesh)),
             "positions": jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32, sharding=sharding.batch_sharding(mesh))}
    hbm = HBM_GIB.get(a.topology.split(":")[0], float("nan"))
    for name in a.kernels:
        kernels = Kernels.named(name, mesh)
        step = train.make_train_step(cfg, optimizer, mesh, remat=a.remat, kernels=kernels)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        gib = lambda b: round(b / 2**30, 2)  # noqa: E731
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        square = re.compile(rf"\b{a.seq},{a.seq}\b")
        print(json.dumps(dict(bench="tpu-aot-train-step", topology=a.topology, chips=chips, preset=a.preset,
                              seq=a.seq, batch=a.batch, packed_rows=True, remat=a.remat, kernels=kernels.describe(),
                              arguments_gib=gib(mem.argument_size_in_bytes), temporaries_gib=gib(mem.temp_size_in_bytes),
                              total_gib=gib(total), hbm_gib=hbm, fits=total / 2**30 <= hbm,
                              seq_by_seq_buffer=bool(square.search(compiled.as_text())),
                              compile_s=round(compile_s, 1), jax=jax.__version__)), flush=True)


if __name__ == "__main__":
    main()
