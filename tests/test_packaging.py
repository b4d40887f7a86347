"""The source distribution carries everything the compiled parts need (MANIFEST.in).

setuptools puts only the Python packages and the .cpp/.cu files that setup.py names into
an sdist by itself. Without the headers (csrc/**/*.h, *.cuh, and the cells' shared
pointwise math, csrc/cells/*.inc) an install from the sdist fails to compile the kernels
and, by default, silently falls back to the pure-Python backends."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_EXTS = (".h", ".inc", ".cuh", ".cpp", ".cu")


def _kernel_sources():
    out = []
    for d, _, files in os.walk(os.path.join(ROOT, "csrc")):
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(SOURCE_EXTS)]
    return sorted(out)


def test_sdist_carries_every_kernel_source_and_header(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "MANIFEST.in")):
        pytest.fail("MANIFEST.in is missing")
    wanted = _kernel_sources()
    assert any(f.endswith(".inc") for f in wanted) and any(f.endswith(".cuh") for f in wanted)
    # From a copy of the tree without build products: setuptools also adds whatever an
    # earlier build's *.egg-info/SOURCES.txt lists, which would hide a gap in MANIFEST.in.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "bench_results", "__pycache__", "*.so", ".pytest_cache"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"), "--formats=gztar"],
                   cwd=src, check=True, capture_output=True, env={**os.environ, "FUSEDRNN_NO_EXT": "1"})
    (archive,) = list((tmp_path / "dist").glob("*.tar.gz"))
    with tarfile.open(archive) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    missing = [f for f in wanted if f not in names]
    assert not missing, f"not in the sdist: {missing}"
    for f in ("MANIFEST.in", "pyproject.toml", "README.md", "dev.py", "tests/conftest.py", "bench/cpu_ops.py"):
        assert f in names, f"{f} not in the sdist"
