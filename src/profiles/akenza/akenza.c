/* akenza.c - akenza (docs.akenza.io, "MQTT device connectivity"
 * with JWT authentication).
 *
 * Session: client id = the akenza device id (akenza.device, default
 * gateway.id), user name ignored, password a JWT (RS256 or ES256) with
 * aud https://akenza.io/devices/<id> (auth.aud may say otherwise: older
 * docs use the bare id), sub = the device id and the header kid = hex
 * SHA-256 of the public key's DER; section.c fills those defaults.
 *
 * Topics:
 *   dev/<id>/telemetry[/<sub>] -> /up/device/id/<id>[/<sub>]
 *   dev/<id>/state[/<sub>]     -> /up/device/id/<id>/state[/<sub>]
 *   /down/device/id/<id>/config[/...] -> dev/<id>/config (retained locally)
 *   /down/device/id/<id>[/<rest>]     -> dev/<id>/commands[/<rest>]
 * akenza leaves the downlink sub-topic to the application, so "config" is
 * the one name given a meaning here; everything else is a command.
 *
 * akenza has no gateways: every device needs a session of its own. The
 * uplink itself is akenza.device. With akenza.child_key, every other child
 * gets its own upstream session (per-device sessions): a struct uplink of
 * this profile's, with the uplink's settings but the child's client id,
 * key (the file the pattern names), aud and sub, opened on the child's
 * first message and stopped after akenza.session_idle without messages.
 * Their messages leave through the router like any other (profile_msg
 * .uplink names the session); their spools are on disk (child_sessions.c,
 * with spool.durability fsync) and reopened at start-up. The machinery is
 * child_sessions.c's; this file holds what is akenza's. Reconnects after
 * an outage are spread by each session's own decorrelated-jitter backoff
 * (uplink.c). Without
 * child_key other children are refused with the reason.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "child_sessions.h"
#include "conf.h"
#include "profiles/akenza/section.h"
#include "json.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile.h"
#include "akenza.h"
#include "profile_spec.h"
#include "util.h"

#define AKENZA_UP   "/up/device/id/"
#define AKENZA_DOWN "/down/device/id/"

int akenza_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason)
{
    int n;

    switch (m->channel) {
    case MAPPING_TELEMETRY:
        n = m->sub ? snprintf(buf, cap, AKENZA_UP "%s/%s", m->child, m->sub)
                   : snprintf(buf, cap, AKENZA_UP "%s", m->child);
        break;
    case MAPPING_STATE:
        n = m->sub ? snprintf(buf, cap, AKENZA_UP "%s/state/%s", m->child, m->sub)
                   : snprintf(buf, cap, AKENZA_UP "%s/state", m->child);
        break;
    default:
        *reason = "the akenza profile carries the telemetry and state channels only";
        return -EINVAL;
    }
    return profile_topic_result(n, cap, reason);
}

int akenza_down_topic(const char *local_prefix, const char *topic, char *buf, size_t cap,
                      bool *config)
{
    const char *id = topic + strlen(AKENZA_DOWN);
    const char *rest;
    size_t id_len;
    int n;

    *config = false;
    if (strncmp(topic, AKENZA_DOWN, strlen(AKENZA_DOWN)) != 0)
        return 0;
    rest = strchr(id, '/');
    id_len = rest ? (size_t)(rest - id) : strlen(id);
    if (id_len == 0 || id_len > MAPPING_CHILD_MAX || mapping_child_check(id, id_len) != NULL)
        return -EINVAL;
    if (rest && rest[1] == '\0')
        rest = NULL; /* "/down/device/id/<id>/": no sub-topic */
    else if (rest)
        rest++;
    if (rest && (strcmp(rest, "config") == 0 || strncmp(rest, "config/", 7) == 0)) {
        *config = true;
        n = snprintf(buf, cap, "%s/%.*s/config", local_prefix, (int)id_len, id);
    } else if (rest) {
        n = snprintf(buf, cap, "%s/%.*s/commands/%s", local_prefix, (int)id_len, id, rest);
    } else {
        n = snprintf(buf, cap, "%s/%.*s/commands", local_prefix, (int)id_len, id);
    }
    if (n < 0 || (size_t)n >= cap)
        return -ENAMETOOLONG;
    return n;
}

int akenza_child_aud(const char *device_aud, const char *device, const char *child, char *buf,
                     size_t cap)
{
    size_t prefix = strlen("https://akenza.io/devices/");
    int n;

    if (strncmp(device_aud, "https://akenza.io/devices/", prefix) == 0 &&
        strcmp(device_aud + prefix, device) == 0)
        n = snprintf(buf, cap, "https://akenza.io/devices/%s", child);
    else if (strcmp(device_aud, device) == 0)
        n = snprintf(buf, cap, "%s", child);
    else
        n = snprintf(buf, cap, "%s", device_aud);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : n;
}

/* --- per-device sessions (child_sessions.h) ------------------------------------------ */

/* What a child's session holds beyond the set's: its key, and the settings
 * the session's uplink borrows (struct akenza_session_conf). */
struct akenza_session {
    EVP_PKEY *key; /* owned, once loaded (by the worker, read after it) */
    enum jwt_alg alg;
    char key_path[4096];
};

/* One allocation per conf: the uplink's settings with the child's
 * identity, and what they point to, freed together by the set. */
struct akenza_session_conf {
    struct conf_uplink conf;
    struct conf_akenza section;
    struct conf_jwt_claim sub; /* "sub" = the child id */
    char aud[];
};

static bool akenza_sessions_enabled(const struct profile_instance *pi)
{
    return akenza_conf(pi->uc)->child_key != NULL;
}

static uint64_t akenza_sessions_idle_ms(const struct profile_instance *pi)
{
    return akenza_conf(pi->uc)->session_idle_ms;
}

static const char *akenza_self(const struct profile_instance *pi)
{
    return akenza_conf(pi->uc)->device;
}

/* A child without a key file is refused before its data is taken; whether
 * the file holds a usable key is learnt on the threadpool. access() is a
 * stat of a local file, not a read. */
static int akenza_session_check(const struct profile_instance *pi, const char *child, char *why,
                                size_t size)
{
    char path[4096];

    if (profile_child_key_path(akenza_conf(pi->uc)->child_key, child, path, sizeof(path)) < 0) {
        snprintf(why, size, "the key path for this child is too long");
        return -EINVAL;
    }
    if (!keys_is_uri(path) && access(path, R_OK) < 0) {
        snprintf(why, size, "cannot read %.120s: %s", path, strerror(errno));
        return -EINVAL;
    }
    return 0;
}

/* One key file load at a time: an OpenSSL engine (a pkcs11: pattern) is not
 * known to be safe for concurrent loads; files take microseconds anyway. */
static pthread_mutex_t akenza_key_lock = PTHREAD_MUTEX_INITIALIZER;

/* The key's JWT algorithm (akenza takes RS256 and ES256), or -EINVAL. */
static int session_key_alg(EVP_PKEY *key, enum jwt_alg *alg)
{
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA)
        *alg = JWT_ALG_RS256;
    else if (EVP_PKEY_get_base_id(key) == EVP_PKEY_EC && EVP_PKEY_get_bits(key) == 256)
        *alg = JWT_ALG_ES256;
    else
        return -EINVAL;
    return 0;
}

/* Threadpool: read and parse the child's key (the path was fixed at open). */
static int akenza_session_load(struct child_session *s, char *why, size_t size)
{
    struct akenza_session *as = child_session_data(s);
    int rc;

    pthread_mutex_lock(&akenza_key_lock);
    rc = keys_load_private(as->key_path, NULL, &as->key, why, size);
    pthread_mutex_unlock(&akenza_key_lock);
    if (rc == 0 && session_key_alg(as->key, &as->alg) < 0) {
        snprintf(why, size, "%.200s is neither RSA nor EC P-256 (akenza takes RS256 and ES256)",
                 as->key_path);
        EVP_PKEY_free(as->key);
        as->key = NULL;
        rc = -EINVAL;
    }
    return rc;
}

/* The session's settings: the uplink's, with the child's identity; its
 * spool follows the uplink's spool settings (durability, max_bytes,
 * overflow, ...) in a directory of its own. */
static struct conf_uplink *akenza_session_conf(struct child_session *s)
{
    const struct profile_instance *pi = child_session_pi(s);
    struct akenza_session *as = child_session_data(s);
    const char *child = child_session_id(s);
    char aud[1024];
    struct akenza_session_conf *sc;
    struct conf_uplink *conf;

    if (!as->key_path[0] && profile_child_key_path(akenza_conf(pi->uc)->child_key, child,
                                                   as->key_path, sizeof(as->key_path)) < 0)
        return NULL;
    if (akenza_child_aud(pi->uc->auth.jwt.aud ? pi->uc->auth.jwt.aud : "",
                         akenza_conf(pi->uc)->device, child, aud, sizeof(aud)) < 0)
        return NULL;
    sc = calloc(1, sizeof(*sc) + strlen(aud) + 1);
    if (!sc)
        return NULL;
    strcpy(sc->aud, aud);
    conf = &sc->conf;
    *conf = *pi->uc;
    conf->name = (char *)child_session_name(s);
    conf->client_id = (char *)child;
    sc->section = *akenza_conf(pi->uc);
    sc->section.device = (char *)child;
    sc->section.child_key = NULL;
    conf->section = &sc->section;
    conf->cert_cn = NULL;
    conf->auth.jwt.key = as->key_path;
    conf->auth.jwt.passphrase_file = NULL;
    conf->auth.jwt.private_key = as->key; /* NULL until loaded: not started before */
    conf->auth.jwt.alg = as->key ? as->alg : JWT_ALG_ES256;
    conf->auth.jwt.aud = sc->aud;
    conf->auth.jwt.kid_mode = JWT_KID_FINGERPRINT; /* akenza identifies the key by it */
    conf->auth.jwt.kid = NULL;
    sc->sub.name = "sub";
    sc->sub.value = (char *)child;
    conf->auth.jwt.claims = &sc->sub;
    conf->auth.jwt.claim_count = 1;
    return conf;
}

static void akenza_session_filters(struct child_session *s, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];

    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", child_session_id(s));
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
}

static const char *akenza_session_credential(const struct child_session *s, char *buf, size_t size)
{
    snprintf(buf, size, "key %s", ((struct akenza_session *)child_session_data(s))->key_path);
    return buf;
}

static void akenza_session_data_free(void *data)
{
    EVP_PKEY_free(((struct akenza_session *)data)->key);
}

static void akenza_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                           size_t len, int qos, bool retain, struct profile_msgs *local);

/* A child's session hears only its own /down/device/id/<child>/#: the
 * uplink's own mapping serves it. */
static void akenza_session_down(struct child_session *s, const char *topic, const void *payload,
                                size_t len, int qos, bool retain, struct profile_msgs *local)
{
    akenza_down_cb(child_session_pi(s), topic, payload, len, qos, retain, local);
}

static const struct child_session_ops akenza_session_ops = {
    .need = "akenza needs a session and key per device, and this child has no usable key "
            "(akenza.child_key)",
    .enabled = akenza_sessions_enabled,
    .idle_ms = akenza_sessions_idle_ms,
    .self = akenza_self,
    .check = akenza_session_check,
    .load = akenza_session_load,
    .conf = akenza_session_conf,
    .filters = akenza_session_filters,
    .credential = akenza_session_credential,
    .data_free = akenza_session_data_free,
    .data_size = sizeof(struct akenza_session),
    .down = akenza_session_down,
};

static struct child_sessions *sessions_of(const struct profile_instance *pi)
{
    return pi->state;
}

static int akenza_new_cb(struct profile_instance *pi)
{
    struct child_sessions *set;
    int rc = child_sessions_new(pi, &akenza_session_ops, &set);

    if (rc == 0)
        pi->state = set;
    return rc;
}

static void akenza_free_cb(struct profile_instance *pi)
{
    child_sessions_free(sessions_of(pi));
    pi->state = NULL;
}

static void akenza_close_cb(struct profile_instance *pi)
{
    child_sessions_close(sessions_of(pi));
}

/* A reload: sessions take the uplink's new settings (a changed one
 * reconnects), or close when per-device sessions were turned off (their
 * spools stay on disk for when they are turned on again). */
static void akenza_reconfigure_cb(struct profile_instance *pi)
{
    child_sessions_reconfigure(sessions_of(pi));
}

static void akenza_status_json_cb(const struct profile_instance *pi, struct json_buf *out)
{
    child_sessions_status_json(sessions_of(pi), out);
}

static void akenza_child_json_cb(const struct profile_instance *pi, const char *child,
                                 struct json_buf *out)
{
    child_sessions_child_json(sessions_of(pi), child, out);
}

static void akenza_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    session->client_id = akenza_conf(pi->uc)->device;
}

static void akenza_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];

    if (!akenza_conf(pi->uc)->device)
        return;
    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", akenza_conf(pi->uc)->device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
}

static int akenza_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                        const void *payload, size_t len, int qos, bool retain,
                        struct profile_msgs *out, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];

    struct child_session *session = NULL;
    int rc;

    (void)retain;
    if (!akenza_conf(pi->uc)->device)
        return -EINVAL;
    if (strcmp(m->child, akenza_conf(pi->uc)->device) != 0) {
        if (!akenza_conf(pi->uc)->child_key) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "akenza has no gateways and this uplink is the device %s alone: other "
                     "children need a session of their own (set akenza.child_key)",
                     akenza_conf(pi->uc)->device);
            *reason = pi->reason;
            return -EINVAL;
        }
        if ((rc = child_sessions_route(sessions_of(pi), m->child, &session)) < 0) {
            *reason = pi->reason;
            return rc;
        }
    }
    if (akenza_up_topic(m, topic, sizeof(topic), reason) < 0)
        return -EINVAL;
    /* akenza's broker takes QoS 0 and 1. */
    rc = profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
    if (rc == 0 && session)
        out->msg[out->count - 1].uplink = child_session_uplink(session);
    return rc;
}

static void akenza_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                           size_t len, int qos, bool retain, struct profile_msgs *local)
{
    char local_topic[PROFILE_TOPIC_MAX];
    bool config;
    int n = akenza_down_topic(pi->conf->local.topic_prefix, topic, local_topic, sizeof(local_topic),
                              &config);

    if (n == -EINVAL)
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
    if (n <= 0)
        return;
    profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, retain || config);
}

const struct profile profile_akenza = {
    .name = "akenza",
    .new_cb = akenza_new_cb,
    .free_cb = akenza_free_cb,
    .close_cb = akenza_close_cb,
    .reconfigure_cb = akenza_reconfigure_cb,
    .session_cb = akenza_session_cb,
    .subscriptions_cb = akenza_subscriptions_cb,
    .up_cb = akenza_up_cb,
    .down_cb = akenza_down_cb,
    .status_json_cb = akenza_status_json_cb,
    .child_json_cb = akenza_child_json_cb,
};
