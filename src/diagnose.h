/* diagnose.h - `uplinkctl diagnose UPLINK`: walk an uplink's connection
 * step by step (DNS -> TCP -> TLS -> MQTT CONNECT -> CONNACK) and say in
 * plain words which step fails and the likely fix (docs/diagnostics.md).
 *
 * It runs in uplinkctl, not in the daemon: the network code is blocking with
 * a timeout per step, and it never touches the running daemon's session. It
 * opens its own connection; the only shared thing is the MQTT client id, and
 * a CONNECT with the id of a live session would take that session over
 * (MQTT 3.1.1 §3.1.4-2), so when the running uplinkd reports the uplink
 * online, the CONNECT step is skipped unless another id is given.
 */
#ifndef UPLINKD_DIAGNOSE_H
#define UPLINKD_DIAGNOSE_H

#include <stdbool.h>
#include <stdio.h>

struct conf;
struct conf_uplink;

/* Exit status of `uplinkctl diagnose`: the first step that failed. */
enum diagnose_exit {
    DIAGNOSE_EXIT_OK = 0,    /* every step passed (or CONNECT skipped, see above) */
    DIAGNOSE_EXIT_USAGE = 2, /* bad command line, unreadable or invalid config, no such uplink */
    DIAGNOSE_EXIT_DNS = 10,  /* the host name does not resolve */
    DIAGNOSE_EXIT_TCP = 11,  /* no address accepts a TCP connection */
    DIAGNOSE_EXIT_TLS = 12,  /* handshake, server certificate, or our client certificate */
    DIAGNOSE_EXIT_MQTT = 13, /* CONNECT refused (CONNACK 1-5), no CONNACK, or closed */
};

/* Everything borrowed; zero-initialise for the defaults. */
struct diagnose_options {
    unsigned timeout_ms;        /* per network step; 0: 10 s */
    const char *client_id;      /* CONNECT with this id instead of the configured one */
    bool force;                 /* CONNECT even when the running uplinkd is online */
    const char *control_socket; /* where to ask uplinkd; NULL: the config's control.socket */
};

/**
 * diagnose_uplink() - run every step for @uplink and print the report on
 * @out.
 * @conf: the configuration @uplink belongs to (borrowed; gateway id,
 *        control socket).
 * Returns an enum diagnose_exit value: the first step that failed.
 */
int diagnose_uplink(const struct conf *conf, const struct conf_uplink *uplink,
                    const struct diagnose_options *options, FILE *out);

/**
 * diagnose_print_token() - print a JWT the way diagnose shows the token it
 * sends: the decoded header and claims (JSON as sent), iat/exp as dates,
 * and the signature's length only (never the signature itself).
 * @token: compact JWS (borrowed). @now: for "expires in".
 * Returns 0 or -EINVAL when @token is not three base64url parts with JSON
 * header and claims (then says so on @out).
 */
int diagnose_print_token(const char *token, long long now, FILE *out);

/**
 * uplinkctl_diagnose_main() - `uplinkctl diagnose [-c CONFIG] [OPTIONS]
 * UPLINK`.
 * @argc, @argv: the command's own arguments, argv[0] being "diagnose".
 * Returns the process exit status (enum diagnose_exit).
 */
int uplinkctl_diagnose_main(int argc, char **argv);

#endif
