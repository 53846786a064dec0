"""Parameters in and out: the map between Hugging Face tensors and the params layout, and `load`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig, from_hf_config

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


def load(path: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> Loaded:
    """Load a model from a Hugging Face folder (config.json + *.safetensors).

    `dtype` sets the parameter dtype (default: float32)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "config.json").is_file():
        from checkpoints_convert.hf import HFReader

        reader = HFReader(path)
        cfg = from_hf_config(reader.config)
        if dtype is not None:
            cfg = cfg.replace(param_dtype=dtype)
        params = params_from_reader(reader, cfg)
        if mesh is not None:
            from llama_jax.sharding import param_shardings

            params = jax.device_put(params, param_shardings(cfg, mesh))
        return Loaded(cfg, params, None)
    raise ValueError(f"{path}: not a model this version can load (expected a Hugging Face folder with config.json)")


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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
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
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(self.meta))
        return self.manager.save(step, args=args, force=force)

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
