"""Process plumbing for the benchmark: launch, wait for readiness, stop by PID, CPU and memory."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from stats import busy_jiffies

CLK_TCK = os.sysconf("SC_CLK_TCK")

_handed_out: set[int] = set()


def _listen_range() -> tuple[int, int]:
    # Listeners go below the ephemeral range: the churn workload burns through ephemeral
    # ports, and a port found free there could be taken as a source port before we bind it.
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (10000, low - 1) if low > 12000 else (0, 0)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (and that this run has not handed out)."""
    lo, hi = _listen_range()
    for _ in range(1000):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", random.randint(lo, hi) if hi else 0))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _handed_out and port not in (2379, 2380, 23790):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """One process this run started; stdout/stderr go to files so a failure can be shown."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            # A new session keeps terminal signals (Ctrl-C) away from the children: the
            # harness stops each one itself, by PID, in its cleanup.
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        text = ""
        for path in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_ready(self, timeout: float, port: int | None = None, line: str | None = None) -> None:
        """Wait until `line` appears in its output and/or `port` accepts connections; if it
        does not, stop the process (nobody else holds its PID) and raise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            line_ok = line is None or line in self.output()
            if line_ok and (port is None or port_open(port)):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, this process and whatever it forked (each by PID)."""
        if not self.alive():
            return
        family = tree_pids(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout)
        # Children (an nginx worker) normally exit with their master; make sure.
        for pid in family[1:]:
            if _ppid_or_none(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _ppid_or_none(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def tree_pids(root: int) -> list[int]:
    """root followed by all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid_or_none(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """user+system CPU of the process tree: utime+stime (all threads) plus cutime+cstime
    (children already reaped), summed over root and its live descendants."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            # After the ")" split, utime..cstime (stat fields 14..17) are indexes 11..14.
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_user_seconds(root: int) -> float:
    """The user-mode part of tree_cpu_seconds (utime + cutime): the proxy's own code, as
    opposed to the kernel's work in its system calls."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[13])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """Whole-machine busy CPU time so far, all CPUs: user+nice+system+irq+softirq+steal from
    /proc/stat (idle and iowait left out). Unlike tree_cpu_seconds it also counts softirq
    work charged to whoever was running and the work of every other process (the load
    generator, the backend): a proxy that moves work out of itself is still measured."""
    return busy_jiffies(Path("/proc/stat").read_text()) / CLK_TCK


def tree_memory_kb(root: int) -> dict[str, int]:
    """PSS, anonymous PSS and RSS (KiB) from /proc/PID/smaps_rollup, summed over the tree.

    Pss_Anon is the proxy's own heap and stacks: unlike Pss it does not move when some
    unrelated process maps or unmaps the same shared libraries (or the same etcd binary)."""
    total = {"pss_kb": 0, "pss_anon_kb": 0, "rss_kb": 0}
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Rss"):
                total[key.lower() + "_kb"] += int(rest.split()[0])
    return total


def established_on_ports(ports: set[int]) -> int:
    """ESTABLISHED loopback TCP sockets whose local port is one of `ports` (accepted side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) in ports:
                    count += 1
    return count


def run(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run a short command to completion (bounded), returning stdout+stderr."""
    res = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
    )
    return res.stdout + res.stderr


def raise_nofile() -> int:
    """Raise this process's fd soft limit to the hard limit; returns the new limit."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
