"""Readers (and one writer) for released LLaMA weight formats. Knows files, not JAX.

Every reader offers the same small interface:

    reader.config               # the model's config as a Hugging Face config.json dict
    reader.keys()               # tensor names, canonical (Hugging Face) naming
    reader.tensor(name)         # one tensor as a numpy array, Hugging Face layout ([out, in], half-split rotary)
    reader.write_tokenizer(dir) # the tokenizer files (tokenizer.model / tokenizer.json / tokenizer_config.json)

and optionally `reader.shapes()` (every tensor's shape without reading data, for validation up front)
and `reader.location(name)` (the file a tensor lives in, for error messages). A converter holds one
tensor at a time. Meta and GGUF q/k weights are permuted to the Hugging Face rotary layout inside
their readers. Bad input raises `ConvertError` (a ValueError) naming the file, the key, and what was
expected versus found.

    MetaReader(folder)   params.json + consolidated.NN.pth (meta.py)
    HFReader(folder)     config.json + *.safetensors (hf.py; write_hf_folder writes that format)
    GGUFReader(path)     llama.cpp's GGUF (gguf.py)
"""

from checkpoints_convert.names import ConvertError
from checkpoints_convert.names import hf_global_keys, hf_layer_keys

__all__ = ["ConvertError", "hf_layer_keys", "hf_global_keys"]
