# Included by _relay.pyx (declarations: _relay.pxd).
# The hot path: the system calls that move bytes (recv, send, splice), the relay loop
# (epoll_wait, events, the fairness budget, the relay thread) and what moves a pair's bytes
# and ends it.
#
# No GIL anywhere here; in threaded mode these run in the relay thread with the engine lock
# held (loop mode: in run(), on the caller's thread, inside `with nogil:`).
#


cdef inline ssize_t _recv(int fd, char *buf, size_t n) noexcept nogil:
    """Bytes read, 0 at EOF, -EAGAIN when there is nothing to read, else -errno."""
    cdef ssize_t r
    while True:
        r = raw_recv(fd, buf, n, 0)
        if r >= 0:
            return r
        if errno != EINTR:
            return -errno


cdef inline ssize_t _send(int fd, const char *buf, size_t n) noexcept nogil:
    """Bytes taken (0 when dst is full), else -errno; never raises SIGPIPE."""
    cdef ssize_t r
    while True:
        r = raw_send(fd, buf, n, MSG_NOSIGNAL)
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


cdef int _harvest(Core *c, int timeout) noexcept nogil:
    """epoll_wait into c.events: how many events, or -errno (EINTR is retried)."""
    cdef int n
    while True:
        n = raw_epoll_wait(c.epfd, c.events, MAX_EVENTS, timeout)
        if n >= 0 or errno != EINTR:
            return n if n >= 0 else -errno


cdef void _handle(Core *c, int n) noexcept nogil:
    """Continue left-over pairs (within the budget), then turn n harvested events into work."""
    cdef int i, k = c.nready
    cdef uint64_t key, count
    cdef Pair *p
    c.budget = RUN_BUFS * c.bufsize
    while k > 0 and c.budget > 0:
        p = &c.pairs[c.ready_head]
        _unqueue(c, p)
        _visit(c, p)
        k -= 1
    for i in range(n):
        key = c.events[i].data.u64
        if key >= LISTEN_KEY:
            if key == WAKE_KEY:
                # The loop changed something (close, listen, targets, remove): the thread
                # looks at everything after this batch anyway.
                read(c.wake_fd, &count, sizeof(count))
            elif key - LISTEN_KEY < <uint64_t>c.nlst and c.lst[key - LISTEN_KEY].fd >= 0:
                c.lst[key - LISTEN_KEY].ready = 1  # accepted after the events (_accept_all)
            continue
        p = &c.pairs[(key >> 1) & ((1 << SLOT_BITS) - 1)]
        if p.id != key >> 1:
            continue  # finished earlier in this batch, or removed since epoll_wait
        if p.state == CONNECTING:
            if key & 1 and c.events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                _connected(c, p, c.events[i].events)
            continue  # client events wait: the client is read once the dial is done
        if p.state != LIVE:
            continue
        _mark(p, key & 1, c.events[i].events)
        if p.queued:
            pass  # already has work waiting its turn: one budget per pair per batch
        elif c.budget > 0:
            _visit(c, p)
        else:
            _enqueue(c, p)


cdef void _thread_lock(Core *c) noexcept nogil:
    """The relay thread takes the lock; when the loop holds it, the wait is counted (the
    loop's share of the lock is relaying time lost: Engine._lock_waits())."""
    cdef uint64_t t0, waited
    if pthread_mutex_trylock(&c.lock) == 0:
        return
    t0 = _precise_ns()
    pthread_mutex_lock(&c.lock)
    waited = _precise_ns() - t0
    c.lock_waits += 1
    c.lock_wait_ns += waited
    if waited > c.lock_wait_max_ns:
        c.lock_wait_max_ns = waited


cdef void *_thread_main(void *arg) noexcept nogil:
    """The relay thread (threaded mode): epoll_wait, then one batch under the lock; no GIL.

    Sleeps in epoll_wait while nothing is ready (a left-over ready list polls instead), so
    an idle engine costs nothing. Finished pairs are announced on notify_fd, once until the
    loop's run() has collected them.
    """
    cdef Core *c = <Core *>arg
    cdef int n, timeout = -1
    cdef bint notify
    cdef uint64_t one = 1
    cdef sigset_t mask
    sigfillset(&mask)  # signals stay with Python's main thread (created blocked, too)
    pthread_sigmask(SIG_BLOCK, &mask, NULL)
    while True:
        # timeout was computed under the lock at the end of the last batch; whatever the
        # loop changes since then that needs the thread (listen, set_targets, remove,
        # close) writes wake_fd.
        n = _harvest(c, timeout)
        _thread_lock(c)
        if c.stopping:
            pthread_mutex_unlock(&c.lock)
            return NULL
        if n < 0:
            c.thread_err = -n  # cannot happen with a valid epoll fd; reported by run()
        else:
            _handle(c, n)
            if c.conn_head >= 0:
                _expire(c)
            if c.nlst:
                _accept_all(c)
            if c.late_n:
                _apply_late(c)
        notify = not c.notified and _report_due(c)
        if notify:
            c.notified = 1
        timeout = _timeout(c)
        pthread_mutex_unlock(&c.lock)
        # Wake the loop only now: woken while the thread still held the lock, its collect()
        # found the lock taken and slept on it, and the unlock had to wake it a second time
        # (at 5,000 new connections/s a collect() took 116-137 µs of wall time, now 53-77).
        if notify:
            write(c.notify_fd, &one, sizeof(one))
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
            r = _pump(c, &p.dir[i], i, p.owned and p.dir[1 - i].done)
            if r < 0:
                _finish(c, p, -r)
                return
            p.dir[i].ready = r == MORE
            if (p.dir[i].buf != NULL or p.dir[i].piped) and not p.outarmed & (1 << (1 - i)):
                r = _arm_out(c, p, 1 - i)
                if r < 0:
                    _finish(c, p, -r)
                    return
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
    if not p.first:
        p.first = 1 if p.dir[0].eof else (2 if p.dir[1].eof else 0)
    if p.dir[0].done and p.dir[1].done:
        _finish(c, p, 0)
    elif (p.dir[0].ready or p.dir[1].ready) and not p.queued:
        _enqueue(c, p)

cdef int _pump(Core *c, Dir *d, int i, bint last) noexcept nogil:
    """Move bytes one way until dst is full or src is empty: WAIT, MORE or -errno.

    last: the engine closes dst as soon as this direction is done (its own pair, the other
    direction done already), and close() sends the FIN: no shutdown() needed.
    """
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
            if not last and shutdown(d.dst, SHUT_WR) < 0 and errno != ENOTCONN:
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
    raw_close(d.pipe[0])
    raw_close(d.pipe[1])
    d.pipe[0] = d.pipe[1] = -1
    d.piped = 0
    c.npipes -= 1

cdef uint8_t _ended(Pair *p) noexcept nogil:
    """Which side ended the pair first: 1 client, 2 upstream, 0 unknown (an EOF, else the
    side whose fd reported an error)."""
    if p.first:
        return p.first
    if p.errcheck & 1:
        return 1
    if p.errcheck & 2:
        return 2
    return 0

cdef bint _silent(Pair *p) noexcept nogil:
    """The upstream ended the pair first without a byte, after the client had sent some:
    a strike for least-connections (monitor.py)."""
    return p.dir[0].moved > 0 and p.dir[1].moved == 0 and _ended(p) == 2

cdef void _finish(Core *c, Pair *p, int err) noexcept nogil:
    cdef Target *t
    if c.least and p.owned and _silent(p) and _now_ns() - p.deadline < IMMEDIATE_NS:
        # A member that ends fresh connections at once holds none, so least-connections
        # would send it the next client too, and the next, until the loop hears of it
        # (monitor.Monitor.strike sets it aside). Set it aside here at once, and report
        # now; the loop's next set_targets carries its decision.
        t = _target_of(c, p.tag)
        if t != NULL:
            t.usable = 0
        c.report_at = 1
    _untrack(c, p)
    if p.owned:
        # close() drops the registrations itself: no EPOLL_CTL_DEL for the engine's pairs
        _detach_bufs(c, p)
        _close_fds(p, err)
    else:
        _detach(c, p)
    p.err = err
    p.state = FINISHED
    c.nrecords += 1
    p.next = c.finished_head
    c.finished_head = p.id & ((1 << SLOT_BITS) - 1)

cdef void _detach(Core *c, Pair *p) noexcept nogil:
    """Unregister both fds and drop buffers and pipes, so the owner may close the fds."""
    if c.epfd >= 0:
        epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
        epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[1].src, NULL)
    _detach_bufs(c, p)

cdef void _detach_bufs(Core *c, Pair *p) noexcept nogil:
    """_detach() but the epoll registrations."""
    cdef int i
    for i in range(2):
        _free(c, p.dir[i].buf)
        p.dir[i].buf = NULL
        _unpipe(c, &p.dir[i])
    if p.queued:
        _unqueue(c, p)
    if p.state == LIVE:
        c.nlive -= 1
    elif p.state == CONNECTING:
        _unconnect(c, p)


cdef uint64_t _now_ns() noexcept nogil:
    """The clock of deadlines but the dial timeout's (reports, late options, strikes): the
    coarse monotonic clock, one tick (1-10 ms) behind at most. Its reads take a few loads, not a
    clock-source read (~20 ns in a VM, several per new connection: perf, issue 21), and
    every deadline here is milliseconds or more, rounded up to epoll_wait's 1 ms."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec

cdef uint64_t _precise_ns() noexcept nogil:
    """CLOCK_MONOTONIC, for measuring short waits (Engine._lock_waits) and dial deadlines."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec

cdef int _timeout(Core *c) noexcept nogil:
    """epoll_wait's timeout for the relay thread's next wait, in ms (-1: none)."""
    cdef uint64_t now, d = 0, dial = 0, ms = 3600000
    cdef int i
    if c.nready > 0:
        return 0
    if not c.limit or c.nlive + c.nconnecting + c.nheld < c.limit:
        for i in range(c.nlst):
            if c.lst[i].fd >= 0 and c.lst[i].ready and not c.lst[i].paused:
                return 0  # an accept batch ran out before EAGAIN: go on after the events
    if c.conn_head >= 0:
        dial = c.pairs[c.conn_head].deadline  # CLOCK_MONOTONIC (_dial)
    if c.report_at and not c.notified:
        d = c.report_at
    if c.late_n and (d == 0 or c.late[c.late_head].due < d):
        d = c.late[c.late_head].due
    if d == 0 and dial == 0:
        return -1
    if d:
        now = _now_ns()
        if d <= now:
            return 0
        ms = min((d - now + 999999) // 1000000, ms)
    if dial:
        now = _precise_ns()  # only while a dial is under way (not over loopback)
        if dial <= now:
            return 0
        ms = min((dial - now + 999999) // 1000000, ms)
    return <int>ms

cdef bint _report_due(Core *c) noexcept nogil:
    """Whether the thread should wake the loop now (see REPORT_DELAY_NS)."""
    cdef uint64_t now
    if c.thread_err or c.nfailed or _pause_news(c):
        return True
    if c.finished_head < 0 and c.started_head < 0:
        return False
    if not c.threaded or c.nrecords >= REPORT_BATCH:
        return True
    now = _now_ns()
    if c.report_at == 0:
        c.report_at = now + REPORT_DELAY_NS
    return now >= c.report_at

cdef int _arm_out(Core *c, Pair *p, int side) noexcept nogil:
    """Add EPOLLOUT to one fd of a pair: its peer direction has bytes the fd refused.

    Fds are registered without EPOLLOUT: with it, every ACK that frees send space raises an
    edge and wakes the relay thread for nothing (for small request/response traffic, about
    as many wake-ups as the data itself). The first time a destination refuses bytes it is
    armed for good (bulk pairs pay one EPOLL_CTL_MOD); the modify re-checks readiness, so
    space that appeared meanwhile still raises the edge. 0, or -errno.
    """
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.u64 = (p.id << 1) | <uint64_t>side
    if epoll_ctl(c.epfd, EPOLL_CTL_MOD, p.dir[side].src, &ev) < 0:
        return -errno
    p.outarmed |= 1 << side
    return 0
