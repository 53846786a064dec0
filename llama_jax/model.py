"""The LLaMA transformer as Flax NNX modules, and the pure functions around them.

    tokens -> embed -> n_layers x Block (scanned) -> RMSNorm -> lm_head -> float32 logits
    Block: x + Attention(RMSNorm(x)), then + MLP(RMSNorm(.))

Every layer's weights are stacked on a leading `layers` axis (one `Block` holds them all) and the
forward pass runs a `lax.scan` over that axis, so compile time does not grow with depth. Every
parameter's shape and logical axis names come from the parameter table (params.py); sharding.py maps
the axes to a mesh. The model is math: which kernel runs a product or an attention is the ops layer's
business (ops/), steered by the `kernels` value passed down from the caller.

The public surface is pure: `init_params`, `forward`, `param_count` take and return pytrees of
arrays. `nnx.merge` rebuilds the module inside the jit boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import ops, params
from llama_jax.config import LlamaConfig
from llama_jax.ops import Kernels
from llama_jax.sharding import constrain, param_shardings

Params = dict  # nested dict of arrays, the layout of params.py

_init = nnx.initializers.normal(0.02)  # transformers' initializer_range default


def _param(cfg: LlamaConfig, rngs: nnx.Rngs | None, *path: str) -> nnx.Param:
    """The parameter at `path`, shaped and named by the parameter table (params.py)."""
    row = params.BY_PATH[path]
    shape, dtype = row.full_shape(cfg), cfg.param_jnp_dtype
    value = jnp.ones(shape, dtype) if row.ones else _init(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=row.axes)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (Hugging Face's half-split layout: the pair of dimension i is i + head_dim/2)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:  # [head_dim // 2] float32
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [batch, seq, 1, head_dim/2] for positions [batch, seq], in float32; computed once
    per forward pass and shared by every layer."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by the rope_tables angles, in float32."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, written in place at `index` as tokens arrive.

    Rows of a batch share slot numbers: prompts are left-padded to one length, and `valid` marks the
    slots that hold a real token (padding never receives attention)."""

    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    valid: jax.Array  # [batch, max_len] bool
    index: jax.Array  # int32 scalar: the slot the next token goes to

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_jnp_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Keys and values in fixed-size blocks of one pool that every sequence shares (the serving engine's):
    row b of a batch owns the blocks `tables[b]` names, in order, so the key of its token at position p
    lies in block tables[b, p // block_size], slot p % block_size. Memory follows the tokens in flight,
    and rows of any lengths share a batch. Block ops.NO_BLOCK takes padding's writes and belongs to no row.
    Positions must be passed with it (each row's tokens sit at their own positions)."""

    k: jax.Array  # [layers, blocks, block_size, kv_heads, head_dim]
    v: jax.Array  # like k
    tables: jax.Array  # int32 [batch, width]: each row's blocks; unused entries are ops.NO_BLOCK

    @classmethod
    def zeros(cls, cfg: LlamaConfig, blocks: int, block_size: int, dtype=None) -> "PagedKVCache":
        """Empty pools; each call sets its own `tables` (dataclasses.replace)."""
        shape = (cfg.n_layers, blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_jnp_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((1, 1), jnp.int32))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


# ---------------------------------------------------------------------------------------------
# Modules. Their parameters have a leading `layers` axis (Block) or none (the rest of Llama);
# Block.__call__ runs one layer on a slice taken by the scan in Llama.__call__. Every product with a
# weight, and attention, goes through the ops layer, which runs a kernel where `kernels` says.


class RMSNorm(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *path: str):
        self.weight = _param(cfg, None, *path, "weight")
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (_param(cfg, rngs, "layers", "attn", n) for n in "qkvo")

    def __call__(self, x, rope, kernels: Kernels = Kernels(), segment_ids=None, layer_cache=None,
                 paged_cache=None):
        """Without a cache: causal self-attention over x. With `layer_cache` = (k, v, layer, start,
        mask), k and v being every layer's cache [layers, batch, max_len, kv_heads, head_dim]: the new
        keys and values go into the cache at (layer, slot `start`), the queries attend over that
        layer's slots under `mask` [batch, seq, max_len], and the updated (k, v) come back too.
        With `paged_cache` = (pool_k, pool_v, layer, tables, positions, token_mask) the same through
        a PagedKVCache's pools (ops.paged_attention)."""
        q, k, v = ops.project_many(kernels, "btd,dnh->btnh", x, (self.q[...], self.k[...], self.v[...]))
        if paged_cache is not None:
            out, *kv = ops.paged_attention(kernels, q, k, v, rope, *paged_cache, rotate=apply_rope)
        elif layer_cache is None:
            q = constrain(apply_rope(q, rope), ("batch", "seq", "heads", "head_dim"))
            k = constrain(apply_rope(k, rope), ("batch", "seq", "kv_heads", "head_dim"))
            v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
            out, kv = ops.attention(kernels, q, k, v, causal=True, segment_ids=segment_ids), None
        else:
            out, *kv = ops.cached_attention(kernels, q, k, v, rope, *layer_cache, rotate=apply_rope)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return ops.project(kernels, "btnh,nhd->btd", out, self.o[...]), kv


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.gate, self.up, self.down = (_param(cfg, rngs, "layers", "mlp", n) for n in ("gate", "up", "down"))

    def __call__(self, x, kernels: Kernels = Kernels()):
        gate, up = ops.project_many(kernels, "btd,df->btf", x, (self.gate[...], self.up[...]))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return ops.project(kernels, "btf,fd->btd", h, self.down[...])


class Block(nnx.Module):
    """All n_layers transformer layers, stacked; calling it runs one layer (a scan slice)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg, "layers", "attn_norm")
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, "layers", "mlp_norm")
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, kernels: Kernels = Kernels(), segment_ids=None, layer_cache=None,
                 paged_cache=None):
        if layer_cache is not None:  # a kernel may run the whole layer for one token; this is its reference
            weights = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(self, nnx.Param))}
            fused = ops.decode_layer(kernels, weights, self.cfg, x, rope, layer_cache)
            if fused is not None:
                return fused
        h, kv = self.attn(self.attn_norm(x), rope, kernels, segment_ids, layer_cache, paged_cache)
        x = constrain(x + h, ("batch", "seq", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x), kernels), ("batch", "seq", "act_embed"))
        return x, kv


def _save_matmuls(prim, *args, **params) -> bool:
    # The projections' outputs, and those of a fused attention kernel: it is not a dot, so without this
    # the backward pass would run its forward kernel again for the softmax statistics
    # (bench/BENCHMARKS.md). Its output and statistics are small beside the rest.
    return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
            or ops.is_fused_attention(prim, *args, **params))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": _save_matmuls,
}


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(cfg, rngs, "embed")
        self.layers = Block(cfg, rngs)
        self.norm = RMSNorm(cfg, "norm")
        if not cfg.tie_embeddings:
            self.lm_head = _param(cfg, rngs, "lm_head")

    def __call__(
        self,
        tokens: jax.Array,  # int32 [batch, seq]
        positions: jax.Array | None = None,  # int32 [batch, seq]; default 0..seq-1 (or from the cache)
        segment_ids: jax.Array | None = None,  # int32 [batch, seq]: packed documents attend only within
        cache: KVCache | PagedKVCache | None = None,
        token_mask: jax.Array | None = None,  # bool [batch, seq]: with a cache, False marks padding
        *,
        kernels: Kernels = Kernels(),  # which kernels run the ops (ops/policy.py); default: XLA
        unroll: int | bool = 1,  # unroll the layer scan: decode is memory-bound and gains from it
        remat: str = "none",  # what the backward pass recomputes: none | full | save_matmuls
        return_hidden: bool = False,  # final normed hidden states instead of logits (chunked losses)
        logits_at: jax.Array | None = None,  # int32 [batch]: only this token of each row -> [batch, 1, ...]
    ):
        cfg = self.cfg
        batch, seq = tokens.shape
        if positions is None and isinstance(cache, PagedKVCache):
            raise ValueError("a PagedKVCache needs positions: each row's tokens sit at their own")
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        x = constrain(ops.embed(self.embed[...], tokens, cfg.compute_jnp_dtype), ("batch", "seq", "act_embed"))
        rope = rope_tables(positions, rope_frequencies(cfg))
        graphdef, stacked = nnx.split(self.layers)

        if cache is None:
            def body(x, layer):
                x, _ = nnx.merge(graphdef, layer)(x, rope, kernels, segment_ids)
                return x, None

            if remat != "none":
                # Inside a scan's loop XLA cannot merge the backward pass's recomputation with the forward
                # pass; unrolled, it would (undoing the remat) unless told not to.
                unrolled = unroll is True or unroll > 1
                body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=unrolled)
            x, _ = jax.lax.scan(body, x, stacked, unroll=unroll)
        elif isinstance(cache, PagedKVCache):
            x, cache = self._run_with_paged_cache(x, rope, cache, positions, token_mask, graphdef, stacked, unroll,
                                                  kernels)
        else:
            x, cache = self._run_with_cache(x, rope, cache, token_mask, graphdef, stacked, unroll, kernels)

        if logits_at is not None:  # a prefill chunk needs its last token's logits, not [seq, vocab] of them
            x = x[jnp.arange(batch), logits_at][:, None]
        x = self.norm(x)
        if return_hidden:
            return x, cache
        head = self.embed[...] if cfg.tie_embeddings else self.lm_head[...]
        return constrain(ops.head(kernels, x, head, cfg.tie_embeddings), ("batch", "seq", "vocab")), cache

    def _run_with_cache(self, x, rope, cache, token_mask, graphdef, stacked, unroll, kernels):
        batch, seq = x.shape[:2]
        start = cache.index
        if token_mask is None:
            token_mask = jnp.ones((batch, seq), bool)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, start))
        # Query t sits in slot start + t and may read slots <= its own that hold real tokens.
        slots = jnp.arange(cache.max_len)
        causal = slots[None, :] <= (start + jnp.arange(seq))[:, None]  # [seq, max_len]
        mask = causal[None] & valid[:, None, :]  # [batch, seq, max_len]
        # The weights a kernel reads from the stack stay whole; the scan slices the rest.
        whole, sliced = ops.decode_views(kernels, stacked, batch * seq, x.dtype)

        # The cache rides in the scan carry and is updated in place, one layer slice at a time.
        def body(carry, layer_and_index):
            x, ck, cv = carry
            layer, i = layer_and_index
            block = nnx.merge(graphdef, ops.layer_views(layer, whole, i))
            x, (ck, cv) = block(x, rope, kernels, None, (ck, cv, i, start, mask))
            return (x, ck, cv), None

        # A constant (not an iota): each unrolled layer's index folds to a literal instead of a kernel.
        layer_ids = np.arange(self.cfg.n_layers, dtype=np.int32)
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (sliced, layer_ids), unroll=unroll)
        return x, KVCache(k=k, v=v, valid=valid, index=start + seq)

    def _run_with_paged_cache(self, x, rope, cache, positions, token_mask, graphdef, stacked, unroll, kernels):
        batch, seq = x.shape[:2]
        if token_mask is None:
            token_mask = jnp.ones((batch, seq), bool)
        whole, sliced = ops.decode_views(kernels, stacked, batch * seq, x.dtype)

        # The pools ride in the scan carry, as the dense cache does, and are written in place.
        def body(carry, layer_and_index):
            x, pk, pv = carry
            layer, i = layer_and_index
            block = nnx.merge(graphdef, ops.layer_views(layer, whole, i))
            x, (pk, pv) = block(x, rope, kernels, None, None, (pk, pv, i, cache.tables, positions, token_mask))
            return (x, pk, pv), None

        layer_ids = np.arange(self.cfg.n_layers, dtype=np.int32)
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (sliced, layer_ids), unroll=unroll)
        return x, PagedKVCache(k=k, v=v, tables=cache.tables)


# ---------------------------------------------------------------------------------------------
# Pure functions: the public interface


def _pure(state) -> dict:
    # flax >= 0.12.11 moves State.to_pure_dict to nnx.to_pure_dict; the GPU machine has 0.12.10.
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _init_state(cfg: LlamaConfig, key: jax.Array) -> Params:
    return _pure(nnx.split(Llama(cfg, rngs=nnx.Rngs(params=key)))[1])


@functools.lru_cache(maxsize=64)
def graphdef(cfg: LlamaConfig):
    """The module structure for `cfg` (no arrays); `nnx.merge(graphdef(cfg), params)` gives a Llama."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]


def abstract_params(cfg: LlamaConfig) -> Params:
    """Shapes and dtypes of every parameter, allocating nothing."""
    return params.abstract(cfg)


def logical_axes(cfg: LlamaConfig) -> dict:
    """The logical axis names of every parameter, in the params layout (a tuple per leaf)."""
    return params.logical_axes(cfg)


def param_count(cfg: LlamaConfig) -> int:
    return sum(math.prod(p.full_shape(cfg)) for p in params.params_of(cfg))


def init_params(cfg: LlamaConfig, key: jax.Array, mesh: jax.sharding.Mesh | None = None, *, rules=None) -> Params:
    """Random parameters (normal(0, 0.02), norms at one). With a mesh, each device creates only its
    own shards (jit with out_shardings; JAX's partitionable threefry lets XLA split the random
    numbers too): the whole model never exists on one device or host. `rules`: the logical-axis
    table (default sharding.DEFAULT_RULES). The values do not depend on the mesh."""
    if mesh is None:
        return jax.jit(_init_state, static_argnums=0)(cfg, key)
    shardings = param_shardings(cfg, mesh, rules)
    return jax.jit(_init_state, static_argnums=0, out_shardings=shardings)(cfg, key)


def apply(params: Params, tokens: jax.Array, cfg: LlamaConfig, **kwargs):
    """The model called on `params`; kwargs as in `Llama.__call__`. Returns (logits, cache)."""
    return nnx.merge(graphdef(cfg), params)(tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=("cfg", "kernels"))
def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig, kernels: Kernels = Kernels()) -> jax.Array:
    """Logits, float32 [batch, seq, vocab], for int32 tokens [batch, seq] (causal, positions 0..seq-1)."""
    return apply(params, tokens, cfg, kernels=kernels)[0]
