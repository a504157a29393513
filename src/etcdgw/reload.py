"""SIGHUP with --config-file: the reload transaction (`Reloader`).

The new configuration is parsed, validated and resolved in a thread within a deadline while
the loop keeps relaying; only a complete result is applied, on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import systemd
from .config import Config, ConfigError, Endpoint, parse_endpoints
from .golang import format_duration
from .log import Logger
from .running import Running, checked, new_refresher, resolve_endpoints, route_endpoints

if TYPE_CHECKING:
    from .discovery import Discovered

_T = TypeVar("_T")

# A reload (file, validation, DNS) runs in a thread; past this it fails and the running
# configuration stays. DNS lookups are bounded by their own timeouts (discovery.LOOKUP_TIMEOUT),
# so the abandoned thread ends soon after.
RELOAD_DEADLINE = 10.0

Reparse = Callable[[], tuple[Config, list[str]]]


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
    discovered: Discovered | None  # when a new refresher is wanted
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
        if new.health_check == "etcd":
            # The files start-up would refuse fail the reload the same way (one line), not a
            # "reloaded configuration" followed by checks that keep the previous ones.
            from .health import tls_context

            tls_context(new)
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
            route_endpoints(run, endpoints)
            run.refresher.refresh_now()
            log.info("reloaded configuration", endpoints=[ep.addr for ep in endpoints])
            return
        if run.refresher_task is not None:
            run.refresher_task.cancel()
            log.info("reload: SRV refresh stopped", **{"srv-server": gw.cfg.discovery_srv})
        run.refresher = run.refresher_task = None
        gw.configure(new)
        route_endpoints(run, p.endpoints)
        if p.discovered is not None:
            run.refresher = new_refresher(run, new, p.discovered, log)
            run.refresher_task = gw.spawn(run.refresher.run())
            log.info("reload: SRV refresh started", **{"srv-server": new.discovery_srv})
        log.info("reloaded configuration", endpoints=[ep.addr for ep in p.endpoints])


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
