/* local_listen.c - the local server's listeners and the admission of new
 * connections: binding TCP and Unix sockets (or adopting systemd's), the
 * accept loop with its burst limit, and the pending-connection policy below
 * (local_int.h lists the layers; this file calls local_client.c and
 * local_conn.c).
 */
#include "local_int.h"

#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* --- pending connections ------------------------------------------------------ */

/*
 * A connection is pending from accept until its CONNECT is answered; until
 * then nobody knows whether it is a client at all. An idle or slowloris
 * flood must not take the slots of real clients (issue 12), so:
 *  - local.max_clients counts only connected clients (CONNACK 0 sent);
 *  - pending connections have their own budget per listener
 *    (local.max_pending_connects) and per peer uid where the peer is
 *    identified (local.max_pending_per_uid, all listeners together; the uid
 *    is struct access_identity's, read at accept), so their file
 *    descriptors are bounded too;
 *  - a pending connection has local.connect_deadline from accept to a
 *    complete CONNECT; bytes that trickle in do not extend it;
 *  - when a budget is full the oldest pending connection that can be
 *    evicted is closed to make room, not the newcomer: a client that sends
 *    its CONNECT at once leaves the pending set within one read, so a flood
 *    only ever evicts itself. Never evicted: a connection with unread bytes
 *    (a CONNECT that came with it, not read yet) or whose CONNECT is
 *    complete and waiting for the password check. Older connections go
 *    before those of the current burst of accepts, unidentified peers before
 *    identified ones (those are already held to their uid's budget); see
 *    pending_victim(). Only when nothing is evictable is the newcomer closed;
 *  - at most LOCAL_ACCEPT_BURST accepts per listener per loop iteration, so
 *    the reads of what was accepted come next.
 * Every such close is counted and logged once per burst (local_drop_note()).
 */

static void client_describe_peer(struct local_client *client, enum conf_listen_kind kind)
{
    snprintf(client->peer, sizeof(client->peer), "?");
    client->kind = kind;
    if (kind == CONF_LISTEN_TCP) {
        struct sockaddr_storage ss;
        int len = sizeof(ss);
        char host[64];
        struct sockaddr_storage own;
        int own_len = sizeof(own);
        const struct conf_local *conf = &client->local->conf->local;
        char why[160];

        if (uv_tcp_getpeername(&client->conn.tcp, (struct sockaddr *)&ss, &len) < 0)
            return;
        if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
            uv_ip6_name(sin6, host, sizeof(host));
            snprintf(client->peer, sizeof(client->peer), "[%s]:%u", host, ntohs(sin6->sin6_port));
        } else if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
            uv_ip4_name(sin, host, sizeof(host));
            snprintf(client->peer, sizeof(client->peer), "%s:%u", host, ntohs(sin->sin_port));
        }
        /* A loopback peer is a local process: sock_diag names its uid, so
         * local.acl uid/gid rules hold over TCP as on the Unix socket. */
        if (uv_tcp_getsockname(&client->conn.tcp, (struct sockaddr *)&own, &own_len) < 0) {
            snprintf(why, sizeof(why), "cannot read the connection's own address");
        } else if (access_tcp_peer_identity((struct sockaddr *)&own, (struct sockaddr *)&ss,
                                            access_acl_selects_gids(conf), &client->identity, why,
                                            sizeof(why)) == 0) {
            why[0] = '\0';
        }
        if (why[0] && access_acl_selects_ids(conf, NULL))
            log_info("TCP connection from %s: peer not identified (%s); only local.acl rules "
                     "without uid/gid apply to it",
                     client->peer, why);
    } else {
        /* Unix-socket clients are named by their credentials (SO_PEERCRED),
         * which local.acl rules select by uid and gid. */
        uv_os_fd_t fd;

        if (uv_fileno(&client->conn.handle, &fd) == 0 &&
            access_peer_identity(fd, &client->identity) == 0)
            snprintf(client->peer, sizeof(client->peer), "pid %ld uid %lu",
                     (long)client->identity.pid, (unsigned long)client->identity.uid);
        else
            snprintf(client->peer, sizeof(client->peer), "unix");
    }
}

/* A new client joins the list with its connection and timer handles open
 * (open_handles counts what close callbacks must still see). */
void client_link(struct local *local, struct local_client *client)
{
    client->open_handles = 2;
    sm_init(&client->sm, &client_sm, CLIENT_NEW);
    client->next = local->clients;
    if (local->clients)
        local->clients->prev = client;
    local->clients = client;
    local->client_count++;
    local->live++;
}

/* Bytes the kernel holds for @client that were not read yet: typically a
 * CONNECT that arrived with the connection, in the same burst of accepts. */
static bool pending_has_unread(const struct local_client *client)
{
    uv_os_fd_t fd;
    int n = 0;

    return uv_fileno(&client->conn.handle, &fd) == 0 && ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

/*
 * The pending connection to evict for a newcomer: of @uid when not NULL (any
 * listener), else on @on (any listener when NULL). Never one whose CONNECT
 * is complete (password check running) or has unread bytes waiting (it is
 * about to be served). The oldest from before this loop iteration first,
 * unidentified peers before identified ones; one accepted in this same
 * iteration (same uv_now(): a burst of accepts) only when the newcomer has
 * bytes waiting itself (@newcomer_speaks), else refusing the newcomer costs
 * the same and is cheaper. NULL when there is none.
 */
static struct local_client *pending_victim(struct local *local, const struct listener *on,
                                           const uid_t *uid, bool newcomer_speaks)
{
    uint64_t now = uv_now(local->loop);
    struct local_client *old_identified = NULL, *same_burst = NULL;

    for (struct local_client *c = local->pending_head; c; c = c->pending_next) {
        bool identified = c->identity.has_cred;

        if (client_state_of(c) != CLIENT_NEW || (on && c->listener != on))
            continue;
        if (uid && (!identified || c->identity.uid != *uid))
            continue;
        if (c->accepted_ms == now) {
            if (newcomer_speaks && !same_burst && !pending_has_unread(c))
                same_burst = c;
            continue;
        }
        if (pending_has_unread(c))
            continue;
        if (uid || !identified)
            return c;
        if (!old_identified)
            old_identified = c;
    }
    return old_identified ? old_identified : same_burst;
}

static size_t pending_count_uid(const struct local *local, uid_t uid)
{
    size_t n = 0;

    for (const struct local_client *c = local->pending_head; c; c = c->pending_next)
        n += c->identity.has_cred && c->identity.uid == uid;
    return n;
}

/* Close a pending connection (or a newcomer not yet linked) under the
 * pending policy: counted, logged per burst, not one line each. */
static void pending_drop(struct local_client *client, struct listener *listener,
                         enum local_drop kind, const char *why)
{
    local_drop_note(client->local, listener, kind, client->peer, why);
    client->quiet_close = true;
    client_close(client, CLOSE_ABORT, false, why);
}

void local_reserve_fd_open(struct local *local)
{
    if (local->reserve_fd < 0)
        local->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/*
 * Admit the accepted @client of @listener to the pending set, evicting to
 * make room (see "pending connections"), or close it. Returns 0 when
 * admitted, -1 when @client was closed.
 */
static int pending_admit(struct listener *listener, struct local_client *client)
{
    struct local *local = listener->local;
    struct local_client *victim;
    bool speaks = pending_has_unread(client);
    uv_os_fd_t fd = -1;

    /* File descriptors first: the last LOCAL_FD_HEADROOM stay for the
     * uplinks, the spool and the control socket. The kernel hands out the
     * lowest free number, so fd >= N means N descriptors are in use. */
    uv_fileno(&client->conn.handle, &fd);
    if (local->fd_limit && fd >= 0 && (unsigned)fd + LOCAL_FD_HEADROOM >= local->fd_limit) {
        victim = pending_victim(local, NULL, NULL, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_NO_FDS,
                         "out of file descriptors (RLIMIT_NOFILE), nothing pending to evict");
            local_reserve_fd_open(local);
            return -1;
        }
        pending_drop(victim, victim->listener, DROP_NO_FDS,
                     "evicted: file descriptors running out (RLIMIT_NOFILE)");
    }
    if (client->identity.has_cred &&
        pending_count_uid(local, client->identity.uid) >= local_max_pending_per_uid(local)) {
        victim = pending_victim(local, NULL, &client->identity.uid, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_REFUSED,
                         "local.max_pending_per_uid reached, none evictable");
            return -1;
        }
        pending_drop(victim, victim->listener, DROP_EVICTED_UID,
                     "evicted: oldest pending connection of a uid over local.max_pending_per_uid");
    }
    if (listener->pending_count >= local_max_pending(local)) {
        victim = pending_victim(local, listener, NULL, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_REFUSED,
                         "local.max_pending_connects reached, none evictable");
            return -1;
        }
        pending_drop(victim, listener, DROP_EVICTED,
                     "evicted: oldest pending connection, local.max_pending_connects reached");
    }
    pending_link(client, listener);
    return 0;
}

/* --- accept ---------------------------------------------------------------------- */

/*
 * accept(2) failed. libuv already keeps a spare descriptor for EMFILE (it
 * closes it, accepts and closes what is queued, reopens it) and calls this
 * only when that did not help, and then again at once: without a free
 * descriptor this would spin. So free one: evict the oldest pending
 * connection, or close our own reserve so that the next accept succeeds and
 * pending_admit() refuses it (and reopens the reserve).
 */
static void listener_accept_failed(struct listener *listener, int status)
{
    struct local *local = listener->local;
    struct local_client *victim;
    char why[128];

    snprintf(why, sizeof(why), "accept failed: %s", uv_strerror(status));
    local_drop_note(local, listener, DROP_ACCEPT, "-", why);
    if (status != UV_EMFILE && status != UV_ENFILE)
        return;
    victim = pending_victim(local, NULL, NULL, true);
    if (victim) {
        pending_drop(victim, victim->listener, DROP_NO_FDS,
                     "evicted: out of file descriptors (RLIMIT_NOFILE)");
    } else if (local->reserve_fd >= 0) {
        close(local->reserve_fd);
        local->reserve_fd = -1;
    }
}

/* Take the connection libuv has accepted on @listener. */
static void listener_accept(struct listener *listener)
{
    struct uv_stream_s *server = &listener->h.stream;
    struct local *local = listener->local;
    struct local_client *client;
    int rc;

    client = calloc(1, sizeof(*client));
    if (!client) {
        log_err("listener %s: out of memory for a new client", listener->url);
        return;
    }
    client->local = local;
    if (listener->kind == CONF_LISTEN_TCP)
        rc = uv_tcp_init(local->loop, &client->conn.tcp);
    else
        rc = uv_pipe_init(local->loop, &client->conn.pipe, 0);
    if (rc < 0) {
        log_err("listener %s: cannot create a client handle: %s", listener->url, uv_strerror(rc));
        free(client);
        return;
    }
    uv_timer_init(local->loop, &client->timer);
    client_link(local, client);

    rc = uv_accept(server, &client->conn.stream);
    if (rc < 0) {
        pending_drop(client, listener, DROP_ACCEPT, "accept failed");
        return;
    }
    client->accepted_ms = uv_now(local->loop);
    client_describe_peer(client, listener->kind);
    if (pending_admit(listener, client) < 0)
        return;
    log_debug(CLIENT_FMT ": accepted on %s", CLIENT_ARGS(client), listener->url);
    rc = uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb);
    if (rc < 0) {
        client_close(client, CLOSE_ABORT, false, uv_strerror(rc));
        return;
    }
    /* From accept to a complete CONNECT; reads do not re-arm it. */
    uv_timer_start(&client->timer, client_keepalive_cb, local_connect_deadline_ms(local), 0);
}

/* Next loop iteration: take the connections deferred by the accept burst
 * limit; uv_accept() also makes libuv watch the listener again. */
static void local_accept_timer_cb(uv_timer_t *timer)
{
    struct local *local = timer->data;

    for (struct listener *l = local->listeners; l; l = l->next) {
        if (!l->deferred)
            continue;
        l->deferred = false;
        l->accepts_ms = uv_now(local->loop);
        l->accepts = 1;
        listener_accept(l);
    }
}

static void listener_connection_cb(uv_stream_t *server, int status)
{
    struct listener *listener = container_of(server, struct listener, h.stream);
    struct local *local = listener->local;
    uint64_t now = uv_now(local->loop);

    if (status < 0) {
        listener_accept_failed(listener, status);
        return;
    }
    if (listener->accepts_ms != now) {
        listener->accepts_ms = now;
        listener->accepts = 0;
    }
    if (++listener->accepts > LOCAL_ACCEPT_BURST) {
        /* Leaving the connection in libuv (no uv_accept()) stops it watching
         * the listener until local_accept_timer_cb() takes it: reads of the
         * connections accepted so far run first. */
        listener->deferred = true;
        uv_timer_start(&local->accept_timer, local_accept_timer_cb, 0, 0);
        return;
    }
    listener_accept(listener);
}

/* --- listeners --------------------------------------------------------------- */

static void listener_closed_cb(uv_handle_t *handle)
{
    struct listener *listener = container_of(handle, struct listener, h.handle);
    struct local *local = listener->local;

    if (listener->path && unlink(listener->path) < 0 && errno != ENOENT)
        log_warn("listener %s: cannot remove %s: %s", listener->url, listener->path,
                 strerror(errno));
    free(listener->url);
    free(listener->path);
    free(listener);
    local_live_put(local);
}

void listener_close(struct listener *listener)
{
    /* Its pending clients stay pending (deadline, uid budget), on no
     * listener's budget. */
    for (struct local_client *c = listener->local->pending_head; c; c = c->pending_next)
        if (c->listener == listener)
            c->listener = NULL;
    listener->pending_count = 0;
    if (!uv_is_closing(&listener->h.handle))
        uv_close(&listener->h.handle, listener_closed_cb);
}

/*
 * A Unix socket path left behind by a crashed daemon is removed; a path where
 * someone is listening, or that is not a socket, is left alone and refused.
 * This runs at start/reload: connect(2) on a Unix socket answers at once.
 */
static int unix_path_prepare(const char *url, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, rc;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        log_err("listener %s: socket path longer than %zu bytes", url, sizeof(addr.sun_path) - 1);
        return -ENAMETOOLONG;
    }
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(st.st_mode)) {
        log_err("listener %s: %s exists and is not a socket; remove it or choose another path", url,
                path);
        return -EEXIST;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    rc = connect(fd, (struct sockaddr *)&addr, sizeof(addr));
    close(fd);
    if (rc == 0) {
        log_err("listener %s: another process is listening on %s (is uplinkd already running?)",
                url, path);
        return -EADDRINUSE;
    }
    log_info("listener %s: removing stale socket %s", url, path);
    if (unlink(path) < 0 && errno != ENOENT)
        return -errno;
    return 0;
}

/* chmod/chgrp the socket: access control is by file permission (local.h). */
static int unix_path_permissions(const struct conf_local *conf, const char *url, const char *path)
{
    if (chmod(path, conf->socket_mode) < 0) {
        int err = errno;
        log_err("listener %s: chmod %o %s: %s", url, conf->socket_mode, path, strerror(err));
        return -err;
    }
    if (conf->socket_group) {
        /* NSS lookup at start/reload only, never from a client callback. */
        struct group grp, *found = NULL;
        char buf[4096];
        int err = getgrnam_r(conf->socket_group, &grp, buf, sizeof(buf), &found);

        if (!found) {
            log_err("listener %s: local.socket_group '%s': %s", url, conf->socket_group,
                    err ? strerror(err) : "no such group");
            return err ? -err : -ENOENT;
        }
        if (chown(path, (uid_t)-1, grp.gr_gid) < 0) {
            err = errno;
            log_err("listener %s: chgrp %s %s: %s", url, conf->socket_group, path, strerror(err));
            return -err;
        }
    }
    return 0;
}

static int listener_bind_tcp(struct listener *listener, const struct conf_listen *cl)
{
    struct sockaddr_storage ss;
    const char *host = strcmp(cl->host, "localhost") == 0 ? "127.0.0.1" : cl->host;
    int rc;

    if (uv_ip4_addr(host, cl->port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, cl->port, (struct sockaddr_in6 *)&ss) != 0) {
        log_err("listener %s: '%s' is not an IP address", cl->url, cl->host);
        return -EINVAL;
    }
    rc = uv_tcp_bind(&listener->h.tcp, (const struct sockaddr *)&ss, 0);
    if (rc < 0)
        log_err("listener %s: cannot bind: %s", cl->url, uv_strerror(rc));
    return rc;
}

static int listener_bind_unix(struct listener *listener, const struct conf_local *conf,
                              const struct conf_listen *cl)
{
    int rc = unix_path_prepare(cl->url, cl->path);

    if (rc < 0)
        return rc;
    rc = uv_pipe_bind(&listener->h.pipe, cl->path);
    if (rc < 0) {
        log_err("listener %s: cannot bind %s: %s", cl->url, cl->path, uv_strerror(rc));
        return rc;
    }
    listener->path = strdup(cl->path); /* from now on ours to unlink */
    if (!listener->path)
        return -ENOMEM;
    return unix_path_permissions(conf, cl->url, cl->path);
}

/* Use a socket passed by systemd, already bound and listening. Its path,
 * mode and group belong to the .socket unit (SocketMode=, SocketGroup=), so
 * they are neither changed nor unlinked here (listener->path stays NULL). */
static int listener_adopt(struct listener *listener, int fd)
{
    int rc = listener->kind == CONF_LISTEN_TCP ? uv_tcp_open(&listener->h.tcp, fd)
                                               : uv_pipe_open(&listener->h.pipe, fd);

    if (rc < 0) {
        log_err("listener %s: cannot use the socket passed by systemd (fd %d): %s", listener->url,
                fd, uv_strerror(rc));
        close(fd);
        return rc;
    }
    log_info("listener %s: using the socket passed by systemd (fd %d) instead of binding",
             listener->url, fd);
    return 0;
}

/* Create, bind (or adopt @passed_fd, or a socket from systemd with the same
 * address) and listen; on failure the listener is already being closed.
 * @passed_fd (-1 for none) is owned by this function. */
static int listener_open(struct local *local, const struct conf_local *conf,
                         const struct conf_listen *cl, int passed_fd, struct listener **out)
{
    struct listener *listener;
    int fd, rc;

    listener = calloc(1, sizeof(*listener));
    if (!listener) {
        if (passed_fd >= 0)
            close(passed_fd);
        return -ENOMEM;
    }
    listener->local = local;
    listener->kind = cl->kind;
    listener->url = strdup(cl->url);
    if (!listener->url) {
        free(listener);
        if (passed_fd >= 0)
            close(passed_fd);
        return -ENOMEM;
    }
    if (cl->kind == CONF_LISTEN_TCP)
        rc = uv_tcp_init(local->loop, &listener->h.tcp);
    else
        rc = uv_pipe_init(local->loop, &listener->h.pipe, 0);
    if (rc < 0) {
        free(listener->url);
        free(listener);
        if (passed_fd >= 0)
            close(passed_fd);
        return rc;
    }
    local->live++;
    fd = passed_fd >= 0 ? passed_fd : activation_take(&local->activation, cl);
    if (fd >= 0)
        rc = listener_adopt(listener, fd);
    else if (cl->kind == CONF_LISTEN_TCP)
        rc = listener_bind_tcp(listener, cl);
    else
        rc = listener_bind_unix(listener, conf, cl);
    if (rc < 0)
        goto err_after_init;
    rc = uv_listen(&listener->h.stream, LOCAL_LISTEN_BACKLOG, listener_connection_cb);
    if (rc < 0) {
        log_err("listener %s: cannot listen: %s", cl->url, uv_strerror(rc));
        goto err_after_init;
    }
    log_info("listening on %s", cl->url);
    *out = listener;
    return 0;

err_after_init:
    listener_close(listener);
    return rc;
}

/* Bind every listener of @conf not already open; on failure close the ones
 * this call opened. New listeners are prepended to local->listeners. */
int local_open_listeners(struct local *local, const struct conf *conf)
{
    struct listener *opened = NULL;
    int rc = 0;

    for (size_t i = 0; i < conf->local.listen_count; i++) {
        const struct conf_listen *cl = &conf->local.listen[i];
        struct listener *l, *found = NULL;

        for (l = local->listeners; l; l = l->next)
            if (strcmp(l->url, cl->url) == 0)
                found = l;
        if (found) {
            /* A reload may change local.socket_mode/socket_group. */
            if (found->path) {
                rc = unix_path_permissions(&conf->local, found->url, found->path);
                if (rc < 0)
                    goto err_close_opened;
            }
            found->keep = true;
            continue;
        }
        rc = listener_open(local, &conf->local, cl, -1, &l);
        if (rc < 0)
            goto err_close_opened;
        l->keep = true;
        l->next = opened;
        opened = l;
    }
    while (opened) {
        struct listener *next = opened->next;
        opened->next = local->listeners;
        local->listeners = opened;
        opened = next;
    }
    return 0;

err_close_opened:
    while (opened) {
        struct listener *next = opened->next;
        listener_close(opened);
        opened = next;
    }
    for (struct listener *l = local->listeners; l; l = l->next)
        l->keep = false;
    return rc;
}

/*
 * Sockets systemd passed that no local.listen entry asked for are served
 * anyway, with a warning: refusing them would leave clients that the .socket
 * unit let connect hanging in the kernel's backlog. They keep serving across
 * reloads (a reload cannot get them back once closed).
 */
int local_adopt_unmatched(struct local *local)
{
    const struct activation_socket *s;

    while ((s = activation_next_unmatched(&local->activation))) {
        struct conf_listen cl = {.kind = s->kind};
        struct listener *l;
        char url[sizeof(s->address) + 16];
        int rc;

        snprintf(url, sizeof(url), "systemd:%s", s->address);
        cl.url = url;
        log_warn("socket passed by systemd as fd %d%s%s (%s) matches no local.listen entry; "
                 "serving it anyway (add \"%s\" to local.listen to make it explicit)",
                 s->fd, s->name[0] ? ", named " : "", s->name, s->address, s->address);
        rc = listener_open(local, &local->conf->local, &cl, s->fd, &l);
        if (rc < 0)
            return rc;
        l->extra = true;
        l->next = local->listeners;
        local->listeners = l;
    }
    return 0;
}

/*
 * RLIMIT_NOFILE: raise the soft limit to the hard one (systemd's default
 * soft limit of 1024 exists for select(); libuv uses epoll), then say when
 * the local budgets do not fit. pending_admit() keeps LOCAL_FD_HEADROOM
 * descriptors free whatever the budgets say.
 */
void local_fd_limit_update(struct local *local, const struct conf *conf)
{
    const struct conf_local *cl = &conf->local;
    unsigned long long need;
    struct rlimit rl;

    local->fd_limit = 0;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    if (rl.rlim_cur < rl.rlim_max && rl.rlim_max != RLIM_INFINITY) {
        struct rlimit raised = {.rlim_cur = rl.rlim_max, .rlim_max = rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) {
            log_info("raised the file descriptor limit (RLIMIT_NOFILE) from %llu to %llu",
                     (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max);
            rl.rlim_cur = rl.rlim_max;
        }
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > UINT_MAX)
        return;
    local->fd_limit = (unsigned)rl.rlim_cur;
    need = (unsigned long long)cl->max_clients +
           (unsigned long long)cl->listen_count * local_max_pending(local) + LOCAL_FD_HEADROOM;
    if (need > local->fd_limit)
        log_warn("the file descriptor limit (RLIMIT_NOFILE %u, hard limit %llu) is below what "
                 "local.max_clients (%u) + local.max_pending_connects (%u) x %zu listener(s) + "
                 "%u for the rest of uplinkd need (%llu): when they run out, new local "
                 "connections are refused; raise LimitNOFILE= or lower local.max_clients",
                 local->fd_limit, (unsigned long long)rl.rlim_max, cl->max_clients,
                 local_max_pending(local), cl->listen_count, LOCAL_FD_HEADROOM, need);
}
