"""The listening sockets and the TCP options of every relayed socket.

`ListenerSet` binds what --listen-addr asks for (or adopts systemd's sockets), owns the
sockets and the unix socket files it created, and closes them once. `TcpOptions` is the one
rule for socket options (TCP_NODELAY, keep-alive from --tcp-keepalive), applied to upstream
sockets, to listeners (Linux copies them to the clients it accepts) and, when a client did
not inherit them, to each client: by the loop's accept (accept.py) or, from the list it is
given, by the relay thread's native accept (_accept.pxi).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import stat

from .config import Config, ConfigError, Listen, format_addr
from .goerrors import strerror

__all__ = [
    "ACTIVATED",
    "LATE_OPTIONS_AFTER",
    "LateOptions",
    "ListenerSet",
    "TcpOptions",
    "set_options",
    "sock_name",
]

SockOpt = tuple[int, int, int]

# The key (ListenerSet.keys) of a listener systemd passed (socket activation): a live upgrade
# hands it to the successor under this prefix, which takes it as inherited, not bound.
ACTIVATED = "systemd "

# Keep-alive options go on an upstream socket once its connection has lived this long (the
# shortest --tcp-keepalive: they cannot matter sooner, and short connections save 5 calls).
# The relay thread does the same for its own dials (_accept.pxi); LateOptions for the loop's.
LATE_OPTIONS_AFTER = 1.0


def set_options(sock: socket.socket, opts: list[SockOpt]) -> None:
    for level, opt, value in opts:
        sock.setsockopt(level, opt, value)


class TcpOptions:
    """(level, option, value) for every relayed TCP socket, for the current --tcp-keepalive."""

    def __init__(self) -> None:
        self._for: float | None = None
        self._opts: list[SockOpt] = []
        self._split: tuple[list[SockOpt], list[SockOpt]] = ([], [])
        # listener -> (tcp_keepalive it was tuned for, its clients inherit it: None = unknown)
        self._listener_state: dict[socket.socket, tuple[float, bool | None]] = {}

    def options(self, keepalive: float) -> list[SockOpt]:
        if self._for != keepalive:
            opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            if keepalive:
                # Go dials and accepts with a 15 s keep-alive; we also bound the probe count
                # and unacknowledged data, so a dead peer is noticed within about 4 x this.
                secs = max(1, int(keepalive))
                opts += [
                    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
                    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, secs * 4000),
                ]
            self._opts, self._split, self._for = opts, (opts[:1], opts[1:]), keepalive
        return self._opts

    def apply(self, sock: socket.socket, keepalive: float) -> None:
        set_options(sock, self.options(keepalive))

    def split(self, keepalive: float) -> tuple[list[SockOpt], list[SockOpt]]:
        """(options an upstream socket gets before connect, those it gets once it lived
        LATE_OPTIONS_AFTER): TCP_NODELAY at once, the keep-alive ones late. Computed once
        per --tcp-keepalive value, like options(): this is on every dial's path."""
        self.options(keepalive)
        return self._split

    def tune_listener(self, lsock: socket.socket, keepalive: float) -> bool:
        """Whether lsock's clients come out of accept() tuned already.

        Linux copies these options from the listening socket to the sockets it accepts, which
        saves six setsockopt calls per client. The listener is tuned for the current config
        (again after a reload changed it); the first client accepted after that is checked
        (tune_accepted), and if it did not inherit them, every client is tuned by hand.
        """
        state = self._listener_state.get(lsock)
        if state is not None and state[0] == keepalive:
            return state[1] is True
        opts = self.options(keepalive)
        try:
            set_options(
                lsock, opts if keepalive else [*opts, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]
            )
        except OSError:
            self._listener_state[lsock] = (keepalive, False)
            return False
        self._listener_state[lsock] = (keepalive, None)  # None: not checked on a client yet
        return False

    def tune_accepted(self, lsock: socket.socket, client: socket.socket, keepalive: float) -> bool:
        """Tune an accepted TCP client unless it inherited the listener's options; return
        whether the following clients of this wake-up still need tuning."""
        state = self._listener_state.get(lsock)
        if state is not None and state[1] is None:
            opts = self.options(keepalive)
            try:
                inherited = all(client.getsockopt(lvl, opt) == v for lvl, opt, v in opts)
            except OSError:
                inherited = False
            self._listener_state[lsock] = (state[0], inherited)
            if inherited:
                return False
        self.apply(client, keepalive)
        return True

    def forget(self, lsock: socket.socket) -> None:
        self._listener_state.pop(lsock, None)


class LateOptions:
    """The keep-alive half of TcpOptions.split() for upstream sockets the loop dialled, given
    once their connection has lived LATE_OPTIONS_AFTER; one timer for all of them."""

    def __init__(self, tcp: TcpOptions, loop: asyncio.AbstractEventLoop) -> None:
        self._tcp = tcp
        self._loop = loop
        self._due: collections.deque[tuple[float, socket.socket, float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, sock: socket.socket, keepalive: float) -> None:
        """sock (connected) gets keepalive's late options in LATE_OPTIONS_AFTER if still open."""
        if not keepalive:
            return
        self._due.append((self._loop.time() + LATE_OPTIONS_AFTER, sock, keepalive))
        if self._timer is None:
            self._timer = self._loop.call_at(self._due[0][0], self._run)

    def _run(self) -> None:
        self._timer = None
        due, now = self._due, self._loop.time()
        while due and due[0][0] <= now:
            _, sock, keepalive = due.popleft()
            if sock.fileno() < 0:
                continue  # the connection ended first: the point of waiting
            try:
                set_options(sock, self._tcp.split(keepalive)[1])
            except OSError:
                pass  # reset meanwhile: the relay reports it
        if due:
            self._timer = self._loop.call_at(due[0][0], self._run)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()


class ListenerSet:
    """The gateway's listening sockets, bound once at start-up and closed once."""

    def __init__(
        self,
        cfg: Config,
        inherited: list[socket.socket] | None = None,
        handed: dict[str, socket.socket] | None = None,
        handed_files: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.socks: list[socket.socket] = []
        # What each socket listens for: its --listen-addr (a live upgrade matches by it), or
        # ACTIVATED + its name for systemd's.
        self.keys: list[str] = []
        self._inherited = list(inherited or ())
        # A live upgrade's listeners (upgrade.py), by --listen-addr: used instead of binding.
        self._handed = dict(handed or {})
        # The unix socket files the old process owned: path -> (st_dev, st_ino) as it
        # recorded them at bind. Only a file still that inode is ours to chmod or unlink: one
        # another process put at the path since (same user or not) is left alone.
        self._owned_by_old = dict(handed_files or {})
        self._handed_files: dict[str, tuple[int, int]] = {}
        # Unix socket files of handed listeners the new configuration dropped: path ->
        # (st_dev, st_ino); ours to unlink once the hand-over is complete (claim_handed).
        self._dropped_files: dict[str, tuple[int, int]] = {}
        # Unix socket files we created: path -> (st_dev, st_ino) at bind. On close a file is
        # unlinked only if it is still ours: another instance may have replaced it since.
        self._files: dict[str, tuple[int, int]] = {}

    def bind(self) -> None:
        """Create and bind every listener (or adopt systemd's), before anything is served.

        Raises:
            ConfigError: the Go gateway's bind message on stderr, e.g.
                `listen tcp 127.0.0.1:23790: bind: address already in use`.
        """
        if self._inherited:
            for s in self._inherited:
                s.setblocking(False)
                self.socks.append(s)
                self.keys.append(ACTIVATED + sock_name(s))
            return
        handed, self._handed = self._handed, {}
        try:
            for ls in self.cfg.listen:
                given = handed.pop(ls.addr, None)
                if given is not None:
                    given.setblocking(False)
                    ident = self._owned_by_old.get(ls.path) if ls.path is not None else None
                    if ls.path is not None and ident is not None:
                        try:  # the configured mode, which may have changed since
                            ours = _set_mode(ls.path, self.cfg.listen_unix_mode, ident)
                        except (OSError, _Replaced) as e:
                            given.close()
                            reason = str(e) if isinstance(e, _Replaced) else strerror(e)
                            raise ConfigError(
                                f"listen unix {ls.path}: {reason}", stream="stderr"
                            ) from None
                        if ours:  # claimed once the old one left
                            self._handed_files[ls.path] = ident
                    self.socks.append(given)
                else:
                    self.socks.append(self._bind_one(ls))
                self.keys.append(ls.addr)
        except BaseException:
            self.close()
            raise
        finally:
            for unwanted in handed.values():  # not wanted any more
                self._note_dropped(unwanted)
                unwanted.close()

    def _note_dropped(self, sock: socket.socket) -> None:
        """A handed unix listener the configuration dropped: its file (still the old
        process's until the hand-over completes) is unlinked by claim_handed()."""
        if sock.family != socket.AF_UNIX:
            return
        try:
            path = sock.getsockname()
            if not isinstance(path, str) or not path or path.startswith("\0"):
                return  # abstract or unnamed: no file
        except OSError:
            return
        ident = self._owned_by_old.get(path)
        if ident is not None:  # the old one's file, if still that inode at claim_handed()
            self._dropped_files[path] = ident

    def claim_handed(self) -> None:
        """A live upgrade is complete: the handed unix socket files are ours to unlink
        (each only while it is still the inode the old process recorded)."""
        self._files.update(self._handed_files)
        self._handed_files = {}
        for path, ident in self._dropped_files.items():
            _unlink_if(path, ident)  # nobody listens there any more
        self._dropped_files = {}

    def files(self) -> dict[str, tuple[int, int]]:
        """The unix socket files this process owns: path -> (st_dev, st_ino) (a live upgrade
        sends them to the successor)."""
        return dict(self._files)

    def release(self) -> None:
        """A live upgrade handed every listener over: close ours, unlink no socket file."""
        self._files = {}
        self.close()

    def close(self) -> None:
        """Close every listener and unlink the socket files that are still ours."""
        for s in self.socks:
            s.close()
        self.socks = []
        self.keys = []
        for path, ident in self._files.items():
            _unlink_if(path, ident)
        self._files = {}

    def names(self) -> list[str]:
        return [sock_name(s) for s in self.socks]

    def _bind_one(self, ls: Listen) -> socket.socket:
        if ls.path is not None:
            return self._bind_unix(ls.path)
        try:
            return bind_tcp(ls.host, ls.port, ls.addr)
        except socket.gaierror:
            raise ConfigError(f"failed to resolve listen host: {ls.host}") from None

    def _bind_unix(self, path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            # A stale socket file from an earlier run is replaced; anything else is refused.
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(
                    f"listen unix {path}: bind: file exists and is not a socket", stream="stderr"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if probe.connect_ex(path) == 0:
                    raise ConfigError(
                        f"listen unix {path}: bind: address already in use", stream="stderr"
                    )
            finally:
                probe.close()
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            self._files[path] = _claim(path, self.cfg.listen_unix_mode)
            # Only now: until listen() a connect() is refused, so nobody got in while the
            # file still had the umask's mode.
            sock.listen(socket.SOMAXCONN)
        except (OSError, _Replaced) as e:
            sock.close()  # the file, once claimed, goes with the others in bind()'s close()
            reason = str(e) if isinstance(e, _Replaced) else f"bind: {strerror(e)}"
            raise ConfigError(f"listen unix {path}: {reason}", stream="stderr") from None
        sock.setblocking(False)
        return sock


class _Replaced(Exception):
    """The socket file bind() created is no longer at its path (another process swapped it),
    or its mode cannot be set safely; the message says which."""


def _claim(path: str, mode: int) -> tuple[int, int]:
    """Give the socket file bind() just created at path its mode; return (st_dev, st_ino).

    chmod(path) after bind() followed a symbolic link swapped in between, and so changed the
    mode of any file (/etc/shadow) for a root-run gateway, given write access to the socket's
    directory (issue 18). The alternatives, checked on Linux 6.18 / glibc 2.36:
    - fchmod() of the socket before bind() does set the mode bind() gives the file, but the
      umask still strips bits from it (0660 under umask 022 gives 0640);
    - setting the umask around bind() creates the file with the exact mode, but the umask is
      the whole process's: files other threads create meanwhile would get it too;
    - os.chmod(path, follow_symlinks=False) raises NotImplementedError before glibc 2.32 and
      does not check whose file it changes; and a default ACL on the directory can narrow
      the mode bind() gives, so a chmod after bind() is needed in any case.
    So the path is opened with O_PATH | O_NOFOLLOW (a symbolic link is opened as itself,
    never followed), the descriptor must be what bind() creates: a socket file of our user
    with one link (not a hard link to some other file, not another user's socket), and the
    mode is set through /proc/self/fd, on the inode already opened, not on a path looked up
    again (glibc's fchmodat(AT_SYMLINK_NOFOLLOW) does the same). The device and inode read
    here are what close() later unlinks only while they are still at the path.

    Raises:
        _Replaced: the path no longer names a socket file bind() could have created.
        OSError: the chmod failed.
    """
    fd, st = _open_our_socket(path, "socket file", " before its mode was set")
    try:
        ident = (st.st_dev, st.st_ino)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        except OSError as e:
            _unlink_if(path, ident)
            if isinstance(e, FileNotFoundError):  # no /proc: never fall back to the path
                raise _Replaced("cannot set its mode: /proc/self/fd is not available") from None
            raise
        return ident
    finally:
        os.close(fd)


def _set_mode(path: str, mode: int, ident: tuple[int, int]) -> bool:
    """Give a handed listener's socket file the configured mode, the way _claim does (O_PATH
    | O_NOFOLLOW, our socket with one link, chmod through /proc/self/fd); never unlinks it
    (the old process still serves on it). False, touching nothing, when the path names
    another socket than the old process's file (ident: its (st_dev, st_ino)).

    Raises:
        _Replaced: the path no longer names our socket file.
        OSError: the chmod failed.
    """
    fd, st = _open_our_socket(path, "handed socket file")
    try:
        if (st.st_dev, st.st_ino) != ident:
            return False
        if stat.S_IMODE(st.st_mode) != mode:
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)
            except FileNotFoundError:
                raise _Replaced("cannot set its mode: /proc/self/fd is not available") from None
    finally:
        os.close(fd)
    return True


def _open_our_socket(path: str, what: str, when: str = "") -> tuple[int, os.stat_result]:
    """An O_PATH | O_NOFOLLOW fd of path and its stat, if path names a socket of ours with one
    link (not a link to another file, not another user's socket); the caller closes the fd.

    Raises:
        _Replaced: `<what> removed<when>` or `<what> replaced by <kind><when>`.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Replaced(f"{what} removed{when}") from None
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise _Replaced(f"{what} replaced by {_kind(st)}{when}")
    return fd, st


def _unlink_if(path: str, ident: tuple[int, int]) -> None:
    """Remove path only while it is the file identified by (st_dev, st_ino)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if st.st_nlink > 1:
        return "a hard link to another file"
    if stat.S_ISSOCK(st.st_mode):
        return "another user's socket file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "another file"


def bind_tcp(host: str, port: int, shown: str) -> socket.socket:
    """A non-blocking TCP listener on host:port, as Go's net.Listen("tcp", shown) binds it
    (--listen-addr, --metrics-addr).

    An empty host or `::` listens on every address, v4 and v6; a name listens on its first
    address. The backlog is the kernel's maximum (net.core.somaxconn, 4096 on Linux >= 5.4):
    a connect flood fills it instead of overflowing a short one.

    Raises:
        socket.gaierror: host does not resolve (the caller words it).
        ConfigError: the Go gateway's bind message on stderr, e.g.
            `listen tcp 127.0.0.1:23790: bind: address already in use`.
    """
    try:
        if host in ("", "::"):
            sock = socket.create_server(
                ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=socket.SOMAXCONN
            )
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.create_server(sockaddr, family=family, backlog=socket.SOMAXCONN)
    except socket.gaierror:
        raise
    except OSError as e:
        raise ConfigError(f"listen tcp {shown}: bind: {strerror(e)}", stream="stderr") from None
    sock.setblocking(False)
    return sock


def sock_name(s: socket.socket) -> str:
    """A listening socket's printable name: `127.0.0.1:2379`, `[::1]:2379`, `unix:///path`.

    Raises:
        OSError: s is closed.
    """
    if s.family == socket.AF_UNIX:
        return f"unix://{s.getsockname()}"
    name = s.getsockname()
    return format_addr(name[0], name[1])
