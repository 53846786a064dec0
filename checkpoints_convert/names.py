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


# Keys some checkpoints carry that are not parameters (recomputed from the config): ignored.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_keys_and_shapes(found: dict[str, tuple[int, ...] | None], config: dict, where) -> None:
    """Raise ConvertError unless `found` (key -> shape, Hugging Face names) holds exactly the tensors
    of a LLaMA with this config. A shape of None is not known yet (checked when the tensor is read).
    `where(key)` names the file a key came from, for the message."""
    from checkpoints_convert.hf import ConvertError

    expected = expected_shapes(config)
    if config.get("tie_word_embeddings", False):
        found = {k: s for k, s in found.items() if k != "lm_head.weight"}  # some ship the tied copy too
    for key in found:
        if key not in expected and not key.endswith(IGNORED_SUFFIXES):
            raise ConvertError(f"{where(key)}: unknown key '{key}' (expected only the tensors of a LLaMA with "
                               f"{config['num_hidden_layers']} layers)")
    for key, shape in expected.items():
        if key not in found:
            raise ConvertError(f"{where(key)}: missing key '{key}' (expected shape {list(shape)})")
        if found[key] is not None and tuple(found[key]) != shape:
            raise ConvertError(f"{where(key)}: key '{key}' has shape {list(found[key])}, expected {list(shape)} "
                               "(from the config)")
