/* uplinkctl_diagnose.c - the `uplinkctl diagnose` command line (the work is
 * in diagnose.c). */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "conf.h"
#include "diagnose.h"

static void diagnose_usage(FILE *out)
{
    fprintf(out,
            "Usage: uplinkctl diagnose [-c CONFIG] [OPTIONS] UPLINK\n"
            "Connect to UPLINK's broker step by step - DNS, TCP, TLS, MQTT CONNECT, CONNACK -\n"
            "and say which step fails and the likely fix. The running uplinkd is not touched.\n\n"
            "  -c, --config FILE    configuration (default " UPLINKD_DEFAULT_CONFIG ")\n"
            "  -t, --timeout SECS   per network step (default 10)\n"
            "  -i, --client-id ID   CONNECT with this client id instead of the configured one\n"
            "      --force          CONNECT even when the running uplinkd has UPLINK online\n"
            "                       (the broker then drops the daemon's session; it reconnects)\n"
            "  -s, --socket PATH    control socket of the running uplinkd (default: the\n"
            "                       config's control.socket)\n\n"
            "Exit status: 0 every step OK, 10 DNS, 11 TCP, 12 TLS, 13 MQTT CONNECT/CONNACK,\n"
            "2 usage or configuration error.\n");
}

int uplinkctl_diagnose_main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'},
        {"timeout", required_argument, NULL, 't'},
        {"client-id", required_argument, NULL, 'i'},
        {"force", no_argument, NULL, 'F'},
        {"socket", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct diagnose_options diag = {0};
    const char *config_path = UPLINKD_DEFAULT_CONFIG;
    struct conf *conf = NULL;
    char *errors = NULL;
    int opt, rc;

    optind = 0; /* GNU getopt: full re-initialisation for this argv */
    while ((opt = getopt_long(argc, argv, "c:t:i:s:h", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 't': {
            char *end;
            errno = 0;
            double seconds = strtod(optarg, &end);
            if (errno != 0 || end == optarg || *end != '\0' || seconds <= 0 || seconds > 3600) {
                fprintf(stderr, "uplinkctl diagnose: --timeout \"%s\" is not 0 to 3600 seconds\n",
                        optarg);
                return DIAGNOSE_EXIT_USAGE;
            }
            diag.timeout_ms = (unsigned)(seconds * 1000.0);
            if (diag.timeout_ms == 0)
                diag.timeout_ms = 1;
            break;
        }
        case 'i':
            diag.client_id = optarg;
            break;
        case 'F':
            diag.force = true;
            break;
        case 's':
            diag.control_socket = optarg;
            break;
        case 'h':
            diagnose_usage(stdout);
            return 0;
        default:
            diagnose_usage(stderr);
            return DIAGNOSE_EXIT_USAGE;
        }
    }
    if (argc - optind > 1) {
        diagnose_usage(stderr);
        return DIAGNOSE_EXIT_USAGE;
    }

    rc = conf_load(config_path, &conf, &errors);
    if (rc < 0) {
        fprintf(stderr, "%s%s", errors ? errors : strerror(-rc),
                errors && errors[0] && errors[strlen(errors) - 1] == '\n' ? "" : "\n");
        fprintf(stderr, "uplinkctl diagnose: configuration %s is not valid\n", config_path);
        free(errors);
        return DIAGNOSE_EXIT_USAGE;
    }

    const struct conf_uplink *uplink = NULL;
    if (optind < argc) {
        uplink = conf_uplink_find(conf, argv[optind]);
    } else if (conf->uplink_count == 1) {
        uplink = &conf->uplinks[0]; /* the only one: no need to name it */
    }
    if (uplink == NULL) {
        fprintf(stderr, "uplinkctl diagnose: %s%s%s; uplinks in %s:",
                optind < argc ? "no uplink named \"" : "name the uplink to diagnose",
                optind < argc ? argv[optind] : "", optind < argc ? "\"" : "", config_path);
        for (size_t i = 0; i < conf->uplink_count; i++)
            fprintf(stderr, " %s", conf->uplinks[i].name);
        fprintf(stderr, "%s\n", conf->uplink_count ? "" : " (none)");
        conf_free(conf);
        return DIAGNOSE_EXIT_USAGE;
    }

    signal(SIGPIPE, SIG_IGN); /* a server that hangs up is an error return, not a signal */
    rc = diagnose_uplink(conf, uplink, &diag, stdout);
    conf_free(conf);
    return rc;
}
