"""Host memory of the token-shard pipeline (llama_jax/shards.py) as the corpus grows: it must stay flat.

    python bench/data_rss.py                          # 20 MB and 200 MB corpora, 200 batches of 8 x 2049 read
    python bench/data_rss.py --mb 5 --scales 1 4 --batches 50

For each scale, a synthetic corpus (.jsonl of random-word documents, 50 to 1500 words each) is written,
`llama-jax tokenize` turns it into shards (Llama 2's tokenizer, tests/data), and `--batches` batches are
read from the shards through ShardBatches (prefetch on), and `llama-jax train` runs --train-steps steps of
the tiny preset on them, each step of the bench in a fresh process. One JSON line per figure: the
child's peak RSS (ru_maxrss from wait4, MiB) and its seconds; "baseline" is a process that only imports
llama_jax.shards (which imports JAX through the package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests" / "data" / "llama2-tokenizer.model"


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """About `mb` MB of .jsonl documents of random words (letter-frequency pseudo-words, several tokens
    each); returns the document count. Written a document at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.4, 2.0, 2.0, 1.0,
                     1.5, 2.0, 0.8, 0.2, 0.1, 0.2, 0.1])
    vocab = np.array(["".join(rng.choice(letters, rng.integers(2, 9), p=freq / freq.sum())) for _ in range(20000)],
                     dtype=object)
    target, written, docs = int(mb * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            line = json.dumps({"text": " ".join(vocab[rng.integers(0, len(vocab), rng.integers(50, 1500))])}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process running `cmd`; it must succeed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                        os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the maximum over all children
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"data_rss: {' '.join(cmd)} failed with exit code {child.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux: ru_maxrss in KiB


def read(a) -> None:
    """The reading child: --batches batches from the shards, as a training host reads them."""
    from llama_jax.shards import ShardBatches

    batches = ShardBatches(a.read, a.seq_len, a.rows, seed=0, prefetch=2)
    tokens = sum(int(next(batches)["loss_mask"].sum()) for _ in range(a.batches))
    assert tokens > 0
    batches.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=20.0, help="corpus size at scale 1, MB of .jsonl")
    p.add_argument("--scales", type=float, nargs="+", default=[1, 10], help="corpus sizes, multiples of --mb")
    p.add_argument("--batches", type=int, default=200, help="batches read from the shards")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=8, help="rows a batch (one host's rows of a step)")
    p.add_argument("--train-steps", type=int, default=30, help="steps of `llama-jax train` (tiny preset) on the shards")
    p.add_argument("--workdir", default=None, help="where the corpora and shards go (default: a temporary folder)")
    p.add_argument("--read", default=None, help=argparse.SUPPRESS)  # the reading child
    a = p.parse_args()
    if a.read:
        return read(a)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="data-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        rss, seconds = measure([py, "-c", "import llama_jax.shards"])
        print(json.dumps({"bench": "data_rss", "figure": "baseline", "peak_rss_mib": round(rss, 1),
                          "seconds": round(seconds, 1)}), flush=True)
        for scale in a.scales:
            corpus, shards = work / f"corpus-{scale:g}x.jsonl", work / f"shards-{scale:g}x"
            shutil.rmtree(shards, ignore_errors=True)
            docs = write_corpus(corpus, a.mb * scale)
            mb = corpus.stat().st_size / 1e6
            rss, seconds = measure([py, "-m", "llama_jax.cli", "tokenize", "--data", str(corpus), "--tokenizer",
                                    str(TOKENIZER), "--out", str(shards), "--no-progress"])
            index = json.loads((shards / "index.json").read_text())
            assert index["documents"] == docs
            common = {"bench": "data_rss", "scale": scale, "corpus_mb": round(mb, 1), "documents": docs,
                      "tokens": index["tokens"]}
            print(json.dumps({**common, "figure": "tokenize", "peak_rss_mib": round(rss, 1),
                              "seconds": round(seconds, 1)}), flush=True)
            rss, seconds = measure([py, __file__, "--read", str(shards), "--batches", str(a.batches),
                                    "--seq-len", str(a.seq_len), "--rows", str(a.rows)])
            print(json.dumps({**common, "figure": f"read {a.batches} batches of {a.rows} x {a.seq_len + 1}",
                              "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)}), flush=True)
            if a.train_steps:
                run = work / f"run-{scale:g}x"
                shutil.rmtree(run, ignore_errors=True)
                rss, seconds = measure([py, "-m", "llama_jax.cli", "train", "--model", "tiny", "--tokenizer",
                                        str(TOKENIZER), "--data", str(shards), "--seq-len", "128", "--batch",
                                        str(a.rows), "--steps", str(a.train_steps), "--save-every",
                                        str(a.train_steps), "--out", str(run), "--no-progress"])
                print(json.dumps({**common, "figure": f"train {a.train_steps} steps of {a.rows} x 129 (tiny)",
                                  "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)}), flush=True)
                shutil.rmtree(run)
            corpus.unlink()
            shutil.rmtree(shards)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
