/* test_profile.c - the profile framework, the generic template rules, the
 * child registry and the Cumulocity profile, without a network: the uplink
 * API the profiles call is stubbed here and records what they send. */
#include <errno.h>
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
#include "profiles/akenza/section.h"
#include "profiles/cumulocity/section.h"
#include "profiles/gcp/section.h"
#include "profiles/generic/section.h"
#include "profile_spec.h"
#include "profile.h"
#include "registry.h"
#include "smartrest.h"
#include "fake_port.h"
#include "uplink.h"

/* --- uplink stubs --------------------------------------------------------- */

struct sent {
    char topic[256];
    char payload[20000];
    size_t len;
    int qos;
    unsigned flags;
    void (*done_cb)(void *arg, int status);
    void *arg;
};

static struct sent sent[64];
static size_t sent_count;
static char subscribed[16][256];
static size_t subscribed_count;
static int reconnects;
static enum uplink_state fake_state = UPLINK_ONLINE;

int fake_publish_control(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, unsigned flags, void (*done_cb)(void *arg, int status), void *arg)
{
    struct sent *s = &sent[sent_count++];
    assert_true(sent_count <= 64);
    snprintf(s->topic, sizeof(s->topic), "%s", topic);
    memcpy(s->payload, payload, len);
    s->payload[len] = '\0';
    s->len = len;
    s->qos = qos;
    s->flags = flags;
    s->done_cb = done_cb;
    s->arg = arg;
    return 0;
}

int fake_subscribe(struct uplink *uplink, const char *filter, int qos)
{
    snprintf(subscribed[subscribed_count++], 256, "%s", filter);
    return 0;
}

int fake_unsubscribe(struct uplink *uplink, const char *filter)
{
    for (size_t i = 0; i < subscribed_count; i++) {
        if (strcmp(subscribed[i], filter) == 0) {
            memcpy(subscribed[i], subscribed[--subscribed_count], 256);
            return 0;
        }
    }
    return -ENOENT;
}

enum uplink_state fake_get_state(const struct uplink *uplink)
{
    return fake_state;
}

void fake_reconnect(struct uplink *uplink, const char *reason)
{
    reconnects++;
}

/* Called only by other profiles linked into this test (profiles/gcp/gcp.c). */
int fake_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len, int qos,
                 bool retain)
{
    return -ENOTSUP;
}

void fake_get_stats(const struct uplink *uplink, struct uplink_stats *out)
{
    memset(out, 0, sizeof(*out));
}

/* --- helpers ----------------------------------------------------------------- */

static char delivered[16][2][1024];
static size_t delivered_count;

static void deliver_cb(void *arg, const char *topic, const void *payload, size_t len, int qos,
                       bool retain)
{
    snprintf(delivered[delivered_count][0], 1024, "%s", topic);
    snprintf(delivered[delivered_count][1], 1024, "%.*s", (int)len, (const char *)payload);
    delivered_count++;
}

static void reset(void)
{
    sent_count = subscribed_count = delivered_count = 0;
    reconnects = 0;
}

static char state_dir[] = "/tmp/uplinkd-test-profile-XXXXXX";

static struct conf_cumulocity c8y_section;

static void conf_c8y(struct conf *conf, struct conf_uplink *uc)
{
    static struct conf_c8y_child rules[] = {
        {.match = "sensor-*", .parent = "plc-1", .name = "Sensor {child}", .type = "c8y_Sensor"},
    };
    static char *ops[] = {"c8y_Restart", "c8y_Command"};

    memset(conf, 0, sizeof(*conf));
    memset(uc, 0, sizeof(*uc));
    memset(&c8y_section, 0, sizeof(c8y_section));
    uc->spec = &profile_spec_cumulocity;
    uc->section = &c8y_section;
    conf->gateway_id = "gw";
    conf->state_dir = state_dir;
    conf->local.topic_prefix = "dev";
    uc->name = "c8y";
    uc->profile = "cumulocity";
    uc->clean_session = false;
    uc->auth.type = CONF_AUTH_BASIC;
    uc->auth.username = "user";
    uc->auth.password = "pw";
    c8y_section.device_id = "gw";
    c8y_section.template_id = "tmpl";
    c8y_section.tenant = "t1";
    c8y_section.name = "Gateway";
    c8y_section.type = "c8y_MQTTDevice";
    c8y_section.supported_operations = ops;
    c8y_section.supported_operation_count = 2;
    c8y_section.required_interval_min = 10;
    c8y_section.will = true;
    c8y_section.will_topic = "s/us";
    c8y_section.will_message = "400,c8y_ConnectionEvent,\"Device connection was lost.\"";
    c8y_section.children = rules;
    c8y_section.child_count = 1;
}

static struct profile_instance *c8y_new(struct conf *conf, struct conf_uplink *uc)
{
    struct profile_instance *pi = NULL;

    conf_c8y(conf, uc);
    reset();
    assert_int_equal(profile_instance_new(uv_default_loop(), conf, uc, profile_find(uc->profile),
                                          (struct uplink *)conf, &fake_port, &pi),
                     0);
    pi->deliver = deliver_cb;
    return pi;
}

static void closed_cb(struct profile_instance *pi)
{
}

static void c8y_free(struct profile_instance *pi)
{
    profile_instance_close(pi, closed_cb);
    uv_run(uv_default_loop(), UV_RUN_DEFAULT);
    profile_instance_free(pi);
}

static struct mapping_local dev(const char *child, enum mapping_channel channel)
{
    struct mapping_local m;
    memset(&m, 0, sizeof(m));
    m.kind = MAPPING_DEV;
    snprintf(m.child, sizeof(m.child), "%s", child);
    m.channel = channel;
    return m;
}

/* --- generic templates ----------------------------------------------------- */

static void test_template_expand(void **unused)
{
    char buf[128];
    const char *reason = NULL;

    assert_int_equal(
        profile_template_expand("gw/{child}/t/{sub}", "p1", "flow/x", buf, sizeof(buf), &reason),
        strlen("gw/p1/t/flow/x"));
    assert_string_equal(buf, "gw/p1/t/flow/x");
    assert_true(
        profile_template_expand("gw/{child}/t/{sub}", "p1", NULL, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "gw/p1/t");
    assert_true(profile_template_expand("{child}", "p1", NULL, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "p1");
    assert_int_equal(profile_template_expand("x/{child}", "p1", "s", buf, sizeof(buf), &reason),
                     -EINVAL);
    assert_non_null(strstr(reason, "{sub}"));
    assert_int_equal(profile_template_expand("gw/{child}", "p1", NULL, buf, 4, &reason),
                     -ENAMETOOLONG);
}

static void test_template_filter_and_match(void **unused)
{
    char buf[128], child[MAPPING_CHILD_MAX + 1];
    const char *sub;

    assert_true(profile_template_filter("gw/{child}/cmd/{sub}", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "gw/+/cmd/#");
    assert_true(profile_template_filter("cfg/{child}", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "cfg/+");

    assert_int_equal(profile_template_match("gw/{child}/cmd/{sub}", "gw/p1/cmd/a/b", child, &sub),
                     1);
    assert_string_equal(child, "p1");
    assert_string_equal(sub, "a/b");
    assert_int_equal(profile_template_match("gw/{child}/cmd/{sub}", "gw/p1/cmd", child, &sub), 1);
    assert_null(sub);
    assert_int_equal(profile_template_match("gw/{child}/cmd/{sub}", "gw/p1/other", child, &sub), 0);
    assert_int_equal(profile_template_match("cfg/{child}", "cfg/p2", child, &sub), 1);
    assert_string_equal(child, "p2");
    assert_int_equal(profile_template_match("cfg/{child}", "cfg/p2/x", child, &sub), 0);
    assert_int_equal(profile_template_match("cfg/{child}", "cfg", child, &sub), 0);
    assert_int_equal(profile_template_match("cfg/{child}", "cfg/a,b", child, &sub), -EINVAL);
}

/* --- Cumulocity -------------------------------------------------------------- */

static void test_c8y_session(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi = c8y_new(&conf, &uc);
    struct uplink_session s;

    memset(&s, 0, sizeof(s));
    pi->profile->session_cb(pi, &s);
    assert_string_equal(s.client_id, "d:gw:tmpl");
    assert_true(s.clean_session);
    assert_string_equal(s.username, "t1/user");
    assert_string_equal(s.password, "pw");
    assert_string_equal(s.will_topic, "s/us");
    assert_memory_equal(s.will_payload, "400,c8y_ConnectionEvent,\"Device connection was lost.\"",
                        s.will_len);
    assert_false(s.hold_spool);
    /* s/ds, s/e and the template's s/dc/<X-ID>. */
    assert_int_equal(subscribed_count, 3);
    assert_string_equal(pi->spec->child_check("a:b") ? "refused" : "ok", "refused");
    assert_null(pi->spec->child_check("a-b"));
    c8y_free(pi);
}

static void test_c8y_startup_messages(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi = c8y_new(&conf, &uc);

    profile_instance_online(pi);
    assert_int_equal(sent_count, 3);
    assert_string_equal(sent[0].payload, "100,Gateway,c8y_MQTTDevice");
    assert_string_equal(sent[1].payload, "114,c8y_Restart,c8y_Command");
    assert_string_equal(sent[2].payload, "117,10");
    for (size_t i = 0; i < 3; i++) {
        assert_string_equal(sent[i].topic, "s/us");
        assert_int_equal(sent[i].flags & UPLINK_CONTROL_CONNECTION, UPLINK_CONTROL_CONNECTION);
    }
    c8y_free(pi);
}

static void test_c8y_registration_once_and_nested(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi = c8y_new(&conf, &uc);
    const char *reason = NULL;

    /* The gateway itself is never registered by 101. */
    assert_int_equal(profile_register_child(pi, "gw", &reason), 0);
    assert_int_equal(sent_count, 0);
    assert_int_equal(profile_register_child(pi, "child-a", &reason), 0);
    assert_int_equal(sent_count, 1);
    assert_string_equal(sent[0].topic, "s/us");
    assert_string_equal(sent[0].payload, "101,child-a,child-a,c8y_MQTTChildDevice");
    assert_true(sent[0].flags & UPLINK_CONTROL_GATE);
    assert_false(sent[0].flags & UPLINK_CONTROL_CONNECTION);
    /* Pending: not sent again. */
    assert_int_equal(profile_register_child(pi, "child-a", &reason), 0);
    assert_int_equal(sent_count, 1);
    sent[0].done_cb(sent[0].arg, 0);
    assert_int_equal(registry_get(pi->registry, "child-a"), REGISTRY_DONE);

    /* Nested: the parent first, on s/us; the child on s/us/<parent>. */
    assert_int_equal(profile_register_child(pi, "sensor-1", &reason), 0);
    assert_int_equal(sent_count, 3);
    assert_string_equal(sent[1].topic, "s/us");
    assert_string_equal(sent[1].payload, "101,plc-1,plc-1,c8y_MQTTChildDevice");
    assert_string_equal(sent[2].topic, "s/us/plc-1");
    assert_string_equal(sent[2].payload, "101,sensor-1,Sensor sensor-1,c8y_Sensor");
    /* Leave sensor-1 pending: a restart queues it again. */
    sent[1].done_cb(sent[1].arg, 0);
    c8y_free(pi);

    pi = c8y_new(&conf, &uc);
    assert_int_equal(registry_get(pi->registry, "child-a"), REGISTRY_DONE);
    assert_int_equal(sent_count, 1);
    assert_string_equal(sent[0].payload, "101,sensor-1,Sensor sensor-1,c8y_Sensor");
    assert_int_equal(profile_register_child(pi, "child-a", &reason), 0);
    assert_int_equal(sent_count, 1);
    c8y_free(pi);
}

static void test_c8y_upstream(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi = c8y_new(&conf, &uc);
    struct profile_msgs out;
    const char *reason = NULL;
    struct mapping_local m = dev("child-a", MAPPING_TELEMETRY);
    const char *json = "{\"c8y_Temperature\": {\"T\": {\"value\": 21.5, \"unit\": \"C\"}}}";

    profile_msgs_init(&out);
    assert_int_equal(pi->profile->up_cb(pi, &m, json, strlen(json), 1, false, &out, &reason), 0);
    assert_int_equal(out.count, 1);
    assert_string_equal(out.msg[0].topic, "s/us/child-a");
    assert_string_equal(out.msg[0].payload, "200,c8y_Temperature,T,21.5,C");
    profile_msgs_deinit(&out);

    /* The gateway: plain s/us; SmartREST passes through. */
    m = dev("gw", MAPPING_SMARTREST);
    assert_int_equal(pi->profile->up_cb(pi, &m, "400,c8y_E,\"a, b\"", 16, 0, true, &out, &reason),
                     0);
    assert_string_equal(out.msg[0].topic, "s/us");
    assert_string_equal(out.msg[0].payload, "400,c8y_E,\"a, b\"");
    assert_false(out.msg[0].retain);
    profile_msgs_deinit(&out);

    /* Broken JSON and broken CSV are refused with a reason. */
    m = dev("child-a", MAPPING_TELEMETRY);
    pi->reason[0] = '\0';
    assert_int_equal(pi->profile->up_cb(pi, &m, "{\"t\":", 5, 1, false, &out, &reason), -EINVAL);
    assert_int_equal(out.count, 0);
    assert_true(strlen(pi->reason) > 0);
    m = dev("child-a", MAPPING_SMARTREST);
    assert_int_equal(pi->profile->up_cb(pi, &m, "200,\"x", 6, 1, false, &out, &reason), -EINVAL);
    assert_int_equal(out.count, 0);

    /* Many lines: packed into PUBLISHes of at most 16184 bytes. */
    size_t cap = 50000, used = 0;
    char *big = malloc(cap);
    for (int i = 0; i < 400; i++)
        used += (size_t)snprintf(big + used, cap - used, "%s400,c8y_E,%04d-%0100d", i ? "\n" : "",
                                 i, 0);
    assert_int_equal(pi->profile->up_cb(pi, &m, big, used, 1, false, &out, &reason), 0);
    assert_true(out.count >= 3);
    size_t lines = 0;
    for (size_t i = 0; i < out.count; i++) {
        size_t size = 0;
        assert_int_equal(smartrest_publish_size(strlen(out.msg[i].topic), out.msg[i].len, 1, &size),
                         0);
        assert_true(size <= SMARTREST_MAX_PACKET);
        for (size_t j = 0; j < out.msg[i].len; j++)
            lines += ((char *)out.msg[i].payload)[j] == '\n';
        lines++;
    }
    assert_int_equal(lines, 400);
    profile_msgs_deinit(&out);

    /* One line that cannot fit: refused, nothing sent. */
    memset(big, 'y', 17000);
    memcpy(big, "400,c8y_E,", 10);
    assert_int_equal(pi->profile->up_cb(pi, &m, big, 17000, 1, false, &out, &reason), -EINVAL);
    assert_int_equal(out.count, 0);
    free(big);
    c8y_free(pi);
}

static void test_c8y_downstream(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi = c8y_new(&conf, &uc);
    struct profile_msgs local;
    const char *ops = "510,child-a\n511,gw,\"ls\nand \\\"this\\\"\"\n510,bad/id";

    profile_msgs_init(&local);
    pi->profile->down_cb(pi, "s/ds", ops, strlen(ops), 1, false, &local);
    assert_int_equal(local.count, 2);
    assert_string_equal(local.msg[0].topic, "dev/child-a/operations");
    assert_string_equal(local.msg[0].payload, "510,child-a");
    assert_string_equal(local.msg[1].topic, "dev/gw/operations");
    assert_string_equal(local.msg[1].payload, "511,gw,\"ls\nand \\\"this\\\"\"");
    assert_int_equal(delivered_count, 1); /* the bad child id, on errors */
    assert_string_equal(delivered[0][0], "uplinkd/c8y/errors");
    profile_msgs_deinit(&local);

    /* Custom template responses: s/dc/<X-ID>. */
    pi->profile->down_cb(pi, "s/dc/tmpl", "999,child-b,x", 13, 1, false, &local);
    assert_int_equal(local.count, 1);
    assert_string_equal(local.msg[0].topic, "dev/child-b/operations");
    profile_msgs_deinit(&local);

    delivered_count = 0;
    pi->profile->down_cb(pi, "s/e", "41,100,Device already existing", 30, 0, false, &local);
    assert_int_equal(local.count, 0);
    assert_int_equal(delivered_count, 1);
    assert_string_equal(delivered[0][0], "uplinkd/c8y/errors");
    assert_non_null(strstr(delivered[0][1], "\"error\":\"41,100,Device already existing\""));
    c8y_free(pi);
}

static void test_c8y_bootstrap(void **unused)
{
    struct conf conf;
    struct conf_uplink uc;
    struct profile_instance *pi;
    struct uplink_session s;
    char path[512];

    conf_c8y(&conf, &uc);
    uc.auth.type = CONF_AUTH_NONE;
    c8y_section.bootstrap = true;
    c8y_section.bootstrap_user = "management/devicebootstrap";
    c8y_section.bootstrap_password = "bs";
    c8y_section.bootstrap_interval_ms = 1000;
    snprintf(path, sizeof(path), "%s/credentials/c8y", state_dir);
    unlink(path);
    reset();
    assert_int_equal(profile_instance_new(uv_default_loop(), &conf, &uc, profile_find(uc.profile),
                                          (struct uplink *)&conf, &fake_port, &pi),
                     0);
    pi->deliver = deliver_cb;
    memset(&s, 0, sizeof(s));
    pi->profile->session_cb(pi, &s);
    assert_string_equal(s.username, "management/devicebootstrap");
    assert_true(s.hold_spool);
    assert_null(s.will_topic);
    assert_int_equal(subscribed_count, 1);
    assert_string_equal(subscribed[0], "s/dcr");

    struct profile_msgs local;
    profile_msgs_init(&local);
    pi->profile->down_cb(pi, "s/dcr", "70,t9,device_gw,pa\"ss", 21, 1, false, &local);
    assert_int_equal(reconnects, 0); /* a broken line is not credentials */
    pi->profile->down_cb(pi, "s/dcr", "70,t9,device_gw,secret", 22, 1, false, &local);
    assert_int_equal(reconnects, 1);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);

    memset(&s, 0, sizeof(s));
    pi->profile->session_cb(pi, &s);
    assert_string_equal(s.username, "t9/device_gw");
    assert_string_equal(s.password, "secret");
    assert_false(s.hold_spool);
    assert_int_equal(subscribed_count, 3); /* s/ds, s/e, s/dc/tmpl; s/dcr dropped */
    c8y_free(pi);

    /* A restart reads the stored credentials. */
    reset();
    assert_int_equal(profile_instance_new(uv_default_loop(), &conf, &uc, profile_find(uc.profile),
                                          (struct uplink *)&conf, &fake_port, &pi),
                     0);
    memset(&s, 0, sizeof(s));
    pi->profile->session_cb(pi, &s);
    assert_string_equal(s.username, "t9/device_gw");
    c8y_free(pi);
}

/* --- configuration (conf_uplink.c, section.c): generic rules and the cumulocity section ------- */

static int load_text(const char *text, struct conf **conf, char **errors)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/conf.yaml", state_dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    *conf = NULL;
    *errors = NULL;
    return conf_load(path, conf, errors);
}

#define CONF_HEAD                                                                                  \
    "gateway: { id: gw-1 }\n"                                                                      \
    "uplinks:\n"                                                                                   \
    "  - name: c\n"                                                                                \
    "    host: example.com\n"

static void expect_errors(const char *text, const char *const *expect)
{
    struct conf *conf;
    char *errors;

    assert_int_equal(load_text(text, &conf, &errors), -EINVAL);
    assert_null(conf);
    for (size_t i = 0; expect[i]; i++) {
        if (!strstr(errors, expect[i]))
            fail_msg("expected\n  %s\nin\n  %s", expect[i], errors);
    }
    free(errors);
}

static void test_conf_generic_rules(void **unused)
{
    struct conf *conf;
    char *errors;

    assert_int_equal(load_text(CONF_HEAD
                               "    generic:\n"
                               "      up:\n"
                               "        - { local: telemetry, cloud: \"gw/{child}/t/{sub}\", "
                               "qos: 1 }\n"
                               "      down:\n"
                               "        - { cloud: \"cfg/{child}\", local: config }\n",
                               &conf, &errors),
                     0);
    const struct conf_generic *g = generic_conf(&conf->uplinks[0]);
    assert_int_equal(g->up_count, 1);
    assert_int_equal(g->up[0].channel, MAPPING_TELEMETRY);
    assert_string_equal(g->up[0].cloud, "gw/{child}/t/{sub}");
    assert_int_equal(g->up[0].qos, 1);
    assert_int_equal(g->down_count, 1);
    assert_int_equal(g->down[0].channel, MAPPING_CONFIG);
    assert_int_equal(g->down[0].qos, -1);
    assert_string_equal(g->topic_prefix, "gw-1");
    conf_free(conf);

    const char *const expect[] = {
        "conf.yaml:7:20: uplinks[0].generic.up[0].local: \"config\" is not a channel here",
        "conf.yaml:8:38: uplinks[0].generic.up[1].cloud: \"a/{sub}/b\" {sub} must be the last "
        "level",
        "conf.yaml:10:20: uplinks[0].generic.down[0].cloud: \"cmd/all\" has no {child} level",
        "conf.yaml:11:20: uplinks[0].generic.down[1].cloud: \"cfg/{child}/{sub}\" {sub} is not "
        "allowed here",
        "conf.yaml:12:55: uplinks[0].generic.down[2].qos: \"3\" is not a QoS",
        NULL};
    expect_errors(CONF_HEAD "    generic:\n"
                            "      up:\n"
                            "        - { local: config, cloud: \"x/{child}\" }\n"
                            "        - { local: telemetry, cloud: \"a/{sub}/b\" }\n"
                            "      down:\n"
                            "        - { cloud: \"cmd/all\", local: commands }\n"
                            "        - { cloud: \"cfg/{child}/{sub}\", local: config }\n"
                            "        - { cloud: \"c/{child}\", local: commands, qos: 3 }\n",
                  expect);
}

static void test_conf_cumulocity(void **unused)
{
    struct conf *conf;
    char *errors;

    assert_int_equal(load_text(CONF_HEAD "    profile: cumulocity\n"
                                         "    auth: { type: basic, username: u, password: p }\n"
                                         "    cumulocity:\n"
                                         "      tenant: t7\n"
                                         "      template: myTemplates\n"
                                         "      hardware: { serial: S1, model: M, revision: r2 }\n"
                                         "      supported_operations: [c8y_Restart]\n"
                                         "      required_interval: 60\n"
                                         "      children: [{ match: \"s-*\", parent: plc }]\n",
                               &conf, &errors),
                     0);
    const struct conf_cumulocity *cc = cumulocity_conf(&conf->uplinks[0]);
    assert_string_equal(cc->device_id, "gw-1");
    assert_string_equal(cc->name, "gw-1");
    assert_string_equal(cc->type, "c8y_MQTTDevice");
    assert_string_equal(cc->template_id, "myTemplates");
    assert_string_equal(cc->hardware_serial, "S1");
    assert_int_equal(cc->required_interval_min, 60);
    assert_true(cc->will);
    assert_string_equal(cc->will_topic, "s/us");
    assert_string_equal(cc->will_message,
                        "400,c8y_ConnectionEvent,\"Device connection was lost.\"");
    assert_int_equal(cc->child_count, 1);
    assert_string_equal(cc->children[0].type, "c8y_MQTTChildDevice");
    assert_string_equal(cc->children[0].name, "{child}");
    assert_null(conf->uplinks[0].cert_cn);
    conf_free(conf);

    assert_int_equal(load_text(CONF_HEAD "    profile: cumulocity\n"
                                         "    cumulocity:\n"
                                         "      device_id: dev-9\n"
                                         "      bootstrap: { password: bs, interval: 10s }\n"
                                         "      will: false\n",
                               &conf, &errors),
                     0);
    cc = cumulocity_conf(&conf->uplinks[0]);
    assert_true(cc->bootstrap);
    assert_string_equal(cc->bootstrap_user, "management/devicebootstrap");
    assert_int_equal(cc->bootstrap_interval_ms, 10000);
    assert_false(cc->will);
    conf_free(conf);

    const char *const expect[] = {
        "conf.yaml:8:18: uplinks[0].cumulocity.device_id: \"gw:1\": contains ':'",
        "conf.yaml:9:15: uplinks[0].cumulocity.tenant: \"a/b\" contains '/'", NULL};
    expect_errors(CONF_HEAD "    profile: cumulocity\n"
                            "    auth: { type: basic, username: u, password: p }\n"
                            "    cumulocity:\n"
                            "      device_id: \"gw:1\"\n"
                            "      tenant: a/b\n",
                  expect);
    const char *const expect4[] = {"conf.yaml:3:5: uplinks[0].auth: username must be "
                                   "<tenant>/<user>",
                                   NULL};
    expect_errors(CONF_HEAD "    profile: cumulocity\n"
                            "    auth: { type: basic, username: u, password: p }\n",
                  expect4);
    const char *const expect2[] = {"uplinks[0].auth: missing: Cumulocity needs auth type basic",
                                   NULL};
    expect_errors(CONF_HEAD "    profile: cumulocity\n", expect2);
    const char *const expect3[] = {"uplinks[0].cumulocity: is only used with profile: cumulocity",
                                   NULL};
    expect_errors(CONF_HEAD "    cumulocity: { tenant: t }\n", expect3);
    /* The generic section is the generic profile's own, like the others:
     * under another profile it would be ignored, so it is refused. */
    const char *const expect5[] = {"uplinks[0].generic: is only used with profile: generic", NULL};
    expect_errors(CONF_HEAD "    profile: cumulocity\n"
                            "    auth: { type: basic, username: t/u, password: p }\n"
                            "    generic: { topic_prefix: site }\n",
                  expect5);
}

static void test_registry_lookup(void **unused)
{
    assert_non_null(profile_find("generic"));
    assert_non_null(profile_find("cumulocity"));
    assert_null(profile_find("nope"));
    assert_string_equal(profile_spec_names()[1], "cumulocity");
    /* One list (src/profiles/meson.build) gives both halves of every profile. */
    size_t n = 0;
    for (const char *const *name = profile_spec_names(); *name; name++, n++) {
        assert_non_null(profile_find(*name));
        assert_string_equal(profile_find(*name)->name, *name);
        assert_string_equal(profile_spec_find(*name)->name, *name);
    }
    assert_int_equal(n, PROFILE_COUNT);
    assert_ptr_equal(profile_spec_find(NULL), profile_spec_find("generic"));
    assert_null(profile_spec_find("nope"));
    /* profile_specs() is the same list, PROFILE_COUNT long. */
    assert_true(PROFILE_COUNT >= 4); /* the four above, and any added since */
    for (size_t i = 0; i < PROFILE_COUNT; i++)
        assert_ptr_equal(profile_specs()[i], profile_spec_find(profile_spec_names()[i]));
}

static int setup(void **unused)
{
    return mkdtemp(state_dir) ? 0 : -1;
}

static int teardown(void **unused)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", state_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_template_expand),
        cmocka_unit_test(test_template_filter_and_match),
        cmocka_unit_test(test_registry_lookup),
        cmocka_unit_test(test_c8y_session),
        cmocka_unit_test(test_c8y_startup_messages),
        cmocka_unit_test(test_c8y_registration_once_and_nested),
        cmocka_unit_test(test_c8y_upstream),
        cmocka_unit_test(test_c8y_downstream),
        cmocka_unit_test(test_c8y_bootstrap),
        cmocka_unit_test(test_conf_generic_rules),
        cmocka_unit_test(test_conf_cumulocity),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
