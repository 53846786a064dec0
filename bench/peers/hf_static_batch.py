"""Peer baseline for bench/serve.py: Hugging Face transformers (PyTorch) serving requests in static batches.

Requests are taken in arrival order, --batch at a time; a batch starts once its last request has arrived
and the previous batch has finished, and runs `generate` to --new tokens for every row (no EOS). Random
weights in the shape of a released model, random prompts; the arrivals are bench/serve.py's (all at once,
then Poisson at --rate), and so are the figures, one JSON line each.

  python3 hf_static_batch.py --size llama2-7b --requests 1024 --prompt 128 --new 128 --batch 64 --rate 60
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve import arrivals, summarize  # noqa: E402  (bench/serve.py: the same arrivals and figures)
from hf_llama_decode import SIZES  # noqa: E402

sys.path.pop(0)


class Clock(BaseStreamer):
    """The time of each generated step (generate hands the streamer the prompt first, then each step)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's tokens exist now
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def run(model, prompts, at, batch, new):
    n = len(prompts)
    submitted, times = [0.0] * n, [None] * n
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    for b in range(0, n, batch):
        rows = range(b, min(b + batch, n))
        wait = t0 + at[rows[-1]] - time.perf_counter()  # the batch starts once its last request is here
        if wait > 0:
            time.sleep(wait)
        clock = Clock()
        with torch.no_grad():
            model.generate(prompts[b:rows[-1] + 1], streamer=clock, **kw)
        for i in rows:
            submitted[i], times[i] = t0 + at[i], clock.times
    return summarize(submitted, times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="llama2-7b", choices=sorted(SIZES))
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rate", type=float, required=True, help="Poisson arrivals a second (bench/serve.py's)")
    a = p.parse_args()
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, **SIZES[a.size])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    prompts = torch.randint(3, 32000, (a.requests, a.prompt), device="cuda")
    run(model, prompts[:a.batch], [0.0] * a.batch, a.batch, 8)  # warm-up
    common = dict(size=a.size, requests=a.requests, prompt=a.prompt, new=a.new, batch=a.batch,
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    for load, at in (("all-at-once", arrivals(a.requests, None)),
                     (f"poisson-{a.rate:.2f}-rps", arrivals(a.requests, a.rate, seed=2))):
        figures = run(model, prompts, at, a.batch, a.new)
        for name in ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
            print(json.dumps(dict(bench="serve", system=f"hf-transformers-static-{a.batch}", load=load, figure=name,
                                  value=round(figures[name], 4), **common)), flush=True)


if __name__ == "__main__":
    main()
