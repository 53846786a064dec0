"""The notebooks run top to bottom on CPU (with the small sizes they pick there) and say what they should.

Each notebook is executed with nbclient in a fresh kernel running this interpreter (so the test works
wherever `make test` installed `.[test]`, whatever Jupyter kernels the machine has). Any cell error
fails the test. Each notebook's last cell (tagged "results") prints a JSON summary of what it did,
and the test checks one meaningful figure of each.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart", "convert_weights", "finetune_alpaca", "sharded_pretraining"]
CELL_TIMEOUT = 420  # seconds for one cell on a slow, shared CPU


def _kernel_manager(tmp: Path):
    """A kernel manager whose only kernel spec runs ipykernel on this very interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / "llama-jax-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llama-jax tests", "language": "python"}))
    return KernelManager(kernel_name="llama-jax-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def run_notebook(name: str, tmp: Path) -> tuple[dict, nbformat.NotebookNode]:
    """Execute notebooks/<name>.ipynb (in `tmp`, on CPU); return its results JSON and the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    work = tmp / "cwd"
    work.mkdir()
    env_before = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits this process's environment
    os.environ.pop("LLAMA_JAX_SOURCE", None)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # The notebooks keep their checkpoints in tempfile.mkdtemp() folders (a Colab user's scratch space): under
    # pytest's tmp they go with it, instead of leaving a gigabyte in the machine's /tmp every run.
    (tmp / "tmpdir").mkdir()
    os.environ["TMPDIR"] = str(tmp / "tmpdir")
    try:
        client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp), timeout=CELL_TIMEOUT,
                                         resources={"metadata": {"path": str(work)}})
        t0 = time.perf_counter()
        client.execute()  # raises CellExecutionError on the first failing cell
        print(f"{name}: executed in {time.perf_counter() - t0:.0f} s; slowest cells: {_slowest(nb)}")
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        if os.environ.get("LLAMA_JAX_NOTEBOOK_OUT"):  # keep the executed notebook for a look
            out = Path(os.environ["LLAMA_JAX_NOTEBOOK_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / f"{name}.ipynb")
    cells = [c for c in nb.cells if "results" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'results'"
    return json.loads(_stream_text(cells[0])), nb


def _slowest(nb, n: int = 3) -> str:
    from datetime import datetime

    times = []
    for i, cell in enumerate(nb.cells):
        t = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            times.append(((end - start).total_seconds(), i))
    return ", ".join(f"cell {i} {s:.0f} s" for s, i in sorted(times, reverse=True)[:n])


def _has_image(nb) -> bool:
    return any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}.ipynb cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{name}.ipynb cell {i} has an execution count"
    first_code = [c.source for c in nb.cells if c.cell_type == "code"][:2]
    assert "google.colab" in first_code[0], f"{name}.ipynb: the first code cell should install in Colab"
    assert "default_backend" in first_code[1], f"{name}.ipynb: the second code cell should detect the accelerator"


def test_quickstart(tmp_path):
    results, nb = run_notebook("quickstart", tmp_path)
    assert all(text.strip() for text in results["generated"]), results["generated"]
    assert all(text.strip() for text in results["chat"]), results["chat"]
    assert results["top_token"] == " Paris", results
    assert results["by_hand_max_diff"] < 1e-3
    assert results["attention_rows_sum_to_one"]
    assert _has_image(nb)


def test_convert_weights(tmp_path):
    results, nb = run_notebook("convert_weights", tmp_path)
    assert list((tmp_path / "tmpdir").glob("llama-jax-convert-*")), "its scratch folder left pytest's tmp"
    assert results["max_logit_diff"]["hf"] < 1e-4, results
    assert results["max_logit_diff"]["meta"] < 1e-4, results
    # transformers dequantizes the 4-bit GGUF itself; 30 float32 layers in two frameworks (tests/test_convert_gguf.py)
    assert results["max_logit_diff"]["gguf"] < 1e-3, results
    assert results["gguf_next_token"] == " Paris", results
    assert results["export_roundtrip_max_diff"] < 1e-4, results
    assert "Paris" in results["exported_generation"], results


def test_finetune_alpaca(tmp_path):
    results, nb = run_notebook("finetune_alpaca", tmp_path)
    assert list((tmp_path / "tmpdir").glob("llama-jax-finetune-*")), "its scratch folder left pytest's tmp"
    assert results["final_loss"] < 0.5 * results["first_loss"], results
    assert results["before"] != results["after"]
    assert _has_image(nb)


def test_sharded_pretraining(tmp_path):
    results, nb = run_notebook("sharded_pretraining", tmp_path)
    assert list((tmp_path / "tmpdir").glob("llama-jax-pretrain-*")), "its scratch folder left pytest's tmp"
    assert results["resumed_from"] == max(results["checkpoints_first_job"]) and results["resumed_from"] > 0, results
    assert results["first_step_after_resume"] == results["resumed_from"] + 1, results
    assert results["final_step"] == 2 * results["resumed_from"], results
    assert results["final_loss"] < results["loss_before_resume"] < results["first_loss"], results
    assert results["plan_fits"] is True, results
    assert _has_image(nb)
