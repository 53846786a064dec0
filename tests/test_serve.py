"""`llama-jax serve` (issue 29): the paged-attention op against dense attention, the engine against
`generate`, and a real server on a free port driven by the official `openai` client: completions and chat,
streamed and not, 50 concurrent clients with cancellations, bad input, and SIGTERM draining."""

import collections
import concurrent.futures
import functools
import http.client
import importlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

import llama_jax as lj
from llama_jax.engine import Engine, Request, default_kv_blocks
from llama_jax.model import apply_rope
from llama_jax.ops import Kernels, pallas_paged_attention
from llama_jax.server import TextStream, make_app
from llama_jax.tokenizer import chat_tokens
from conftest import REPO, STORIES_GGUF, smollm2_path

paged = importlib.import_module("llama_jax.ops.paged_attention")  # the module (ops exports the function too)

PROMPTS = ["Once upon a time", "The dog", "Lily wanted to play with her friend Tom, but he was sad because", "",
           "One day, a little bird", "Tim and Sue went to the park. They saw", "The sun", "Mom said"]


# One engine shape for every test here (and the server in its own process), so they share compiled steps.
ENGINE = dict(max_batch=32, kv_blocks=512, block_size=16, prefill_tokens=64)


@pytest.fixture(scope="module")
def stories():
    return lj.load(STORIES_GGUF)  # float32 compute on the CPU


@pytest.fixture(scope="module")
def reference(stories):
    """generate's greedy tokens for PROMPTS, each row as it decodes alone (a prefix of them is the answer to
    fewer tokens)."""
    tok = stories.tokenizer
    ids = [tok.encode(p) or [tok.bos_id] for p in PROMPTS]
    return ids, lj.generate_tokens(stories.params, stories.config, ids, max_new_tokens=64, eos_id=tok.eos_id)


def _softmax_attention(q, k, v, mask):
    """numpy: q [seq, heads, hd], k and v [keys, kv_heads, hd], mask [seq, keys] -> [seq, heads, hd]."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)


# ---------------------------------------------------------------------------------------------
# The op: paged attention against dense attention over the same keys and values


def _paged_case(seed, batch, lengths, heads=4, kv_heads=2, head_dim=16, block=16, blocks=40, width=8, seq=1):
    """Random pools, rows owning shuffled blocks, and each row's keys and values read back densely."""
    rng = np.random.default_rng(seed)
    pool_k, pool_v = (jnp.asarray(rng.normal(size=(2, blocks, block, kv_heads, head_dim)), jnp.float32)
                      for _ in range(2))
    owned = iter(rng.permutation(np.arange(1, blocks)))
    tables = np.zeros((batch, width), np.int32)
    for b, n in enumerate(lengths):
        tables[b, :-(-n // block)] = [next(owned) for _ in range(-(-n // block))]
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), jnp.float32)
    dense = [(np.asarray(pool_k)[1, tables[b]].reshape(-1, kv_heads, head_dim)[:n],
              np.asarray(pool_v)[1, tables[b]].reshape(-1, kv_heads, head_dim)[:n]) for b, n in enumerate(lengths)]
    return q, pool_k, pool_v, jnp.asarray(tables), dense


def test_paged_reference_equals_dense_attention():
    """Queries at the last positions of rows of 5, 37 and 70 tokens (a chunk of 3 each), read through
    shuffled block tables, equal causal attention over each row's keys laid out densely."""
    lengths = [5, 37, 70]
    q, pool_k, pool_v, tables, dense = _paged_case(0, 3, lengths, seq=3)
    positions = jnp.asarray([[n - 3, n - 2, n - 1] for n in lengths], jnp.int32)
    out = jax.jit(paged.reference)(q, pool_k, pool_v, 1, tables, positions)
    for b, (k, v) in enumerate(dense):
        n = lengths[b]
        mask = np.arange(n)[None, :] <= np.arange(n - 3, n)[:, None]
        want = _softmax_attention(np.asarray(q[b]), k, v, mask)
        np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)


# batch 3 splits rows over programs (flash-decoding), 70 does not; heads per program: GQA's pairs sharing a
# kv head (default) or one head each, and without GQA four or two heads side by side, or one; blocks a loop
# step: one, or two and four (a row's last step then reaches past its keys); tables of 8 blocks (as wide as
# the longest row) or 32 (the engine's one width for every decode step: the split parts divide each row's
# own blocks); the loop's two forms: vector products, and dots on tensor cores.
@pytest.mark.parametrize("batch", [3, 70])
@pytest.mark.parametrize("kv_heads,group,per_step,width", [
    (2, None, 1, 8), (2, 1, 1, 8), (4, None, 1, 8), (4, 2, 1, 8), (4, 1, 1, 8), (2, None, 4, 8), (4, 2, 2, 8),
    (2, None, 1, 32), (4, 2, 4, 32)])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_paged_kernel_equals_reference(batch, kv_heads, group, per_step, width, tensor_cores):
    """The Pallas kernel (in Pallas' interpreter) against the XLA reference for a decode step; a padding row
    (length 0) gets zeros, not NaN."""
    lengths = [int(n) for n in np.random.default_rng(batch).integers(1, 120, batch)]
    q, pool_k, pool_v, tables, _ = _paged_case(batch, batch, lengths, kv_heads=kv_heads, blocks=8 * batch + 1,
                                               width=width)
    lengths[0] = 0
    kernel = jax.jit(functools.partial(pallas_paged_attention.paged_attention, group=group,
                                       blocks_per_step=per_step, tensor_cores=tensor_cores,
                                       interpret=True))
    got = kernel(q[:, 0], pool_k, pool_v, jnp.int32(1), tables, jnp.asarray(lengths, jnp.int32))
    want = jax.jit(paged.reference)(q, pool_k, pool_v, 1, tables, jnp.asarray(lengths, jnp.int32)[:, None] - 1)[:, 0]
    np.testing.assert_allclose(np.asarray(got[1:]), np.asarray(want[1:]), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[0]) == 0)


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("q_dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_paged_kernel_reads_an_8_bit_pool(tensor_cores, q_dtype, tolerance):
    """A float8_e4m3fn pool (serve --cache-dtype): the kernel widens each block as it reads it (the dot form
    with bf16 queries to float16, its dots' inputs), and equals the reference over the same 8-bit keys and
    values, in float32."""
    lengths = [0, 17, 64, 100, 5]
    q, pool_k, pool_v, tables, _ = _paged_case(7, 5, lengths, kv_heads=2, blocks=41)
    pool_k, pool_v = (p.astype(jnp.float8_e4m3fn) for p in (pool_k, pool_v))
    q = q.astype(q_dtype)
    n = jnp.asarray(lengths, jnp.int32)
    got = pallas_paged_attention.paged_attention(q[:, 0], pool_k, pool_v, jnp.int32(1), tables, n,
                                                 tensor_cores=tensor_cores, interpret=True)
    want = paged.reference(q.astype(jnp.float32), pool_k, pool_v, 1, tables, n[:, None] - 1)[:, 0]
    np.testing.assert_allclose(np.asarray(got[1:], np.float32), np.asarray(want[1:]), rtol=tolerance,
                               atol=tolerance)
    assert pallas_paged_attention.supported(q, pool_k)


def test_paged_op_writes_then_attends_through_the_kernel():
    """ops.paged_attention with the policy's kernel (interpreted) equals it with XLA: same output, same pools;
    padding writes land in block 0 only."""
    lengths = [9, 33]
    q, pool_k, pool_v, tables, _ = _paged_case(3, 2, lengths)
    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.normal(size=(2, 1, 2, 16)), jnp.float32) for _ in range(2))
    positions = jnp.asarray([[8], [32]], jnp.int32)
    cos, sin = (jnp.asarray(rng.normal(size=(2, 1, 1, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray([[True], [False]])
    args = (q, k, v, (cos, sin), pool_k, pool_v, jnp.int32(1), tables, positions, mask)
    op = jax.jit(paged.paged_attention, static_argnames=("kernels", "rotate"))
    out_x, pk_x, pv_x = op(Kernels.xla(), *args, rotate=apply_rope)
    out_p, pk_p, pv_p = op(Kernels(paged_attention="pallas", interpret=True), *args, rotate=apply_rope)
    np.testing.assert_allclose(np.asarray(out_p[0]), np.asarray(out_x[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pk_p), np.asarray(pk_x))
    changed = np.argwhere(np.any(np.asarray(pk_x) != np.asarray(pool_k), axis=(2, 3, 4)))
    assert sorted(map(tuple, changed)) == sorted([(1, int(tables[0, 0])), (1, 0)])  # row 0's block, and padding's


def test_policy_chooses_the_paged_kernel_on_one_gpu_only():
    gpu = [types.SimpleNamespace(platform="gpu", compute_capability="8.0", id=i) for i in range(2)]
    assert Kernels.auto(devices=gpu[:1]).paged_attention == "pallas"
    assert Kernels.auto(devices=gpu).paged_attention == "xla"  # a mesh: the reference, which partitions
    assert Kernels.auto().paged_attention == "xla"  # the CPU
    with pytest.raises(ValueError, match="paged_attention"):
        Kernels(paged_attention="cuda")


# ---------------------------------------------------------------------------------------------
# The engine against generate


def _collect(outs, key):
    def on_tokens(tokens, finish):
        outs.setdefault(key, []).extend(tokens)
        if finish:
            outs[("finish", key)] = finish
    return on_tokens


def test_engine_greedy_equals_generate_as_prompts_join(stories, reference):
    """Unequal prompts joining at different steps, chunked prefill (a 15-token prompt over two steps once
    others run) and a pool so small that sequences are preempted and prefilled again: each one's tokens are
    generate's for it alone."""
    ids, want = reference
    for kv_blocks in (ENGINE["kv_blocks"], 12):
        engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id,
                        **dict(ENGINE, kv_blocks=kv_blocks))
        outs = {}
        for i, p in enumerate(ids[:4]):
            engine.submit(p, Request(max_tokens=40), _collect(outs, i))
            for _ in range(3):
                engine.step()
        while not engine.idle:
            engine.step()
        assert [outs[i] for i in range(4)] == [w[:40] for w in want[:4]]
        assert engine.stats()["kv_blocks_used"] == 0
    assert engine.stats()["preemptions"] > 0


def test_engine_feeds_a_token_to_the_next_step_before_the_host_sees_it(stories, reference):
    """The host plans step i+1 while step i runs: a prompt's first token is decoded on the device at the step
    after its prefill, before on_tokens has it. A sequence that ends on EOS has one more row in flight; its
    token is dropped, its blocks and slot go to the next request, whose tokens are still generate's."""
    ids, want = reference
    engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id, **ENGINE)
    outs = {}
    engine.submit(ids[0], Request(max_tokens=6), _collect(outs, 0))
    engine.step()  # the prefill, dispatched
    assert engine.steps_dispatched == 1 and not outs
    engine.step()  # the decode of the prefill's token, dispatched; then that token is handed out
    assert engine.steps_dispatched == 2 and outs[0] == want[0][:1]
    while not engine.idle:
        engine.step()
    assert outs[0] == want[0][:6] and engine.steps_dispatched == 6  # no step past max_tokens

    stop_at = next(i for i, t in enumerate(want[1]) if t not in want[1][:i] and i >= 3)
    engine.eos_id = want[1][stop_at]
    engine.submit(ids[1], Request(max_tokens=40), _collect(outs, 1))
    while not engine.idle:
        engine.step()
    assert outs[1] == want[1][:stop_at] and outs[("finish", 1)] == "stop"
    assert engine.steps_dispatched == 6 + stop_at + 2  # the prefill, stop_at decodes, and the dropped row
    assert engine.stats()["kv_blocks_used"] == 0
    engine.eos_id = stories.tokenizer.eos_id
    for i in (2, 3):
        engine.submit(ids[i], Request(max_tokens=20), _collect(outs, i))
    while not engine.idle:
        engine.step()
    assert [outs[2], outs[3]] == [want[2][:20], want[3][:20]]


def test_engine_decodes_at_one_table_width_through_the_kernel(monkeypatch):
    """Where the kernel reads blocks in place, every decode step passes tables of one width (the longest
    context's: one program a row bucket, no recompile as sequences grow), up to FIXED_DECODE_WIDTH and
    bucketed beyond it; with the XLA reference, which gathers the whole width, widths follow the longest
    row. All give generate's tokens."""
    cfg = lj.PRESETS["tiny"]  # head_dim 16: the kernel takes it
    params = lj.init_params(cfg, jax.random.key(4))
    prompts = [list(map(int, np.random.default_rng(n).integers(3, cfg.vocab_size, n))) for n in (5, 20, 30)]
    want = {dtype: lj.generate_tokens(params, cfg, prompts, max_new_tokens=24, eos_id=-1, cache_dtype=dtype)
            for dtype in (None, "float8_e4m3fn")}
    kernel = Kernels(paged_attention="pallas", interpret=True)
    widths = {}
    for name, kernels, dtype in (("xla", Kernels.xla(), None), ("kernel", kernel, None),
                                 ("kernel, 8-bit cache", kernel, "float8_e4m3fn"),
                                 ("kernel, fixed up to 8", kernel, None)):
        if name == "kernel, fixed up to 8":
            monkeypatch.setattr(importlib.import_module("llama_jax.engine"), "FIXED_DECODE_WIDTH", 8)
        engine = Engine(params, cfg, eos_id=-1, max_batch=8, kv_blocks=64, block_size=4, prefill_tokens=16,
                        kernels=kernels, cache_dtype=dtype)
        outs = {}
        for i, p in enumerate(prompts):
            engine.submit(p, Request(max_tokens=24), _collect(outs, i))
        while not engine.idle:
            engine.step()
        assert [outs[i] for i in range(3)] == want[dtype], name
        widths[name] = {width for _, tokens, width in engine.shapes_dispatched if tokens == 1}
    # 54 tokens at most: 14 blocks of 4; the context, 128 tokens: 32
    assert widths == {"xla": {8, 16}, "kernel": {32}, "kernel, 8-bit cache": {32}, "kernel, fixed up to 8": {8, 16}}


@pytest.mark.parametrize("policy, kv_heads, block_size, form", [
    ("pallas_dots", 4, 16, "dots"), ("pallas_dots", 4, 4, "reference"),
    ("pallas", 2, 16, "dots"), ("pallas", 4, 16, "vector"), ("pallas", 2, 4, "vector")])
def test_engine_through_the_kernels_dot_form(monkeypatch, policy, kv_heads, block_size, form):
    """The engine's decode steps run the kernel's dot form (interpreted) under the policy's "pallas_dots",
    and under "pallas" where query heads share kv heads; a pool block of fewer than 16 slots takes the XLA
    reference under "pallas_dots" (`supported` refuses it) and the vector form under "pallas". Tokens
    equal generate's in every case."""
    calls, kernel = [], pallas_paged_attention.paged_attention

    def counted(*args, **kw):
        calls.append(kw["tensor_cores"])
        return kernel(*args, **kw)

    monkeypatch.setattr(pallas_paged_attention, "paged_attention", counted)
    cfg = lj.PRESETS["tiny"].replace(n_kv_heads=kv_heads)  # 4 query heads of 16 dims
    params = lj.init_params(cfg, jax.random.key(5))
    prompts = [list(map(int, np.random.default_rng(n).integers(3, cfg.vocab_size, n))) for n in (5, 20, 30)]
    want = lj.generate_tokens(params, cfg, prompts, max_new_tokens=12, eos_id=-1)
    engine = Engine(params, cfg, eos_id=-1, max_batch=8, kv_blocks=64, block_size=block_size, prefill_tokens=16,
                    kernels=Kernels(paged_attention=policy, interpret=True))
    outs = {}
    for i, p in enumerate(prompts):
        engine.submit(p, Request(max_tokens=12), _collect(outs, i))
    while not engine.idle:
        engine.step()
    assert [outs[i] for i in range(3)] == want
    assert {"dots": calls and all(calls), "vector": calls and not any(calls), "reference": not calls}[form]


def test_warm_up_compiles_every_decode_bucket_first(stories, reference, monkeypatch):
    """Engine.warm_up compiles the decode step for each row bucket, greedy and sampled (greedy only with
    sampled=False), with padding rows only: requests afterwards meet no new decode shape, and their tokens
    are still generate's."""
    ids, want = reference
    engine_module = importlib.import_module("llama_jax.engine")
    real, calls = engine_module.forward_and_sample, []
    monkeypatch.setattr(engine_module, "forward_and_sample",
                        lambda *args, **kw: calls.append((args[5].shape[0], kw["greedy"])) or real(*args, **kw))
    engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id, **ENGINE)
    engine.warm_up(sampled=False)
    assert calls == [(8, True), (16, True), (32, True)]
    calls.clear()
    engine.warm_up()
    assert sorted(calls) == [(8, False), (8, True), (16, False), (16, True), (32, False), (32, True)]
    warmed = set(engine.shapes_dispatched)
    assert warmed == {(8, 1, 8), (16, 1, 8), (32, 1, 8)}  # max_batch 32; contexts of 8 blocks at most
    outs = {}
    for i, p in enumerate(ids[:4]):
        engine.submit(p, Request(max_tokens=20), _collect(outs, i))
    while not engine.idle:
        engine.step()
    assert [outs[i] for i in range(4)] == [w[:20] for w in want[:4]]
    assert {s for s in engine.shapes_dispatched if s[1] == 1} == warmed
    assert engine.stats()["kv_blocks_used"] == 0


def test_a_failed_step_ends_the_requests_in_flight_and_the_engine_goes_on(stories, reference, monkeypatch):
    """A device call that raises (here the third) ends every request in flight with "error", including the
    one whose tokens were still in flight; the engine starts over with an empty cache and serves the next
    requests exactly."""
    ids, want = reference
    engine_module = importlib.import_module("llama_jax.engine")
    real, calls = engine_module.forward_and_sample, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_and_sample", failing)
    engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id, **ENGINE)
    engine.start()
    try:
        outs, done = {}, threading.Event()

        def collect(key):
            def on_tokens(tokens, finish):
                _collect(outs, key)(tokens, finish)
                if finish and all(("finish", k) in outs for k in range(2)) and key in (0, 1):
                    done.set()
            return on_tokens

        for i in range(2):
            engine.submit(ids[i], Request(max_tokens=30), collect(i))
        assert done.wait(60)
        assert [outs[("finish", i)] for i in range(2)] == ["error", "error"]
        assert str(engine.last_error) == "device lost"
        for i in range(2):
            assert outs.get(i, []) == want[i][:len(outs.get(i, []))]  # what was handed out was right
        finished = threading.Event()
        engine.submit(ids[2], Request(max_tokens=20), lambda t, f: (_collect(outs, 2)(t, f), f and finished.set()))
        assert finished.wait(60)
        assert outs[2] == want[2][:20] and outs[("finish", 2)] == "length"
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        engine.stop(deadline=1)


def test_engine_with_an_8_bit_cache_equals_generate_with_one(stories, reference):
    """Engine(cache_dtype="float8_e4m3fn"): a byte a key or value element, so more blocks in the same memory;
    its greedy tokens are generate's with the same 8-bit dense cache (keys and values rounded alike)."""
    ids, _ = reference
    want = lj.generate_tokens(stories.params, stories.config, ids[:4], max_new_tokens=24,
                              eos_id=stories.tokenizer.eos_id, cache_dtype="float8_e4m3fn")
    engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id, cache_dtype="float8_e4m3fn",
                    **ENGINE)
    outs = {}
    for i, p in enumerate(ids[:4]):
        engine.submit(p, Request(max_tokens=24), _collect(outs, i))
        engine.step()
    while not engine.idle:
        engine.step()
    assert [outs[i] for i in range(4)] == want
    assert engine.cache_dtype == "float8_e4m3fn"
    cfg = stories.config.replace(max_seq_len=1 << 20)  # wants more than the 1 GiB the CPU is given
    # A quarter of float32's bytes (the CPU's compute dtype): four times the blocks in the same memory.
    wide, narrow = default_kv_blocks(cfg, 16, 64), default_kv_blocks(cfg, 16, 64, cache_dtype="float8_e4m3fn")
    assert 4 * wide <= narrow < 4 * (wide + 1)


def test_engine_under_random_arrivals_cancellations_eos_and_preemption(stories):
    """24 random prompts arriving at random steps with random max_tokens, some cancelled, an EOS that greedy
    rows produce, in a pool of 7 blocks (preemptions): every request's tokens and finish reason are
    generate's (a cancelled one's, a prefix of them), and every block comes back."""
    cfg, rng = stories.config, random.Random(4)  # a seed under which 4 sequences are preempted
    prompts = [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(0, 40))] for _ in range(24)]
    free = lj.generate_tokens(stories.params, cfg, prompts, max_new_tokens=40, eos_id=-1)
    eos = collections.Counter(t for row in free for t in row).most_common(3)[2][0]  # stops some rows early
    engine = Engine(stories.params, cfg, eos_id=eos, max_batch=8, kv_blocks=7, block_size=16, prefill_tokens=32)
    outs, ids, max_tokens, cancelled = {}, {}, {}, set()
    waiting = list(range(len(prompts)))
    while waiting or not engine.idle:
        if waiting and rng.random() < 0.5:
            i = waiting.pop()
            max_tokens[i] = rng.randrange(1, 41)
            ids[i] = engine.submit(prompts[i], Request(max_tokens=max_tokens[i]), _collect(outs, i))
        if ids and rng.random() < 0.05:
            i = rng.choice(list(ids))
            engine.cancel(ids[i])
            cancelled.add(i)
        engine.step()
    for i in ids:
        want = free[i][:max_tokens[i]]
        want, reason = (want[:want.index(eos)], "stop") if eos in want else (want, "length")
        got = outs.get(i, [])
        if outs[("finish", i)] == "cancelled":
            assert i in cancelled and got == want[:len(got)], i
        else:
            assert (got, outs[("finish", i)]) == (want, reason), i
    assert engine.preemptions > 0 and engine.stats()["kv_blocks_used"] == 0
    assert {outs[("finish", i)] for i in ids} == {"stop", "length", "cancelled"}


def test_engine_seeded_sampling_equals_generate(stories):
    """A seeded sample is generate's for the same seed, beside a greedy row in the same batch."""
    tok = stories.tokenizer
    engine = Engine(stories.params, stories.config, eos_id=tok.eos_id, **ENGINE)
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    outs = {}
    for i, p in enumerate(ids):
        engine.submit(p, Request(max_tokens=20, temperature=0.9, top_p=0.9, top_k=20, seed=i + 5), _collect(outs, i))
    engine.submit(ids[0], Request(max_tokens=20), _collect(outs, "greedy"))  # a greedy row in the same batch
    while not engine.idle:
        engine.step()
    for i, p in enumerate(ids):
        assert outs[i] == lj.generate_tokens(stories.params, stories.config, [p], 20, temperature=0.9, top_p=0.9,
                                             top_k=20, seed=i + 5, eos_id=tok.eos_id)[0]


def test_engine_greedy_equals_generate_on_smollm2():
    """The default model (30 layers, 9 query heads over 3 kv heads), a chat prompt of 35 tokens prefilled in
    chunks of 16 beside a short prompt decoding: the same greedy tokens as generate."""
    model = lj.load(smollm2_path(), compute_dtype="float32")
    tok = model.tokenizer
    ids = [tok.encode("The capital of France is"), chat_tokens(tok, [{"role": "user", "content": "Write a haiku."}])]
    want = lj.generate_tokens(model.params, model.config, ids, max_new_tokens=8, eos_id=tok.eos_id)
    engine = Engine(model.params, model.config, eos_id=tok.eos_id, max_batch=8, kv_blocks=16, prefill_tokens=16)
    outs = {}
    for i, p in enumerate(ids):
        engine.submit(p, Request(max_tokens=8), _collect(outs, i))
        engine.step()
    while not engine.idle:
        engine.step()
    assert [outs[0], outs[1]] == want and want[0][0] == 7042  # " Paris"


# ---------------------------------------------------------------------------------------------
# A real server


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(stories):
    engine = Engine(stories.params, stories.config, eos_id=stories.tokenizer.eos_id, **ENGINE)
    engine.start()
    app = make_app(engine, stories.tokenizer, "stories")
    sock = _free_socket()
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    yield engine, port
    uv.should_exit = True
    thread.join(10)
    engine.stop(deadline=1)


def _client(port, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, **kw)


def test_completions_and_chat_equal_generate(server, stories):
    engine, port = server
    client = _client(port)
    assert [m.id for m in client.models.list().data] == ["stories"]
    want = want_completion = lj.generate(stories, "Once upon a time", max_new_tokens=24)[0]
    done = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 24
    pieces = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == want

    messages = [{"role": "user", "content": "Tell me about the dog."}]
    ids = chat_tokens(stories.tokenizer, messages)
    want = "".join(lj.stream(stories, ids, max_new_tokens=20))
    done = client.chat.completions.create(model="stories", messages=messages, max_tokens=20, temperature=0)
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="stories", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 20

    # A stop string ends the text before it, streamed or not, and frees the sequence.
    full = want_completion
    stop = full[full.index("girl"):][:6]
    done = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=24, temperature=0,
                                     stop=[stop])
    assert done.choices[0].text == full[:full.index(stop)] and done.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def _blocks_return_to_zero(engine, seconds=10):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = engine.stats()
        if s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"the engine did not drain: {engine.stats()}")


def test_fifty_concurrent_clients_with_cancellations(server, stories, reference):
    """50 clients at once (32 rows decode, the rest queue), streamed or not, of random lengths, a third of
    them leaving early (closing a stream after a few chunks, or timing out): every request ends, the greedy
    answers that completed are generate's, the KV blocks in use return to zero, and answers stay right
    afterwards."""
    engine, port = server
    tok = stories.tokenizer
    ids, ref = reference

    def expected(i, n):
        text = TextStream(tok, ids[i], [])
        text.add(ref[i][:n])
        return text.text

    def client_run(k):
        rng = random.Random(k)
        i, n, stream, leave = rng.randrange(len(PROMPTS)), rng.randint(1, 64), rng.random() < 0.5, rng.random() < 0.33
        client = _client(port, timeout=rng.uniform(0.05, 0.3) if leave and not stream else 60)
        try:
            if stream:
                chunks = client.completions.create(model="stories", prompt=PROMPTS[i], max_tokens=n, temperature=0,
                                                   stream=True)
                text = ""
                for j, c in enumerate(chunks):
                    text += c.choices[0].text
                    if leave and j == 2:
                        chunks.close()
                        return "left"
                return i, n, text
            done = client.completions.create(model="stories", prompt=PROMPTS[i], max_tokens=n, temperature=0)
            return i, n, done.choices[0].text
        except openai.APITimeoutError:
            return "left"

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(client_run, range(50)))
    left = [r for r in results if r == "left"]
    answered = [r for r in results if r != "left"]
    assert len(left) + len(answered) == 50 and len(left) >= 5
    for i, n, text in answered:
        assert text == expected(i, n), (i, n)
    _blocks_return_to_zero(engine)
    done = _client(port).completions.create(model="stories", prompt=PROMPTS[2], max_tokens=30, temperature=0)
    assert done.choices[0].text == expected(2, 30)
    metrics = urlopen_text(port, "/metrics")
    assert "llama_jax_kv_blocks_in_use 0.0" in metrics and "llama_jax_time_to_first_token_seconds_count" in metrics


def urlopen_text(port, path, method="GET", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return text if method == "GET" else (r.status, json.loads(text))


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "Hi", "frequency_penalty": 1}, 400, "unknown parameter 'frequency_penalty'"),
    ({"prompt": "Hi", "n": 2}, 400, "only n=1"),
    ({"prompt": [1] * 2100}, 400, "context of 2048"),
    ({"prompt": "Hi", "max_tokens": 2047}, 400, "more than the context of 2048"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "'max_tokens' must be in [1, inf]"),
    ({"prompt": "Hi", "temperature": -1}, 400, "'temperature'"),
    ({"prompt": "Hi", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"prompt": {"text": "Hi"}}, 400, "'prompt' must be"),
    ({"prompt": [1, 600]}, 400, "outside [0, 512)"),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
])
def test_bad_input_gets_its_status(server, body, status, message):
    engine, port = server
    got_status, got = urlopen_text(port, "/v1/completions", "POST", body if isinstance(body, bytes) else
                                   json.dumps(body))
    assert got_status == status and message in got["error"]["message"], got
    assert json.loads(urlopen_text(port, "/health")) == {"status": "ok"}


def test_health_answers_503_while_the_engine_warms_up(server):
    engine, port = server
    engine.warming = True  # as Engine.start(warm_up=True) sets it until its warm-up is done
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())) == (503, {"status": "warming up"})
        conn.close()
    finally:
        engine.warming = False
    assert json.loads(urlopen_text(port, "/health")) == {"status": "ok"}


def test_bad_input_through_the_openai_client(server):
    engine, port = server
    client = _client(port)
    with pytest.raises(openai.BadRequestError, match="unknown parameter 'foo'"):
        client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"foo": 1})
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="stories", messages=[{"role": "robot", "content": "Hi"}])
    engine.max_queue, before = 0, engine.max_queue  # a full queue
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.completions.create(model="stories", prompt="Hi")
    finally:
        engine.max_queue = before
    assert client.completions.create(model="stories", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_drains_then_exits_zero(tmp_path):
    """`llama-jax serve` in its own process: it warms up (showing progress) before /health answers ok, a
    stream in flight when SIGTERM comes runs to its end, new connections are refused, and the process exits
    0."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", "serve", "--model", str(STORIES_GGUF), "--port",
                             str(port), "--kv-blocks", str(ENGINE["kv_blocks"]), "--max-batch",
                             str(ENGINE["max_batch"]), "--prefill-tokens", str(ENGINE["prefill_tokens"]),
                             "--drain-timeout", "20"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if json.loads(urlopen_text(port, "/health")) == {"status": "ok"}:
                    break  # before: refused (loading), or 503 "warming up"
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        stream = _client(port).completions.create(model="stories260K.gguf", prompt="Once", max_tokens=1000,
                                                  temperature=0, stream=True)
        text, finish = next(iter(stream)).choices[0].text, None
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10  # uvicorn looks at its exit flag every 0.1 s, then closes its socket
        while time.monotonic() < end:
            try:
                urlopen_text(port, "/health")
            except OSError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("still accepting connections 10 s after SIGTERM")
        for c in stream:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        assert finish == "length" and len(text) > 1000
        assert proc.wait(30) == 0, proc.communicate()[1][-2000:]
        assert "compiling decode steps" in proc.stderr.read()  # the warm-up's progress, before /health said ok
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
