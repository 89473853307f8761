/* daemon.c - what main.c, the control commands and reload share: start-up
 * of the local server and the uplinks, the sd_notify status line, the
 * socket directories, the ACL warnings, the graceful stop, the teardown.
 * daemon.h says which file does what.
 */
#include "daemon.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <systemd/sd-daemon.h>

#include "access.h"
#include "conf.h"
#include "ctl.h"
#include "local.h"
#include "log.h"
#include "util.h"

int daemon_effective_level(const struct daemon *d, int conf_level)
{
    int level = conf_level + d->verbosity;
    return level > LOG_DEBUG ? LOG_DEBUG : level;
}

/* ---- status ---------------------------------------------------------------- */

void daemon_notify_status(struct daemon *d)
{
    char status[512];
    size_t used = 0;
    size_t online = 0;

    for (size_t i = 0; i < d->uplink_count; i++) {
        if (d->uplinks[i] != NULL && uplink_get_state(d->uplinks[i]) == UPLINK_ONLINE)
            online++;
    }
    used += (size_t)snprintf(status, sizeof(status), "%zu/%zu uplinks online, %zu local clients",
                             online, d->uplink_count, d->local ? local_client_count(d->local) : 0);
    for (size_t i = 0; i < d->uplink_count && used < sizeof(status); i++)
        if (d->uplinks[i] != NULL)
            used += (size_t)snprintf(status + used, sizeof(status) - used, "; %s: %s",
                                     uplink_name(d->uplinks[i]),
                                     uplink_state_name(uplink_get_state(d->uplinks[i])));
    /* Until a reload succeeds, say that the running configuration is the
     * previous one: "systemctl status" shows this line. */
    if (d->reload_error[0] && used < sizeof(status))
        snprintf(status + used, sizeof(status) - used, "; last reload refused: %s",
                 d->reload_error);
    sd_notifyf(0, "STATUS=%s", status);
}

/* Configurations that are valid but whose local.acl a local process could
 * get around (access_acl_sidestep()): said at --check-config, start and
 * reload. Returns how many warnings were logged. */
size_t daemon_warn_acl_sidestep(const struct conf *conf)
{
    size_t warnings = 0;
    char why[768];

    for (size_t i = 0; i < conf->local.listen_count; i++) {
        if (access_acl_sidestep(&conf->local, &conf->local.listen[i], why, sizeof(why))) {
            log_warn("%s", why);
            warnings++;
        }
    }
    return warnings;
}

/* ---- uplinks ---------------------------------------------------------------- */

/* An uplink owns its profile instance and asks it itself; its hooks are
 * the router's (arg: &d->router): cloud messages and state changes. A state
 * change also concerns the daemon: its sd_notify status line. */
static void uplink_state_cb(void *arg, struct uplink *uplink, enum uplink_state state)
{
    struct daemon *d = container_of(arg, struct daemon, router);

    router_uplink_state_cb(&d->router, uplink, state);
    daemon_notify_status(d);
}

/* An uplink that could not be set up completely: its spool and profile
 * instance may hold libuv handles already, so it is stopped (legal in every
 * state) and freed once they are closed. */
static void discarded_uplink_done_cb(struct uplink *uplink, void *arg)
{
    (void)arg;
    uplink_free(uplink);
}

int daemon_uplink_create(struct daemon *d, const struct conf *conf, const struct conf_uplink *uc,
                         struct uplink **out)
{
    const struct uplink_hooks hooks = {
        .message_cb = router_uplink_message_cb,
        .state_cb = uplink_state_cb,
        .arg = &d->router,
    };
    int rc = uplink_new(d->loop, uc, conf->gateway_id, &hooks, out);
    if (rc < 0) {
        log_uplink(LOG_ERR, uc->name, "cannot create the uplink: %s", strerror(-rc));
        return rc;
    }
    /* Spool recovery runs here, before READY=1 (DESIGN.md). Without its
     * spool the uplink cannot keep the durability promise: fatal. */
    rc = uplink_open_spool(*out, d->conf->state_dir);
    if (rc == 0)
        rc = router_attach_uplink(&d->router, conf, *out); /* its profile, before it connects */
    if (rc < 0) {
        uplink_stop(*out, 0, discarded_uplink_done_cb, NULL);
        *out = NULL;
        return rc;
    }
    rc = uplink_start(*out);
    if (rc < 0)
        log_uplink(LOG_ERR, uc->name, "cannot start the uplink: %s", strerror(-rc));
    return 0; /* a failed start retries by itself; the object exists */
}

/* ---- files ------------------------------------------------------------------ */

/* mkdir -p for the directory that will hold @path (a socket). */
static int make_parent_dirs(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir)
        return 0;
    *slash = '\0';
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

void daemon_prepare_socket_dirs(const struct conf *conf)
{
    for (size_t i = 0; i < conf->local.listen_count; i++) {
        const struct conf_listen *l = &conf->local.listen[i];
        if (l->kind == CONF_LISTEN_UNIX && make_parent_dirs(l->path) < 0)
            log_warn("cannot create the directory of %s: %s", l->path, strerror(errno));
    }
    if (make_parent_dirs(conf->control_socket) < 0)
        log_warn("cannot create the directory of %s: %s", conf->control_socket, strerror(errno));
}

/* ---- shutdown ---------------------------------------------------------------- */

static void close_if_open(uv_handle_t *handle)
{
    if (handle->loop != NULL && !uv_is_closing(handle))
        uv_close(handle, NULL);
}

static void shutdown_finish(struct daemon *d)
{
    if (d->pending_stops > 0)
        return;
    close_if_open((uv_handle_t *)&d->sigterm);
    close_if_open((uv_handle_t *)&d->sigint);
    close_if_open((uv_handle_t *)&d->sighup);
    close_if_open((uv_handle_t *)&d->watchdog_timer);
    close_if_open((uv_handle_t *)&d->shutdown_timer);
}

static void shutdown_uplink_done_cb(struct uplink *uplink, void *arg)
{
    struct daemon *d = arg;
    d->pending_stops--;
    shutdown_finish(d);
}

static void shutdown_local_done_cb(void *arg)
{
    struct daemon *d = arg;
    d->pending_stops--;
    shutdown_finish(d);
}

static void shutdown_timeout_cb(uv_timer_t *timer)
{
    struct daemon *d = container_of(timer, struct daemon, shutdown_timer);
    log_err("shutdown did not finish in time (%u pending); exiting anyway", d->pending_stops);
    d->exit_code = 1;
    uv_stop(d->loop);
}

void daemon_stop(struct daemon *d, const char *why)
{
    if (d->state == DAEMON_STOPPING)
        return;
    d->state = DAEMON_STOPPING;
    log_notice("stopping (%s)", why);
    sd_notify(0, "STOPPING=1\nSTATUS=stopping");

    local_stop_accepting(d->local);
    ctl_close(d->ctl);
    d->ctl = NULL;
    /* The uplinks get shutdown_timeout to drain their in-flight publishes;
     * the backstop timer only fires if a close callback never comes. */
    uv_timer_init(d->loop, &d->shutdown_timer);
    uv_timer_start(&d->shutdown_timer, shutdown_timeout_cb, d->conf->shutdown_timeout_ms + 3000, 0);
    uv_unref((uv_handle_t *)&d->shutdown_timer);

    d->pending_stops = 1;
    for (size_t i = 0; i < d->uplink_count; i++)
        d->pending_stops += d->uplinks[i] != NULL;
    local_close(d->local, shutdown_local_done_cb, d);
    for (size_t i = 0; i < d->uplink_count; i++) {
        if (d->uplinks[i] != NULL)
            uplink_stop(d->uplinks[i], d->conf->shutdown_timeout_ms, shutdown_uplink_done_cb, d);
    }
}

/* ---- start-up and teardown ------------------------------------------------------- */

int daemon_start(struct daemon *d)
{
    const struct local_hooks local_hooks = {
        .publish_cb = router_local_publish_cb,
        .publish_async_cb = router_local_publish_async_cb,
        .subscribe_cb = router_local_subscribe_cb,
        .unsubscribe_cb = router_local_unsubscribe_cb,
        .arg = &d->router,
    };
    int rc;

    daemon_prepare_socket_dirs(d->conf);
    rc = local_new(d->loop, d->conf, &local_hooks, &d->local);
    if (rc < 0) {
        log_err("cannot create the local server: %s", strerror(-rc));
        return rc;
    }
    router_init(&d->router, d->conf, d->local);
    rc = local_start(d->local);
    if (rc < 0)
        return rc; /* local_start logged which listener and why */

    d->uplinks = calloc(d->conf->uplink_count ? d->conf->uplink_count : 1, sizeof(*d->uplinks));
    if (d->uplinks == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < d->conf->uplink_count; i++) {
        rc = daemon_uplink_create(d, d->conf, &d->conf->uplinks[i], &d->uplinks[d->uplink_count]);
        if (rc < 0)
            return rc;
        d->uplink_count++;
    }
    router_set_uplinks(&d->router, d->conf, d->uplinks, d->uplink_count, d->uplinks,
                       d->uplink_count);
    return 0;
}

void daemon_deinit(struct daemon *d)
{
    for (size_t i = 0; i < d->uplink_count; i++)
        uplink_free(d->uplinks[i]);
    free(d->uplinks);
    d->uplinks = NULL;
    d->uplink_count = 0;
    local_free(d->local);
    d->local = NULL;
    router_deinit(&d->router);
    conf_free(d->conf);
    d->conf = NULL;
}
