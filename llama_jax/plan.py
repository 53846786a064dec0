"""Will it fit? Compile (never run) a step for a mesh of N devices and read XLA's memory analysis.

`llama-jax plan` (cli.py) runs `plan()` in a child process that has N fake CPU devices: the device
count must be fixed before JAX starts, and the caller's JAX may already be running on real devices.
Inputs are abstract (jax.ShapeDtypeStruct with shardings), so nothing the size of the model is ever
allocated; `jax.jit(...).lower(...).compile()` partitions the step exactly as it would on the pod.

Three steps can be planned:
  grad    gradient of train.py's next-token loss (params as the config says: float32 for presets)
  train   train.py's whole training step (make_train_step with make_optimizer's AdamW): float32
          master params and two moments, state donated, optional gradient accumulation
  decode  one decode step over a KV cache of --seq slots, params in bfloat16, cache donated (the
          layer scan is rolled here, where generate.py unrolls it: see `plan`)

Caveats, printed with the table: the figures are XLA:CPU's buffer assignment of the partitioned
program. The GPU/TPU compilers fuse and schedule differently, and there the kernel policy runs attention
as fused kernels (cuDNN, the Pallas flash kernel, Splash: ops/policy.py), which never materialise the
[seq, seq] scores that XLA's attention here does. `bench/tpu_compile.py` compiles the train step for a
real TPU topology with libtpu. The imports of JAX and the model wait inside the functions: the child
process fixes its device count before JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

GiB = 1 << 30


@dataclasses.dataclass
class Plan:
    model: str
    step: str
    mesh: dict[str, int]
    devices: int
    batch: int
    seq: int
    remat: str
    accum_steps: int
    unroll_layers: bool  # the layer loop unrolled (train.make_train_step's unroll=True)
    param_dtype: str
    optimizer: str | None
    # bytes per device
    params: int
    optimizer_state: int
    other_inputs: int  # batch, KV cache, step counters, ...
    arguments: int  # XLA: every input buffer (params + optimizer state + other inputs)
    outputs: int  # XLA: output buffers not aliased with (donated) inputs
    temporaries: int  # XLA: scratch space at the peak
    total: int  # arguments + outputs + temporaries (+ code)
    attention_scores: int  # one layer's [batch, heads, seq, kv] float32 scores on this device (XLA attention)
    replicated: list[str]  # dimensions left whole because their mesh axis does not divide them
    hbm_gib: float | None = None
    compile_s: float = 0.0

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_gib is None else self.total <= self.hbm_gib * GiB


def load_config(model: str):
    """The config of a preset name or a model on disk: a checkpoint made by `convert`, a training run's
    folder, a GGUF file, a Hugging Face or Meta folder. Only metadata is read, never weights."""
    from pathlib import Path

    from llama_jax import checkpoints as checkpoint
    from llama_jax.config import PRESETS, LlamaConfig, from_hf_config

    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if not path.exists():
        raise ValueError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if checkpoint.is_checkpoint(path):
        return LlamaConfig.from_dict(checkpoint.read_checkpoint_info(path)["config"])
    if checkpoint.is_train_checkpoint(path):
        return checkpoint.run_config(path)
    if (path / "config.json").is_file() or path.suffix == ".json":  # a Hugging Face config suffices
        return from_hf_config(path)
    reader = checkpoint.reader_for(path)  # GGUF metadata, Meta params.json
    if reader is None:
        raise ValueError(f"--model {model!r}: not a checkpoint, GGUF file, or Hugging Face / Meta folder")
    return from_hf_config(reader.config)


def plan(cfg, mesh_sizes: dict[str, int], batch: int, seq: int, step: str = "grad", *, remat: str = "none",
         accum_steps: int = 1, unroll_layers: bool = False, model_name: str = "", hbm_gib: float | None = None,
         rules=None, log=print, devices=None) -> Plan:
    """Compile `step` for `cfg` on a (data, fsdp, tensor) mesh of this process's devices (or of `devices`:
    a TPU topology's, compiled ahead of time) and measure it."""
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from llama_jax import sharding, train
    from llama_jax.model import CACHE_AXES, KVCache, abstract_params, apply

    if step not in ("grad", "train", "decode"):
        raise ValueError(f"step must be grad, train or decode, got {step!r}")
    if step == "decode":
        cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
    n_batch = sharding.batch_shard_count(mesh, rules)
    if batch % (n_batch * accum_steps):
        raise ValueError(f"--batch {batch} is not divisible by the {n_batch} data-parallel shards (data x fsdp) "
                         f"of the mesh" + (f" times --accum {accum_steps}" if accum_steps > 1 else ""))

    with warnings.catch_warnings(record=True) as caught:  # dimensions replicated for want of divisibility
        warnings.simplefilter("always", sharding.ShardingFallbackWarning)
        p_shard = sharding.param_shardings(cfg, mesh, rules)
    replicated = sorted({str(w.message).split(": ", 1)[1] for w in caught
                         if issubclass(w.category, sharding.ShardingFallbackWarning)})

    def sds(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    params = jax.tree.map(sds, abstract_params(cfg), p_shard)
    replicated_sharding = NamedSharding(mesh, PartitionSpec())
    opt_state: Any = ()
    optimizer_name = None

    if step in ("grad", "train"):
        # train.py's batch: tokens [batch, seq + 1] (inputs and shifted targets), rows over (data, fsdp).
        data = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))}
        if step == "grad":
            grad = jax.grad(lambda p, b: train.loss_fn(p, b, cfg, remat=remat, unroll=unroll_layers))
            fn = jax.jit(grad, out_shardings=p_shard)
            args, others = (params, data), (data,)
        else:  # the training step train.py runs, with its optimizer and state
            optimizer = train.make_optimizer()
            optimizer_name = "train.make_optimizer() (AdamW)"
            shardings = train.state_shardings(cfg, optimizer, mesh, rules)
            abstract = jax.eval_shape(lambda: train.init_train_state(cfg, optimizer, jax.random.key(0)))
            state = jax.tree.map(sds, abstract, shardings)
            opt_state = state.opt_state
            fn = train.make_train_step(cfg, optimizer, mesh, accum_steps=accum_steps, remat=remat,
                                       unroll=unroll_layers, rules=rules)
            args, others = (state, data), (data, state.step, state.rng, state.skipped, state.nonfinite_streak)
    else:
        shape = (cfg.n_layers, batch, seq, cfg.n_kv_heads, cfg.head_dim)
        kv_spec = sharding.logical_to_spec(CACHE_AXES, rules, mesh, shape)  # as generate.py shards its cache
        kv = jax.ShapeDtypeStruct(shape, cfg.compute_jnp_dtype, sharding=NamedSharding(mesh, kv_spec))
        valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "cache_seq"), rules, mesh, (batch, seq))))
        cache = KVCache(kv, kv, valid, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated_sharding))
        token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1, rules))

        def decode(params, token, position, cache):
            # generate.py's decode step, but with the layer scan rolled: unrolled, XLA:CPU copies out every
            # layer's weight slice at once (tens of GiB that GPUs, reading slices in place, never hold).
            logits, cache = apply(params, token[:, None], cfg, positions=position[:, None], cache=cache)
            return logits[:, 0], cache

        fn = jax.jit(decode, donate_argnums=(3,))
        args, others = (params, token, token, cache), (token, token, cache)

    log(f"plan: compiling {step} for {model_name or 'model'} on {mesh.size} devices "
        f"({sharding.format_mesh(dict(mesh.shape))}), batch {batch} x seq {seq}")
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        raise ValueError("this JAX backend reports no memory analysis")

    def per_device(tree):
        return sum(sharding.shard_bytes(x, x.sharding) for x in jax.tree.leaves(tree))

    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
    total = mem.argument_size_in_bytes + outputs + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    # One layer's attention scores on a device, as XLA's (non-fused) attention holds them.
    t = mesh.shape["tensor"]
    local_heads = cfg.n_heads // t if cfg.n_heads % t == 0 else cfg.n_heads
    scores = batch // n_batch // accum_steps * local_heads * (1 if step == "decode" else seq) * seq * 4

    return Plan(model=model_name, step=step, mesh=dict(mesh.shape), devices=mesh.size, batch=batch, seq=seq,
                remat=remat, accum_steps=accum_steps, unroll_layers=unroll_layers, param_dtype=cfg.param_dtype,
                optimizer=optimizer_name,
                params=per_device(params), optimizer_state=per_device(opt_state), other_inputs=per_device(others),
                arguments=mem.argument_size_in_bytes, outputs=outputs, temporaries=mem.temp_size_in_bytes,
                total=total, attention_scores=scores, replicated=replicated, hbm_gib=hbm_gib, compile_s=compile_s)


# ---------------------------------------------------------------------------------------------
# Presentation


def format_table(p: Plan) -> str:
    def gib(b):
        return f"{b / GiB:10.3f}"

    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [
        f"{p.model}: {p.step} step, mesh {mesh} ({p.devices} devices), batch {p.batch} x seq {p.seq}, "
        f"params {p.param_dtype}" + (f", remat {p.remat}" if p.step != "decode" else "")
        + (f", {p.accum_steps} micro-batches" if p.accum_steps > 1 else "")
        + (", layers unrolled" if p.unroll_layers and p.step != "decode" else "")
        + (f", optimizer {p.optimizer}" if p.optimizer else ""),
        f"{'per device':<34}{'GiB':>10}",
        f"  {'parameters':<32}{gib(p.params)}",
    ]
    if p.step == "train":
        lines.append(f"  {'optimizer state':<32}{gib(p.optimizer_state)}")
    lines += [
        f"  {'batch' if p.step != 'decode' else 'KV cache + tokens':<32}{gib(p.other_inputs)}",
        f"  {'outputs (not donated)':<32}{gib(p.outputs)}",
        f"  {'temporaries':<32}{gib(p.temporaries)}",
        f"  {'total':<32}{gib(p.total)}",
    ]
    if p.hbm_gib is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"HBM {p.hbm_gib:g} GiB per device: {verdict} ({100 * p.total / (p.hbm_gib * GiB):.0f}% used)")
    return "\n".join(lines)


def notes(p: Plan) -> list[str]:
    out = [f"compiled in {p.compile_s:.1f} s; figures are XLA:CPU's buffer assignment of the partitioned program "
           f"(GPU/TPU compilers schedule differently)"]
    if p.step != "decode":
        out.append(f"temporaries include XLA attention's float32 scores, {p.attention_scores / GiB:.3f} GiB per layer "
                   f"here; cuDNN / splash attention on GPU / TPU never materialise them")
    out += [f"replicated: {r}" for r in p.replicated]
    return out


def main(argv: list[str]) -> int:
    """Child-process entry: `python -m llama_jax.plan '<json args>'` (run by `llama-jax plan`)."""
    a = json.loads(argv[0])
    try:
        cfg = load_config(a["model"])
        p = plan(cfg, a["mesh"], a["batch"], a["seq"], a["step"], remat=a["remat"], accum_steps=a["accum"],
                 unroll_layers=a["unroll_layers"], model_name=a["model"], hbm_gib=a["hbm"],
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"llama-jax plan: error: {e}", file=sys.stderr)
        return 2
    for line in notes(p):
        print(f"plan: {line}", file=sys.stderr)
    if a.get("json"):
        print(json.dumps({**dataclasses.asdict(p), "fits": p.fits}))
    else:
        print(format_table(p))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
