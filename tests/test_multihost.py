"""Two processes on this machine, joined by llama_jax.distributed.initialize over 127.0.0.1 with gloo
CPU collectives and 2 fake devices each, compute the loss and gradients one process computes on 4
devices. Parameters are created sharded across both processes; each process feeds only its rows.

The workers are this file run as a script (see the bottom)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BATCH, SEQ = 8, 16
MESH = dict(data=1, fsdp=2, tensor=2)  # fsdp spans the two processes, tensor stays inside each
TIMEOUT_S = 240


def compute(mesh, rows: slice | None = None):
    """Loss and replicated gradients of tiny's next-token loss for the fixed batch, on `mesh`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import llama_jax as lj
    from llama_jax import sharding
    from llama_jax.model import apply

    cfg = lj.PRESETS["tiny"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    if rows is None:
        rows = sharding.local_batch_rows(BATCH, mesh)

    def loss_fn(params, tokens):
        logits = apply(params, tokens[:, :-1], cfg)[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        params = lj.init_params(cfg, jax.random.key(0), mesh)
        batch = sharding.place_batch(tokens[rows], mesh)
        step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=replicated)
        loss, grads = step(params, batch)
    flat = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
            for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    return float(loss.addressable_data(0)), flat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    import jax

    from llama_jax.sharding import make_mesh

    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   PYTHONPATH=str(Path(__file__).parent.parent))
        # Process 0 is told its coordinates as arguments, process 1 through the environment.
        coords = [f"127.0.0.1:{port}", "2", "0"] if pid == 0 else []
        if pid == 1:
            env.update(LLAMA_JAX_COORDINATOR=f"127.0.0.1:{port}", LLAMA_JAX_NUM_PROCESSES="2", LLAMA_JAX_PROCESS_ID="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path / f"out{pid}.npz"), *coords], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # a hung peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {pid} failed:\n{out[-4000:]}"
        assert "process %d of 2, 2 local devices of 4" % pid in out

    want_loss, want = compute(make_mesh(**MESH, devices=jax.devices()[:4]))
    for pid in range(2):
        got = np.load(tmp_path / f"out{pid}.npz")
        assert abs(float(got["__loss__"]) - want_loss) <= 1e-5
        assert set(got.files) - {"__loss__"} == set(want)
        for name, w in want.items():
            assert np.max(np.abs(got[name] - w)) <= 1e-5, name


def test_initialize_arguments_are_checked(monkeypatch):
    from llama_jax import distributed

    with pytest.raises(ValueError, match="needs a port"):
        distributed.initialize("127.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv("LLAMA_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="LLAMA_JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
    monkeypatch.setenv("LLAMA_JAX_NUM_PROCESSES", "1")  # one process: nothing to join
    assert distributed.initialize().process_count == 1
    monkeypatch.delenv("LLAMA_JAX_NUM_PROCESSES")
    # This test process has used JAX already: joining now cannot work, and says why.
    with pytest.raises(ValueError, match="must run before any other JAX call"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=0)


def test_nothing_configured_runs_as_one_process():
    """The same script on a laptop: no arguments, no variables, no cluster -> one process, no error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_JAX_", "SLURM_", "OMPI_", "JAX_COORD"))}
    code = "from llama_jax import distributed; i = distributed.initialize(); print(i.process_count, i.process_index)"
    done = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "0"]


if __name__ == "__main__":  # a worker: join, compute, save
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llama_jax import distributed

    coords = sys.argv[2:]  # coordinator, num_processes, process_id; or none: the environment says
    info = distributed.initialize(coords[0], int(coords[1]), int(coords[2]), timeout_s=60) if coords else \
        distributed.initialize(timeout_s=60)
    from llama_jax.sharding import make_mesh

    loss, grads = compute(make_mesh(**MESH))
    np.savez(sys.argv[1], __loss__=loss, **grads)
    print(f"worker {info.process_index}: loss {loss:.6f}", flush=True)
