# cython: language_level=3, embedsignature=True, annotation_typing=False
"""Cython relay engine: one edge-triggered epoll set, bytes moved in C without the GIL."""

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

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EAGAIN, EINTR, ENOMEM, ENOTCONN, errno
from libc.signal cimport SIG_DFL, SIGPIPE
from libc.stdlib cimport free, malloc
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strerror
from posix.signal cimport SIG_BLOCK, SIG_SETMASK, sigaction, sigaction_t, sigfillset
from posix.types cimport sigset_t
from posix.unistd cimport close, read, write

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLERR
        EPOLLHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    enum:
        MSG_NOSIGNAL
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)

cdef extern from "<fcntl.h>" nogil:
    enum:
        O_CLOEXEC
        O_NONBLOCK
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t n, unsigned flags)

cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)

cdef extern from "<signal.h>" nogil:
    int pthread_sigmask(int how, const sigset_t *mask, sigset_t *old)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_trylock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)

# Same constants as _relay_py.py.
cdef enum:
    MAX_EVENTS = 256
    VISIT_BUFS = 16   # per direction per visit: fairness between busy pairs
    RUN_BUFS = 64     # per run() call: the asyncio loop gets its thread back quickly
    SLOT_BITS = 24    # pair id = generation << SLOT_BITS | slot
    MAX_PIPES = 64    # pipes open at once (2 fds each): 128 fds at most
    WAIT = 0          # _pump results; negative ones are -errno
    MORE = 1
    FREE = 0          # Pair.state
    LIVE = 1
    FINISHED = 2

cdef uint64_t WAKE_KEY = 0xFFFFFFFFFFFFFFFF  # epoll key of the thread's wake-up eventfd

# Benchmarks compare splice with plain recv/send through _set_splice(); not an API.
cdef bint splice_enabled = True

# Engine(threaded=None) means this: a relay thread of the engine's own (measured: see
# docs/engine.md). A module constant so benchmarks can compare; not an API.
THREADED = True


def _set_splice(on: bool) -> None:
    global splice_enabled
    splice_enabled = bool(on)


cdef struct Dir:
    char *buf           # bytes dst refused, owned; NULL when none (the idle case)
    uint32_t start
    uint32_t end
    int pipe[2]         # borrowed while moving bulk data, else -1
    uint32_t piped      # bytes in the pipe that dst has not taken yet
    int src
    int dst
    uint64_t moved      # bytes handed to dst
    uint8_t ready       # progress this direction on the next visit
    uint8_t drain       # src reported RDHUP/HUP/ERR: a short read no longer proves it empty
    uint8_t eof         # src said EOF; pass it on once buf is flushed
    uint8_t done        # EOF passed on: dst shut down for writing
    uint8_t bulk        # the last read filled the buffer: read through the pipe


cdef struct Pair:
    uint64_t id         # 0 while the slot is free
    Dir dir[2]          # [0] client -> upstream, [1] upstream -> client
    int32_t prev        # ready-list links; `next` also chains the free and finished lists
    int32_t next
    int err
    uint8_t state
    uint8_t queued
    uint8_t errcheck    # bit per side: EPOLLERR seen on that side's fd


cdef struct Core:
    # Everything the hot path touches, in one struct the relay thread can be given; in
    # threaded mode, every field below `events` is guarded by `lock` while the thread runs
    # (`events`, `scratch` and `budget` belong to the thread alone).
    int epfd
    size_t bufsize
    bint splice
    char *scratch
    Py_ssize_t budget
    epoll_event events[MAX_EVENTS]
    Pair *pairs
    int32_t cap
    int32_t nlive
    int32_t free_head
    int32_t ready_head
    int32_t ready_tail
    int32_t nready
    int32_t finished_head
    uint64_t gen
    uint64_t total[2]
    int npipes
    # threaded mode
    bint threaded
    bint running        # the thread was started and not joined yet
    bint stopping       # close(): the thread exits at its next batch
    bint notified       # notify_fd was written and run() has not drained it yet
    int thread_err      # errno of a failed epoll_wait in the thread (it then exits)
    int notify_fd       # eventfd: thread -> loop, "finished pairs are waiting"
    int wake_fd         # eventfd in the epoll set: loop -> thread, "stop"
    pthread_mutex_t lock
    pthread_t thread


cdef inline ssize_t _recv(int fd, char *buf, size_t n) noexcept nogil:
    """Bytes read, 0 at EOF, -EAGAIN when there is nothing to read, else -errno."""
    cdef ssize_t r
    while True:
        r = recv(fd, buf, n, 0)
        if r >= 0:
            return r
        if errno != EINTR:
            return -errno


cdef inline ssize_t _send(int fd, const char *buf, size_t n) noexcept nogil:
    """Bytes taken (0 when dst is full), else -errno; never raises SIGPIPE."""
    cdef ssize_t r
    while True:
        r = send(fd, buf, n, MSG_NOSIGNAL)
        if r >= 0:
            return r
        if errno == EAGAIN:
            return 0
        if errno != EINTR:
            return -errno


cdef inline ssize_t _splice(int src, int dst, size_t n) noexcept nogil:
    """Bytes moved, 0 at EOF, -EAGAIN when src is empty or dst full, else -errno.

    Sending to a socket through splice cannot pass MSG_NOSIGNAL; a dead peer would raise
    SIGPIPE, which CPython ignores from start-up, so EPIPE comes back as an errno.
    """
    cdef ssize_t r
    while True:
        r = splice(src, NULL, dst, NULL, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if r >= 0:
            return r
        if errno != EINTR:
            return -errno


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


cdef bint _sigpipe_kills() noexcept:
    """True if SIGPIPE has its default action (CPython normally ignores it)."""
    cdef sigaction_t current
    if sigaction(SIGPIPE, NULL, &current) < 0:
        return True
    return <void *>current.sa_handler == <void *>SIG_DFL


cdef class Engine:
    """Relay bytes between borrowed pairs of non-blocking sockets, both ways, on one epoll fd."""

    cdef Core c

    def __cinit__(self, *args, **kwargs):
        self.c.epfd = self.c.notify_fd = self.c.wake_fd = -1
        self.c.free_head = self.c.ready_head = self.c.ready_tail = self.c.finished_head = -1
        self.c.gen = 1
        pthread_mutex_init(&self.c.lock, NULL)

    def __init__(self, bufsize: int = 65536, threaded: bool | None = None) -> None:
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
        PyMem_RawFree(self.c.pairs)
        PyMem_RawFree(self.c.scratch)

    def fileno(self) -> int:
        """For loop.add_reader: readable when run() has work (threaded: an eventfd)."""
        self._check_open()
        return self.c.notify_fd if self.c.threaded else self.c.epfd

    def add(self, client_fd: int, upstream_fd: int) -> int:
        """Start relaying between two connected non-blocking sockets; return the pair id."""
        cdef int cfd = client_fd, ufd = upstream_fd, err
        cdef int32_t slot
        cdef Pair *p
        cdef epoll_event ev
        self._check_open()
        self._lock()
        try:
            if self.c.free_head < 0:
                self._grow()
            slot = self.c.free_head
            p = &self.c.pairs[slot]
            self.c.free_head = p.next
            memset(p, 0, sizeof(Pair))
            p.id = (self.c.gen << SLOT_BITS) | <uint64_t>slot
            self.c.gen += 1
            p.prev = p.next = -1
            p.dir[0].src = p.dir[1].dst = cfd
            p.dir[0].dst = p.dir[1].src = ufd
            p.dir[0].pipe[0] = p.dir[0].pipe[1] = p.dir[1].pipe[0] = p.dir[1].pipe[1] = -1
            # Registered once: ET means no epoll_ctl per event; an fd that is already
            # readable reports at the next epoll_wait, so bytes sent before add() are not
            # lost. (The relay thread may see the event at once, but handles it only once
            # it gets the lock, when the pair is complete.)
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.u64 = p.id << 1
            if epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, cfd, &ev) == 0:
                ev.data.u64 = (p.id << 1) | 1
                if epoll_ctl(self.c.epfd, EPOLL_CTL_ADD, ufd, &ev) == 0:
                    p.state = LIVE
                    self.c.nlive += 1
                    return p.id
                err = errno
                epoll_ctl(self.c.epfd, EPOLL_CTL_DEL, cfd, NULL)
            else:
                err = errno
            self._release(slot)
        finally:
            self._unlock()
        raise OSError(err, strerror(err).decode())

    def run(self) -> list[tuple[int, int, int, int]]:
        """Handle ready events without blocking; return the pairs that finished.

        Threaded: the relay thread handled the events; this only collects what finished.
        """
        cdef int err = 0, n
        cdef uint64_t count
        cdef int32_t slot
        cdef Pair *p
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
        finished = []
        self._lock()
        try:
            if self.c.notified:
                self.c.notified = 0
                read(self.c.notify_fd, &count, sizeof(count))
            err = self.c.thread_err
            while self.c.finished_head >= 0 and not err:
                slot = self.c.finished_head
                p = &self.c.pairs[slot]
                finished.append((p.id, p.dir[0].moved, p.dir[1].moved, p.err))
                self.c.finished_head = p.next
                self._release(slot)
        finally:
            self._unlock()
        if err:
            raise OSError(err, "relay thread stopped: " + strerror(err).decode())
        return finished

    @property
    def pending(self) -> bool:
        """True if run() stopped early for fairness: call run() again soon (never threaded)."""
        return not self.c.threaded and self.c.nready > 0

    def remove(self, pair_id: int) -> tuple[int, int, int, int]:
        """Stop relaying a pair now; its fds are unregistered when this returns.

        Threaded: the thread is between batches while this holds the lock, and it ignores
        events of pairs that are gone, so it never touches these fds again.
        """
        cdef Pair *p
        self._lock()
        try:
            p = self._lookup(pair_id)
            _detach(&self.c, p)
            result = (p.id, p.dir[0].moved, p.dir[1].moved, 0)
            self._release(p.id & ((1 << SLOT_BITS) - 1))
        finally:
            self._unlock()
        return result

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(bytes client->upstream, bytes upstream->client) relayed so far for one pair."""
        cdef Pair *p
        self._lock()
        try:
            p = self._lookup(pair_id)
            result = (p.dir[0].moved, p.dir[1].moved)
        finally:
            self._unlock()
        return result

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

    def _epoll_fileno(self) -> int:
        """The epoll fd itself (tests read its registrations); not an API."""
        self._check_open()
        return self.c.epfd

    # -- helpers (GIL held) --

    cdef _check_open(self):
        if self.c.epfd < 0:
            raise ValueError("I/O operation on closed engine")

    cdef void _lock(self) noexcept:
        # The thread may hold the lock for one batch (at most RUN_BUFS * bufsize bytes):
        # wait for it without the GIL, so other Python threads are not held up.
        if self.c.running and pthread_mutex_trylock(&self.c.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.c.lock)

    cdef void _unlock(self) noexcept:
        if self.c.running:
            pthread_mutex_unlock(&self.c.lock)

    cdef Pair *_lookup(self, pair_id) except NULL:
        cdef uint64_t pid, slot
        if isinstance(pair_id, int) and 0 < pair_id < 1 << 63:
            pid = pair_id
            slot = pid & ((1 << SLOT_BITS) - 1)
            if slot < <uint64_t>self.c.cap and self.c.pairs[slot].id == pid \
                    and self.c.pairs[slot].state == LIVE:
                return &self.c.pairs[slot]
        raise KeyError(pair_id)

    cdef _grow(self):
        cdef int32_t i, cap = self.c.cap * 2 if self.c.cap else 64
        cdef Pair *pairs
        if cap > 1 << SLOT_BITS:
            raise MemoryError("too many pairs")
        pairs = <Pair *>PyMem_RawRealloc(self.c.pairs, cap * sizeof(Pair))
        if pairs == NULL:
            raise MemoryError()
        memset(&pairs[self.c.cap], 0, (cap - self.c.cap) * sizeof(Pair))
        for i in range(cap - 1, self.c.cap - 1, -1):
            pairs[i].next = self.c.free_head
            self.c.free_head = i
        self.c.pairs = pairs
        self.c.cap = cap

    cdef void _release(self, int32_t slot) noexcept:
        self.c.pairs[slot].id = 0
        self.c.pairs[slot].state = FREE
        self.c.pairs[slot].next = self.c.free_head
        self.c.free_head = slot

    cdef void _close(self) noexcept:
        cdef int32_t i
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
            if self.c.pairs[i].state != FREE:
                _detach(&self.c, &self.c.pairs[i])
                self._release(i)
        self.c.finished_head = -1
        self.c.nready = 0


# -- hot path (no GIL; in threaded mode, the relay thread with the lock held) --

cdef int _harvest(Core *c, int timeout) noexcept nogil:
    """epoll_wait into c.events: how many events, or -errno (EINTR is retried)."""
    cdef int n
    while True:
        n = epoll_wait(c.epfd, c.events, MAX_EVENTS, timeout)
        if n >= 0 or errno != EINTR:
            return n if n >= 0 else -errno


cdef void _handle(Core *c, int n) noexcept nogil:
    """Continue left-over pairs (within the budget), then turn n harvested events into work."""
    cdef int i, k = c.nready
    cdef uint64_t key
    cdef Pair *p
    c.budget = RUN_BUFS * c.bufsize
    while k > 0 and c.budget > 0:
        p = &c.pairs[c.ready_head]
        _unqueue(c, p)
        _visit(c, p)
        k -= 1
    for i in range(n):
        key = c.events[i].data.u64
        if key == WAKE_KEY:
            continue  # close() woke the thread; it checks c.stopping under the lock
        p = &c.pairs[(key >> 1) & ((1 << SLOT_BITS) - 1)]
        if p.id != key >> 1 or p.state != LIVE:
            continue  # finished earlier in this batch, or removed since epoll_wait
        _mark(p, key & 1, c.events[i].events)
        if p.queued:
            pass  # already has work waiting its turn: one budget per pair per batch
        elif c.budget > 0:
            _visit(c, p)
        else:
            _enqueue(c, p)


cdef void *_thread_main(void *arg) noexcept nogil:
    """The relay thread (threaded mode): epoll_wait, then one batch under the lock; no GIL.

    Sleeps in epoll_wait while nothing is ready (a left-over ready list polls instead), so
    an idle engine costs nothing. Finished pairs are announced on notify_fd, once until the
    loop's run() has collected them.
    """
    cdef Core *c = <Core *>arg
    cdef int n
    cdef uint64_t one = 1
    cdef sigset_t mask
    sigfillset(&mask)  # signals stay with Python's main thread (created blocked, too)
    pthread_sigmask(SIG_BLOCK, &mask, NULL)
    while True:
        n = _harvest(c, 0 if c.nready > 0 else -1)  # only this thread adds to nready
        pthread_mutex_lock(&c.lock)
        if c.stopping:
            pthread_mutex_unlock(&c.lock)
            return NULL
        if n < 0:
            c.thread_err = -n  # cannot happen with a valid epoll fd; reported by run()
        else:
            _handle(c, n)
        if (c.finished_head >= 0 or c.thread_err) and not c.notified:
            c.notified = 1
            write(c.notify_fd, &one, sizeof(one))
        pthread_mutex_unlock(&c.lock)
        if c.thread_err:
            return NULL


cdef void _mark(Pair *p, int side, uint32_t events) noexcept nogil:
    """Turn one event into work: what this fd's readiness lets each direction do."""
    cdef Dir *din = &p.dir[side]
    cdef Dir *dout = &p.dir[1 - side]
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        din.ready = 1
        if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            din.drain = 1
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR) and (dout.buf != NULL or dout.piped):
        dout.ready = 1
    if events & EPOLLERR:
        p.errcheck |= 1 << side

cdef void _visit(Core *c, Pair *p) noexcept nogil:
    cdef int i, r
    cdef int so_error
    cdef socklen_t optlen
    for i in range(2):
        if p.dir[i].ready:
            r = _pump(c, &p.dir[i], i)
            if r < 0:
                _finish(c, p, -r)
                return
            p.dir[i].ready = r == MORE
    if p.errcheck:
        # A reset on a socket we no longer read from (it already sent EOF) would only
        # show at our next send, which may never come; SO_ERROR surfaces it now. An error
        # seen before that EOF was read stays pending until it is: a reset after FIN
        # leaves the bytes and the EOF readable, and EPOLLERR does not come again.
        for i in range(2):
            if p.errcheck & (1 << i) and p.dir[i].eof:
                p.errcheck &= ~(1 << i)
                so_error = 0
                optlen = sizeof(so_error)
                getsockopt(p.dir[i].src, SOL_SOCKET, SO_ERROR, &so_error, &optlen)
                if so_error:
                    _finish(c, p, so_error)
                    return
    if p.dir[0].done and p.dir[1].done:
        _finish(c, p, 0)
    elif (p.dir[0].ready or p.dir[1].ready) and not p.queued:
        _enqueue(c, p)

cdef int _pump(Core *c, Dir *d, int i) noexcept nogil:
    """Move bytes one way until dst is full or src is empty: WAIT, MORE or -errno."""
    cdef ssize_t n, m
    cdef size_t moved = 0
    while not d.done:
        if d.piped or d.buf != NULL:  # dst refused these before: flush them first
            if d.piped:
                m = _splice(d.pipe[0], d.dst, d.piped)
                if m == -EAGAIN or m == 0:  # (0 cannot happen: a pipe with bytes)
                    return WAIT  # dst is full; its EPOLLOUT edge brings us back
                if m < 0:
                    return <int>m
                d.piped -= m
            else:
                m = _send(d.dst, d.buf + d.start, d.end - d.start)
                if m < 0:
                    return <int>m
                if m == 0:
                    return WAIT
                d.start += m
                if d.start == d.end:
                    _free(c, d.buf)
                    d.buf = NULL
            d.moved += m
            c.total[i] += m
            # A partial send loops once more: the EAGAIN it meets arms the edge for sure.
        elif d.eof:
            # Pass the half-close on (etcd's gateway closes both sockets at the first
            # EOF and drops the reply). ENOTCONN: dst is already gone, nothing to tell.
            if shutdown(d.dst, SHUT_WR) < 0 and errno != ENOTCONN:
                return -errno
            d.done = 1
        elif moved >= VISIT_BUFS * c.bufsize:
            return MORE
        elif d.bulk:
            n = _splice(d.src, d.pipe[1], c.bufsize)
            if n == -EAGAIN or n == 0:
                # src ran dry (or said EOF): back to recv/send, and the pipe is closed.
                # No short-read shortcut here: a pipe can fill up before bufsize bytes.
                _unpipe(c, d)
                if n == 0:
                    d.eof = 1
                    continue
                return WAIT
            if n < 0:
                return <int>n
            d.piped = n
            moved += n
            c.budget -= n
        else:
            n = _recv(d.src, c.scratch, c.bufsize)
            if n == -EAGAIN:
                return WAIT
            if n < 0:
                return <int>n
            if n == 0:
                d.eof = 1
                continue
            moved += n
            c.budget -= n
            m = _send(d.dst, c.scratch, n)
            if m < 0:
                return <int>m
            d.moved += m
            c.total[i] += m
            if m < n:
                d.buf = <char *>_alloc(c, n - m)
                if d.buf == NULL:
                    return -ENOMEM
                memcpy(d.buf, c.scratch + m, n - m)
                d.start = 0
                d.end = n - m
                if m == 0:
                    return WAIT  # EAGAIN: the EPOLLOUT edge is armed
            elif <size_t>n == c.bufsize:
                _pipe(c, d)  # a full read: bulk data, splice the next ones if we can
            elif not d.drain:
                # A short read emptied src: new data raises a new edge. Only a FIN that
                # came before this read would not, and its event carried RDHUP (drain).
                return WAIT
    return WAIT

cdef void _pipe(Core *c, Dir *d) noexcept nogil:
    """Give d a pipe and switch it to splice, if allowed and under the cap."""
    if not c.splice or c.npipes >= MAX_PIPES:
        return
    if pipe2(d.pipe, O_NONBLOCK | O_CLOEXEC) < 0:
        d.pipe[0] = d.pipe[1] = -1
        return  # EMFILE and friends: recv/send still work
    c.npipes += 1
    d.bulk = 1

cdef void _unpipe(Core *c, Dir *d) noexcept nogil:
    """Close d's pipe (with any bytes still in it) and go back to recv/send."""
    d.bulk = 0
    if d.pipe[0] < 0:
        return
    close(d.pipe[0])
    close(d.pipe[1])
    d.pipe[0] = d.pipe[1] = -1
    d.piped = 0
    c.npipes -= 1

cdef void _finish(Core *c, Pair *p, int err) noexcept nogil:
    _detach(c, p)
    p.err = err
    p.state = FINISHED
    p.next = c.finished_head
    c.finished_head = p.id & ((1 << SLOT_BITS) - 1)

cdef void _detach(Core *c, Pair *p) noexcept nogil:
    """Unregister both fds and drop buffers and pipes, so the owner may close the fds."""
    cdef int i
    if c.epfd >= 0:
        epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
        epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[1].src, NULL)
    for i in range(2):
        _free(c, p.dir[i].buf)
        p.dir[i].buf = NULL
        _unpipe(c, &p.dir[i])
    if p.queued:
        _unqueue(c, p)
    if p.state == LIVE:
        c.nlive -= 1

cdef void _enqueue(Core *c, Pair *p) noexcept nogil:
    cdef int32_t slot = p.id & ((1 << SLOT_BITS) - 1)
    p.queued = 1
    p.next = -1
    p.prev = c.ready_tail
    if c.ready_tail >= 0:
        c.pairs[c.ready_tail].next = slot
    else:
        c.ready_head = slot
    c.ready_tail = slot
    c.nready += 1

cdef void _unqueue(Core *c, Pair *p) noexcept nogil:
    p.queued = 0
    if p.prev >= 0:
        c.pairs[p.prev].next = p.next
    else:
        c.ready_head = p.next
    if p.next >= 0:
        c.pairs[p.next].prev = p.prev
    else:
        c.ready_tail = p.prev
    p.prev = p.next = -1
    c.nready -= 1
