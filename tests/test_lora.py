"""LoRA and QLoRA (llama_jax/lora.py, ops.project on LoraWeight leaves, make_train_step(lora=)): the
adapted model starts as the base, merging is base + (alpha / r) A B, a quantized base computes what its
dequantized weights compute (values and gradients), the optimizer sees the adapters only, sharded
training equals unsharded, and `finetune --lora-rank` lowers the loss and resumes exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import lora as L
from llama_jax import params as table
from llama_jax import sharding, train
from llama_jax.model import apply
from llama_jax.quantize import dequantize_params, quantize_params
from conftest import STORIES_GGUF

CFG = lj.PRESETS["tiny"].replace(param_dtype="float32", compute_dtype="float32")
LORA = L.LoraConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)), jnp.int32)


@pytest.fixture(scope="module")
def base():
    return lj.init_params(CFG, jax.random.key(0))


def _random_adapters(seed=1, lora=LORA):
    """Adapters with a and b both random (b = 0 would hide every error in b's layout)."""
    adapters = L.init_adapters(CFG, lora, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_fresh_adapters_give_the_base_models_logits_exactly(base):
    adapters = L.init_adapters(CFG, LORA, jax.random.key(1))
    for name in LORA.targets:  # b starts at zero, a does not
        ab = table.get(adapters, L.TARGETS[name].path)
        assert not jnp.any(ab["b"]) and jnp.any(ab["a"])
    np.testing.assert_array_equal(apply(L.attach(base, adapters, LORA), TOKENS, CFG)[0], apply(base, TOKENS, CFG)[0])


def test_merge_is_base_plus_scaled_a_times_b(base):
    adapters = _random_adapters()
    merged = L.merge(base, adapters, LORA)
    for name in LORA.targets:
        p = L.TARGETS[name]
        w, ab = np.asarray(table.get(base, p.path)), table.get(adapters, p.path)
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        n_layers, r = a.shape[0], a.shape[-1]
        want = w + LORA.alpha / LORA.rank * np.einsum("lir,lro->lio", a.reshape(n_layers, -1, r),
                                                      b.reshape(n_layers, r, -1)).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(table.get(merged, p.path)), want, rtol=1e-5, atol=1e-6)
    # ... and the attached (unmerged) model computes the same function.
    np.testing.assert_allclose(apply(L.attach(base, adapters, LORA), TOKENS, CFG)[0], apply(merged, TOKENS, CFG)[0],
                               rtol=1e-4, atol=1e-4)


# NormalFloat4's code book as printed in the QLoRA paper (Dettmers et al., 2023, Appendix E).
PAPER_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0])


def test_nf4_decodes_to_the_nearest_code_book_value_times_the_absmax():
    from llama_jax.qarray import quantize

    w = np.asarray(jax.random.normal(jax.random.key(3), (256, 48)), np.float32)
    q = quantize(jnp.asarray(w), 4, 64, codebook="nf4")
    blocks = w.reshape(4, 64, 48)
    absmax = np.abs(blocks).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)  # stored as f16
    want = PAPER_NF4[np.abs(blocks / absmax - PAPER_NF4[:, None, None, None]).argmin(axis=0)] * absmax
    np.testing.assert_allclose(np.asarray(q.dequantize()), want.reshape(256, 48), rtol=1e-6, atol=1e-7)
    assert q.nbytes == 256 * 48 // 2 + 4 * 48 * 2  # 4-bit codes and a float16 absmax per 64


@pytest.mark.parametrize("scheme", [dict(bits=4, codebook="nf4", group=64), dict(bits=4, group=64)])
def test_qlora_equals_dequantize_then_lora_values_and_gradients(base, scheme):
    adapters = _random_adapters()
    quantized = quantize_params(base, CFG, **scheme)
    dense = dequantize_params(quantized)  # the 4-bit weights' float values

    def loss(adapters, params):
        logits = apply(L.attach(params, adapters, LORA), TOKENS, CFG)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    (q_loss, q_grad), (d_loss, d_grad) = (jax.value_and_grad(loss)(adapters, p) for p in (quantized, dense))
    np.testing.assert_allclose(q_loss, d_loss, rtol=1e-5)
    for g_q, g_d in zip(jax.tree.leaves(q_grad), jax.tree.leaves(d_grad)):
        np.testing.assert_allclose(g_q, g_d, rtol=1e-3, atol=1e-5)  # float32 sums in another order
    np.testing.assert_allclose(apply(L.attach(quantized, adapters, LORA), TOKENS, CFG)[0],
                               apply(L.attach(dense, adapters, LORA), TOKENS, CFG)[0], rtol=1e-4, atol=1e-4)


def _train(mesh, quantize_bits=None, steps=4):
    base = train.base_for_training(lj.init_params(CFG, jax.random.key(0)), CFG, quantize_bits, mesh)
    opt = train.make_optimizer(lr=1e-2, total_steps=steps, weight_decay=0.0)
    state = train.init_train_state(CFG, opt, jax.random.key(1), mesh, lora=LORA)
    step = train.make_train_step(CFG, opt, mesh, lora=LORA)
    batch = {"tokens": jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 17)), jnp.int32)}
    if mesh is not None:
        batch = sharding.place_batch(batch, mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, base)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_the_optimizer_sees_only_the_adapters_and_sharded_equals_unsharded():
    losses, state = _train(None)
    assert losses[-1] < losses[0]
    trained = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    assert trained == {f"['layers']['{p.path[1]}']['{p.path[2]}']['{ab}']" for p in L.TARGETS.values()
                       for ab in "ab"}
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert n_moments == 2 * n_adapter  # adam's mu and nu of the adapters; nothing for the base
    sharded, sharded_state = _train(sharding.make_mesh(fsdp=4, tensor=2))
    np.testing.assert_allclose(sharded, losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-4)
    spec = sharded_state.params["layers"]["attn"]["q"]["b"].sharding.spec  # b [layers, rank, heads, head_dim]
    assert spec[2] == "tensor"  # the adapter's output side is split like q's heads


ALPACA = [{"instruction": f"Name thing number {i}.", "output": f"Thing {i} is a {w}."}
          for i, w in enumerate(["cat", "dog", "tree", "boat", "lamp", "cup", "bird", "road"])]


def _finetune(tmp_path, out, epochs, *extra):
    from llama_jax import cli

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA))
    return cli.main(["finetune", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(out), "--batch", "8",
                     "--epochs", str(epochs), "--lr", "1e-2", "--lora-rank", "4", "--no-progress", *extra])


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_finetune_lowers_the_loss_keeps_only_adapters_and_resumes_exactly(tmp_path, capsys):
    from llama_jax.checkpoints import TrainCheckpointer

    whole = tmp_path / "whole"
    assert _finetune(tmp_path, whole, 6) == 0
    losses = _losses(whole)
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    ckpt = TrainCheckpointer(whole, read_only=True)
    meta = ckpt.read_meta()
    assert meta["lora"]["rank"] == 4 and meta["base"] == str(STORIES_GGUF) and meta["quantize_base"] is None
    stored = (whole / "6" / "state").rglob("*")
    assert not any("embed" in p.name for p in stored)  # the base is not in the run, only the adapters

    # A run that lost everything after step 3 (its step-6 checkpoint removed, as a crash before that
    # save would leave it) resumes there and continues with the same losses.
    part = tmp_path / "part"
    assert _finetune(tmp_path, part, 6, "--save-every", "3") == 0
    assert TrainCheckpointer(part, read_only=True).all_steps() == [3, 6]
    shutil.rmtree(part / "6")
    assert _finetune(tmp_path, part, 6, "--save-every", "3") == 0
    assert "resuming from step 3" in capsys.readouterr().err
    assert _losses(part) == losses


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "100"], "LoRA rank 100 does not fit"),
    (["--lora-targets", "q,qkv"], "LoRA targets qkv"),
    (["--quantize-base", "4", "--lora-rank", "0"], "LoRA rank must be a positive integer"),
])
def test_bad_lora_flags_are_one_line(tmp_path, capsys, extra, message):
    assert _finetune(tmp_path, tmp_path / "bad", 1, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "error" in err[-1]


def test_quantize_base_needs_lora(tmp_path, capsys):
    from llama_jax import cli

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA))
    assert cli.main(["finetune", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(tmp_path / "q"),
                     "--quantize-base", "4", "--no-progress"]) == 2
    assert "--quantize-base needs --lora-rank" in capsys.readouterr().err
