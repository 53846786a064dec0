"""Hugging Face folders: config.json + model.safetensors, or sharded model-0000N-of-0000M.safetensors
with model.safetensors.index.json. Tensors are read memory-mapped, one at a time; `write_hf_folder`
writes the same format back (export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from checkpoints_convert.names import IGNORED_SUFFIXES, ConvertError

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")

# Memory-mapped pages a reader has touched count as its resident memory until the file is unmapped:
# readers reopen their files after this many bytes, so resident memory stays near one layer.
REOPEN_BYTES = 512 * 2**20


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept as ml_dtypes.bfloat16 (numpy has no bfloat16)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray):
    """A numpy array (ml_dtypes.bfloat16 included) as a contiguous torch tensor."""
    import ml_dtypes
    import torch

    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays (memory-mapped files)
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class HFReader:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise FileNotFoundError(f"{self.folder}: no such folder")
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{self.folder}: not a Hugging Face folder (no config.json)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None

        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            self._files = sorted(set(weight_map.values()))
        elif (self.folder / "model.safetensors").is_file():
            self._files, weight_map = ["model.safetensors"], None
        else:
            raise ConvertError(f"{self.folder}: no model.safetensors and no {INDEX}")
        for name in self._files:
            if not (self.folder / name).is_file():
                raise ConvertError(f"{self.folder / name}: missing shard (listed in {INDEX})")
        self._open()
        self._where: dict[str, str] = {}
        for name, h in self._handles.items():
            for key in h.keys():
                self._where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._where:
                    raise ConvertError(f"{self.folder / name}: key '{key}' listed in {INDEX} is missing")

    def _open(self) -> None:
        from safetensors import safe_open

        self._handles = {}
        self._bytes_since_open = 0
        for name in self._files:
            path = self.folder / name
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated files
                raise ConvertError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None

    def keys(self) -> list[str]:
        return sorted(k for k in self._where if not k.endswith(IGNORED_SUFFIXES))

    def location(self, name: str) -> Path:
        """The file holding tensor `name` (for error messages)."""
        if name in self._where:
            return self.folder / self._where[name]
        return self.folder / self._files[0] if len(self._files) == 1 else self.folder

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers (no tensor data)."""
        return {k: tuple(self._handles[f].get_slice(k).get_shape()) for k, f in self._where.items()}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConvertError(f"{self.folder}: missing key '{name}'")
        if self._bytes_since_open > REOPEN_BYTES:
            self._open()  # unmap what earlier reads touched
        file = self._where[name]
        try:
            t = to_numpy(self._handles[file].get_tensor(name))
        except Exception as e:
            raise ConvertError(f"{self.folder / file}: key '{name}' unreadable ({e})") from None
        self._bytes_since_open += t.nbytes
        return t

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).is_file()]

    def write_tokenizer(self, out_dir: str | Path) -> list[Path]:
        """Copy the folder's tokenizer files into `out_dir`; returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(f, out / f.name)) for f in self.tokenizer_files()]


def write_hf_folder(out_dir: str | Path, config: dict, tensors: Iterable[tuple[str, np.ndarray]],
                    max_shard_bytes: int = 2 * 10**9) -> list[Path]:
    """Write config.json and the tensors (name, numpy array in Hugging Face layout) as safetensors:
    one model.safetensors, or model-0000N-of-0000M.safetensors files of at most `max_shard_bytes`
    each plus model.safetensors.index.json. Tensors are consumed one by one and each file is written
    as soon as it is full, so memory holds at most one file's worth. Returns the files written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []  # tensor names of each file written, in order
    batch: dict = {}
    size = total = 0

    def flush():
        parts.append(list(batch))
        save_file(batch, str(out / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"})
        batch.clear()

    for name, array in tensors:
        if batch and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        batch[name] = to_torch(array)
        size += array.nbytes
        total += array.nbytes
    if batch or not parts:
        flush()

    written = []
    if len(parts) == 1:
        (out / "part-00001.safetensors").rename(out / "model.safetensors")
        written.append(out / "model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(parts, 1):
            file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            (out / f"part-{i:05d}.safetensors").rename(out / file)
            weight_map.update({n: file for n in names})
            written.append(out / file)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        written.append(out / INDEX)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    written.append(out / "config.json")
    return written
