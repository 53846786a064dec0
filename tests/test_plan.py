"""`llama-jax plan`: its per-device figures against the sizes of the arrays, its fit verdict, its
errors, and the 64-device plans for the large models (each run is a child process with N fake devices)."""

import json
import math
import subprocess
import sys

import pytest

import llama_jax as lj
from llama_jax.config import to_hf_config

GiB = 1 << 30


def plan(*args, json_out=True):
    cmd = [sys.executable, "-m", "llama_jax.cli", "plan", *args] + (["--json"] if json_out else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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
