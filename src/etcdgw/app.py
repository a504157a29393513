"""Start-up in the Go gateway's order (gateway.go startGateway), serving, and SIGHUP routing.

1. discovery (SRV) when --discovery-srv is set; both lookups failing is fatal
2. fall back to --endpoints when nothing was discovered
3. parse endpoints (schema stripped, host:port required)
4. resolve every endpoint and the listen host; refuse self-pointing endpoints
5. `no endpoints found` when the list is empty
6. bind, notify systemd, log `ready to proxy client requests`, serve

Steps 1-5 are running.py's (a reload runs them too); the reload transaction is reload.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import systemd, upgrade
from ._version import __version__
from .config import Config, ConfigError
from .log import Logger
from .relay import IMPLEMENTATION, new_event_loop
from .reload import Reloader, Reparse
from .running import Running, new_refresher, resolve_endpoints
from .selfloop import is_loopback_host

if TYPE_CHECKING:
    from .server import Gateway
    from .view import View

# The pure engine relays inside the loop's own epoll_wait (relay.RelaySelector). False keeps
# it on an epoll of its own: bench/ compares the two (bench/launch.py sets it). Not a flag.
RELAY_SELECTOR = True


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
        e.show()
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
    from .listeners import ACTIVATED
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
    inherited = systemd.listen_fds()
    # Listeners the old process took from systemd (socket activation) are taken the same
    # way: as inherited, whatever --listen-addr says.
    activated = [handed.pop(k) for k in [k for k in handed if k.startswith(ACTIVATED)]]
    if inherited:
        for s in activated:
            s.close()
    else:
        inherited = activated
    gw = Gateway(
        cfg,
        log,
        inherited=inherited,
        handed=handed,
        handed_files=successor.files if successor is not None else None,
    )
    try:
        gw.bind()
    except BaseException:
        if metrics_sock is not None:
            metrics_sock.close()
        raise
    run = Running(gw)
    try:
        if cfg.metrics_addr:
            from .metrics import MetricsServer

            run.metrics = MetricsServer(metrics_view(gw), cfg.metrics_addr, log)
            if metrics_sock is not None:
                metrics_sock.setblocking(False)
                run.metrics.sock = metrics_sock
            else:
                run.metrics.bind()
            if run.metrics.sock is not None:
                gw.own.add(run.metrics.sock.getsockname())
        from .health import HealthChecker

        # Built now so a bad --trusted-ca-file or health key is a start-up error. It reads
        # the settings in force every round, so a reload can switch etcd checks on and off.
        run.health = HealthChecker(gw.settings, gw.balancer, gw.addresses, gw.own, gw.monitor, log)
        if cfg.auto_sync_interval > 0:
            from .membership import Membership

            # The configured endpoints (or the SRV answer) are the seeds.
            run.membership = gw.membership = Membership(
                gw.settings,
                gw.balancer,
                gw.addresses,
                gw.set_endpoints,
                gw.collect_now,
                log,
                endpoints,
                self_check=discovery.self_check_for(cfg, resolve_host, is_local=is_local_ip),
            )
    except BaseException:
        gw.close_listeners()
        if run.metrics is not None:
            run.metrics.close()
        raise
    if discovered is not None:
        run.refresher = new_refresher(run, cfg, discovered, log)
    _live_upgrade(gw, run, successor)
    return run


def metrics_key(addr: str) -> str:
    """How a live upgrade names the metrics listener (listeners go by --listen-addr)."""
    return f"metrics {addr}"


def _live_upgrade(gw: Gateway, run: Running, successor: upgrade.Successor | None) -> None:
    """SIGUSR2 starts a successor (upgrade.Old), once ready; a successor takes over then."""

    def parts() -> upgrade.Parts | None:
        if not gw.ready:
            return None
        extra = {}
        if run.metrics is not None and run.metrics.sock is not None:
            extra[metrics_key(gw.cfg.metrics_addr)] = run.metrics.sock
        return gw.upgrade_parts(extra)

    old = upgrade.Old(
        parts,
        done=gw.handed_over,
        taking_over=lambda: successor is not None and not successor.done,
    )
    gw.on_sigusr2 = old
    gw.defer_stop = old.defer_stop
    if successor is not None:
        gw.hold_accept = True  # until its first ACK (Successor.serve)

        def take_over() -> None:
            gw.spawn(successor.serve(gw.upgrade_parts(), gw.stop, gw.listener_set.claim_handed))

        gw.on_ready = take_over


def metrics_view(gw: Gateway) -> View:
    """What the metrics port reads of gw, each part from its owner."""
    from .view import View

    return View(
        balancer=gw.balancer,
        table=gw.table,
        settings=gw.settings,
        engine=gw.implementation,
        listeners=lambda: gw.listen_socks,
        totals=gw.totals,
        live_bytes=gw.live_bytes,
        collect_now=gw.collect_now,
        ready=lambda: gw.ready,
        membership=lambda: gw.membership,
    )


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
