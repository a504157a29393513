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
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import systemd
from ._version import __version__
from .config import (
    Config,
    ConfigError,
    Endpoint,
    check_self_loop,
    is_loopback_host,
    parse_endpoints,
)
from .log import Logger
from .relay import IMPLEMENTATION, new_event_loop

if TYPE_CHECKING:
    from .discovery import Refresher
    from .health import HealthChecker
    from .membership import Membership
    from .metrics import MetricsServer
    from .server import Gateway


@dataclasses.dataclass
class Running:
    """What start-up produced: the gateway and its optional companions."""

    gw: Gateway
    refresher: Refresher | None = None
    metrics: MetricsServer | None = None
    health: HealthChecker | None = None
    membership: Membership | None = None


def start(cfg: Config, raw_endpoints: Sequence[str], argv: Sequence[str]) -> int:
    """Run `etcdgw start` with a parsed Config. Returns the process exit code."""
    log = Logger(level=cfg.log_level, fmt=cfg.log_format)
    log.info("Running: ", args=list(argv))
    log.info("starting etcdgw", version=__version__, **{"relay-engine": IMPLEMENTATION})
    try:
        run = prepare(cfg, raw_endpoints, log)
    except ConfigError as e:
        stream = sys.stdout if e.stream == "stdout" else sys.stderr
        print(e.message, file=stream)
        stream.flush()
        return 1
    try:
        # The pure engine relays inside this loop's own epoll_wait (relay.RelaySelector);
        # ETCDGW_RELAY_SELECTOR=0 keeps it on an epoll of its own (benchmarks; not an API).
        factory = new_event_loop if os.environ.get("ETCDGW_RELAY_SELECTOR", "1") != "0" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(run, reload_args=list(argv[1:])))
    except KeyboardInterrupt:
        pass
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
    check_self_loop(cfg.listen, endpoints, resolve_host, is_local=is_local_ip)
    if not endpoints:
        raise ConfigError("no endpoints found")
    return endpoints, discovered


def prepare(cfg: Config, raw_endpoints: Sequence[str], log: Logger) -> Running:
    """Steps 1-6 up to bound listeners (gateway and metrics).

    Raises:
        ConfigError: any start-up failure, with the message to print.
    """
    from . import discovery, resolver
    from .server import Gateway

    endpoints, discovered = resolve_endpoints(cfg, raw_endpoints, log)
    resolve_host = resolver.host_resolver(cfg)
    for ls in cfg.listen:
        if ls.path is None and not is_loopback_host(ls.host, resolve_host):
            log.warn(
                "listening on a non-loopback address; etcdgw does not authenticate clients",
                address=ls.addr,
            )
    cfg = dataclasses.replace(cfg, endpoints=endpoints)
    gw = Gateway(
        cfg,
        log,
        inherited=systemd.listen_fds(),
    )
    gw.bind()
    run = Running(gw)
    try:
        if cfg.metrics_addr:
            from .metrics import MetricsServer

            run.metrics = MetricsServer(gw, cfg.metrics_addr, log)
            run.metrics.bind()
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
            _srv_changed(run),
            self_check=discovery.self_check_for(cfg, resolve_host, is_local=is_local_ip),
        )
    return run


async def serve(run: Running, reload_args: Sequence[str] = ()) -> None:
    """Notify systemd, start the companions, and run the gateway until it stops."""
    gw = run.gw
    log = gw.log
    if run.metrics is not None:
        # Left open while draining, so /ready answers 503 then; closed when serving ends.
        await run.metrics.start()
    if run.refresher is not None:
        gw.spawn(run.refresher.run())
    if run.health is not None:
        gw.spawn(run.health.run())
    if run.membership is not None:
        gw.spawn(run.membership.run())
    gw.on_sighup = _reloader(run, reload_args) if gw.cfg.config_file else _refresh_only(run)
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


def _srv_changed(run: Running) -> Callable[[tuple[Endpoint, ...]], None]:
    """Where an SRV refresh's new set goes: the endpoints, or with --auto-sync-interval the
    seeds of the member list (the member list wins while syncs succeed)."""

    def on_change(endpoints: tuple[Endpoint, ...]) -> None:
        if run.membership is not None:
            run.membership.set_seeds(endpoints)
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


def _reloader(run: Running, args: Sequence[str]) -> Callable[[], None]:
    """SIGHUP with --config-file: re-read it and apply what can change without a restart.

    Endpoints added get clients; removed ones get no new clients while their live
    connections continue; timeouts and health settings apply to what comes next. Listener
    changes need a restart. A broken file is logged and the running config stays.
    """

    def on_sighup() -> None:
        gw = run.gw
        log = gw.log
        try:
            systemd.notify(systemd.reloading_message())
        except OSError:
            pass
        try:
            from .cli import UsageError, parse_start

            try:
                new, raw = parse_start(args)
            except UsageError as e:
                raise ConfigError(str(e), stream="stderr") from None
            if run.refresher is not None and new.discovery_srv == gw.cfg.discovery_srv:
                endpoints = gw.cfg.endpoints
                run.refresher.refresh_now()
            else:
                endpoints, _ = resolve_endpoints(new, raw, log)
            if new.listen != gw.cfg.listen or new.metrics_addr != gw.cfg.metrics_addr:
                log.warn("reload: listen and metrics addresses change only on restart")
            if new.auto_sync_interval != gw.cfg.auto_sync_interval:
                log.warn("reload: --auto-sync-interval changes only on restart")
            new = dataclasses.replace(
                new,
                listen=gw.cfg.listen,
                metrics_addr=gw.cfg.metrics_addr,
                auto_sync_interval=gw.cfg.auto_sync_interval,
                endpoints=endpoints,
            )
        except ConfigError as e:
            log.error("reload failed; keeping the running configuration", error=e.message)
        else:
            gw.cfg = new
            if run.membership is not None:
                # The reloaded endpoints are the member list's seeds; the list decides.
                run.membership.set_seeds(endpoints)
                run.membership.sync_now()
            else:
                gw.set_endpoints(endpoints)
            log.info("reloaded configuration", endpoints=[ep.addr for ep in endpoints])
        try:
            systemd.notify("READY=1")
        except OSError:
            pass

    return on_sighup


def is_local_ip(ip: str) -> bool:
    """Whether ip is one of this machine's addresses: only those can be bound without
    IP_FREEBIND. Used by the self-loop guard for wildcard listen addresses."""
    if ip.startswith("127.") or ip == "::1":
        return True
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True
