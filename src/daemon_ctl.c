/* daemon_ctl.c - the control socket's commands: one command line in, one
 * JSON document out (the protocol: include/uplinkd/ctl.h; the socket
 * itself: ctl.c). Every answer is read from the running daemon; only
 * reconnect and rotate act on it.
 */
#include "daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "conf.h"
#include "ctl.h"
#include "json.h"
#include "keys.h"
#include "local.h"
#include "tlscheck.h"
#include "uplink.h"

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
        } else if (stats.token_expires_at) {
            /* A token the profile makes (Azure SAS), rotated the same way. */
            json_append_fmt(out,
                            ",\"auth\":\"token\",\"token_expires_at\":%lld,"
                            "\"token_refresh_at\":%lld,\"token_rotations\":%llu",
                            (long long)stats.token_expires_at, (long long)stats.token_refresh_at,
                            (unsigned long long)stats.rotations);
        }
        if (stats.cert_expires_at) {
            /* The client certificate of the current or last attempt; within
             * TLSCHECK_WARN_DAYS a warning in words, as the log says it. */
            int64_t left = stats.cert_expires_at - (int64_t)time(NULL);
            json_append_fmt(out, ",\"cert_expires_at\":%lld", (long long)stats.cert_expires_at);
            if (left < (int64_t)TLSCHECK_WARN_DAYS * 24 * 3600)
                json_append_fmt(out,
                                left > 0 ? ",\"cert_warning\":\"expires in %lld day(s): renew "
                                           "it\""
                                         : ",\"cert_warning\":\"expired %lld day(s) ago\"",
                                (long long)((left > 0 ? left : -left) / (24 * 3600)));
        }
        router_uplink_status_json(&d->router, d->uplinks[i], out); /* akenza "sessions" */
        json_append_raw(out, "}");
    }
    json_append_fmt(out, "],\"router\":{\"forwarded\":%llu,\"rejected\":%llu,\"unrouted\":%llu}}",
                    (unsigned long long)d->router.forwarded, (unsigned long long)d->router.rejected,
                    (unsigned long long)d->router.unrouted);
}

int daemon_ctl_open(struct daemon *d)
{
    return ctl_new(d->loop, d->conf->control_socket, daemon_ctl_command_cb, d, &d->ctl);
}
