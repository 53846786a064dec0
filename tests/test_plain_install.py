"""A plain `pip install llama-jax` (issue 31): the commands that read no external file format run without
the optional extras, and one that needs an extra says which in one line with exit code 2.

The extras' packages (torch, safetensors, gguf, tensorboardX, transformers) are installed for the other
tests, so here a `sitecustomize` on the child's path makes importing them fail, as on a plain install."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STORIES_GGUF
from llama_jax.checkpoints import convert, open_reader

EXTRAS = ("torch", "safetensors", "gguf", "tensorboardX", "transformers")
BLOCKER = f"""
import importlib.abc, sys

class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
"""


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(run the CLI without the extras, an Orbax checkpoint of stories260K, a text file)."""
    d = tmp_path_factory.mktemp("plain")
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(BLOCKER)
    ckpt = d / "ckpt"
    convert(open_reader("gguf", STORIES_GGUF), ckpt, dtype="float32", progress=False)  # with gguf, here
    text = d / "story.txt"
    text.write_text(" ".join(["Once upon a time there was a little girl who loved the sun."] * 12))
    env_path = str(d / "site")

    def cli(*argv, cwd=d):
        code = "import sys; from llama_jax.cli import main; sys.exit(main(sys.argv[1:]))"
        env = {"PYTHONPATH": env_path, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
               "LLAMA_JAX_CACHE": str(d / "cache"), "HOME": str(d),
               **{k: v for k, v in os.environ.items() if k.startswith("JAX_PERSISTENT") or k == "JAX_COMPILATION_CACHE_DIR"}}
        return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=300)

    return cli, ckpt, text


def test_the_blocker_hides_the_extras(plain):
    """In the child, each extra's package is missing, and llama_jax still imports."""
    env_path = str(Path(plain[1]).parent / "site")
    code = ("import importlib\nfor m in %r:\n    try:\n        importlib.import_module(m)\n        print('found', m)\n"
            "    except ModuleNotFoundError:\n        pass\nimport llama_jax\nprint('ok')" % (EXTRAS,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok"]


def test_generate_train_and_eval_run_without_extras(plain, tmp_path):
    cli, ckpt, text = plain
    r = cli("generate", "--model", ckpt, "--max-new-tokens", "8", "Once upon")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = cli("eval", "perplexity", "--model", ckpt, text)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout.lower()
    out = tmp_path / "run"
    r = cli("train", "--model", ckpt, "--data", text, "--seq-len", "32", "--batch", "2", "--steps", "2",
            "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "pip install 'llama-jax[tensorboard]'" in r.stderr  # TensorBoard skipped, and how to enable it
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_export_says_which_extra_in_one_line(plain, tmp_path):
    cli, ckpt, _ = plain
    r = cli("export", "hf", ckpt, tmp_path / "hf")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'llama-jax[convert]'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "hf").exists()
