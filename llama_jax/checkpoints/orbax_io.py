"""The on-disk layout of a llama-jax checkpoint, and writing it safely.

    OUT/params/           an Orbax PyTree checkpoint of the params (stacked layout)
    OUT/llama_jax.json    {"format": "llama-jax", "version": 1, "config": LlamaConfig fields, "source": ...,
                           "quantization": {...} for a quantized one}
    OUT/tokenizer.*       tokenizer.model (SentencePiece) or tokenizer.json, tokenizer_config.json

Every writer works in a hidden folder beside OUT (`staged_output`) that is renamed to OUT when
complete, and llama_jax.json is written last: a killed write leaves no OUT, and a folder without
llama_jax.json is never taken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from checkpoints_convert.names import ConvertError
from llama_jax import params as P
from llama_jax.config import LlamaConfig
from llama_jax.model import abstract_params
from llama_jax.sharding import param_shardings

CHECKPOINT_META = "llama_jax.json"
FORMAT, VERSION = "llama-jax", 1
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")  # either one makes a folder a tokenizer


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an etils.epath.Path: a local path made absolute (Orbax takes absolute paths only), a
    URI (gs://bucket/run) kept as it is, so every filesystem epath and Orbax support works."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete Orbax checkpoint made by `convert` or `quantize`."""
    path = epath.Path(path)
    return (path / CHECKPOINT_META).is_file() and (path / "params" / "_METADATA").is_file()


def has_tokenizer(folder: str | Path) -> bool:
    return any((epath.Path(folder) / n).is_file() for n in TOKENIZER_NAMES)


def write_checkpoint_info(folder: Path, cfg: LlamaConfig, source: str, **extra) -> None:
    """The checkpoint's metadata (format, config, where it came from), written last: a folder
    without it is never taken for a checkpoint."""
    info = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "source": source, **extra}
    (folder / CHECKPOINT_META).write_text(json.dumps(info, indent=1))


def read_checkpoint_info(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (format, version, config, source[, quantization])."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path}: not a complete llama-jax checkpoint (no {CHECKPOINT_META} or params/_METADATA)")
    try:
        info = json.loads((path / CHECKPOINT_META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CHECKPOINT_META}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        got = info if not isinstance(info, dict) else f"format {info.get('format')!r} version {info.get('version')!r}"
        raise ValueError(f"{path / CHECKPOINT_META}: {got}, expected {FORMAT!r} version {VERSION}")
    if not isinstance(info.get("config"), dict):
        raise ValueError(f"{path / CHECKPOINT_META}: no 'config' object")
    return info


def config_of(path: str | Path) -> LlamaConfig:
    """The config a checkpoint records, with a message naming the file if it is not a valid one."""
    info = read_checkpoint_info(path)
    try:
        return LlamaConfig.from_dict(info["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{Path(path) / CHECKPOINT_META}: invalid config ({e})") from None


@contextlib.contextmanager
def quiet_logs():
    """absl (Orbax's logger) at ERROR for the block: Orbax logs a warning on every save without OCDBT
    and INFO lines on every restore, which the command line does not show unless --verbose."""
    logger = logging.getLogger("absl")
    level = logger.level
    if level < logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_tree(folder: Path, tree, **handler_options) -> None:
    """An Orbax PyTree checkpoint of `tree` (nested dicts of arrays) at `folder`."""
    with quiet_logs():
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler_options)).save(folder, args=ocp.args.PyTreeSave(tree))


def restore_tree(folder: Path, target, what: str = "checkpoint", partial: bool = False):
    """The PyTree checkpoint at `folder` restored into `target` (ShapeDtypeStructs with shardings:
    each device reads only its own shards; `partial`: only the leaves `target` names). A damaged
    file raises one ValueError naming the folder."""
    folder = as_path(folder)
    try:
        with quiet_logs():
            return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                folder, args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=partial))
    except Exception as e:  # a damaged file: say which checkpoint, not Orbax's stack
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{folder.parent}: unreadable {what} ({type(e).__name__}: {first})") from None


def check_stored_shapes(params_dir: Path, target: dict) -> None:
    """Refuse a checkpoint whose stored arrays differ in shape from `target` (a params-shaped tree of
    ShapeDtypeStructs): Orbax would pad or cut them to the target's shape instead."""
    for path, want in P.leaves(target):
        meta = params_dir / ".".join(path) / "zarr.json"
        if not meta.is_file():
            raise ValueError(f"{params_dir}: parameter {'.'.join(path)} is missing")
        stored = tuple(json.loads(meta.read_text())["shape"])
        if stored != tuple(want.shape):
            raise ValueError(f"{meta}: shape {list(stored)}, expected {list(want.shape)} from {CHECKPOINT_META}")


def placement(cfg: LlamaConfig, mesh: jax.sharding.Mesh | None, template=None):
    """Where each parameter goes: the model's sharding rules on `mesh`, else the first local device.
    `template`: a params tree holding QArrays, for the shardings of their fields."""
    if mesh is not None:
        return param_shardings(cfg, mesh, params=template)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract_params(cfg) if template is None else template)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` placed by `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---------------------------------------------------------------------------------------------
# Writing an output folder that looks complete only when it is


def check_out_dir(out: Path, overwrite: bool, holds: Callable[[Path], bool], what: str) -> None:
    """Refuse an OUT that is not a folder, holds something else, or holds `what` without `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder (expected a new or empty folder)")
    if holds(out):
        if not overwrite:
            raise ConvertError(f"{out}: already holds {what} (expected a new or empty folder; --overwrite replaces it)")
    elif any(out.iterdir()):
        raise ConvertError(f"{out}: exists and is not empty (expected a new or empty folder, or {what} to replace)")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, what: str = "a checkpoint", holds: Callable = None):
    """Write into a hidden folder beside `out` that becomes `out` only when the block completes; on
    any failure or interruption everything it made is removed, so a half-written output never looks
    complete. `holds(out)` says whether `out` already holds `what` (refused without `overwrite`)."""
    check_out_dir(out, overwrite, holds or is_checkpoint, what)
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
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # a parent that is a file, or no permission
        raise ConvertError(f"{out}: cannot create the output folder ({e.strerror})") from None
    return tmp, created


def _remove_stale_temp_dirs(out: Path) -> None:
    """Folders left by writers that were killed (their process is gone)."""
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
    """Move the finished `tmp` to `out` (replacing what check_out_dir allowed to be replaced)."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif not overwrite:  # another process finished first
            raise ConvertError(f"{out}: already holds {what} (written while this one was written)")
        else:
            old = out.parent / f"{_temp_prefix(out)}replaced-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
    tmp.rename(out)
