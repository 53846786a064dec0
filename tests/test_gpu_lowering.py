"""The one-GPU programs, lowered for an H100 on this CPU. JAX lowers a Pallas kernel to Triton IR, and a
custom call to its target name, without a GPU once the trace names an abstract device (an AbstractMesh).
So CI checks, without a GPU, that each kernel lowers at the shapes of the models it serves, and that the
kernel policy for one H100 (Kernels.auto) puts its kernels in the programs users run: at batch 1 the CUDA
decode layer, at larger batches the Pallas decode attention and matmul, the paged kernel in the serving
engine's step, flash attention forward and backward in a packed training step.

Lowering stops before Triton's own passes (layouts, dot operands, software pipelining), where a kernel can
still fail to build, so the last tests here build each kernel for sm_90 (ops/triton_build.py: the
`triton` package and its ptxas) and read what ptxas reports. Running happens on a GPU only
(bench/decode.py, bench/paged_attention_check.py, bench/matvec_gpu_check.py).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import llama_jax as lj
from llama_jax import engine, qarray
from llama_jax.generate import decode_loop, next_logits
from llama_jax.model import PagedKVCache
from llama_jax.ops import Kernels, cuda_matvec, pallas_decode_attention, pallas_flash_attention, \
    pallas_paged_attention, pallas_qmatmul, triton_build
from llama_jax.sharding import MESH_AXES
from llama_jax.train import loss_fn

# JAX 0.12 deprecates Pallas' Triton backend in favour of Mosaic GPU; the kernels here are written for it.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
S = jax.ShapeDtypeStruct
KIND = triton_build.H100.device_kind
TRITON = triton_build.TRITON_CALL


@dataclasses.dataclass(frozen=True)
class _H100:
    """What Kernels.auto reads of a device."""

    platform: str = "gpu"
    device_kind: str = KIND
    compute_capability: str = "9.0"
    id: int = 0


@pytest.fixture(scope="module")
def h100():
    """Kernels.auto for one H100: it builds the CUDA library with nvcc where there is one (the CI machine
    has it) and registers it, as it does on the GPU."""
    return Kernels.auto(devices=[_H100()])


def lowered(fn, *args) -> jax.stages.Lowered:
    """fn(*args) (ShapeDtypeStructs: nothing is allocated) lowered for one H100, on the project's mesh axes."""
    return triton_build.lower(fn, *args, axes=MESH_AXES)


def lower(fn, *args) -> str:
    """fn(*args) lowered for one H100: StableHLO text."""
    return lowered(fn, *args).as_text()


def custom_calls(text: str) -> list[str]:
    return re.findall(r"custom_call @([\w$.]+)", text)


def test_the_policy_for_one_h100(h100):
    assert (h100.attention, h100.masked_attention, h100.decode_attention, h100.paged_attention, h100.matmul) == (
        "cudnn", "pallas", "pallas", "pallas", "pallas")
    assert h100.matvec == ("cuda" if cuda_matvec.available(_H100()) else "xla")


# ---------------------------------------------------------------------------------------------
# Each kernel at the shapes it serves (Llama-2-7B: 32 heads of 128; Llama-3-8B: 32 over 8 kv heads)


@pytest.mark.parametrize("batch,kv_heads,width,group,per_step,pool_dtype", [
    (256, 32, 16, None, 1, "bfloat16"), (256, 32, 16, 2, 4, "bfloat16"), (256, 32, 16, 8, 2, "bfloat16"),
    (256, 32, 16, 1, 1, "bfloat16"),  # the bench's sweep
    (256, 8, 16, None, 1, "bfloat16"), (256, 8, 16, None, 4, "bfloat16"),  # GQA: 4 query heads a program
    (4, 32, 256, None, 1, "bfloat16"), (4, 8, 256, None, 2, "bfloat16"),  # few long rows: split over programs
    (256, 32, 256, None, 1, "float8_e4m3fn"), (4, 8, 256, None, 1, "float8_e4m3fn"),  # an 8-bit pool
])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_paged_attention_lowers(batch, kv_heads, width, group, per_step, pool_dtype, tensor_cores):
    pool = S((32, 4097, 16, kv_heads, 128), jnp.dtype(pool_dtype))
    fn = functools.partial(pallas_paged_attention.paged_attention, group=group, blocks_per_step=per_step,
                           tensor_cores=tensor_cores)
    text = lower(fn, S((batch, 32, 128), jnp.bfloat16), pool, pool, S((), jnp.int32), S((batch, width), jnp.int32),
                 S((batch,), jnp.int32))
    assert custom_calls(text) == [TRITON]


@pytest.mark.parametrize("batch,kv_heads", [(1, 32), (16, 32), (64, 32), (16, 8)])
def test_decode_attention_lowers(batch, kv_heads):
    q, kv = S((batch, 1, 32, 128), jnp.bfloat16), S((batch, 1, kv_heads, 128), jnp.bfloat16)
    rope = (S((batch, 1, 1, 64), jnp.float32),) * 2
    cache = S((32, batch, 256, kv_heads, 128), jnp.bfloat16)
    text = lower(pallas_decode_attention.decode_attention, q, kv, kv, rope, cache, cache, S((), jnp.int32),
                 S((), jnp.int32), S((batch, 1, 256), bool))
    assert TRITON in custom_calls(text)


@pytest.mark.parametrize("kv_heads", [32, 8])
def test_flash_attention_lowers_forward_and_backward(kv_heads):
    """Packed rows (k_start), gradients for q, k and v: the forward kernel and both backward kernels."""
    q, kv = S((1, 1024, 32, 128), jnp.bfloat16), S((1, 1024, kv_heads, 128), jnp.bfloat16)

    def loss(q, k, v, k_start):
        return pallas_flash_attention.flash_attention(q, k, v, k_start).astype(jnp.float32).sum()

    text = lower(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, S((1, 1024), jnp.int32))
    assert custom_calls(text).count(TRITON) == 3


@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_matmul_lowers(rows, bits):
    """The Pallas matmul over a stacked Llama-2-7B q/k/v (one launch for the three) at a decode step's rows."""
    w = S((32, 4096, 4096), jnp.bfloat16)
    if bits == 16:
        ws = (w,) * 3
        fn = pallas_qmatmul.matmul
    else:
        q = jax.eval_shape(functools.partial(qarray.quantize, bits=bits, group=128 if bits == 4 else None), w)
        ws = (q,) * 3
        fn = pallas_qmatmul.qmatmul
    text = lower(lambda x, ws, layer: fn(x, ws, layer), S((rows, 4096), jnp.bfloat16), ws, S((), jnp.int32))
    assert TRITON in custom_calls(text)


# ---------------------------------------------------------------------------------------------
# Whole programs: the policy's kernels are in them (two layers of the released shapes, abstract params)


def _cfg(preset):
    return lj.PRESETS[preset].replace(n_layers=2, param_dtype="bfloat16", compute_dtype="bfloat16", max_seq_len=4096)


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3.1-8b"])
@pytest.mark.parametrize("batch", [1, 16])
def test_decode_step_holds_the_policy_kernels(h100, preset, batch):
    """generate's decode step: at batch 1 each layer is one CUDA decode-layer call and the lm_head the CUDA
    matmul (where the library builds); at batch 16 the Pallas decode attention and the matmul for `o`.
    The XLA policy's step holds no custom call."""
    cfg = _cfg(preset)
    cache = jax.eval_shape(lambda: lj.KVCache.zeros(cfg, batch, 256))
    args = (lj.abstract_params(cfg), S((batch,), jnp.int32), S((batch,), jnp.int32), cache)
    calls = custom_calls(lower(lambda p, t, pos, c: next_logits(p, t, pos, c, cfg, h100), *args))
    if batch == 1 and h100.matvec == "cuda":
        assert set(calls) == {cuda_matvec.LAYER_TARGET, cuda_matvec.TARGET}
    else:  # the decode attention: a Triton launch in each layer of the unrolled scan
        no_attention = dataclasses.replace(h100, decode_attention="xla")
        fewer = custom_calls(lower(lambda p, t, pos, c: next_logits(p, t, pos, c, cfg, no_attention), *args))
        assert calls.count(TRITON) - fewer.count(TRITON) == cfg.n_layers
    assert custom_calls(lower(lambda p, t, pos, c: next_logits(p, t, pos, c, cfg, Kernels.xla()), *args)) == []


def _bound_attributes(handler: str) -> set[str]:
    """The attributes an FFI handler of the CUDA library binds (`.Attr<T>("name")`), read from its source."""
    source = "".join(path.read_text() for path in cuda_matvec.SOURCES)
    binding = source[source.index(f"XLA_FFI_DEFINE_HANDLER_SYMBOL({handler},"):]
    return set(re.findall(r'\.Attr<[\w:]+>\("(\w+)"\)', binding[:binding.index(";")]))


def test_decode_layer_call_carries_every_attribute_its_handler_binds(h100):
    """The batch-1 step's decode-layer custom calls pass exactly the attributes LlamaJaxDecodeLayerGpu binds
    (a missing or extra one fails only when a GPU runs it)."""
    if h100.matvec != "cuda":
        pytest.fail("the CUDA library did not build here (nvcc is on the CI machine)")
    cfg = _cfg("llama2-7b")
    cache = jax.eval_shape(lambda: lj.KVCache.zeros(cfg, 1, 256))
    args = (lj.abstract_params(cfg), S((1,), jnp.int32), S((1,), jnp.int32), cache)
    text = lower(lambda p, t, pos, c: next_logits(p, t, pos, c, cfg, h100), *args)
    configs = [re.search(r"backend_config = \{([^}]*)\}", line).group(1) for line in text.splitlines()
               if f"custom_call @{cuda_matvec.LAYER_TARGET}(" in line]
    assert configs
    for config in configs:
        assert set(dict(re.findall(r"(\w+) = ([^,]+)", config))) == _bound_attributes("LlamaJaxDecodeLayerGpu")


def test_device_loop_runs_every_projection_through_the_matmul_kernel(h100):
    """decode_loop's step (Kernels.in_device_loop) at batch 16 launches the Pallas matmul for q/k/v (one
    launch), gate/up (one) and down besides the host step's `o` and decode attention, and the loop's program
    holds them. (Counts are of the call sites in the lowered text: a layer scan's body is written once.)"""
    cfg = _cfg("llama2-7b")
    args = (lj.abstract_params(cfg), S((16,), jnp.int32), S((16,), jnp.int32),
            jax.eval_shape(lambda: lj.KVCache.zeros(cfg, 16, 256)))

    def step(kernels):
        return custom_calls(lower(lambda p, t, pos, c: next_logits(p, t, pos, c, cfg, kernels), *args)).count(TRITON)

    loop = custom_calls(lower(
        lambda p, t, m, key: decode_loop(p, t, m, key, jnp.int32(-1), cfg, 8, cache_len=256, kernels=h100),
        lj.abstract_params(cfg), S((16, 64), jnp.int32), S((16, 64), bool), jax.eval_shape(jax.random.key, 0)))
    assert step(h100.in_device_loop()) - step(h100) == 3
    assert loop.count(TRITON) >= step(h100.in_device_loop())


def test_engine_decode_step_holds_the_paged_kernel(h100):
    """The engine's decode step at 64 rows, tables as wide as a 4096-token context (256 blocks of 16)."""
    cfg = _cfg("llama3.1-8b")
    pool = jax.eval_shape(lambda: PagedKVCache.zeros(cfg, 4097, 16))
    rows = 64
    i32 = lambda *shape: S(shape, jnp.int32)  # noqa: E731
    args = (lj.abstract_params(cfg), pool.k, pool.v, i32(rows + 1), i32(rows, 256), i32(rows, 1), S((rows,), bool),
            i32(rows), i32(rows, 1), S((rows, 1), bool), i32(rows), i32(rows), i32(rows), S((rows,), jnp.float32),
            i32(rows), S((rows,), jnp.float32))

    def step(kernels):
        return custom_calls(lower(functools.partial(engine.forward_and_sample, cfg=cfg, kernels=kernels,
                                                    unroll=True, greedy=True), *args))

    paged_sites = step(h100).count(TRITON) - step(dataclasses.replace(h100, paged_attention="xla")).count(TRITON)
    assert paged_sites == cfg.n_layers  # one a layer of the unrolled scan
    assert step(Kernels.xla()) == []


def test_packed_training_step_holds_flash_attention(h100):
    """The loss gradient over packed rows (segment ids): each layer's flash attention forward and its two
    backward kernels."""
    cfg = _cfg("llama2-7b")
    batch = {"tokens": S((1, 1025), jnp.int32), "segment_ids": S((1, 1024), jnp.int32),
             "positions": S((1, 1024), jnp.int32)}
    grad = jax.grad(functools.partial(loss_fn, cfg=cfg, kernels=h100))
    assert custom_calls(lower(grad, lj.abstract_params(cfg), batch)).count(TRITON) == 3


# ---------------------------------------------------------------------------------------------
# Built for sm_90: each kernel's Triton IR through Triton's passes to PTX, and ptxas to a cubin


def _paged(batch, kv_heads, width, **kw):
    pool = S((32, 4097, 16, kv_heads, 128), jnp.dtype(kw.pop("pool_dtype", "bfloat16")))
    return lowered(functools.partial(pallas_paged_attention.paged_attention, **kw), S((batch, 32, 128), jnp.bfloat16),
                   pool, pool, S((), jnp.int32), S((batch, width), jnp.int32), S((batch,), jnp.int32))


@pytest.mark.parametrize("case,tensor_cores", [
    (dict(batch=256, kv_heads=32, width=256), False),  # the engine's step for Llama 2 (the shipped form)
    (dict(batch=256, kv_heads=32, width=256, pool_dtype="float8_e4m3fn"), False),
    (dict(batch=256, kv_heads=32, width=256), True),
    (dict(batch=256, kv_heads=32, width=256, group=16, num_warps=8), True),  # at 4 warps it spills
    (dict(batch=256, kv_heads=32, width=256, pool_dtype="float8_e4m3fn", blocks_per_step=2), True),
    (dict(batch=64, kv_heads=8, width=256), True),  # GQA: 4 query heads a program, padded to 16 rows
    (dict(batch=4, kv_heads=32, width=256), True),  # few long rows: split programs
])
def test_paged_kernel_builds_for_sm90(case, tensor_cores):
    """Both forms of the paged kernel build without spilling registers; the dot form's products run on
    the tensor cores (HMMA instructions in its SASS), the vector form's do not."""
    [kernel] = triton_build.kernels(_paged(**case, tensor_cores=tensor_cores))
    built = triton_build.build(kernel)
    assert built.spill_bytes == 0, built.registers
    assert built.loop_instructions() > 0  # the walk over the row's blocks
    assert (built.count("HMMA|HGMMA") > 0) == tensor_cores


@pytest.mark.parametrize("name", ["decode_attention", "flash_attention", "matmul_bf16_16_rows", "qmatmul_int4_1_row"])
def test_other_pallas_kernels_build_for_sm90(name):
    """The other Pallas kernels build too: the dense decode attention at batch 16, flash attention's
    forward and both backward kernels on packed rows, the matmul at 16 rows in bf16 and at one row in int4."""
    if name == "decode_attention":
        q, kv = S((16, 1, 32, 128), jnp.bfloat16), S((16, 1, 32, 128), jnp.bfloat16)
        cache = S((32, 16, 256, 32, 128), jnp.bfloat16)
        program = lowered(pallas_decode_attention.decode_attention, q, kv, kv, (S((16, 1, 1, 64), jnp.float32),) * 2,
                          cache, cache, S((), jnp.int32), S((), jnp.int32), S((16, 1, 256), bool))
    elif name == "flash_attention":
        q = S((1, 1024, 32, 128), jnp.bfloat16)
        program = lowered(jax.grad(lambda q, k, v, s: pallas_flash_attention.flash_attention(q, k, v, s).astype(
            jnp.float32).sum(), argnums=(0, 1, 2)), q, q, q, S((1, 1024), jnp.int32))
    else:
        w = S((32, 4096, 4096), jnp.bfloat16)
        rows, fn = (16, pallas_qmatmul.matmul) if name.startswith("matmul") else (1, pallas_qmatmul.qmatmul)
        if fn is pallas_qmatmul.qmatmul:
            w = jax.eval_shape(functools.partial(qarray.quantize, bits=4, group=128), w)
        program = lowered(lambda x, w, layer: fn(x, w, layer), S((rows, 4096), jnp.bfloat16), w, S((), jnp.int32))
    kernels = triton_build.kernels(program)
    assert len(kernels) == (3 if name == "flash_attention" else 1)
    for kernel in kernels:
        assert triton_build.build(kernel).registers > 0


@pytest.mark.parametrize("registers,shared,warps,programs", [
    (96, 0, 4, 5),  # registers bound: 96 x 32 lanes x 4 warps = 12,288 of 65,536
    (98, 38912, 4, 4),  # 98 rounds up to 104 a lane (256 a warp): 13,312 a program
    (32, 60000, 4, 3),  # shared memory bound: 61,024 with the 1 KB the SM keeps a program, of 228 KB
    (32, 0, 8, 8),  # warps bound: 64 an SM
    (16, 0, 1, 32),  # programs bound
])
def test_programs_per_sm_follows_the_occupancy_rules(registers, shared, warps, programs):
    """An H100 SM: 64K registers allocated 256 a warp at a time, 228 KB of shared memory less 1 KB a
    program, 64 warps, 32 programs (NVIDIA's occupancy rules for compute capability 9.0)."""
    built = triton_build.Build(ptx="", sass="", registers=registers, spill_bytes=0, shared_bytes=shared,
                               num_warps=warps)
    assert built.programs_per_sm() == programs
