"""Pretraining as a TPU pod runs it, on this machine: two processes with 4 fake CPU devices each stand
in for two slices (joined by llama_jax.distributed over 127.0.0.1 with gloo). `llama-jax train` reads
shards made by `llama-jax tokenize`, each host its own share, on a hybrid mesh (--dcn data=2: data
parallel across the slices, fsdp inside each). Checked: the mesh puts each slice's devices on its own
data row; the two hosts read disjoint documents; after kill -9 of both hosts and a restart, the losses
equal an uninterrupted run's step for step."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, STORIES_GGUF

STEPS, SAVE_EVERY, KILL_AT = 6, 2, 5
TIMEOUT_S = 300

# `llama-jax train`, with train.fit wrapped: it records the mesh and this host's batches, and kills the
# process (SIGKILL) right after step KILL_AT is logged.
WRAPPER = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from llama_jax import cli, train

    kill_at, record = int(os.environ.get("KILL_AT", "0")), os.environ["RECORD"]
    fit = train.fit

    def recording_fit(state, step_fn, batches, *, log=None, mesh=None, **kwargs):
        import jax
        me = jax.process_index()
        with open(f"{record}/mesh-{me}.json", "w") as f:
            json.dump({"shape": dict(mesh.shape),
                       "process_of_data_row": [sorted({d.process_index for d in row.flat}) for row in mesh.devices]}, f)
        seen = []

        def recorded():
            for b in batches:
                seen.append(b)
                yield b

        def hooked(m):
            log(m)
            if m["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        result = fit(state, step_fn, recorded(), log=hooked, mesh=mesh, **kwargs)
        np.savez(f"{record}/rows-{me}.npz", **{k: np.stack([b[k] for b in seen]) for k in seen[0]})
        return result

    train.fit = recording_fit
    sys.exit(cli.main(sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of random words (so a few tokens name their document), and their shards."""
    from llama_jax import cli
    from llama_jax.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("pod")
    rng = np.random.default_rng(0)
    words = ["river", "fox", "stone", "cloud", "apple", "train", "lamp", "garden", "ship", "moon", "bread", "tree",
             "window", "horse", "snow", "paper", "music", "chair", "road", "bird"]
    docs = [" ".join(rng.choice(words, rng.integers(20, 40))) for _ in range(60)]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert cli.main(["tokenize", "--data", str(d / "corpus.jsonl"), "--tokenizer", str(STORIES_GGUF),
                     "--out", str(d / "shards")]) == 0
    (d / "wrapper.py").write_text(WRAPPER)
    tok = load_tokenizer(STORIES_GGUF)
    return d, [np.asarray(tok.encode(t, eos=True), np.int32) for t in docs]


def _cluster(d, out, record, kill_at=0):
    """`llama-jax train` on two processes of 4 devices each; returns their return codes and output."""
    record.mkdir(exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, str(d / "wrapper.py"), "train", "--model", "tiny", "--tokenizer", str(STORIES_GGUF),
           "--data", str(d / "shards"), "--seq-len", "32", "--batch", "8", "--steps", str(STEPS),
           "--mesh", "fsdp=-1", "--dcn", "data=2", "--save-every", str(SAVE_EVERY), "--lr", "3e-3",
           "--out", str(out), "--no-progress"]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   LLAMA_JAX_COORDINATOR=f"127.0.0.1:{port}", LLAMA_JAX_NUM_PROCESSES="2",
                   LLAMA_JAX_PROCESS_ID=str(pid), KILL_AT=str(kill_at), RECORD=str(record),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # a host whose peer died must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outputs


def _losses(out):
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    d, _ = corpus
    out = tmp_path_factory.mktemp("reference") / "run"
    codes, outputs = _cluster(d, out, d / "record")
    assert codes == [0, 0], outputs
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_hybrid_mesh_puts_each_slice_on_its_own_data_row(corpus, reference):
    d, _ = corpus
    for me in range(2):
        mesh = json.loads((d / "record" / f"mesh-{me}.json").read_text())
        assert mesh["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}  # --dcn data=2 x --mesh fsdp=-1 (4 a slice)
        assert mesh["process_of_data_row"] == [[0], [1]]  # data row i: the devices of host (slice) i only


def _documents_of(rows, docs):
    """The documents whose tokens a host's rows hold: each segment of 6 tokens or more found in
    exactly one document (random words make longer runs of tokens unique to their document)."""
    found = set()
    for tokens, segments in zip(rows["tokens"].reshape(-1, rows["tokens"].shape[-1]),
                                rows["segment_ids"].reshape(-1, rows["segment_ids"].shape[-1])):
        for k in set(segments.tolist()) - {0}:
            piece = tokens[:-1][segments == k]
            if len(piece) < 6:
                continue
            owners = [i for i, doc in enumerate(docs)
                      if any(np.array_equal(doc[j:j + len(piece)], piece) for j in range(len(doc) - len(piece) + 1))]
            assert len(owners) >= 1, "a row holds tokens that are in no document"
            if len(owners) == 1:
                found.add(owners[0])
    return found


def test_hosts_read_disjoint_shares(corpus, reference):
    d, docs = corpus
    rows = [dict(np.load(d / "record" / f"rows-{me}.npz")) for me in range(2)]
    for r in rows:
        assert r["tokens"].shape == (STEPS, 4, 33)  # each host feeds its 4 of the 8 rows a step (seq 32 + 1)
    first, second = (_documents_of(r, docs) for r in rows)
    assert len(first) >= 5 and len(second) >= 5
    assert not first & second, sorted(first & second)


def test_kill_9_of_both_hosts_resumes_with_identical_losses(corpus, reference, tmp_path):
    from llama_jax.checkpoints import TrainCheckpointer

    d, _ = corpus
    out = tmp_path / "run"
    codes, outputs = _cluster(d, out, tmp_path / "killed", kill_at=KILL_AT)
    assert codes[0] == -signal.SIGKILL, outputs
    # Step 2's save is complete (Orbax waits for it before it starts step 4's); step 4's may still have
    # been in flight at the kill, and step 5 was never saved.
    complete = TrainCheckpointer(out, read_only=True).all_steps()
    assert complete in ([2], [2, 4]), complete

    codes, outputs = _cluster(d, out, tmp_path / "resumed")
    assert codes == [0, 0], outputs
    assert f"resuming from step {complete[-1]}" in outputs[0]
    assert _losses(out) == reference  # every step, the killed run's and the resumed run's, bit for bit
