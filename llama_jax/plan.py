"""Will it fit? Compile (never run) a step for a mesh of N devices and read the compiler's memory analysis.

`llama-jax plan` (cli.py) runs `plan()` in a child process: the number of fake CPU devices must be fixed
before JAX starts, and the caller's JAX may already be running on real devices. Inputs are abstract
(jax.ShapeDtypeStruct with shardings), so nothing the size of the model is ever allocated;
`jax.jit(...).lower(...).compile()` partitions the step exactly as it would on the pod.

Two compilers, two kinds of figures:
  --mesh          N fake CPU devices, XLA:CPU. Attention is XLA's, which materialises each layer's
                  [seq, seq] float32 scores (counted in the temporaries); a fused kernel on a GPU or TPU
                  would not. The CPU compiler also fuses and schedules differently from the GPU/TPU ones.
  --target NAME   a Cloud TPU slice (v5p-8, v6e-256, ... `--slices` of them), compiled ahead of time by
                  XLA's TPU compiler from libtpu (no TPU needed): the devices are the topology's chips,
                  the kernels the TPU's (Kernels.auto: Splash attention where it takes the shapes), and the
                  figures what a chip would hold. The report says whether the compiled program still holds
                  a [seq, seq] buffer. Without libtpu it says how to install it and plans on fake CPU
                  devices instead.

Three steps can be planned:
  grad    gradient of train.py's next-token loss (params as the config says: float32 for presets)
  train   train.py's whole training step (make_train_step with make_optimizer's AdamW): float32
          master params and two moments, state donated, optional gradient accumulation
  decode  one decode step over a KV cache of --seq slots, params in bfloat16, cache donated (the
          layer scan is rolled here, where generate.py unrolls it: see `plan`)
A target plans the pretraining workload: packed rows (segment ids and positions in the batch, the
attention masked to each document), and by default one row per data-parallel shard.

The imports of JAX and the model wait inside the functions: the child process fixes its device count
before JAX starts, and cli.py reads the target table without starting JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

GiB = 1 << 30

# Cloud TPU accelerator types, "<generation>-N". Per generation: what N counts (v4 and v5p: TensorCores,
# two a chip, run as one megacore device; v5e and v6e: chips), the HBM a program may use per chip in GiB,
# libtpu's name for it and the slice shapes in chips that Cloud TPU offers and libtpu's topologies take
# ("v5p:2x2x1"). The HBM: libtpu's compile-only devices report none, but its compiler refuses a program
# larger than the chip's "available HBM" (libtpu 0.0.50: v4 30.75, v5p 95.73, v5e 15.75, v6e 31.24 of
# 32, 95.74, 16 and 32 GiB on the chips), so those are the figures a plan must meet.
TPU_GENERATIONS: dict[str, dict[str, Any]] = {
    "v4": {"per_chip": 2, "hbm_gib": 30.75, "libtpu": "v4", "options": {"chip_config_name": "megacore"},
           "shapes": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16",
                      "8x16x16")},
    "v5p": {"per_chip": 2, "hbm_gib": 95.73, "libtpu": "v5p", "options": {},
            "shapes": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16",
                       "8x16x16", "16x16x16", "16x16x24")},
    "v5e": {"per_chip": 1, "hbm_gib": 15.75, "libtpu": "v5e", "options": {},
            "shapes": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")},
    "v6e": {"per_chip": 1, "hbm_gib": 31.24, "libtpu": "v6e", "options": {},
            "shapes": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")},
}
TPU_ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e slices
INSTALL_HINT = "pip install 'llama-jax[tpu-plan]' (libtpu 0.0.50.*, the one for jax 0.12.0.1)"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # the accelerator type of one slice, e.g. v5p-8
    generation: str
    topology: str  # libtpu's name for one slice, e.g. v5p:2x2x1
    chips: int  # per slice
    slices: int
    hbm_gib: float  # per chip
    options: dict = dataclasses.field(default_factory=dict, compare=False)  # libtpu topology options

    @property
    def devices(self) -> int:
        return self.chips * self.slices


def _slice_sizes(spec) -> dict[int, str]:
    """{N: shape in chips} for a generation's accelerator types."""
    return {spec["per_chip"] * math.prod(map(int, s.split("x"))): s for s in spec["shapes"]}


def tpu_target(name: str, slices: int = 1) -> Target:
    """The Target of a Cloud TPU accelerator type ("v5p-8": 4 chips), `slices` of them."""
    gen, _, n = name.rpartition("-")
    gen = TPU_ALIASES.get(gen, gen)
    sizes = _slice_sizes(TPU_GENERATIONS[gen]) if gen in TPU_GENERATIONS else {}
    if not n.isdigit() or int(n) not in sizes:
        valid = "; ".join(f"{g}-{{{','.join(map(str, _slice_sizes(spec)))}}}" for g, spec in TPU_GENERATIONS.items())
        raise ValueError(f"--target {name!r}: not a Cloud TPU slice this knows; valid: {valid} (v5litepod-N = v5e-N)")
    if slices < 1:
        raise ValueError(f"--slices must be >= 1, got {slices}")
    spec, shape = TPU_GENERATIONS[gen], sizes[int(n)]
    return Target(name=f"{'v5litepod' if gen == 'v5e' else gen}-{n}", generation=gen,
                  topology=f"{spec['libtpu']}:{shape}", chips=math.prod(map(int, shape.split("x"))), slices=slices,
                  hbm_gib=spec["hbm_gib"], options=spec["options"])


class LibtpuMissing(Exception):
    """No libtpu: nothing to compile for a TPU with."""


def tpu_devices(target: Target) -> list:
    """The compile-only devices of `target`'s chips, from libtpu (no TPU needed: it only compiles)."""
    if _libtpu_path() is None:
        raise LibtpuMissing(f"no TPU compiler: libtpu is not installed; {INSTALL_HINT}")
    # libtpu looks for the TPU VM it runs on unless told the hosts (one, this one) and the accelerator
    # type; its lock file guards a TPU that a compile-only client never opens, so processes may share it.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                num_slices=target.slices, **target.options)
    except RuntimeError as e:  # a libtpu that cannot make it (another version's names): one line, not a traceback
        raise ValueError(f"libtpu cannot make topology {target.topology} x {target.slices}: "
                         f"{str(e).splitlines()[0]}") from None
    return list(topology.devices)


def _libtpu_path() -> str | None:
    """Where libtpu is, as JAX looks for it: TPU_LIBRARY_PATH, else the libtpu package."""
    if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        return os.environ["TPU_LIBRARY_PATH"]
    try:
        import libtpu
    except ImportError:
        return None
    return libtpu.get_library_path()


def flat_mesh(mesh_sizes: dict[str, int], dcn: dict[str, int] | None, target: Target) -> dict[str, int]:
    """The shape of `target`'s hybrid mesh (per-slice sizes x sizes across slices) as one flat mesh:
    fake CPU devices have no slices, and there the order of the devices changes nothing."""
    dcn = {"data": target.slices} if dcn is None else dcn
    sizes = dict(mesh_sizes)
    free = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if free and target.chips % known:
        raise ValueError(f"mesh {','.join(f'{k}={v}' for k, v in sizes.items())}: {target.name}'s {target.chips} "
                         f"chips are not a multiple of {known}")
    if free:
        sizes[free[0]] = target.chips // known
    return {k: v * dcn.get(k, 1) for k, v in sizes.items()}


@dataclasses.dataclass
class Plan:
    model: str
    step: str
    mesh: dict[str, int]  # the whole mesh: an axis's size across slices times its size in one
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
    compiler: str = "XLA:CPU"  # or "XLA:TPU (libtpu <version>)"
    target: str | None = None  # the TPU slice compiled for (e.g. v5p-8), with `slices` of them
    slices: int = 1
    dcn: dict[str, int] | None = None  # the mesh's sizes across slices (make_mesh's dcn); per slice: mesh / dcn
    kernels: str = ""  # the kernel policy (Kernels.describe)
    attention: str = ""  # what runs attention, in words
    packed: bool = False  # rows pack documents: segment ids and positions in the batch
    batch_default: bool = False  # --batch not given: one row per data-parallel shard (and micro-batch)
    seq_by_seq_buffer: bool | None = None  # the compiled program holds a [seq, seq] buffer (grad / train)
    # XLA:TPU's out-of-memory message, when it refused the program: then arguments are the inputs' shards,
    # temporaries what the message says they needed, and there are no outputs
    refused: str | None = None

    @property
    def fits(self) -> bool | None:
        if self.refused:
            return False
        return None if self.hbm_gib is None else self.total <= self.hbm_gib * GiB

    @property
    def unit(self) -> str:
        return "chip" if self.compiler.startswith("XLA:TPU") else "device"


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


def plan(cfg, mesh_sizes: dict[str, int], batch: int | None, seq: int, step: str = "grad", *, remat: str = "none",
         accum_steps: int = 1, unroll_layers: bool = False, model_name: str = "", hbm_gib: float | None = None,
         rules=None, log=print, devices=None, dcn: dict[str, int] | None = None, kernels: str | None = None,
         packed: bool = False, target: Target | None = None) -> Plan:
    """Compile `step` for `cfg` on a (data, fsdp, tensor) mesh of this process's devices, or of `devices`
    (a TPU topology's: `tpu_devices(target)`, compiled ahead of time; `mesh_sizes` are then per slice and
    `dcn` the sizes across slices, as in sharding.make_mesh), and measure it.

    `batch`: global rows; None, one per data-parallel shard and micro-batch. `kernels`: "auto" or "xla"
    (Kernels.named); None, the TPU's kernels on a TPU and XLA's ops on CPU devices, whose figures stand
    for no fused kernel anyway. `packed`: rows carry segment ids and positions (train.py's packed text)."""
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from llama_jax import sharding, train
    from llama_jax.model import CACHE_AXES, KVCache, abstract_params, apply
    from llama_jax.ops import Kernels, splash_attention

    if step not in ("grad", "train", "decode"):
        raise ValueError(f"step must be grad, train or decode, got {step!r}")
    if step == "decode":
        cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    try:
        mesh = sharding.make_mesh(**mesh_sizes, devices=devices, dcn=dcn)
    except NotImplementedError as e:  # a TPU mesh axis must be a product of the torus's axes (4 of 16x16 is not)
        raise ValueError(f"mesh {sharding.format_mesh(mesh_sizes)}: does not map onto the chips' torus: "
                         f"{str(e).split('. E.g.')[0]}") from None
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    policy = Kernels.named(kernels or ("auto" if on_tpu else "xla"), mesh)
    n_batch = sharding.batch_shard_count(mesh, rules)
    batch_default = batch is None
    batch = n_batch * accum_steps if batch is None else batch
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
        # train.py's batch: tokens [batch, seq + 1] (inputs and shifted targets), rows over (data, fsdp);
        # packed text adds each token's document (segment id) and position in it.
        rows = sharding.batch_sharding(mesh)
        data = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=rows)}
        if packed:
            data |= {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows) for k in ("segment_ids", "positions")}
        if step == "grad":
            grad = jax.grad(lambda p, b: train.loss_fn(p, b, cfg, remat=remat, unroll=unroll_layers, kernels=policy))
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
                                       unroll=unroll_layers, rules=rules, kernels=policy)
            args, others = (state, data), (data, state.step, state.rng, state.skipped, state.nonfinite_streak)
        # What runs attention: the policy's kernel where it takes these shapes, else XLA's.
        choice = policy.masked_attention if packed else policy.attention
        q = jax.ShapeDtypeStruct((batch, seq, cfg.n_heads, cfg.head_dim), cfg.compute_jnp_dtype)
        k = jax.ShapeDtypeStruct((batch, seq, cfg.n_kv_heads, cfg.head_dim), cfg.compute_jnp_dtype)
        if choice == "xla":
            attention = "XLA's (materialises [seq, seq] scores)"
        elif choice == "splash" and not splash_attention.supported(q, k):
            attention = "XLA's: Splash takes seq and head_dim in multiples of 128"
        else:
            attention = {"splash": "Splash (TPU kernel)"}.get(choice, choice)
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
            logits, cache = apply(params, token[:, None], cfg, positions=position[:, None], cache=cache,
                                  kernels=policy)
            return logits[:, 0], cache

        fn = jax.jit(decode, donate_argnums=(3,))
        args, others = (params, token, token, cache), (token, token, cache)
        attention = f"{policy.decode_attention} over the cache"

    where = f"{target.name} x {target.slices}" if on_tpu and target else f"{mesh.size} devices"
    log(f"plan: compiling {step} for {model_name or 'model'} on {where} ({sharding.format_mesh(dict(mesh.shape))}), "
        f"batch {batch} x seq {seq}" + (", packed rows" if packed and step != "decode" else ""))
    t0 = time.perf_counter()
    refused = None
    # libtpu's compile-only client writes its executables to JAX's persistent cache but cannot read them
    # back (a warning on every later run): no TPU compile counts as long enough to keep there.
    keep = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf if on_tpu else keep)
    try:
        with jax.set_mesh(mesh), sharding.use_rules(rules):
            compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses a program larger than the chip's HBM: that is the answer, not an error. Its
        # message has the temporaries it needed; no option makes it finish the buffer assignment.
        if not (on_tpu and "RESOURCE_EXHAUSTED" in str(e)):
            raise
        compiled, refused = None, str(e).splitlines()[0].split("CompileTimeHbmOom: ")[-1]
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", keep)
    compile_s = time.perf_counter() - t0

    def per_device(tree):
        return sum(sharding.shard_bytes(x, x.sharding) for x in jax.tree.leaves(tree))

    inputs = per_device(params) + per_device(opt_state) + per_device(others)
    if compiled is None:
        needed = re.search(r"temporaries \(([\d.]+)G\)", refused)
        temporaries = int(float(needed.group(1)) * GiB) if needed else 0
        arguments, outputs, total, square = inputs, 0, inputs + temporaries, None
    else:
        mem = compiled.memory_analysis()
        if mem is None:
            raise ValueError("this JAX backend reports no memory analysis")
        arguments, temporaries = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
        total = arguments + outputs + temporaries + mem.generated_code_size_in_bytes
        # An array [.., .., seq, seq] in the compiled program: attention scores or mask, [batch, heads, q, k]
        # (GQA: [batch, kv heads, group, q, k]), which a fused kernel never materialises. Rank 4 and up, as
        # no weight is: a [dim, dim] matrix would match at a seq equal to dim.
        square = None if step == "decode" else bool(re.search(rf"\[(\d+,){{2,}}{seq},{seq}\]", compiled.as_text()))
    # One layer's attention scores on a device, as XLA's (non-fused) attention holds them.
    t = mesh.shape["tensor"]
    local_heads = cfg.n_heads // t if cfg.n_heads % t == 0 else cfg.n_heads
    scores = batch // n_batch // accum_steps * local_heads * (1 if step == "decode" else seq) * seq * 4
    tpu = on_tpu and target is not None
    return Plan(model=model_name, step=step, mesh=dict(mesh.shape), devices=mesh.size, batch=batch, seq=seq,
                remat=remat, accum_steps=accum_steps, unroll_layers=unroll_layers, param_dtype=cfg.param_dtype,
                optimizer=optimizer_name,
                params=per_device(params), optimizer_state=per_device(opt_state), other_inputs=per_device(others),
                arguments=arguments, outputs=outputs, temporaries=temporaries, total=total, attention_scores=scores,
                replicated=replicated, hbm_gib=hbm_gib, compile_s=compile_s,
                compiler=f"XLA:TPU (libtpu {_libtpu_version()})" if on_tpu else "XLA:CPU",
                target=target.name if tpu else None, slices=target.slices if tpu else 1,
                dcn=_dcn_sizes(mesh, dcn) if on_tpu else None, kernels=policy.describe(), attention=attention,
                packed=packed and step != "decode", batch_default=batch_default, seq_by_seq_buffer=square,
                refused=refused)


def _libtpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:  # TPU_LIBRARY_PATH
        return "?"


def _dcn_sizes(mesh, dcn) -> dict[str, int]:
    """The mesh's sizes across slices: `dcn` as given, else make_mesh's default (data across them all)."""
    from llama_jax.sharding import MESH_AXES

    if dcn is None:
        dcn = {"data": len({getattr(d, "slice_index", 0) for d in mesh.devices.flat})}
    return {a: dcn.get(a, 1) for a in MESH_AXES}


# ---------------------------------------------------------------------------------------------
# Presentation


def format_table(p: Plan) -> str:
    def gib(b):
        return f"{b / GiB:10.3f}"

    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    across = {k: v for k, v in (p.dcn or {}).items() if v > 1}
    where = f" on {p.target} x {p.slices} by {p.compiler}" if p.target else ""
    lines = [
        f"{p.model}: {p.step} step{where}, mesh {mesh} ({p.devices} {p.unit}s"
        + (f"; {','.join(f'{k}={v}' for k, v in across.items())} across slices" if across else "") + "), "
        f"batch {p.batch} x seq {p.seq}" + (", packed rows" if p.packed else "") + f", params {p.param_dtype}"
        + (f", remat {p.remat}" if p.step != "decode" else "")
        + (f", {p.accum_steps} micro-batches" if p.accum_steps > 1 else "")
        + (", layers unrolled" if p.unroll_layers and p.step != "decode" else "")
        + (f", optimizer {p.optimizer}" if p.optimizer else ""),
        f"{'per ' + p.unit:<34}{'GiB':>10}",
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
    if p.refused:
        lines.append(f"HBM{f' {p.hbm_gib:g} GiB' if p.hbm_gib else ''} per {p.unit}: does NOT fit "
                     f"(XLA:TPU refused to compile it: {p.refused})")
    elif p.hbm_gib is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"HBM {p.hbm_gib:g} GiB per {p.unit}: {verdict} ({100 * p.total / (p.hbm_gib * GiB):.0f}% used)")
    return "\n".join(lines)


def notes(p: Plan) -> list[str]:
    if p.target:
        first = (f"{'refused after' if p.refused else 'compiled in'} {p.compile_s:.1f} s by {p.compiler} for "
                 f"{p.target} x {p.slices}: the figures are what one chip would hold")
    else:
        first = (f"compiled in {p.compile_s:.1f} s; figures are XLA:CPU's buffer assignment of the partitioned "
                 f"program on {p.devices} fake CPU devices (GPU/TPU compilers fuse and schedule differently; "
                 f"--target compiles for a TPU slice with its kernels)")
    out = [first]
    if p.refused:
        out.append("XLA:TPU refused the program as larger than the chip: the arguments are the inputs' shards, the "
                   "temporaries what its message says they needed")
    if p.step != "decode":
        out.append(f"attention: {p.attention}" + ("" if p.seq_by_seq_buffer is None else
                   f"; the compiled program {'holds a' if p.seq_by_seq_buffer else 'holds no'} [seq, seq] buffer"))
        if p.seq_by_seq_buffer and not p.target:
            out.append(f"temporaries include XLA attention's float32 scores, {p.attention_scores / GiB:.3f} GiB per "
                       f"layer here, which a fused kernel (cuDNN, Splash) never materialises")
    if p.packed:
        out.append("rows are packed text, as pretraining runs: segment ids and positions in the batch, attention "
                   "masked to each document")
    if p.batch_default:
        out.append(f"--batch not given: one row per data-parallel shard{' and micro-batch' if p.accum_steps > 1 else ''}"
                   f", {p.batch}")
    out += [f"replicated: {r}" for r in p.replicated]
    return out


def main(argv: list[str]) -> int:
    """Child-process entry: `python -m llama_jax.plan '<json args>'` (run by `llama-jax plan`).

    --mesh: that many fake CPU devices. --target: the slice's chips from libtpu; without libtpu, the
    install hint and as many fake CPU devices (at most `max_cpu_devices`), the slices flattened."""
    a = json.loads(argv[0])

    def log(message):
        print(message, file=sys.stderr, flush=True)

    try:
        target = tpu_target(a["target"], a["slices"]) if a["target"] else None
        mesh, dcn, devices = a["mesh"], a["dcn"], None
        if target is None:
            _fake_cpu_devices(math.prod(mesh.values()))
        else:
            try:
                devices = tpu_devices(target)
            except LibtpuMissing as e:
                if target.devices > a["max_cpu_devices"]:
                    raise ValueError(f"--target {target.name} x {target.slices}: {target.devices} chips, and {e}; "
                                     f"without it plan simulates at most {a['max_cpu_devices']} fake CPU devices") from None
                log(f"plan: {e}; planning on {target.devices} fake CPU devices instead (XLA:CPU, XLA's attention)")
                _fake_cpu_devices(target.devices)
                mesh, dcn = flat_mesh(mesh, dcn, target), None
        hbm = a["hbm"] if a["hbm"] is not None else target.hbm_gib if target else None
        cfg = load_config(a["model"])
        p = plan(cfg, mesh, a["batch"], a["seq"], a["step"], remat=a["remat"], accum_steps=a["accum"],
                 unroll_layers=a["unroll_layers"], model_name=a["model"], hbm_gib=hbm, log=log, devices=devices,
                 dcn=dcn, packed=target is not None, target=target)
    except ValueError as e:
        print(f"llama-jax plan: error: {e}", file=sys.stderr)
        return 2
    for line in notes(p):
        log(f"plan: {line}")
    if a.get("json"):
        print(json.dumps({**dataclasses.asdict(p), "fits": p.fits}))
    else:
        print(format_table(p))
    return 0


def _fake_cpu_devices(n: int):
    """This process's CPU backend holds `n` devices (before JAX starts it; overrides XLA_FLAGS' count)."""
    import jax

    jax.config.update("jax_num_cpu_devices", n)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
