/* test_daemon_ctl.c - the control commands (daemon_ctl.c) of a running
 * daemon, asked over its real control socket as uplinkctl asks: status,
 * children, reconnect, rotate, reload-credentials, jwt, and the errors of
 * an unknown uplink or command (the protocol: include/uplinkd/ctl.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "daemon_fixture.h"
#include "loop_step.h"

/* Two uplinks that stay in BACKOFF (nothing listens at @PORT@, and the
 * next attempt is an hour away). */
static const char two_uplinks[] = "gateway:\n"
                                  "  id: gw-ctl\n"
                                  "  state_dir: @DIR@/state\n"
                                  "log:\n"
                                  "  level: info\n"
                                  "local:\n"
                                  "  listen: [\"unix://@DIR@/local.sock\"]\n"
                                  "control:\n"
                                  "  socket: @DIR@/control.sock\n"
                                  "uplinks:\n"
                                  "  - name: alpha\n"
                                  "    host: 127.0.0.1\n"
                                  "    port: @PORT@\n"
                                  "    tls: {enabled: false}\n"
                                  "    reconnect: {base: 1h, cap: 1h}\n"
                                  "  - name: beta\n"
                                  "    host: 127.0.0.1\n"
                                  "    port: @PORT@\n"
                                  "    tls: {enabled: false}\n"
                                  "    reconnect: {base: 1h, cap: 1h}\n";

#define KNOWN                                                                                      \
    "known: status, children, reconnect UPLINK, rotate UPLINK, reload-credentials [UPLINK], "      \
    "jwt UPLINK"

static int setup(void **state)
{
    *state = daemon_fixture_new(two_uplinks);
    return 0;
}

/* The whole answer must be {"error": @words}. */
static void assert_error(struct daemon_fixture *f, const char *command, const char *words)
{
    json_t *answer = daemon_fixture_ask(f, command);

    assert_int_equal(json_object_size(answer), 1);
    assert_string_equal(daemon_fixture_string(answer, "error"), words);
    json_decref(answer);
}

static void test_status(void **state)
{
    struct daemon_fixture *f = *state;
    json_t *status = daemon_fixture_ask(f, "status");
    json_t *uplinks = json_object_get(status, "uplinks");
    const char *names[] = {"alpha", "beta"};

    assert_string_equal(daemon_fixture_string(status, "version"), UPLINKD_VERSION);
    assert_int_equal(json_integer_value(json_object_get(status, "pid")), getpid());
    assert_string_equal(daemon_fixture_string(status, "state"), "running");
    assert_string_equal(daemon_fixture_string(status, "config"), f->config_path);
    json_t *last_reload = json_object_get(status, "last_reload");
    assert_string_equal(daemon_fixture_string(last_reload, "result"), "none");
    assert_string_equal(daemon_fixture_string(last_reload, "error"), "");
    assert_int_equal(json_integer_value(json_object_get(status, "local_clients")), 0);
    assert_true(json_is_object(json_object_get(status, "router")));

    assert_true(json_is_array(uplinks));
    assert_int_equal(json_array_size(uplinks), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *uplink = json_array_get(uplinks, i);
        assert_string_equal(daemon_fixture_string(uplink, "name"), names[i]);
        assert_string_equal(daemon_fixture_string(uplink, "host"), "127.0.0.1");
        assert_int_equal(json_integer_value(json_object_get(uplink, "port")), f->port);
        assert_string_equal(daemon_fixture_string(uplink, "state"), "BACKOFF");
        /* Why it is in BACKOFF, in words. */
        assert_non_null(strstr(daemon_fixture_string(uplink, "last_error"), "refused"));
        assert_int_equal(json_integer_value(json_object_get(uplink, "connects")), 0);
        json_t *spool = json_object_get(uplink, "spool");
        assert_string_equal(daemon_fixture_string(spool, "durability"), "fsync");
        assert_int_equal(json_integer_value(json_object_get(spool, "depth")), 0);
        /* auth none: no token fields */
        assert_null(json_object_get(uplink, "token_expires_at"));
    }
    json_decref(status);
}

static enum uplink_state state_of(struct daemon_fixture *f, const char *name)
{
    return uplink_get_state(daemon_fixture_uplink(f, name));
}

/* "reconnect alpha" makes alpha try at once instead of waiting out its
 * hour: with something listening now, its connection arrives, and the
 * status shows alpha waiting for its CONNACK and beta still waiting. */
static void test_reconnect(void **state)
{
    struct daemon_fixture *f = *state;
    int listen_fd = daemon_fixture_listen(f);
    json_t *answer = daemon_fixture_ask(f, "reconnect alpha");

    assert_int_equal(json_object_size(answer), 3);
    assert_true(json_is_true(json_object_get(answer, "ok")));
    assert_string_equal(daemon_fixture_string(answer, "uplink"), "alpha");
    assert_string_equal(daemon_fixture_string(answer, "action"), "reconnect");
    json_decref(answer);

    int conn_fd = daemon_fixture_accept(f, listen_fd);
    LOOP_UNTIL(&f->loop, state_of(f, "alpha") == UPLINK_CONNECTING, DAEMON_FIXTURE_STEPS);
    assert_int_equal(state_of(f, "beta"), UPLINK_BACKOFF);

    json_t *status = daemon_fixture_ask(f, "status");
    json_t *uplinks = json_object_get(status, "uplinks");
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 0), "name"), "alpha");
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 0), "state"), "CONNECTING");
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 1), "name"), "beta");
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 1), "state"), "BACKOFF");
    json_decref(status);
    close(conn_fd);
    close(listen_fd);
}

static void test_reconnect_unknown(void **state)
{
    struct daemon_fixture *f = *state;

    assert_error(f, "reconnect gamma", "no uplink named \"gamma\" (see uplinkctl status)");
    assert_error(f, "reconnect", "no uplink named \"\" (see uplinkctl status)");
    assert_error(f, "rotate gamma", "no uplink named \"gamma\" (see uplinkctl status)");
    assert_int_equal(state_of(f, "alpha"), UPLINK_BACKOFF);
}

static void test_rotate_without_jwt(void **state)
{
    struct daemon_fixture *f = *state;

    assert_error(f, "rotate alpha",
                 "uplink \"alpha\" does not use JWT auth; there is no token to rotate");
    assert_int_equal(state_of(f, "alpha"), UPLINK_BACKOFF);
}

static void test_unknown_command(void **state)
{
    struct daemon_fixture *f = *state;

    assert_error(f, "frobnicate alpha", "unknown command (" KNOWN ")");
    assert_error(f, "", "empty command (" KNOWN ")");
    assert_error(f, "   ", "empty command (" KNOWN ")");
}

static void test_jwt_without_jwt(void **state)
{
    struct daemon_fixture *f = *state;

    assert_error(f, "jwt beta", "uplink \"beta\" does not use JWT auth (auth.type is none)");
    assert_error(f, "jwt gamma", "no uplink named \"gamma\" (known: alpha beta)");
    assert_error(f, "jwt", "no uplink named \"\" (known: alpha beta)");
}

static void test_reload_credentials(void **state)
{
    struct daemon_fixture *f = *state;
    json_t *answer = daemon_fixture_ask(f, "reload-credentials");
    json_t *uplinks = json_object_get(answer, "uplinks");

    assert_int_equal(json_array_size(uplinks), 2);
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 0), "name"), "alpha");
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 1), "name"), "beta");
    for (size_t i = 0; i < 2; i++) {
        assert_string_equal(daemon_fixture_string(json_array_get(uplinks, i), "result"),
                            "unchanged");
        assert_true(strlen(daemon_fixture_string(json_array_get(uplinks, i), "message")) > 0);
    }
    json_decref(answer);

    answer = daemon_fixture_ask(f, "reload-credentials beta");
    uplinks = json_object_get(answer, "uplinks");
    assert_int_equal(json_array_size(uplinks), 1);
    assert_string_equal(daemon_fixture_string(json_array_get(uplinks, 0), "name"), "beta");
    json_decref(answer);

    assert_error(f, "reload-credentials gamma", "no uplink named \"gamma\" (see uplinkctl status)");
}

static void test_children(void **state)
{
    struct daemon_fixture *f = *state;
    json_t *answer = daemon_fixture_ask(f, "children");
    json_t *children = json_object_get(answer, "children");

    assert_int_equal(json_object_size(answer), 1);
    assert_true(json_is_array(children));
    assert_int_equal(json_array_size(children), 0);
    json_decref(answer);
}

/* After daemon_stop() the socket is gone: a client is refused, not hung. */
static void test_stop_closes_the_socket(void **state)
{
    struct daemon_fixture *f = *state;

    daemon_stop(&f->daemon, "test");
    assert_null(f->daemon.ctl);
    assert_null(daemon_fixture_ask_at(f, f->control_path, "status"));
    assert_int_equal(access(f->control_path, F_OK), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_status, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_reconnect, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_reconnect_unknown, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_rotate_without_jwt, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_unknown_command, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_jwt_without_jwt, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_reload_credentials, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_children, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_stop_closes_the_socket, setup,
                                        daemon_fixture_teardown),
    };

    return cmocka_run_group_tests(tests, daemon_fixture_group_setup, daemon_fixture_group_teardown);
}
