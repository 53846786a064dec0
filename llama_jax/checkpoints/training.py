"""Training runs on disk.

A run's OUT folder is an Orbax CheckpointManager root: OUT/<step>/ holds "state" (params, optimizer
state, step, rng, skip counters) and "data" + "meta" (JSON: the data position, and the model config
and run settings). Orbax writes each step into a temporary folder and renames it when every file is
written (atomic finalize), so a save cut short by a crash or SIGKILL is never listed as a step;
leftover temporary folders are removed when a writing manager next opens the root. OUT also holds
the run's tokenizer files (cli.py writes them when the run starts), metrics.jsonl and tb/. OUT may be
any path etils.epath and Orbax support (a local folder, gs://bucket/run).

Several processes: each reads its own share of the data, so "data" holds every process's position
({"processes": [position of process 0, of process 1, ...]}), gathered when the step is saved; on
restore each process takes its own.

A run folder is a model: `run_step(OUT)` is its latest complete step, `run_step(OUT/<step>)` that step.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama_jax.checkpoints import orbax_io
from llama_jax.config import LlamaConfig
from llama_jax.model import abstract_params


class TrainCheckpointer:
    """Async Orbax saves of a TrainState every `save_every` steps, keeping the last `keep`.

        ckpt = TrainCheckpointer(out, save_every=1000, keep=3)
        if ckpt.latest_step() is not None:
            state, data_position, meta = ckpt.restore(abstract_state)
        ckpt.save(step, state, data_position)      # no-op unless step is due (or force=True)
        ckpt.wait(); ckpt.close()

    read_only: only reads (saves are refused, and a live run's temporary folders are left alone)."""

    def __init__(self, directory, save_every: int = 1000, keep: int | None = 3, async_save: bool = True,
                 meta: dict | None = None, read_only: bool = False):
        self.directory = orbax_io.as_path(directory)
        self.meta = meta or {}
        # Which steps to save is decided here (every save_every steps, or forced), not by Orbax's policy,
        # which would also save the first step of every run.
        self.save_every = save_every
        self._last_saved: int | None = None
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=1, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save)
        with orbax_io.quiet_logs():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `save` would save `step` without force."""
        return step % self.save_every == 0

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is due (every save_every steps) or `force`d; returns at
        once after the arrays are copied off the device (the write goes on in the background)."""
        # (An async save still in flight is not in all_steps yet: remember the last step asked for too.)
        if not (force or self.due(step)) or step in (self._last_saved, *self.manager.all_steps()):
            return False
        self._last_saved = step
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave({"processes": _gather_json(data_state or {})}),
            meta=ocp.args.JsonSave(self.meta))
        with orbax_io.quiet_logs():
            return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position, meta) of `step` (default: the latest complete one). `abstract_state`
        is a TrainState of jax.ShapeDtypeStruct (with shardings: each device reads only its shards)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              _state_tree(abstract_state))
        with orbax_io.quiet_logs():
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return _state_from_tree(type(abstract_state), restored["state"]), _own_data_state(restored["data"] or {}), \
            dict(restored["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step` (default: the latest), without reading any arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        with orbax_io.quiet_logs():
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _gather_json(value) -> list:
    """Every process's JSON-serialisable `value`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
    return [json.loads(rows[i, :n].tobytes()) for i, n in enumerate(lengths)]


def _own_data_state(saved: dict) -> dict:
    """This process's data position from a step's "data" item."""
    if "processes" not in saved:  # a run saved by one process before positions were per process
        return dict(saved)
    positions = saved["processes"]
    if len(positions) != jax.process_count():
        raise ValueError(f"the run was saved by {len(positions)} processes and resumes with {jax.process_count()}: "
                         "each process's share of the data would change; resume with the same number of hosts")
    return dict(positions[jax.process_index()])


def _state_tree(state) -> dict:
    # Orbax stores plain containers; a TrainState (a dataclass) goes in as the dict of its fields.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _state_from_tree(cls, tree: dict):
    return cls(**tree)


def _is_step(path: epath.Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def is_train_checkpoint(path) -> bool:
    """Whether `path` is a training run's folder (holding a complete step) or one step of it."""
    path = epath.Path(path)
    return path.is_dir() and (_is_step(path) or any(_is_step(p) for p in path.iterdir()))


def run_step(path: str | epath.PathLike) -> tuple[epath.Path, int]:
    """(run folder, step) for a run folder (its latest complete step) or a step folder (that step)."""
    path = orbax_io.as_path(path)
    if _is_step(path):
        return path.parent, int(path.name)
    ckpt = TrainCheckpointer(path, read_only=True)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{path}: a training run without a complete step")
    return path, step


def run_meta(path: str | epath.PathLike) -> dict:
    """The metadata (command, config, tokenizer, settings) that a run saved with its step `path`
    stands for (see run_step)."""
    root, step = run_step(path)
    ckpt = TrainCheckpointer(root, read_only=True)
    try:
        return ckpt.read_meta(step)
    finally:
        ckpt.close()


def run_config(path: str | epath.PathLike) -> LlamaConfig:
    saved = run_meta(path).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: a training run without a saved config")
    return LlamaConfig.from_dict(saved)


def restore_run_params(path: str | epath.PathLike, cfg: LlamaConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """The params of the step `path` stands for (see run_step), in `cfg.param_dtype`, placed by the
    model's sharding rules on `mesh` (else on the first local device); the optimizer state is not read."""
    root, step = run_step(path)
    target = orbax_io.with_shardings(abstract_params(cfg), orbax_io.placement(cfg, mesh))
    restored = orbax_io.restore_tree(root / str(step) / "state", {"params": target}, "training checkpoint",
                                     partial=True)
    return restored["params"]


class MetricsLog:
    """OUT/metrics.jsonl, one JSON row a step. A local file is appended to and flushed every row (tail -f
    follows it); an object store (gs://) cannot append, so there the rows are kept and the file is written
    whole every FLUSH_ROWS rows and at the end."""

    FLUSH_ROWS = 100

    def __init__(self, path):
        self.path = epath.Path(path)
        self.remote = "://" in os.fspath(path)
        self.rows: list[str] = []
        self.file = None

    def keep_up_to(self, step: int) -> None:
        """Start the log: keep the rows of steps up to `step` and drop the rest (and a row cut short by a
        kill), since a resumed run logs those steps again; each step keeps exactly one row."""
        # Not a regular file (/dev/full, say): left to fail on the first write. (epath's is_file is
        # "exists and not a folder", which a device passes; pathlib's is the stricter test.)
        if self.path.is_file() if self.remote else os.path.isfile(self.path):
            rows = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    rows.append(line + "\n")
            self.rows = rows
            self._write_whole()
        if not self.remote:
            self.file = self.path.open("a")

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:
            self.rows.append(line)
            if len(self.rows) % self.FLUSH_ROWS == 0:
                self._write_whole()

    def _write_whole(self) -> None:
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(self.rows))
        tmp.replace(self.path)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        else:
            self._write_whole()
