"""Hugging Face folders: config.json + model.safetensors, or sharded model-0000N-of-0000M.safetensors
with model.safetensors.index.json. Tensors are read memory-mapped, one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INDEX = "model.safetensors.index.json"


class ConvertError(ValueError):
    """Bad input: the message names the file, the key, and what was expected versus found."""


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept as ml_dtypes.bfloat16 (numpy has no bfloat16)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class HFReader:
    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{self.folder}: not a Hugging Face folder (no config.json)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None

        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise ConvertError(f"{self.folder}: no model.safetensors and no {INDEX}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ConvertError(f"{path}: missing shard (listed in {INDEX})")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise ConvertError(f"{path}: unreadable safetensors file ({e})") from None
            self._handles[name] = h
            for key in h.keys():
                self._where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._where:
                    raise ConvertError(f"{self.folder / name}: key '{key}' listed in {INDEX} is missing")

    def keys(self) -> list[str]:
        return sorted(k for k in self._where if not k.endswith("rotary_emb.inv_freq"))

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConvertError(f"{self.folder}: missing key '{name}'")
        file = self._where[name]
        try:
            return to_numpy(self._handles[file].get_tensor(name))
        except Exception as e:
            raise ConvertError(f"{self.folder / file}: key '{name}' unreadable ({e})") from None

    def tokenizer_files(self) -> list[Path]:
        names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json")
        return [self.folder / n for n in names if (self.folder / n).is_file()]
