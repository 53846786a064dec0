"""The decode step's GPU Pallas kernels, run by Pallas' interpreter on the CPU: the fused rotary + cache
write + attention kernel (ops/pallas_decode_attention.py) and the bf16 matmul that reads one layer of a
stacked weight where it lies (ops/pallas_qmatmul.py matmul), each against the XLA computation it replaces
(ops/attention.py, ops/matmul.py), the kernel policy that chooses them (Kernels.auto), and the model's
decode step with both chosen (Kernels) against the plain XLA step (Kernels.xla())."""

import dataclasses
import functools
import types
import zlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import model, ops
from llama_jax.generate import Sampling, decode_loop, next_logits
from llama_jax.model import KVCache
from llama_jax.ops import Kernels, cuda_matvec, pallas_qmatmul
from llama_jax.ops import pallas_decode_attention as PDA
from llama_jax.ops.matmul import LayerView


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------
# decode_attention


def _grid(fn, *args) -> tuple[int, ...]:
    """The grid of the one pallas_call that fn(*args) traces to (looked for inside nested jits too)."""
    def grids(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                yield tuple(e.params["grid_mapping"].grid)
                continue
            for p in e.params.values():
                if isinstance(p, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from grids(getattr(p, "jaxpr", p))

    found = list(grids(jax.make_jaxpr(fn)(*args).jaxpr))
    assert len(found) == 1, found
    return found[0]


def _decode_mask(kind: str, batch: int, max_len: int, start: int, rng) -> np.ndarray:
    """[batch, 1, max_len] bool: slots <= start, less left padding (row b pads b * pad slots) or random
    holes; slot `start` always valid, slots after it never."""
    slots = np.arange(max_len)
    mask = np.broadcast_to(slots <= start, (batch, max_len)).copy()
    if kind == "left_pad":
        pad = max(1, start // 2)  # row 1's padding spans more than one chunk in the chunked cases
        for b in range(batch):
            mask[b, :min(b * pad, start)] = False
    elif kind == "holes":
        mask &= rng.random((batch, max_len)) < 0.6
    mask[:, start] = True
    return mask[:, None, :]


# batch, heads, kv_heads, head_dim, max_len, layers, layer, start, mask kind, dtype, programs along the cache
# (min(max_len // block, cdiv(FILL_PROGRAMS, batch * heads)) chunks, block the largest of 64/32/16 dividing max_len,
# or of 32/16 where batch * heads >= FILL_PROGRAMS)
DECODE_CASES = {
    "mha-1chunk-start0": (2, 4, 4, 32, 64, 2, 0, 0, "all", jnp.bfloat16, 1),
    "mha-1chunk-mid-leftpad": (2, 4, 4, 32, 64, 3, 1, 37, "left_pad", jnp.bfloat16, 1),
    "gqa4-1chunk-last-holes-f16": (2, 4, 1, 32, 64, 3, 2, 63, "holes", jnp.float16, 1),
    "gqa4-16chunks-mid-leftpad": (2, 4, 1, 32, 1024, 2, 1, 700, "left_pad", jnp.bfloat16, 16),
    "gqa4-16chunks-start0-f16": (2, 4, 1, 32, 1024, 2, 0, 0, "all", jnp.float16, 16),
    "mha-3chunks-last-leftpad-f16": (2, 4, 4, 32, 48, 3, 1, 47, "left_pad", jnp.float16, 3),  # blocks of 16
    "gqa3-3chunks-mid-holes": (2, 6, 2, 32, 48, 3, 1, 21, "holes", jnp.bfloat16, 3),
    # 16 blocks of 64 over cdiv(264, 24) = 11 programs: 8 chunks of 2 blocks
    "gqa3-8chunks-of-2-blocks-leftpad": (2, 12, 4, 32, 1024, 3, 1, 600, "left_pad", jnp.bfloat16, 8),
    # 9 x 32 = 288 programs fill the GPU (FILL_PROGRAMS): no split, and blocks of 32 (not 64) up to slot 70
    "mha-288-programs-blocks-of-32-leftpad": (9, 32, 32, 32, 128, 2, 1, 70, "left_pad", jnp.bfloat16, 1),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention_kernel_equals_xla_rope_cache_write_and_attention(case):
    """decode_attention, interpreted, against the model's XLA path: rotary on q and k (apply_rope), the new
    k and v written at (layer, slot `start`) with dynamic_update_slice, attention over that layer's cache
    under the mask in float32. The returned caches are bit-identical to the reference (the new slot rotated
    and rounded alike, every other slot and layer untouched) and the output agrees to bf16/f16 rounding;
    over MHA and GQA heads, one chunk and several (flash-decoding combine), slot 0, a middle slot and the
    last, padded or holed masks, layer 0 and a middle layer."""
    batch, heads, kv_heads, head_dim, max_len, layers, layer, start, kind, dtype, chunks = DECODE_CASES[case]
    seed = zlib.crc32(case.encode())
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(dtype))  # noqa: E731
    q = normal(batch, 1, heads, head_dim)
    k, v = normal(batch, 1, kv_heads, head_dim), normal(batch, 1, kv_heads, head_dim)
    cache_shape = (layers, batch, max_len, kv_heads, head_dim)
    # stale values everywhere, slot `start` included: the kernel must overwrite it and read the new token
    cache_k, cache_v = normal(*cache_shape), normal(*cache_shape)
    positions = jnp.asarray(start + 5 + 3 * np.arange(batch), jnp.int32)[:, None]  # rows at different angles
    inv_freq = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim), jnp.float32)
    rope = model.rope_tables(positions, inv_freq)
    mask = jnp.asarray(_decode_mask(kind, batch, max_len, start, rng))
    layer, start = jnp.int32(layer), jnp.int32(start)

    @jax.jit
    def reference(q, k, v, rope, cache_k, cache_v, layer, start, mask):
        qr, kr = model.apply_rope(q, rope), model.apply_rope(k, rope)
        ref_k = jax.lax.dynamic_update_slice(cache_k, kr[None], (layer, 0, start, 0, 0))
        ref_v = jax.lax.dynamic_update_slice(cache_v, v[None], (layer, 0, start, 0, 0))
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        out = ops.attention(Kernels.xla(), f32(qr), f32(ref_k[layer]), f32(ref_v[layer]), causal=False, mask=mask)
        return out, ref_k, ref_v

    args = (q, k, v, rope, cache_k, cache_v, layer, start, mask)
    ref, ref_k, ref_v = reference(*args)
    ref = np.asarray(ref)
    kernel = functools.partial(PDA.decode_attention, interpret=True)
    assert _grid(kernel, *args) == (batch, heads, chunks)  # the case covers the split it is named for
    out, got_k, got_v = jax.jit(kernel)(*args)
    assert out.shape == q.shape and out.dtype == dtype
    assert got_k.dtype == dtype and got_v.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(ref_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(ref_v))
    out = np.asarray(out.astype(jnp.float32))
    assert np.abs(out - ref).max() < 1e-2, np.abs(out - ref).max()
    # no worse than rounding the exact result to the dtype (zero where the output is one slot's v)
    rounding = _rel(ref.astype(dtype), ref)
    assert _rel(out, ref) <= 1.5 * rounding + 1e-7, (_rel(out, ref), rounding)


def test_decode_block_is_32_slots_once_the_programs_fill_the_gpu():
    """Slots a program reads at a time, by cache length and batch x heads: 64 while the cache is split over
    programs (fewer than FILL_PROGRAMS = 264), 32 once they fill the GPU unsplit; else the largest that divides."""
    assert PDA.FILL_PROGRAMS == 264
    assert PDA.decode_block(256, 32) == 64       # batch 1 of Llama-2-7B
    assert PDA.decode_block(256, 263) == 64
    assert PDA.decode_block(256, 264) == 32
    assert PDA.decode_block(256, 512) == 32      # batch 16
    assert PDA.decode_block(96, 32) == 32        # 64 does not divide 96
    assert PDA.decode_block(48, 512) == 16
    assert PDA.decode_block(40, 1) is None


def _fake_devices(n: int, platform: str = "gpu", compute_capability: str = "8.0"):
    """n stand-ins for devices, as much of one as Kernels.auto reads (platform, compute capability)."""
    return [types.SimpleNamespace(platform=platform, compute_capability=compute_capability, id=i) for i in range(n)]


def test_policy_chooses_the_gpu_kernels_on_one_gpu_only():
    """Kernels.auto decides from the devices the call runs on: on one GPU the Pallas decode attention, the
    Pallas matmul (with `o` read from the stack) and an unrolled decode scan; on two GPUs (a sharded run)
    no single-device kernel; on the CPU none of the GPU kernels (the native CPU matmul at most)."""
    one = Kernels.auto(devices=_fake_devices(1))
    assert (one.decode_attention, one.matmul, one.matvec) == ("pallas", "pallas", "xla")  # not Hopper: no CUDA matvec
    assert one.stacked_weights == ("o",) and one.decode_unroll and one.attention == "cudnn"
    two = Kernels.auto(devices=_fake_devices(2))
    assert (two.decode_attention, two.matmul, two.matvec, two.stacked_weights) == ("xla", "xla", "xla", ())
    assert jax.default_backend() == "cpu"
    cpu = Kernels.auto()
    assert (cpu.attention, cpu.decode_attention, cpu.matvec) == ("xla", "xla", "xla")
    assert cpu.matmul in ("xla", "native") and cpu.stacked_weights == ()
    assert Kernels.auto(devices=jax.devices()[:2]).matmul == "xla"  # two CPU devices: no native kernel either
    with pytest.raises(ValueError, match="decode_attention"):
        Kernels(decode_attention="cuda")


def test_cpu_policy_runs_no_gpu_kernel(monkeypatch):
    """A decode step under the CPU's Kernels.auto() (bf16 weights, one query row, shapes every GPU kernel
    would take) never calls the Pallas attention, the Pallas matmuls or the CUDA kernels."""
    def refuse(*a, **k):
        raise AssertionError("a GPU kernel was called on the CPU")

    for mod, name in ((PDA, "decode_attention"), (pallas_qmatmul, "matmul"), (pallas_qmatmul, "qmatmul"),
                      (cuda_matvec, "matvec"), (cuda_matvec, "decode_layer")):
        monkeypatch.setattr(mod, name, refuse)
    cfg = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(3))
    cache = KVCache.zeros(cfg, 1, 16)
    logits, _ = next_logits(params, jnp.asarray([5], jnp.int32), jnp.asarray([0], jnp.int32), cache, cfg, Kernels.auto())
    assert logits.shape == (1, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_decode_kernel_takes_only_what_it_supports():
    """pallas_decode_attention.supported accepts a bf16/f16 single-row query with a cache of its dtype, a
    length divisible by 16 and a head_dim divisible by 32, and refuses each of: several query rows,
    float32, a cache of another dtype, a length no block divides, head_dim 16. (Several devices: the
    policy never chooses it, test above.)"""
    sds = jax.ShapeDtypeStruct
    serves = lambda q, c: PDA.supported(sds(q[0], q[1]), sds(c[0], c[1]))  # noqa: E731
    bf, f16 = jnp.bfloat16, jnp.float16
    assert serves(((2, 1, 4, 64), bf), ((2, 2, 64, 1, 64), bf))
    assert serves(((2, 1, 4, 128), f16), ((2, 2, 48, 1, 128), f16))
    assert not serves(((2, 3, 4, 64), bf), ((2, 2, 64, 1, 64), bf))  # prefill rows
    assert not serves(((2, 1, 4, 64), jnp.float32), ((2, 2, 64, 1, 64), jnp.float32))
    assert not serves(((2, 1, 4, 64), bf), ((2, 2, 64, 1, 64), f16))
    assert not serves(((2, 1, 4, 64), bf), ((2, 2, 40, 1, 64), bf))
    assert not serves(((2, 1, 4, 16), bf), ((2, 2, 64, 1, 16), bf))


# ---------------------------------------------------------------------------------------------
# pallas_qmatmul.matmul: bf16 weights read from the stack


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_dense_gpu_kernel_equals_float32_matmul_of_the_layer(rows):
    """pallas_qmatmul.matmul, interpreted: x [rows, K] bf16 times layer `layer` of a stacked bf16 weight (and a
    2-D weight with no layer) equals x @ w[layer] in float32, as a float32 [rows, N], for every K split
    (and both row paths: one row on the CUDA cores, rows padded to 16 on the tensor cores)."""
    k, n = 256, 128
    w = (jax.random.normal(jax.random.key(rows), (3, k, n)) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(100 + rows), (rows, k)).astype(jnp.bfloat16)
    for layer in (0, 2):
        ref = np.asarray(x.astype(jnp.float32) @ w[layer].astype(jnp.float32))
        for split in (None, 1, 2):
            if split:
                assert _grid(functools.partial(pallas_qmatmul.matmul, split=split, interpret=True), x, w, layer)[1] == split
            got = pallas_qmatmul.matmul(x, w, layer, split=split, interpret=True)
            assert got.shape == (rows, n) and got.dtype == jnp.float32
            assert _rel(got, ref) < 1e-5, (layer, split)
    ref = np.asarray(x.astype(jnp.float32) @ w[1].astype(jnp.float32))
    got = pallas_qmatmul.matmul(x, w[1], interpret=True)
    assert got.shape == (rows, n)
    assert _rel(got, ref) < 1e-5
    if rows == 1:  # one row padded to 16 for the tensor cores (the sweep's tensor_cores setting)
        assert _rel(pallas_qmatmul.matmul(x, w, 1, tensor_cores=True, interpret=True), ref) < 1e-5
    if rows == 64:  # a narrower column block, as pick_blocks gives where it caps the parts
        assert _rel(pallas_qmatmul.matmul(x, w, 1, bn=32, split=2, interpret=True), ref) < 1e-5


def test_block_choice_caps_the_float32_parts_at_many_rows():
    """pick_blocks (quantized weights; bf16 takes pick_dense_blocks, below) on Llama-2-7B's decode
    products (K units of 128 rows, 4 programs an H100 SM): at 16 rows the widest block and fewest parts
    that fill the SMs; at 64 rows every launch whose K has a fitting divisor writes at most PARTS_BYTES of
    parts (the o projection split 32 ways writes 33.5 MB, a bf16 o's size) and still fills the SMs."""
    pick, cap, programs = pallas_qmatmul.pick_blocks, pallas_qmatmul.PARTS_BYTES, 4 * 132
    launches = {"qkv": (4096, (4096,) * 3), "o": (4096, (4096,)), "gate_up": (4096, (11008,) * 2),
                "down": (11008, (4096,))}
    at_16 = {name: pick(k // 128, ns, 16, programs) for name, (k, ns) in launches.items()}
    assert at_16 == {"qkv": (128, 8), "o": (128, 32), "gate_up": (128, 4), "down": (128, 43)}
    for name, (k, ns) in launches.items():
        bn, split = pick(k // 128, ns, 64, programs)
        assert all(n % bn == 0 for n in ns) and (k // 128) % split == 0, name
        assert sum(ns) // bn * split >= programs, name
        if name != "down":  # 86 units: no split between 2 (256 programs) and 43 (45 MB of parts)
            assert split * 64 * sum(ns) * 4 <= cap, name
    assert pick(32, (4096,), 64, programs) == (64, 16)


def test_dense_block_choice_takes_the_fewest_parts_that_give_each_sm_a_program():
    """pick_dense_blocks on Llama-2-7B's bf16 decode products (K units of 128 rows): the fewest parts of K,
    then the widest column block, with at least 132 programs. For the three shapes swept on an H100 at 16
    rows that is the sweep's fastest setting or within 2.5% of it (o and down: block 32 in 2 parts;
    gate: block 64 whole). Llama-3-8B's k and v (1024 columns) split 8 ways to fill the SMs; too few
    columns and units for 132 programs give the most programs there are."""
    pick = pallas_qmatmul.pick_dense_blocks
    launches = {"o": (4096, (4096,)), "gate": (4096, (11008,)), "down": (11008, (4096,)),
                "qkv": (4096, (4096,) * 3), "gate_up": (4096, (11008,) * 2), "kv_8b": (4096, (1024,))}
    picks = {name: pick(k // 128, ns) for name, (k, ns) in launches.items()}
    assert picks == {"o": (32, 2), "gate": (64, 1), "down": (32, 2), "qkv": (64, 1), "gate_up": (128, 1),
                     "kv_8b": (32, 8)}
    for name, (k, ns) in launches.items():
        bn, split = picks[name]
        assert sum(ns) // bn * split >= 132, name
        assert split * 64 * sum(ns) * 4 <= pallas_qmatmul.PARTS_BYTES, name  # small parts even at 64 rows
    assert pick(2, (128,)) == (32, 2)  # 8 programs: all there are


@pytest.mark.parametrize("rows", [1, 16])
def test_dense_gpu_kernel_runs_several_weights_in_one_launch(rows):
    """q/k/v-like bf16 stacks of different widths given as a tuple: one pallas_call over all their column
    blocks, one output per weight, each equal to x @ its layer in float32, whether K is split or not; a
    column block that does not divide every N is refused."""
    k = 256  # 2 units of K for 16 rows (128 a step), 4 for one row: split 2 divides both
    ws = tuple((jax.random.normal(jax.random.key(i), (2, k, n)) * 0.02).astype(jnp.bfloat16)
               for i, n in enumerate((64, 32, 48)))
    x = jax.random.normal(jax.random.key(9), (rows, k)).astype(jnp.bfloat16)
    for split in (None, 1, 2):
        # one launch: 144 columns in blocks of 16 (the largest dividing 64, 32 and 48)
        assert _grid(functools.partial(pallas_qmatmul.matmul, split=split, interpret=True), x, ws, 1)[0] == 9
        outs = pallas_qmatmul.matmul(x, ws, 1, split=split, interpret=True)
        assert isinstance(outs, tuple) and len(outs) == 3
        for got, w in zip(outs, ws):
            ref = np.asarray(x.astype(jnp.float32) @ w[1].astype(jnp.float32))
            assert got.shape == ref.shape
            assert _rel(got, ref) < 1e-5, split
    with pytest.raises(ValueError, match="must divide every N"):
        pallas_qmatmul.matmul(x, ws, 1, bn=64, interpret=True)


def test_dense_gpu_kernel_serves_only_what_it_supports():
    """supported_dense accepts bf16 x [M <= 64, K] and bf16 weights [(L,) K, N] (one or a tuple) with K and
    N multiples of 16, and refuses each of: more than 64 rows, float32 activations or weights, an N or K
    that 16 does not divide, a weight of another K. (Which devices: the policy's, tests above.)"""
    assert pallas_qmatmul.rows_fit(64, jnp.bfloat16) and not pallas_qmatmul.rows_fit(65, jnp.bfloat16)
    assert not pallas_qmatmul.rows_fit(1, jnp.float32)
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    w, w2 = sds((2, 64, 128), bf), sds((64, 48), bf)
    x = sds((2, 64), bf)
    assert pallas_qmatmul.supported_dense(w, x)
    assert pallas_qmatmul.supported_dense((w, w2), x)
    assert pallas_qmatmul.supported_dense(w, sds((64, 64), bf))
    assert not pallas_qmatmul.supported_dense(w, sds((65, 64), bf))
    assert not pallas_qmatmul.supported_dense(w, sds((2, 64), jnp.float32))
    assert not pallas_qmatmul.supported_dense(sds((2, 64, 128), jnp.float32), x)
    assert not pallas_qmatmul.supported_dense((w, sds((2, 64, 40), bf)), x)
    assert not pallas_qmatmul.supported_dense(sds((2, 40, 128), bf), sds((2, 40), bf))
    assert not pallas_qmatmul.supported_dense((w, sds((2, 32, 128), bf)), x)


# ---------------------------------------------------------------------------------------------
# The model's decode step through both kernels

# tiny-gqa with head_dim 32 (the decode kernel's least) and N, K multiples of 16 (the matmul kernel's)
CFG = lj.PRESETS["tiny-gqa"].replace(n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=176)
ALL_DENSE = ("o", "q", "k", "v", "gate", "up", "down")
PALLAS = Kernels(decode_attention="pallas", matmul="pallas", stacked_weights=("o",))  # rolled scan: one trace


def test_decode_step_through_both_gpu_kernels_equals_xla_decode(monkeypatch):
    """The model's bf16 decode step with both GPU kernels chosen (Kernels; interpreted here): the
    decode-attention kernel in every layer, and pallas_qmatmul.matmul for the weights of
    Kernels.stacked_weights read from the stack. With ("o",), as Kernels.auto chooses on one GPU, only `o`
    goes through matmul (one weight per call, one call per trace of the layer scan); with every weight
    listed, q/k/v and gate/up go in one launch each, o and down alone. Either way the logits equal the
    Kernels.xla() step's, the cache's new slot matches it to bf16 rounding and every other slot is
    untouched (layer 0's new slot, projected by XLA as in the reference, bit for bit), and the index
    advances by one."""
    cfg = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(3))
    token, pos = jnp.asarray([5, 9], jnp.int32), jnp.asarray([3, 3], jnp.int32)
    cache = KVCache.zeros(cfg, 2, 16)
    ks = jax.random.split(jax.random.key(4), 2)
    cache = dataclasses.replace(
        cache, k=jax.random.normal(ks[0], cache.k.shape).astype(cache.k.dtype),
        v=jax.random.normal(ks[1], cache.v.shape).astype(cache.v.dtype),  # stale slots must stay unread
        index=jnp.int32(3), valid=cache.valid.at[:, :3].set(True))
    assert Kernels.auto(devices=_fake_devices(1)).stacked_weights == PALLAS.stacked_weights
    ref, ref_cache = next_logits(params, token, pos, cache, cfg, Kernels.xla())
    ref = np.asarray(ref)

    calls, attn_calls = [], []
    real_matmul, real_attention = pallas_qmatmul.matmul, PDA.decode_attention
    monkeypatch.setattr(pallas_qmatmul, "matmul",
                        lambda x, w, layer=None: calls.append(w) or real_matmul(x, w, layer, interpret=True))
    monkeypatch.setattr(PDA, "decode_attention",
                        lambda *a, **kw: attn_calls.append(1) or real_attention(*a, **kw, interpret=True))

    def check(got, got_cache, same_projections):
        got = np.asarray(got)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max(), np.abs(got - ref).max()
        assert int(got_cache.index) == int(cache.index) + 1 == int(ref_cache.index)
        np.testing.assert_array_equal(np.asarray(got_cache.valid), np.asarray(ref_cache.valid))
        for name in ("k", "v"):
            new, old, want = (np.asarray(getattr(c, name).astype(jnp.float32)) for c in (got_cache, cache, ref_cache))
            np.testing.assert_array_equal(np.delete(new, 3, axis=2), np.delete(old, 3, axis=2))
            assert not np.array_equal(new[:, :, 3], old[:, :, 3])
            diff = np.abs(new[:, :, 3] - want[:, :, 3])
            if same_projections:  # layer 0 projects its input as XLA does: the kernel's rotary rounds alike
                np.testing.assert_array_equal(new[0, :, 3], want[0, :, 3])
            assert diff.max() <= 2e-3 + 2 ** -7 * np.abs(want[:, :, 3]).max(), (name, diff.max())

    def weights(w):
        return len(w) if isinstance(w, (tuple, list)) else 1

    # not jitted: traced here, with the kernels patched
    check(*next_logits(params, token, pos, cache, cfg, PALLAS), same_projections=True)
    assert [weights(w) for w in calls] == [1]  # `o`, once in the scan body
    assert calls[0][0].shape == (cfg.n_layers, cfg.n_heads * cfg.head_dim, cfg.dim)  # the whole stack
    assert len(attn_calls) == 1

    calls.clear()
    check(*next_logits(params, token, pos, cache, cfg, dataclasses.replace(PALLAS, stacked_weights=ALL_DENSE)),
          same_projections=False)
    assert [weights(w) for w in calls] == [3, 1, 2, 1]  # (q, k, v), o, (gate, up), down
    assert len(attn_calls) == 2


def test_float32_weights_under_bf16_compute_stay_with_xla(monkeypatch):
    """Float32 master weights decoded in bf16 (a training checkpoint): the bf16 matmul kernel does not
    take them, so under the one-GPU policy `o` is still sliced by the scan and multiplied by XLA in bf16,
    and the step equals the Kernels.xla() one exactly."""
    cfg = CFG.replace(param_dtype="float32", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(5))
    token, pos = jnp.asarray([5, 9], jnp.int32), jnp.asarray([3, 3], jnp.int32)
    cache = KVCache.zeros(cfg, 2, 16)
    cache = dataclasses.replace(cache, index=jnp.int32(3), valid=cache.valid.at[:, :3].set(True))
    ref, _ = next_logits(params, token, pos, cache, cfg, Kernels.xla())
    calls = []
    real_matmul = pallas_qmatmul.matmul
    monkeypatch.setattr(pallas_qmatmul, "matmul",
                        lambda x, w, layer=None: calls.append(w) or real_matmul(x, w, layer, interpret=True))
    views = []  # every LayerView (a weight kept whole) is multiplied through its matrix()
    real_matrix = LayerView.matrix
    monkeypatch.setattr(LayerView, "matrix", lambda self, n: views.append(n) or real_matrix(self, n))
    kernels = Kernels(matmul="pallas", stacked_weights=("o",))  # the decode attention has its own tests
    got, _ = next_logits(params, token, pos, cache, cfg, kernels)
    assert calls == [] and views == []
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # the same policy does route bf16 weights to the kernel (so the check above can fail)
    cfg16 = cfg.replace(param_dtype="bfloat16")
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    next_logits(params16, token, pos, KVCache.zeros(cfg16, 2, 16), cfg16, kernels)
    assert len(calls) == 1 and len(views) == 1


def _sliced_projections(jaxpr, shapes) -> int:
    """How many of the stacked projection weights (by shape) a layer scan inside a while loop takes as
    scanned inputs, i.e. slices a layer at a time, in a jaxpr and the jaxprs nested in it."""
    def walk(jaxpr, in_loop):
        n = 0
        for e in jaxpr.eqns:
            if e.primitive.name == "scan" and in_loop:  # a scanned input reaches the body a layer smaller
                body = e.params["jaxpr"].jaxpr.invars
                n += sum(tuple(v.aval.shape) in shapes and b.aval.shape != v.aval.shape
                         for v, b in zip(e.invars, body))
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if isinstance(inner, jax.extend.core.Jaxpr):
                        n += walk(inner, in_loop or e.primitive.name == "while")
        return n
    return walk(jaxpr.jaxpr, False)


def test_device_loop_reads_every_projection_from_the_stack():
    """generate.decode_loop runs its decode step under Kernels.in_device_loop(): inside the while loop the
    Pallas matmul reads every stacked bf16 projection in place, so the layer scan slices none of them
    (XLA copies such a slice every iteration instead of fusing it into its GEMM). The one-GPU policy
    itself keeps XLA's GEMMs (faster dispatched alone) and reads only `o` in place; the XLA policy is left
    as it is."""
    one_gpu = Kernels.auto(devices=_fake_devices(1))
    assert set(one_gpu.in_device_loop().stacked_weights) == set(ALL_DENSE)
    assert Kernels.xla().in_device_loop() == Kernels.xla()
    cfg = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(3))
    layers = params["layers"]
    shapes = {tuple(layers[m][w].shape) for m, ws in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
              for w in ws}
    tokens, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    kernels = dataclasses.replace(PALLAS, interpret=True)

    def sliced(kernels):
        jaxpr = jax.make_jaxpr(lambda p: decode_loop(p, tokens, mask, jax.random.key(0), jnp.int32(-1), cfg, 4,
                                                     Sampling(), 16, kernels))(params)
        return _sliced_projections(jaxpr, shapes)

    assert sliced(kernels) == 0
    # The check can fail: under the XLA policy the loop's layer scan slices all seven.
    assert sliced(Kernels.xla()) == 7
