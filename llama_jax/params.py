"""The parameter table: every parameter of the model, once.

    params["layers"]["attn"]["q"]   [layers, embed, heads, head_dim]

A row says, for one parameter path of the params pytree:
- its shape for a config and its logical axes (sharding.py maps them onto a mesh);
- its tensor in released files (`hf`: a row of checkpoints_convert/names.py, which also holds the Meta
  and GGUF names and the rotary permutation) and the transform between that layout and ours;
- how it quantizes (`quant_split`: how many leading axes are contracted; None: it stays float) and
  along which matrix axis its groups run;
- whether AdamW's weight decay applies to it.

Ours differ from Hugging Face's [out, in] matrices in two ways: every matrix is [in, out] (x @ w), and
the head axes of q/k/v/o are split out (q [embed, heads, head_dim], o [heads, head_dim, embed]). The
layers' weights are stacked on a leading `layers` axis (model.py scans over it).

The model builds its parameters from this table; conversion, export, quantization, sharding and the
optimizer's decay mask read it too, so a new parameter is one new row here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np

from checkpoints_convert import names
from llama_jax.config import LlamaConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Param:
    path: Path
    axes: tuple[str, ...]  # logical axes, the stacked `layers` axis first where there is one
    shape: Callable[[LlamaConfig], tuple[int, ...]]  # without the layers axis
    hf: names.TensorName  # the tensor in released files
    from_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # Hugging Face layout -> ours (one layer)
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # ours (one layer) -> Hugging Face layout
    quant_split: int | None = None  # leading axes (after layers) that are contracted; None: not quantized
    quant_axis: int = -2  # the stored matrix's grouped axis: -2 its rows (K), -1 its columns
    decay: bool = True  # AdamW's decoupled weight decay (not for RMSNorm gains)
    ones: bool = False  # initialised to ones (RMSNorm gains), else normal(0, 0.02)

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def full_shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        return ((cfg.n_layers,) if self.stacked else ()) + self.shape(cfg)

    def name(self) -> str:
        return ".".join(self.path)


def _same(a, cfg):
    return a


def _t(a, cfg):
    return a.T


def _heads_in(heads: Callable[[LlamaConfig], int]):
    """HF [heads * head_dim, embed] -> ours [embed, heads, head_dim], and back."""
    return (lambda a, c: a.T.reshape(c.dim, heads(c), c.head_dim),
            lambda a, c: a.reshape(c.dim, heads(c) * c.head_dim).T)


_G = {t.hf: t for t in names.GLOBAL}
_L = {t.hf.split("{i}.")[1]: t for t in names.LAYER}
_q = _heads_in(lambda c: c.n_heads)
_kv = _heads_in(lambda c: c.n_kv_heads)

TABLE: tuple[Param, ...] = (
    # The embedding quantizes along its model axis (its last), so that its transpose serves a tied lm_head.
    Param(("embed",), ("vocab", "embed"), lambda c: (c.vocab_size, c.dim), _G["model.embed_tokens.weight"],
          _same, _same, quant_split=1, quant_axis=-1),
    Param(("layers", "attn_norm", "weight"), ("layers", "norm"), lambda c: (c.dim,),
          _L["input_layernorm.weight"], _same, _same, decay=False, ones=True),
    Param(("layers", "attn", "q"), ("layers", "embed", "heads", "head_dim"), lambda c: (c.dim, c.n_heads, c.head_dim),
          _L["self_attn.q_proj.weight"], *_q, quant_split=1),
    Param(("layers", "attn", "k"), ("layers", "embed", "kv_heads", "head_dim"),
          lambda c: (c.dim, c.n_kv_heads, c.head_dim), _L["self_attn.k_proj.weight"], *_kv, quant_split=1),
    Param(("layers", "attn", "v"), ("layers", "embed", "kv_heads", "head_dim"),
          lambda c: (c.dim, c.n_kv_heads, c.head_dim), _L["self_attn.v_proj.weight"], *_kv, quant_split=1),
    Param(("layers", "attn", "o"), ("layers", "heads", "head_dim", "embed"), lambda c: (c.n_heads, c.head_dim, c.dim),
          _L["self_attn.o_proj.weight"], lambda a, c: a.T.reshape(c.n_heads, c.head_dim, c.dim),
          lambda a, c: a.reshape(c.n_heads * c.head_dim, c.dim).T, quant_split=2),
    Param(("layers", "mlp_norm", "weight"), ("layers", "norm"), lambda c: (c.dim,),
          _L["post_attention_layernorm.weight"], _same, _same, decay=False, ones=True),
    Param(("layers", "mlp", "gate"), ("layers", "embed", "mlp"), lambda c: (c.dim, c.ffn_dim),
          _L["mlp.gate_proj.weight"], _t, _t, quant_split=1),
    Param(("layers", "mlp", "up"), ("layers", "embed", "mlp"), lambda c: (c.dim, c.ffn_dim),
          _L["mlp.up_proj.weight"], _t, _t, quant_split=1),
    Param(("layers", "mlp", "down"), ("layers", "mlp", "embed"), lambda c: (c.ffn_dim, c.dim),
          _L["mlp.down_proj.weight"], _t, _t, quant_split=1),
    Param(("norm", "weight"), ("norm",), lambda c: (c.dim,), _G["model.norm.weight"], _same, _same,
          decay=False, ones=True),
    Param(("lm_head",), ("embed", "vocab"), lambda c: (c.dim, c.vocab_size), _G["lm_head.weight"], _t, _t,
          quant_split=1),
)
BY_PATH: dict[Path, Param] = {p.path: p for p in TABLE}


def params_of(cfg: LlamaConfig) -> list[Param]:
    """The rows a model of `cfg` has (no lm_head when it shares the embedding)."""
    return [p for p in TABLE if not (p.path == ("lm_head",) and cfg.tie_embeddings)]


def paths(cfg: LlamaConfig) -> list[Path]:
    return [p.path for p in params_of(cfg)]


def hf_key(p: Param, layer: int | None = None) -> str:
    return p.hf.hf.format(i=layer)


# ---------------------------------------------------------------------------------------------
# The params pytree: nested dicts keyed by the path's names


def get(tree: dict, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def set_(tree: dict, path: Path, value) -> None:
    """Put `value` at `path`, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def copy(tree: dict) -> dict:
    """A new tree of dicts holding the same leaves."""
    return {k: copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def leaves(tree: dict, prefix: Path = ()) -> Iterator[tuple[Path, object]]:
    """(path, leaf) for every leaf, depth first."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def tree_of(cfg: LlamaConfig, value: Callable[[Param], object]) -> dict:
    """A params-shaped tree holding value(row) at each row's path."""
    out: dict = {}
    for p in params_of(cfg):
        set_(out, p.path, value(p))
    return out


def abstract(cfg: LlamaConfig) -> dict:
    """Shapes and dtypes of every parameter (jax.ShapeDtypeStruct), in the params layout, allocating nothing."""
    return tree_of(cfg, lambda p: jax.ShapeDtypeStruct(p.full_shape(cfg), cfg.param_jnp_dtype))


def logical_axes(cfg: LlamaConfig) -> dict:
    """The logical axis names of every parameter, in the params layout (a tuple per leaf)."""
    return tree_of(cfg, lambda p: p.axes)


def leaf_from_reader(reader, row: Param, cfg: LlamaConfig, dtype, layer: int | None = None) -> np.ndarray:
    """One parameter in our layout and `dtype`, read from a checkpoints_convert reader (which gives
    Hugging Face names and layout); a stacked one whole, or only layer `layer` of it."""
    if row.stacked and layer is None:
        return np.stack([leaf_from_reader(reader, row, cfg, dtype, i) for i in range(cfg.n_layers)])
    return np.asarray(row.from_hf(reader.tensor(hf_key(row, layer)), cfg)).astype(dtype)
