"""Building the native kernels' shared libraries on first use (cpu_qmatmul.py with the C++ compiler,
cuda_matvec.py with nvcc), into llama-jax's cache folder (`cache_dir`: LLAMA_JAX_CACHE, else
~/.cache/llama-jax; the default model's converted checkpoint lives there too).

    path = build([cxx, *flags], [source], "qmatmul_cpu", compiler_version)   # -> .../native/qmatmul_cpu-<hash>.so

The file name hashes the sources (and the headers they include), the command and `version` (the
compiler's and jaxlib's), so a change to any of them builds anew. A library is compiled to a temporary
name and renamed: an interrupted build never leaves a half-written one, and two processes building at
once each rename a whole one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jaxlib


def cache_dir() -> Path:
    """llama-jax's cache folder: LLAMA_JAX_CACHE, else ~/.cache/llama-jax."""
    return Path(os.environ.get("LLAMA_JAX_CACHE") or Path.home() / ".cache" / "llama-jax")


def build(command: list[str], sources: Sequence[Path], stem: str, version: str = "",
          headers: Sequence[Path] = ()) -> Path:
    """The library compiled from `sources` by `command` (a compiler and its flags; the sources and `-o`
    are appended), built now unless the cache holds it. `headers` count in the hash only. Raises
    RuntimeError with the compiler's errors."""
    text = b"".join(f.read_bytes() for f in (*sources, *headers))
    key = hashlib.sha256(text + " ".join(command).encode() + version.encode()
                         + jaxlib.__version__.encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{stem}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{stem}-", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*command, *map(str, sources), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            errors = [line for line in r.stderr.splitlines() if "error" in line] or r.stderr.splitlines()
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(errors[:20]))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def register(library: Path, targets: dict[str, str], platform: str) -> None:
    """Load `library` and register each of its FFI handlers with XLA: targets maps the target's name to
    the handler's symbol. Raises on any failure (the caller falls back and says why)."""
    lib = ctypes.cdll.LoadLibrary(str(library))
    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform=platform)
