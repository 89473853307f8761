/* test_aws.c - the pure half of profile aws (src/profiles/aws): thing,
 * shadow and job names, AWS IoT Core's topic rules, the topics the profile
 * builds and reads, and uplinks[].aws with the rules it sets for the rest of
 * the uplink (TLS, certificate, in-flight window, ALPN on port 443). The
 * limits are those of AWS's "AWS IoT Core message broker and protocol limits
 * and quotas"; the topics those of "Reserved topics". */
#include <errno.h>
#include <limits.h>
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
#include "profile_spec.h"
#include "profiles/aws/aws.h"
#include "profiles/aws/section.h"

static void test_names(void **state)
{
    char long_name[AWS_THING_MAX + 2];

    (void)state;
    assert_null(aws_thing_name_check("gw-1:plant_a"));
    assert_non_null(aws_thing_name_check(""));
    assert_non_null(aws_thing_name_check("my thing"));
    assert_non_null(aws_thing_name_check("a/b"));
    memset(long_name, 'a', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    assert_non_null(aws_thing_name_check(long_name)); /* 129 */
    long_name[AWS_THING_MAX] = '\0';
    assert_null(aws_thing_name_check(long_name)); /* 128 */
    assert_null(aws_shadow_name_check("config"));
    assert_non_null(aws_shadow_name_check("+"));
    assert_null(aws_job_id_check("job-42_a"));
    assert_non_null(aws_job_id_check("job:42")); /* ':' is a thing-name character only */
    assert_non_null(aws_job_id_check("$next"));
}

static void test_topic_rules(void **state)
{
    char topic[300];

    (void)state;
    assert_null(aws_topic_check("dt/gw/valve-1/temp"));
    assert_null(aws_topic_check("a/b/c/d/e/f/g/h"));       /* 7 slashes */
    assert_non_null(aws_topic_check("a/b/c/d/e/f/g/h/i")); /* 8 */
    assert_null(aws_topic_check("$aws/things/gw/shadow/name/config/update"));
    assert_null(aws_topic_check("$aws/things/gw/jobs/42/update"));
    assert_null(aws_topic_check("$aws/rules/ingest/a/b/c/d/e/f/g/h")); /* Basic Ingest */
    assert_non_null(aws_topic_check("$aws/rules/ingest/a/b/c/d/e/f/g/h/i"));
    assert_null(aws_topic_check("$aws/provisioning-templates/t/provision/json"));
    assert_non_null(aws_topic_check("$aws/things/gw/tunnels/notify"));
    assert_non_null(aws_topic_check("$aws/events/presence/connected/gw"));
    assert_non_null(aws_topic_check("$aws/things//shadow/update"));
    assert_non_null(aws_topic_check("$SYS/broker"));
    memset(topic, 'a', 257);
    topic[257] = '\0';
    assert_non_null(aws_topic_check(topic));
    topic[256] = '\0';
    assert_null(aws_topic_check(topic));
}

static void test_built_topics(void **state)
{
    char buf[64];

    (void)state;
    assert_int_equal(aws_topic("dt", "gw", "valve-1", NULL, buf, sizeof(buf)), 13);
    assert_string_equal(buf, "dt/gw/valve-1");
    assert_true(aws_topic("cmd", "gw", "valve-1", "open/now", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "cmd/gw/valve-1/open/now");
    assert_true(aws_shadow_topic("gw", NULL, "get", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "$aws/things/gw/shadow/get");
    assert_true(aws_shadow_topic("gw", "config", "update/delta", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "$aws/things/gw/shadow/name/config/update/delta");
    assert_int_equal(aws_shadow_topic("gw", "config", "update", buf, 20), -ENAMETOOLONG);
}

static void test_reserved_parse(void **state)
{
    static const struct {
        const char *topic;
        enum aws_reserved_kind kind;
        const char *thing, *shadow, *what;
    } cases[] = {
        {"$aws/things/gw/shadow/get/accepted", AWS_SHADOW_DOCUMENT, "gw", "", "shadow get"},
        {"$aws/things/gw/shadow/update/delta", AWS_SHADOW_DELTA, "gw", "", "shadow update"},
        {"$aws/things/gw/shadow/update/accepted", AWS_SHADOW_ACCEPTED, "gw", "", NULL},
        {"$aws/things/v-1/shadow/update/rejected", AWS_SHADOW_REJECTED, "v-1", "", "shadow update"},
        {"$aws/things/gw/shadow/name/config/get/rejected", AWS_SHADOW_REJECTED, "gw", "config",
         "shadow config get"},
        {"$aws/things/gw/shadow/name/config/update/delta", AWS_SHADOW_DELTA, "gw", "config", NULL},
        {"$aws/things/gw/shadow/update/documents", AWS_RESERVED_NONE, "gw", "", NULL},
        {"$aws/things/gw/shadow/update", AWS_RESERVED_NONE, "gw", "", NULL},
        {"$aws/things/gw/jobs/notify-next", AWS_JOBS_NEXT, "gw", "", NULL},
        {"$aws/things/gw/jobs/$next/get/accepted", AWS_JOBS_NEXT, "gw", "", NULL},
        {"$aws/things/gw/jobs/$next/get/rejected", AWS_JOBS_REJECTED, "gw", "", "job $next get"},
        {"$aws/things/gw/jobs/start-next/accepted", AWS_JOBS_STARTED, "gw", "", NULL},
        {"$aws/things/gw/jobs/start-next/rejected", AWS_JOBS_REJECTED, "gw", "", "jobs start-next"},
        {"$aws/things/gw/jobs/42/update/accepted", AWS_JOBS_ACCEPTED, "gw", "", NULL},
        {"$aws/things/gw/jobs/42/update/rejected", AWS_JOBS_REJECTED, "gw", "", "job 42 update"},
        {"$aws/things/gw/jobs/42/update/rejected/more", AWS_RESERVED_NONE, "gw", "", NULL},
        {"$aws/things/gw/tunnels/notify", AWS_RESERVED_NONE, "gw", "", NULL},
        {"cmd/gw/v-1", AWS_RESERVED_NONE, "", "", NULL},
    };
    struct aws_reserved r;

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(aws_reserved_parse(cases[i].topic, &r), 0);
        if (r.kind != cases[i].kind)
            fail_msg("%s: kind %d, expected %d", cases[i].topic, r.kind, cases[i].kind);
        assert_string_equal(r.thing, cases[i].thing);
        assert_string_equal(r.shadow, cases[i].shadow);
        if (cases[i].what)
            assert_string_equal(r.what, cases[i].what);
    }
    assert_int_equal(aws_reserved_parse("$aws/things/bad thing/shadow/get/accepted", &r), -EINVAL);
    assert_int_equal(aws_reserved_parse("$aws/things/gw/shadow/name/a+b/get/accepted", &r),
                     -EINVAL);
}

/* Fleet provisioning's JSON: read with libyaml, written with json_buf. */
static void test_fleet_json(void **state)
{
    static const char answer[] =
        "{\"certificateId\":\"c1\",\"certificatePem\":\"-----BEGIN CERTIFICATE-----\\nAB\\n"
        "-----END CERTIFICATE-----\\n\",\"privateKey\":\"k\\u00e9\\/x\",\"n\":7,"
        "\"o\":{\"certificateOwnershipToken\":\"nested\"},\"certificateOwnershipToken\":\"t0\"}";
    static const char *const names[] = {"certificatePem", "privateKey", "certificateOwnershipToken",
                                        "n", "missing"};
    char *values[5];
    struct json_buf out;

    (void)state;
    assert_int_equal(aws_json_strings(answer, sizeof(answer) - 1, names, values, 5), 0);
    assert_string_equal(values[0], "-----BEGIN CERTIFICATE-----\nAB\n-----END CERTIFICATE-----\n");
    assert_string_equal(values[1], "k\xc3\xa9/x"); /* \u00e9 and \/ decoded */
    assert_string_equal(values[2], "t0");          /* the top level's, not the nested one */
    assert_null(values[3]);                        /* a number is not a string */
    assert_null(values[4]);
    for (int i = 0; i < 5; i++)
        free(values[i]);
    assert_int_equal(aws_json_strings("[1,2]", 5, names, values, 1), -EINVAL);
    assert_int_equal(aws_json_strings("{\"a\":", 5, names, values, 1), -EINVAL);
    assert_int_equal(aws_json_strings("certificatePem: x", 17, names, values, 1), -EINVAL);
    assert_null(values[0]);

    struct conf_aws_param params[] = {{"ThingName", "gw-1"}, {"Serial", "a\"b"}};
    json_buf_init(&out);
    aws_provision_request("tok", params, 2, &out);
    assert_false(out.failed);
    assert_string_equal(out.data, "{\"certificateOwnershipToken\":\"tok\",\"parameters\":"
                                  "{\"ThingName\":\"gw-1\",\"Serial\":\"a\\\"b\"}}");
    json_buf_deinit(&out);
}

/* --- uplinks[].aws ---------------------------------------------------------- */

static char dir[] = "/tmp/test_aws.XXXXXX";

static int setup_dir(void **state)
{
    char path[PATH_MAX];
    FILE *f;

    (void)state;
    if (!mkdtemp(dir))
        return -1;
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, i ? "dev.key" : "dev.pem");
        f = fopen(path, "w");
        if (!f)
            return -1;
        fputs("not read by conf_load\n", f);
        fclose(f);
    }
    return 0;
}

static int remove_dir(void **state)
{
    char cmd[PATH_MAX + 16];

    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* conf_load() of one aws uplink: @uplink_extra lines after host, @aws lines
 * of the aws section (NULL: none). Returns the conf or NULL with *@errors. */
static struct conf *load_aws(const char *uplink_extra, const char *aws, char **errors)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    FILE *f;

    snprintf(path, sizeof(path), "%s/uplinkd.yaml", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f,
            "gateway:\n  id: gw-1\n  state_dir: %s/state\n"
            "uplinks:\n  - name: aws\n    profile: aws\n"
            "    host: a1-ats.iot.eu-west-1.amazonaws.com\n%s",
            dir, uplink_extra);
    if (aws)
        fprintf(f, "    aws:\n%s", aws);
    fclose(f);
    *errors = NULL;
    if (conf_load(path, &conf, errors) != 0)
        return NULL;
    return conf;
}

#define CERT "    tls:\n      cert: dev.pem\n      key: dev.key\n"

static void expect_error(const char *uplink_extra, const char *aws, const char *text)
{
    char *errors = NULL;
    struct conf *conf = load_aws(uplink_extra, aws, &errors);

    if (conf != NULL)
        fail_msg("loaded, expected an error with \"%s\"", text);
    assert_non_null(errors);
    if (strstr(errors, text) == NULL)
        fail_msg("\"%s\" not in:\n%s", text, errors);
    free(errors);
}

static void test_section(void **state)
{
    char *errors = NULL;
    struct conf *conf;

    (void)state;
    /* Defaults: thing = gateway.id = client id, jobs on, no ALPN on 8883. */
    conf = load_aws(CERT, NULL, &errors);
    if (!conf)
        fail_msg("%s", errors);
    const struct conf_uplink *up = &conf->uplinks[0];
    assert_string_equal(aws_conf(up)->thing, "gw-1");
    assert_true(aws_conf(up)->jobs);
    assert_true(aws_conf(up)->child_shadows);
    assert_null(aws_conf(up)->template_name);
    assert_int_equal(aws_conf(up)->shadow_count, 0);
    assert_int_equal(up->port, 8883);
    assert_null(up->tls.alpn);
    assert_string_equal(up->client_id, "gw-1");
    conf_free(conf);

    /* Port 443: ALPN x-amzn-mqtt-ca with a certificate, mqtt for a custom
     * authorizer; an explicit tls.alpn is kept. */
    conf = load_aws("    port: 443\n" CERT, "      thing: plant-gw\n      shadows: [config]\n",
                    &errors);
    if (!conf)
        fail_msg("%s", errors);
    up = &conf->uplinks[0];
    assert_string_equal(up->tls.alpn, AWS_ALPN_MTLS);
    assert_string_equal(aws_conf(up)->thing, "plant-gw");
    assert_int_equal(aws_conf(up)->shadow_count, 1);
    assert_string_equal(aws_conf(up)->shadows[0], "config");
    assert_string_equal(up->client_id, "plant-gw");
    conf_free(conf);

    conf = load_aws("    port: 443\n    client_id: other\n    auth:\n      type: basic\n"
                    "      username: u\n      password: p\n",
                    NULL, &errors);
    if (!conf)
        fail_msg("%s", errors);
    assert_string_equal(conf->uplinks[0].tls.alpn, "mqtt");
    assert_string_equal(conf->uplinks[0].client_id, "other"); /* as configured */
    conf_free(conf);

    conf = load_aws("    port: 443\n    tls:\n      cert: dev.pem\n      key: dev.key\n"
                    "      alpn: custom\n",
                    NULL, &errors);
    if (!conf)
        fail_msg("%s", errors);
    assert_string_equal(conf->uplinks[0].tls.alpn, "custom");
    conf_free(conf);

    expect_error("", NULL, "uplinks[0].tls.cert: missing: AWS IoT Core authenticates");
    expect_error("    tls:\n      enabled: false\n", NULL, "accepts MQTT only over TLS");
    expect_error(CERT "    max_inflight: 101\n", NULL, "101 is above AWS IoT Core's limit");
    expect_error(CERT, "      thing: \"a b\"\n", "uplinks[0].aws.thing: \"a b\"");
    expect_error(CERT, "      shadows: [ok, \"a/b\"]\n", "uplinks[0].aws.shadows[1]");
    expect_error(CERT, "      jobs: maybe\n", "uplinks[0].aws.jobs");
    expect_error(CERT, "      child_shadows: 2\n", "uplinks[0].aws.child_shadows");
    expect_error(CERT, "      thingname: x\n", "uplinks[0].aws.thingname");
    expect_error(CERT, "      provisioning: {parameters: {a: b}}\n",
                 "uplinks[0].aws.provisioning.template: missing");
    expect_error(CERT, "      provisioning: {template: \"a b\"}\n",
                 "a template name is 1 to 36 characters");
    expect_error("    auth:\n      type: basic\n      username: u\n      password: p\n",
                 "      provisioning: {template: t}\n", "needs the claim certificate in tls.cert");
    expect_error(CERT, "      child_cert: /t/%c.pem\n",
                 "uplinks[0].aws.child_key: missing: a child's own certificate needs its key");
    expect_error(CERT, "      child_cert: t/%c.pem\n      child_key: /t/%c.key\n",
                 "uplinks[0].aws.child_cert: \"t/%c.pem\" is not an absolute path with %c");
    expect_error(CERT, "      session_idle: 1m\n",
                 "uplinks[0].aws.session_idle: is only used with child_cert and child_key");

    /* Children as things of their own: both patterns, idle close after 10 min. */
    conf = load_aws(CERT, "      child_cert: /t/%c.pem\n      child_key: /t/%c.key\n", &errors);
    if (!conf)
        fail_msg("%s", errors);
    assert_string_equal(aws_conf(&conf->uplinks[0])->child_cert, "/t/%c.pem");
    assert_string_equal(aws_conf(&conf->uplinks[0])->child_key, "/t/%c.key");
    assert_int_equal(aws_conf(&conf->uplinks[0])->session_idle_ms, 600000);
    conf_free(conf);
}

/* provisioning: the template, and its parameters (default {ThingName: thing}). */
static void test_section_provisioning(void **state)
{
    char *errors = NULL;
    struct conf *conf = load_aws(CERT, "      provisioning:\n        template: fleet-1\n", &errors);

    (void)state;
    if (!conf)
        fail_msg("%s", errors);
    const struct conf_aws *aws = aws_conf(&conf->uplinks[0]);
    assert_string_equal(aws->template_name, "fleet-1");
    assert_int_equal(aws->param_count, 1);
    assert_string_equal(aws->params[0].name, "ThingName");
    assert_string_equal(aws->params[0].value, "gw-1");
    conf_free(conf);

    conf = load_aws(CERT,
                    "      provisioning:\n        template: fleet-1\n"
                    "        parameters: {SerialNumber: \"0001\", ThingName: plant-7}\n",
                    &errors);
    if (!conf)
        fail_msg("%s", errors);
    aws = aws_conf(&conf->uplinks[0]);
    assert_int_equal(aws->param_count, 2);
    assert_string_equal(aws->params[0].name, "SerialNumber");
    assert_string_equal(aws->params[0].value, "0001");
    assert_string_equal(aws->params[1].value, "plant-7");
    conf_free(conf);
}

/* A changed thing, shadow list or jobs switch reconnects on reload. */
static void test_section_equal(void **state)
{
    char *errors = NULL;
    struct conf *a = load_aws(CERT, "      shadows: [config]\n", &errors);
    struct conf *b = load_aws(CERT, "      shadows: [config]\n", &errors);

    (void)state;
    assert_non_null(a);
    assert_non_null(b);
    assert_true(aws_section_equal(a->uplinks[0].section, b->uplinks[0].section));
    ((struct conf_aws *)b->uplinks[0].section)->jobs = false;
    assert_false(aws_section_equal(a->uplinks[0].section, b->uplinks[0].section));
    conf_free(b);
    b = load_aws(CERT, "      shadows: [firmware]\n", &errors);
    assert_false(aws_section_equal(a->uplinks[0].section, b->uplinks[0].section));
    conf_free(a);
    conf_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_topic_rules),
        cmocka_unit_test(test_built_topics),
        cmocka_unit_test(test_reserved_parse),
        cmocka_unit_test(test_fleet_json),
        cmocka_unit_test(test_section),
        cmocka_unit_test(test_section_provisioning),
        cmocka_unit_test(test_section_equal),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
