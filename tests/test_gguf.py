"""GGUF reading (checkpoints_convert.gguf): config, tensors (dequantized, q/k un-permuted) and the
tokenizer stored in the file, checked against transformers' own GGUF loader and sentencepiece."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from checkpoints_convert.gguf import GGUFReader
from llama_jax.checkpoints import params_from_reader
from llama_jax.config import from_hf_config
from conftest import LLAMA2_TOKENIZER, SMOLLM2_PROMPT, STORIES_GGUF, smollm2_path, smollm2_reference_logits
from hf_reference import hf_from_gguf, hf_model


def ours(path: Path):
    reader = GGUFReader(path)
    cfg = from_hf_config(reader.config, compute_dtype="float32")
    return cfg, params_from_reader(reader, cfg)


def test_stories_config_and_logits_match_transformers():
    ref = hf_from_gguf(STORIES_GGUF)
    cfg, params = ours(STORIES_GGUF)
    hc = ref.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        hc.vocab_size, hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.intermediate_size) == (512, 64, 5, 8, 4, 172)
    assert cfg.tie_embeddings is False and cfg.max_seq_len == 2048
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 64)).astype(np.int32)
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    mine = np.asarray(lj.forward(params, jnp.asarray(tokens), cfg))
    assert np.max(np.abs(mine - theirs)) < 1e-4


def test_smollm2_prompt_logits_match_transformers():
    """Q8_0 embedding, Q4_1 layers, tied head, GQA 9/3, theta 1e5: logits of the prompt in float32."""
    path = smollm2_path()
    cfg, params = ours(path)
    assert cfg.tie_embeddings and "lm_head" not in params
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.vocab_size) == (9, 3, 100000.0, 49152)
    ids = SMOLLM2_PROMPT  # "The capital of France is" (the ids llama.cpp gives)
    theirs = smollm2_reference_logits()  # transformers on the same GGUF
    mine = np.asarray(lj.forward(params, jnp.asarray([ids], jnp.int32), cfg))
    assert np.max(np.abs(mine - theirs)) < 1e-3
    assert int(np.argmax(mine[0, -1])) == 7042  # " Paris"


# ---------------------------------------------------------------------------------------------
# A GGUF written here with the `gguf` package, as llama.cpp's converter writes one: a random
# transformers model (GQA) in every tensor type we read, with LLaMA-2's SentencePiece vocabulary.

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permute: Hugging Face half-split rows -> Meta's interleaved pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, qtype: str) -> None:
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    c = model.config
    proto = pb.ModelProto()
    proto.ParseFromString(LLAMA2_TOKENIZER.read_bytes())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            i, rest = base[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{layer[rest]}"
        else:
            g = names[base]
        if base.endswith("q_proj"):
            a = _interleave(a, c.num_attention_heads)
        elif base.endswith("k_proj"):
            a = _interleave(a, c.num_key_value_heads)
        q = gguf.GGMLQuantizationType[qtype if a.ndim == 2 else "F32"]  # norms stay F32, as llama.cpp keeps them
        data = a if q == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(a, q)
        w.add_tensor(g + ".weight", data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def random_hf():
    # vocab = LLaMA-2's 32000 so the file's tokenizer fits; dims multiples of 32 for block quants.
    return hf_model(seed=3, vocab=32000, dim=64, layers=2, heads=8, kv_heads=2, ffn=96)


@pytest.mark.parametrize("qtype", QTYPES)
def test_written_gguf_matches_transformers(qtype, random_hf, tmp_path):
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, random_hf, qtype)
    reader = GGUFReader(path)
    assert reader.config["num_key_value_heads"] == 2 and reader.config["tie_word_embeddings"] is False
    ref = hf_from_gguf(path)  # transformers dequantizes and un-permutes on its own
    for name, t in ref.state_dict().items():  # tensor by tensor, Hugging Face name and layout
        np.testing.assert_allclose(reader.tensor(name), t.numpy(), rtol=0, atol=1e-6, err_msg=name)
    cfg = from_hf_config(reader.config, compute_dtype="float32")
    params = params_from_reader(reader, cfg)
    tokens = np.random.default_rng(1).integers(0, 32000, size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.max(np.abs(np.asarray(lj.forward(params, jnp.asarray(tokens), cfg)) - theirs)) < 1e-4


def test_written_gguf_sentencepiece_equals_original(random_hf, tmp_path):
    """The SentencePiece model rebuilt from GGUF metadata tokenizes like LLaMA-2's tokenizer.model."""
    import sentencepiece as spm

    from test_tokenizer import TEXTS

    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_hf, "F16")
    out = tmp_path / "tok"
    written = GGUFReader(path).write_tokenizer(out)
    assert {p.name for p in written} == {"tokenizer.model", "tokenizer_config.json"}
    rebuilt = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    original = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.vocab_size()) == (1, 2, 32000)


def test_smollm2_write_tokenizer_loads_in_tokenizers(tmp_path):
    import json

    from tokenizers import Tokenizer

    written = GGUFReader(smollm2_path()).write_tokenizer(tmp_path)
    assert {p.name for p in written} == {"tokenizer.json", "tokenizer_config.json"}
    tk = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tk.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tk.encode("<|im_start|>user").ids[0] == 1  # control tokens stay whole
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False
    assert "<|im_start|>" in config["chat_template"]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming the file.


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("just some text, not a model\n")
    with pytest.raises(ValueError, match=r"notes\.gguf.*not a GGUF file"):
        GGUFReader(bad)


@pytest.mark.parametrize("keep", [64, 6000, 0.6])
def test_truncated_gguf(keep, tmp_path):
    data = STORIES_GGUF.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        reader = GGUFReader(bad)
        for key in reader.keys():
            reader.tensor(key)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        GGUFReader(tmp_path / "nothing.gguf")
