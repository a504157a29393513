"""One small launcher per proxy under test; each returns a running Proc listening on a port."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from procs import Proc, run

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# Proxies that are peers of etcdgw (the "best peer" ratio is taken over these).
PEERS = ("go-gateway", "haproxy", "nginx", "pen")
ETCDGW = ("etcdgw-cython", "etcdgw-python")
# Run only when named in --only: the Cython engine with accept and connect in Python, the
# pure engine on an epoll of its own, and both engines from another source tree (A/B of a
# change in one run: ETCDGW_BENCH_BASE=/path/to/other/checkout/src, its extension built).
OPTIONAL = (
    "etcdgw-cython-loopaccept",
    "etcdgw-python-ownepoll",
    "etcdgw-cython-base",
    "etcdgw-python-base",
    "etcdgw-cython-leastconn",
    "etcdgw-python-leastconn",
)
BASE_SRC = os.environ.get("ETCDGW_BENCH_BASE", "")


@dataclass
class Launch:
    """How to start one proxy: argv, extra environment, and the stderr line meaning ready."""

    argv: list[str]
    env: dict[str, str] | None = None
    ready_line: str | None = None


@dataclass
class Proxy:
    name: str
    # (listen_port, endpoints, tmpdir) -> Launch; None for "direct" (no proxy at all).
    launcher: Callable[[int, list[str], Path], Launch] | None
    check: Callable[[], str | None]  # None if usable, else the reason it is skipped
    version: Callable[[], str]

    def start(self, port: int, endpoints: list[str], tmpdir: Path) -> Proc | None:
        if self.launcher is None:
            return None
        spec = self.launcher(port, endpoints, tmpdir)
        proc = Proc(self.name, spec.argv, tmpdir, env=spec.env)
        proc.wait_ready(20, port=port, line=spec.ready_line)
        return proc


# -- etcdgw ---------------------------------------------------------------------------------


def _etcdgw_env(pure: bool, src: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ETCDGW_NO_EXTENSIONS"}
    # Benchmark the working tree (src/ layout), whether or not it is pip-installed.
    src = src or str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    if pure:
        env["ETCDGW_NO_EXTENSIONS"] = "1"
    return env


def _etcdgw_version(pure: bool, src: str = "") -> str:
    try:
        out = run([sys.executable, "-m", "etcdgw", "version"], 30, env=_etcdgw_env(pure, src))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"error: {exc}"
    return out.strip().splitlines()[-1] if out.strip() else "error: no output"


def _engine(version_text: str) -> str | None:
    m = re.search(r"relay engine: ([^;)]+)", version_text)
    return m.group(1).strip() if m else None


def _etcdgw_check(pure: bool, src: str = "") -> Callable[[], str | None]:
    def check() -> str | None:
        if src == "-":
            return "set ETCDGW_BENCH_BASE to the src/ of the checkout to compare with"
        text = _etcdgw_version(pure, src)
        if _engine(text) is None:
            return f"`python3 -m etcdgw version` failed: {text[-300:]}"
        if not pure and _engine(text) == _engine(_etcdgw_version(True, src)):
            # The facade falls back to pure Python only when the module is missing.
            return f"compiled relay engine not built (reports {text!r}); run `make build`"
        return None

    return check


# The variants' switches: module attributes set by bench/launch.py before etcdgw starts (no
# environment variable in production code). Each is (module:attribute, value).
LOOP_ACCEPT = ("etcdgw.server:NATIVE_ACCEPT", "0")  # accept and connect in Python
OWN_EPOLL = ("etcdgw.app:RELAY_SELECTOR", "0")  # the pure engine on an epoll of its own


def _etcdgw(
    pure: bool, sets: tuple[tuple[str, str], ...] = (), src: str = "", extra: tuple[str, ...] = ()
) -> Callable[[int, list[str], Path], Launch]:
    def launch(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
        args = [
            "start",
            f"--endpoints={','.join(endpoints)}",
            f"--listen-addr=127.0.0.1:{port}",
            *extra,
        ]
        if sets:
            head = [sys.executable, str(BENCH / "launch.py")]
            head += [f"--set={target}={value}" for target, value in sets]
            argv = [*head, "--", *args]
        else:
            argv = [sys.executable, "-m", "etcdgw", *args]
        return Launch(argv, env=_etcdgw_env(pure, src), ready_line="ready to proxy client requests")

    return launch


def _variant_version(pure: bool, sets: tuple[tuple[str, str], ...]) -> str:
    return _etcdgw_version(pure) + " with " + ", ".join(f"{t}={v}" for t, v in sets)


def _variant_check(pure: bool, sets: tuple[tuple[str, str], ...]) -> Callable[[], str | None]:
    def check() -> str | None:
        if (why := _etcdgw_check(pure)()) is not None:
            return why
        argv = [sys.executable, str(BENCH / "launch.py")]
        argv += [f"--set={t}={v}" for t, v in sets] + ["--", "version"]
        try:
            res = subprocess.run(
                argv, capture_output=True, text=True, timeout=30, env=_etcdgw_env(pure)
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bench/launch.py failed: {exc}"
        if res.returncode != 0:
            return (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}")[-300:]
        return None

    return check


# -- the Go gateway -------------------------------------------------------------------------


def _go_gateway(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
    return Launch(
        [
            "etcd",
            "gateway",
            "start",
            f"--endpoints={','.join(endpoints)}",
            f"--listen-addr=127.0.0.1:{port}",
        ],
        ready_line="ready to proxy client requests",
    )


# -- HAProxy --------------------------------------------------------------------------------

# maxconn: room for the 9,000 idle connections (2 fds each) under the 20,000 fd cap.
HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 9600

defaults
    mode tcp
    maxconn 9600
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench
    bind 127.0.0.1:{port}
    default_backend members

backend members
    balance roundrobin
{servers}
"""


def _haproxy(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
    servers = "\n".join(f"    server m{i} {ep}" for i, ep in enumerate(endpoints))
    cfg = tmpdir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
    # -db: foreground, no daemon; -W is not used (no master process).
    return Launch(["haproxy", "-db", "-f", str(cfg)])


# -- nginx stream ---------------------------------------------------------------------------

NGINX_CFG = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
load_module {module};

events {{
    worker_connections 19500;
}}

stream {{
    upstream members {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass members;
    }}
}}
"""


def _nginx(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
    servers = "\n".join(f"        server {ep};" for ep in endpoints)
    cfg = tmpdir / "nginx.conf"
    cfg.write_text(
        NGINX_CFG.format(tmp=tmpdir, module=NGINX_STREAM_MODULE, servers=servers, port=port)
    )
    # -p/-e: its own prefix and error log, so nothing under /var/log/nginx or /run is touched.
    return Launch(
        ["nginx", "-p", str(tmpdir), "-e", str(tmpdir / "nginx-error.log"), "-c", str(cfg)]
    )


def _nginx_check() -> str | None:
    if shutil.which("nginx") is None:
        return "nginx not installed (bench/setup.sh)"
    if not NGINX_STREAM_MODULE.exists():
        return "libnginx-mod-stream not installed (bench/setup.sh)"
    return None


# -- pen ------------------------------------------------------------------------------------


def _pen(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
    # -f foreground, -r plain round-robin (no client tracking), -x max connections.
    return Launch(["pen", "-f", "-r", "-x", "9600", f"127.0.0.1:{port}", *endpoints])


# -- naive asyncio --------------------------------------------------------------------------


def _naive(port: int, endpoints: list[str], tmpdir: Path) -> Launch:
    return Launch(
        [
            sys.executable,
            str(BENCH / "naive_proxy.py"),
            f"--listen-addr=127.0.0.1:{port}",
            f"--endpoints={','.join(endpoints)}",
        ],
        ready_line="ready to proxy client requests",
    )


# -- registry -------------------------------------------------------------------------------


def _need(binary: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if shutil.which(binary) else f"{binary} not installed (bench/setup.sh)"

    return check


def _first_line(argv: list[str]) -> Callable[[], str]:
    def version() -> str:
        try:
            out = run(argv, 10)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unknown ({exc})"
        return out.strip().splitlines()[0] if out.strip() else "unknown"

    return version


def _dpkg_version(pkg: str) -> Callable[[], str]:
    def version() -> str:
        try:
            out = run(["dpkg-query", "-W", "-f=${Version}", pkg], 10)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        return f"{pkg} {out.strip()} (Debian)"

    return version


PROXIES: dict[str, Proxy] = {
    p.name: p
    for p in [
        Proxy(
            "etcdgw-cython", _etcdgw(False), _etcdgw_check(False), lambda: _etcdgw_version(False)
        ),
        Proxy("etcdgw-python", _etcdgw(True), _etcdgw_check(True), lambda: _etcdgw_version(True)),
        Proxy(
            "etcdgw-cython-loopaccept",
            _etcdgw(False, (LOOP_ACCEPT,)),
            _variant_check(False, (LOOP_ACCEPT,)),
            lambda: _variant_version(False, (LOOP_ACCEPT,)),
        ),
        Proxy(
            "etcdgw-python-ownepoll",
            _etcdgw(True, (OWN_EPOLL,)),
            _variant_check(True, (OWN_EPOLL,)),
            lambda: _variant_version(True, (OWN_EPOLL,)),
        ),
        Proxy(
            "etcdgw-cython-base",
            _etcdgw(False, src=BASE_SRC),
            _etcdgw_check(False, BASE_SRC or "-"),
            lambda: _etcdgw_version(False, BASE_SRC) + f" from {BASE_SRC}",
        ),
        Proxy(
            "etcdgw-python-base",
            _etcdgw(True, src=BASE_SRC),
            _etcdgw_check(True, BASE_SRC or "-"),
            lambda: _etcdgw_version(True, BASE_SRC) + f" from {BASE_SRC}",
        ),
        Proxy(
            "etcdgw-cython-leastconn",
            _etcdgw(False, extra=("--balance=least-connections",)),
            _etcdgw_check(False),
            lambda: _etcdgw_version(False) + " with --balance=least-connections",
        ),
        Proxy(
            "etcdgw-python-leastconn",
            _etcdgw(True, extra=("--balance=least-connections",)),
            _etcdgw_check(True),
            lambda: _etcdgw_version(True) + " with --balance=least-connections",
        ),
        Proxy("go-gateway", _go_gateway, _need("etcd"), _first_line(["etcd", "--version"])),
        Proxy("haproxy", _haproxy, _need("haproxy"), _first_line(["haproxy", "-v"])),
        Proxy("nginx", _nginx, _nginx_check, _first_line(["nginx", "-v"])),
        Proxy("pen", _pen, _need("pen"), _dpkg_version("pen")),
        Proxy(
            "naive",
            _naive,
            lambda: None,
            lambda: f"bench/naive_proxy.py on Python {sys.version.split()[0]}",
        ),
        Proxy("direct", None, lambda: None, lambda: "no proxy (client -> first member)"),
    ]
}
