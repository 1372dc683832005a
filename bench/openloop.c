/*
 * openloop: an open-loop HTTP/1.1 load generator for the benchmark's latency
 * curves (bench/openloop.py builds it with gcc and runs it).
 *
 *   openloop PORT RATE WARMUP_S SECONDS CONNECTIONS REQUESTS_FILE OUT_JSON
 *
 * Request k is due at start + k / RATE, whatever the server does. It goes out
 * on an idle keep-alive connection; when none is idle it waits in a queue,
 * and its latency still counts from the time it was due, so a slow server
 * cannot hide its queueing (no coordinated omission). Only requests due in
 * the measured window [WARMUP, WARMUP + SECONDS) are recorded.
 *
 * Besides latency it reports the generator's own lateness ("slip": how long
 * after its due time a request left although a connection was idle) and how
 * many requests had to queue for a connection, so a result can be trusted or
 * not. REQUESTS_FILE holds raw requests as <u32 big-endian length><bytes>,
 * sent in turn. Responses may use Content-Length or chunked coding; a
 * "connection: close" or EOF reconnects. Timers use epoll_pwait2 (ns).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define GRACE_S 5.0      /* answers may come this long after the last request is due */
#define SPIN_NS 50000    /* closer than this to a due time: poll without sleeping */

enum { HEAD, BODY_LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER };

typedef struct {
    int fd, busy, close_after, state;
    long req;                /* index of the request in flight */
    size_t sent, req_len, want, have;
    const char *req_data;
    int status;
    char buf[BUF];
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int port, epfd;
static long n_reqs, total, next_req, done_count, queued, window_done, errors_connect, errors_io, lost;
static char **reqs;
static size_t *req_lens;
static double start, rate, warmup, seconds, last_window_answer;
static double *latency, *slip;
static long n_latency, n_slip, statuses[600];
static long *queue, q_head, q_tail;          /* ring of request indexes waiting for a connection */
static conn_t *conns;
static int *idle, n_idle, n_conns;

static double due(long k) { return start + k / rate; }
static int in_window(long k) { double t = k / rate; return t >= warmup && t < warmup + seconds; }

static int connect_one(conn_t *c) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (fd >= 0) close(fd);
        errors_connect++;
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);   /* connected (loopback): now non-blocking */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    c->fd = fd;
    c->busy = 0;
    c->have = 0;
    return 0;
}

static void set_writable(conn_t *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void pump_send(conn_t *c) {
    while (c->sent < c->req_len) {
        ssize_t n = send(c->fd, c->req_data + c->sent, c->req_len - c->sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EAGAIN) { set_writable(c, 1); return; }
        if (n <= 0) { errors_io++; return; }
        c->sent += n;
    }
    set_writable(c, 0);
}

static void dispatch(conn_t *c, long k) {
    c->busy = 1;
    c->req = k;
    c->req_data = reqs[k % n_reqs];
    c->req_len = req_lens[k % n_reqs];
    c->sent = 0;
    c->state = HEAD;
    c->close_after = 0;
    c->status = 0;
    pump_send(c);
}

static void reconnect(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (connect_one(c) == 0) idle[n_idle++] = (int)(c - conns);
}

static void finish(conn_t *c, double t) {
    long k = c->req;
    done_count++;
    if (c->status > 0 && c->status < 600) statuses[c->status]++;
    if (in_window(k)) {
        latency[n_latency++] = t - due(k);
        window_done++;
        if (t > last_window_answer) last_window_answer = t;
    }
    c->busy = 0;
    if (!c->close_after) idle[n_idle++] = (int)(c - conns);   /* else the reader reconnects */
}

static int header_has(const char *head, size_t len, const char *name, const char *value) {
    size_t nl = strlen(name);
    for (const char *p = head; p + nl < head + len; p++) {
        if ((p == head || p[-1] == '\n') && strncasecmp(p, name, nl) == 0) {
            const char *v = p + nl, *end = memchr(v, '\r', head + len - v);
            if (!value) return (int)strtol(v, NULL, 10);
            for (; v && end && v < end; v++)
                if (strncasecmp(v, value, strlen(value)) == 0) return 1;
            return 0;
        }
    }
    return value ? 0 : -1;
}

/* Consumes what it can of c->buf; returns 0, 1 when the server closes after
 * this answer (reconnect), or -1 on a malformed answer. */
static int parse(conn_t *c, double t) {
    size_t off = 0;
    for (;;) {
        char *p = c->buf + off;
        size_t avail = c->have - off;
        if (!c->busy && avail) return -1;   /* bytes nobody asked for */
        if (!c->busy || !avail) break;
        if (c->state == HEAD) {
            char *end = memmem(p, avail, "\r\n\r\n", 4);
            if (!end) break;
            size_t len = end - p + 4;
            if (len < 12 || memcmp(p, "HTTP/1.", 7) != 0) return -1;
            c->status = atoi(p + 9);
            c->close_after = header_has(p, len, "connection:", "close");
            long cl = header_has(p, len, "content-length:", NULL);
            off += len;
            if (header_has(p, len, "transfer-encoding:", "chunked")) c->state = CHUNK_SIZE;
            else if (cl > 0) { c->state = BODY_LENGTH; c->want = cl; }
            else if (cl == 0) { finish(c, t); if (c->close_after) return 1; }
            else return -1;                   /* read-until-close bodies: not used here */
        } else if (c->state == BODY_LENGTH || c->state == CHUNK_DATA) {
            size_t take = avail < c->want ? avail : c->want;
            off += take;
            c->want -= take;
            if (c->want) break;
            if (c->state == CHUNK_DATA) c->state = CHUNK_END;
            else { finish(c, t); if (c->close_after) return 1; }
        } else {  /* CHUNK_SIZE, CHUNK_END, TRAILER: one line each */
            char *eol = memmem(p, avail, "\r\n", 2);
            if (!eol) break;
            off += eol - p + 2;
            if (c->state == CHUNK_END) c->state = CHUNK_SIZE;
            else if (c->state == TRAILER) {
                if (eol == p) { finish(c, t); if (c->close_after) return 1; }
            }
            else {
                c->want = strtoul(p, NULL, 16);
                c->state = c->want ? CHUNK_DATA : TRAILER;
            }
        }
    }
    memmove(c->buf, c->buf + off, c->have - off);
    c->have -= off;
    return 0;
}

static void on_readable(conn_t *c, double t) {
    for (;;) {
        ssize_t n = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {                         /* closed: what was in flight is lost */
            if (c->busy) { errors_io++; lost++; done_count++; c->busy = 0; }
            else for (int i = 0; i < n_idle; i++) if (idle[i] == c - conns) { idle[i] = idle[--n_idle]; break; }
            reconnect(c);
            return;
        }
        c->have += n;
        int rc = parse(c, t);
        if (rc != 0) {
            if (rc < 0) errors_io++;
            if (c->busy) { lost++; done_count++; c->busy = 0; }
            reconnect(c);
            return;
        }
        if (c->have == BUF) { errors_io++; reconnect(c); return; }
    }
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    unsigned char len[4];
    while (fread(len, 1, 4, f) == 4) {
        size_t n = (size_t)len[0] << 24 | len[1] << 16 | len[2] << 8 | len[3];
        reqs = realloc(reqs, (n_reqs + 1) * sizeof *reqs);
        req_lens = realloc(req_lens, (n_reqs + 1) * sizeof *req_lens);
        reqs[n_reqs] = malloc(n);
        if (fread(reqs[n_reqs], 1, n, f) != n) { fprintf(stderr, "%s: truncated\n", path); exit(2); }
        req_lens[n_reqs++] = n;
    }
    fclose(f);
    if (!n_reqs) { fprintf(stderr, "%s: no requests\n", path); exit(2); }
}

static void write_percentiles(FILE *out, const char *name, double *v, long n) {
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += v[i];
    const double q[] = {50, 90, 99, 99.9};
    const char *qn[] = {"p50", "p90", "p99", "p999"};
    fprintf(out, "\"%s\": {", name);
    for (int i = 0; i < 4; i++) {
        long rank = n ? (long)((q[i] * n + 99.0) / 100.0) : 0;   /* nearest rank, 1-based */
        if (rank < 1) rank = 1;
        if (rank > n) rank = n;
        fprintf(out, "\"%s\": %.1f, ", qn[i], n ? v[rank - 1] * 1e6 : 0.0);
    }
    fprintf(out, "\"max\": %.1f, \"mean\": %.1f, \"samples\": %ld}", n ? v[n - 1] * 1e6 : 0.0,
            n ? sum / n * 1e6 : 0.0, n);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s PORT RATE WARMUP_S SECONDS CONNECTIONS REQUESTS_FILE OUT_JSON\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    rate = atof(argv[2]);
    warmup = atof(argv[3]);
    seconds = atof(argv[4]);
    n_conns = atoi(argv[5]);
    if (port <= 0 || rate <= 0 || seconds <= 0 || n_conns <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
    load_requests(argv[6]);
    total = (long)(rate * (warmup + seconds));
    latency = malloc(sizeof(double) * (total + 1));
    slip = malloc(sizeof(double) * (total + 1));
    queue = malloc(sizeof(long) * (total + 1));
    conns = calloc(n_conns, sizeof *conns);
    idle = malloc(sizeof(int) * n_conns);
    epfd = epoll_create1(0);
    prctl(PR_SET_TIMERSLACK, 1UL);   /* the default 50 us slack would show as slip */
    for (int i = 0; i < n_conns; i++) {
        if (connect_one(&conns[i]) < 0) { fprintf(stderr, "cannot connect to port %d\n", port); return 1; }
        idle[n_idle++] = i;
    }
    struct epoll_event events[256];
    start = now_s() + 0.01;
    double give_up = start + warmup + seconds + GRACE_S;
    for (;;) {
        double t = now_s();
        /* What is due now goes to an idle connection, or queues. */
        while (next_req < total && due(next_req) <= t) {
            if (q_head == q_tail && n_idle) {
                conn_t *c = &conns[idle[--n_idle]];
                if (in_window(next_req)) slip[n_slip++] = t - due(next_req);
                dispatch(c, next_req);
            } else {
                queue[q_tail++] = next_req;
                if (in_window(next_req)) queued++;
            }
            next_req++;
        }
        while (q_head < q_tail && n_idle) dispatch(&conns[idle[--n_idle]], queue[q_head++]);
        if (next_req >= total && done_count >= total) break;
        if (t > give_up) break;
        struct timespec timeout = {0, 0};
        if (next_req < total && q_head == q_tail) {
            long long wait_ns = (long long)((due(next_req) - t) * 1e9);
            if (wait_ns > SPIN_NS) {
                wait_ns -= SPIN_NS / 2;   /* wake a little early, spin the rest */
                timeout.tv_sec = wait_ns / 1000000000LL;
                timeout.tv_nsec = wait_ns % 1000000000LL;
            }
        } else {
            timeout.tv_nsec = 10 * 1000 * 1000;
        }
        int n = epoll_pwait2(epfd, events, 256, &timeout, NULL);
        if (n < 0 && errno != EINTR) { perror("epoll_pwait2"); return 1; }
        t = now_s();
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (events[i].events & EPOLLOUT) pump_send(c);
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c, t);
        }
    }
    long timeouts = 0;
    for (int i = 0; i < n_conns; i++) if (conns[i].busy) timeouts++;
    timeouts += (total - next_req) + (q_tail - q_head);
    /* Achieved: the window's requests over the time they took to be answered,
     * from the window's start; a server that falls behind takes longer. */
    double took = last_window_answer - (start + warmup);
    double achieved = window_done && took > seconds ? window_done / took : window_done / seconds;
    FILE *out = fopen(argv[7], "w");
    if (!out) { perror(argv[7]); return 1; }
    fprintf(out, "{\"offered_rate\": %.3f, \"seconds\": %.3f, \"warmup_s\": %.3f, \"connections\": %d, "
            "\"sent\": %ld, \"answered\": %ld, \"window_answered\": %ld, \"achieved_rate\": %.3f, "
            "\"queued_for_connection\": %ld, \"errors\": {\"connect\": %ld, \"io\": %ld, \"lost\": %ld, "
            "\"unanswered\": %ld}, \"statuses\": {",
            rate, seconds, warmup, n_conns, next_req, done_count - lost, window_done, achieved,
            queued, errors_connect, errors_io, lost, timeouts);
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (statuses[s]) { fprintf(out, "%s\"%d\": %ld", first ? "" : ", ", s, statuses[s]); first = 0; }
    fprintf(out, "}, ");
    write_percentiles(out, "latency_us", latency, n_latency);
    fprintf(out, ", ");
    write_percentiles(out, "slip_us", slip, n_slip);
    fprintf(out, "}\n");
    fclose(out);
    return 0;
}
