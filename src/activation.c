/* activation.c - systemd socket activation (see activation.h). */
#include "activation.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

/* What the socket is: kind and printable address; -EINVAL when it is not a
 * listening stream socket that the local server can serve. */
static int describe(struct activation_socket *s)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char host[INET6_ADDRSTRLEN];

    if (sd_is_socket(s->fd, AF_UNSPEC, SOCK_STREAM, 1) <= 0)
        return -EINVAL;
    if (getsockname(s->fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    if (ss.ss_family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)&ss;
        size_t path_len = len > offsetof(struct sockaddr_un, sun_path)
                              ? len - offsetof(struct sockaddr_un, sun_path)
                              : 0;
        /* An abstract socket starts with NUL; shown with a leading '@'. */
        if (path_len > 0 && sun->sun_path[0] == '\0')
            snprintf(s->address, sizeof(s->address), "unix://@%.*s", (int)(path_len - 1),
                     sun->sun_path + 1);
        else
            snprintf(s->address, sizeof(s->address), "unix://%.*s",
                     (int)strnlen(sun->sun_path, path_len), sun->sun_path);
        s->kind = CONF_LISTEN_UNIX;
        return 0;
    }
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
        snprintf(s->address, sizeof(s->address), "tcp://%s:%u", host, ntohs(sin->sin_port));
        s->kind = CONF_LISTEN_TCP;
        return 0;
    }
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
        snprintf(s->address, sizeof(s->address), "tcp://[%s]:%u", host, ntohs(sin6->sin6_port));
        s->kind = CONF_LISTEN_TCP;
        return 0;
    }
    return -EINVAL;
}

int activation_collect(struct activation *act, char *why, size_t why_size)
{
    char **names = NULL;
    int n, kept = 0;

    why[0] = '\0';
    n = sd_listen_fds_with_names(1, &names);
    if (n <= 0)
        return n;
    act->sockets = calloc((size_t)n, sizeof(*act->sockets));
    if (!act->sockets) {
        for (int i = 0; i < n; i++)
            close(SD_LISTEN_FDS_START + i);
        kept = -ENOMEM;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        struct activation_socket *s = &act->sockets[kept];
        int fd = SD_LISTEN_FDS_START + i;

        memset(s, 0, sizeof(*s));
        s->fd = fd;
        /* systemd passes them inheritable; uplinkd starts no children that
         * should get them. */
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        if (names && names[i] && strcmp(names[i], "unknown") != 0)
            snprintf(s->name, sizeof(s->name), "%s", names[i]);
        if (describe(s) < 0) {
            snprintf(why, why_size,
                     "socket passed by systemd as fd %d%s%s is not a listening stream socket "
                     "(Unix, IPv4 or IPv6); closed it (use ListenStream= in the .socket unit)",
                     fd, s->name[0] ? " named " : "", s->name);
            close(fd);
            continue;
        }
        kept++;
    }
    act->count = (size_t)kept;
out:
    if (names) {
        for (int i = 0; i < n; i++)
            free(names[i]);
        free(names);
    }
    return kept;
}

int activation_take(struct activation *act, const struct conf_listen *cl)
{
    for (size_t i = 0; i < act->count; i++) {
        struct activation_socket *s = &act->sockets[i];
        int match = 0;

        if (s->taken || s->kind != cl->kind)
            continue;
        if (cl->kind == CONF_LISTEN_UNIX) {
            match = sd_is_socket_unix(s->fd, SOCK_STREAM, 1, cl->path, 0);
        } else {
            struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(cl->port)};
            struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6, .sin6_port = htons(cl->port)};

            /* sd_is_socket_sockaddr() compares family, address and port. */
            if (inet_pton(AF_INET, cl->host, &sin.sin_addr) == 1)
                match = sd_is_socket_sockaddr(s->fd, SOCK_STREAM, (struct sockaddr *)&sin,
                                              sizeof(sin), 1);
            else if (inet_pton(AF_INET6, cl->host, &sin6.sin6_addr) == 1)
                match = sd_is_socket_sockaddr(s->fd, SOCK_STREAM, (struct sockaddr *)&sin6,
                                              sizeof(sin6), 1);
        }
        if (match > 0) {
            s->taken = true;
            return s->fd;
        }
    }
    return -ENOENT;
}

const struct activation_socket *activation_next_unmatched(struct activation *act)
{
    for (size_t i = 0; i < act->count; i++) {
        if (!act->sockets[i].taken) {
            act->sockets[i].taken = true;
            return &act->sockets[i];
        }
    }
    return NULL;
}

void activation_release(struct activation *act)
{
    for (size_t i = 0; i < act->count; i++)
        if (!act->sockets[i].taken)
            close(act->sockets[i].fd);
    free(act->sockets);
    act->sockets = NULL;
    act->count = 0;
}
