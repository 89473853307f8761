/* azure/azure.c - Azure IoT Hub (profile azure), the daemon half.
 *
 * One device per connection (IoT Hub has no gateway that speaks for other
 * devices over MQTT): the uplink is the device azure.device_id, with
 * client id = that id and the user name of spec.c. With azure.child_key or
 * azure.group_key_file every other child is a session of its own
 * (child_sessions.h: opened on its first message, closed when idle), with
 * the same contract on its own dev/<child>/ topics and a SAS token from its
 * key: the file child_key names, or HMAC-SHA256(group key, child id), the
 * Device Provisioning Service's derivation for a symmetric-key group
 * enrolment. With azure.key_file the
 * password is a SAS token (azure.h) made for each connection attempt from
 * the key, which is read again every time (a replaced key file is used at
 * the next connection); the token says when it expires, and the uplink
 * renews it before then (uplink_session.password_expires_at: at 80 % of
 * azure.token_lifetime it stops sending, waits for what is in flight, and
 * reconnects with a new token), so the hub never has to drop an expired
 * session. With tls.cert the certificate is the credential and there is no
 * password.
 *
 * Local contract (docs/profiles.md, "azure"):
 *   dev/<device>/telemetry[/<sub>] -> devices/<device>/messages/events/<props>
 *       (a JSON payload gets $.ct=application/json and $.ce=utf-8; a
 *       sub-topic becomes the application property "subject")
 *   devices/<device>/messages/devicebound/<props> -> dev/<device>/commands[/<props>]
 *       (cloud-to-device messages; the property bag, URL-encoded as IoT Hub
 *       sends it, is the sub-topic)
 *   device twin: after every CONNACK the twin is fetched ($iothub/twin/GET)
 *       and its document delivered on dev/<device>/config/twin (retained
 *       locally); desired-property updates arrive on
 *       dev/<device>/config/desired; dev/<device>/state (a JSON object)
 *       patches the reported properties ($iothub/twin/PATCH/properties/
 *       reported); a refused patch is reported on uplinkd/<uplink>/errors
 *   direct methods: $iothub/methods/POST/<name>/?$rid=<rid> ->
 *       dev/<device>/commands/methods/<name>/<rid>; the local app answers on
 *       dev/<device>/state/methods/<rid>/<status> -> $iothub/methods/res/
 *       <status>/?$rid=<rid>
 * QoS 2 becomes 1 and retain is dropped: IoT Hub takes neither.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "azure.h"
#include "child_sessions.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "profile.h"
#include "profiles/azure/section.h"

#define AZURE_C2D          "devices/%s/messages/devicebound/"
#define AZURE_TWIN_GET     "$iothub/twin/GET/"
#define AZURE_TWIN_RES     "$iothub/twin/res/"
#define AZURE_TWIN_DESIRED "$iothub/twin/PATCH/properties/desired/"
#define AZURE_TWIN_PATCH   "$iothub/twin/PATCH/properties/reported/"
#define AZURE_METHODS_POST "$iothub/methods/POST/"
#define AZURE_METHODS_RES  "$iothub/methods/res/"

/* One device's CONNECT: the uplink's own, or a child session's. */
struct azure_connect {
    struct profile_connect_id id; /* this attempt's user name and token (session_cb) */
    char key_error[256];          /* the last key file problem, logged once per change */
};

struct azure {
    struct azure_connect self;
    struct child_sessions *sessions;
    /* Twin request ids: "g<n>" for a GET, "p<n>" for a reported patch; the
     * start is the time of day, so ids do not repeat across restarts soon. */
    unsigned long long next_rid;
};

static struct azure *azure_of(const struct profile_instance *pi)
{
    return pi->state;
}

/* Fill @session for the device of @uc (the uplink's own, or a child
 * session's copy): the same user name and token uplinkctl diagnose sends
 * (spec.c). */
static void azure_fill_session(const struct conf_uplink *uc, struct azure_connect *c,
                               const char *child, struct uplink_session *session)
{
    OPENSSL_cleanse(c->id.token, sizeof(c->id.token));
    profile_connect_id(uc, &c->id);
    if (!c->id.client_id[0])
        return; /* no device id: the conf check reported it */
    session->client_id = azure_conf(uc)->device_id;
    session->username = c->id.username;
    if (c->id.token_error[0]) {
        if (strcmp(c->id.token_error, c->key_error) != 0) {
            if (child)
                log_child(LOG_ERR, uc->name, child,
                          "%s; connecting without a SAS token, which IoT Hub refuses",
                          c->id.token_error);
            else
                log_uplink(LOG_ERR, uc->name,
                           "azure.key_file: %s; connecting without a SAS token, which IoT Hub "
                           "refuses",
                           c->id.token_error);
        }
        snprintf(c->key_error, sizeof(c->key_error), "%s", c->id.token_error);
        return;
    }
    c->key_error[0] = '\0';
    if (c->id.token[0]) {
        session->password = c->id.token;
        session->password_expires_at = (time_t)c->id.token_expires_at;
    }
}

static void azure_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    azure_fill_session(pi->uc, &azure_of(pi)->self, NULL, session);
}

/* The cloud filters of @device's connection. */
static void azure_filters(const char *device, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];

    snprintf(filter, sizeof(filter), AZURE_C2D "#", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    profile_msgs_add(filters, AZURE_TWIN_RES "#", NULL, 0, 0, false);
    profile_msgs_add(filters, AZURE_TWIN_DESIRED "#", NULL, 0, 0, false);
    profile_msgs_add(filters, AZURE_METHODS_POST "#", NULL, 0, 0, false);
}

/* The first message of every connection: fetch the twin (its document
 * answers on $iothub/twin/res). */
static int azure_twin_get(struct profile_instance *pi, struct profile_msgs *first)
{
    char topic[PROFILE_TOPIC_MAX];

    snprintf(topic, sizeof(topic), AZURE_TWIN_GET "?$rid=g%llu", azure_of(pi)->next_rid++);
    return profile_msgs_add(first, topic, NULL, 0, 0, false);
}

static void azure_down(struct profile_instance *pi, const char *device, const char *topic,
                       const void *payload, size_t len, int qos, struct profile_msgs *local);

/* --- children: a session each (child_sessions.h) ------------------------------------- */

struct azure_child {
    struct azure_connect connect;
    char key_path[4096]; /* the file to check before the first connection */
};

/* One allocation per conf: the uplink's settings with the child as the
 * device, freed by the set. */
struct azure_child_conf {
    struct conf_uplink conf;
    struct conf_azure section;
};

static bool azure_children_enabled(const struct profile_instance *pi)
{
    return azure_conf(pi->uc)->child_key != NULL || azure_conf(pi->uc)->group_key_file != NULL;
}

static uint64_t azure_children_idle_ms(const struct profile_instance *pi)
{
    return azure_conf(pi->uc)->session_idle_ms;
}

static const char *azure_self(const struct profile_instance *pi)
{
    return azure_conf(pi->uc)->device_id;
}

/* A child without a key file is refused before its data is taken (a stat,
 * not a read); with a group key every child has one. */
static int azure_child_check(const struct profile_instance *pi, const char *child, char *why,
                             size_t size)
{
    const char *pattern = azure_conf(pi->uc)->child_key;
    char path[4096];

    if (!pattern)
        return 0;
    if (profile_child_key_path(pattern, child, path, sizeof(path)) < 0) {
        snprintf(why, size, "the key path for this child is too long");
        return -EINVAL;
    }
    if (access(path, R_OK) < 0) {
        snprintf(why, size, "cannot read %.120s: %s", path, strerror(errno));
        return -EINVAL;
    }
    return 0;
}

/* Threadpool: is the key usable? (Each connection reads it again on the
 * loop, as for the uplink's own key, so a replaced file is used at once.) */
static int azure_child_load(struct child_session *s, char *why, size_t size)
{
    struct azure_child *c = child_session_data(s);
    uint8_t key[AZURE_KEY_MAX];
    int len = azure_key_read(c->key_path, key, why, size);

    OPENSSL_cleanse(key, sizeof(key));
    return len < 0 ? len : 0;
}

static struct conf_uplink *azure_child_conf(struct child_session *s)
{
    const struct profile_instance *pi = child_session_pi(s);
    const struct conf_azure *azure = azure_conf(pi->uc);
    struct azure_child *c = child_session_data(s);
    struct azure_child_conf *cc;

    /* The file checked before the first connection: set once, as the
     * worker may be reading it during a reload. */
    if (!c->key_path[0]) {
        if (azure->child_key ? profile_child_key_path(azure->child_key, child_session_id(s),
                                                      c->key_path, sizeof(c->key_path)) < 0
                             : snprintf(c->key_path, sizeof(c->key_path), "%s",
                                        azure->group_key_file ? azure->group_key_file : "") < 0)
            return NULL;
    }
    cc = calloc(1, sizeof(*cc));
    if (!cc)
        return NULL;
    cc->conf = *pi->uc;
    cc->conf.name = (char *)child_session_name(s);
    cc->conf.client_id = (char *)child_session_id(s);
    cc->conf.cert_cn = NULL;
    /* A child authenticates with its SAS token, whatever the uplink's own
     * device uses. */
    cc->conf.tls.cert = NULL;
    cc->conf.tls.key = NULL;
    cc->section = *azure;
    cc->section.device_id = (char *)child_session_id(s);
    cc->section.key_file = NULL;
    cc->section.policy = NULL;
    cc->section.child = true;
    cc->conf.section = &cc->section;
    return &cc->conf;
}

static void azure_child_filters(struct child_session *s, struct profile_msgs *filters)
{
    azure_filters(child_session_id(s), filters);
}

static const char *azure_child_credential(const struct child_session *s, char *buf, size_t size)
{
    const struct azure_child *c = child_session_data(s);

    snprintf(buf, size, "%s %s",
             azure_conf(child_session_pi(s)->uc)->child_key ? "key" : "derived from group key",
             c->key_path);
    return buf;
}

static void azure_child_data_free(void *data)
{
    struct azure_child *c = data;

    OPENSSL_cleanse(c->connect.id.token, sizeof(c->connect.id.token));
}

static void azure_child_session_cb(void *arg, struct uplink *uplink, struct uplink_session *session)
{
    struct child_session *s = arg;
    struct azure_child *c = child_session_data(s);

    (void)uplink;
    azure_fill_session(child_session_conf(s), &c->connect, child_session_id(s), session);
}

static void azure_child_first(struct child_session *s, struct profile_msgs *first)
{
    azure_twin_get(child_session_pi(s), first);
}

static void azure_child_down(struct child_session *s, const char *topic, const void *payload,
                             size_t len, int qos, bool retain, struct profile_msgs *local)
{
    (void)retain; /* IoT Hub keeps no retained messages */
    azure_down(child_session_pi(s), child_session_id(s), topic, payload, len, qos, local);
}

static const struct child_session_ops azure_child_ops = {
    .need = "IoT Hub takes one device per connection, and this child has no usable key for its "
            "own (azure.child_key or azure.group_key_file)",
    .enabled = azure_children_enabled,
    .idle_ms = azure_children_idle_ms,
    .self = azure_self,
    .check = azure_child_check,
    .load = azure_child_load,
    .conf = azure_child_conf,
    .filters = azure_child_filters,
    .credential = azure_child_credential,
    .data_free = azure_child_data_free,
    .data_size = sizeof(struct azure_child),
    .session_cb = azure_child_session_cb,
    .first = azure_child_first,
    .down = azure_child_down,
};

/* --- the instance ---------------------------------------------------------------------- */

static int azure_new_cb(struct profile_instance *pi)
{
    struct azure *az = calloc(1, sizeof(struct azure));
    int rc;

    if (!az)
        return -ENOMEM;
    az->next_rid = (unsigned long long)time(NULL) % 100000 * 1000;
    pi->state = az;
    rc = child_sessions_new(pi, &azure_child_ops, &az->sessions);
    if (rc < 0) {
        free(az);
        pi->state = NULL;
    }
    return rc;
}

static void azure_free_cb(struct profile_instance *pi)
{
    struct azure *az = azure_of(pi);

    if (az) {
        child_sessions_free(az->sessions);
        OPENSSL_cleanse(az->self.id.token, sizeof(az->self.id.token));
    }
    free(az);
    pi->state = NULL;
}

static void azure_close_cb(struct profile_instance *pi)
{
    child_sessions_close(azure_of(pi)->sessions);
}

static void azure_reconfigure_cb(struct profile_instance *pi)
{
    child_sessions_reconfigure(azure_of(pi)->sessions);
}

static void azure_status_json_cb(const struct profile_instance *pi, struct json_buf *out)
{
    child_sessions_status_json(azure_of(pi)->sessions, out);
}

static void azure_child_json_cb(const struct profile_instance *pi, const char *child,
                                struct json_buf *out)
{
    child_sessions_child_json(azure_of(pi)->sessions, child, out);
}

static void azure_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    if (azure_conf(pi->uc)->device_id)
        azure_filters(azure_conf(pi->uc)->device_id, filters);
}

static void azure_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    azure_twin_get(pi, first);
}

/* dev/<device>/state: a reported-properties patch (a JSON object), or with
 * the sub-topic methods/<rid>/<status> the answer to a direct method. */
static int azure_state_up(struct profile_instance *pi, const char *sub, const void *payload,
                          size_t len, int qos, struct profile_msgs *out, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];
    int n;

    if (sub == NULL) {
        if (!json_shape_object(payload, len)) {
            *reason = "a twin patch (dev/<device>/state) must be a JSON object of reported "
                      "properties";
            return -EINVAL;
        }
        n = snprintf(topic, sizeof(topic), AZURE_TWIN_PATCH "?$rid=p%llu",
                     azure_of(pi)->next_rid++);
    } else {
        char rid[64];
        int status;
        if (azure_method_answer(sub, rid, sizeof(rid), &status) < 0) {
            *reason = "a state sub-topic must be methods/<request id>/<status> (the answer to "
                      "a direct method, status 100-599)";
            return -EINVAL;
        }
        n = snprintf(topic, sizeof(topic), AZURE_METHODS_RES "%d/?$rid=%s", status, rid);
    }
    if (profile_topic_result(n, sizeof(topic), reason) < 0)
        return -EINVAL;
    return profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
}

/* @device's message (m->child) -> its IoT Hub messages in @out. */
static int azure_up(struct profile_instance *pi, const struct mapping_local *m, const void *payload,
                    size_t len, int qos, struct profile_msgs *out, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];
    int n;

    if (m->channel == MAPPING_STATE)
        return azure_state_up(pi, m->sub, payload, len, qos, out, reason);
    if (m->channel != MAPPING_TELEMETRY) {
        *reason = "profile azure takes telemetry (device-to-cloud messages) and state (twin "
                  "reported properties, method answers) only";
        return -EINVAL;
    }
    if (len > AZURE_MAX_MESSAGE) {
        *reason = "IoT Hub takes device-to-cloud messages of at most 256 KiB";
        return -EINVAL;
    }
    n = azure_d2c_topic(m->child, m->sub, json_shape_document(payload, len), topic, sizeof(topic));
    if (profile_topic_result(n, sizeof(topic), reason) < 0)
        return -EINVAL;
    return profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
}

static int azure_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                       const void *payload, size_t len, int qos, bool retain,
                       struct profile_msgs *out, const char **reason)
{
    const char *device = azure_conf(pi->uc)->device_id;
    struct child_session *session = NULL;
    size_t first = out->count;
    int rc;

    (void)retain; /* IoT Hub keeps no retained messages */
    if (!device)
        return -EINVAL;
    if (strcmp(m->child, device) != 0) {
        if (!azure_children_enabled(pi)) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "IoT Hub takes one device per connection, this uplink is the device "
                     "%.40s: child %.40s needs a session of its own (set azure.child_key or "
                     "azure.group_key_file)",
                     device, m->child);
            *reason = pi->reason;
            return -EINVAL;
        }
        if ((rc = child_sessions_route(azure_of(pi)->sessions, m->child, &session)) < 0) {
            *reason = pi->reason;
            return rc;
        }
    }
    rc = azure_up(pi, m, payload, len, qos, out, reason);
    for (size_t i = first; rc == 0 && session && i < out->count; i++)
        out->msg[i].uplink = child_session_uplink(session);
    return rc;
}

/* $iothub/...: twin responses and desired updates, direct methods. */
static void azure_iothub_down(struct profile_instance *pi, const char *device, const char *topic,
                              const void *payload, size_t len, struct profile_msgs *local)
{
    const char *prefix = pi->conf->local.topic_prefix;
    char local_topic[PROFILE_TOPIC_MAX], rid[64], name[128], why[256];
    int status, n = -1;
    bool retain = false;

    if (strncmp(topic, AZURE_TWIN_RES, strlen(AZURE_TWIN_RES)) == 0) {
        if (azure_twin_response(topic + strlen(AZURE_TWIN_RES), &status, rid, sizeof(rid)) < 0)
            return;
        if (rid[0] == 'g' && status == 200) {
            n = snprintf(local_topic, sizeof(local_topic), "%s/%s/config/twin", prefix, device);
            retain = true; /* the whole document: what a late subscriber wants first */
        } else if (status < 200 || status > 299) {
            snprintf(why, sizeof(why), "IoT Hub answered %d to the twin %s (request %.60s): %.*s",
                     status, rid[0] == 'g' ? "GET" : "reported-properties patch", rid,
                     (int)(len > 120 ? 120 : len), (const char *)payload);
            profile_report_error(pi, topic, why);
            return;
        } else {
            return; /* 204: a reported patch was taken */
        }
    } else if (strncmp(topic, AZURE_TWIN_DESIRED, strlen(AZURE_TWIN_DESIRED)) == 0) {
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/config/desired", prefix, device);
    } else if (strncmp(topic, AZURE_METHODS_POST, strlen(AZURE_METHODS_POST)) == 0) {
        if (azure_method_request(topic + strlen(AZURE_METHODS_POST), name, sizeof(name), rid,
                                 sizeof(rid)) < 0) {
            profile_report_error(pi, topic,
                                 "a direct method the local topics cannot carry "
                                 "(its name or request id); not delivered");
            return;
        }
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/methods/%s/%s", prefix,
                     device, name, rid);
    }
    if (n < 0 || (size_t)n >= sizeof(local_topic))
        return;
    profile_msgs_add(local, local_topic, payload, len, 0, retain);
}

/* A message from @device's connection -> local messages in @local. */
static void azure_down(struct profile_instance *pi, const char *device, const char *topic,
                       const void *payload, size_t len, int qos, struct profile_msgs *local)
{
    char prefix[PROFILE_TOPIC_MAX], local_topic[PROFILE_TOPIC_MAX];
    size_t plen;
    int n;

    if (strncmp(topic, "$iothub/", 8) == 0) {
        azure_iothub_down(pi, device, topic, payload, len, local);
        return;
    }
    n = snprintf(prefix, sizeof(prefix), AZURE_C2D, device);
    plen = (size_t)n;
    if (n < 0 || plen >= sizeof(prefix) || strncmp(topic, prefix, plen) != 0)
        return;
    const char *props = topic + plen;
    if (*props)
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/%s",
                     pi->conf->local.topic_prefix, device, props);
    else
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands",
                     pi->conf->local.topic_prefix, device);
    if (n < 0 || (size_t)n >= sizeof(local_topic)) {
        profile_report_error(pi, topic,
                             "cloud-to-device message topic too long for a local "
                             "topic; dropped");
        return;
    }
    profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, false);
}

static void azure_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                          size_t len, int qos, bool retain, struct profile_msgs *local)
{
    (void)retain;
    if (azure_conf(pi->uc)->device_id)
        azure_down(pi, azure_conf(pi->uc)->device_id, topic, payload, len, qos, local);
}

const struct profile profile_azure = {
    .name = "azure",
    .new_cb = azure_new_cb,
    .free_cb = azure_free_cb,
    .close_cb = azure_close_cb,
    .reconfigure_cb = azure_reconfigure_cb,
    .session_cb = azure_session_cb,
    .subscriptions_cb = azure_subscriptions_cb,
    .online_cb = azure_online_cb,
    .up_cb = azure_up_cb,
    .down_cb = azure_down_cb,
    .status_json_cb = azure_status_json_cb,
    .child_json_cb = azure_child_json_cb,
    .limits = {.max_payload = AZURE_MAX_MESSAGE},
};
