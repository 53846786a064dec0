"""The attention op as the model uses it: each fused kernel the policy can choose (run in Pallas' interpreter
on the CPU) against the XLA reference inside a whole train step on packed rows, values and gradients, on
one device and sharded; remat keeps the kernels' residuals; and a packed row trains like its documents
run one at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model, ops, train
from llama_jax.config import LlamaConfig
from llama_jax.ops import Kernels
from llama_jax.sharding import make_mesh, param_shardings, place_batch

# seq 128: Splash's lane width; head_dim 64 (the flash kernel's smallest); 4 query heads over 2 kv heads.
CFG = LlamaConfig(vocab_size=128, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=128,
                  param_dtype="float32", compute_dtype="float32")
LENGTHS = [[40, 60, 1, 27], [70, 58]]  # documents of each packed row: a 1-token one, one across a block edge
FLASH = Kernels(masked_attention="pallas", interpret=True)
SPLASH = Kernels(attention="splash", masked_attention="splash", interpret=True)


def _packed(lengths, seed=0):
    rng = np.random.default_rng(seed)
    s = sum(lengths[0])
    tokens = rng.integers(0, CFG.vocab_size, (len(lengths), s + 1)).astype(np.int32)
    segments = np.stack([np.repeat(np.arange(1, len(row) + 1), row) for row in lengths]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in lengths]).astype(np.int32)
    # the target of a document's last token is the next document's first (or past the row): not counted
    mask = np.ones((len(lengths), s), np.int32)
    for r, row in enumerate(lengths):
        mask[r, np.cumsum(row) - 1] = 0
    return dict(tokens=tokens, segment_ids=segments, positions=positions, loss_mask=mask)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


def _loss_and_grads(params, batch, kernels, remat="save_matmuls"):
    f = jax.jit(jax.value_and_grad(lambda p, b: train.loss_fn(p, b, CFG, kernels=kernels, remat=remat)))
    return f(params, {k: jnp.asarray(v) for k, v in batch.items()})


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kernels", [FLASH, SPLASH], ids=["pallas-flash", "splash"])
def test_packed_train_step_through_each_kernel_equals_xla(params, kernels):
    batch = _packed(LENGTHS)
    ref_loss, ref_grads = _loss_and_grads(params, batch, Kernels.xla())
    loss, grads = _loss_and_grads(params, batch, kernels)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5
    # the kernel really ran: its pallas_call is in the program, and no [S, S] score tensor is
    hlo = jax.jit(lambda p, b: train.loss_fn(p, b, CFG, kernels=kernels)).lower(
        params, {k: jnp.asarray(v) for k, v in batch.items()}).as_text()
    s = sum(LENGTHS[0])
    assert f"{s},{s}]" not in hlo.replace(" ", "") or kernels is SPLASH  # Splash's interpreter holds its mask


def test_packed_row_trains_like_its_documents_one_at_a_time(params):
    """The loss summed over a packed row equals the losses of its documents, each run alone from position 0
    (float32), through the fused kernel."""
    batch = _packed(LENGTHS[:1])
    total, count = jax.jit(lambda p, b: train.loss_sums(p, b, CFG, kernels=FLASH))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})
    alone_total, alone_count, start = 0.0, 0, 0
    for n in LENGTHS[0]:
        doc = batch["tokens"][:, start:start + n]
        if n > 1:  # a document's loss: each token predicts the next within it
            t, c = train.loss_sums(params, {"tokens": jnp.asarray(doc)}, CFG)
            alone_total, alone_count = alone_total + float(t), alone_count + int(c)
        start += n
    assert int(count) == alone_count
    assert abs(float(total) - alone_total) < 1e-4 * alone_count


def test_sharded_packed_step_equals_unsharded(params):
    """Under a mesh the Pallas kernel runs on each device's rows and heads (shard_map); gradients equal the
    single-device XLA step's."""
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    batch = _packed(LENGTHS)
    ref_loss, ref_grads = _loss_and_grads(params, batch, Kernels.xla())
    step = jax.jit(jax.value_and_grad(lambda p, b: train.loss_fn(p, b, CFG, kernels=FLASH, remat="save_matmuls")))
    with jax.set_mesh(mesh):
        loss, grads = step(jax.device_put(params, param_shardings(CFG, mesh)), place_batch(batch, mesh))
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5


@pytest.mark.parametrize("kernels,name", [(FLASH, "flash_attention_fwd"), (SPLASH, "splash_mha_fwd")])
def test_save_matmuls_keeps_the_kernels_residuals(params, kernels, name):
    """With remat save_matmuls the backward pass reuses the attention kernel's forward results: its forward
    runs once per layer, as without remat; with full remat it runs again."""
    batch = {k: jnp.asarray(v) for k, v in _packed(LENGTHS[:1]).items()}

    def forward_kernels(remat):
        f = jax.grad(lambda p: train.loss_fn(p, batch, CFG, kernels=kernels, remat=remat))
        return str(jax.make_jaxpr(f)(params)).count(name)

    assert forward_kernels("save_matmuls") == forward_kernels("none") >= 1
    assert forward_kernels("full") > forward_kernels("save_matmuls")


def test_auto_policy_names_a_kernel_for_every_attention():
    """What Kernels.auto chooses from the devices it is given (no global device state)."""
    fake = lambda platform: dataclasses.make_dataclass("D", [("platform", str)])(platform)  # noqa: E731
    assert Kernels.auto(devices=[fake("cpu")] * 2) == Kernels()
    tpu = Kernels.auto(devices=[fake("tpu")] * 4)
    assert (tpu.attention, tpu.masked_attention) == ("splash", "splash")
    with pytest.raises(ValueError, match="masked_attention"):
        Kernels(masked_attention="cudnn")


def test_unpacked_rows_keep_the_xla_reference_off_the_fused_path(params):
    """Without segments a causal call goes to Kernels.attention; on the CPU's policy that is XLA, and a
    packed-rows policy leaves it alone: both give the reference's logits."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 128)), jnp.int32)
    ref = model.forward(params, tokens, CFG)
    np.testing.assert_allclose(model.forward(params, tokens, CFG, FLASH), ref, atol=1e-5)
    np.testing.assert_allclose(ops.attention(FLASH, *(jnp.ones((1, 16, 4, 64)),) * 3),
                               ops.attention(Kernels.xla(), *(jnp.ones((1, 16, 4, 64)),) * 3), atol=1e-6)


def test_left_padded_prefill_through_the_flash_kernel_equals_xla(params):
    """A prefill of left-padded prompts into an empty cache runs the flash kernel (each row's keys from its
    first real token): the last real token's logits and every real slot of the cache equal XLA's."""
    from llama_jax.generate import pad_left, prefill

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (64, 17, 1, 40)]
    tokens, mask = pad_left(prompts)  # [4, 64]: left-padded to the bucket
    out = {}
    for name, kernels in (("xla", Kernels.xla()), ("flash", FLASH)):
        cache = model.KVCache.zeros(CFG, len(prompts), 128)
        hlo = str(jax.make_jaxpr(prefill, static_argnums=(4, 5))(params, jnp.asarray(tokens), jnp.asarray(mask),
                                                                   cache, CFG, kernels))
        logits, cache, _ = prefill(params, jnp.asarray(tokens), jnp.asarray(mask), cache, CFG, kernels)
        out[name] = (np.asarray(logits), np.asarray(cache.k), np.asarray(cache.v), hlo)
    np.testing.assert_allclose(out["flash"][0], out["xla"][0], atol=1e-5)
    real = np.asarray(mask)  # slots 0..63 hold the prompts; padding slots are never read
    for i in (1, 2):
        np.testing.assert_allclose(out["flash"][i][:, :, :64][:, real], out["xla"][i][:, :, :64][:, real], atol=1e-5)
    assert "flash_attention_fwd" in out["flash"][3] and "flash_attention_fwd" not in out["xla"][3]
