/* Unit tests of the gcp and akenza profiles: the pure rules (profiles/gcp/gcp.h, profiles/akenza/akenza.h)
 * and, through the profile table with a recording stand-in for the uplink,
 * attach bookkeeping: the 1000-children cap, subscriptions after the attach
 * acknowledgement, re-attach on a new connection, state coalescing. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "conf.h"
#include "profile.h"
#include "profiles/akenza/akenza.h"
#include "profiles/gcp/gcp.h"
#include "profiles/gcp/section.h"
#include "profile_spec.h"
#include "registry.h"
#include "fake_port.h"
#include "uplink.h"

/* --- a recording uplink ------------------------------------------------------------- */

struct uplink {
    enum uplink_state state;
};

struct sent {
    char topic[256];
    char payload[1024];
    unsigned flags;
    void (*done_cb)(void *arg, int status);
    void *arg;
    bool acked;
};

static struct uplink fake = {UPLINK_ONLINE};
static struct sent *sent;
static size_t sent_count;
static size_t published; /* uplink_publish() calls (coalesced state) */
static char last_published[256];
static long subscriptions; /* subscribed minus unsubscribed filters */

int fake_publish_control(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, unsigned flags, void (*done_cb)(void *arg, int status), void *arg)
{
    struct sent *s = &sent[sent_count++];

    (void)uplink;
    (void)qos;
    snprintf(s->topic, sizeof(s->topic), "%s", topic);
    snprintf(s->payload, sizeof(s->payload), "%.*s", (int)len, (const char *)payload);
    s->flags = flags;
    s->done_cb = done_cb;
    s->arg = arg;
    s->acked = false;
    return 0;
}

int fake_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len, int qos,
                 bool retain)
{
    (void)uplink;
    (void)qos;
    (void)retain;
    published++;
    snprintf(last_published, sizeof(last_published), "%s=%.*s", topic, (int)len,
             (const char *)payload);
    return 0;
}

int fake_subscribe(struct uplink *uplink, const char *filter, int qos)
{
    (void)uplink;
    (void)filter;
    (void)qos;
    subscriptions++;
    return 0;
}

int fake_unsubscribe(struct uplink *uplink, const char *filter)
{
    (void)uplink;
    (void)filter;
    subscriptions--;
    return 0;
}

enum uplink_state fake_get_state(const struct uplink *uplink)
{
    return uplink->state;
}

void fake_get_stats(const struct uplink *uplink, struct uplink_stats *out)
{
    (void)uplink;
    memset(out, 0, sizeof(*out));
}

/* cumulocity.c is linked in through profile.c's registry; never called here. */
void fake_reconnect(struct uplink *uplink, const char *reason)
{
    (void)uplink;
    (void)reason;
}

/* The broker's PUBACK for every control message so far. */
static void ack_all(void)
{
    for (size_t i = 0; i < sent_count; i++) {
        if (!sent[i].acked && sent[i].done_cb) {
            sent[i].acked = true;
            sent[i].done_cb(sent[i].arg, 0);
        }
    }
}

static size_t count_topic_suffix(const char *suffix)
{
    size_t n = 0, slen = strlen(suffix);

    for (size_t i = 0; i < sent_count; i++) {
        size_t tlen = strlen(sent[i].topic);
        if (tlen >= slen && strcmp(sent[i].topic + tlen - slen, suffix) == 0)
            n++;
    }
    return n;
}

/* --- pure rules -------------------------------------------------------------------- */

static void test_id_rules(void **state)
{
    char long_id[300];

    (void)state;
    assert_null(gcp_id_check("abc"));
    assert_null(gcp_id_check("a-b.c_d+e~f%g"));
    assert_null(gcp_id_check("Google-is-fine")); /* the rule is about "goog" in lower case */
    assert_non_null(strstr(gcp_id_check("goog-x"), "goog"));
    assert_non_null(strstr(gcp_id_check("ab"), "3 to 255"));
    assert_non_null(strstr(gcp_id_check("9ab"), "letter"));
    assert_non_null(strstr(gcp_id_check("a:bc"), "only letters"));
    assert_non_null(gcp_id_check("a/bc"));
    memset(long_id, 'a', sizeof(long_id));
    long_id[255] = '\0';
    assert_null(gcp_id_check(long_id));
    long_id[255] = 'a';
    long_id[256] = '\0';
    assert_non_null(gcp_id_check(long_id));
}

static void test_up_topics(void **state)
{
    struct mapping_local m = {.kind = MAPPING_DEV, .channel = MAPPING_TELEMETRY};
    const char *reason = NULL;
    char buf[PROFILE_TOPIC_MAX];

    (void)state;
    strcpy(m.child, "child-a");
    assert_int_equal(gcp_up_topic(&m, buf, sizeof(buf), &reason), 23);
    assert_string_equal(buf, "/devices/child-a/events");
    m.sub = "power/l1";
    assert_true(gcp_up_topic(&m, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "/devices/child-a/events/power/l1");
    assert_true(akenza_up_topic(&m, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "/up/device/id/child-a/power/l1");
    m.channel = MAPPING_STATE;
    assert_int_equal(gcp_up_topic(&m, buf, sizeof(buf), &reason), -EINVAL);
    assert_non_null(strstr(reason, "one state per device"));
    assert_true(akenza_up_topic(&m, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "/up/device/id/child-a/state/power/l1");
    m.sub = NULL;
    assert_true(gcp_up_topic(&m, buf, sizeof(buf), &reason) > 0);
    assert_string_equal(buf, "/devices/child-a/state");
    m.channel = MAPPING_SMARTREST;
    assert_int_equal(gcp_up_topic(&m, buf, sizeof(buf), &reason), -EINVAL);
    assert_int_equal(akenza_up_topic(&m, buf, sizeof(buf), &reason), -EINVAL);
    m.channel = MAPPING_TELEMETRY;
    assert_int_equal(gcp_up_topic(&m, buf, 10, &reason), -ENAMETOOLONG);
}

static void test_down_parse(void **state)
{
    char id[MAPPING_CHILD_MAX + 1];
    const char *sub;

    (void)state;
    assert_int_equal(gcp_down_parse("/devices/child-a/config", id, &sub), GCP_DOWN_CONFIG);
    assert_string_equal(id, "child-a");
    assert_null(sub);
    assert_int_equal(gcp_down_parse("/devices/c-b/commands", id, &sub), GCP_DOWN_COMMANDS);
    assert_null(sub);
    assert_int_equal(gcp_down_parse("/devices/c-b/commands/", id, &sub), GCP_DOWN_COMMANDS);
    assert_null(sub);
    assert_int_equal(gcp_down_parse("/devices/c-b/commands/x/y", id, &sub), GCP_DOWN_COMMANDS);
    assert_string_equal(sub, "x/y");
    assert_int_equal(gcp_down_parse("/devices/gw/errors", id, &sub), GCP_DOWN_ERRORS);
    assert_int_equal(gcp_down_parse("/devices/gw/state", id, &sub), GCP_DOWN_OTHER);
    assert_int_equal(gcp_down_parse("/devices/gw", id, &sub), GCP_DOWN_OTHER);
    assert_int_equal(gcp_down_parse("devices/gw/config", id, &sub), GCP_DOWN_OTHER);
    assert_int_equal(gcp_down_parse("/devices//config", id, &sub), GCP_DOWN_BAD_ID);
    assert_int_equal(gcp_down_parse("/devices/a,b/config", id, &sub), GCP_DOWN_BAD_ID);
}

static void test_akenza_down(void **state)
{
    char buf[PROFILE_TOPIC_MAX];
    bool config;

    (void)state;
    assert_true(akenza_down_topic("dev", "/down/device/id/d1/config", buf, sizeof(buf), &config) >
                0);
    assert_string_equal(buf, "dev/d1/config");
    assert_true(config);
    assert_true(akenza_down_topic("dev", "/down/device/id/d1/config/x", buf, sizeof(buf), &config) >
                0);
    assert_string_equal(buf, "dev/d1/config");
    assert_true(
        akenza_down_topic("dev", "/down/device/id/d1/reboot/now", buf, sizeof(buf), &config) > 0);
    assert_string_equal(buf, "dev/d1/commands/reboot/now");
    assert_false(config);
    assert_true(akenza_down_topic("dev", "/down/device/id/d1", buf, sizeof(buf), &config) > 0);
    assert_string_equal(buf, "dev/d1/commands");
    assert_true(akenza_down_topic("dev", "/down/device/id/d1/", buf, sizeof(buf), &config) > 0);
    assert_string_equal(buf, "dev/d1/commands");
    assert_int_equal(akenza_down_topic("dev", "/up/device/id/d1", buf, sizeof(buf), &config), 0);
    assert_int_equal(akenza_down_topic("dev", "/down/device/id//x", buf, sizeof(buf), &config),
                     -EINVAL);

    /* A child's session takes the aud in the device's form. */
    assert_true(akenza_child_aud("https://akenza.io/devices/gw", "gw", "c1", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "https://akenza.io/devices/c1");
    assert_true(akenza_child_aud("gw", "gw", "c1", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "c1");
    assert_true(akenza_child_aud("my-aud", "gw", "c1", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "my-aud");
    assert_int_equal(akenza_child_aud("gw", "gw", "c1", buf, 2), -ENAMETOOLONG);
}

static void test_errors_and_key_path(void **state)
{
    char buf[64];

    (void)state;
    assert_non_null(strstr(gcp_error_explain("GATEWAY_DEVICE_NOT_FOUND"), "bind it"));
    assert_non_null(strstr(gcp_error_explain("GATEWAY_ATTACHMENT_ERROR"), "attach was refused"));
    assert_non_null(strstr(gcp_error_explain("SOMETHING_NEW"), "does not describe"));
    assert_non_null(gcp_error_explain(NULL));
    assert_int_equal(profile_child_key_path("/k/%c.pem", "c-1", buf, sizeof(buf)), 10);
    assert_string_equal(buf, "/k/c-1.pem");
    assert_true(profile_child_key_path("/k/%%c-%c", "x", buf, sizeof(buf)) > 0);
    assert_string_equal(buf, "/k/%c-x");
    assert_int_equal(profile_child_key_path("/k/%c.pem", "c-1", buf, 5), -ENAMETOOLONG);
}

/* --- the profile through its table --------------------------------------------------- */

struct fixture {
    uv_loop_t loop;
    struct conf conf;
    struct conf_uplink uc;
    struct conf_gcp gcp;
    struct profile_instance *pi;
    bool closed;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    sent = calloc(2 * GCP_MAX_ATTACHED + 16, sizeof(*sent));
    assert_non_null(sent);
    sent_count = 0;
    published = 0;
    subscriptions = 0;
    fake.state = UPLINK_ONLINE;
    uv_loop_init(&f->loop);
    f->conf.local.topic_prefix = "dev";
    f->uc.name = "gcp";
    f->uc.profile = "gcp";
    f->uc.auth.type = CONF_AUTH_JWT;
    f->uc.auth.jwt.lifetime_s = 3600;
    f->gcp = (struct conf_gcp){.project = "p",
                               .region = "r",
                               .registry = "g",
                               .device = "gw-1",
                               .gateway = true,
                               .attach_idle_ms = 60000};
    f->uc.spec = &profile_spec_gcp;
    f->uc.section = &f->gcp;
    assert_int_equal(profile_instance_new(&f->loop, &f->conf, &f->uc, profile_find("gcp"), &fake,
                                          &fake_port, &f->pi),
                     0);
    *state = f;
    return 0;
}

static struct fixture *current;

static void closed_cb(struct profile_instance *pi)
{
    (void)pi;
    current->closed = true;
}

static int teardown(void **state)
{
    struct fixture *f = *state;

    current = f;
    profile_instance_close(f->pi, closed_cb);
    for (int i = 0; i < 10 && !f->closed; i++)
        uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_true(f->closed);
    profile_instance_free(f->pi);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(sent);
    free(f);
    return 0;
}

/* One local message through the profile, as router.c does it. */
static int send_local(struct fixture *f, const char *child, enum mapping_channel channel,
                      const char *payload, struct profile_msgs *out, const char **reason)
{
    struct mapping_local m = {.kind = MAPPING_DEV, .channel = channel};
    const struct profile *p = f->pi->profile;
    int rc;

    snprintf(m.child, sizeof(m.child), "%s", child);
    *reason = NULL;
    if (f->pi->spec->child_check && (*reason = f->pi->spec->child_check(child)))
        return -EINVAL;
    rc = p->up_cb(f->pi, &m, payload, strlen(payload), 2, true, out, reason);
    if (rc == 0 && out->count > 0)
        rc = profile_register_child(f->pi, child, reason);
    return rc;
}

static void test_attach_cap_and_reattach(void **state)
{
    struct fixture *f = *state;
    struct uplink_session session = {0};
    const char *reason;
    char child[32];

    for (unsigned i = 0; i < GCP_MAX_ATTACHED; i++) {
        struct profile_msgs out;
        profile_msgs_init(&out);
        snprintf(child, sizeof(child), "c%04u", i);
        assert_int_equal(send_local(f, child, MAPPING_TELEMETRY, "x", &out, &reason), 0);
        assert_int_equal(out.count, 1);
        assert_int_equal(out.msg[0].qos, 1); /* QoS 2 -> 1 */
        assert_false(out.msg[0].retain);     /* the bridge keeps no retained messages */
        profile_msgs_deinit(&out);
    }
    assert_int_equal(count_topic_suffix("/attach"), GCP_MAX_ATTACHED);
    assert_string_equal(sent[0].topic, "/devices/c0000/attach");
    assert_string_equal(sent[0].payload, "{}");
    assert_true(sent[0].flags & UPLINK_CONTROL_GATE);       /* data waits for the PUBACK */
    assert_true(sent[0].flags & UPLINK_CONTROL_CONNECTION); /* and holds for this connection */

    /* A second message: no second attach in the same connection. */
    struct profile_msgs out;
    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "c0000", MAPPING_TELEMETRY, "y", &out, &reason), 0);
    profile_msgs_deinit(&out);
    assert_int_equal(count_topic_suffix("/attach"), GCP_MAX_ATTACHED);

    /* The 1001st child is refused with the reason; the gateway itself is not a child. */
    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "c9999", MAPPING_TELEMETRY, "x", &out, &reason), -EINVAL);
    assert_non_null(strstr(reason, "at most 1000 devices attached"));
    assert_int_equal(out.count, 0);
    assert_int_equal(send_local(f, "gw-1", MAPPING_TELEMETRY, "x", &out, &reason), 0);
    assert_int_equal(out.count, 1);
    assert_string_equal(out.msg[0].topic, "/devices/gw-1/events");
    profile_msgs_deinit(&out);
    assert_int_equal(count_topic_suffix("/attach"), GCP_MAX_ATTACHED);

    /* Subscriptions follow the acknowledged attach: config + commands/# each. */
    assert_int_equal(subscriptions, 0);
    ack_all();
    assert_int_equal(subscriptions, 2 * GCP_MAX_ATTACHED);
    assert_int_equal(registry_get(f->pi->registry, "c0000"), REGISTRY_DONE);

    /* A new connection: filters dropped before it, every child attached again after it. */
    fake.state = UPLINK_BACKOFF;
    profile_instance_offline(f->pi);
    f->pi->profile->session_cb(f->pi, &session);
    assert_string_equal(session.client_id, "projects/p/locations/r/registries/g/devices/gw-1");
    assert_int_equal(subscriptions, 0);
    fake.state = UPLINK_ONLINE;
    profile_instance_online(f->pi);
    assert_int_equal(count_topic_suffix("/attach"), 2 * GCP_MAX_ATTACHED);
    assert_int_equal(registry_get(f->pi->registry, "c0500"), REGISTRY_PENDING);
}

static void test_offline_first_message_attaches_on_connect(void **state)
{
    struct fixture *f = *state;
    struct profile_msgs out;
    const char *reason;

    fake.state = UPLINK_BACKOFF;
    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "late-1", MAPPING_TELEMETRY, "x", &out, &reason), 0);
    profile_msgs_deinit(&out);
    assert_int_equal(sent_count, 0); /* nothing to attach on while offline */
    profile_instance_offline(f->pi);
    fake.state = UPLINK_ONLINE;
    profile_instance_online(f->pi);
    assert_int_equal(sent_count, 1);
    assert_string_equal(sent[0].topic, "/devices/late-1/attach");
}

static void stop_cb(uv_timer_t *timer)
{
    uv_stop(timer->loop);
}

static void test_state_coalesced(void **state)
{
    struct fixture *f = *state;
    struct profile_msgs out;
    const char *reason;
    uv_timer_t guard;

    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "gw-1", MAPPING_STATE, "s0", &out, &reason), 0);
    assert_int_equal(out.count, 1); /* the first goes at once */
    profile_msgs_deinit(&out);
    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "gw-1", MAPPING_STATE, "s1", &out, &reason), 0);
    assert_int_equal(send_local(f, "gw-1", MAPPING_STATE, "s2", &out, &reason), 0);
    assert_int_equal(out.count, 0); /* within the second: kept, the newest wins */
    profile_msgs_deinit(&out);
    assert_int_equal(published, 0);

    /* Run the loop past the one-second mark (the profile's timer is unref'd). */
    uv_timer_init(&f->loop, &guard);
    uv_timer_start(&guard, stop_cb, 1500, 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(published, 1);
    assert_string_equal(last_published, "/devices/gw-1/state=s2");

    /* Too large: refused with the limit in words. */
    char *big = malloc(GCP_STATE_MAX + 2);
    memset(big, 'x', GCP_STATE_MAX + 1);
    big[GCP_STATE_MAX + 1] = '\0';
    profile_msgs_init(&out);
    assert_int_equal(send_local(f, "gw-1", MAPPING_STATE, big, &out, &reason), -EINVAL);
    assert_non_null(strstr(reason, "at most 65536 bytes for a state update"));
    profile_msgs_deinit(&out);
    free(big);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_rules),
        cmocka_unit_test(test_up_topics),
        cmocka_unit_test(test_down_parse),
        cmocka_unit_test(test_akenza_down),
        cmocka_unit_test(test_errors_and_key_path),
        cmocka_unit_test_setup_teardown(test_attach_cap_and_reattach, setup, teardown),
        cmocka_unit_test_setup_teardown(test_offline_first_message_attaches_on_connect, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_state_coalesced, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
