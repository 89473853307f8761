/* test_router.c - router.c with real uplinks that never connect: which
 * uplinks a local message reaches (routes, raw cloud/<uplink>/ topics), what
 * is refused and counted, the children list, and that every uplink gets its
 * profile instance from the router and keeps it across router_set_uplinks().
 * The uplinks' memory spools are the observable: a message the router
 * forwarded waits there (uplink_get_stats() queued). */
#include <errno.h>
#include <stdbool.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf.h"
#include "json.h"
#include "local.h"
#include "loop_step.h"
#include "profile.h"
#include "router.h"
#include "uplink.h"

struct fixture {
    uv_loop_t loop;
    char dir[64];
    char path[96];
    struct conf *conf;
    struct local *local;
    struct router router;
    struct uplink *uplinks[4];
    size_t count;
    unsigned stopped;
};

/* Two generic uplinks that never connect (nothing listens on port 1 and
 * the tests never start them); @routes: YAML for the routes key, or "". */
static void fixture_load(struct fixture *f, const char *routes)
{
    FILE *file;
    char *errors = NULL;

    snprintf(f->path, sizeof(f->path), "%s/uplinkd.yaml", f->dir);
    file = fopen(f->path, "w");
    assert_non_null(file);
    fprintf(file,
            "gateway:\n  id: gw-1\n  state_dir: %s\n"
            "uplinks:\n"
            "  - name: a\n    host: 127.0.0.1\n    port: 1\n    tls: { enabled: no }\n"
            "    spool: { durability: none }\n"
            "  - name: b\n    host: 127.0.0.1\n    port: 1\n    tls: { enabled: no }\n"
            "    spool: { durability: none }\n"
            "%s",
            f->dir, routes);
    fclose(file);
    if (conf_load(f->path, &f->conf, &errors) < 0)
        fail_msg("conf_load: %s", errors ? errors : "?");
    free(errors);
}

static void fixture_start(struct fixture *f)
{
    const struct local_hooks hooks = {.publish_cb = router_local_publish_cb, .arg = &f->router};

    assert_int_equal(local_new(&f->loop, f->conf, &hooks, &f->local), 0);
    router_init(&f->router, f->conf, f->local);
    f->count = f->conf->uplink_count;
    for (size_t i = 0; i < f->count; i++) {
        const struct uplink_hooks uh = {.message_cb = router_uplink_message_cb,
                                        .state_cb = router_uplink_state_cb,
                                        .arg = &f->router};
        assert_int_equal(
            uplink_new(&f->loop, &f->conf->uplinks[i], f->conf->gateway_id, &uh, &f->uplinks[i]),
            0);
        assert_int_equal(uplink_open_spool(f->uplinks[i], NULL), 0);
        assert_int_equal(router_attach_uplink(&f->router, f->conf, f->uplinks[i]), 0);
    }
    router_set_uplinks(&f->router, f->conf, f->uplinks, f->count, f->uplinks, f->count);
}

static int setup_plain(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_router.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    *state = f;
    return 0;
}

static void stopped_cb(struct uplink *uplink, void *arg)
{
    struct fixture *f = arg;

    (void)uplink;
    f->stopped++;
}

static void local_closed_cb(void *arg)
{
    *(bool *)arg = true;
}

static void walk_cb(uv_handle_t *handle, void *arg)
{
    (void)arg;
    if (!uv_is_closing(handle))
        print_error("open handle: %s\n", uv_handle_type_name(uv_handle_get_type(handle)));
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    char cmd[160];

    for (size_t i = 0; i < f->count; i++)
        uplink_stop(f->uplinks[i], 0, stopped_cb, f);
    LOOP_UNTIL(&f->loop, f->stopped == f->count, 100);
    for (size_t i = 0; i < f->count; i++)
        uplink_free(f->uplinks[i]);
    if (f->local) {
        bool closed = false;
        local_close(f->local, local_closed_cb, &closed);
        LOOP_UNTIL(&f->loop, closed, 100);
        local_free(f->local);
    }
    router_deinit(&f->router);
    conf_free(f->conf);
    LOOP_STEP(&f->loop, 2);
    uv_walk(&f->loop, walk_cb, NULL);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
    assert_int_equal(system(cmd), 0);
    free(f);
    return 0;
}

static size_t queued(const struct fixture *f, size_t i)
{
    struct uplink_stats stats;

    uplink_get_stats(f->uplinks[i], &stats);
    return stats.queued;
}

static int publish(struct fixture *f, const char *topic, const char *payload)
{
    return router_local_publish_cb(&f->router, "app", topic, payload, strlen(payload), 1, false);
}

/* Every uplink gets its own instance of the profile its section names. */
static void test_each_uplink_owns_a_profile(void **state)
{
    struct fixture *f = *state;

    fixture_load(f, "");
    fixture_start(f);
    for (size_t i = 0; i < f->count; i++) {
        const struct profile_instance *pi = uplink_profile(f->uplinks[i]);
        assert_non_null(pi);
        assert_string_equal(pi->profile->name, "generic");
        assert_ptr_equal(pi->uplink, f->uplinks[i]);
    }
    assert_ptr_not_equal(uplink_profile(f->uplinks[0]), uplink_profile(f->uplinks[1]));
    /* A second adoption (a reload with the same settings) keeps the instance. */
    const struct profile_instance *before = uplink_profile(f->uplinks[0]);
    router_set_uplinks(&f->router, f->conf, f->uplinks, f->count, NULL, 0);
    assert_ptr_equal(uplink_profile(f->uplinks[0]), before);
}

/* Without routes a device message goes to every uplink, once each. */
static void test_device_message_reaches_every_uplink(void **state)
{
    struct fixture *f = *state;

    fixture_load(f, "");
    fixture_start(f);
    assert_int_equal(publish(f, "dev/pump-1/telemetry", "{\"t\":1}"), 0);
    assert_int_equal(queued(f, 0), 1);
    assert_int_equal(queued(f, 1), 1);
    assert_int_equal(f->router.forwarded, 1);
    assert_int_equal(f->router.rejected, 0);
}

/* routes pick the uplinks per child; a child no route names is counted. */
static void test_routes_select_uplinks(void **state)
{
    struct fixture *f = *state;

    fixture_load(f, "routes:\n  - children: \"modbus-*\"\n    uplinks: [b]\n");
    fixture_start(f);
    assert_int_equal(publish(f, "dev/modbus-7/telemetry", "1"), 0);
    assert_int_equal(queued(f, 0), 0);
    assert_int_equal(queued(f, 1), 1);
    assert_int_equal(publish(f, "dev/other/telemetry", "2"), 0);
    assert_int_equal(queued(f, 0), 0);
    assert_int_equal(queued(f, 1), 1);
    assert_int_equal(f->router.unrouted, 1);
}

/* A raw cloud/<uplink>/<topic> goes to that uplink alone; an unknown uplink
 * or channel is refused, counted, and nothing is queued. */
static void test_raw_and_refused(void **state)
{
    struct fixture *f = *state;

    fixture_load(f, "");
    fixture_start(f);
    assert_int_equal(publish(f, "cloud/b/site/x", "raw"), 0);
    assert_int_equal(queued(f, 0), 0);
    assert_int_equal(queued(f, 1), 1);
    assert_int_equal(publish(f, "dev/pump-1/no-such-channel", "x"), 0);
    assert_int_equal(f->router.rejected, 1);
    assert_int_equal(publish(f, "cloud/nowhere/x", "x"), 0);
    assert_int_equal(f->router.rejected, 2);
    assert_int_equal(queued(f, 0), 0);
    assert_int_equal(queued(f, 1), 1);
}

/* uplinkctl children: the children seen, with their counts and uplinks. */
static void test_children_json(void **state)
{
    struct fixture *f = *state;
    struct json_buf json;

    fixture_load(f, "");
    fixture_start(f);
    assert_int_equal(publish(f, "dev/pump-2/telemetry", "1"), 0);
    assert_int_equal(publish(f, "dev/pump-1/telemetry", "1"), 0);
    assert_int_equal(publish(f, "dev/pump-1/telemetry", "2"), 0);
    json_buf_init(&json);
    router_children_json(&f->router, &json);
    assert_false(json.failed);
    char *text = strndup(json.data, json.len);
    assert_non_null(text);
    /* Sorted by id; pump-1 twice, both uplinks listed. */
    char *one = strstr(text, "\"id\":\"pump-1\",\"messages\":2");
    char *two = strstr(text, "\"id\":\"pump-2\",\"messages\":1");
    assert_non_null(one);
    assert_non_null(two);
    assert_true(one < two);
    assert_non_null(strstr(one, "{\"name\":\"a\""));
    assert_non_null(strstr(one, "{\"name\":\"b\""));
    free(text);
    json_buf_deinit(&json);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_each_uplink_owns_a_profile, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_device_message_reaches_every_uplink, setup_plain,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_routes_select_uplinks, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_raw_and_refused, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_children_json, setup_plain, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
