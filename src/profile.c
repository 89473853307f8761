/* profile.c - what every profile shares (see profile.h): instances, child
 * registration, on-connect messages, subscriptions. It reaches the uplink
 * only through the instance's port (pi->port); the list of profiles is
 * profile_table.c. */
#include "profile.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "conf.h"
#include "json.h"
#include "log.h"
#include "registry.h"

/* --- message lists ---------------------------------------------------------- */

void profile_msgs_init(struct profile_msgs *msgs)
{
    memset(msgs, 0, sizeof(*msgs));
}

void profile_msgs_deinit(struct profile_msgs *msgs)
{
    for (size_t i = 0; i < msgs->count; i++) {
        free(msgs->msg[i].topic);
        free(msgs->msg[i].payload);
    }
    free(msgs->msg);
    profile_msgs_init(msgs);
}

int profile_topic_result(int n, size_t cap, const char **reason)
{
    if (n < 0 || (size_t)n >= cap) {
        *reason = "the cloud topic would be longer than 1024 bytes";
        return -ENAMETOOLONG;
    }
    return n;
}

int profile_msgs_add(struct profile_msgs *msgs, const char *topic, const void *payload, size_t len,
                     int qos, bool retain)
{
    struct profile_msg *msg;

    if (msgs->failed)
        return -ENOMEM;
    if (msgs->count == msgs->cap) {
        size_t cap = msgs->cap ? msgs->cap * 2 : 4;
        struct profile_msg *grown = realloc(msgs->msg, cap * sizeof(*grown));
        if (!grown)
            goto err;
        msgs->msg = grown;
        msgs->cap = cap;
    }
    msg = &msgs->msg[msgs->count];
    memset(msg, 0, sizeof(*msg));
    msg->topic = strdup(topic);
    /* One spare byte so a payload can be used as a C string. */
    msg->payload = malloc(len + 1);
    if (!msg->topic || !msg->payload) {
        free(msg->topic);
        free(msg->payload);
        goto err;
    }
    if (len)
        memcpy(msg->payload, payload, len);
    ((char *)msg->payload)[len] = '\0';
    msg->len = len;
    msg->qos = qos;
    msg->retain = retain;
    msgs->count++;
    return 0;

err:
    msgs->failed = true;
    return -ENOMEM;
}

/* --- registrations in flight ---------------------------------------------- */

/* One child's registration messages waiting for their acknowledgements. */
struct profile_pending {
    struct profile_pending *next;
    struct profile_instance *pi;
    unsigned outstanding;
    int status; /* the first failure */
    bool persist;
    char child[];
};

struct profile_shared {
    struct profile_pending *pending;
    struct profile_msgs subscribed; /* filters this instance subscribed to */
};

/* Where the instance keeps what profile.c needs: ahead of the profile's own
 * state, in one allocation. */
struct profile_instance_full {
    struct profile_instance pi;
    struct profile_shared shared;
};

static struct profile_shared *shared_of(struct profile_instance *pi)
{
    return &((struct profile_instance_full *)pi)->shared;
}

static void pending_unlink(struct profile_pending *pending)
{
    struct profile_pending **link = &shared_of(pending->pi)->pending;

    for (; *link; link = &(*link)->next) {
        if (*link == pending) {
            *link = pending->next;
            return;
        }
    }
}

static void registration_done_cb(void *arg, int status)
{
    struct profile_pending *pending = arg;
    struct profile_instance *pi = pending->pi;

    if (status < 0 && pending->status == 0)
        pending->status = status;
    if (--pending->outstanding > 0)
        return;
    pending_unlink(pending);
    if (!pi->closing) {
        if (pending->status == 0) {
            log_child(LOG_INFO, pi->uc->name, pending->child,
                      "registration acknowledged by the cloud");
            registry_set(pi->registry, pending->child, REGISTRY_DONE, pending->persist);
        } else if (pending->status != -ECANCELED) {
            /* Per-connection registration lost with its connection, or a
             * message libmosquitto refused: register again next time. */
            registry_set(pi->registry, pending->child, REGISTRY_UNKNOWN, pending->persist);
        }
        if (pi->profile->registered_cb)
            pi->profile->registered_cb(pi, pending->child, pending->status);
    }
    free(pending);
}

/* Queue register_cb's messages for @child. @requeue: a persisted pending
 * registration from before a restart. */
static int register_queue(struct profile_instance *pi, const char *child, const char **reason)
{
    struct profile_registration how = {0};
    struct profile_msgs msgs;
    struct profile_pending *pending;
    int rc;

    profile_msgs_init(&msgs);
    rc = pi->profile->register_cb(pi, child, &msgs, &how, reason);
    if (rc == 0 && msgs.failed)
        rc = -ENOMEM;
    if (rc < 0)
        goto out;
    if (msgs.count == 0) {
        /* Nothing to send (e.g. the gateway itself): remember that in
         * memory only, so the question is not asked for every message. */
        registry_set(pi->registry, child, REGISTRY_DONE, false);
        goto out;
    }
    pending = calloc(1, sizeof(*pending) + strlen(child) + 1);
    if (!pending) {
        rc = -ENOMEM;
        goto out;
    }
    strcpy(pending->child, child);
    pending->pi = pi;
    pending->persist = !how.per_connection;
    pending->outstanding = 1; /* ours while queueing */
    pending->next = shared_of(pi)->pending;
    shared_of(pi)->pending = pending;
    registry_set(pi->registry, child, REGISTRY_PENDING, pending->persist);
    for (size_t i = 0; i < msgs.count; i++) {
        const struct profile_msg *msg = &msgs.msg[i];
        unsigned flags = (how.wait_ack ? UPLINK_CONTROL_GATE : 0) |
                         (how.per_connection ? UPLINK_CONTROL_CONNECTION : 0);
        int qrc = pi->port->send_first(pi->uplink, msg->topic, msg->payload, msg->len,
                                       msg->qos ? 1 : 0, flags, registration_done_cb, pending);
        if (qrc < 0) {
            log_child(LOG_WARNING, pi->uc->name, child,
                      "cannot queue the registration on \"%s\": %s", msg->topic, strerror(-qrc));
            if (pending->status == 0)
                pending->status = qrc;
            continue;
        }
        pending->outstanding++;
        log_child(LOG_INFO, pi->uc->name, child, "registering: \"%s\" on %s",
                  (const char *)msg->payload, msg->topic);
    }
    registration_done_cb(pending, 0); /* drop ours */
out:
    profile_msgs_deinit(&msgs);
    return rc;
}

int profile_register_child(struct profile_instance *pi, const char *child, const char **reason)
{
    if (!pi->profile->register_cb || registry_get(pi->registry, child) != REGISTRY_UNKNOWN)
        return 0;
    return register_queue(pi, child, reason);
}

/* --- instances --------------------------------------------------------------- */

/* <state_dir>/registry/<uplink>, the directory made with mode 0700. */
static int registry_path(const struct conf *conf, const struct conf_uplink *uc, char *buf,
                         size_t cap)
{
    if (snprintf(buf, cap, "%s/registry", conf->state_dir) >= (int)cap)
        return -ENAMETOOLONG;
    if (mkdir(conf->state_dir, 0700) < 0 && errno != EEXIST)
        return -errno;
    if (mkdir(buf, 0700) < 0 && errno != EEXIST)
        return -errno;
    if (snprintf(buf, cap, "%s/registry/%s", conf->state_dir, uc->name) >= (int)cap)
        return -ENAMETOOLONG;
    return 0;
}

int profile_instance_new(uv_loop_t *loop, const struct conf *conf, const struct conf_uplink *uc,
                         const struct profile *profile, struct uplink *uplink,
                         const struct profile_port *port, struct profile_instance **out)
{
    struct profile_instance_full *full;
    struct profile_instance *pi;
    const struct profile_spec *spec = profile ? profile_spec_find(profile->name) : NULL;
    char path[4096];
    int rc;

    if (!profile || !spec)
        return -ENOENT;
    full = calloc(1, sizeof(*full));
    if (!full)
        return -ENOMEM;
    pi = &full->pi;
    pi->profile = profile;
    pi->spec = spec;
    pi->loop = loop;
    pi->uplink = uplink;
    pi->port = port;
    pi->conf = conf;
    pi->uc = uc;
    profile_msgs_init(&full->shared.subscribed);

    const char *registry_file = NULL;
    if (profile->register_cb && conf->state_dir) {
        rc = registry_path(conf, uc, path, sizeof(path));
        if (rc < 0) {
            log_uplink(LOG_WARNING, uc->name,
                       "cannot create %s/registry: %s; the child registry is kept in memory "
                       "(children are registered again after a restart)",
                       conf->state_dir, strerror(-rc));
        } else {
            registry_file = path;
        }
    }
    rc = registry_open(registry_file, uc->name, &pi->registry);
    if (rc < 0)
        goto err;
    if (profile->new_cb) {
        rc = profile->new_cb(pi);
        if (rc < 0)
            goto err;
    }
    /* Registrations queued but not acknowledged before a restart: their
     * data may wait in a durable spool, so they go first again. */
    for (size_t i = 0; i < registry_count(pi->registry); i++) {
        enum registry_state state;
        const char *child = registry_entry(pi->registry, i, &state);
        const char *reason = NULL;
        if (state != REGISTRY_PENDING)
            continue;
        char copy[MAPPING_CHILD_MAX + 1];
        snprintf(copy, sizeof(copy), "%s", child);
        log_child(LOG_INFO, uc->name, copy,
                  "registration was not acknowledged before the "
                  "restart; sending it again");
        /* Forget it first so register_queue() records it afresh. */
        registry_set(pi->registry, copy, REGISTRY_UNKNOWN, false);
        if (register_queue(pi, copy, &reason) < 0)
            log_child(LOG_WARNING, uc->name, copy, "cannot register again: %s",
                      reason ? reason : "out of memory");
    }
    *out = pi;
    return 0;

err:
    registry_free(pi->registry);
    free(full);
    return rc;
}

void profile_instance_reconfigure(struct profile_instance *pi, const struct conf *conf,
                                  const struct conf_uplink *uc)
{
    pi->conf = conf;
    pi->uc = uc;
    if (pi->profile->reconfigure_cb)
        pi->profile->reconfigure_cb(pi);
}

void profile_instance_closed(struct profile_instance *pi)
{
    pi->closed = true;
    if (pi->closed_cb)
        pi->closed_cb(pi);
}

void profile_instance_close(struct profile_instance *pi,
                            void (*closed_cb)(struct profile_instance *pi))
{
    if (pi->closing)
        return;
    pi->closing = true;
    pi->closed_cb = closed_cb;
    if (pi->profile->close_cb)
        pi->profile->close_cb(pi);
    else
        profile_instance_closed(pi);
}

void profile_instance_free(struct profile_instance *pi)
{
    struct profile_pending *pending, *next;

    if (!pi)
        return;
    if (pi->profile->free_cb)
        pi->profile->free_cb(pi);
    for (pending = shared_of(pi)->pending; pending; pending = next) {
        next = pending->next;
        free(pending);
    }
    profile_msgs_deinit(&shared_of(pi)->subscribed);
    registry_free(pi->registry);
    free((struct profile_instance_full *)pi);
}

void profile_instance_online(struct profile_instance *pi)
{
    struct profile_msgs first;

    if (!pi->profile->online_cb || pi->closing)
        return;
    profile_msgs_init(&first);
    pi->profile->online_cb(pi, &first);
    for (size_t i = 0; i < first.count; i++) {
        const struct profile_msg *msg = &first.msg[i];
        int rc = pi->port->send_first(
            pi->uplink, msg->topic, msg->payload, msg->len, msg->qos ? 1 : 0,
            UPLINK_CONTROL_CONNECTION | UPLINK_CONTROL_GATE | UPLINK_CONTROL_FRONT, NULL, NULL);
        if (rc < 0)
            log_uplink(LOG_WARNING, pi->uc->name, "cannot queue the start-up message on \"%s\": %s",
                       msg->topic, strerror(-rc));
    }
    if (first.failed)
        log_uplink(LOG_ERR, pi->uc->name, "out of memory building start-up messages");
    profile_msgs_deinit(&first);
}

void profile_instance_offline(struct profile_instance *pi)
{
    registry_forget_volatile(pi->registry);
}

void profile_instance_session(struct profile_instance *pi, struct uplink_session *session)
{
    if (!pi->closing && pi->profile->session_cb)
        pi->profile->session_cb(pi, session);
}

const char *profile_instance_connack_text(const struct profile_instance *pi, int rc)
{
    return pi->spec->connack_text ? pi->spec->connack_text(pi->uc, rc) : NULL;
}

const char *profile_instance_batch(const struct profile_instance *pi, const char *topic,
                                   size_t *max_packet)
{
    const char *separator;

    if (!pi->profile->batch_separator_cb)
        return NULL;
    separator = pi->profile->batch_separator_cb(pi, topic);
    if (separator)
        *max_packet = pi->profile->limits.max_packet;
    return separator;
}

static bool msgs_has_topic(const struct profile_msgs *msgs, const char *topic, int qos)
{
    for (size_t i = 0; i < msgs->count; i++) {
        if (strcmp(msgs->msg[i].topic, topic) == 0 && (qos < 0 || msgs->msg[i].qos == qos))
            return true;
    }
    return false;
}

void profile_instance_subscribe(struct profile_instance *pi)
{
    struct profile_shared *shared = shared_of(pi);
    struct profile_msgs wanted;

    profile_msgs_init(&wanted);
    /* A closing instance wants nothing: its filters are dropped. */
    if (pi->profile->subscriptions_cb && !pi->closing)
        pi->profile->subscriptions_cb(pi, &wanted);
    if (wanted.failed) {
        log_uplink(LOG_ERR, pi->uc->name, "out of memory listing subscriptions");
        profile_msgs_deinit(&wanted);
        return;
    }
    for (size_t i = 0; i < shared->subscribed.count; i++) {
        const char *filter = shared->subscribed.msg[i].topic;
        if (!msgs_has_topic(&wanted, filter, -1))
            pi->port->unsubscribe(pi->uplink, filter);
    }
    for (size_t i = 0; i < wanted.count; i++) {
        const struct profile_msg *msg = &wanted.msg[i];
        if (msgs_has_topic(&shared->subscribed, msg->topic, msg->qos))
            continue;
        int rc = pi->port->subscribe(pi->uplink, msg->topic, msg->qos);
        if (rc < 0)
            log_uplink(LOG_ERR, pi->uc->name, "cannot subscribe to \"%s\": %s", msg->topic,
                       strerror(-rc));
    }
    profile_msgs_deinit(&shared->subscribed);
    shared->subscribed = wanted;
}

void profile_deliver(struct profile_instance *pi, const char *topic, const void *payload,
                     size_t len, int qos, bool retain)
{
    if (pi->deliver)
        pi->deliver(pi->deliver_arg, topic, payload, len, qos, retain);
}

void profile_report_error(struct profile_instance *pi, const char *topic, const char *text)
{
    struct json_buf json;
    char errors_topic[128];
    const char *name = pi->uc->name;

    log_uplink(LOG_WARNING, name, "%s%s%s", topic ? topic : "", topic ? ": " : "", text);
    json_buf_init(&json);
    json_append_raw(&json, "{\"uplink\":");
    json_append_string(&json, name);
    if (topic) {
        json_append_raw(&json, ",\"topic\":");
        json_append_string(&json, topic);
    }
    json_append_raw(&json, ",\"error\":");
    json_append_string(&json, text);
    json_append_raw(&json, "}");
    snprintf(errors_topic, sizeof(errors_topic), "uplinkd/%s/errors", name);
    if (!json.failed)
        profile_deliver(pi, errors_topic, json.data, json.len, 0, false);
    json_buf_deinit(&json);
}
