"""The train step compiled ahead of time for a TPU slice under each kernel policy, on any machine: what
`llama-jax plan --target` does (llama_jax/plan.py, with libtpu), once with the TPU's kernels (auto:
Splash attention) and once with XLA's everywhere, to set the two side by side. One JSON line per policy:
the per-chip figures, whether they fit the chip's HBM, and whether the compiled program holds any
[seq, seq] buffer (the attention scores that XLA's attention materialises and Splash never does).

    pip install 'llama-jax[tpu-plan]'
    python bench/tpu_compile.py                                   # Llama-2-7B, seq 8192, fsdp over a v5p-8
    python bench/tpu_compile.py --target v5p-8 --seq 16384 --batch 4
"""

from __future__ import annotations

import argparse
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="v5p-8", help="a Cloud TPU accelerator type (v5p-8: 4 chips)")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=None, help="global rows (default: one a data-parallel shard)")
    p.add_argument("--remat", default="save_matmuls")
    p.add_argument("--kernels", nargs="+", default=["auto", "xla"], choices=["auto", "xla"])
    a = p.parse_args()

    import jax

    from llama_jax import plan
    from llama_jax.config import PRESETS

    target = plan.tpu_target(a.target, a.slices)
    devices = plan.tpu_devices(target)
    def gib(b):
        return round(b / 2**30, 2)

    for name in a.kernels:
        r = plan.plan(PRESETS[a.preset], {"fsdp": -1}, a.batch, a.seq, "train", remat=a.remat, devices=devices,
                      kernels=name, packed=True, target=target, hbm_gib=target.hbm_gib, model_name=a.preset,
                      log=lambda _: None)
        print(json.dumps({
            "bench": "tpu-aot-train-step", "target": a.target, "slices": a.slices, "chips": r.devices,
            "preset": a.preset, "seq": a.seq, "batch": r.batch, "packed_rows": r.packed, "remat": a.remat,
            "kernels": r.kernels, "attention": r.attention, "arguments_gib": gib(r.arguments),
            "temporaries_gib": gib(r.temporaries), "total_gib": gib(r.total), "hbm_gib": r.hbm_gib, "fits": r.fits,
            "refused": r.refused, "seq_by_seq_buffer": r.seq_by_seq_buffer, "compile_s": round(r.compile_s, 1),
            "compiler": r.compiler, "jax": jax.__version__}), flush=True)

if __name__ == "__main__":
    main()
