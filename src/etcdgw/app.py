"""Start-up in the Go gateway's order (gateway.go startGateway), serving, and SIGHUP reload.

1. discovery (SRV) when --discovery-srv is set; both lookups failing is fatal
2. fall back to --endpoints when nothing was discovered
3. parse endpoints (schema stripped, host:port required)
4. resolve every endpoint and the listen host; refuse self-pointing endpoints
5. `no endpoints found` when the list is empty
6. bind, notify systemd, log `ready to proxy client requests`, serve
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import systemd, upgrade
from ._version import __version__
from .config import (
    Config,
    ConfigError,
    Endpoint,
    check_self_loop,
    format_duration,
    is_loopback_host,
    parse_endpoints,
)
from .log import Logger
from .relay import IMPLEMENTATION, new_event_loop

_T = TypeVar("_T")

if TYPE_CHECKING:
    from .discovery import Refresher
    from .health import HealthChecker
    from .membership import Membership
    from .metrics import MetricsServer
    from .server import Gateway


# A reload (file, validation, DNS) runs in a thread; past this it fails and the running
# configuration stays. DNS lookups are bounded by their own timeouts (discovery.LOOKUP_TIMEOUT),
# so the abandoned thread ends soon after.
RELOAD_DEADLINE = 10.0

Reparse = Callable[[], tuple[Config, list[str]]]

# The pure engine relays inside the loop's own epoll_wait (relay.RelaySelector). False keeps
# it on an epoll of its own: bench/ compares the two (bench/launch.py sets it). Not a flag.
RELAY_SELECTOR = True


@dataclasses.dataclass
class Running:
    """What start-up produced: the gateway and its optional companions."""

    gw: Gateway
    refresher: Refresher | None = None
    metrics: MetricsServer | None = None
    health: HealthChecker | None = None
    refresher_task: asyncio.Task[None] | None = None
    membership: Membership | None = None
    # A live upgrade's new process: the channel to the old one (upgrade.py).
    successor: upgrade.Successor | None = None


def start(
    cfg: Config,
    raw_endpoints: Sequence[str],
    argv: Sequence[str],
    reparse: Reparse | None = None,
    signals: systemd.StartupSignals | None = None,
) -> int:
    """Run `etcdgw start` with a parsed Config. Returns the process exit code.

    Args:
        reparse: re-reads the command line and --config-file (SIGHUP); raises ConfigError.
        signals: the signal handlers cli.main installed (a SIGHUP seen is deferred; stray
            SIGUSR1/SIGUSR2/SIGALRM are logged here and, from serve() on, on the loop).

    Raises:
        systemd.Interrupted: SIGINT/SIGTERM before the gateway's loop took signals over
            (whatever start-up bound is closed first).
    """
    log = Logger(level=cfg.log_level, fmt=cfg.log_format)
    log.info("Running: ", args=list(argv))
    log.info("starting etcdgw", version=__version__, **{"relay-engine": IMPLEMENTATION})
    if signals is not None:
        signals.report(log)  # SIGUSR1/SIGUSR2/SIGALRM while the command line was read
    run: Running | None = None
    try:
        successor = upgrade.Successor.from_env(log)
        run = prepare(cfg, raw_endpoints, log, successor)
        factory = new_event_loop if RELAY_SELECTOR else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(run, reparse, signals))
    except ConfigError as e:
        stream = sys.stdout if e.stream == "stdout" else sys.stderr
        print(e.message, file=stream)
        stream.flush()
        return 1
    except systemd.Interrupted as e:
        log.info("stopped before ready", signal=e.name)
        return 0
    finally:
        if run is not None:  # both are idempotent: a no-op after a normal stop
            run.gw.close_listeners()
            if run.metrics is not None:
                run.metrics.close()
        if signals is not None:
            signals.report(log)  # those of start-up or shutdown, off the loop
    log.info("stopped")
    return 0


def resolve_endpoints(
    cfg: Config, raw_endpoints: Sequence[str], log: Logger
) -> tuple[tuple[Endpoint, ...], object | None]:
    """Steps 1-5: the endpoint list, and the discovery result (None without SRV).

    Raises:
        ConfigError: with the Go gateway's message and stream.
    """
    from . import discovery, resolver

    resolve_host = resolver.host_resolver(cfg)
    endpoints: tuple[Endpoint, ...] = ()
    discovered = None
    if cfg.discovery_srv:
        try:
            discovered = discovery.discover(cfg, log)
        except discovery.DiscoveryError as e:
            raise ConfigError(str(e), stream="stderr") from None
        endpoints = tuple(dataclasses.replace(ep, source="srv") for ep in discovered.endpoints)
    if not endpoints:
        # gateway.go: "no endpoints discovered, fall back to provided endpoints"
        endpoints = parse_endpoints(raw_endpoints)
    return checked(cfg, endpoints, resolve_host), discovered


def checked(
    cfg: Config, endpoints: tuple[Endpoint, ...], resolve_host: Callable[[str], list[str]]
) -> tuple[Endpoint, ...]:
    """Steps 4-5: refuse self-pointing endpoints and an empty list.

    Raises:
        ConfigError: with the Go gateway's message.
    """
    from .dial import is_local_ip

    check_self_loop(cfg.listen, endpoints, resolve_host, is_local=is_local_ip)
    if not endpoints:
        raise ConfigError("no endpoints found")
    return endpoints


def prepare(
    cfg: Config,
    raw_endpoints: Sequence[str],
    log: Logger,
    successor: upgrade.Successor | None = None,
) -> Running:
    """Steps 1-6 up to bound listeners (gateway and metrics).

    successor: this process takes over from a running one (live upgrade): once the
    configuration is valid, it receives that one's listeners and uses them instead of
    binding the same addresses.

    Raises:
        ConfigError: any start-up failure, with the message to print.
    """
    from . import discovery, resolver
    from .dial import is_local_ip
    from .server import Gateway

    endpoints, discovered = resolve_endpoints(cfg, raw_endpoints, log)
    resolve_host = resolver.host_resolver(cfg)
    for ls in cfg.listen:
        if ls.path is None and not is_loopback_host(ls.host, resolve_host):
            log.warn(
                "listening on a non-loopback address; etcdgw does not authenticate clients",
                address=ls.addr,
            )
    if cfg.listen_unix_mode & 0o002 and any(ls.path is not None for ls in cfg.listen):
        log.warn(
            "listen-unix-mode lets every local user connect to the unix socket, and so to etcd",
            mode=f"{cfg.listen_unix_mode:04o}",
        )
    cfg = dataclasses.replace(cfg, endpoints=endpoints)
    handed = successor.listeners() if successor is not None else {}
    metrics_sock = handed.pop(metrics_key(cfg.metrics_addr), None) if cfg.metrics_addr else None
    for key in [k for k in handed if k.startswith("metrics ")]:
        handed.pop(key).close()  # a metrics address the new configuration does not use
    gw = Gateway(
        cfg,
        log,
        inherited=systemd.listen_fds(),
        handed=handed,
    )
    try:
        gw.bind()
    except BaseException:
        if metrics_sock is not None:
            metrics_sock.close()
        raise
    run = Running(gw, successor=successor)
    try:
        if cfg.metrics_addr:
            from .metrics import MetricsServer

            run.metrics = MetricsServer(gw, cfg.metrics_addr, log)
            if metrics_sock is not None:
                metrics_sock.setblocking(False)
                run.metrics.sock = metrics_sock
            else:
                run.metrics.bind()
            if run.metrics.sock is not None:
                gw.own.add(run.metrics.sock.getsockname())
        from .health import HealthChecker

        # Built now so a bad --trusted-ca-file or health key is a start-up error. It reads
        # gw.cfg every round, so a reload can switch etcd checks on and off.
        run.health = HealthChecker(gw, log)
        if cfg.auto_sync_interval > 0:
            from .membership import Membership

            # The configured endpoints (or the SRV answer) are the seeds.
            run.membership = gw.membership = Membership(
                gw,
                log,
                endpoints,
                self_check=discovery.self_check_for(cfg, resolve_host, is_local=is_local_ip),
            )
    except BaseException:
        gw.close_listeners()
        if run.metrics is not None:
            run.metrics.close()
        raise
    if isinstance(discovered, discovery.Discovered):
        # Also when start-up fell back to --endpoints: once DNS or the certificates are
        # fixed, a refresh adopts the SRV set (the Go gateway never looks again).
        run.refresher = discovery.Refresher(
            cfg,
            log,
            discovered,
            srv_changed(run),
            self_check=discovery.self_check_for(cfg, resolve_host, is_local=is_local_ip),
        )
    return run


async def serve(
    run: Running, reparse: Reparse | None = None, signals: systemd.StartupSignals | None = None
) -> None:
    """Notify systemd, start the companions, and run the gateway until it stops."""
    gw = run.gw
    log = gw.log
    _bridge_signals(run)
    if signals is not None:
        # Ignored signals (SIGUSR1, SIGUSR2, SIGALRM) are logged on the loop from now on.
        signals.report(log, asyncio.get_running_loop())
    if run.metrics is not None:
        # Left open while draining, so /ready answers 503 then; closed when serving ends.
        await run.metrics.start()
    if run.refresher is not None:
        run.refresher_task = gw.spawn(run.refresher.run())
    if run.health is not None:
        gw.spawn(run.health.run())
    if run.membership is not None:
        gw.spawn(run.membership.run())
    gw.on_sighup = Reloader(run, reparse) if reparse and gw.cfg.config_file else _refresh_only(run)
    _live_upgrade(run)
    if signals is not None and signals.take_sighup():
        # SIGHUP during start-up: reload once ready (gw.run() takes the signals over).
        log.info("SIGHUP during start-up: reloading once ready")
        asyncio.get_running_loop().call_soon(gw.on_sighup)
    log.info("notifying init daemon")
    try:
        systemd.notify("READY=1")
        log.info("successfully notified init daemon")
    except OSError as e:
        log.error("failed to notify systemd for readiness", error=str(e))
    try:
        await gw.run()
    finally:
        if run.metrics is not None:
            run.metrics.close()


def metrics_key(addr: str) -> str:
    """How a live upgrade names the metrics listener (listeners go by --listen-addr)."""
    return f"metrics {addr}"


def _live_upgrade(run: Running) -> None:
    """SIGUSR2 starts a successor (upgrade.Old); a successor takes over once ready."""
    gw = run.gw

    def parts() -> upgrade.Parts | None:
        if not gw.ready:
            return None
        extra = {}
        if run.metrics is not None and run.metrics.sock is not None:
            extra[metrics_key(gw.cfg.metrics_addr)] = run.metrics.sock
        return gw.upgrade_parts(extra)

    successor = run.successor
    old = upgrade.Old(
        parts,
        done=gw.handed_over,
        taking_over=lambda: successor is not None and not successor.done,
    )
    gw.on_sigusr2 = old
    gw.defer_stop = old.defer_stop
    if successor is not None:

        def take_over() -> None:
            gw.spawn(successor.serve(gw.upgrade_parts(), gw.stop, gw.listening.claim_handed))

        gw.on_ready = take_over


def _bridge_signals(run: Running) -> None:
    """From the loop's start until gw.run() installs its own handlers, a signal is acted on
    once the gateway is ready: SIGTERM/SIGINT drain it (clients may already be relayed, so
    not the abrupt start-up exit), SIGHUP reloads. gw.run() then replaces these handlers."""
    loop = asyncio.get_running_loop()
    gw = run.gw

    def once_ready(action: Callable[[], None]) -> Callable[[], None]:
        def attempt() -> None:
            if gw.ready:
                action()
            else:
                loop.call_later(0.01, attempt)  # gw.run() is on its way; the loop ends with it

        return attempt

    def sighup() -> None:
        if gw.on_sighup is not None:
            gw.on_sighup()

    try:
        loop.add_signal_handler(signal.SIGTERM, once_ready(gw.stop))
        loop.add_signal_handler(signal.SIGINT, once_ready(gw.stop))
        loop.add_signal_handler(signal.SIGHUP, once_ready(sighup))
    except (RuntimeError, ValueError):
        pass  # not the main thread (tests run gateways in threads): no signals there


def notify(log: Logger, message: str) -> None:
    """sd_notify without blocking; a message that cannot be sent is dropped with a warning."""
    try:
        systemd.notify(message)
    except OSError as e:
        log.warn(
            "failed to notify systemd; message dropped",
            message=message.split("\n", 1)[0],
            error=str(e),
        )


def srv_changed(run: Running) -> Callable[[Sequence[Endpoint]], None]:
    """Where an SRV refresh's new set goes: the endpoints, or with --auto-sync-interval the
    seeds of the member list (the member list wins while syncs succeed)."""

    def on_change(endpoints: Sequence[Endpoint]) -> None:
        if run.membership is not None:
            run.membership.set_seeds(tuple(endpoints))
            run.membership.sync_now()
        else:
            run.gw.set_endpoints(endpoints, source="srv")

    return on_change


def _refresh_only(run: Running) -> Callable[[], None]:
    def on_sighup() -> None:
        if run.membership is not None:
            run.gw.log.info("SIGHUP: syncing the member list")
            run.membership.sync_now()
        if run.refresher is not None:
            run.gw.log.info("SIGHUP: refreshing SRV records")
            run.refresher.refresh_now()
        elif run.membership is None:
            run.gw.log.info("SIGHUP ignored: no --config-file and no --discovery-srv")

    return on_sighup


# Keys whose change makes a reload rediscover (and replace the SRV refresher).
_DISCOVERY_FIELDS = (
    "discovery_srv",
    "discovery_srv_name",
    "discovery_dns",
    "insecure_discovery",
    "trusted_ca_file",
    "discovery_refresh_min",
    "discovery_refresh_max",
)


@dataclasses.dataclass
class _Prepared:
    cfg: Config
    endpoints: tuple[Endpoint, ...]
    discovered: object | None  # discovery.Discovered when a new refresher is wanted
    keep_refresher: bool


class Reloader:
    """SIGHUP with --config-file: re-read it and apply what can change without a restart.

    A reload is a transaction: the file is parsed and validated, and its endpoints resolved
    (SRV discovery, self-loop check), in a thread within RELOAD_DEADLINE while the loop keeps
    relaying; only a complete result is applied, on the loop: endpoints, timeouts, health
    settings and the SRV refresher (stopped when the file drops --discovery-srv, started when
    it adds one, replaced when the domain or its settings change). Any failure is one
    `reload failed` line and the running configuration stays. RELOADING=1 is always followed
    by READY=1. SIGHUPs during a reload coalesce into one more reload after it. Listener and
    metrics address changes need a restart.
    """

    def __init__(self, run: Running, reparse: Reparse, deadline: float = RELOAD_DEADLINE):
        self.run = run
        self.reparse = reparse
        self.deadline = deadline
        self.busy = False
        self.again = False

    def __call__(self) -> None:
        if self.busy:
            if not self.again:
                self.run.gw.log.info("SIGHUP during a reload: one more reload after it")
            self.again = True
            return
        self.busy = True
        self.run.gw.spawn(self._reload_loop())

    async def _reload_loop(self) -> None:
        try:
            while True:
                self.again = False
                await self.reload_once()
                if not self.again:
                    return
        finally:
            self.busy = False

    async def reload_once(self) -> None:
        gw = self.run.gw
        log = gw.log
        notify(log, systemd.reloading_message())
        try:
            try:
                prepared = await asyncio.wait_for(
                    in_thread(self._prepare, gw.cfg, self.run.refresher is not None),
                    self.deadline,
                )
                self._apply(prepared)
            except TimeoutError:
                log.error(
                    "reload failed; keeping the running configuration",
                    error=f"not done within {format_duration(self.deadline)}",
                )
            except ConfigError as e:
                log.error("reload failed; keeping the running configuration", error=e.message)
            except Exception as e:  # a bug must not leave a half-applied reload or a traceback
                log.error(
                    "reload failed; keeping the running configuration",
                    error=f"internal error: {e!r}",
                )
        finally:
            notify(log, "READY=1")

    def _prepare(self, running: Config, has_refresher: bool) -> _Prepared:
        """Parse, validate and resolve the new configuration (in a worker thread)."""
        from . import resolver

        new, raw = self.reparse()
        same_discovery = all(getattr(new, f) == getattr(running, f) for f in _DISCOVERY_FIELDS)
        refresher = self.run.refresher
        if new.discovery_srv and same_discovery and has_refresher and refresher is not None:
            # The refresher keeps owning the SRV set; while it is on the --endpoints
            # fall-back (nothing valid discovered yet) the file's endpoints apply.
            endpoints = refresher.endpoints or checked(
                new, parse_endpoints(raw), resolver.host_resolver(new)
            )
            return _Prepared(new, endpoints, None, keep_refresher=True)
        endpoints, discovered = resolve_endpoints(new, raw, self.run.gw.log)
        return _Prepared(new, endpoints, discovered, keep_refresher=False)

    def _apply(self, p: _Prepared) -> None:
        """Apply a prepared configuration (on the loop; nothing here waits)."""
        from . import discovery, resolver
        from .dial import is_local_ip

        run, gw, log = self.run, self.run.gw, self.run.gw.log
        if p.cfg.listen != gw.cfg.listen or p.cfg.metrics_addr != gw.cfg.metrics_addr:
            log.warn("reload: listen and metrics addresses change only on restart")
        if p.cfg.auto_sync_interval != gw.cfg.auto_sync_interval:
            log.warn("reload: --auto-sync-interval changes only on restart")
        new = dataclasses.replace(
            p.cfg,
            listen=gw.cfg.listen,
            metrics_addr=gw.cfg.metrics_addr,
            auto_sync_interval=gw.cfg.auto_sync_interval,
            endpoints=p.endpoints,
        )
        if p.keep_refresher:
            assert run.refresher is not None
            # Read again here: the refresher may have changed the set since the thread did.
            endpoints = run.refresher.endpoints or p.endpoints
            gw.configure(dataclasses.replace(new, endpoints=endpoints))
            self._set_endpoints(endpoints)
            run.refresher.refresh_now()
            log.info("reloaded configuration", endpoints=[ep.addr for ep in endpoints])
            return
        if run.refresher_task is not None:
            run.refresher_task.cancel()
            log.info("reload: SRV refresh stopped", **{"srv-server": gw.cfg.discovery_srv})
        run.refresher = run.refresher_task = None
        gw.configure(new)
        self._set_endpoints(p.endpoints)
        if isinstance(p.discovered, discovery.Discovered):
            run.refresher = discovery.Refresher(
                new,
                log,
                p.discovered,
                srv_changed(run),
                self_check=discovery.self_check_for(
                    new, resolver.host_resolver(new), is_local=is_local_ip
                ),
            )
            run.refresher_task = gw.spawn(run.refresher.run())
            log.info("reload: SRV refresh started", **{"srv-server": new.discovery_srv})
        log.info("reloaded configuration", endpoints=[ep.addr for ep in p.endpoints])

    def _set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """The reloaded endpoints; with --auto-sync-interval they are the member list's seeds
        (the list decides)."""
        run = self.run
        if run.membership is None:
            run.gw.set_endpoints(endpoints)
            return
        run.membership.set_seeds(tuple(endpoints))
        run.membership.sync_now()


async def in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args) in a daemon thread: unlike the loop's executor, an abandoned call (past a
    deadline) never delays the process's exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as e:  # handed to the awaiting task
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop closed meanwhile (the gateway stopped): nobody waits any more

    threading.Thread(target=work, name="etcdgw-reload", daemon=True).start()
    return await fut
