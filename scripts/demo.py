"""`make demo`: a local 3-member etcd cluster with etcdgw in front of it, then a put/get through.

Everything is local: the members listen on free 127.0.0.1 ports with their data in a temporary
directory, the gateway on 127.0.0.1:23790. On Ctrl-C (or SIGTERM, or after DEMO_SECONDS) the
gateway and the members are stopped by PID and the directory is removed.

Environment:
  GATEWAY_CMD       gateway command before `start` (default: `etcdgw`, or `python3 -m etcdgw`
                    when not on PATH); `GATEWAY_CMD="etcd gateway"` runs the Go original.
  DEMO_LISTEN_ADDR  where the gateway listens (default 127.0.0.1:23790).
  DEMO_SECONDS      exit by itself after this many seconds instead of waiting for Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

# The cluster harness is shared with the tests, so the demo runs etcd exactly as they do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _etcd import EtcdCluster, EtcdError, etcdctl, spawn, stop_process  # noqa: E402

READY = "ready to proxy client requests"
READY_TIMEOUT = 20.0


def gateway_cmd() -> list[str]:
    if cmd := os.environ.get("GATEWAY_CMD"):
        return shlex.split(cmd)
    if shutil.which("etcdgw"):
        return ["etcdgw"]
    return [sys.executable, "-m", "etcdgw"]


class Gateway:
    """The gateway process; its output is copied to a log file and echoed with a prefix."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.ready = threading.Event()
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, name="gateway-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                print(f"  gateway | {line}", flush=True)
                if READY in line:
                    self.ready.set()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.1):
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)  # let the last lines through
                return self.ready.is_set()
        return False

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(5)


def run(workdir: Path) -> int:
    listen = os.environ.get("DEMO_LISTEN_ADDR", "127.0.0.1:23790")
    host, _, port = listen.rpartition(":")
    if _port_taken(host.strip("[]"), int(port)):
        print(f"demo: {listen} is already in use; set DEMO_LISTEN_ADDR=127.0.0.1:PORT", flush=True)
        return 1

    print("==> starting a 3-member etcd cluster on 127.0.0.1 ...", flush=True)
    t0 = time.monotonic()
    cluster = EtcdCluster(workdir / "etcd")
    gateway: Gateway | None = None
    try:
        cluster.start(timeout=30)
        print(f"    healthy in {time.monotonic() - t0:.1f}s:", flush=True)
        for m in cluster.members:
            print(f"    {m.name}  {m.client_url}  pid {m.pid}  log {m.log_path}", flush=True)

        argv = [
            *gateway_cmd(),
            "start",
            f"--endpoints={','.join(cluster.client_urls)}",
            f"--listen-addr={listen}",
        ]
        print(f"==> {shlex.join(argv)}", flush=True)
        name = "etcdgw" if "GATEWAY_CMD" not in os.environ else "the gateway"
        gateway = Gateway(argv, workdir / "gateway.log")
        if not gateway.wait_ready(READY_TIMEOUT):
            state = "exited" if gateway.proc.poll() is not None else "still starting"
            print(f"demo: no {READY!r} line within {READY_TIMEOUT:.0f}s ({state})", flush=True)
            return 1

        for args in (["put", "foo", "bar"], ["get", "foo"]):
            print(f"==> etcdctl --endpoints={listen} {' '.join(args)}", flush=True)
            r = etcdctl(listen, *args)
            print((r.stdout + r.stderr).rstrip() or "(no output)", flush=True)
            if r.returncode != 0:
                print(f"demo: etcdctl failed (exit {r.returncode})", flush=True)
                return 1

        pids = " ".join(str(m.pid) for m in cluster.members)
        print(
            f"""
==> {name} is proxying {listen} to the 3 members. In another terminal, try:
      ETCDCTL_API=3 etcdctl --endpoints={listen} put hello world
      ETCDCTL_API=3 etcdctl --endpoints={listen} get hello
      kill {cluster.members[0].pid}   # stop member m1: new connections go to the others
    (member pids: {pids}; gateway pid {gateway.proc.pid})
    Ctrl-C stops the gateway and the cluster and removes {workdir}.
""",
            flush=True,
        )
        seconds = os.environ.get("DEMO_SECONDS")
        deadline = time.monotonic() + float(seconds) if seconds else float("inf")
        try:
            while time.monotonic() < deadline:
                if gateway.proc.poll() is not None:
                    print(f"demo: the gateway exited (code {gateway.proc.returncode})", flush=True)
                    return 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            print(flush=True)
        return 0
    except EtcdError as exc:
        print(f"demo: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted while starting", flush=True)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        print("==> stopping the gateway and the cluster", flush=True)
        if gateway is not None:
            gateway.stop()
        cluster.stop()


def _port_taken(host: str, port: int) -> bool:
    try:
        socket.create_connection((host or "127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def main() -> int:
    missing = [b for b in ("etcd", "etcdctl") if shutil.which(b) is None]
    if missing:
        print(f"demo: {' and '.join(missing)} not found: run `make setup` first", flush=True)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # SIGTERM and SIGHUP (terminal closed) end the demo like Ctrl-C does.
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="etcdgw-demo-"))
    try:
        return run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
