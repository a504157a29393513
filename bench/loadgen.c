/* Load generator of bench/scale.py: paced (open-loop) requests, paced new connections and
 * held connections with a keep-alive trickle, with latency histograms in JSON.
 *
 * usage:
 *   loadgen rr    HOST:PORT [options]  kept-alive requests, --rate per second over --conns
 *   loadgen churn HOST:PORT [options]  --rate new connections per second, one request each
 *   loadgen hold  HOST:PORT [options]  holds connections; commands on stdin (below)
 *   loadgen hist  NS...                each value's histogram bucket (tests/test_bench_scale)
 * options:
 *   --rate R --conns C --duration S --warmup S --drain S --src A[,B...] --path P --body B
 *   --inflight M (churn: connections in progress at most) --trickle S (hold: one request per
 *   connection every S seconds, staggered; 0: none) --window W (hold: connects in progress)
 *
 * Open loop: request k is due at t0 + k/rate whether or not earlier ones were answered, and
 * its latency counts from that due time ("lat", coordinated omission corrected: a proxy
 * that stalls is charged for every request that waited), besides the time from the actual
 * send ("svc") and the load generator's own lateness ("lag" = send - due). Only requests
 * due inside the measured window are recorded; one still unanswered at the end is recorded
 * with its age then (a lower bound) and counted as incomplete.
 *
 * rr and churn print "MEASURE_START" and "MEASURE_END" around the measured window (the
 * harness samples the proxy's CPU there), then "LOADGEN_JSON {...}".
 * hold commands: "open N" -> "opened N up U failed F ms T"; "stats" -> "stats {...}"; "quit".
 *
 * Histogram: value v in ns; v < 2^SUB is its own bucket, above that each power of two is
 * split into 2^SUB buckets (relative width <= 1/2^SUB, 0.8%): bench/scale_stats.py decodes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SUB 7
#define NBUCKETS (64 << SUB)
#define RBUF 4096
#define MAXSRC 64
#define MAXEV 512

typedef struct {
    uint64_t counts[NBUCKETS];
    uint64_t n, min, max;
    double sum;
} hist_t;

static int bucket_of(uint64_t v) {
    if (v < (1u << SUB)) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB;
    return ((shift + 1) << SUB) + (int)((v >> shift) - (1u << SUB));
}

static uint64_t bucket_lower(int idx) {
    if (idx < (1 << SUB)) return (uint64_t)idx;
    int shift = (idx >> SUB) - 1;
    return (uint64_t)((idx & ((1 << SUB) - 1)) + (1 << SUB)) << shift;
}

static void hist_add(hist_t *h, uint64_t v) {
    h->counts[bucket_of(v)]++;
    if (h->n == 0 || v < h->min) h->min = v;
    if (v > h->max) h->max = v;
    h->n++;
    h->sum += (double)v;
}

static void hist_json(FILE *f, const char *name, const hist_t *h) {
    fprintf(f, "\"%s\": {\"sub_bits\": %d, \"n\": %llu, \"min_ns\": %llu, \"max_ns\": %llu, "
               "\"sum_ns\": %.0f, \"buckets\": [", name, SUB, (unsigned long long)h->n,
            (unsigned long long)h->min, (unsigned long long)h->max, h->sum);
    int first = 1;
    for (int i = 0; i < NBUCKETS; i++) {
        if (!h->counts[i]) continue;
        fprintf(f, "%s[%d, %llu]", first ? "" : ", ", i, (unsigned long long)h->counts[i]);
        first = 0;
    }
    fprintf(f, "]}");
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* -- options ------------------------------------------------------------------------------ */

static struct sockaddr_in target;
static struct in_addr srcs[MAXSRC];
static int nsrc, next_src;
static double rate = 1000, duration = 5, warmup = 0.5, drain = 1.0, trickle = 30;
static int nconns = 16, inflight_max = 1024, window = 256;
static char request[2048];
static size_t reqlen;

static void parse_target(const char *s) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(host)) {
        fprintf(stderr, "loadgen: target must be HOST:PORT, got %s\n", s);
        exit(2);
    }
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) {
        fprintf(stderr, "loadgen: not an IPv4 address: %s\n", host);
        exit(2);
    }
}

static void parse_srcs(const char *s) {
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", s);
    for (char *tok = strtok(buf, ","); tok && nsrc < MAXSRC; tok = strtok(NULL, ",")) {
        if (inet_pton(AF_INET, tok, &srcs[nsrc]) != 1) {
            fprintf(stderr, "loadgen: not an IPv4 source address: %s\n", tok);
            exit(2);
        }
        nsrc++;
    }
}

/* A non-blocking socket connecting to the target (from the next source address); -1 and
 * errno on failure. */
static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (nsrc) {
        /* The port is chosen at connect() for the whole 4-tuple, not at bind(). */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr = srcs[next_src++ % nsrc]};
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
    }
    if (connect(fd, (struct sockaddr *)&target, sizeof(target)) < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* -- connections -------------------------------------------------------------------------- */

enum { FREE, CONNECTING, IDLE, WAITING, EOFWAIT };

typedef struct {
    int state;
    int first; /* hold: the request that proves the connection reaches a backend */
    uint64_t due, sent;
    size_t rlen, need; /* need: full response length once the header is in, else 0 */
    char buf[RBUF];
} conn_t;

static conn_t *conns;
static int maxfd;

static struct {
    uint64_t connect, read, write, closed, status, addr;
} errs;

/* Bytes of one complete response at c->buf, 0 while incomplete, -1 if malformed/not 200. */
static long response_len(conn_t *c) {
    if (!c->need) {
        char *end = memmem(c->buf, c->rlen, "\r\n\r\n", 4);
        if (!end) return c->rlen >= RBUF ? -1 : 0;
        size_t head = (size_t)(end - c->buf) + 4;
        if (c->rlen < 12 || memcmp(c->buf + 9, "200", 3) != 0) return -1;
        long body = -1;
        for (char *p = memchr(c->buf, '\n', head); p && p < c->buf + head;
             p = memchr(p + 1, '\n', (size_t)(c->buf + head - p - 1))) {
            if ((size_t)(c->buf + head - p) > 16 && strncasecmp(p + 1, "Content-Length:", 15) == 0)
                body = strtol(p + 16, NULL, 10);
            else if ((size_t)(c->buf + head - p) > 27 &&
                     strncasecmp(p + 1, "Transfer-Encoding: chunked", 26) == 0)
                body = -2;
        }
        if (body == -2) { /* chunked: complete at the last chunk */
            char *last = memmem(c->buf + head, c->rlen - head, "0\r\n\r\n", 5);
            return last ? (long)(last + 5 - c->buf) : 0;
        }
        if (body < 0 || head + (size_t)body > RBUF) return -1;
        c->need = head + (size_t)body;
    }
    return c->rlen >= c->need ? (long)c->need : 0;
}

/* Read what is there. Returns 1 when a full response arrived (it is consumed), 0 when more
 * is to come, -1 on EOF or error (errs counted). */
static int read_response(int fd, conn_t *c) {
    for (;;) {
        long len = response_len(c);
        if (len < 0) {
            errs.status++;
            return -1;
        }
        if (len > 0) {
            memmove(c->buf, c->buf + len, c->rlen - (size_t)len);
            c->rlen -= (size_t)len;
            c->need = 0;
            return 1;
        }
        ssize_t r = recv(fd, c->buf + c->rlen, RBUF - c->rlen, 0);
        if (r > 0) {
            c->rlen += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r == 0)
            errs.closed++;
        else
            errs.read++;
        return -1;
    }
}

static int send_request(int fd) {
    ssize_t w = send(fd, request, reqlen, MSG_NOSIGNAL);
    if (w == (ssize_t)reqlen) return 0;
    errs.write++;
    return -1;
}

static int ep;

static void add_fd(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void mod_fd(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static void drop(int fd) {
    close(fd); /* drops the epoll registration too */
    conns[fd].state = FREE;
    conns[fd].rlen = conns[fd].need = 0;
}

static int wait_events(struct epoll_event *evs, int64_t timeout_ns) {
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tp = &ts;
    }
    int n = epoll_pwait2(ep, evs, MAXEV, tp, NULL);
    if (n < 0 && errno != EINTR) die("epoll_pwait2");
    return n < 0 ? 0 : n;
}

/* -- rr and churn ------------------------------------------------------------------------- */

static hist_t lat, svc, lag;
static uint64_t t_meas, t_end;
static uint64_t done_in_window, scheduled, completed, incomplete;
static int measuring, ended;
static double cpu0, cpu1;
static uint64_t win0, win1;

static uint64_t due_of(uint64_t t0, uint64_t k) { return t0 + (uint64_t)((double)k * 1e9 / rate); }

static void phase(uint64_t now) {
    if (!measuring && now >= t_meas) {
        measuring = 1;
        win0 = now;
        cpu0 = cpu_s();
        printf("MEASURE_START\n");
        fflush(stdout);
    }
    if (measuring && !ended && now >= t_end) {
        ended = 1;
        win1 = now;
        cpu1 = cpu_s();
        printf("MEASURE_END\n");
        fflush(stdout);
    }
}

static void record(const conn_t *c, uint64_t now) {
    if (measuring && !ended) done_in_window++;
    if (c->due < t_meas || c->due >= t_end) return;
    completed++;
    hist_add(&lat, now - c->due);
    hist_add(&svc, now - c->sent);
    hist_add(&lag, c->sent > c->due ? c->sent - c->due : 0);
}

static void report(const char *mode, int conns_open) {
    if (!ended) { /* the drain deadline came before the window closed: should not happen */
        win1 = now_ns();
        cpu1 = cpu_s();
    }
    double win = (double)(win1 - win0) / 1e9;
    printf("LOADGEN_JSON {\"mode\": \"%s\", \"rate\": %.1f, \"conns\": %d, \"duration_s\": %.3f, "
           "\"window_s\": %.4f, \"scheduled\": %llu, \"completed\": %llu, \"incomplete\": %llu, "
           "\"done_in_window\": %llu, \"achieved_rate\": %.1f, \"lg_cpu_s\": %.4f, "
           "\"conns_open\": %d, \"errors\": {\"connect\": %llu, \"read\": %llu, \"write\": %llu, "
           "\"closed\": %llu, \"status\": %llu, \"addr\": %llu}, ",
           mode, rate, nconns, duration, win, (unsigned long long)scheduled,
           (unsigned long long)completed, (unsigned long long)incomplete,
           (unsigned long long)done_in_window, win > 0 ? (double)done_in_window / win : 0.0,
           cpu1 - cpu0, conns_open, (unsigned long long)errs.connect,
           (unsigned long long)errs.read, (unsigned long long)errs.write,
           (unsigned long long)errs.closed, (unsigned long long)errs.status,
           (unsigned long long)errs.addr);
    hist_json(stdout, "lat", &lat);
    printf(", ");
    hist_json(stdout, "svc", &svc);
    printf(", ");
    hist_json(stdout, "lag", &lag);
    printf("}\n");
    fflush(stdout);
}

/* Requests due in the window but never answered: recorded with their age now. */
static void unanswered(uint64_t due, uint64_t now) {
    if (due < t_meas || due >= t_end) return;
    incomplete++;
    hist_add(&lat, now - due);
}

static int run_rr(void) {
    int *idle = calloc((size_t)nconns, sizeof(int));
    int nidle = 0, open = 0;
    struct epoll_event evs[MAXEV];
    /* Connect every connection first (bounded: 10 s). */
    for (int i = 0; i < nconns; i++) {
        int fd = open_conn();
        if (fd < 0) die("connect");
        if (fd >= maxfd) die("fd above the table");
        conns[fd].state = CONNECTING;
        add_fd(fd, EPOLLOUT);
    }
    uint64_t deadline = now_ns() + 10000000000ull;
    int connecting = nconns;
    while (connecting && now_ns() < deadline) {
        int n = wait_events(evs, 100000000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd, err = 0;
            socklen_t sl = sizeof(err);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl);
            connecting--;
            if (err) {
                errs.connect++;
                drop(fd);
                continue;
            }
            conns[fd].state = IDLE;
            mod_fd(fd, EPOLLIN);
            idle[nidle++] = fd;
            open++;
        }
    }
    if (!open) {
        fprintf(stderr, "loadgen: no connection could be opened\n");
        return 1;
    }
    uint64_t t0 = now_ns() + 1000000;
    t_meas = t0 + (uint64_t)(warmup * 1e9);
    t_end = t_meas + (uint64_t)(duration * 1e9);
    uint64_t k = 0, outstanding = 0;
    uint64_t kmax = (uint64_t)ceil((warmup + duration) * rate); /* due(kmax) >= t_end */
    while (kmax > 0 && due_of(t0, kmax - 1) >= t_end) kmax--;
    for (uint64_t j = 0; j < kmax; j++)
        if (due_of(t0, j) >= t_meas) scheduled++;
    uint64_t stop = t_end + (uint64_t)(drain * 1e9);
    for (;;) {
        uint64_t now = now_ns();
        phase(now);
        while (k < kmax && nidle > 0 && due_of(t0, k) <= now) {
            int fd = idle[--nidle];
            conn_t *c = &conns[fd];
            c->due = due_of(t0, k++);
            c->sent = now;
            if (send_request(fd) < 0) {
                unanswered(c->due, now);
                drop(fd);
                open--;
                continue;
            }
            c->state = WAITING;
            outstanding++;
        }
        if (k >= kmax && outstanding == 0 && ended) break;
        if (now >= stop || open == 0) break;
        int64_t timeout = -1;
        if (!ended) timeout = (int64_t)(t_end - now);
        else timeout = (int64_t)(stop - now);
        if (!measuring && (int64_t)(t_meas - now) < timeout) timeout = (int64_t)(t_meas - now);
        if (k < kmax && nidle > 0) {
            uint64_t d = due_of(t0, k);
            int64_t until = d > now ? (int64_t)(d - now) : 0;
            if (until < timeout) timeout = until;
        }
        int n = wait_events(evs, timeout);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            conn_t *c = &conns[fd];
            if (c->state != WAITING) { /* an idle connection closed or got stray bytes */
                if (c->state == IDLE) {
                    char tmp[256];
                    if (recv(fd, tmp, sizeof(tmp), MSG_DONTWAIT) <= 0) {
                        errs.closed++;
                        for (int j = 0; j < nidle; j++)
                            if (idle[j] == fd) {
                                idle[j] = idle[--nidle];
                                break;
                            }
                        drop(fd);
                        open--;
                    }
                }
                continue;
            }
            int r = read_response(fd, c);
            if (r == 0) continue;
            outstanding--;
            if (r < 0) {
                unanswered(c->due, now);
                drop(fd);
                open--;
                continue;
            }
            record(c, now);
            c->state = IDLE;
            idle[nidle++] = fd;
        }
    }
    uint64_t now = now_ns();
    phase(now);
    for (int fd = 0; fd < maxfd; fd++)
        if (conns[fd].state == WAITING) unanswered(conns[fd].due, now);
    for (; k < kmax; k++) unanswered(due_of(t0, k), now);
    report("rr", open);
    return 0;
}

static int run_churn(void) {
    struct epoll_event evs[MAXEV];
    uint64_t t0 = now_ns() + 1000000;
    t_meas = t0 + (uint64_t)(warmup * 1e9);
    t_end = t_meas + (uint64_t)(duration * 1e9);
    uint64_t kmax = (uint64_t)ceil((warmup + duration) * rate);
    while (kmax > 0 && due_of(t0, kmax - 1) >= t_end) kmax--;
    for (uint64_t j = 0; j < kmax; j++)
        if (due_of(t0, j) >= t_meas) scheduled++;
    uint64_t k = 0, stop = t_end + (uint64_t)(drain * 1e9);
    int inflight = 0;
    for (;;) {
        uint64_t now = now_ns();
        phase(now);
        while (k < kmax && inflight < inflight_max && due_of(t0, k) <= now) {
            uint64_t due = due_of(t0, k++);
            int fd = open_conn();
            if (fd < 0) {
                if (errno == EADDRNOTAVAIL) errs.addr++;
                else errs.connect++;
                unanswered(due, now);
                continue;
            }
            if (fd >= maxfd) die("fd above the table");
            conn_t *c = &conns[fd];
            c->state = CONNECTING;
            c->due = due;
            c->sent = now;
            c->rlen = c->need = 0;
            add_fd(fd, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
            inflight++;
        }
        if (k >= kmax && inflight == 0 && ended) break;
        if (now >= stop) break;
        int64_t timeout = !ended ? (int64_t)(t_end - now) : (int64_t)(stop - now);
        if (!measuring && (int64_t)(t_meas - now) < timeout) timeout = (int64_t)(t_meas - now);
        if (k < kmax && inflight < inflight_max) {
            uint64_t d = due_of(t0, k);
            int64_t until = d > now ? (int64_t)(d - now) : 0;
            if (until < timeout) timeout = until;
        }
        int n = wait_events(evs, timeout);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            conn_t *c = &conns[fd];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t sl = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl);
                if (err || !(evs[i].events & EPOLLOUT)) {
                    errs.connect++;
                    unanswered(c->due, now);
                    drop(fd);
                    inflight--;
                    continue;
                }
                if (send_request(fd) < 0) {
                    unanswered(c->due, now);
                    drop(fd);
                    inflight--;
                    continue;
                }
                c->state = WAITING;
                mod_fd(fd, EPOLLIN | EPOLLRDHUP);
                continue;
            }
            if (c->state == WAITING) {
                int r = read_response(fd, c);
                if (r == 0) continue;
                if (r < 0) {
                    unanswered(c->due, now);
                    drop(fd);
                    inflight--;
                    continue;
                }
                record(c, now);
                c->state = EOFWAIT; /* the server closes first: no TIME_WAIT on our side */
            }
            if (c->state == EOFWAIT) {
                char tmp[512];
                ssize_t r = recv(fd, tmp, sizeof(tmp), 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    drop(fd);
                    inflight--;
                }
            }
        }
    }
    uint64_t now = now_ns();
    phase(now);
    for (int fd = 0; fd < maxfd; fd++) {
        if (conns[fd].state == CONNECTING || conns[fd].state == WAITING)
            unanswered(conns[fd].due, now);
        if (conns[fd].state != FREE) drop(fd);
    }
    for (; k < kmax; k++) unanswered(due_of(t0, k), now);
    report("churn", 0);
    return 0;
}

/* -- hold --------------------------------------------------------------------------------- */

typedef struct {
    uint64_t due;
    int fd;
} slot_t;

static slot_t *heap;
static int nheap;

static void heap_push(uint64_t due, int fd) {
    int i = nheap++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (heap[p].due <= due) break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i].due = due;
    heap[i].fd = fd;
}

static slot_t heap_pop(void) {
    slot_t top = heap[0], last = heap[--nheap];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        uint64_t md = last.due;
        if (l < nheap && heap[l].due < md) m = l, md = heap[l].due;
        if (r < nheap && heap[r].due < md) m = r;
        if (m == i) break;
        heap[i] = heap[m];
        i = m;
    }
    if (nheap) heap[i] = last;
    return top;
}

static uint64_t rng = 88172645463325252ull;

static double rand01(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static int run_hold(void) {
    struct epoll_event evs[MAXEV];
    heap = calloc((size_t)maxfd, sizeof(slot_t));
    rng ^= (uint64_t)getpid() << 20;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    add_fd(0, EPOLLIN);
    char line[256];
    size_t llen = 0;
    uint64_t goal = 0, opened = 0, up = 0, failed = 0, closed = 0, sent = 0, ok = 0;
    uint64_t open_t0 = 0;
    int connecting = 0, pending_reply = 0;
    uint64_t period = (uint64_t)(trickle * 1e9);
    for (;;) {
        while (opened < goal && connecting < window) {
            int fd = open_conn();
            opened++;
            if (fd < 0) {
                failed++;
                continue;
            }
            if (fd >= maxfd) die("fd above the table");
            conn_t *c = &conns[fd];
            c->state = CONNECTING;
            c->first = 1;
            c->rlen = c->need = 0;
            add_fd(fd, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
            connecting++;
        }
        uint64_t now = now_ns();
        if (pending_reply && up + failed >= goal) {
            printf("opened %llu up %llu failed %llu ms %.1f\n", (unsigned long long)goal,
                   (unsigned long long)up, (unsigned long long)failed,
                   (double)(now - open_t0) / 1e6);
            fflush(stdout);
            pending_reply = 0;
        }
        while (nheap && heap[0].due <= now) {
            slot_t s = heap_pop();
            conn_t *c = &conns[s.fd];
            if (c->state != IDLE) continue;
            if (send_request(s.fd) < 0) {
                closed++;
                drop(s.fd);
                continue;
            }
            c->state = WAITING;
            c->sent = now;
            sent++;
        }
        int64_t timeout = nheap ? (int64_t)(heap[0].due > now ? heap[0].due - now : 0) : -1;
        int n = wait_events(evs, timeout);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == 0) {
                ssize_t r = read(0, line + llen, sizeof(line) - 1 - llen);
                if (r == 0) return 0; /* the harness went away */
                if (r < 0) continue;
                llen += (size_t)r;
                line[llen] = 0;
                char *nl;
                while ((nl = strchr(line, '\n'))) {
                    *nl = 0;
                    unsigned long long want;
                    if (sscanf(line, "open %llu", &want) == 1) {
                        goal = want > opened ? want : opened;
                        open_t0 = now;
                        pending_reply = 1;
                    } else if (strcmp(line, "stats") == 0) {
                        printf("stats {\"opened\": %llu, \"up\": %llu, \"alive\": %llu, "
                               "\"failed\": %llu, \"closed\": %llu, \"trickle_sent\": %llu, "
                               "\"trickle_ok\": %llu, \"lg_cpu_s\": %.4f}\n",
                               (unsigned long long)opened, (unsigned long long)up,
                               (unsigned long long)(up - closed), (unsigned long long)failed,
                               (unsigned long long)closed, (unsigned long long)sent,
                               (unsigned long long)ok, cpu_s());
                        fflush(stdout);
                    } else if (strcmp(line, "quit") == 0) {
                        return 0;
                    }
                    size_t used = (size_t)(nl + 1 - line);
                    memmove(line, nl + 1, llen - used + 1);
                    llen -= used;
                }
                if (llen >= sizeof(line) - 1) llen = 0;
                continue;
            }
            conn_t *c = &conns[fd];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t sl = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl);
                connecting--;
                if (err || !(evs[i].events & EPOLLOUT) || send_request(fd) < 0) {
                    failed++;
                    drop(fd);
                    continue;
                }
                c->state = WAITING;
                c->sent = now;
                mod_fd(fd, EPOLLIN | EPOLLRDHUP);
                continue;
            }
            if (c->state == IDLE) { /* nothing is due from an idle connection: EOF or error */
                char tmp[256];
                if (recv(fd, tmp, sizeof(tmp), MSG_DONTWAIT) <= 0) {
                    closed++;
                    drop(fd);
                }
                continue;
            }
            if (c->state != WAITING) continue;
            int r = read_response(fd, c);
            if (r == 0) continue;
            if (r < 0) {
                if (c->first) failed++;
                else closed++;
                drop(fd);
                continue;
            }
            c->state = IDLE;
            if (c->first) {
                c->first = 0;
                up++;
                if (period) heap_push(now + (uint64_t)(rand01() * (double)period), fd);
            } else {
                ok++;
                if (period) heap_push(now + period, fd);
            }
        }
    }
}

/* -- main --------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s rr|churn|hold HOST:PORT [options] | hist NS...\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    if (strcmp(mode, "hist") == 0) {
        for (int i = 2; i < argc; i++) {
            uint64_t v = strtoull(argv[i], NULL, 10);
            int b = bucket_of(v);
            uint64_t next = b + 1 < NBUCKETS ? bucket_lower(b + 1) : UINT64_MAX;
            printf("%llu %d %llu %llu\n", (unsigned long long)v, b,
                   (unsigned long long)bucket_lower(b), (unsigned long long)next);
        }
        return 0;
    }
    parse_target(argv[2]);
    const char *path = "/v3/kv/range", *body = "{\"key\":\"Zm9v\"}";
    int close_ = strcmp(mode, "churn") == 0;
    for (int i = 3; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "loadgen: %s needs a value\n", o);
            return 2;
        }
        i++;
        if (!strcmp(o, "--rate")) rate = atof(v);
        else if (!strcmp(o, "--conns")) nconns = atoi(v);
        else if (!strcmp(o, "--duration")) duration = atof(v);
        else if (!strcmp(o, "--warmup")) warmup = atof(v);
        else if (!strcmp(o, "--drain")) drain = atof(v);
        else if (!strcmp(o, "--inflight")) inflight_max = atoi(v);
        else if (!strcmp(o, "--trickle")) trickle = atof(v);
        else if (!strcmp(o, "--window")) window = atoi(v);
        else if (!strcmp(o, "--src")) parse_srcs(v);
        else if (!strcmp(o, "--path")) path = v;
        else if (!strcmp(o, "--body")) body = v;
        else {
            fprintf(stderr, "loadgen: unknown option %s\n", o);
            return 2;
        }
    }
    if (rate <= 0 || nconns <= 0 || duration <= 0 || window <= 0 || inflight_max <= 0) {
        fprintf(stderr, "loadgen: --rate, --conns, --duration, --window, --inflight must be > 0\n");
        return 2;
    }
    int n = snprintf(request, sizeof(request),
                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n%s\r\n%s",
                     path, argv[2], strlen(body), close_ ? "Connection: close\r\n" : "", body);
    if (n <= 0 || (size_t)n >= sizeof(request)) {
        fprintf(stderr, "loadgen: request too long\n");
        return 2;
    }
    reqlen = (size_t)n;
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake at the due time, not up to 50 µs later */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    maxfd = (int)rl.rlim_cur + 1;
    conns = calloc((size_t)maxfd, sizeof(conn_t));
    if (!conns) die("calloc");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    if (!strcmp(mode, "rr")) return run_rr();
    if (!strcmp(mode, "churn")) return run_churn();
    if (!strcmp(mode, "hold")) return run_hold();
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 2;
}
