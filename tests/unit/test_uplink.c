/* test_uplink.c - uplink.h on a real loop, without a broker: what it takes
 * and refuses before it is online, a connection attempt to a port where
 * nothing listens (refused, explained, backed off), stopping from each of
 * those states, and the profile instance it owns (made by
 * uplink_set_profile(), closed when it stops). The integration tests run it
 * against real brokers. */
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf.h"
#include "loop_step.h"
#include "profile.h"
#include "uplink.h"

struct fixture {
    uv_loop_t loop;
    char dir[64];
    struct conf *conf;
    struct uplink *uplink;
    unsigned stopped;
};

/* A loopback port that was free a moment ago: connecting to it is refused. */
static int closed_port(void)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&addr, &len), 0);
    close(fd);
    return ntohs(addr.sin_port);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    char path[96], *errors = NULL;
    FILE *file;

    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_uplink.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(path, sizeof(path), "%s/uplinkd.yaml", f->dir);
    file = fopen(path, "w");
    assert_non_null(file);
    fprintf(file,
            "gateway:\n  id: gw-1\n  state_dir: %s\n"
            "uplinks:\n"
            "  - name: cloud\n    host: 127.0.0.1\n    port: %d\n    tls: { enabled: no }\n"
            "    spool: { durability: none }\n    reconnect: { base: 10s, cap: 10s }\n",
            f->dir, closed_port());
    fclose(file);
    if (conf_load(path, &f->conf, &errors) < 0)
        fail_msg("conf_load: %s", errors ? errors : "?");
    free(errors);
    assert_int_equal(
        uplink_new(&f->loop, &f->conf->uplinks[0], f->conf->gateway_id, NULL, &f->uplink), 0);
    *state = f;
    return 0;
}

static void stopped_cb(struct uplink *uplink, void *arg)
{
    struct fixture *f = arg;

    assert_int_equal(uplink_get_state(uplink), UPLINK_STOPPED);
    f->stopped++;
}

static void stop(struct fixture *f)
{
    uplink_stop(f->uplink, 0, stopped_cb, f);
    LOOP_UNTIL(&f->loop, f->stopped == 1, 100);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    char cmd[160];

    if (f->stopped == 0)
        stop(f); /* legal in every state; an uplink that took messages has timers */
    uplink_free(f->uplink);
    conf_free(f->conf);
    LOOP_STEP(&f->loop, 2);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
    assert_int_equal(system(cmd), 0);
    free(f);
    return 0;
}

/* Offline: QoS 1 waits in the spool, QoS 0 is dropped and counted, and
 * what can never be sent is refused with the errno that says why. */
static void test_offline_publish(void **state)
{
    struct fixture *f = *state;
    struct uplink_stats stats;

    assert_int_equal(uplink_get_state(f->uplink), UPLINK_IDLE);
    assert_int_equal(uplink_publish(f->uplink, "t/1", "a", 1, 1, false), 0);
    assert_int_equal(uplink_publish(f->uplink, "t/1", "b", 1, 0, false), 0);
    assert_int_equal(uplink_publish(f->uplink, "t/+", "c", 1, 1, false), -EINVAL);
    assert_int_equal(uplink_publish(f->uplink, "t/1", "d", 1, 3, false), -EINVAL);
    assert_int_equal(uplink_publish(f->uplink, "", "e", 1, 1, false), -EINVAL);
    uplink_get_stats(f->uplink, &stats);
    assert_int_equal(stats.queued, 1);
    assert_int_equal(stats.dropped_qos0, 1);
    assert_int_equal(stats.published, 0);
}

/* Control messages: a per-connection one needs a connection; bad ones are
 * refused; subscriptions are checked and remembered. */
static void test_control_and_subscriptions(void **state)
{
    struct fixture *f = *state;

    assert_int_equal(uplink_publish_control(f->uplink, "s/us", "100", 3, 1,
                                            UPLINK_CONTROL_CONNECTION, NULL, NULL),
                     -ENOTCONN);
    assert_int_equal(uplink_publish_control(f->uplink, "s/us", "100", 3, 2, 0, NULL, NULL),
                     -EINVAL);
    assert_int_equal(uplink_publish_control(f->uplink, "s/us", "101", 3, 1, 0, NULL, NULL), 0);
    assert_int_equal(uplink_subscribe(f->uplink, "a/#/b", 1), -EINVAL);
    assert_int_equal(uplink_subscribe(f->uplink, "a/#", 1), 0);
    assert_int_equal(uplink_unsubscribe(f->uplink, "a/#"), 0);
    assert_int_equal(uplink_unsubscribe(f->uplink, "a/#"), -ENOENT);
}

/* A refused TCP connect: the attempt fails with the reason in words and
 * the uplink backs off; the queued message stays; a second start is
 * refused; stopping from BACKOFF finishes. */
static void test_refused_connect_backs_off(void **state)
{
    struct fixture *f = *state;
    struct uplink_stats stats;

    assert_int_equal(uplink_publish(f->uplink, "t/1", "a", 1, 1, false), 0);
    assert_int_equal(uplink_start(f->uplink), 0);
    assert_int_equal(uplink_get_state(f->uplink), UPLINK_RESOLVING);
    assert_int_equal(uplink_start(f->uplink), -EALREADY);
    LOOP_UNTIL(&f->loop, uplink_get_state(f->uplink) == UPLINK_BACKOFF, 200);
    assert_non_null(strstr(uplink_last_error(f->uplink), "refused"));
    assert_non_null(strstr(uplink_last_error(f->uplink), "127.0.0.1"));
    uplink_get_stats(f->uplink, &stats);
    assert_int_equal(stats.queued, 1);
    assert_int_equal(stats.connects, 0);
    stop(f);
    assert_int_equal(uplink_publish(f->uplink, "t/1", "late", 4, 1, false), -ESHUTDOWN);
}

/* Stopping while the threadpool still connects waits for it. */
static void test_stop_while_resolving(void **state)
{
    struct fixture *f = *state;

    assert_int_equal(uplink_start(f->uplink), 0);
    assert_int_equal(uplink_get_state(f->uplink), UPLINK_RESOLVING);
    stop(f);
    assert_int_equal(uplink_get_state(f->uplink), UPLINK_STOPPED);
}

/* The profile instance: made for the uplink, reached through its port,
 * kept across a second call with the same profile, closed by the stop. */
static void test_owns_its_profile(void **state)
{
    struct fixture *f = *state;
    const struct profile_instance *pi;

    assert_null(uplink_profile(f->uplink));
    assert_int_equal(uplink_set_profile(f->uplink, profile_find("generic"), f->conf, NULL, NULL),
                     0);
    pi = uplink_profile(f->uplink);
    assert_non_null(pi);
    assert_ptr_equal(pi->uplink, f->uplink);
    assert_int_equal(pi->port->state(pi->uplink), UPLINK_IDLE);
    assert_int_equal(uplink_set_profile(f->uplink, profile_find("generic"), f->conf, NULL, NULL),
                     0);
    assert_ptr_equal(uplink_profile(f->uplink), pi);
    assert_int_equal(uplink_start(f->uplink), 0);
    stop(f);
    assert_true(pi->closing);
    assert_true(pi->closed);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_offline_publish, setup, teardown),
        cmocka_unit_test_setup_teardown(test_control_and_subscriptions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_connect_backs_off, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_while_resolving, setup, teardown),
        cmocka_unit_test_setup_teardown(test_owns_its_profile, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
