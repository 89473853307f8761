/* uplinkctl_ask.c - one request to the daemon's control socket and its
 * answer (see uplinkctl_ask.h), for every uplinkctl command that talks to
 * uplinkd. */
#include "uplinkctl_ask.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* A connected socket, -2 when nobody listens and @quiet_down, or -1 after
 * printing why. */
static int connect_socket(const char *path, bool quiet_down)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};

    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "uplinkctl: socket path too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "uplinkctl: socket: %s\n", strerror(errno));
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int err = errno;
        if (quiet_down && (err == ENOENT || err == ECONNREFUSED)) {
            close(fd);
            return -2;
        }
        if (err == EACCES || err == EPERM)
            fprintf(stderr,
                    "uplinkctl: permission denied on %s\n"
                    "  (the control socket is mode 0660, group uplinkd: run as root or as a "
                    "member of group uplinkd)\n",
                    path);
        else
            fprintf(stderr,
                    "uplinkctl: cannot reach uplinkd at %s: %s\n"
                    "  (is uplinkd running? is control.socket in its config this path? use -s)\n",
                    path, strerror(err));
        close(fd);
        return -1;
    }
    return fd;
}

int uplinkctl_ask(const char *socket_path, const char *request, size_t len, bool quiet_down,
                  char **answer)
{
    int fd = connect_socket(socket_path, quiet_down);
    if (fd == -2)
        return UPLINKCTL_DOWN;
    if (fd < 0)
        return 2;
    if (write(fd, request, len) != (ssize_t)len) {
        fprintf(stderr, "uplinkctl: write to %s: %s\n", socket_path, strerror(errno));
        close(fd);
        return 2;
    }
    size_t cap = 4096, used = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        ssize_t got = read(fd, buf + used, cap - used - 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        used += (size_t)got;
        if (used + 1 == cap) {
            cap *= 2;
            char *grown = realloc(buf, cap);
            if (grown == NULL)
                free(buf);
            buf = grown;
        }
    }
    close(fd);
    if (buf == NULL) {
        fprintf(stderr, "uplinkctl: out of memory\n");
        return 2;
    }
    buf[used] = '\0';
    if (used == 0) {
        fprintf(stderr, "uplinkctl: uplinkd closed the connection without an answer\n");
        free(buf);
        return 2;
    }
    *answer = buf;
    return 0;
}
