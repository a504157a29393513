# cython: language_level=3
"""C declarations of the relay engine (_relay.pyx): the system calls it makes, its tables.

The engine's logic is in _relay.pyx (the Python surface, the Engine class) and the files it
includes: _pump.pxi (the hot path: recv/send/splice, the relay loop and thread, a pair's
bytes and its end), _table.pxi (the pair table: slots, the ready list, detach's copies),
_accept.pxi (native accept: accept, dial, the dial timeout, late socket options) and
_pick.pxi (the C copy of balancer.Selector, the selection rule).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from posix.types cimport sigset_t

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
        EPOLL_CTL_MOD
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        pass
    struct linger:
        int l_onoff
        int l_linger
    enum:
        MSG_NOSIGNAL
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int getpeername(int fd, sockaddr *addr, socklen_t *len)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
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

cdef extern from * nogil:
    """
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <sys/socket.h>
    #include <sys/epoll.h>
    /* The relay thread's system calls without glibc's cancellation wrappers. In a process
       with more than one thread, glibc brackets each cancellable call (recv, send,
       epoll_wait, accept4, connect, close) with two atomic updates of the calling thread's
       cancel state; nothing here is ever cancelled, and the pair cost about 7% of the relay
       thread's user time per new connection (perf, issue 21). errno as from libc. */
    #if defined(SYS_recvfrom) && defined(SYS_sendto) && defined(SYS_epoll_pwait) \
        && defined(SYS_accept4) && defined(SYS_connect) && defined(SYS_close)
    #define ETCDGW_RAW(name, ...) syscall(name, __VA_ARGS__)
    static inline ssize_t etcdgw_recv(int fd, void *buf, size_t n, int flags) {
        return ETCDGW_RAW(SYS_recvfrom, (long)fd, (long)buf, (long)n, (long)flags, 0L, 0L);
    }
    static inline ssize_t etcdgw_send(int fd, const void *buf, size_t n, int flags) {
        return ETCDGW_RAW(SYS_sendto, (long)fd, (long)buf, (long)n, (long)flags, 0L, 0L);
    }
    static inline int etcdgw_epoll_wait(int epfd, struct epoll_event *ev, int max, int ms) {
        return (int)ETCDGW_RAW(SYS_epoll_pwait, (long)epfd, (long)ev, (long)max, (long)ms,
                               0L, 0L);
    }
    static inline int etcdgw_accept4(int fd, struct sockaddr *a, socklen_t *l, int flags) {
        return (int)ETCDGW_RAW(SYS_accept4, (long)fd, (long)a, (long)l, (long)flags);
    }
    static inline int etcdgw_connect(int fd, const struct sockaddr *a, socklen_t l) {
        return (int)ETCDGW_RAW(SYS_connect, (long)fd, (long)a, (long)l);
    }
    static inline int etcdgw_close(int fd) {
        return (int)ETCDGW_RAW(SYS_close, (long)fd);
    }
    #else
    #define etcdgw_recv recv
    #define etcdgw_send send
    #define etcdgw_epoll_wait epoll_wait
    #define etcdgw_accept4 accept4
    #define etcdgw_connect connect
    #define etcdgw_close close
    #endif
    """
    ssize_t raw_recv "etcdgw_recv"(int fd, void *buf, size_t n, int flags)
    ssize_t raw_send "etcdgw_send"(int fd, const void *buf, size_t n, int flags)
    int raw_epoll_wait "etcdgw_epoll_wait"(int epfd, epoll_event *ev, int maxevents, int ms)
    int raw_accept4 "etcdgw_accept4"(int fd, sockaddr *addr, socklen_t *len, int flags)
    int raw_connect "etcdgw_connect"(int fd, const sockaddr *addr, socklen_t len)
    int raw_close "etcdgw_close"(int fd)

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    unsigned short htons(unsigned short)

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
        CLOCK_MONOTONIC_COARSE
    int clock_gettime(int clk, timespec *ts)

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
    CONNECTING = 3    # native dial: the upstream socket is still connecting
    DIALFAIL = 4      # native dial failed: the client waits in the finished list for Python
    MAX_LISTENERS = 64
    MAX_SOCKOPTS = 8
    ACCEPT_BATCH = 128  # clients accepted per listener per batch of the relay thread
    REPORT_BATCH = 1024  # started/finished records that make the thread notify at once


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
    uint8_t owned       # accepted and dialled by the engine: it closes both fds
    uint8_t fresh       # owned and live, not yet reported by collect()
    uint8_t short       # started and finished before collect(): reported in a sum
    uint8_t outarmed    # bit per side: that fd is registered for EPOLLOUT too
    uint8_t counted     # counted in its target's `live` (tag >= 0)
    uint8_t first       # which side ended first (EOF): 1 client, 2 upstream, 0 not yet
    int32_t snext       # started list (fresh pairs)
    int32_t cprev       # connecting list (CONNECTING pairs, oldest first)
    int32_t cnext
    int64_t tag         # owned: the caller's tag of the target it was dialled to
    uint64_t deadline   # CONNECTING: CLOCK_MONOTONIC ns when the dial times out


cdef struct Listener:
    int fd
    uint8_t ready       # an edge said clients may be waiting: accept until EAGAIN
    uint8_t paused      # accept failed for lack of a resource: wait for listen() again
    uint8_t reported    # the pause was reported by collect()
    uint8_t tune        # 0: check the first client, 1: clients inherit options, 2: tune each
    int err


cdef struct Late:
    int32_t slot        # a pair whose upstream socket gets the late options at `due`
    uint64_t id
    uint64_t due


cdef struct Target:
    sockaddr_storage addr
    socklen_t addrlen   # 0: no address known (a host name): the caller dials it
    int64_t tag
    int family
    int priority
    int weight
    uint8_t usable
    int32_t live        # pairs of this target being dialled or relayed (least-connections)


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
    # native accept (threaded mode only): listeners, targets and the dial path
    Listener lst[MAX_LISTENERS]
    int nlst
    Target *targets     # ntargets listed ones (picked from), then nparked left ones
    int ntargets
    int nparked         # targets no longer listed that still have live pairs (counts kept)
    bint plain          # every target has priority 0 and weight 0: plain round-robin
    bint least          # --balance=least-connections
    uint64_t rr         # the round-robin counter (etcd's pickCount)
    uint64_t rng        # xorshift64 state for SRV weights
    int sockopts[MAX_SOCKOPTS][3]
    int nsockopts
    uint64_t dial_timeout_ns
    int32_t limit       # --max-connections (0: none): live + connecting pairs
    int32_t nconnecting
    int32_t nheld       # handed-back clients the loop holds: count toward the limit
    int32_t conn_head
    int32_t conn_tail
    int32_t started_head
    int32_t nunreported  # started pairs and failed dials collect() has not returned yet
    uint64_t accepted
    uint64_t accept_errors
    int32_t nfailed     # failed dials waiting in the finished list
    int32_t nrecords    # started, finished and failed records waiting for collect()
    # late options (keep-alive): set on upstream sockets of pairs still live after late_ns
    int late_opts[MAX_SOCKOPTS][3]
    int nlate_opts
    uint64_t late_ns
    Late *late          # ring, oldest first
    int32_t late_cap
    int32_t late_head
    int32_t late_n
    uint64_t report_at  # CLOCK_MONOTONIC ns by which the waiting records are announced
    # the relay thread's waits for the lock while the loop held it (bench/collect_lock.py)
    uint64_t lock_waits
    uint64_t lock_wait_ns
    uint64_t lock_wait_max_ns


cdef enum:
    REC_STARTED = 0   # Rec.kind
    REC_SHORT = 1     # started and finished since the last collect (aggregate): summed
    SHORT_SLOTS = 32  # targets collect() sums short pairs for in C (more: a dict)
    REC_FINISHED = 2
    REC_FAILED = 3    # id is the client fd


cdef struct Rec:
    # One record of collect(), copied out of the pair table under the lock; the Python
    # objects are built from these once the lock is released.
    uint64_t id
    int64_t tag
    uint64_t c2u
    uint64_t u2c
    int err
    uint8_t kind
    uint8_t ended
    uint8_t silent


cdef class Engine:
    cdef Core c
    cdef Rec *recs      # collect()'s copies (GIL held: only the loop's thread touches it)
    cdef Py_ssize_t recs_cap

    cdef object _collect(self, bint aggregate)
    cdef bint _reserve(self, Py_ssize_t n) noexcept
    cdef _check_native(self)
    cdef _check_open(self)
    cdef int _register(self, Pair *p, int64_t tag) noexcept
    cdef void _lock(self) noexcept
    cdef void _unlock(self) noexcept
    cdef Pair *_lookup(self, uint64_t pid, bint finished=*) noexcept
    cdef void _close(self) noexcept
