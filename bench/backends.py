"""What sits behind the proxies: a real etcd cluster, a tiny C HTTP responder, an iperf3 server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Protocol

from procs import Proc, free_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


class Backend(Protocol):
    """A started backend: the member addresses a proxy round-robins over."""

    endpoints: list[str]

    def stop(self) -> None: ...


class _MiniEtcd:
    """Fallback 3-member etcd launcher, used only when tests/_etcd.py cannot be imported."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.ports = [(free_port(), free_port()) for _ in range(size)]
        self.procs: list[Proc] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{c}" for c, _ in self.ports]

    def start(self) -> None:
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(self.ports))
        for i, (c, p) in enumerate(self.ports):
            argv = [
                "etcd",
                f"--name=m{i}",
                f"--data-dir={self.workdir / f'm{i}.etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{c}",
                f"--advertise-client-urls=http://127.0.0.1:{c}",
                f"--listen-peer-urls=http://127.0.0.1:{p}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p}",
                f"--initial-cluster={cluster}",
                "--initial-cluster-state=new",
                "--initial-cluster-token=etcdgw-bench",
                "--logger=zap",
                "--log-outputs=stderr",
            ]
            self.procs.append(Proc(f"etcd-m{i}", argv, self.workdir))
        deadline = time.monotonic() + 30
        for c, _ in self.ports:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{c}/health", timeout=2) as r:
                        if b'"true"' in r.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("etcd not healthy after 30s:\n" + self.procs[0].tail())
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


class _Cluster(Protocol):
    @property
    def endpoints(self) -> list[str]: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


class EtcdBackend:
    """A real 3-member etcd cluster on loopback (tests/_etcd.py when importable)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.cluster: _Cluster
        try:
            sys.path.insert(0, str(REPO / "tests"))
            from _etcd import EtcdCluster

            try:
                # etcd's default raft timings: the tests' fast ones are not what users run.
                self.cluster = EtcdCluster(workdir, size=3, heartbeat_ms=100, election_ms=1000)
            except TypeError:
                self.cluster = EtcdCluster(workdir, size=3)
        except ImportError as exc:
            print(f"  (tests/_etcd.py not importable: {exc}; using bench's own launcher)")
            self.cluster = _MiniEtcd(workdir)
        try:
            self.cluster.start()
        except BaseException:  # Ctrl-C while starting must not leave members behind
            self.cluster.stop()
            raise
        self.endpoints: list[str] = list(self.cluster.endpoints)

    def stop(self) -> None:
        self.cluster.stop()


def build_httpd(outdir: Path) -> Path:
    """Compile bench/httpd.c (a fraction of a second) into outdir."""
    exe = outdir / "bench-httpd"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (apt-get install gcc)")
    subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(BENCH / "httpd.c")],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return exe


class HttpBackend:
    """bench/httpd.c on three loopback ports: a fixed 200 for every request (cheap backend);
    it also holds idle connections open for as long as the client does."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        exe = build_httpd(workdir)
        self.ports = [free_port() for _ in range(size)]
        self.proc = Proc("httpd", [str(exe), *map(str, self.ports)], workdir)
        self.proc.wait_ready(10, port=self.ports[-1], line="ready")
        self.endpoints = [f"127.0.0.1:{p}" for p in self.ports]

    def stop(self) -> None:
        self.proc.stop()


class IperfBackend:
    """One iperf3 server. A test uses a control and a data connection that must reach the same
    server, so proxies get this single endpoint for the bulk workload, not three."""

    def __init__(self, workdir: Path) -> None:
        port = free_port()
        self.proc = Proc(
            "iperf3-server",
            ["iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(port)],
            workdir,
        )
        self.proc.wait_ready(10, line="Server listening")
        self.endpoints = [f"127.0.0.1:{port}"]

    def stop(self) -> None:
        self.proc.stop()
