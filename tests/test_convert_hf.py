"""Hugging Face folders -> `llama-jax convert hf` -> lj.load -> `llama-jax export hf` -> transformers,
bad input, a conversion killed midway, and loading a checkpoint onto an 8-device mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from conftest import REPO
from hf_reference import hf_logits, hf_model
from llama_jax.cli import main
from llama_jax.sharding import make_mesh, param_shardings

CASES = {"gqa": dict(heads=8, kv_heads=2), "tied": dict(tied=True, kv_heads=2)}


def terminal_lines(stderr: str) -> list[str]:
    """What a terminal shows: the progress bar redraws its line with carriage returns and clears it."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def nothing_left(out) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def tokens_for(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 24)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_convert_load_export_roundtrip(case, tmp_path):
    from transformers import LlamaForCausalLM

    ref = hf_model(seed=7, **CASES[case])
    ref.save_pretrained(tmp_path / "hf")
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert main(["convert", "hf", str(tmp_path / "hf"), str(ckpt), "--dtype", "float32"]) == 0
    tokens = tokens_for(ref.config.vocab_size)
    theirs = hf_logits(ref, tokens)

    model = lj.load(ckpt)
    assert ("lm_head" in model.params) == (not ref.config.tie_word_embeddings)
    ours = np.asarray(lj.forward(model.params, jnp.asarray(tokens), model.config.replace(compute_dtype="float32")))
    assert np.max(np.abs(ours - theirs)) <= 1e-4

    # A shard limit of 20 kB forces several safetensors files and the index.
    assert main(["export", "hf", str(ckpt), str(exported), "--max-shard-gb", "0.00002"]) == 0
    assert (exported / "model.safetensors.index.json").is_file()
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1
    back = LlamaForCausalLM.from_pretrained(exported).float().eval()
    assert back.config.tie_word_embeddings == ref.config.tie_word_embeddings
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert np.max(np.abs(hf_logits(back, tokens) - theirs)) <= 1e-4


def test_bfloat16_checkpoint_exports_bfloat16(tmp_path):
    """The default dtype stores bfloat16; the export is a single bfloat16 model.safetensors equal to the
    original weights rounded to bfloat16 by torch."""
    from transformers import LlamaForCausalLM

    ref = hf_model(seed=8, heads=4, kv_heads=4)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert lj.load(tmp_path / "ckpt").params["layers"]["mlp"]["gate"].dtype == jnp.bfloat16
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    back = LlamaForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.bfloat16)
    for name, value in ref.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[name], value.to(torch.bfloat16)), name


def test_load_onto_8_device_mesh_equals_unsharded(tmp_path):
    assert len(jax.devices()) == 8
    ref = hf_model(seed=9, heads=8, kv_heads=4, vocab=256, ffn=128)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    mesh = make_mesh(fsdp=2, tensor=4)
    sharded = lj.load(tmp_path / "ckpt", mesh=mesh)
    whole = lj.load(tmp_path / "ckpt")
    expected = param_shardings(sharded.config, mesh)
    leaves = jax.tree.leaves_with_path(sharded.params)
    assert len(leaves) == len(jax.tree.leaves(whole.params))
    split = 0
    for path, leaf in leaves:
        want = expected
        for k in path:
            want = want[k.key]
        assert leaf.sharding == want, path
        other = whole.params
        for k in path:
            other = other[k.key]
        assert np.array_equal(np.asarray(leaf), np.asarray(other)), path
        # Each device holds only its own block, and that block is the right slice of the whole.
        for shard in leaf.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), np.asarray(other)[shard.index])
        split += leaf.addressable_shards[0].data.size < leaf.size
    assert split >= 8  # the matrices are really split, not replicated
    sd = ref.state_dict()
    q0 = sd["model.layers.0.self_attn.q_proj.weight"].numpy().T.reshape(64, 8, 8)  # [embed, heads, head_dim]
    assert np.array_equal(np.asarray(sharded.params["layers"]["attn"]["q"][0]), q0)


def test_load_converts_dtype(tmp_path):
    ref = hf_model(seed=10)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    model = lj.load(tmp_path / "ckpt", dtype="float32")
    assert model.config.param_dtype == "float32" and model.params["embed"].dtype == jnp.float32
    want = ref.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    assert np.array_equal(np.asarray(model.params["embed"]), want)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def hf_src(tmp_path):
    ref = hf_model(seed=11)
    ref.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def fails(argv, out, capsys) -> str:
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    code = main(argv)
    err = terminal_lines(capsys.readouterr().err)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"llama-jax {argv[0]}: error: "), err
    return err[0]


def save_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_out_dir_already_holds_a_checkpoint(hf_src, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", "hf", str(hf_src), str(out)]) == 0
    before = (out / "llama_jax.json").stat().st_mtime_ns
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert f"{out}: already holds a checkpoint" in msg and "--overwrite" in msg
    assert (out / "llama_jax.json").stat().st_mtime_ns == before  # untouched
    assert main(["convert", "hf", str(hf_src), str(out), "--overwrite", "--dtype", "float32"]) == 0
    assert lj.load(out).params["embed"].dtype == jnp.float32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_dir_not_empty(hf_src, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    msg = fails(["convert", "hf", str(hf_src), str(out), "--overwrite"], out, capsys)
    assert f"{out}: exists and is not empty" in msg
    assert (out / "todo.txt").read_text() == "mine"


def test_missing_key(hf_src, tmp_path, capsys):
    save_tensors(hf_src, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    out = tmp_path / "out" / "ckpt"  # its parent does not exist either: nothing may be created
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert "model.safetensors: missing key 'model.layers.1.mlp.down_proj.weight' (expected shape [64, 96])" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_key(hf_src, tmp_path, capsys):
    save_tensors(hf_src, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    out = tmp_path / "ckpt"
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert "model.safetensors: unknown key 'model.layers.0.self_attn.q_proj.bias'" in msg
    assert nothing_left(out)


def test_shape_mismatch(hf_src, tmp_path, capsys):
    config = json.loads((hf_src / "config.json").read_text())
    (hf_src / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    out = tmp_path / "ckpt"
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert "model.safetensors: key 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], expected [128, 64]" in msg
    assert nothing_left(out)


def test_infinite_value(hf_src, tmp_path, capsys):
    def poison(sd):
        sd["lm_head.weight"][3, 4] = float("-inf")
    save_tensors(hf_src, poison)
    out = tmp_path / "ckpt"
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert "model.safetensors: key 'lm_head.weight' has 1 NaN/Inf values" in msg
    assert nothing_left(out)


def test_missing_safetensors_shard(tmp_path, capsys):
    ref = hf_model(seed=12)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    files = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(files) > 1
    files[1].unlink()
    out = tmp_path / "ckpt"
    msg = fails(["convert", "hf", str(tmp_path / "hf"), str(out)], out, capsys)
    assert f"{files[1]}: missing shard (listed in model.safetensors.index.json)" in msg
    assert nothing_left(out)


def test_truncated_safetensors(hf_src, tmp_path, capsys):
    path = hf_src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    out = tmp_path / "ckpt"
    msg = fails(["convert", "hf", str(hf_src), str(out)], out, capsys)
    assert f"{path}: unreadable safetensors file, truncated or corrupt" in msg
    assert nothing_left(out)


def test_export_needs_a_checkpoint(hf_src, tmp_path, capsys):
    out = tmp_path / "exported"
    msg = fails(["export", "hf", str(hf_src), str(out)], out, capsys)
    assert f"{hf_src}: not a complete llama-jax checkpoint" in msg
    assert nothing_left(out)


def test_load_rejects_other_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model"):
        lj.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        lj.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Killed midway


def big_hf_folder(folder):
    """A random 34M-parameter LLaMA (float32 safetensors, 134 MB): a few seconds to convert."""
    from safetensors.numpy import save_file

    d, f, v, layers = 512, 2048, 1024, 8
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=v, hidden_size=d,
                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, intermediate_size=f,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    folder.mkdir()
    save_file({k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sigkill_midway_leaves_nothing_loadable(tmp_path):
    src = big_hf_folder(tmp_path / "hf")
    out = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", "convert", "hf", str(src), str(out),
                             "--dtype", "float32"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".ckpt.partial-{proc.pid}"
    try:
        deadline = time.time() + 120
        # Kill once the first stacked leaf has its first layer on disk: the conversion is underway.
        while not (partial / "params" / "layers.attn.q" / "c" / "0").exists():
            assert proc.poll() is None, "the conversion ended before it could be killed"
            assert time.time() < deadline, "the conversion never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        lj.load(out)
    assert partial.is_dir()  # what the killed process left: not a checkpoint
    with pytest.raises(ValueError, match="not a model"):
        lj.load(partial)
    # The next conversion removes the dead process's folder and completes.
    assert main(["convert", "hf", str(src), str(out), "--dtype", "float32"]) == 0
    assert not partial.exists()
    model = lj.load(out)
    from safetensors.numpy import load_file
    want = load_file(src / "model.safetensors")["model.layers.7.mlp.down_proj.weight"].T
    assert np.array_equal(np.asarray(model.params["layers"]["mlp"]["down"][7]), want)
