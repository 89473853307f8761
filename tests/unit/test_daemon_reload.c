/* test_daemon_reload.c - daemon_reload() (daemon_reload.c) on a running
 * daemon: what a new file keeps, adds and removes, a file that does not
 * validate (refused, the old conf in force), a moved control socket. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf.h"
#include "daemon_fixture.h"
#include "loop_step.h"

#define HEAD                                                                                       \
    "gateway:\n"                                                                                   \
    "  id: gw-reload\n"                                                                            \
    "  state_dir: @DIR@/state\n"                                                                   \
    "log:\n"                                                                                       \
    "  level: notice\n"                                                                            \
    "local:\n"                                                                                     \
    "  listen: [\"unix://@DIR@/local.sock\"]\n"

#define UPLINK(name)                                                                               \
    "  - name: " name "\n"                                                                         \
    "    host: 127.0.0.1\n"                                                                        \
    "    port: @PORT@\n"                                                                           \
    "    tls: {enabled: false}\n"                                                                  \
    "    reconnect: {base: 1h, cap: 1h}\n"

/* A: keep and gone. B: keep and fresh. */
static const char conf_a[] = HEAD "control:\n"
                                  "  socket: @DIR@/control.sock\n"
                                  "uplinks:\n" UPLINK("keep") UPLINK("gone");
static const char conf_b[] = HEAD "control:\n"
                                  "  socket: @DIR@/control.sock\n"
                                  "uplinks:\n" UPLINK("keep") UPLINK("fresh");
/* B with the control socket elsewhere, in a directory that does not exist
 * yet (the reload makes it). */
static const char conf_b_moved[] = HEAD "control:\n"
                                        "  socket: @DIR@/run/ctl2.sock\n"
                                        "uplinks:\n" UPLINK("keep") UPLINK("fresh");
/* An uplink without its host: conf_load() refuses the file. */
static const char conf_invalid[] = HEAD "control:\n"
                                        "  socket: @DIR@/control.sock\n"
                                        "uplinks:\n"
                                        "  - name: keep\n"
                                        "    port: @PORT@\n";

static int setup(void **state)
{
    *state = daemon_fixture_new(conf_a);
    return 0;
}

/* The names of the uplinks the status command lists, "a,b". */
static void assert_status_uplinks(struct daemon_fixture *f, const char *names)
{
    json_t *status = daemon_fixture_ask(f, "status");
    json_t *uplinks = json_object_get(status, "uplinks");
    char listed[256] = "";
    size_t used = 0;

    for (size_t i = 0; i < json_array_size(uplinks); i++)
        used += (size_t)snprintf(listed + used, sizeof(listed) - used, "%s%s", i ? "," : "",
                                 daemon_fixture_string(json_array_get(uplinks, i), "name"));
    assert_string_equal(listed, names);
    json_decref(status);
}

static void test_keep_add_remove(void **state)
{
    struct daemon_fixture *f = *state;
    struct daemon *d = &f->daemon;
    struct uplink *keep = daemon_fixture_uplink(f, "keep");
    struct conf *old_conf = d->conf;
    char spool[PATH_MAX];
    struct stat st;

    assert_non_null(keep);
    assert_non_null(daemon_fixture_uplink(f, "gone"));
    daemon_fixture_write(f, conf_b);
    daemon_reload(d);
    assert_int_equal(d->retiring_uplinks, 1); /* "gone" is stopping */

    assert_string_equal(d->reload_result, "done");
    assert_string_equal(d->reload_error, "");
    assert_int_equal(d->state, DAEMON_RUNNING);
    assert_ptr_not_equal(d->conf, old_conf);
    assert_int_equal(d->uplink_count, 2);
    assert_ptr_equal(daemon_fixture_uplink(f, "keep"), keep); /* the same session */
    assert_null(daemon_fixture_uplink(f, "gone"));
    struct uplink *fresh = daemon_fixture_uplink(f, "fresh");
    assert_non_null(fresh);
    snprintf(spool, sizeof(spool), "%s/state/spool/fresh", f->dir);
    assert_int_equal(stat(spool, &st), 0); /* its spool was opened */
    assert_status_uplinks(f, "keep,fresh");

    /* "gone" stopped in the background, and was freed when its stop was
     * complete. */
    LOOP_UNTIL(&f->loop, d->retiring_uplinks == 0, DAEMON_FIXTURE_STEPS);
    daemon_fixture_wait_uplinks(f, UPLINK_BACKOFF);
    assert_ptr_equal(daemon_fixture_uplink(f, "keep"), keep);
}

static void test_refused(void **state)
{
    struct daemon_fixture *f = *state;
    struct daemon *d = &f->daemon;
    struct uplink *keep = daemon_fixture_uplink(f, "keep");
    struct uplink *gone = daemon_fixture_uplink(f, "gone");
    struct conf *old_conf = d->conf;
    char why[PATH_MAX + 64];

    daemon_fixture_write(f, conf_invalid);
    daemon_reload(d);

    assert_string_equal(d->reload_result, "refused");
    snprintf(why, sizeof(why), "%s does not validate (see the log)", f->config_path);
    assert_string_equal(d->reload_error, why);
    assert_int_equal(d->state, DAEMON_RUNNING);
    assert_ptr_equal(d->conf, old_conf); /* the old conf, untouched */
    assert_int_equal(d->uplink_count, 2);
    assert_ptr_equal(daemon_fixture_uplink(f, "keep"), keep);
    assert_ptr_equal(daemon_fixture_uplink(f, "gone"), gone);
    assert_int_equal(d->retiring_uplinks, 0);

    json_t *status = daemon_fixture_ask(f, "status");
    json_t *last_reload = json_object_get(status, "last_reload");
    assert_string_equal(daemon_fixture_string(last_reload, "result"), "refused");
    assert_string_equal(daemon_fixture_string(last_reload, "error"), why);
    json_decref(status);
    assert_status_uplinks(f, "keep,gone");

    /* A good file afterwards is applied and clears the refusal. */
    daemon_fixture_write(f, conf_b);
    daemon_reload(d);
    assert_string_equal(d->reload_result, "done");
    assert_string_equal(d->reload_error, "");
    assert_status_uplinks(f, "keep,fresh");
}

static void test_control_socket_moves(void **state)
{
    struct daemon_fixture *f = *state;
    char moved[PATH_MAX];

    snprintf(moved, sizeof(moved), "%s/run/ctl2.sock", f->dir);
    daemon_fixture_write(f, conf_b_moved);
    daemon_reload(&f->daemon);
    assert_string_equal(f->daemon.reload_result, "done");

    /* The old socket is gone, the new one answers. */
    assert_null(daemon_fixture_ask_at(f, f->control_path, "status"));
    assert_int_equal(access(f->control_path, F_OK), -1);
    char *answer = daemon_fixture_ask_at(f, moved, "status");
    assert_non_null(answer);
    assert_non_null(strstr(answer, "\"last_reload\":{\"result\":\"done\""));
    free(answer);
    snprintf(f->control_path, sizeof(f->control_path), "%s", moved);
    assert_status_uplinks(f, "keep,fresh");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_keep_add_remove, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_refused, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_moves, setup, daemon_fixture_teardown),
    };

    return cmocka_run_group_tests(tests, daemon_fixture_group_setup, daemon_fixture_group_teardown);
}
