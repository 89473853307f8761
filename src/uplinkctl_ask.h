/* uplinkctl_ask.h - what the uplinkctl commands share: one request to
 * the daemon (uplinkctl_ask.c). */
#ifndef UPLINKD_UPLINKCTL_ASK_H
#define UPLINKD_UPLINKCTL_ASK_H

#include <stdbool.h>
#include <stddef.h>

/* uplinkctl_ask() result: no daemon listens on the socket (quiet_down). */
#define UPLINKCTL_DOWN 3

/**
 * uplinkctl_ask() - send one command line to the daemon and read its answer.
 * @socket_path: the control socket (borrowed).
 * @request: the command line with its final '\n'; @len its length.
 * @quiet_down: when no daemon listens there (no socket file, connection
 *              refused), print nothing and return UPLINKCTL_DOWN: the
 *              caller has another way (uplinkctl jwt signs locally).
 * @answer: on 0, the answer as a malloc'd NUL-terminated string.
 * Returns 0, UPLINKCTL_DOWN, or 2 (the exit status for "unreachable") after
 * printing why on stderr.
 */
int uplinkctl_ask(const char *socket_path, const char *request, size_t len, bool quiet_down,
                  char **answer);

#endif
