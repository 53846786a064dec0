"""LoRA: a low-rank update trained beside each frozen weight matrix (Hu et al., 2021); with a 4-bit base
(a tree of QArrays), QLoRA (Dettmers et al., 2023).

    lora = LoraConfig(rank=16, alpha=32, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = init_adapters(cfg, lora, key, mesh)   # {"layers": {"attn": {"q": {"a": ..., "b": ...}}}}
    params = attach(base, adapters, lora)            # the model's params, a LoraWeight at each target
    logits = forward(params, tokens, cfg)            # x @ w + (alpha / rank) * (x @ a) @ b (ops.project)
    plain = merge(base, adapters, lora)              # w + (alpha / rank) * a @ b: a plain checkpoint

The adapters are their own small pytree: what the optimizer sees, what a checkpoint of a LoRA run
holds. The base is never differentiated, so it has no gradients and no optimizer state.

Shapes follow the parameter table (params.py): a weight whose first `quant_split` axes are contracted,
w [*in, *out] (q: [embed, heads, head_dim]), gets a [*in, rank] and b [rank, *out], stacked on the
layers axis like w, with w's logical axes on its own sides of the rank (so they shard like w, and
`--mesh` works unchanged). a starts normal(0, 1 / fan_in), b at zero: the adapted model starts as the base.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from llama_jax import params as table
from llama_jax.config import LlamaConfig
from llama_jax.qarray import QArray
from llama_jax.sharding import Rules, specs_for

# The weights LoRA may adapt, by their short name (the parameter's last path element).
TARGETS = {p.path[-1]: p for p in table.TABLE if p.stacked and p.quant_split is not None}
RANK_AXIS = "lora_rank"  # the rank dimension's logical axis: replicated (DEFAULT_RULES has no entry for it)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0  # on the adapter's input, while training

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {', '.join(unknown) or '(none)'}: choose among {', '.join(TARGETS)}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   dropout=float(d.get("dropout", 0.0)))

    def check(self, cfg: LlamaConfig) -> None:
        """A rank that does not fit a weight (above its smaller side) is refused: it would add nothing a
        full update lacks, at more cost."""
        for name in self.targets:
            n_in, n_out = _sides(TARGETS[name], cfg)
            if self.rank > min(n_in, n_out):
                raise ValueError(f"LoRA rank {self.rank} does not fit {name}: its matrix is {n_in} x {n_out} "
                                 f"(the rank must be at most {min(n_in, n_out)})")


def _sides(p: table.Param, cfg: LlamaConfig) -> tuple[int, int]:
    shape = p.shape(cfg)
    return math.prod(shape[:p.quant_split]), math.prod(shape[p.quant_split:])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "a", "b", "key"],
                   meta_fields=["scale", "dropout"])
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight and its adapter, as the model's params hold it: ops.project computes
    x @ base + scale * (dropout(x) @ a) @ b. Stacked on the layers axis like any weight (the layer scan
    slices every field)."""

    base: jax.Array | QArray  # [*in, *out]
    a: jax.Array  # [*in, rank]
    b: jax.Array  # [rank, *out]
    key: jax.Array | None = None  # uint32 key data for the dropout mask (None: no dropout)
    scale: float = 1.0
    dropout: float = 0.0

    def __getitem__(self, key):  # nnx: `variable[...]` is the whole value
        if key is Ellipsis:
            return self
        raise TypeError("a LoraWeight supports only [...]")


# ---------------------------------------------------------------------------------------------
# The adapters pytree


def _adapter_rows(cfg: LlamaConfig, lora: LoraConfig):
    """(row, a's shape, b's shape, a's axes, b's axes) for each target, stacked on the layers axis."""
    for name in lora.targets:
        p = TARGETS[name]
        shape, axes, s = p.shape(cfg), p.axes[1:], p.quant_split
        yield (p, (cfg.n_layers, *shape[:s], lora.rank), (cfg.n_layers, lora.rank, *shape[s:]),
               ("layers", *axes[:s], RANK_AXIS), ("layers", RANK_AXIS, *axes[s:]))


def adapter_axes(cfg: LlamaConfig, lora: LoraConfig) -> dict:
    """The logical axes of every adapter array, in the adapters' layout."""
    out: dict = {}
    for p, _, _, a_axes, b_axes in _adapter_rows(cfg, lora):
        table.set_(out, p.path, {"a": a_axes, "b": b_axes})
    return out


def abstract_adapters(cfg: LlamaConfig, lora: LoraConfig, dtype=jnp.float32) -> dict:
    out: dict = {}
    for p, a_shape, b_shape, _, _ in _adapter_rows(cfg, lora):
        table.set_(out, p.path, {"a": jax.ShapeDtypeStruct(a_shape, dtype), "b": jax.ShapeDtypeStruct(b_shape, dtype)})
    return out


def adapter_shardings(cfg: LlamaConfig, lora: LoraConfig, mesh, rules: Rules | None = None) -> dict:
    """NamedShardings of the adapters: each side of the rank sharded as its weight's side is."""
    specs = specs_for(adapter_axes(cfg, lora), abstract_adapters(cfg, lora), mesh, rules)
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_adapters(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array, mesh=None, rules: Rules | None = None,
                  dtype=jnp.float32) -> dict:
    """Fresh adapters: a ~ normal(0, 1 / fan_in), b = 0 (float32 master copies); sharded on `mesh`."""
    lora.check(cfg)
    rows = list(_adapter_rows(cfg, lora))

    def make(key):
        out: dict = {}
        for k, (p, a_shape, b_shape, _, _) in zip(jax.random.split(key, len(rows)), rows):
            fan_in = math.prod(a_shape[1:-1])
            table.set_(out, p.path, {"a": jax.random.normal(k, a_shape, dtype) / math.sqrt(fan_in),
                                     "b": jnp.zeros(b_shape, dtype)})
        return out

    shardings = adapter_shardings(cfg, lora, mesh, rules) if mesh is not None else None
    return jax.jit(make, out_shardings=shardings)(key)


# ---------------------------------------------------------------------------------------------
# Using them


def attach(base: dict, adapters: dict, lora: LoraConfig, key: jax.Array | None = None) -> dict:
    """The model's params: `base` with each target weight replaced by LoraWeight(weight, a, b). `key`
    (training): a dropout mask per layer from it, when lora.dropout > 0."""
    params = table.copy(base)
    for name in lora.targets:
        p = TARGETS[name]
        ab = table.get(adapters, p.path)
        layer_keys = None
        if key is not None and lora.dropout > 0:
            n_layers = ab["a"].shape[0]
            target_key = jax.random.fold_in(key, list(TARGETS).index(name))
            layer_keys = jax.random.key_data(jax.random.split(target_key, n_layers))
        table.set_(params, p.path, LoraWeight(table.get(base, p.path), ab["a"], ab["b"], layer_keys, lora.scale,
                                              lora.dropout if layer_keys is not None else 0.0))
    return params


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * a @ b for stacked adapters a [layers, *in, rank], b [layers, rank, *out]: float32
    [layers, *in, *out], the weight's shape."""
    layers, rank = a.shape[0], a.shape[-1]
    out = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1),
                     preferred_element_type=jnp.float32)
    return scale * out.reshape(a.shape[:-1] + b.shape[2:])


def merge(base: dict, adapters: dict, lora: LoraConfig, dtype=None) -> dict:
    """Plain params: each target w + (alpha / rank) * a @ b, in `dtype` (default: the weight's). A
    quantized base is dequantized first (the merged weights are float)."""
    params = table.copy(base)
    for name in lora.targets:
        p = TARGETS[name]
        w = table.get(base, p.path)
        ab = table.get(adapters, p.path)
        out_dtype = dtype or (jnp.float32 if isinstance(w, QArray) else w.dtype)
        dense = w.dequantize(jnp.float32) if isinstance(w, QArray) else w.astype(jnp.float32)
        table.set_(params, p.path, (dense + delta(ab["a"], ab["b"], lora.scale)).astype(out_dtype))
    return params
