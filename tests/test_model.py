"""The foundation: configs, parameter counts, and logits equal to Hugging Face transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llama_jax as lj
from llama_jax.config import LlamaConfig, from_hf_config
from hf_reference import hf_logits, hf_model

CASES = {
    "mha": dict(),
    "gqa": dict(heads=8, kv_heads=2),
    "tied": dict(tied=True, kv_heads=2),
    "theta100k": dict(theta=100000.0, heads=4, kv_heads=1),
    "llama3_scaling": dict(llama3=True, theta=500000.0, heads=8, kv_heads=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    """Save a random transformers model, load it through lj.load, compare float32 logits."""
    ref = hf_model(seed=1, **CASES[case])
    ref.save_pretrained(tmp_path)
    model = lj.load(tmp_path)
    assert model.config.tie_embeddings == ref.config.tie_word_embeddings
    assert ("lm_head" in model.params) == (not ref.config.tie_word_embeddings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, ref.config.vocab_size, size=(3, 40)).astype(np.int32)  # batch 3, seq 40
    cfg = model.config.replace(compute_dtype="float32")
    ours = np.asarray(lj.forward(model.params, jnp.asarray(tokens), cfg))
    theirs = hf_logits(ref, tokens)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_llama3_scaling_changes_logits(tmp_path):
    """The llama3 frequency scaling is actually applied: positions past the original context differ."""
    ref = hf_model(seed=2, **CASES["llama3_scaling"])
    ref.save_pretrained(tmp_path)
    model = lj.load(tmp_path)
    cfg = model.config.replace(compute_dtype="float32")
    plain = cfg.replace(rope_scaling=None)
    tokens = jnp.asarray(np.arange(100)[None] % 100, jnp.int32)
    a = lj.forward(model.params, tokens, cfg)
    b = lj.forward(model.params, tokens, plain)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


PARAM_COUNTS = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name):
    assert lj.param_count(lj.PRESETS[name]) == PARAM_COUNTS[name]


RELEASED = {  # the releases' params.json / config.json: dim, layers, heads, kv heads, ffn, norm eps, context
    "llama-7b": (4096, 32, 32, 32, 11008, 1e-6, 2048),
    "llama-13b": (5120, 40, 40, 40, 13824, 1e-6, 2048),
    "llama-33b": (6656, 60, 52, 52, 17920, 1e-6, 2048),
    "llama-65b": (8192, 80, 64, 64, 22016, 1e-5, 2048),
    "llama2-7b": (4096, 32, 32, 32, 11008, 1e-5, 4096),
    "llama2-13b": (5120, 40, 40, 40, 13824, 1e-5, 4096),
    "llama2-70b": (8192, 80, 64, 8, 28672, 1e-5, 4096),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_are_released_values(name):
    c = lj.PRESETS[name]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.norm_eps, c.max_seq_len) == RELEASED[name]
    assert c.vocab_size == 32000 and c.head_dim == 128 and c.rope_theta == 10000.0 and not c.tie_embeddings


@pytest.mark.parametrize("params_json,preset", [
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}, "llama-7b"),
    ({"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, "llama-65b"),
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
      "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, "llama2-70b"),
])
def test_from_params_json(params_json, preset, tmp_path):
    """Meta's params.json (as released) gives the preset's shapes; vocab comes from the tokenizer."""
    (tmp_path / "params.json").write_text(json.dumps(params_json))
    cfg = lj.from_params_json(tmp_path / "params.json", vocab_size=32000)
    want = lj.PRESETS[preset]
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta"):
        assert getattr(cfg, field) == getattr(want, field), field


# meta-llama/Llama-3.1-8B's config.json, as released (the fields a LlamaConfig reads).
LLAMA31_8B_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}


def test_llama31_8b_preset_is_the_released_config():
    """The Llama-3-8B shape of the decode benchmark (8 kv heads, 128256 tokens, llama3 rope scaling) is the
    release's config.json read by from_hf_config, and transformers counts the same 8.03B parameters."""
    assert from_hf_config(LLAMA31_8B_CONFIG_JSON) == lj.PRESETS["llama3.1-8b"]
    hf = transformers.LlamaConfig(**{k: v for k, v in LLAMA31_8B_CONFIG_JSON.items() if k != "architectures"})
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.LlamaForCausalLM(hf).parameters())
    assert lj.param_count(lj.PRESETS["llama3.1-8b"]) == n == 8_030_261_248


def test_from_hf_config_reads_transformers_config():
    ref = hf_model(heads=8, kv_heads=2, theta=100000.0, tied=True)
    cfg = from_hf_config(ref.config.to_dict())
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (8, 2, 100000.0, True)


@pytest.mark.parametrize("changes,words", [
    (dict(dim=100, n_heads=3), ["dim=100", "n_heads=3"]),
    (dict(n_heads=8, n_kv_heads=3), ["n_heads=8", "n_kv_heads=3"]),
    (dict(n_layers=0), ["n_layers", "0"]),
    (dict(compute_dtype="float8"), ["compute_dtype", "float8"]),
])
def test_impossible_config_names_the_field(changes, words):
    base = dict(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=8)
    with pytest.raises(ValueError) as e:
        LlamaConfig(**{**base, **changes})
    for w in words:
        assert w in str(e.value)


def test_bfloat16_forward_close_to_float32():
    cfg32 = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg32, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg32.vocab_size)
    ref = lj.forward(params, tokens, cfg32)
    cfg16 = cfg32.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = lj.forward(params16, tokens, cfg16)
    assert out.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert err <= 0.05 * scale, (err, scale)  # bf16 keeps ~3 significant digits
    assert float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))) > 0.9


def test_param_count_allocates_nothing():
    """The 70B count is computed abstractly: it returns at once on a 24 GB machine."""
    assert lj.abstract_params(lj.PRESETS["llama2-70b"])["layers"]["mlp"]["gate"].shape == (80, 8192, 28672)
