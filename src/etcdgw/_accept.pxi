# Included by _relay.pyx (declarations: _relay.pxd).
# Native accept: the relay thread accepts, picks a target and connects (threaded mode).
#
# No GIL anywhere here: these run in the relay thread with the engine lock held. A client
# whose dial fails is handed back to Python (collect()'s failed list), which logs, marks the
# endpoint down and fails over exactly as for a client it accepted itself (dial.py).
#


cdef bint _pause_news(Core *c) noexcept nogil:
    cdef int i
    for i in range(c.nlst):
        if c.lst[i].fd >= 0 and c.lst[i].paused and not c.lst[i].reported:
            return True
    return False

cdef void _accept_all(Core *c) noexcept nogil:
    """Accept on every ready listener (up to ACCEPT_BATCH each) and dial each client."""
    cdef int i, k, cfd, e
    cdef Listener *lst
    for i in range(c.nlst):
        lst = &c.lst[i]
        k = 0
        while lst.fd >= 0 and lst.ready and not lst.paused and k < ACCEPT_BATCH:
            if c.limit and c.nlive + c.nconnecting + c.nheld >= c.limit:
                return  # --max-connections: clients wait in the backlog (ready stays set)
            cfd = raw_accept4(lst.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            k += 1  # every try counts, failed ones too: this runs under the lock, bounded
            if cfd < 0:
                e = errno
                if e == EAGAIN:
                    lst.ready = 0
                elif e != EINTR:
                    c.accept_errors += 1
                    if e == EMFILE or e == ENFILE or e == ENOBUFS or e == ENOMEM:
                        # Out of a resource: the caller pauses (and sheds) and resumes us.
                        lst.paused = 1
                        lst.reported = 0
                        lst.err = e
                    elif e == EBADF or e == EINVAL or e == ENOTSOCK:
                        # No listening socket behind the fd any more (closed, or shut down,
                        # without unlisten()): every try would fail alike. It was retried
                        # forever here, the lock held, and the loop's next call waited for
                        # the lock forever. Not ready until an edge (or listen()) says so.
                        lst.ready = 0
                    # else ECONNABORTED, EPROTO, EPERM...: that one client is gone
                continue
            c.accepted += 1
            _tune(c, lst, cfd)
            _dial(c, cfd)

cdef void _tune(Core *c, Listener *lst, int fd) noexcept nogil:
    """Give a client the socket options unless it inherited them from its listener."""
    cdef int j, v
    cdef int *opt
    cdef socklen_t n
    if lst.tune == 0:  # first client since the options changed: did it inherit them?
        lst.tune = 1
        for j in range(c.nsockopts + c.nlate_opts):
            opt = &c.sockopts[j][0] if j < c.nsockopts else &c.late_opts[j - c.nsockopts][0]
            v = 0
            n = sizeof(v)
            if getsockopt(fd, opt[0], opt[1], &v, &n) < 0 or v != opt[2]:
                lst.tune = 2
                break
    if lst.tune == 2:
        _setopts(c, fd)
        for j in range(c.nlate_opts):
            setsockopt(fd, c.late_opts[j][0], c.late_opts[j][1], &c.late_opts[j][2], sizeof(int))

cdef void _setopts(Core *c, int fd) noexcept nogil:
    cdef int j
    for j in range(c.nsockopts):
        setsockopt(fd, c.sockopts[j][0], c.sockopts[j][1], &c.sockopts[j][2], sizeof(int))

cdef void _dial(Core *c, int cfd) noexcept nogil:
    """Connect an accepted client to the next target and relay it, or hand it back."""
    cdef int32_t slot = _new_slot(c)
    cdef Pair *p
    cdef Target *t
    cdef int ti, ufd, r, err
    cdef epoll_event ev
    cdef sockaddr_storage peer
    cdef socklen_t plen = sizeof(peer)
    if slot < 0:
        raw_close(cfd)  # out of memory for the table: nothing better to do with it
        return
    p = &c.pairs[slot]
    p.owned = 1
    p.dir[0].src = p.dir[1].dst = cfd
    p.dir[0].dst = p.dir[1].src = -1
    ti = _pick(c)
    if ti < 0:
        _dial_fail(c, p, -1, 0)  # nothing usable: the caller's fallback decides
        return
    t = &c.targets[ti]
    p.tag = t.tag
    _count(t, p)  # a client being connected counts for least-connections already
    if t.addrlen == 0:
        _dial_fail(c, p, t.tag, 0)  # a host name not resolved yet: the caller dials
        return
    ufd = socket(t.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if ufd < 0:
        _dial_fail(c, p, -1, errno)  # out of fds: not the endpoint's fault
        return
    _setopts(c, ufd)
    p.dir[0].dst = p.dir[1].src = ufd
    r = raw_connect(ufd, <sockaddr *>&t.addr, t.addrlen)
    if r < 0 and errno != EINPROGRESS:
        _dial_fail(c, p, t.tag, errno)
        return
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET  # EPOLLOUT once needed (_arm_out)
    ev.data.u64 = p.id << 1
    if epoll_ctl(c.epfd, EPOLL_CTL_ADD, cfd, &ev) < 0:
        _dial_fail(c, p, -1, errno)
        return
    ev.data.u64 = (p.id << 1) | 1
    if r < 0:  # still connecting: its completion shows as EPOLLOUT
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        p.outarmed = 2
    if epoll_ctl(c.epfd, EPOLL_CTL_ADD, ufd, &ev) < 0:
        err = errno
        epoll_ctl(c.epfd, EPOLL_CTL_DEL, cfd, NULL)
        _dial_fail(c, p, -1, err)
        return
    if r == 0 or getpeername(ufd, <sockaddr *>&peer, &plen) == 0:
        # Over loopback the handshake is done inside connect(): relay at once. The fds'
        # first epoll events (registration of ready fds) bring any early bytes.
        _go_live(c, p)
        return
    p.state = CONNECTING
    # The precise clock for dial deadlines (here, _expire, _timeout: only while a dial that
    # connect() did not finish at once is under way). From the coarse clock, a tick behind
    # at most, a busy thread (checking at every batch) failed a 3 ms dial after 0.46 ms, and
    # an idle one waited up to a tick too long (a 1 ms dial: 4 ms).
    p.deadline = _precise_ns() + c.dial_timeout_ns
    p.cnext = -1
    p.cprev = c.conn_tail
    if c.conn_tail >= 0:
        c.pairs[c.conn_tail].cnext = slot
    else:
        c.conn_head = slot
    c.conn_tail = slot
    c.nconnecting += 1

cdef void _unconnect(Core *c, Pair *p) noexcept nogil:
    if p.cprev >= 0:
        c.pairs[p.cprev].cnext = p.cnext
    else:
        c.conn_head = p.cnext
    if p.cnext >= 0:
        c.pairs[p.cnext].cprev = p.cprev
    else:
        c.conn_tail = p.cprev
    p.cprev = p.cnext = -1
    c.nconnecting -= 1

cdef void _go_live(Core *c, Pair *p) noexcept nogil:
    cdef int32_t slot = p.id & ((1 << SLOT_BITS) - 1)
    if c.nlate_opts:
        _late_push(c, slot, p.id)
    p.state = LIVE
    c.nlive += 1
    if c.least:
        p.deadline = _now_ns()  # from now on: when it went live (a strike's window)
    p.fresh = 1
    p.snext = c.started_head
    c.started_head = slot
    c.nunreported += 1
    c.nrecords += 1

cdef void _connected(Core *c, Pair *p, uint32_t events) noexcept nogil:
    """The upstream socket of a CONNECTING pair reported: relay, or hand the client back."""
    cdef int so_error = 0
    cdef socklen_t optlen = sizeof(so_error)
    _unconnect(c, p)
    getsockopt(p.dir[1].src, SOL_SOCKET, SO_ERROR, &so_error, &optlen)
    if so_error == 0 and events & (EPOLLERR | EPOLLHUP):
        so_error = ECONNREFUSED
    if so_error:
        _dial_fail_registered(c, p, so_error)
        return
    _go_live(c, p)
    # Edges of the client that came while connecting were not acted on: read it now.
    p.dir[0].ready = p.dir[0].drain = 1
    _mark(p, 1, events)
    if c.budget > 0:
        _visit(c, p)
    else:
        _enqueue(c, p)

cdef void _dial_fail(Core *c, Pair *p, int64_t tag, int err) noexcept nogil:
    """Close the upstream socket (if any) and queue the client for the caller."""
    cdef int32_t slot = p.id & ((1 << SLOT_BITS) - 1)
    _untrack(c, p)
    if p.dir[1].src >= 0:
        raw_close(p.dir[1].src)
    p.dir[0].dst = p.dir[1].src = -1
    p.tag = tag
    p.err = err
    p.state = DIALFAIL
    c.nheld += 1  # the loop holds the client now; it counts until release()
    p.next = c.finished_head
    c.finished_head = slot
    c.nunreported += 1
    c.nfailed += 1
    c.nrecords += 1

cdef void _dial_fail_registered(Core *c, Pair *p, int err) noexcept nogil:
    """_dial_fail() for a pair whose two fds are in the epoll set (it was connecting)."""
    epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[0].src, NULL)
    epoll_ctl(c.epfd, EPOLL_CTL_DEL, p.dir[1].src, NULL)
    _dial_fail(c, p, p.tag, err)

cdef void _expire(Core *c) noexcept nogil:
    """Fail the dials whose --dial-timeout passed (the list is oldest first)."""
    cdef uint64_t now = _precise_ns()
    cdef Pair *p
    while c.conn_head >= 0:
        p = &c.pairs[c.conn_head]
        if p.deadline > now:
            return
        _unconnect(c, p)
        _dial_fail_registered(c, p, ETIMEDOUT)


cdef void _late_push(Core *c, int32_t slot, uint64_t pid) noexcept nogil:
    """Remember to set the late options on this pair's upstream socket (see set_targets)."""
    cdef Late *ring
    cdef int32_t i, cap
    if c.late_n == c.late_cap:
        cap = c.late_cap * 2 if c.late_cap else 256
        ring = <Late *>malloc(cap * sizeof(Late))
        if ring == NULL:
            _setopts_late(c, c.pairs[slot].dir[1].src)  # no memory: set them now
            return
        for i in range(c.late_n):  # unroll the ring, oldest first
            ring[i] = c.late[(c.late_head + i) % c.late_cap]
        free(c.late)
        c.late = ring
        c.late_cap = cap
        c.late_head = 0
    i = (c.late_head + c.late_n) % c.late_cap
    c.late[i].slot = slot
    c.late[i].id = pid
    c.late[i].due = _now_ns() + c.late_ns
    c.late_n += 1

cdef void _apply_late(Core *c) noexcept nogil:
    """Set the late options on the upstream sockets of pairs that are still live."""
    cdef uint64_t now = _now_ns()
    cdef Late *e
    cdef Pair *p
    while c.late_n:
        e = &c.late[c.late_head]
        if e.due > now:
            return
        p = &c.pairs[e.slot]
        if p.id == e.id and p.state == LIVE:
            _setopts_late(c, p.dir[1].src)
        c.late_head = (c.late_head + 1) % c.late_cap
        c.late_n -= 1

cdef void _setopts_late(Core *c, int fd) noexcept nogil:
    cdef int j
    for j in range(c.nlate_opts):
        setsockopt(fd, c.late_opts[j][0], c.late_opts[j][1], &c.late_opts[j][2], sizeof(int))
