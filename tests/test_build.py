"""Packaging: `make dist` gives an sdist and a manylinux wheel that install and run in a venv.

`make dist` runs once per session on a copy of the tracked tree (as a clean clone has it):
`python -m build` (the wheel is built from the sdist, so the sdist is proven to build),
`auditwheel repair` into a manylinux_* wheel and `twine check --strict`. The repaired
wheel is installed into a fresh venv, and the installed `etcdgw` relays real bytes. A pure
build (ETCDGW_NO_EXTENSIONS=1) gives a py3-none-any wheel. A broken compile fails the build;
it never ships silently without the engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from _gateway import TagServer, connect, free_tcp_port, read_line, wait_for

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: pytest may run with src/ on it, which would make
    pip in a venv see the checkout's etcdgw as "already installed"."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def sh(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    if env is None:
        env = clean_env()
    r = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"{args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tracked tree (as a clean clone has it), without build leftovers."""
    dst = tmp_path_factory.mktemp("src") / "etcdgw"
    files = sh("git", "-C", ROOT, "ls-files", "-co", "--exclude-standard").split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("bench/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.fixture(scope="session")
def dist(source_tree: Path) -> dict[str, Path]:
    """`make dist` in the copy: {"sdist": ..., "wheel": the manylinux wheel}."""
    env = clean_env()
    env.pop("ETCDGW_NO_EXTENSIONS", None)  # a release always compiles the engine
    out = sh("make", "-C", source_tree, "dist", f"PYTHON={sys.executable}", env=env)
    assert "PASSED" in out and "FAILED" not in out, out  # twine check --strict
    d = source_tree / "dist"
    sdists, wheels = list(d.glob("etcdgw-*.tar.gz")), list(d.glob("etcdgw-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in d.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


@pytest.fixture(scope="session")
def venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the manylinux wheel (and its dependencies) installed."""
    v = tmp_path_factory.mktemp("venv") / "v"
    sh(sys.executable, "-m", "venv", v)
    sh(v / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
       dist["wheel"])  # fmt: skip
    return v


def test_wheel_is_manylinux_with_the_engine_and_license(dist: dict[str, Path]) -> None:
    wheel = dist["wheel"]
    # PyPI accepts manylinux_* / musllinux_* platform tags, never linux_x86_64.
    assert "-cp3" in wheel.name and "-manylinux_" in wheel.name, wheel.name
    assert wheel.name.endswith("_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_text = z.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE")))
    assert any(n.startswith("etcdgw/_relay.") and n.endswith(".so") for n in names), names
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "License-File: LICENSE" in meta.splitlines()
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text


def test_sdist_has_what_a_packager_needs(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in (
        "LICENSE",
        "pyproject.toml",
        "setup.py",
        "src/etcdgw/_relay.pyx",
        "man/etcdgw.1",
        "man/sections.ini",
        "scripts/man.py",
        "contrib/etcdgw.service",
        "contrib/prometheus/etcdgw-rules.yml",
        "contrib/prometheus/etcdgw-rules.test.yml",
        "contrib/grafana/etcdgw.json",
        "tests/conftest.py",
        "tests/test_relay.py",
        "tests/_etcd.py",
    ):
        assert need in names, need
    assert "src/etcdgw/_relay.c" not in names  # generated at build time, never shipped
    assert not any(n.endswith((".so", ".pyc")) for n in names)


def test_installed_wheel_runs_and_relays(venv: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # nothing from the checkout
    version = sh(venv / "bin" / "etcdgw", "--version", env=env)
    assert "relay engine: cython" in version
    pure = sh(venv / "bin" / "etcdgw", "--version", env={**env, "ETCDGW_NO_EXTENSIONS": "1"})
    assert "relay engine: python" in pure
    assert (venv / "share" / "man" / "man1" / "etcdgw.1").is_file()

    with TagServer("backend") as backend:
        port = free_tcp_port()
        proc = subprocess.Popen(
            [venv / "bin" / "etcdgw", "start", f"--listen-addr=127.0.0.1:{port}",
             f"--endpoints={backend.addr}", "--log-format=text"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, cwd=tmp_path, text=True,
        )  # fmt: skip
        try:

            def listening() -> bool:
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    connect(port, timeout=1).close()
                except OSError:
                    return False
                return True

            wait_for(listening, timeout=15)
            with connect(port) as s:
                assert read_line(s) == b"backend\n"
                payload = os.urandom(200_000)
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    assert chunk, "gateway closed before echoing everything"
                    got += chunk
                assert got == payload
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        # The installed module, not the checkout, ran: the engine of the wheel.
        assert "relay-engine=cython" in err, err


def test_pure_wheel(source_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    env = {**clean_env(), "ETCDGW_NO_EXTENSIONS": "1"}
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", out, source_tree, env=env)
    (wheel,) = out.glob("etcdgw-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")


def test_cibuildwheel_configuration(source_tree: Path) -> None:
    """[tool.cibuildwheel] parses (cibuildwheel rejects unknown options) and names manylinux
    and musllinux builds for x86_64 and aarch64; building them needs containers."""
    out = sh(sys.executable, "-m", "cibuildwheel", "--print-build-identifiers",
             "--platform", "linux", source_tree)  # fmt: skip
    ids = set(out.split())
    for libc in ("manylinux", "musllinux"):
        for arch in ("x86_64", "aarch64"):
            assert f"cp311-{libc}_{arch}" in ids, ids
    assert all(i.startswith("cp3") for i in ids), ids
