/* activation.h - listening sockets passed by systemd (socket activation,
 * sd_listen_fds(3)).
 *
 * When uplinkd is started by a .socket unit (or systemd-socket-activate),
 * LISTEN_FDS names listening sockets that are already bound. The local
 * server adopts each one in place of binding the local.listen entry with the
 * same address, so connections that arrived before uplinkd was up (queued
 * in the kernel) are served and a port below 1024 needs no capability.
 */
#ifndef UPLINKD_ACTIVATION_H
#define UPLINKD_ACTIVATION_H

#include <stdbool.h>
#include <stddef.h>

#include "conf.h"

struct activation_socket {
    int fd;
    enum conf_listen_kind kind;
    char name[256];    /* its LISTEN_FDNAMES entry ("" when none) */
    char address[160]; /* "unix:///path" or "tcp://127.0.0.1:1883", for logs */
    bool taken;        /* handed out by activation_take() or _next_unmatched() */
};

/* Zero-initialised is "no sockets". */
struct activation {
    struct activation_socket *sockets;
    size_t count;
};

/**
 * activation_collect() - take the sockets systemd passed to this process
 * (LISTEN_PID must be ours; the LISTEN_* variables are then removed from the
 * environment so no child inherits them). Sockets that are not listening
 * stream sockets of family AF_UNIX, AF_INET or AF_INET6 cannot be served:
 * they are closed and described in @why (one per call is enough to act on)
 * while the rest are kept. Call once, before any activation_take().
 * Returns the number of sockets kept (0 when not socket-activated), or a
 * negative errno from sd_listen_fds() / -ENOMEM.
 */
int activation_collect(struct activation *act, char *why, size_t why_size);

/**
 * activation_take() - the fd of a passed socket bound to the address of @cl
 * (the same Unix socket path, or the same TCP address and port), now owned
 * by the caller; -ENOENT when none matches.
 */
int activation_take(struct activation *act, const struct conf_listen *cl);

/**
 * activation_next_unmatched() - the next socket no activation_take() asked
 * for, marked taken (its fd now owned by the caller), or NULL. Borrowed from
 * @act.
 */
const struct activation_socket *activation_next_unmatched(struct activation *act);

/** activation_release() - close sockets nobody took and free @act's memory. */
void activation_release(struct activation *act);

#endif
