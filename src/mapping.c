/* mapping.c - pure topic mapping (see mapping.h for the contract). */
#include "mapping.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define RAW_PREFIX     "cloud/"
#define RAW_PREFIX_LEN (sizeof(RAW_PREFIX) - 1)

static const char *const channel_names[] = {
    [MAPPING_TELEMETRY] = "telemetry", [MAPPING_STATE] = "state",
    [MAPPING_SMARTREST] = "smartrest", [MAPPING_CONFIG] = "config",
    [MAPPING_COMMANDS] = "commands",   [MAPPING_OPERATIONS] = "operations",
};

const char *mapping_channel_name(enum mapping_channel channel)
{
    return channel_names[channel];
}

bool mapping_channel_is_upstream(enum mapping_channel channel)
{
    return channel == MAPPING_TELEMETRY || channel == MAPPING_STATE || channel == MAPPING_SMARTREST;
}

static int channel_lookup(const char *name, size_t len, enum mapping_channel *out)
{
    for (size_t i = 0; i < sizeof(channel_names) / sizeof(channel_names[0]); i++) {
        if (strlen(channel_names[i]) == len && memcmp(channel_names[i], name, len) == 0) {
            *out = (enum mapping_channel)i;
            return 0;
        }
    }
    return -ENOENT;
}

const char *mapping_child_check(const char *child, size_t len)
{
    if (len == 0)
        return "the child id is empty";
    if (len > MAPPING_CHILD_MAX)
        return "the child id is longer than 255 bytes";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)child[i];
        if (c <= 0x20 || c >= 0x7f)
            return "the child id contains a space, a control character or a non-ASCII byte";
        /* '/', '+', '#' would change the topic structure on every cloud;
         * ',', '"', '\'' and '\\' break SmartREST CSV (Cumulocity). */
        if (strchr("/+#,\"'\\", c) != NULL)
            return "the child id contains one of / + # , \" ' \\";
    }
    return NULL;
}

static bool has_prefix_level(const char *topic, const char *prefix, size_t prefix_len)
{
    return strncmp(topic, prefix, prefix_len) == 0 && topic[prefix_len] == '/';
}

static int parse_raw(const char *topic, struct mapping_local *out, const char **reason)
{
    const char *name = topic + RAW_PREFIX_LEN;
    const char *slash = strchr(name, '/');
    size_t name_len = slash ? (size_t)(slash - name) : strlen(name);

    if (name_len == 0 || name_len >= sizeof(out->uplink)) {
        *reason = "cloud/<uplink>/<topic>: the uplink name is empty or longer than 64 bytes";
        return -EINVAL;
    }
    if (slash == NULL || slash[1] == '\0') {
        *reason = "cloud/<uplink>/<topic>: the cloud topic after the uplink name is empty";
        return -EINVAL;
    }
    memcpy(out->uplink, name, name_len);
    out->uplink[name_len] = '\0';
    out->cloud_topic = slash + 1;
    out->kind = MAPPING_RAW;
    return 0;
}

int mapping_parse_local(const char *local_prefix, const char *topic, struct mapping_local *out,
                        const char **reason)
{
    size_t prefix_len = strlen(local_prefix);
    static const char *unused;

    if (reason == NULL)
        reason = &unused;
    memset(out, 0, sizeof(*out));
    out->kind = MAPPING_LOCAL_ONLY;

    if (strncmp(topic, RAW_PREFIX, RAW_PREFIX_LEN) == 0)
        return parse_raw(topic, out, reason);
    if (prefix_len == 0 || !has_prefix_level(topic, local_prefix, prefix_len))
        return 0;

    const char *child = topic + prefix_len + 1;
    const char *slash = strchr(child, '/');
    if (slash == NULL) {
        *reason = "expected <prefix>/<child>/<channel>: the channel is missing";
        return -EINVAL;
    }
    size_t child_len = (size_t)(slash - child);
    const char *why = mapping_child_check(child, child_len);
    if (why != NULL) {
        *reason = why;
        return -EINVAL;
    }
    const char *channel = slash + 1;
    const char *channel_end = strchr(channel, '/');
    size_t channel_len = channel_end ? (size_t)(channel_end - channel) : strlen(channel);
    if (channel_lookup(channel, channel_len, &out->channel) < 0) {
        *reason = "unknown channel (expected telemetry, state, smartrest, config, commands or "
                  "operations)";
        return -EINVAL;
    }
    if (channel_end != NULL) {
        if (channel_end[1] == '\0') {
            *reason = "the sub-topic after the channel is empty";
            return -EINVAL;
        }
        out->sub = channel_end + 1;
    }
    memcpy(out->child, child, child_len);
    out->child[child_len] = '\0';
    out->kind = MAPPING_DEV;
    return 0;
}

static int finish_snprintf(int n, size_t cap)
{
    if (n < 0)
        return -EINVAL;
    if ((size_t)n >= cap)
        return -ENAMETOOLONG;
    return n;
}

int mapping_generic_up(const char *cloud_prefix, const struct mapping_local *m, char *buf,
                       size_t cap, const char **reason)
{
    static const char *unused;

    if (reason == NULL)
        reason = &unused;
    if (m->kind != MAPPING_DEV ||
        (m->channel != MAPPING_TELEMETRY && m->channel != MAPPING_STATE)) {
        *reason = "the generic profile carries only the telemetry and state channels upstream";
        return -EINVAL;
    }
    /* Joined by hand, not with snprintf: this runs for every message, and
     * printf formatting was 3% of uplinkd's CPU in bench/run's burst, about a
     * third of it here (docs/performance.md). */
    const char *parts[] = {cloud_prefix,
                           cloud_prefix[0] ? "/" : "",
                           m->child,
                           "/",
                           mapping_channel_name(m->channel),
                           m->sub ? "/" : "",
                           m->sub ? m->sub : ""};
    size_t n = 0;
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        size_t len = strlen(parts[i]);
        if (len >= cap - n)
            return -ENAMETOOLONG;
        memcpy(buf + n, parts[i], len);
        n += len;
    }
    buf[n] = '\0';
    return (int)n;
}

int mapping_generic_down(const char *local_prefix, const char *cloud_prefix,
                         const char *cloud_topic, char *buf, size_t cap)
{
    size_t prefix_len = strlen(cloud_prefix);
    const char *child = cloud_topic;

    if (prefix_len > 0) {
        if (!has_prefix_level(cloud_topic, cloud_prefix, prefix_len))
            return 0;
        child = cloud_topic + prefix_len + 1;
    }
    const char *slash = strchr(child, '/');
    if (slash == NULL)
        return 0;
    const char *channel = slash + 1;
    const char *channel_end = strchr(channel, '/');
    size_t channel_len = channel_end ? (size_t)(channel_end - channel) : strlen(channel);
    enum mapping_channel ch;
    if (channel_lookup(channel, channel_len, &ch) < 0)
        return 0;
    if (ch == MAPPING_CONFIG && channel_end != NULL)
        return 0; /* config has no sub-topics */
    if (ch != MAPPING_CONFIG && ch != MAPPING_COMMANDS)
        return 0;
    if (channel_end != NULL && channel_end[1] == '\0')
        return 0;
    size_t child_len = (size_t)(slash - child);
    if (mapping_child_check(child, child_len) != NULL)
        return -EINVAL;
    int n = snprintf(buf, cap, "%s/%.*s/%s", local_prefix, (int)child_len, child, channel);
    return finish_snprintf(n, cap);
}

int mapping_raw_local(const char *uplink, const char *cloud_topic, char *buf, size_t cap)
{
    return finish_snprintf(snprintf(buf, cap, RAW_PREFIX "%s/%s", uplink, cloud_topic), cap);
}

int mapping_raw_filter(const char *local_filter, char uplink[65], const char **cloud_filter)
{
    if (strncmp(local_filter, RAW_PREFIX, RAW_PREFIX_LEN) != 0)
        return -ENOENT;
    const char *name = local_filter + RAW_PREFIX_LEN;
    const char *slash = strchr(name, '/');
    size_t name_len = slash ? (size_t)(slash - name) : strlen(name);
    if (name_len == 0 || name_len > 64 || memchr(name, '+', name_len) ||
        memchr(name, '#', name_len))
        return -EINVAL;
    if (slash == NULL || slash[1] == '\0')
        return -EINVAL;
    memcpy(uplink, name, name_len);
    uplink[name_len] = '\0';
    *cloud_filter = slash + 1;
    return 0;
}
