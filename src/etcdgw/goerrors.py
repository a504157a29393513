"""Go's error texts, written once: what etcd's gateway (Go's net package) says when a dial or
a system call fails, so logs, `/status` and start-up errors read the same as etcd's.

Go prints a failed dial as a `net.OpError`: `dial tcp 127.0.0.1:2379: connect: connection
refused` (op, network, address, then the syscall and its errno's text, lower case), and a
timeout as `dial tcp 127.0.0.1:2379: i/o timeout`.
"""

from __future__ import annotations

import errno
import os
import socket

__all__ = ["IO_TIMEOUT", "NO_ADDRESS", "connect_failed", "dial_failed", "strerror"]

IO_TIMEOUT = "i/o timeout"  # Go's os.ErrDeadlineExceeded text
NO_ADDRESS = "no address"  # a host name that resolved to nothing dialable

# OSError subclasses raised without an errno (asyncio's transports: "Connection lost"),
# read as the errno they stand for, so one failure reads one way whoever raised it.
_ERRNO_OF: dict[type[OSError], int] = {
    ConnectionResetError: errno.ECONNRESET,
    ConnectionRefusedError: errno.ECONNREFUSED,
    ConnectionAbortedError: errno.ECONNABORTED,
    BrokenPipeError: errno.EPIPE,
}


def strerror(e: BaseException | int) -> str:
    """Go's text for an OS error (`syscall.Errno.Error()`): the lower-case strerror of its
    errno, `connection refused`.

    An OSError without a usable errno (a resolver's gaierror) gives its own strerror, lower
    case; any other error its text (or its type's name).
    """
    if isinstance(e, int):
        return os.strerror(e).lower()
    if isinstance(e, OSError):
        if e.errno and e.errno > 0 and not isinstance(e, socket.gaierror):
            return os.strerror(e.errno).lower()
        if e.strerror:
            return str(e.strerror).lower()
        if type(e) in _ERRNO_OF:
            return os.strerror(_ERRNO_OF[type(e)]).lower()
    return str(e) or type(e).__name__


def dial_failed(where: str, reason: str) -> str:
    """`dial tcp <where>: <reason>`: a dial to where (host:port) that failed for reason."""
    return f"dial tcp {where}: {reason}"


def connect_failed(where: str, e: BaseException | int) -> str:
    """`dial tcp 127.0.0.1:2379: connect: connection refused`: connect(2) to where failed."""
    return dial_failed(where, f"connect: {strerror(e)}")
