"""Listeners, accept, connect-with-failover, hand-off to the relay engine, monitor, drain.

# Strategy:
One asyncio loop (epoll). The listening sockets are registered with `add_reader`; each
wake-up accepts until EAGAIN (bounded batch). A client then goes through a small callback
object, `_Dial`, that picks a remote, connects non-blockingly with a timer for
--dial-timeout, and on failure marks the remote down and tries the next one, without an
asyncio Task per connection. A connected pair is handed to the relay engine (`relay.Relay`),
which moves bytes in C and reports only pairs that finished. This module owns every socket
it creates, and closes each exactly once after the engine has unregistered it.

Native accept (the Cython engine's threaded mode): the listeners are given to the engine
instead, whose relay thread accepts, picks a remote exactly as `Balancer.pick()` would (the
remotes' order, priorities, weights and usable flags are mirrored into it by
`_sync_native()` whenever they change) and connects, with --dial-timeout, without Python.
The loop hears of each such pair once (to count it per remote) and of clients whose dial
failed, which it takes over: the remote is marked down as above and `_Dial` connects the
client to the next one. The engine owns (and closes) the sockets of its own pairs.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import systemd
from .balancer import Balancer, Remote
from .config import Config, ConfigError, Endpoint, Listen, format_addr, format_duration
from .log import Logger
from .relay import IMPLEMENTATION, Engine, Relay

ACCEPT_BATCH = 128
# Accept errors that mean "out of a resource for now" (the Go gateway exits 0 on them).
ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Out of fds, the clients already in the backlog are accepted with a spare fd and closed at
# once, so they learn now instead of hanging until fds free up (libuv's "EMFILE trick").
ACCEPT_SHED_ERRNOS = {errno.EMFILE, errno.ENFILE}
ACCEPT_PAUSE = 0.1  # seconds; grows to ACCEPT_PAUSE_MAX while the shortage lasts
ACCEPT_PAUSE_MAX = 1.0
# How long a host name's addresses are reused before resolving again. The Go gateway
# re-resolves at every dial; a short cache keeps that spirit without a resolver round trip
# (a thread hop for getaddrinfo) per client connection.
RESOLVE_TTL = 5.0
LINGER_RESET = struct.pack("ii", 1, 0)
# Accept and connect in the Cython engine's relay thread when it can (see the module
# docstring). ETCDGW_NATIVE_ACCEPT=0 keeps accept and connect in Python, for benchmarks
# that compare the two; not an API.
NATIVE_ACCEPT = os.environ.get("ETCDGW_NATIVE_ACCEPT", "1") != "0"
# How often the loop re-resolves host names for native accept and re-checks what the
# engine was told (health verdicts and reloads are also pushed at once).
NATIVE_UPKEEP = 1.0

AsyncResolver = Callable[[str], Awaitable[list[str]]]


@dataclass
class Counters:
    """Gateway-wide counters, plain integers read by metrics at scrape time."""

    accepted: int = 0
    refused: int = 0  # closed because no endpoint could be reached
    accept_errors: int = 0
    finished: int = 0
    reset: int = 0
    bytes_finished: list[int] = field(default_factory=lambda: [0, 0])


class Conn:
    """A relayed pair: the owner's view (sockets, remote, start time).

    client and upstream are None for the engine's own pairs (native accept): it closes them.
    """

    __slots__ = ("client", "upstream", "remote", "started")

    def __init__(
        self, client: socket.socket | None, upstream: socket.socket | None, remote: Remote
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.remote = remote
        self.started = time.monotonic()


class Gateway:
    """The running gateway: listeners, balancer, relay, monitor and lifecycle."""

    def __init__(
        self,
        cfg: Config,
        log: Logger,
        *,
        resolve: AsyncResolver | None = None,
        engine_cls: type[Engine] | None = None,
        inherited: Sequence[socket.socket] = (),
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.balancer = Balancer(cfg.endpoints)
        self.counters = Counters()
        self.conns: dict[int, Conn] = {}
        self.dials: set[_Dial] = set()
        self.listeners: list[socket.socket] = []
        self.engine_cls: type[Engine] = engine_cls if engine_cls is not None else Engine
        self.implementation = IMPLEMENTATION if engine_cls is None else _engine_name(engine_cls)
        self._inherited = list(inherited)
        self._unix_paths: list[str] = []
        self._resolve = resolve
        self._addr_cache: dict[str, tuple[float, list[tuple[int, Any]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: Relay | None = None
        self._accepting = False
        self._accept_pause = ACCEPT_PAUSE
        self._pause_handle: asyncio.TimerHandle | None = None
        self._sockopts_cache: list[tuple[int, int, int]] = []
        self._sockopts_for: float | None = None
        # listener -> (tcp_keepalive it was tuned for, its clients inherit it: None = unknown)
        self._listener_state: dict[socket.socket, tuple[float, bool | None]] = {}
        self._spare_fd = -1  # reserved while serving, see _shed()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done: asyncio.Future[None] | None = None
        self._draining = False
        self._drain_handle: asyncio.TimerHandle | None = None
        self._refuse_log_at = 0.0
        self._refuse_suppressed = 0
        # Native accept: on when the engine can (set in run()); remotes by tag; what the
        # engine was last told (so unchanged state is not sent again).
        self._native = False
        self._tags: dict[int, Remote] = {}
        self._native_state: tuple[Any, ...] | None = None
        self.ready = False
        # Hooks for other modules (discovery refresh, reload, metrics): set by cli.
        self.on_sighup: Callable[[], None] | None = None
        self.on_stop: list[Callable[[], None]] = []

    # --- start-up ----------------------------------------------------------------------

    def bind(self) -> None:
        """Create and bind every listener (or adopt systemd's), before anything is served.

        Raises:
            ConfigError: the Go gateway's bind message on stderr, e.g.
                `listen tcp 127.0.0.1:23790: bind: address already in use`.
        """
        if self._inherited:
            for s in self._inherited:
                s.setblocking(False)
                self.listeners.append(s)
            return
        try:
            for ls in self.cfg.listen:
                self.listeners.append(self._bind_one(ls))
        except BaseException:
            self.close_listeners()
            raise

    def _bind_one(self, ls: Listen) -> socket.socket:
        if ls.path is not None:
            return self._bind_unix(ls.path)
        host = ls.host
        try:
            if host in ("", "::"):
                # Go's net.Listen("tcp", ":port") listens on every address, v4 and v6.
                sock = socket.create_server(
                    ("", ls.port),
                    family=socket.AF_INET6,
                    dualstack_ipv6=True,
                    backlog=socket.SOMAXCONN,
                )
            else:
                infos = socket.getaddrinfo(
                    host, ls.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                family, _, _, _, sockaddr = infos[0]
                sock = socket.create_server(sockaddr, family=family, backlog=socket.SOMAXCONN)
        except socket.gaierror:
            raise ConfigError(f"failed to resolve listen host: {host}") from None
        except OSError as e:
            reason = os.strerror(e.errno).lower() if e.errno else str(e)
            raise ConfigError(f"listen tcp {ls.addr}: bind: {reason}", stream="stderr") from None
        sock.setblocking(False)
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        mode = self.cfg.listen_unix_mode
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            # A stale socket file from an earlier run is replaced; anything else is refused.
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(
                    f"listen unix {path}: bind: file exists and is not a socket", stream="stderr"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if probe.connect_ex(path) == 0:
                    raise ConfigError(
                        f"listen unix {path}: bind: address already in use", stream="stderr"
                    )
            finally:
                probe.close()
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            sock.listen(socket.SOMAXCONN)
        except OSError as e:
            sock.close()
            reason = os.strerror(e.errno).lower() if e.errno else str(e)
            raise ConfigError(f"listen unix {path}: bind: {reason}", stream="stderr") from None
        self._unix_paths.append(path)
        sock.setblocking(False)
        return sock

    async def run(self) -> None:
        """Serve until stopped (signal or stop()); returns when every socket is closed."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._relay = Relay(
            loop,
            self._on_finished,
            engine_cls=self.engine_cls,
            bufsize=self.cfg.buffer_size,
            on_native=self._on_native if NATIVE_ACCEPT else None,
        )
        self._relay.aggregate = not self.log.enabled("debug")
        self._native = self._relay.native
        try:
            self._reserve_spare_fd()
            self._sync_native()
            self._start_accepting()
            self._spawn(self._monitor())
            if self._native:
                self._spawn(self._native_upkeep())
            self._install_signals()
            self.ready = True
            self.log.info(
                "ready to proxy client requests",
                endpoints=[r.addr for r in self.balancer.remotes],
                **{
                    "listen-addrs": [_sock_name(s) for s in self.listeners],
                    # who accepts and connects clients: the engine's relay thread (native
                    # accept, Cython) or the asyncio loop
                    "accept": "relay-thread" if self._native else "loop",
                },
            )
            await self._done
        finally:
            self._teardown()

    # --- accept ------------------------------------------------------------------------

    def _start_accepting(self) -> None:
        assert self._loop is not None
        if self._accepting or self._draining:
            return
        for s in self.listeners:
            if self._native and self._relay is not None:
                tcp = s.family != socket.AF_UNIX
                if tcp:
                    self._listener_tuned(s)  # the engine checks the clients against it
                self._relay.listen(s.fileno(), tcp)
            else:
                self._loop.add_reader(s.fileno(), self._on_accept, s)
        self._accepting = True

    def _stop_accepting(self) -> None:
        if not self._accepting or self._loop is None:
            return
        for s in self.listeners:
            if self._native and self._relay is not None:
                self._relay.unlisten(s.fileno())
            else:
                self._loop.remove_reader(s.fileno())
        self._accepting = False

    def _on_accept(self, lsock: socket.socket) -> None:
        # A TCP client needs tuning unless it inherited the listener's options (see below).
        tune = lsock.family != socket.AF_UNIX and not self._listener_tuned(lsock)
        for _ in range(ACCEPT_BATCH):
            if self.cfg.max_connections and self.active_connections() >= self.cfg.max_connections:
                # Leave further clients in the kernel's backlog until a connection ends.
                self._stop_accepting()
                return
            try:
                client, _ = lsock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.counters.accept_errors += 1
                if e.errno in ACCEPT_PAUSE_ERRNOS:
                    shed = self._shed(lsock) if e.errno in ACCEPT_SHED_ERRNOS else 0
                    self._pause_accepting(e, shed)
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall), ...: that one client is gone.
                continue
            self._accept_pause = ACCEPT_PAUSE
            self.counters.accepted += 1
            client.setblocking(False)
            if tune:
                tune = self._tune_accepted(lsock, client)
            _Dial(self, client).start()

    def _reserve_spare_fd(self) -> None:
        if self._spare_fd < 0:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # out of fds already: try again at the next shortage

    def _shed(self, lsock: socket.socket) -> int:
        """Out of fds: close the clients waiting in the backlog; return how many.

        The spare fd is given up for a moment so accept() can take each waiting client, which
        is closed at once (as when no endpoint can be reached); then it is reserved again.
        """
        if self._spare_fd < 0:
            self._reserve_spare_fd()
            return 0
        os.close(self._spare_fd)
        self._spare_fd = -1
        n = 0
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    client, _ = lsock.accept()
                except OSError:
                    break  # EAGAIN: none left; EMFILE: another fd took the spare's place
                client.close()
                n += 1
        finally:
            self._reserve_spare_fd()
        self.counters.refused += n
        return n

    def _pause_accepting(self, e: OSError, closed: int = 0) -> None:
        """Out of fds or buffers: stop accepting briefly instead of exiting or spinning."""
        assert self._loop is not None
        self._stop_accepting()
        self.log.warn(
            "accept failed; pausing accept",
            error=str(e),
            pause=format_duration(self._accept_pause),
            **({"closed-clients": closed} if closed else {}),
        )
        delay = self._accept_pause
        self._accept_pause = min(self._accept_pause * 2, ACCEPT_PAUSE_MAX)

        def resume() -> None:
            self._pause_handle = None
            self._start_accepting()

        self._pause_handle = self._loop.call_later(delay, resume)

    @property
    def draining(self) -> bool:
        """True once a stop signal was received (no new clients are accepted)."""
        return self._draining

    def active_connections(self) -> int:
        return len(self.conns) + len(self.dials) + self._native_pending()

    def _native_pending(self) -> int:
        """Clients the engine accepted that the loop has not heard of yet."""
        if not self._native or self._relay is None:
            return 0
        return self._relay.native_pending()

    def _sockopts(self) -> list[tuple[int, int, int]]:
        """(level, option, value) for every TCP socket, for the current --tcp-keepalive."""
        ka = self.cfg.tcp_keepalive
        if self._sockopts_for != ka:
            opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            if ka:
                # Go dials and accepts with a 15 s keep-alive; we also bound the probe count
                # and unacknowledged data, so a dead peer is noticed within about 4 x this.
                secs = max(1, int(ka))
                opts += [
                    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
                    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, secs * 4000),
                ]
            self._sockopts_cache, self._sockopts_for = opts, ka
        return self._sockopts_cache

    def _tune(self, sock: socket.socket) -> None:
        for level, opt, value in self._sockopts():
            sock.setsockopt(level, opt, value)

    def _listener_tuned(self, lsock: socket.socket) -> bool:
        """Whether lsock's clients come out of accept() tuned already.

        Linux copies these options from the listening socket to the sockets it accepts, which
        saves six setsockopt calls per client. The listener is tuned for the current config
        (again after a reload changed it); the first client accepted after that is checked,
        and if it did not inherit them, every client is tuned by hand as before.
        """
        ka = self.cfg.tcp_keepalive
        state = self._listener_state.get(lsock)
        if state is not None and state[0] == ka:
            return state[1] is True
        opts = self._sockopts()
        try:
            for level, opt, value in (
                opts if ka else [*opts, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]
            ):
                lsock.setsockopt(level, opt, value)
        except OSError:
            self._listener_state[lsock] = (ka, False)
            return False
        self._listener_state[lsock] = (ka, None)  # None: not checked on a client yet
        return False

    def _tune_accepted(self, lsock: socket.socket, client: socket.socket) -> bool:
        """Tune an accepted TCP client unless it inherited the listener's options; return
        whether the following clients of this wake-up still need tuning."""
        state = self._listener_state.get(lsock)
        if state is not None and state[1] is None:
            opts = self._sockopts()
            try:
                inherited = all(client.getsockopt(lvl, opt) == v for lvl, opt, v in opts)
            except OSError:
                inherited = False
            self._listener_state[lsock] = (state[0], inherited)
            if inherited:
                return False
        self._tune(client)
        return True

    # --- connect -----------------------------------------------------------------------

    def cached_addrs(self, host: str) -> list[tuple[int, Any]] | None:
        """Socket addresses for host if known now (IP literal or fresh cache entry)."""
        hit = self._addr_cache.get(host)
        if hit is not None and (hit[0] == 0.0 or hit[0] > time.monotonic()):
            return hit[1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addrs: list[tuple[int, Any]] = [(fam, (host, 0))]
        self._addr_cache[host] = (0.0, addrs)
        return addrs

    async def resolve_addrs(self, host: str) -> list[tuple[int, Any]]:
        """Resolve host (through --discovery-dns when set) and cache it for RESOLVE_TTL.

        When the resolver fails but an earlier answer exists, that answer is used again (the
        "keep the last good answer" rule of HAProxy's `hold` and gobetween's `keeplast`): a
        DNS outage must not take down members that are still reachable.
        """
        try:
            addrs = await self._lookup(host)
        except (TimeoutError, OSError):
            stale = self._addr_cache.get(host)
            if stale is None:
                raise
            addrs = stale[1]
            self.log.debug("resolving failed; using the last good addresses", host=host)
        old = self._addr_cache.get(host)
        self._addr_cache[host] = (time.monotonic() + RESOLVE_TTL, addrs)
        if old is None or old[1] != addrs:
            self._sync_native()
        return addrs

    async def _lookup(self, host: str) -> list[tuple[int, Any]]:
        if self._resolve is not None:
            ips = await self._resolve(host)
            addrs: list[tuple[int, Any]] = [
                (socket.AF_INET6 if ":" in ip else socket.AF_INET, (ip, 0)) for ip in ips
            ]
        else:
            assert self._loop is not None
            infos = await self._loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            addrs = []
            for fam, _, _, _, sa in infos:
                if (fam, (sa[0], 0)) not in addrs:
                    addrs.append((fam, (sa[0], 0)))
        if not addrs:
            raise OSError(errno.EHOSTUNREACH, f"lookup {host}: no such host")
        return addrs

    def _start_relay(self, client: socket.socket, upstream: socket.socket, remote: Remote) -> None:
        assert self._relay is not None
        try:
            pid = self._relay.add(client.fileno(), upstream.fileno())
        except OSError as e:
            self.log.warn("failed to start relaying", address=remote.addr, error=str(e))
            client.close()
            upstream.close()
            return
        self.conns[pid] = Conn(client, upstream, remote)
        remote.connections_active += 1
        remote.connections_total += 1

    def refuse(self, client: socket.socket) -> None:
        """No endpoint could be reached: close the client (the Go gateway does too, silently)."""
        self.counters.refused += 1
        client.close()
        now = time.monotonic()
        if now - self._refuse_log_at >= 1.0:
            self.log.warn(
                "no endpoint available; closed client connection",
                suppressed=self._refuse_suppressed,
            )
            self._refuse_log_at = now
            self._refuse_suppressed = 0
        else:
            self._refuse_suppressed += 1
        self._maybe_resume()

    def deactivate(self, remote: Remote, error: str) -> None:
        if self.balancer.mark_down(remote, error, time.monotonic()):
            self.log.warn(
                "deactivated endpoint",
                address=remote.addr,
                interval=format_duration(self.retry_interval),
                error=error,
            )
            self._sync_native()

    def activate(self, remote: Remote) -> None:
        if self.balancer.mark_up(remote):
            self.log.info("activated", address=remote.addr)
            self._sync_native()

    # --- native accept -------------------------------------------------------------------

    def sync_endpoints(self) -> None:
        """Tell the engine about changed endpoint state (health verdicts, reload)."""
        self._sync_native()

    def _sync_native(self) -> None:
        """Mirror the balancer (order, priority, weight, usable, address) into the engine."""
        if not self._native or self._relay is None:
            return
        targets = []
        for r in self.balancer.remotes:
            self._tags[r.tag] = r
            ep = r.endpoint
            hit = self._addr_cache.get(ep.host)  # stale or not: the upkeep refreshes it
            addrs = hit[1] if hit is not None else self.cached_addrs(ep.host)
            fam: int = socket.AF_INET
            ip: str | None = None
            if addrs and "%" not in addrs[0][1][0]:  # scoped IPv6: dialled by _Dial
                fam, ip = addrs[0][0], addrs[0][1][0]
            targets.append((r.tag, int(fam), ip, ep.port, 0, 0, ep.priority, ep.weight, r.usable))
        # TCP_NODELAY at once; keep-alive only once a connection lived 1 s (the shortest
        # --tcp-keepalive: it cannot matter sooner, and short connections save 5 syscalls).
        opts = self._sockopts()
        now, late = opts[:1], opts[1:]
        state = (tuple(targets), tuple(opts), self.cfg.dial_timeout, self.cfg.max_connections)
        if state == self._native_state:
            return
        self._relay.set_targets(
            targets, now, self.cfg.dial_timeout, self.cfg.max_connections, late, 1.0
        )
        self._native_state = state
        if self._accepting:
            for s in self.listeners:
                if s.family != socket.AF_UNIX:
                    self._listener_tuned(s)  # after a reload changed --tcp-keepalive

    async def _native_upkeep(self) -> None:
        """Keep host names resolved for the engine (RESOLVE_TTL) and its state current."""
        while True:
            await asyncio.sleep(NATIVE_UPKEEP)
            for r in list(self.balancer.remotes):
                host = r.endpoint.host
                if self.cached_addrs(host) is None:
                    try:
                        await self.resolve_addrs(host)
                    except (TimeoutError, OSError):
                        pass  # no answer, none before: the engine hands such clients back
            self._sync_native()

    def _on_native(
        self,
        started: list[tuple[int, int]],
        failed: list[tuple[int, int, int]],
        paused: list[tuple[int, int]],
        accepted: int,
        accept_errors: int,
        short: list[tuple[int, int, int, int, int]],
    ) -> None:
        """What the engine's relay thread accepted, connected and could not connect.

        short: pairs that started and finished between two reports, summed per remote
        (pairs, bytes up, bytes down, resets): per-connection Python work for the churn
        case is gone. Not used at --log-level=debug, which logs each connection.
        """
        if accepted:
            self.counters.accepted += accepted
            self._accept_pause = ACCEPT_PAUSE
        self.counters.accept_errors += accept_errors
        tags = self._tags
        if short:
            c = self.counters
            for tag, n, c2u, u2c, resets in short:
                remote = tags[tag]
                remote.connections_total += n
                remote.bytes_to_endpoint += c2u
                remote.bytes_from_endpoint += u2c
                c.finished += n
                c.reset += resets
                c.bytes_finished[0] += c2u
                c.bytes_finished[1] += u2c
            self._maybe_resume()
        for pid, tag in started:
            remote = tags[tag]
            self.conns[pid] = Conn(None, None, remote)
            remote.connections_active += 1
            remote.connections_total += 1
        for cfd, tag, err in failed:
            client = socket.socket(fileno=cfd)
            client.setblocking(False)
            self._native_failed(client, tags.get(tag), err)
        for lfd, err in paused:
            lsock = next((s for s in self.listeners if s.fileno() == lfd), None)
            if lsock is None or not self._accepting:
                continue  # closed or stopped meanwhile
            shed = self._shed(lsock) if err in ACCEPT_SHED_ERRNOS else 0
            self._pause_accepting(OSError(err, os.strerror(err)), shed)

    def _native_failed(self, client: socket.socket, remote: Remote | None, err: int) -> None:
        """Take over a client the engine could not connect (see Engine.collect)."""
        if remote is None:
            if err:
                self.refuse(client)  # no socket for the dial: not an endpoint's fault
            else:
                _Dial(self, client).start()  # nothing usable: the fallback round
            return
        if remote.removed:
            _Dial(self, client).start()
            return
        if err == 0:
            _Dial(self, client).start_with(remote)  # no address yet: resolve, then dial
            return
        ep = remote.endpoint
        hit = self._addr_cache.get(ep.host)
        addrs = list(hit[1]) if hit is not None else []
        if err == errno.ETIMEDOUT:
            # The whole dial (every address of the endpoint) shares one --dial-timeout.
            _Dial(self, client).resume(remote, [], f"dial tcp {ep.addr}: i/o timeout")
            return
        ip = addrs[0][1][0] if addrs else ""
        _Dial(self, client).resume(remote, addrs[1:], dial_error(ep, ip, err))

    @property
    def retry_interval(self) -> float:
        # etcd tcpproxy.Run: a MonitorInterval of 0 means 5 minutes.
        return self.cfg.retry_delay if self.cfg.retry_delay > 0 else 300.0

    # --- finish ------------------------------------------------------------------------

    def _on_finished(self, pid: int, c2u: int, u2c: int, err: int) -> None:
        conn = self.conns.pop(pid, None)
        if conn is None:
            return
        self._close_conn(conn, c2u, u2c, err)
        self._maybe_resume()

    def _close_conn(self, conn: Conn, c2u: int, u2c: int, err: int) -> None:
        remote = conn.remote
        remote.connections_active -= 1
        remote.bytes_to_endpoint += c2u
        remote.bytes_from_endpoint += u2c
        self.counters.finished += 1
        self.counters.bytes_finished[0] += c2u
        self.counters.bytes_finished[1] += u2c
        if err:
            self.counters.reset += 1
        if conn.client is not None and conn.upstream is not None:
            if err:
                # Pass a reset on as a reset: close with SO_LINGER 0 sends RST, not FIN.
                for s in (conn.client, conn.upstream):
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    except OSError:
                        pass
            conn.client.close()
            conn.upstream.close()
        # else the engine's own pair: it closed both sockets already (or in remove())
        if self.log.enabled("debug"):
            self.log.debug(
                "connection closed",
                address=remote.addr,
                sent=c2u,
                received=u2c,
                error=os.strerror(err) if err else "",
                duration=format_duration(round(time.monotonic() - conn.started, 6)),
            )

    def _maybe_resume(self) -> None:
        if self._draining:
            if not self.conns and not self.dials and not self._native_pending():
                self._finish()
            return
        if (
            not self._accepting
            and self._pause_handle is None
            and self._loop is not None
            and (
                not self.cfg.max_connections or self.active_connections() < self.cfg.max_connections
            )
        ):
            self._start_accepting()

    # --- monitor (re-probe inactive endpoints every --retry-delay) ----------------------

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            remotes = self.balancer.inactive()
            if remotes:
                await asyncio.gather(*(self._probe(r) for r in remotes))

    async def _probe(self, remote: Remote) -> None:
        try:
            await self.probe_connect(remote.endpoint)
        except OSError as e:
            remote.last_error = str(e)
            self.log.warn(
                "failed to activate endpoint (stay inactive for another interval)",
                address=remote.addr,
                interval=format_duration(self.retry_interval),
                error=str(e),
            )
            return
        if not remote.removed:
            self.activate(remote)

    async def probe_connect(self, ep: Endpoint) -> None:
        """A TCP connect to ep within --dial-timeout, closed at once.

        Raises:
            OSError: the dial error, in Go's words where it matters.
        """
        loop = asyncio.get_running_loop()
        addrs = self.cached_addrs(ep.host) or await self.resolve_addrs(ep.host)
        last: OSError | None = None
        deadline = loop.time() + self.cfg.dial_timeout
        for fam, sa in addrs:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await asyncio.wait_for(
                    loop.sock_connect(s, (sa[0], ep.port, *sa[2:])),
                    max(0.001, deadline - loop.time()),
                )
                return
            except TimeoutError:
                last = OSError(errno.ETIMEDOUT, f"dial tcp {ep.addr}: i/o timeout")
            except OSError as e:
                last = OSError(e.errno, dial_error(ep, sa[0], e.errno or 0))
            finally:
                s.close()
        assert last is not None
        raise last

    # --- endpoints, signals, shutdown -----------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint set: new ones get clients, removed ones keep their live ones."""
        added, removed = self.balancer.set_endpoints(endpoints)
        self._sync_native()
        if added or removed:
            self.log.info(
                "endpoints updated",
                added=[r.addr for r in added],
                removed=[r.addr for r in removed],
                endpoints=[r.addr for r in self.balancer.remotes],
            )

    def _install_signals(self) -> None:
        assert self._loop is not None
        try:
            self._loop.add_signal_handler(signal.SIGTERM, self.stop)
            self._loop.add_signal_handler(signal.SIGINT, self.stop)
            self._loop.add_signal_handler(signal.SIGHUP, self._sighup)
        except (RuntimeError, ValueError):
            pass  # not the main thread (tests run gateways in threads): no signals there

    def _sighup(self) -> None:
        if self.on_sighup is not None:
            self.on_sighup()

    def stop(self) -> None:
        """First call: drain (stop accepting, wait up to --drain-timeout). Second: stop now."""
        if self._done is None or self._done.done():
            return
        if self._draining:
            self.log.warn("second stop signal; closing all connections now")
            self._finish()
            return
        self._draining = True
        self._stop_accepting()
        self.close_listeners()
        if self._relay is not None:
            self._relay.poll()  # clients the engine accepted before it stopped accepting
        for cb in self.on_stop:
            cb()
        try:
            systemd.notify("STOPPING=1")
        except OSError:
            pass
        timeout = self.cfg.drain_timeout
        n = self.active_connections()
        self.log.info(
            "stopping; draining connections",
            connections=n,
            timeout=format_duration(timeout),
        )
        if n == 0:
            self._finish()
            return
        assert self._loop is not None
        self._drain_handle = self._loop.call_later(timeout, self._drain_deadline)

    def _drain_deadline(self) -> None:
        self.log.warn("drain timeout; closing remaining connections", connections=len(self.conns))
        self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def close_listeners(self) -> None:
        for s in self.listeners:
            if self._loop is not None and self._accepting:
                try:
                    if self._native and self._relay is not None:
                        self._relay.unlisten(s.fileno())
                    else:
                        self._loop.remove_reader(s.fileno())
                except (ValueError, OSError):
                    pass
            s.close()
        self._accepting = False
        self.listeners = []
        for p in self._unix_paths:
            try:
                os.unlink(p)
            except OSError:
                pass
        self._unix_paths = []

    def _teardown(self) -> None:
        """Close everything this gateway owns, exactly once."""
        self.close_listeners()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        for h in (self._pause_handle, self._drain_handle):
            if h is not None:
                h.cancel()
        for t in list(self._tasks):
            t.cancel()
        for d in list(self.dials):
            d.abort()
        if self._relay is not None:
            self._relay.poll()  # pairs the engine started or finished since the last wake-up
            for pid in list(self.conns):
                try:
                    _, c2u, u2c, _ = self._relay.remove(pid)
                except KeyError:  # finished by the relay thread just now: unregistered
                    c2u = u2c = 0
                self._close_conn(self.conns.pop(pid), c2u, u2c, 0)
            for d in list(self.dials):
                d.abort()  # clients of failed native dials collected by the poll above
            self._relay.close()
            self._relay = None
        if self._loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                try:
                    self._loop.remove_signal_handler(sig)
                except (RuntimeError, ValueError):
                    pass

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a background coroutine for the gateway's lifetime (cancelled at teardown)."""
        return self._spawn(coro)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("background task failed", error=repr(t.exception()))

        task.add_done_callback(done)
        return task

    def totals(self) -> tuple[int, int]:
        """Bytes (client->endpoint, endpoint->client) over all connections, live included."""
        if self._relay is None:
            b = self.counters.bytes_finished
            return b[0], b[1]
        return self._relay.totals()

    def collect_now(self) -> None:
        """Take in what the engine has to report now (started and finished pairs), so
        counters read right after are current (the relay thread batches its reports)."""
        if self._relay is not None:
            self._relay.poll()

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """Per relayed pair, the bytes moved so far (for per-endpoint status)."""
        if self._relay is None:
            return {}
        # (The engine answers stats() for a pair that finished but was not collected yet.)
        return {pid: self._relay.stats(pid) for pid in self.conns}


class _Dial:
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
        self.addrs: list[tuple[int, Any]] = []
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

    def resume(self, remote: Remote, addrs: list[tuple[int, Any]], error: str) -> None:
        """Go on with a dial the engine started: its first address failed with error."""
        gw = self.gw
        assert gw._loop is not None
        gw.dials.add(self)
        self.remote = remote
        self.deadline = gw._loop.time() + gw.cfg.dial_timeout
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
                gw.dials.discard(self)
                gw.refuse(self.client)
                return
            remote = self.fallback.pop(0)
        self._dial_remote(remote)

    def _dial_remote(self, remote: Remote) -> None:
        gw = self.gw
        self.remote = remote
        assert gw._loop is not None
        self.deadline = gw._loop.time() + gw.cfg.dial_timeout
        addrs = gw.cached_addrs(remote.endpoint.host)
        if addrs is None:
            self.task = gw._loop.create_task(self._resolve_then_connect(remote))
            return
        self.addrs = list(addrs)
        self._connect_next()

    async def _resolve_then_connect(self, remote: Remote) -> None:
        try:
            self.addrs = list(await self.gw.resolve_addrs(remote.endpoint.host))
        except (TimeoutError, OSError) as e:
            self.task = None
            self._failed(f"dial tcp {remote.addr}: lookup {remote.endpoint.host}: {e}")
            return
        self.task = None
        self._connect_next()

    def _connect_next(self) -> None:
        gw = self.gw
        remote = self.remote
        assert remote is not None and gw._loop is not None
        if not self.addrs:
            self._failed(self.error or f"dial tcp {remote.addr}: no address")
            return
        fam, sa = self.addrs.pop(0)
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            # Out of fds: this client cannot be served now; do not blame the endpoint.
            self.error = f"dial tcp {remote.addr}: {e.strerror}"
            gw.dials.discard(self)
            gw.refuse(self.client)
            return
        gw._tune(sock)
        target = (sa[0], remote.endpoint.port, *sa[2:])
        err = sock.connect_ex(target)
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
        gw._loop.add_writer(sock.fileno(), self._on_writable)
        self.timer = gw._loop.call_at(self.deadline, self._on_timeout)

    def _on_writable(self) -> None:
        sock, remote = self.sock, self.remote
        assert sock is not None and remote is not None and self.gw._loop is not None
        self.gw._loop.remove_writer(sock.fileno())
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
        assert sock is not None and remote is not None and self.gw._loop is not None
        self.timer = None
        self.gw._loop.remove_writer(sock.fileno())
        sock.close()
        self.sock = None
        # The whole dial (every address of the endpoint) shares one --dial-timeout.
        self.addrs = []
        self._failed(f"dial tcp {remote.addr}: i/o timeout")

    def _failed(self, error: str) -> None:
        remote = self.remote
        assert remote is not None
        self.gw.deactivate(remote, error)
        self.error = ""
        self._next_remote()

    def _connected(self) -> None:
        gw, sock, remote = self.gw, self.sock, self.remote
        assert sock is not None and remote is not None
        gw.dials.discard(self)
        self.sock = None
        if remote.removed:
            pass  # a refresh removed it while we dialled; this client may still use it
        elif not remote.active:
            gw.activate(remote)
        gw._start_relay(self.client, sock, remote)

    def abort(self) -> None:
        """Shutdown: give up this client now."""
        loop = self.gw._loop
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            if loop is not None:
                loop.remove_writer(self.sock.fileno())
            self.sock.close()
        self.client.close()
        self.gw.dials.discard(self)


def dial_error(ep: Endpoint, ip: str, err: int) -> str:
    """Go's dial error text: `dial tcp 127.0.0.1:2379: connect: connection refused`."""
    where = format_addr(ip, ep.port) if ip else ep.addr
    return f"dial tcp {where}: connect: {os.strerror(err).lower()}"


def _sock_name(s: socket.socket) -> str:
    if s.family == socket.AF_UNIX:
        return f"unix://{s.getsockname()}"
    name = s.getsockname()
    return format_addr(name[0], name[1])


def _engine_name(cls: type[Any]) -> str:
    return "cython" if cls.__module__ == "etcdgw._relay" else "python"
