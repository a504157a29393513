"""Start-up in the Go gateway's order (gateway.go startGateway), then serve until stopped.

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
import socket
import sys
from collections.abc import Sequence

from . import systemd
from ._version import __version__
from .config import Config, ConfigError, Endpoint, check_self_loop, is_loopback_host
from .config import parse_endpoints as _parse_endpoints
from .log import Logger
from .relay import IMPLEMENTATION


def start(cfg: Config, raw_endpoints: Sequence[str], argv: Sequence[str]) -> int:
    """Run `etcdgw start` with a parsed Config. Returns the process exit code."""
    log = Logger(level=cfg.log_level, fmt=cfg.log_format)
    log.info("Running: ", args=list(argv))
    log.info("starting etcdgw", version=__version__, **{"relay-engine": IMPLEMENTATION})
    try:
        gw, refresher = prepare(cfg, raw_endpoints, log)
    except ConfigError as e:
        stream = sys.stdout if e.stream == "stdout" else sys.stderr
        print(e.message, file=stream)
        stream.flush()
        return 1
    try:
        asyncio.run(serve(gw, refresher))
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


def prepare(cfg: Config, raw_endpoints: Sequence[str], log: Logger):  # type: ignore[no-untyped-def]
    """Steps 1-6 up to the bound listener. Returns (Gateway, Refresher or None).

    Raises:
        ConfigError: any start-up failure, with the message to print.
    """
    from . import discovery
    from .server import Gateway

    resolve_host = discovery.host_resolver(cfg)
    endpoints: tuple[Endpoint, ...] = ()
    discovered = None
    if cfg.discovery_srv:
        try:
            discovered = discovery.discover(cfg, log)
        except discovery.DiscoveryError as e:
            raise ConfigError(str(e), stream="stderr") from None
        endpoints = discovered.endpoints
    if not endpoints:
        # gateway.go: "no endpoints discovered, fall back to provided endpoints"
        endpoints = _parse_endpoints(raw_endpoints)
    check_self_loop(cfg.listen, endpoints, resolve_host, is_local=is_local_ip)
    if not endpoints:
        raise ConfigError("no endpoints found")
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
        resolve=discovery.async_host_resolver(cfg) if cfg.discovery_dns else None,
        inherited=systemd.listen_fds(),
    )
    gw.bind()
    refresher = None
    if discovered is not None and discovered.endpoints:

        def self_check(ep: Endpoint) -> str | None:
            try:
                check_self_loop(cfg.listen, [ep], resolve_host, is_local=is_local_ip)
            except ConfigError as e:
                return e.message
            return None

        refresher = discovery.Refresher(
            cfg, log, discovered, gw.set_endpoints, self_check=self_check
        )
    return gw, refresher


async def serve(gw, refresher) -> None:  # type: ignore[no-untyped-def]
    """Notify systemd, start the SRV refresher, and run the gateway until it stops."""
    log = gw.log
    log.info("notifying init daemon")
    try:
        systemd.notify("READY=1")
        log.info("successfully notified init daemon")
    except OSError as e:
        log.error("failed to notify systemd for readiness", error=str(e))
    if refresher is not None:
        gw.spawn(refresher.run())
        gw.on_sighup = refresher.refresh_now
    await gw.run()


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
