"""systemd integration: sd_notify messages and socket activation (LISTEN_FDS), no library.

The Go gateway sends READY=1 through go-systemd once its listener is bound (etcd issue
#7465, v3.1.3); etcdgw does the same and adds RELOADING=1/STOPPING=1 around reload/drain.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from .log import Logger

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

    SIGUSR1, SIGUSR2 and SIGALRM (IGNORED) stay with this object for the whole run: their
    default action ends the process, and etcdgw gives them no meaning (SIGUSR2 has one once
    the gateway is ready: the live upgrade, upgrade.py). Each is ignored with one warning. The
    handler only notes the signal: the line is logged by report(), on the loop once it runs
    (at most one line per signal a second, with a count), else at the next step of start-up
    or shutdown: logging from inside a signal handler could re-enter a write to stderr it
    interrupted. A handler someone else installed (an embedding program, pytest-timeout's
    SIGALRM) is left alone.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    IGNORED = {
        signal.SIGUSR1: "SIGUSR1 (reopen logs) is not needed: etcdgw logs to stderr; ignored",
        signal.SIGUSR2: "SIGUSR2 (live upgrade) before the gateway is ready; ignored",
        signal.SIGALRM: "SIGALRM is not used by etcdgw; ignored",
    }
    REPORT_EVERY = 1.0  # seconds between two report lines on the loop (a signal storm)

    def __init__(self) -> None:
        self.sighup = False
        self._saved: dict[int, Any] = {}
        self._ignored: list[int] = []  # ignored signals not reported yet, in arrival order
        self._log: Logger | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_report = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> StartupSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (tests run in threads)
        for sig in self.SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        for sig in self.IGNORED:
            if signal.getsignal(sig) == signal.SIG_DFL:
                self._saved[sig] = signal.signal(sig, self._ignore)
                signal.siginterrupt(sig, False)  # SA_RESTART, as asyncio's handlers
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.sighup = True
            return
        raise Interrupted(signum)

    def _ignore(self, signum: int, frame: object) -> None:
        self._ignored.append(signum)
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._report_on_loop)
            except RuntimeError:
                pass  # the loop closed: the next report() call logs it

    def take_sighup(self) -> bool:
        """Whether a SIGHUP arrived during start-up (and forget it)."""
        seen, self.sighup = self.sighup, False
        return seen

    def report(self, log: Logger, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Log the ignored signals noted so far; with a (running) loop, log later ones on it
        as they come, until report() is called without one."""
        self._log, self._loop = log, loop
        if loop is None and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._report()

    def _report_on_loop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        if now < self._next_report:
            # A storm: what comes within REPORT_EVERY is one line, with its count.
            if self._timer is None:
                self._timer = loop.call_at(self._next_report, self._report_late)
            return
        self._next_report = now + self.REPORT_EVERY
        self._report()

    def _report_late(self) -> None:
        self._timer = None
        self._report_on_loop()

    def _report(self) -> None:
        ignored, self._ignored = self._ignored, []
        assert self._log is not None
        for sig, n in collections.Counter(map(signal.Signals, ignored)).items():
            fields = {"count": n} if n > 1 else {}
            self._log.warn(self.IGNORED[sig], signal=sig.name, **fields)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            # Only ours are replaced: the gateway's loop may have put its own in since.
            current = signal.getsignal(sig)
            if current == self._ignore and handler in (signal.SIG_DFL, None):
                # main() is returning and the interpreter tears down next: a stray signal
                # there would kill it with its default action (exit 138 after a clean stop,
                # which systemd records as a failure). Ignored for good instead.
                signal.signal(sig, signal.SIG_IGN)
            elif current in (self._handle, self._ignore):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()
