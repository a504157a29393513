"""The gateway's parts built in process, without a Gateway, for the unit tests of dial.py,
accept.py and monitor.py (tests/test_*_unit.py).

Everything here is real: a Balancer, an AddressBook (its resolver a scripted async function
when the test needs host names), a Monitor, a ConnTable, the relay engine under test driven
by a real asyncio loop, a Dialer, real loopback sockets, wired by wiring.Parts, the wiring
Gateway runs. The test owns the loop and the listener.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar

import pytest

from etcdgw import wiring
from etcdgw.accept import LoopAccept, NativeAccept
from etcdgw.balancer import Remote
from etcdgw.config import Config, Endpoint
from etcdgw.dial import Dialer
from etcdgw.log import Logger
from etcdgw.relay import Engine, Relay, new_event_loop
from etcdgw.resolver import AsyncResolver

T = TypeVar("T")

__all__ = ["Listening", "Parts", "Script", "client_pair", "ep"]


def ep(port: int, host: str = "127.0.0.1") -> Endpoint:
    return Endpoint(host, port)


class Script:
    """An async resolver whose answers the test sets (pure logic input for the AddressBook);
    `delays` makes a host's lookups take that long."""

    def __init__(
        self, answers: dict[str, list[str]] | None = None, delays: dict[str, float] | None = None
    ) -> None:
        self.answers = dict(answers or {})
        self.delays = dict(delays or {})
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if host in self.delays:
            await asyncio.sleep(self.delays[host])
        if host not in self.answers:
            raise OSError(f"lookup {host}: no such host")
        return list(self.answers[host])


class Listening:
    """A loopback TCP listener in the shape of listeners.ListenerSet (`socks`)."""

    def __init__(self, backlog: int = 128) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(backlog)
        s.setblocking(False)
        self.socks: list[socket.socket] = [s]
        self.port = int(s.getsockname()[1])

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


class Parts(wiring.Parts):
    """The parts of one gateway, wired by wiring.Parts as Gateway wires them, minus the
    Gateway: with a loop the test drives and a listener of its own.

    Args:
        endpoints: the balancer's endpoints.
        engine_cls: the relay engine under test (either twin).
        resolve: the address book's resolver (default: no name resolves; IPs need none).
        native: the Cython engine's native accept (Relay on_native; NativeAccept).
        cfg: Config fields (dial_timeout=..., health_check=..., max_connections=...).
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        engine_cls: type[Engine],
        *,
        resolve: AsyncResolver | None = None,
        native: bool = False,
        **cfg: Any,
    ) -> None:
        self.loop = new_event_loop()
        self.stream = io.StringIO()
        self.gone = 0
        super().__init__(
            Config(endpoints=tuple(endpoints), **cfg),
            Logger(level="debug", stream=self.stream),
            resolve if resolve is not None else Script(),
            on_gone=self._on_gone,
        )
        relay = self.attach(self.loop, engine_cls, native_accept=native)
        assert relay.native == native
        self.listener_set: Listening | None = None

    @property
    def remotes(self) -> list[Remote]:
        return self.balancer.remotes

    # wiring.Parts sets relay and dialer in attach(), which __init__ calls: never None here.
    @property
    def the_relay(self) -> Relay:
        assert self.relay is not None, "attach() first"
        return self.relay

    @property
    def the_dialer(self) -> Dialer:
        assert self.dialer is not None, "attach() first"
        return self.dialer

    def _on_gone(self) -> None:
        # As Gateway._on_gone, minus the drain: accept again below the limit.
        self.gone += 1
        self.resume_accepting()

    def start_accepting(self, backlog: int = 128) -> LoopAccept | NativeAccept:
        """Start the acceptor (LoopAccept, or NativeAccept with native=True) on a listener."""
        self.listener_set = Listening(backlog)
        return self.accept(self.loop, self.listener_set)

    # --- driving the loop -------------------------------------------------------------

    def run(self, aw: Awaitable[T], timeout: float = 10.0) -> T:
        """Run the loop until aw is done (bounded by timeout)."""
        return self.loop.run_until_complete(asyncio.wait_for(aw, timeout))

    def call(self, fn: Callable[[], T]) -> T:
        """fn() inside the running loop (as the gateway's callbacks run)."""

        async def inside() -> T:
            return fn()

        return self.run(inside())

    def until(self, pred: Callable[[], object], timeout: float = 10.0) -> float:
        """Run the loop until pred() is truthy; return the seconds it took."""
        t0 = time.monotonic()

        async def poll() -> None:
            while not pred():
                await asyncio.sleep(0.005)

        self.run(poll(), timeout)
        return time.monotonic() - t0

    def idle(self, seconds: float) -> None:
        """Let the loop run for this long."""
        self.run(asyncio.sleep(seconds), seconds + 5)

    def read_line(self, s: socket.socket, timeout: float = 5.0) -> bytes:
        """Bytes from s up to a newline or EOF, the loop running meanwhile (it relays)."""
        s.setblocking(False)

        async def go() -> bytes:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await self.loop.sock_recv(s, 4096)
                if not chunk:
                    break
                buf += chunk
            return buf

        return self.run(go(), timeout)

    def closed(self, s: socket.socket, timeout: float = 5.0) -> bool:
        """Whether the other side closed s (EOF or reset) within timeout, reading what comes."""
        s.setblocking(False)

        async def go() -> None:
            while await self.loop.sock_recv(s, 4096):
                pass

        try:
            self.run(go(), timeout)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    # --- what happened ------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def messages(self, msg: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["msg"] == msg]

    def close(self) -> None:
        """As Gateway._teardown: stop accepting, then close the listener (as
        Gateway.close_listeners), every part once (wiring.Parts.close), the loop last."""
        if self.acceptor is not None:
            # Before the listener closes: the relay thread must let go of its fd first
            # (Engine.unlisten), which stop() does only while the listener set still has it.
            self.acceptor.stop()
        if self.listener_set is not None:
            self.listener_set.close()
        super().close()
        # Let cancelled lookups finish before the loop closes.
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def client_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(the test's end, the accepted non-blocking end a Dialer takes) over loopback.

    listener: a blocking listening socket (with a timeout).
    """
    peer = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    return peer, accepted


Make = Callable[..., "Parts"]


def uses_parts(module: ModuleType) -> bool:
    """Whether a test module takes anything from this one (an in-process test module)."""
    return any(getattr(v, "__module__", None) == __name__ for v in vars(module).values())


@pytest.fixture(autouse=True)
def _fd_leak_check_in_process(request: pytest.FixtureRequest) -> None:
    """The fd-leak check (conftest.no_fd_leak), on for every test of a module that uses this
    one: in-process parts share this process's fd table, so what they leak shows here."""
    if request.module is not None and uses_parts(request.module):
        request.getfixturevalue("no_fd_leak")


@pytest.fixture
def make(engine_module: ModuleType, no_fd_leak: None) -> Iterator[Make]:
    """Factory: make(endpoints, **config fields) -> Parts (LoopAccept) on the engine under test."""
    made: list[Parts] = []

    def build(endpoints: list[Endpoint], **kw: Any) -> Parts:
        p = Parts(endpoints, engine_module.Engine, **kw)
        made.append(p)
        return p

    yield build
    for p in made:
        p.close()
