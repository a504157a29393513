"""Active etcd health checks (--health-check=etcd): GET /health on every endpoint, damped.

# Strategy:
The Go gateway only re-probes *inactive* endpoints with a TCP connect (server.py's monitor
keeps doing that); a member that accepts TCP but has no leader keeps getting clients there.
With --health-check=etcd every endpoint is also asked etcd's own `GET /health` every
--health-interval, one request in flight per endpoint, all endpoints concurrently. The
verdict is damped like HAProxy's rise/fall: `record_check()` is the whole decision, a pure
function over a `Remote`, so it is tested without sockets or clocks.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .balancer import Remote
from .config import Config, ConfigError, Endpoint, format_addr, format_duration
from .dial import SELF_DIAL

if TYPE_CHECKING:
    from .balancer import Balancer
    from .dial import OwnAddresses
    from .log import Logger
    from .monitor import Monitor
    from .resolver import AddressBook
    from .settings import Settings

__all__ = [
    "HealthChecker",
    "HttpError",
    "check_endpoint",
    "judge_response",
    "record_check",
    "request",
    "tls_context",
]

# A health answer is a few dozen bytes; anything bigger is not etcd's /health.
MAX_RESPONSE = 64 * 1024  # longest status or header line
MAX_BODY = 4096  # body bytes read and judged; the rest of a longer (or endless) body is not read


# --- decision (pure) --------------------------------------------------------------------------


def record_check(remote: Remote, error: str, *, rise: int, fall: int) -> bool | None:
    """Record one check result on remote (its check counters) and apply rise/fall damping.

    The verdict itself (`remote.healthy`) is the Balancer's: the caller sets a new one
    with `Balancer.set_healthy`.

    Args:
        error: "" when the check passed, else why it failed.
        rise: consecutive passes that make an unhealthy remote healthy again.
        fall: consecutive failures that make a healthy remote unhealthy.

    Returns:
        The new verdict when this result changes `remote.healthy`, else None.
    """
    if not error:
        remote.health_ok_total += 1
        remote.checks_ok += 1
        remote.checks_failed = 0
        if not remote.healthy and remote.checks_ok >= rise:
            return True
        return None
    remote.health_failed_total += 1
    remote.last_health_error = error
    remote.checks_failed += 1
    remote.checks_ok = 0
    if remote.healthy and remote.checks_failed >= fall:
        return False
    return None


def judge_response(status: int, reason: str, body: bytes) -> str:
    """The empty string when an etcd /health answer means healthy, else why it does not.

    etcd 3.4 answers 200 `{"health":"true"}` and 503 `{"health":"false"}` (later 3.4 and
    3.5 add `"reason"`); only a 200 whose `health` is true counts.
    """
    text = body.decode("utf-8", "replace").strip()
    shown = text if len(text) <= 200 else text[:200] + "..."
    try:
        doc: Any = json.loads(text)
    except ValueError:
        doc = None
    health = doc.get("health") if isinstance(doc, dict) else None
    if status == 200 and health in ("true", True):
        return ""
    if status == 200:
        return f"unhealthy: {shown}" if health is not None else f"unexpected answer: {shown!r}"
    return f"{status} {reason}: {shown}".rstrip(": ")


# --- one check (I/O) -------------------------------------------------------------------------


def tls_context(cfg: Config) -> ssl.SSLContext:
    """The client context for checks of https endpoints.

    Trusts --trusted-ca-file (the system store if empty) and presents --health-cert-file /
    --health-key-file when given: members run with --client-cert-auth refuse anonymous
    clients, /health included.

    Raises:
        ConfigError: an unreadable CA file, certificate or key (stderr).
    """
    try:
        ctx = ssl.create_default_context(cafile=cfg.trusted_ca_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"failed to load trusted CA file {cfg.trusted_ca_file}: {_reason(e)}",
            stream="stderr",
        ) from None
    if cfg.health_cert_file:
        try:
            ctx.load_cert_chain(cfg.health_cert_file, cfg.health_key_file or None)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"failed to load --health-cert-file {cfg.health_cert_file}: {_reason(e)}",
                stream="stderr",
            ) from None
    return ctx


async def check_endpoint(
    ep: Endpoint,
    addrs: list[tuple[int, Any]],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> str:
    """GET /health on ep, trying its addresses in order, all within timeout.

    Args:
        addrs: (family, sockaddr) pairs as from AddressBook.resolve (port ignored).
        ssl_context: used when ep.secure; None checks https endpoints without TLS.

    Returns:
        "" when healthy, else the error (`GET https://host:port/health: ...`).
    """
    url = f"{'https' if ep.secure and ssl_context else 'http'}://{ep.addr}/health"
    try:
        status, reason, body = await request(ep, addrs, timeout=timeout, ssl_context=ssl_context)
    except HttpError as e:
        return str(e)
    error = judge_response(status, reason, body)
    return f"GET {url}: {error}" if error else ""


class HttpError(Exception):
    """A request that got no HTTP answer, worded like Go's client: `GET url: reason`."""


async def request(
    ep: Endpoint,
    addrs: list[tuple[int, Any]],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    method: str = "GET",
    path: str = "/health",
    body: bytes = b"",
    max_body: int = MAX_BODY,
) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request to ep (https when ep.secure and ssl_context), all within timeout.

    Shared by the health checks (GET /health) and membership.py (POST member list).

    Returns:
        (status, reason, body), body cut at max_body bytes (the rest is not read).

    Raises:
        HttpError: no answer (dial, TLS, timeout, malformed response), with the reason.
    """
    url = f"{'https' if ep.secure and ssl_context else 'http'}://{ep.addr}{path}"
    where = f"{method} {url}"
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(
                ep,
                addrs,
                ssl_context if ep.secure else None,
                method=method,
                path=path,
                body=body,
                max_body=max_body,
            )
    except TimeoutError:
        raise HttpError(f"{where}: i/o timeout ({format_duration(timeout)})") from None
    except ssl.SSLError as e:
        raise HttpError(f"{where}: tls: {_reason(e)}") from None
    except _BadResponse as e:
        raise HttpError(f"{where}: malformed response: {e}") from None
    except _DialError as e:
        raise HttpError(f"{where}: {e.strerror}") from None
    except OSError as e:
        raise HttpError(f"{where}: {_reason(e)}") from None


class _BadResponse(Exception):
    """Not an HTTP/1.x response we can read."""


class _DialError(OSError):
    """A failed connect, already worded like Go's dial errors."""


async def _fetch(
    ep: Endpoint,
    addrs: list[tuple[int, Any]],
    ctx: ssl.SSLContext | None,
    *,
    method: str,
    path: str,
    body: bytes,
    max_body: int,
) -> tuple[int, str, bytes]:
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    writer: asyncio.StreamWriter | None = None
    last: OSError | None = None
    try:
        for fam, sa in addrs:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await loop.sock_connect(s, (sa[0], ep.port, *sa[2:]))
            except OSError as e:
                s.close()
                reason = os.strerror(e.errno).lower() if e.errno else str(e)
                where = format_addr(sa[0], ep.port)
                last = _DialError(e.errno or errno.EIO, f"dial tcp {where}: connect: {reason}")
                continue
            except BaseException:
                s.close()
                raise
            sock = s
            break
        if sock is None:
            raise last or _DialError(errno.EHOSTUNREACH, f"dial tcp {ep.addr}: no address")
        reader, writer = await asyncio.open_connection(
            sock=sock,
            ssl=ctx,
            # SNI and certificate check against the endpoint's own name, not the IP dialled.
            server_hostname=ep.host if ctx is not None else None,
            limit=MAX_RESPONSE,
        )
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {ep.addr}\r\nUser-Agent: etcdgw/{__version__}\r\n"
            f"Accept: application/json\r\n{extra}Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        return await _read_response(reader, max_body)
    finally:
        if writer is not None:
            # abort, not close: no TLS close_notify round trip to wait for.
            writer.transport.abort()
        if sock is not None:
            sock.close()


async def _read_response(
    reader: asyncio.StreamReader, max_body: int = MAX_BODY
) -> tuple[int, str, bytes]:
    try:
        line = await reader.readline()
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(repr(line[:80]) if line else "empty")
        status, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
        length: int | None = None
        chunked = False
        for _ in range(100):
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length" and value.isdigit():
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        else:
            raise _BadResponse("too many header lines")
        # At most max_body bytes, appended to one buffer (a hostile member sending endless
        # 1-byte chunks costs a bounded, linear read, not a quadratic one per check).
        body = bytearray()
        if chunked:
            while len(body) < max_body:
                size_line = (await reader.readline()).split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise _BadResponse("bad chunk size") from None
                if size <= 0:
                    break
                want = min(size, max_body - len(body))
                body += await reader.readexactly(want)
                if want < size:
                    break  # enough to judge; the rest is not read
                await reader.readline()
        elif length is not None:
            body += await reader.readexactly(min(length, max_body))
        else:
            while len(body) < max_body:  # up to the end of the stream (read() stops sooner)
                chunk = await reader.read(max_body - len(body))
                if not chunk:
                    break
                body += chunk
    except (asyncio.LimitOverrunError, ValueError):
        raise _BadResponse("response too large") from None
    except asyncio.IncompleteReadError:
        raise _BadResponse("connection closed mid-response") from None
    return status, reason, bytes(body)


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        text = str(e.args[1]) if len(e.args) > 1 else str(e)
        # "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)"
        text = text.split("] ", 1)[-1]
        return text.rsplit(" (_ssl.c:", 1)[0]
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


# --- the checker ------------------------------------------------------------------------------


class HealthChecker:
    """Checks every endpoint (not removed) every --health-interval while the gateway runs.

    Args:
        settings: the configuration in force, read at each round, so a SIGHUP reload
            takes effect at the next round; with --health-check other than etcd the
            checker idles (and gives back clients to endpoints it had taken out).
        balancer: the endpoints checked, and the one owner of their verdict.
        addresses: the endpoints' host names, resolved as on the connect path.
        own: where the gateway listens: never checked through itself.
        monitor: reactivates a dial-failed endpoint that answers /health.
        log: verdict changes.

    Raises (from __init__):
        ConfigError: --health-check=etcd and the TLS files cannot be loaded (tls_context).
    """

    def __init__(
        self,
        settings: Settings,
        balancer: Balancer,
        addresses: AddressBook,
        own: OwnAddresses,
        monitor: Monitor,
        log: Logger,
    ) -> None:
        self.settings = settings
        self.balancer = balancer
        self.addresses = addresses
        self.own = own
        self.monitor = monitor
        self.log = log
        self._inflight: dict[Remote, asyncio.Task[None]] = {}
        self._tls_files: tuple[str, str, str] | None = None
        self._ssl: ssl.SSLContext | None = None
        if settings.cfg.health_check == "etcd":
            self._ssl_context()

    @property
    def enabled(self) -> bool:
        return self.settings.cfg.health_check == "etcd"

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the current config; rebuilt when its files change.

        Raises:
            ConfigError: on the first build only; later a reload's bad files are logged and
                the previous context is kept.
        """
        cfg = self.settings.cfg
        files = (cfg.trusted_ca_file, cfg.health_cert_file, cfg.health_key_file)
        if files != self._tls_files:
            try:
                self._ssl = tls_context(cfg)
            except ConfigError as e:
                if self._tls_files is None:
                    raise
                self.log.error("health checks keep their previous TLS settings", error=e.message)
            self._tls_files = files
        return self._ssl

    async def run(self) -> None:
        """Check at a fixed rate until cancelled; a slow endpoint skips its turn, not others."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = loop.time() + self.settings.cfg.health_interval
                self.tick()
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            for task in list(self._inflight.values()):
                task.cancel()

    def tick(self) -> None:
        """Start one check for every endpoint that has none in flight."""
        if not self.enabled:
            self._release()
            return
        try:
            ctx = self._ssl_context()
        except ConfigError as e:
            # Only when the checker was built idle and a reload turned it on.
            self.log.error("health checks of TLS endpoints cannot run", error=e.message)
            ctx = None
        for remote in self.balancer.remotes:
            if remote.removed or remote in self._inflight:
                continue
            task = asyncio.ensure_future(self._check(remote, ctx))
            self._inflight[remote] = task
            task.add_done_callback(functools.partial(self._done, remote))

    def _release(self) -> None:
        """Checks turned off by a reload: nothing may stay out on an old verdict."""
        for remote in self.balancer.remotes:
            remote.checks_ok = remote.checks_failed = 0
            if self.balancer.set_healthy(remote, True):
                self.log.info("endpoint healthy", address=remote.addr, reason="checks off")

    def _done(self, remote: Remote, task: asyncio.Task[None]) -> None:
        if self._inflight.get(remote) is task:
            del self._inflight[remote]
        if not task.cancelled() and task.exception() is not None:
            self.log.error(
                "health check failed unexpectedly",
                address=remote.addr,
                error=repr(task.exception()),
            )

    async def _check(self, remote: Remote, ctx: ssl.SSLContext | None) -> None:
        ep = remote.endpoint
        timeout = self.settings.cfg.dial_timeout
        if ep.secure and ctx is None:
            error = f"GET https://{ep.addr}/health: no TLS settings"
        else:
            try:
                addrs = await asyncio.wait_for(self.addresses.resolve(ep.host), timeout)
            except (TimeoutError, OSError) as e:
                why = "i/o timeout" if isinstance(e, TimeoutError) else _reason(e)
                error = f"lookup {ep.host}: {why}"
            else:
                # Never through the gateway itself (a name that now resolves to it).
                addrs = [a for a in addrs if not self.own.dials_self(a[1][0], ep.port)]
                if addrs:
                    error = await check_endpoint(ep, addrs, timeout=timeout, ssl_context=ctx)
                else:
                    error = f"dial tcp {ep.addr}: {SELF_DIAL}"
        if self.enabled:
            self.apply(remote, error)

    def apply(self, remote: Remote, error: str) -> None:
        """Record one result, log a change of verdict, reactivate a dial-failed endpoint."""
        if remote.removed:
            return
        cfg = self.settings.cfg
        changed = record_check(remote, error, rise=cfg.health_rise, fall=cfg.health_fall)
        if changed is not None:
            self.balancer.set_healthy(remote, changed)  # raises the change signal
        if error:
            self.log.debug("health check failed", address=remote.addr, error=error)
        elif not remote.active:
            # It answered etcd's /health: it accepts connections again, sooner than the
            # next --retry-delay re-probe would find out.
            self.monitor.activate(remote)
        if changed is False:
            self.log.warn(
                "endpoint unhealthy",
                address=remote.addr,
                error=error,
                failures=remote.checks_failed,
            )
        elif changed is True:
            self.log.info("endpoint healthy", address=remote.addr, passes=remote.checks_ok)
