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
# - run() does epoll_wait and all event handling inside one `with nogil:` block, records
#   finished pairs in a C list and builds Python tuples only after the GIL is back.

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EAGAIN, EINTR, ENOMEM, ENOTCONN, errno
from libc.signal cimport SIG_DFL, SIGPIPE
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strerror
from posix.signal cimport sigaction, sigaction_t
from posix.unistd cimport close

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

# Benchmarks compare splice with plain recv/send through _set_splice(); not an API.
cdef bint splice_enabled = True


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


cdef bint _sigpipe_kills() noexcept:
    """True if SIGPIPE has its default action (CPython normally ignores it)."""
    cdef sigaction_t current
    if sigaction(SIGPIPE, NULL, &current) < 0:
        return True
    return <void *>current.sa_handler == <void *>SIG_DFL


cdef class Engine:
    """Relay bytes between borrowed pairs of non-blocking sockets, both ways, on one epoll fd."""

    cdef int epfd
    cdef size_t bufsize
    cdef bint splice
    cdef char *scratch
    cdef Pair *pairs
    cdef int32_t cap
    cdef int32_t nlive
    cdef int32_t free_head
    cdef int32_t ready_head
    cdef int32_t ready_tail
    cdef int32_t nready
    cdef int32_t finished_head
    cdef uint64_t gen
    cdef uint64_t total[2]
    cdef Py_ssize_t budget
    cdef int npipes
    cdef epoll_event events[MAX_EVENTS]

    def __cinit__(self, *args, **kwargs):
        self.epfd = -1
        self.free_head = self.ready_head = self.ready_tail = self.finished_head = -1
        self.gen = 1

    def __init__(self, bufsize: int = 65536) -> None:
        if not 1 <= bufsize <= 1 << 30:
            raise ValueError(f"bufsize out of range: {bufsize}")
        if self.scratch != NULL or self.epfd >= 0:
            raise RuntimeError("Engine.__init__ called twice")
        self.bufsize = bufsize
        # splice cannot pass MSG_NOSIGNAL: only use it while SIGPIPE cannot kill us.
        self.splice = splice_enabled and not _sigpipe_kills()
        self.scratch = <char *>PyMem_RawMalloc(bufsize)
        if self.scratch == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, strerror(errno).decode())

    def __dealloc__(self):
        self._close()
        PyMem_RawFree(self.pairs)
        PyMem_RawFree(self.scratch)

    def fileno(self) -> int:
        """The engine's epoll fd: register it with loop.add_reader."""
        self._check_open()
        return self.epfd

    def add(self, client_fd: int, upstream_fd: int) -> int:
        """Start relaying between two connected non-blocking sockets; return the pair id."""
        cdef int cfd = client_fd, ufd = upstream_fd, err
        cdef int32_t slot
        cdef Pair *p
        cdef epoll_event ev
        self._check_open()
        if self.free_head < 0:
            self._grow()
        slot = self.free_head
        p = &self.pairs[slot]
        self.free_head = p.next
        memset(p, 0, sizeof(Pair))
        p.id = (self.gen << SLOT_BITS) | <uint64_t>slot
        self.gen += 1
        p.prev = p.next = -1
        p.dir[0].src = p.dir[1].dst = cfd
        p.dir[0].dst = p.dir[1].src = ufd
        p.dir[0].pipe[0] = p.dir[0].pipe[1] = p.dir[1].pipe[0] = p.dir[1].pipe[1] = -1
        # Registered once: ET means no epoll_ctl per event; an fd that is already readable
        # reports at the next epoll_wait, so bytes sent before add() are not lost.
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = p.id << 1
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, cfd, &ev) == 0:
            ev.data.u64 = (p.id << 1) | 1
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, ufd, &ev) == 0:
                p.state = LIVE
                self.nlive += 1
                return p.id
            err = errno
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, cfd, NULL)
        else:
            err = errno
        self._release(slot)
        raise OSError(err, strerror(err).decode())

    def run(self) -> list[tuple[int, int, int, int]]:
        """Handle ready events without blocking; return the pairs that finished."""
        cdef int err
        cdef int32_t slot
        cdef Pair *p
        self._check_open()
        with nogil:
            err = self._run()
        if err:
            raise OSError(err, strerror(err).decode())
        finished = []
        while self.finished_head >= 0:
            slot = self.finished_head
            p = &self.pairs[slot]
            finished.append((p.id, p.dir[0].moved, p.dir[1].moved, p.err))
            self.finished_head = p.next
            self._release(slot)
        return finished

    @property
    def pending(self) -> bool:
        """True if run() stopped early for fairness: call run() again soon."""
        return self.nready > 0

    def remove(self, pair_id: int) -> tuple[int, int, int, int]:
        """Stop relaying a pair now; its fds are unregistered when this returns."""
        cdef Pair *p = self._lookup(pair_id)
        self._detach(p)
        result = (p.id, p.dir[0].moved, p.dir[1].moved, 0)
        self._release(p.id & ((1 << SLOT_BITS) - 1))
        return result

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(bytes client->upstream, bytes upstream->client) relayed so far for one pair."""
        cdef Pair *p = self._lookup(pair_id)
        return (p.dir[0].moved, p.dir[1].moved)

    def totals(self) -> tuple[int, int]:
        """The same two counts summed over every pair this engine ever relayed."""
        return (self.total[0], self.total[1])

    def __len__(self) -> int:
        return self.nlive

    def close(self) -> None:
        """Close the epoll fd (idempotent); relayed fds stay open, they belong to the caller."""
        self._close()

    # -- helpers (GIL held) --

    cdef _check_open(self):
        if self.epfd < 0:
            raise ValueError("I/O operation on closed engine")

    cdef Pair *_lookup(self, pair_id) except NULL:
        cdef uint64_t pid, slot
        if isinstance(pair_id, int) and 0 < pair_id < 1 << 63:
            pid = pair_id
            slot = pid & ((1 << SLOT_BITS) - 1)
            if slot < <uint64_t>self.cap and self.pairs[slot].id == pid \
                    and self.pairs[slot].state == LIVE:
                return &self.pairs[slot]
        raise KeyError(pair_id)

    cdef _grow(self):
        cdef int32_t i, cap = self.cap * 2 if self.cap else 64
        cdef Pair *pairs
        if cap > 1 << SLOT_BITS:
            raise MemoryError("too many pairs")
        pairs = <Pair *>PyMem_RawRealloc(self.pairs, cap * sizeof(Pair))
        if pairs == NULL:
            raise MemoryError()
        memset(&pairs[self.cap], 0, (cap - self.cap) * sizeof(Pair))
        for i in range(cap - 1, self.cap - 1, -1):
            pairs[i].next = self.free_head
            self.free_head = i
        self.pairs = pairs
        self.cap = cap

    cdef void _release(self, int32_t slot) noexcept:
        self.pairs[slot].id = 0
        self.pairs[slot].state = FREE
        self.pairs[slot].next = self.free_head
        self.free_head = slot

    cdef void _close(self) noexcept:
        cdef int32_t i
        if self.epfd < 0:
            return
        close(self.epfd)  # drops every registration at once
        self.epfd = -1
        for i in range(self.cap):
            if self.pairs[i].state != FREE:
                self._detach(&self.pairs[i])
                self._release(i)
        self.finished_head = -1

    # -- hot path (no GIL) --

    cdef int _run(self) noexcept nogil:
        """Continue left-over pairs, then harvest events; 0 or the errno of epoll_wait."""
        cdef int n, i, k = self.nready
        cdef uint64_t key
        cdef Pair *p
        self.budget = RUN_BUFS * self.bufsize
        while k > 0 and self.budget > 0:
            p = &self.pairs[self.ready_head]
            self._unqueue(p)
            self._visit(p)
            k -= 1
        while True:
            n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
            if n >= 0:
                break
            if errno != EINTR:
                return errno
        for i in range(n):
            key = self.events[i].data.u64
            p = &self.pairs[(key >> 1) & ((1 << SLOT_BITS) - 1)]
            if p.id != key >> 1 or p.state != LIVE:
                continue  # finished earlier in this batch
            self._mark(p, key & 1, self.events[i].events)
            if p.queued:
                pass  # already has work waiting its turn: one budget per pair per run
            elif self.budget > 0:
                self._visit(p)
            else:
                self._enqueue(p)
        return 0

    cdef void _mark(self, Pair *p, int side, uint32_t events) noexcept nogil:
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

    cdef void _visit(self, Pair *p) noexcept nogil:
        cdef int i, r
        cdef int so_error
        cdef socklen_t optlen
        for i in range(2):
            if p.dir[i].ready:
                r = self._pump(&p.dir[i], i)
                if r < 0:
                    self._finish(p, -r)
                    return
                p.dir[i].ready = r == MORE
        if p.errcheck:
            # A reset on a socket we no longer read from (it already sent EOF) would only
            # show at our next send, which may never come; SO_ERROR surfaces it now.
            for i in range(2):
                if p.errcheck & (1 << i) and p.dir[i].eof:
                    so_error = 0
                    optlen = sizeof(so_error)
                    getsockopt(p.dir[i].src, SOL_SOCKET, SO_ERROR, &so_error, &optlen)
                    if so_error:
                        self._finish(p, so_error)
                        return
            p.errcheck = 0
        if p.dir[0].done and p.dir[1].done:
            self._finish(p, 0)
        elif (p.dir[0].ready or p.dir[1].ready) and not p.queued:
            self._enqueue(p)

    cdef int _pump(self, Dir *d, int i) noexcept nogil:
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
                        PyMem_RawFree(d.buf)
                        d.buf = NULL
                d.moved += m
                self.total[i] += m
                # A partial send loops once more: the EAGAIN it meets arms the edge for sure.
            elif d.eof:
                # Pass the half-close on (etcd's gateway closes both sockets at the first
                # EOF and drops the reply). ENOTCONN: dst is already gone, nothing to tell.
                if shutdown(d.dst, SHUT_WR) < 0 and errno != ENOTCONN:
                    return -errno
                d.done = 1
            elif moved >= VISIT_BUFS * self.bufsize:
                return MORE
            elif d.bulk:
                n = _splice(d.src, d.pipe[1], self.bufsize)
                if n == -EAGAIN or n == 0:
                    # src ran dry (or said EOF): back to recv/send, and the pipe is closed.
                    # No short-read shortcut here: a pipe can fill up before bufsize bytes.
                    self._unpipe(d)
                    if n == 0:
                        d.eof = 1
                        continue
                    return WAIT
                if n < 0:
                    return <int>n
                d.piped = n
                moved += n
                self.budget -= n
            else:
                n = _recv(d.src, self.scratch, self.bufsize)
                if n == -EAGAIN:
                    return WAIT
                if n < 0:
                    return <int>n
                if n == 0:
                    d.eof = 1
                    continue
                moved += n
                self.budget -= n
                m = _send(d.dst, self.scratch, n)
                if m < 0:
                    return <int>m
                d.moved += m
                self.total[i] += m
                if m < n:
                    d.buf = <char *>PyMem_RawMalloc(n - m)
                    if d.buf == NULL:
                        return -ENOMEM
                    memcpy(d.buf, self.scratch + m, n - m)
                    d.start = 0
                    d.end = n - m
                    if m == 0:
                        return WAIT  # EAGAIN: the EPOLLOUT edge is armed
                elif <size_t>n == self.bufsize:
                    self._pipe(d)  # a full read: bulk data, splice the next ones if we can
                elif not d.drain:
                    # A short read emptied src: new data raises a new edge. Only a FIN that
                    # came before this read would not, and its event carried RDHUP (drain).
                    return WAIT
        return WAIT

    cdef void _pipe(self, Dir *d) noexcept nogil:
        """Give d a pipe and switch it to splice, if allowed and under the cap."""
        if not self.splice or self.npipes >= MAX_PIPES:
            return
        if pipe2(d.pipe, O_NONBLOCK | O_CLOEXEC) < 0:
            d.pipe[0] = d.pipe[1] = -1
            return  # EMFILE and friends: recv/send still work
        self.npipes += 1
        d.bulk = 1

    cdef void _unpipe(self, Dir *d) noexcept nogil:
        """Close d's pipe (with any bytes still in it) and go back to recv/send."""
        d.bulk = 0
        if d.pipe[0] < 0:
            return
        close(d.pipe[0])
        close(d.pipe[1])
        d.pipe[0] = d.pipe[1] = -1
        d.piped = 0
        self.npipes -= 1

    cdef void _finish(self, Pair *p, int err) noexcept nogil:
        self._detach(p)
        p.err = err
        p.state = FINISHED
        p.next = self.finished_head
        self.finished_head = p.id & ((1 << SLOT_BITS) - 1)

    cdef void _detach(self, Pair *p) noexcept nogil:
        """Unregister both fds and drop buffers and pipes, so the owner may close the fds."""
        cdef int i
        if self.epfd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, p.dir[1].src, NULL)
        for i in range(2):
            PyMem_RawFree(p.dir[i].buf)
            p.dir[i].buf = NULL
            self._unpipe(&p.dir[i])
        if p.queued:
            self._unqueue(p)
        if p.state == LIVE:
            self.nlive -= 1

    cdef void _enqueue(self, Pair *p) noexcept nogil:
        cdef int32_t slot = p.id & ((1 << SLOT_BITS) - 1)
        p.queued = 1
        p.next = -1
        p.prev = self.ready_tail
        if self.ready_tail >= 0:
            self.pairs[self.ready_tail].next = slot
        else:
            self.ready_head = slot
        self.ready_tail = slot
        self.nready += 1

    cdef void _unqueue(self, Pair *p) noexcept nogil:
        p.queued = 0
        if p.prev >= 0:
            self.pairs[p.prev].next = p.next
        else:
            self.ready_head = p.next
        if p.next >= 0:
            self.pairs[p.next].prev = p.prev
        else:
            self.ready_tail = p.prev
        p.prev = p.next = -1
        self.nready -= 1
