"""Tiny random Hugging Face LlamaForCausalLM models: the reference our numerics are checked against."""

from __future__ import annotations

import numpy as np
import torch


def hf_config(vocab=128, dim=64, layers=2, heads=4, kv_heads=4, ffn=96, theta=10000.0, tied=False,
              llama3=False, max_pos=256, eps=1e-5):
    from transformers import LlamaConfig as HFLlamaConfig

    kw = {}
    if llama3:
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return HFLlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, rope_theta=theta, tie_word_embeddings=tied,
        max_position_embeddings=max_pos, rms_norm_eps=eps, **kw)


def hf_model(seed=0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**kw)).float().eval()
    # Random norm weights too, so a mix-up of norms would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_from_gguf(path):
    """transformers' own GGUF loader (dequantized to float32): the reference for GGUF files."""
    from pathlib import Path

    from transformers import LlamaForCausalLM

    path = Path(path)
    return LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                            pad_token_id=None).eval()  # stories260K stores pad = 2**32 - 1
