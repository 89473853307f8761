/* profile_gcp.c - Google Cloud IoT Core and ClearBlade IoT Core (the same
 * MQTT bridge protocol).
 *
 * Session: client id projects/<p>/locations/<r>/registries/<g>/devices/<d>,
 * user name ignored by the server ("unused"), password a JWT whose aud is
 * the project id (conf.c makes that the default auth.aud) and whose life is
 * at most 24 h (jwt.h JWT_GCP_MAX_LIFETIME_S; the uplink rotates it).
 *
 * Topics ("Publishing over the MQTT bridge"), for the gateway and for each
 * attached child:
 *   dev/<id>/telemetry[/<sub>] -> /devices/<id>/events[/<sub>]  (<= 256 KiB)
 *   dev/<id>/state             -> /devices/<id>/state           (<= 64 KiB,
 *                                 at most one per second and device: newer
 *                                 ones are coalesced, the newest wins)
 *   /devices/<id>/config       -> dev/<id>/config (retained locally)
 *   /devices/<id>/commands[/s] -> dev/<id>/commands[/s]
 *   /devices/<gw>/errors       -> explained in the log and on
 *                                 uplinkd/<uplink>/errors (gateway mode)
 * QoS 2 is never sent: the bridge closes the connection on it (QoS 2 ->
 * 1), and it keeps no retained messages (the flag is dropped).
 *
 * Gateway mode ("Using gateways with the MQTT bridge"): a child is attached
 * (QoS 1 on /devices/<child>/attach, {"authorization":"<child JWT>"} when
 * gcp.child_key names a key file for it, else {}) before its first message,
 * and its data waits for the PUBACK (profile_registration wait_ack). An
 * attachment holds for one connection: every child used within
 * gcp.attach_idle is attached again after a reconnect, and an idle child is
 * detached. Its config and commands are subscribed after the attach is
 * acknowledged (the bridge refuses subscriptions for unattached devices),
 * and dropped from the uplink's set before the next connection so they are
 * not re-sent ahead of the attach. At most 1000 children are attached at a
 * time.
 *
 * Threading: loop thread only. A child key is read and a child token signed
 * on the loop thread when the child is attached: a small file and one
 * signature per child and connection (PKCS#11 child keys are not offered).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "conf.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile.h"
#include "profile_gcp.h"
#include "registry.h"
#include "uplink.h"

/* The sweep for idle children runs at attach_idle / 2, within these bounds. */
#define GCP_SWEEP_MIN_MS 500u
#define GCP_SWEEP_MAX_MS 60000u

/* --- pure rules (profile_gcp.h) ------------------------------------------------ */

int gcp_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason)
{
    int n;

    switch (m->channel) {
    case MAPPING_TELEMETRY:
        if (m->sub)
            n = snprintf(buf, cap, "/devices/%s/events/%s", m->child, m->sub);
        else
            n = snprintf(buf, cap, "/devices/%s/events", m->child);
        break;
    case MAPPING_STATE:
        if (m->sub) {
            *reason = "GCP has one state per device: publish on dev/<child>/state without a "
                      "sub-topic";
            return -EINVAL;
        }
        n = snprintf(buf, cap, "/devices/%s/state", m->child);
        break;
    default:
        *reason = "the gcp profile carries the telemetry and state channels only";
        return -EINVAL;
    }
    if (n < 0 || (size_t)n >= cap) {
        *reason = "the cloud topic would be longer than 1024 bytes";
        return -ENAMETOOLONG;
    }
    return n;
}

enum gcp_down_kind gcp_down_parse(const char *topic, char *id, const char **sub)
{
    static const char prefix[] = "/devices/";
    const char *p, *slash;
    enum gcp_down_kind kind;
    size_t len;

    *sub = NULL;
    id[0] = '\0';
    if (strncmp(topic, prefix, sizeof(prefix) - 1) != 0)
        return GCP_DOWN_OTHER;
    p = topic + sizeof(prefix) - 1;
    slash = strchr(p, '/');
    if (!slash)
        return GCP_DOWN_OTHER;
    len = (size_t)(slash - p);
    if (strcmp(slash, "/config") == 0) {
        kind = GCP_DOWN_CONFIG;
    } else if (strcmp(slash, "/errors") == 0) {
        kind = GCP_DOWN_ERRORS;
    } else if (strcmp(slash, "/commands") == 0) {
        kind = GCP_DOWN_COMMANDS;
    } else if (strncmp(slash, "/commands/", 10) == 0) {
        kind = GCP_DOWN_COMMANDS;
        if (slash[10] != '\0')
            *sub = slash + 10;
    } else {
        return GCP_DOWN_OTHER;
    }
    if (len == 0 || len > MAPPING_CHILD_MAX || mapping_child_check(p, len) != NULL)
        return GCP_DOWN_BAD_ID;
    memcpy(id, p, len);
    id[len] = '\0';
    return kind;
}

const char *gcp_error_explain(const char *error_type)
{
    static const struct {
        const char *type;
        const char *text;
    } known[] = {
        {"GATEWAY_DEVICE_NOT_FOUND",
         "the cloud found no attached device for the message: the child is not registered in "
         "the registry, not bound to this gateway, or was not attached (create the device and "
         "bind it to the gateway)"},
        {"GATEWAY_ATTACHMENT_ERROR",
         "the attach was refused: the child is not bound to this gateway, or its JWT (gcp."
         "child_key) does not match a key registered for it, or the gateway's auth method needs "
         "one"},
        {"GATEWAY_DETACHMENT_DEVICE_ERROR",
         "the cloud detached the child because of an error of that device"},
        {"GATEWAY_INVALID_MQTT_TOPIC",
         "the cloud could not parse a topic: a malformed topic or an invalid device id"},
        {"GATEWAY_UNEXPECTED_PACKET_ID",
         "the cloud could not match a packet id (for example a SUBACK nobody asked for)"},
        {"GATEWAY_UNEXPECTED_MESSAGE_TYPE",
         "the cloud received a message it does not support (an unsupported subscription or "
         "packet)"},
    };

    for (size_t i = 0; error_type && i < sizeof(known) / sizeof(known[0]); i++) {
        if (strcmp(known[i].type, error_type) == 0)
            return known[i].text;
    }
    return "an error the gateway documentation does not describe";
}

int gcp_child_key_path(const char *pattern, const char *child, char *buf, size_t cap)
{
    size_t used = 0;

    for (const char *p = pattern; *p; p++) {
        const char *text = p;
        size_t len = 1;
        if (p[0] == '%' && p[1] == 'c') {
            text = child;
            len = strlen(child);
            p++;
        } else if (p[0] == '%' && p[1] == '%') {
            p++;
        }
        if (used + len >= cap)
            return -ENAMETOOLONG;
        memcpy(buf + used, text, len);
        used += len;
    }
    if (cap == 0)
        return -ENAMETOOLONG;
    buf[used] = '\0';
    return (int)used;
}

/* --- per-child state ------------------------------------------------------------ */

struct gcp_child {
    struct gcp_child *next;
    struct profile_instance *pi;
    uint64_t used_ms; /* uv_now() of its last local message */
    bool self;        /* the gateway's own device */
    bool subscribed;  /* its config and commands filters are in the uplink's set */
    bool state_sent;  /* a state went up at state_sent_ms */
    uint64_t state_sent_ms;
    uv_timer_t state_timer; /* the coalesced state's turn */
    bool timer_init;
    void *state_payload; /* the newest coalesced state, or NULL */
    size_t state_len;
    int state_qos;
    char id[];
};

struct gcp {
    struct gcp_child *children;
    size_t attached; /* children other than the gateway itself */
    uv_timer_t sweep;
    bool sweep_init;
    unsigned closing; /* handles whose close callback is still to come */
    char client_id[1024];
};

static struct gcp *gcp_of(const struct profile_instance *pi)
{
    return pi->state;
}

static bool is_self(const struct profile_instance *pi, const char *child)
{
    return pi->uc->gcp.device && strcmp(pi->uc->gcp.device, child) == 0;
}

static struct gcp_child *child_find(struct gcp *gcp, const char *id)
{
    for (struct gcp_child *c = gcp->children; c; c = c->next) {
        if (strcmp(c->id, id) == 0)
            return c;
    }
    return NULL;
}

/* Add @id to *@out. Returns 0, -EINVAL with *@reason beyond
 * GCP_MAX_ATTACHED children, -ENOMEM. */
static int child_add(struct profile_instance *pi, const char *id, struct gcp_child **out,
                     const char **reason)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child *child;
    bool self = is_self(pi, id);

    if (!self && gcp->attached >= GCP_MAX_ATTACHED) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "GCP allows at most %u devices attached to one gateway connection and %zu are "
                 "(idle ones are detached after gcp.attach_idle; lower it, or split the "
                 "children over several gateways)",
                 GCP_MAX_ATTACHED, gcp->attached);
        *reason = pi->reason;
        return -EINVAL;
    }
    child = calloc(1, sizeof(*child) + strlen(id) + 1);
    if (!child)
        return -ENOMEM;
    strcpy(child->id, id);
    child->pi = pi;
    child->self = self;
    child->next = gcp->children;
    gcp->children = child;
    if (!self)
        gcp->attached++;
    *out = child;
    return 0;
}

static void child_free(struct gcp_child *child)
{
    free(child->state_payload);
    free(child);
}

static void child_timer_closed_cb(uv_handle_t *handle)
{
    struct gcp_child *child = handle->data;
    struct profile_instance *pi = child->pi;
    struct gcp *gcp = gcp_of(pi);

    child_free(child);
    if (--gcp->closing == 0 && pi->closing)
        profile_instance_closed(pi);
}

/* Unlink @child and free it (after its timer closed, when it has one). */
static void child_remove(struct profile_instance *pi, struct gcp_child *child)
{
    struct gcp *gcp = gcp_of(pi);

    for (struct gcp_child **link = &gcp->children; *link; link = &(*link)->next) {
        if (*link == child) {
            *link = child->next;
            break;
        }
    }
    if (!child->self)
        gcp->attached--;
    if (child->timer_init) {
        gcp->closing++;
        uv_close((uv_handle_t *)&child->state_timer, child_timer_closed_cb);
    } else {
        child_free(child);
    }
}

static void child_filters(const char *id, char *config, char *commands, size_t cap)
{
    snprintf(config, cap, "/devices/%s/config", id);
    snprintf(commands, cap, "/devices/%s/commands/#", id);
}

static void child_unsubscribe(struct profile_instance *pi, struct gcp_child *child)
{
    char config[PROFILE_TOPIC_MAX], commands[PROFILE_TOPIC_MAX];

    if (!child->subscribed)
        return;
    child_filters(child->id, config, commands, sizeof(config));
    uplink_unsubscribe(pi->uplink, config);
    uplink_unsubscribe(pi->uplink, commands);
    child->subscribed = false;
}

/* --- attach ---------------------------------------------------------------------- */

/* A token for @child signed with its own key (gcp.child_key), or NULL in
 * *@token when it has none. The key is read afresh for every attach, so a
 * key put in place later, or replaced, is used from the next connection. */
static int child_token(struct profile_instance *pi, const char *child, char **token)
{
    const struct conf_gcp *cg = &pi->uc->gcp;
    const struct conf_jwt *jwt = &pi->uc->auth.jwt;
    /* "Using gateways": the child's JWT has the same form as a device's:
     * aud = the project id. */
    struct jwt_claims claims = {.aud = cg->project,
                                .lifetime_s = jwt->lifetime_s,
                                .max_lifetime_s = JWT_GCP_MAX_LIFETIME_S,
                                .skew_s = jwt->skew_s};
    char path[4096], err[KEYS_ERR_SIZE] = "";
    struct jwt_signer *signer = NULL;
    EVP_PKEY *key = NULL;
    enum jwt_alg alg;
    int rc;

    *token = NULL;
    if (!cg->child_key)
        return 0;
    if (gcp_child_key_path(cg->child_key, child, path, sizeof(path)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "gcp.child_key gives a path that is too long");
        return -ENAMETOOLONG;
    }
    if (access(path, F_OK) < 0 && errno == ENOENT)
        return 0; /* no key of its own: the gateway's association is enough */
    rc = keys_load_private(path, NULL, &key, err, sizeof(err));
    if (rc < 0)
        goto err;
    alg = EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA ? JWT_ALG_RS256 : JWT_ALG_ES256;
    rc = jwt_signer_new(key, alg, JWT_KID_NONE, NULL, &signer, err, sizeof(err));
    if (rc < 0)
        goto err;
    rc = jwt_sign(signer, &claims, time(NULL), token, NULL, err, sizeof(err));
    if (rc < 0)
        goto err;
    jwt_signer_free(signer);
    EVP_PKEY_free(key);
    return 0;

err:
    /* The reason buffer is short: the key error names the file already. */
    snprintf(pi->reason, sizeof(pi->reason), "cannot sign the attach token for %.64s: %.120s",
             child, err);
    jwt_signer_free(signer);
    EVP_PKEY_free(key);
    return rc;
}

static int gcp_register_cb(struct profile_instance *pi, const char *child, struct profile_msgs *out,
                           struct profile_registration *how, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];
    char *token = NULL;
    char *payload;
    int rc;

    if (is_self(pi, child) || !pi->uc->gcp.gateway)
        return 0;
    /* An attachment lives as long as the connection: one made now would
     * fail, and gcp_online_cb attaches every recent child at the next
     * CONNACK anyway (no token is signed for every message meanwhile). */
    if (uplink_get_state(pi->uplink) != UPLINK_ONLINE)
        return 0;
    how->wait_ack = true;
    how->per_connection = true;
    rc = child_token(pi, child, &token);
    if (rc < 0) {
        /* A broken key file is the operator's to fix; attaching with {}
         * still works when the gateway's own auth covers the child. */
        profile_report_error(pi, NULL, pi->reason);
        token = NULL;
    }
    if (token) {
        size_t len = strlen(token) + sizeof("{\"authorization\":\"\"}");
        payload = malloc(len);
        if (payload)
            snprintf(payload, len, "{\"authorization\":\"%s\"}", token);
        explicit_bzero(token, strlen(token));
        free(token);
    } else {
        payload = strdup("{}");
    }
    if (!payload) {
        *reason = "out of memory";
        return -ENOMEM;
    }
    snprintf(topic, sizeof(topic), "/devices/%s/attach", child);
    rc = profile_msgs_add(out, topic, payload, strlen(payload), 1, false);
    free(payload);
    return rc;
}

static void gcp_registered_cb(struct profile_instance *pi, const char *id, int status)
{
    struct gcp_child *child = child_find(gcp_of(pi), id);
    char config[PROFILE_TOPIC_MAX], commands[PROFILE_TOPIC_MAX];

    if (status < 0 || !child || child->self || child->subscribed)
        return;
    /* After the attach: the bridge refuses subscriptions for devices that
     * are not attached. No narrower filter than commands/# is allowed. */
    child_filters(id, config, commands, sizeof(config));
    uplink_subscribe(pi->uplink, config, 1);
    uplink_subscribe(pi->uplink, commands, 1);
    child->subscribed = true;
}

/* Detach @child when it may still be attached, and forget it. */
static void child_detach(struct profile_instance *pi, struct gcp_child *child)
{
    char topic[PROFILE_TOPIC_MAX];

    if (registry_get(pi->registry, child->id) == REGISTRY_DONE &&
        uplink_get_state(pi->uplink) == UPLINK_ONLINE) {
        snprintf(topic, sizeof(topic), "/devices/%s/detach", child->id);
        if (uplink_publish_control(pi->uplink, topic, "{}", 2, 1, UPLINK_CONTROL_CONNECTION, NULL,
                                   NULL) == 0)
            log_child(LOG_INFO, pi->uc->name, child->id, "detaching: idle for %llu s",
                      (unsigned long long)(pi->uc->gcp.attach_idle_ms / 1000));
    }
    child_unsubscribe(pi, child);
    registry_set(pi->registry, child->id, REGISTRY_UNKNOWN, false);
    child_remove(pi, child);
}

static void sweep_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;
    struct gcp *gcp = gcp_of(pi);
    uint64_t now = uv_now(pi->loop);
    struct uplink_stats stats;
    struct gcp_child *child, *next;

    uplink_get_stats(pi->uplink, &stats);
    for (child = gcp->children; child; child = next) {
        next = child->next;
        if (child->self || child->state_payload ||
            now - child->used_ms < pi->uc->gcp.attach_idle_ms)
            continue;
        /* Data still queued may be the child's: it must not follow a detach. */
        if (stats.queued > 0 || registry_get(pi->registry, child->id) == REGISTRY_PENDING)
            continue;
        child_detach(pi, child);
    }
}

static void sweep_start(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    uint64_t every = pi->uc->gcp.attach_idle_ms / 2;

    if (!gcp->sweep_init)
        return;
    uv_timer_stop(&gcp->sweep);
    if (!pi->uc->gcp.gateway)
        return;
    if (every < GCP_SWEEP_MIN_MS)
        every = GCP_SWEEP_MIN_MS;
    if (every > GCP_SWEEP_MAX_MS)
        every = GCP_SWEEP_MAX_MS;
    uv_timer_start(&gcp->sweep, sweep_cb, every, every);
}

/* --- state coalescing ------------------------------------------------------------ */

static void state_send(struct profile_instance *pi, struct gcp_child *child)
{
    char topic[PROFILE_TOPIC_MAX];
    const char *reason = NULL;
    int rc;

    snprintf(topic, sizeof(topic), "/devices/%s/state", child->id);
    rc = profile_register_child(pi, child->id, &reason);
    if (rc < 0) {
        profile_report_error(pi, topic, reason ? reason : "cannot attach the device");
    } else {
        rc = uplink_publish(pi->uplink, topic, child->state_payload, child->state_len,
                            child->state_qos, false);
        if (rc < 0)
            log_child(LOG_WARNING, pi->uc->name, child->id,
                      "the coalesced state update could not be queued: %s", strerror(-rc));
    }
    child->state_sent = true;
    child->state_sent_ms = uv_now(pi->loop);
    free(child->state_payload);
    child->state_payload = NULL;
    child->state_len = 0;
}

static void state_timer_cb(uv_timer_t *timer)
{
    struct gcp_child *child = timer->data;

    if (child->state_payload && !child->pi->closing)
        state_send(child->pi, child);
}

/* GCP takes one state update per second and device; a faster one is kept
 * (replacing any older waiting one) and sent when the second is over.
 * Returns 1 when the state goes out now, 0 when it waits, -ENOMEM. */
static int state_coalesce(struct profile_instance *pi, struct gcp_child *child, const void *payload,
                          size_t len, int qos)
{
    uint64_t now = uv_now(pi->loop);
    void *copy;

    if (!child->state_payload &&
        (!child->state_sent || now - child->state_sent_ms >= GCP_STATE_PERIOD_MS)) {
        child->state_sent = true;
        child->state_sent_ms = now;
        return 1;
    }
    copy = malloc(len ? len : 1);
    if (!copy)
        return -ENOMEM;
    if (len)
        memcpy(copy, payload, len);
    if (child->state_payload)
        log_child(LOG_DEBUG, pi->uc->name, child->id,
                  "state update replaced by a newer one (GCP: 1 per second)");
    free(child->state_payload);
    child->state_payload = copy;
    child->state_len = len;
    child->state_qos = qos;
    if (!child->timer_init) {
        uv_timer_init(pi->loop, &child->state_timer);
        uv_unref((uv_handle_t *)&child->state_timer);
        child->state_timer.data = child;
        child->timer_init = true;
    }
    uint64_t due = child->state_sent_ms + GCP_STATE_PERIOD_MS;
    uv_timer_start(&child->state_timer, state_timer_cb, due > now ? due - now : 0, 0);
    return 0;
}

/* --- the table --------------------------------------------------------------------- */

static int gcp_new_cb(struct profile_instance *pi)
{
    struct gcp *gcp = calloc(1, sizeof(*gcp));

    if (!gcp)
        return -ENOMEM;
    pi->state = gcp;
    uv_timer_init(pi->loop, &gcp->sweep);
    uv_unref((uv_handle_t *)&gcp->sweep);
    gcp->sweep.data = pi;
    gcp->sweep_init = true;
    sweep_start(pi);
    if (pi->uc->gcp.gateway)
        log_uplink(LOG_INFO, pi->uc->name,
                   "GCP gateway %s: children are attached on their first message and detached "
                   "after %llu s idle",
                   pi->uc->gcp.device, (unsigned long long)(pi->uc->gcp.attach_idle_ms / 1000));
    return 0;
}

static void gcp_free_cb(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child *child, *next;

    if (!gcp)
        return;
    /* Only children without a live timer are left (close_cb closed the rest). */
    for (child = gcp->children; child; child = next) {
        next = child->next;
        child_free(child);
    }
    free(gcp);
    pi->state = NULL;
}

static void sweep_closed_cb(uv_handle_t *handle)
{
    struct profile_instance *pi = handle->data;

    if (--gcp_of(pi)->closing == 0)
        profile_instance_closed(pi);
}

static void gcp_close_cb(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child **link = &gcp->children;

    gcp->closing++;
    uv_close((uv_handle_t *)&gcp->sweep, sweep_closed_cb);
    while (*link) {
        struct gcp_child *child = *link;
        if (!child->timer_init) {
            link = &child->next;
            continue;
        }
        *link = child->next; /* freed by its close callback */
        gcp->closing++;
        uv_close((uv_handle_t *)&child->state_timer, child_timer_closed_cb);
    }
}

static void gcp_reconfigure_cb(struct profile_instance *pi)
{
    sweep_start(pi);
}

static const char *gcp_child_check_cb(const struct profile_instance *pi, const char *child)
{
    (void)pi;
    return gcp_id_check(child);
}

static void gcp_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    const struct conf_gcp *cg = &pi->uc->gcp;
    struct gcp *gcp = gcp_of(pi);

    snprintf(gcp->client_id, sizeof(gcp->client_id),
             "projects/%s/locations/%s/registries/%s/devices/%s", cg->project, cg->region,
             cg->registry, cg->device);
    session->client_id = gcp->client_id;
    /* A new connection attaches nobody yet: the children's filters must not
     * be re-sent ahead of their attach (gcp_registered_cb adds them back). */
    for (struct gcp_child *child = gcp->children; child; child = child->next)
        child_unsubscribe(pi, child);
}

static void gcp_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    struct gcp *gcp = gcp_of(pi);
    size_t count = 0;

    (void)first;
    if (!pi->uc->gcp.gateway)
        return;
    /* Attachments died with the last connection: attach again every child
     * used within attach_idle, before any of their spooled data. */
    for (struct gcp_child *child = gcp->children; child; child = child->next) {
        const char *reason = NULL;
        if (child->self)
            continue;
        registry_set(pi->registry, child->id, REGISTRY_UNKNOWN, false);
        if (profile_register_child(pi, child->id, &reason) < 0)
            log_child(LOG_WARNING, pi->uc->name, child->id, "cannot attach: %s",
                      reason ? reason : "out of memory");
        count++;
    }
    if (count)
        log_uplink(LOG_INFO, pi->uc->name, "attaching %zu children again on the new connection",
                   count);
}

static void gcp_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    const char *device = pi->uc->gcp.device;
    char filter[PROFILE_TOPIC_MAX];

    if (!device)
        return;
    snprintf(filter, sizeof(filter), "/devices/%s/config", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    snprintf(filter, sizeof(filter), "/devices/%s/commands/#", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    if (pi->uc->gcp.gateway) {
        snprintf(filter, sizeof(filter), "/devices/%s/errors", device);
        profile_msgs_add(filters, filter, NULL, 0, 0, false);
    }
}

static int gcp_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                     const void *payload, size_t len, int qos, bool retain,
                     struct profile_msgs *out, const char **reason)
{
    const struct conf_gcp *cg = &pi->uc->gcp;
    char topic[PROFILE_TOPIC_MAX];
    struct gcp_child *child;
    size_t max;
    int rc;

    (void)retain; /* the bridge keeps no retained messages */
    if (!cg->gateway && !is_self(pi, m->child)) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "this GCP uplink is the device %s alone (gcp.gateway is false): set gateway: "
                 "true to attach other children",
                 cg->device);
        *reason = pi->reason;
        return -EINVAL;
    }
    rc = gcp_up_topic(m, topic, sizeof(topic), reason);
    if (rc < 0)
        return -EINVAL;
    max = m->channel == MAPPING_STATE ? GCP_STATE_MAX : GCP_EVENT_MAX;
    if (len > max) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "the payload is %zu bytes; GCP takes at most %zu bytes for a %s", len, max,
                 m->channel == MAPPING_STATE ? "state update" : "telemetry event");
        *reason = pi->reason;
        return -EINVAL;
    }
    child = child_find(gcp_of(pi), m->child);
    if (!child && (rc = child_add(pi, m->child, &child, reason)) < 0)
        return rc;
    child->used_ms = uv_now(pi->loop);
    qos = qos > 1 ? 1 : qos; /* the bridge closes the connection on QoS 2 */
    if (m->channel == MAPPING_STATE) {
        rc = state_coalesce(pi, child, payload, len, qos);
        if (rc <= 0)
            return rc;
    }
    return profile_msgs_add(out, topic, payload, len, qos, false);
}

/* /devices/<gw>/errors: {"error_type": "...", "device_id": "...",
 * "description": "...", "message_id": ...} in words. */
static void explain_error(struct profile_instance *pi, const char *topic, const void *payload,
                          size_t len)
{
    json_error_t error;
    json_t *root = json_loadb(payload, len, 0, &error);
    const char *type = NULL, *device = NULL, *description = NULL;
    char text[1024];

    if (root && json_is_object(root)) {
        type = json_string_value(json_object_get(root, "error_type"));
        device = json_string_value(json_object_get(root, "device_id"));
        description = json_string_value(json_object_get(root, "description"));
    }
    if (type)
        snprintf(text, sizeof(text), "%s%s%s%s%s: %s", type, device ? " for device " : "",
                 device ? device : "", description ? ": " : "", description ? description : "",
                 gcp_error_explain(type));
    else
        snprintf(text, sizeof(text), "gateway error: %.*s", (int)(len > 512 ? 512 : len),
                 (const char *)payload);
    profile_report_error(pi, topic, text);
    json_decref(root);
}

static void gcp_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                        size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const char *prefix = pi->conf->local.topic_prefix;
    char id[MAPPING_CHILD_MAX + 1];
    char local_topic[PROFILE_TOPIC_MAX];
    const char *sub;
    int n;

    switch (gcp_down_parse(topic, id, &sub)) {
    case GCP_DOWN_CONFIG:
        /* Config is state: retained locally so an app that starts later
         * still gets the last one. */
        snprintf(local_topic, sizeof(local_topic), "%s/%s/config", prefix, id);
        profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, true);
        return;
    case GCP_DOWN_COMMANDS:
        n = sub ? snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/%s", prefix, id, sub)
                : snprintf(local_topic, sizeof(local_topic), "%s/%s/commands", prefix, id);
        if (n > 0 && (size_t)n < sizeof(local_topic))
            profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, retain);
        return;
    case GCP_DOWN_ERRORS:
        explain_error(pi, topic, payload, len);
        return;
    case GCP_DOWN_BAD_ID:
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
        return;
    case GCP_DOWN_OTHER:
        return;
    }
}

static const char *gcp_connack_text_cb(const struct profile_instance *pi, int rc)
{
    (void)pi;
    if (rc == 4 || rc == 5)
        return "the JWT was rejected: check alg against the registered key, aud = project id, "
               "exp <= 24 h, and the clock";
    return NULL;
}

const struct profile profile_gcp = {
    .name = "gcp",
    .new_cb = gcp_new_cb,
    .free_cb = gcp_free_cb,
    .close_cb = gcp_close_cb,
    .reconfigure_cb = gcp_reconfigure_cb,
    .child_check_cb = gcp_child_check_cb,
    .session_cb = gcp_session_cb,
    .online_cb = gcp_online_cb,
    .subscriptions_cb = gcp_subscriptions_cb,
    .up_cb = gcp_up_cb,
    .register_cb = gcp_register_cb,
    .registered_cb = gcp_registered_cb,
    .down_cb = gcp_down_cb,
    .connack_text_cb = gcp_connack_text_cb,
    .limits = {.max_payload = GCP_EVENT_MAX},
};
