"""Live upgrade: a new etcdgw process takes over the listeners and every live pair (issue 20).

SIGUSR2 on a running gateway starts its successor (the same command line, run afresh from
the installed package) with one end of a socketpair, named by $ETCDGW_UPGRADE_FD. The two
talk a small protocol over it: length-prefixed JSON messages, file descriptors riding on
them as SCM_RIGHTS (at most MAX_FDS a message), the version in the first message. The
sequence (docs/architecture.md "Live upgrade" says who owns each fd at each step):

    successor                                   old (serving)
    parse + validate config (bad: exit 1)       sees EOF before READY: keeps serving
    HELLO {version, pid}                   ->
                                           <-   LISTENERS {version, keys} + listener fds
    bind what is new, close what is not
    wanted (not accepting yet)
    READY                                  ->
                                           <-   PAIRS {pairs} + fds (detach(<=126); [])
    adopt each pair, then ACK; the first:
    accept on the listeners                ->   close its copies of the batch; the first:
                                                stop accepting (listeners kept open),
                                                wait for the dials in flight
                                                ... until no pair is left
                                           <-   DONE {}   (committed: MAINPID=<successor>)
    claim the unix socket files,
    MAINPID=<pid> READY=1 (systemd);
    ACK                                    ->   close its listener copies (no unlink), exit 0
                                                (without the ACK too, past MESSAGE_DEADLINE;
                                                but a successor dead without it: MAINPID=
                                                <own pid>, accept again, one error line)

Failure is safe: until the old one has an ACK for a batch it keeps every fd of it open (the
successor got duplicates), so on EOF, garbage, a version it does not know, or a deadline
it takes the batch back (re-adopts it in its engine), kills a successor that may still hold
the unacknowledged batch, resumes accepting, and logs one line. Once DONE is sent the
hand-over is committed: the old one never serves again, whatever the successor does next.
A successor that loses the channel before DONE stops accepting and drains what it adopted
(it never told systemd it is the main process: until DONE its $NOTIFY_SOCKET is put aside).

Who may take over: only the child this process starts. The channel is a socketpair (no
name: nothing can connect to it); its end is passed to that child alone (pass_fds; every
other descriptor is close-on-exec) and $ETCDGW_UPGRADE_FD is removed from the successor's
environment once read. SO_PEERCRED cannot add to that: on a socketpair it reports the
process that created the pair at both ends (the old one), so the old side has nothing to
check; the successor reads it only to learn (and log) the old one's pid, and refuses a
channel created by another user.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import systemd
from .balancer import Balancer, Remote
from .config import ConfigError, Endpoint
from .engine import Handed
from .log import Logger
from .relay import Relay
from .table import ConnTable

__all__ = [
    "ENV_FD",
    "MAX_FDS",
    "PAIRS_PER_BATCH",
    "RECORDS_PER_BATCH",
    "VERSION",
    "Old",
    "Parts",
    "ProtocolError",
    "Successor",
    "check_peer",
    "recv_msg",
    "send_msg",
]

VERSION = 1
ENV_FD = "ETCDGW_UPGRADE_FD"  # the successor's end of the channel (an inherited fd)
MAX_FDS = 253  # SCM_MAX_FD: the most descriptors one message may carry
PAIRS_PER_BATCH = MAX_FDS // 2  # 126 pairs, two fds each
# The most records one PAIRS message may carry, on both sides: a record has one fd (a client
# handed alone) or two, and the rule is fds per message <= MAX_FDS.
RECORDS_PER_BATCH = MAX_FDS
MAX_MESSAGE = 64 << 20  # a batch's carried bytes, base64: 126 pairs x 2 buffers fit easily
START_DEADLINE = 10.0  # spawn -> READY (imports, config, discovery, binding)
HANDOVER_DEADLINE = 10.0  # READY -> DONE acknowledged
MESSAGE_DEADLINE = 5.0  # any one message
REAP_AFTER_READY = 120.0  # a successor that failed after READY drains, then exits
REAP_MARGIN = 30.0  # ... within its --drain-timeout (told in READY) and this margin
DEAD_WAIT = 1.0  # after EOF instead of the last ACK: how long the old looks for an exit
REAP_POLL = 0.2  # how often the old one looks whether a failed successor exited
DIALS_WAIT = 3.0  # how long the old waits for its dials in flight before handing pairs

_LEN = struct.Struct("!I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ProtocolError(Exception):
    """The peer broke the protocol, closed the channel, or missed a deadline."""


# --- the wire ------------------------------------------------------------------------------


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One message: a 4-byte length, the JSON body; fds (<= MAX_FDS) ride on its first byte.

    Raises:
        ProtocolError: the peer is gone or the socket's timeout passed.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds in one message (at most {MAX_FDS})")
    body = json.dumps(msg, separators=(",", ":")).encode()
    data = _LEN.pack(len(body)) + body
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])
    except OSError as e:
        raise ProtocolError(_why(e)) from None


def recv_msg(sock: socket.socket, limit: int = MAX_MESSAGE) -> tuple[dict[str, Any], list[int]]:
    """The next message and the fds that came with it (the caller's, close-on-exec).

    Raises:
        ProtocolError: EOF, a malformed or oversized message, truncated descriptors (every
            fd received is closed then), or the socket's timeout passed.
    """
    fds: list[int] = []
    try:
        head = b""
        while len(head) < _LEN.size:
            data, anc, flags, _ = sock.recvmsg(
                _LEN.size - len(head), socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("descriptors truncated (more than the message may carry)")
            if not data:
                raise ProtocolError("channel closed" if not head else "truncated message")
            head += data
        (n,) = _LEN.unpack(head)
        if n > limit:
            raise ProtocolError(f"message of {n} bytes (at most {limit})")
        body = bytearray(n)
        view = memoryview(body)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ProtocolError("truncated message")
            got += k
        try:
            msg = json.loads(body)
        except ValueError:
            raise ProtocolError("malformed message (not JSON)") from None
        except RecursionError:  # e.g. 4,000 `[`: the peer's fault, not an internal error
            raise ProtocolError("malformed message (nested too deeply)") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError("malformed message (no type)")
        return msg, fds
    except BaseException as e:
        _close_all(fds)
        if isinstance(e, OSError):
            raise ProtocolError(_why(e)) from None
        raise


def expect(
    sock: socket.socket, kind: str, limit: int = MAX_MESSAGE
) -> tuple[dict[str, Any], list[int]]:
    """recv_msg, and its type must be `kind` (else ProtocolError, its fds closed)."""
    msg, fds = recv_msg(sock, limit)
    if msg["type"] != kind:
        _close_all(fds)
        if msg["type"] == "ERROR":
            raise ProtocolError(f"peer refused: {msg.get('error', '')}")
        raise ProtocolError(f"expected {kind}, got {str(msg['type'])[:40]}")
    return msg, fds


def check_version(msg: dict[str, Any]) -> None:
    v = msg.get("version")
    if v != VERSION:
        raise ProtocolError(f"protocol version {v!r} not supported (this process speaks {VERSION})")


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED): the
    one that connected, or for a socketpair the one that created it (at both ends)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def check_peer(sock: socket.socket, uid: int | None = None) -> int:
    """The peer's pid, when it runs as uid (default: our effective uid).

    Raises:
        ProtocolError: another user's process.
    """
    want = os.geteuid() if uid is None else uid
    pid, peer_uid, _ = peer_cred(sock)
    if peer_uid != want:
        raise ProtocolError(f"peer process {pid} runs as uid {peer_uid}, not {want}")
    return pid


def _why(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return "deadline passed"
    return os.strerror(e.errno).lower() if e.errno else str(e)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- what a pair looks like on the wire -------------------------------------------------------


def pair_record(h: Handed, remote: Remote | None) -> dict[str, Any]:
    """JSON metadata for one handed pair: the endpoint by address (tags are per process)."""
    rec: dict[str, Any] = {
        "up": h.upstream_fd >= 0,
        "c2u": h.c2u,
        "u2c": h.u2c,
        "ce": h.client_eof,
        "ue": h.upstream_eof,
    }
    if remote is not None:
        rec["host"] = remote.endpoint.host
        rec["port"] = remote.endpoint.port
    if h.to_upstream:
        rec["tu"] = base64.b64encode(h.to_upstream).decode()
    if h.to_client:
        rec["tc"] = base64.b64encode(h.to_client).decode()
    return rec


def _fds_of(h: Handed) -> list[int]:
    return [h.client_fd, h.upstream_fd] if h.upstream_fd >= 0 else [h.client_fd]


# --- the collaborators ---------------------------------------------------------------------------


@dataclass
class Parts:
    """What either side uses of the running gateway (server.Gateway builds it).

    pause/resume: stop accepting on the listeners (they stay open) / accept again.
    listeners: (key, socket) of every listener: the key is its --listen-addr.
    extra: other listening sockets handed over by key (the metrics listener).
    files: the unix socket files this process owns, by path: (st_dev, st_ino).
    redial: dial a client again (its dial had not finished: it sent nothing we consumed).
    dials: how many clients are being dialled (loop dials and the relay thread's).
    take_dials: stop at most n of the loop's dials and give up their clients, open.
    """

    loop: asyncio.AbstractEventLoop
    log: Logger
    relay: Relay
    table: ConnTable
    balancer: Balancer
    pause: Callable[[], None]
    resume: Callable[[], None]
    listeners: Callable[[], list[tuple[str, socket.socket]]]
    redial: Callable[[socket.socket], None]
    dials: Callable[[], int]
    take_dials: Callable[[int], list[socket.socket]]
    extra: dict[str, socket.socket] = field(default_factory=dict)
    drain_timeout: Callable[[], float] = lambda: 0.0
    # The unix socket files this process owns: path -> (st_dev, st_ino) recorded at bind.
    files: Callable[[], dict[str, tuple[int, int]]] = dict


# --- the old side --------------------------------------------------------------------------------


@dataclass
class _Batch:
    """A detached batch not yet acknowledged: the old process still owns these sockets."""

    items: list[tuple[Handed, Remote | None, socket.socket, socket.socket | None]]


class Old:
    """The running gateway's side: SIGUSR2 starts a successor and hands everything to it.

    Args:
        parts: the gateway's collaborators (built when it is ready).
        argv: the successor's command line (default: this process's, run as `-m etcdgw`).
        done: called once everything was handed over: the gateway exits 0 without
            closing (or unlinking) what it handed.
        env: extra environment for the successor (tests).
    """

    def __init__(
        self,
        parts: Callable[[], Parts | None],
        done: Callable[[], None],
        argv: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        taking_over: Callable[[], bool] = lambda: False,
    ) -> None:
        self._parts = parts
        self._done = done
        # This process is itself still taking over from its predecessor: no upgrade yet
        # (`systemctl kill -s USR2` signals every process of the unit, successor included).
        self._taking_over = taking_over
        if argv is None:
            # -P (Python 3.11): no unsafe path first on sys.path. `-m` would put the working
            # directory there, and an `etcdgw` package another user planted in a
            # world-writable one would run as this user, with the hand-over channel.
            argv = [sys.executable, "-P", "-m", "etcdgw", *sys.argv[1:]]
        self.argv = list(argv)
        self.env = env
        self.busy = False
        self.stop_deferred: Callable[[], None] | None = None
        self.handed_over = False

    def __call__(self) -> None:
        """SIGUSR2: start a hand-over (one at a time)."""
        parts = self._parts()
        if parts is None:
            return
        if self.busy:
            parts.log.warn("SIGUSR2 during a live upgrade; ignored", signal="SIGUSR2")
            return
        if self._taking_over():
            parts.log.warn(
                "SIGUSR2 while taking over from the old process; ignored", signal="SIGUSR2"
            )
            return
        if self.handed_over:
            return
        if os.getpid() == 1:
            # PID 1 of its PID namespace (a container without an init): when it exits after
            # the hand-over, the kernel kills every process of the namespace, the successor
            # with all it took over.
            parts.log.warn(
                "SIGUSR2 as PID 1 (no init process): a live upgrade would end with this "
                "process and the kernel would kill the successor; ignored. Run etcdgw under "
                "an init (docker run --init, tini)",
                signal="SIGUSR2",
            )
            return
        if parts.table.draining:
            parts.log.warn("SIGUSR2 while stopping; ignored", signal="SIGUSR2")
            return
        self.busy = True
        task = parts.loop.create_task(self._run(parts))
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    def defer_stop(self, stop: Callable[[], None]) -> bool:
        """A stop signal during a hand-over waits for its end: after a success the process
        exits anyway; after a failure `stop` (drain) runs then. True when deferred."""
        if not self.busy:
            return False
        parts = self._parts()
        if self.stop_deferred is None and parts is not None:
            parts.log.warn("stop signal during a live upgrade; acted on when it ends")
        self.stop_deferred = stop
        return True

    async def _run(self, parts: Parts) -> None:
        log = parts.log
        t0 = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc: subprocess.Popen[bytes] | None = None
        state = _OldState()
        try:
            env = dict(os.environ)
            env.update(self.env or {})
            env[ENV_FD] = str(theirs.fileno())
            # The successor tells systemd itself, once it is the main process (DONE); so
            # does this one, at DONE (_committed).
            log.info("SIGUSR2: starting a successor for a live upgrade", argv=self.argv)
            proc = _spawn(self.argv, env, theirs.fileno())
            theirs.close()
            state.proc = proc
            await self._handover(parts, ours, state)
        except ProtocolError as e:
            await self._failed(parts, state, str(e), proc)
        except Exception as e:  # a bug must not strand a batch or leave accept paused
            await self._failed(parts, state, f"internal error: {e!r}", proc)
        else:
            self.handed_over = True
            assert proc is not None
            acked = await self._committed(parts, ours, proc)
            if acked is None:
                self.handed_over = False
                self._resume_after_dead(parts, state, proc)
            else:
                log.info(
                    "live upgrade done; exiting",
                    successor=proc.pid,
                    pairs=state.pairs,
                    seconds=round(time.monotonic() - t0, 3),
                    acknowledged=acked,
                )
                self._done()
        finally:
            ours.close()
            if theirs.fileno() >= 0:
                theirs.close()
            self.busy = False
            stop, self.stop_deferred = self.stop_deferred, None
            if stop is not None and not self.handed_over:
                stop()

    async def _handover(self, parts: Parts, sock: socket.socket, state: _OldState) -> None:
        sock.settimeout(START_DEADLINE)
        # No SO_PEERCRED check here: on a socketpair it names this process (module doc).
        hello, fds = await asyncio.to_thread(expect, sock, "HELLO", 4096)
        _close_all(fds)
        if hello.get("version") != VERSION:
            reason = f"successor speaks protocol version {hello.get('version')!r}, not {VERSION}"
            await asyncio.to_thread(_send_error, sock, reason)
            raise ProtocolError(reason)
        listeners = parts.listeners()
        keys = [k for k, _ in listeners] + list(parts.extra)
        lfds = [s.fileno() for _, s in listeners] + [s.fileno() for s in parts.extra.values()]
        sock.settimeout(MESSAGE_DEADLINE)
        # The socket files it owns, by inode: the successor chmods or unlinks a file only
        # while it is still that one (not one another process put at the path since).
        files = [[p, dev, ino] for p, (dev, ino) in parts.files().items()]
        msg = {
            "type": "LISTENERS",
            "version": VERSION,
            "pid": os.getpid(),
            "keys": keys,
            "files": files,
        }
        await asyncio.to_thread(send_msg, sock, msg, lfds)
        sock.settimeout(START_DEADLINE)
        ready, fds = await asyncio.to_thread(expect, sock, "READY", 4096)
        _close_all(fds)
        state.ready = True
        drain = ready.get("drain")
        if isinstance(drain, int | float) and not isinstance(drain, bool) and drain >= 0:
            state.drain = min(float(drain), 365 * 86400.0)
        deadline = time.monotonic() + HANDOVER_DEADLINE
        sock.settimeout(MESSAGE_DEADLINE)
        # Both processes accept (one kernel queue: no connect is refused) until the first
        # ACK proves the successor alive: one that hangs right after READY leaves this one
        # accepting. With no pair to hand, an empty PAIRS is that probe.
        dials_until = 0.0
        while True:
            if time.monotonic() > deadline:
                raise ProtocolError("hand-over deadline passed")
            parts.relay.poll()  # report what started, failed or finished before detaching
            batch = self._detach(parts)
            if not state.paused:
                batch = batch or _Batch([])
            elif batch is None:
                # The clients being dialled become pairs (or detach() hands the relay
                # thread's alone); a loop dial that takes longer than DIALS_WAIT is stopped
                # and its client handed alone (it sent nothing we consumed): the successor
                # dials it again.
                if parts.dials() and time.monotonic() < dials_until:
                    await asyncio.sleep(0.005)
                    continue
                batch = _clients_alone(parts.take_dials(RECORDS_PER_BATCH))
            if batch is None:
                if parts.dials():
                    parts.log.warn(
                        "live upgrade: clients still being dialled are closed",
                        clients=parts.dials(),
                    )
                break
            state.batch = batch
            recs = [pair_record(h, r) for h, r, _, _ in batch.items]
            fds = [fd for h, _, _, _ in batch.items for fd in _fds_of(h)]
            await asyncio.to_thread(send_msg, sock, {"type": "PAIRS", "pairs": recs}, fds)
            ack, afds = await asyncio.to_thread(expect, sock, "ACK", 4096)
            _close_all(afds)
            if ack.get("n") != len(batch.items):
                raise ProtocolError(f"successor acknowledged {ack.get('n')!r} of {len(recs)}")
            state.batch = None
            for _, _, c, u in batch.items:  # the successor owns them now
                c.close()
                if u is not None:
                    u.close()
            state.pairs += len(batch.items)
            if not state.paused:  # the successor answers: it alone accepts from now on
                parts.pause()
                state.paused = True
                dials_until = time.monotonic() + DIALS_WAIT
            await asyncio.sleep(0)  # let the loop breathe between batches
        if state.proc is not None and state.proc.poll() is not None:
            raise ProtocolError(f"successor exited ({state.proc.returncode}) before DONE")
        await asyncio.to_thread(send_msg, sock, {"type": "DONE"})
        # DONE is sent: the hand-over is committed. The successor holds every pair and, on
        # reading DONE, claims the unix socket files and the main PID: if it stalls, this
        # process never serves again; only if it dies before its last ACK (nobody would
        # serve) does this one take the service back (_committed).

    async def _committed(
        self, parts: Parts, sock: socket.socket, proc: subprocess.Popen[bytes]
    ) -> bool | None:
        """After DONE: systemd's main PID is the successor's (told by this process, the main
        PID until now: NotifyAccess=main is enough); then the successor's last ACK is
        waited for (MESSAGE_DEADLINE), only to say whether it came: True, or False (this
        process exits next, closing its listener copies without unlinking a file). None: no
        ACK and the successor is dead (it died on reading DONE): nobody else serves, and
        this process still holds every listener, so it takes the service back."""
        try:
            systemd.notify(f"MAINPID={proc.pid}")
        except OSError as e:
            parts.log.warn("failed to notify systemd of the new main process", error=str(e))
        sock.settimeout(MESSAGE_DEADLINE)
        try:
            _, afds = await asyncio.to_thread(expect, sock, "ACK", 4096)
        except ProtocolError as e:
            # EOF can come a moment before the successor's exit status (its fds close
            # first): look for DEAD_WAIT. A successor that only stalls (alive) keeps all.
            end = time.monotonic() + DEAD_WAIT
            while proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.01)
            if proc.poll() is not None:
                return None
            parts.log.warn(
                "live upgrade: no final ACK from the successor; it holds everything now",
                error=str(e),
                successor=proc.pid,
            )
            return False
        _close_all(afds)
        return True

    def _resume_after_dead(
        self, parts: Parts, state: _OldState, proc: subprocess.Popen[bytes]
    ) -> None:
        """The successor died between DONE and its last ACK: main PID back to this process,
        accept again on the listeners it never closed; the pairs it had handed are lost."""
        try:
            systemd.notify(f"MAINPID={os.getpid()}")
        except OSError as e:
            parts.log.warn("failed to notify systemd of the main process", error=str(e))
        if state.paused:
            parts.resume()
            state.paused = False
        parts.log.error(
            "live upgrade failed: the successor died after DONE; serving again, "
            "the pairs it had taken over are lost"
            if self.stop_deferred is None
            else "live upgrade failed: the successor died after DONE; the pairs it had "
            "taken over are lost; stopping as asked during it (draining)",
            successor=proc.pid,
            exit=proc.returncode,
            **{"lost-pairs": state.pairs},
        )

    def _detach(self, parts: Parts) -> _Batch | None:
        handed = parts.relay.detach(PAIRS_PER_BATCH)
        if not handed:
            return None
        items = []
        for h in handed:
            conn = parts.table.forget(h.pair_id)
            remote = conn.remote if conn is not None else parts.balancer.by_tag(h.tag)
            if conn is not None and conn.client is not None:
                c = conn.client
                u = conn.upstream if h.upstream_fd >= 0 else None
                if h.upstream_fd < 0 and conn.upstream is not None:
                    conn.upstream.close()
            else:  # the relay thread's own pair: its fds are ours now
                c = socket.socket(fileno=h.client_fd)
                u = socket.socket(fileno=h.upstream_fd) if h.upstream_fd >= 0 else None
            items.append((h, remote, c, u))
        return _Batch(items)

    async def _failed(
        self, parts: Parts, state: _OldState, why: str, proc: subprocess.Popen[bytes] | None
    ) -> None:
        """Take back what was not acknowledged, accept again, one log line."""
        batch = state.batch
        if proc is not None and proc.poll() is None and (batch is not None or not state.ready):
            # Before READY it holds nothing of ours: it is exiting (give it a moment, for
            # its status) or hung. With a batch unacknowledged, it may have adopted it: two
            # relays on one socket would interleave bytes. Either way it goes first.
            try:
                await asyncio.to_thread(proc.wait, 0.0 if batch is not None else 1.0)
            except subprocess.TimeoutExpired:
                try:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 5.0)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        readopted = 0
        if batch is not None:
            for h, remote, c, u in batch.items:
                readopted += 1
                if u is None:
                    parts.redial(c)
                    continue
                if remote is None:  # pruned meanwhile: keep relaying under no endpoint
                    remote = parts.balancer.stranger(Endpoint("unknown", 0))
                try:
                    pid = parts.relay.adopt(h._replace(tag=remote.tag))
                except OSError:
                    c.close()
                    u.close()
                    continue
                parts.table.adopted(pid, c, u, remote)
            state.batch = None
        if state.paused:
            parts.resume()
        if proc is not None and proc.poll() is None:
            after = max(REAP_AFTER_READY, state.drain + REAP_MARGIN)
            task = parts.loop.create_task(_reap(proc, after, parts.log))
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        parts.log.error(
            "live upgrade failed; keeping on serving"
            if self.stop_deferred is None
            else "live upgrade failed; stopping as asked during it (draining)",
            error=why,
            successor=proc.pid if proc is not None else 0,
            exit=proc.poll() if proc is not None else None,
            **{"handed-pairs": state.pairs, "taken-back": readopted},
        )


def _spawn(argv: list[str], env: dict[str, str], fd: int) -> subprocess.Popen[bytes]:
    """Start the successor with SIGUSR2 ignored (SIG_IGN survives exec): until its own
    handlers are installed, a SIGUSR2 (`systemctl kill` signals the whole unit) would end it
    by the default action. cli.main's start-up handlers take over from there."""
    try:
        prev = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    except ValueError:  # not the main thread (tests run gateways in threads)
        prev = None
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(fd,), env=env)
    finally:
        if prev is not None:
            signal.signal(signal.SIGUSR2, prev)


def _clients_alone(clients: list[socket.socket]) -> _Batch | None:
    """A batch of clients whose dial had not finished, handed without an upstream."""
    if not clients:
        return None
    return _Batch(
        [
            (Handed(-1, c.fileno(), -1, -1, 0, 0, False, False, b"", b""), None, c, None)
            for c in clients
        ]
    )


async def _reap(proc: subprocess.Popen[bytes], after: float, log: Logger) -> None:
    """A successor that failed after READY: it drains what it adopted (at most its
    --drain-timeout, told in READY) and exits by itself; waited for (no zombie), killed
    (one line) only past `after`: that drain timeout plus REAP_MARGIN, at least
    REAP_AFTER_READY. Polled from the loop (no executor thread: Runner.close would join one
    blocked in Popen.wait, and a SIGTERM to this process would wait for it); cancelled when
    this process stops, leaving the successor to end its drain by itself."""
    end = time.monotonic() + after
    while proc.poll() is None:
        if time.monotonic() > end:
            break
        await asyncio.sleep(REAP_POLL)
    else:
        return
    log.warn(
        "live upgrade: killing the failed successor, still running past its drain timeout",
        successor=proc.pid,
        waited=round(after, 1),
    )
    try:
        proc.send_signal(signal.SIGKILL)
    except OSError:
        return
    end = time.monotonic() + 5.0
    while proc.poll() is None and time.monotonic() < end:
        await asyncio.sleep(REAP_POLL)


@dataclass
class _OldState:
    proc: subprocess.Popen[bytes] | None = None
    batch: _Batch | None = None
    paused: bool = False
    ready: bool = False
    pairs: int = 0
    drain: float = 0.0  # the successor's --drain-timeout (READY)


def _send_error(sock: socket.socket, reason: str) -> None:
    try:
        send_msg(sock, {"type": "ERROR", "error": reason})
    except ProtocolError:
        pass


# --- the successor's side -------------------------------------------------------------


class Successor:
    """The new process's side of the channel named by $ETCDGW_UPGRADE_FD.

    listeners() runs before anything is bound (blocking, bounded); serve() on the loop once
    the gateway is ready: READY, then adopt every batch until DONE.
    """

    def __init__(self, sock: socket.socket, log: Logger) -> None:
        self.sock = sock
        self.log = log
        self.old_pid = 0
        # Until DONE this process is not systemd's main process: nothing it would tell
        # systemd (READY=1, STOPPING=1 on a failed hand-over's drain) is sent.
        self._notify = os.environ.pop("NOTIFY_SOCKET", None)
        self.pairs = 0
        self.done = False  # the hand-over ended (taken over, or failed)
        # The old process's unix socket files (LISTENERS): path -> (st_dev, st_ino).
        self.files: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_env(cls, log: Logger) -> Successor | None:
        """The channel the old process passed, or None when this is no successor.

        Raises:
            ConfigError: $ETCDGW_UPGRADE_FD is not an open unix stream socket.
        """
        raw = os.environ.pop(ENV_FD, None)
        if raw is None:
            return None
        try:
            fd = int(raw)
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise OSError("not a unix stream socket")
        except (ValueError, OSError) as e:
            raise ConfigError(f"live upgrade: bad {ENV_FD}={raw!r}: {e}", stream="stderr") from None
        return cls(sock, log)

    def listeners(self) -> dict[str, socket.socket]:
        """HELLO, then the old process's listeners by key (--listen-addr, or `metrics`).

        Raises:
            ConfigError: one line (the old process keeps serving).
        """
        sock = self.sock
        try:
            sock.settimeout(MESSAGE_DEADLINE)
            self.old_pid = check_peer(sock)
            send_msg(sock, {"type": "HELLO", "version": VERSION, "pid": os.getpid()})
            msg, fds = expect(sock, "LISTENERS", 1 << 20)
            try:
                check_version(msg)
                keys = msg.get("keys")
                if (
                    not isinstance(keys, list)
                    or len(keys) != len(fds)
                    or not all(isinstance(k, str) for k in keys)
                ):
                    raise ProtocolError("listener keys do not match the descriptors")
                self.files = _files(msg.get("files", []))
                socks = {}
                for k, fd in zip(keys, fds, strict=True):
                    s = socket.socket(fileno=fd)
                    if s.type != socket.SOCK_STREAM or not _listening(s):
                        s.close()
                        raise ProtocolError(f"descriptor for {k} is not a listening socket")
                    socks[k] = s
                fds = []
            finally:
                _close_all(fds)
        except ProtocolError as e:
            self._refuse(str(e))
            sock.close()
            raise ConfigError(f"live upgrade failed: {e}", stream="stderr") from None
        return socks

    def _refuse(self, reason: str) -> None:
        try:
            send_msg(self.sock, {"type": "ERROR", "error": reason})
        except ProtocolError:
            pass

    async def serve(
        self, parts: Parts, on_lost: Callable[[], None], on_main: Callable[[], None]
    ) -> None:
        """READY; adopt each batch and acknowledge it; DONE: tell systemd we are main.

        on_lost: the channel failed before DONE (the old one takes back its batch): this
        process drains what it adopted (a stop) and exits.
        on_main: at DONE, before the ACK: this process owns the service now (it claims the
        unix socket files, to unlink them when it stops).
        """
        sock = self.sock
        log = self.log
        t0 = time.monotonic()
        try:
            sock.settimeout(MESSAGE_DEADLINE)
            ready = {"type": "READY", "pid": os.getpid(), "drain": parts.drain_timeout()}
            await asyncio.to_thread(send_msg, sock, ready)
            sock.settimeout(HANDOVER_DEADLINE + MESSAGE_DEADLINE)
            accepting = False
            while True:
                msg, fds = await asyncio.to_thread(recv_msg, sock)
                if msg["type"] == "DONE":
                    # Committed: the old process exits whatever happens next, so from here
                    # this process owns the service (the files, the main PID) for good.
                    _close_all(fds)
                    if not accepting:  # (an old one that sent no PAIRS at all)
                        parts.resume()
                    self.done = True
                    on_main()
                    self._main_now(log)
                    try:
                        await asyncio.to_thread(send_msg, sock, {"type": "ACK"})
                    except ProtocolError:
                        pass  # the old one did not wait (it need not)
                    break
                if msg["type"] != "PAIRS":
                    _close_all(fds)
                    raise ProtocolError(f"expected PAIRS or DONE, got {str(msg['type'])[:40]}")
                n = self._adopt(parts, msg, fds)
                await asyncio.to_thread(send_msg, sock, {"type": "ACK", "n": n})
                self.pairs += n
                if not accepting:
                    # Accepting only now that an ACK proved this process alive (the old one
                    # accepts until it reads it): one that hangs before takes no client.
                    parts.resume()
                    accepting = True
        except ProtocolError as e:
            log.error(
                "live upgrade failed; the old process keeps serving, draining what was taken",
                error=str(e),
                pairs=self.pairs,
            )
            self.done = True
            sock.close()
            on_lost()
            return
        sock.close()
        self.done = True
        log.info(
            "live upgrade: took over",
            pid=os.getpid(),
            old=self.old_pid,
            pairs=self.pairs,
            seconds=round(time.monotonic() - t0, 3),
        )

    def _main_now(self, log: Logger) -> None:
        if self._notify is None:
            return
        os.environ["NOTIFY_SOCKET"] = self._notify
        try:
            systemd.notify(f"MAINPID={os.getpid()}\nREADY=1")
        except OSError as e:
            log.warn("failed to notify systemd of the new main process", error=str(e))

    def _adopt(self, parts: Parts, msg: dict[str, Any], fds: list[int]) -> int:
        """Relay every pair of a PAIRS message; return how many (all, or ProtocolError with
        nothing adopted and every fd closed)."""
        recs = msg.get("pairs")
        try:
            if not isinstance(recs, list) or len(recs) > RECORDS_PER_BATCH:
                raise ProtocolError("malformed PAIRS message")
            want = sum(2 if isinstance(r, dict) and r.get("up") else 1 for r in recs)
            if want != len(fds):
                raise ProtocolError(f"PAIRS message carries {len(fds)} fds for {want}")
            plan = []
            i = 0
            for r in recs:
                h = _handed(r, fds[i], fds[i + 1] if r.get("up") else -1)
                i += 2 if r.get("up") else 1
                plan.append((h, r))
            for h, _ in plan:
                for fd in _fds_of(h):
                    s = socket.socket(fileno=fd)
                    ok = s.type == socket.SOCK_STREAM and s.family in (
                        socket.AF_INET,
                        socket.AF_INET6,
                        socket.AF_UNIX,
                    )
                    s.detach()
                    if not ok:
                        raise ProtocolError("a handed descriptor is not a stream socket")
        except (ProtocolError, OSError, ValueError, TypeError, KeyError) as e:
            _close_all(fds)
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"malformed PAIRS message: {e}") from None
        for h, r in plan:
            client = socket.socket(fileno=h.client_fd)
            client.setblocking(False)
            if h.upstream_fd < 0:
                parts.redial(client)
                continue
            upstream = socket.socket(fileno=h.upstream_fd)
            upstream.setblocking(False)
            remote = _remote_for(parts.balancer, r)
            try:
                pid = parts.relay.adopt(h._replace(tag=remote.tag))
            except (OSError, ValueError) as e:
                log = parts.log
                log.warn("live upgrade: could not adopt a pair", error=str(e))
                client.close()
                upstream.close()
                continue
            parts.table.adopted(pid, client, upstream, remote)
        return len(plan)


def _handed(r: Any, client_fd: int, upstream_fd: int) -> Handed:
    if not isinstance(r, dict):
        raise ProtocolError("malformed pair record")
    c2u, u2c = r.get("c2u", 0), r.get("u2c", 0)
    if not isinstance(c2u, int) or not isinstance(u2c, int) or c2u < 0 or u2c < 0:
        raise ProtocolError("malformed pair counters")
    return Handed(
        pair_id=-1,
        client_fd=client_fd,
        upstream_fd=upstream_fd,
        tag=-1,
        c2u=c2u,
        u2c=u2c,
        client_eof=bool(r.get("ce")),
        upstream_eof=bool(r.get("ue")),
        to_upstream=base64.b64decode(r.get("tu", ""), validate=True),
        to_client=base64.b64decode(r.get("tc", ""), validate=True),
    )


def _remote_for(balancer: Balancer, r: dict[str, Any]) -> Remote:
    """The remote a handed pair belongs to: by address; one the new configuration does not
    list is kept as a removed remote until its pairs end (as after a reload)."""
    host, port = r.get("host"), r.get("port")
    if isinstance(host, str) and isinstance(port, int):
        for rem in balancer.remotes:
            if rem.endpoint.host == host and rem.endpoint.port == port:
                return rem
        return balancer.stranger(Endpoint(host, port))
    return balancer.stranger(Endpoint("unknown", 0))


def _files(raw: Any) -> dict[str, tuple[int, int]]:
    """LISTENERS' `files`: [[path, st_dev, st_ino], ...]."""
    if not isinstance(raw, list) or len(raw) > 4096:
        raise ProtocolError("malformed listener files")
    out = {}
    for f in raw:
        if (
            not isinstance(f, list)
            or len(f) != 3
            or not isinstance(f[0], str)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in f[1:])
        ):
            raise ProtocolError("malformed listener files")
        out[f[0]] = (f[1], f[2])
    return out


def _listening(s: socket.socket) -> bool:
    try:
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
