"""The ops layer: the only code that knows about kernels. The model calls these ops; each runs a fused
kernel where the kernel policy (`Kernels`, policy.py) chooses one and it takes the call, and otherwise
its XLA reference, which is also the kernel's test oracle.

    attention, cached_attention      attention.py  (cuDNN; a Pallas decode kernel)
    project, project_many, head,     matmul.py     (Pallas, CUDA and CPU kernels for quantized and
      embed, decode_views, ...                      stacked weights)
    decode_layer                     layer.py      (a whole decoder layer in one CUDA call)
    paged_attention,                 paged_attention.py (the serving engine's paged KV cache; a Pallas kernel)
      decode_reads_in_place
"""

from llama_jax.ops.attention import attention, cached_attention, is_fused_attention
from llama_jax.ops.layer import decode_layer
from llama_jax.ops.matmul import LayerView, decode_views, embed, head, layer_views, project, project_many
from llama_jax.ops.paged_attention import NO_BLOCK, decode_reads_in_place, paged_attention
from llama_jax.ops.policy import Kernels

__all__ = ["Kernels", "attention", "cached_attention", "is_fused_attention", "decode_layer", "LayerView", "decode_views", "embed",
           "head", "layer_views", "project", "project_many", "NO_BLOCK", "decode_reads_in_place",
           "paged_attention"]
