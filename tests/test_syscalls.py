"""What a relayed connection costs in socket-option calls (both engines), seen with strace.

A short connection gets one setsockopt (TCP_NODELAY on the upstream socket): clients inherit
the listener's options, and the keep-alive options reach an upstream socket only once its
connection has lived 1 s (they cannot matter sooner). Before this was checked, the loop's
accept tuned its listener only at the first wake-up, so that first client had not inherited
the options, the check concluded that none would, and every client got six setsockopt calls
by hand, the upstream six more (12 per connection instead of 1).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from _gateway import (
    GatewayProc,
    TagServer,
    connect,
    free_tcp_port,
    gateway,
    read_line,
    tool,
    wait_for,
)

__all__ = ["gateway"]  # the fixture, imported for pytest

SHORT = 20  # sequential short connections in the measured window


def _calls(lines: list[str], name: str) -> list[str]:
    return [ln for ln in lines if re.match(rf"\d+\s+{name}\(", ln)]


def test_a_connection_costs_one_setsockopt_until_it_lives(
    gateway: Callable[..., GatewayProc], relay_impl: str, tmp_path: Path
) -> None:
    strace = tool("strace")
    trace = tmp_path / "trace"
    port = free_tcp_port()
    with TagServer("m1") as backend:
        g = gateway(f"--endpoints={backend.addr}", f"--listen-addr=127.0.0.1:{port}")
        st = subprocess.Popen(
            [strace, "-f", "-qq", "-p", str(g.pid), "-o", str(trace),
             "-e", "trace=accept4,setsockopt,getsockopt"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # Until strace is attached to every thread: a connection it saw accepted.
            def traced() -> bool:
                with connect(port) as s:
                    assert read_line(s) == b"m1\n"
                time.sleep(0.1)
                return trace.exists() and "accept4(" in trace.read_text()

            wait_for(traced, 20, step=0.1)
            time.sleep(0.2)
            start = len(trace.read_text().splitlines())
            for _ in range(SHORT):
                with connect(port) as s:
                    assert read_line(s) == b"m1\n"
            time.sleep(0.3)
            short = trace.read_text().splitlines()[start:]
            accepted = [ln for ln in _calls(short, "accept4") if not re.search(r"= -1 ", ln)]
            assert len(accepted) == SHORT, short
            sets = _calls(short, "setsockopt")
            assert all("TCP_NODELAY" in ln for ln in sets), sets
            assert len(sets) == SHORT, (
                f"{len(sets)} setsockopt calls for {SHORT} connections: {sets}"
            )
            assert not _calls(short, "getsockopt"), _calls(short, "getsockopt")

            held = connect(port)  # lives past 1 s: its upstream gets the keep-alive options
            assert read_line(held) == b"m1\n"
            mark = len(trace.read_text().splitlines())

            def keepalive_set() -> list[str]:
                return [
                    ln
                    for ln in _calls(trace.read_text().splitlines()[mark:], "setsockopt")
                    if "SO_KEEPALIVE" in ln
                ]

            t0 = time.monotonic()
            got = wait_for(keepalive_set, 10, step=0.1)
            waited = time.monotonic() - t0
            held.sendall(b"still here\n")
            assert read_line(held) == b"still here\n"
            held.close()
        finally:
            st.send_signal(signal.SIGINT)  # ours: detaches from the gateway
            st.wait(10)

    assert len(got) == 1 and "[1]" in got[0], got
    assert 0.5 <= waited, f"keep-alive set {waited:.2f}s after the connection started"
