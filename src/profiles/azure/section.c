/* azure/section.c - uplinks[].azure: the hub, the device, and its key for
 * SAS tokens (docs/configuration.md, "azure"). */
#include "profiles/azure/section.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "azure.h"
#include "conf_walk.h"
#include "keys.h"
#include "mapping.h"

enum {
    AZURE_HUB,
    AZURE_DEVICE_ID,
    AZURE_KEY_FILE,
    AZURE_POLICY,
    AZURE_TOKEN_LIFETIME,
    AZURE_API,
    AZURE_CHILD_KEY,
    AZURE_GROUP_KEY_FILE,
    AZURE_SESSION_IDLE,
    AZURE_KEYS
};
static const char *const azure_keys[AZURE_KEYS] = {
    [AZURE_HUB] = "hub",
    [AZURE_DEVICE_ID] = "device_id",
    [AZURE_KEY_FILE] = "key_file",
    [AZURE_POLICY] = "policy",
    [AZURE_TOKEN_LIFETIME] = "token_lifetime",
    [AZURE_API] = "api_version",
    [AZURE_CHILD_KEY] = "child_key",
    [AZURE_GROUP_KEY_FILE] = "group_key_file",
    [AZURE_SESSION_IDLE] = "session_idle",
};

#define AZURE_DEFAULT_TOKEN_LIFE_MS   (3600ULL * 1000)
#define AZURE_DEFAULT_SESSION_IDLE_MS (10ULL * 60 * 1000)

static void get_device_id(struct conf_loader *ld, yaml_node_t *node, const char *path,
                          struct conf_azure *azure)
{
    static const char expected[] = "the IoT Hub device id (its MQTT client id)";
    char k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];

    conf_key_join(k, sizeof(k), path, "device_id");
    if (!conf_node_present(node)) {
        if (ld->conf->gateway_id != NULL)
            conf_set_string(ld, &azure->device_id, ld->conf->gateway_id);
        return;
    }
    if (conf_get_text(ld, node, k, expected, AZURE_DEVICE_ID_MAX, &azure->device_id) < 0 ||
        azure->device_id == NULL)
        return;
    const char *why = azure_device_id_check(azure->device_id);
    if (why == NULL)
        why = mapping_child_check(azure->device_id, strlen(azure->device_id));
    if (why) {
        conf_report(ld, node->start_mark, k, "%s: %s (expected %s)",
                    conf_quote(azure->device_id, quoted, sizeof(quoted)), why, expected);
        free(azure->device_id);
        azure->device_id = NULL;
    }
}

/* The credentials: a device key for SAS tokens, or X.509 through tls; the
 * profile makes the user name and password itself. */
static void check_credentials(struct conf_loader *ld, yaml_node_t *uplink_node,
                              yaml_node_t *key_node, const char *uplink_path,
                              const struct conf_uplink *uplink, const struct conf_azure *azure)
{
    char k[CONF_KEY_MAX];

    if (uplink->auth.type != CONF_AUTH_NONE) {
        conf_key_join(k, sizeof(k), uplink_path, "auth");
        conf_report(ld, uplink_node->start_mark, k,
                    "profile azure makes its own user name and SAS token: remove auth and set "
                    "azure.key_file (or tls.cert and tls.key for X.509)");
    }
    if (!uplink->tls.enabled) {
        conf_key_join(k, sizeof(k), uplink_path, "tls.enabled");
        conf_report(ld, uplink_node->start_mark, k,
                    "IoT Hub accepts MQTT only over TLS (port 8883, or 443 with WebSockets): "
                    "remove tls.enabled: false");
    }
    if (azure->key_file == NULL && uplink->tls.cert == NULL) {
        conf_key_join(k, sizeof(k), uplink_path, "azure.key_file");
        conf_report(ld, uplink_node->start_mark, k,
                    "missing: IoT Hub needs the device's key (a file holding its primary key, "
                    "base64) or an X.509 certificate (tls.cert and tls.key)");
    } else if (azure->key_file != NULL && uplink->tls.cert != NULL) {
        conf_key_join(k, sizeof(k), uplink_path, "azure.key_file");
        conf_report(ld, key_node ? key_node->start_mark : uplink_node->start_mark, k,
                    "set either azure.key_file (SAS token) or tls.cert (X.509), not both");
    }
}

/* Children's keys: a file per child, or one group enrolment key they are
 * derived from; either turns on per-device sessions. */
static void get_child_keys(struct conf_loader *ld, yaml_node_t *const *values, const char *path,
                           struct conf_azure *azure)
{
    char k[CONF_KEY_MAX];
    uint8_t key[AZURE_KEY_MAX];
    char why[256];

    if (conf_node_present(values[AZURE_CHILD_KEY])) {
        conf_key_join(k, sizeof(k), path, "child_key");
        conf_get_file_pattern(ld, values[AZURE_CHILD_KEY], k, "/etc/uplinkd/azure/%c.key",
                              &azure->child_key);
    }
    if (conf_node_present(values[AZURE_GROUP_KEY_FILE])) {
        conf_key_join(k, sizeof(k), path, "group_key_file");
        if (conf_node_present(values[AZURE_CHILD_KEY]))
            conf_report(ld, values[AZURE_GROUP_KEY_FILE]->start_mark, k,
                        "set either azure.child_key (a key file per child) or "
                        "azure.group_key_file (keys derived from a group enrolment key), not "
                        "both");
        else if (conf_get_readable_file(ld, values[AZURE_GROUP_KEY_FILE], k,
                                        "a readable file holding the group enrolment's primary "
                                        "key (base64)",
                                        &azure->group_key_file) == 0 &&
                 azure_key_read(azure->group_key_file, key, why, sizeof(why)) < 0)
            conf_report(ld, values[AZURE_GROUP_KEY_FILE]->start_mark, k, "%s", why);
        OPENSSL_cleanse(key, sizeof(key));
    }
    if (conf_node_present(values[AZURE_SESSION_IDLE])) {
        conf_key_join(k, sizeof(k), path, "session_idle");
        if (azure->child_key == NULL && azure->group_key_file == NULL)
            conf_report(ld, values[AZURE_SESSION_IDLE]->start_mark, k,
                        "is only used with child_key or group_key_file (per-device sessions)");
        else
            conf_get_duration_ms(ld, values[AZURE_SESSION_IDLE], k, 1000, 7 * 24 * 3600 * 1000ULL,
                                 &azure->session_idle_ms);
    }
}

void azure_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                         const char *uplink_path, struct conf_uplink *uplink)
{
    struct conf_azure *azure = calloc(1, sizeof(*azure));
    yaml_node_t *values[AZURE_KEYS] = {NULL};
    yaml_mark_t marks[AZURE_KEYS];
    char path[CONF_KEY_MAX], k[CONF_KEY_MAX], why[256];

    if (azure == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = azure;
    conf_key_join(path, sizeof(path), uplink_path, "azure");
    azure->token_life_ms = AZURE_DEFAULT_TOKEN_LIFE_MS;
    azure->session_idle_ms = AZURE_DEFAULT_SESSION_IDLE_MS;
    if (node != NULL && !conf_walk_mapping(ld, node, path, azure_keys, AZURE_KEYS, values, marks))
        return;
    conf_key_join(k, sizeof(k), path, "hub");
    if (conf_node_present(values[AZURE_HUB])) {
        char *text = NULL;
        if (conf_get_text(ld, values[AZURE_HUB], k, "the hub's host name, <name>.azure-devices.net",
                          253, &text) == 0 &&
            text != NULL && conf_check_host(text, why, sizeof(why), &azure->hub) < 0)
            conf_report(ld, values[AZURE_HUB]->start_mark, k, "%s", why);
        free(text);
    } else if (uplink->host != NULL) {
        conf_set_string(ld, &azure->hub, uplink->host);
    }
    get_device_id(ld, values[AZURE_DEVICE_ID], path, azure);
    if (conf_node_present(values[AZURE_KEY_FILE])) {
        conf_key_join(k, sizeof(k), path, "key_file");
        const char *text = values[AZURE_KEY_FILE]->type == YAML_SCALAR_NODE
                               ? conf_node_text(values[AZURE_KEY_FILE])
                               : NULL;
        if (text && keys_is_uri(text))
            /* The key inside a PKCS#11 token (uplinkctl secret import): the
             * token signs, the PIN comes with the URI. */
            conf_get_text(ld, values[AZURE_KEY_FILE], k,
                          "a pkcs11: URI of the device key in a token", 4000, &azure->key_file);
        else
            conf_get_readable_file(ld, values[AZURE_KEY_FILE], k,
                                   "a readable file holding the device's primary key (base64), or "
                                   "a pkcs11: URI of it inside a token",
                                   &azure->key_file);
    }
    if (conf_node_present(values[AZURE_POLICY])) {
        conf_key_join(k, sizeof(k), path, "policy");
        conf_get_text(ld, values[AZURE_POLICY], k, "a shared access policy name", 255,
                      &azure->policy);
    }
    if (conf_node_present(values[AZURE_TOKEN_LIFETIME])) {
        conf_key_join(k, sizeof(k), path, "token_lifetime");
        conf_get_duration_ms(ld, values[AZURE_TOKEN_LIFETIME], k, 10 * 1000,
                             365ULL * 24 * 3600 * 1000, &azure->token_life_ms);
    }
    conf_key_join(k, sizeof(k), path, "api_version");
    if (conf_node_present(values[AZURE_API]))
        conf_get_text(ld, values[AZURE_API], k, "an IoT Hub API version such as " AZURE_API_VERSION,
                      32, &azure->api_version);
    else
        conf_set_string(ld, &azure->api_version, AZURE_API_VERSION);
    get_child_keys(ld, values, path, azure);
    check_credentials(ld, uplink_node, values[AZURE_KEY_FILE], uplink_path, uplink, azure);
}

void azure_section_free(void *section)
{
    struct conf_azure *azure = section;

    if (azure == NULL)
        return;
    free(azure->hub);
    free(azure->device_id);
    free(azure->key_file);
    free(azure->policy);
    free(azure->api_version);
    free(azure->child_key);
    free(azure->group_key_file);
    free(azure);
}

bool azure_section_equal(const void *section_a, const void *section_b)
{
    const struct conf_azure *a = section_a, *b = section_b;

    return conf_str_equal(a->hub, b->hub) && conf_str_equal(a->device_id, b->device_id) &&
           conf_str_equal(a->key_file, b->key_file) && conf_str_equal(a->policy, b->policy) &&
           a->token_life_ms == b->token_life_ms && conf_str_equal(a->api_version, b->api_version) &&
           a->child == b->child &&
           (!a->child || (conf_str_equal(a->child_key, b->child_key) &&
                          conf_str_equal(a->group_key_file, b->group_key_file)));
}
