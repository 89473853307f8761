/* router.c - local <-> uplink message routing (see router.h). */
#include "router.h"

#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conf.h"
#include "json.h"
#include "local.h"
#include "log.h"
#include "mapping.h"
#include "profile.h"
#include "registry.h"
#include "topic.h"

/* Longest topic we build; MQTT allows 65535 but clouds cap far lower. */
#define ROUTER_TOPIC_MAX 1024

void router_init(struct router *router, const struct conf *conf, struct local *local)
{
    memset(router, 0, sizeof(*router));
    router->conf = conf;
    router->local = local;
}

void router_deinit(struct router *router)
{
    for (size_t i = 0; i < router->raw_sub_count; i++) {
        free(router->raw_subs[i].uplink);
        free(router->raw_subs[i].cloud_filter);
    }
    free(router->raw_subs);
    router->raw_subs = NULL;
    router->raw_sub_count = 0;
    for (size_t i = 0; i < router->child_count; i++)
        free(router->children[i].id);
    free(router->children);
    router->children = NULL;
    router->child_count = router->child_cap = 0;
}

static void profile_deliver_cb(void *arg, const char *topic, const void *payload, size_t len,
                               int qos, bool retain)
{
    struct router *router = arg;

    local_deliver(router->local, topic, payload, len, qos, retain);
}

int router_attach_uplink(struct router *router, const struct conf *conf, struct uplink *uplink)
{
    const struct conf_uplink *uc = uplink_get_conf(uplink);

    return uplink_set_profile(uplink, profile_find(uc->profile), conf, profile_deliver_cb, router);
}

static struct uplink *find_uplink(const struct router *router, const char *name)
{
    for (size_t i = 0; i < router->uplink_count; i++) {
        if (router->uplinks[i] != NULL && strcmp(uplink_name(router->uplinks[i]), name) == 0)
            return router->uplinks[i];
    }
    return NULL;
}

void router_set_uplinks(struct router *router, const struct conf *conf, struct uplink **uplinks,
                        size_t count, struct uplink **new_uplinks, size_t new_count)
{
    router->conf = conf;
    router->uplinks = uplinks;
    router->uplink_count = count;
    /* Every uplink: its profile instance adopts the conf (or is replaced,
     * when a reload changed the profile) and subscribes what it wants now.
     * An uplink a reload removed closes its instance as it stops. */
    for (size_t i = 0; i < count; i++) {
        if (uplinks[i] != NULL)
            router_attach_uplink(router, conf, uplinks[i]);
    }
    for (size_t i = 0; i < new_count; i++) {
        struct uplink *uplink = new_uplinks[i];
        for (size_t j = 0; j < router->raw_sub_count; j++) {
            if (strcmp(router->raw_subs[j].uplink, uplink_name(uplink)) == 0)
                uplink_subscribe(uplink, router->raw_subs[j].cloud_filter, router->raw_subs[j].qos);
        }
    }
}

/* Tell local apps (and the log) why their message was not forwarded. */
static void report_rejected(struct router *router, const char *client_id, const char *topic,
                            const char *reason)
{
    struct json_buf json;
    char errors_topic[128];

    router->rejected++;
    log_warn("local client %s: message on \"%s\" not forwarded: %s", client_id, topic, reason);
    json_buf_init(&json);
    json_append_raw(&json, "{\"client\":");
    json_append_string(&json, client_id);
    json_append_raw(&json, ",\"topic\":");
    json_append_string(&json, topic);
    json_append_raw(&json, ",\"error\":");
    json_append_string(&json, reason);
    json_append_raw(&json, "}");
    for (size_t i = 0; i < router->uplink_count && !json.failed; i++) {
        if (router->uplinks[i] == NULL)
            continue;
        snprintf(errors_topic, sizeof(errors_topic), "uplinkd/%s/errors",
                 uplink_name(router->uplinks[i]));
        local_deliver(router->local, errors_topic, json.data, json.len, 0, false);
    }
    json_buf_deinit(&json);
}

/* Which uplinks carry @child: the first route whose glob matches, or every
 * uplink when no routes are configured. Returns how many were written. */
static size_t select_uplinks(const struct router *router, const char *child, struct uplink **out,
                             size_t cap)
{
    const struct conf *conf = router->conf;
    size_t n = 0;

    if (conf->route_count == 0) {
        for (size_t i = 0; i < router->uplink_count && n < cap; i++) {
            if (router->uplinks[i] != NULL)
                out[n++] = router->uplinks[i];
        }
        return n;
    }
    for (size_t r = 0; r < conf->route_count; r++) {
        if (fnmatch(conf->routes[r].children, child, 0) != 0)
            continue;
        for (size_t i = 0; i < conf->routes[r].uplink_count && n < cap; i++) {
            size_t index = conf->routes[r].uplinks[i];
            if (index < router->uplink_count && router->uplinks[index] != NULL)
                out[n++] = router->uplinks[index];
        }
        break;
    }
    return n;
}

/* One local publish waiting for its uplinks' spools (durable-before-ack):
 * the local acknowledgement goes out when the last of them is done. */
struct router_pending {
    struct local *local;
    struct local_ack *ack;
    unsigned outstanding; /* uplink completions still to come, +1 while forwarding */
    int status;           /* the first failure */
};

static void pending_release(struct router_pending *pending)
{
    if (--pending->outstanding > 0)
        return;
    local_publish_done(pending->local, pending->ack, pending->status);
    free(pending);
}

static void pending_done_cb(void *arg, int status)
{
    struct router_pending *pending = arg;

    if (status < 0 && pending->status == 0)
        pending->status = status;
    pending_release(pending);
}

static int forward(struct router *router, struct uplink *uplink, const char *cloud_topic,
                   const void *payload, size_t len, int qos, bool retain,
                   struct router_pending *pending)
{
    int rc = pending ? uplink_publish_async(uplink, cloud_topic, payload, len, qos, retain,
                                            pending_done_cb, pending)
                     : uplink_publish(uplink, cloud_topic, payload, len, qos, retain);
    if (rc == UPLINK_PUBLISH_PENDING) {
        pending->outstanding++;
        return 0;
    }
    if (rc == -ENOBUFS)
        log_uplink(LOG_WARNING, uplink_name(uplink),
                   "spool full: message for \"%s\" refused; the local client is asked to re-send "
                   "(raise spool.max_bytes or check why the cloud is unreachable)",
                   cloud_topic);
    else if (rc < 0)
        log_uplink(LOG_ERR, uplink_name(uplink), "cannot queue message for \"%s\": %s", cloud_topic,
                   strerror(-rc));
    return rc;
}

/* One device message for one uplink, through its profile: the cloud's child
 * id rules, the mapping (maybe several publishes), and the child's
 * registration before its first data. A refusal is reported and is not an
 * error for the local client (a re-send would be refused again). */
static int route_to_profile(struct router *router, struct uplink *uplink, const char *client_id,
                            const char *topic, const struct mapping_local *m, const void *payload,
                            size_t len, int qos, bool retain, struct router_pending *pending)
{
    struct profile_instance *pi = uplink_profile(uplink);
    struct profile_msgs out;
    const char *reason = NULL;
    int rc, result = 0;

    if (pi == NULL)
        return -ENOMEM;
    if (pi->spec->child_check && (reason = pi->spec->child_check(m->child))) {
        report_rejected(router, client_id, topic, reason);
        return 0;
    }
    profile_msgs_init(&out);
    pi->reason[0] = '\0';
    rc = pi->profile->up_cb(pi, m, payload, len, qos, retain, &out, &reason);
    if (rc == 0 && out.failed)
        rc = -ENOMEM;
    if (rc == -EINVAL) {
        report_rejected(router, client_id, topic,
                        reason          ? reason
                        : pi->reason[0] ? pi->reason
                                        : "refused by the profile");
        goto out;
    }
    if (rc < 0) {
        result = rc;
        goto out;
    }
    if (out.count > 0) {
        rc = profile_register_child(pi, m->child, &reason);
        if (rc == -EINVAL) {
            report_rejected(router, client_id, topic, reason ? reason : "registration refused");
            goto out;
        }
        if (rc < 0) {
            result = rc;
            goto out;
        }
    }
    for (size_t i = 0; i < out.count; i++) {
        const struct profile_msg *msg = &out.msg[i];
        rc = forward(router, msg->uplink ? msg->uplink : uplink, msg->topic, msg->payload, msg->len,
                     msg->qos, msg->retain, pending);
        if (rc < 0) {
            result = rc;
            break;
        }
    }
out:
    profile_msgs_deinit(&out);
    return result;
}

static int child_compare(const void *key, const void *element)
{
    return strcmp(key, ((const struct router_child *)element)->id);
}

/* Count a device message from @child, adding it to the sorted table. */
static void router_child_seen(struct router *router, const char *child)
{
    /* C11 7.22.5: bsearch() wants a valid base even for 0 elements (UBSan). */
    struct router_child *found = router->child_count
                                     ? bsearch(child, router->children, router->child_count,
                                               sizeof(*router->children), child_compare)
                                     : NULL;
    if (found == NULL) {
        if (router->child_count >= ROUTER_CHILDREN_MAX) {
            if (!router->children_full_logged)
                log_warn("more than %d children seen; uplinkctl children lists only the first "
                         "ones (their messages are still forwarded)",
                         ROUTER_CHILDREN_MAX);
            router->children_full_logged = true;
            return;
        }
        if (router->child_count == router->child_cap) {
            size_t cap = router->child_cap ? router->child_cap * 2 : 64;
            struct router_child *grown = realloc(router->children, cap * sizeof(*grown));
            if (grown == NULL)
                return; /* listing only: forwarding does not depend on it */
            router->children = grown;
            router->child_cap = cap;
        }
        char *id = strdup(child);
        if (id == NULL)
            return;
        size_t at = 0;
        while (at < router->child_count && strcmp(router->children[at].id, child) < 0)
            at++;
        memmove(&router->children[at + 1], &router->children[at],
                (router->child_count - at) * sizeof(*router->children));
        router->children[at] = (struct router_child){.id = id};
        router->child_count++;
        found = &router->children[at];
    }
    found->messages++;
    found->last_seen = (int64_t)time(NULL);
}

void router_children_json(const struct router *router, struct json_buf *out)
{
    static const char *const state_names[] = {
        [REGISTRY_UNKNOWN] = "none", [REGISTRY_PENDING] = "pending", [REGISTRY_DONE] = "done"};
    struct uplink *targets[32];

    json_append_raw(out, "[");
    for (size_t i = 0; i < router->child_count; i++) {
        const struct router_child *child = &router->children[i];
        json_append_raw(out, i ? ",{\"id\":" : "{\"id\":");
        json_append_string(out, child->id);
        json_append_fmt(out, ",\"messages\":%llu,\"last_seen\":%lld,\"uplinks\":[",
                        (unsigned long long)child->messages, (long long)child->last_seen);
        size_t count = select_uplinks(router, child->id, targets, 32);
        for (size_t t = 0; t < count; t++) {
            enum registry_state state = REGISTRY_UNKNOWN;
            const struct profile_instance *pi = uplink_profile(targets[t]);
            if (pi && pi->closing)
                pi = NULL;
            if (pi && pi->registry)
                state = registry_get(pi->registry, child->id);
            json_append_raw(out, t ? ",{\"name\":" : "{\"name\":");
            json_append_string(out, uplink_name(targets[t]));
            json_append_raw(out, ",\"registration\":");
            json_append_string(out, state_names[state]);
            if (pi && pi->profile->child_json_cb)
                pi->profile->child_json_cb(pi, child->id, out);
            json_append_raw(out, "}");
        }
        json_append_raw(out, "]}");
    }
    json_append_raw(out, "]");
}

void router_uplink_status_json(const struct router *router, const struct uplink *uplink,
                               struct json_buf *out)
{
    const struct profile_instance *pi = uplink_profile(uplink);

    (void)router;
    if (pi && !pi->closing && pi->profile->status_json_cb)
        pi->profile->status_json_cb(pi, out);
}

/* Both hooks: @pending NULL for the synchronous one. */
static int route_publish(struct router *router, const char *client_id, const char *topic,
                         const void *payload, size_t len, int qos, bool retain,
                         struct router_pending *pending)
{
    struct mapping_local m;
    const char *reason = NULL;
    int result = 0;

    if (mapping_parse_local(router->conf->local.topic_prefix, topic, &m, &reason) < 0) {
        report_rejected(router, client_id, topic, reason);
        return 0; /* permanent: a re-send would be refused again */
    }
    if (m.kind == MAPPING_LOCAL_ONLY)
        return 0;
    if (m.kind == MAPPING_RAW) {
        struct uplink *uplink = find_uplink(router, m.uplink);
        if (uplink == NULL) {
            report_rejected(router, client_id, topic, "no uplink with that name is configured");
            return 0;
        }
        const struct profile_instance *pi = uplink_profile(uplink);
        const char *why =
            pi && pi->spec->cloud_topic_check ? pi->spec->cloud_topic_check(m.cloud_topic) : NULL;
        if (why == NULL && pi && pi->profile->limits.max_payload &&
            len > pi->profile->limits.max_payload)
            why = "the payload is larger than this cloud takes (the profile's message size "
                  "limit, docs/profiles.md)";
        if (why) {
            report_rejected(router, client_id, topic, why);
            return 0; /* permanent, as a refused mapping */
        }
        result = forward(router, uplink, m.cloud_topic, payload, len, qos, retain, pending);
        if (result == 0)
            router->forwarded++;
        return result;
    }
    if (!mapping_channel_is_upstream(m.channel))
        return 0; /* dev/<child>/commands etc. published locally stay local */
    router_child_seen(router, m.child);

    struct uplink *targets[32];
    size_t count = select_uplinks(router, m.child, targets, 32);
    if (count == 0) {
        router->unrouted++;
        log_child(LOG_WARNING, NULL, m.child,
                  "no route selects this child; message on \"%s\" stays local (check routes:)",
                  topic);
        return 0;
    }
    for (size_t i = 0; i < count; i++) {
        int rc = route_to_profile(router, targets[i], client_id, topic, &m, payload, len, qos,
                                  retain, pending);
        if (rc < 0)
            result = rc;
    }
    if (result == 0)
        router->forwarded++;
    return result;
}

int router_local_publish_cb(void *arg, const char *client_id, const char *topic,
                            const void *payload, size_t len, int qos, bool retain)
{
    return route_publish(arg, client_id, topic, payload, len, qos, retain, NULL);
}

int router_local_publish_async_cb(void *arg, const char *client_id, const char *topic,
                                  const void *payload, size_t len, int qos, bool retain,
                                  struct local_ack *ack)
{
    struct router *router = arg;
    struct router_pending *pending;
    int rc;

    if (!ack)
        return route_publish(router, client_id, topic, payload, len, qos, retain, NULL);
    pending = calloc(1, sizeof(*pending));
    if (!pending)
        return -ENOMEM;
    pending->local = router->local;
    pending->ack = ack;
    pending->outstanding = 1; /* ours, until every uplink has been asked */
    rc = route_publish(router, client_id, topic, payload, len, qos, retain, pending);
    if (pending->outstanding == 1) {
        free(pending); /* nothing to wait for */
        return rc;
    }
    if (rc < 0 && pending->status == 0)
        pending->status = rc;
    /* The spool callbacks come later (from the loop), never from inside
     * this call, so dropping our reference cannot finish it now. */
    pending->outstanding--;
    return LOCAL_PUBLISH_PENDING;
}

static ssize_t raw_sub_find(const struct router *router, const char *uplink, const char *filter)
{
    for (size_t i = 0; i < router->raw_sub_count; i++) {
        if (strcmp(router->raw_subs[i].uplink, uplink) == 0 &&
            strcmp(router->raw_subs[i].cloud_filter, filter) == 0)
            return (ssize_t)i;
    }
    return -1;
}

void router_local_subscribe_cb(void *arg, const char *filter, int qos)
{
    struct router *router = arg;
    char name[65];
    const char *cloud_filter;

    if (mapping_raw_filter(filter, name, &cloud_filter) < 0)
        return;
    if (raw_sub_find(router, name, cloud_filter) >= 0)
        return;
    struct router_raw_sub *grown =
        realloc(router->raw_subs, (router->raw_sub_count + 1) * sizeof(*grown));
    if (grown == NULL) {
        log_err("out of memory recording the subscription %s", filter);
        return;
    }
    router->raw_subs = grown;
    struct router_raw_sub *sub = &router->raw_subs[router->raw_sub_count];
    sub->uplink = strdup(name);
    sub->cloud_filter = strdup(cloud_filter);
    sub->qos = qos;
    if (sub->uplink == NULL || sub->cloud_filter == NULL) {
        free(sub->uplink);
        free(sub->cloud_filter);
        log_err("out of memory recording the subscription %s", filter);
        return;
    }
    router->raw_sub_count++;
    struct uplink *uplink = find_uplink(router, name);
    if (uplink == NULL) {
        log_warn("local subscription %s names no configured uplink \"%s\"; it is kept and used "
                 "if that uplink is added by a reload",
                 filter, name);
        return;
    }
    uplink_subscribe(uplink, cloud_filter, qos);
}

void router_local_unsubscribe_cb(void *arg, const char *filter)
{
    struct router *router = arg;
    char name[65];
    const char *cloud_filter;

    if (mapping_raw_filter(filter, name, &cloud_filter) < 0)
        return;
    ssize_t i = raw_sub_find(router, name, cloud_filter);
    if (i < 0)
        return;
    struct uplink *uplink = find_uplink(router, name);
    if (uplink != NULL)
        uplink_unsubscribe(uplink, cloud_filter);
    free(router->raw_subs[i].uplink);
    free(router->raw_subs[i].cloud_filter);
    router->raw_subs[i] = router->raw_subs[--router->raw_sub_count];
}

void router_uplink_message_cb(void *arg, struct uplink *uplink, const char *topic,
                              const void *payload, size_t len, int qos, bool retain)
{
    struct router *router = arg;
    struct profile_instance *pi = uplink_profile(uplink);
    const char *name = uplink_name(uplink);
    char local_topic[ROUTER_TOPIC_MAX];

    if (pi != NULL) {
        struct profile_msgs local;
        profile_msgs_init(&local);
        pi->profile->down_cb(pi, topic, payload, len, qos, retain, &local);
        if (local.failed)
            log_uplink(LOG_ERR, name, "out of memory mapping the cloud message on \"%s\"", topic);
        for (size_t i = 0; i < local.count; i++)
            local_deliver(router->local, local.msg[i].topic, local.msg[i].payload, local.msg[i].len,
                          local.msg[i].qos, local.msg[i].retain);
        profile_msgs_deinit(&local);
    }
    for (size_t i = 0; i < router->raw_sub_count; i++) {
        const struct router_raw_sub *sub = &router->raw_subs[i];
        if (strcmp(sub->uplink, name) != 0 ||
            !topic_match(sub->cloud_filter, strlen(sub->cloud_filter), topic, strlen(topic)))
            continue;
        if (mapping_raw_local(name, topic, local_topic, sizeof(local_topic)) > 0)
            local_deliver(router->local, local_topic, payload, len, qos, retain);
        break; /* one copy: local_deliver matches every local subscriber itself */
    }
}

void router_uplink_state_cb(void *arg, struct uplink *uplink, enum uplink_state state)
{
    struct router *router = arg;
    char topic[128];
    struct json_buf json;

    json_buf_init(&json);
    json_append_raw(&json, "{\"state\":");
    json_append_string(&json, uplink_state_name(state));
    json_append_raw(&json, ",\"last_error\":");
    json_append_string(&json, uplink_last_error(uplink));
    json_append_raw(&json, "}");
    snprintf(topic, sizeof(topic), "uplinkd/%s/status", uplink_name(uplink));
    if (!json.failed)
        local_deliver(router->local, topic, json.data, json.len, 0, true);
    json_buf_deinit(&json);
}
