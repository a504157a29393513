"""TLS for the gateway's own clients: the one client-context builder (--trusted-ca-file, and
the health checks' client certificate), and the validation of discovered targets.

Validation mirrors etcd's `transport.ValidateSecureEndpoints` with one deliberate fix
(README lists it): it really authenticates the target, with a TLS handshake whose certificate
must chain to --trusted-ca-file (or the system store) and match the SRV target name. Go only
opens a TCP connection (CVE-2020-15136), so a plain server or a stranger's certificate passed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .config import ConfigError, Endpoint, format_addr
from .goerrors import IO_TIMEOUT, NO_ADDRESS, connect_failed, dial_failed, strerror
from .golang import go_quote

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_PARALLEL_VALIDATIONS",
    "check_tls",
    "client_context",
    "endpoint_url",
    "ssl_text",
    "validate",
]

# transport.ValidateSecureEndpoints dials with a 5 s timeout; we use it for connect + handshake.
HANDSHAKE_TIMEOUT = 5.0
# At most this many targets are validated in parallel (Go validates one after the other, so a
# few dead targets delayed start-up by 5 s each).
MAX_PARALLEL_VALIDATIONS = 16


# --- the client context ------------------------------------------------------------------------


def client_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A client context that trusts ca_file (the system store if empty) and presents
    cert_file / key_file when given.

    Used for discovered targets (--trusted-ca-file only: Go's TLSInfo.TrustedCAFile) and for
    the health checks and member-list syncs (with --health-cert-file / --health-key-file:
    members run with --client-cert-auth refuse anonymous clients). Go silently fell back to
    --endpoints on an unreadable CA file; we refuse to start.

    Raises:
        ConfigError: `failed to load trusted CA file <path>: <reason>` or `failed to load
            --health-cert-file <path>: <reason>` (stderr).
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"failed to load trusted CA file {ca_file}: {error_text(e)}", stream="stderr"
        ) from None
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file or None)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"failed to load --health-cert-file {cert_file}: {error_text(e)}",
                stream="stderr",
            ) from None
    return ctx


def ssl_text(e: ssl.SSLError) -> str:
    """An OpenSSL error without its "[LIB: CODE]" prefix and "(_ssl.c:NNN)" suffix."""
    text = str(e.args[1]) if len(e.args) > 1 else str(e)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or str(e.reason)


def error_text(e: BaseException) -> str:
    """A TLS or OS error as one short lower-case reason (ssl_text, or Go's strerror)."""
    return ssl_text(e) if isinstance(e, ssl.SSLError) else strerror(e)


def endpoint_url(ep: Endpoint) -> str:
    """The URL form Go logs for a discovered endpoint: https://host:port or http://host:port."""
    return ("https://" if ep.secure else "http://") + ep.addr


# --- validation of discovered targets --------------------------------------------------------


# Alerts a server may send when it wants a client certificate and we have none (Go sends
# bad_certificate / certificate_required, OpenSSL handshake_failure). The gateway has no
# client certificate and needs none: it relays the client's own TLS. So a member running with
# --client-cert-auth must pass, but only once its own certificate was verified (see
# _handshake): an alert alone, right after our ClientHello, proves nothing.
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)
_TLS_HANDSHAKE_RECORD = 22
# TLS 1.2 client messages sent only after the server's Certificate (and its signed key
# exchange) were verified: Certificate (11) when one was requested, else ClientKeyExchange (16).
_AFTER_SERVER_AUTH = (11, 16)


def _answers_server_auth(data: bytes) -> bool:
    """Whether client output holds a plaintext Certificate or ClientKeyExchange message."""
    i = 0
    while i + 5 < len(data):
        ctype, length = data[i], int.from_bytes(data[i + 3 : i + 5], "big")
        if ctype == _TLS_HANDSHAKE_RECORD and data[i + 5] in _AFTER_SERVER_AUTH:
            return True
        i += 5 + length
    return False


def _handshake(sock: socket.socket, ctx: ssl.SSLContext, host: str, deadline: float) -> None:
    """A client TLS handshake over memory BIOs; returns when the server is authenticated.

    Driving the handshake by hand shows how far it got: in TLS 1.2 the client sends its
    Certificate/ClientKeyExchange only after verifying the server's chain, name and (ECDHE/DHE
    only in Python's default context) the key exchange signature. An alert about our missing
    client certificate after that point still means "authenticated".

    Raises:
        ssl.SSLError, OSError, TimeoutError: the handshake failed.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    authenticated = False

    def flush() -> None:
        nonlocal authenticated
        data = outgoing.read()
        if data:
            authenticated = authenticated or _answers_server_auth(data)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(data)

    for _ in range(64):  # a handshake takes a few round trips; never loop unbounded
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            flush()
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()
            continue
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as e:
            if authenticated and e.reason in _CLIENT_CERT_ALERTS:
                return
            raise
        with contextlib.suppress(OSError):
            flush()  # our Finished, so the server does not log a broken handshake
        return
    raise ssl.SSLError("tls handshake did not finish")


def check_tls(
    ep: Endpoint,
    ctx: ssl.SSLContext,
    resolve: Callable[[str], Sequence[str]],
    timeout: float = HANDSHAKE_TIMEOUT,
) -> str | None:
    """Handshake with ep, checking its certificate against ctx and the name ep.host.

    Returns None when the target is authenticated, else the reason (Go's `"<url>" ...` form).
    The connection is closed right after the handshake: the gateway never terminates TLS.
    """
    url = go_quote(endpoint_url(ep))
    try:
        addrs = resolve(ep.host)
    except OSError as e:
        return f"{url} failed to dial ({e})"
    deadline = time.monotonic() + timeout
    last = NO_ADDRESS
    for ip in addrs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = IO_TIMEOUT
            break
        dial = format_addr(ip, ep.port)
        try:
            sock = socket.create_connection((ip, ep.port), timeout=remaining)
        except TimeoutError:
            last = dial_failed(dial, IO_TIMEOUT)
            continue
        except OSError as e:
            last = connect_failed(dial, e)
            continue
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                _handshake(sock, ctx, ep.host, deadline)
                return None
            except ssl.SSLCertVerificationError as e:
                return (
                    f"{url} failed TLS validation (certificate verify failed: {e.verify_message})"
                )
            except ssl.SSLError as e:
                return f"{url} failed TLS validation (tls handshake with {dial}: {ssl_text(e)})"
            except TimeoutError:
                return f"{url} failed TLS validation (tls handshake with {dial}: i/o timeout)"
            except OSError as e:
                reason = strerror(e).lower()
                return f"{url} failed TLS validation (tls handshake with {dial}: {reason})"
    return f"{url} failed to dial ({last})"


def validate(
    endpoints: Sequence[Endpoint],
    ctx: ssl.SSLContext,
    resolve: Callable[[str], Sequence[str]],
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[tuple[Endpoint, ...], tuple[tuple[Endpoint, str], ...]]:
    """Secure validation (no --insecure-discovery): (kept in order, [(dropped, reason)]).

    http records are refused outright, as transport.ValidateSecureEndpoints does
    (`"<url>" is insecure`); https ones must pass check_tls. Handshakes run in parallel.
    """
    results: dict[Endpoint, str | None] = {}
    secure = [ep for ep in endpoints if ep.secure]
    if secure:
        workers = min(len(secure), MAX_PARALLEL_VALIDATIONS)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futs = {ep: pool.submit(check_tls, ep, ctx, resolve, timeout) for ep in secure}
            results = {ep: f.result() for ep, f in futs.items()}
    kept: list[Endpoint] = []
    rejected: list[tuple[Endpoint, str]] = []
    for ep in endpoints:
        if not ep.secure:
            reason: str | None = f"{go_quote(endpoint_url(ep))} is insecure"
        else:
            reason = results[ep]
        if reason is None:
            kept.append(ep)
        else:
            rejected.append((ep, reason))
    return tuple(kept), tuple(rejected)
