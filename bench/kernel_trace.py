"""GPU kernel times from a jax.profiler trace: what the benchmarks use to say where a step's time goes."""
import collections
import csv
import glob
import re

import jax

# Kernel name -> kind, first match wins (names as XLA, cuBLAS, cuDNN and Triton give them on an H100).
KINDS = [("attention", r"sdpa|fmha|flash|cudnn|dot_product_attention"),
         ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|dot|matmul"),
         ("reduction", r"reduce|reduction"),
         ("convert", r"convert"),
         ("copy/transpose", r"copy|transpose|dynamic.update.slice|concatenate"),
         ("elementwise fusion", r"fusion|loop"),
         ("collective", r"nccl|all.gather|reduce.scatter|all.reduce")]


def trace_kernels(run, path: str) -> str:
    """Run `run()` under the profiler and write its GPU kernels (name, start ns, duration ns) to
    path.csv; returns that file's name."""
    with jax.profiler.trace(path):
        run()
    data = jax.profiler.ProfileData.from_file(glob.glob(path + "/**/*.xplane.pb", recursive=True)[0])
    with open(path + ".csv", "w") as out:
        rows = csv.writer(out)
        for plane in data.planes:
            if "GPU" in plane.name:
                for line in plane.lines:
                    for ev in line.events:
                        rows.writerow([ev.name, ev.start_ns, ev.duration_ns])
    return path + ".csv"


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other")


def summary(csv_path: str, steps: int, top: int = 25) -> dict:
    """Per step: kernel count, busy ms, ms by kind, and the `top` kernels by time (digits stripped
    from names, so a fusion's copies in every layer count as one)."""
    rows = [(name, float(start), float(dur)) for name, start, dur in csv.reader(open(csv_path))]
    by_kind, by_name = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for name, _, dur in rows:
        by_kind[kind(name)] += dur
        short = re.sub(r"[._]?\d+", "", name)[:90]
        by_name[short] += dur
        count[short] += 1
    ms = lambda ns: round(ns / steps / 1e6, 3)  # noqa: E731
    return dict(kernels_per_step=len(rows) // steps, busy_ms=ms(sum(d for *_, d in rows)),
                ms_by_kind={k: ms(v) for k, v in by_kind.most_common()},
                top=[dict(name=n, ms=ms(v), per_step=count[n] // steps) for n, v in by_name.most_common(top)])
