"""Training runs on disk.

A run's OUT folder is an Orbax CheckpointManager root: OUT/<step>/ holds "state" (params, optimizer
state, step, rng, skip counters) and "data" + "meta" (JSON: the data position, and the model config
and run settings). Orbax writes each step into a temporary folder and renames it when every file is
written (atomic finalize), so a save cut short by a crash or SIGKILL is never listed as a step;
leftover temporary folders are removed when a writing manager next opens the root. OUT also holds
the run's tokenizer files (cli.py writes them when the run starts), metrics.jsonl and tb/.

A run folder is a model: `run_step(OUT)` is its latest complete step, `run_step(OUT/<step>)` that step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp

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
        self.directory = Path(directory).absolute()
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

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is due (every save_every steps) or `force`d; returns at
        once after the arrays are copied off the device (the write goes on in the background)."""
        # (An async save still in flight is not in all_steps yet: remember the last step asked for too.)
        if not (force or step % self.save_every == 0) or step in (self._last_saved, *self.manager.all_steps()):
            return False
        self._last_saved = step
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave(data_state or {}),
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
        return _state_from_tree(type(abstract_state), restored["state"]), dict(restored["data"] or {}), \
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


def _state_tree(state) -> dict:
    # Orbax stores plain containers; a TrainState (a dataclass) goes in as the dict of its fields.
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _state_from_tree(cls, tree: dict):
    return cls(**tree)


def _is_step(path: Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def is_train_checkpoint(path) -> bool:
    """Whether `path` is a training run's folder (holding a complete step) or one step of it."""
    path = Path(path)
    return path.is_dir() and (_is_step(path) or any(_is_step(p) for p in path.iterdir()))


def run_step(path: str | Path) -> tuple[Path, int]:
    """(run folder, step) for a run folder (its latest complete step) or a step folder (that step)."""
    path = Path(path).absolute()
    if _is_step(path):
        return path.parent, int(path.name)
    ckpt = TrainCheckpointer(path, read_only=True)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{path}: a training run without a complete step")
    return path, step


def run_meta(path: str | Path) -> dict:
    """The metadata (command, config, tokenizer, settings) that a run saved with its step `path`
    stands for (see run_step)."""
    root, step = run_step(path)
    ckpt = TrainCheckpointer(root, read_only=True)
    try:
        return ckpt.read_meta(step)
    finally:
        ckpt.close()


def run_config(path: str | Path) -> LlamaConfig:
    saved = run_meta(path).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: a training run without a saved config")
    return LlamaConfig.from_dict(saved)


def restore_run_params(path: str | Path, cfg: LlamaConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """The params of the step `path` stands for (see run_step), in `cfg.param_dtype`, placed by the
    model's sharding rules on `mesh` (else on the first local device); the optimizer state is not read."""
    root, step = run_step(path)
    target = orbax_io.with_shardings(abstract_params(cfg), orbax_io.placement(cfg, mesh))
    restored = orbax_io.restore_tree(root / str(step) / "state", {"params": target}, "training checkpoint",
                                     partial=True)
    return restored["params"]
