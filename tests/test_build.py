"""Packaging: `python -m build` gives an sdist and a wheel that install and run in a fresh venv.

Both builds: the default one compiles the Cython engine (a broken compile fails the build,
it never ships silently without it), and ETCDGW_NO_EXTENSIONS=1 gives a pure wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sh(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"{args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tracked tree (as a clean clone has it), without build leftovers."""
    dst = tmp_path_factory.mktemp("src") / "etcdgw"
    files = sh("git", "-C", ROOT, "ls-files", "-co", "--exclude-standard").split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "bench/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def test_sdist_and_wheel_install_and_run(source_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    sh(sys.executable, "-m", "build", "--outdir", out, source_tree)
    wheels = list(out.glob("etcdgw-*.whl"))
    assert len(list(out.glob("etcdgw-*.tar.gz"))) == 1 and len(wheels) == 1
    assert "-cp3" in wheels[0].name  # a platform wheel: the engine is compiled
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", wheels[0])
    version = sh(venv / "bin" / "etcdgw", "--version", env={**os.environ, "PATH": "/usr/bin"})
    assert "relay engine: cython" in version
    assert (venv / "share" / "man" / "man1" / "etcdgw.1").is_file()
    pure = sh(venv / "bin" / "etcdgw", "--version",
              env={"PATH": "/usr/bin", "ETCDGW_NO_EXTENSIONS": "1"})  # fmt: skip
    assert "relay engine: python" in pure


def test_pure_wheel(source_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    env = {**os.environ, "ETCDGW_NO_EXTENSIONS": "1"}
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", out, source_tree, env=env)
    (wheel,) = out.glob("etcdgw-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
