"""Fine-tuning speed and memory on one GPU: LoRA, QLoRA, and Hugging Face transformers + PEFT beside them.

    python bench/finetune.py                       # every case below, each in its own process, one JSON line each
    python bench/finetune.py --cases lora-7b hf-lora-7b

Cases (Alpaca shapes: rows of 512 tokens; random weights and tokens; adapters of rank 16 with alpha 32
on q, k, v, o, gate, up and down; AdamW on the adapters only):
  lora-7b      Llama-2-7B, base in bf16, no remat, --batch rows a step
  hf-lora-7b   the peer: transformers' LlamaForCausalLM in bf16 + peft's LoRA, the same rows, SDPA attention
  qlora-7b     Llama-2-7B, base in 4 bits (NF4 in groups of 64, as finetune --quantize-base 4), full remat,
               --qlora-batch rows
  qlora-70b    a Llama-2-70B-shaped model, random 4-bit base (about 36 GB), full remat, --qlora-batch rows

A quantized base is made one layer of one weight at a time (random bf16, quantized at once), so no
float copy of the whole base ever exists: the peak device memory is training's. Peak memory is the
device's peak_bytes_in_use (JAX) or torch.cuda.max_memory_allocated (the peer), after the timed steps.
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
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def quantized_random_base(cfg, bits: int, key):
    """Random params of `cfg` with every layer matrix a QArray, built a layer at a time."""
    import jax
    import jax.numpy as jnp

    from llama_jax import params as table
    from llama_jax.qarray import quantize

    base: dict = {}
    quantize_one = jax.jit(lambda w, split, axis: quantize(w, bits, 64, split=split, axis=axis, stacked=False,
                                                           codebook="nf4" if bits == 4 else None),
                           static_argnums=(1, 2))
    for i, p in enumerate(table.params_of(cfg)):
        k = jax.random.fold_in(key, i)
        if not p.stacked:
            value = 0.02 * jax.random.normal(k, p.full_shape(cfg), jnp.bfloat16)
        elif p.quant_split is None:
            value = jnp.ones(p.full_shape(cfg), jnp.float32)
        else:
            layers = [quantize_one(0.02 * jax.random.normal(jax.random.fold_in(k, j), p.shape(cfg), jnp.bfloat16),
                                   p.quant_split, p.quant_axis) for j in range(cfg.n_layers)]
            value = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
            del layers
        table.set_(base, p.path, value)
    return base


def ours(a, preset: str, quantized: bool, batch: int) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import llama_jax as lj
    from llama_jax import lora, train
    from llama_jax.ops import Kernels

    cfg = lj.PRESETS[preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    lc = lora.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=TARGETS)
    key = jax.random.key(0)
    base = quantized_random_base(cfg, 4, key) if quantized else lj.init_params(cfg, key)
    base_gb = sum(x.nbytes for x in jax.tree.leaves(base)) / 1e9
    optimizer = train.make_optimizer(lr=1e-4, total_steps=1000, weight_decay=0.0)
    state = train.init_train_state(cfg.replace(param_dtype="float32"), optimizer, jax.random.key(1), lora=lc)
    remat = "full" if quantized else a.remat
    step = train.make_train_step(cfg.replace(param_dtype="float32"), optimizer, remat=remat, lora=lc,
                                 kernels=Kernels.auto())
    rng = np.random.default_rng(0)
    batches = [{"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, a.seq + 1)), jnp.int32)}
               for _ in range(2)]
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0], base)
    float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(2):  # warm
        state, metrics = step(state, batches[i % 2], base)
    float(metrics["loss"])
    t0 = time.perf_counter()
    for i in range(a.steps):
        state, metrics = step(state, batches[i % 2], base)
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - t0) / a.steps
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    return dict(framework="llama-jax", base_bits=4 if quantized else 16, base_gb=round(base_gb, 2), remat=remat,
                batch=batch, seq=a.seq, rank=a.rank, step_ms=round(1e3 * seconds, 1),
                tokens_per_s=round(batch * a.seq / seconds), peak_mem_gb=round(peak / 1e9, 2),
                compile_s=round(compile_s, 1), loss=round(loss, 4), device=jax.devices()[0].device_kind,
                jax=jax.__version__)


def hf_peer(a, batch: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=[f"{t}_proj" for t in TARGETS]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    tokens = torch.randint(0, 32000, (batch, a.seq + 1), device="cuda")

    def step():
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(3):
        loss = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / a.steps
    import peft
    import transformers

    return dict(framework="transformers+peft", base_bits=16, batch=batch, seq=a.seq, rank=a.rank,
                step_ms=round(1e3 * seconds, 1), tokens_per_s=round(batch * a.seq / seconds),
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2), loss=round(float(loss), 4),
                device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__)


CASES = {
    "lora-7b": lambda a: ours(a, "llama2-7b", False, a.batch),
    "hf-lora-7b": lambda a: hf_peer(a, a.batch),
    "qlora-7b": lambda a: ours(a, "llama2-7b", True, a.qlora_batch),
    "qlora-70b": lambda a: ours(a, "llama2-70b", True, a.qlora_batch),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="rows a step for the bf16 LoRA cases (ours and the peer)")
    p.add_argument("--qlora-batch", type=int, default=4, help="rows a step for the QLoRA cases")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--remat", default="none", help="bf16 LoRA: what the backward pass recomputes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: run this case
    a = p.parse_args()
    if a.one:
        print(json.dumps({"bench": "finetune", "case": a.one, **CASES[a.one](a)}), flush=True)
        return
    for case in a.cases:  # each in its own process: the frameworks never share the GPU's memory
        args = [sys.executable, __file__, "--one", case, "--seq", str(a.seq), "--batch", str(a.batch),
                "--qlora-batch", str(a.qlora_batch), "--rank", str(a.rank), "--remat", a.remat, "--steps", str(a.steps)]
        done = subprocess.run(args, cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)), check=False)
        if done.returncode:
            print(json.dumps({"bench": "finetune", "case": case, "error": f"exit code {done.returncode}"}), flush=True)


if __name__ == "__main__":
    main()
