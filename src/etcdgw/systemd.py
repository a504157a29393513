"""systemd integration: sd_notify messages and socket activation (LISTEN_FDS), no library.

The Go gateway sends READY=1 through go-systemd once its listener is bound (etcd issue
#7465, v3.1.3); etcdgw does the same and adds RELOADING=1/STOPPING=1 around reload/drain.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not under systemd ($NOTIFY_SOCKET unset).

    Never blocks, as systemd's own sd_notify (MSG_DONTWAIT): a reader that stalls must not
    stall the event loop. A full socket raises BlockingIOError: the caller drops the message
    and warns.

    Raises:
        OSError: when $NOTIFY_SOCKET is set but the datagram cannot be sent.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.setblocking(False)
        s.connect(path)
        s.send(message.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
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


# --- Signals before the event loop takes them over ---------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived before the gateway was ready (start-up is abandoned).

    A KeyboardInterrupt, so no `except Exception` on the way swallows it and asyncio passes
    it through (its callbacks re-raise KeyboardInterrupt instead of logging a traceback).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StartupSignals:
    """Signal handling from the first instruction until the gateway's loop installs its own.

    SIGINT/SIGTERM raise Interrupted (the caller cleans up and exits 0, as a stop after ready
    does); SIGHUP is remembered (systemd's ExecReload during start-up must not kill the
    process) and the reload runs once the gateway is ready. restore() puts back the handlers
    that were there before.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.sighup = False
        self._saved: dict[int, Any] = {}

    def install(self) -> StartupSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (tests run in threads)
        for sig in self.SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.sighup = True
            return
        raise Interrupted(signum)

    def take_sighup(self) -> bool:
        """Whether a SIGHUP arrived during start-up (and forget it)."""
        seen, self.sighup = self.sighup, False
        return seen

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            # Only ours are replaced: the gateway's loop may have put its own in since.
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()
