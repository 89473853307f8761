/* profile_akenza.c - akenza (docs.akenza.io, "MQTT device connectivity"
 * with JWT authentication).
 *
 * Session: client id = the akenza device id (akenza.device, default
 * gateway.id), user name ignored, password a JWT (RS256 or ES256) with
 * aud https://akenza.io/devices/<id> (auth.aud may say otherwise: older
 * docs use the bare id), sub = the device id and the header kid = hex
 * SHA-256 of the public key's DER; conf.c fills those defaults.
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
 * .uplink names the session), but their queues are in memory: a restart
 * loses what they had not sent. Reconnects after an outage are spread by
 * each session's own decorrelated-jitter backoff (uplink.c). Without
 * child_key other children are refused with the reason.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile.h"
#include "profile_gcp.h"
#include "uplink.h"

/* The idle sweep runs at session_idle / 2, within these bounds. */
#define AKENZA_SWEEP_MIN_MS 500u
#define AKENZA_SWEEP_MAX_MS 60000u

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
    if (n < 0 || (size_t)n >= cap) {
        *reason = "the cloud topic would be longer than 1024 bytes";
        return -ENAMETOOLONG;
    }
    return n;
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

/* --- per-device sessions ------------------------------------------------------------- */

struct akenza_session {
    struct akenza_session *next;
    struct profile_instance *pi;
    struct uplink *uplink;
    struct conf_uplink *conf; /* owned; borrowed by the uplink */
    EVP_PKEY *key;            /* owned */
    enum jwt_alg alg;
    char *key_path;            /* owned */
    char *name;                /* "<uplink>.<child>", owned */
    char *aud;                 /* owned */
    struct conf_jwt_claim sub; /* "sub" = the child id (value points to id) */
    uint64_t used_ms;          /* uv_now() of its last message */
    char id[];
};

struct akenza {
    struct akenza_session *sessions; /* open */
    struct akenza_session *stopping; /* stopped, waiting for their uplink to finish */
    uv_timer_t sweep;
    bool sweep_closed;
};

static struct akenza *akenza_of(const struct profile_instance *pi)
{
    return pi->state;
}

static void session_free(struct akenza_session *s)
{
    free(s->conf);
    EVP_PKEY_free(s->key);
    free(s->key_path);
    free(s->name);
    free(s->aud);
    free(s);
}

/* The session's settings: the uplink's, with the child's identity, and a
 * memory queue (a durable spool per child would be recovered only when the
 * child happens to publish again). */
static struct conf_uplink *session_conf(const struct profile_instance *pi,
                                        const struct akenza_session *s)
{
    struct conf_uplink *conf = malloc(sizeof(*conf));

    if (!conf)
        return NULL;
    *conf = *pi->uc;
    conf->name = s->name;
    conf->client_id = (char *)s->id;
    conf->akenza.device = (char *)s->id;
    conf->akenza.child_key = NULL;
    conf->cert_cn = NULL;
    conf->spool.durability = CONF_SPOOL_NONE;
    conf->auth.jwt.key = s->key_path;
    conf->auth.jwt.passphrase_file = NULL;
    conf->auth.jwt.private_key = s->key;
    conf->auth.jwt.alg = s->alg;
    conf->auth.jwt.aud = s->aud;
    conf->auth.jwt.kid_mode = JWT_KID_FINGERPRINT; /* akenza identifies the key by it */
    conf->auth.jwt.kid = NULL;
    conf->auth.jwt.claims = (struct conf_jwt_claim *)&s->sub;
    conf->auth.jwt.claim_count = 1;
    return conf;
}

static void session_message_cb(void *arg, struct uplink *uplink, const char *topic,
                               const void *payload, size_t len, int qos, bool retain)
{
    struct akenza_session *s = arg;
    struct profile_instance *pi = s->pi;
    char local_topic[PROFILE_TOPIC_MAX];
    bool config;
    int n = akenza_down_topic(pi->conf->local.topic_prefix, topic, local_topic, sizeof(local_topic),
                              &config);

    (void)uplink;
    if (n == -EINVAL)
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
    if (n > 0)
        profile_deliver(pi, local_topic, payload, len, qos > 1 ? 1 : qos, retain || config);
}

static const char *akenza_connack_text(int rc);

static const char *session_connack_text_cb(void *arg, struct uplink *uplink, int rc)
{
    (void)arg;
    (void)uplink;
    return akenza_connack_text(rc);
}

/* Open @child's session. Returns 0, -EINVAL with pi->reason (no usable
 * key), -ENOMEM. */
static int session_open(struct profile_instance *pi, const char *child, struct akenza_session **out)
{
    struct akenza *ak = akenza_of(pi);
    struct uplink_hooks hooks = {.message_cb = session_message_cb,
                                 .connack_text_cb = session_connack_text_cb};
    char path[4096], aud[1024], filter[PROFILE_TOPIC_MAX], err[KEYS_ERR_SIZE] = "";
    struct akenza_session *s;
    size_t name_len;
    int rc;

    if (gcp_child_key_path(pi->uc->akenza.child_key, child, path, sizeof(path)) < 0 ||
        akenza_child_aud(pi->uc->auth.jwt.aud ? pi->uc->auth.jwt.aud : "", pi->uc->akenza.device,
                         child, aud, sizeof(aud)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "the key path or aud for this child is too long");
        return -EINVAL;
    }
    s = calloc(1, sizeof(*s) + strlen(child) + 1);
    if (!s)
        return -ENOMEM;
    strcpy(s->id, child);
    s->pi = pi;
    s->sub.name = "sub";
    s->sub.value = s->id;
    name_len = strlen(pi->uc->name) + 1 + strlen(child) + 1;
    s->name = malloc(name_len);
    s->key_path = strdup(path);
    s->aud = strdup(aud);
    if (!s->name || !s->key_path || !s->aud) {
        rc = -ENOMEM;
        goto err;
    }
    snprintf(s->name, name_len, "%s.%s", pi->uc->name, child);
    /* A small file, read once per session on the loop thread. */
    rc = keys_load_private(path, NULL, &s->key, err, sizeof(err));
    if (rc == -ENOMEM)
        goto err;
    if (rc < 0) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "akenza needs a session and key per device, and this child has no usable key "
                 "(akenza.child_key): %.140s",
                 err);
        rc = -EINVAL;
        goto err;
    }
    if (EVP_PKEY_get_base_id(s->key) == EVP_PKEY_RSA) {
        s->alg = JWT_ALG_RS256;
    } else if (EVP_PKEY_get_base_id(s->key) == EVP_PKEY_EC && EVP_PKEY_get_bits(s->key) == 256) {
        s->alg = JWT_ALG_ES256;
    } else {
        snprintf(pi->reason, sizeof(pi->reason),
                 "the child's key %.120s is neither RSA nor EC P-256 (akenza takes RS256 and "
                 "ES256)",
                 path);
        rc = -EINVAL;
        goto err;
    }
    s->conf = session_conf(pi, s);
    if (!s->conf) {
        rc = -ENOMEM;
        goto err;
    }
    hooks.arg = s;
    rc = uplink_new(pi->loop, s->conf, pi->conf->gateway_id, &hooks, &s->uplink);
    if (rc < 0)
        goto err;
    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", child);
    if ((rc = uplink_open_spool(s->uplink, NULL)) < 0 ||
        (rc = uplink_subscribe(s->uplink, filter, 1)) < 0 || (rc = uplink_start(s->uplink)) < 0)
        goto err_after_uplink;
    s->next = ak->sessions;
    ak->sessions = s;
    log_child(LOG_INFO, pi->uc->name, child, "opening a session of its own as %s (key %s)", s->name,
              path);
    *out = s;
    return 0;

err_after_uplink:
    uplink_free(s->uplink);
err:
    if (rc == -ENOMEM)
        snprintf(pi->reason, sizeof(pi->reason), "out of memory");
    else if (rc < 0 && !pi->reason[0])
        snprintf(pi->reason, sizeof(pi->reason), "cannot open the child's session: %s",
                 strerror(-rc));
    session_free(s);
    return rc == -ENOMEM ? rc : -EINVAL;
}

static void maybe_closed(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);

    if (pi->closing && ak->sweep_closed && !ak->sessions && !ak->stopping)
        profile_instance_closed(pi);
}

static void session_stopped_cb(struct uplink *uplink, void *arg)
{
    struct akenza_session *s = arg;
    struct profile_instance *pi = s->pi;
    struct akenza *ak = akenza_of(pi);

    uplink_free(uplink);
    for (struct akenza_session **link = &ak->stopping; *link; link = &(*link)->next) {
        if (*link == s) {
            *link = s->next;
            break;
        }
    }
    session_free(s);
    maybe_closed(pi);
}

/* Stop @s (open) for @why; it is freed once its uplink has finished. */
static void session_stop(struct profile_instance *pi, struct akenza_session *s, const char *why)
{
    struct akenza *ak = akenza_of(pi);
    unsigned timeout_ms = pi->conf->shutdown_timeout_ms ? pi->conf->shutdown_timeout_ms : 5000;

    for (struct akenza_session **link = &ak->sessions; *link; link = &(*link)->next) {
        if (*link == s) {
            *link = s->next;
            break;
        }
    }
    s->next = ak->stopping;
    ak->stopping = s;
    log_child(LOG_INFO, pi->uc->name, s->id, "closing its session: %s", why);
    uplink_stop(s->uplink, timeout_ms, session_stopped_cb, s);
}

static void stop_all(struct profile_instance *pi, const char *why)
{
    while (akenza_of(pi)->sessions)
        session_stop(pi, akenza_of(pi)->sessions, why);
}

static void sweep_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;
    uint64_t now = uv_now(pi->loop);
    struct akenza_session *s, *next;

    for (s = akenza_of(pi)->sessions; s; s = next) {
        struct uplink_stats stats;
        next = s->next;
        if (now - s->used_ms < pi->uc->akenza.session_idle_ms)
            continue;
        /* Unsent messages keep it open (a memory queue would be lost). */
        uplink_get_stats(s->uplink, &stats);
        if (stats.queued == 0)
            session_stop(pi, s, "idle");
    }
}

static void sweep_start(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);
    uint64_t every = pi->uc->akenza.session_idle_ms / 2;

    uv_timer_stop(&ak->sweep);
    if (!pi->uc->akenza.child_key)
        return;
    every = every < AKENZA_SWEEP_MIN_MS ? AKENZA_SWEEP_MIN_MS : every;
    every = every > AKENZA_SWEEP_MAX_MS ? AKENZA_SWEEP_MAX_MS : every;
    uv_timer_start(&ak->sweep, sweep_cb, every, every);
}

static int akenza_new_cb(struct profile_instance *pi)
{
    struct akenza *ak = calloc(1, sizeof(*ak));

    if (!ak)
        return -ENOMEM;
    pi->state = ak;
    uv_timer_init(pi->loop, &ak->sweep);
    uv_unref((uv_handle_t *)&ak->sweep);
    ak->sweep.data = pi;
    sweep_start(pi);
    return 0;
}

static void akenza_free_cb(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);

    /* close_cb stopped every session and waited for them. */
    free(ak);
    pi->state = NULL;
}

static void sweep_closed_cb(uv_handle_t *handle)
{
    struct profile_instance *pi = handle->data;

    akenza_of(pi)->sweep_closed = true;
    maybe_closed(pi);
}

static void akenza_close_cb(struct profile_instance *pi)
{
    stop_all(pi, "stopping");
    uv_close((uv_handle_t *)&akenza_of(pi)->sweep, sweep_closed_cb);
}

/* A reload: sessions take the uplink's new settings (a changed one
 * reconnects), or close when per-device sessions were turned off. */
static void akenza_reconfigure_cb(struct profile_instance *pi)
{
    sweep_start(pi);
    if (!pi->uc->akenza.child_key) {
        stop_all(pi, "akenza.child_key was removed");
        return;
    }
    for (struct akenza_session *s = akenza_of(pi)->sessions; s; s = s->next) {
        char aud[1024];
        char *old_aud = s->aud, *new_aud = NULL;
        struct conf_uplink *conf = NULL;
        if (akenza_child_aud(pi->uc->auth.jwt.aud ? pi->uc->auth.jwt.aud : "",
                             pi->uc->akenza.device, s->id, aud, sizeof(aud)) >= 0 &&
            (new_aud = strdup(aud)) != NULL) {
            s->aud = new_aud;
            conf = session_conf(pi, s);
        }
        if (!conf) {
            s->aud = old_aud;
            free(new_aud);
            log_child(LOG_ERR, pi->uc->name, s->id,
                      "cannot adopt the new settings (out of memory)");
            continue;
        }
        /* The uplink compares the old settings with the new ones, so the
         * old conf and aud are freed only after it has adopted them. */
        uplink_reconfigure(s->uplink, conf);
        free(s->conf);
        free(old_aud);
        s->conf = conf;
    }
}

static void akenza_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    session->client_id = pi->uc->akenza.device;
}

static void akenza_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];

    if (!pi->uc->akenza.device)
        return;
    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", pi->uc->akenza.device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
}

static int akenza_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                        const void *payload, size_t len, int qos, bool retain,
                        struct profile_msgs *out, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];

    struct akenza_session *session = NULL;
    int rc;

    (void)retain;
    if (!pi->uc->akenza.device)
        return -EINVAL;
    if (strcmp(m->child, pi->uc->akenza.device) != 0) {
        if (!pi->uc->akenza.child_key) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "akenza has no gateways and this uplink is the device %s alone: other "
                     "children need a session of their own (set akenza.child_key)",
                     pi->uc->akenza.device);
            *reason = pi->reason;
            return -EINVAL;
        }
        for (session = akenza_of(pi)->sessions; session; session = session->next) {
            if (strcmp(session->id, m->child) == 0)
                break;
        }
        if (!session && (rc = session_open(pi, m->child, &session)) < 0) {
            *reason = pi->reason;
            return rc;
        }
        session->used_ms = uv_now(pi->loop);
    }
    if (akenza_up_topic(m, topic, sizeof(topic), reason) < 0)
        return -EINVAL;
    /* akenza's broker takes QoS 0 and 1. */
    rc = profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
    if (rc == 0 && session)
        out->msg[out->count - 1].uplink = session->uplink;
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

static const char *akenza_connack_text_cb(const struct profile_instance *pi, int rc)
{
    (void)pi;
    return akenza_connack_text(rc);
}

static const char *akenza_connack_text(int rc)
{
    if (rc == 4 || rc == 5)
        return "the JWT was rejected: check alg (RS256 or ES256) against the key uploaded to "
               "akenza, aud (https://akenza.io/devices/<id>, or the bare id), sub = the device "
               "id, kid = SHA-256 of the public key, and the clock";
    return NULL;
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
    .connack_text_cb = akenza_connack_text_cb,
};
