"""A real etcd cluster for the tests: members on loopback ports, etcdctl helpers, fixtures.

Imported by conftest.py (``from _etcd import *``) and by scripts/demo.py. Everything here is
bounded: every wait has a timeout, and every process started is stopped by its PID (never by
name), so a failing test cannot leave an etcd behind or hang the run.

Written against etcd 3.4 (Debian 12's etcd-server / etcd-client packages).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

__all__ = [
    "EtcdCluster",
    "EtcdError",
    "EtcdctlWatch",
    "Member",
    "WatchEvent",
    "etcd_cluster",
    "etcd_cluster_fn",
    "etcd_tls_cluster",
    "etcdctl",
    "free_port",
    "free_ports",
    "require_etcd_binaries",
]

LOOPBACK = "127.0.0.1"
SETUP_HINT = "run `make setup` (scripts/setup.sh installs Debian's etcd-server and etcd-client)"

# Raft timings for tests: 10x faster than etcd's defaults (100 ms / 1000 ms) so a cluster
# elects a leader in well under a second, yet slow enough for 2 busy cores (etcd warns when
# the election timeout is under 5 heartbeats; 500/50 keeps the recommended 10:1 ratio).
HEARTBEAT_MS = 50
ELECTION_MS = 500


class EtcdError(RuntimeError):
    """A cluster did not start, did not become healthy, or a member died unexpectedly."""


# --------------------------------------------------------------------------------------------
# Ports


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _port_range() -> tuple[int, int]:
    """Candidate ports just below the kernel's ephemeral range.

    Ports from bind(0) come from the ephemeral range, where the kernel also picks the source
    port of every outgoing connection: a port found free there can be taken by some client
    before etcd binds it. Below that range only listeners compete, and we probe those.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 12000:
        return 10000, low - 1
    return 0, 0  # unusual kernel setting: fall back to bind(0)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on now and that this process has not handed out yet."""
    lo, hi = _port_range()
    with _ports_lock:
        for _ in range(2000):
            if hi:
                port = random.randint(lo, hi)
            else:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((host, 0))
                    port = int(s.getsockname()[1])
            # 2379/2380/23790 are etcd's and the gateway's well-known ports: a system etcd or
            # a developer's demo may be using them.
            if port in _handed_out or port in (2379, 2380, 23790) or not _bindable(host, port):
                continue
            _handed_out.add(port)
            return port
    raise EtcdError("no free TCP port found")


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free ports (see free_port)."""
    return [free_port(host) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Processes


def require_etcd_binaries() -> None:
    """Fail (never skip) when etcd or etcdctl is missing: a skipped suite would look green."""
    missing = [b for b in ("etcd", "etcdctl") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found on PATH: {SETUP_HINT}", pytrace=False)


def _clean_env() -> dict[str, str]:
    # etcd and etcdctl read ETCD_* / ETCDCTL_* variables as flags; a developer's shell setting
    # (say ETCDCTL_ENDPOINTS) must not leak into a test.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    env["ETCDCTL_API"] = "3"
    return env


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. If the test runner is killed outright (CI time
    # limit, pytest-timeout's os._exit), the kernel then kills the etcd too, instead of leaving
    # it running. prctl was looked up before the fork, so this only makes one syscall.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    log_path: Path | None = None,
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    """Start a helper process in its own session (a Ctrl-C meant for the runner does not reach
    it; we stop it ourselves) that dies with its parent; output to ``log_path`` if given."""
    kwargs.setdefault("env", _clean_env())
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    if log_path is None:
        return subprocess.Popen(
            list(argv), start_new_session=True, preexec_fn=_die_with_parent, **kwargs
        )
    with open(log_path, "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps. Safe on a finished process."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            # A SIGSTOPped process keeps SIGTERM pending until it is continued.
            os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# etcdctl


def _endpoint_list(endpoints: Sequence[str] | str) -> str:
    return endpoints if isinstance(endpoints, str) else ",".join(endpoints)


def _tls_flags(cluster: EtcdCluster | None) -> list[str]:
    if cluster is None or not cluster.tls:
        return []
    return [
        f"--cacert={cluster.ca_file}",
        f"--cert={cluster.client_cert}",
        f"--key={cluster.client_key}",
    ]


def _etcdctl_argv(
    endpoints: Sequence[str] | str, cluster: EtcdCluster | None, command_timeout: float
) -> list[str]:
    return [
        "etcdctl",
        f"--endpoints={_endpoint_list(endpoints)}",
        f"--dial-timeout={min(3.0, command_timeout):g}s",
        f"--command-timeout={command_timeout:g}s",
        *_tls_flags(cluster),
    ]


def etcdctl(
    endpoints: Sequence[str] | str,
    *args: str,
    cluster: EtcdCluster | None = None,
    timeout: float = 15,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``etcdctl`` (API v3) against ``endpoints`` ("host:port" or URLs, list or
    comma-separated) and capture its text output. Never raises on failure (check=False): when
    it overruns ``timeout`` it is killed and the result has returncode 124, like timeout(1).
    ``cluster`` adds --cacert/--cert/--key when that cluster uses TLS."""
    argv = [*_etcdctl_argv(endpoints, cluster, max(1.0, timeout - 2)), *args]
    try:
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped it
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return subprocess.CompletedProcess(
            argv, 124, out, err + f"\netcdctl timed out after {timeout}s"
        )


# --------------------------------------------------------------------------------------------
# Cluster


@dataclass
class Member:
    """One etcd member; ``proc`` is None until started and after it was stopped and reaped."""

    index: int
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    scheme: str = "http"
    cert_file: Path | None = None
    key_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # Set by EtcdCluster.add_member / promote_member / remove_member (membership changes).
    member_id: str = ""  # hex, as etcdctl prints it
    learner: bool = False
    removed: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        # Peer traffic stays plain HTTP even for a TLS cluster: the gateway never sees it.
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """A real N-member etcd cluster on 127.0.0.1, data and logs under ``workdir``.

    >>> with EtcdCluster(tmp_path) as c:   # start() on enter, stop() on exit
    ...     etcdctl(c.endpoints, "put", "k", "v")

    With ``tls=True`` the client URLs are https and need a client certificate signed by
    ``ca_file`` (``client_cert``/``client_key``); server certificates are valid for 127.0.0.1,
    localhost and the member's entry in ``server_names`` (m1.etcd.test, ...).
    """

    def __init__(
        self,
        workdir: Path | str,
        size: int = 3,
        *,
        tls: bool = False,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.token = f"etcdgw-test-{uuid.uuid4().hex[:12]}"
        scheme = "https" if tls else "http"
        self.members: list[Member] = []
        for i in range(size):
            name = f"m{i + 1}"
            client_port, peer_port = free_ports(2)
            self.members.append(
                Member(
                    index=i,
                    name=name,
                    client_port=client_port,
                    peer_port=peer_port,
                    data_dir=self.workdir / f"{name}.etcd",
                    log_path=self.workdir / f"{name}.log",
                    scheme=scheme,
                )
            )
        self.server_names = [f"{m.name}.etcd.test" for m in self.members]
        self.ca: Any = None  # trustme.CA when tls, so tests can issue more certificates
        self.ca_file: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        if tls:
            self._make_certs()

    # -- public views --------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members if not m.removed)

    # -- membership changes (additive: add_member, promote_member, remove_member) ----------

    def _voters(self, but: int | None = None) -> list[str]:
        """Endpoints of running voting members (a learner refuses most client requests)."""
        return [
            m.endpoint
            for m in self.members
            if m.running and not m.learner and not m.removed and m.index != but
        ]

    def add_member(self, *, learner: bool = False, timeout: float = 30) -> int:
        """`etcdctl member add` a new member (``--learner`` if asked), start it, and wait
        until it serves (a voter: ``endpoint health``; a learner: its client port accepts).
        Returns its index in ``members``."""
        i = len(self.members)
        name = f"m{i + 1}"
        client_port, peer_port = free_ports(2)
        m = Member(
            index=i,
            name=name,
            client_port=client_port,
            peer_port=peer_port,
            data_dir=self.workdir / f"{name}.etcd",
            log_path=self.workdir / f"{name}.log",
            scheme="https" if self.tls else "http",
            learner=learner,
        )
        if self.tls:
            cert = self.ca.issue_cert(LOOPBACK, "localhost", f"{name}.etcd.test", common_name=name)
            m.cert_file = self.workdir / "tls" / f"{name}.pem"
            m.key_file = self.workdir / "tls" / f"{name}-key.pem"
            cert.cert_chain_pems[0].write_to_path(str(m.cert_file))
            cert.private_key_pem.write_to_path(str(m.key_file))
        args = ["member", "add", name, f"--peer-urls={m.peer_url}", *(["--learner"] * learner)]
        deadline = time.monotonic() + timeout
        while True:
            r = etcdctl(self._voters(), *args, cluster=self, timeout=5)
            if r.returncode == 0:
                break
            # --strict-reconfig-check: etcd refuses to add a member until every member has
            # been connected for 5 s (etcdserver.HealthInterval), "unhealthy cluster".
            if "unhealthy cluster" not in r.stderr or time.monotonic() >= deadline:
                raise EtcdError(f"etcdctl member add failed: {(r.stdout + r.stderr).strip()}")
            time.sleep(0.2)
        # "Member f8679065f8eb85a8 added to cluster daac157a6fa359c2"
        m.member_id = r.stdout.split()[1]
        self.members.append(m)
        self._launch(m, state="existing")
        if learner:
            deadline = time.monotonic() + timeout
            while not _accepts(m.client_port):
                if not m.running or time.monotonic() >= deadline:
                    raise EtcdError(f"learner {name} not serving; log:\n{_tail(m.log_path)}")
                time.sleep(0.05)
        else:
            self.wait_healthy(i, timeout=timeout)
        return i

    def promote_member(self, i: int, timeout: float = 30) -> None:
        """`etcdctl member promote` learner ``i``, retried until it has caught up."""
        m = self.members[i]
        deadline = time.monotonic() + timeout
        while True:
            r = etcdctl(self._voters(), "member", "promote", m.member_id, cluster=self, timeout=5)
            if r.returncode == 0:
                m.learner = False
                return
            if time.monotonic() >= deadline:
                raise EtcdError(f"etcdctl member promote failed: {(r.stdout + r.stderr).strip()}")
            time.sleep(0.2)

    def remove_member(self, i: int, timeout: float = 30) -> None:
        """`etcdctl member remove` member ``i`` (asked of the others); etcd then stops a
        running removed member by itself. Its process, if any, is still ours to stop.
        Retried while etcd answers "unhealthy cluster" (see add_member)."""
        m = self.members[i]
        if not m.member_id:
            m.member_id = self._member_ids()[m.name]
        deadline = time.monotonic() + timeout
        while True:
            r = etcdctl(
                self._voters(but=i), "member", "remove", m.member_id, cluster=self, timeout=5
            )
            if r.returncode == 0:
                break
            if "unhealthy cluster" not in r.stderr or time.monotonic() >= deadline:
                raise EtcdError(f"etcdctl member remove failed: {(r.stdout + r.stderr).strip()}")
            time.sleep(0.2)
        m.removed = True

    def _member_ids(self) -> dict[str, str]:
        r = etcdctl(self._voters(), "member", "list", "-w", "json", cluster=self)
        return {
            str(x.get("name", "")): format(int(x["ID"]), "x")
            for x in json.loads(r.stdout).get("members", [])
        }

    def etcdctl(
        self, *args: str, i: int | None = None, timeout: float = 15
    ) -> subprocess.CompletedProcess[str]:
        """etcdctl against all members (or member ``i``), with this cluster's TLS flags."""
        eps = self.endpoints if i is None else [self.members[i].endpoint]
        return etcdctl(eps, *args, cluster=self, timeout=timeout)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30) -> EtcdCluster:
        """Launch every member and wait until all answer ``etcdctl endpoint health``.

        A port that another program grabbed between our probe and etcd's bind is retried
        with fresh ports (and fresh data dirs, since peer URLs are part of the cluster ID).
        """
        require_etcd_binaries()
        for attempt in range(3):
            for m in self.members:
                self._launch(m, state="new")
            try:
                self.wait_healthy(timeout=timeout)
                return self
            except EtcdError:
                conflict = any(
                    not m.running and "address already in use" in _tail(m.log_path, 200)
                    for m in self.members
                )
                self.stop()
                if not conflict or attempt == 2:
                    raise
                self._reassign_ports()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop every member this cluster started (SIGTERM, then SIGKILL); idempotent.

        One at a time, the leader last: a leader stopped while its followers stop too, or
        before a lagging follower, can spend 6 s in a doomed leadership transfer (etcd 3.4);
        stopped last, it finds no peer to hand over to and exits at once (~50 ms each).
        Should a transfer start anyway (a busy machine), SIGKILL after 3 s ends the wait:
        the data of a test cluster is thrown away, nothing needs a clean shutdown.
        """
        order = list(self.members)
        if sum(m.running for m in order) > 1:
            lead = self._leader_once()
            if lead is not None:
                order.append(order.pop(lead))
        for m in order:
            stop_process(m.proc, timeout=3)
            m.proc = None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (a crash, no graceful leave) and reap it.

        A write sent right after killing the leader can hang for etcd's request timeout
        (5 s + 2 elections, no retry): call ``wait_healthy`` on the survivors first when the
        test is not about that window.
        """
        m = self.members[i]
        if m.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                m.proc.kill()
            m.proc.wait(10)
            m.proc = None

    def sigstop(self, i: int) -> None:
        """Freeze member ``i``: its sockets stay open but nothing answers (a hung server)."""
        self._signal(i, signal.SIGSTOP)

    def sigcont(self, i: int) -> None:
        self._signal(i, signal.SIGCONT)

    def restart(self, i: int, timeout: float = 30, wait: bool = True) -> None:
        """Start member ``i`` again on its data dir and ports, then (``wait``) wait until it is
        healthy; with every member down, restart all with ``wait=False``, then wait_healthy()."""
        m = self.members[i]
        stop_process(m.proc)
        m.proc = None
        self._launch(m, state="existing")
        if wait:
            self.wait_healthy(i, timeout=timeout)

    def wait_healthy(self, i: int | Sequence[int] | None = None, timeout: float = 30) -> None:
        """Wait until member ``i`` (an index, several, or by default all) is running and
        answers ``etcdctl endpoint health`` (a quorum read, so it also needs a leader)."""
        if i is None:
            members = self.members
        else:
            members = [self.members[j] for j in ([i] if isinstance(i, int) else i)]
        eps = [m.endpoint for m in members]
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for m in members:
                if not m.running:
                    raise EtcdError(
                        f"etcd member {m.name} is not running "
                        f"(exit {None if m.proc is None else m.proc.returncode}); "
                        f"log {m.log_path}:\n{_tail(m.log_path)}"
                    )
            # etcdctl's gRPC dialer backs off for 1 s after a refused connection, so call it
            # only once every client port accepts: start-up then takes ~0.5 s, not ~2 s.
            if not all(_accepts(m.client_port) for m in members):
                if time.monotonic() >= deadline:
                    raise EtcdError(f"etcd client ports {eps} not listening after {timeout}s")
                time.sleep(0.02)
                continue
            # A short command timeout: a read sent to a leader that just died hangs until
            # etcd's own request timeout (5 s + 2 elections); better to ask again.
            r = etcdctl(eps, "endpoint", "health", cluster=self, timeout=2)
            if r.returncode == 0:
                return
            last = (r.stdout + r.stderr).strip()
            if time.monotonic() >= deadline:
                logs = "\n".join(f"--- {m.log_path}:\n{_tail(m.log_path, 10)}" for m in members)
                raise EtcdError(f"etcd not healthy after {timeout}s: {last}\n{logs}")
            time.sleep(0.1)

    def leader(self, timeout: float = 15) -> int:
        """Index of the leader, once every running member names the same running one."""
        deadline = time.monotonic() + timeout
        while (lead := self._leader_once()) is None:
            if time.monotonic() >= deadline:
                raise EtcdError(f"no agreed leader among running members after {timeout}s")
            time.sleep(0.1)
        return lead

    def _leader_once(self) -> int | None:
        running = [m for m in self.members if m.running]
        if not running:
            return None
        eps = [m.endpoint for m in running]
        r = etcdctl(eps, "endpoint", "status", "-w", "json", cluster=self, timeout=2)
        try:
            statuses = [s["Status"] for s in json.loads(r.stdout)]
            ids = [st["header"]["member_id"] for st in statuses]
            leaders = {st["leader"] for st in statuses}
        except (ValueError, KeyError, TypeError):
            return None
        if len(ids) != len(running) or len(leaders) != 1:
            return None
        lead = leaders.pop()
        return running[ids.index(lead)].index if lead in ids else None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------

    def _signal(self, i: int, sig: signal.Signals) -> None:
        m = self.members[i]
        if not m.running or m.proc is None:
            raise EtcdError(f"etcd member {m.name} is not running")
        os.kill(m.proc.pid, sig)

    def _argv(self, m: Member, state: str) -> list[str]:
        argv = [
            "etcd",
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-token={self.token}",
            f"--initial-cluster-state={state}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            # 3.4 defaults to the deprecated capnslog logger and warns about it; zap writes
            # JSON lines to stderr, which spawn() sends to the member's log file.
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            argv += [
                f"--cert-file={m.cert_file}",
                f"--key-file={m.key_file}",
                f"--trusted-ca-file={self.ca_file}",
                "--client-cert-auth",
            ]
        return argv

    def _launch(self, m: Member, state: str) -> None:
        if m.running:
            raise EtcdError(f"etcd member {m.name} is already running (pid {m.pid})")
        with open(m.log_path, "a") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} starting {m.name} ({state})\n")
        m.proc = spawn(self._argv(m, state), log_path=m.log_path, cwd=self.workdir)

    def _reassign_ports(self) -> None:
        self.token = f"etcdgw-test-{uuid.uuid4().hex[:12]}"
        for m in self.members:
            m.client_port, m.peer_port = free_ports(2)
            shutil.rmtree(m.data_dir, ignore_errors=True)

    def _make_certs(self) -> None:
        import trustme

        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        self.ca = trustme.CA(organization_name="etcdgw tests")
        self.ca_file = tls_dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        # trustme leaf certificates carry both serverAuth and clientAuth: etcd 3.4 also uses
        # the server certificate as a client one for its own grpc-gateway connection.
        for m, dns_name in zip(self.members, self.server_names, strict=True):
            cert = self.ca.issue_cert(LOOPBACK, "localhost", dns_name, common_name=m.name)
            m.cert_file = tls_dir / f"{m.name}.pem"
            m.key_file = tls_dir / f"{m.name}-key.pem"
            cert.cert_chain_pems[0].write_to_path(str(m.cert_file))
            cert.private_key_pem.write_to_path(str(m.key_file))
        client = self.ca.issue_cert("client.etcd.test", common_name="etcdgw-test-client")
        self.client_cert = tls_dir / "client.pem"
        self.client_key = tls_dir / "client-key.pem"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))


# --------------------------------------------------------------------------------------------
# Watch


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "PUT" or "DELETE"
    key: str
    value: str


class EtcdctlWatch:
    """``etcdctl watch KEY`` running in the background; the test reads what it printed.

    >>> with EtcdctlWatch(gateway_endpoints, "foo") as w:
    ...     etcdctl(gateway_endpoints, "put", "foo", "1")
    ...     assert w.wait_events(1)[0].value == "1"

    With ``from_now=True`` (the default) the watch starts at the revision after the current
    one, so an event written right after ``__enter__`` is seen even if the watch stream is not
    yet established. Output is JSON (``-w json``), one response per line.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        key: str,
        *args: str,
        cluster: EtcdCluster | None = None,
        from_now: bool = True,
    ) -> None:
        self.endpoints = endpoints
        self.key = key
        self.args = list(args)
        self.cluster = cluster
        self.from_now = from_now
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []  # every line printed, JSON or not (errors go here too)
        self.events: list[WatchEvent] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._eof = False

    def start(self) -> EtcdctlWatch:
        args = list(self.args)
        if self.from_now:
            r = etcdctl(self.endpoints, "get", self.key, "-w", "json", cluster=self.cluster)
            if r.returncode != 0:
                raise EtcdError(f"etcdctl get for watch start failed: {r.stderr.strip()}")
            rev = int(json.loads(r.stdout)["header"]["revision"])
            args.append(f"--rev={rev + 1}")
        # The watch itself runs forever: a long command timeout only bounds the dial.
        argv = [
            *_etcdctl_argv(self.endpoints, self.cluster, 3600),
            "watch",
            self.key,
            *args,
            "-w",
            "json",
        ]
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout,), name="etcdctl-watch", daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            events = _parse_watch_line(line)
            with self._cond:
                self.lines.append(line)
                self.events.extend(events)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_events(self, n: int, timeout: float = 10) -> list[WatchEvent]:
        """Wait until at least ``n`` events arrived; AssertionError (with output) if not."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self.events) >= n or not self._alive(), timeout=timeout
            )
            if ok and len(self.events) >= n:
                return list(self.events)
            raise AssertionError(
                f"watch got {len(self.events)} of {n} events in {timeout}s "
                f"(etcdctl {'running' if self._alive() else 'exited'}); output:\n"
                + "\n".join(self.lines[-20:])
            )

    def wait_output(self, text: str, timeout: float = 10) -> str:
        """Wait for a printed line containing ``text`` (an error message, say); return it."""
        with self._cond:
            found: list[str] = []

            def seen() -> bool:
                found[:] = [ln for ln in self.lines if text in ln]
                return bool(found) or not self._alive()

            self._cond.wait_for(seen, timeout=timeout)
            if found:
                return found[0]
            raise AssertionError(
                f"watch output has no {text!r} after {timeout}s:\n" + "\n".join(self.lines[-20:])
            )

    def _alive(self) -> bool:
        return self._reader is not None and not self._eof

    def stop(self) -> None:
        """Stop etcdctl by PID and join the reader; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)  # EOF follows the exit
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> EtcdctlWatch:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_watch_line(line: str) -> list[WatchEvent]:
    try:
        resp = json.loads(line)
    except ValueError:
        return []
    if not isinstance(resp, dict):
        return []
    out = []
    for ev in resp.get("Events") or []:
        kv = ev.get("kv", {})
        # Protobuf JSON omits zero values: type 0 (PUT) is absent, DELETE is 1; bytes are
        # base64.
        out.append(
            WatchEvent(
                type="DELETE" if ev.get("type") == 1 else "PUT",
                key=base64.b64decode(kv.get("key", "")).decode(errors="replace"),
                value=base64.b64decode(kv.get("value", "")).decode(errors="replace"),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One plain 3-member cluster for the whole session: for tests that do not damage it
    (no kill/sigstop; use ``etcd_cluster_fn`` for those). Keys are shared: use unique ones."""
    require_etcd_binaries()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def etcd_cluster_fn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster for one test, which may kill, freeze or restart members."""
    require_etcd_binaries()
    with EtcdCluster(tmp_path_factory.mktemp("etcd-fn")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd_tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member cluster whose clients need TLS with a client certificate (see EtcdCluster)."""
    require_etcd_binaries()
    with EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), tls=True) as cluster:
        yield cluster
