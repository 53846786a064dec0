"""Meta checkpoints (params.json + consolidated.NN.pth) -> `llama-jax convert meta` -> lj.load ->
forward, against transformers running the same weights.

The Meta folders are built here from random transformers models the way Meta's release lays them
out: q/k rows in the interleaved rotary order, and each weight cut for model parallelism as
fairscale's layers cut it (ColumnParallelLinear: output rows, dim 0; RowParallelLinear: input
columns, dim 1; ParallelEmbedding: embedding columns, dim 1; norms whole in every shard)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from conftest import LLAMA2_TOKENIZER
from hf_reference import hf_logits, hf_model
from llama_jax.cli import main

DIM, MULTIPLE_OF = 64, 32
FFN = 192  # Meta's rule for dim 64: 32 * ceil(int(2 * 4 * 64 / 3) / 32)

# Meta name -> (transformers name, fairscale split dim: 0 column-parallel, 1 row-parallel/embedding, None whole)
GLOBAL = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
          "output.weight": ("lm_head.weight", 0)}
LAYER = {"attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
         "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
         "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
         "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
         "attention_norm.weight": ("input_layernorm.weight", None), "ffn_norm.weight": ("post_attention_layernorm.weight", None)}

ATTENTION = {"mha": dict(heads=4, kv_heads=4), "gqa": dict(heads=8, kv_heads=4)}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split q/k rows (pair i with i + head_dim/2) back to Meta's interleaved
    pairs (2i, 2i + 1): the inverse of the permutation transformers' conversion script applies."""
    out, d_in = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


def reference_model(dtype: torch.dtype, seed=0, vocab=128, **attn):
    """A random transformers model whose float32 weights are exactly representable in `dtype`."""
    model = hf_model(seed=seed, vocab=vocab, dim=DIM, layers=2, ffn=FFN, **attn)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def write_meta(model, folder, n_shards: int, dtype: torch.dtype, vocab_size=None, rope_freqs=True):
    """Save `model` as Meta's consolidated.NN.pth shards + params.json."""
    cfg = model.config
    sd = model.state_dict()
    full = {}
    for meta, (hf, dim) in GLOBAL.items():
        full[meta] = (sd[hf], dim)
    for i in range(cfg.num_hidden_layers):
        for meta, (hf, dim) in LAYER.items():
            w = sd[f"model.layers.{i}.{hf}"]
            if meta == "attention.wq.weight":
                w = to_interleaved(w, cfg.num_attention_heads)
            elif meta == "attention.wk.weight":
                w = to_interleaved(w, cfg.num_key_value_heads)
            full[f"layers.{i}.{meta}"] = (w, dim)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for s in range(n_shards):
        shard = {}
        for name, (w, dim) in full.items():
            piece = w if dim is None else torch.chunk(w, n_shards, dim=dim)[s]
            shard[name] = piece.to(dtype).clone()  # clone: a view would save the whole tensor's storage
        if rope_freqs:  # LLaMA-1 shards carry the rotary frequencies; converters ignore them
            shard["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": cfg.hidden_size, "multiple_of": MULTIPLE_OF, "n_heads": cfg.num_attention_heads,
              "n_layers": cfg.num_hidden_layers, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size if vocab_size is None else vocab_size}
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        params["n_kv_heads"] = cfg.num_key_value_heads
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def tokens_for(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 24)).astype(np.int32)  # batch 2, seq 24


def our_logits(path, tokens):
    model = lj.load(path)
    cfg = model.config.replace(compute_dtype="float32")
    return np.asarray(lj.forward(model.params, jnp.asarray(tokens), cfg)), model


@pytest.mark.parametrize("attn", sorted(ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_convert_load_matches_transformers(n_shards, dtype, attn, tmp_path):
    ref = reference_model(dtype, seed=n_shards, **ATTENTION[attn])
    src = write_meta(ref, tmp_path / "meta", n_shards, dtype)
    out = tmp_path / "ckpt"
    assert main(["convert", "meta", str(src), str(out), "--dtype", "float32"]) == 0
    tokens = tokens_for(128)
    ours, model = our_logits(out, tokens)
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.ffn_dim) == (
        ref.config.num_attention_heads, ref.config.num_key_value_heads, FFN)
    theirs = hf_logits(ref, tokens)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_meta_folder_loads_directly(tmp_path):
    """lj.load reads a Meta folder in memory too (no Orbax checkpoint)."""
    ref = reference_model(torch.bfloat16, seed=4, **ATTENTION["gqa"])
    src = write_meta(ref, tmp_path / "meta", 2, torch.bfloat16)
    tokens = tokens_for(128)
    ours, model = our_logits(src, tokens)
    assert model.params["embed"].dtype == jnp.float32
    assert np.max(np.abs(ours - hf_logits(ref, tokens))) <= 1e-4


def test_meta_vocab_from_tokenizer_and_bfloat16_storage(tmp_path):
    """params.json vocab_size -1 (as LLaMA 1/2 ship it): the vocabulary comes from tokenizer.model,
    which the checkpoint carries; the default bfloat16 storage holds exactly the bfloat16 weights."""
    import sentencepiece as spm

    ref = reference_model(torch.bfloat16, seed=5, vocab=32000, heads=4, kv_heads=4)
    src = write_meta(ref, tmp_path / "meta", 2, torch.bfloat16, vocab_size=-1)
    shutil.copy(LLAMA2_TOKENIZER, src / "tokenizer.model")
    out = tmp_path / "ckpt"
    assert main(["convert", "meta", str(src), str(out)]) == 0
    model = lj.load(out)
    assert model.config.vocab_size == 32000 and model.params["embed"].dtype == jnp.bfloat16
    hf_embed = ref.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(np.asarray(model.params["embed"], np.float32), hf_embed)
    text = "The quick brown fox jumps over the lazy dog."
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    assert model.tokenizer.encode(text, bos=False) == sp.encode(text)
    tokens = tokens_for(32000, seed=1)
    ours, _ = our_logits(out, tokens)  # bfloat16 params, float32 compute
    assert np.max(np.abs(ours - hf_logits(ref, tokens))) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the key, expected versus found; exit code 2; nothing left.


@pytest.fixture
def meta_src(tmp_path):
    def make(n_shards=2):
        ref = reference_model(torch.float16, seed=3, heads=4, kv_heads=4)
        return write_meta(ref, tmp_path / "meta", n_shards, torch.float16)
    return make


def terminal_lines(stderr: str) -> list[str]:
    """What a terminal shows: the progress bar redraws its line with carriage returns and clears it."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def convert_fails(src, out, capsys) -> str:
    """Run `llama-jax convert meta`, expect exit code 2, return the one error line."""
    code = main(["convert", "meta", str(src), str(out)])
    err = terminal_lines(capsys.readouterr().err)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("llama-jax convert: error: "), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "an output folder was left behind"
    return err[0]


def edit_shard(path, change):
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def test_missing_shard(meta_src, tmp_path, capsys):
    src = meta_src(4)
    (src / "consolidated.01.pth").unlink()
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.01.pth: missing shard" in msg and "expected 4 shards" in msg and "00, 02, 03" in msg


def test_shard_count_does_not_fit(meta_src, tmp_path, capsys):
    src = meta_src(2)
    (src / "consolidated.01.pth").unlink()  # the last shard gone: one shard holding half of each split weight
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.00.pth: key 'tok_embeddings.weight' has shape [128, 32], expected [128, 64]" in msg


def test_shape_mismatch(meta_src, tmp_path, capsys):
    src = meta_src(2)
    edit_shard(src / "consolidated.01.pth",
               lambda sd: sd.__setitem__("layers.1.attention.wk.weight", torch.zeros(16, 64, dtype=torch.float16)))
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.01.pth: key 'layers.1.attention.wk.weight' has shape [16, 64], expected [32, 64]" in msg


def test_unknown_key(meta_src, tmp_path, capsys):
    src = meta_src(1)
    edit_shard(src / "consolidated.00.pth",
               lambda sd: sd.__setitem__("layers.0.attention.wq.bias", torch.zeros(64, dtype=torch.float16)))
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.00.pth: unknown key 'layers.0.attention.wq.bias'" in msg


def test_missing_key(meta_src, tmp_path, capsys):
    src = meta_src(2)
    edit_shard(src / "consolidated.01.pth", lambda sd: sd.pop("layers.1.feed_forward.w2.weight"))
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.01.pth: missing key 'layers.1.feed_forward.w2.weight'" in msg


def test_too_many_layers_is_an_unknown_key(meta_src, tmp_path, capsys):
    src = meta_src(1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(dict(params, n_layers=1)))
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.00.pth: unknown key 'layers.1." in msg and "1 layers" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values(bad, meta_src, tmp_path, capsys):
    src = meta_src(1)

    def poison(sd):
        sd["layers.1.feed_forward.w3.weight"][5, 7] = bad
    edit_shard(src / "consolidated.00.pth", poison)
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.00.pth: key 'layers.1.feed_forward.w3.weight' has 1 NaN/Inf values" in msg
    assert "expected finite values" in msg


def test_truncated_shard(meta_src, tmp_path, capsys):
    src = meta_src(2)
    path = src / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "consolidated.01.pth: unreadable .pth file, truncated or corrupt" in msg


def test_no_params_json(meta_src, tmp_path, capsys):
    src = meta_src(1)
    (src / "params.json").unlink()
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "no params.json" in msg


def test_vocab_minus_one_without_tokenizer(meta_src, tmp_path, capsys):
    src = meta_src(1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(dict(params, vocab_size=-1)))
    msg = convert_fails(src, tmp_path / "out", capsys)
    assert "params.json: vocab_size is -1 and there is no tokenizer.model" in msg
