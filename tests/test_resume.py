"""Checkpoints that resume exactly: `llama-jax train` killed with SIGKILL between checkpoints, or
stopped with SIGTERM, continues with the same losses step by step as a run never interrupted; a save
cut off midway is never taken for a complete one."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import train
from llama_jax.checkpoints import TrainCheckpointer
from conftest import REPO, STORIES_GGUF

# Runs `llama-jax train` and signals itself with KILL_SIG right after step KILL_AT is logged: a kill at
# an exact point of the run (here: between checkpoints, possibly while one is still being written).
WRAPPER = textwrap.dedent("""
    import os, signal, sys
    from llama_jax import cli, train

    kill_at, sig = int(os.environ.get("KILL_AT", "0")), getattr(signal, os.environ.get("KILL_SIG", "SIGKILL"))
    fit = train.fit

    def fit_then_signal(*args, log=None, **kwargs):
        def hooked(m):
            log(m)
            if m["step"] == kill_at:
                os.kill(os.getpid(), sig)
        return fit(*args, log=hooked, **kwargs)

    train.fit = fit_then_signal
    sys.exit(cli.main(sys.argv[1:]))
""")

TEXT = "\n\n".join(
    f"Story {i}. The little fox ran to the river, drank some water and then ran home to sleep. "
    f"On day {i} the sun was warm and the birds were singing in the tall green trees." for i in range(40))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "wrapper.py").write_text(WRAPPER)
    files = []
    for i, part in enumerate(TEXT.split("\n\n")[::4]):
        files.append(d / f"doc{i}.txt")
        files[-1].write_text(part)
    return d, files


def _train(out, corpus, steps=10, kill_at=0, sig="SIGKILL", extra=()):
    d, files = corpus
    env = dict(os.environ, KILL_AT=str(kill_at), KILL_SIG=sig, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(d / "wrapper.py"), "train", "--model", "tiny", "--tokenizer", str(STORIES_GGUF),
           "--data", *map(str, files), "--seq-len", "32", "--batch", "4", "--steps", str(steps),
           "--save-every", "3", "--keep", "5", "--lr", "3e-3", "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _metrics(out, skip=0):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[skip:]]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _train(out, corpus)
    assert done.returncode == 0, done.stderr
    losses = {m["step"]: m["loss"] for m in _metrics(out)}
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1]
    assert TrainCheckpointer(out).all_steps() == [3, 6, 9, 10]
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard events written
    return losses


def test_sigkill_between_checkpoints_resumes_with_identical_losses(corpus, reference, tmp_path):
    out = tmp_path / "run"
    killed = _train(out, corpus, kill_at=8)
    assert killed.returncode == -signal.SIGKILL
    before = _metrics(out)
    assert [m["step"] for m in before] == list(range(1, 9))
    complete = TrainCheckpointer(out).all_steps()
    assert complete and set(complete) <= {3, 6}, complete  # never step 8: nothing was saved there

    resumed = _train(out, corpus)
    assert resumed.returncode == 0, resumed.stderr
    start = max(complete)
    assert f"resuming from step {start}" in resumed.stderr
    # The steps after `start` ran twice; metrics.jsonl keeps one row per step, the resumed run's.
    after = _metrics(out)
    assert [m["step"] for m in after] == list(range(1, 11))
    for m in after:
        assert m["loss"] == reference[m["step"]], (m["step"], m["loss"], reference[m["step"]])
    for m in before:  # the killed run itself followed the reference too
        assert m["loss"] == reference[m["step"]]


def test_unrolled_layers_follow_the_scanned_step(corpus, reference, tmp_path):
    """`--unroll-layers` unrolls the layer loop: a different program, the same losses (float32 tiny model)."""
    done = _train(tmp_path / "run", corpus, extra=["--unroll-layers"])  # 10 steps: the same lr schedule
    assert done.returncode == 0, done.stderr
    for m in _metrics(tmp_path / "run"):
        assert abs(m["loss"] - reference[m["step"]]) < 1e-4 * abs(reference[m["step"]]), m


def test_sigterm_saves_then_exits_cleanly_and_resumes(corpus, reference, tmp_path):
    out = tmp_path / "run"
    stopped = _train(out, corpus, kill_at=5, sig="SIGTERM")
    assert stopped.returncode == 0, stopped.stderr
    assert "Traceback" not in stopped.stderr
    # The host hears of step 5 while step 6 runs (metrics come one step behind): step 6 finishes, is saved.
    assert "preempted (SIGTERM): saved step 6" in stopped.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert TrainCheckpointer(out).latest_step() == 6  # saved on the way out, between the regular saves

    resumed = _train(out, corpus)
    assert resumed.returncode == 0 and "resuming from step 6" in resumed.stderr
    after = _metrics(out, skip=6)
    assert [m["step"] for m in after] == list(range(7, 11))
    assert all(m["loss"] == reference[m["step"]] for m in after)
    # A finished run given more --steps goes on, and says that its schedule is re-planned.
    longer = _train(out, corpus, steps=11)
    assert longer.returncode == 0 and "planned for 10 steps, now 11" in longer.stderr
    assert [m["step"] for m in _metrics(out)] == list(range(1, 12))


def test_resume_restores_params_optimizer_rng_and_data_position(tmp_path):
    cfg = lj.PRESETS["tiny"]
    opt = train.make_optimizer(lr=1e-2, total_steps=5)
    state = train.init_train_state(cfg, opt, jax.random.key(7))
    batch = {"tokens": np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)}
    state, _ = train.make_train_step(cfg, opt)(state, batch)
    want = jax.device_get(state)
    ckpt = TrainCheckpointer(tmp_path, save_every=1)
    ckpt.save(1, state, {"epoch": 2, "row": 5})
    ckpt.wait()
    abstract = jax.eval_shape(lambda: train.init_train_state(cfg, opt, jax.random.key(0)))
    got, data, _ = TrainCheckpointer(tmp_path).restore(abstract)
    assert data == {"epoch": 2, "row": 5}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert int(got.step) == 1 and np.array_equal(got.rng, want.rng)


CRASH_IN_SAVE = textwrap.dedent("""
    import dataclasses, os, signal, sys
    import jax
    import llama_jax as lj
    from llama_jax import train
    from llama_jax.checkpoints import TrainCheckpointer
    from orbax.checkpoint._src.path import atomicity

    cfg = lj.PRESETS["tiny"]
    opt = train.make_optimizer()
    state = train.init_train_state(cfg, opt, jax.random.key(0))
    ckpt = TrainCheckpointer(sys.argv[1], save_every=1)
    ckpt.save(1, state, {"row": 1})
    ckpt.wait()

    # Every file of step 2 gets written; the process dies when Orbax is about to mark it complete.
    def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, dataclasses.replace(state, step=state.step + 1), {"row": 2})
    ckpt.wait()
    print("unreachable")
""")


def test_save_cut_off_midway_is_never_taken_as_complete(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "unreachable" not in done.stdout
    partial = [p for p in out.iterdir() if p.name.startswith("2") and "tmp" in p.name]
    written = sum(f.stat().st_size for f in partial[0].rglob("*") if f.is_file()) if partial else 0
    assert written > 50_000  # step 2's arrays were written, but the step was never finalized
    ckpt = TrainCheckpointer(out, save_every=1)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    cfg = lj.PRESETS["tiny"]
    abstract = jax.eval_shape(lambda: train.init_train_state(cfg, train.make_optimizer(), jax.random.key(0)))
    state, data, _ = ckpt.restore(abstract)
    assert int(state.step) == 0 and data == {"row": 1}
    assert not any("tmp" in p.name for p in out.iterdir())  # the leftover was cleaned up on open
    assert ckpt.save(2, state, {"row": 2}) and (ckpt.wait() or ckpt.all_steps() == [1, 2])
