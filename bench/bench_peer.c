/* bench_peer.c - what identifying a loopback TCP peer costs per accept.
 *
 * local.c asks the kernel who owns the other end of every accepted loopback
 * TCP connection (access_tcp_peer_identity(): one NETLINK_SOCK_DIAG exact
 * match, plus getpwuid_r/getgrouplist when a rule selects by gid). This
 * times, per connection, the median of RUNS runs of N connections each:
 *
 *   accept     connect + accept + close of a loopback TCP pair (the floor
 *              that every TCP client costs anyway)
 *   diag       access_tcp_peer_identity() without groups
 *   diag+grp   the same with the passwd and group lookups
 *   peercred   access_peer_identity() (SO_PEERCRED) on a Unix socketpair,
 *              what a Unix socket client costs
 *
 * each with BACKGROUND other established loopback connections open, since
 * the kernel's lookup walks its socket hash.
 *
 * Usage: bench_peer [connections per run] [background connections]
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "access.h"

#define RUNS 7

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int listener_open(struct sockaddr_in *addr)
{
    socklen_t len = sizeof(*addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr->sin_port = 0;
    if (fd < 0 || bind(fd, (struct sockaddr *)addr, len) < 0 || listen(fd, 4096) < 0 ||
        getsockname(fd, (struct sockaddr *)addr, &len) < 0)
        die("listener");
    return fd;
}

/* One connected pair; *server is the accepted end. */
static void pair(int listener, const struct sockaddr_in *addr, int *client, int *server)
{
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (*client < 0 || connect(*client, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
        die("connect");
    *server = accept(listener, NULL, NULL);
    if (*server < 0)
        die("accept");
}

enum mode { ACCEPT, DIAG, DIAG_GROUPS, PEERCRED, MODES };
static const char *const mode_names[MODES] = {"accept", "diag", "diag+grp", "peercred"};

/* Nanoseconds per connection for @mode over @n connections. */
static uint64_t run(enum mode mode, int listener, const struct sockaddr_in *addr, int n)
{
    uint64_t spent = 0;

    for (int i = 0; i < n; i++) {
        struct access_identity id = {0};
        struct sockaddr_storage own, peer;
        socklen_t own_len = sizeof(own), peer_len = sizeof(peer);
        char why[160];
        int client, server, sv[2];
        uint64_t t0;

        if (mode == PEERCRED) {
            if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
                die("socketpair");
            t0 = bench_now_ns();
            if (access_peer_identity(sv[0], &id) < 0)
                die("SO_PEERCRED");
            spent += bench_now_ns() - t0;
            close(sv[0]);
            close(sv[1]);
            continue;
        }
        t0 = bench_now_ns();
        pair(listener, addr, &client, &server);
        if (mode == ACCEPT) {
            close(client);
            close(server);
            spent += bench_now_ns() - t0;
            continue;
        }
        t0 = bench_now_ns(); /* only the identification, as local.c adds it */
        if (getsockname(server, (struct sockaddr *)&own, &own_len) < 0 ||
            getpeername(server, (struct sockaddr *)&peer, &peer_len) < 0)
            die("getsockname");
        if (access_tcp_peer_identity((struct sockaddr *)&own, (struct sockaddr *)&peer,
                                     mode == DIAG_GROUPS, &id, why, sizeof(why)) < 0) {
            fprintf(stderr, "bench_peer: lookup failed: %s\n", why);
            exit(1);
        }
        spent += bench_now_ns() - t0;
        close(client);
        close(server);
    }
    return spent / (uint64_t)n;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    int background = argc > 2 ? atoi(argv[2]) : 1000;
    struct rlimit rl = {.rlim_cur = 65536, .rlim_max = 65536};
    struct sockaddr_in addr;
    int listener, *bg;
    uint64_t results[MODES][RUNS];

    if (n <= 0 || background < 0) {
        fprintf(stderr, "usage: bench_peer [connections per run] [background connections]\n");
        return 2;
    }
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0 && getrlimit(RLIMIT_NOFILE, &rl) == 0 &&
        (rlim_t)background * 2 + 64 > rl.rlim_cur) {
        background = rl.rlim_cur > 64 ? (int)((rl.rlim_cur - 64) / 2) : 0;
        fprintf(stderr, "bench_peer: RLIMIT_NOFILE %lu: only %d background connections\n",
                (unsigned long)rl.rlim_cur, background);
    }
    listener = listener_open(&addr);
    bg = calloc((size_t)background * 2 + 1, sizeof(*bg));
    if (!bg)
        die("calloc");
    for (int i = 0; i < background; i++)
        pair(listener, &addr, &bg[2 * i], &bg[2 * i + 1]);
    for (int r = 0; r < RUNS; r++)
        for (int m = 0; m < MODES; m++)
            results[m][r] = run((enum mode)m, listener, &addr, n);
    printf("bench_peer: %d connections per run, %d background connections, median of %d runs\n", n,
           background, RUNS);
    for (int m = 0; m < MODES; m++) {
        qsort(results[m], RUNS, sizeof(results[m][0]), bench_cmp_u64);
        printf("  %-9s %7.1f us per connection", mode_names[m], results[m][RUNS / 2] / 1000.0);
        if (m != ACCEPT)
            printf("  (%.2f x accept)", (double)results[m][RUNS / 2] / results[ACCEPT][RUNS / 2]);
        printf("\n");
    }
    for (int i = 0; i < 2 * background; i++)
        close(bg[i]);
    free(bg);
    close(listener);
    return 0;
}
