"""The LLaMA transformer as Flax NNX modules, and the pure functions around them.

    tokens -> embed -> n_layers x Block (scanned) -> RMSNorm -> lm_head -> float32 logits
    Block: x + Attention(RMSNorm(x)), then + MLP(RMSNorm(.))

Every layer's weights are stacked on a leading `layers` axis (one `Block` holds them all) and the
forward pass runs a `lax.scan` over that axis, so compile time does not grow with depth. Every
parameter carries its logical axis names (`logical_axes` metadata); sharding.py maps them to a mesh.

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

from llama_jax import gpu_matvec, qmatmul
from llama_jax.attention import attention, decode_attention, decode_kernel_serves
from llama_jax.config import LlamaConfig
from llama_jax.quantize import QArray, QLayer
from llama_jax.sharding import constrain

Params = dict  # nested dict of arrays, the layout of DESIGN.md

_init = nnx.initializers.normal(0.02)  # transformers' initializer_range default


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, ones=False) -> nnx.Param:
    value = jnp.ones(shape, dtype) if ones else _init(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StackedLayer:
    """Layer `index` of a stacked bf16 weight, not sliced out: the decode scan hands these to the model
    for the weights in DENSE_KERNEL_WEIGHTS, which qmatmul.matmul reads where they lie. (XLA copies a
    layer's slice of `o` before its cuBLAS matmul: 0.6 ms of a 6.35 ms 7B step on an H100.)"""

    stack: jax.Array  # [layers, *weight]
    index: jax.Array  # int32 scalar

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("a StackedLayer supports only [...]")

    def astype(self, dtype) -> jax.Array:
        return self.stack[self.index].astype(dtype)

    def matrix(self, n_in: int) -> jax.Array:
        """The stack as [layers, K, N], its first n_in weight axes merged into K (a reshape, no copy)."""
        shape = self.stack.shape
        return self.stack.reshape(shape[0], math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:]))


def _n_in(spec: str) -> int:
    """How many leading axes of the weight an einsum spec like "btd,dnh->btnh" contracts."""
    x_axes, w_axes = spec.split("->")[0].split(",")
    return sum(a in x_axes for a in w_axes)


def _project(spec: str, x: jax.Array, w) -> jax.Array:
    """x times a weight, in x's dtype. A quantized weight (quantize.py) multiplies itself, so that on a
    GPU its codes go straight into a fused kernel instead of being dequantized to HBM first."""
    if isinstance(w, (QArray, QLayer)):
        return w.matmul(x)
    if isinstance(w, StackedLayer):
        return _project_many(spec, x, (w,))[0]
    return jnp.einsum(spec, x, w.astype(x.dtype))


def _project_many(spec: str, x: jax.Array, ws) -> list[jax.Array]:
    """x times several weights that contract its last axis (q/k/v, gate/up). Weights that a GPU kernel
    serves (quantized, or bf16 layers of a stack) go through it in one launch; anything else is one
    `_project` each."""
    if all(isinstance(w, QLayer) for w in ws) or all(isinstance(w, QArray) for w in ws):
        stacks = tuple(w.stack if isinstance(w, QLayer) else w for w in ws)
        x2 = x.reshape(-1, x.shape[-1])
        layer = ws[0].index if isinstance(ws[0], QLayer) else None
        outs = None
        if gpu_matvec.supported(stacks, x2):
            outs = gpu_matvec.matvec(x2, stacks, layer, out_dtype=x.dtype)
        elif qmatmul.supported(stacks, x2):
            outs = qmatmul.qmatmul(x2, stacks, layer)
        if outs is not None:
            return [o.astype(x.dtype).reshape(x.shape[:-1] + w.tail[w.split:]) for o, w in zip(outs, stacks)]
    if all(isinstance(w, StackedLayer) for w in ws):
        n_in = _n_in(spec)
        x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
        mats = tuple(w.matrix(n_in) for w in ws)
        if gpu_matvec.supported(mats, x2):
            outs = gpu_matvec.matvec(x2, mats, ws[0].index, out_dtype=x.dtype)
        elif qmatmul.supported_dense(mats, x2):
            outs = qmatmul.matmul(x2, mats, ws[0].index)
        else:
            outs = [x2 @ m[w.index].astype(x2.dtype) for m, w in zip(mats, ws)]
        lead = x.shape[:x.ndim - n_in]
        return [o.astype(x.dtype).reshape(lead + w.stack.shape[1 + n_in:]) for o, w in zip(outs, ws)]
    return [_project(spec, x, w) for w in ws]


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


# ---------------------------------------------------------------------------------------------
# Modules. Their parameters have a leading `layers` axis (Block) or none (the rest of Llama);
# Block.__call__ runs one layer on a slice taken by the scan in Llama.__call__.


class RMSNorm(nnx.Module):
    def __init__(self, cfg: LlamaConfig, stack: tuple[int, ...] = ()):
        axes = ("layers", "norm") if stack else ("norm",)
        self.weight = _param(None, stack + (cfg.dim,), axes, cfg.param_jnp_dtype, ones=True)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, stack: tuple[int, ...]):
        d, n, kv, hd, dt = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_jnp_dtype
        self.q = _param(rngs, stack + (d, n, hd), ("layers", "embed", "heads", "head_dim"), dt)
        self.k = _param(rngs, stack + (d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.v = _param(rngs, stack + (d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.o = _param(rngs, stack + (n, hd, d), ("layers", "heads", "head_dim", "embed"), dt)

    def __call__(self, x, rope, segment_ids=None, layer_cache=None):
        """Without a cache: causal self-attention over x. With `layer_cache` = (k, v, layer, start,
        mask), k and v being every layer's cache [layers, batch, max_len, kv_heads, head_dim]: write
        this call's keys and values in place at (layer, slot `start`), attend over that layer's
        slots under `mask` [batch, seq, max_len], and return the updated (k, v) beside the output.
        Writing only the new tokens keeps a decode step's cache traffic to one read of the layer.
        A decode step on one GPU does the rotary, the write and the attention in one Pallas kernel
        (attention.decode_attention); elsewhere XLA does them, with the same results."""
        q, k, v = _project_many("btd,dnh->btnh", x, (self.q[...], self.k[...], self.v[...]))
        if layer_cache is not None and decode_kernel_serves(q, layer_cache[0]):
            cache_k, cache_v, layer, start, mask = layer_cache
            out, k, v = decode_attention(q, k, v, rope, cache_k, cache_v, layer, start, mask)
            return _project("btnh,nhd->btd", out, self.o[...]), (k, v)
        q = constrain(apply_rope(q, rope), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, rope), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        if layer_cache is None:
            out = attention(q, k, v, causal=True, segment_ids=segment_ids)
        else:
            cache_k, cache_v, layer, start, mask = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, start, 0, 0))
            out = attention(q, k[layer].astype(q.dtype), v[layer].astype(q.dtype), causal=False, mask=mask)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return _project("btnh,nhd->btd", out, self.o[...]), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, stack: tuple[int, ...]):
        d, f, dt = cfg.dim, cfg.ffn_dim, cfg.param_jnp_dtype
        self.gate = _param(rngs, stack + (d, f), ("layers", "embed", "mlp"), dt)
        self.up = _param(rngs, stack + (d, f), ("layers", "embed", "mlp"), dt)
        self.down = _param(rngs, stack + (f, d), ("layers", "mlp", "embed"), dt)

    def __call__(self, x):
        gate, up = _project_many("btd,df->btf", x, (self.gate[...], self.up[...]))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return _project("btf,fd->btd", h, self.down[...])


class Block(nnx.Module):
    """All n_layers transformer layers, stacked; calling it runs one layer (a scan slice)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        stack = (cfg.n_layers,)
        self.attn_norm = RMSNorm(cfg, stack)
        self.attn = Attention(cfg, rngs, stack)
        self.mlp_norm = RMSNorm(cfg, stack)
        self.mlp = MLP(cfg, rngs, stack)

    def __call__(self, x, rope, segment_ids=None, layer_cache=None):
        fused = None if layer_cache is None else self._decode_fused(x, rope, layer_cache)
        if fused is not None:
            return fused
        h, kv = self.attn(self.attn_norm(x), rope, segment_ids, layer_cache)
        x = constrain(x + h, ("batch", "seq", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "act_embed"))
        return x, kv

    def _decode_fused(self, x, rope, layer_cache):
        """The layer above for one token (batch 1) on a Hopper GPU, as one call of gpu_matvec.decode_layer:
        five launches of its matmul kernel and one of its attention kernel, which apply each RMSNorm on
        the way into q/k/v and gate/up, the SwiGLU on the way into down, and the residual adds on the way
        out of o and down, rounding to bf16 where the code above rounds; for quantized weights each launch
        starts while the one before finishes (bench/BENCHMARKS.md). None where it does not serve (the
        caller runs the above)."""
        a, m = self.attn, self.mlp
        views = [a.q[...], a.k[...], a.v[...], a.o[...], m.gate[...], m.up[...], m.down[...]]
        norms = [self.attn_norm.weight[...], self.mlp_norm.weight[...]]
        if not (all(isinstance(w, (StackedLayer, QLayer)) for w in views)
                and all(isinstance(n, StackedLayer) for n in norms) and x.shape[:2] == (1, 1)
                and self.attn_norm.eps == self.mlp_norm.eps):
            return None
        # [layers, K, N] as the kernel reads them: the head axes of q/k/v (N) and o (K) merged
        mats = tuple(w.stack if isinstance(w, QLayer) else w.matrix(2 if i == 3 else 1) for i, w in enumerate(views))
        cache_k, cache_v, layer, start, mask = layer_cache
        q_stack = views[0].stack
        heads, head_dim = (q_stack.tail if isinstance(q_stack, QArray) else q_stack.shape[1:])[-2:]
        x2 = x.reshape(1, -1)
        if not gpu_matvec.layer_supported(mats, x2, heads, head_dim, cache_k):
            return None
        x2, cache_k, cache_v = gpu_matvec.decode_layer(x2, mats, (norms[0].stack, norms[1].stack), layer, rope,
                                                       cache_k, cache_v, start, mask, eps=self.attn_norm.eps,
                                                       head_dim=head_dim)
        return x2.reshape(x.shape), (cache_k, cache_v)


# Decode-step weights (bf16, few rows, one GPU) that qmatmul.matmul reads from the stack instead of XLA's
# matmul on a slice. Only `o`: XLA's Triton matmuls read the other slices in place, at 2.6-2.7 TB/s.
DENSE_KERNEL_WEIGHTS = ("o",)
# At batch 1 on a Hopper GPU, every projection goes to gpu_matvec's CUDA kernel instead (faster than
# XLA's matmuls: bench/BENCHMARKS.md), and the norms' weights stay whole too, for Block._decode_fused.
MATVEC_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")


def _save_matmuls(prim, *args, **params) -> bool:
    # The projections' outputs, and those of cuDNN's fused attention: it is a custom call, not a dot, so
    # without this the backward pass would run its forward kernel again for the softmax statistics
    # (2.4 ms of a 197 ms 7B-width step on an H100). Its output and statistics are small beside the rest.
    return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
            or prim.name.startswith("dot_product_attention_fwd"))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": _save_matmuls,
}


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.param_jnp_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dt)
        self.layers = Block(cfg, rngs)
        self.norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(
        self,
        tokens: jax.Array,  # int32 [batch, seq]
        positions: jax.Array | None = None,  # int32 [batch, seq]; default 0..seq-1 (or from the cache)
        segment_ids: jax.Array | None = None,  # int32 [batch, seq]: packed documents attend only within
        cache: KVCache | None = None,
        token_mask: jax.Array | None = None,  # bool [batch, seq]: with a cache, False marks padding
        *,
        unroll: int | bool = 1,  # unroll the layer scan: decode is memory-bound and gains from it
        remat: str = "none",  # what the backward pass recomputes: none | full | save_matmuls
        return_hidden: bool = False,  # final normed hidden states instead of logits (chunked losses)
    ):
        cfg = self.cfg
        cdt = cfg.compute_jnp_dtype
        batch, seq = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        # Gather the table's features (fsdp) before the lookup, like any FSDP weight: looking up rows of an
        # embed-split table would make XLA move the batch-split activations (and their gradient) across
        # fsdp instead. The vocab stays split over tensor (a masked lookup plus one all-reduce).
        embed = self.embed[...]
        if isinstance(embed, QArray):  # decode only the rows looked up, not the whole table every step
            x = embed.rows(tokens, cdt)
        else:
            x = constrain(embed, ("vocab", None)).astype(cdt)[tokens]
        x = constrain(x, ("batch", "seq", "act_embed"))
        rope = rope_tables(positions, rope_frequencies(cfg))
        graphdef, stacked = nnx.split(self.layers)

        if cache is None:
            def body(x, layer):
                x, _ = nnx.merge(graphdef, layer)(x, rope, segment_ids)
                return x, None

            policy = REMAT_POLICIES[remat]
            if remat != "none":
                # Inside a scan's loop XLA cannot merge the backward pass's recomputation with the forward
                # pass; unrolled, it would (undoing the remat) unless told not to.
                unrolled = unroll is True or unroll > 1
                body = jax.checkpoint(body, policy=policy, prevent_cse=unrolled)
            x, _ = jax.lax.scan(body, x, stacked, unroll=unroll)
        else:
            x, cache = self._run_with_cache(x, rope, cache, token_mask, graphdef, stacked, unroll)

        x = self.norm(x)
        if return_hidden:
            return x, cache
        head = self.embed[...] if cfg.tie_embeddings else self.lm_head[...]
        if isinstance(head, QArray):  # quantized: its codes go to the kernels as they lie (float32 logits)
            logits = (head.matmul_transposed(x, jnp.float32) if cfg.tie_embeddings
                      else head.matmul(x, out_dtype=jnp.float32))
        elif not cfg.tie_embeddings and gpu_matvec.supported((head,), x.reshape(-1, cfg.dim)):
            logits = gpu_matvec.matvec(x.reshape(1, cfg.dim), (head,))[0].reshape(batch, seq, -1)
        else:
            head = head.T if cfg.tie_embeddings else head
            logits = jnp.einsum("btd,dv->btv", x, head.astype(cdt), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab")), cache

    def _run_with_cache(self, x, rope, cache, token_mask, graphdef, stacked, unroll):
        batch, seq = x.shape[:2]
        start = cache.index
        if token_mask is None:
            token_mask = jnp.ones((batch, seq), bool)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, start))
        # Query t sits in slot start + t and may read slots <= its own that hold real tokens.
        slots = jnp.arange(cache.max_len)
        causal = slots[None, :] <= (start + jnp.arange(seq))[:, None]  # [seq, max_len]
        mask = causal[None] & valid[:, None, :]  # [batch, seq, max_len]

        # Quantized weights stay whole, each layer reached through a QLayer (see QLayer for why), and
        # so do the bf16 ones that a GPU kernel reads from the stack (StackedLayer): MATVEC_WEIGHTS at
        # batch 1 on a Hopper GPU, else DENSE_KERNEL_WEIGHTS where qmatmul serves; the scan slices the rest.
        dense = (MATVEC_WEIGHTS if gpu_matvec.serves(batch * seq, x.dtype)
                 else DENSE_KERNEL_WEIGHTS if qmatmul.serves(batch * seq, x.dtype) else ())

        def whole(path, a):  # path: the module names down to the param, e.g. ("attn", "q", ...)
            names = {p.key for p in path if hasattr(p, "key")}
            return isinstance(a, QArray) or (bool(names & set(dense)) and a.dtype == x.dtype)

        is_q = lambda a: isinstance(a, QArray)  # noqa: E731
        keep = jax.tree_util.tree_map_with_path(whole, stacked, is_leaf=is_q)
        kept = jax.tree.map(lambda a, k: a if k else None, stacked, keep, is_leaf=is_q)
        sliced = jax.tree.map(lambda a, k: None if k else a, stacked, keep, is_leaf=is_q)

        def view(sliced_leaf, whole_leaf, i):  # the layer's weight as the block sees it
            if whole_leaf is None:
                return sliced_leaf
            return QLayer(whole_leaf, i) if is_q(whole_leaf) else StackedLayer(whole_leaf, i)

        # The cache rides in the scan carry and is updated in place, one layer slice at a time.
        def body(carry, layer_and_index):
            x, ck, cv = carry
            layer, i = layer_and_index
            layer = jax.tree.map(lambda a, w: view(a, w, i), layer, kept, is_leaf=lambda a: a is None or is_q(a))
            x, (ck, cv) = nnx.merge(graphdef, layer)(x, rope, None, (ck, cv, i, start, mask))
            return (x, ck, cv), None

        # A constant (not an iota): each unrolled layer's index folds to a literal instead of a kernel.
        layer_ids = np.arange(self.cfg.n_layers, dtype=np.int32)
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (sliced, layer_ids), unroll=unroll)
        return x, KVCache(k=k, v=v, valid=valid, index=start + seq)


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
    return jax.eval_shape(functools.partial(_init_state, cfg), jax.random.key(0))


def logical_axes(cfg: LlamaConfig) -> dict:
    """The logical axis names of every parameter, in the params layout (a tuple per leaf)."""
    state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[1]
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return _pure(axes)


def param_count(cfg: LlamaConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def init_params(cfg: LlamaConfig, key: jax.Array, mesh: jax.sharding.Mesh | None = None, *, rules=None) -> Params:
    """Random parameters (normal(0, 0.02), norms at one). With a mesh, each device creates only its
    own shards (jit with out_shardings; JAX's partitionable threefry lets XLA split the random
    numbers too): the whole model never exists on one device or host. `rules`: the logical-axis
    table (default sharding.DEFAULT_RULES). The values do not depend on the mesh."""
    if mesh is None:
        return jax.jit(_init_state, static_argnums=0)(cfg, key)
    from llama_jax.sharding import param_shardings

    shardings = param_shardings(cfg, mesh, rules)
    return jax.jit(_init_state, static_argnums=0, out_shardings=shardings)(cfg, key)


def apply(params: Params, tokens: jax.Array, cfg: LlamaConfig, **kwargs):
    """The model called on `params`; kwargs as in `Llama.__call__`. Returns (logits, cache)."""
    return nnx.merge(graphdef(cfg), params)(tokens, **kwargs)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Logits, float32 [batch, seq, vocab], for int32 tokens [batch, seq] (causal, positions 0..seq-1)."""
    return apply(params, tokens, cfg)[0]
