"""resolver.py: the address book's rules (fresh, stale-while-revalidate, last good answer),
as pure logic with a scripted resolver and a clock, and end to end with a real dnsmasq that
freezes while the gateway serves (both engines)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from _dns import Dnsmasq
from _gateway import GatewayProc, TagServer, connect, free_tcp_port, read_line
from etcdgw.resolver import AddressBook

V4 = socket.AF_INET


class Script:
    """A resolver whose answers the test sets; `hold` makes lookups wait until released."""

    def __init__(self) -> None:
        self.answer: list[str] | Exception = ["10.0.0.1"]
        self.calls = 0
        self.hold: asyncio.Event | None = None

    async def __call__(self, host: str) -> list[str]:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_fresh_answers_are_reused_and_literals_never_resolve() -> None:
    async def main() -> None:
        script, now = Script(), [0.0]
        book = AddressBook(script, ttl=5.0, clock=lambda: now[0])
        assert book.known("10.1.2.3") == [(V4, ("10.1.2.3", 0))]
        assert book.known("member") is None
        assert await book.resolve("member") == [(V4, ("10.0.0.1", 0))]
        now[0] = 4.9
        assert await book.resolve("member") == [(V4, ("10.0.0.1", 0))]
        assert script.calls == 1

    run(main())


def test_a_stale_answer_is_served_at_once_while_one_refresh_runs() -> None:
    async def main() -> None:
        script, now = Script(), [0.0]
        changed: list[int] = []
        book = AddressBook(
            script, ttl=5.0, clock=lambda: now[0], on_change=lambda: changed.append(1)
        )
        await book.resolve("member")
        assert changed == [1]
        script.hold = asyncio.Event()  # the DNS server stops answering
        script.answer = ["10.0.0.2"]
        now[0] = 6.0
        t0 = time.monotonic()
        for _ in range(10):  # ten clients: none waits, one lookup in flight
            assert await book.resolve("member") == [(V4, ("10.0.0.1", 0))]
        assert time.monotonic() - t0 < 0.5
        await asyncio.sleep(0)
        assert script.calls == 2
        script.hold.set()  # the answer arrives: the next client gets it, the change is signalled
        for _ in range(100):
            await asyncio.sleep(0)
            if book.fresh("member"):
                break
        assert book.known("member") == [(V4, ("10.0.0.2", 0))]
        assert changed == [1, 1]
        book.close()

    run(main())


def test_failed_refresh_keeps_the_last_good_answer_and_waits_a_ttl() -> None:
    async def main() -> None:
        script, now = Script(), [0.0]
        book = AddressBook(script, ttl=5.0, clock=lambda: now[0])
        await book.resolve("member")
        script.answer = OSError("lookup member: i/o timeout")
        now[0] = 6.0
        assert await book.resolve("member") == [(V4, ("10.0.0.1", 0))]
        for _ in range(10):
            await asyncio.sleep(0)
        assert script.calls == 2
        assert book.fresh("member")  # not retried at every client...
        now[0] = 11.5
        book.known("member")  # ...but after another ttl
        for _ in range(10):
            await asyncio.sleep(0)
        assert script.calls == 3

    run(main())


def test_a_host_never_resolved_waits_and_fails_with_the_lookup_error() -> None:
    async def main() -> None:
        script = Script()
        script.answer = OSError("lookup nowhere: no such host")
        book = AddressBook(script)
        with pytest.raises(OSError, match="no such host"):
            await book.resolve("nowhere")

    run(main())


# --- end to end: a DNS server that freezes -----------------------------------------------------

Start = Callable[..., GatewayProc]


def test_frozen_dns_does_not_hold_up_clients(
    gateway: Start, dnsmasq: Dnsmasq, tmp_path: Path
) -> None:
    """Host-name endpoints through --discovery-dns; the DNS server freezes (SIGSTOP). Each
    client is served at once with the last answer: before, every 5 s a client of the pure
    engine waited the whole 5 s lookup (p99 5.4 s)."""
    port = free_tcp_port()
    with TagServer("a") as a:
        dnsmasq.restart(hosts={"member.etcd.test": ["127.0.0.1"]})
        g = gateway(
            f"--endpoints=member.etcd.test:{a.port}",
            f"--listen-addr=127.0.0.1:{port}",
            f"--discovery-dns={dnsmasq.addr}",
        )
        with connect(port) as s:
            assert read_line(s) == b"a\n"
        assert dnsmasq.proc is not None
        os.kill(dnsmasq.proc.pid, signal.SIGSTOP)
        try:
            worst = 0.0
            deadline = time.monotonic() + 8  # past a 5 s cache lifetime (RESOLVE_TTL)
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                with connect(port, timeout=10) as s:
                    assert read_line(s) == b"a\n"
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.2)
            # Served at once: milliseconds. A client made to wait for the lookup waits its
            # 5 s (LOOKUP_TIMEOUT; the first client past the cache's lifetime waits it all).
            # 2.5 s: halfway, so one scheduling hiccup of a loaded machine is not a failure.
            assert worst < 2.5, f"a client waited {worst:.2f} s for DNS"
        finally:
            os.kill(dnsmasq.proc.pid, signal.SIGCONT)
        assert g.stop() == 0
