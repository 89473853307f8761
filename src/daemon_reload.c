/* daemon_reload.c - SIGHUP: parse and validate the file again, check the
 * credentials of what changed, then swap the new conf in part by part
 * (local listeners, uplinks kept, added and removed, log level, control
 * socket). A reload that cannot be applied is refused before anything
 * changes and says why; the old conf stays in force.
 */
#include "daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "conf.h"
#include "ctl.h"
#include "local.h"
#include "log.h"
#include "tlscheck.h"
#include "uplink.h"
#include "util.h"

/* A conf replaced by a reload stays alive until the uplinks that were removed
 * by that reload (and still point into it) have finished stopping. */
struct retired_conf {
    struct daemon *daemon;
    struct conf *conf;
    unsigned pending_stops;
};

static void retired_uplink_done_cb(struct uplink *uplink, void *arg)
{
    struct retired_conf *retired = arg;

    uplink_free(uplink);
    retired->daemon->retiring_uplinks--;
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
    daemon_notify_status(d);
}

void daemon_reload(struct daemon *d)
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
        if (daemon_uplink_create(d, next, uc, &uplinks[i]) < 0)
            continue;
        fresh[fresh_count++] = uplinks[i];
    }

    retired->daemon = d;
    retired->conf = d->conf;
    for (size_t j = 0; j < d->uplink_count; j++) {
        if (d->uplinks[j] == NULL)
            continue;
        log_uplink(LOG_NOTICE, uplink_name(d->uplinks[j]), "removed by reload; stopping");
        retired->pending_stops++;
        d->retiring_uplinks++;
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
    log_set_level(daemon_effective_level(d, next->log_level));

    /* The new control socket first, then the old one closed: if the new one
     * cannot be opened (its directory, memory), uplinkctl still reaches the
     * daemon at the old path, as the local listeners keep theirs, and the
     * next reload tries again (it compares with where the socket is). */
    if (d->ctl == NULL || strcmp(ctl_path(d->ctl), next->control_socket) != 0) {
        struct ctl *old_ctl = d->ctl;
        daemon_prepare_socket_dirs(next);
        if (daemon_ctl_open(d) == 0)
            ctl_close(old_ctl);
        else if (old_ctl != NULL)
            log_err("reload: the control socket stays at %s", ctl_path(old_ctl));
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
    daemon_warn_acl_sidestep(next);
    log_notice("reload done: %zu uplink(s)", d->uplink_count);
    d->reload_result = "done";
    d->reload_error[0] = '\0';
    sd_notify(0, "READY=1");
    daemon_notify_status(d);
}
