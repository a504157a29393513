"""systemd integration: sd_notify messages and socket activation (LISTEN_FDS), no library.

The Go gateway sends READY=1 through go-systemd once its listener is bound (etcd issue
#7465, v3.1.3); etcdgw does the same and adds RELOADING=1/STOPPING=1 around reload/drain.
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not under systemd ($NOTIFY_SOCKET unset).

    Raises:
        OSError: when $NOTIFY_SOCKET is set but the datagram cannot be sent.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(message.encode())
    return True


def reloading_message() -> str:
    """RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload (systemd >= 253) expects."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)); [] when none.

    Only honoured when $LISTEN_PID is this process, as sd_listen_fds does.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        n = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or n <= 0:
        return []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
