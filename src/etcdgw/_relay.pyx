# cython: language_level=3, embedsignature=True, annotation_typing=False
"""Cython relay engine: one edge-triggered epoll set, bytes moved in C without the GIL."""

# This file is the Python surface (the Engine class); the C it drives is in the files it
# includes at the end: _pump.pxi (the hot path), _table.pxi (the pair table), _pick.pxi
# (the selection rule) and _accept.pxi (native accept); declarations in _relay.pxd.
#
# Strategy (docs/engine.md has the long form; _relay_py.py is the same logic in Python):
# - each pair sits in a C table slot; its two fds are registered once, edge-triggered, with
#   epoll data = (pair id << 1) | side, so an event finds its pair in O(1) and no epoll_ctl
#   runs per event;
# - bytes go src -> shared scratch buffer -> dst at once; only what dst refuses is copied to
#   a per-direction buffer, and src is not read again until that buffer is flushed, so idle
#   pairs hold no buffers and a stalled reader holds at most one read's worth per direction;
# - a direction whose reads fill the buffer is moving bulk data: it borrows a pipe and
#   splice(2)s src -> pipe -> dst (no copies through user space, as Go's io.Copy does) until
#   src runs dry, then closes the pipe: idle pairs (and an idle engine) hold no pipes, and
#   a cap on pipes open at once keeps the fd budget predictable;
# - threaded mode (the default): a native thread of the engine's own, which never takes the
#   GIL and blocks every signal, sleeps in epoll_wait and handles each batch of events under
#   a mutex; it announces finished pairs on an eventfd, which is what fileno() returns, and
#   run() only collects them. Relaying bytes costs no Python at all: the asyncio loop wakes
#   up for new and finished pairs only. add/remove/stats/totals take the same mutex, so
#   remove() returning means the thread is done with those fds;
# - loop mode (threaded=False): run() does epoll_wait and all event handling inside one
#   `with nogil:` block on the caller's thread; fileno() is the epoll fd itself;
# - either way finished pairs wait in a C list and Python tuples are built with the GIL.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport (
    EAGAIN, EBADF, ECONNREFUSED, EINPROGRESS, EINTR, EINVAL, EMFILE, ENFILE, ENOBUFS, ENOMEM,
    ENOTCONN, ENOTSOCK, ETIMEDOUT, errno,
)
from libc.signal cimport SIG_DFL, SIGPIPE
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strerror
from posix.signal cimport SIG_BLOCK, SIG_SETMASK, sigaction, sigaction_t, sigfillset
from posix.types cimport sigset_t
from posix.unistd cimport close, read, write

from .balancer import DEFAULT_SEED
from .engine import BUFSIZE, Failed, Finished, Handed, Paused, Report, ShortSum, Started

# The xorshift64* state of SRV weighted draws starts from balancer.DEFAULT_SEED, its one
# owner (mixed with the engine's address, so two engines draw differently).
cdef uint64_t XS_SEED = DEFAULT_SEED
cdef uint64_t WAKE_KEY = 0xFFFFFFFFFFFFFFFF  # epoll key of the thread's wake-up eventfd
cdef uint64_t LISTEN_KEY = 0xFFFFFFFFFFFFFF00  # + index: epoll keys of native listeners
# Started and finished pairs are bookkeeping for the loop (the bytes and the sockets are
# done with): the thread lets them gather for up to this long, or REPORT_BATCH of them,
# before it wakes the loop, which then handles them in one go. Failed dials (a client is
# waiting) and errors are announced at once.
cdef uint64_t REPORT_DELAY_NS = 50000000
# least-connections: a pair its upstream ended within this long, silent, is a strike (the
# loop's rule: monitor.IMMEDIATE; tests/test_dial.py holds the two together).
cdef uint64_t IMMEDIATE_NS = 1000000000

# Benchmarks compare splice with plain recv/send through _set_splice(); not an API.
cdef bint splice_enabled = True

# Engine(threaded=None) means this: a relay thread of the engine's own (measured: see
# docs/engine.md). A module constant so benchmarks can compare; not an API.
THREADED = True


def _set_splice(on: bool) -> None:
    global splice_enabled
    splice_enabled = bool(on)


cdef inline void *_alloc(Core *c, size_t n) noexcept nogil:
    # The relay thread must never take the GIL, and tracemalloc's hook on PyMem_Raw* does
    # (PyGILState_Ensure) while tracing: it uses the C allocator. Loop mode keeps PyMem_Raw*,
    # so tracemalloc sees its buffers (tests/test_relay.py measures them that way).
    return malloc(n) if c.threaded else PyMem_RawMalloc(n)


cdef inline void _free(Core *c, void *buf) noexcept nogil:
    if c.threaded:
        free(buf)
    else:
        PyMem_RawFree(buf)


cdef inline uint64_t _pair_id(pair_id):
    """pair_id as the table's key; 0 (no pair's) when it cannot be one."""
    if isinstance(pair_id, int) and 0 < pair_id < 1 << 63:
        return pair_id
    return 0


cdef bint _sigpipe_kills() noexcept:
    """True if SIGPIPE has its default action (CPython normally ignores it)."""
    cdef sigaction_t current
    if sigaction(SIGPIPE, NULL, &current) < 0:
        return True
    return <void *>current.sa_handler == <void *>SIG_DFL


cdef class Engine:
    """Relay bytes between borrowed pairs of non-blocking sockets, both ways, on one epoll fd."""

    def __cinit__(self, *args, **kwargs):
        self.c.epfd = self.c.notify_fd = self.c.wake_fd = -1
        self.c.free_head = self.c.ready_head = self.c.ready_tail = self.c.finished_head = -1
        self.c.conn_head = self.c.conn_tail = self.c.started_head = -1
        self.c.gen = 1
        self.c.rng = <uint64_t><size_t>&self.c ^ XS_SEED
        pthread_mutex_init(&self.c.lock, NULL)

    def __init__(self, bufsize: int = BUFSIZE, threaded: bool | None = None) -> None:
        cdef epoll_event ev
        cdef sigset_t mask, old
        cdef int err
        if not 1 <= bufsize <= 1 << 30:
            raise ValueError(f"bufsize out of range: {bufsize}")
        if self.c.scratch != NULL or self.c.epfd >= 0:
            raise RuntimeError("Engine.__init__ called twice")
        self.c.bufsize = bufsize
        # splice cannot pass MSG_NOSIGNAL: only use it while SIGPIPE cannot kill us.
        self.c.splice = splice_enabled and not _sigpipe_kills()
        self.c.scratch = <char *>PyMem_RawMalloc(bufsize)
        if self.c.scratch == NULL:
            raise MemoryError()
        self.c.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.c.epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        if not (THREADED if threaded is None else threaded):
            return
        self.c.threaded = True
        self.c.notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.c.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        ev.events = EPOLLIN
        ev.data.u64 = WAKE_KEY
        if self.c.notify_fd < 0 or self.c.wake_fd < 0 \
                or epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, self.c.wake_fd, &ev) < 0:
            err = errno
            self._close()
            raise OSError(err, strerror(err).decode())
        # Created with every signal blocked, so none can land on it before it blocks them.
        sigfillset(&mask)
        pthread_sigmask(SIG_BLOCK, &mask, &old)
        err = pthread_create(&self.c.thread, NULL, _thread_main, &self.c)
        pthread_sigmask(SIG_SETMASK, &old, NULL)
        if err:
            self._close()
            raise OSError(err, strerror(err).decode())
        self.c.running = True

    def __dealloc__(self):
        self._close()
        pthread_mutex_destroy(&self.c.lock)
        if self.c.threaded:
            free(self.c.pairs)
        else:
            PyMem_RawFree(self.c.pairs)
        free(self.c.targets)
        free(self.c.late)
        free(self.recs)
        PyMem_RawFree(self.c.scratch)

    def fileno(self) -> int:
        """For loop.add_reader: readable when run() has work (threaded: an eventfd)."""
        self._check_open()
        return self.c.notify_fd if self.c.threaded else self.c.epfd

    def add(self, client_fd: int, upstream_fd: int, tag: int = -1) -> int:
        """Start relaying between two connected non-blocking sockets; return the pair id.

        tag: the target (set_targets) the upstream socket is connected to, so the pair
        counts in its live connections (least-connections); -1: none.
        """
        cdef int cfd = client_fd, ufd = upstream_fd, err
        cdef int64_t ctag = tag  # converted (or refused) before the lock
        cdef int32_t slot
        cdef Pair *p
        self._check_open()
        self._lock()
        try:
            slot = _new_slot(&self.c)
            if slot < 0:
                raise MemoryError("too many pairs")
            p = &self.c.pairs[slot]
            p.dir[0].src = p.dir[1].dst = cfd
            p.dir[0].dst = p.dir[1].src = ufd
            err = self._register(p, ctag)
            if err == 0:
                return p.id
            _release(&self.c, slot)
        finally:
            self._unlock()
        raise OSError(err, strerror(err).decode())

    def run(self) -> list[Finished]:
        """Handle ready events without blocking; return the pairs that finished.

        Threaded: the relay thread handled the events; this only collects what finished.
        (With native accept, use collect(): run() drops the other records, closing the
        clients of failed dials.)
        """
        cdef int err = 0, n
        self._check_open()
        if not self.c.threaded:
            with nogil:
                n = _harvest(&self.c, 0)
                if n < 0:
                    err = -n
                else:
                    _handle(&self.c, n)
        if err:  # the pairs finished so far stay listed for the next call
            raise OSError(err, strerror(err).decode())
        report = self._collect(False)
        for f in report.failed:
            close(f.client_fd)
        return report.finished

    def collect(self, aggregate: bool = False) -> Report:
        """Threaded: everything the relay thread has to report, in one go.

        Returns an engine.Report (started, finished, failed, paused, accepted, accept_errors,
        short):
        started: [Started(pair_id, tag)] pairs the engine accepted and connected itself (native
            accept), relayed now; report them before `finished`, which may list them too.
        finished: [Finished(pair_id, c2u, u2c, err)] as from run(); the engine has closed the fds
            of its own pairs already (with SO_LINGER 0 when errno is set).
        failed: [Failed(client_fd, tag, err)] accepted clients the engine could not connect;
            the caller owns client_fd now. tag -1: no usable target (errno 0) or no socket
            for the dial (errno set); errno 0 with a tag: the target has no address, dial
            it yourself; else that target's connect failed (ETIMEDOUT: --dial-timeout).
        paused: [Paused(listen_fd, err)] listeners whose accept failed for lack of a resource
            (EMFILE, ENFILE, ENOBUFS, ENOMEM); listen() again to resume.
        accepted, accept_errors: counts since the last collect().
        short: with aggregate, the engine's pairs that started and finished since the last
            collect() are left out of started and finished and summed per target instead:
            [ShortSum(tag, pairs, c2u, u2c, resets, silent)] (a churn of short connections then
            costs the caller one row per target, not two records per connection).
        """
        self._check_open()
        return self._collect(aggregate)

    cdef object _collect(self, bint aggregate):
        # Under the lock, only C: the records are copied into self.recs and the slots
        # released; the Python objects are built after, so the relay thread, which needs the
        # lock for every batch, never waits on Python (issue 21: it waited up to 7 ms for
        # 4,000 records, bench/collect_lock.py).
        cdef uint64_t count, accepted, accept_errors
        cdef int32_t slot
        cdef int err, i, j, nshort = 0, npaused = 0
        cdef Py_ssize_t n = 0, k
        cdef int64_t s_tag[SHORT_SLOTS]
        cdef uint64_t s_pairs[SHORT_SLOTS]
        cdef uint64_t s_c2u[SHORT_SLOTS]
        cdef uint64_t s_u2c[SHORT_SLOTS]
        cdef uint64_t s_resets[SHORT_SLOTS]
        cdef uint64_t s_silent[SHORT_SLOTS]
        cdef Pair *p
        cdef Rec *r
        cdef Listener *lst
        cdef int paused_fd[MAX_LISTENERS]
        cdef int paused_err[MAX_LISTENERS]
        cdef dict sums = {}
        cdef list acc
        # Room for what waits, made (and its pages touched) before the lock: nrecords read
        # without it is only a hint; growing under the lock (or failing to) is handled below.
        self._reserve(self.c.nrecords + 64)
        # The thread writes notify_fd after it unlocks, so its write may come after this
        # read: then it wakes the loop once more, for a collect that finds little, and that
        # collect's read drains it (read whether or not notified is set, or a late write
        # would leave the eventfd readable and the loop spinning). Non-blocking: never waits;
        # outside the lock, which the thread needs for every batch.
        if self.c.threaded:
            read(self.c.notify_fd, &count, sizeof(count))
        self._lock()
        self.c.notified = 0
        err = self.c.thread_err
        while self.c.started_head >= 0:
            if n == self.recs_cap and not self._reserve(2 * n):
                break  # out of memory: the rest waits for the next collect()
            p = &self.c.pairs[self.c.started_head]
            r = &self.recs[n]
            n += 1
            r.id, r.tag = p.id, p.tag
            if aggregate and p.state == FINISHED:
                r.kind = REC_SHORT
                r.c2u, r.u2c, r.err, r.silent = p.dir[0].moved, p.dir[1].moved, p.err, _silent(p)
                p.short = 1
            else:
                r.kind = REC_STARTED
            p.fresh = 0
            self.c.started_head = p.snext
            p.snext = -1
        while self.c.finished_head >= 0 and not err:
            slot = self.c.finished_head
            p = &self.c.pairs[slot]
            if p.state == DIALFAIL or not p.short:
                if n == self.recs_cap and not self._reserve(2 * n):
                    break
                r = &self.recs[n]
                n += 1
                if p.state == DIALFAIL:
                    r.kind, r.id, r.tag, r.err = REC_FAILED, p.dir[0].src, p.tag, p.err
                else:
                    r.kind, r.id, r.err, r.ended = REC_FINISHED, p.id, p.err, _ended(p)
                    r.c2u, r.u2c = p.dir[0].moved, p.dir[1].moved
            self.c.finished_head = p.next
            _release(&self.c, slot)
        for i in range(self.c.nlst):
            lst = &self.c.lst[i]
            if lst.fd >= 0 and lst.paused and not lst.reported:
                lst.reported = 1
                paused_fd[npaused], paused_err[npaused] = lst.fd, lst.err
                npaused += 1
        self.c.nunreported = self.c.nfailed = self.c.nrecords = 0
        self.c.report_at = 0
        accepted, accept_errors = self.c.accepted, self.c.accept_errors
        self.c.accepted = self.c.accept_errors = 0
        self._unlock()
        started = []
        finished = []
        failed = []
        for k in range(n):
            r = &self.recs[k]
            if r.kind == REC_STARTED:
                started.append(Started(r.id, r.tag))
            elif r.kind == REC_FINISHED:
                finished.append(Finished(r.id, r.c2u, r.u2c, r.err, r.ended))
            elif r.kind == REC_FAILED:
                failed.append(Failed(<int>r.id, r.tag, r.err))
            else:
                # Summed in C (a churn brings hundreds of these per collect; Python ints cost
                # ~0.15 µs a record): a few targets, so a linear search.
                for j in range(nshort):
                    if s_tag[j] == r.tag:
                        break
                else:
                    j = nshort
                    if j < SHORT_SLOTS:
                        nshort += 1
                        s_tag[j] = r.tag
                        s_pairs[j] = s_c2u[j] = s_u2c[j] = s_resets[j] = s_silent[j] = 0
                if j < SHORT_SLOTS:
                    s_pairs[j] += 1
                    s_c2u[j] += r.c2u
                    s_u2c[j] += r.u2c
                    s_resets[j] += r.err != 0
                    s_silent[j] += r.silent
                    continue
                acc = sums.get(r.tag)
                if acc is None:
                    acc = sums[r.tag] = [r.tag, 0, 0, 0, 0, 0]
                acc[1] += 1
                acc[2] += r.c2u
                acc[3] += r.u2c
                acc[4] += r.err != 0
                acc[5] += r.silent
        if self.recs_cap > 1024:  # a burst's copies: not kept for the life of the engine
            free(self.recs)
            self.recs = NULL
            self.recs_cap = 0
        paused = [Paused(paused_fd[i], paused_err[i]) for i in range(npaused)]
        if err:
            raise OSError(err, "relay thread stopped: " + strerror(err).decode())
        short = [
            ShortSum(s_tag[j], s_pairs[j], s_c2u[j], s_u2c[j], s_resets[j], s_silent[j])
            for j in range(nshort)
        ]
        if sums:
            short += [ShortSum(*acc) for acc in sums.values()]
        return Report(started, finished, failed, paused, accepted, accept_errors, short)

    cdef bint _reserve(self, Py_ssize_t n) noexcept:
        """Room for n records in self.recs (kept on failure); whether there is."""
        cdef Rec *recs
        if n <= self.recs_cap:
            return True
        n = max(n, 64)
        recs = <Rec *>realloc(self.recs, n * sizeof(Rec))
        if recs == NULL:
            return False
        # Touch the new pages now (a fresh mapping faults on first write): not later, under
        # the lock.
        memset(&recs[self.recs_cap], 0, (n - self.recs_cap) * sizeof(Rec))
        self.recs = recs
        self.recs_cap = n
        return True

    # -- native accept (threaded mode) --

    @property
    def native(self) -> bool:
        """True if this engine can accept and connect clients itself (threaded mode)."""
        return self.c.threaded and self.c.epfd >= 0

    def listen(self, listen_fd: int, tcp: bool = True) -> None:
        """Accept clients on a borrowed, non-blocking listening socket in the relay thread.

        Each client is connected to a target chosen as the caller's balancer would (see
        set_targets) and relayed; collect() reports it. Calling it again for a listener
        paused by a resource error resumes it. tcp: check (and if needed set) the
        set_targets() socket options on each client; False for unix sockets.
        """
        cdef int fd = listen_fd, i, free_i = -1, err = 0
        cdef epoll_event ev
        cdef uint64_t one = 1
        self._check_native()
        self._lock()
        try:
            for i in range(self.c.nlst):
                if self.c.lst[i].fd == fd:
                    self.c.lst[i].paused = self.c.lst[i].reported = 0
                    self.c.lst[i].ready = 1
                    break
                if self.c.lst[i].fd < 0 and free_i < 0:
                    free_i = i
            else:
                if free_i < 0:
                    if self.c.nlst >= MAX_LISTENERS:
                        raise OSError(ENOMEM, "too many listeners")
                    free_i = self.c.nlst
                    self.c.nlst += 1
                ev.events = EPOLLIN | EPOLLET
                ev.data.u64 = LISTEN_KEY + <uint64_t>free_i
                if epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                    err = errno
                    raise OSError(err, strerror(err).decode())
                memset(&self.c.lst[free_i], 0, sizeof(Listener))
                self.c.lst[free_i].fd = fd
                self.c.lst[free_i].ready = 1
                self.c.lst[free_i].tune = 0 if tcp else 1
        finally:
            self._unlock()
        write(self.c.wake_fd, &one, sizeof(one))

    def unlisten(self, listen_fd: int) -> None:
        """Stop accepting on a listener; when this returns the engine no longer uses its fd."""
        cdef int fd = listen_fd, i
        self._check_native()
        self._lock()
        try:
            for i in range(self.c.nlst):
                if self.c.lst[i].fd == fd:
                    epoll_ctl(self.c.epfd, EPOLL_CTL_DEL, fd, NULL)
                    self.c.lst[i].fd = -1
        finally:
            self._unlock()

    def set_targets(self, targets, settings) -> None:
        """What native accept connects clients to, and how (an engine.RelaySettings).

        targets: [engine.Target] in the balancer's order. The choice is the rule of
            etcdgw.balancer.Selector (_pick.pxi): round-robin over one counter, skipping
            unusable targets, when every priority and weight is 0; else the lowest usable
            priority class, RFC 2782 weighted. A target without an ip is handed back to the
            caller (collect()'s failed list, errno 0). Link-local (scoped) IPv6 addresses
            are not given here: the caller dials those.
        settings.sockopts: [(level, option, value)] set on every upstream socket (and on
            clients that do not inherit them from their listener).
        settings.dial_timeout: seconds a connect may take before it fails with ETIMEDOUT.
        settings.limit: live plus connecting pairs beyond which clients wait in the backlog
            (0: none).
        settings.least: choose by least connections (Selector's rule) instead of round-robin; each
            target's live count carries over from the previous call by tag. A target that
            leaves keeps its count while it has live pairs (parked: never picked), so a tag
            listed again later still has it; the clients being connected to it are handed
            back at once (collect()'s failed, errno 0: dial them yourself), so once the next
            collect() has returned, the engine says nothing more of a tag that left.
        settings.late_sockopts: set on the upstream socket of a pair that is still live
            settings.late_after seconds after its connect (keep-alive settings, which cannot
            matter sooner: a connection that lives less saves the syscalls); clients that do
            not inherit options from their listener get them at once with the others.
        """
        cdef Py_ssize_t n = len(targets), i
        cdef Py_ssize_t nold = self.c.ntargets + self.c.nparked  # only changed here
        cdef Target *arr = NULL
        cdef Target *old
        cdef Target *t
        cdef Pair *p
        cdef int32_t slot, nxt
        cdef int nparked = 0
        cdef bint listed
        cdef sockaddr_in *sin
        cdef sockaddr_in6 *sin6
        cdef int opts[MAX_SOCKOPTS][3]
        cdef int late[MAX_SOCKOPTS][3]
        cdef int nopts = 0, nlate = 0, j
        cdef bint changed
        cdef uint64_t one = 1
        self._check_native()
        sockopts, late_sockopts = settings.sockopts, settings.late_sockopts
        cdef bint least = settings.least
        cdef uint64_t late_ns = <uint64_t>(max(0.0, settings.late_after) * 1e9)
        cdef uint64_t dial_timeout_ns = <uint64_t>(max(0.0, settings.dial_timeout) * 1e9)
        cdef int32_t limit = max(0, settings.limit)
        if len(sockopts) > MAX_SOCKOPTS or len(late_sockopts) > MAX_SOCKOPTS:
            raise ValueError("too many socket options")
        for level, opt, value in sockopts:
            opts[nopts][0], opts[nopts][1], opts[nopts][2] = level, opt, value
            nopts += 1
        for level, opt, value in late_sockopts:
            late[nlate][0], late[nlate][1], late[nlate][2] = level, opt, value
            nlate += 1
        if n + nold:  # room for the listed ones and every one that may be parked
            arr = <Target *>malloc((n + nold) * sizeof(Target))
            if arr == NULL:
                raise MemoryError()
            memset(arr, 0, (n + nold) * sizeof(Target))
        try:
            for i, (tag, family, ip, port, prio, weight, usable) in enumerate(targets):
                t = &arr[i]
                t.tag, t.family, t.priority, t.weight = tag, family, prio, weight
                t.usable = bool(usable)
                if ip is None:
                    continue
                bip = ip.encode("ascii")
                if family == AF_INET:
                    sin = <sockaddr_in *>&t.addr
                    sin.sin_family = AF_INET
                    sin.sin_port = htons(port)
                    if inet_pton(AF_INET, bip, &sin.sin_addr) != 1:
                        raise ValueError(f"not an IPv4 address: {ip!r}")
                    t.addrlen = sizeof(sockaddr_in)
                elif family == AF_INET6:
                    sin6 = <sockaddr_in6 *>&t.addr
                    sin6.sin6_family = AF_INET6
                    sin6.sin6_port = htons(port)
                    if inet_pton(AF_INET6, bip.split(b"%")[0], &sin6.sin6_addr) != 1:
                        raise ValueError(f"not an IPv6 address: {ip!r}")
                    t.addrlen = sizeof(sockaddr_in6)
                else:
                    raise ValueError(f"unsupported address family: {family}")
        except BaseException:
            free(arr)
            raise
        self._lock()
        old = self.c.targets
        slot = self.c.conn_head  # dials to a target that leaves: handed back now
        while slot >= 0:
            p = &self.c.pairs[slot]
            nxt = p.cnext
            listed = False
            for i in range(n):
                if arr[i].tag == p.tag:
                    listed = True
                    break
            if not listed:
                _unconnect(&self.c, p)
                _dial_fail_registered(&self.c, p, 0)  # uncounted from its old target
            slot = nxt
        for i in range(n):  # live counts follow their target (a handful of targets)
            for j in range(nold):
                if old[j].tag == arr[i].tag:
                    arr[i].live = old[j].live
                    break
        for j in range(nold):  # a target that left with live pairs is parked
            if old[j].live <= 0:
                continue
            listed = False
            for i in range(n):
                if arr[i].tag == old[j].tag:
                    listed = True
                    break
            if not listed:
                arr[n + nparked] = old[j]
                nparked += 1
        self.c.targets = arr
        self.c.ntargets = <int>n
        self.c.nparked = nparked
        self.c.plain = _plain(arr, n)
        self.c.least = least
        changed = nopts != self.c.nsockopts
        for j in range(nopts):
            if opts[j][0] != self.c.sockopts[j][0] or opts[j][1] != self.c.sockopts[j][1] \
                    or opts[j][2] != self.c.sockopts[j][2]:
                changed = True
            self.c.sockopts[j][0], self.c.sockopts[j][1] = opts[j][0], opts[j][1]
            self.c.sockopts[j][2] = opts[j][2]
        self.c.nsockopts = nopts
        changed = changed or nlate != self.c.nlate_opts
        for j in range(nlate):
            if late[j][0] != self.c.late_opts[j][0] or late[j][1] != self.c.late_opts[j][1] \
                    or late[j][2] != self.c.late_opts[j][2]:
                changed = True
            self.c.late_opts[j][0], self.c.late_opts[j][1] = late[j][0], late[j][1]
            self.c.late_opts[j][2] = late[j][2]
        self.c.nlate_opts = nlate
        self.c.late_ns = late_ns
        if changed:
            for j in range(self.c.nlst):
                if self.c.lst[j].tune == 2:
                    self.c.lst[j].tune = 0  # check the next client against the new options
        self.c.dial_timeout_ns = dial_timeout_ns
        self.c.limit = limit
        self._unlock()
        free(old)
        write(self.c.wake_fd, &one, sizeof(one))  # a higher limit may let clients in

    def release(self) -> None:
        """The loop relayed (add(), called first) or closed a client the engine handed back
        (collect()'s failed list): it no longer counts against --max-connections here."""
        cdef uint64_t one = 1
        self._check_native()
        self._lock()
        if self.c.nheld > 0:
            self.c.nheld -= 1
        self._unlock()
        write(self.c.wake_fd, &one, sizeof(one))  # a client may wait at the limit

    def native_pending(self) -> int:
        """Clients the engine accepted that collect() has not reported, connecting or not."""
        cdef int32_t n
        self._lock()
        n = self.c.nconnecting + self.c.nunreported
        self._unlock()
        return n

    def _selection_state(self) -> tuple[int, int]:
        """(round-robin counter, xorshift64* state) of the thread's choices, so a test can
        start a balancer.Selector from the same state; not an API."""
        cdef uint64_t rr, rng
        self._lock()
        rr, rng = self.c.rr, self.c.rng
        self._unlock()
        return (rr, rng)

    def pick(self, exclude=()) -> int:
        """The tag of the target for the next client, or -1: the relay thread's own choice.

        The balancer asks this while native accept runs, so the loop's picks (clients whose
        dial failed over) and the thread's share one round-robin counter. exclude: tags this
        client was already sent to; they count as unusable for this one pick.
        """
        cdef int i, j
        cdef uint8_t *saved = NULL
        cdef int64_t *ex = NULL
        cdef int64_t tag
        cdef Py_ssize_t nex = 0
        self._check_native()
        # Python only before the lock (see _lock): the tags as C numbers, the room to save
        # the flags in (ntargets changes only in set_targets(), on this thread).
        tags = [t for t in frozenset(exclude) if isinstance(t, int) and -(1 << 63) <= t < 1 << 63]
        if tags:
            ex = <int64_t *>malloc(len(tags) * sizeof(int64_t))
            saved = <uint8_t *>malloc(self.c.ntargets + 1)
            if ex == NULL or saved == NULL:
                free(ex)
                free(saved)
                raise MemoryError()
            for t in tags:
                ex[nex] = t
                nex += 1
        self._lock()
        if nex:
            for i in range(self.c.ntargets):
                saved[i] = self.c.targets[i].usable
                for j in range(nex):
                    if self.c.targets[i].tag == ex[j]:
                        self.c.targets[i].usable = 0
        i = _pick(&self.c)
        tag = self.c.targets[i].tag if i >= 0 else -1
        if nex:
            for i in range(self.c.ntargets):
                self.c.targets[i].usable = saved[i]
        self._unlock()
        free(ex)
        free(saved)
        return tag

    cdef _check_native(self):
        self._check_open()
        if not self.c.threaded:
            raise RuntimeError("native accept needs the threaded engine")

    @property
    def pending(self) -> bool:
        """True if run() stopped early for fairness: call run() again soon (never threaded)."""
        return not self.c.threaded and self.c.nready > 0

    def remove(self, pair_id: int) -> Finished:
        """Stop relaying a pair now; its fds are unregistered when this returns.

        Threaded: the thread is between batches while this holds the lock, and it ignores
        events of pairs that are gone, so it never touches these fds again.
        """
        cdef uint64_t pid = _pair_id(pair_id), c2u = 0, u2c = 0
        cdef Pair *p
        self._lock()
        p = self._lookup(pid)
        if p != NULL:
            _detach(&self.c, p)
            _untrack(&self.c, p)
            c2u, u2c = p.dir[0].moved, p.dir[1].moved
            if p.owned:  # the engine's own pair: closed here (FIN, not a reset)
                _close_fds(p, 0)
            _release(&self.c, pid & ((1 << SLOT_BITS) - 1))
        self._unlock()
        if p == NULL:
            raise KeyError(pair_id)
        return Finished(pid, c2u, u2c, 0)

    def detach(self, limit: int) -> list[Handed]:
        """Take up to `limit` live pairs out, open, with their state (engine.RelayEngine.detach).

        Loop-added pairs and, with native accept, the thread's own (the fds are the
        caller's now: the engine closes them no more). A pair still connecting is handed
        with upstream_fd -1 (its half-made upstream socket is closed): dial it again.
        Threaded: the thread is between batches while this holds the lock, as for remove().
        """
        cdef int32_t i, n = 0, nfresh = 0
        cdef Py_ssize_t want = limit
        cdef Pair *p
        cdef int ufd
        cdef uint64_t one = 1
        if want < 0:
            raise ValueError(f"limit out of range: {limit}")
        self._check_open()
        handed = []
        self._lock()
        try:
            for i in range(self.c.cap):
                if n >= want:
                    break
                p = &self.c.pairs[i]
                if p.state != LIVE and p.state != CONNECTING:
                    continue
                epoll_ctl(self.c.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
                epoll_ctl(self.c.epfd, EPOLL_CTL_DEL, p.dir[1].src, NULL)
                ufd = p.dir[1].src
                if p.state == CONNECTING:
                    close(ufd)
                    ufd = -1
                # The bytes first: _detach_bufs() frees them (and counts the pair out).
                handed.append(Handed(
                    p.id, p.dir[0].src, ufd, p.tag, p.dir[0].moved, p.dir[1].moved,
                    bool(p.dir[0].eof), bool(p.dir[1].eof),
                    _carried(&p.dir[0]), _carried(&p.dir[1]),
                ))
                _detach_bufs(&self.c, p)
                _untrack(&self.c, p)
                if p.fresh:  # its Started record is dropped below: not reported
                    nfresh += 1
                _release(&self.c, i)
                n += 1
            if nfresh:
                _drop_released_started(&self.c)
        finally:
            self._unlock()
        if self.c.threaded:
            write(self.c.wake_fd, &one, sizeof(one))  # fewer pairs: a client may wait at the limit
        return handed

    def adopt(self, h) -> int:
        """Relay a handed pair from where it stopped (engine.RelayEngine.adopt); its new id.

        The carried bytes wait in the pair's buffers as bytes its destination refused, and
        the EOFs as read ones: the next batch writes them first, then shuts down.
        """
        cdef int cfd = h.client_fd, ufd = h.upstream_fd, err, i
        cdef int32_t slot
        cdef Pair *p
        cdef bytes data
        cdef uint64_t one = 1
        # Every field converted (or refused) before the lock: nothing below can raise but
        # out of memory.
        if h.c2u < 0 or h.u2c < 0:
            raise ValueError("adopt(): negative byte counts")
        cdef uint64_t c2u = h.c2u, u2c = h.u2c
        cdef int64_t tag = h.tag
        cdef bint client_eof = h.client_eof, upstream_eof = h.upstream_eof
        if cfd < 0 or ufd < 0:
            raise ValueError("adopt() needs both fds (dial the client first)")
        carried = (bytes(h.to_upstream), bytes(h.to_client))
        if len(carried[0]) >= 1 << 32 or len(carried[1]) >= 1 << 32:
            raise ValueError("adopt(): more carried bytes than a pair's buffer holds")
        self._check_open()
        self._lock()
        try:
            slot = _new_slot(&self.c)
            if slot < 0:
                raise MemoryError("too many pairs")
            p = &self.c.pairs[slot]
            p.dir[0].src = p.dir[1].dst = cfd
            p.dir[0].dst = p.dir[1].src = ufd
            p.dir[0].moved, p.dir[1].moved = c2u, u2c
            p.dir[0].eof, p.dir[1].eof = client_eof, upstream_eof
            for i in range(2):
                data = carried[i]
                if len(data):
                    p.dir[i].buf = <char *>_alloc(&self.c, len(data))
                    if p.dir[i].buf == NULL:
                        _free(&self.c, p.dir[0].buf)
                        p.dir[0].buf = NULL
                        _release(&self.c, slot)
                        raise MemoryError()
                    memcpy(p.dir[i].buf, PyBytes_AS_STRING(data), len(data))
                    p.dir[i].end = <uint32_t>len(data)
                # No event may come for these (an idle destination, an EOF read already).
                p.dir[i].ready = p.dir[i].buf != NULL or p.dir[i].eof
            err = self._register(p, tag)
            if err == 0:
                if p.dir[0].ready or p.dir[1].ready:
                    _enqueue(&self.c, p)
                if self.c.threaded:
                    write(self.c.wake_fd, &one, sizeof(one))
                return p.id
            for i in range(2):
                _free(&self.c, p.dir[i].buf)
                p.dir[i].buf = NULL
            _release(&self.c, slot)
        finally:
            self._unlock()
        raise OSError(err, strerror(err).decode())

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(bytes client->upstream, bytes upstream->client) relayed so far for one pair.

        Also for a pair that finished and was not collected yet (its final counts).
        """
        cdef uint64_t c2u = 0, u2c = 0
        cdef Pair *p
        self._lock()
        p = self._lookup(_pair_id(pair_id), True)
        if p != NULL:
            c2u, u2c = p.dir[0].moved, p.dir[1].moved
        self._unlock()
        if p == NULL:
            raise KeyError(pair_id)
        return (c2u, u2c)

    def totals(self) -> tuple[int, int]:
        """The same two counts summed over every pair this engine ever relayed."""
        cdef uint64_t c2u, u2c
        self._lock()
        c2u, u2c = self.c.total[0], self.c.total[1]
        self._unlock()
        return (c2u, u2c)

    def __len__(self) -> int:
        cdef int32_t n
        self._lock()
        n = self.c.nlive
        self._unlock()
        return n

    def close(self) -> None:
        """Stop the relay thread and close the engine's fds (idempotent).

        Relayed fds stay open, they belong to the caller.
        """
        self._close()

    def _lock_waits(self, reset: bool = False) -> tuple[int, int, int]:
        """(waits, total ns, longest ns) the relay thread spent waiting for the lock the loop
        held, since the start or the last reset; for bench/collect_lock.py, not an API."""
        self._lock()
        result = (self.c.lock_waits, self.c.lock_wait_ns, self.c.lock_wait_max_ns)
        if reset:
            self.c.lock_waits = self.c.lock_wait_ns = self.c.lock_wait_max_ns = 0
        self._unlock()
        return result

    def _epoll_fileno(self) -> int:
        """The epoll fd itself (tests read its registrations); not an API."""
        self._check_open()
        return self.c.epfd

    # -- helpers (GIL held) --

    cdef int _register(self, Pair *p, int64_t tag) noexcept:
        """A new pair's two fds into epoll, then live (and counted for its target); 0, or
        the errno that refused it (nothing registered then). Under the lock.

        Registered once: ET means no epoll_ctl per event; an fd that is already readable
        reports at the next epoll_wait, so bytes sent before add() are not lost. (The relay
        thread may see the event at once, but handles it only once it gets the lock, when
        the pair is complete.)
        """
        cdef epoll_event ev
        cdef int err
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET  # EPOLLOUT once needed (_arm_out)
        ev.data.u64 = p.id << 1
        if epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, p.dir[0].src, &ev) != 0:
            return errno
        ev.data.u64 = (p.id << 1) | 1
        if epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, p.dir[1].src, &ev) != 0:
            err = errno
            epoll_ctl(self.c.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
            return err
        p.state = LIVE
        self.c.nlive += 1
        if tag >= 0:
            p.tag = tag
            _track(&self.c, p)
        return 0

    cdef _check_open(self):
        if self.c.epfd < 0:
            raise ValueError("I/O operation on closed engine")

    cdef void _lock(self) noexcept:
        # The thread may hold the lock for one batch (at most RUN_BUFS * bufsize bytes):
        # wait for it without the GIL, so other Python threads are not held up. The mutex
        # is not recursive: between _lock() and _unlock() no Python objects are made where
        # it can be helped (an allocation may run the GC, and a finalizer that called the
        # engine would wait for this lock for ever), and nothing may wait or spin (the
        # relay thread's batches are bounded: _accept_all() counts every accept4()).
        if self.c.running and pthread_mutex_trylock(&self.c.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.c.lock)

    cdef void _unlock(self) noexcept:
        if self.c.running:
            pthread_mutex_unlock(&self.c.lock)

    cdef Pair *_lookup(self, uint64_t pid, bint finished=False) noexcept:
        # The live pair with this id, or NULL; C only, called under the lock. Pairs the
        # caller has not been told about (fresh) are unknown to it; finished ones (not
        # collected yet) still answer stats().
        cdef uint64_t slot = pid & ((1 << SLOT_BITS) - 1)
        cdef Pair *p
        if pid == 0 or slot >= <uint64_t>self.c.cap:
            return NULL
        p = &self.c.pairs[slot]
        if p.id == pid and not p.fresh and (
                p.state == LIVE or (finished and p.state == FINISHED)):
            return p
        return NULL

    cdef void _close(self) noexcept:
        cdef int32_t i
        cdef Pair *p
        cdef uint64_t one = 1
        if self.c.running:
            self._lock()
            self.c.stopping = True
            self._unlock()
            write(self.c.wake_fd, &one, sizeof(one))
            with nogil:
                pthread_join(self.c.thread, NULL)
            self.c.running = False
        if self.c.notify_fd >= 0:
            close(self.c.notify_fd)
        if self.c.wake_fd >= 0:
            close(self.c.wake_fd)
        self.c.notify_fd = self.c.wake_fd = -1
        if self.c.epfd < 0:
            return
        close(self.c.epfd)  # drops every registration at once
        self.c.epfd = -1
        for i in range(self.c.cap):
            p = &self.c.pairs[i]
            if p.state == FREE:
                continue
            if p.state == LIVE or p.state == CONNECTING:
                _detach(&self.c, p)
            if p.owned:
                _close_fds(p, 0)
            _release(&self.c, i)
        self.c.finished_head = self.c.started_head = -1
        self.c.conn_head = self.c.conn_tail = -1
        self.c.nready = self.c.nconnecting = self.c.nunreported = self.c.nlst = 0
        self.c.nheld = 0
        self.c.late_n = self.c.late_head = 0


include "_pump.pxi"
include "_table.pxi"
include "_pick.pxi"
include "_accept.pxi"


def pick_sequence(rows, uint64_t rr, uint64_t rng, int n, bint least=False) -> list:
    """The first n choices of the C selection rule (_pick.pxi) from this state.

    rows: [(priority, weight, usable, live)]; rr, rng: the counter and the xorshift state;
    least: least-connections. Returns the chosen indexes (-1: none usable). For
    tests/test_selection.py, which compares it with balancer.Selector; not an API.
    """
    cdef Core *c = <Core *>calloc(1, sizeof(Core))
    cdef int i, _i
    if c == NULL:
        raise MemoryError()
    out = []
    try:
        c.ntargets = len(rows)
        c.targets = <Target *>calloc(max(1, c.ntargets), sizeof(Target))
        if c.targets == NULL:
            raise MemoryError()
        for i, (prio, weight, usable, live) in enumerate(rows):
            c.targets[i].tag = i
            c.targets[i].priority = prio
            c.targets[i].weight = weight
            c.targets[i].usable = bool(usable)
            c.targets[i].live = live
        c.plain = _plain(c.targets, c.ntargets)
        c.least = least
        c.rr = rr
        c.rng = rng if rng else XS_SEED
        for _i in range(n):
            out.append(_pick(c))
    finally:
        free(c.targets)
        free(c)
    return out
