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
 * QoS 2 becomes 1 and retain is dropped: IoT Hub takes neither.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "azure.h"
#include "conf.h"
#include "log.h"
#include "profile.h"
#include "profiles/azure/section.h"

#define AZURE_D2C          "devices/%s/messages/events/"
#define AZURE_C2D          "devices/%s/messages/devicebound/"
#define AZURE_KEY_FILE_MAX 4096

struct azure {
    char username[600];
    char token[AZURE_SAS_MAX];
    char key_error[256]; /* the last key file problem, logged once per change */
};

static struct azure *azure_of(const struct profile_instance *pi)
{
    return pi->state;
}

static int azure_new_cb(struct profile_instance *pi)
{
    pi->state = calloc(1, sizeof(struct azure));
    return pi->state ? 0 : -ENOMEM;
}

static void azure_free_cb(struct profile_instance *pi)
{
    struct azure *az = azure_of(pi);

    if (az)
        OPENSSL_cleanse(az->token, sizeof(az->token));
    free(az);
}

/* The device key from @path into @key; its length, or -errno with @why. */
static int read_key(const char *path, uint8_t key[AZURE_KEY_MAX], char *why, size_t why_size)
{
    char text[AZURE_KEY_FILE_MAX + 1];
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc;

    if (fd < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot open %s: %s", path, strerror(errno));
        return rc;
    }
    n = read(fd, text, AZURE_KEY_FILE_MAX);
    rc = n < 0 ? -errno : 0;
    close(fd);
    if (n < 0) {
        snprintf(why, why_size, "cannot read %s: %s", path, strerror(-rc));
        return rc;
    }
    text[n] = '\0';
    rc = azure_key_decode(text, key);
    OPENSSL_cleanse(text, sizeof(text));
    if (rc < 0)
        snprintf(why, why_size,
                 "%s does not hold a key: expected the device's primary or secondary key as "
                 "the portal shows it (base64, e.g. \"Q2hh...bmc=\"), on one line",
                 path);
    return rc;
}

static void azure_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    const struct conf_azure *conf = azure_conf(pi->uc);
    struct azure *az = azure_of(pi);
    struct profile_connect_id id;
    uint8_t key[AZURE_KEY_MAX];
    char why[256];
    int len;

    memset(&id, 0, sizeof(id));
    profile_connect_id(pi->uc, &id);
    if (!id.client_id[0])
        return; /* no device id: the conf check reported it */
    session->client_id = conf->device_id;
    snprintf(az->username, sizeof(az->username), "%s", id.username);
    session->username = az->username;
    if (conf->key_file == NULL)
        return; /* X.509: the certificate is the credential */
    len = read_key(conf->key_file, key, why, sizeof(why));
    if (len < 0) {
        if (strcmp(why, az->key_error) != 0)
            log_uplink(LOG_ERR, pi->uc->name,
                       "azure.key_file: %s; connecting without a SAS token, which IoT Hub "
                       "refuses",
                       why);
        snprintf(az->key_error, sizeof(az->key_error), "%s", why);
        return;
    }
    az->key_error[0] = '\0';
    time_t expiry = time(NULL) + (time_t)(conf->token_life_ms / 1000);
    int n = azure_sas_token(key, (size_t)len, conf->hub, conf->device_id, conf->policy, expiry,
                            az->token, sizeof(az->token));
    OPENSSL_cleanse(key, sizeof(key));
    if (n < 0) {
        log_uplink(LOG_ERR, pi->uc->name, "cannot make a SAS token: %s", strerror(-n));
        return;
    }
    session->password = az->token;
    session->password_expires_at = expiry;
}

static void azure_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];
    const char *device = azure_conf(pi->uc)->device_id;

    if (!device)
        return;
    snprintf(filter, sizeof(filter), AZURE_C2D "#", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
}

/* A JSON document (object or array) by its first byte, as IoT Hub's
 * routing needs $.ct and $.ce to read the body. */
static bool looks_like_json(const void *payload, size_t len)
{
    const char *p = payload;
    size_t i = 0;

    while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\r' || p[i] == '\n'))
        i++;
    return i < len && (p[i] == '{' || p[i] == '[');
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
    if (m->channel != MAPPING_TELEMETRY) {
        *reason = "profile azure sends telemetry (device-to-cloud messages) only; the device "
                  "twin's reported properties are not supported yet";
        return -EINVAL;
    }
    if (len > AZURE_MAX_MESSAGE) {
        *reason = "IoT Hub takes device-to-cloud messages of at most 256 KiB";
        return -EINVAL;
    }
    n = azure_d2c_topic(device, m->sub, looks_like_json(payload, len), topic, sizeof(topic));
    if (profile_topic_result(n, sizeof(topic), reason) < 0)
        return -EINVAL;
    return profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
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
    .up_cb = azure_up_cb,
    .down_cb = azure_down_cb,
    .limits = {.max_payload = AZURE_MAX_MESSAGE},
};
