/* generic/section.c - uplinks[].generic: topic_prefix and the template
 * rules up and down (docs/configuration.md, "generic"). */
#include "profiles/generic/section.h"

#include <stdlib.h>
#include <string.h>

#include "conf_walk.h"

/* A cloud topic template (profile.h): levels are literals, exactly
 * "{child}", or (last) "{sub}". Returns NULL or what is wrong. */
static const char *template_check(const char *tmpl, bool need_child, bool allow_sub)
{
    bool child = false, sub = false;
    const char *p = tmpl;

    if (strpbrk(tmpl, "+#") != NULL)
        return "contains '+' or '#' (use {child} and {sub})";
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (sub)
            return "{sub} must be the last level";
        if (len == 7 && memcmp(p, "{child}", 7) == 0) {
            if (child)
                return "{child} appears twice";
            child = true;
        } else if (len == 5 && memcmp(p, "{sub}", 5) == 0) {
            if (!allow_sub)
                return "{sub} is not allowed here (config has no sub-topics)";
            sub = true;
        } else if (memchr(p, '{', len) != NULL || memchr(p, '}', len) != NULL) {
            return "a level with '{' must be exactly {child} or {sub}";
        }
        if (!slash)
            break;
        p = slash + 1;
    }
    if (need_child && !child)
        return "has no {child} level (needed to know which child a message is for)";
    return NULL;
}

enum { RULE_LOCAL, RULE_CLOUD, RULE_QOS, RULE_KEYS };
static const char *const rule_keys[RULE_KEYS] = {
    [RULE_LOCAL] = "local", [RULE_CLOUD] = "cloud", [RULE_QOS] = "qos"};

static void parse_generic_rules(struct conf_loader *ld, yaml_node_t *node, const char *key, bool up,
                                struct conf_generic_rule **out, size_t *count)
{
    const char *expected_local = up ? "telemetry or state" : "config or commands";
    size_t n;

    *out = conf_sequence_alloc(ld, node, key,
                               up ? "a sequence of {local, cloud, qos} rules"
                                  : "a sequence of {cloud, local, qos} rules",
                               NULL, sizeof(**out), &n);
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        yaml_node_t *values[RULE_KEYS];
        yaml_mark_t marks[RULE_KEYS];
        struct conf_generic_rule *rule = &(*out)[*count];
        char path[CONF_KEY_MAX], k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];
        uint64_t number;
        bool ok = true;

        conf_key_format(path, sizeof(path), "%s[%zu]", key, i);
        if (!conf_walk_mapping(ld, item, path, rule_keys, RULE_KEYS, values, marks))
            continue;
        rule->qos = -1;
        conf_key_join(k, sizeof(k), path, "local");
        if (!conf_node_present(values[RULE_LOCAL])) {
            conf_report(ld, values[RULE_LOCAL] ? values[RULE_LOCAL]->start_mark : item->start_mark,
                        k, "missing (required: %s)", expected_local);
            ok = false;
        } else {
            const char *text = conf_scalar_text(ld, values[RULE_LOCAL], k, expected_local);
            if (text == NULL)
                ok = false;
            else if (up && strcmp(text, "telemetry") == 0)
                rule->channel = MAPPING_TELEMETRY;
            else if (up && strcmp(text, "state") == 0)
                rule->channel = MAPPING_STATE;
            else if (!up && strcmp(text, "config") == 0)
                rule->channel = MAPPING_CONFIG;
            else if (!up && strcmp(text, "commands") == 0)
                rule->channel = MAPPING_COMMANDS;
            else {
                conf_report(ld, values[RULE_LOCAL]->start_mark, k,
                            "%s is not a channel here (expected %s)",
                            conf_quote(text, quoted, sizeof(quoted)), expected_local);
                ok = false;
            }
        }
        conf_key_join(k, sizeof(k), path, "cloud");
        if (!conf_node_present(values[RULE_CLOUD])) {
            conf_report(ld, values[RULE_CLOUD] ? values[RULE_CLOUD]->start_mark : item->start_mark,
                        k, "missing (required: a topic template such as \"gw/{child}/t/{sub}\")");
            ok = false;
        } else if (conf_get_text(ld, values[RULE_CLOUD], k, "a topic template",
                                 CONF_TOPIC_PREFIX_MAX, &rule->cloud) < 0 ||
                   rule->cloud == NULL) {
            ok = false;
        } else {
            const char *why =
                template_check(rule->cloud, !up, up || rule->channel != MAPPING_CONFIG);
            if (why) {
                conf_report(ld, values[RULE_CLOUD]->start_mark, k, "%s %s",
                            conf_quote(rule->cloud, quoted, sizeof(quoted)), why);
                ok = false;
            }
        }
        if (conf_node_present(values[RULE_QOS])) {
            conf_key_join(k, sizeof(k), path, "qos");
            if (conf_get_uint(ld, values[RULE_QOS], k, "a QoS", 0, 2, &number) == 0)
                rule->qos = (int)number;
            else
                ok = false;
        }
        if (!ok) {
            free(rule->cloud);
            rule->cloud = NULL;
            continue;
        }
        (*count)++;
    }
}

enum { GENERIC_TOPIC_PREFIX, GENERIC_UP, GENERIC_DOWN, GENERIC_KEYS };
static const char *const generic_keys[GENERIC_KEYS] = {
    [GENERIC_TOPIC_PREFIX] = "topic_prefix", [GENERIC_UP] = "up", [GENERIC_DOWN] = "down"};

void generic_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                           const char *uplink_path, struct conf_uplink *uplink)
{
    struct conf_generic *generic = calloc(1, sizeof(*generic));
    yaml_node_t *values[GENERIC_KEYS];
    yaml_mark_t marks[GENERIC_KEYS];
    char path[CONF_KEY_MAX];
    char key[CONF_KEY_MAX];

    (void)uplink_node;
    if (generic == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = generic;
    /* The prefix defaults to gateway.id (parsed before the uplinks; NULL
     * when it was wrong, which is reported there). */
    if (ld->conf->gateway_id != NULL)
        conf_set_string(ld, &generic->topic_prefix, ld->conf->gateway_id);
    if (node == NULL)
        return;
    conf_key_join(path, sizeof(path), uplink_path, "generic");
    if (!conf_walk_mapping(ld, node, path, generic_keys, GENERIC_KEYS, values, marks))
        return;
    if (conf_node_present(values[GENERIC_TOPIC_PREFIX])) {
        conf_key_join(key, sizeof(key), path, "topic_prefix");
        conf_get_topic_prefix(ld, values[GENERIC_TOPIC_PREFIX], key, false, &generic->topic_prefix);
    }
    if (conf_node_present(values[GENERIC_UP])) {
        conf_key_join(key, sizeof(key), path, "up");
        parse_generic_rules(ld, values[GENERIC_UP], key, true, &generic->up, &generic->up_count);
    }
    if (conf_node_present(values[GENERIC_DOWN])) {
        conf_key_join(key, sizeof(key), path, "down");
        parse_generic_rules(ld, values[GENERIC_DOWN], key, false, &generic->down,
                            &generic->down_count);
    }
}

void generic_section_free(void *section)
{
    struct conf_generic *generic = section;

    if (generic == NULL)
        return;
    free(generic->topic_prefix);
    for (size_t i = 0; i < generic->up_count; i++)
        free(generic->up[i].cloud);
    free(generic->up);
    for (size_t i = 0; i < generic->down_count; i++)
        free(generic->down[i].cloud);
    free(generic->down);
    free(generic);
}
