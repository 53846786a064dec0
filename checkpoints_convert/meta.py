"""Meta's released format: params.json + consolidated.NN.pth model-parallel shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_config_from_params(params: dict[str, Any] | str | Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The Hugging Face config.json dict equivalent to a Meta params.json."""
    source = "params.json"
    if not isinstance(params, dict):
        source = str(params)
        params = json.loads(Path(params).read_text())
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab}; pass the tokenizer's vocabulary size")
        vocab = vocab_size
    dim, n_heads = params["dim"], params["n_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "intermediate_size": ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        "rms_norm_eps": params.get("norm_eps", 1e-6),
        "rope_theta": params.get("rope_theta", 10000.0),
        "max_position_embeddings": params.get("max_seq_len", 4096 if params.get("norm_eps") == 1e-5 else 2048),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if params.get("use_scaled_rope"):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    return config
