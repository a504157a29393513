"""A real dnsmasq on 127.0.0.1 serving SRV and A/AAAA records, as a pytest fixture."""

from __future__ import annotations

import ctypes
import os
import pwd
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import dns.exception
import dns.resolver
import pytest

__all__ = ["DNSMASQ", "Dnsmasq", "SrvHost", "dnsmasq", "free_dns_port"]

DNSMASQ = os.environ.get("ETCDGW_DNSMASQ", "/usr/sbin/dnsmasq")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Names under these domains are answered by dnsmasq alone: unknown ones get NXDOMAIN
# (`local=/test/`), not REFUSED, so lookups fail the way a real authoritative zone fails.
LOCAL_DOMAINS = ("test",)
# Always present, so readiness can be checked whatever records a test configures.
PROBE_NAME = "dnsmasq-ready.test"


class SrvHost(NamedTuple):
    """One `srv-host=` line: `_service._tcp.domain` -> target:port with priority and weight.

    An empty target makes the RFC 2782 "service not available here" record (target ".").
    """

    name: str
    target: str
    port: int = 0
    priority: int = 0
    weight: int = 0


def _port_candidates() -> tuple[int, int]:
    # Below the kernel's ephemeral range (as tests/_etcd.py does): there only listeners
    # compete for a port, not the source ports of outgoing connections.
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (10000, low - 1) if low > 12000 else (0, 0)


def _bindable(kind: socket.SocketKind, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    lo, hi = _port_candidates()
    for _ in range(500):
        if hi:
            port = random.randint(lo, hi)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", 0))
                port = int(u.getsockname()[1])
        if _bindable(socket.SOCK_DGRAM, port) and _bindable(socket.SOCK_STREAM, port):
            return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None


def _die_with_parent() -> None:
    # Between fork and exec: if the test runner is killed outright, the kernel kills dnsmasq
    # too instead of leaving it behind.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Dnsmasq:
    """dnsmasq in the foreground (-k), configured from Python, stopped by its own PID only.

    SIGHUP re-reads hosts files but not `srv-host`, so changing records restarts the process
    on the same port (resolvers pointed at it keep working).
    """

    def __init__(self, workdir: Path, *, ttl: int = 1) -> None:
        if not os.access(DNSMASQ, os.X_OK):
            pytest.fail(
                f"dnsmasq not found at {DNSMASQ}: run `make setup` "
                "(Debian/Ubuntu: apt-get install dnsmasq-base)",
                pytrace=False,
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.port = free_dns_port()
        self.srv: tuple[SrvHost, ...] = ()
        self.hosts: dict[str, tuple[str, ...]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False  # once it ran, the port is fixed
        self.conf_file = self.workdir / "dnsmasq.conf"
        self.log_file = self.workdir / "dnsmasq.log"
        self.pid_file = self.workdir / "dnsmasq.pid"

    @property
    def addr(self) -> str:
        """The server as --discovery-dns takes it."""
        return f"127.0.0.1:{self.port}"

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.lifetime = lifetime
        return r

    def _config(self) -> str:
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [
            f"port={self.port}",
            "listen-address=127.0.0.1",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "no-poll",
            # As root dnsmasq would switch to `nobody`; stay who we are (no privilege needed).
            f"user={user}",
            f"local-ttl={self.ttl}",
            f"pid-file={self.pid_file}",
            f"log-facility={self.log_file}",
            "log-queries",
            *(f"local=/{d}/" for d in LOCAL_DOMAINS),
            f"host-record={PROBE_NAME},127.0.0.1",
        ]
        for s in self.srv:
            if not s.target:  # RFC 2782 "service not available": dnsmasq answers target "."
                lines.append(f"srv-host={s.name}")
            else:
                lines.append(f"srv-host={s.name},{s.target},{s.port},{s.priority},{s.weight}")
        for name, addrs in self.hosts.items():
            lines.append(f"host-record={name},{','.join(addrs)}")
        return "\n".join(lines) + "\n"

    def start(
        self,
        srv: Sequence[SrvHost] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Start with these records (None keeps the current ones); wait until it answers."""
        assert self.proc is None, "already running"
        if srv is not None:
            self.srv = tuple(SrvHost(*s) for s in srv)
        if hosts is not None:
            self.hosts = {k: tuple(v) for k, v in hosts.items()}
        # The first start may lose its port to another program between probe and bind: then
        # try a fresh one. A restart keeps its port (resolvers point at it), so it must not.
        for attempt in range(3):
            self.conf_file.write_text(self._config())
            # --conf-file=<ours> keeps /etc/dnsmasq.conf and /etc/dnsmasq.d out.
            self.proc = subprocess.Popen(
                [DNSMASQ, "-k", f"--conf-file={self.conf_file}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            err = self._wait_ready()
            if err is None:
                self._started = True
                return
            if self._started or "in use" not in err or attempt == 2:
                pytest.fail(f"dnsmasq exited at start-up: {err}\n{self._log_tail()}")
            self.port = free_dns_port()

    def _wait_ready(self) -> str | None:
        """None once it answers; the error text when it exited. Fails the test on timeout."""
        assert self.proc is not None
        r = self.resolver(lifetime=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                proc, self.proc = self.proc, None
                assert proc.stderr is not None
                err = proc.stderr.read().decode(errors="replace").strip()
                proc.stderr.close()
                return err or f"exit status {proc.returncode}"
            try:
                r.resolve(PROBE_NAME, "A")
                return None
            except dns.exception.DNSException as e:
                last = e
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"dnsmasq did not answer within {START_TIMEOUT}s: {last}\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM our own process (by PID), SIGKILL if it lingers; reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(
        self,
        srv: Sequence[SrvHost] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Replace the records (None keeps them) and restart on the same port."""
        self.stop()
        self.start(srv, hosts)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A running dnsmasq on 127.0.0.1:<free port> with no records yet (TTL 1 s).

    Give it records with `dnsmasq.restart(srv=[SrvHost(...)], hosts={"m1.etcd.test":
    ["127.0.0.1"]})`; point etcdgw at it with `--discovery-dns=dnsmasq.addr`.
    """
    d = Dnsmasq(tmp_path / "dnsmasq")
    d.start()
    try:
        yield d
    finally:
        d.stop()
