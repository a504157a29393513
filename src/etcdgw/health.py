"""Active etcd health checks (--health-check=etcd): GET /health on every endpoint, damped.

# Strategy:
The Go gateway only re-probes *inactive* endpoints with a TCP connect (monitor.py's Monitor
keeps doing that); a member that accepts TCP but has no leader keeps getting clients there.
With --health-check=etcd every endpoint is also asked etcd's own `GET /health` every
--health-interval, one request in flight per endpoint, all endpoints concurrently. The
verdict is damped like HAProxy's rise/fall: `record_check()` is the whole decision, a pure
function over a `Remote`, so it is tested without sockets or clocks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .balancer import Remote
from .config import Config, ConfigError, Endpoint
from .dial import SELF_DIAL
from .goerrors import IO_TIMEOUT, dial_failed
from .httpclient import HttpError, request
from .tls import client_context, error_text

if TYPE_CHECKING:
    from .balancer import Balancer
    from .dial import OwnAddresses
    from .log import Logger
    from .monitor import Monitor
    from .resolver import AddressBook
    from .settings import Settings

__all__ = [
    "HealthChecker",
    "check_endpoint",
    "judge_response",
    "record_check",
    "tls_context",
]


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
    """The client context for checks (and member-list syncs) of https endpoints.

    Trusts --trusted-ca-file (the system store if empty) and presents --health-cert-file /
    --health-key-file when given: members run with --client-cert-auth refuse anonymous
    clients, /health included.

    Raises:
        ConfigError: an unreadable CA file, certificate or key (stderr).
    """
    return client_context(cfg.trusted_ca_file, cfg.health_cert_file, cfg.health_key_file)


async def check_endpoint(
    ep: Endpoint,
    addrs: Sequence[tuple[int, Any]],
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
                why = IO_TIMEOUT if isinstance(e, TimeoutError) else error_text(e)
                error = f"lookup {ep.host}: {why}"
            else:
                # Never through the gateway itself (a name that now resolves to it).
                addrs = [a for a in addrs if not self.own.dials_self(a[1][0], ep.port)]
                if addrs:
                    error = await check_endpoint(ep, addrs, timeout=timeout, ssl_context=ctx)
                else:
                    error = dial_failed(ep.addr, SELF_DIAL)
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
