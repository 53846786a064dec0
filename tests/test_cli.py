"""The command line end to end (issue 31): every model-taking command accepts what `finetune` writes,
and bad input ends in one line on stderr with exit code 2, never a traceback."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_jax as lj
from llama_jax.qarray import QArray
from llama_jax.checkpoints import convert, is_train_checkpoint, open_reader, run_step
from llama_jax.cli import main
from conftest import STORIES_GGUF

WORDS = "one two three four five six seven eight".split()


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A one-step `finetune` of stories260K: the run folder."""
    d = tmp_path_factory.mktemp("finetuned")
    data = d / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."} for w in WORDS]))
    out = d / "run"
    rc = main(["finetune", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(out), "--batch", "8",
               "--epochs", "1", "--lr", "3e-3", "--warmup-ratio", "0", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """stories260K converted to an Orbax checkpoint (float32)."""
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    convert(open_reader("gguf", STORIES_GGUF), out, dtype="float32", progress=False)
    return out


def test_run_folder_is_a_model(run):
    """A run folder is its latest step, a step folder that step: float32 params (the run's dtype), the
    run's config, and the tokenizer the run copied into its folder."""
    assert is_train_checkpoint(run) and (run / "tokenizer.model").is_file()
    model = lj.load(run)
    assert model.params["layers"]["mlp"]["down"].dtype == np.float32
    assert model.config.param_dtype == "float32" and model.tokenizer is not None
    assert model.config.compute_dtype == "float32"  # "auto" on CPU
    root, step = run_step(run)
    assert root == run.absolute() and step == 1
    same = lj.load(run / "1")
    np.testing.assert_array_equal(np.asarray(same.params["embed"]), np.asarray(model.params["embed"]))
    # The params are the fine-tuned ones, not the GGUF's.
    base = lj.load(STORIES_GGUF)
    assert not np.array_equal(np.asarray(base.params["embed"]), np.asarray(model.params["embed"]))


def test_generate_on_a_run_prints_what_python_generates(run, capsys):
    model = lj.load(run)
    want = "".join(lj.stream(model, "Once", max_new_tokens=8))
    for path in (run, run / "1"):
        rc, out, err = _cli(capsys, "generate", "--model", path, "Once", "--max-new-tokens", "8")
        assert rc == 0, err
        assert out == want + "\n"
    rc, out, err = _cli(capsys, "generate", "--model", run, "Once", "--max-new-tokens", "8", "--kernels", "xla")
    assert rc == 0 and out == want + "\n", err


def test_export_quantize_and_eval_take_a_run(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    rc, _, err = _cli(capsys, "export", "hf", run, tmp_path / "hf")
    assert rc == 0, err
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model = lj.load(run)
    got = back.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(got, np.asarray(model.params["embed"]))
    assert (tmp_path / "hf" / "tokenizer.model").is_file()

    rc, _, err = _cli(capsys, "quantize", run, tmp_path / "q8", "--bits", "8")
    assert rc == 0, err
    q = lj.load(tmp_path / "q8")
    assert isinstance(q.params["layers"]["mlp"]["down"], QArray) and q.tokenizer is not None

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl. She liked to play in the park.")
    rc, out, err = _cli(capsys, "eval", "perplexity", text, "--model", run, "--json")
    assert rc == 0, err
    assert json.loads(out)["perplexity"] > 1


def test_chat_survives_a_message_too_long(checkpoint, capsys, monkeypatch):
    """A message longer than the context gets an error line; the next message is answered; /reset says so."""
    long = " ".join(["word"] * 2000)
    stdin = io.TextIOWrapper(io.BytesIO(f"{long}\n\n/reset\nOnce upon a time\n".encode() + b"\xff\xfe\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = _cli(capsys, "chat", "--model", checkpoint, "--max-new-tokens", "6")
    assert rc == 0, err
    assert "does not fit the model's context" in err and "reset" in err and "not valid UTF-8" in err
    assert "Traceback" not in err
    assert out.strip()  # the second message got a reply


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.0003)" not in out and "(default: 2e-05)" in out and "(default: auto)" in out


def _corrupt_chunk(checkpoint, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(checkpoint, bad)
    chunk = next(p for p in sorted((bad / "params" / "layers.attn.q").rglob("*")) if p.is_file() and p.name == "0")
    chunk.write_bytes(b"\x00garbage" * 3)
    return bad


def _bad_json(checkpoint, tmp_path):
    bad = tmp_path / "badjson"
    shutil.copytree(checkpoint, bad)
    (bad / "llama_jax.json").write_text("{not json")
    return bad


def _alpaca(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    return tmp_path / "alpaca.json"


def _text(tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time.")
    return tmp_path / "story.txt"


def _a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


# (argv builder, what the message names). Each must end in exit 2, one stderr line, no traceback.
BAD = {
    "seed-overflow": (lambda c, t: ["generate", "--model", c, "hi", "--seed", "99999999999999999999"], "--seed"),
    "prompt-not-utf8": (lambda c, t: ["generate", "--model", c, "caf\udce9"], "UTF-8"),
    "out-not-creatable": (lambda c, t: ["convert", "gguf", STORIES_GGUF, _a_file(t) / "out"], "out"),
    "train-out-not-creatable": (lambda c, t: ["finetune", "--model", c, "--data", _alpaca(t), "--out",
                                              _a_file(t) / "run"], "file"),
    "corrupt-chunk": (lambda c, t: ["generate", "--model", _corrupt_chunk(c, t), "hi"], "corrupt"),
    "invalid-llama_jax.json": (lambda c, t: ["generate", "--model", _bad_json(c, t), "hi"], "llama_jax.json"),
    "not-a-model": (lambda c, t: ["generate", "--model", t, "hi"], "not a model"),
    "missing-model": (lambda c, t: ["eval", "perplexity", _text(t), "--model", t / "nothing"], "nothing"),
    "plan-mesh-too-large": (lambda c, t: ["plan", "--model", "tiny", "--mesh", "fsdp=100000"], "--mesh"),
    "bad-kernels": (lambda c, t: ["generate", "--kernels", "fast", "hi"], "--kernels"),
    "export-quantized": (lambda c, t: ["export", "hf", t / "nothing", t / "hf"], "nothing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, checkpoint, tmp_path, capsys):
    build, named = BAD[case]
    argv = [str(a) for a in build(checkpoint, tmp_path)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (argv, err)
    assert err.count("\n") == 1 and "error" in err and named in err, err
    assert "Traceback" not in err
    assert out == ""
    leftovers = [p for p in tmp_path.rglob("*") if p.name in ("out", "hf", "llama_jax.json") and p.parent == tmp_path]
    assert not leftovers  # nothing that looks complete


def _cli_process(*argv, cwd, **env):
    """The command in a process of its own: what a user's shell sees, teardown included."""
    code = "import sys; from llama_jax.cli import entry; sys.argv[0] = 'llama-jax'; entry()"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}, timeout=300)


def test_corrupt_chunk_in_a_real_process_is_one_line(checkpoint, tmp_path):
    """Orbax's background threads are stopped before exit: no 'Event loop is closed' traceback after the
    message."""
    r = _cli_process("generate", "--model", _corrupt_chunk(checkpoint, tmp_path), "hi", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "corrupt" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to simulate a full disk")
def test_full_disk_during_training_is_one_line(checkpoint, tmp_path):
    """A write that fails with ENOSPC mid-run (metrics.jsonl on /dev/full) ends in one line, exit 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    r = _cli_process("train", "--model", checkpoint, "--data", _text(tmp_path), "--seq-len", "8", "--batch", "2",
                     "--steps", "2", "--out", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert "No space left on device" in lines[-1] and lines[-1].count("error") == 1, r.stderr


def test_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    """LLAMA_JAX_CACHE under a file: the default model cannot be converted there; one line, exit 2."""
    blocker = _a_file(tmp_path)
    r = _cli_process("generate", "hi", cwd=tmp_path, LLAMA_JAX_CACHE=str(blocker / "c"))
    assert r.returncode == 2, r.stderr
    *progress, last = r.stderr.strip().splitlines()  # a line saying what it converts, then the error
    assert len(progress) <= 1 and "error" in last and str(blocker) in last, r.stderr
    assert "Traceback" not in r.stderr
