"""Every tensor of a LLaMA checkpoint under each file format's name: one table that the readers, the
writer and llama_jax's parameter table (llama_jax/params.py) all read.

Hugging Face's LlamaForCausalLM names are canonical: every reader hands tensors out under them, in
Hugging Face's layout ([out, in], rotary pairs split in halves). A row also names the tensor in Meta's
consolidated.NN.pth shards (and the axis that fairscale's model-parallel shards split) and in GGUF, and
says whether its rows hold rotary pairs that Meta and GGUF interleave (q and k; see `to_half_split`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


class ConvertError(ValueError):
    """Bad input: the message names the file, the key, and what was expected versus found."""


@dataclasses.dataclass(frozen=True)
class TensorName:
    hf: str  # Hugging Face name; "{i}" = the layer index
    meta: str  # Meta's name in consolidated.NN.pth
    meta_shard_dim: int | None  # the axis fairscale's shards split (None: every shard holds all of it)
    gguf: str  # llama.cpp's name
    rotary_heads: str | None = None  # "q" or "kv": rows are rotary pairs of that many heads, interleaved
    # in Meta and GGUF files, half-split in Hugging Face's


# fairscale's ColumnParallelLinear splits the output rows (dim 0), RowParallelLinear the input columns
# (dim 1), ParallelEmbedding the embedding columns (dim 1; Llama 3 splits the vocab, dim 0: meta.py).
GLOBAL = (
    TensorName("model.embed_tokens.weight", "tok_embeddings.weight", 1, "token_embd.weight"),
    TensorName("model.norm.weight", "norm.weight", None, "output_norm.weight"),
    TensorName("lm_head.weight", "output.weight", 0, "output.weight"),
)
LAYER = (
    TensorName("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", 0, "blk.{i}.attn_q.weight", "q"),
    TensorName("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", 0, "blk.{i}.attn_k.weight", "kv"),
    TensorName("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", 0, "blk.{i}.attn_v.weight"),
    TensorName("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", 1, "blk.{i}.attn_output.weight"),
    TensorName("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", 0, "blk.{i}.ffn_gate.weight"),
    TensorName("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", 0, "blk.{i}.ffn_up.weight"),
    TensorName("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", 1, "blk.{i}.ffn_down.weight"),
    TensorName("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight", None, "blk.{i}.attn_norm.weight"),
    TensorName("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", None, "blk.{i}.ffn_norm.weight"),
)
BY_HF = {t.hf: t for t in GLOBAL + LAYER}

# Keys some checkpoints carry that are not parameters (recomputed from the config): ignored.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def names(config: dict) -> dict[str, tuple[TensorName, int | None]]:
    """Hugging Face name -> (its row, its layer or None) for every tensor a LLaMA with this
    config.json has (no lm_head when the embeddings are tied)."""
    tied = bool(config.get("tie_word_embeddings", False))
    out = {t.hf: (t, None) for t in GLOBAL if not (tied and t.hf == "lm_head.weight")}
    for i in range(config["num_hidden_layers"]):
        out.update({t.hf.format(i=i): (t, i) for t in LAYER})
    return out


def rotary_heads(row: TensorName, config: dict) -> int | None:
    """How many heads of rotary pairs the rows of this tensor hold (None: not q or k)."""
    if row.rotary_heads == "q":
        return config["num_attention_heads"]
    if row.rotary_heads == "kv":
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows [heads * head_dim, ...] from Meta's and GGUF's interleaved rotary pairs (0,1), (2,3), ... to
    Hugging Face's half split (i, i + head_dim/2). The trailing axes ride along (GGUF's quantized blocks
    permute as whole rows)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_layer_keys(layer: int) -> list[str]:
    return [t.hf.format(i=layer) for t in LAYER]


def hf_global_keys(tied: bool) -> list[str]:
    return [t.hf for t in GLOBAL if not (tied and t.hf == "lm_head.weight")]


def expected_keys(config: dict) -> list[str]:
    return list(names(config))


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of every tensor a LLaMA with this config.json has."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or n
    hd = config.get("head_dim") or d // n
    by_suffix = {
        "q_proj.weight": (n * hd, d), "k_proj.weight": (kv * hd, d), "v_proj.weight": (kv * hd, d),
        "o_proj.weight": (d, n * hd), "gate_proj.weight": (f, d), "up_proj.weight": (f, d),
        "down_proj.weight": (d, f), "layernorm.weight": (d,), "embed_tokens.weight": (v, d),
        "model.norm.weight": (d,), "lm_head.weight": (v, d),
    }
    return {key: next(s for suffix, s in by_suffix.items() if key.endswith(suffix)) for key in names(config)}


def check_keys_and_shapes(found: dict[str, tuple[int, ...] | None], config: dict, where) -> None:
    """Raise ConvertError unless `found` (key -> shape, Hugging Face names) holds exactly the tensors
    of a LLaMA with this config. A shape of None is not known yet (checked when the tensor is read).
    `where(key)` names the file a key came from, for the message."""
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
