/* main.c - command line, start-up order, signals, reload, sd_notify.
 *
 * Start-up: parse and validate the config (fatal on error) -> bind the local
 * listeners -> create the uplinks (they connect in the background) -> open
 * the control socket -> READY=1. SIGHUP reloads (a bad file keeps the old
 * config running), SIGTERM/SIGINT stop gracefully within shutdown_timeout.
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <openssl/crypto.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <systemd/sd-daemon.h>
#include <uv.h>
#include <yaml.h>

#include "access.h"
#include "config.h"
#include "conf.h"
#include "ctl.h"
#include "json.h"
#include "local.h"
#include "log.h"
#include "router.h"
#include "tlscheck.h"
#include "uplink.h"
#include "util.h"

enum daemon_state {
    DAEMON_STARTING,
    DAEMON_RUNNING,
    DAEMON_STOPPING,
};

/* A conf replaced by a reload stays alive until the uplinks that were removed
 * by that reload (and still point into it) have finished stopping. */
struct retired_conf {
    struct conf *conf;
    unsigned pending_stops;
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
    unsigned pending_stops; /* shutdown: uplinks and local still closing */
    int exit_code;
    /* The last SIGHUP: "none" yet, "done" or "refused" (then why, in a few
     * words; the log has the details), for STATUS= and uplinkctl status. */
    const char *reload_result;
    char reload_error[256];
};

static struct daemon daemon_instance;

static int effective_level(const struct daemon *d, int conf_level)
{
    int level = conf_level + d->verbosity;
    return level > LOG_DEBUG ? LOG_DEBUG : level;
}

/* ---- status ---------------------------------------------------------------- */

static void notify_status(struct daemon *d)
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

static void ctl_error(struct json_buf *out, const char *words)
{
    json_append_raw(out, "{\"error\":");
    json_append_string(out, words);
    json_append_raw(out, "}");
}

static struct uplink *daemon_find_uplink(struct daemon *d, const char *name)
{
    for (size_t i = 0; i < d->uplink_count; i++) {
        if (d->uplinks[i] != NULL && strcmp(uplink_name(d->uplinks[i]), name) == 0)
            return d->uplinks[i];
    }
    return NULL;
}

/* "reconnect NAME" and "rotate NAME": both drop the session and connect
 * again at once; for a JWT uplink every connect signs a fresh token, so a
 * rotation is a reconnect that says why. */
static void ctl_reconnect(struct daemon *d, const char *verb, const char *name,
                          struct json_buf *out)
{
    char words[256];
    struct uplink *uplink = name[0] ? daemon_find_uplink(d, name) : NULL;

    if (uplink == NULL) {
        snprintf(words, sizeof(words), "no uplink named \"%s\" (see uplinkctl status)", name);
        ctl_error(out, words);
        return;
    }
    bool rotate = strcmp(verb, "rotate") == 0;
    if (rotate && conf_uplink_find(d->conf, name)->auth.type != CONF_AUTH_JWT) {
        snprintf(words, sizeof(words),
                 "uplink \"%s\" does not use JWT auth; there is no token to rotate", name);
        ctl_error(out, words);
        return;
    }
    uplink_reconnect(uplink, rotate ? "token rotation requested with uplinkctl rotate"
                                    : "reconnect requested with uplinkctl reconnect");
    json_append_raw(out, "{\"ok\":true,\"uplink\":");
    json_append_string(out, name);
    json_append_raw(out, ",\"action\":");
    json_append_string(out, verb);
    json_append_raw(out, "}");
}

/* "reload-credentials [NAME]": uplink_reload_credentials() for one uplink
 * or all, answered per uplink as changed, unchanged or refused with the
 * reason. */
static void ctl_reload_credentials(struct daemon *d, const char *name, struct json_buf *out)
{
    char words[256], report[1024];
    bool first = true;

    if (name[0] && daemon_find_uplink(d, name) == NULL) {
        snprintf(words, sizeof(words), "no uplink named \"%s\" (see uplinkctl status)", name);
        ctl_error(out, words);
        return;
    }
    json_append_raw(out, "{\"uplinks\":[");
    for (size_t i = 0; i < d->uplink_count; i++) {
        struct uplink *uplink = d->uplinks[i];
        if (uplink == NULL || (name[0] && strcmp(uplink_name(uplink), name) != 0))
            continue;
        int rc = uplink_reload_credentials(uplink, report, sizeof(report));
        json_append_raw(out, first ? "{\"name\":" : ",{\"name\":");
        first = false;
        json_append_string(out, uplink_name(uplink));
        json_append_raw(out, ",\"result\":");
        json_append_string(out, rc == UPLINK_CREDS_CHANGED     ? "changed"
                                : rc == UPLINK_CREDS_UNCHANGED ? "unchanged"
                                                               : "refused");
        json_append_raw(out, ",\"message\":");
        json_append_string(out, report);
        json_append_raw(out, "}");
    }
    json_append_raw(out, "]}");
}

/* "jwt NAME": the token the uplink would send now (uplink_sign_jwt). The
 * daemon signs, so a key in a token or readable only by uplinkd works. */
static void ctl_jwt(struct daemon *d, const char *name, struct json_buf *out)
{
    char words[512], err[KEYS_ERR_SIZE];
    struct uplink *uplink = name[0] ? daemon_find_uplink(d, name) : NULL;
    char *token = NULL;
    time_t expires_at = 0;

    if (uplink == NULL) {
        size_t used =
            (size_t)snprintf(words, sizeof(words), "no uplink named \"%s\" (known:", name);
        for (size_t i = 0; i < d->uplink_count && used < sizeof(words); i++)
            if (d->uplinks[i] != NULL)
                used += (size_t)snprintf(words + used, sizeof(words) - used, " %s",
                                         uplink_name(d->uplinks[i]));
        if (used < sizeof(words))
            snprintf(words + used, sizeof(words) - used, ")");
        ctl_error(out, words);
        return;
    }
    if (uplink_sign_jwt(uplink, &token, &expires_at, err, sizeof(err)) < 0) {
        ctl_error(out, err);
        return;
    }
    json_append_raw(out, "{\"uplink\":");
    json_append_string(out, name);
    json_append_raw(out, ",\"token\":");
    json_append_string(out, token);
    json_append_fmt(out, ",\"exp\":%lld}", (long long)expires_at);
    explicit_bzero(token, strlen(token));
    free(token);
}

#define CTL_KNOWN                                                                                  \
    "known: status, children, reconnect UPLINK, rotate UPLINK, reload-credentials [UPLINK], "      \
    "jwt UPLINK"

static void daemon_ctl_command_cb(void *arg, const char *command, struct json_buf *out)
{
    struct daemon *d = arg;
    char verb[32] = "", name[128] = "";

    /* A command line is "VERB [ARGUMENT]"; the argument is an uplink name. */
    if (sscanf(command, "%31s %127s", verb, name) < 1) {
        ctl_error(out, "empty command (" CTL_KNOWN ")");
        return;
    }
    if (strcmp(verb, "reconnect") == 0 || strcmp(verb, "rotate") == 0) {
        ctl_reconnect(d, verb, name, out);
        return;
    }
    if (strcmp(verb, "reload-credentials") == 0) {
        ctl_reload_credentials(d, name, out);
        return;
    }
    if (strcmp(verb, "jwt") == 0) {
        ctl_jwt(d, name, out);
        return;
    }
    if (strcmp(verb, "children") == 0) {
        json_append_raw(out, "{\"children\":");
        router_children_json(&d->router, out);
        json_append_raw(out, "}");
        return;
    }
    if (strcmp(verb, "status") != 0) {
        ctl_error(out, "unknown command (" CTL_KNOWN ")");
        return;
    }
    static const char *const state_names[] = {"starting", "running", "stopping"};
    json_append_raw(out, "{\"version\":");
    json_append_string(out, UPLINKD_VERSION);
    json_append_fmt(out, ",\"pid\":%ld,\"state\":\"%s\",\"config\":", (long)getpid(),
                    state_names[d->state]);
    json_append_string(out, d->conf->path);
    json_append_raw(out, ",\"last_reload\":{\"result\":");
    json_append_string(out, d->reload_result ? d->reload_result : "none");
    json_append_raw(out, ",\"error\":");
    json_append_string(out, d->reload_error);
    struct local_stats ls;
    local_get_stats(d->local, &ls);
    /* Connections that had not completed CONNECT: pending now, and closed
     * by the pre-authentication policy since start (local_listen.c). */
    json_append_fmt(out,
                    "},\"local_clients\":%zu,\"local_pending\":{\"now\":%zu,\"evicted\":%llu,"
                    "\"refused\":%llu,\"deadline\":%llu,\"max_clients\":%llu,\"other\":%llu},"
                    "\"uplinks\":[",
                    ls.connected, ls.pending, (unsigned long long)ls.evicted,
                    (unsigned long long)ls.refused, (unsigned long long)ls.deadline,
                    (unsigned long long)ls.max_clients, (unsigned long long)ls.other);
    bool first = true;
    for (size_t i = 0; i < d->uplink_count; i++) {
        const struct conf_uplink *uc = &d->conf->uplinks[i];
        struct uplink_stats stats;
        if (d->uplinks[i] == NULL)
            continue;
        uplink_get_stats(d->uplinks[i], &stats);
        json_append_raw(out, first ? "{\"name\":" : ",{\"name\":");
        first = false;
        json_append_string(out, uc->name);
        json_append_raw(out, ",\"host\":");
        json_append_string(out, uc->host);
        json_append_fmt(out, ",\"port\":%u,\"state\":", (unsigned)uc->port);
        json_append_string(out, uplink_state_name(uplink_get_state(d->uplinks[i])));
        json_append_raw(out, ",\"last_error\":");
        json_append_string(out, uplink_last_error(d->uplinks[i]));
        json_append_fmt(out,
                        ",\"queued\":%zu,\"published\":%llu,\"publishes\":%llu,"
                        "\"received\":%llu,\"dropped\":%llu,\"connects\":%llu",
                        stats.queued, (unsigned long long)stats.published,
                        (unsigned long long)stats.publishes, (unsigned long long)stats.received,
                        (unsigned long long)stats.dropped, (unsigned long long)stats.connects);
        /* The spool (docs/design/spool.md): depth, bytes, oldest age, rates,
         * drops by reason, last fsync latency. */
        uint64_t now_ms = (uint64_t)time(NULL) * 1000;
        json_append_fmt(
            out,
            ",\"spool\":{\"durability\":\"%s\",\"depth\":%llu,\"bytes\":%llu,"
            "\"max_bytes\":%llu,\"oldest_age_s\":%.1f,\"inflight\":%zu,"
            "\"rate_in\":%.1f,\"rate_out\":%.1f,\"blocked\":%llu,"
            "\"io_error\":",
            stats.spool.durable ? "fsync" : "none", (unsigned long long)stats.spool.depth,
            (unsigned long long)stats.spool.bytes, (unsigned long long)uc->spool.max_bytes,
            stats.spool.oldest_ms && stats.spool.oldest_ms < now_ms
                ? (double)(now_ms - stats.spool.oldest_ms) / 1000.0
                : 0.0,
            stats.inflight, stats.rate_in, stats.rate_out, (unsigned long long)stats.spool.blocked);
        json_append_string(out, stats.spool.io_error ? strerror(-stats.spool.io_error) : "");
        json_append_fmt(out,
                        ",\"last_fsync_us\":%llu,\"commits\":%llu,\"dropped\":{"
                        "\"overflow\":%llu,\"max_age\":%llu,\"corrupt\":%llu,"
                        "\"qos0_offline\":%llu,\"refused\":%llu}}",
                        (unsigned long long)stats.spool.last_fsync_us,
                        (unsigned long long)stats.spool.commits,
                        (unsigned long long)stats.spool.dropped_overflow,
                        (unsigned long long)stats.spool.dropped_age,
                        (unsigned long long)stats.spool.dropped_corrupt,
                        (unsigned long long)stats.dropped_qos0, (unsigned long long)stats.dropped);
        if (uc->auth.type == CONF_AUTH_JWT) {
            /* Times are Unix seconds (0 = none yet); clock is the last check. */
            json_append_fmt(out,
                            ",\"auth\":\"jwt\",\"token_expires_at\":%lld,"
                            "\"token_refresh_at\":%lld,\"token_rotations\":%llu,\"clock\":",
                            (long long)stats.token_expires_at, (long long)stats.token_refresh_at,
                            (unsigned long long)stats.rotations);
            json_append_string(out, stats.clock ? stats.clock : "unknown");
        }
        router_uplink_status_json(&d->router, d->uplinks[i], out); /* akenza "sessions" */
        json_append_raw(out, "}");
    }
    json_append_fmt(out, "],\"router\":{\"forwarded\":%llu,\"rejected\":%llu,\"unrouted\":%llu}}",
                    (unsigned long long)d->router.forwarded, (unsigned long long)d->router.rejected,
                    (unsigned long long)d->router.unrouted);
}

/* ---- uplinks ---------------------------------------------------------------- */

/* The uplinks' hooks go straight to the router (arg: &d->router), which
 * hands the profile's questions to the profile instance. Only a state
 * change also concerns the daemon: its sd_notify status line. */
static void uplink_state_cb(void *arg, struct uplink *uplink, enum uplink_state state)
{
    struct daemon *d = container_of(arg, struct daemon, router);

    router_uplink_state_cb(&d->router, uplink, state);
    notify_status(d);
}

static int uplink_create(struct daemon *d, const char *gateway_id, const struct conf_uplink *uc,
                         struct uplink **out)
{
    const struct uplink_hooks hooks = {
        .session_cb = router_uplink_session_cb,
        .online_cb = router_uplink_online_cb,
        .connack_text_cb = router_uplink_connack_text_cb,
        .batch_cb = router_uplink_batch_cb,
        .message_cb = router_uplink_message_cb,
        .state_cb = uplink_state_cb,
        .arg = &d->router,
    };
    int rc = uplink_new(d->loop, uc, gateway_id, &hooks, out);
    if (rc < 0) {
        log_uplink(LOG_ERR, uc->name, "cannot create the uplink: %s", strerror(-rc));
        return rc;
    }
    /* Spool recovery runs here, before READY=1 (DESIGN.md). Without its
     * spool the uplink cannot keep the durability promise: fatal. */
    rc = uplink_open_spool(*out, d->conf->state_dir);
    if (rc < 0) {
        uplink_free(*out);
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

static void prepare_socket_dirs(const struct conf *conf)
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

static void daemon_stop(struct daemon *d, const char *why)
{
    if (d->state == DAEMON_STOPPING)
        return;
    d->state = DAEMON_STOPPING;
    log_notice("stopping (%s)", why);
    sd_notify(0, "STOPPING=1\nSTATUS=stopping");

    local_stop_accepting(d->local);
    ctl_close(d->ctl);
    d->ctl = NULL;
    router_close_profiles(&d->router); /* their timers (Cumulocity bootstrap) */
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

/* ---- reload ------------------------------------------------------------------ */

static void retired_uplink_done_cb(struct uplink *uplink, void *arg)
{
    struct retired_conf *retired = arg;

    uplink_free(uplink);
    if (--retired->pending_stops == 0) {
        conf_free(retired->conf);
        free(retired);
    }
}

/* A refused reload: the old configuration stays in force, untouched. */
static void reload_refused(struct daemon *d, const char *why)
{
    d->reload_result = "refused";
    snprintf(d->reload_error, sizeof(d->reload_error), "%s", why);
    sd_notify(0, "READY=1");
    notify_status(d);
}

/* Configurations that are valid but whose local.acl a local process could
 * get around (access_acl_sidestep()): said at --check-config, start and
 * reload. Returns how many warnings were logged. */
static size_t warn_acl_sidestep(const struct conf *conf)
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

static void daemon_reload(struct daemon *d)
{
    struct conf *next = NULL;
    char *errors = NULL;
    char why[sizeof(d->reload_error)], failed[160];

    log_notice("reloading %s", d->config_path);
    sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading %s",
               (unsigned long long)util_now_ms() * 1000ULL, d->config_path);
    int rc = conf_load(d->config_path, &next, &errors);
    if (rc < 0) {
        log_err("reload failed; still running with the previous configuration. The errors:\n%s",
                errors ? errors : strerror(-rc));
        free(errors);
        snprintf(why, sizeof(why), "%s does not validate (see the log)", d->config_path);
        reload_refused(d, why);
        return;
    }
    /* The credential checks of start-up and --check-config, for the
     * sections this reload changes or adds, before anything is applied: a
     * broken new certificate refuses the whole reload rather than taking
     * the session down into endless reconnects. (auth.key was checked by
     * conf_load(); unchanged sections get uplink_reload_credentials()
     * below, which keeps a session whose renewed files fail.) */
    rc = tlscheck_conf(next, d->conf, time(NULL), failed, sizeof(failed));
    if (rc < 0) {
        conf_free(next);
        log_err("reload failed; still running with the previous configuration: the credential "
                "check failed for uplink(s) %s (the lines above name each file and the fix)",
                failed);
        snprintf(why, sizeof(why), "credential check failed for uplink(s) %s (see the log)",
                 failed);
        reload_refused(d, why);
        return;
    }

    struct uplink **uplinks = calloc(next->uplink_count ? next->uplink_count : 1, sizeof(*uplinks));
    struct uplink **fresh = calloc(next->uplink_count ? next->uplink_count : 1, sizeof(*fresh));
    struct retired_conf *retired = calloc(1, sizeof(*retired));
    size_t fresh_count = 0;
    if (uplinks == NULL || fresh == NULL || retired == NULL) {
        log_err("reload failed: out of memory; still running with the previous configuration");
        free(uplinks);
        free(fresh);
        free(retired);
        conf_free(next);
        reload_refused(d, "out of memory");
        return;
    }

    /* Local listeners first: if a new listener cannot be bound, the old ones
     * stay and the rest of the reload still applies. */
    if (local_reconfigure(d->local, next) < 0)
        log_err("reload: the local listeners could not all be changed; see the lines above");

    for (size_t i = 0; i < next->uplink_count; i++) {
        const struct conf_uplink *uc = &next->uplinks[i];
        for (size_t j = 0; j < d->uplink_count; j++) {
            if (d->uplinks[j] != NULL && strcmp(uplink_name(d->uplinks[j]), uc->name) == 0) {
                uplinks[i] = d->uplinks[j];
                d->uplinks[j] = NULL;
                break;
            }
        }
        if (uplinks[i] != NULL) {
            const struct conf_uplink *old = conf_uplink_find(d->conf, uc->name);
            bool same = conf_uplink_equal(old, uc);
            if (uplink_reconfigure(uplinks[i], uc) < 0)
                log_uplink(LOG_ERR, uc->name, "could not apply the new settings");
            /* The same settings may name files whose contents were renewed
             * (a certificate, a key): reconnect only if they changed and
             * pass the start-up checks. A changed section reconnects anyway. */
            if (same) {
                char report[1024];
                uplink_reload_credentials(uplinks[i], report, sizeof(report));
            }
            continue;
        }
        log_uplink(LOG_NOTICE, uc->name, "added by reload");
        if (uplink_create(d, next->gateway_id, uc, &uplinks[i]) < 0)
            continue;
        fresh[fresh_count++] = uplinks[i];
    }

    retired->conf = d->conf;
    for (size_t j = 0; j < d->uplink_count; j++) {
        if (d->uplinks[j] == NULL)
            continue;
        log_uplink(LOG_NOTICE, uplink_name(d->uplinks[j]), "removed by reload; stopping");
        retired->pending_stops++;
        uplink_stop(d->uplinks[j], d->conf->shutdown_timeout_ms, retired_uplink_done_cb, retired);
    }

    /* uplink_new() fails only when memory runs out or libmosquitto refuses
     * an option the validator accepted: the daemon cannot run the new
     * configuration, so it stops with a failure and systemd restarts it
     * (Restart=on-failure) rather than running half of it. */
    size_t missing = 0;
    for (size_t i = 0; i < next->uplink_count; i++)
        missing += uplinks[i] == NULL;

    free(d->uplinks);
    d->uplinks = uplinks;
    d->uplink_count = next->uplink_count;
    struct conf *old_conf = d->conf;
    d->conf = next;
    router_set_uplinks(&d->router, next, uplinks, d->uplink_count, fresh, fresh_count);
    free(fresh);
    log_set_level(effective_level(d, next->log_level));

    if (strcmp(old_conf->control_socket, next->control_socket) != 0) {
        ctl_close(d->ctl);
        d->ctl = NULL;
        prepare_socket_dirs(next);
        ctl_new(d->loop, next->control_socket, daemon_ctl_command_cb, d, &d->ctl);
    }
    if (retired->pending_stops == 0) {
        conf_free(old_conf);
        free(retired);
    }
    if (missing > 0) {
        log_err("reload: %zu uplink(s) could not be created; stopping", missing);
        d->exit_code = 1;
        daemon_stop(d, "reload could not create every uplink");
        return;
    }
    warn_acl_sidestep(next);
    log_notice("reload done: %zu uplink(s)", d->uplink_count);
    d->reload_result = "done";
    d->reload_error[0] = '\0';
    sd_notify(0, "READY=1");
    notify_status(d);
}

/* ---- signals and watchdog ------------------------------------------------------ */

static void signal_cb(uv_signal_t *handle, int signum)
{
    struct daemon *d = handle->data;

    if (signum == SIGHUP) {
        if (d->state == DAEMON_RUNNING)
            daemon_reload(d);
        return;
    }
    daemon_stop(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void watchdog_cb(uv_timer_t *timer)
{
    sd_notify(0, "WATCHDOG=1");
}

static void watchdog_start(struct daemon *d)
{
    uint64_t usec = 0;

    uv_timer_init(d->loop, &d->watchdog_timer);
    if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return;
    uint64_t interval_ms = usec / 2000;
    if (interval_ms == 0)
        interval_ms = 1;
    log_info("systemd watchdog: pinging every %llu ms", (unsigned long long)interval_ms);
    uv_timer_start(&d->watchdog_timer, watchdog_cb, interval_ms, interval_ms);
}

/* ---- start-up ------------------------------------------------------------------ */

static void print_version(void)
{
    int major, minor, revision;

    mosquitto_lib_version(&major, &minor, &revision);
    printf("uplinkd %s\n", UPLINKD_VERSION);
    printf("  libuv        %s\n", uv_version_string());
    printf("  libmosquitto %d.%d.%d\n", major, minor, revision);
    printf("  OpenSSL      %s\n", OpenSSL_version(OPENSSL_VERSION));
    printf("  libyaml      %s\n", yaml_get_version_string());
    printf("  libsystemd   %s (build)\n", UPLINKD_LIBSYSTEMD_VERSION);
}

static void usage(FILE *out)
{
    fprintf(out, "Usage: uplinkd [-c FILE] [-v...] [--check-config] [--version]\n"
                 "Forward local MQTT (loopback TCP, Unix socket) to cloud brokers over TLS.\n\n"
                 "  -c, --config FILE   configuration file (default " UPLINKD_DEFAULT_CONFIG ")\n"
                 "  -t, --check-config  validate the configuration, print the result, exit 0 or 1\n"
                 "  -v, --verbose       more log output (repeatable)\n"
                 "  -V, --version       print the version and library versions\n"
                 "  -h, --help          this text\n\n"
                 "Signals: SIGHUP reloads the configuration, SIGTERM stops gracefully.\n"
                 "See uplinkd(8) and uplinkd.yaml(5).\n");
}

static int daemon_start(struct daemon *d)
{
    const struct local_hooks local_hooks = {
        .publish_cb = router_local_publish_cb,
        .publish_async_cb = router_local_publish_async_cb,
        .subscribe_cb = router_local_subscribe_cb,
        .unsubscribe_cb = router_local_unsubscribe_cb,
        .arg = &d->router,
    };
    int rc;

    prepare_socket_dirs(d->conf);
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
        rc = uplink_create(d, d->conf->gateway_id, &d->conf->uplinks[i],
                           &d->uplinks[d->uplink_count]);
        if (rc < 0)
            return rc;
        d->uplink_count++;
    }
    router_set_uplinks(&d->router, d->conf, d->uplinks, d->uplink_count, d->uplinks,
                       d->uplink_count);

    rc = ctl_new(d->loop, d->conf->control_socket, daemon_ctl_command_cb, d, &d->ctl);
    if (rc < 0)
        return rc;
    return 0;
}

static void walk_close_cb(uv_handle_t *handle, void *arg)
{
    if (!uv_is_closing(handle))
        uv_close(handle, NULL);
}

/* conf_load() and the certificate checks; every error on stderr. */
static int load_and_check(const char *path, struct conf **out)
{
    char *errors = NULL;
    int rc = conf_load(path, out, &errors);

    if (rc < 0) {
        fprintf(stderr, "%s%s", errors ? errors : strerror(-rc),
                errors && errors[0] && errors[strlen(errors) - 1] == '\n' ? "" : "\n");
        fprintf(stderr, "uplinkd: configuration %s is not valid\n", path);
        free(errors);
        return -EINVAL;
    }
    /* Certificates are checked now, not at the first handshake: an expired
     * or mismatched one would otherwise only show as endless reconnects. */
    if (tlscheck_conf(*out, NULL, time(NULL), NULL, 0) < 0) {
        fprintf(stderr, "uplinkd: configuration %s: client certificate check failed (above)\n",
                path);
        conf_free(*out);
        *out = NULL;
        return -EINVAL;
    }
    return 0;
}

/*
 * --check-config run as root passes files that only root can read, while
 * the service runs as User=uplinkd (uplinkd.service). So as root, the check
 * runs once more in a child that has become the service user: the same
 * conf_load() and tlscheck, so every file is opened as the daemon would open
 * it (directories on the way included). $UPLINKD_SERVICE_USER names the user
 * (default "uplinkd"; empty: root only, as the tests do). A missing default
 * user is noted and skipped; a named one that is missing is an error.
 * Returns 0, or -EACCES when the service user cannot use the configuration.
 */
static int check_as_service_user(const char *path)
{
    const char *env = getenv("UPLINKD_SERVICE_USER");
    const char *name = env ? env : UPLINKD_SERVICE_USER;
    struct passwd *pw;
    int status;
    pid_t pid;

    if (geteuid() != 0 || name[0] == '\0' || strcmp(name, "root") == 0)
        return 0;
    pw = getpwnam(name);
    if (pw == NULL) {
        if (env == NULL) {
            printf("note: service user %s does not exist here; files were checked as root\n", name);
            return 0;
        }
        fprintf(stderr, "uplinkd: UPLINKD_SERVICE_USER=%s: no such user\n", name);
        return -EINVAL;
    }
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "uplinkd: cannot check as user %s: fork: %s\n", name, strerror(errno));
        return -errno;
    }
    if (pid == 0) {
        struct conf *conf = NULL;
        if (initgroups(pw->pw_name, pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 ||
            setuid(pw->pw_uid) < 0) {
            fprintf(stderr, "uplinkd: cannot become user %s: %s\n", name, strerror(errno));
            _exit(2);
        }
        int rc = load_and_check(path, &conf);
        conf_free(conf);
        fflush(NULL);
        _exit(rc < 0 ? 1 : 0);
    }
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    fprintf(stderr,
            "uplinkd: configuration %s is valid for root, but the service user %s (uid %u) "
            "cannot use it (errors above, checked as %s): make the files readable by group %s "
            "(chgrp %s FILE; chmod g+r FILE) and their directories searchable\n",
            path, name, (unsigned)pw->pw_uid, name, name, name);
    return -EACCES;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"check-config", no_argument, NULL, 't'},
        {"verbose", no_argument, NULL, 'v'},      {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    struct daemon *d = &daemon_instance;
    bool check_only = false;
    int opt, rc;

    d->config_path = UPLINKD_DEFAULT_CONFIG;
    while ((opt = getopt_long(argc, argv, "c:tvVh", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            d->config_path = optarg;
            break;
        case 't':
            check_only = true;
            break;
        case 'v':
            d->verbosity++;
            break;
        case 'V':
            print_version();
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "uplinkd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 1;
    }

    log_init(effective_level(d, LOG_INFO));
    if (load_and_check(d->config_path, &d->conf) < 0)
        return 1;
    if (check_only) {
        size_t warnings = warn_acl_sidestep(d->conf);
        rc = check_as_service_user(d->config_path);
        if (rc == 0) {
            printf("configuration OK: %s (%zu uplink(s), %zu listener(s))", d->config_path,
                   d->conf->uplink_count, d->conf->local.listen_count);
            if (warnings)
                printf(", %zu warning(s) on stderr", warnings);
            printf("\n");
        }
        conf_free(d->conf);
        return rc == 0 ? 0 : 1;
    }
    log_set_level(effective_level(d, d->conf->log_level));
    log_notice("uplinkd %s starting with %s", UPLINKD_VERSION, d->config_path);
    warn_acl_sidestep(d->conf);

    signal(SIGPIPE, SIG_IGN); /* a vanished peer is an error return, not a signal */
    mosquitto_lib_init();
    d->loop = uv_default_loop();
    d->state = DAEMON_STARTING;

    uv_signal_init(d->loop, &d->sigterm);
    uv_signal_init(d->loop, &d->sigint);
    uv_signal_init(d->loop, &d->sighup);
    d->sigterm.data = d->sigint.data = d->sighup.data = d;
    uv_signal_start(&d->sigterm, signal_cb, SIGTERM);
    uv_signal_start(&d->sigint, signal_cb, SIGINT);
    uv_signal_start(&d->sighup, signal_cb, SIGHUP);

    rc = daemon_start(d);
    if (rc < 0) {
        log_err("start-up failed; exiting");
        d->exit_code = 1;
        sd_notifyf(0, "STATUS=start-up failed: %s\nERRNO=%d", strerror(-rc), -rc);
        uv_walk(d->loop, walk_close_cb, NULL);
        uv_run(d->loop, UV_RUN_DEFAULT);
        goto out;
    }
    watchdog_start(d);
    d->state = DAEMON_RUNNING;
    sd_notify(0, "READY=1");
    notify_status(d);
    log_notice("ready: %zu listener(s), %zu uplink(s)", d->conf->local.listen_count,
               d->uplink_count);

    uv_run(d->loop, UV_RUN_DEFAULT);
    if (d->exit_code == 0)
        log_notice("stopped");

out:
    for (size_t i = 0; i < d->uplink_count; i++)
        uplink_free(d->uplinks[i]);
    free(d->uplinks);
    local_free(d->local);
    router_deinit(&d->router);
    uv_loop_close(d->loop);
    conf_free(d->conf);
    mosquitto_lib_cleanup();
    return d->exit_code;
}
