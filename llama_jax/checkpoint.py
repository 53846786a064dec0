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
