/* main.c - the command line, --check-config, signals, the watchdog, main().
 *
 * Start-up: parse and validate the config (fatal on error) -> bind the local
 * listeners -> create the uplinks (they connect in the background) -> open
 * the control socket -> READY=1. SIGHUP reloads (a bad file keeps the old
 * config running), SIGTERM/SIGINT stop gracefully within shutdown_timeout.
 * The daemon itself is in daemon*.c (daemon.h: which file does what).
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
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <systemd/sd-daemon.h>
#include <uv.h>
#include <yaml.h>

#include "config.h"
#include "conf.h"
#include "daemon.h"
#include "log.h"
#include "tlscheck.h"

static struct daemon daemon_instance;

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

    log_init(daemon_effective_level(d, LOG_INFO));
    if (load_and_check(d->config_path, &d->conf) < 0)
        return 1;
    if (check_only) {
        size_t warnings = daemon_warn_acl_sidestep(d->conf);
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
    log_set_level(daemon_effective_level(d, d->conf->log_level));
    log_notice("uplinkd %s starting with %s", UPLINKD_VERSION, d->config_path);
    daemon_warn_acl_sidestep(d->conf);

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
    if (rc == 0)
        rc = daemon_ctl_open(d);
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
    daemon_notify_status(d);
    log_notice("ready: %zu listener(s), %zu uplink(s)", d->conf->local.listen_count,
               d->uplink_count);

    uv_run(d->loop, UV_RUN_DEFAULT);
    if (d->exit_code == 0)
        log_notice("stopped");

out:
    daemon_deinit(d);
    uv_loop_close(d->loop);
    mosquitto_lib_cleanup();
    return d->exit_code;
}
