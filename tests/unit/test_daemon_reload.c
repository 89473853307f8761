/* test_daemon_reload.c - daemon_reload() (daemon_reload.c) on a running
 * daemon: what a new file keeps, adds and removes, a file that does not
 * validate (refused, the old conf in force), a moved control socket, and
 * the same reload with each of its allocations failed in turn
 * (fail_alloc.h): the daemon must then run either the old conf or the new
 * one whole, or take the documented way out (stop with exit code 1), and
 * leak nothing (the sanitizer run of the suite checks the leaks). */
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
#include "ctl.h"
#include "daemon_fixture.h"
#include "fail_alloc.h"
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

/* The control socket at @socket, then the uplinks. */
#define CONF(socket, uplinks) HEAD "control:\n  socket: " socket "\nuplinks:\n" uplinks

/* A: keep and gone. B: keep and fresh. */
static const char conf_a[] = CONF("@DIR@/control.sock", UPLINK("keep") UPLINK("gone"));
static const char conf_b[] = CONF("@DIR@/control.sock", UPLINK("keep") UPLINK("fresh"));
/* B with the control socket elsewhere, in a directory that does not exist
 * yet (the reload makes it). */
static const char conf_b_moved[] = CONF("@DIR@/run/ctl2.sock", UPLINK("keep") UPLINK("fresh"));
/* B with the control socket under a regular file: it cannot be made. */
static const char conf_b_unmovable[] =
    CONF("@DIR@/afile/ctl2.sock", UPLINK("keep") UPLINK("fresh"));
/* An uplink without its host: conf_load() refuses the file. */
static const char conf_invalid[] = CONF("@DIR@/control.sock", "  - name: keep\n"
                                                              "    port: @PORT@\n");

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

/* A control socket that cannot be opened where the new file says: the rest
 * of the reload applies, and the old socket stays (uplinkctl still works);
 * the next reload tries again. */
static void test_control_socket_cannot_move(void **state)
{
    struct daemon_fixture *f = *state;
    char file[PATH_MAX], moved[PATH_MAX];

    snprintf(file, sizeof(file), "%s/afile", f->dir);
    FILE *out = fopen(file, "w");
    assert_non_null(out);
    fclose(out);
    daemon_fixture_write(f, conf_b_unmovable);
    daemon_reload(&f->daemon);
    assert_string_equal(f->daemon.reload_result, "done");
    assert_non_null(f->daemon.ctl);
    assert_string_equal(ctl_path(f->daemon.ctl), f->control_path);
    assert_status_uplinks(f, "keep,fresh"); /* at the old path */

    /* The same file once the way is clear: now it moves. */
    assert_int_equal(unlink(file), 0);
    daemon_reload(&f->daemon);
    snprintf(moved, sizeof(moved), "%s/afile/ctl2.sock", f->dir);
    assert_string_equal(ctl_path(f->daemon.ctl), moved);
    assert_null(daemon_fixture_ask_at(f, f->control_path, "status"));
    snprintf(f->control_path, sizeof(f->control_path), "%s", moved);
    assert_status_uplinks(f, "keep,fresh");
}

/* After a reload whose allocation @i failed: one whole conf, or the stop.
 * Checked at the daemon's level (conf, uplinks, control socket); a failed
 * allocation inside an uplink's start, the router or a profile instance is
 * tolerated there (a start retries, a status message is skipped) and is
 * not looked into here. */
static void assert_consistent(struct daemon_fixture *f, struct conf *old_conf, struct uplink *keep,
                              size_t i)
{
    struct daemon *d = &f->daemon;

    if (d->state == DAEMON_STOPPING) {
        /* An uplink of the new conf could not be created: the documented
         * way out is to stop with a failure (systemd restarts). */
        assert_int_equal(d->exit_code, 1);
        assert_null(d->ctl);
        return;
    }
    assert_int_equal(d->state, DAEMON_RUNNING);
    assert_non_null(d->reload_result);
    if (strcmp(d->reload_result, "refused") == 0) {
        assert_ptr_equal(d->conf, old_conf);
        assert_ptr_equal(daemon_fixture_uplink(f, "keep"), keep);
        assert_non_null(daemon_fixture_uplink(f, "gone"));
        assert_status_uplinks(f, "keep,gone");
        return;
    }
    if (strcmp(d->reload_result, "done") != 0)
        fail_msg("allocation %zu: reload_result \"%s\"", i, d->reload_result);
    assert_ptr_not_equal(d->conf, old_conf);
    assert_ptr_equal(daemon_fixture_uplink(f, "keep"), keep);
    assert_non_null(daemon_fixture_uplink(f, "fresh"));
    /* The control socket answers, at the new path or (when the failed
     * allocation was its move) still at the old one. */
    if (d->ctl == NULL)
        fail_msg("allocation %zu: reload done, but the control socket is closed", i);
    snprintf(f->control_path, sizeof(f->control_path), "%s", ctl_path(d->ctl));
    assert_status_uplinks(f, "keep,fresh");
}

static void test_fail_each_allocation(void **state)
{
    struct daemon_fixture *f = *state;
    size_t total;

    /* The good run, counted (the setup's daemon, conf A -> B moved). */
    daemon_fixture_write(f, conf_b_moved);
    fail_alloc_at(0);
    daemon_reload(&f->daemon);
    total = fail_alloc_count();
    assert_string_equal(f->daemon.reload_result, "done");
    assert_true(total > 10);
    print_message("reload: failing each of %zu allocations\n", total);

    for (size_t i = 1; i <= total; i++) {
        struct daemon_fixture *g = daemon_fixture_new(conf_a);
        struct conf *old_conf = g->daemon.conf;
        struct uplink *keep = daemon_fixture_uplink(g, "keep");
        daemon_fixture_write(g, conf_b_moved);

        fail_alloc_at(i);
        daemon_reload(&g->daemon);
        bool fired = fail_alloc_fired();
        fail_alloc_at(0);
        assert_true(fired); /* the run allocates as the counted one did */

        assert_consistent(g, old_conf, keep, i);
        daemon_fixture_free(g);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_keep_add_remove, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_refused, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_moves, setup, daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_cannot_move, setup,
                                        daemon_fixture_teardown),
        cmocka_unit_test_setup_teardown(test_fail_each_allocation, setup, daemon_fixture_teardown),
    };

    return cmocka_run_group_tests(tests, daemon_fixture_group_setup, daemon_fixture_group_teardown);
}
