"""Training-step speed on GPU, beside Hugging Face + torch.compile measured in the same invocation.

    python bench/train.py --remat save_matmuls --unroll-layers   # 7B width x 8 layers, seq 2048, batch 4, + HF peer
    python bench/train.py --preset llama2-7b --mesh fsdp=2 --remat save_matmuls --batch 8 --unroll-layers --no-peer
                                                                 # full 7B on two GPUs, fsdp
    python bench/train.py --remat save_matmuls --trace /tmp/t    # + a kernel profile of two steps (kernel_trace.py)

    python bench/train.py --packed --seq 8192 --batch 1 --remat save_matmuls --unroll-layers
                                                                 # packed rows (documents of 300-1500 tokens)

`--packed` feeds rows as `llama-jax train` packs them (data.PackedText: segment ids, restarting positions,
the targets across documents masked). The Hugging Face peer runs unpacked rows of the same shape:
transformers' packed layout (position_ids) needs the flash-attn package, which the GPU image lacks.

One JSON line per figure: tokens/s, MFU (tokens/s * (6N + 12*L*d*seq) / peak, N without the
embedding table), compile seconds, step seconds, peak device memory. Each side runs in its own process so
the two frameworks never share the GPU's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"  # the Hugging Face peer's scripts


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        out[k] = int(v)
    return out


def ours(a) -> dict:
    # JAX reserves 75% of a GPU's memory by default; a full 7B on two 80 GB cards needs more of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax
    import numpy as np

    import llama_jax as lj
    from llama_jax import train
    from llama_jax.data import PackedText
    from llama_jax.ops import Kernels
    from llama_jax.sharding import make_mesh, place_batch

    if a.preset:
        cfg = lj.PRESETS[a.preset]
    else:
        cfg = lj.LlamaConfig(vocab_size=32000, dim=a.width, n_layers=a.layers, n_heads=a.heads,
                             n_kv_heads=a.kv_heads, ffn_dim=a.ffn, max_seq_len=a.seq)
    cfg = cfg.replace(param_dtype="float32", compute_dtype="bfloat16", max_seq_len=max(a.seq, cfg.max_seq_len))
    mesh = make_mesh(**parse_mesh(a.mesh)) if a.mesh else make_mesh(data=1, fsdp=-1, tensor=1)
    optimizer = train.make_optimizer(lr=1e-4, warmup_steps=10, total_steps=1000)
    step_kernels = Kernels.named(a.kernels, mesh)
    state = train.init_train_state(cfg, optimizer, jax.random.key(0), mesh)
    step = train.make_train_step(cfg, optimizer, mesh, accum_steps=a.accum, remat=a.remat,
                                 loss_chunk=a.loss_chunk, unroll=a.unroll_layers,
                                 kernels=step_kernels)
    rng = np.random.default_rng(0)
    if a.packed:  # rows as `llama-jax train` packs them: documents of 300-1500 tokens, segments, positions
        lengths = rng.integers(a.doc_min, a.doc_max + 1, 4 * a.batch * a.seq // a.doc_min)
        docs = [rng.integers(0, cfg.vocab_size, n, dtype=np.int32) for n in lengths]
        rows = PackedText(docs, a.seq).epoch(0)
        host = {k: v[:a.batch] for k, v in rows.items()}
        docs_per_row = float(np.mean([len(np.unique(r[r > 0])) for r in host["segment_ids"]]))
    else:
        host = {"tokens": rng.integers(0, cfg.vocab_size, (a.batch, a.seq + 1), dtype=np.int32)}
    batch = place_batch(host, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    profile = None
    if a.trace:
        from kernel_trace import summary, trace_kernels

        def two_steps():
            nonlocal state, metrics
            for _ in range(2):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)

        profile = summary(trace_kernels(two_steps, a.trace), steps=2)
    n_non_embed = lj.param_count(cfg) - cfg.vocab_size * cfg.dim
    flops_tok = 6 * n_non_embed + 12 * cfg.n_layers * cfg.dim * a.seq
    n_dev = len(mesh.devices.flat)
    tok_s = a.batch * a.seq / dt
    mem = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat)
    return dict(impl="llama-jax", preset=a.preset, width=cfg.dim, layers=cfg.n_layers, seq=a.seq, batch=a.batch,
                rows="packed" if a.packed else "unpacked",
                **({"docs_per_row": round(docs_per_row, 1), "doc_tokens": [a.doc_min, a.doc_max]} if a.packed else {}),
                kernels=step_kernels.describe(),
                mesh=dict(mesh.shape), remat=a.remat, accum_steps=a.accum, unroll_layers=a.unroll_layers,
                step_s=round(dt, 4), compile_s=round(compile_s, 1),
                tokens_per_s=round(tok_s), mfu=round(tok_s * flops_tok / (a.peak_tflops * 1e12 * n_dev), 4),
                loss=float(metrics["loss"]), peak_mem_gb=round(mem / 1e9, 1),
                device=jax.devices()[0].device_kind, n_devices=n_dev, jax=jax.__version__,
                **({"loss_chunk": a.loss_chunk} if a.loss_chunk else {}),
                **({"xla_flags": os.environ["XLA_FLAGS"]} if os.environ.get("XLA_FLAGS") else {}),
                **({"profile": profile} if profile else {}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=None, help="a PRESETS name (default: the peer's 7B-width x 8-layer shape)")
    p.add_argument("--width", type=int, default=4096); p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--layers", type=int, default=8); p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048); p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none", choices=["none", "full", "save_matmuls"])
    p.add_argument("--unroll-layers", action="store_true", help="unroll the layer loop (train.make_train_step)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches a step (gradient accumulation)")
    p.add_argument("--loss-chunk", type=int, default=None, help="sequence positions per loss chunk (default: auto)")
    p.add_argument("--trace", default="", help="also profile two steps: kernel CSV at TRACE.csv, summary in the JSON")
    p.add_argument("--mesh", default="", help="e.g. fsdp=2 (default: every device on fsdp)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per card (H100 SXM: 989)")
    p.add_argument("--packed", action="store_true",
                   help="packed rows (documents of --doc-min to --doc-max tokens, segment ids, restarting positions)")
    p.add_argument("--doc-min", type=int, default=300)
    p.add_argument("--doc-max", type=int, default=1500)
    p.add_argument("--kernels", default="auto", choices=["auto", "xla"], help="the kernel policy (ops/policy.py)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only_ours:
        print(json.dumps(ours(a)), flush=True)
        return
    cmd = [sys.executable, __file__, "--only-ours"] + [x for x in sys.argv[1:] if x != "--no-peer"]
    subprocess.run(cmd, check=False)
    if not a.no_peer and not a.preset:
        subprocess.run([sys.executable, str(PEERS / "hf_llama_train.py"), "--width", str(a.width),
                        "--ffn", str(a.ffn), "--layers", str(a.layers), "--heads", str(a.heads),
                        "--kv-heads", str(a.kv_heads), "--seq", str(a.seq), "--batch", str(a.batch),
                        "--peak-tflops", str(a.peak_tflops)], check=False)


if __name__ == "__main__":
    main()
