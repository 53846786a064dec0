"""Released weights through checkpoints_convert's readers: which reader a path needs, the checks
every tensor passes on its way in (keys and shapes against the config before anything is read,
then each tensor's shape and values as it is read), and all params in memory."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from checkpoints_convert.gguf import GGUFReader, is_gguf
from checkpoints_convert.hf import HFReader
from checkpoints_convert.meta import MetaReader
from checkpoints_convert.names import ConvertError
from checkpoints_convert.names import check_keys_and_shapes, expected_shapes
from llama_jax import params as P
from llama_jax.config import LlamaConfig

READERS = {"meta": MetaReader, "hf": HFReader, "gguf": GGUFReader}


def reader_for(path: str | Path):
    """A checkpoints_convert reader for a GGUF file, a Hugging Face folder or a Meta folder (None
    for anything else)."""
    path = Path(path)
    if is_gguf(path):
        return open_reader("gguf", path)
    if path.is_dir() and (path / "config.json").is_file():
        return open_reader("hf", path)
    if path.is_dir() and (path / "params.json").is_file():
        return open_reader("meta", path)
    return None


def open_reader(kind: str, path: str | Path):
    """The reader of format `kind` ("meta", "hf" or "gguf") for `path`."""
    if kind not in READERS:
        raise ValueError(f"unknown format {kind!r} (meta, hf or gguf)")
    return READERS[kind](path)


def validate(reader) -> None:
    """Keys (and shapes, where the reader knows them without reading data) against the config,
    before anything is read or written. Raises ConvertError."""
    found = reader.shapes() if hasattr(reader, "shapes") else dict.fromkeys(reader.keys())
    check_keys_and_shapes(found, reader.config, lambda key: where(reader, key))


def where(reader, name: str):
    """The file a tensor comes from, for messages."""
    if hasattr(reader, "location"):
        return reader.location(name)
    return getattr(reader, "path", None) or getattr(reader, "folder", "input")


def source_of(reader) -> str:
    return str(getattr(reader, "path", None) or getattr(reader, "folder", ""))


class CheckedReader:
    """A reader whose tensors are checked as they are read: shape against the config, values finite."""

    def __init__(self, reader):
        self.reader = reader
        self.config = reader.config
        self._shapes = expected_shapes(reader.config)

    def keys(self):
        return self.reader.keys()

    def tensor(self, name: str) -> np.ndarray:
        t = self.reader.tensor(name)
        want = self._shapes.get(name)
        key = self.reader.source_key(name) if hasattr(self.reader, "source_key") else name  # the file's own name
        if want is not None and tuple(t.shape) != want:
            raise ConvertError(f"{where(self.reader, name)}: key '{key}' has shape {list(t.shape)}, "
                               f"expected {list(want)} (from the config)")
        bad = t.size - np.count_nonzero(np.isfinite(t))
        if bad:
            raise ConvertError(f"{where(self.reader, name)}: key '{key}' has {bad} NaN/Inf values (of {t.size}); "
                               "expected finite values")
        return t


def params_from_reader(reader, cfg: LlamaConfig, dtype=None) -> dict:
    """All parameters from a reader, in memory (`convert` streams them to disk instead)."""
    dtype = np.dtype(dtype or cfg.param_dtype)
    return P.tree_of(cfg, lambda row: jnp.asarray(P.leaf_from_reader(reader, row, cfg, dtype)))
