/* daemon_fixture.h - a whole daemon on a test's own loop, for the unit
 * tests of the control commands and of reload (test_daemon_ctl.c,
 * test_daemon_reload.c). Include after <cmocka.h>.
 *
 * The daemon runs from a YAML file in a fresh temporary directory, where
 * its local listener, control socket and spools live too. Its uplinks go to
 * 127.0.0.1 on a port that was bound and closed again, so every attempt is
 * refused and, with a long reconnect base, an uplink stays in BACKOFF. A
 * test talks to the control socket as uplinkctl does, with a real socket,
 * stepping the loop (loop_step.h) until the answer is complete.
 *
 * In a template, @DIR@ is replaced by the temporary directory and @PORT@ by
 * the closed port.
 */
#ifndef UPLINKD_TEST_DAEMON_FIXTURE_H
#define UPLINKD_TEST_DAEMON_FIXTURE_H

#include <limits.h>
#include <stdbool.h>

#include <jansson.h>
#include <uv.h>

#include "daemon.h"
#include "uplink.h"

/* The bound of every wait, in loop iterations. A heartbeat timer wakes the
 * loop every few milliseconds, so no iteration waits for long and a wait
 * that cannot end fails within seconds. */
#define DAEMON_FIXTURE_STEPS 2000

struct daemon_fixture {
    uv_loop_t loop;
    uv_timer_t heartbeat;
    struct daemon daemon;
    char dir[80]; /* short: a Unix socket path holds 108 bytes */
    char config_path[PATH_MAX];
    char control_path[PATH_MAX]; /* the default template's control.socket */
    unsigned port;               /* nothing listens there */
};

/* cmocka group set-up and teardown: the process as uplinkd's main() sets it
 * up (SIGPIPE ignored, logging at notice, libmosquitto initialised). */
int daemon_fixture_group_setup(void **state);
int daemon_fixture_group_teardown(void **state);

/* A fixture (daemon_fixture_init()) with the daemon of @template started
 * (daemon_fixture_start()) and every uplink in BACKOFF. */
struct daemon_fixture *daemon_fixture_new(const char *template);

/* daemon_fixture_deinit() and free a daemon_fixture_new(). */
void daemon_fixture_free(struct daemon_fixture *f);

/* cmocka teardown: daemon_fixture_free(*@state). */
int daemon_fixture_teardown(void **state);

/* Make the directory, the loop and the heartbeat; nothing runs yet. */
void daemon_fixture_init(struct daemon_fixture *f);

/* Write @template (with @DIR@ and @PORT@ replaced) to f->config_path. */
void daemon_fixture_write(struct daemon_fixture *f, const char *template);

/* Write @template, load it and start the daemon as main() does (local,
 * uplinks, control socket), RUNNING. The test fails if any step fails. */
void daemon_fixture_start(struct daemon_fixture *f, const char *template);

/* The uplink named @name, or NULL. */
struct uplink *daemon_fixture_uplink(struct daemon_fixture *f, const char *name);

/* Step the loop until every uplink is in @state (bounded). */
void daemon_fixture_wait_uplinks(struct daemon_fixture *f, enum uplink_state state);

/* Listen on 127.0.0.1:f->port after all, so that the next connection
 * attempt of an uplink arrives (and then waits for a CONNACK that never
 * comes). Returns the listening socket. */
int daemon_fixture_listen(struct daemon_fixture *f);

/* Step the loop until a connection arrives at @listen_fd (bounded);
 * returns the accepted socket. */
int daemon_fixture_accept(struct daemon_fixture *f, int listen_fd);

/* Send @command to the control socket @path and step the loop until the
 * daemon has answered and closed. Returns the answer without its final
 * '\n' (the caller frees it), or NULL when nothing listens at @path. */
char *daemon_fixture_ask_at(struct daemon_fixture *f, const char *path, const char *command);

/* The same at the daemon's control socket, parsed: the test fails if the
 * answer is not one JSON object ending in '\n'. json_decref() it. */
json_t *daemon_fixture_ask(struct daemon_fixture *f, const char *command);

/* daemon_stop(), the loop run until every handle is closed (bounded),
 * daemon_deinit(), the loop closed (the test fails if a handle is left)
 * and the directory removed. */
void daemon_fixture_deinit(struct daemon_fixture *f);

/* The text of key @key of @object; the test fails if it is not a string. */
const char *daemon_fixture_string(json_t *object, const char *key);

#endif
