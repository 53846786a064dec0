"""The paged-attention kernel's forms built for an H100 on this machine (no GPU): registers, spills,
shared memory, and the SASS instructions that say how each runs, one JSON line a form.

    python bench/kernel_build.py

Then the project's other Pallas kernels at the shapes they serve: the dense decode attention (batch 16),
the matmul at 16 rows in bf16 and at one row in int4 (Llama-2-7B's stacked q/k/v), and flash attention's
three kernels on packed rows of 1024 (forward, dq, dK/dV), with the default backward settings and three
others that bench/flash_attention_check.py --bwd-variants times.

At the serving engine's shape for Llama-2-7B (batch 256, 32 kv heads, tables of 256 blocks of 16), and a
grouped-query case (32 query heads over 8, batch 64). Variants are bench/paged_attention_check.py's
GROUP:WARPS:STAGES[:BLOCKS[:DOTS]] (query heads a program, warps, software-pipeline stages, pool blocks a
loop step, the dot form), so a form can be read here, then timed there.
Per kernel: registers, spills, shared memory, and how many of its programs an SM holds at once (as
registers, shared memory and warps allow). Counted: HMMA (tensor-core products), LDGSTS (global-to-shared
copies: Triton pipelines those loads across loop steps), LDG (global loads straight into registers), the
SASS instructions in all, and those of the loop over a row's blocks (a loop step's work, a warp).
ops/triton_build.py does the building (the `triton` package and its ptxas).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp

from llama_jax import qarray
from llama_jax.ops import pallas_decode_attention, pallas_flash_attention, pallas_paged_attention, pallas_qmatmul, \
    triton_build
from paged_attention_check import setting  # bench/: the variants' format

S = jax.ShapeDtypeStruct
VARIANTS = ["8:4:2:1:0", "8:8:2:1:0", "8:4:2:2:0", "8:4:2:1:1", "8:4:1:1:1", "8:4:3:1:1", "8:8:2:1:1",
            "4:4:2:1:1", "4:4:3:1:1", "16:4:2:1:1", "16:8:2:1:1", "8:4:2:2:1"]


def paged(variant: str, pool_dtype: str, batch: int = 256, kv_heads: int = 32) -> triton_build.Kernel:
    group, warps, stages, per_step, dots = setting(variant)
    pool = S((32, 4097, 16, kv_heads, 128), jnp.dtype(pool_dtype))
    fn = functools.partial(pallas_paged_attention.paged_attention, group=group,
                           num_warps=warps, num_stages=stages, blocks_per_step=per_step, tensor_cores=bool(dots))
    program = triton_build.lower(fn, S((batch, 32, 128), jnp.bfloat16), pool, pool, S((), jnp.int32),
                                 S((batch, 256), jnp.int32), S((batch,), jnp.int32))
    [kernel] = triton_build.kernels(program)
    return kernel


def others() -> dict[str, jax.stages.Lowered]:
    """The other Pallas kernels' programs, lowered for an abstract H100."""
    q, cache = S((16, 1, 32, 128), jnp.bfloat16), S((32, 16, 256, 32, 128), jnp.bfloat16)
    rope = (S((16, 1, 1, 64), jnp.float32),) * 2
    packed = S((1, 1024, 32, 128), jnp.bfloat16)
    w = S((32, 4096, 4096), jnp.bfloat16)
    w4 = jax.eval_shape(functools.partial(qarray.quantize, bits=4, group=128), w)

    def loss(q, k, v, k_start, **setting):
        return pallas_flash_attention.flash_attention(q, k, v, k_start, **setting).astype(jnp.float32).sum()

    def flash(**setting):  # forward, dq and dK/dV kernels
        return triton_build.lower(jax.grad(functools.partial(loss, **setting), argnums=(0, 1, 2)), packed, packed,
                                  packed, S((1, 1024), jnp.int32))

    return {
        "decode_attention b16": triton_build.lower(pallas_decode_attention.decode_attention, q, q, q, rope, cache,
                                                   cache, S((), jnp.int32), S((), jnp.int32), S((16, 1, 256), bool)),
        "matmul bf16 16 rows": triton_build.lower(pallas_qmatmul.matmul, S((16, 4096), jnp.bfloat16), w,
                                                  S((), jnp.int32)),
        "qmatmul int4 1 row": triton_build.lower(pallas_qmatmul.qmatmul, S((1, 4096), jnp.bfloat16), w4,
                                                 S((), jnp.int32)),
        "flash_attention fwd+bwd": flash(),
        # the backward's settings of bench/flash_attention_check.py --bwd-variants (WARPS:BLOCK_Q_DKV:BLOCK_K_DKV)
        "flash_attention fwd+bwd, bwd 8:64:64": flash(num_warps_bwd=8),
        "flash_attention fwd+bwd, bwd 4:64:32": flash(block_k_dkv=32),
        "flash_attention fwd+bwd, bwd 8:32:64": flash(num_warps_bwd=8, block_q_dkv=32),
    }


def line(built: triton_build.Build, **what) -> str:
    return json.dumps(dict(bench="kernel-build", **what, target="sm_90a", registers=built.registers,
                           spill_bytes=built.spill_bytes, shared_bytes=built.shared_bytes,
                           hmma=built.count("HMMA|HGMMA"), ldgsts=built.count("LDGSTS"), ldg=built.count("LDG$|LDG\\."),
                           sass=built.count("."), loop_sass=built.loop_instructions(),
                           programs_per_sm=built.programs_per_sm()))


def main() -> None:
    cases = [(v, d, 256, 32) for d in ("bfloat16", "float8_e4m3fn") for v in VARIANTS]
    cases += [("4:4:2:1:0", "bfloat16", 64, 8), ("4:4:2:1:1", "bfloat16", 64, 8)]  # GQA: a kv head's 4 queries
    for variant, pool_dtype, batch, kv_heads in cases:
        built = triton_build.build(paged(variant, pool_dtype, batch, kv_heads))
        print(line(built, kernel="paged_attention", variant=variant, pool_dtype=pool_dtype, batch=batch,
                   kv_heads=kv_heads), flush=True)
    for case, program in others().items():
        for kernel in triton_build.kernels(program):
            print(line(triton_build.build(kernel), kernel=kernel.name, case=case), flush=True)


if __name__ == "__main__":
    main()
