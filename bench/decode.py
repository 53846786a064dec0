"""Decode speed on GPU, beside Hugging Face transformers (eager and torch.compile) in the same invocation.

    python bench/decode.py                          # Llama-2-7B shape, bf16, prompt 128, 128 new, batch 1 16 64
    python bench/decode.py --batch 1 --no-peer      # ours only
    python bench/decode.py --batch 1 --bits 4 --group 128 --symmetric --include-embeddings   # int4, GPTQ-style

Random bf16 weights (timing does not depend on the values). For each batch: prefill seconds, ms per
decode step, tokens/s of the decode steps and of the whole call (prefill included; also through
`stream_tokens`, what chat runs), GB/s moved (weights +
the KV cache slots attended), compile seconds, and a correctness check (greedy tokens against the argmax
of a full forward over the same sequence). First, the card's read and copy rates (`memory_ceilings`), and
each figure's weight rate as a share of that read rate. `--preset llama3.1-8b` is the Llama-3-8B shape (8 kv heads, a
vocabulary of 128256, llama3 rope scaling).
One JSON line per figure. Each side runs in its own process so the frameworks never share GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"  # the Hugging Face peer's scripts


def ours(a) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import llama_jax as lj
    from llama_jax.generate import Sampling, decode_loop, next_logits, prefill, stream_tokens
    from llama_jax.ops import Kernels

    ceiling = memory_ceilings() if jax.default_backend() == "gpu" else {}
    kernels = Kernels.named(a.kernels)
    if a.stacked:
        kernels = dataclasses.replace(kernels, stacked_weights=tuple(a.stacked))
    cfg = lj.PRESETS[a.preset].replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    if a.layers:
        cfg = cfg.replace(n_layers=a.layers)
    params = lj.init_params(cfg, jax.random.key(0))
    group = zero_points = None
    if a.bits:
        from llama_jax import quantize

        # int8: one scale per output channel unless --group is given; int4: groups (default 64), with zero
        # points unless --symmetric.
        group = (a.group or 64) if a.bits == 4 else a.group
        zero_points = a.bits == 4 and not a.symmetric
        params = quantize.quantize_params(params, cfg, bits=a.bits, group=group, zero_point=zero_points,
                                          include_embeddings=a.include_embeddings)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    max_len = a.prompt + a.new
    device = jax.devices()[0].device_kind

    greedy = Sampling()

    @functools.partial(jax.jit, donate_argnums=(3,))
    def greedy_step(params, token, position, cache):  # the decode step with greedy sampling fused in
        logits, cache = next_logits(params, token, position, cache, cfg, kernels)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), position + 1, cache

    for batch in a.batch:
        rng = np.random.default_rng(batch)
        prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, a.prompt)), jnp.int32)
        mask = jnp.ones(prompt.shape, bool)
        key, never = jax.random.key(0), jnp.int32(-1)  # eos -1: every row runs all `new` steps

        def generate_all():  # prefill + `new` decode steps in one on-device loop
            return decode_loop(params, prompt, mask, key, never, cfg, a.new, greedy, cache_len=max_len,
                               kernels=kernels)[0]

        def prefill_only():
            cache = lj.KVCache.zeros(cfg, batch, max_len)
            return prefill(params, prompt, mask, cache, cfg=cfg, kernels=kernels)[0]

        def host_loop():  # the same steps dispatched one by one from Python (the streaming path)
            cache = lj.KVCache.zeros(cfg, batch, max_len)
            logits, cache, position = prefill(params, prompt, mask, cache, cfg=cfg, kernels=kernels)
            token, out = jnp.argmax(logits, axis=-1).astype(jnp.int32), []
            for _ in range(a.new):
                out.append(token)
                token, position, cache = greedy_step(params, token, position, cache)
            return jnp.stack(out, axis=1)

        # The step's own first call (compile + one step), apart from prefill's: the compile-time target.
        cache = lj.KVCache.zeros(cfg, batch, max_len)
        logits, cache, position = prefill(params, prompt, mask, cache, cfg=cfg, kernels=kernels)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token.block_until_ready()
        t0 = time.perf_counter()
        greedy_step(params, token, position, cache)[0].block_until_ready()
        step_first_call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        host_loop().block_until_ready()
        host_compile_s = time.perf_counter() - t0
        host_total_s = min(_timed(host_loop) for _ in range(3))
        prompt_rows = prompt.tolist()

        def streamed():  # what chat sees: stream_tokens, every token on the host as it comes, prefill included
            return jnp.asarray(list(stream_tokens(params, cfg, prompt_rows, a.new, eos_id=-1, kernels=kernels)))

        streamed()
        stream_s = min(_timed(streamed) for _ in range(2))
        t0 = time.perf_counter()
        tokens = generate_all()
        tokens.block_until_ready()
        compile_s = time.perf_counter() - t0  # first call: tracing + compiling + one run
        prefill_only().block_until_ready()
        prefill_s = min(_timed(prefill_only) for _ in range(5))
        total_s = min(_timed(generate_all) for _ in range(3))
        step_s = (total_s - prefill_s) / a.new
        host_step_s = (host_total_s - prefill_s) / a.new
        cache_bytes = 2 * cfg.n_layers * batch * max_len * cfg.n_kv_heads * cfg.head_dim * 2
        # Greedy tokens vs the argmax of one full forward over prompt + generated tokens.
        seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
        full = jnp.argmax(lj.forward(params, seq, cfg)[:, a.prompt - 1:], axis=-1)
        match = float(jnp.mean(full == tokens))
        print(json.dumps(dict(
            impl="llama-jax", preset=a.preset, layers=cfg.n_layers, bits=a.bits or 16, group=group, zero_points=zero_points,
            embeddings_quantized=a.include_embeddings,
            batch=batch, prompt=a.prompt, new=a.new,
            prefill_s=round(prefill_s, 4), decode_ms_per_step=round(step_s * 1e3, 3),
            decode_tok_s=round(batch / step_s, 1), tok_s_with_prefill=round(batch * a.new / total_s, 1),
            weight_gb=round(weight_bytes / 1e9, 2),
            achieved_weight_gbps=round(weight_bytes / step_s / 1e9, 1),
            achieved_weight_cache_gbps=round((weight_bytes + cache_bytes) / step_s / 1e9, 1),
            first_call_s=round(compile_s, 1), greedy_match_full_forward=round(match, 4),
            host_loop_ms_per_step=round(host_step_s * 1e3, 3), host_loop_tok_s=round(batch / host_step_s, 1),
            host_loop_tok_s_with_prefill=round(batch * a.new / host_total_s, 1),
            stream_tok_s_with_prefill=round(batch * a.new / stream_s, 1),
            host_loop_weight_gbps=round(weight_bytes / host_step_s / 1e9, 1), host_loop_first_call_s=round(host_compile_s, 1),
            weight_share_of_read_ceiling=(round(weight_bytes / step_s / 1e9 / ceiling["read_gbps"], 3)
                                          if ceiling else None),
            step_first_call_s=round(step_first_call_s, 1), kernels=kernels.describe(), device=device,
            jax=jax.__version__)), flush=True)


def memory_ceilings(gib: float = 4) -> dict:
    """The card's memory rates, measured here (one JSON line): the best of two reads of a `gib` GiB bf16
    array (a sum to one float32, and a GEMV, each reading every byte once) and a copy (x + 1, bytes read
    and written both counted). The read rate is the denominator for batch-1 decode, which only reads."""
    import jax
    import jax.numpy as jnp

    rows = int(gib * (1 << 29)) // 4096  # [rows, 4096] bf16
    x = jax.random.normal(jax.random.key(0), (rows, 4096), jnp.bfloat16)
    v = jnp.ones((4096,), jnp.bfloat16)
    moved = {"read_sum_gbps": (lambda x, v: jnp.sum(x, dtype=jnp.float32), x.nbytes),
             "read_gemv_gbps": (lambda x, v: x @ v, x.nbytes),
             "copy_gbps": (lambda x, v: x + 1, 2 * x.nbytes)}  # bytes each moves: a copy reads and writes
    figures = {}
    for name, (fn, nbytes) in moved.items():
        f = jax.jit(fn)
        f(x, v).block_until_ready()
        figures[name] = round(nbytes / min(_timed(lambda: f(x, v)) for _ in range(10)) / 1e9, 1)
    figures["read_gbps"] = max(figures["read_sum_gbps"], figures["read_gemv_gbps"])
    print(json.dumps(dict(check="memory-ceilings", gib=gib, **figures, device=jax.devices()[0].device_kind)),
          flush=True)
    return figures


def check_small(a) -> None:
    """Exactness on the GPU: float32 greedy decode equals a full forward token for token, a bf16
    forward is within bf16 tolerance of a float32 forward on the CPU, and a bf16 decode step through
    the GPU decode kernels is within bf16 tolerance of the step in float32, as the XLA step is."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import llama_jax as lj
    from llama_jax.generate import decode_loop

    cfg = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg, jax.random.key(1))
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 16)), jnp.int32)
    mask = jnp.ones(prompt.shape, bool)
    tokens = decode_loop(params, prompt, mask, jax.random.key(0), jnp.int32(-1), cfg, 32)[0]
    seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    full = jnp.argmax(lj.forward(params, seq, cfg)[:, 15:], axis=-1)
    exact = bool(jnp.all(full == tokens))

    cpu = jax.devices("cpu")[0]
    params_cpu = jax.device_put(params, cpu)
    ref = np.asarray(lj.forward(params_cpu, jax.device_put(seq, cpu), cfg))  # runs where its inputs live
    cfg16 = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    out = np.asarray(lj.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), seq, cfg16))
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    kernels = _kernels_vs_xla(prompt[:1], mask[:1])  # batch 1: where every decode kernel serves
    print(json.dumps(dict(check="gpu-correctness", f32_greedy_equals_full_forward=exact,
                          bf16_gpu_vs_f32_cpu_rel_err=round(rel, 5), bf16_within_tolerance=rel < 1e-2,
                          decode_kernels_ran=kernels["ran"],
                          bf16_step_kernels_vs_f32_rel_err=round(kernels["kernels_vs_f32"], 5),
                          bf16_step_xla_vs_f32_rel_err=round(kernels["xla_vs_f32"], 5),
                          decode_kernels_within_tolerance=kernels["ran"] and kernels["kernels_vs_f32"] < 1e-2,
                          device=jax.devices()[0].device_kind)), flush=True)


def _kernels_vs_xla(prompt, mask) -> dict:
    """One bf16 decode step's logits with the GPU decode kernels (Kernels.auto(): at batch 1 on a Hopper GPU
    each layer as one cuda_matvec.decode_layer call and the lm_head through its matmul; elsewhere the Pallas
    decode attention, and the Pallas matmul for `o`) and the same step with Kernels.xla(), each against the
    step in float32 (relative L2), on a small model whose head_dim the attention kernel takes; and whether
    the kernels were in the first step and not in the second."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import llama_jax as lj
    from llama_jax.generate import next_logits, prefill
    from llama_jax.ops import Kernels, cuda_matvec

    cfg = lj.PRESETS["tiny-gqa"].replace(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
                                         param_dtype="bfloat16", compute_dtype="bfloat16")
    params = lj.init_params(cfg, jax.random.key(2))

    def logits_and_hlo(params, cfg, kernels):
        cache = lj.KVCache.zeros(cfg, prompt.shape[0], 128)
        logits, cache, position = prefill(params, prompt, mask, cache, cfg=cfg, kernels=kernels)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        step = jax.jit(lambda params, token, position, cache:
                       next_logits(params, token, position, cache, cfg, kernels))
        hlo = step.lower(params, token, position, cache).as_text()
        return np.asarray(step(params, token, position, cache)[0], np.float32), hlo

    auto = Kernels.auto()
    with_kernels, hlo = logits_and_hlo(params, cfg, auto)
    xla, xla_hlo = logits_and_hlo(params, cfg, Kernels.xla())
    f32 = logits_and_hlo(jax.tree.map(lambda x: x.astype(jnp.float32), params),
                         cfg.replace(param_dtype="float32", compute_dtype="float32"), Kernels.xla())[0]
    rel = lambda a: float(np.linalg.norm(a - f32) / np.linalg.norm(f32))  # noqa: E731
    # The kernels are custom calls (the CUDA library's FFI targets on a Hopper GPU, else Triton's): in the
    # first step's program, never in the second.
    names = (cuda_matvec.LAYER_TARGET, cuda_matvec.TARGET) if auto.matvec == "cuda" else ("triton",)
    ran = {name: name in hlo and name not in xla_hlo for name in names}
    return dict(ran=all(ran.values()), kernels_vs_f32=rel(with_kernels), xla_vs_f32=rel(xla))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    out.block_until_ready()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--bits", type=int, default=0, choices=[0, 4, 8], help="weight-only quantization (0: bf16)")
    p.add_argument("--group", type=int, default=None, help="quantization group (int4 default 64; int8 default per channel)")
    p.add_argument("--symmetric", action="store_true",
                   help="with --bits 4: symmetric groups (a scale per group, no zero point), like GPTQ's and Q4_0")
    p.add_argument("--include-embeddings", action="store_true",
                   help="with --bits: quantize the embedding and the lm_head too (gpt-fast quantizes the lm_head)")
    p.add_argument("--stacked", nargs="+", default=None,
                   help="the bf16 weights the Pallas matmul reads from the stack (Kernels.stacked_weights)")
    p.add_argument("--layers", type=int, default=0, help="the preset with this many layers (a quick look)")
    p.add_argument("--kernels", default="auto", choices=["auto", "xla"], help="the kernel policy (ops/policy.py)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.symmetric and a.bits != 4:
        p.error("--symmetric is for --bits 4 (int8 is symmetric already)")
    if a.only_ours:
        ours(a)
        if not a.bits:
            check_small(a)
        return
    subprocess.run([sys.executable, __file__, "--only-ours"] + [x for x in sys.argv[1:] if x != "--no-peer"])
    if not a.no_peer and not a.bits:
        batches = [str(b) for b in a.batch]
        base = [sys.executable, str(PEERS / "hf_llama_decode.py"), "--size", a.preset, "--batch", *batches,
                "--prompt", str(a.prompt), "--new", str(a.new)]
        subprocess.run(base)
        subprocess.run(base + ["--compile"])


if __name__ == "__main__":
    main()
