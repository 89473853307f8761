/* router.c - local <-> uplink message routing (see router.h). */
#include "router.h"

#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "json.h"
#include "local.h"
#include "log.h"
#include "mapping.h"
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
}

static struct uplink *find_uplink(const struct router *router, const char *name)
{
    for (size_t i = 0; i < router->uplink_count; i++) {
        if (router->uplinks[i] != NULL && strcmp(uplink_name(router->uplinks[i]), name) == 0)
            return router->uplinks[i];
    }
    return NULL;
}

static const struct conf_uplink *uplink_conf(const struct router *router,
                                             const struct uplink *uplink)
{
    return conf_uplink_find(router->conf, uplink_name(uplink));
}

/* The device command filters of the generic profile for @prefix. */
static void device_filters(const char *prefix, char commands[ROUTER_TOPIC_MAX],
                           char config[ROUTER_TOPIC_MAX])
{
    const char *sep = prefix[0] ? "/" : "";
    snprintf(commands, ROUTER_TOPIC_MAX, "%s%s+/commands/#", prefix, sep);
    snprintf(config, ROUTER_TOPIC_MAX, "%s%s+/config", prefix, sep);
}

static void subscribe_device_topics(struct router *router, struct uplink *uplink)
{
    const struct conf_uplink *uc = uplink_conf(router, uplink);
    char commands[ROUTER_TOPIC_MAX], config[ROUTER_TOPIC_MAX];

    device_filters(uc->generic.topic_prefix, commands, config);
    uplink_subscribe(uplink, commands, 1);
    uplink_subscribe(uplink, config, 1);
}

void router_unsubscribe_device_topics(struct router *router, struct uplink *uplink,
                                      const char *old_prefix)
{
    char commands[ROUTER_TOPIC_MAX], config[ROUTER_TOPIC_MAX];

    device_filters(old_prefix, commands, config);
    uplink_unsubscribe(uplink, commands);
    uplink_unsubscribe(uplink, config);
}

void router_set_uplinks(struct router *router, const struct conf *conf, struct uplink **uplinks,
                        size_t count, struct uplink **new_uplinks, size_t new_count)
{
    router->conf = conf;
    router->uplinks = uplinks;
    router->uplink_count = count;
    for (size_t i = 0; i < new_count; i++) {
        struct uplink *uplink = new_uplinks[i];
        subscribe_device_topics(router, uplink);
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

static int forward(struct router *router, struct uplink *uplink, const char *cloud_topic,
                   const void *payload, size_t len, int qos, bool retain)
{
    int rc = uplink_publish(uplink, cloud_topic, payload, len, qos, retain);
    if (rc == -ENOBUFS)
        log_uplink(LOG_WARNING, uplink_name(uplink),
                   "queue full: message for \"%s\" refused; the local client is asked to re-send "
                   "(raise max_queued or check why the cloud is unreachable)",
                   cloud_topic);
    else if (rc < 0)
        log_uplink(LOG_ERR, uplink_name(uplink), "cannot queue message for \"%s\": %s", cloud_topic,
                   strerror(-rc));
    return rc;
}

int router_local_publish_cb(void *arg, const char *client_id, const char *topic,
                            const void *payload, size_t len, int qos, bool retain)
{
    struct router *router = arg;
    struct mapping_local m;
    const char *reason = NULL;
    char cloud_topic[ROUTER_TOPIC_MAX];
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
        result = forward(router, uplink, m.cloud_topic, payload, len, qos, retain);
        if (result == 0)
            router->forwarded++;
        return result;
    }
    if (!mapping_channel_is_upstream(m.channel))
        return 0; /* dev/<child>/commands etc. published locally stay local */

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
        const struct conf_uplink *uc = uplink_conf(router, targets[i]);
        int n = mapping_generic_up(uc->generic.topic_prefix, &m, cloud_topic, sizeof(cloud_topic),
                                   &reason);
        if (n == -ENAMETOOLONG)
            reason = "the cloud topic would be longer than 1024 bytes";
        if (n < 0) {
            report_rejected(router, client_id, topic, reason);
            continue;
        }
        int rc = forward(router, targets[i], cloud_topic, payload, len, qos, retain);
        if (rc < 0)
            result = rc;
    }
    if (result == 0)
        router->forwarded++;
    return result;
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
    const struct conf_uplink *uc = uplink_conf(router, uplink);
    const char *name = uplink_name(uplink);
    char local_topic[ROUTER_TOPIC_MAX];

    int n = mapping_generic_down(router->conf->local.topic_prefix, uc->generic.topic_prefix, topic,
                                 local_topic, sizeof(local_topic));
    if (n > 0) {
        /* config is state: retained locally so an app that starts later
         * still gets the last one (DESIGN.md local topic contract). */
        bool keep = retain || strcmp(local_topic + n - 7, "/config") == 0;
        local_deliver(router->local, local_topic, payload, len, qos, keep);
    } else if (n == -EINVAL) {
        log_uplink(LOG_WARNING, name, "cloud message on \"%s\" names an invalid child id; dropped",
                   topic);
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
