"""Canonical tensor names: Hugging Face's LlamaForCausalLM names, which every reader produces."""

LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def hf_layer_keys(layer: int) -> list[str]:
    return [f"model.layers.{layer}.{k}" for k in LAYER_KEYS]


def hf_global_keys(tied: bool) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    return keys if tied else keys + ["lm_head.weight"]


def expected_keys(config: dict) -> list[str]:
    tied = bool(config.get("tie_word_embeddings", False))
    keys = hf_global_keys(tied)
    for i in range(config["num_hidden_layers"]):
        keys += hf_layer_keys(i)
    return keys


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of every tensor a LLaMA with this config.json has."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or n
    hd = config.get("head_dim") or d // n
    per_layer = {
        "self_attn.q_proj.weight": (n * hd, d),
        "self_attn.k_proj.weight": (kv * hd, d),
        "self_attn.v_proj.weight": (kv * hd, d),
        "self_attn.o_proj.weight": (d, n * hd),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes
