"""Using and exporting LoRA adapters (llama_jax/checkpoints/adapters.py): lj.load of a LoRA run,
generate --adapter, lora merge and export hf --peft, on stories260K in float32.

One real `finetune --lora-rank` run gives the metadata; the adapters checked are random, a and b both
(a fresh run's b is zero, and a few steps leave it small), written into a run of that metadata, so that
every check sees a large adapter."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import cli, train
from llama_jax import params as P
from llama_jax.checkpoints import TrainCheckpointer, adapters, export_params_hf, orbax_io, run_meta
from llama_jax.config import LlamaConfig
from llama_jax.lora import TARGETS, LoraConfig, LoraWeight, abstract_adapters, adapter_shardings
from llama_jax.sharding import make_mesh
from conftest import STORIES_GGUF

RECORDS = [
    {"instruction": "Tell me about the cat.", "input": "", "output": "The cat was happy. It liked to play in the sun."},
    {"instruction": "What did Lily find?", "input": "", "output": "Lily found a big red ball in the park."},
    {"instruction": "Say what the dog did.", "input": "The dog saw a bird.", "output": "The dog ran after the bird."},
    {"instruction": "Who was sad?", "input": "", "output": "The little bird was sad because it lost its mom."},
]
PROMPT = [[1, 403, 407, 261, 378, 285]]  # BOS and a few stories260K tokens


def _write_run(folder, meta, tree, tokenizer):
    """A run folder holding one step whose state's params are `tree`, with `meta` and the tokenizer."""
    state = train.TrainState(params=tree, opt_state=jnp.zeros(()), step=jnp.int32(1), rng=jnp.zeros(2, jnp.uint32),
                             skipped=jnp.int32(0), nonfinite_streak=jnp.int32(0))
    ckpt = TrainCheckpointer(folder, meta=meta, async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.wait()
    ckpt.close()
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(trained LoRA run, run of random adapters with its metadata, the base loaded, its config)."""
    tmp = tmp_path_factory.mktemp("lora")
    data = tmp / "alpaca.json"
    data.write_text(json.dumps(RECORDS * 2))
    trained = tmp / "trained"
    assert cli.main(["finetune", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(trained),
                     "--batch", "8", "--epochs", "1", "--lr", "1e-2", "--compute-dtype", "float32",
                     "--lora-rank", "4", "--lora-targets", "q,k,v,o,gate,up,down", "--no-progress"]) == 0
    meta = run_meta(trained)
    cfg, lora = LlamaConfig.from_dict(meta["config"]), LoraConfig.from_dict(meta["lora"])
    rng = np.random.default_rng(0)
    random = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), jnp.float32),
                          abstract_adapters(cfg, lora))
    base = lj.load(STORIES_GGUF)
    return trained, _write_run(tmp / "random", meta, random, base.tokenizer), base, lora


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    _, run, _, _ = runs
    out = tmp_path_factory.mktemp("merged") / "ckpt"
    assert cli.main(["lora", "merge", str(STORIES_GGUF), str(run), str(out)]) == 0
    return out


def _expected_merge(base: dict, tree: dict, lora: LoraConfig) -> dict:
    """w + (alpha / r) a @ b in numpy, from the base's weights and the adapter arrays."""
    out = jax.tree.map(np.asarray, base)
    for name in lora.targets:
        p = TARGETS[name]
        w, a, b = np.asarray(P.get(base, p.path)), *(np.asarray(P.get(tree, p.path)[k]) for k in "ab")
        layers = w.shape[0]
        ab = np.einsum("lir,lro->lio", a.reshape(layers, -1, lora.rank), b.reshape(layers, lora.rank, -1))
        P.set_(out, p.path, w + lora.alpha / lora.rank * ab.reshape(w.shape))
    return out


def _logits(params, cfg):
    return np.asarray(lj.forward(params, np.array(PROMPT, np.int32), cfg))


def test_load_of_a_lora_run_merges_its_adapters_into_the_base(runs):
    """lj.load of a LoRA run (folder or step folder) is its base with the step's adapters merged; on a
    mesh the adapters are read sharded as lora.adapter_shardings places them."""
    trained, run, base, lora = runs
    for path in (run, trained, trained / "1"):
        tree, _, _ = adapters.read_adapters(path)
        want = _expected_merge(base.params, tree, lora)
        model = lj.load(path)
        assert model.config == base.config and model.tokenizer is not None
        for p, leaf in P.leaves(model.params):
            np.testing.assert_allclose(np.asarray(leaf), P.get(want, p), atol=1e-6, err_msg=".".join(p))
    want = _expected_merge(base.params, adapters.read_adapters(run)[0], lora)
    np.testing.assert_allclose(_logits(lj.load(run).params, base.config), _logits(want, base.config), atol=1e-4)
    assert np.abs(_logits(want, base.config) - _logits(base.params, base.config)).max() > 1.0  # the adapters count

    mesh = make_mesh(fsdp=2, tensor=4)
    tree, _, _ = adapters.read_adapters(run, mesh)
    assert jax.tree.map(lambda x: x.sharding, tree) == adapter_shardings(base.config, lora, mesh)
    on_mesh = lj.load(run, mesh=mesh)
    np.testing.assert_allclose(np.asarray(on_mesh.params["layers"]["attn"]["q"]),
                               np.asarray(lj.load(run).params["layers"]["attn"]["q"]), atol=1e-6)


def test_lora_merge_writes_the_base_plus_the_scaled_product(runs, merged):
    """`lora merge BASE RUN OUT`: a convert checkpoint (config, tokenizer) holding w + (alpha / r) a @ b."""
    _, run, base, lora = runs
    info = orbax_io.read_checkpoint_info(merged)
    assert info["lora"] == lora.to_dict() and orbax_io.has_tokenizer(merged)
    tree, _, _ = adapters.read_adapters(run)
    want = _expected_merge(base.params, tree, lora)
    got = lj.load(merged)
    assert got.config == base.config
    for p, leaf in P.leaves(got.params):
        np.testing.assert_allclose(np.asarray(leaf), P.get(want, p), atol=1e-6, err_msg=".".join(p))


def test_generate_with_an_adapter_equals_generate_on_the_merge(runs, merged, capsys):
    """--adapter runs the adapters unmerged (LoraWeight leaves); greedy tokens equal the merged model's,
    in Python and on the command line (where, without --model, the base is the one the run names)."""
    _, run, base, _ = runs
    attached = adapters.attach_run(base.config, base.params, run)
    assert isinstance(attached["layers"]["attn"]["q"], LoraWeight)
    merged_params = lj.load(merged).params
    ids = lj.generate_tokens(attached, base.config, PROMPT, max_new_tokens=16)
    assert ids == lj.generate_tokens(merged_params, base.config, PROMPT, max_new_tokens=16)
    assert ids != lj.generate_tokens(base.params, base.config, PROMPT, max_new_tokens=16)

    texts = []
    for argv in (["--model", str(STORIES_GGUF), "--adapter", str(run)], ["--adapter", str(run)],
                 ["--model", str(merged)]):
        assert cli.main(["generate", "Once upon a time", "--max-new-tokens", "12", *argv]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].strip()


def test_peft_loads_our_adapters_onto_our_hf_export_of_the_base(runs, tmp_path):
    """export hf --peft: Hugging Face PEFT puts the adapters onto transformers' model of our HF export of
    the base, and its logits are ours (q/k keep HF's head layout, B_hf @ A_hf = (a @ b).T)."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    _, run, base, lora = runs
    hf_base, peft = tmp_path / "hf", tmp_path / "peft"
    export_params_hf(base.config, base.params, None, hf_base, progress=False)
    assert cli.main(["export", "hf", "--peft", str(run), str(peft)]) == 0
    config = json.loads((peft / adapters.PEFT_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == lora.alpha and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensors = load_file(peft / adapters.PEFT_WEIGHTS)
    key = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
    assert tensors[key.format(0, "q", "A")].shape == (4, 64)  # [rank, in]
    assert tensors[key.format(4, "k", "B")].shape == (32, 4)  # [out = kv_heads * head_dim, rank]
    assert tensors[key.format(2, "o", "A")].shape == (4, 64)
    assert len(tensors) == 2 * 7 * base.config.n_layers

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32), peft).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(PROMPT)).logits.numpy()
    ours = _logits(lj.load(run).params, base.config)
    assert np.abs(ours - _logits(base.params, base.config)).max() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_errors_name_the_problem(runs, merged, tmp_path, capsys):
    """One line, exit 2: --adapter on another model, --peft of a run that holds full params or of a
    checkpoint, a LoRA run whose base is gone (lj.load says how to give it)."""
    _, run, base, _ = runs
    meta = run_meta(run)
    other_cfg = base.config.replace(n_layers=2)
    other = tmp_path / "other"
    orbax_io.save_tree(other / "params", lj.init_params(other_cfg, jax.random.key(0)), use_ocdbt=False, use_zarr3=True)
    base.tokenizer.save(other)
    orbax_io.write_checkpoint_info(other, other_cfg, "test")
    full = {k: v for k, v in meta.items() if k not in ("lora", "base", "quantize_base")}
    full_run = _write_run(tmp_path / "full", full, {"w": jnp.zeros(2)}, base.tokenizer)
    gone = _write_run(tmp_path / "gone", dict(meta, base=str(tmp_path / "moved.gguf")),
                      adapters.read_adapters(run)[0], base.tokenizer)

    cases = [
        (["generate", "x", "--model", str(other), "--adapter", str(run)],
         f"{run}: its adapters belong to another model than {other} (n_layers 5 in the run, 2 in {other})"),
        (["export", "hf", "--peft", str(full_run), str(tmp_path / "p1")],
         f"{full_run}: not a LoRA run (it holds full params, not adapters; use it as a model)"),
        (["export", "hf", "--peft", str(merged), str(tmp_path / "p2")], f"{merged}: not a training run"),
        (["generate", "x", "--model", str(gone)], f"{gone}: its base model {tmp_path / 'moved.gguf'} is not there"),
        (["lora", "merge", str(other), str(run), str(tmp_path / "m")], "its adapters belong to another model"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()  # lora merge says what it merges first
        assert err[-1].startswith(f"llama-jax {argv[0]}: error: ") and message in err[-1], (argv, err)
        assert len(err) == 1 or argv[0] == "lora", err
    assert not (tmp_path / "p1").exists() and not (tmp_path / "m").exists()
    with pytest.raises(FileNotFoundError, match=f"--model BASE --adapter {gone}"):
        lj.load(gone)
