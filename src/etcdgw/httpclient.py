"""A small HTTP/1.1 client for the gateway's own requests to members: the health checks'
`GET /health` (health.py) and the member-list sync's `POST /v3/cluster/member/list`
(membership.py).

One request per connection, every step within one timeout, answers read with hard bounds
(a hostile member cannot make it read without end), errors worded like Go's HTTP client:
`GET http://host:port/health: dial tcp 127.0.0.1:2379: connect: connection refused`.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .config import Endpoint, format_addr
from .goerrors import IO_TIMEOUT, NO_ADDRESS, connect_failed, dial_failed
from .golang import format_duration
from .tls import error_text

__all__ = ["MAX_BODY", "MAX_RESPONSE", "HttpError", "request"]

# A health answer is a few dozen bytes; anything bigger is not etcd's /health.
MAX_RESPONSE = 64 * 1024  # longest status or header line
MAX_BODY = 4096  # body bytes read (and judged); the rest of a longer (or endless) body is not read


class HttpError(Exception):
    """A request that got no HTTP answer, worded like Go's client: `GET url: reason`."""


async def request(
    ep: Endpoint,
    addrs: Sequence[tuple[int, Any]],
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
        raise HttpError(f"{where}: {IO_TIMEOUT} ({format_duration(timeout)})") from None
    except ssl.SSLError as e:
        raise HttpError(f"{where}: tls: {error_text(e)}") from None
    except _BadResponse as e:
        raise HttpError(f"{where}: malformed response: {e}") from None
    except _DialError as e:
        raise HttpError(f"{where}: {e.strerror}") from None
    except OSError as e:
        raise HttpError(f"{where}: {error_text(e)}") from None


class _BadResponse(Exception):
    """Not an HTTP/1.x response we can read."""


class _DialError(OSError):
    """A failed connect, already worded like Go's dial errors."""


async def _fetch(
    ep: Endpoint,
    addrs: Sequence[tuple[int, Any]],
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
                where = format_addr(sa[0], ep.port)
                last = _DialError(e.errno or errno.EIO, connect_failed(where, e))
                continue
            except BaseException:
                s.close()
                raise
            sock = s
            break
        if sock is None:
            raise last or _DialError(errno.EHOSTUNREACH, dial_failed(ep.addr, NO_ADDRESS))
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
