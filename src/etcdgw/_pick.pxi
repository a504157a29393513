# Included by _relay.pyx (declarations: _relay.pxd).
# The selection rule in C, for the relay thread: a copy of etcdgw.balancer.Selector.
#
# Specified once, in balancer.py; tests/test_selection.py feeds this copy and the Python one
# the same targets, usable flags and seeds and demands the same choices. Change both.
#


cdef bint _plain(Target *targets, Py_ssize_t n) noexcept nogil:
    """Every target has priority 0 and weight 0 (--endpoints): plain round-robin, which
    skips unusable targets without leaving the list order (Selector.pick's first test).
    The one C place that decides it: set_targets() caches it in Core.plain."""
    cdef Py_ssize_t i
    for i in range(n):
        if targets[i].priority or targets[i].weight:
            return False
    return True


cdef uint64_t _rand(Core *c) noexcept nogil:
    c.rng ^= c.rng >> 12
    c.rng ^= c.rng << 25
    c.rng ^= c.rng >> 27
    return c.rng * <uint64_t>2685821657736338717

cdef bint _member(Target *t, int mode, int prio) noexcept nogil:
    # mode 0: every target; 1: usable ones of class prio; 2: usable weight-0 ones of it
    if mode == 0:
        return True
    if not t.usable or t.priority != prio:
        return False
    return mode == 1 or t.weight == 0

cdef int _round_robin(Core *c, int mode, int prio) noexcept nogil:
    """Selector._round_robin over the members of mode: one shared counter."""
    cdef int i, j, m = 0, idx, _tries
    for i in range(c.ntargets):
        if _member(&c.targets[i], mode, prio):
            m += 1
    for _tries in range(m):
        idx = <int>(c.rr % <uint64_t>m)
        c.rr += 1
        j = -1
        for i in range(c.ntargets):
            if _member(&c.targets[i], mode, prio):
                j += 1
                if j == idx:
                    break
        if c.targets[i].usable:
            return i
    return -1

cdef Target *_target_of(Core *c, int64_t tag) noexcept nogil:
    """The target (listed, or parked: left with live pairs) of that tag, or NULL."""
    cdef int i
    for i in range(c.ntargets + c.nparked):
        if c.targets[i].tag == tag:
            return &c.targets[i]
    return NULL

cdef void _count(Target *t, Pair *p) noexcept nogil:
    """Count a pair in target t's live connections (least-connections)."""
    if t != NULL and not p.counted:
        t.live += 1
        p.counted = 1

cdef void _track(Core *c, Pair *p) noexcept nogil:
    """_count() for a pair known by its tag only."""
    _count(_target_of(c, p.tag), p)

cdef void _untrack(Core *c, Pair *p) noexcept nogil:
    cdef Target *t
    if not p.counted:
        return
    p.counted = 0
    t = _target_of(c, p.tag)
    if t != NULL and t.live > 0:
        t.live -= 1

cdef bint _fewer(Target *a, Target *b, bint weighted) noexcept nogil:
    """a has fewer connections than b: (live + 1) / weight when weighted, else live."""
    if weighted:
        return <int64_t>(a.live + 1) * b.weight < <int64_t>(b.live + 1) * a.weight
    return a.live < b.live

cdef int _least(Core *c) noexcept nogil:
    """Selector._least(): fewest live connections in the best usable class."""
    cdef int i, best = 0, lo = -1, ntied = 0, k
    cdef bint found = False, weighted = False
    cdef Target *t
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and (not found or t.priority < best):
            best = t.priority
            found = True
    if not found:
        return -1
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and t.priority == best and t.weight > 0:
            weighted = True
    for i in range(c.ntargets):
        t = &c.targets[i]
        if not t.usable or t.priority != best or (weighted and t.weight == 0):
            continue
        if lo < 0 or _fewer(t, &c.targets[lo], weighted):
            lo = i
    for i in range(c.ntargets):  # the tied ones, in list order
        t = &c.targets[i]
        if t.usable and t.priority == best and not (weighted and t.weight == 0) \
                and not _fewer(&c.targets[lo], t, weighted):
            ntied += 1
    k = <int>(c.rr % <uint64_t>ntied)
    c.rr += 1
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and t.priority == best and not (weighted and t.weight == 0) \
                and not _fewer(&c.targets[lo], t, weighted):
            if k == 0:
                return i
            k -= 1
    return lo

cdef int _pick(Core *c) noexcept nogil:
    """Selector.pick(): the index of the target for the next client, or -1."""
    cdef int i, best = 0, last = -1
    cdef bint found = False
    cdef uint64_t total = 0, draw, running = 0, lo
    cdef int nzero = 0
    cdef Target *t
    if c.ntargets == 0:
        return -1
    if c.least:
        return _least(c)
    if c.plain:
        return _round_robin(c, 0, 0)
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and (not found or t.priority < best):
            best = t.priority
            found = True
    if not found:
        return -1
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and t.priority == best:
            total += <uint64_t>t.weight
            if t.weight == 0:
                nzero += 1
    if total == 0:
        return _round_robin(c, 1, best)
    lo = 0 if nzero else 1
    draw = lo + _rand(c) % (total - lo + 1)
    if draw == 0:
        return _round_robin(c, 2, best)
    for i in range(c.ntargets):
        t = &c.targets[i]
        if t.usable and t.priority == best and t.weight > 0:
            running += <uint64_t>t.weight
            last = i
            if running >= draw:
                return i
    return last
