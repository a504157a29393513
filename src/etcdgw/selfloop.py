"""The start-up self-loop checks (gateway.go startGateway, step 7; CVE-2020-15114).

Pure: name resolution is passed in as a function, so tests run without DNS. The connect path
(dial.OwnAddresses) uses the same rule, loops_back().
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from .config import ConfigError, Endpoint, Listen, format_addr

Resolver = Callable[[str], Sequence[str]]


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def check_self_loop(
    listens: Sequence[Listen],
    endpoints: Sequence[Endpoint],
    resolve: Resolver,
    is_local: Callable[[str], bool] = lambda ip: ip in ("127.0.0.1", "::1"),
) -> None:
    """Refuse endpoints that point back at the gateway (CVE-2020-15114 guard).

    Mirrors etcd's "best effort detection of self pointing in tcp proxy", but compares
    resolved addresses (so `localhost` vs `127.0.0.1` and IPv6 are caught) and treats a
    wildcard listen address as every local address (Go compares strings, so 0.0.0.0 slips).

    Args:
        resolve: host -> list of IP strings; raises OSError when the name does not resolve.
        is_local: whether an IP is one of this machine's addresses (for wildcard listeners).

    Raises:
        ConfigError: with the Go gateway's messages (stdout).
    """
    listen_ips: dict[int, set[str]] = {}
    for ls in listens:
        if ls.path is not None:
            continue
        if is_wildcard(ls.host):
            ips = {"*"}
        else:
            try:
                ips = {_norm_ip(a) for a in resolve(ls.host)}
            except OSError:
                raise ConfigError(f"failed to resolve listen host: {ls.host}") from None
        listen_ips.setdefault(ls.port, set()).update(ips)
    for ep in endpoints:
        try:
            ep_ips = [_norm_ip(a) for a in resolve(ep.host)]
        except OSError:
            raise ConfigError(f"failed to resolve endpoint host: {ep.host}") from None
        own = listen_ips.get(ep.port)
        if not own:
            continue
        for ip in ep_ips:
            if loops_back(ip, own, is_local):
                listen = ",".join(ls.addr for ls in listens if ls.port == ep.port)
                raise ConfigError(
                    f"SRV or endpoint ({ep.addr}->{format_addr(ip, ep.port)}) should not "
                    f"resolve to the gateway listen addr ({listen})"
                )


def loops_back(ip: str, own: set[str], is_local: Callable[[str], bool]) -> bool:
    """Whether a connect to ip reaches one of own, the gateway's listen IPs on that port.

    own holds normalised IPs and "*" for a wildcard listener (every local address). An
    unspecified ip (0.0.0.0, ::) connects to this host. The one rule for the start-up guard
    (check_self_loop) and the connect path (dial.OwnAddresses).
    """
    ip = _norm_ip(ip)
    return ip in own or _is_any(ip) or ("*" in own and is_local(ip))


def _norm_ip(a: str) -> str:
    try:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
    except ValueError:
        return a
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_any(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def is_loopback_host(host: str, resolve: Resolver) -> bool:
    """True when every address of host is a loopback address (for the non-loopback warning)."""
    try:
        addrs = resolve(host) if host else ["0.0.0.0"]
    except OSError:
        return False
    try:
        return all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)
    except ValueError:
        return False
