/* generic.c - any MQTT broker (HiveMQ Cloud, AWS IoT, mosquitto):
 * topic prefix and template rules.
 *
 * Without rules: dev/<child>/<channel>[/<sub>] <-> <topic_prefix>/<child>/
 * <channel>[/<sub>] for telemetry and state upstream, config and commands
 * downstream (mapping_generic_up/down). With generic.up / generic.down
 * rules, only the rules apply: e.g.
 *   up:   { local: telemetry, cloud: "gw/{child}/t/{sub}", qos: 1 }
 *   down: { cloud: "gw/{child}/cmd/{sub}", local: commands }
 * A template level is a literal, exactly "{child}", or (last) "{sub}".
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "conf.h"
#include "profiles/generic/section.h"
#include "profile.h"

#define CHILD_LEVEL "{child}"
#define SUB_LEVEL   "{sub}"

/* The level of @s that starts at @s: its length. */
static size_t level_len(const char *s)
{
    const char *slash = strchr(s, '/');
    return slash ? (size_t)(slash - s) : strlen(s);
}

static bool level_is(const char *s, size_t len, const char *word)
{
    return len == strlen(word) && memcmp(s, word, len) == 0;
}

int profile_template_expand(const char *tmpl, const char *child, const char *sub, char *buf,
                            size_t cap, const char **reason)
{
    size_t used = 0;
    bool sub_used = false;
    const char *p = tmpl;

    if (cap == 0)
        return -ENAMETOOLONG;
    buf[0] = '\0';
    for (;;) {
        size_t len = level_len(p);
        const char *text = p;
        size_t text_len = len;
        if (level_is(p, len, CHILD_LEVEL)) {
            text = child;
            text_len = strlen(child);
        } else if (level_is(p, len, SUB_LEVEL)) {
            sub_used = true;
            text = sub;
            text_len = sub ? strlen(sub) : 0;
        }
        if (text != NULL) {
            /* A left-out {sub} takes its separator with it. */
            size_t need = (used ? 1 : 0) + text_len;
            if (used + need >= cap)
                return -ENAMETOOLONG;
            if (used)
                buf[used++] = '/';
            memcpy(buf + used, text, text_len);
            used += text_len;
            buf[used] = '\0';
        }
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    if (sub && !sub_used) {
        *reason = "the message has a sub-topic but the generic.up rule's cloud template has no "
                  "{sub} level";
        return -EINVAL;
    }
    return (int)used;
}

int profile_template_filter(const char *tmpl, char *buf, size_t cap)
{
    size_t used = 0;
    const char *p = tmpl;

    for (;;) {
        size_t len = level_len(p);
        const char *text = p;
        size_t text_len = len;
        if (level_is(p, len, CHILD_LEVEL)) {
            text = "+";
            text_len = 1;
        } else if (level_is(p, len, SUB_LEVEL)) {
            text = "#";
            text_len = 1;
        }
        if (used + (used ? 1 : 0) + text_len >= cap)
            return -ENAMETOOLONG;
        if (p != tmpl)
            buf[used++] = '/';
        memcpy(buf + used, text, text_len);
        used += text_len;
        buf[used] = '\0';
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    return (int)used;
}

int profile_template_match(const char *tmpl, const char *topic, char *child, const char **sub)
{
    const char *t = tmpl, *p = topic;
    bool have_child = false;
    bool bad_child = false;

    *sub = NULL;
    child[0] = '\0';
    for (;;) {
        size_t tlen = level_len(t);
        if (level_is(t, tlen, SUB_LEVEL)) {
            /* "a/{sub}" matches "a" (no sub) and "a/x/y", like the filter "a/#". */
            if (p != NULL && *p != '\0')
                *sub = p;
            break;
        }
        if (p == NULL)
            return 0;
        size_t plen = level_len(p);
        if (level_is(t, tlen, CHILD_LEVEL)) {
            if (plen == 0 || plen > MAPPING_CHILD_MAX)
                bad_child = true;
            else if (mapping_child_check(p, plen) != NULL)
                bad_child = true;
            if (!bad_child) {
                memcpy(child, p, plen);
                child[plen] = '\0';
                have_child = true;
            }
        } else if (tlen != plen || memcmp(t, p, tlen) != 0) {
            return 0;
        }
        const char *pnext = p[plen] == '/' ? p + plen + 1 : NULL;
        if (t[tlen] == '\0') {
            if (pnext != NULL)
                return 0; /* topic has more levels */
            break;
        }
        t += tlen + 1;
        p = pnext;
        if (p == NULL && !level_is(t, level_len(t), SUB_LEVEL))
            return 0;
    }
    if (bad_child)
        return -EINVAL;
    return have_child ? 1 : 0;
}

static const struct conf_generic_rule *up_rule(const struct conf_generic *g,
                                               enum mapping_channel channel)
{
    for (size_t i = 0; i < g->up_count; i++) {
        if (g->up[i].channel == channel)
            return &g->up[i];
    }
    return NULL;
}

static int generic_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                         const void *payload, size_t len, int qos, bool retain,
                         struct profile_msgs *out, const char **reason)
{
    const struct conf_generic *g = generic_conf(pi->uc);
    char topic[PROFILE_TOPIC_MAX];
    int n;

    if (g->up_count > 0) {
        const struct conf_generic_rule *rule = up_rule(g, m->channel);
        if (!rule) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "no generic.up rule carries the %s channel of this uplink",
                     mapping_channel_name(m->channel));
            *reason = pi->reason;
            return -EINVAL;
        }
        n = profile_template_expand(rule->cloud, m->child, m->sub, topic, sizeof(topic), reason);
        if (rule->qos >= 0)
            qos = rule->qos;
    } else {
        n = mapping_generic_up(g->topic_prefix, m, topic, sizeof(topic), reason);
    }
    if (n == -ENAMETOOLONG)
        *reason = "the cloud topic would be longer than 1024 bytes";
    if (n < 0)
        return -EINVAL;
    return profile_msgs_add(out, topic, payload, len, qos, retain);
}

static void generic_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    const struct conf_generic *g = generic_conf(pi->uc);
    char filter[PROFILE_TOPIC_MAX];

    if (g->down_count == 0) {
        const char *prefix = g->topic_prefix;
        const char *sep = prefix[0] ? "/" : "";
        snprintf(filter, sizeof(filter), "%s%s+/commands/#", prefix, sep);
        profile_msgs_add(filters, filter, NULL, 0, 1, false);
        snprintf(filter, sizeof(filter), "%s%s+/config", prefix, sep);
        profile_msgs_add(filters, filter, NULL, 0, 1, false);
        return;
    }
    for (size_t i = 0; i < g->down_count; i++) {
        if (profile_template_filter(g->down[i].cloud, filter, sizeof(filter)) > 0)
            profile_msgs_add(filters, filter, NULL, 0, g->down[i].qos >= 0 ? g->down[i].qos : 1,
                             false);
    }
}

static void generic_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                            size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const struct conf_generic *g = generic_conf(pi->uc);
    const char *local_prefix = pi->conf->local.topic_prefix;
    char local_topic[PROFILE_TOPIC_MAX];
    int n;

    if (g->down_count == 0) {
        n = mapping_generic_down(local_prefix, g->topic_prefix, topic, local_topic,
                                 sizeof(local_topic));
        if (n == -EINVAL)
            profile_report_error(pi, topic, "cloud message names an invalid child id; dropped");
        if (n <= 0)
            return;
        /* config is state: retained locally so an app that starts later
         * still gets the last one (DESIGN.md local topic contract). */
        bool keep = retain || strcmp(local_topic + n - 7, "/config") == 0;
        profile_msgs_add(local, local_topic, payload, len, qos, keep);
        return;
    }
    for (size_t i = 0; i < g->down_count; i++) {
        const struct conf_generic_rule *rule = &g->down[i];
        char child[MAPPING_CHILD_MAX + 1];
        const char *sub;
        int match = profile_template_match(rule->cloud, topic, child, &sub);
        if (match < 0) {
            profile_report_error(pi, topic, "cloud message names an invalid child id; dropped");
            return;
        }
        if (match == 0)
            continue;
        bool config = rule->channel == MAPPING_CONFIG;
        if (sub && !config)
            n = snprintf(local_topic, sizeof(local_topic), "%s/%s/%s/%s", local_prefix, child,
                         mapping_channel_name(rule->channel), sub);
        else
            n = snprintf(local_topic, sizeof(local_topic), "%s/%s/%s", local_prefix, child,
                         mapping_channel_name(rule->channel));
        if (n < 0 || (size_t)n >= sizeof(local_topic))
            return;
        profile_msgs_add(local, local_topic, payload, len, qos, retain || config);
        return; /* the first rule that matches */
    }
}

const struct profile profile_generic = {
    .name = "generic",
    .up_cb = generic_up_cb,
    .subscriptions_cb = generic_subscriptions_cb,
    .down_cb = generic_down_cb,
};
