"""What start-up produced (`Running`), and the steps start-up and a SIGHUP reload share.

The endpoint list (gateway.go startGateway steps 1-5), where a new endpoint set goes (the
balancer, or with --auto-sync-interval the member list's seeds), and building the SRV
refresher. app.py (start-up) and reload.py (the reload transaction) both use them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config, ConfigError, Endpoint, parse_endpoints
from .log import Logger
from .selfloop import check_self_loop

if TYPE_CHECKING:
    from .discovery import Discovered, Refresher
    from .health import HealthChecker
    from .membership import Membership
    from .metrics import MetricsServer


class Lifecycle(Protocol):
    """The running gateway (server.Gateway) as start-up, serving and a reload use it."""

    log: Logger
    ready: bool  # serving: run() took the signals over
    on_sighup: Callable[[], None] | None

    @property
    def cfg(self) -> Config: ...

    async def run(self) -> None: ...

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]: ...

    def configure(self, cfg: Config) -> None: ...

    def set_endpoints(self, endpoints: Sequence[Endpoint], source: str | None = None) -> None: ...

    def stop(self) -> None: ...

    def close_listeners(self) -> None: ...


@dataclasses.dataclass
class Running:
    """What start-up produced: the gateway and its optional companions."""

    gw: Lifecycle
    refresher: Refresher | None = None
    metrics: MetricsServer | None = None
    health: HealthChecker | None = None
    refresher_task: asyncio.Task[None] | None = None
    membership: Membership | None = None


def resolve_endpoints(
    cfg: Config, raw_endpoints: Sequence[str], log: Logger
) -> tuple[tuple[Endpoint, ...], Discovered | None]:
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


def route_endpoints(run: Running, endpoints: Sequence[Endpoint], source: str | None = None) -> None:
    """Where a new endpoint set (an SRV refresh's, a reload's) goes: the balancer, or with
    --auto-sync-interval the member list's seeds (the member list wins while syncs succeed).

    source (`srv`), when given, is stamped on the endpoints the balancer gets.
    """
    if run.membership is not None:
        run.membership.set_seeds(tuple(endpoints))
        run.membership.sync_now()
    else:
        run.gw.set_endpoints(endpoints, source=source)


def new_refresher(run: Running, cfg: Config, discovered: Discovered, log: Logger) -> Refresher:
    """The SRV refresher for cfg, starting from what discovery found; its new sets go through
    route_endpoints(). Also when start-up fell back to --endpoints: once DNS or the
    certificates are fixed, a refresh adopts the SRV set (the Go gateway never looks again)."""
    from . import discovery, resolver
    from .dial import is_local_ip

    def on_change(endpoints: Sequence[Endpoint]) -> None:
        route_endpoints(run, endpoints, source="srv")

    return discovery.Refresher(
        cfg,
        log,
        discovered,
        on_change,
        self_check=discovery.self_check_for(cfg, resolver.host_resolver(cfg), is_local=is_local_ip),
    )
