# Included by _relay.pyx (declarations: _relay.pxd).
# The pair table: slots (a free list, generations in the ids), the ready list, and what
# detach() takes out of a pair.
#


cdef bytes _carried(Dir *d):
    """The bytes one direction read and its destination has not taken: its buffer, then
    its pipe (drained: the pipe stays the engine's)."""
    cdef bytes piped
    cdef ssize_t r, got = 0
    head = d.buf[d.start:d.end] if d.buf != NULL else b""
    if not d.piped:
        return head
    piped = PyBytes_FromStringAndSize(NULL, d.piped)
    while got < d.piped:
        r = read(d.pipe[0], PyBytes_AS_STRING(piped) + got, d.piped - got)
        if r <= 0:
            if r < 0 and errno == EINTR:
                continue
            raise OSError(errno, "draining a relay pipe: " + strerror(errno).decode())
        got += r
    return head + piped

cdef void _drop_released_started(Core *c) noexcept nogil:
    """Unlink the pairs released since (detach) from the started list."""
    cdef int32_t slot = c.started_head, prev = -1, nxt
    while slot >= 0:
        nxt = c.pairs[slot].snext
        if c.pairs[slot].state == FREE:
            c.pairs[slot].snext = -1
            c.pairs[slot].fresh = 0
            c.nunreported -= 1
            c.nrecords -= 1
            if prev >= 0:
                c.pairs[prev].snext = nxt
            else:
                c.started_head = nxt
        else:
            prev = slot
        slot = nxt

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


cdef int _grow(Core *c) noexcept nogil:
    """Double the pair table; 0, or -1 when out of memory or slots."""
    cdef int32_t i, cap = c.cap * 2 if c.cap else 64
    cdef Pair *pairs
    if cap > 1 << SLOT_BITS:
        return -1
    if c.threaded:
        pairs = <Pair *>realloc(c.pairs, cap * sizeof(Pair))
    else:
        pairs = <Pair *>PyMem_RawRealloc(c.pairs, cap * sizeof(Pair))
    if pairs == NULL:
        return -1
    memset(&pairs[c.cap], 0, (cap - c.cap) * sizeof(Pair))
    for i in range(cap - 1, c.cap - 1, -1):
        pairs[i].next = c.free_head
        c.free_head = i
    c.pairs = pairs
    c.cap = cap
    return 0

cdef int32_t _new_slot(Core *c) noexcept nogil:
    """A zeroed pair with a fresh id and no fds, or -1. May move c.pairs (realloc)."""
    cdef int32_t slot
    cdef Pair *p
    if c.free_head < 0 and _grow(c) < 0:
        return -1
    slot = c.free_head
    p = &c.pairs[slot]
    c.free_head = p.next
    memset(p, 0, sizeof(Pair))
    p.id = (c.gen << SLOT_BITS) | <uint64_t>slot
    c.gen += 1
    p.prev = p.next = p.snext = p.cprev = p.cnext = -1
    p.tag = -1
    p.dir[0].pipe[0] = p.dir[0].pipe[1] = p.dir[1].pipe[0] = p.dir[1].pipe[1] = -1
    return slot

cdef void _release(Core *c, int32_t slot) noexcept nogil:
    c.pairs[slot].id = 0
    c.pairs[slot].state = FREE
    c.pairs[slot].next = c.free_head
    c.free_head = slot

cdef void _close_fds(Pair *p, int err) noexcept nogil:
    """Close an owned pair's sockets; after an error with SO_LINGER 0, so a reset goes on."""
    cdef linger lg
    cdef int i, fd
    lg.l_onoff = 1
    lg.l_linger = 0
    for i in range(2):
        fd = p.dir[i].src
        if fd >= 0:
            if err:
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
            raw_close(fd)
    p.dir[0].src = p.dir[0].dst = p.dir[1].src = p.dir[1].dst = -1
