"""Readers (and one writer) for released LLaMA weight formats. Knows files, not JAX.

Every reader offers the same small interface:

    reader.config        # the model's config as a Hugging Face config.json dict
    reader.keys()        # tensor names, canonical (Hugging Face) naming
    reader.tensor(name)  # one tensor as a numpy array, Hugging Face layout ([out, in], half-split rotary)

so a converter holds one tensor at a time. Meta and GGUF q/k weights are permuted to the Hugging
Face rotary layout inside their readers.
"""

from checkpoints_convert.names import hf_layer_keys, hf_global_keys

__all__ = ["hf_layer_keys", "hf_global_keys"]
