"""Connecting a client to an endpoint, with --dial-timeout and failover: the loop's dial.

`Dial` connects one accepted client: it asks the balancer for a remote, connects without
blocking (one timer for --dial-timeout shared by every address of the remote), and on
failure marks the remote down and tries the next; when the balancer has nothing usable,
every unusable remote gets one more try (`Balancer.fallback`) before the client is closed.
No asyncio Task per client: callbacks only (a Task only while a never-resolved host name is
looked up). The relay thread's native accept does the first dial itself and hands a client
whose dial failed to a `Dial` (`resume`), so failover has this one implementation.

`probe_connect` is the TCP re-probe of inactive endpoints (monitor.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING

from .balancer import Remote
from .config import Endpoint, format_addr
from .listeners import set_options
from .resolver import Addr, AddressBook

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["Dial", "dial_error", "probe_connect"]


class Dial:
    """Connect one accepted client to a remote, failing over; no Task, just callbacks."""

    __slots__ = (
        "gw",
        "client",
        "remote",
        "sock",
        "addrs",
        "timer",
        "fallback",
        "deadline",
        "error",
        "task",
    )

    def __init__(self, gw: Gateway, client: socket.socket) -> None:
        self.gw = gw
        self.client = client
        self.remote: Remote | None = None
        self.sock: socket.socket | None = None
        self.addrs: list[Addr] = []
        self.timer: asyncio.TimerHandle | None = None
        self.fallback: list[Remote] | None = None
        self.deadline = 0.0
        self.error = ""
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.gw.dials.add(self)
        self._next_remote()

    def start_with(self, remote: Remote) -> None:
        """Dial this remote first (the engine picked it but had no address for it)."""
        self.gw.dials.add(self)
        self._dial_remote(remote)

    def resume(self, remote: Remote, addrs: list[Addr], error: str) -> None:
        """Go on with a dial the engine started: its first address failed with error."""
        gw = self.gw
        gw.dials.add(self)
        self._set_remote(remote)
        self.deadline = gw.loop.time() + gw.cfg.dial_timeout
        self.addrs = addrs
        self.error = error
        self._connect_next()

    def _next_remote(self) -> None:
        gw = self.gw
        remote: Remote | None = None
        if self.fallback is None:
            remote = gw.balancer.pick()
            if remote is None:
                self.fallback = gw.balancer.fallback()
        if remote is None:
            assert self.fallback is not None
            if not self.fallback:
                self._set_remote(None)
                gw.dials.discard(self)
                gw.refuse(self.client)
                return
            remote = self.fallback.pop(0)
        self._dial_remote(remote)

    def _set_remote(self, remote: Remote | None) -> None:
        # A client being connected counts for least-connections (Remote.live).
        if self.remote is not None:
            self.remote.dialing -= 1
        self.remote = remote
        if remote is not None:
            remote.dialing += 1

    def _dial_remote(self, remote: Remote) -> None:
        gw = self.gw
        self._set_remote(remote)
        self.deadline = gw.loop.time() + gw.cfg.dial_timeout
        addrs = gw.addresses.known(remote.endpoint.host)
        if addrs is None:
            self.task = gw.loop.create_task(self._resolve_then_connect(remote))
            return
        self.addrs = list(addrs)
        self._connect_next()

    async def _resolve_then_connect(self, remote: Remote) -> None:
        host = remote.endpoint.host
        try:
            timeout = max(0.001, self.deadline - self.gw.loop.time())
            self.addrs = list(await asyncio.wait_for(self.gw.addresses.resolve(host), timeout))
        except TimeoutError:
            self.task = None
            self._failed(f"dial tcp {remote.addr}: lookup {host}: i/o timeout")
            return
        except OSError as e:
            self.task = None
            self._failed(f"dial tcp {remote.addr}: lookup {host}: {e}")
            return
        self.task = None
        self._connect_next()

    def _connect_next(self) -> None:
        gw = self.gw
        remote = self.remote
        assert remote is not None
        if not self.addrs:
            self._failed(self.error or f"dial tcp {remote.addr}: no address")
            return
        fam, sa = self.addrs.pop(0)
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            # Out of fds: this client cannot be served now; do not blame the endpoint.
            self.error = f"dial tcp {remote.addr}: {e.strerror}"
            self._set_remote(None)
            gw.dials.discard(self)
            gw.refuse(self.client)
            return
        set_options(sock, gw.tcp.split(gw.cfg.tcp_keepalive)[0])  # keep-alive: start_relay
        err = sock.connect_ex((sa[0], remote.endpoint.port))
        if err == 0:
            self.sock = sock
            self._connected()
            return
        if err != errno.EINPROGRESS:
            sock.close()
            self.error = dial_error(remote.endpoint, sa[0], err)
            self._connect_next()
            return
        self.sock = sock
        try:
            # Over loopback the handshake is done by the time connect() returns EINPROGRESS:
            # relay at once, without a writer callback, a timer and another loop wake-up.
            sock.getpeername()
        except OSError:
            pass  # ENOTCONN: still connecting (or failed): wait for writability
        else:
            self._connected()
            return
        gw.loop.add_writer(sock.fileno(), self._on_writable)
        self.timer = gw.loop.call_at(self.deadline, self._on_timeout)

    def _on_writable(self) -> None:
        sock, remote = self.sock, self.remote
        assert sock is not None and remote is not None
        self.gw.loop.remove_writer(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected()
            return
        sock.close()
        self.sock = None
        self.error = dial_error(remote.endpoint, "", err)
        self._connect_next()

    def _on_timeout(self) -> None:
        sock, remote = self.sock, self.remote
        assert sock is not None and remote is not None
        self.timer = None
        self.gw.loop.remove_writer(sock.fileno())
        sock.close()
        self.sock = None
        # The whole dial (every address of the endpoint) shares one --dial-timeout.
        self.addrs = []
        self._failed(f"dial tcp {remote.addr}: i/o timeout")

    def _failed(self, error: str) -> None:
        remote = self.remote
        assert remote is not None
        self.gw.monitor.dial_failed(remote, error)
        self.error = ""
        self._next_remote()

    def _connected(self) -> None:
        gw, sock, remote = self.gw, self.sock, self.remote
        assert sock is not None and remote is not None
        gw.dials.discard(self)
        self.sock = None
        self._set_remote(None)
        gw.monitor.dial_succeeded(remote)
        gw.start_relay(self.client, sock, remote)

    def abort(self) -> None:
        """Shutdown: give up this client now."""
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self.gw.loop.remove_writer(self.sock.fileno())
            self.sock.close()
        self._set_remote(None)
        self.client.close()
        self.gw.dials.discard(self)


def dial_error(ep: Endpoint, ip: str, err: int) -> str:
    """Go's dial error text: `dial tcp 127.0.0.1:2379: connect: connection refused`."""
    where = format_addr(ip, ep.port) if ip else ep.addr
    return f"dial tcp {where}: connect: {os.strerror(err).lower()}"


async def probe_connect(ep: Endpoint, addresses: AddressBook, timeout: float) -> None:
    """A TCP connect to ep within timeout (every address shares it), closed at once.

    Raises:
        OSError: the dial error, in Go's words.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        addrs = await asyncio.wait_for(addresses.resolve(ep.host), timeout)
    except TimeoutError:
        raise OSError(
            errno.ETIMEDOUT, f"dial tcp {ep.addr}: lookup {ep.host}: i/o timeout"
        ) from None
    last: OSError | None = None
    for fam, sa in addrs:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(s, (sa[0], ep.port)), max(0.001, deadline - loop.time())
            )
            return
        except TimeoutError:
            last = OSError(errno.ETIMEDOUT, f"dial tcp {ep.addr}: i/o timeout")
        except OSError as e:
            last = OSError(e.errno, dial_error(ep, sa[0], e.errno or 0))
        finally:
            s.close()
    if last is None:
        raise OSError(errno.EHOSTUNREACH, f"dial tcp {ep.addr}: no address")
    raise last
