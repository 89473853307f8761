/* conf_local.c - the local section: listeners (tcp://, unix:// URLs),
 * client limits, the connect budget, the password file and the ACL
 * (docs/configuration.md, "local"). Read by conf_load() through
 * conf_local_parse() (conf_walk.h).
 */
#include "conf_walk.h"

#include "access.h"
#include "util.h"

#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#define DEFAULT_TCP_LISTEN             "tcp://127.0.0.1:1883"
#define DEFAULT_UNIX_LISTEN            "unix://" UPLINKD_DEFAULT_RUN_DIR "/local.sock"
#define DEFAULT_SOCKET_MODE            0660
#define DEFAULT_MAX_PACKET_SIZE        (256 * 1024)
#define DEFAULT_MAX_CLIENTS            1024
#define DEFAULT_MAX_PENDING_CONNECTS   128
#define DEFAULT_MAX_PENDING_PER_UID    32
#define DEFAULT_CONNECT_DEADLINE_MS    5000
#define DEFAULT_LOCAL_MAX_INFLIGHT     100
#define DEFAULT_LOCAL_MAX_QUEUED       1000
#define DEFAULT_LOCAL_MAX_QUEUED_BYTES (64 * 1024 * 1024)
#define DEFAULT_LOCAL_PREFIX           "dev"

/* ------------------------------------------------------------------------ */
/* Listen URLs                                                               */

static int parse_tcp_listen(const char *rest, char *why, size_t why_size, struct conf_listen *out)
{
    struct in6_addr addr6;
    struct in_addr addr4;
    char host[INET6_ADDRSTRLEN + 1];
    const char *port_text;
    size_t host_len;
    unsigned long port = 0;

    if (rest[0] == '[') {
        const char *close = strchr(rest, ']');
        if (close == NULL) {
            snprintf(why, why_size, "has '[' without ']' around the IPv6 address");
            return -EINVAL;
        }
        host_len = (size_t)(close - rest - 1);
        if (host_len >= sizeof(host)) {
            snprintf(why, why_size, "has an invalid IPv6 address");
            return -EINVAL;
        }
        memcpy(host, rest + 1, host_len);
        host[host_len] = '\0';
        if (inet_pton(AF_INET6, host, &addr6) != 1) {
            snprintf(why, why_size, "has an invalid IPv6 address");
            return -EINVAL;
        }
        if (close[1] != ':') {
            snprintf(why, why_size, "has no port (expected e.g. tcp://[::1]:1883)");
            return -EINVAL;
        }
        port_text = close + 2;
    } else {
        const char *colon = strrchr(rest, ':');
        if (colon == NULL) {
            snprintf(why, why_size, "has no port (expected e.g. tcp://127.0.0.1:1883)");
            return -EINVAL;
        }
        if (memchr(rest, ':', (size_t)(colon - rest)) != NULL) {
            snprintf(why, why_size,
                     "has an IPv6 address without brackets (expected e.g. tcp://[::1]:1883)");
            return -EINVAL;
        }
        host_len = (size_t)(colon - rest);
        if (host_len == 0 || host_len >= sizeof(host)) {
            snprintf(why, why_size,
                     "has no valid host (expected an IP address or localhost, e.g. "
                     "tcp://127.0.0.1:1883)");
            return -EINVAL;
        }
        memcpy(host, rest, host_len);
        host[host_len] = '\0';
        /* Binding needs an address, not a name to resolve; "localhost" is
         * the one name allowed, and means the IPv4 loopback. */
        if (strcmp(host, "localhost") == 0)
            snprintf(host, sizeof(host), "127.0.0.1");
        else if (inet_pton(AF_INET, host, &addr4) != 1) {
            char quoted[CONF_QUOTE_MAX];
            snprintf(why, why_size,
                     "has host %s, which is not an IP address (expected an IPv4 address, "
                     "[IPv6] or localhost)",
                     conf_quote(host, quoted, sizeof(quoted)));
            return -EINVAL;
        }
        port_text = colon + 1;
    }
    if (*port_text == '\0') {
        snprintf(why, why_size, "has no port (expected e.g. tcp://127.0.0.1:1883)");
        return -EINVAL;
    }
    for (const char *p = port_text; *p; p++) {
        if (*p < '0' || *p > '9' || port > 65535) {
            snprintf(why, why_size, "has an invalid port (expected an integer 1-65535)");
            return -EINVAL;
        }
        port = port * 10 + (unsigned long)(*p - '0');
    }
    if (port < 1 || port > 65535) {
        snprintf(why, why_size, "has an invalid port (expected an integer 1-65535)");
        return -EINVAL;
    }
    out->kind = CONF_LISTEN_TCP;
    out->port = (uint16_t)port;
    out->host = strdup(host);
    return out->host ? 0 : -ENOMEM;
}

/* Parse one local.listen URL into @out (which must be zeroed). Returns 0,
 * -EINVAL with the problem in @why, or -ENOMEM. */
static int parse_listen_url(const char *url, char *why, size_t why_size, struct conf_listen *out)
{
    struct sockaddr_un sun;
    int rc;

    out->url = strdup(url);
    if (out->url == NULL)
        return -ENOMEM;
    if (strncmp(url, "tcp://", 6) == 0) {
        rc = parse_tcp_listen(url + 6, why, why_size, out);
        return rc;
    }
    if (strncmp(url, "unix://", 7) == 0) {
        const char *path = url + 7;
        if (path[0] != '/') {
            snprintf(why, why_size,
                     "has a relative socket path (expected an absolute path after unix://, "
                     "e.g. unix:///run/uplinkd/local.sock)");
            return -EINVAL;
        }
        if (strlen(path) >= sizeof(sun.sun_path)) {
            snprintf(why, why_size,
                     "has a socket path longer than %zu bytes (the limit of "
                     "sockaddr_un)",
                     sizeof(sun.sun_path) - 1);
            return -EINVAL;
        }
        out->kind = CONF_LISTEN_UNIX;
        out->path = strdup(path);
        return out->path ? 0 : -ENOMEM;
    }
    snprintf(why, why_size, "has an unknown scheme (expected tcp://HOST:PORT or unix:///PATH)");
    return -EINVAL;
}

static void listen_free(struct conf_listen *listen)
{
    free(listen->url);
    free(listen->host);
    free(listen->path);
}

static void parse_listen(struct conf_loader *ld, yaml_node_t *node, const char *key)
{
    struct conf_local *local = &ld->conf->local;
    size_t count;

    local->listen = conf_sequence_alloc(
        ld, node, key, "a sequence of URLs, e.g. [\"tcp://127.0.0.1:1883\"]",
        "is empty (expected at least one tcp:// or unix:// URL)", sizeof(*local->listen), &count);
    if (local->listen == NULL)
        return;
    local->listen_count = count;
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        char item_key[CONF_KEY_MAX];
        char quoted[CONF_QUOTE_MAX];
        char why[256];
        const char *url;
        int rc;

        conf_key_format(item_key, sizeof(item_key), "%s[%zu]", key, i);
        url = conf_scalar_text(ld, item, item_key, "a tcp:// or unix:// URL");
        if (url == NULL)
            continue;
        rc = parse_listen_url(url, why, sizeof(why), &local->listen[i]);
        if (rc == -ENOMEM) {
            ld->oom = true;
            return;
        }
        if (rc < 0) {
            conf_report(ld, item->start_mark, item_key, "%s %s",
                        conf_quote(url, quoted, sizeof(quoted)), why);
            continue;
        }
        for (size_t j = 0; j < i; j++) {
            if (local->listen[j].url != NULL && strcmp(local->listen[j].url, url) == 0) {
                conf_report(ld, item->start_mark, item_key,
                            "%s is listed twice (also %s[%zu]; keep only one)",
                            conf_quote(url, quoted, sizeof(quoted)), key, j);
                break;
            }
        }
    }
}

static void default_listen(struct conf_loader *ld)
{
    static const char *const urls[] = {DEFAULT_TCP_LISTEN, DEFAULT_UNIX_LISTEN};
    struct conf_local *local = &ld->conf->local;
    char why[256];

    local->listen = calloc(ARRAY_SIZE(urls), sizeof(*local->listen));
    if (local->listen == NULL) {
        ld->oom = true;
        return;
    }
    local->listen_count = ARRAY_SIZE(urls);
    for (size_t i = 0; i < ARRAY_SIZE(urls); i++) {
        /* The defaults are valid by construction; only allocation can fail. */
        if (parse_listen_url(urls[i], why, sizeof(why), &local->listen[i]) < 0)
            ld->oom = true;
    }
}

/* local.acl: a sequence of rules (struct conf_acl_rule; evaluation in access.c). */
enum {
    ACL_UID,
    ACL_GID,
    ACL_USER,
    ACL_CHILDREN,
    ACL_PUBLISH,
    ACL_SUBSCRIBE,
    ACL_DENY_PUBLISH,
    ACL_DENY_SUBSCRIBE,
    ACL_KEYS
};
static const char *const acl_keys[ACL_KEYS] = {
    [ACL_UID] = "uid",
    [ACL_GID] = "gid",
    [ACL_USER] = "user",
    [ACL_CHILDREN] = "children",
    [ACL_PUBLISH] = "publish",
    [ACL_SUBSCRIBE] = "subscribe",
    [ACL_DENY_PUBLISH] = "deny_publish",
    [ACL_DENY_SUBSCRIBE] = "deny_subscribe",
};

static void parse_acl(struct conf_loader *ld, yaml_node_t *node)
{
    static const char rule_expected[] =
        "a sequence of rules, e.g. [{uid: 1001, publish: [\"dev/modbus-*/#\"]}]";
    struct conf_local *local = &ld->conf->local;
    size_t count;

    /* An empty acl is the same as none: everything allowed (documented). */
    local->acl = conf_sequence_alloc(ld, node, "local.acl", rule_expected, NULL,
                                     sizeof(*local->acl), &count);
    if (local->acl == NULL)
        return;
    local->acl_count = count;
    for (size_t i = 0; i < count; i++) {
        static const char pattern_expected[] =
            "topic patterns, e.g. [\"dev/modbus-*/#\", \"dev/%c/commands/#\"]";
        static const char deny_expected[] =
            "topic patterns to refuse, e.g. [\"test/nosubscribe\", \"dev/+/config\"]";
        struct conf_acl_rule *rule = &local->acl[i];
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        yaml_node_t *values[ACL_KEYS];
        yaml_mark_t marks[ACL_KEYS];
        char path[CONF_KEY_MAX];
        char key[CONF_KEY_MAX];
        uint64_t number;

        conf_key_format(path, sizeof(path), "local.acl[%zu]", i);
        if (!conf_walk_mapping(ld, item, path, acl_keys, ACL_KEYS, values, marks))
            continue;
        conf_key_join(key, sizeof(key), path, "uid");
        if (conf_node_present(values[ACL_UID]) &&
            conf_get_uint(ld, values[ACL_UID], key, "a numeric user id", 0, UINT32_MAX - 1,
                          &number) == 0) {
            rule->has_uid = true;
            rule->uid = (uint32_t)number;
        }
        conf_key_join(key, sizeof(key), path, "gid");
        if (conf_node_present(values[ACL_GID]) &&
            conf_get_uint(ld, values[ACL_GID], key, "a numeric group id", 0, UINT32_MAX - 1,
                          &number) == 0) {
            rule->has_gid = true;
            rule->gid = (uint32_t)number;
        }
        conf_key_join(key, sizeof(key), path, "user");
        if (conf_node_present(values[ACL_USER]))
            conf_get_text(ld, values[ACL_USER], key, "a username from local.password_file", 256,
                          &rule->user);
        conf_key_join(key, sizeof(key), path, "children");
        if (conf_node_present(values[ACL_CHILDREN]))
            conf_get_string_list(ld, values[ACL_CHILDREN], key,
                                 "globs of child ids, e.g. [\"modbus-*\"]", access_child_glob_check,
                                 &rule->children, &rule->children_count);
        conf_key_join(key, sizeof(key), path, "publish");
        if (conf_node_present(values[ACL_PUBLISH]))
            conf_get_string_list(ld, values[ACL_PUBLISH], key, pattern_expected,
                                 access_pattern_check, &rule->publish, &rule->publish_count);
        conf_key_join(key, sizeof(key), path, "subscribe");
        if (conf_node_present(values[ACL_SUBSCRIBE]))
            conf_get_string_list(ld, values[ACL_SUBSCRIBE], key, pattern_expected,
                                 access_pattern_check, &rule->subscribe, &rule->subscribe_count);
        conf_key_join(key, sizeof(key), path, "deny_publish");
        if (conf_node_present(values[ACL_DENY_PUBLISH]))
            conf_get_string_list(ld, values[ACL_DENY_PUBLISH], key, deny_expected,
                                 access_pattern_check, &rule->deny_publish,
                                 &rule->deny_publish_count);
        conf_key_join(key, sizeof(key), path, "deny_subscribe");
        if (conf_node_present(values[ACL_DENY_SUBSCRIBE]))
            conf_get_string_list(ld, values[ACL_DENY_SUBSCRIBE], key, deny_expected,
                                 access_pattern_check, &rule->deny_subscribe,
                                 &rule->deny_subscribe_count);
        /* "%c" with no child list would mean any child: allowed, but a
         * children list without "%c" anywhere is certainly a mistake. */
        if (rule->children_count > 0) {
            bool used = false;
            for (size_t k = 0; k < rule->publish_count; k++)
                used = used || strstr(rule->publish[k], "%c") != NULL;
            for (size_t k = 0; k < rule->subscribe_count; k++)
                used = used || strstr(rule->subscribe[k], "%c") != NULL;
            for (size_t k = 0; k < rule->deny_publish_count; k++)
                used = used || strstr(rule->deny_publish[k], "%c") != NULL;
            for (size_t k = 0; k < rule->deny_subscribe_count; k++)
                used = used || strstr(rule->deny_subscribe[k], "%c") != NULL;
            conf_key_join(key, sizeof(key), path, "children");
            if (!used)
                conf_report(
                    ld, values[ACL_CHILDREN]->start_mark, key,
                    "has no effect: no publish or subscribe pattern of this rule uses \"%%c\" "
                    "(expected e.g. publish: [\"dev/%%c/#\"])");
        }
    }
}

/* local.password_file: read and checked now, so a plain-text password or a
 * typo is an error of --check-config and of reload, not of the first login. */
static void parse_password_file(struct conf_loader *ld, yaml_node_t *node)
{
    static const char expected[] = "a password file written by \"uplinkctl passwd\"";
    struct conf_local *local = &ld->conf->local;
    char why[512];
    int rc;

    if (conf_get_readable_file(ld, node, "local.password_file", expected, &local->password_file) <
            0 ||
        local->password_file == NULL)
        return;
    rc = access_passwords_load(local->password_file, &local->passwords, why, sizeof(why));
    if (rc == -ENOMEM)
        ld->oom = true;
    else if (rc < 0)
        conf_report(ld, node->start_mark, "local.password_file", "%s: %s", local->password_file,
                    why);
}

enum {
    LOCAL_LISTEN,
    LOCAL_SOCKET_MODE,
    LOCAL_SOCKET_GROUP,
    LOCAL_MAX_PACKET_SIZE,
    LOCAL_MAX_CLIENTS,
    LOCAL_MAX_PENDING_CONNECTS,
    LOCAL_MAX_PENDING_PER_UID,
    LOCAL_CONNECT_DEADLINE,
    LOCAL_TOPIC_PREFIX,
    LOCAL_MAX_INFLIGHT,
    LOCAL_MAX_QUEUED,
    LOCAL_MAX_QUEUED_BYTES,
    LOCAL_PASSWORD_FILE,
    LOCAL_ACL,
    LOCAL_KEYS
};
static const char *const local_keys[LOCAL_KEYS] = {
    [LOCAL_LISTEN] = "listen",
    [LOCAL_SOCKET_MODE] = "socket_mode",
    [LOCAL_SOCKET_GROUP] = "socket_group",
    [LOCAL_MAX_PACKET_SIZE] = "max_packet_size",
    [LOCAL_MAX_CLIENTS] = "max_clients",
    [LOCAL_MAX_PENDING_CONNECTS] = "max_pending_connects",
    [LOCAL_MAX_PENDING_PER_UID] = "max_pending_per_uid",
    [LOCAL_CONNECT_DEADLINE] = "connect_deadline",
    [LOCAL_TOPIC_PREFIX] = "topic_prefix",
    [LOCAL_MAX_INFLIGHT] = "max_inflight",
    [LOCAL_MAX_QUEUED] = "max_queued",
    [LOCAL_MAX_QUEUED_BYTES] = "max_queued_bytes",
    [LOCAL_PASSWORD_FILE] = "password_file",
    [LOCAL_ACL] = "acl",
};

/*
 * The budget of connections that have not completed CONNECT (local.c:
 * "pending connections"): per listener, per peer uid, and the deadline from
 * accept to a complete CONNECT. A per-uid budget above the per-listener one
 * could never be reached, which is a mistake worth saying.
 */
static void parse_pending_limits(struct conf_loader *ld, yaml_node_t *const *values)
{
    struct conf_local *local = &ld->conf->local;
    yaml_node_t *per_uid = values[LOCAL_MAX_PENDING_PER_UID];
    uint64_t number;

    if (conf_node_present(values[LOCAL_MAX_PENDING_CONNECTS]) &&
        conf_get_uint(ld, values[LOCAL_MAX_PENDING_CONNECTS], "local.max_pending_connects",
                      "a connection count", 1, 65536, &number) == 0)
        local->max_pending_connects = (unsigned)number;
    if (conf_node_present(per_uid) && conf_get_uint(ld, per_uid, "local.max_pending_per_uid",
                                                    "a connection count", 1, 65536, &number) == 0) {
        local->max_pending_per_uid = (unsigned)number;
        if (number > local->max_pending_connects)
            conf_report(ld, per_uid->start_mark, "local.max_pending_per_uid",
                        "%llu is above local.max_pending_connects (%u), so it would never apply "
                        "(expected at most %u, or raise local.max_pending_connects)",
                        (unsigned long long)number, local->max_pending_connects,
                        local->max_pending_connects);
    } else if (local->max_pending_per_uid > local->max_pending_connects) {
        local->max_pending_per_uid = local->max_pending_connects; /* the default, capped */
    }
    /* MQTT 3.1.1 §3.1: the server SHOULD close a connection that sends no
     * CONNECT within a reasonable time. A local app sends it at once; the
     * ceiling keeps a slowloris from holding a slot for long. */
    if (conf_node_present(values[LOCAL_CONNECT_DEADLINE]) &&
        conf_get_duration_ms(ld, values[LOCAL_CONNECT_DEADLINE], "local.connect_deadline", 100,
                             300 * 1000, &number) == 0)
        local->connect_deadline_ms = (unsigned)number;
}

void conf_local_parse(struct conf_loader *ld, yaml_node_t *node)
{
    yaml_node_t *values[LOCAL_KEYS] = {NULL};
    yaml_mark_t marks[LOCAL_KEYS];
    struct conf_local *local = &ld->conf->local;
    uint64_t number;

    if (conf_node_present(node) &&
        !conf_walk_mapping(ld, node, "local", local_keys, LOCAL_KEYS, values, marks))
        return;
    if (conf_node_present(values[LOCAL_LISTEN]))
        parse_listen(ld, values[LOCAL_LISTEN], "local.listen");
    if (conf_node_present(values[LOCAL_SOCKET_MODE]))
        conf_get_mode(ld, values[LOCAL_SOCKET_MODE], "local.socket_mode", &local->socket_mode);
    if (conf_node_present(values[LOCAL_SOCKET_GROUP])) {
        static const char expected[] = "a group name, e.g. \"uplinkd\"";
        yaml_node_t *group = values[LOCAL_SOCKET_GROUP];
        if (conf_get_text(ld, group, "local.socket_group", expected, 256, &local->socket_group) ==
                0 &&
            local->socket_group != NULL && strpbrk(local->socket_group, " :/,") != NULL) {
            char quoted[CONF_QUOTE_MAX];
            conf_report(ld, group->start_mark, "local.socket_group",
                        "%s is not a group name (expected %s)",
                        conf_quote(local->socket_group, quoted, sizeof(quoted)), expected);
        }
    }
    /* MQTT 3.1.1 §2.2.3: remaining length is at most 268,435,455 bytes,
     * plus up to 5 bytes of fixed header. Below 64 bytes hardly a real
     * CONNECT (client id, will, credentials) fits. */
    if (conf_node_present(values[LOCAL_MAX_PACKET_SIZE]) &&
        conf_get_size(ld, values[LOCAL_MAX_PACKET_SIZE], "local.max_packet_size", 64, 268435455 + 5,
                      &number) == 0)
        local->max_packet_size = (size_t)number;
    if (conf_node_present(values[LOCAL_MAX_CLIENTS]) &&
        conf_get_uint(ld, values[LOCAL_MAX_CLIENTS], "local.max_clients", "a client count", 1,
                      1000000, &number) == 0)
        local->max_clients = (unsigned)number;
    parse_pending_limits(ld, values);
    if (conf_node_present(values[LOCAL_TOPIC_PREFIX]))
        conf_get_topic_prefix(ld, values[LOCAL_TOPIC_PREFIX], "local.topic_prefix", true,
                              &local->topic_prefix);
    /* MQTT 3.1.1 packet ids are 16 bits (§2.3.1): at most 65535 in flight. */
    if (conf_node_present(values[LOCAL_MAX_INFLIGHT]) &&
        conf_get_uint(ld, values[LOCAL_MAX_INFLIGHT], "local.max_inflight", "a message count", 1,
                      65535, &number) == 0)
        local->max_inflight = (unsigned)number;
    if (conf_node_present(values[LOCAL_MAX_QUEUED]) &&
        conf_get_uint(ld, values[LOCAL_MAX_QUEUED], "local.max_queued", "a message count", 1,
                      10000000, &number) == 0)
        local->max_queued = (unsigned)number;
    if (conf_node_present(values[LOCAL_MAX_QUEUED_BYTES]) &&
        conf_get_size(ld, values[LOCAL_MAX_QUEUED_BYTES], "local.max_queued_bytes", 1024,
                      (uint64_t)SIZE_MAX / 2, &number) == 0)
        local->max_queued_bytes = (size_t)number;
    if (conf_node_present(values[LOCAL_PASSWORD_FILE]))
        parse_password_file(ld, values[LOCAL_PASSWORD_FILE]);
    if (conf_node_present(values[LOCAL_ACL]))
        parse_acl(ld, values[LOCAL_ACL]);
}

void conf_local_init(struct conf_local *local)
{
    local->socket_mode = DEFAULT_SOCKET_MODE;
    local->max_packet_size = DEFAULT_MAX_PACKET_SIZE;
    local->max_clients = DEFAULT_MAX_CLIENTS;
    local->max_pending_connects = DEFAULT_MAX_PENDING_CONNECTS;
    local->max_pending_per_uid = DEFAULT_MAX_PENDING_PER_UID;
    local->connect_deadline_ms = DEFAULT_CONNECT_DEADLINE_MS;
    local->max_inflight = DEFAULT_LOCAL_MAX_INFLIGHT;
    local->max_queued = DEFAULT_LOCAL_MAX_QUEUED;
    local->max_queued_bytes = DEFAULT_LOCAL_MAX_QUEUED_BYTES;
}

void conf_local_finish(struct conf_loader *ld)
{
    struct conf *conf = ld->conf;

    if (conf->local.topic_prefix == NULL)
        conf_set_string(ld, &conf->local.topic_prefix, DEFAULT_LOCAL_PREFIX);
    if (conf->local.listen == NULL && conf->local.listen_count == 0)
        default_listen(ld);
}

void conf_local_free(struct conf_local *local)
{
    for (size_t i = 0; i < local->listen_count; i++)
        listen_free(&local->listen[i]);
    free(local->listen);
    free(local->socket_group);
    free(local->topic_prefix);
    free(local->password_file);
    access_passwords_free(local->passwords);
    for (size_t i = 0; i < local->acl_count; i++) {
        struct conf_acl_rule *rule = &local->acl[i];
        free(rule->user);
        conf_free_strings(rule->children, rule->children_count);
        conf_free_strings(rule->publish, rule->publish_count);
        conf_free_strings(rule->subscribe, rule->subscribe_count);
        conf_free_strings(rule->deny_publish, rule->deny_publish_count);
        conf_free_strings(rule->deny_subscribe, rule->deny_subscribe_count);
    }
    free(local->acl);
}
