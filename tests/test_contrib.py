"""Operator deliverables: the man page indexes, the systemd unit is sandboxed and fits what the
gateway really does, and the Prometheus rules pass their promtool unit tests.

The sandbox check runs a real gateway (either engine) under strace while it relays over TCP
v4, v6 and a unix socket, serves /metrics, notifies "systemd", reloads and drains; every
system call it makes must pass the unit's SystemCallFilter (expanded by systemd-analyze
itself), every socket family its RestrictAddressFamilies, and no mapping may be writable
and executable (MemoryDenyWriteExecute). PID 1 here is not systemd, so this is the closest
check to running it under the unit that works on any machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from functools import cache
from pathlib import Path

import pytest

from _gateway import TagServer, connect, engine_env, free_tcp_port, read_line, tool

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "etcdgw.service"
DROPINS = ROOT / "contrib" / "systemd-dropins"
RULES = ROOT / "contrib" / "prometheus" / "etcdgw-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "etcdgw-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "etcdgw.json"


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


# --- man page ------------------------------------------------------------------------------


def test_man_page_has_a_whatis_line_examples_and_see_also(tmp_path: Path) -> None:
    page = ROOT / "man" / "etcdgw.1"
    r = run(tool("lexgrog"), page)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f'{page}: "etcdgw - local TCP gateway for etcd clusters"'
    text = page.read_text()
    sections = re.findall(r"^\.SH (.+)$", text, re.M)
    for need in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXAMPLES", "SEE ALSO"):
        assert need in sections, sections
    see_also = text.split(".SH SEE ALSO", 1)[1].split(".SH", 1)[0]
    for ref in ("etcd", "etcdctl", "haproxy", "systemd.service"):
        assert f".BR {ref} (" in see_also, see_also
    examples = text.split(".SH EXAMPLES", 1)[1].split(".SH", 1)[0]
    for need in ("\\-\\-discovery\\-srv=", "etcdgw status", "systemctl"):
        assert need in examples, need
    # What `man -k etcd` does after an install: mandb indexes the page, apropos finds it.
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    shutil.copy(page, man1)
    r = run(tool("mandb"), "-q", "-c", tmp_path / "man")
    assert r.returncode == 0, r.stderr
    r = run(tool("apropos"), "-M", tmp_path / "man", "etcd")
    assert r.stdout.split() == "etcdgw (1) - local TCP gateway for etcd clusters".split()


# --- systemd unit --------------------------------------------------------------------------


def exposure(unit: Path) -> tuple[float, str]:
    r = run(tool("systemd-analyze"), "security", "--offline=true", "--no-pager", unit)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, f"systemd-analyze gave no rating ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return float(m.group(1)), r.stdout


def test_unit_exposure_is_ok() -> None:
    level, report = exposure(UNIT)
    assert level <= 2.0, report
    assert re.search(r": \d+\.\d+ OK", report), report


@pytest.mark.parametrize("dropin", [None, "low-port.conf", "kernel-fast-path.conf"])
def test_unit_verifies_without_warnings(dropin: str | None, tmp_path: Path) -> None:
    """`systemd-analyze verify` knows every directive (the security rating silently ignores
    an unknown or misspelt one). ExecStart points at a binary this machine has."""
    text = UNIT.read_text()
    if dropin:
        extra = (DROPINS / dropin).read_text().split("[Service]", 1)[1]
        text = text.replace("[Install]", extra + "\n[Install]")
    unit = tmp_path / "etcdgw.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", text))
    r = run(tool("systemd-analyze"), "verify", "--man=no", unit)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("dropin", ["low-port.conf", "kernel-fast-path.conf"])
def test_dropins_apply_to_the_unit(dropin: str, tmp_path: Path) -> None:
    """Each documented drop-in parses with the unit and grants exactly what it is for."""
    merged = tmp_path / "etcdgw.service"
    extra = (DROPINS / dropin).read_text().split("[Service]", 1)[1]
    merged.write_text(UNIT.read_text().replace("[Install]", extra + "\n[Install]"))
    base_level, base = exposure(UNIT)
    level, report = exposure(merged)
    assert base_level < level <= 3.0, report
    check = "CAP_NET_(BIND_SERVICE" if dropin == "low-port.conf" else "~CAP_BPF "
    line = next(ln for ln in report.splitlines() if check in ln)
    assert line.startswith("✗"), line  # now granted
    assert next(ln for ln in base.splitlines() if check in ln).startswith("✓")


def unit_values(key: str) -> list[str]:
    """Every value of `key=` in the unit's [Service] section, in order."""
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    return [ln.split("=", 1)[1].strip() for ln in service.splitlines() if ln.startswith(f"{key}=")]


@cache
def syscall_set(name: str) -> frozenset[str]:
    """A syscall or @group, expanded by systemd-analyze itself (groups nest)."""
    if not name.startswith("@"):
        return frozenset({name})
    r = run(tool("systemd-analyze"), "syscall-filter", name)
    assert r.returncode == 0, r.stderr
    out: set[str] = set()
    for ln in r.stdout.splitlines()[1:]:
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            out |= syscall_set(ln)
    return frozenset(out)


def allowed_syscalls() -> set[str]:
    allowed: set[str] = set()
    for value in unit_values("SystemCallFilter"):
        deny = value.startswith("~")
        for name in value.lstrip("~").split():
            allowed = allowed - syscall_set(name) if deny else allowed | syscall_set(name)
    return allowed


def test_gateway_fits_the_unit_sandbox(relay_impl: str, tmp_path: Path) -> None:
    strace = tool("strace")
    trace = tmp_path / "trace"
    sock_path = tmp_path / "etcd.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    port, mport = free_tcp_port(), free_tcp_port()
    with TagServer("m1") as backend, notify:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(f"endpoints: [{backend.addr}]\n")
        env = {**engine_env(relay_impl), "NOTIFY_SOCKET": str(tmp_path / "notify")}
        proc = subprocess.Popen(
            [strace, "-f", "-qq", "-o", trace, sys.executable,
             "-m", "etcdgw", "start", f"--listen-addr=127.0.0.1:{port}",
             f"--listen-addr=[::1]:{port}", f"--listen-addr=unix://{sock_path}",
             f"--config-file={cfg}", f"--metrics-addr=127.0.0.1:{mport}", "--log-format=text"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env,
            text=True,
        )  # fmt: skip
        gw_pid = 0
        try:
            assert notify.recv(4096).startswith(b"READY=1")
            # Signals go to the gateway itself, strace's child (strace would only detach).
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert len(children) == 1, children
            gw_pid = int(children[0])
            payload = os.urandom(1 << 20)  # bulk: the Cython engine's splice path
            for family, addr in (
                (socket.AF_INET, ("127.0.0.1", port)),
                (socket.AF_INET6, ("::1", port)),
                (socket.AF_UNIX, str(sock_path)),
            ):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(30)
                    s.connect(addr)
                    assert read_line(s) == b"m1\n"
                    s.sendall(payload)
                    got = bytearray()
                    while len(got) < len(payload):
                        chunk = s.recv(1 << 16)
                        assert chunk
                        got += chunk
                    assert got == payload
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                assert b"etcdgw_connections_accepted_total 3.0" in r.read()
            os.kill(gw_pid, signal.SIGHUP)
            assert notify.recv(4096).startswith(b"RELOADING=1")
            assert notify.recv(4096).startswith(b"READY=1")
            with connect(port) as s:  # still relaying after the reload
                assert read_line(s) == b"m1\n"
            os.kill(gw_pid, signal.SIGTERM)
            assert notify.recv(4096).startswith(b"STOPPING=1")
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                if gw_pid:
                    os.kill(gw_pid, signal.SIGKILL)  # ours, started just above
                proc.kill()
                proc.communicate(timeout=10)
        assert proc.returncode == 0, err

    lines = trace.read_text().splitlines()
    used = {m.group(1) for ln in lines if (m := re.match(r"\d+\s+([a-z0-9_]+)\(", ln))}
    assert {"splice", "epoll_wait", "accept4"} & used or relay_impl == "python", used
    denied = used - allowed_syscalls()
    assert not denied, f"system calls the unit's SystemCallFilter denies: {sorted(denied)}"
    families = {
        m.group(1) for ln in lines if (m := re.search(r"\d+\s+socket(?:pair)?\((AF_\w+)", ln))
    }
    allowed_families = set(" ".join(unit_values("RestrictAddressFamilies")).split())
    assert families and families <= allowed_families, families
    assert unit_values("MemoryDenyWriteExecute") == ["yes"]
    wx = [
        ln
        for ln in lines
        if re.match(r"\d+\s+(mmap|mprotect|pkey_mprotect)\(", ln)
        and "PROT_EXEC" in ln
        and ("PROT_WRITE" in ln or "mprotect(" in ln)
    ]
    assert not wx, f"writable+executable memory (MemoryDenyWriteExecute=yes): {wx[:5]}"


# --- self-contained docs -------------------------------------------------------------------


def test_readme_man_and_contrib_point_nowhere_outside_the_repository() -> None:
    """What ships (README, man page, contrib/) names no path outside the repository."""
    files = [ROOT / "README.md", ROOT / "man" / "etcdgw.1", ROOT / "man" / "sections.ini"]
    files += [p for p in (ROOT / "contrib").rglob("*") if p.is_file()]
    outside = re.compile(r"\.\./shared|/work/|\]\(\.\./")
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {ln.strip()}"
        for p in files
        for n, ln in enumerate(p.read_text().splitlines(), 1)
        if outside.search(ln)
    ]
    assert not hits, "\n".join(hits)
    # Relative links in the README resolve inside the checkout.
    for target in re.findall(r"\]\((?!https?://|#)([^)]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / target.split("#", 1)[0]).exists(), target
