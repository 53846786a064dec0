"""The fused decode layer: a whole decoder layer for one token in one call, where the kernel policy has a
kernel for it (Kernels.matvec "cuda": cuda_matvec.decode_layer, six launches of which the quantized ones
overlap). Its reference is the model's own layer (model.Block): `decode_layer` returns None wherever the
kernel does not take the layer, and the model then runs its layer as written. tests/test_cuda_matvec.py
and bench/matvec_gpu_check.py hold the two to each other.
"""

from __future__ import annotations

import jax

from llama_jax.config import LlamaConfig
from llama_jax.ops import cuda_matvec
from llama_jax.ops.matmul import LayerView
from llama_jax.ops.policy import Kernels

# The layer's weights, in the order the kernel takes them, and how many leading axes of each are K.
WEIGHTS = ((("attn", "q"), 1), (("attn", "k"), 1), (("attn", "v"), 1), (("attn", "o"), 2),
           (("mlp", "gate"), 1), (("mlp", "up"), 1), (("mlp", "down"), 1))
NORMS = (("attn_norm", "weight"), ("mlp_norm", "weight"))


def decode_layer(kernels: Kernels, weights: dict, cfg: LlamaConfig, x: jax.Array, rope, layer_cache):
    """(x, (cache_k, cache_v)) after one decoder layer for x [1, 1, dim], or None where no kernel takes
    it. weights: every parameter of the layer by its path in the block ({("attn", "q"): ..., ...}) as the
    decode scan hands them (LayerViews where kept whole); a layer with any other parameter than the
    kernel knows is declined. layer_cache: (cache_k, cache_v, layer, start, mask)."""
    known = [path for path, _ in WEIGHTS] + list(NORMS)
    if kernels.matvec != "cuda" or x.shape[:2] != (1, 1) or set(weights) != set(known) or not cuda_matvec.available():
        return None
    if not all(isinstance(weights[path], LayerView) for path in known):
        return None
    if any(weights[path].quantized and weights[path].stack.codebook is not None for path in known):
        return None  # NF4 codes: the kernel decodes int4 only
    mats = tuple(weights[path].matrix(n_in) for path, n_in in WEIGHTS)  # [layers, K, N] as the kernel reads
    cache_k, cache_v, layer, start, mask = layer_cache
    x2 = x.reshape(1, -1)
    if not cuda_matvec.layer_supported(mats, x2, cfg.n_heads, cfg.head_dim, cache_k):
        return None
    norms = tuple(weights[path].stack for path in NORMS)
    x2, cache_k, cache_v = cuda_matvec.decode_layer(x2, mats, norms, layer, rope, cache_k, cache_v, start, mask,
                                                    eps=cfg.norm_eps, head_dim=cfg.head_dim)
    return x2.reshape(x.shape), (cache_k, cache_v)
