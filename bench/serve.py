"""Serving on one GPU: the continuous-batching engine behind `llama-jax serve`, beside Hugging Face
transformers in static batches of 64, in the same invocation.

    python bench/serve.py                               # Llama-2-7B shape, bf16, 1024 requests of 128 + 128
    python bench/serve.py --no-peer --requests 256
    python bench/serve.py --preset tiny --requests 64 --new 32 --no-peer    # a smoke run on a CPU
    python bench/serve.py --no-peer --paged-attention pallas_dots           # the paged kernel's dot form

Random weights (timing does not depend on the values), random prompt tokens, no EOS: every request
produces --new tokens. The requests are offered all at once, then again as a Poisson process at --rate
requests a second (default: 80% of the rate the all-at-once run sustained, the same arrivals for both
sides). Figures: output tokens/s over the run (first arrival to last token); time to first token
(arrival to first token) and inter-token latency (between a request's successive tokens), p50 and p99.
One JSON line per figure, then one of the run's facts: among them the engine thread's time a step in the
all-at-once run, host work (planning, arrays, dispatch, callbacks: hidden behind the device while it is
shorter than a step) and waiting for the device's tokens.

The engine is driven in-process, without HTTP: the figures are the engine's (the server adds a JSON
encode and a socket write per token). `Engine.warm_up` first compiles the decode steps, as `llama-jax
serve` does before it serves (its seconds are printed), then a warm-up run compiles the other shapes the
runs use. Each side runs in a process of its own, so the frameworks never share GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PEER = HERE / "peers" / "hf_static_batch.py"


def _figures(system: str, load: str, run: dict, **common) -> list[dict]:
    """One line per figure."""
    return [dict(bench="serve", system=system, load=load, figure=name, value=round(run[name], 4), **common)
            for name in ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")]


def summarize(submitted, times) -> dict:
    """Figures from each request's arrival time and its tokens' times."""
    start, end = min(submitted), max(t[-1] for t in times)
    ttft = np.array([t[0] - s for s, t in zip(submitted, times)])
    itl = np.concatenate([np.diff(t) for t in times if len(t) > 1])
    return dict(output_tok_s=sum(map(len, times)) / (end - start), seconds=end - start,
                ttft_p50_s=float(np.percentile(ttft, 50)), ttft_p99_s=float(np.percentile(ttft, 99)),
                itl_p50_s=float(np.percentile(itl, 50)), itl_p99_s=float(np.percentile(itl, 99)))


def arrivals(n: int, rate: float | None, seed: int = 0):
    """Arrival times in seconds from the start: all at once (rate None), or a Poisson process."""
    if rate is None:
        return np.zeros(n)
    t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    return t - t[0]  # the first request at 0


def run_engine(engine, prompts, at, new) -> dict:
    """Offer `prompts` at times `at` to a started engine; wait for every token."""
    from llama_jax.engine import Request

    n = len(prompts)
    times = [[] for _ in range(n)]
    submitted = [0.0] * n
    left, lock, done = [n], threading.Lock(), threading.Event()

    def on_tokens(i):
        def record(tokens, finish):
            now = time.perf_counter()
            times[i].extend([now] * len(tokens))
            if finish:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return record

    t0 = time.perf_counter()
    for i, (prompt, arrival) in enumerate(zip(prompts, at)):
        wait = t0 + arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        submitted[i] = t0 + arrival  # its scheduled arrival, as the peer counts it
        engine.submit(prompt, Request(max_tokens=new), on_tokens(i))
    done.wait()
    assert all(len(t) == new for t in times), "a request ended early"
    return summarize(submitted, times)


def ours(a) -> None:
    # Imported here, in the child process only: the parent must not take the GPU before the peer runs.
    import jax

    import llama_jax as lj
    from llama_jax.engine import Engine
    from llama_jax.ops import Kernels

    kernels = Kernels.named(a.kernels)
    if a.paged_attention:
        if a.paged_attention != "xla" and jax.devices()[0].platform != "gpu":
            sys.exit(f"bench/serve.py: --paged-attention {a.paged_attention} runs a GPU kernel; this is a "
                     f"{jax.devices()[0].platform}")
        kernels = dataclasses.replace(kernels, paged_attention=a.paged_attention)
    cfg = lj.PRESETS[a.preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16",
                                       max_seq_len=max(a.prompt + a.new, 256))
    params = lj.init_params(cfg, jax.random.key(0))
    engine = Engine(params, cfg, eos_id=-1, max_batch=a.max_batch, kv_blocks=a.kv_blocks, block_size=a.block_size,
                    max_queue=a.requests, prefill_tokens=a.prefill_tokens, kernels=kernels, cache_dtype=a.cache_dtype)
    t0 = time.perf_counter()
    engine.warm_up(sampled=False)  # as `llama-jax serve` does before it serves, greedy programs only (all this runs)
    decode_warmup_s = time.perf_counter() - t0
    engine.start()
    prompts = np.random.default_rng(1).integers(3, cfg.vocab_size, (a.requests, a.prompt)).tolist()
    t0 = time.perf_counter()
    warm = prompts[:min(a.requests, a.max_batch + a.max_batch // 2)]  # every batch bucket, filling and emptying
    run_engine(engine, warm, arrivals(len(warm), None), a.new)
    for n in (1, 2, 4, 8):  # prefill steps of few rows, as arrivals spread out in time make them
        run_engine(engine, prompts[:n], arrivals(n, None), a.new)
    warm_s = time.perf_counter() - t0
    common = dict(preset=a.preset, requests=a.requests, prompt=a.prompt, new=a.new, max_batch=a.max_batch,
                  kv_blocks=engine.kv_blocks, block_size=a.block_size, prefill_tokens=a.prefill_tokens,
                  cache_dtype=engine.cache_dtype,
                  kernels=kernels.describe(), device=jax.devices()[0].device_kind, jax=jax.__version__)
    before = (engine.steps_dispatched, engine.step_seconds, engine.wait_seconds)
    all_at_once = run_engine(engine, prompts, arrivals(a.requests, None), a.new)
    steps, step_s, wait_s = (x - y for x, y in zip((engine.steps_dispatched, engine.step_seconds,
                                                     engine.wait_seconds), before))
    rate = a.rate or 0.8 * all_at_once["output_tok_s"] / a.new
    poisson = run_engine(engine, prompts, arrivals(a.requests, rate, seed=2), a.new)
    engine.stop()
    for line in (_figures("llama-jax", "all-at-once", all_at_once, **common)
                 + _figures("llama-jax", f"poisson-{rate:.2f}-rps", poisson, rate_rps=round(rate, 3), **common)):
        print(json.dumps(line), flush=True)
    print(json.dumps(dict(bench="serve", system="llama-jax", rate_rps=round(rate, 3),
                          decode_warmup_s=round(decode_warmup_s, 1), warmup_s=round(warm_s, 1),
                          all_at_once_s=round(all_at_once["seconds"], 2), poisson_s=round(poisson["seconds"], 2),
                          all_at_once_steps=steps, host_ms_per_step=round((step_s - wait_s) / steps * 1e3, 3),
                          wait_ms_per_step=round(wait_s / steps * 1e3, 3),
                          preemptions=engine.stats()["preemptions"], **common)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals a second (default: 80%% of capacity)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--kernels", default="auto", choices=["auto", "xla"])
    p.add_argument("--paged-attention", default=None, choices=["xla", "pallas", "pallas_dots"],
                   help="the paged kernel's form, in place of the policy's (pallas_dots: its loop as tensor-core dots)")
    p.add_argument("--cache-dtype", default=None, choices=["bfloat16", "float8_e4m3fn"],
                   help="the paged cache's dtype (default: the compute dtype, bf16)")
    p.add_argument("--peer-batch", type=int, default=64)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.side == "ours":
        return ours(a)
    # Ours first (its rate sets the Poisson arrivals of both), each side in its own process.
    child = [sys.executable, __file__, "--side", "ours"] + sys.argv[1:]
    out = subprocess.run(child, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(out.stdout)
    if out.returncode:
        sys.exit(out.returncode)
    rate = next(json.loads(line)["rate_rps"] for line in out.stdout.splitlines() if '"rate_rps"' in line)
    if not a.no_peer:
        subprocess.run([sys.executable, str(PEER), "--requests", str(a.requests), "--prompt", str(a.prompt),
                        "--new", str(a.new), "--batch", str(a.peer_batch), "--rate", str(rate)], check=True)


if __name__ == "__main__":
    main()
