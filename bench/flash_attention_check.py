"""The Pallas flash-attention kernel (llama_jax/ops/pallas_flash_attention.py) on the GPU against the XLA
reference: packed rows and left-padded rows, grouped-query heads, values and the gradients of q, k and v,
in bf16 against the reference in float32. One JSON line per case: the relative L2 errors, and the forward
and forward-plus-backward times beside cuDNN's on plain causal rows of the same shape.

    python bench/flash_attention_check.py
    python bench/flash_attention_check.py --bwd-variants 4:64:64 8:64:64 4:64:32 8:32:64

--bwd-variants times forward plus backward on the packed rows for backward settings
WARPS:BLOCK_Q_DKV:BLOCK_K_DKV (num_warps_bwd, and the dK/dV kernel's query and key blocks; the first is
the default). Built for sm_90 here (`bench/kernel_build.py`), the default dK/dV kernel takes 255 registers
and spills; 8 warps, or key blocks of 32, do not.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.ops import pallas_flash_attention as flash


def reference(q, k, v, k_start):  # float32, an explicit mask: causal and keys from k_start on
    s = q.shape[1]
    pos = jnp.arange(s)
    mask = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= k_start[:, :, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(f, *args):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bwd-variants", nargs="*", default=[], help="WARPS:BLOCK_Q_DKV:BLOCK_K_DKV to time")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, head_dim = 2, 2048, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.float32)
    g = jax.random.normal(keys[3], q.shape, jnp.float32)
    lengths = rng.integers(300, 1500, 8)
    segments = np.minimum(np.repeat(np.arange(1, 9), lengths)[:seq], 8)
    packed = flash.segment_starts(jnp.asarray(np.stack([segments, segments[::-1].copy()]), jnp.int32))
    padded = jnp.broadcast_to(jnp.asarray([[700], [1]], jnp.int32), (batch, seq))
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    for name, k_start in (("packed", packed), ("left-padded", padded)):
        out, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(q, k, v, k_start), bf(q), bf(k), bf(v))
        grads = vjp(bf(g))
        ref, ref_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, k_start), q, k, v)
        live = (jnp.arange(seq)[None, :] >= k_start)[:, :, None, None]  # padding queries give zeros, not a mean
        ref_grads = ref_vjp(jnp.where(live, g, 0))
        print(json.dumps(dict(check="flash-attention-gpu", rows=name, batch=batch, seq=seq, heads=heads,
                              kv_heads=kv_heads, head_dim=head_dim, out_rel_l2=rel(jnp.where(live, out, 0),
                                                                                    jnp.where(live, ref, 0)),
                              dq_rel_l2=rel(grads[0], ref_grads[0]), dk_rel_l2=rel(grads[1], ref_grads[1]),
                              dv_rel_l2=rel(grads[2], ref_grads[2]), device=jax.devices()[0].device_kind)),
              flush=True)
    q16, k16, v16 = bf(q), bf(k), bf(v)
    loss = lambda f: jax.jit(jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))  # noqa: E731
    ours = lambda q, k, v: flash.flash_attention(q, k, v, packed)  # noqa: E731
    causal = lambda q, k, v: flash.flash_attention(q, k, v)  # noqa: E731
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
    figures = {}
    for label, f in (("packed", ours), ("causal", causal), ("cudnn_causal", cudnn)):
        try:
            figures[f"{label}_fwd_ms"] = timed(jax.jit(f), q16, k16, v16)
            figures[f"{label}_fwd_bwd_ms"] = timed(loss(f), q16, k16, v16)
        except Exception as e:  # noqa: BLE001 - a peer kernel that does not take the shape: say so, go on
            figures[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(json.dumps(dict(check="flash-attention-gpu-time", batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, **figures, device=jax.devices()[0].device_kind, jax=jax.__version__)),
          flush=True)
    for variant in a.bwd_variants:
        warps, block_q_dkv, block_k_dkv = map(int, variant.split(":"))
        setting = dict(num_warps_bwd=warps, block_q_dkv=block_q_dkv, block_k_dkv=block_k_dkv)
        f = lambda q, k, v, s=setting: flash.flash_attention(q, k, v, packed, **s)  # noqa: E731
        grads = jax.grad(lambda q, k, v: (f(q, k, v).astype(jnp.float32) * bf(g)).sum(), argnums=(0, 1, 2))(
            q16, k16, v16)
        want = jax.grad(lambda q, k, v: (ours(q, k, v).astype(jnp.float32) * bf(g)).sum(), argnums=(0, 1, 2))(
            q16, k16, v16)
        print(json.dumps(dict(check="flash-attention-bwd-variant", variant=variant, rows="packed",
                              fwd_bwd_ms=timed(loss(f), q16, k16, v16),
                              grads_rel_l2_vs_default=max(rel(x, y) for x, y in zip(grads, want)),
                              device=jax.devices()[0].device_kind)), flush=True)


if __name__ == "__main__":
    main()
