"""Multiplying activations by weights, chosen by the kernel policy: float or quantized (QArray), whole or
one layer of a stack read where it lies.

    y = project(kernels, "btd,dnh->btnh", x, w)            # x times one weight, in x's dtype
    q, k, v = project_many(kernels, "btd,dnh->btnh", x, (wq, wk, wv))   # one launch where a kernel serves
    logits = head(kernels, x, w, tied)                      # float32 logits from the lm_head (or embedding)
    x = embed(w, tokens, dtype)                             # rows of the embedding

Reference: XLA's einsum, a QArray dequantized next to it. Kernels, where Kernels says and they take the
shapes: few-row bf16 products on one GPU run the Pallas kernel (pallas_qmatmul.py) and one-row ones on a
Hopper GPU the CUDA kernel (cuda_matvec.py), both reading integer codes straight from HBM; few-row
float32 products on the CPU run the native kernel (cpu_qmatmul.py). Left to XLA, `x @ q.dequantize()`
writes the whole float weight to HBM and reads it back.

A decode step's layer scan would slice each layer's weights out of the stack, and XLA copies a slice
that it hands to a custom call (or, for `o`, to cuBLAS). So `decode_views` keeps the weights a kernel
reads whole, and the scan hands the model a `LayerView` (a stack and a layer index) in their place.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.lora import LoraWeight
from llama_jax.ops import cpu_qmatmul, cuda_matvec, pallas_qmatmul
from llama_jax.ops.policy import STACKED_WEIGHTS, Kernels
from llama_jax.qarray import QArray
from llama_jax.sharding import constrain


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LayerView:
    """Layer `index` of a stacked weight (a bf16 array or a QArray), not sliced out."""

    stack: jax.Array | QArray  # [layers, *weight]
    index: jax.Array  # int32 scalar

    def __getitem__(self, key):  # nnx: `variable[...]` is the whole value
        if key is Ellipsis:
            return self
        raise TypeError("a LayerView supports only [...]")

    def astype(self, dtype) -> jax.Array:
        if isinstance(self.stack, QArray):
            return self.stack.take(self.index).dequantize(dtype)
        return self.stack[self.index].astype(dtype)

    @property
    def quantized(self) -> bool:
        return isinstance(self.stack, QArray)

    def matrix(self, n_in: int) -> jax.Array | QArray:
        """The stack as the kernels read it, [layers, K, N]: a QArray as stored, a float stack with its
        first n_in weight axes merged into K (a reshape, no copy)."""
        if self.quantized:
            return self.stack
        shape = self.stack.shape
        return self.stack.reshape(shape[0], math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:]))


def _n_in(spec: str) -> int:
    """How many leading axes of the weight an einsum spec like "btd,dnh->btnh" contracts."""
    x_axes, w_axes = spec.split("->")[0].split(",")
    return sum(a in x_axes for a in w_axes)


def _weight(w):
    """(the stored weight, the layer index or None) of a weight, a QArray or a LayerView."""
    return (w.stack, w.index) if isinstance(w, LayerView) else (w, None)


def project(kernels: Kernels, spec: str, x: jax.Array, w) -> jax.Array:
    """x times a weight (an array, a QArray, a LayerView or a LoraWeight), in x's dtype (sums in float32)."""
    return project_many(kernels, spec, x, (w,))[0]


def project_many(kernels: Kernels, spec: str, x: jax.Array, ws) -> list[jax.Array]:
    """x times several weights that contract its last axes (q/k/v, gate/up): one launch where a kernel
    serves them all, else one product each. A LoraWeight is its base's product plus its adapter's."""
    if any(isinstance(w, LoraWeight) for w in ws):
        bases = project_many(kernels, spec, x, [w.base if isinstance(w, LoraWeight) else w for w in ws])
        return [y + _adapter_product(spec, x, w) if isinstance(w, LoraWeight) else y for y, w in zip(bases, ws)]
    n_in = _n_in(spec)
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
    outs = _kernel_products(kernels, x2, ws, n_in)
    if outs is not None:
        return [_shaped(o, x, w, n_in) for o, w in zip(outs, ws)]
    # One product each: through a kernel where one takes it alone (asked already when ws is one), else XLA.
    return [_project_one(kernels, spec, x, x2, w, n_in, ask_kernel=len(ws) > 1) for w in ws]


def _shaped(out2: jax.Array, x: jax.Array, w, n_in: int) -> jax.Array:
    """A kernel's [M, N] product back in x's dtype and the shape the einsum spec gives."""
    stored, index = _weight(w)
    tail = (tuple(stored.tail[stored.split:]) if isinstance(stored, QArray)
            else tuple(stored.shape[(0 if index is None else 1) + n_in:]))
    return out2.astype(x.dtype).reshape(x.shape[:x.ndim - n_in] + tail)


def _project_one(kernels: Kernels, spec: str, x: jax.Array, x2: jax.Array, w, n_in: int,
                 ask_kernel: bool) -> jax.Array:
    out = _kernel_products(kernels, x2, (w,), n_in) if ask_kernel else None
    if out is not None:
        return _shaped(out[0], x, w, n_in)
    stored, index = _weight(w)
    if isinstance(stored, QArray):
        return _shaped(_dequantized_product(x2, stored if index is None else stored.take(index)), x, w, n_in)
    # A float weight: XLA's einsum in x's dtype, on x as it is laid out (its batch and sequence axes keep
    # their shardings; training's gradients stay in the compute dtype).
    m = stored if index is None else stored[index]
    return jnp.einsum(spec, x, m.astype(x.dtype))


def _adapter_product(spec: str, x: jax.Array, w: LoraWeight) -> jax.Array:
    """scale * (dropout(x) @ a) @ b in x's dtype, laid out as x @ w.base is: with spec "btd,dnh->btnh",
    "btd,dr->btr" then "btr,rnh->btnh"."""
    inputs, y_axes = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n_in = _n_in(spec)
    r = next(c for c in "rzyxwvu" if c not in spec)
    kept = "".join(c for c in x_axes if c not in w_axes[:n_in])
    if w.key is not None and w.dropout > 0:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(w.key), 1.0 - w.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    h = jnp.einsum(f"{x_axes},{w_axes[:n_in]}{r}->{kept}{r}", x, w.a.astype(x.dtype))
    y = jnp.einsum(f"{kept}{r},{r}{w_axes[n_in:]}->{y_axes}", h, w.b.astype(x.dtype))
    return (y * w.scale).astype(x.dtype)


def _dequantized_product(x2: jax.Array, q: QArray) -> jax.Array:
    """The reference for a quantized weight: x2 [M, K] @ q dequantized next to XLA's dot, float32 [M, N].
    Differentiated (QLoRA: gradients reach the activations through a frozen 4-bit weight), the backward
    pass dequantizes the weight again rather than keep the forward's copy: a float copy of a whole
    weight lives only as long as its op, not from the forward pass to the backward."""
    return _quantized_dot(x2, q, jnp.zeros((0,), x2.dtype))


@jax.custom_vjp
def _quantized_dot(x2: jax.Array, q: QArray, like: jax.Array) -> jax.Array:
    return jnp.dot(x2, q.dequantize(x2.dtype).reshape(q.matrix_shape()), preferred_element_type=jnp.float32)


def _quantized_dot_fwd(x2, q, like):
    return _quantized_dot(x2, q, like), (q, like)


def _quantized_dot_bwd(residuals, g):
    q, like = residuals  # like: an empty array of x2's dtype
    w = q.dequantize(like.dtype).reshape(q.matrix_shape())
    dx = jnp.dot(g.astype(like.dtype), w.T, preferred_element_type=jnp.float32).astype(like.dtype)
    # A quantized weight is frozen: no gradient for its codes (integers) or scales.
    dq = jax.tree.map(lambda a: (np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
                                 else jnp.zeros_like(a)), q)
    return dx, dq, jnp.zeros_like(like)


_quantized_dot.defvjp(_quantized_dot_fwd, _quantized_dot_bwd)


def _kernel_products(kernels: Kernels, x2: jax.Array, ws, n_in: int, out_dtype=None) -> list[jax.Array] | None:
    """x2 [M, K] @ each of ws through one kernel launch ([M, N] each, summed in float32, in float32 or
    out_dtype), or None where the policy has no kernel that takes them all."""
    out_dtype = out_dtype or x2.dtype
    ws = tuple(ws)
    stored = [_weight(w)[0] for w in ws]
    indices = {id(i) for i in (_weight(w)[1] for w in ws)}
    if len(indices) != 1:  # mixed: views of different layers, or views beside whole weights
        return None
    layer = _weight(ws[0])[1]
    quantized = [isinstance(s, QArray) for s in stored]
    if any(q and s.codebook is not None for q, s in zip(quantized, stored)):  # NF4: the kernels decode int4 only
        return None
    if all(quantized):
        if _cuda(kernels) and cuda_matvec.supported(stored, x2):
            return list(cuda_matvec.matvec(x2, tuple(stored), layer, out_dtype=out_dtype))
        if kernels.matmul == "pallas" and pallas_qmatmul.supported(tuple(stored), x2):
            return list(pallas_qmatmul.qmatmul(x2, tuple(stored), layer))
        if _native(kernels) and all(cpu_qmatmul.supported(s, x2) for s in stored):
            return [cpu_qmatmul.qmatmul_cpu(x2, s, layer) for s in stored]
        return None
    if any(quantized) or layer is None:  # whole float weights: XLA's dot is the fastest there is
        return None
    mats = tuple(w.matrix(n_in) for w in ws)  # float views of the stack
    if _cuda(kernels) and cuda_matvec.supported(mats, x2):
        return list(cuda_matvec.matvec(x2, mats, layer, out_dtype=out_dtype))
    if kernels.matmul == "pallas" and pallas_qmatmul.supported_dense(mats, x2):
        return list(pallas_qmatmul.matmul(x2, mats, layer))
    return None


def _cuda(kernels: Kernels) -> bool:
    # The native libraries register with XLA on first use (a policy chosen by hand may not have built them).
    return kernels.matvec == "cuda" and cuda_matvec.available()


def _native(kernels: Kernels) -> bool:
    return kernels.matmul == "native" and cpu_qmatmul.available()


def head(kernels: Kernels, x: jax.Array, w, tied: bool) -> jax.Array:
    """float32 logits [batch, seq, vocab] from the final hidden states x [batch, seq, dim]: x times the
    lm_head w [dim, vocab], or with `tied` times the transpose of the embedding w [vocab, dim]."""
    batch, seq, dim = x.shape
    x2 = x.reshape(-1, dim)
    if isinstance(w, QArray) and tied:
        if _native(kernels) and w.codebook is None and cpu_qmatmul.supported_rows(w, x2):
            out = cpu_qmatmul.qmatmul_rows_cpu(x2, w)
        else:
            out = jnp.dot(x2, w.dequantize(x.dtype).T, preferred_element_type=jnp.float32)
    elif isinstance(w, QArray):
        out = _kernel_products(kernels, x2, (w,), 1, jnp.float32)
        out = out[0] if out is not None else _dequantized_product(x2, w)
    elif not tied and _cuda(kernels) and cuda_matvec.supported((w,), x2):
        out = cuda_matvec.matvec(x2, (w,))[0]
    else:
        w = w.T if tied else w
        return jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.astype(jnp.float32).reshape(batch, seq, -1)


def embed(w, tokens: jax.Array, dtype) -> jax.Array:
    """Rows `tokens` of the embedding w [vocab, dim], in `dtype`; a quantized one decodes only the rows
    it reads. A float table's features (fsdp) are gathered before the lookup, like any FSDP weight:
    looking up rows of an embed-split table would make XLA move the batch-split activations (and their
    gradient) across fsdp instead. The vocab stays split over tensor (a masked lookup, one all-reduce)."""
    if isinstance(w, QArray):
        return w.rows(tokens, dtype)
    return constrain(w, ("vocab", None)).astype(dtype)[tokens]


# ---------------------------------------------------------------------------------------------
# Decode steps: which stacked weights stay whole

# The weights the CUDA kernel reads at batch 1 (every projection, and the norms for the fused layer).
MATVEC_WEIGHTS = STACKED_WEIGHTS + ("attn_norm", "mlp_norm")


def decode_views(kernels: Kernels, stacked, rows: int, dtype):
    """Split a decode step's stacked layer weights (the model's layer tree) into (whole, sliced): the
    weights a kernel reads from the stack stay whole (every QArray, and the float weights the policy
    reads in place: all of MATVEC_WEIGHTS at one row with the CUDA kernel, else Kernels.stacked_weights
    with the Pallas kernel), the rest go to the scan to slice. Where one is whole the other holds None."""
    if kernels.matvec == "cuda" and rows == 1 and dtype == jnp.bfloat16:
        in_place = MATVEC_WEIGHTS
    elif kernels.matmul == "pallas" and pallas_qmatmul.rows_fit(rows, dtype):
        in_place = kernels.stacked_weights
    else:
        in_place = ()

    def keep(path, a) -> bool:  # path: the module names down to the param, e.g. ("attn", "q", ...)
        names = {p.key for p in path if hasattr(p, "key")}
        if isinstance(a, LoraWeight):
            return False
        return isinstance(a, QArray) or (bool(names & set(in_place)) and a.dtype == dtype)

    # A LoraWeight goes to the scan whole (base and adapter sliced together): no kernel reads it in place.
    is_q = lambda a: isinstance(a, (QArray, LoraWeight))  # noqa: E731
    kept = jax.tree_util.tree_map_with_path(keep, stacked, is_leaf=is_q)
    whole = jax.tree.map(lambda a, k: a if k else None, stacked, kept, is_leaf=is_q)
    sliced = jax.tree.map(lambda a, k: None if k else a, stacked, kept, is_leaf=is_q)
    return whole, sliced


def layer_views(sliced_layer, whole, index: jax.Array):
    """One layer's weights as the model sees them: the scan's slices, and LayerViews of the whole ones."""
    def view(sliced_leaf, whole_leaf):
        return sliced_leaf if whole_leaf is None else LayerView(whole_leaf, index)

    return jax.tree.map(view, sliced_layer, whole, is_leaf=lambda a: a is None or isinstance(a, (QArray, LoraWeight)))
