"""The fused decode layer: a whole decoder layer for one token in one call, where the kernel policy has a
kernel for it (Kernels.matvec "cuda": cuda_matvec.decode_layer, six launches of which the quantized ones
overlap). Its reference is the model's own layer (model.Block): `decode_layer` returns None wherever the
kernel does not take the layer, and the model then runs its layer as written. tests/test_decode_kernels.py
and bench/matvec_gpu_check.py hold the two to each other.
"""

from __future__ import annotations

import jax

from llama_jax.ops import cuda_matvec
from llama_jax.ops.matmul import LayerView
from llama_jax.ops.policy import Kernels

# The layer's weights, in the order the kernel takes them, and how many leading axes of each are K.
WEIGHTS = (("q", 1), ("k", 1), ("v", 1), ("o", 2), ("gate", 1), ("up", 1), ("down", 1))


def decode_layer(kernels: Kernels, weights: dict, norms: tuple, eps: float, x: jax.Array, rope, layer_cache,
                 heads: int, head_dim: int):
    """(x, (cache_k, cache_v)) after one decoder layer for x [1, 1, dim], or None where no kernel takes
    it. weights: {"q": ..., "down": ...} as the decode scan hands them (LayerViews where kept whole);
    norms: the attention and MLP RMSNorm weights; layer_cache: (cache_k, cache_v, layer, start, mask)."""
    if kernels.matvec != "cuda" or x.shape[:2] != (1, 1):
        return None
    views = [weights[name] for name, _ in WEIGHTS]
    if not (all(isinstance(w, LayerView) for w in (*views, *norms))):
        return None
    mats = tuple(w.matrix(n_in) for w, (_, n_in) in zip(views, WEIGHTS))  # [layers, K, N] as the kernel reads
    cache_k, cache_v, layer, start, mask = layer_cache
    x2 = x.reshape(1, -1)
    if not cuda_matvec.layer_supported(mats, x2, heads, head_dim, cache_k):
        return None
    x2, cache_k, cache_v = cuda_matvec.decode_layer(x2, mats, (norms[0].stack, norms[1].stack), layer, rope,
                                                    cache_k, cache_v, start, mask, eps=eps, head_dim=head_dim)
    return x2.reshape(x.shape), (cache_k, cache_v)
