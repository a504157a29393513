/* Cheapest possible HTTP/1.1 backend for the benchmark: answers every request with a fixed
 * 200, so the proxy in front of it (not etcd) is the bottleneck.
 *
 * usage: bench-httpd PORT [PORT...]   (binds 127.0.0.1 only; prints "ready" when listening)
 *
 * One thread, one epoll set, level-triggered. Requests may carry a Content-Length body (the
 * etcd range POST) and may be pipelined; "Connection: close" is honoured so that wrk opens
 * a new connection per request in the churn workload. Anything else is out of scope.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXLISTEN 16
#define BUFSZ 16384

static const char BODY[] = "{\"header\":{},\"count\":\"0\"}";

typedef struct {
    size_t len;
    char buf[BUFSZ];
} conn_t;

static conn_t **conns;
static int nconns;

static int is_listener(int fd, const int *lfds, int n) {
    for (int i = 0; i < n; i++)
        if (lfds[i] == fd) return 1;
    return 0;
}

/* Returns the length of one complete request at buf[0..len), 0 if incomplete; sets *close_
 * when the request asks for "Connection: close". */
static size_t parse_request(const char *buf, size_t len, int *close_) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - buf) + 4;
    size_t body = 0;
    *close_ = 0;
    /* Scan header lines for the two fields we care about. */
    const char *p = memchr(buf, '\n', head);
    while (p && p + 1 < buf + head) {
        const char *line = p + 1;
        size_t rest = (size_t)(buf + head - line);
        if (rest > 15 && strncasecmp(line, "Content-Length:", 15) == 0)
            body = (size_t)strtoul(line + 15, NULL, 10);
        else if (rest > 17 && strncasecmp(line, "Connection: close", 17) == 0)
            *close_ = 1;
        p = memchr(line, '\n', rest);
    }
    if (head + body > len) return 0;
    return head + body;
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (fd < nconns && conns[fd]) {
        free(conns[fd]);
        conns[fd] = NULL;
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || argc - 1 > MAXLISTEN) {
        fprintf(stderr, "usage: %s PORT [PORT...]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    nconns = (int)rl.rlim_cur + 1;
    conns = calloc((size_t)nconns, sizeof(*conns));

    int ep = epoll_create1(0);
    int lfds[MAXLISTEN];
    int nl = argc - 1;
    for (int i = 0; i < nl; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in sa = {.sin_family = AF_INET,
                                 .sin_port = htons((unsigned short)atoi(argv[i + 1])),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4096) < 0) {
            perror("bind/listen");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        lfds[i] = fd;
    }
    printf("ready\n");
    fflush(stdout);

    char resp[256];
    char resp_close[256];
    int rlen = snprintf(resp, sizeof(resp),
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        "Content-Length: %zu\r\n\r\n%s",
                        sizeof(BODY) - 1, BODY);
    int rclen = snprintf(resp_close, sizeof(resp_close),
                         "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                         sizeof(BODY) - 1, BODY);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (is_listener(fd, lfds, nl)) {
                /* Accept until EAGAIN: many connections per wake-up under churn. */
                for (;;) {
                    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= nconns) {
                        close(c);
                        continue;
                    }
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    conns[c] = calloc(1, sizeof(conn_t));
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            conn_t *cs = conns[fd];
            if (!cs) continue;
            ssize_t r = recv(fd, cs->buf + cs->len, BUFSZ - cs->len, 0);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                drop(ep, fd);
                continue;
            }
            cs->len += (size_t)r;
            int closing = 0;
            for (;;) {
                int close_ = 0;
                size_t used = parse_request(cs->buf, cs->len, &close_);
                if (!used) break;
                /* Responses are tiny: one send fits in any socket buffer. */
                if (close_)
                    send(fd, resp_close, (size_t)rclen, MSG_NOSIGNAL);
                else
                    send(fd, resp, (size_t)rlen, MSG_NOSIGNAL);
                memmove(cs->buf, cs->buf + used, cs->len - used);
                cs->len -= used;
                if (close_) {
                    closing = 1;
                    break;
                }
            }
            if (closing || cs->len == BUFSZ) drop(ep, fd);
        }
    }
}
