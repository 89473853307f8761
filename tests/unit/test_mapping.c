/* test_mapping.c - the local topic contract and the generic profile's mapping. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "mapping.h"

static void test_parse_dev_telemetry(void **state)
{
    struct mapping_local m;
    const char *reason = NULL;

    assert_int_equal(mapping_parse_local("dev", "dev/pump-1/telemetry", &m, &reason), 0);
    assert_int_equal(m.kind, MAPPING_DEV);
    assert_string_equal(m.child, "pump-1");
    assert_int_equal(m.channel, MAPPING_TELEMETRY);
    assert_null(m.sub);

    assert_int_equal(mapping_parse_local("dev", "dev/pump-1/telemetry/flow/x", &m, &reason), 0);
    assert_string_equal(m.sub, "flow/x");
    assert_int_equal(mapping_parse_local("site/dev", "site/dev/a.b/state", &m, &reason), 0);
    assert_int_equal(m.channel, MAPPING_STATE);
    assert_string_equal(m.child, "a.b");
}

static void test_parse_local_only(void **state)
{
    struct mapping_local m;

    assert_int_equal(mapping_parse_local("dev", "factory/line1", &m, NULL), 0);
    assert_int_equal(m.kind, MAPPING_LOCAL_ONLY);
    /* "device/..." shares the letters but not the level */
    assert_int_equal(mapping_parse_local("dev", "device/x/telemetry", &m, NULL), 0);
    assert_int_equal(m.kind, MAPPING_LOCAL_ONLY);
    assert_int_equal(mapping_parse_local("dev", "dev", &m, NULL), 0);
    assert_int_equal(m.kind, MAPPING_LOCAL_ONLY);
}

static void test_parse_rejects(void **state)
{
    static const char *const bad[] = {
        "dev/pump-1",             /* no channel */
        "dev//telemetry",         /* empty child */
        "dev/pump,1/telemetry",   /* CSV comma */
        "dev/pump 1/telemetry",   /* space */
        "dev/pump\x01/telemetry", /* control character */
        "dev/p\"q/telemetry",     /* quote */
        "dev/pump-1/telemetr",    /* unknown channel */
        "dev/pump-1/telemetry/",  /* empty sub-topic */
        "cloud//x",               /* empty uplink */
        "cloud/up",               /* no cloud topic */
        "cloud/up/",              /* empty cloud topic */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct mapping_local m;
        const char *reason = NULL;
        assert_int_equal(mapping_parse_local("dev", bad[i], &m, &reason), -EINVAL);
        assert_non_null(reason);
    }
    char long_child[300] = "dev/";
    memset(long_child + 4, 'a', 256);
    strcpy(long_child + 260, "/telemetry");
    struct mapping_local m;
    const char *reason = NULL;
    assert_int_equal(mapping_parse_local("dev", long_child, &m, &reason), -EINVAL);
    assert_string_equal(reason, "the child id is longer than 255 bytes");
}

static void test_parse_raw(void **state)
{
    struct mapping_local m;

    assert_int_equal(mapping_parse_local("dev", "cloud/hive/a/b/c", &m, NULL), 0);
    assert_int_equal(m.kind, MAPPING_RAW);
    assert_string_equal(m.uplink, "hive");
    assert_string_equal(m.cloud_topic, "a/b/c");
}

static void test_generic_up(void **state)
{
    struct mapping_local m;
    char buf[128];
    const char *reason = NULL;

    assert_int_equal(mapping_parse_local("dev", "dev/s1/telemetry/temp", &m, NULL), 0);
    assert_int_equal(mapping_generic_up("gw-1", &m, buf, sizeof(buf), &reason),
                     (int)strlen("gw-1/s1/telemetry/temp"));
    assert_string_equal(buf, "gw-1/s1/telemetry/temp");
    assert_int_equal(mapping_generic_up("", &m, buf, sizeof(buf), &reason), 17);
    assert_string_equal(buf, "s1/telemetry/temp");
    assert_int_equal(mapping_generic_up("gw-1", &m, buf, 10, &reason), -ENAMETOOLONG);

    assert_int_equal(mapping_parse_local("dev", "dev/s1/smartrest", &m, NULL), 0);
    assert_int_equal(mapping_generic_up("gw-1", &m, buf, sizeof(buf), &reason), -EINVAL);
    assert_non_null(reason);
    assert_int_equal(mapping_parse_local("dev", "dev/s1/commands", &m, NULL), 0);
    assert_int_equal(mapping_generic_up("gw-1", &m, buf, sizeof(buf), &reason), -EINVAL);
}

static void test_generic_down(void **state)
{
    char buf[128];

    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/s1/commands", buf, sizeof(buf)), 15);
    assert_string_equal(buf, "dev/s1/commands");
    assert_true(mapping_generic_down("dev", "gw-1", "gw-1/s1/commands/reboot", buf, sizeof(buf)) >
                0);
    assert_string_equal(buf, "dev/s1/commands/reboot");
    assert_true(mapping_generic_down("dev", "gw-1", "gw-1/s1/config", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "dev/s1/config");
    /* not device topics */
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/s1/config/x", buf, sizeof(buf)), 0);
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/s1/telemetry", buf, sizeof(buf)), 0);
    assert_int_equal(mapping_generic_down("dev", "gw-1", "other/s1/commands", buf, sizeof(buf)), 0);
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1x/s1/commands", buf, sizeof(buf)), 0);
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/s1", buf, sizeof(buf)), 0);
    /* a bad child id from the cloud is refused, not forwarded */
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/a,b/commands", buf, sizeof(buf)),
                     -EINVAL);
    assert_int_equal(mapping_generic_down("dev", "gw-1", "gw-1/s1/commands", buf, 8),
                     -ENAMETOOLONG);
}

static void test_raw_filter(void **state)
{
    char uplink[65];
    const char *filter = NULL;

    assert_int_equal(mapping_raw_filter("cloud/hive/sensors/#", uplink, &filter), 0);
    assert_string_equal(uplink, "hive");
    assert_string_equal(filter, "sensors/#");
    assert_int_equal(mapping_raw_filter("dev/+/config", uplink, &filter), -ENOENT);
    assert_int_equal(mapping_raw_filter("cloud/+/x", uplink, &filter), -EINVAL);
    assert_int_equal(mapping_raw_filter("cloud/#", uplink, &filter), -EINVAL);
    assert_int_equal(mapping_raw_filter("cloud/hive", uplink, &filter), -EINVAL);

    char buf[32];
    assert_int_equal(mapping_raw_local("hive", "a/b", buf, sizeof(buf)), 14);
    assert_string_equal(buf, "cloud/hive/a/b");
    assert_int_equal(mapping_raw_local("hive", "a/b", buf, 14), -ENAMETOOLONG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_dev_telemetry), cmocka_unit_test(test_parse_local_only),
        cmocka_unit_test(test_parse_rejects),       cmocka_unit_test(test_parse_raw),
        cmocka_unit_test(test_generic_up),          cmocka_unit_test(test_generic_down),
        cmocka_unit_test(test_raw_filter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
