"""Memory and time of `llama-jax convert meta` on synthetic Meta checkpoints of released sizes.

    python bench/convert.py                         # Llama-2-7B (bf16, 1 shard, 13.5 GB), LLaMA-13B (fp16, 2 shards, 26 GB)
    python bench/convert.py --models llama2-7b --workdir /big/disk

Each model's folder (params.json, tokenizer.model, consolidated.NN.pth laid out as fairscale shards
them) is written by one child process, converted by `llama-jax convert` in another, and deleted.
Reported per model, one JSON line per figure: seconds, peak RSS of the converting process
(ru_maxrss, which counts the memory-mapped input pages it touched as well as its own allocations),
input and output GB. The goal: peak RSS under 3 GB for both, independent of model size.

Linux carries a parent's peak RSS into a child's ru_maxrss (the child starts as a copy of the
parent), so this orchestrating process stays small and does nothing but start the two children;
its own peak is reported too (parent_peak_rss_gb) to show the figure is the converter's.

The weights are random but cheap to make: every tensor is the leading part of one pool file of
random values, mapped with `torch.from_file(shared=True)`, so writing the shards never holds a model
in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKENIZER = REPO / "tests" / "data" / "llama2-tokenizer.model"

# Released hyper-parameters (vocab_size -1: from tokenizer.model, as Meta ships it).
MODELS = {
    "llama2-7b": dict(params={"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                              "vocab_size": -1}, shards=1, dtype="bfloat16", ffn=11008),
    "llama-13b": dict(params={"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06,
                              "vocab_size": -1}, shards=2, dtype="float16", ffn=13824),
    # a quick check of the bench itself (seconds, 0.1 GB): --models smoke
    "smoke": dict(params={"dim": 512, "multiple_of": 256, "n_heads": 8, "n_layers": 4, "norm_eps": 1e-05,
                          "vocab_size": -1}, shards=2, dtype="float16", ffn=1536),
}
DEFAULT_MODELS = "llama2-7b,llama-13b"
VOCAB = 32000


def meta_shapes(p: dict, ffn: int) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Meta key -> (full shape [out, in], the dim fairscale splits it on; None = whole in every shard)."""
    d = p["dim"]
    shapes = {"tok_embeddings.weight": ((VOCAB, d), 1), "norm.weight": ((d,), None), "output.weight": ((VOCAB, d), 0)}
    for i in range(p["n_layers"]):
        for name, shape, dim in (("attention.wq", (d, d), 0), ("attention.wk", (d, d), 0), ("attention.wv", (d, d), 0),
                                 ("attention.wo", (d, d), 1), ("feed_forward.w1", (ffn, d), 0),
                                 ("feed_forward.w2", (d, ffn), 1), ("feed_forward.w3", (ffn, d), 0),
                                 ("attention_norm", (d,), None), ("ffn_norm", (d,), None)):
            shapes[f"layers.{i}.{name}.weight"] = (shape, dim)
    return shapes


def write_pool(path: Path, numel: int, dtype: str) -> None:
    """`numel` random normal(0, 0.02) values of `dtype`, written in blocks."""
    import ml_dtypes
    import numpy as np

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, numel, 1 << 24):
            n = min(1 << 24, numel - start)
            f.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np_dtype).tobytes())


def write_meta(folder: Path, spec: dict) -> None:
    """The synthetic Meta folder."""
    import torch

    folder.mkdir(parents=True)
    n = spec["shards"]
    shapes = meta_shapes(spec["params"], spec["ffn"])
    piece_shapes = {}
    for key, (shape, dim) in shapes.items():
        piece = list(shape)
        if dim is not None:
            piece[dim] //= n
        piece_shapes[key] = tuple(piece)
    pool = folder / "pool.bin"
    write_pool(pool, max(math.prod(s) for s in piece_shapes.values()), spec["dtype"])
    torch_dtype = getattr(torch, spec["dtype"])
    for s in range(n):
        # shared=True: file-backed pages the kernel may drop, not a private copy of each tensor
        shard = {key: torch.from_file(str(pool), shared=True, size=math.prod(shape), dtype=torch_dtype).view(shape)
                 for key, shape in piece_shapes.items()}
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
        del shard
    pool.unlink()
    (folder / "params.json").write_text(json.dumps(spec["params"]))
    shutil.copy(TOKENIZER, folder / "tokenizer.model")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_child(argv: list[str]) -> tuple[float, int, int]:
    """Run a child process; (seconds, its peak RSS in bytes, exit status)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from {', '.join(MODELS)} "
                                                           f"(default {DEFAULT_MODELS})")
    ap.add_argument("--workdir", default="/tmp/llama-jax-bench-convert", help="where the folders are written")
    ap.add_argument("--write-only", metavar="FOLDER", help=argparse.SUPPRESS)  # the child writing one model
    args = ap.parse_args()
    if args.write_only:
        write_meta(Path(args.write_only), MODELS[args.models])
        return 0
    work = Path(args.workdir)
    for name in args.models.split(","):
        spec = MODELS[name]
        src, out = work / f"{name}-meta", work / f"{name}-orbax"
        shutil.rmtree(work, ignore_errors=True)
        try:
            seconds, _, code = run_child([sys.executable, __file__, "--models", name, "--write-only", str(src)])
            if code:
                raise SystemExit(f"bench/convert: writing {src} failed (exit {code})")
            size = folder_bytes(src)
            print(f"bench/convert: wrote {src} ({size / 1e9:.1f} GB) in {seconds:.0f} s", file=sys.stderr)
            seconds, rss, code = run_child([sys.executable, "-m", "llama_jax.cli", "convert", "meta", str(src), str(out)])
            parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            common = dict(model=name, shards=spec["shards"], dtype=spec["dtype"], exit_code=code)
            print(json.dumps(dict(common, figure="input_gb", value=round(size / 1e9, 2))), flush=True)
            print(json.dumps(dict(common, figure="output_gb", value=round(folder_bytes(out) / 1e9, 2)
                                  if out.exists() else None)), flush=True)
            print(json.dumps(dict(common, figure="convert_seconds", value=round(seconds, 1))), flush=True)
            print(json.dumps(dict(common, figure="peak_rss_gb", value=round(rss / 1e9, 2), goal="< 3")), flush=True)
            print(json.dumps(dict(common, figure="parent_peak_rss_gb", value=round(parent / 1e9, 3))), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
