/* fastload: benchmarks/loadgen.py's closed loop, in C, so that the server is what is measured.
 *
 * The Python generator (selectors, one process) saturates its own core at about 60,000
 * requests/s: on a 2-core machine every fast server measured the same. This one does
 * the same thing with a fraction of the CPU per request: one thread, epoll,
 * non-blocking sockets with TCP_NODELAY, each connection with exactly one request in
 * flight (send the packet, read the whole reply, record the latency, send again).
 *
 * It is a long-lived child of benchmarks.loadgen.FastDriver, which keeps one server's
 * connections open across many short measured slices:
 *
 *   fastload PORT CONNECTIONS PACKET_HEX [PACKET_HEX ...]
 *       one packet for every connection, or one per connection (all of one size);
 *       connects them all to 127.0.0.1:PORT, prints "ready" (or "error ..." and exits 1).
 *   drive SECONDS WARMUP
 *       runs the loops for WARMUP + SECONDS, counting the replies completing in the
 *       last SECONDS. With WARMUP > 0 it prints "start" at the first counted reply
 *       (where loadgen.Driver starts its CPU window then); it prints "measured" the
 *       moment it stops issuing requests (where the CPU window ends), lets the
 *       requests in flight finish (up to 5 s, then reconnects those that did not), and
 *       prints "result REQUESTS ERRORS SECONDS P50 P99 HISTOGRAM", HISTOGRAM being
 *       "bucket:count,..." (see bucket_of) or "-" when empty.
 *   quit (or end of input)
 *       closes everything and exits 0.
 *
 * The server is an echo: a reply has exactly the request's length, and its bytes must
 * be the request's; a reply that differs, or a connection the server closes, counts as
 * an error (and is not a request served).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_LIMIT 5.0 /* seconds the requests in flight at the end of a slice get */

/* Latencies in log-linear buckets of nanoseconds: exact below 128 ns, then 64 buckets
 * per power of two (at most 1/64 wide: a bucket's midpoint is within 0.8% of any
 * latency in it). Fixed buckets merge by adding counts, so slices combine exactly.
 * benchmarks/loadgen.py mirrors bucket_of and bucket_value. */
#define SUB_BITS 6
#define EXACT 128
#define BUCKETS (EXACT + (40 - 7 + 1) * 64) /* up to 2^41 ns, about 36 minutes */

static int bucket_of(uint64_t ns) {
    if (ns < EXACT) return (int)ns;
    int msb = 63 - __builtin_clzll(ns);
    if (msb > 40) return BUCKETS - 1;
    int sub = (int)((ns >> (msb - SUB_BITS)) & 63);
    return EXACT + (msb - 7) * 64 + sub;
}

static double bucket_value(int bucket) {
    if (bucket < EXACT) return bucket * 1e-9;
    int k = (bucket - EXACT) / 64, sub = (bucket - EXACT) % 64, shift = k + 1;
    double low = (double)((uint64_t)(64 + sub) << shift);
    return (low + (double)((uint64_t)1 << shift) / 2) * 1e-9;
}

struct conn {
    int fd;
    const unsigned char *packet;
    size_t sent;       /* bytes of the request sent so far */
    size_t received;   /* bytes of the reply received so far */
    int busy;          /* a request in flight */
    int mismatch;      /* the reply so far differs from the request */
    uint64_t started;  /* ns: when the request went out */
};

static int port, nconns, epfd;
static size_t size;
static struct conn *conns;
static unsigned char *scratch;
static uint64_t histogram[BUCKETS];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void fail(const char *what) {
    printf("error %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* A blocking connect (as socket.create_connection), then non-blocking with TCP_NODELAY. */
static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) fail("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) fail("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) fail("epoll_ctl");
}

static void reopen(struct conn *c) {
    close(c->fd); /* leaves the epoll set with it */
    c->fd = open_conn();
    c->sent = c->received = 0;
    c->busy = c->mismatch = 0;
    watch(c, EPOLL_CTL_ADD, EPOLLIN);
}

/* Send what is left of the request; 0 when the connection broke. Waits for EPOLLOUT
 * only in the rare case the socket's buffer is full. */
static int push(struct conn *c) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->packet + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            return 1;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            return 0;
        }
    }
    return 1;
}

static int issue(struct conn *c) {
    c->started = now_ns();
    c->sent = c->received = 0;
    c->mismatch = 0;
    c->busy = 1;
    return push(c);
}

static double percentile(uint64_t count, double q) {
    if (!count) return 0.0 / 0.0;
    uint64_t rank = (uint64_t)(q * (double)count), seen = 0; /* as Result.percentile */
    if (rank > count - 1) rank = count - 1;
    for (int b = 0; b < BUCKETS; b++) {
        seen += histogram[b];
        if (seen > rank) return bucket_value(b);
    }
    return 0.0 / 0.0;
}

static void drive(double seconds, double warmup) {
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t stop = measure_from + (uint64_t)(seconds * 1e9);
    uint64_t drain_until = stop + (uint64_t)(DRAIN_LIMIT * 1e9);
    uint64_t count = 0, errors = 0;
    int started_window = warmup <= 0; /* with no warmup, Python reads CPU before "drive" */
    int stopping = 0, in_flight = 0;
    struct epoll_event events[256];
    memset(histogram, 0, sizeof histogram);

    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (issue(c)) {
            in_flight++;
        } else {
            errors++;
            reopen(c);
            if (issue(c)) in_flight++;
        }
    }
    while (in_flight) {
        uint64_t now = now_ns();
        if (!stopping && now >= stop) {
            stopping = 1; /* no new requests; the ones in flight finish */
            fputs("measured\n", stdout);
            fflush(stdout);
        }
        if (stopping && now >= drain_until) {
            /* A server that stopped answering: start those connections afresh. */
            for (int i = 0; i < nconns; i++)
                if (conns[i].busy) reopen(&conns[i]);
            break;
        }
        uint64_t deadline = stopping ? drain_until : stop;
        int timeout = (int)((deadline - now + 999999) / 1000000);
        if (timeout > 500) timeout = 500;
        int ready = epoll_wait(epfd, events, 256, timeout);
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail("epoll_wait");
        }
        for (int e = 0; e < ready; e++) {
            struct conn *c = events[e].data.ptr;
            if (!c->busy) continue; /* reopened earlier in this batch */
            int broken = 0, done = 0;
            if ((events[e].events & EPOLLOUT) && c->sent < size) {
                if (!push(c)) broken = 1;
                else if (c->sent == size) watch(c, EPOLL_CTL_MOD, EPOLLIN);
            }
            if (!broken && (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
                /* Never read past this reply: what follows belongs to no request. */
                ssize_t n = recv(c->fd, scratch, size - c->received, 0);
                if (n > 0) {
                    if (memcmp(scratch, c->packet + c->received, (size_t)n) != 0) c->mismatch = 1;
                    c->received += (size_t)n;
                    done = c->received == size;
                } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                    broken = 1;
                }
            }
            if (!broken && !done) continue;
            if (broken) { /* the server closed it: a new connection, and on */
                errors++;
                reopen(c);
            } else {
                uint64_t finished = now_ns();
                c->busy = 0;
                if (c->mismatch) {
                    errors++;
                } else if (measure_from <= finished && finished < stop) {
                    if (!started_window) {
                        started_window = 1; /* where loadgen.Driver starts the CPU window */
                        fputs("start\n", stdout);
                        fflush(stdout);
                    }
                    count++;
                    histogram[bucket_of(finished - c->started)]++;
                }
            }
            if (stopping) {
                in_flight--;
            } else if (!issue(c)) {
                errors++;
                reopen(c);
                if (!issue(c)) in_flight--;
            }
        }
    }
    if (!stopping) { /* every connection broke before the end: still say so */
        fputs("measured\n", stdout);
    }
    printf("result %llu %llu %.9f %.9f %.9f ", (unsigned long long)count, (unsigned long long)errors,
           (double)(stop - measure_from) * 1e-9, percentile(count, 0.50), percentile(count, 0.99));
    int any = 0;
    for (int b = 0; b < BUCKETS; b++) {
        if (histogram[b]) {
            printf("%s%d:%llu", any ? "," : "", b, (unsigned long long)histogram[b]);
            any = 1;
        }
    }
    fputs(any ? "\n" : "-\n", stdout);
    fflush(stdout);
}

static unsigned char *unhex(const char *hex, size_t *len) {
    size_t n = strlen(hex);
    if (n == 0 || n % 2) return NULL;
    unsigned char *out = malloc(n / 2);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) return NULL;
        out[i] = (unsigned char)byte;
    }
    *len = n / 2;
    return out;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fputs("error usage: fastload PORT CONNECTIONS PACKET_HEX [PACKET_HEX ...]\n", stdout);
        return 2;
    }
    port = atoi(argv[1]);
    nconns = atoi(argv[2]);
    int npackets = argc - 3;
    if (port <= 0 || port > 65535 || nconns <= 0 || (npackets != 1 && npackets != nconns)) {
        fputs("error usage: one packet, or one per connection\n", stdout);
        return 2;
    }
    unsigned char **packets = calloc((size_t)npackets, sizeof *packets);
    for (int i = 0; i < npackets; i++) {
        size_t len = 0;
        packets[i] = unhex(argv[3 + i], &len);
        if (!packets[i] || (i && len != size)) {
            fputs("error packets: hex, non-empty, all of one size\n", stdout);
            return 2;
        }
        size = len;
    }
    scratch = malloc(size);
    epfd = epoll_create1(0);
    if (epfd < 0) fail("epoll_create1");
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        conns[i].packet = packets[npackets == 1 ? 0 : i];
        conns[i].fd = open_conn();
        watch(&conns[i], EPOLL_CTL_ADD, EPOLLIN);
    }
    fputs("ready\n", stdout);
    fflush(stdout);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        double seconds, warmup;
        if (sscanf(line, "drive %lf %lf", &seconds, &warmup) == 2 && seconds >= 0 && warmup >= 0) {
            drive(seconds, warmup);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("error command: %s", line);
            fflush(stdout);
        }
    }
    for (int i = 0; i < nconns; i++) close(conns[i].fd);
    close(epfd);
    return 0;
}
