"""Generation: KV-cache decoding against full forwards, batching, samplers, seeds, real models
against transformers' generate, and the generate / chat command line."""

import dataclasses
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from checkpoints_convert.gguf import GGUFReader
from llama_jax.checkpoints import Loaded, params_from_reader
from llama_jax.cli import main
from llama_jax.config import from_hf_config
from llama_jax.generate import (
    Sampling, compile_decode_loop, decode_host_loop, decode_loop, decode_step, filter_logits, generate,
    generate_tokens, pad_left, prefill, sample, stream, stream_tokens)
from llama_jax.model import KVCache
from llama_jax.ops import Kernels
from llama_jax.tokenizer import load_tokenizer
from conftest import REPO, STORIES_GGUF, smollm2_path
from hf_reference import hf_from_gguf


@pytest.fixture(scope="module")
def stories():
    reader = GGUFReader(STORIES_GGUF)
    cfg = from_hf_config(reader.config, compute_dtype="float32")
    return Loaded(cfg, params_from_reader(reader, cfg), load_tokenizer(STORIES_GGUF))


# ---------------------------------------------------------------------------------------------
# Real models against transformers


def test_stories_greedy_200_tokens_equal_transformers(stories):
    ref = hf_from_gguf(STORIES_GGUF)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False, eos_token_id=2,
                              pad_token_id=0)[0, 1:].tolist()
    mine = generate_tokens(stories.params, stories.config, [[1]], max_new_tokens=200)[0]
    assert len(mine) == 200
    assert mine == theirs[:200]
    text = generate(stories, [""], max_new_tokens=200)[0]
    assert text == stories.tokenizer.decode(mine)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_smollm2_first_greedy_token_is_paris():
    reader = GGUFReader(smollm2_path())
    cfg = from_hf_config(reader.config)  # bfloat16 compute, as generate runs it by default
    model = Loaded(cfg, params_from_reader(reader, cfg), load_tokenizer(smollm2_path()))
    assert model.tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    ids = generate_tokens(model.params, cfg, [[504, 3575, 282, 4649, 314]], max_new_tokens=1)
    assert ids == [[7042]]
    assert generate(model, "The capital of France is", max_new_tokens=1) == [" Paris"]


# ---------------------------------------------------------------------------------------------
# The KV cache against full forwards (tiny random models, float32)


@pytest.mark.parametrize("preset, unroll", [("tiny", False), ("tiny-gqa", False), ("tiny-gqa", True)])
def test_cached_decoding_equals_full_forward(preset, unroll):
    """Prefill a left-padded batch of unequal prompts, then decode 12 steps; at every step each
    row's logits equal lj.forward on that row's whole sequence so far (no padding, no cache).
    unroll=True (Kernels.decode_unroll) is the decode step accelerators run (CPU runs the rolled scan)."""
    kernels = Kernels(decode_unroll=unroll)
    cfg = lj.PRESETS[preset]
    params = lj.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 11, 1)]
    P, steps = 11, 12
    tokens = np.zeros((3, P), np.int32)
    mask = np.zeros((3, P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):], mask[i, P - len(p):] = p, True
    cache = KVCache.zeros(cfg, 3, P + steps)
    logits, cache, position = prefill(params, jnp.asarray(tokens), jnp.asarray(mask), cache, cfg, kernels)
    seqs, seen = [list(p) for p in prompts], [[] for _ in prompts]
    for step in range(steps):
        for i in range(3):
            seen[i].append(np.asarray(logits[i]))
        nxt = rng.integers(3, cfg.vocab_size, 3).astype(np.int32)  # any tokens will do
        for i in range(3):
            seqs[i].append(int(nxt[i]))
        logits, cache = decode_step(params, jnp.asarray(nxt), position, cache, cfg, kernels)
        position = position + 1
    # The model is causal: the full forward's logits at t are those after the first t + 1 tokens.
    for i, (p, seq) in enumerate(zip(prompts, seqs)):
        full = np.asarray(lj.forward(params, jnp.asarray([seq[:-1]], jnp.int32), cfg))[0, len(p) - 1:]
        np.testing.assert_allclose(np.stack(seen[i]), full, atol=2e-5, rtol=0, err_msg=f"row {i}")
    assert int(cache.index) == P + steps


def test_batch_rows_equal_alone(stories):
    prompts = ["Once upon a time", "The dog ran to the big red", "", "Lily and Ben were"]
    ids = [stories.tokenizer.encode(p) for p in prompts]
    together = generate_tokens(stories.params, stories.config, ids, max_new_tokens=40)
    for row, p in zip(together, ids):
        assert generate_tokens(stories.params, stories.config, [p], max_new_tokens=40)[0] == row
    assert len({tuple(r) for r in together}) == 4


def test_stop_at_eos_per_row():
    """With EOS set to a token each row produces, each row stops just before its first one."""
    cfg = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg, jax.random.key(2))
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    free = generate_tokens(params, cfg, prompts, max_new_tokens=20, eos_id=-1)
    assert all(len(r) == 20 for r in free)
    eos = free[0][4]
    stopped = generate_tokens(params, cfg, prompts, max_new_tokens=20, eos_id=eos)
    for f, s in zip(free, stopped):
        assert s == (f[:f.index(eos)] if eos in f else f)
    assert len(stopped[0]) == 4
    # Streamed: each row's tokens, then EOS repeated once it is done; the stream ends at the step where
    # the last row produces its EOS (or at max_new_tokens).
    for rows in ([0, 1, 2], [0, 2]):  # the second stream ends early, at step 11 of 20
        streamed = np.stack(list(stream_tokens(params, cfg, [prompts[i] for i in rows], 20, eos_id=eos)), axis=1)
        ends = [free[i].index(eos) + 1 if eos in free[i] else 20 for i in rows]
        assert streamed.shape == (len(rows), max(ends))
        for row, i, end in zip(streamed.tolist(), rows, ends):
            assert row == free[i][:end] + [eos] * (max(ends) - end)


def test_stream_equals_loop_and_seeds(stories):
    """The streaming runner and the on-device loop draw the same samples; a seed fixes the text."""
    cfg, params = stories.config, stories.params
    ids = [[1], stories.tokenizer.encode("The cat")]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    a = generate_tokens(params, cfg, ids, 30, seed=7, **kw)
    b = generate_tokens(params, cfg, ids, 30, seed=7, **kw)
    c = generate_tokens(params, cfg, ids, 30, seed=8, **kw)
    assert a == b and a != c
    streamed = np.stack(list(stream_tokens(params, cfg, ids, 30, seed=7, **kw)), axis=1)
    for row, s in zip(a, streamed):
        assert s[:len(row)].tolist() == row
    text = generate(stories, "The cat", max_new_tokens=30, temperature=0.9, seed=3)
    assert text == generate(stories, "The cat", max_new_tokens=30, temperature=0.9, seed=3)
    assert "".join(stream(stories, "The cat", max_new_tokens=30, temperature=0.9, seed=3)) == text[0]


@pytest.mark.parametrize("eos_from_step", [None, 4])
def test_host_loop_equals_on_device_loop(eos_from_step):
    """decode_host_loop (GPU's runner) gives decode_loop's tokens and lengths: sampled, running to
    the end, and with a row stopping at an EOS it produces."""
    cfg = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]], jnp.int32)
    mask = tokens > 0
    key, sampling = jax.random.key(5), Sampling(0.9, 20, 0.95)
    free, _ = decode_loop(params, tokens, mask, key, jnp.int32(-1), cfg, 40, sampling)
    eos = -1 if eos_from_step is None else int(free[0, eos_from_step])
    want_out, want_len = decode_loop(params, tokens, mask, key, jnp.int32(eos), cfg, 40, sampling)
    got_out, got_len = decode_host_loop(params, tokens, mask, key, jnp.int32(eos), cfg, 40, sampling,
                                        check_every=4)
    np.testing.assert_array_equal(np.asarray(got_out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(got_len), np.asarray(want_len))
    if eos_from_step is not None:
        assert int(want_len[0]) <= eos_from_step


def test_compiled_decode_loop_equals_decode_loop():
    """compile_decode_loop: decode_loop compiled ahead of time with the params placed in the layouts it
    asks for gives decode_loop's tokens and lengths."""
    cfg = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10]], jnp.int32)
    sampling = Sampling(0.9, 20, 0.95)
    loop = compile_decode_loop(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), cfg,
                               2, 4, 12, sampling=sampling)
    got = loop(jax.device_put(params, loop.input_formats[0][0]), tokens, tokens > 0, jax.random.key(5),
               jnp.int32(-1))
    want = decode_loop(params, tokens, tokens > 0, jax.random.key(5), jnp.int32(-1), cfg, 12, sampling)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_float8_cache_decodes_close_to_the_full_forward(stories):
    """cache_dtype="float8_e4m3fn" keeps the KV cache in 8 bits (every key and value rounded as written):
    stories260K's greedy tokens still agree with the argmax of a float32 full forward over the same
    sequence at most steps (the rounding costs some near-ties; a bf16 cache agrees at every step), and
    the cache in the compiled loop is 8-bit. A dtype that is not a float is refused."""
    cfg, params = stories.config, stories.params
    prompts = [[1], [1, 365, 251], [1, 403, 301, 263, 431]]
    agree = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        out = generate_tokens(params, cfg, prompts, 96, eos_id=-1, cache_dtype=dtype)
        same = []
        for p, o in zip(prompts, out):
            full = jnp.argmax(lj.forward(params, jnp.asarray([p + o[:-1]]), cfg)[0, len(p) - 1:], axis=-1)
            same.append(np.mean(np.asarray(full) == np.asarray(o)))
        agree[dtype] = float(np.mean(same))
    assert agree["bfloat16"] == 1.0
    assert 0.8 <= agree["float8_e4m3fn"] < 1.0, agree  # close, and the 8-bit cache really was used
    tokens, mask = pad_left(prompts)
    text = decode_loop.lower(params, tokens, mask, jax.random.key(0), jnp.int32(-1), cfg, 8,
                             cache_dtype="float8_e4m3fn").as_text()
    assert f"tensor<{cfg.n_layers}x3x16x{cfg.n_kv_heads}x{cfg.head_dim}xf8E4M3FN>" in text
    with pytest.raises(ValueError, match="cache_dtype 'int8': expected a float dtype"):
        generate_tokens(params, cfg, [[1]], 4, cache_dtype="int8")


def test_decode_loop_keeps_one_cache_layout_on_tpu(monkeypatch):
    """On a TPU chip (compiled here by libtpu) XLA lays the cache out one way for prefill and another for
    the decode loop, and copies both caches between them; Kernels.auto's cache_layout for TPUs pins one
    order for both, and the compiled loop copies no cache. On the CPU the pinned order gives the same
    tokens as the compiler's own."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    from llama_jax import params as table
    from llama_jax.sharding import make_mesh

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu on a machine without TPUs
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = topologies.get_topology_desc(platform="tpu", topology_name="v5p:1x1x1").devices[0]
    tpu = Kernels.auto(make_mesh(devices=[chip]))
    assert tpu.cache_layout == (0, 1, 3, 2, 4)
    cfg = lj.PRESETS["tiny"].replace(dim=256, n_heads=2, n_kv_heads=2, n_layers=2, param_dtype="bfloat16",
                                     compute_dtype="bfloat16")
    on_chip = jax.sharding.SingleDeviceSharding(chip)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=on_chip), table.abstract(cfg))
    prompt = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=on_chip)
    mask = jax.ShapeDtypeStruct((8, 16), jnp.bool_, sharding=on_chip)
    cache_copy = re.compile(rf"= bf16\[{cfg.n_layers},8,128,2,128\]\{{[^}}]*\}} copy")

    keep = jax.config.jax_persistent_cache_min_compile_time_secs  # (no TPU executables in the suite's cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)

    def copies(kernels):
        loop = jax.jit(lambda p, t, m: decode_loop(p, t, m, jax.random.key(0), jnp.int32(-1), cfg, 112,
                                                   kernels=kernels))
        return len(cache_copy.findall(loop.lower(params, prompt, mask).compile().as_text()))

    try:
        assert copies(tpu) == 0
        assert copies(dataclasses.replace(tpu, cache_layout=())) > 0
        # compile_decode_loop (params in the compiled program's own layout) for a v5e chip, 8-bit cache: no
        # stacked weight or cache is copied in HBM (S(1) marks XLA:TPU's prefetches into on-chip memory).
        v5e = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices[0]
        loop = compile_decode_loop(params, cfg, 8, 16, 112, kernels=tpu, cache_dtype="float8_e4m3fn", device=v5e)
        stacked = re.findall(rf"= \w+\[{cfg.n_layers},[0-9,]+\](\{{[^}}]*\}}) copy", loop.as_text())
        assert [layout for layout in stacked if "S(" not in layout] == []
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", keep)

    cfg = lj.PRESETS["tiny-gqa"]
    weights = lj.init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10]], jnp.int32)
    pinned, free = (decode_loop(weights, tokens, tokens > 0, jax.random.key(5), jnp.int32(-1), cfg, 12,
                                Sampling(0.9, 20, 0.95), kernels=Kernels(cache_layout=layout))[0]
                    for layout in ((0, 1, 3, 2, 4), ()))
    np.testing.assert_array_equal(np.asarray(pinned), np.asarray(free))
    with pytest.raises(ValueError, match="cache_layout"):
        Kernels(cache_layout=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# Samplers on hand-made distributions

PROBS = np.array([0.05, 0.30, 0.15, 0.50])  # deliberately unsorted
LOGITS = jnp.asarray(np.log(PROBS), jnp.float32)[None]


def kept(logits) -> set:
    return set(np.flatnonzero(np.isfinite(np.asarray(logits[0]))).tolist())


@pytest.mark.parametrize("k, expected", [(1, {3}), (2, {1, 3}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_probable(k, expected):
    assert kept(filter_logits(LOGITS, top_k=k)) == expected


@pytest.mark.parametrize("p, expected", [
    (0.3, {3}),  # 0.5 alone reaches 0.3
    (0.5, {3}),  # ... and 0.5 exactly
    (0.7, {1, 3}),  # 0.5 + 0.3 = 0.8 >= 0.7
    (0.9, {1, 2, 3}),  # 0.95 >= 0.9
    (0.99, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(filter_logits(LOGITS, top_p=p)) == expected


def test_top_k_then_top_p_and_sampled_frequencies():
    # top-k 3 leaves {0.5, 0.3, 0.15} renormalised to 0.526, 0.316, 0.158; top-p 0.8 then keeps 2.
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.8)) == {1, 3}
    logits = jnp.broadcast_to(LOGITS, (20000, 4))
    draws = np.asarray(sample(logits, jax.random.key(0), Sampling(temperature=1.0, top_p=0.9)))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[0] == 0  # outside the nucleus: never drawn
    np.testing.assert_allclose(freq[1:], PROBS[1:] / PROBS[1:].sum(), atol=0.015)
    greedy = np.asarray(sample(LOGITS, jax.random.key(0), Sampling()))
    assert greedy.tolist() == [3]


# ---------------------------------------------------------------------------------------------
# Checks


def test_context_length_and_argument_checks(stories):
    cfg, params = stories.config, stories.params
    with pytest.raises(ValueError, match="context of 2048"):
        generate_tokens(params, cfg, [[1] * 2000], max_new_tokens=49)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(params, cfg, [[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(stories, "x", top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(stories, "x", top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(stories, "x", temperature=-1.0)
    assert generate_tokens(params, cfg, [[1] * 2000], max_new_tokens=48)[0]  # exactly fits
    assert generate(stories, ["x"], max_new_tokens=0) == [""]


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-3", "hi"], "--max-new-tokens"),
    (["--top-p", "0", "hi"], "--top-p"),
    (["--top-p", "1.5", "hi"], "--top-p"),
    (["--model", "/no/such/model.gguf", "hi"], "no such file"),
])
def test_cli_bad_arguments(capsys, argv, message):
    rc, out, err = run_cli(capsys, "generate", *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_prompt_longer_than_context(capsys):
    rc, out, err = run_cli(capsys, "generate", "--model", str(STORIES_GGUF), "once upon a time " * 600)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "context of 2048" in err


def test_cli_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 1000)
    rc, out, err = run_cli(capsys, "generate", "--model", str(junk), "hi")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "weights.bin" in err
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\xff" * 64)
    rc, out, err = run_cli(capsys, "generate", "--model", str(fake), "hi")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "fake.gguf" in err


def test_cli_generate_prints_only_the_text(stories):
    """A real process: stdout holds the generated text and nothing else."""
    proc = subprocess.run(
        [sys.executable, "-m", "llama_jax.cli", "generate", "--model", str(STORIES_GGUF), "--max-new-tokens", "30",
         "Once upon a time"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(stories, "Once upon a time", max_new_tokens=30)[0] + "\n"


def test_cli_generate_with_an_8_bit_cache(capsys, stories):
    """--cache-dtype reaches the decode: the text is generate()'s with the same cache_dtype. A dtype it
    does not offer is refused in one line, exit 2."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--cache-dtype", "int8", "hi"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--cache-dtype: invalid choice: 'int8'" in err
    rc, out, err = run_cli(capsys, "generate", "--model", str(STORIES_GGUF), "--max-new-tokens", "24",
                           "--cache-dtype", "float8_e4m3fn", "Once upon a time")
    assert rc == 0, err
    assert out == generate(stories, "Once upon a time", max_new_tokens=24, cache_dtype="float8_e4m3fn")[0] + "\n"


def test_cli_chat_keeps_the_conversation(capsys, monkeypatch, stories):
    """Two turns through `chat`: the second reply is generated from both turns in the template."""
    import io

    from llama_jax.tokenizer import chat_tokens

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Tell me a story.\nWhat happened next?\n\n")))
    rc, out, err = run_cli(capsys, "chat", "--model", str(STORIES_GGUF), "--max-new-tokens", "12")
    assert rc == 0, err
    replies = out.splitlines()
    assert len(replies) == 2
    model = lj.load(STORIES_GGUF)  # as the command loads it
    tok, cfg = model.tokenizer, model.config
    turns = [{"role": "user", "content": "Tell me a story."}]
    first = generate_tokens(model.params, cfg, [chat_tokens(tok, turns)], 12)[0]
    assert replies[0] == _decode_after(tok, chat_tokens(tok, turns), first)
    turns += [{"role": "assistant", "content": replies[0].strip()}, {"role": "user", "content": "What happened next?"}]
    second = generate_tokens(model.params, cfg, [chat_tokens(tok, turns)], 12)[0]
    assert replies[1] == _decode_after(tok, chat_tokens(tok, turns), second)


def _decode_after(tok, prompt, new):
    before = tok.decode(prompt)
    return tok.decode(prompt + new)[len(before):]


def test_sharded_generation_equals_single_device():
    """On a mesh of the 8 fake devices (fsdp 4 x tensor 2), params and KV cache sharded by the
    model's rules: the same tokens as unsharded."""
    from llama_jax.sharding import make_mesh

    cfg = lj.PRESETS["tiny-gqa"]
    mesh = make_mesh(fsdp=4, tensor=2)
    key = jax.random.key(3)
    plain, sharded = lj.init_params(cfg, key), lj.init_params(cfg, key, mesh)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [20, 21]]
    expected = generate_tokens(plain, cfg, prompts, max_new_tokens=10, eos_id=-1)
    assert generate_tokens(sharded, cfg, prompts, max_new_tokens=10, eos_id=-1, mesh=mesh) == expected
    streamed = np.stack(list(stream_tokens(sharded, cfg, prompts, 10, eos_id=-1, mesh=mesh)), axis=1)
    assert streamed.tolist() == expected
    with jax.set_mesh(mesh):
        tokens = jnp.asarray([[0, 0, 5, 6, 7]] * 4, jnp.int32)
        _, cache, _ = prefill(sharded, tokens, tokens > 0, KVCache.zeros(cfg, 4, 8), cfg, Kernels.auto(mesh))
    spec = cache.k.sharding.spec  # [layers, batch, slots, kv_heads, head_dim]
    assert spec[1] in ("fsdp", ("data", "fsdp"), ("fsdp",)) and spec[3] in ("tensor", ("tensor",))
