"""monitor.py in process: `Monitor` built from its collaborators, without a Gateway.

A real Balancer and AddressBook, the Settings a reload replaces, a Logger into a buffer, a
clock the test sets (when an endpoint went down, log rate limits) and a real asyncio loop
for the set-aside timers and the --retry-delay re-probe against real loopback sockets.
End to end through a gateway process: tests/test_monitor.py and tests/test_dial.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from _gateway import TagServer, free_tcp_port
from _parts import Script, ep
from etcdgw.balancer import Balancer, Remote
from etcdgw.config import Config
from etcdgw.dial import SELF_DIAL, OwnAddresses, is_local_ip
from etcdgw.log import Logger
from etcdgw.monitor import ASIDE_MIN, NONE_LOG_EVERY, Monitor
from etcdgw.resolver import AddressBook
from etcdgw.settings import Settings

T = TypeVar("T")


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Setup:
    """A Monitor over real parts; ports are the endpoints' (127.0.0.1)."""

    def __init__(self, ports: list[int], **cfg: Any) -> None:
        endpoints = [ep(p) for p in ports]
        self.settings = Settings(Config(endpoints=tuple(endpoints), **cfg))
        least = self.settings.cfg.balance == "least-connections"
        self.balancer = Balancer(endpoints, least=least)
        self.stream = io.StringIO()
        self.addresses = AddressBook(Script())
        self.own = OwnAddresses(is_local_ip)
        self.clock = Clock()
        self.monitor = Monitor(
            self.balancer,
            self.settings,
            Logger(level="debug", stream=self.stream),
            self.addresses,
            self.own,
            clock=self.clock,
        )

    @property
    def remotes(self) -> list[Remote]:
        return self.balancer.remotes

    def lines(self, msg: str) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [r for r in records if r["msg"] == msg]


def run(main: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


async def until(pred: Callable[[], object], timeout: float = 5.0) -> float:
    """Await until pred() is truthy; the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not met"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


NONE_LINE = "failed to connect to endpoint; trying the next (--health-check=none)"


def test_none_keeps_the_endpoint_and_logs_once_per_interval() -> None:
    s = Setup([1, 2], health_check="none")
    a = s.remotes[0]
    for i in range(3):
        s.monitor.dial_failed(a, f"error {i}")
        s.clock.now += NONE_LOG_EVERY / 2
    assert a.active and a.usable and a.down_since is None
    assert (a.dial_failures, a.last_error) == (3, "error 2")
    # At 0 and at NONE_LOG_EVERY: one line per endpoint per interval.
    assert [r["error"] for r in s.lines(NONE_LINE)] == ["error 0", "error 2"]
    assert not s.lines("deactivated endpoint")
    assert not s.monitor.probing


def test_tcp_deactivates_once_and_a_success_activates() -> None:
    s = Setup([1, 2], retry_delay=2.0)
    a = s.remotes[0]
    s.monitor.dial_failed(a, "refused")
    s.clock.now += 1
    s.monitor.dial_failed(a, "refused again")
    assert (a.active, a.down_since, a.dial_failures) == (False, 1000.0, 2)
    (line,) = s.lines("deactivated endpoint")
    assert (line["error"], line["interval"]) == ("refused", "2s")
    assert s.balancer.pick() is s.remotes[1] and s.balancer.pick() is s.remotes[1]
    s.monitor.dial_succeeded(a)
    assert a.active and [r["address"] for r in s.lines("activated")] == [a.addr]
    assert not s.lines(NONE_LINE)


FAILED_PROBE = "failed to activate endpoint (stay inactive for another interval)"


def reprobe(ports: list[int], own: int | None = None) -> tuple[Setup, dict[str, str]]:
    """Every endpoint down, two --retry-delay rounds: the monitor and each endpoint's last
    failed-probe error."""
    s = Setup(ports, retry_delay=0.05)
    if own is not None:
        s.own.add(("127.0.0.1", own))
    for r in s.remotes:
        s.monitor.dial_failed(r, "down")

    async def main() -> None:
        task = asyncio.ensure_future(s.monitor.run())
        try:
            await until(lambda: len(s.lines(FAILED_PROBE)) >= 2 * (len(ports) - 1))
        finally:
            task.cancel()

    run(main)
    return s, {r["address"]: r["error"] for r in s.lines(FAILED_PROBE)}


def test_retry_delay_reprobes_the_inactive_ones() -> None:
    """tcp: each round re-probes every inactive endpoint; one that answers is activated, a
    closed port and the gateway's own address stay inactive, each with its reason."""
    dead = free_tcp_port()
    with TagServer("back") as back, TagServer("me") as me:
        s, errors = reprobe([dead, back.port, me.port], own=me.port)
        assert [r.active for r in s.remotes] == [False, True, False]
        assert [r["address"] for r in s.lines("activated")] == [f"127.0.0.1:{back.port}"]
        assert me.accepted == 0
        assert errors.keys() == {f"127.0.0.1:{dead}", f"127.0.0.1:{me.port}"}
        refused = f"dial tcp 127.0.0.1:{dead}: connect: connection refused"
        assert errors[f"127.0.0.1:{dead}"].endswith(refused)
        assert errors[f"127.0.0.1:{me.port}"].endswith(f"dial tcp 127.0.0.1:{me.port}: {SELF_DIAL}")


def test_a_failed_reprobe_logs_gos_error_text() -> None:
    dead = free_tcp_port()
    s, errors = reprobe([dead, free_tcp_port()])
    assert errors[f"127.0.0.1:{dead}"] == f"dial tcp 127.0.0.1:{dead}: connect: connection refused"
    assert s.remotes[0].last_error == errors[f"127.0.0.1:{dead}"]


def test_a_reload_that_turns_checks_off_brings_the_inactive_back() -> None:
    s = Setup([free_tcp_port()], retry_delay=0.05)
    a = s.remotes[0]
    s.monitor.dial_failed(a, "down")

    async def main() -> None:
        task = asyncio.ensure_future(s.monitor.run())
        try:
            await asyncio.sleep(0.12)
            assert not a.active  # probed and still down
            s.settings.cfg = dataclasses.replace(s.settings.cfg, health_check="none")
            await until(lambda: a.active)
        finally:
            task.cancel()

    run(main)
    assert s.lines("activated")[0]["reason"] == "checks off"


def test_strikes_set_aside_for_a_pause_that_doubles() -> None:
    """least-connections: a failed fresh connection sets the member aside (no new clients
    while another is usable) for ASIDE_MIN, doubling with each strike in a row; a connection
    that received bytes ends the streak."""
    s = Setup([1, 2], balance="least-connections", health_check="none")
    a, b = s.remotes

    async def main() -> tuple[float, float]:
        s.monitor.dial_failed(a, "refused")  # `none`: a strike, not a deactivation
        assert a.aside and not a.usable and a.strikes == 1
        assert {s.balancer.pick() for _ in range(4)} == {b}
        first = await until(lambda: not a.aside)
        s.monitor.closed(a, 2, 1, False)  # a connection it ended at once, silent
        assert a.aside and a.strikes == 2
        s.monitor.closed(a, 1, 1, False)  # picked before it was set aside: same pause
        assert a.strikes == 3
        second = await until(lambda: not a.aside)
        s.monitor.closed(a, 1, 0, True)  # it answered: the streak ends
        return first, second

    first, second = run(main)
    assert a.strikes == 0 and a.usable
    assert ASIDE_MIN * 0.9 <= first < ASIDE_MIN * 2, first
    assert ASIDE_MIN * 2 * 0.9 <= second < ASIDE_MIN * 4, second
    # The first strike of a streak and each doubling are logged with the pause they got
    # (strike 2: 1 s); strike 3 (no new pause, not a power of two) is not.
    assert [r["pause"] for r in s.lines("endpoint set aside (least-connections)")] == [
        "500ms",
        "1s",
    ]
    s.clock.now += NONE_LOG_EVERY

    async def again() -> None:
        s.monitor.strike(a, "closed")
        s.monitor.close()  # teardown cancels the timer

    run(again)
    assert a.aside and [r["pause"] for r in s.lines("endpoint set aside (least-connections)")] == [
        "500ms",
        "1s",
        "500ms",
    ]


def test_no_strike_for_round_robin_or_a_removed_member() -> None:
    s = Setup([1, 2], health_check="none")
    a, b = s.remotes

    async def main() -> None:
        s.monitor.dial_failed(a, "refused")
        s.monitor.closed(a, 1, 1, False)
        assert not a.aside and a.strikes == 0
        s.balancer.set_least(True)  # a reload to least-connections
        s.balancer.set_endpoints([b.endpoint])
        s.monitor.strike(a, "refused")
        assert a.removed and not a.aside and a.strikes == 0

    run(main)
    assert not s.lines("endpoint set aside (least-connections)")
