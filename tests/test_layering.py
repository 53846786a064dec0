"""The repository's structure: imports run one way (the import-linter contract in .importlinter), the
repo stands alone (nothing reads outside it), and the code cites only files it holds."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Spelled in pieces, so that this file does not match what it looks for.
BESIDE = r"\.\./" + "shared" + r'|parent / "' + "shared" + '"'  # the folder beside the clone
OUTSIDE_DOC = "DESIGN" + ".md"  # a design page that lives outside the repo
SOURCES = [p for d in ("llama_jax", "checkpoints_convert", "bench", "tests", "notebooks") for p in (REPO / d).rglob("*")
           if p.suffix in (".py", ".md", ".ipynb", ".cu", ".cc", ".h") and p.is_file()]


def test_imports_follow_the_layers():
    """`lint-imports` checks every contract of .importlinter: llama_jax's layers (cli down to config), the
    ops layer's inside, and checkpoints_convert free of JAX and llama_jax. A new import that runs back up,
    at module level or inside a function, fails here."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extras"
    r = subprocess.run([lint, "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_repo_reads_nothing_beside_it():
    """No file refers to the folder beside the clone: tests, benchmarks and docs use only what
    the repo holds or `make test` installs."""
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(REPO)) for p in SOURCES
                 if p.resolve() != this and re.search(BESIDE, p.read_text(errors="ignore"))]
    assert offenders == []


def test_code_cites_only_files_in_the_repo():
    """Comments and docs name design documents that exist: the design lives in docs/."""
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(REPO)) for p in SOURCES
                 if p.resolve() != this and OUTSIDE_DOC in p.read_text(errors="ignore")]
    offenders += [n for n in ("README.md",) if OUTSIDE_DOC in (REPO / n).read_text()]
    assert offenders == []
