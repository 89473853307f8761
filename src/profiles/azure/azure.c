/* azure/azure.c - Azure IoT Hub (profile azure), the daemon half.
 *
 * One device per connection (IoT Hub has no gateway that speaks for other
 * devices over MQTT): the uplink is the device azure.device_id, with
 * client id = that id and the user name of spec.c. With azure.key_file the
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "azure.h"
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

struct azure {
    struct profile_connect_id id; /* this attempt's user name and token (session_cb) */
    char key_error[256];          /* the last key file problem, logged once per change */
    /* Twin request ids: "g<n>" for a GET, "p<n>" for a reported patch; the
     * start is the time of day, so ids do not repeat across restarts soon. */
    unsigned long long next_rid;
};

static struct azure *azure_of(const struct profile_instance *pi)
{
    return pi->state;
}

static int azure_new_cb(struct profile_instance *pi)
{
    struct azure *az = calloc(1, sizeof(struct azure));

    if (!az)
        return -ENOMEM;
    az->next_rid = (unsigned long long)time(NULL) % 100000 * 1000;
    pi->state = az;
    return 0;
}

static void azure_free_cb(struct profile_instance *pi)
{
    struct azure *az = azure_of(pi);

    if (az)
        OPENSSL_cleanse(az->id.token, sizeof(az->id.token));
    free(az);
}

static void azure_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    const struct conf_azure *conf = azure_conf(pi->uc);
    struct azure *az = azure_of(pi);

    /* The same user name and token uplinkctl diagnose sends (spec.c). */
    OPENSSL_cleanse(az->id.token, sizeof(az->id.token));
    profile_connect_id(pi->uc, &az->id);
    if (!az->id.client_id[0])
        return; /* no device id: the conf check reported it */
    session->client_id = conf->device_id;
    session->username = az->id.username;
    if (az->id.token_error[0]) {
        if (strcmp(az->id.token_error, az->key_error) != 0)
            log_uplink(LOG_ERR, pi->uc->name,
                       "azure.key_file: %s; connecting without a SAS token, which IoT Hub "
                       "refuses",
                       az->id.token_error);
        snprintf(az->key_error, sizeof(az->key_error), "%s", az->id.token_error);
        return;
    }
    az->key_error[0] = '\0';
    if (az->id.token[0]) {
        session->password = az->id.token;
        session->password_expires_at = (time_t)az->id.token_expires_at;
    }
}

static void azure_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];
    const char *device = azure_conf(pi->uc)->device_id;

    if (!device)
        return;
    snprintf(filter, sizeof(filter), AZURE_C2D "#", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    profile_msgs_add(filters, AZURE_TWIN_RES "#", NULL, 0, 0, false);
    profile_msgs_add(filters, AZURE_TWIN_DESIRED "#", NULL, 0, 0, false);
    profile_msgs_add(filters, AZURE_METHODS_POST "#", NULL, 0, 0, false);
}

/* Every connection: fetch the twin (its document answers on $iothub/twin/res). */
static void azure_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    char topic[PROFILE_TOPIC_MAX];

    snprintf(topic, sizeof(topic), AZURE_TWIN_GET "?$rid=g%llu", azure_of(pi)->next_rid++);
    profile_msgs_add(first, topic, NULL, 0, 0, false);
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

static int azure_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                       const void *payload, size_t len, int qos, bool retain,
                       struct profile_msgs *out, const char **reason)
{
    const char *device = azure_conf(pi->uc)->device_id;
    char topic[PROFILE_TOPIC_MAX];
    int n;

    (void)retain; /* IoT Hub keeps no retained messages */
    if (!device)
        return -EINVAL;
    if (strcmp(m->child, device) != 0) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "IoT Hub takes one device per connection and this uplink is the device %.60s: "
                 "child %.60s needs a session of its own (not supported yet)",
                 device, m->child);
        *reason = pi->reason;
        return -EINVAL;
    }
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
    n = azure_d2c_topic(device, m->sub, json_shape_document(payload, len), topic, sizeof(topic));
    if (profile_topic_result(n, sizeof(topic), reason) < 0)
        return -EINVAL;
    return profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
}

/* $iothub/...: twin responses and desired updates, direct methods. */
static void azure_iothub_down(struct profile_instance *pi, const char *topic, const void *payload,
                              size_t len, struct profile_msgs *local)
{
    const char *device = azure_conf(pi->uc)->device_id;
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

static void azure_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                          size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const char *device = azure_conf(pi->uc)->device_id;
    char prefix[PROFILE_TOPIC_MAX], local_topic[PROFILE_TOPIC_MAX];
    size_t plen;
    int n;

    (void)retain;
    if (!device)
        return;
    if (strncmp(topic, "$iothub/", 8) == 0) {
        azure_iothub_down(pi, topic, payload, len, local);
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

const struct profile profile_azure = {
    .name = "azure",
    .new_cb = azure_new_cb,
    .free_cb = azure_free_cb,
    .session_cb = azure_session_cb,
    .subscriptions_cb = azure_subscriptions_cb,
    .online_cb = azure_online_cb,
    .up_cb = azure_up_cb,
    .down_cb = azure_down_cb,
    .limits = {.max_payload = AZURE_MAX_MESSAGE},
};
