"""The train step: its loss against an independent cross-entropy, accumulation against one big batch,
sharded against one device, the optimizer against optax's schedule, the NaN guard, learning on real
text, and Alpaca fine-tuning of the real stories260K model with the loss on responses only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama_jax as lj
from llama_jax import train
from llama_jax.data import Batches, InstructionRows, PackedText, encode_alpaca
from llama_jax.model import apply
from llama_jax.sharding import make_mesh, place_batch
from conftest import STORIES_GGUF

TINY = lj.PRESETS["tiny"]  # float32 params and compute: comparisons at 1e-5

# Jitted once per (config, option) and shape: op-by-op evaluation of a scanned model is slow.
loss = jax.jit(train.loss_fn, static_argnames=("cfg", "remat", "loss_chunk"))
loss_and_grad = jax.jit(jax.value_and_grad(train.loss_fn), static_argnames=("cfg", "remat", "loss_chunk"))


def _packed_batch(rng, cfg, rows=8, seq=32):
    """Rows of random documents packed with segments, restarting positions and a loss mask."""
    docs = [rng.integers(3, cfg.vocab_size, size=rng.integers(4, 30)).tolist() for _ in range(40)]
    return next(Batches(PackedText([[1] + d + [2] for d in docs], seq, seed=1), rows))


def _reference_loss(params, batch, cfg):
    """Cross-entropy written independently: full float32 logits, optax's integer-label cross-entropy."""
    tokens = jnp.asarray(batch["tokens"])
    logits = apply(params, tokens[:, :-1], cfg, positions=batch.get("positions"),
                   segment_ids=batch.get("segment_ids"))[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def test_chunked_loss_matches_reference():
    params = lj.init_params(TINY, jax.random.key(0))
    batch = _packed_batch(np.random.default_rng(0), TINY, rows=4)
    assert 0 < batch["loss_mask"].sum() < batch["loss_mask"].size  # the mask matters
    ref, g_ref = jax.jit(jax.value_and_grad(_reference_loss), static_argnums=2)(params, batch, TINY)
    for chunk in (4, 32):  # 8 chunks of 4 positions; one chunk of the whole sequence
        ours, g_ours = loss_and_grad(params, batch, cfg=TINY, loss_chunk=chunk)
        assert abs(float(ours) - float(ref)) < 1e-5
        for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_auto_chunk_keeps_logits_small():
    chunk = train.auto_loss_chunk(2048, 128256, rows=4)  # Llama-3 vocab, 4 rows a device: 4 GiB whole
    assert 4 * chunk * 128256 <= 1 << 28 and 2048 % chunk == 0 and chunk >= 256
    assert train.auto_loss_chunk(2048, 32000, rows=4) == 2048  # the 7B-width benchmark: 1 GiB, one chunk
    assert train.auto_loss_chunk(64, 512) == 64  # small: one chunk


def test_head_logits_backward_in_the_compute_dtype():
    """head_logits' custom backward (gradient rounded to bf16, bf16 matmuls) against autodiff of the
    same product in float32, from the same bf16 inputs: within bf16 rounding."""
    kh, kw, kg = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 8, 64), jnp.float32).astype(jnp.bfloat16)
    head = (0.1 * jax.random.normal(kw, (64, 96), jnp.float32)).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (2, 8, 96), jnp.float32)
    out, vjp = jax.vjp(train.head_logits, h, head)
    ref_out, ref_vjp = jax.vjp(lambda a, b: jnp.einsum("bcd,dv->bcv", a, b),
                               h.astype(jnp.float32), head.astype(jnp.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)  # the forward stays float32
    for ours, ref in zip(vjp(g), ref_vjp(g)):
        assert ours.dtype == jnp.bfloat16
        err = np.linalg.norm(np.asarray(ours, np.float32) - ref) / np.linalg.norm(ref)
        assert err < 1e-2, err


def test_save_matmuls_keeps_cudnn_attention_outputs():
    """The save_matmuls policy recognises cuDNN's fused-attention forward by its primitive's name: if
    JAX renames it, the backward pass would silently run that kernel twice."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from llama_jax.model import REMAT_POLICIES
    policy = REMAT_POLICIES["save_matmuls"]
    assert policy(cudnn_attention._dot_product_attention_fwd_p_wrapper)
    assert not policy(cudnn_attention._dot_product_attention_bwd_p_wrapper)
    assert not policy(jax.lax.exp_p)


def _updates(cfg, batch, accum, mesh=None, steps=1):
    """Run `steps` SGD(lr=1) steps; the change in params is minus the gradient of each step."""
    opt = optax.sgd(1.0)
    state = train.init_train_state(cfg, opt, jax.random.key(0), mesh)
    before = jax.device_get(state.params)
    step = train.make_train_step(cfg, opt, mesh, accum_steps=accum, loss_chunk=8)
    metrics = []
    for _ in range(steps):
        b = place_batch(batch, mesh) if mesh is not None else batch
        state, m = step(state, b)
        metrics.append(jax.device_get(m))
    return jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(state.params), before), metrics


@pytest.mark.parametrize("accum", [4])
def test_accumulation_equals_one_big_batch(accum):
    batch = _packed_batch(np.random.default_rng(1), TINY, rows=8)
    # Unequal counted targets per row, so a per-micro-batch mean would differ from the batch mean.
    counts = batch["loss_mask"].sum(1)
    assert len(set(counts.tolist())) > 1
    big, m_big = _updates(TINY, batch, 1)
    acc, m_acc = _updates(TINY, batch, accum)
    assert abs(m_big[0]["loss"] - m_acc[0]["loss"]) < 1e-5
    assert abs(m_big[0]["grad_norm"] - m_acc[0]["grad_norm"]) < 1e-5
    assert m_big[0]["tokens"] == m_acc[0]["tokens"] == batch["loss_mask"].sum()
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(acc)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _run_steps(cfg, mesh, steps=3):
    batch = _packed_batch(np.random.default_rng(2), cfg, rows=8)
    opt = train.make_optimizer(lr=1e-2, warmup_steps=1, total_steps=4)
    state = train.init_train_state(cfg, opt, jax.random.key(0), mesh)
    step = train.make_train_step(cfg, opt, mesh, accum_steps=2)
    losses = []
    for _ in range(steps):
        state, m = step(state, place_batch(batch, mesh) if mesh is not None else batch)
        losses.append(float(m["loss"]))
    return losses, state


@functools.lru_cache(maxsize=1)
def _one_device_losses():
    return _run_steps(TINY, None)[0]


@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=8), dict(fsdp=2, tensor=4)])
def test_sharded_step_matches_one_device(mesh_sizes):
    ref = _one_device_losses()
    got, state = _run_steps(TINY, make_mesh(**mesh_sizes))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[-1] < ref[0]  # the steps did something
    # Really sharded: params and Adam's moments split as the rules say.
    q = state.params["layers"]["attn"]["q"]
    assert q.sharding.shard_shape(q.shape) != q.shape
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["layers"]["attn"]["q"].sharding.spec == q.sharding.spec


def test_schedule_is_optax_warmup_cosine():
    lr, warmup, total = 1e-2, 3, 10
    opt = train.make_optimizer(lr=lr, warmup_steps=warmup, total_steps=total)
    state = train.init_train_state(TINY, opt, jax.random.key(0))
    step = train.make_train_step(TINY, opt)
    batch = _packed_batch(np.random.default_rng(3), TINY, rows=2)
    want = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
    for i in range(total):
        state, m = step(state, batch)
        assert float(m["lr"]) == pytest.approx(float(want(i)), rel=1e-6, abs=1e-12)
    assert int(state.step) == total


def test_adamw_with_clipping_matches_optax_reference():
    """One step of our optimizer equals optax's clip + adamw written out here, decay skipping norms."""
    # eps 1e-3: Adam's first step is lr * g / (|g| + eps); with the usual 1e-8 it is ~lr * sign(g), and a
    # gradient within rounding of 0 (computed here and in the step in different orders) could move by ~lr.
    opt = train.make_optimizer(lr=1e-2, warmup_steps=0, total_steps=5, weight_decay=0.1, clip_norm=0.5, eps=1e-3)
    state = train.init_train_state(TINY, opt, jax.random.key(0))
    params0 = jax.device_get(state.params)
    batch = _packed_batch(np.random.default_rng(4), TINY, rows=2)
    grads = loss_and_grad(params0, batch, cfg=TINY)[1]
    mask = jax.tree_util.tree_map_with_path(lambda p, _: "norm" not in jax.tree_util.keystr(p), params0)
    ref_opt = optax.chain(optax.clip_by_global_norm(0.5),
                          optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1, mask=mask))
    updates, _ = ref_opt.update(grads, ref_opt.init(params0), params0)
    want = optax.apply_updates(params0, updates)
    state, m = train.make_train_step(TINY, opt)(state, batch)
    assert float(m["grad_norm"]) > 0.5  # clipping was active
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
    opt = train.make_optimizer(lr=1e-2, warmup_steps=0, total_steps=10)
    state = train.init_train_state(TINY, opt, jax.random.key(0))
    step = train.make_train_step(TINY, opt)
    good = _packed_batch(np.random.default_rng(5), TINY, rows=2)
    bad = dict(good, loss_mask=np.where(good["loss_mask"] > 0, np.nan, 0.0).astype(np.float32))
    state, _ = step(state, dict(good, loss_mask=good["loss_mask"].astype(np.float32)))
    before = jax.device_get(state)
    for i in range(1, 3):
        state, m = step(state, bad)
        assert int(m["skipped"]) == 1 and int(m["nonfinite_streak"]) == i
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.step)),
                    jax.tree.leaves((after.params, after.opt_state, after.step))):
        np.testing.assert_array_equal(a, b)
    assert int(after.skipped) == 2 and int(after.step) == 1
    state, m = step(state, dict(good, loss_mask=good["loss_mask"].astype(np.float32)))
    assert int(m["skipped"]) == 0 and int(state.nonfinite_streak) == 0 and int(state.step) == 2


def test_fit_stops_after_too_many_nonfinite_steps():
    opt = train.make_optimizer(lr=1e-2, total_steps=10)
    state = train.init_train_state(TINY, opt, jax.random.key(0))
    good = _packed_batch(np.random.default_rng(6), TINY, rows=2)
    bad = dict(good, loss_mask=np.full(good["loss_mask"].shape, np.nan, np.float32))

    def batches():
        while True:
            yield bad

    with pytest.raises(train.TrainingStopped, match="4 consecutive steps had non-finite gradients"):
        train.fit(state, train.make_train_step(TINY, opt), batches(), steps=10, cfg=TINY, max_nonfinite=3,
                  progress=False)


def test_remat_policies_agree():
    params = lj.init_params(TINY, jax.random.key(0))
    batch = _packed_batch(np.random.default_rng(7), TINY, rows=2)
    grads = {r: loss_and_grad(params, batch, cfg=TINY, remat=r)[1] for r in ("none", "full", "save_matmuls")}
    for r in ("full", "save_matmuls"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_params():
    cfg16 = TINY.replace(compute_dtype="bfloat16")
    opt = train.make_optimizer(lr=1e-2, total_steps=3)
    state = train.init_train_state(cfg16, opt, jax.random.key(0))
    batch = _packed_batch(np.random.default_rng(8), cfg16, rows=2)
    state, m = train.make_train_step(cfg16, opt)(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert m["loss"].dtype == jnp.float32
    ref = loss(lj.init_params(TINY, jax.random.key(0)), batch, cfg=TINY)
    assert abs(float(m["loss"]) - float(ref)) < 0.02 * float(ref)


def test_mfu_reproduces_design_figure():
    """The MFU convention: 7B width x 8 layers, seq 2048, 41.8k tokens/s on one H100 is MFU 47.8%."""
    cfg = lj.LlamaConfig(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                         max_seq_len=2048)
    assert train.mfu(41.8e3, cfg, 2048) == pytest.approx(0.478, abs=5e-4)
    n = lj.param_count(lj.PRESETS["llama2-7b"]) - 32000 * 4096
    assert train.flops_per_token(lj.PRESETS["llama2-7b"], 2048) == 6 * n + 12 * 32 * 4096 * 2048


# A few paragraphs of plain English, written for this test.
ENGLISH = """\
The village sat at the bottom of a narrow valley, where the river turned twice before it reached the sea.
Every morning the baker opened his shop before the sun came over the hills, and the smell of bread drifted
down the street to the harbour. The fishermen bought their loaves on the way to the boats, and the children
bought sweet rolls on the way to school. In the evening the same street was full of people walking home,
talking about the weather, the price of fish, and the news that had come with the post.
When the winter storms arrived, the boats stayed in the harbour for days at a time. The men mended their nets
in the long shed by the water, and the women kept the fires burning in the houses on the hill. The school
closed when the snow was deep, and the children built forts in the square and threw snowballs at the church
door until the priest came out to chase them away. Nobody minded very much; the storms always ended, and the
sea was always calm again by the first week of spring.
The teacher was a patient woman who had come from the city many years before. She taught the children to read
and to write, to add long columns of numbers, and to name the rivers and mountains of the country. She kept a
small garden behind the school, and in the summer she showed the older pupils how to grow beans and potatoes.
Some of them became fishermen like their fathers, and some went away to study in the city, but all of them
remembered the garden and the long afternoons when the windows were open and the bees came in from the roses.
One year a stranger arrived on the evening coach with a heavy wooden box. He took a room above the inn and
said very little to anyone. Each morning he carried the box up the hill to the old lighthouse and came back at
dusk with his boots covered in mud. The villagers talked of nothing else for weeks. Some said he was a painter,
others that he was looking for gold, and the baker was sure that he was a spy. In the end the teacher simply
asked him, and he told her that he was measuring the stars. He invited the children to look through his
telescope, and that autumn the whole school learned the names of the planets and the shapes of the constellations.
"""


def _tokenizer():
    from llama_jax.tokenizer import load_tokenizer

    return load_tokenizer(STORIES_GGUF)  # SentencePiece, 512 pieces: a tiny model's vocabulary


def test_tiny_model_loss_falls_on_real_text():
    tok = _tokenizer()
    cfg = TINY.replace(vocab_size=tok.vocab_size)
    paragraphs = [p for p in ENGLISH.split("\n") if p.strip()]
    docs = [tok.encode(p, eos=True) for p in paragraphs]
    batches = Batches(PackedText(docs, seq_len=64, seed=0), batch_size=8)
    steps = 60
    opt = train.make_optimizer(lr=3e-3, warmup_steps=5, total_steps=steps, weight_decay=0.0)
    state = train.init_train_state(cfg, opt, jax.random.key(0))
    result = train.fit(state, train.make_train_step(cfg, opt), batches, steps=steps, cfg=cfg, progress=False)
    losses = [m["loss"] for m in result.history]
    assert len(losses) == steps and int(result.state.step) == steps
    assert losses[0] > 5.5  # ~ log(512) at initialisation
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
    # Learned the text, not just the unigram counts: lower loss on it than a fresh model by a wide margin.
    rows = PackedText(docs, seq_len=64, seed=0).epoch(0)
    trained = float(loss(result.state.params, rows, cfg=cfg))
    fresh = float(loss(lj.init_params(cfg, jax.random.key(1)), rows, cfg=cfg))
    assert trained < fresh - 2.0


# ---------------------------------------------------------------------------------------------
# Alpaca fine-tuning of stories260K

INSTRUCTIONS = [
    {"instruction": "Tell me about the cat.", "input": "", "output": "The cat was happy. It liked to play in the sun."},
    {"instruction": "What did Lily find?", "input": "", "output": "Lily found a big red ball in the park."},
    {"instruction": "Say what the dog did.", "input": "The dog saw a bird.", "output": "The dog ran after the bird."},
    {"instruction": "Finish the story.", "input": "Tom had a toy car.",
     "output": "Tom played with his car all day. He was very happy."},
    {"instruction": "Who was sad?", "input": "", "output": "The little bird was sad because it lost its mom."},
    {"instruction": "Name the colour of the sky.", "input": "", "output": "The sky was blue and bright."},
    {"instruction": "What did Ben eat?", "input": "Ben went to the kitchen.", "output": "Ben ate a big cake."},
    {"instruction": "Tell me a short story.", "input": "",
     "output": "Once upon a time, there was a little boy named Sam. He loved to run."},
]


@functools.lru_cache(maxsize=1)
def _stories():

    model = lj.load(STORIES_GGUF)
    return model.config.replace(compute_dtype="float32"), model.params, model.tokenizer


def test_alpaca_mask_covers_exactly_the_response():
    cfg, params, tok = _stories()
    rows = InstructionRows(encode_alpaca(INSTRUCTIONS, tok, max_len=512), seed=0).epoch(0)
    responses = []
    for r in range(len(rows["tokens"])):
        counted = rows["tokens"][r, 1:][rows["loss_mask"][r] > 0]
        assert counted[-1] == tok.eos_id
        responses.append(tok.decode(counted[:-1].tolist()))
    assert sorted(responses) == sorted(rec["output"] for rec in INSTRUCTIONS)


def test_prompt_tokens_carry_no_loss():
    """Replacing every target outside the response changes neither the loss nor its gradient;
    replacing one response target does (so the check can fail)."""
    cfg, params, tok = _stories()
    rows = InstructionRows(encode_alpaca(INSTRUCTIONS, tok, 512), seed=0).epoch(0)
    batch = dict(tokens=rows["tokens"][:, :-1], targets=rows["tokens"][:, 1:], loss_mask=rows["loss_mask"])
    rng = np.random.default_rng(0)
    scrambled = np.where(rows["loss_mask"] > 0, batch["targets"],
                         rng.integers(0, cfg.vocab_size, batch["targets"].shape)).astype(np.int32)
    assert (scrambled != batch["targets"]).mean() > 0.3
    vg = functools.partial(loss_and_grad, cfg=cfg)
    loss, grads = vg(params, batch)
    loss2, grads2 = vg(params, dict(batch, targets=scrambled))
    assert float(loss) == float(loss2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(a, b)
    r, t = map(int, np.argwhere(rows["loss_mask"] > 0)[0])
    poked = batch["targets"].copy()
    poked[r, t] = (poked[r, t] + 1) % cfg.vocab_size
    assert float(vg(params, dict(batch, targets=poked))[0]) != float(loss)


def test_finetune_stories260k_lowers_response_loss():
    """Packed rows here; the finetune CLI test below trains on padded ones."""
    cfg, params, tok = _stories()
    source = InstructionRows(encode_alpaca(INSTRUCTIONS, tok, 512), seed=0, pack=True)
    everything = source.epoch(0)
    before = float(loss(params, everything, cfg=cfg))
    steps = 25
    opt = train.make_optimizer(lr=3e-3, warmup_steps=2, total_steps=steps, weight_decay=0.0, b2=0.999)
    state = train.init_train_state(cfg, opt, jax.random.key(0), params=params)
    result = train.fit(state, train.make_train_step(cfg, opt, accum_steps=2), Batches(source, 4), steps=steps,
                       cfg=cfg, progress=False)
    after = float(loss(result.state.params, everything, cfg=cfg))
    assert after < 0.5 * before, (before, after)


def test_finetune_cli_writes_metrics_checkpoints_and_resumes(tmp_path, capsys):
    """`llama-jax finetune` on stories260K (8 fake devices, fsdp=8): metrics, TensorBoard events,
    checkpoints; run again with more epochs, it resumes from the saved step."""
    import json

    from llama_jax import cli
    from llama_jax.checkpoints import TrainCheckpointer, run_config

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(INSTRUCTIONS))
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(out), "--batch", "8",
            "--micro-batch", "8", "--max-len", "256", "--lr", "3e-3", "--no-progress"]
    assert cli.main(argv + ["--epochs", "2"]) == 0
    assert "no MFU: the peak FLOP/s of a cpu is not in train.PEAK_TFLOPS" in capsys.readouterr().err
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # 8 records, batch 8: one step an epoch
    assert all(m["tokens"] > 0 and m["tokens_per_s"] > 0 and "mfu" not in m for m in metrics)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert TrainCheckpointer(out).latest_step() == 2
    assert cli.main(argv + ["--epochs", "4", "--peak-tflops", "0.5"]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Both FLOP conventions: r = (6N + 12 L d S) / (6N + 6 L d S) (attention in full, and the causal half)
    # gives back the rows' length S, a multiple of 64 up to --max-len (finetune rounds the longest example).
    cfg = run_config(out)
    n = lj.param_count(cfg) - cfg.vocab_size * cfg.dim
    for m in metrics[2:]:
        r = m["mfu"] / m["mfu_causal"]
        seq = 6 * n * (r - 1) / (cfg.n_layers * cfg.dim * (12 - 6 * r))
        assert r > 1 and seq == pytest.approx(round(seq), abs=1e-3) and round(seq) % 64 == 0 and 0 < seq <= 256
        assert 0 < m["mfu"] < 1
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # The run folder is itself a --model: continue training from its params (fresh optimizer).
    assert cli.main(argv[:2] + [str(out)] + argv[3:6] + [str(tmp_path / "run2"), "--epochs", "1"] + argv[7:]) == 0


def test_mixed_precision_step_matches_autodiff_through_the_master_params():
    """float32 params, bf16 compute: the step differentiates bf16 copies of the matrices, under remat and
    with the layer scan unrolled. Its SGD(lr=1) update must equal minus jax.grad of the loss through the
    float32 params (the cast inside the model, the layer scan rolled, no remat), and the params stay float32."""
    cfg = TINY.replace(compute_dtype="bfloat16")
    batch = _packed_batch(np.random.default_rng(3), cfg, rows=4)
    state = train.init_train_state(cfg, optax.sgd(1.0), jax.random.key(0))
    before = jax.device_get(state.params)
    ref = jax.device_get(loss_and_grad(state.params, batch, cfg=cfg)[1])
    state, _ = train.make_train_step(cfg, optax.sgd(1.0), remat="save_matmuls", unroll=True)(state, batch)
    after = jax.device_get(state.params)
    for (path, g), old, new in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(before),
                                   jax.tree.leaves(after)):
        assert new.dtype == np.float32, path
        err = np.linalg.norm((old - new) - g) / np.linalg.norm(g)
        assert err < 3e-2, (jax.tree_util.keystr(path), err)  # bf16 rounding: 0.4-1.7% seen
