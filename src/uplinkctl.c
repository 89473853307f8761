/* uplinkctl.c - command-line client of the uplinkd control socket.
 *
 * Usage: uplinkctl [-s SOCKET] [--json] [COMMAND [ARGS]]
 * Online commands (status, children, reconnect, rotate, reload-credentials)
 * send one command line and print the daemon's answer: a table for people,
 * or the JSON with --json. Exit status: 0 on an answer, 1 when the daemon
 * answered with an error (or refused new credentials), 2 when it could not
 * be reached, 3 from status when an uplink is not ONLINE. Offline commands
 * (diagnose, jwt, keygen, passwd) live in their own files; jwt UPLINK asks
 * the daemon first.
 */
#include <errno.h>
#include <stdbool.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "diagnose.h"
#include "uplinkctl_ask.h"
#include "uplinkctl_cert.h"
#include "uplinkctl_keys.h"
#include "uplinkctl_passwd.h"
#include "uplinkd/ctl.h"

static void usage(FILE *out)
{
    fprintf(out, "Usage: uplinkctl [-s SOCKET] [--json] [COMMAND [ARGS]]\n"
                 "Ask a running uplinkd over its control socket.\n\n"
                 "Commands:\n"
                 "  status     state of every uplink, queue depths, counters (default)\n"
                 "  children   child devices seen, message counts, registration per uplink\n"
                 "  reconnect UPLINK  drop the uplink's session and connect again now\n"
                 "  rotate UPLINK     sign a fresh JWT and reconnect with it now\n"
                 "  reload-credentials [UPLINK]\n"
                 "             re-read tls.cert, tls.key, tls.ca and auth.key; reconnect the\n"
                 "             uplinks whose files changed and pass the start-up checks\n"
                 "  diagnose   test an uplink's connection step by step (diagnose --help)\n"
                 "  jwt UPLINK print the token the uplink would send now (jwt --help; also\n"
                 "             offline: jwt --key KEY ...)\n"
                 "  keygen     write a new key pair, print its public key and kid\n"
                 "  cert       create a device key and certificate or CSR, show a certificate\n"
                 "             (cert --help)\n"
                 "  passwd     add or change a user of local.password_file (passwd FILE USER)\n\n"
                 "Options:\n"
                 "  -s, --socket PATH  control socket (default " UPLINKD_CTL_DEFAULT_SOCKET ")\n"
                 "  -j, --json         print the daemon's JSON answer as it is\n"
                 "  -h, --help         this text\n"
                 "  -V, --version      print the version\n");
}

/* The request line for an online command, or -1 after printing why not.
 * "status [--json]", "reconnect UPLINK", "rotate UPLINK". */
static int build_request(int argc, char **argv, bool *json_output, char *out, size_t size)
{
    const char *command = argc > 0 ? argv[0] : "status";
    const char *name = NULL;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0 || strcmp(argv[i], "-j") == 0)
            *json_output = true;
        else if (name == NULL && argv[i][0] != '-')
            name = argv[i];
        else {
            fprintf(stderr, "uplinkctl %s: unexpected argument \"%s\"\n", command, argv[i]);
            return -1;
        }
    }
    if ((strcmp(command, "status") == 0 || strcmp(command, "children") == 0) && name == NULL)
        return snprintf(out, size, "%s\n", command);
    if (strcmp(command, "reload-credentials") == 0) {
        if (name == NULL)
            return snprintf(out, size, "%s\n", command);
        if (strlen(name) > 64 || strpbrk(name, " \t\n") != NULL) {
            fprintf(stderr, "uplinkctl %s: \"%s\" is not an uplink name\n", command, name);
            return -1;
        }
        return snprintf(out, size, "%s %s\n", command, name);
    }
    if (strcmp(command, "reconnect") == 0 || strcmp(command, "rotate") == 0) {
        if (name == NULL || strlen(name) > 64 || strpbrk(name, " \t\n") != NULL) {
            fprintf(stderr, "uplinkctl %s: name the uplink (uplinkctl %s UPLINK)\n", command,
                    command);
            return -1;
        }
        return snprintf(out, size, "%s %s\n", command, name);
    }
    fprintf(stderr,
            "uplinkctl: unknown command \"%s\" (known: status, children, reconnect, rotate, "
            "reload-credentials, diagnose, jwt, keygen, cert, passwd)\n",
            command);
    return -1;
}

static const char *json_str(json_t *object, const char *key)
{
    const char *value = json_string_value(json_object_get(object, key));
    return value ? value : "";
}

static long long json_num(json_t *object, const char *key)
{
    return (long long)json_number_value(json_object_get(object, key));
}

/* The lines under the table for one uplink: the spool (issue: depth, bytes,
 * oldest age, rates, drops by reason, last fsync), a full spool that holds
 * back publishers, and per-device sessions when the profile has them. */
static void print_uplink_details(json_t *uplink)
{
    const char *name = json_str(uplink, "name");
    json_t *spool = json_object_get(uplink, "spool");
    if (spool != NULL) {
        json_t *dropped = json_object_get(spool, "dropped");
        printf("%s: spool %s, %lld record(s), %lld of %lld bytes, oldest %.1f s, in %.1f/s, "
               "out %.1f/s, last fsync %lld us\n",
               name, json_str(spool, "durability"), json_num(spool, "depth"),
               json_num(spool, "bytes"), json_num(spool, "max_bytes"),
               json_number_value(json_object_get(spool, "oldest_age_s")),
               json_number_value(json_object_get(spool, "rate_in")),
               json_number_value(json_object_get(spool, "rate_out")),
               json_num(spool, "last_fsync_us"));
        if (dropped != NULL)
            printf("%s: dropped: overflow %lld, max_age %lld, corrupt %lld, qos0 offline %lld, "
                   "refused %lld\n",
                   name, json_num(dropped, "overflow"), json_num(dropped, "max_age"),
                   json_num(dropped, "corrupt"), json_num(dropped, "qos0_offline"),
                   json_num(dropped, "refused"));
        if (json_num(spool, "blocked") > 0)
            printf("%s: spool full: %lld publish(es) from local clients held back until the "
                   "cloud catches up (spool.overflow: block)\n",
                   name, json_num(spool, "blocked"));
        if (json_str(spool, "io_error")[0])
            printf("%s: spool I/O error: %s\n", name, json_str(spool, "io_error"));
    }
    json_t *sessions = json_object_get(uplink, "sessions");
    if (json_is_object(sessions))
        printf("%s: per-device sessions: %lld open (%lld online, %lld connecting, %lld in "
               "backoff, %lld without key), %lld record(s) queued\n",
               name, json_num(sessions, "open"), json_num(sessions, "online"),
               json_num(sessions, "connecting"), json_num(sessions, "backoff"),
               json_num(sessions, "no_key"), json_num(sessions, "queued"));
}

static void print_status(json_t *root)
{
    printf("uplinkd %s (pid %lld) %s, config %s, %lld local client(s)\n", json_str(root, "version"),
           json_num(root, "pid"), json_str(root, "state"), json_str(root, "config"),
           json_num(root, "local_clients"));
    json_t *pending = json_object_get(root, "local_pending");
    if (json_is_object(pending) &&
        (json_num(pending, "now") || json_num(pending, "evicted") || json_num(pending, "refused") ||
         json_num(pending, "deadline") || json_num(pending, "max_clients")))
        printf("local connections before CONNECT: %lld pending; closed since start: %lld evicted, "
               "%lld refused, %lld past local.connect_deadline, %lld at local.max_clients, "
               "%lld other\n",
               json_num(pending, "now"), json_num(pending, "evicted"), json_num(pending, "refused"),
               json_num(pending, "deadline"), json_num(pending, "max_clients"),
               json_num(pending, "other"));
    json_t *reload = json_object_get(root, "last_reload");
    if (strcmp(json_str(reload, "result"), "refused") == 0)
        printf("last reload refused, still running the previous configuration: %s\n",
               json_str(reload, "error"));
    json_t *uplinks = json_object_get(root, "uplinks");
    if (json_array_size(uplinks) == 0) {
        printf("no uplinks configured\n");
        return;
    }
    printf("\n%-16s %-11s %-32s %8s %10s %10s %8s\n", "UPLINK", "STATE", "HOST", "QUEUED",
           "PUBLISHED", "RECEIVED", "DROPPED");
    size_t i;
    json_t *uplink;
    json_array_foreach(uplinks, i, uplink)
    {
        char host[300];
        snprintf(host, sizeof(host), "%s:%lld", json_str(uplink, "host"), json_num(uplink, "port"));
        json_t *spool = json_object_get(uplink, "spool");
        long long queued = spool ? json_num(spool, "depth") : json_num(uplink, "queued");
        printf("%-16s %-11s %-32s %8lld %10lld %10lld %8lld\n", json_str(uplink, "name"),
               json_str(uplink, "state"), host, queued, json_num(uplink, "published"),
               json_num(uplink, "received"), json_num(uplink, "dropped"));
    }
    printf("\n");
    json_array_foreach(uplinks, i, uplink)
    {
        print_uplink_details(uplink);
        const char *error = json_str(uplink, "last_error");
        if (error[0])
            printf("%s: last error: %s\n", json_str(uplink, "name"), error);
        if (json_str(uplink, "cert_warning")[0])
            printf("%s: client certificate %s (it is valid until %lld)\n", json_str(uplink, "name"),
                   json_str(uplink, "cert_warning"), json_num(uplink, "cert_expires_at"));
        if (json_object_get(uplink, "token_expires_at") != NULL &&
            strcmp(json_str(uplink, "auth"), "jwt") == 0)
            printf("%s: JWT clock %s, token expires at %lld, %lld rotation(s)\n",
                   json_str(uplink, "name"), json_str(uplink, "clock"),
                   json_num(uplink, "token_expires_at"), json_num(uplink, "token_rotations"));
        else if (json_object_get(uplink, "token_expires_at") != NULL)
            printf("%s: token expires at %lld, renewed at %lld, %lld rotation(s)\n",
                   json_str(uplink, "name"), json_num(uplink, "token_expires_at"),
                   json_num(uplink, "token_refresh_at"), json_num(uplink, "token_rotations"));
    }
}

static void print_children(json_t *root)
{
    json_t *children = json_object_get(root, "children");
    if (json_array_size(children) == 0) {
        printf("no child device has published upstream since uplinkd started\n");
        return;
    }
    printf("%-32s %10s %-20s %s\n", "CHILD", "MESSAGES", "LAST SEEN (UTC)",
           "UPLINKS (registration)");
    size_t i;
    json_t *child;
    json_array_foreach(children, i, child)
    {
        char when[32] = "-";
        time_t seen = (time_t)json_num(child, "last_seen");
        struct tm tm;
        if (seen > 0 && gmtime_r(&seen, &tm) != NULL)
            strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
        printf("%-32s %10lld %-20s", json_str(child, "id"), json_num(child, "messages"), when);
        size_t j;
        json_t *uplink;
        json_array_foreach(json_object_get(child, "uplinks"), j, uplink)
        {
            printf(" %s(%s)", json_str(uplink, "name"), json_str(uplink, "registration"));
        }
        printf("\n");
    }
}

/* reload-credentials: one line per uplink. Returns 1 when one was refused. */
static int print_reload_credentials(json_t *root)
{
    size_t i;
    json_t *uplink;
    int rc = 0;

    json_array_foreach(json_object_get(root, "uplinks"), i, uplink)
    {
        const char *result = json_str(uplink, "result");
        if (strcmp(result, "refused") == 0) {
            rc = 1;
            printf("%s: refused: %s\n", json_str(uplink, "name"), json_str(uplink, "message"));
        } else if (strcmp(result, "changed") == 0) {
            printf("%s: changed: %s; reconnecting\n", json_str(uplink, "name"),
                   json_str(uplink, "message"));
        } else {
            printf("%s: %s\n", json_str(uplink, "name"), json_str(uplink, "message"));
        }
    }
    if (json_array_size(json_object_get(root, "uplinks")) == 0)
        printf("no uplinks configured\n");
    return rc;
}

/* Whether every uplink in the status @answer is ONLINE (none configured:
 * healthy). Exit status 3 otherwise, with or without --json. */
static bool status_healthy(const char *answer)
{
    json_t *root = json_loads(answer, 0, NULL);
    json_t *uplinks = root ? json_object_get(root, "uplinks") : NULL;
    json_t *uplink;
    size_t i;
    bool healthy = root != NULL;

    json_array_foreach(uplinks, i, uplink)
    {
        if (strcasecmp(json_str(uplink, "state"), "ONLINE") != 0)
            healthy = false;
    }
    json_decref(root);
    return healthy;
}

/* The answer for people. Returns the exit status. */
static int print_answer(const char *command, const char *answer)
{
    json_error_t error;
    json_t *root = json_loads(answer, 0, &error);

    if (root == NULL) {
        fprintf(stderr, "uplinkctl: the daemon's answer is not JSON (%s): %s", error.text, answer);
        return 2;
    }
    int rc = 0;
    if (json_object_get(root, "error") != NULL) {
        fprintf(stderr, "uplinkctl %s: %s\n", command, json_str(root, "error"));
        rc = 1;
    } else if (strcmp(command, "status") == 0) {
        print_status(root);
    } else if (strcmp(command, "children") == 0) {
        print_children(root);
    } else if (strcmp(command, "reload-credentials") == 0) {
        rc = print_reload_credentials(root);
    } else {
        printf("%s: %s requested\n", json_str(root, "uplink"), json_str(root, "action"));
    }
    json_decref(root);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *socket_path = UPLINKD_CTL_DEFAULT_SOCKET;
    bool json_output = false, socket_given = false;
    int opt;

    /* "+": options after the command belong to the command. */
    while ((opt = getopt_long(argc, argv, "+s:jhV", options, NULL)) != -1) {
        switch (opt) {
        case 's':
            socket_path = optarg;
            socket_given = true;
            break;
        case 'j':
            json_output = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("uplinkctl %s\n", UPLINKD_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    const char *command = optind < argc ? argv[optind] : "status";
    /* Offline commands: no daemon needed. */
    if (strcmp(command, "diagnose") == 0)
        return uplinkctl_diagnose_main(argc - optind, argv + optind);
    if (strcmp(command, "jwt") == 0)
        return uplinkctl_jwt_main(argc - optind, argv + optind, socket_path, socket_given,
                                  json_output);
    if (strcmp(command, "keygen") == 0)
        return uplinkctl_keygen_main(argc - optind, argv + optind);
    if (strcmp(command, "cert") == 0)
        return uplinkctl_cert_main(argc - optind, argv + optind);
    if (strcmp(command, "passwd") == 0)
        return uplinkctl_passwd_main(argc - optind, argv + optind);
    char request[UPLINKD_CTL_MAX_REQUEST];
    int n = build_request(argc - optind, argv + optind, &json_output, request, sizeof(request));
    if (n < 0)
        return 2;

    char *answer = NULL;
    int rc = uplinkctl_ask(socket_path, request, (size_t)n, false, &answer);
    if (rc != 0)
        return rc;
    rc = strncmp(answer, "{\"error\"", 8) == 0 ? 1 : 0;
    if (rc == 0 && strcmp(command, "status") == 0 && !status_healthy(answer))
        rc = 3; /* health checks (systemd, containers) read the exit status */
    if (rc == 0 && strcmp(command, "reload-credentials") == 0 &&
        strstr(answer, "\"result\":\"refused\"") != NULL)
        rc = 1; /* the same exit status with --json */
    if (json_output)
        fputs(answer, stdout);
    else {
        int printed = print_answer(command, answer);
        if (printed != 0 || rc != 3)
            rc = printed;
    }
    free(answer);
    return rc;
}
