"""`llama-jax plan`: its per-device figures against the sizes of the arrays, its fit verdict, its
errors, and the 64-device plans for the large models (each run is a child process with N fake devices);
`--target`: a TPU slice compiled ahead of time by libtpu, the same figures as compiling it here, and
the fake-CPU fallback without libtpu."""

import json
import math
import os
import subprocess
import sys

import pytest

import llama_jax as lj
from llama_jax.config import to_hf_config

GiB = 1 << 30


def plan(*args, json_out=True, env=None):
    cmd = [sys.executable, "-m", "llama_jax.cli", "plan", *args] + (["--json"] if json_out else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    return done


def plan_json(*args):
    done = plan(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def param_bytes(cfg):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in lj.abstract_params(cfg).values()
               for x in _leaves(x))


def _leaves(x):
    import jax

    return jax.tree.leaves(x)


def test_train_plan_matches_array_sizes():
    """train.py's step for tiny on fsdp=4: every parameter has a 64-wide (embed or norm) dim, so each
    device holds exactly 1/4 of the bytes; AdamW's two moments double that; XLA's own count of the
    argument buffers equals params + optimizer state + batch + the state's counters."""
    cfg = lj.PRESETS["tiny"]
    p = plan_json("--model", "tiny", "--mesh", "fsdp=4", "--batch", "8", "--seq", "32", "--train")
    total = param_bytes(cfg)
    assert p["devices"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p["params"] == total // 4
    assert 2 * p["params"] <= p["optimizer_state"] <= 2 * p["params"] + 256  # mu, nu (+ scalars: count, lr, ...)
    # tokens int32 [8, 33] split over fsdp; step, skipped, streak int32 and the rng's two uint32, replicated
    assert p["other_inputs"] == 8 * 33 * 4 // 4 + 3 * 4 + 2 * 4
    inputs = p["params"] + p["optimizer_state"] + p["other_inputs"]
    assert inputs <= p["arguments"] <= inputs + 1024  # (+ XLA's pointer tables)
    assert p["outputs"] < 1024  # new params and state are written over the donated ones
    assert p["temporaries"] > 0
    assert p["total"] == p["arguments"] + p["outputs"] + p["temporaries"]
    assert p["fits"] is None
    # The same step with its layer loop unrolled: the same inputs, and the table says so.
    unrolled = plan_json("--model", "tiny", "--mesh", "fsdp=4", "--batch", "8", "--seq", "32", "--train",
                         "--unroll-layers")
    assert unrolled["unroll_layers"] and not p["unroll_layers"]
    assert unrolled["arguments"] == p["arguments"]
    table = plan("--model", "tiny", "--mesh", "fsdp=4", "--batch", "8", "--seq", "32", "--train", "--unroll-layers",
                 json_out=False)
    assert "layers unrolled" in table.stdout, table.stderr[-3000:]


def test_grad_plan_on_a_tensor_mesh_and_fit_verdict():
    """fsdp=2,tensor=2: the embedding [256, 64] splits both ways (1/4), norms only over fsdp (1/2).
    The table says 'does NOT fit' for a tiny --hbm and 'fits' for a large one."""
    cfg = lj.PRESETS["tiny"]
    p = plan_json("--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq", "16", "--hbm", "1")
    norms = 4 * cfg.dim * (2 * cfg.n_layers + 1)
    assert p["params"] == (param_bytes(cfg) - norms) // 4 + norms // 2
    assert p["outputs"] >= p["params"]  # the gradient, laid out like the params
    assert p["fits"] is True
    small = plan("--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq", "16", "--hbm", "0.0001",
                 json_out=False)
    assert small.returncode == 0, small.stderr
    assert "HBM 0.0001 GiB per device: does NOT fit" in small.stdout
    assert "parameters" in small.stdout and "temporaries" in small.stdout
    assert "plan: compiling grad" in small.stderr and "plan:" not in small.stdout


def test_decode_plan_counts_the_kv_cache(tmp_path):
    """A checkpoint path works as --model (a Hugging Face config.json here). Decode holds params in
    bfloat16 and a KV cache split over batch (fsdp) and kv heads (tensor)."""
    cfg = lj.PRESETS["tiny"]
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    p = plan_json("--model", str(tmp_path), "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq", "64", "--decode")
    assert p["param_dtype"] == "bfloat16"
    norms = 2 * cfg.dim * (2 * cfg.n_layers + 1)
    assert p["params"] == (param_bytes(cfg) // 2 - norms) // 4 + norms // 2
    kv = 2 * cfg.n_layers * 4 * 64 * cfg.n_kv_heads * cfg.head_dim * 2 // 4  # k and v, bf16, 1/4 each
    valid = 4 * 64 // 2  # bool [batch, slots], batch split over fsdp
    tokens = 2 * 4 * 4 // 2  # token and position, int32 [batch]
    assert p["other_inputs"] == kv + valid + tokens + 4  # + the int32 write index
    assert p["outputs"] < kv  # the cache is donated and updated in place


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny", "--mesh", "fsdp=0"], "every axis size must be >= 1"),
    (["--model", "tiny", "--mesh", "pipe=2"], "mesh axis 'pipe' unknown"),
    (["--model", "no-such-model", "--mesh", "fsdp=2"], "neither a preset"),
    (["--model", "tiny", "--mesh", "fsdp=4", "--batch", "6"], "--batch 6 is not divisible by the 4"),
    (["--model", "tiny", "--mesh", "fsdp=4", "--accum", "2"], "--accum needs --train"),
    (["--model", "tiny"], "plan needs --mesh"),
    (["--model", "tiny", "--mesh", "fsdp=2", "--dcn", "data=2"], "--slices and --dcn need --target"),
    (["--model", "tiny", "--target", "v5p-9"], "--target 'v5p-9': not a Cloud TPU slice this knows; valid: v4-{8,"),
    (["--model", "tiny", "--target", "v7-8"], "v5e-{1,4,8,16,32,64,128,256}"),
    (["--model", "tiny", "--target", "v5p-8", "--slices", "0"], "--slices must be >= 1"),
    (["--model", "tiny", "--target", "v5p-8", "--slices", "2", "--dcn", "data=3"], "multiply to 3, not --slices 2"),
])
def test_plan_errors_are_one_line(args, message):
    done = plan(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_llama2_70b_on_64_devices():
    """The issue's pod: 64 devices, fsdp=16 x tensor=4, batch 256 x 4096 in 4 micro-batches. Every
    dimension divides, so each matrix is exactly 1/64 per device and each norm 1/16 (float32 master);
    the AdamW moments twice that. Compiles in seconds."""
    p = plan_json("--model", "llama2-70b", "--mesh", "fsdp=16,tensor=4", "--batch", "256", "--seq", "4096",
                  "--train", "--remat", "full", "--accum", "4", "--hbm", "80")
    assert p["devices"] == 64 and not p["replicated"] and p["accum_steps"] == 4 and not p["unroll_layers"]
    norms = 8192 * (2 * 80 + 1)
    assert p["params"] == (68_976_648_192 - norms) * 4 // 64 + norms * 4 // 16
    assert 2 * p["params"] <= p["optimizer_state"] <= 2 * p["params"] + 256
    # Full remat keeps each layer's input: a micro-batch is 64 rows, 4 per fsdp shard, so at least
    # 80 layers x [4, 4096, 8192] bfloat16 = 20 GiB of temporaries.
    assert p["temporaries"] >= 80 * 4 * 4096 * 8192 * 2
    assert p["fits"] == (p["total"] <= 80 * GiB)


def test_llama_65b_decode_on_64_devices():
    p = plan_json("--model", "llama-65b", "--mesh", "fsdp=16,tensor=4", "--batch", "256", "--seq", "2048",
                  "--decode", "--hbm", "80")
    norms = 8192 * (2 * 80 + 1)
    assert p["params"] == (65_285_660_672 - norms) * 2 // 64 + norms * 2 // 16  # bfloat16
    kv = 2 * 80 * 256 * 2048 * 64 * 128 * 2 // 64
    assert kv <= p["other_inputs"] <= kv + GiB // 1000
    assert p["fits"] is True


def test_model_from_checkpoints(tmp_path):
    """--model may be a checkpoint made by `convert` or a training run's folder: the config comes from
    their metadata."""
    import jax
    from hf_reference import hf_model

    from llama_jax.checkpoints import TrainCheckpointer, convert, open_reader
    from llama_jax.plan import load_config
    from llama_jax.train import init_train_state, make_optimizer

    hf_model(seed=0, heads=4, kv_heads=2).save_pretrained(tmp_path / "hf")
    convert(open_reader("hf", tmp_path / "hf"), tmp_path / "converted", progress=False)
    cfg = load_config(str(tmp_path / "converted"))
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads) == (64, 4, 2)
    assert load_config(str(tmp_path / "hf")) == cfg.replace(param_dtype="float32")

    cfg = lj.PRESETS["tiny-gqa"]
    ckpt = TrainCheckpointer(tmp_path / "run", async_save=False, meta={"config": cfg.to_dict()})
    ckpt.save(1, init_train_state(cfg, make_optimizer(), jax.random.key(0)), force=True)
    ckpt.wait()
    ckpt.close()
    assert load_config(str(tmp_path / "run")) == cfg
    with pytest.raises(ValueError, match="not a checkpoint, GGUF file"):
        load_config(str(tmp_path))


# --- --target: a TPU slice, compiled by libtpu's XLA:TPU (no TPU here). tiny's 16-wide heads are too narrow
# for Splash (it takes multiples of 128), so its attention is XLA's on the TPU too.

TINY_V5P = ["--target", "v5p-8", "--slices", "2", "--model", "tiny", "--seq", "128", "--train"]


def test_target_matches_compiling_it_here(monkeypatch):
    """tiny's train step for two v5p-8 slices: the mesh defaults to fsdp over each slice's 4 chips and data
    across the 2 slices, the batch to one packed row per data-parallel shard, and the memory figures
    plan prints are XLA:TPU's for the same step compiled here from the topology."""
    pytest.importorskip("libtpu")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from llama_jax import sharding, train
    from llama_jax.ops import Kernels

    p = plan_json(*TINY_V5P)
    assert p["compiler"].startswith("XLA:TPU (libtpu ") and p["target"] == "v5p-8" and p["slices"] == 2
    assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and p["devices"] == 8
    assert p["dcn"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert p["batch"] == 8 and p["batch_default"] and p["packed"]
    assert "masked_attention=splash" in p["kernels"] and p["attention"].startswith("XLA's: Splash takes")
    assert p["seq_by_seq_buffer"] and p["hbm_gib"] == 95.73 and p["fits"] is True and p["refused"] is None

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu on a machine without TPUs
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # its lock file guards a TPU never opened here
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", num_slices=2)
    mesh = sharding.make_mesh(fsdp=-1, devices=topology.devices)
    cfg, optimizer = lj.PRESETS["tiny"], train.make_optimizer()
    abstract = jax.eval_shape(lambda: train.init_train_state(cfg, optimizer, jax.random.key(0)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                         train.state_shardings(cfg, optimizer, mesh))
    rows = sharding.batch_sharding(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=rows),
             "segment_ids": jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=rows),
             "positions": jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=rows)}
    step = train.make_train_step(cfg, optimizer, mesh, kernels=Kernels.auto(mesh))
    keep = jax.config.jax_persistent_cache_min_compile_time_secs  # (no TPU executables in the suite's cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
    try:
        mem = step.lower(state, batch).compile().memory_analysis()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", keep)
    assert p["arguments"] == mem.argument_size_in_bytes
    assert p["temporaries"] == mem.temp_size_in_bytes
    assert p["outputs"] == mem.output_size_in_bytes - mem.alias_size_in_bytes
    assert p["total"] == (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    assert p["params"] == param_bytes(cfg) // 4  # fsdp=4 in a slice, the copies across slices (data)


def test_target_runs_splash_on_one_slice(tmp_path):
    """A model with 128-wide heads on one v5p-8 slice: Splash runs attention, and the compiled program
    holds no [seq, seq] buffer (XLA's attention on fake CPU devices holds one: the next test)."""
    pytest.importorskip("libtpu")
    cfg = lj.PRESETS["tiny"].replace(dim=256, n_heads=2, n_kv_heads=2, n_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    p = plan_json("--target", "v5p-8", "--model", str(tmp_path), "--seq", "256", "--train")
    assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and p["dcn"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert p["batch"] == 4 and p["params"] == param_bytes(cfg) // 4
    assert p["attention"] == "Splash (TPU kernel)" and p["seq_by_seq_buffer"] is False


def test_target_without_libtpu_falls_back_to_fake_cpu_devices(tmp_path):
    """With libtpu hidden (a module of that name that fails to import, first on the path), plan says how
    to install it and plans the same mesh on as many fake CPU devices; one that needs more devices than
    plan simulates is a one-line error."""
    (tmp_path / "libtpu.py").write_text("raise ModuleNotFoundError(\"No module named 'libtpu'\", name='libtpu')\n")
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    done = plan(*TINY_V5P, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    hint = [line for line in done.stderr.splitlines() if "pip install 'llama-jax[tpu-plan]'" in line]
    assert len(hint) == 1 and "planning on 8 fake CPU devices instead" in hint[0], done.stderr
    p = json.loads(done.stdout)
    assert p["compiler"] == "XLA:CPU" and p["target"] is None and p["devices"] == 8
    assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and p["batch"] == 8 and p["packed"]
    assert p["params"] == param_bytes(lj.PRESETS["tiny"]) // 4 and p["hbm_gib"] == 95.73
    assert p["attention"].startswith("XLA's") and p["seq_by_seq_buffer"] is True

    big = plan("--target", "v5p-8192", "--slices", "2", "--model", "tiny", env=env)
    assert big.returncode == 2 and "Traceback" not in big.stderr
    assert big.stderr.count("\n") == 1 and "8192 chips" in big.stderr and "at most 4096" in big.stderr, big.stderr
