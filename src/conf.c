/* conf.c - YAML configuration -> validated, immutable struct conf.
 *
 * The file is parsed with libyaml's document API (yaml_parser_load), which
 * keeps a start mark on every node, so each complaint can name
 * FILE:LINE:COLUMN. Validation does not stop at the first problem: every
 * section is checked and all errors are returned together, so an operator
 * fixes a file in one round instead of one error per restart.
 *
 * Shape of the code: one function per YAML section. conf_walk_mapping() checks a
 * mapping's keys against the section's table (unknown keys, duplicates) and
 * hands back the value nodes by key index; the section function then
 * converts each value with a typed helper (get_*) that reports what is
 * wrong with the value in words. Cross-references (default port from
 * tls.enabled, routes naming uplinks, defaults derived from gateway.id) are
 * resolved after the sections that they depend on.
 */
#include "conf.h"
#include "conf_walk.h"

#include "access.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile_spec.h"
#include "util.h"

#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <yaml.h>

#define CONF_MAX_FILE_SIZE   (1024 * 1024)
#define CONF_UPLINK_NAME_MAX 64
#define CONF_GATEWAY_ID_MAX  128

#define DEFAULT_TCP_LISTEN             "tcp://127.0.0.1:1883"
#define DEFAULT_UNIX_LISTEN            "unix://" UPLINKD_DEFAULT_RUN_DIR "/local.sock"
#define DEFAULT_CONTROL_SOCKET         UPLINKD_DEFAULT_RUN_DIR "/control.sock"
#define DEFAULT_STATE_DIR              UPLINKD_DEFAULT_STATE_DIR
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
#define DEFAULT_SHUTDOWN_MS            5000
#define DEFAULT_PROFILE                "generic"
#define DEFAULT_KEEPALIVE_S            60
#define DEFAULT_RECONNECT_BASE_MS      1000
#define DEFAULT_RECONNECT_CAP_MS       120000
#define DEFAULT_MAX_QUEUED             10000
#define DEFAULT_UPLINK_MAX_INFLIGHT    100
#define MAX_UPLINK_MAX_INFLIGHT        10000
#define DEFAULT_PORT_TLS               8883
#define DEFAULT_PORT_PLAIN             1883

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

/* ------------------------------------------------------------------------ */
/* Sections                                                                  */

enum { GATEWAY_ID, GATEWAY_STATE_DIR, GATEWAY_KEYS };
static const char *const gateway_keys[GATEWAY_KEYS] = {
    [GATEWAY_ID] = "id",
    [GATEWAY_STATE_DIR] = "state_dir",
};

/* gateway.id becomes the default MQTT client id and topic prefix, so it is
 * limited to characters that are safe in both (MQTT 3.1.1 §3.1.3.1 only
 * promises [0-9a-zA-Z] in client ids; brokers accept these in practice). */
static void parse_gateway(struct conf_loader *ld, yaml_node_t *node, yaml_mark_t parent_mark)
{
    static const char id_expected[] = "1-128 characters from A-Z a-z 0-9 - _ . ~, starting with a "
                                      "letter or digit, e.g. \"gw-0001\"";
    yaml_node_t *values[GATEWAY_KEYS] = {NULL};
    yaml_mark_t marks[GATEWAY_KEYS];
    struct conf *conf = ld->conf;
    char quoted[CONF_QUOTE_MAX];

    if (conf_node_present(node) &&
        !conf_walk_mapping(ld, node, "gateway", gateway_keys, GATEWAY_KEYS, values, marks))
        return;
    if (!conf_node_present(values[GATEWAY_ID])) {
        yaml_mark_t mark = values[GATEWAY_ID]        ? values[GATEWAY_ID]->start_mark
                           : conf_node_present(node) ? node->start_mark
                                                     : parent_mark;
        conf_report(ld, mark, "gateway.id", "missing (required: %s)", id_expected);
    } else if (conf_get_text(ld, values[GATEWAY_ID], "gateway.id", id_expected, CONF_GATEWAY_ID_MAX,
                             &conf->gateway_id) == 0 &&
               conf->gateway_id != NULL) {
        const char *bad = conf_first_bad_char(conf->gateway_id, "-_.~");
        if (bad != NULL || !conf_is_alnum(conf->gateway_id[0])) {
            char what[48];
            conf_describe_char(what, sizeof(what), bad ? *bad : conf->gateway_id[0]);
            conf_report(ld, values[GATEWAY_ID]->start_mark, "gateway.id",
                        "%s contains %s (expected %s)",
                        conf_quote(conf->gateway_id, quoted, sizeof(quoted)), what, id_expected);
            free(conf->gateway_id);
            conf->gateway_id = NULL;
        }
    }
    if (conf_node_present(values[GATEWAY_STATE_DIR]))
        conf_get_absolute_path(ld, values[GATEWAY_STATE_DIR], "gateway.state_dir",
                               "the state directory", PATH_MAX, &conf->state_dir);
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

static void parse_local(struct conf_loader *ld, yaml_node_t *node)
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

enum { CONTROL_SOCKET, CONTROL_KEYS };
static const char *const control_keys[CONTROL_KEYS] = {[CONTROL_SOCKET] = "socket"};

static void parse_control(struct conf_loader *ld, yaml_node_t *node)
{
    yaml_node_t *values[CONTROL_KEYS] = {NULL};
    yaml_mark_t marks[CONTROL_KEYS];
    struct sockaddr_un sun;

    if (!conf_walk_mapping(ld, node, "control", control_keys, CONTROL_KEYS, values, marks))
        return;
    if (conf_node_present(values[CONTROL_SOCKET]))
        conf_get_absolute_path(ld, values[CONTROL_SOCKET], "control.socket", "the control socket",
                               sizeof(sun.sun_path) - 1, &ld->conf->control_socket);
}

enum { LOG_LEVEL, LOG_KEYS };
static const char *const log_keys[LOG_KEYS] = {[LOG_LEVEL] = "level"};

static void parse_log(struct conf_loader *ld, yaml_node_t *node)
{
    static const char expected[] = "error, warning, notice, info or debug";
    yaml_node_t *values[LOG_KEYS] = {NULL};
    yaml_mark_t marks[LOG_KEYS];
    char quoted[CONF_QUOTE_MAX];
    const char *text;
    int level;

    if (!conf_walk_mapping(ld, node, "log", log_keys, LOG_KEYS, values, marks))
        return;
    if (!conf_node_present(values[LOG_LEVEL]))
        return;
    text = conf_scalar_text(ld, values[LOG_LEVEL], "log.level", expected);
    if (text == NULL)
        return;
    level = log_level_parse(text);
    if (level < 0) {
        conf_report(ld, values[LOG_LEVEL]->start_mark, "log.level",
                    "%s is not a log level (expected %s)", conf_quote(text, quoted, sizeof(quoted)),
                    expected);
        return;
    }
    ld->conf->log_level = level;
}

enum { TLS_ENABLED, TLS_CA, TLS_CERT, TLS_KEY, TLS_MIN_VERSION, TLS_ALPN, TLS_INSECURE, TLS_KEYS };
static const char *const tls_keys[TLS_KEYS] = {
    [TLS_ENABLED] = "enabled",
    [TLS_CA] = "ca",
    [TLS_CERT] = "cert",
    [TLS_KEY] = "key",
    [TLS_ALPN] = "alpn",
    [TLS_INSECURE] = "insecure",
    [TLS_MIN_VERSION] = "min_version",
};

/* tls.alpn: a protocol name or a list of them (RFC 7301 §3.1: 1-255 bytes
 * each). libmosquitto 2.0.11 puts exactly one name into the ClientHello
 * (lib/net_mosq.c net__init_ssl_ctx), so a longer list is refused rather
 * than silently cut. */
static void parse_alpn(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                       struct conf_tls *tls)
{
    static const char expected[] = "one ALPN protocol name, e.g. \"x-amzn-mqtt-ca\" or [\"mqtt\"]";
    const yaml_node_t *item = node;
    char item_key[CONF_KEY_MAX];

    conf_key_format(item_key, sizeof(item_key), "%s", key);
    if (node->type == YAML_SEQUENCE_NODE) {
        size_t n = conf_sequence_length(node);
        if (n == 0)
            return; /* an empty list offers nothing, like no key */
        if (n > 1) {
            conf_report(ld, node->start_mark, key,
                        "has %zu protocols, but libmosquitto 2.0 offers only one in the TLS "
                        "ClientHello (expected %s)",
                        n, expected);
            return;
        }
        item = conf_sequence_item(ld, node, 0);
        conf_key_format(item_key, sizeof(item_key), "%s[0]", key);
    }
    conf_get_text(ld, item, item_key, expected, 255, &tls->alpn);
}

static void parse_tls(struct conf_loader *ld, yaml_node_t *node, const char *path,
                      struct conf_tls *tls)
{
    yaml_node_t *values[TLS_KEYS] = {NULL};
    yaml_mark_t marks[TLS_KEYS];
    char key[CONF_KEY_MAX];
    char other[CONF_KEY_MAX];

    if (!conf_walk_mapping(ld, node, path, tls_keys, TLS_KEYS, values, marks))
        return;
    if (conf_node_present(values[TLS_ENABLED])) {
        conf_key_join(key, sizeof(key), path, "enabled");
        conf_get_bool(ld, values[TLS_ENABLED], key, &tls->enabled);
    }
    if (!tls->enabled) {
        /* A certificate that is silently not used is worse than an error. */
        for (int i = TLS_CA; i < TLS_KEYS; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, tls_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "has no effect because %s.enabled is false (remove it, or set %s.enabled: "
                        "true)",
                        path, path);
        }
        return;
    }
    if (conf_node_present(values[TLS_CA])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "ca");
        text = conf_scalar_text(ld, values[TLS_CA], key, "\"system\" or a path to a CA PEM file");
        if (text != NULL && strcmp(text, "system") == 0) {
            tls->ca_system = true;
        } else if (text != NULL &&
                   conf_get_readable_file(ld, values[TLS_CA], key,
                                          "\"system\" or a readable CA certificate PEM file",
                                          &tls->ca_file) == 0) {
            tls->ca_system = false;
            conf_set_where(ld, values[TLS_CA], &tls->ca_at);
        }
    }
    if (conf_node_present(values[TLS_CERT])) {
        conf_key_join(key, sizeof(key), path, "cert");
        if (conf_get_readable_file(ld, values[TLS_CERT], key,
                                   "a readable client certificate PEM file", &tls->cert) == 0)
            conf_set_where(ld, values[TLS_CERT], &tls->cert_at);
    }
    if (conf_node_present(values[TLS_KEY])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "key");
        text = conf_scalar_text(ld, values[TLS_KEY], key, "a PEM file or a pkcs11: URI");
        if (text != NULL && keys_is_uri(text)) {
            /* A token key: opened (PIN, object, match with tls.cert) by
             * tlscheck at start-up and by --check-config. Only the engine's
             * presence is checked here. */
            char err[KEYS_ERR_SIZE];
            if (conf_get_text(ld, values[TLS_KEY], key, "a pkcs11: URI", 4096, &tls->key) == 0 &&
                keys_pkcs11_available(err, sizeof(err)) < 0)
                conf_report(ld, values[TLS_KEY]->start_mark, key, "%s", err);
        } else if (text != NULL) {
            conf_get_readable_file(ld, values[TLS_KEY], key,
                                   "a readable private key PEM file or a pkcs11: URI", &tls->key);
        }
    }
    if (conf_node_present(values[TLS_MIN_VERSION])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "min_version");
        text = conf_scalar_text(ld, values[TLS_MIN_VERSION], key, "tls1.2 or tls1.3");
        if (text != NULL && strcmp(text, "tls1.2") == 0) {
            tls->min_version = CONF_TLS_1_2;
        } else if (text != NULL && strcmp(text, "tls1.3") == 0) {
            tls->min_version = CONF_TLS_1_3;
        } else if (text != NULL) {
            char quoted[CONF_QUOTE_MAX];
            conf_report(ld, values[TLS_MIN_VERSION]->start_mark, key,
                        "%s is not a TLS version uplinkd offers (expected tls1.2 or tls1.3; older "
                        "versions are not supported)",
                        conf_quote(text, quoted, sizeof(quoted)));
        }
    }
    if (conf_node_present(values[TLS_ALPN])) {
        conf_key_join(key, sizeof(key), path, "alpn");
        parse_alpn(ld, values[TLS_ALPN], key, tls);
    }
    if (conf_node_present(values[TLS_INSECURE])) {
        conf_key_join(key, sizeof(key), path, "insecure");
        conf_get_bool(ld, values[TLS_INSECURE], key, &tls->insecure);
    }
    /* Either one alone cannot authenticate: the key proves possession of
     * the certificate's public key (RFC 8446 §4.4.3 CertificateVerify). */
    if (conf_node_present(values[TLS_CERT]) != conf_node_present(values[TLS_KEY])) {
        int have = conf_node_present(values[TLS_CERT]) ? TLS_CERT : TLS_KEY;
        int lack = have == TLS_CERT ? TLS_KEY : TLS_CERT;
        conf_key_join(key, sizeof(key), path, tls_keys[have]);
        conf_key_join(other, sizeof(other), path, tls_keys[lack]);
        conf_report(ld, values[have]->start_mark, key,
                    "is set without %s (a client certificate needs "
                    "both cert and key; add %s or remove %s)",
                    other, other, key);
    }
}

/* The jwt keys come after AUTH_PASSWORD_FILE: AUTH_JWT_FIRST.. are the ones
 * only type jwt uses. */
enum {
    AUTH_TYPE,
    AUTH_USERNAME,
    AUTH_PASSWORD,
    AUTH_PASSWORD_FILE,
    AUTH_ALG,
    AUTH_KEY,
    AUTH_PASSPHRASE_FILE,
    AUTH_PKCS11_MODULE,
    AUTH_LIFETIME,
    AUTH_SKEW,
    AUTH_REFRESH,
    AUTH_AUD,
    AUTH_KID,
    AUTH_CLAIMS,
    AUTH_CLOCK_CHECK,
    AUTH_KEYS,
    AUTH_JWT_FIRST = AUTH_ALG,
};
static const char *const auth_keys[AUTH_KEYS] = {
    [AUTH_TYPE] = "type",
    [AUTH_USERNAME] = "username",
    [AUTH_PASSWORD] = "password",
    [AUTH_PASSWORD_FILE] = "password_file",
    [AUTH_ALG] = "alg",
    [AUTH_KEY] = "key",
    [AUTH_PASSPHRASE_FILE] = "passphrase_file",
    [AUTH_PKCS11_MODULE] = "pkcs11_module",
    [AUTH_LIFETIME] = "lifetime",
    [AUTH_SKEW] = "skew",
    [AUTH_REFRESH] = "refresh",
    [AUTH_AUD] = "aud",
    [AUTH_KID] = "kid",
    [AUTH_CLAIMS] = "claims",
    [AUTH_CLOCK_CHECK] = "clock_check",
};

/* JWT defaults and limits (docs/configuration.md, auth). */
#define JWT_USERNAME_DEFAULT "unused" /* GCP ignores the user name; any value works */
#define JWT_LIFETIME_MIN_S   10       /* shorter would reconnect all the time */
#define JWT_SKEW_MAX_S       3600
#define JWT_REFRESH_MIN_PCT  10
#define JWT_REFRESH_MAX_PCT  99

/* The cap on exp - iat without a profile rule: a token that lives longer
 * than a day is a risk (GCP IoT Core and ClearBlade refuse more, too). */
#define JWT_LIFETIME_MAX_S (24 * 3600)

/* auth.refresh: "80" or "80%". */
static void get_refresh_percent(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                                uint32_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "a percentage");
    unsigned value = 0;
    const char *p;

    if (text == NULL)
        return;
    for (p = text; *p >= '0' && *p <= '9' && value < 1000; p++)
        value = value * 10 + (unsigned)(*p - '0');
    if (p == text || (p[0] != '\0' && strcmp(p, "%") != 0) || value < JWT_REFRESH_MIN_PCT ||
        value > JWT_REFRESH_MAX_PCT) {
        conf_report(ld, node->start_mark, key,
                    "%s is not a valid refresh point (expected a percentage of the token's "
                    "lifetime from %d to %d, e.g. 80 or \"80%%\")",
                    conf_quote(text, quoted, sizeof(quoted)), JWT_REFRESH_MIN_PCT,
                    JWT_REFRESH_MAX_PCT);
        return;
    }
    *out = value;
}

/* auth.claims: a mapping of claim name -> string value. */
static void parse_jwt_claims(struct conf_loader *ld, yaml_node_t *node, const char *path,
                             struct conf_jwt *jwt)
{
    static const char expected[] = "a mapping of claim names to strings, e.g. {sub: gw-0001}";
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    size_t count;

    if (!conf_expect_kind(ld, node, path, YAML_MAPPING_NODE, expected))
        return;
    count = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    if (count == 0)
        return;
    if (count > CONF_JWT_MAX_CLAIMS) {
        conf_report(ld, node->start_mark, path, "has %zu claims (expected at most %d)", count,
                    CONF_JWT_MAX_CLAIMS);
        return;
    }
    jwt->claims = calloc(count, sizeof(*jwt->claims));
    if (jwt->claims == NULL) {
        ld->oom = true;
        return;
    }
    for (yaml_node_pair_t *pair = node->data.mapping.pairs.start;
         pair < node->data.mapping.pairs.top; pair++) {
        yaml_node_t *name_node = conf_node_at(ld, pair->key);
        yaml_node_t *value_node = conf_node_at(ld, pair->value);
        struct conf_jwt_claim claim = {NULL, NULL};
        bool ok = true;

        if (conf_get_text(ld, name_node, path, "a claim name", 256, &claim.name) < 0 ||
            claim.name == NULL)
            continue;
        conf_key_join(key, sizeof(key), path, claim.name);
        /* RFC 7519 §4.1: iat, exp and aud are ours to set. */
        if (strcmp(claim.name, "iat") == 0 || strcmp(claim.name, "exp") == 0 ||
            strcmp(claim.name, "aud") == 0) {
            conf_report(ld, name_node->start_mark, key,
                        "is set by uplinkd (iat and exp from the clock and auth.lifetime, aud from "
                        "auth.aud); remove it");
            ok = false;
        }
        for (size_t i = 0; ok && i < jwt->claim_count; i++) {
            if (strcmp(jwt->claims[i].name, claim.name) == 0) {
                conf_report(ld, name_node->start_mark, key, "%s is given twice",
                            conf_quote(claim.name, quoted, sizeof(quoted)));
                ok = false;
            }
        }
        if (ok && (conf_get_text(ld, value_node, key, "a string value", CONF_MQTT_STRING_MAX,
                                 &claim.value) < 0 ||
                   claim.value == NULL))
            ok = false;
        if (!ok) {
            free(claim.name);
            free(claim.value);
            continue;
        }
        jwt->claims[jwt->claim_count++] = claim;
    }
}

/* Load auth.key, fit it to auth.alg and sign a trial token, so that a bad
 * key, passphrase, PIN, alg or claim is reported now (and by
 * --check-config) rather than on the first connection attempt. */
void conf_jwt_claims(const struct conf_jwt *jwt, struct jwt_claim *extra, struct jwt_claims *out)
{
    for (size_t i = 0; i < jwt->claim_count; i++)
        extra[i] = (struct jwt_claim){.name = jwt->claims[i].name, .value = jwt->claims[i].value};
    *out = (struct jwt_claims){.aud = jwt->aud,
                               .lifetime_s = jwt->lifetime_s,
                               .max_lifetime_s = jwt->max_lifetime_s,
                               .skew_s = jwt->skew_s,
                               .extra = extra,
                               .extra_count = jwt->claim_count};
}

static void jwt_load_key(struct conf_loader *ld, yaml_node_t *auth_node, yaml_node_t *const *values,
                         const char *path, struct conf_jwt *jwt)
{
    struct keys_options options = {.passphrase_file = jwt->passphrase_file,
                                   .pkcs11_module = jwt->pkcs11_module};
    struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
    struct jwt_claims claims;
    struct jwt_signer *signer = NULL;
    yaml_node_t *alg_node = values[AUTH_ALG];
    char key[CONF_KEY_MAX];
    char err[KEYS_ERR_SIZE];
    char described[64];
    char *token = NULL;
    int rc;

    conf_key_join(key, sizeof(key), path, "key");
    rc = keys_load_private(jwt->key, &options, &jwt->private_key, err, sizeof(err));
    if (rc == -ENOMEM) {
        ld->oom = true;
        return;
    }
    if (rc < 0) {
        conf_report(ld, values[AUTH_KEY]->start_mark, key, "%s", err);
        return;
    }
    if (!conf_node_present(alg_node) && jwt_alg_for_key(jwt->private_key, &jwt->alg) < 0) {
        conf_report(ld, values[AUTH_KEY]->start_mark, key,
                    "is a %s key, which cannot sign a JWT (expected RSA of 2048 bits or more for "
                    "RS256/PS256, or EC P-256/P-384 for ES256/ES384)",
                    keys_describe(jwt->private_key, described, sizeof(described)));
        return;
    }
    rc = jwt_signer_new(jwt->private_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, err,
                        sizeof(err));
    if (rc == -ENOMEM) {
        ld->oom = true;
        return;
    }
    if (rc < 0) {
        conf_key_join(key, sizeof(key), path, conf_node_present(alg_node) ? "alg" : "key");
        conf_report(ld, (conf_node_present(alg_node) ? alg_node : values[AUTH_KEY])->start_mark,
                    key, "%s", err);
        return;
    }
    conf_jwt_claims(jwt, extra, &claims);
    /* Any time after the build date will do: this checks the key, not the
     * clock (the clock is checked before every real signature). */
    rc = jwt_sign(signer, &claims, jwt_build_epoch() + 86400, &token, NULL, err, sizeof(err));
    if (rc == -ENOMEM)
        ld->oom = true;
    else if (rc < 0)
        conf_report(ld, auth_node->start_mark, path, "cannot sign a test token: %s", err);
    if (token != NULL) {
        explicit_bzero(token, strlen(token));
        free(token);
    }
    jwt_signer_free(signer);
}

/* The auth keys of type jwt; the username default is set by the caller. */
static void parse_auth_jwt(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *const *values,
                           const char *path, const struct profile_spec *spec, struct conf_jwt *jwt)
{
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    unsigned errors_before = ld->error_count;
    const char *text;

    jwt->lifetime_s = JWT_DEFAULT_LIFETIME_S;
    jwt->max_lifetime_s =
        spec && spec->jwt_max_lifetime_s ? spec->jwt_max_lifetime_s : JWT_LIFETIME_MAX_S;
    jwt->skew_s = JWT_DEFAULT_SKEW_S;
    jwt->refresh_percent = JWT_DEFAULT_REFRESH_PCT;
    jwt->kid_mode = JWT_KID_NONE;
    jwt->clock_check = CONF_CLOCK_SYNC;

    conf_key_join(key, sizeof(key), path, "key");
    if (!conf_node_present(values[AUTH_KEY])) {
        conf_report(ld, values[AUTH_KEY] ? values[AUTH_KEY]->start_mark : node->start_mark, key,
                    "missing (required with type jwt: a private key PEM file or a pkcs11: URI)");
    } else {
        text = conf_scalar_text(ld, values[AUTH_KEY], key, "a PEM file or a pkcs11: URI");
        if (text != NULL && keys_is_uri(text))
            conf_get_text(ld, values[AUTH_KEY], key, "a pkcs11: URI", 4096, &jwt->key);
        else if (text != NULL)
            conf_get_readable_file(ld, values[AUTH_KEY], key, "a readable private key PEM file",
                                   &jwt->key);
    }
    if (conf_node_present(values[AUTH_PASSPHRASE_FILE])) {
        conf_key_join(key, sizeof(key), path, "passphrase_file");
        conf_get_readable_file(ld, values[AUTH_PASSPHRASE_FILE], key,
                               "a readable file whose first line is the passphrase or PIN",
                               &jwt->passphrase_file);
    }
    if (conf_node_present(values[AUTH_PKCS11_MODULE])) {
        conf_key_join(key, sizeof(key), path, "pkcs11_module");
        conf_get_readable_file(ld, values[AUTH_PKCS11_MODULE], key,
                               "a readable PKCS#11 module (.so), e.g. "
                               "/usr/lib/softhsm/libsofthsm2.so",
                               &jwt->pkcs11_module);
    }
    if (conf_node_present(values[AUTH_ALG])) {
        static const char expected[] = "RS256, PS256, ES256 or ES384";
        conf_key_join(key, sizeof(key), path, "alg");
        text = conf_scalar_text(ld, values[AUTH_ALG], key, expected);
        if (text != NULL && jwt_alg_parse(text, &jwt->alg) < 0) {
            enum jwt_alg upper;
            char fixed[8] = "";
            for (size_t i = 0; i < sizeof(fixed) - 1 && text[i]; i++)
                fixed[i] = (char)(text[i] >= 'a' && text[i] <= 'z' ? text[i] - 32 : text[i]);
            if (strlen(text) < sizeof(fixed) && jwt_alg_parse(fixed, &upper) == 0)
                conf_report(ld, values[AUTH_ALG]->start_mark, key,
                            "%s is not an algorithm name (JWS names are case-sensitive: write %s)",
                            conf_quote(text, quoted, sizeof(quoted)), fixed);
            else
                conf_report(ld, values[AUTH_ALG]->start_mark, key,
                            "%s is not a supported algorithm (expected %s)",
                            conf_quote(text, quoted, sizeof(quoted)), expected);
        }
    }
    if (conf_node_present(values[AUTH_LIFETIME])) {
        conf_key_join(key, sizeof(key), path, "lifetime");
        conf_get_seconds(ld, values[AUTH_LIFETIME], key, JWT_LIFETIME_MIN_S, jwt->max_lifetime_s,
                         &jwt->lifetime_s);
    }
    if (conf_node_present(values[AUTH_SKEW])) {
        conf_key_join(key, sizeof(key), path, "skew");
        conf_get_seconds(ld, values[AUTH_SKEW], key, 0, JWT_SKEW_MAX_S, &jwt->skew_s);
    }
    if (conf_node_present(values[AUTH_REFRESH])) {
        conf_key_join(key, sizeof(key), path, "refresh");
        get_refresh_percent(ld, values[AUTH_REFRESH], key, &jwt->refresh_percent);
    }
    conf_key_join(key, sizeof(key), path, "aud");
    if (conf_node_present(values[AUTH_AUD]))
        conf_get_text(ld, values[AUTH_AUD], key, "the audience the cloud expects",
                      CONF_MQTT_STRING_MAX, &jwt->aud);
    else if (spec != NULL && spec->jwt_aud_required)
        conf_report(
            ld, values[AUTH_AUD] ? values[AUTH_AUD]->start_mark : node->start_mark, key,
            "missing (required with type jwt and the generic profile: the audience the cloud "
            "expects, e.g. the project id)");
    if (conf_node_present(values[AUTH_KID])) {
        conf_key_join(key, sizeof(key), path, "kid");
        text = conf_scalar_text(ld, values[AUTH_KID], key, "auto or a key id");
        if (text != NULL && strcmp(text, "auto") == 0)
            jwt->kid_mode = JWT_KID_FINGERPRINT;
        else if (text != NULL &&
                 conf_get_text(ld, values[AUTH_KID], key,
                               "\"auto\" (hex SHA-256 of the public key) or the key id to send",
                               1024, &jwt->kid) == 0)
            jwt->kid_mode = JWT_KID_VALUE;
    }
    if (conf_node_present(values[AUTH_CLAIMS])) {
        conf_key_join(key, sizeof(key), path, "claims");
        parse_jwt_claims(ld, values[AUTH_CLAIMS], key, jwt);
    }
    if (conf_node_present(values[AUTH_CLOCK_CHECK])) {
        conf_key_join(key, sizeof(key), path, "clock_check");
        text = conf_scalar_text(ld, values[AUTH_CLOCK_CHECK], key, "sync or build-date");
        if (text != NULL && strcmp(text, "sync") == 0)
            jwt->clock_check = CONF_CLOCK_SYNC;
        else if (text != NULL && strcmp(text, "build-date") == 0)
            jwt->clock_check = CONF_CLOCK_BUILD_DATE;
        else if (text != NULL)
            conf_report(ld, values[AUTH_CLOCK_CHECK]->start_mark, key,
                        "%s is not a clock check (expected sync: wait until the kernel says the "
                        "clock is NTP-synchronised, or build-date: only refuse a clock before the "
                        "build date)",
                        conf_quote(text, quoted, sizeof(quoted)));
    }
    /* Only a section without other errors is worth opening a key (or a
     * token) for. */
    if (ld->error_count == errors_before && !ld->oom)
        jwt_load_key(ld, node, values, path, jwt);
}

static void parse_auth(struct conf_loader *ld, yaml_node_t *node, const char *path,
                       const struct profile_spec *spec, struct conf_auth *auth)
{
    yaml_node_t *values[AUTH_KEYS] = {NULL};
    yaml_mark_t marks[AUTH_KEYS];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];

    if (!conf_walk_mapping(ld, node, path, auth_keys, AUTH_KEYS, values, marks))
        return;
    if (conf_node_present(values[AUTH_TYPE])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "type");
        text = conf_scalar_text(ld, values[AUTH_TYPE], key, "none, basic or jwt");
        if (text != NULL && strcmp(text, "none") == 0) {
            auth->type = CONF_AUTH_NONE;
        } else if (text != NULL && strcmp(text, "basic") == 0) {
            auth->type = CONF_AUTH_BASIC;
        } else if (text != NULL && strcmp(text, "jwt") == 0) {
            auth->type = CONF_AUTH_JWT;
        } else if (text != NULL) {
            conf_report(ld, values[AUTH_TYPE]->start_mark, key,
                        "%s is not an auth type (expected none, basic or jwt)",
                        conf_quote(text, quoted, sizeof(quoted)));
            return; /* the checks below would only add noise */
        } else {
            return;
        }
    }
    if (auth->type == CONF_AUTH_NONE) {
        for (int i = AUTH_USERNAME; i < AUTH_KEYS; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, auth_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "is set but %s.type is none (add \"type: basic\" or remove it)", path);
        }
        return;
    }
    if (auth->type == CONF_AUTH_JWT) {
        for (int i = AUTH_PASSWORD; i <= AUTH_PASSWORD_FILE; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, auth_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "is not used with type jwt: the password is a token signed with %s.key "
                        "(remove it)",
                        path);
        }
        conf_key_join(key, sizeof(key), path, "username");
        if (conf_node_present(values[AUTH_USERNAME]))
            conf_get_text(ld, values[AUTH_USERNAME], key, "the MQTT user name",
                          CONF_MQTT_STRING_MAX, &auth->username);
        else
            conf_set_string(ld, &auth->username, JWT_USERNAME_DEFAULT);
        parse_auth_jwt(ld, node, values, path, spec, &auth->jwt);
        return;
    }
    for (int i = AUTH_JWT_FIRST; i < AUTH_KEYS; i++) {
        if (!conf_node_present(values[i]))
            continue;
        conf_key_join(key, sizeof(key), path, auth_keys[i]);
        conf_report(ld, values[i]->start_mark, key,
                    "is only used with type jwt (set %s.type: jwt, or remove it)", path);
    }

    conf_key_join(key, sizeof(key), path, "username");
    if (!conf_node_present(values[AUTH_USERNAME]))
        conf_report(ld,
                    values[AUTH_USERNAME] ? values[AUTH_USERNAME]->start_mark : node->start_mark,
                    key, "missing (required with type basic: the MQTT user name)");
    else
        conf_get_text(ld, values[AUTH_USERNAME], key, "the MQTT user name", CONF_MQTT_STRING_MAX,
                      &auth->username);

    if (conf_node_present(values[AUTH_PASSWORD]) && conf_node_present(values[AUTH_PASSWORD_FILE])) {
        conf_key_join(key, sizeof(key), path, "password_file");
        conf_report(ld, values[AUTH_PASSWORD_FILE]->start_mark, key,
                    "is set together with %s.password (line %zu, column %zu); use only one", path,
                    values[AUTH_PASSWORD]->start_mark.line + 1,
                    values[AUTH_PASSWORD]->start_mark.column + 1);
        return;
    }
    if (conf_node_present(values[AUTH_PASSWORD])) {
        /* An MQTT password is binary data (§3.1.3.5), so only its length is
         * checked; an empty one is an explicit choice, keep it. */
        const char *text;
        conf_key_join(key, sizeof(key), path, "password");
        text = conf_scalar_text(ld, values[AUTH_PASSWORD], key, "the MQTT password");
        if (text != NULL && strlen(text) > CONF_MQTT_STRING_MAX)
            conf_report(ld, values[AUTH_PASSWORD]->start_mark, key,
                        "is longer than 65535 bytes (MQTT 3.1.1 §3.1.3.5)");
        else if (text != NULL)
            conf_set_string(ld, &auth->password, text);
    }
    if (conf_node_present(values[AUTH_PASSWORD_FILE])) {
        conf_key_join(key, sizeof(key), path, "password_file");
        conf_read_password_file(ld, values[AUTH_PASSWORD_FILE], key, &auth->password);
    }
}

enum { RECONNECT_BASE, RECONNECT_CAP, RECONNECT_KEYS };
static const char *const reconnect_keys[RECONNECT_KEYS] = {
    [RECONNECT_BASE] = "base",
    [RECONNECT_CAP] = "cap",
};

static void parse_reconnect(struct conf_loader *ld, yaml_node_t *node, const char *path,
                            struct conf_uplink *uplink)
{
    yaml_node_t *values[RECONNECT_KEYS] = {NULL};
    yaml_mark_t marks[RECONNECT_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t ms;
    bool cap_ok = true;

    if (!conf_walk_mapping(ld, node, path, reconnect_keys, RECONNECT_KEYS, values, marks))
        return;
    if (conf_node_present(values[RECONNECT_BASE])) {
        conf_key_join(key, sizeof(key), path, "base");
        if (conf_get_duration_ms(ld, values[RECONNECT_BASE], key, 100, 3600 * 1000, &ms) == 0)
            uplink->reconnect_base_ms = (unsigned)ms;
    }
    if (conf_node_present(values[RECONNECT_CAP])) {
        conf_key_join(key, sizeof(key), path, "cap");
        if (conf_get_duration_ms(ld, values[RECONNECT_CAP], key, 100, 24 * 3600 * 1000, &ms) == 0)
            uplink->reconnect_cap_ms = (unsigned)ms;
        else
            cap_ok = false;
    }
    if (cap_ok && uplink->reconnect_cap_ms < uplink->reconnect_base_ms) {
        char base[32], cap[32];
        yaml_node_t *at = values[RECONNECT_CAP] ? values[RECONNECT_CAP] : values[RECONNECT_BASE];
        conf_format_ms(base, sizeof(base), uplink->reconnect_base_ms);
        conf_format_ms(cap, sizeof(cap), uplink->reconnect_cap_ms);
        conf_key_join(key, sizeof(key), path, values[RECONNECT_CAP] ? "cap" : "base");
        conf_report(ld, at->start_mark, key,
                    "cap (%s) is shorter than base (%s) (expected cap >= base)", cap, base);
    }
}

enum {
    SPOOL_DURABILITY,
    SPOOL_MAX_BYTES,
    SPOOL_MAX_AGE,
    SPOOL_OVERFLOW,
    SPOOL_COMMIT_INTERVAL,
    SPOOL_COMMIT_GAP,
    SPOOL_QOS0_OFFLINE,
    SPOOL_KEYS
};
static const char *const spool_keys[SPOOL_KEYS] = {
    [SPOOL_DURABILITY] = "durability",
    [SPOOL_MAX_BYTES] = "max_bytes",
    [SPOOL_MAX_AGE] = "max_age",
    [SPOOL_OVERFLOW] = "overflow",
    [SPOOL_COMMIT_INTERVAL] = "commit_interval",
    [SPOOL_COMMIT_GAP] = "commit_gap",
    [SPOOL_QOS0_OFFLINE] = "qos0_offline",
};

static void parse_spool(struct conf_loader *ld, yaml_node_t *node, const char *path,
                        struct conf_spool *spool)
{
    static const char *const durability[] = {"fsync", "none"};
    static const char *const overflow[] = {"block", "drop-oldest"};
    static const char *const qos0[] = {"drop", "spool"};
    yaml_node_t *values[SPOOL_KEYS] = {NULL};
    yaml_mark_t marks[SPOOL_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t number;
    int choice;

    if (!conf_walk_mapping(ld, node, path, spool_keys, SPOOL_KEYS, values, marks))
        return;
    if (conf_node_present(values[SPOOL_DURABILITY])) {
        conf_key_join(key, sizeof(key), path, "durability");
        if (conf_get_keyword(ld, values[SPOOL_DURABILITY], key, durability, 2, "fsync or none",
                             &choice) == 0)
            spool->durability = choice ? CONF_SPOOL_NONE : CONF_SPOOL_FSYNC;
    }
    if (conf_node_present(values[SPOOL_MAX_BYTES])) {
        conf_key_join(key, sizeof(key), path, "max_bytes");
        /* At least 64 KiB: a segment's worth, so the bound means something. */
        if (conf_get_size(ld, values[SPOOL_MAX_BYTES], key, 64 * 1024, 1ULL << 50, &number) == 0)
            spool->max_bytes = number;
    }
    if (conf_node_present(values[SPOOL_MAX_AGE])) {
        conf_key_join(key, sizeof(key), path, "max_age");
        if (conf_get_duration_ms(ld, values[SPOOL_MAX_AGE], key, 1000, 3650ULL * 24 * 3600 * 1000,
                                 &number) == 0)
            spool->max_age_ms = number;
    }
    if (conf_node_present(values[SPOOL_OVERFLOW])) {
        conf_key_join(key, sizeof(key), path, "overflow");
        if (conf_get_keyword(ld, values[SPOOL_OVERFLOW], key, overflow, 2, "block or drop-oldest",
                             &choice) == 0)
            spool->overflow = choice ? CONF_SPOOL_DROP_OLDEST : CONF_SPOOL_BLOCK;
    }
    if (conf_node_present(values[SPOOL_COMMIT_INTERVAL])) {
        conf_key_join(key, sizeof(key), path, "commit_interval");
        if (conf_get_duration_ms(ld, values[SPOOL_COMMIT_INTERVAL], key, 0, 1000, &number) == 0)
            spool->commit_interval_ms = (unsigned)number;
    }
    if (conf_node_present(values[SPOOL_COMMIT_GAP])) {
        conf_key_join(key, sizeof(key), path, "commit_gap");
        if (conf_get_duration_ms(ld, values[SPOOL_COMMIT_GAP], key, 0, 1000, &number) == 0)
            spool->commit_gap_ms = (unsigned)number;
    }
    if (conf_node_present(values[SPOOL_QOS0_OFFLINE])) {
        conf_key_join(key, sizeof(key), path, "qos0_offline");
        if (conf_get_keyword(ld, values[SPOOL_QOS0_OFFLINE], key, qos0, 2, "drop or spool",
                             &choice) == 0)
            spool->qos0_offline_spool = choice == 1;
    }
}

enum { RATE_MAX_MSGS, RATE_MAX_BYTES, RATE_KEYS };
static const char *const rate_keys[RATE_KEYS] = {
    [RATE_MAX_MSGS] = "max_msgs_per_s",
    [RATE_MAX_BYTES] = "max_bytes_per_s",
};

static void parse_rate(struct conf_loader *ld, yaml_node_t *node, const char *path,
                       struct conf_rate *rate)
{
    yaml_node_t *values[RATE_KEYS] = {NULL};
    yaml_mark_t marks[RATE_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t number;

    if (!conf_walk_mapping(ld, node, path, rate_keys, RATE_KEYS, values, marks))
        return;
    if (conf_node_present(values[RATE_MAX_MSGS])) {
        conf_key_join(key, sizeof(key), path, "max_msgs_per_s");
        if (conf_get_uint(ld, values[RATE_MAX_MSGS], key, "a message rate", 1, 1000000, &number) ==
            0)
            rate->max_msgs_per_s = (uint32_t)number;
    }
    if (conf_node_present(values[RATE_MAX_BYTES])) {
        conf_key_join(key, sizeof(key), path, "max_bytes_per_s");
        if (conf_get_size(ld, values[RATE_MAX_BYTES], key, 1024, 1ULL << 40, &number) == 0)
            rate->max_bytes_per_s = number;
    }
}

enum {
    UPLINK_NAME,
    UPLINK_PROFILE,
    UPLINK_HOST,
    UPLINK_PORT,
    UPLINK_CLIENT_ID,
    UPLINK_KEEPALIVE,
    UPLINK_CLEAN_SESSION,
    UPLINK_TLS,
    UPLINK_AUTH,
    UPLINK_RECONNECT,
    UPLINK_MAX_QUEUED,
    UPLINK_MAX_INFLIGHT,
    UPLINK_SPOOL,
    UPLINK_RATE,
    UPLINK_SECTIONS, /* then one key per profile, named after it, in the list's order */
    UPLINK_KEYS = UPLINK_SECTIONS + PROFILE_COUNT
};
static const char *const uplink_keys[UPLINK_KEYS] = {[UPLINK_NAME] = "name",
                                                     [UPLINK_PROFILE] = "profile",
                                                     [UPLINK_HOST] = "host",
                                                     [UPLINK_PORT] = "port",
                                                     [UPLINK_CLIENT_ID] = "client_id",
                                                     [UPLINK_KEEPALIVE] = "keepalive",
                                                     [UPLINK_CLEAN_SESSION] = "clean_session",
                                                     [UPLINK_TLS] = "tls",
                                                     [UPLINK_AUTH] = "auth",
                                                     [UPLINK_RECONNECT] = "reconnect",
                                                     [UPLINK_MAX_QUEUED] = "max_queued",
                                                     [UPLINK_MAX_INFLIGHT] = "max_inflight",
                                                     [UPLINK_SPOOL] = "spool",
                                                     [UPLINK_RATE] = "rate",
#define PROFILE_SECTION_KEY(name) #name,
                                                     PROFILE_LIST(PROFILE_SECTION_KEY)
#undef PROFILE_SECTION_KEY
};

static void parse_uplink_name(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *map,
                              const char *path, size_t index)
{
    static const char expected[] = "1-64 characters from A-Z a-z 0-9 _ -, e.g. \"cloud\"";
    struct conf_uplink *uplink = &ld->conf->uplinks[index];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    const char *bad;

    conf_key_join(key, sizeof(key), path, "name");
    if (!conf_node_present(node)) {
        conf_report(ld, node ? node->start_mark : map->start_mark, key, "missing (required: %s)",
                    expected);
        return;
    }
    if (conf_get_text(ld, node, key, expected, CONF_UPLINK_NAME_MAX, &uplink->name) < 0 ||
        uplink->name == NULL)
        return;
    bad = conf_first_bad_char(uplink->name, "_-");
    if (bad != NULL) {
        char what[48];
        conf_describe_char(what, sizeof(what), *bad);
        conf_report(ld, node->start_mark, key, "%s contains %s (expected %s)",
                    conf_quote(uplink->name, quoted, sizeof(quoted)), what, expected);
        free(uplink->name);
        uplink->name = NULL;
        return;
    }
    for (size_t j = 0; j < index; j++) {
        const struct conf_uplink *other = &ld->conf->uplinks[j];
        if (other->name != NULL && strcmp(other->name, uplink->name) == 0) {
            conf_report(
                ld, node->start_mark, key,
                "%s is already the name of uplinks[%zu] at %s:%zu:%zu (names must be unique)",
                conf_quote(uplink->name, quoted, sizeof(quoted)), j, ld->path,
                ld->uplink_name_marks[j].line + 1, ld->uplink_name_marks[j].column + 1);
            break;
        }
    }
    ld->uplink_name_marks[index] = node->start_mark;
}

/* uplinks[].<profile>: the uplink's own profile reads its section (also
 * when absent, for its defaults and rules); a section of another profile
 * is a mistake worth saying. */
static void parse_sections(struct conf_loader *ld, yaml_node_t *node, const char *path,
                           yaml_node_t *const *values, struct conf_uplink *uplink)
{
    const struct profile_spec *const *specs = profile_specs();
    char key[CONF_KEY_MAX];

    for (size_t i = 0; i < PROFILE_COUNT; i++) {
        const struct profile_spec *spec = specs[i];
        yaml_node_t *section = values[UPLINK_SECTIONS + i];

        if (spec != uplink->spec) {
            if (conf_node_present(section)) {
                conf_key_join(key, sizeof(key), path, spec->name);
                conf_report(ld, section->start_mark, key, "is only used with profile: %s",
                            spec->name);
            }
            continue;
        }
        if (spec->client_id_from != NULL && conf_node_present(values[UPLINK_CLIENT_ID])) {
            conf_key_join(key, sizeof(key), path, "client_id");
            conf_report(ld, values[UPLINK_CLIENT_ID]->start_mark, key,
                        "is set by profile %s (from %s.%s); remove it", spec->name, spec->name,
                        spec->client_id_from);
        }
        if (spec->conf_parse != NULL)
            spec->conf_parse(ld, conf_node_present(section) ? section : NULL, node, path, uplink);
    }
}

static void parse_uplink(struct conf_loader *ld, yaml_node_t *node, size_t index)
{
    yaml_node_t *values[UPLINK_KEYS] = {NULL};
    yaml_mark_t marks[UPLINK_KEYS];
    struct conf_uplink *uplink = &ld->conf->uplinks[index];
    char path[CONF_KEY_MAX];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    uint64_t number;

    conf_key_format(path, sizeof(path), "uplinks[%zu]", index);
    uplink->keepalive_s = DEFAULT_KEEPALIVE_S;
    uplink->clean_session = true;
    uplink->tls.enabled = true;
    uplink->tls.ca_system = true;
    uplink->auth.type = CONF_AUTH_NONE;
    uplink->reconnect_base_ms = DEFAULT_RECONNECT_BASE_MS;
    uplink->reconnect_cap_ms = DEFAULT_RECONNECT_CAP_MS;
    uplink->max_queued_messages = DEFAULT_MAX_QUEUED;
    uplink->max_inflight = DEFAULT_UPLINK_MAX_INFLIGHT;
    uplink->spool.durability = CONF_SPOOL_FSYNC;
    uplink->spool.max_bytes = 256ULL * 1024 * 1024;
    uplink->spool.overflow = CONF_SPOOL_BLOCK;
    uplink->spool.commit_interval_ms = 5;

    if (!conf_walk_mapping(ld, node, path, uplink_keys, UPLINK_KEYS, values, marks))
        return;

    parse_uplink_name(ld, values[UPLINK_NAME], node, path, index);

    conf_key_join(key, sizeof(key), path, "profile");
    if (conf_node_present(values[UPLINK_PROFILE])) {
        const char *text = conf_scalar_text(ld, values[UPLINK_PROFILE], key, "a profile name");
        if (text != NULL && profile_spec_find(text) == NULL) {
            const char *const *names = profile_spec_names();
            size_t count = 0;
            char known[128];
            while (names[count])
                count++;
            conf_join_names(known, sizeof(known), names, count);
            conf_report(ld, values[UPLINK_PROFILE]->start_mark, key,
                        "%s is not a known profile (expected one of: %s)",
                        conf_quote(text, quoted, sizeof(quoted)), known);
        } else if (text != NULL) {
            conf_set_string(ld, &uplink->profile, text);
        }
    } else {
        conf_set_string(ld, &uplink->profile, DEFAULT_PROFILE);
    }
    uplink->spec = uplink->profile ? profile_spec_find(uplink->profile) : NULL;

    conf_key_join(key, sizeof(key), path, "host");
    if (!conf_node_present(values[UPLINK_HOST])) {
        conf_report(ld, values[UPLINK_HOST] ? values[UPLINK_HOST]->start_mark : node->start_mark,
                    key,
                    "missing (required: the broker's DNS name or IP address, e.g. "
                    "\"broker.example.com\")");
    } else {
        const char *text =
            conf_scalar_text(ld, values[UPLINK_HOST], key, "a DNS name or IP address");
        char why[160];
        int rc = text ? conf_check_host(text, why, sizeof(why), &uplink->host) : 0;
        if (rc == -ENOMEM)
            ld->oom = true;
        else if (rc < 0)
            conf_report(ld, values[UPLINK_HOST]->start_mark, key,
                        "%s %s (expected a DNS name, an IPv4 address or an IPv6 address)",
                        conf_quote(text, quoted, sizeof(quoted)), why);
    }

    /* tls before port: the default port depends on tls.enabled. */
    if (conf_node_present(values[UPLINK_TLS])) {
        conf_key_join(key, sizeof(key), path, "tls");
        parse_tls(ld, values[UPLINK_TLS], key, &uplink->tls);
    }
    uplink->port = uplink->tls.enabled ? DEFAULT_PORT_TLS : DEFAULT_PORT_PLAIN;
    if (conf_node_present(values[UPLINK_PORT])) {
        conf_key_join(key, sizeof(key), path, "port");
        if (conf_get_uint(ld, values[UPLINK_PORT], key, "a port", 1, 65535, &number) == 0)
            uplink->port = (uint16_t)number;
    }

    if (conf_node_present(values[UPLINK_CLIENT_ID])) {
        conf_key_join(key, sizeof(key), path, "client_id");
        conf_get_text(ld, values[UPLINK_CLIENT_ID], key, "an MQTT client id", CONF_MQTT_STRING_MAX,
                      &uplink->client_id);
    }

    /* MQTT 3.1.1 §3.1.2.10: keep alive is a 16-bit number of seconds, 0
     * turns it off; libmosquitto refuses 1-4 s. */
    if (conf_node_present(values[UPLINK_KEEPALIVE])) {
        conf_key_join(key, sizeof(key), path, "keepalive");
        if (conf_get_duration_ms(ld, values[UPLINK_KEEPALIVE], key, 0, 65535 * 1000ULL, &number) ==
            0) {
            if (number % 1000 != 0 || (number > 0 && number < 5000))
                conf_report(
                    ld, values[UPLINK_KEEPALIVE]->start_mark, key,
                    "%s is not a valid keep alive (expected 0 to turn it off, or whole "
                    "seconds from 5s to 65535s)",
                    conf_quote(conf_node_text(values[UPLINK_KEEPALIVE]), quoted, sizeof(quoted)));
            else
                uplink->keepalive_s = (unsigned)(number / 1000);
        }
    }

    if (conf_node_present(values[UPLINK_CLEAN_SESSION])) {
        conf_key_join(key, sizeof(key), path, "clean_session");
        conf_get_bool(ld, values[UPLINK_CLEAN_SESSION], key, &uplink->clean_session);
    }

    if (conf_node_present(values[UPLINK_AUTH])) {
        conf_key_join(key, sizeof(key), path, "auth");
        parse_auth(ld, values[UPLINK_AUTH], key, uplink->spec, &uplink->auth);
    }

    if (conf_node_present(values[UPLINK_RECONNECT])) {
        conf_key_join(key, sizeof(key), path, "reconnect");
        parse_reconnect(ld, values[UPLINK_RECONNECT], key, uplink);
    }

    if (conf_node_present(values[UPLINK_MAX_QUEUED])) {
        conf_key_join(key, sizeof(key), path, "max_queued");
        if (conf_get_uint(ld, values[UPLINK_MAX_QUEUED], key, "a message count", 1, 10000000,
                          &number) == 0)
            uplink->max_queued_messages = (size_t)number;
    }

    if (conf_node_present(values[UPLINK_MAX_INFLIGHT])) {
        conf_key_join(key, sizeof(key), path, "max_inflight");
        if (conf_get_uint(ld, values[UPLINK_MAX_INFLIGHT], key, "a message count", 1,
                          MAX_UPLINK_MAX_INFLIGHT, &number) == 0)
            uplink->max_inflight = (unsigned)number;
    }

    if (conf_node_present(values[UPLINK_SPOOL])) {
        conf_key_join(key, sizeof(key), path, "spool");
        parse_spool(ld, values[UPLINK_SPOOL], key, &uplink->spool);
    }
    if (conf_node_present(values[UPLINK_RATE])) {
        conf_key_join(key, sizeof(key), path, "rate");
        parse_rate(ld, values[UPLINK_RATE], key, &uplink->rate);
    }

    parse_sections(ld, node, path, values, uplink);
}

static void parse_uplinks(struct conf_loader *ld, yaml_node_t *node)
{
    struct conf *conf = ld->conf;
    size_t count;

    if (!conf_expect_kind(ld, node, "uplinks", YAML_SEQUENCE_NODE,
                          "a sequence of uplinks (each item starts with \"- name: ...\")"))
        return;
    count = conf_sequence_length(node);
    if (count == 0)
        return;
    conf->uplinks = calloc(count, sizeof(*conf->uplinks));
    ld->uplink_name_marks = calloc(count, sizeof(*ld->uplink_name_marks));
    if (conf->uplinks == NULL || ld->uplink_name_marks == NULL) {
        ld->oom = true;
        return;
    }
    conf->uplink_count = count;
    for (size_t i = 0; i < count; i++)
        parse_uplink(ld, conf_sequence_item(ld, node, i), i);
}

enum { ROUTE_CHILDREN, ROUTE_UPLINKS, ROUTE_KEYS };
static const char *const route_keys[ROUTE_KEYS] = {
    [ROUTE_CHILDREN] = "children",
    [ROUTE_UPLINKS] = "uplinks",
};

static void parse_route_uplinks(struct conf_loader *ld, yaml_node_t *node, const char *key,
                                struct conf_route *route)
{
    struct conf *conf = ld->conf;
    size_t count;

    route->uplinks = conf_sequence_alloc(ld, node, key, "a sequence of uplink names, e.g. [cloud]",
                                         "is empty (expected at least one uplink name)",
                                         sizeof(*route->uplinks), &count);
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        char item_key[CONF_KEY_MAX];
        char quoted[CONF_QUOTE_MAX];
        const char *name;
        size_t found;

        conf_key_format(item_key, sizeof(item_key), "%s[%zu]", key, i);
        name = conf_scalar_text(ld, item, item_key, "an uplink name");
        if (name == NULL)
            continue;
        for (found = 0; found < conf->uplink_count; found++) {
            if (conf->uplinks[found].name != NULL && strcmp(conf->uplinks[found].name, name) == 0)
                break;
        }
        if (found == conf->uplink_count) {
            const char **names = calloc(conf->uplink_count + 1, sizeof(*names));
            size_t named = 0;
            const char *suggestion;
            char known[512];

            if (names == NULL) {
                ld->oom = true;
                return;
            }
            for (size_t j = 0; j < conf->uplink_count; j++) {
                if (conf->uplinks[j].name != NULL)
                    names[named++] = conf->uplinks[j].name;
            }
            suggestion = conf_closest(name, names, named);
            conf_join_names(known, sizeof(known), names, named);
            if (suggestion != NULL)
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (did you mean \"%s\"?)",
                            conf_quote(name, quoted, sizeof(quoted)), suggestion);
            else if (named > 0)
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (expected one of: %s)",
                            conf_quote(name, quoted, sizeof(quoted)), known);
            else
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (no uplinks are configured)",
                            conf_quote(name, quoted, sizeof(quoted)));
            free(names);
            continue;
        }
        for (size_t j = 0; j < route->uplink_count; j++) {
            if (route->uplinks[j] == found) {
                conf_report(ld, item->start_mark, item_key, "%s is listed twice in this route",
                            conf_quote(name, quoted, sizeof(quoted)));
                found = SIZE_MAX;
                break;
            }
        }
        if (found != SIZE_MAX)
            route->uplinks[route->uplink_count++] = found;
    }
}

static void parse_routes(struct conf_loader *ld, yaml_node_t *node)
{
    struct conf *conf = ld->conf;
    size_t count;

    conf->routes = conf_sequence_alloc(ld, node, "routes",
                                       "a sequence of routes (each item \"- children: GLOB\" with "
                                       "\"uplinks: [NAME]\")",
                                       NULL, sizeof(*conf->routes), &count);
    conf->route_count = count;
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        yaml_node_t *values[ROUTE_KEYS];
        yaml_mark_t marks[ROUTE_KEYS];
        char path[CONF_KEY_MAX];
        char key[CONF_KEY_MAX];

        conf_key_format(path, sizeof(path), "routes[%zu]", i);
        if (!conf_walk_mapping(ld, item, path, route_keys, ROUTE_KEYS, values, marks))
            continue;
        conf_key_join(key, sizeof(key), path, "children");
        if (!conf_node_present(values[ROUTE_CHILDREN]))
            conf_report(
                ld, values[ROUTE_CHILDREN] ? values[ROUTE_CHILDREN]->start_mark : item->start_mark,
                key, "missing (required: a glob of child ids, e.g. \"*\" or \"modbus-*\")");
        else
            conf_get_text(ld, values[ROUTE_CHILDREN], key,
                          "a glob of child ids, e.g. \"*\" or \"modbus-*\"", 1024,
                          &conf->routes[i].children);
        conf_key_join(key, sizeof(key), path, "uplinks");
        if (!conf_node_present(values[ROUTE_UPLINKS]))
            conf_report(
                ld, values[ROUTE_UPLINKS] ? values[ROUTE_UPLINKS]->start_mark : item->start_mark,
                key, "missing (required: the names of the uplinks, e.g. [cloud])");
        else
            parse_route_uplinks(ld, values[ROUTE_UPLINKS], key, &conf->routes[i]);
    }
}

enum {
    ROOT_GATEWAY,
    ROOT_LOCAL,
    ROOT_CONTROL,
    ROOT_LOG,
    ROOT_SHUTDOWN_TIMEOUT,
    ROOT_UPLINKS,
    ROOT_ROUTES,
    ROOT_KEYS
};
static const char *const root_keys[ROOT_KEYS] = {
    [ROOT_GATEWAY] = "gateway",
    [ROOT_LOCAL] = "local",
    [ROOT_CONTROL] = "control",
    [ROOT_LOG] = "log",
    [ROOT_SHUTDOWN_TIMEOUT] = "shutdown_timeout",
    [ROOT_UPLINKS] = "uplinks",
    [ROOT_ROUTES] = "routes",
};

static void apply_defaults(struct conf_loader *ld)
{
    struct conf *conf = ld->conf;

    if (conf->state_dir == NULL)
        conf_set_string(ld, &conf->state_dir, DEFAULT_STATE_DIR);
    if (conf->control_socket == NULL)
        conf_set_string(ld, &conf->control_socket, DEFAULT_CONTROL_SOCKET);
    if (conf->local.topic_prefix == NULL)
        conf_set_string(ld, &conf->local.topic_prefix, DEFAULT_LOCAL_PREFIX);
    if (conf->local.listen == NULL && conf->local.listen_count == 0)
        default_listen(ld);
    if (conf->gateway_id == NULL)
        return; /* already reported; nothing to derive from */
    for (size_t i = 0; i < conf->uplink_count; i++) {
        struct conf_uplink *uplink = &conf->uplinks[i];
        if (uplink->client_id == NULL)
            conf_set_string(ld, &uplink->client_id, conf->gateway_id);
    }
}

static void parse_root(struct conf_loader *ld, yaml_node_t *root)
{
    yaml_node_t *values[ROOT_KEYS];
    yaml_mark_t marks[ROOT_KEYS];
    struct conf *conf = ld->conf;
    uint64_t ms;

    if (!conf_walk_mapping(ld, root, "", root_keys, ROOT_KEYS, values, marks))
        return;
    parse_gateway(ld, values[ROOT_GATEWAY], root->start_mark);
    parse_local(ld, values[ROOT_LOCAL]);
    if (conf_node_present(values[ROOT_CONTROL]))
        parse_control(ld, values[ROOT_CONTROL]);
    if (conf_node_present(values[ROOT_LOG]))
        parse_log(ld, values[ROOT_LOG]);
    if (conf_node_present(values[ROOT_SHUTDOWN_TIMEOUT]) &&
        conf_get_duration_ms(ld, values[ROOT_SHUTDOWN_TIMEOUT], "shutdown_timeout", 0, 3600 * 1000,
                             &ms) == 0)
        conf->shutdown_timeout_ms = (unsigned)ms;
    if (conf_node_present(values[ROOT_UPLINKS]))
        parse_uplinks(ld, values[ROOT_UPLINKS]);
    /* After uplinks: routes refer to uplinks by name. */
    if (conf_node_present(values[ROOT_ROUTES]))
        parse_routes(ld, values[ROOT_ROUTES]);
    apply_defaults(ld);
}

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */

/* libyaml reports reader errors (bad UTF-8, control characters) by byte
 * offset only; turn that into line:column. */
static yaml_mark_t mark_from_offset(const char *text, size_t len, size_t offset)
{
    yaml_mark_t mark = {0};

    for (size_t i = 0; i < offset && i < len; i++) {
        if (text[i] == '\n') {
            mark.line++;
            mark.column = 0;
        } else {
            mark.column++;
        }
    }
    mark.index = offset;
    return mark;
}

static void report_syntax_error(struct conf_loader *ld, const yaml_parser_t *parser,
                                const char *text, size_t len)
{
    yaml_mark_t mark = parser->problem_mark;
    const char *problem = parser->problem ? parser->problem : "unknown error";

    if (parser->error == YAML_MEMORY_ERROR) {
        ld->oom = true;
        return;
    }
    if (parser->error == YAML_READER_ERROR) {
        mark = mark_from_offset(text, len, parser->problem_offset);
        conf_report(ld, mark, NULL, "YAML syntax error: %s (the file must be UTF-8 text)", problem);
    } else if (parser->context != NULL) {
        conf_report(ld, mark, NULL, "YAML syntax error: %s (%s at line %zu, column %zu)", problem,
                    parser->context, parser->context_mark.line + 1,
                    parser->context_mark.column + 1);
    } else {
        conf_report(ld, mark, NULL, "YAML syntax error: %s", problem);
    }
}

/* The directory of @path as an absolute path, for resolving relative paths
 * in the file. NULL when it cannot be determined (then paths are used as
 * written). */
static char *config_dir(const char *path)
{
    char *absolute = realpath(path, NULL);
    char *slash;

    if (absolute == NULL)
        return NULL;
    slash = strrchr(absolute, '/');
    if (slash == absolute)
        slash[1] = '\0';
    else if (slash != NULL)
        *slash = '\0';
    return absolute;
}

int conf_load(const char *path, struct conf **out, char **errors)
{
    struct conf_loader ld = {.path = path};
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_document_t extra;
    yaml_node_t *root;
    struct conf *conf = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc;

    *out = NULL;
    *errors = NULL;

    rc = util_read_file(path, CONF_MAX_FILE_SIZE, &text, &len);
    if (rc < 0) {
        char line[PATH_MAX + 128];
        if (rc == -ENOMEM)
            return -ENOMEM;
        snprintf(line, sizeof(line), "cannot read %s: %s", path,
                 rc == -EFBIG ? "file is larger than 1 MiB" : strerror(-rc));
        *errors = strdup(line);
        return *errors ? rc : -ENOMEM;
    }
    ld.dir = config_dir(path);

    conf = calloc(1, sizeof(*conf));
    if (conf == NULL) {
        rc = -ENOMEM;
        goto err_after_read;
    }
    conf->path = strdup(path);
    if (conf->path == NULL) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    conf->log_level = LOG_INFO;
    conf->shutdown_timeout_ms = DEFAULT_SHUTDOWN_MS;
    conf->local.socket_mode = DEFAULT_SOCKET_MODE;
    conf->local.max_packet_size = DEFAULT_MAX_PACKET_SIZE;
    conf->local.max_clients = DEFAULT_MAX_CLIENTS;
    conf->local.max_pending_connects = DEFAULT_MAX_PENDING_CONNECTS;
    conf->local.max_pending_per_uid = DEFAULT_MAX_PENDING_PER_UID;
    conf->local.connect_deadline_ms = DEFAULT_CONNECT_DEADLINE_MS;
    conf->local.max_inflight = DEFAULT_LOCAL_MAX_INFLIGHT;
    conf->local.max_queued = DEFAULT_LOCAL_MAX_QUEUED;
    conf->local.max_queued_bytes = DEFAULT_LOCAL_MAX_QUEUED_BYTES;
    ld.conf = conf;

    if (!yaml_parser_initialize(&parser)) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        report_syntax_error(&ld, &parser, text, len);
        goto finish_after_parser;
    }
    ld.doc = &doc;
    root = yaml_document_get_root_node(&doc);
    if (root == NULL) {
        yaml_mark_t start = {0};
        conf_report(
            &ld, start, NULL,
            "the file is empty (expected a mapping with at least \"gateway: { id: NAME }\")");
        goto finish_after_doc;
    }
    parse_root(&ld, root);

    /* A second document ("---") would be silently ignored; say so. */
    if (!yaml_parser_load(&parser, &extra)) {
        report_syntax_error(&ld, &parser, text, len);
    } else {
        yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
        if (extra_root != NULL)
            conf_report(&ld, extra.start_mark, NULL,
                        "a second YAML document starts here (expected a single document; remove "
                        "the \"---\" line and what follows, or merge it into the first)");
        yaml_document_delete(&extra);
    }

finish_after_doc:
    yaml_document_delete(&doc);
finish_after_parser:
    yaml_parser_delete(&parser);
    ld.doc = NULL;
    if (ld.oom) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    if (ld.error_count > 0) {
        if (ld.error_count > CONF_MAX_ERRORS) {
            char more[64];
            snprintf(more, sizeof(more), "... and %u more errors",
                     ld.error_count - CONF_MAX_ERRORS);
            conf_errors_append(&ld, more);
        }
        if (ld.oom) {
            rc = -ENOMEM;
            goto err_after_conf;
        }
        *errors = ld.errors;
        ld.errors = NULL;
        rc = -EINVAL;
        goto err_after_conf;
    }
    free(ld.uplink_name_marks);
    free(ld.dir);
    free(text);
    *out = conf;
    return 0;

err_after_conf:
    conf_free(conf);
err_after_read:
    free(ld.errors);
    free(ld.uplink_name_marks);
    free(ld.dir);
    free(text);
    return rc;
}

void conf_free(struct conf *conf)
{
    if (conf == NULL)
        return;
    for (size_t i = 0; i < conf->uplink_count; i++) {
        struct conf_uplink *uplink = &conf->uplinks[i];
        free(uplink->name);
        free(uplink->profile);
        free(uplink->host);
        free(uplink->client_id);
        free(uplink->tls.ca_file);
        free(uplink->tls.cert);
        free(uplink->tls.key);
        free(uplink->tls.ca_at);
        free(uplink->tls.cert_at);
        free(uplink->auth.username);
        conf_free_secret(uplink->auth.password);
        free(uplink->tls.alpn);
        free(uplink->auth.jwt.key);
        free(uplink->auth.jwt.passphrase_file);
        free(uplink->auth.jwt.pkcs11_module);
        EVP_PKEY_free(uplink->auth.jwt.private_key);
        free(uplink->auth.jwt.aud);
        free(uplink->auth.jwt.kid);
        for (size_t j = 0; j < uplink->auth.jwt.claim_count; j++) {
            free(uplink->auth.jwt.claims[j].name);
            free(uplink->auth.jwt.claims[j].value);
        }
        free(uplink->auth.jwt.claims);
        if (uplink->spec != NULL && uplink->spec->conf_free != NULL)
            uplink->spec->conf_free(uplink->section);
        free(uplink->cert_cn);
    }
    free(conf->uplinks);
    for (size_t i = 0; i < conf->route_count; i++) {
        free(conf->routes[i].children);
        free(conf->routes[i].uplinks);
    }
    free(conf->routes);
    for (size_t i = 0; i < conf->local.listen_count; i++)
        listen_free(&conf->local.listen[i]);
    free(conf->local.listen);
    free(conf->local.socket_group);
    free(conf->local.topic_prefix);
    free(conf->local.password_file);
    access_passwords_free(conf->local.passwords);
    for (size_t i = 0; i < conf->local.acl_count; i++) {
        struct conf_acl_rule *rule = &conf->local.acl[i];
        free(rule->user);
        conf_free_strings(rule->children, rule->children_count);
        conf_free_strings(rule->publish, rule->publish_count);
        conf_free_strings(rule->subscribe, rule->subscribe_count);
        conf_free_strings(rule->deny_publish, rule->deny_publish_count);
        conf_free_strings(rule->deny_subscribe, rule->deny_subscribe_count);
    }
    free(conf->local.acl);
    free(conf->control_socket);
    free(conf->state_dir);
    free(conf->gateway_id);
    free(conf->path);
    free(conf);
}

const struct conf_uplink *conf_uplink_find(const struct conf *conf, const char *name)
{
    if (conf == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < conf->uplink_count; i++) {
        if (conf->uplinks[i].name != NULL && strcmp(conf->uplinks[i].name, name) == 0)
            return &conf->uplinks[i];
    }
    return NULL;
}

/* The JWT settings, and the key itself: a key file replaced under the same
 * path is a new identity, so reload reconnects with a token it signed.
 * Public parts are compared (EVP_PKEY_eq), which works for token keys. */
static bool jwt_equal(const struct conf_jwt *a, const struct conf_jwt *b)
{
    if (a->claim_count != b->claim_count)
        return false;
    for (size_t i = 0; i < a->claim_count; i++) {
        if (!conf_str_equal(a->claims[i].name, b->claims[i].name) ||
            !conf_str_equal(a->claims[i].value, b->claims[i].value))
            return false;
    }
    if ((a->private_key == NULL) != (b->private_key == NULL) ||
        (a->private_key != NULL && EVP_PKEY_eq(a->private_key, b->private_key) != 1))
        return false;
    return a->alg == b->alg && conf_str_equal(a->key, b->key) &&
           conf_str_equal(a->passphrase_file, b->passphrase_file) &&
           conf_str_equal(a->pkcs11_module, b->pkcs11_module) && a->lifetime_s == b->lifetime_s &&
           a->max_lifetime_s == b->max_lifetime_s && a->skew_s == b->skew_s &&
           a->refresh_percent == b->refresh_percent && conf_str_equal(a->aud, b->aud) &&
           a->kid_mode == b->kid_mode && conf_str_equal(a->kid, b->kid) &&
           a->clock_check == b->clock_check;
}

/* The profile's section, as far as it goes into CONNECT (same profile). */
static bool section_equal(const struct conf_uplink *a, const struct conf_uplink *b)
{
    if (a->spec == NULL || a->spec->conf_session_equal == NULL)
        return true;
    if (a->section == NULL || b->section == NULL)
        return a->section == b->section;
    return a->spec->conf_session_equal(a->section, b->section);
}

/* Only what goes into the connection: the broker address, TLS, CONNECT
 * fields. reconnect.*, max_queued and generic.* are read by the uplink and
 * the router while running and change without a reconnect. File paths are
 * compared, not file contents: a renewed certificate under the same path is
 * picked up on the next reconnect, not forced by reload. The password is
 * compared by value, so a rotated password_file does force a reconnect. */
bool conf_uplink_equal(const struct conf_uplink *a, const struct conf_uplink *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return conf_str_equal(a->name, b->name) && conf_str_equal(a->profile, b->profile) &&
           conf_str_equal(a->host, b->host) && a->port == b->port &&
           conf_str_equal(a->client_id, b->client_id) && a->keepalive_s == b->keepalive_s &&
           a->clean_session == b->clean_session && a->tls.enabled == b->tls.enabled &&
           a->tls.ca_system == b->tls.ca_system && conf_str_equal(a->tls.ca_file, b->tls.ca_file) &&
           conf_str_equal(a->tls.cert, b->tls.cert) && conf_str_equal(a->tls.key, b->tls.key) &&
           a->auth.type == b->auth.type && conf_str_equal(a->auth.username, b->auth.username) &&
           conf_str_equal(a->auth.password, b->auth.password) &&
           a->tls.min_version == b->tls.min_version && conf_str_equal(a->tls.alpn, b->tls.alpn) &&
           a->tls.insecure == b->tls.insecure && jwt_equal(&a->auth.jwt, &b->auth.jwt) &&
           a->spec == b->spec && section_equal(a, b);
}
