/* daemon.h - the running daemon: struct daemon and the calls between its files.
 *
 * The files, from the top down; each calls only the ones below it:
 *
 *   main.c           the command line, --check-config (also as the service
 *                    user), signals and the watchdog, main(): load, start,
 *                    open the control socket, READY=1, run, tear down.
 *   daemon_reload.c  SIGHUP: build a new conf, then swap it in part by part;
 *                    a file that does not validate keeps the old one running.
 *   daemon_ctl.c     the control socket and its commands (the protocol is
 *                    include/uplinkd/ctl.h). Reload moves the socket when
 *                    control.socket changes, so this file is below reload.
 *   daemon.c         what the others share: start-up of the local server and
 *                    the uplinks, one uplink's creation, the sd_notify status
 *                    line, the socket directories, the ACL warnings, the
 *                    graceful stop and the final teardown.
 *
 * daemon_start() does not open the control socket: its caller does, with
 * daemon_ctl_open(), so daemon.c never calls up into daemon_ctl.c. One
 * struct daemon per process (main.c's); a unit test makes its own.
 */
#ifndef UPLINKD_DAEMON_H
#define UPLINKD_DAEMON_H

#include <stddef.h>
#include <uv.h>

#include "router.h"

struct conf;
struct conf_uplink;
struct ctl;
struct local;
struct uplink;

enum daemon_state {
    DAEMON_STARTING,
    DAEMON_RUNNING,
    DAEMON_STOPPING,
};

struct daemon {
    uv_loop_t *loop;
    const char *config_path;
    int verbosity; /* number of -v */
    enum daemon_state state;
    struct conf *conf;
    struct local *local;
    struct router router;
    struct uplink **uplinks; /* parallel to conf->uplinks */
    size_t uplink_count;
    struct ctl *ctl;
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t watchdog_timer;
    uv_timer_t shutdown_timer;
    unsigned pending_stops;    /* shutdown: uplinks and local still closing */
    unsigned retiring_uplinks; /* removed by a reload and still stopping */
    int exit_code;
    /* The last SIGHUP: "none" yet, "done" or "refused" (then why, in a few
     * words; the log has the details), for STATUS= and uplinkctl status. */
    const char *reload_result;
    char reload_error[256];
};

/* daemon.c */

/**
 * daemon_effective_level() - the log level @conf_level raised by the -v
 * count, at most LOG_DEBUG.
 */
int daemon_effective_level(const struct daemon *d, int conf_level);

/**
 * daemon_notify_status() - send STATUS= to systemd: uplinks online, local
 * clients, each uplink's state, and a refused reload until one succeeds.
 */
void daemon_notify_status(struct daemon *d);

/**
 * daemon_warn_acl_sidestep() - log a warning for each listener whose
 * local.acl a local process could get around (access_acl_sidestep()).
 * Said at --check-config, start and reload. Returns how many were logged.
 */
size_t daemon_warn_acl_sidestep(const struct conf *conf);

/**
 * daemon_prepare_socket_dirs() - mkdir -p the directories of the Unix
 * listeners and of the control socket; a failure is a warning (the bind
 * that follows says what it means).
 */
void daemon_prepare_socket_dirs(const struct conf *conf);

/**
 * daemon_uplink_create() - create the uplink of @uc (a section of @conf,
 * both borrowed; they must outlive the uplink), open its spool under
 * d->conf->state_dir, give it its profile instance (router_attach_uplink())
 * and start it. Returns 0 with *@out set (a failed start retries by
 * itself), or a negative errno with *@out NULL: out of memory, a refused
 * option, a spool that cannot be opened or a profile that cannot be set up
 * (logged).
 */
int daemon_uplink_create(struct daemon *d, const struct conf *conf, const struct conf_uplink *uc,
                         struct uplink **out);

/**
 * daemon_start() - with d->loop and d->conf set: create and start the local
 * server, the router and every uplink. Not the control socket
 * (daemon_ctl_open()). Returns 0 or a negative errno (logged); the parts
 * made so far stay for daemon_deinit().
 */
int daemon_start(struct daemon *d);

/**
 * daemon_stop() - stop gracefully: STOPPING=1, stop accepting, close the
 * control socket and the profiles, give the uplinks shutdown_timeout to
 * drain; the loop ends when the last handle is closed (or the backstop
 * timer stops it, with exit code 1). A second call does nothing.
 */
void daemon_stop(struct daemon *d, const char *why);

/**
 * daemon_deinit() - free the uplinks, the local server, the router and the
 * conf, once the loop has run out. The loop itself stays its owner's.
 */
void daemon_deinit(struct daemon *d);

/* daemon_ctl.c */

/**
 * daemon_ctl_open() - listen on d->conf->control_socket and answer its
 * commands (status, children, reconnect, rotate, reload-credentials, jwt)
 * from @d. Returns 0 or a negative errno (logged by ctl_new()).
 */
int daemon_ctl_open(struct daemon *d);

/* daemon_reload.c */

/**
 * daemon_reload() - load d->config_path again and swap it in: kept uplinks
 * take their new section, new ones are created, removed ones stop (their
 * old conf lives until they have). A file that does not validate, or a
 * credential check that fails, refuses the reload and keeps the old conf
 * (reload_result "refused"). A control socket or local listener that
 * cannot be opened at its new place stays at the old one (logged). Only an
 * uplink that cannot be created stops the daemon with exit code 1 (systemd
 * restarts it). Ends with READY=1.
 */
void daemon_reload(struct daemon *d);

#endif
