"""Connecting a client to an endpoint, with --dial-timeout and failover: the loop's dial.

`Dial` connects one accepted client: it asks the balancer for a remote, connects without
blocking (one timer for --dial-timeout shared by every address of the remote), and on
failure marks the remote down and tries the next; when the balancer has nothing usable,
every unusable remote gets one more try (`Balancer.fallback`) before the client is closed.

A dial is bounded whatever the health-check mode and the balancing rule: it tries each
remote at most once (the balancer is asked to pick among the ones it has not tried, then the
fallback gets the untried unusable ones), so one client costs at most one connect per
endpoint; between two remotes it looks whether its client is still there, and stops when it
left. Every failure on the way (a refused or silent endpoint, a name that does not resolve,
an address Python cannot use, such as an IPv6 zone naming no interface) is one error text in
Go's words, never an exception that escapes with the client's fd. An address that is the
gateway's own (a name that now resolves to a listen or metrics address) is never dialled.
No asyncio Task per client: callbacks only (a Task only while a never-resolved host name is
looked up). The relay thread's native accept does the first dial itself and hands a client
whose dial failed to a `Dial` (`Dialer.resume`), so failover has this one implementation.

A `Dialer` holds what every dial uses (the loop, the balancer, the address book, the own
addresses, the settings in force, the socket options, the monitor's verdict and the
connection table) and starts each `Dial`; the last two are the Protocols `Verdict` and
`Table` declared here, so this module depends on neither monitor.py nor table.py.

`probe_connect` is the TCP re-probe of inactive endpoints (monitor.py).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from .balancer import Balancer, Remote
from .config import Endpoint, format_addr
from .goerrors import IO_TIMEOUT, NO_ADDRESS, connect_failed, dial_failed, strerror
from .listeners import TcpOptions, set_options
from .resolver import Addr, AddressBook
from .selfloop import loops_back
from .settings import Settings

__all__ = [
    "Dial",
    "Dialer",
    "OwnAddresses",
    "Table",
    "Verdict",
    "connect_error",
    "dial_error",
    "is_local_ip",
    "probe_connect",
]

# How long OwnAddresses remembers whether an IP is one of this machine's (a bind test).
LOCAL_IP_TTL = 5.0


class OwnAddresses:
    """The gateway's own TCP addresses (listen and metrics), checked before every connect.

    The self-loop guard (selfloop.check_self_loop, the Go gateway's CVE-2020-15114 check) runs
    when endpoints are set; a name that resolves to the gateway later (DNS rebinding, a
    mistake in /etc/hosts) would still make the gateway dial itself, each self-connection
    accepted and dialled again until fds run out. So the connect path asks `dials_self`
    for every address it is about to dial. Which IPs are local (for wildcard listeners) is
    a bind test, remembered for LOCAL_IP_TTL seconds.
    """

    def __init__(
        self, is_local: Callable[[str], bool], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._own: dict[int, set[str]] = {}  # port -> listen IPs ("*": every local one)
        self._is_local = is_local
        self._clock = clock
        self._local: dict[str, tuple[float, bool]] = {}

    def add(self, sockname: tuple[Any, ...]) -> None:
        """A bound TCP socket's getsockname() (a wildcard IP stands for every local one)."""
        ip, port = str(sockname[0]), int(sockname[1])
        self._own.setdefault(port, set()).add("*" if ip in ("0.0.0.0", "::") else ip)

    def dials_self(self, ip: str, port: int) -> bool:
        own = self._own.get(port)
        if not own:
            return False
        return loops_back(ip, own, self._cached_is_local)

    def _cached_is_local(self, ip: str) -> bool:
        now = self._clock()
        hit = self._local.get(ip)
        if hit is not None and hit[0] > now:
            return hit[1]
        if len(self._local) > 1024:
            self._local.clear()
        local = self._is_local(ip)
        self._local[ip] = (now + LOCAL_IP_TTL, local)
        return local


class Table(Protocol):
    """Where a dial's client goes (table.ConnTable): the dials in flight, and what starts,
    refuses or gives up a client."""

    @property
    def dials(self) -> set[Dial]: ...

    def start_relay(
        self, client: socket.socket, upstream: socket.socket, remote: Remote, held: bool = False
    ) -> None: ...

    def refuse(self, client: socket.socket, held: bool = False) -> None: ...

    def abandoned(self, client: socket.socket, held: bool = False) -> None: ...

    def handed_dial(self, held: bool = False) -> None: ...


class Verdict(Protocol):
    """What a dial's outcome means for its remote (monitor.Monitor)."""

    def dial_failed(self, remote: Remote, error: str) -> None: ...

    def dial_succeeded(self, remote: Remote) -> None: ...


class Dialer:
    """What every Dial uses, held once; `dial`, `dial_to` and `resume` start one.

    Args:
        loop: the running loop (writer callbacks, the --dial-timeout timer).
        balancer: which remote next (`pick(exclude=...)`), and the all-down `fallback()`.
        addresses: host names of the endpoints (a known answer at once, else a lookup).
        own: the gateway's own addresses, never dialled.
        settings: the configuration in force (--dial-timeout, --tcp-keepalive), read per dial.
        tcp: the socket-option rule for upstream sockets.
        verdict: told of each failed and successful connect (monitor.Monitor).
        table: where the client goes: relayed, refused or abandoned (table.ConnTable).
    """

    __slots__ = ("loop", "balancer", "addresses", "own", "settings", "tcp", "verdict", "table")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        balancer: Balancer,
        addresses: AddressBook,
        own: OwnAddresses,
        settings: Settings,
        tcp: TcpOptions,
        verdict: Verdict,
        table: Table,
    ) -> None:
        self.loop = loop
        self.balancer = balancer
        self.addresses = addresses
        self.own = own
        self.settings = settings
        self.tcp = tcp
        self.verdict = verdict
        self.table = table

    def dial(self, client: socket.socket, held: bool = False) -> Dial:
        """Connect an accepted client to the remote the balancer picks, failing over.

        held: the relay thread handed it back (engine.Failed), where it still counts
        against --max-connections until the table relays or closes it.
        """
        d = Dial(self, client, held)
        self.table.dials.add(d)
        d.next_remote()
        return d

    def dial_to(self, client: socket.socket, remote: Remote) -> Dial:
        """Dial this remote first (the engine picked it but had no address for it)."""
        d = Dial(self, client, True)
        self.table.dials.add(d)
        d.dial_remote(remote)
        return d

    def resume(self, client: socket.socket, remote: Remote, addrs: list[Addr], error: str) -> Dial:
        """Go on with a dial the engine started: its first address of remote failed with
        error; addrs are the ones left to try (they share one --dial-timeout)."""
        d = Dial(self, client, True)
        self.table.dials.add(d)
        d.resume(remote, addrs, error)
        return d


class Dial:
    """Connect one accepted client to a remote, failing over; no Task, just callbacks.

    Started by a `Dialer`, which holds what it uses (`dr`).
    """

    __slots__ = (
        "dr",
        "client",
        "remote",
        "sock",
        "addrs",
        "timer",
        "fallback",
        "deadline",
        "error",
        "task",
        "tried",
        "held",
    )

    def __init__(self, dialer: Dialer, client: socket.socket, held: bool = False) -> None:
        self.dr = dialer
        self.client = client
        self.held = held  # handed back by the relay thread: counts there until it ends
        self.remote: Remote | None = None
        self.sock: socket.socket | None = None
        self.addrs: list[Addr] = []
        self.timer: asyncio.TimerHandle | None = None
        self.fallback: list[Remote] | None = None
        self.deadline = 0.0
        self.error = ""
        self.task: asyncio.Task[None] | None = None
        # Remotes this client was sent to: each at most once (a bounded dial).
        self.tried: set[Remote] = set()

    def resume(self, remote: Remote, addrs: list[Addr], error: str) -> None:
        """Go on with a dial the engine started: its first address failed with error."""
        dr = self.dr
        self._set_remote(remote)
        self.tried.add(remote)
        self.deadline = dr.loop.time() + dr.settings.cfg.dial_timeout
        self.addrs = addrs
        self.error = error
        self._connect_next()

    def next_remote(self) -> None:
        """Dial the next remote: the balancer's pick among the untried, then the fallback."""
        dr = self.dr
        if self.tried and self._client_gone():
            # Nobody to connect any more: stop here rather than dial for a closed socket.
            self._set_remote(None)
            dr.table.dials.discard(self)
            dr.table.abandoned(self.client, self.held)
            return
        remote: Remote | None = None
        if self.fallback is None:
            remote = dr.balancer.pick(exclude=self.tried)
            if remote is None:
                self.fallback = [r for r in dr.balancer.fallback() if r not in self.tried]
        if remote is None:
            assert self.fallback is not None
            if not self.fallback:
                self._set_remote(None)
                dr.table.dials.discard(self)
                dr.table.refuse(self.client, self.held)
                return
            remote = self.fallback.pop(0)
        self.dial_remote(remote)

    def _client_gone(self) -> bool:
        """The client closed or reset while we dialled (a peek: nothing is consumed)."""
        try:
            data = self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # ECONNRESET and the like
        return data == b""

    def _set_remote(self, remote: Remote | None) -> None:
        # A client being connected counts for least-connections (Remote.live).
        balancer = self.dr.balancer
        if self.remote is not None:
            balancer.dialing(self.remote, -1)
        self.remote = remote
        if remote is not None:
            balancer.dialing(remote, 1)

    def dial_remote(self, remote: Remote) -> None:
        """Dial remote (each of its addresses in turn, within one --dial-timeout)."""
        dr = self.dr
        self._set_remote(remote)
        self.tried.add(remote)
        self.deadline = dr.loop.time() + dr.settings.cfg.dial_timeout
        addrs = dr.addresses.known(remote.endpoint.host)
        if addrs is None:
            self.task = dr.loop.create_task(self._resolve_then_connect(remote))
            return
        self.addrs = list(addrs)
        self._connect_next()

    async def _resolve_then_connect(self, remote: Remote) -> None:
        host = remote.endpoint.host
        try:
            timeout = max(0.001, self.deadline - self.dr.loop.time())
            self.addrs = list(await asyncio.wait_for(self.dr.addresses.resolve(host), timeout))
        except TimeoutError:
            self.task = None
            self._failed(dial_failed(remote.addr, f"lookup {host}: {IO_TIMEOUT}"))
            return
        except (OSError, UnicodeError, ValueError) as e:
            # OSError from the resolvers; UnicodeError/ValueError from a name the IDNA codec
            # or the address parser refuses: an endpoint's fault, not the gateway's.
            self.task = None
            self._failed(lookup_error(remote.endpoint, e))
            return
        self.task = None
        self._connect_next()

    def _connect_next(self) -> None:
        dr = self.dr
        remote = self.remote
        assert remote is not None
        if not self.addrs:
            self._failed(self.error or dial_failed(remote.addr, NO_ADDRESS))
            return
        fam, sa = self.addrs.pop(0)
        port = remote.endpoint.port
        if dr.own.dials_self(sa[0], port):
            self.error = dial_failed(format_addr(sa[0], port), SELF_DIAL)
            self._connect_next()
            return
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            # Out of fds: this client cannot be served now; do not blame the endpoint.
            self.error = dial_failed(remote.addr, str(e.strerror))
            self._set_remote(None)
            dr.table.dials.discard(self)
            dr.table.refuse(self.client, self.held)
            return
        # keep-alive: table.start_relay, once the connection lived
        set_options(sock, dr.tcp.split(dr.settings.cfg.tcp_keepalive)[0])
        try:
            err = sock.connect_ex((sa[0], port))
        except (OSError, UnicodeError, ValueError) as e:
            # connect_ex returns errnos but raises for an address it cannot parse: an IPv6
            # zone that names no interface (socket.gaierror), a malformed literal.
            sock.close()
            self.error = connect_error(remote.endpoint, sa[0], e)
            self._connect_next()
            return
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
        dr.loop.add_writer(sock.fileno(), self._on_writable)
        self.timer = dr.loop.call_at(self.deadline, self._on_timeout)

    def _on_writable(self) -> None:
        sock, remote = self.sock, self.remote
        assert sock is not None and remote is not None
        self.dr.loop.remove_writer(sock.fileno())
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
        self.dr.loop.remove_writer(sock.fileno())
        sock.close()
        self.sock = None
        # The whole dial (every address of the endpoint) shares one --dial-timeout.
        self.addrs = []
        self._failed(dial_failed(remote.addr, IO_TIMEOUT))

    def _failed(self, error: str) -> None:
        remote = self.remote
        assert remote is not None
        self.dr.verdict.dial_failed(remote, error)
        self.error = ""
        self.next_remote()

    def _connected(self) -> None:
        dr, sock, remote = self.dr, self.sock, self.remote
        assert sock is not None and remote is not None
        dr.table.dials.discard(self)
        self.sock = None
        self._set_remote(None)
        dr.verdict.dial_succeeded(remote)
        dr.table.start_relay(self.client, sock, remote, self.held)

    def hand_over(self) -> socket.socket:
        """Live upgrade (upgrade.py): stop dialling and give the client up, open; it has sent
        nothing we consumed, so the successor dials it again from scratch."""
        self._stop()
        self.dr.table.dials.discard(self)
        self.dr.table.handed_dial(self.held)
        return self.client

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.sock is not None:
            self.dr.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self._set_remote(None)

    def abort(self) -> None:
        """Shutdown: give up this client now."""
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self.dr.loop.remove_writer(self.sock.fileno())
            self.sock.close()
        self._set_remote(None)
        self.client.close()
        self.dr.table.dials.discard(self)


def is_local_ip(ip: str) -> bool:
    """Whether ip is one of this machine's addresses: only those can be bound without
    IP_FREEBIND. Used by the self-loop guards for wildcard listen addresses."""
    if ip.startswith("127.") or ip == "::1":
        return True
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


SELF_DIAL = "refused: the address is one of the gateway's own (listen or metrics)"


def lookup_error(ep: Endpoint, e: BaseException) -> str:
    """Go's text for a failed lookup: `dial tcp h:2379: lookup h: no such host` (the
    resolvers' OSError already says `lookup h...`; others do not)."""
    text = str(e) or type(e).__name__
    if not text.startswith("lookup "):
        text = f"lookup {ep.host}: {text}"
    return dial_failed(ep.addr, text)


def dial_error(ep: Endpoint, ip: str, err: int) -> str:
    """Go's dial error text: `dial tcp 127.0.0.1:2379: connect: connection refused`."""
    where = format_addr(ip, ep.port) if ip else ep.addr
    return connect_failed(where, err)


def connect_error(ep: Endpoint, ip: str, e: BaseException) -> str:
    """dial_error() for an exception from connect: an errno, or an address it cannot use."""
    if isinstance(e, OSError) and not isinstance(e, socket.gaierror) and e.errno:
        return dial_error(ep, ip, e.errno)
    where = format_addr(ip, ep.port) if ip else ep.addr
    return dial_failed(where, f"connect: invalid address: {strerror(e).lower()}")


async def probe_connect(
    ep: Endpoint, addresses: AddressBook, timeout: float, own: OwnAddresses | None = None
) -> None:
    """A TCP connect to ep within timeout (every address shares it), closed at once.

    An address in own (the gateway's) fails the probe without a connect: it would succeed.

    Raises:
        OSError: the dial error, in Go's words.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        addrs = await asyncio.wait_for(addresses.resolve(ep.host), timeout)
    except TimeoutError:
        raise OSError(
            errno.ETIMEDOUT, dial_failed(ep.addr, f"lookup {ep.host}: {IO_TIMEOUT}")
        ) from None
    except (OSError, UnicodeError, ValueError) as e:
        raise OSError(getattr(e, "errno", None) or errno.EINVAL, lookup_error(ep, e)) from None
    last: OSError | None = None
    for fam, sa in addrs:
        if own is not None and own.dials_self(sa[0], ep.port):
            last = OSError(errno.EINVAL, dial_failed(format_addr(sa[0], ep.port), SELF_DIAL))
            continue
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(s, (sa[0], ep.port)), max(0.001, deadline - loop.time())
            )
            return
        except TimeoutError:
            last = OSError(errno.ETIMEDOUT, dial_failed(ep.addr, IO_TIMEOUT))
        except (OSError, UnicodeError, ValueError) as e:
            last = OSError(getattr(e, "errno", None) or errno.EINVAL, connect_error(ep, sa[0], e))
        finally:
            s.close()
    if last is None:
        raise OSError(errno.EHOSTUNREACH, dial_failed(ep.addr, NO_ADDRESS))
    raise last
