/* akenza/section.c - uplinks[].akenza: the device id, and per-device sessions
 * for children with their own keys (docs/configuration.md, "akenza"). */
#include "profiles/akenza/section.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf_walk.h"
#include "mapping.h"

enum { AKENZA_DEVICE, AKENZA_CHILD_KEY, AKENZA_SESSION_IDLE, AKENZA_KEYS };
static const char *const akenza_keys[AKENZA_KEYS] = {
    [AKENZA_DEVICE] = "device",
    [AKENZA_CHILD_KEY] = "child_key",
    [AKENZA_SESSION_IDLE] = "session_idle",
};

#define AKENZA_DEFAULT_SESSION_IDLE_MS (10ULL * 60 * 1000)

#define AKENZA_AUD_PREFIX "https://akenza.io/devices/"

void akenza_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                          const char *uplink_path, struct conf_uplink *uplink)
{
    static const char expected[] = "the akenza device id (its MQTT client id)";
    struct conf_akenza *akenza = calloc(1, sizeof(*akenza));
    struct conf_jwt *jwt = &uplink->auth.jwt;
    yaml_node_t *values[AKENZA_KEYS] = {NULL};
    yaml_mark_t marks[AKENZA_KEYS];
    char path[CONF_KEY_MAX], k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];

    if (akenza == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = akenza;
    conf_key_join(path, sizeof(path), uplink_path, "akenza");
    akenza->session_idle_ms = AKENZA_DEFAULT_SESSION_IDLE_MS;
    if (node != NULL && !conf_walk_mapping(ld, node, path, akenza_keys, AKENZA_KEYS, values, marks))
        return;
    if (conf_node_present(values[AKENZA_CHILD_KEY])) {
        conf_key_join(k, sizeof(k), path, "child_key");
        conf_get_file_pattern(ld, values[AKENZA_CHILD_KEY], k, "/etc/uplinkd/devices/%c.key",
                              &akenza->child_key);
    }
    if (conf_node_present(values[AKENZA_SESSION_IDLE])) {
        conf_key_join(k, sizeof(k), path, "session_idle");
        if (akenza->child_key == NULL)
            conf_report(ld, values[AKENZA_SESSION_IDLE]->start_mark, k,
                        "is only used with child_key (per-device sessions)");
        else
            conf_get_duration_ms(ld, values[AKENZA_SESSION_IDLE], k, 1000, 7 * 24 * 3600 * 1000ULL,
                                 &akenza->session_idle_ms);
    }
    conf_key_join(k, sizeof(k), path, "device");
    if (conf_node_present(values[AKENZA_DEVICE])) {
        if (conf_get_text(ld, values[AKENZA_DEVICE], k, expected, MAPPING_CHILD_MAX,
                          &akenza->device) == 0 &&
            akenza->device != NULL) {
            const char *why = mapping_child_check(akenza->device, strlen(akenza->device));
            if (why) {
                conf_report(ld, values[AKENZA_DEVICE]->start_mark, k, "%s: %s (expected %s)",
                            conf_quote(akenza->device, quoted, sizeof(quoted)), why, expected);
                free(akenza->device);
                akenza->device = NULL;
            }
        }
    } else if (ld->conf->gateway_id != NULL) {
        conf_set_string(ld, &akenza->device, ld->conf->gateway_id);
    }
    if (!conf_check_jwt_cloud(ld, uplink_node, uplink_path, uplink, "akenza") ||
        akenza->device == NULL)
        return;
    /* akenza "MQTT device connectivity" (JWT): aud https://akenza.io/devices/
     * <device id> (older docs: the bare id, so auth.aud may say so), sub =
     * the device id, kid = hex SHA-256 of the public key's DER. */
    if (jwt->aud == NULL) {
        size_t len = strlen(AKENZA_AUD_PREFIX) + strlen(akenza->device) + 1;
        jwt->aud = malloc(len);
        if (jwt->aud == NULL) {
            ld->oom = true;
            return;
        }
        snprintf(jwt->aud, len, "%s%s", AKENZA_AUD_PREFIX, akenza->device);
    }
    if (jwt->kid_mode == JWT_KID_NONE)
        jwt->kid_mode = JWT_KID_FINGERPRINT;
    for (size_t i = 0; i < jwt->claim_count; i++) {
        if (strcmp(jwt->claims[i].name, "sub") == 0)
            return; /* the operator's own */
    }
    struct conf_jwt_claim *grown = realloc(jwt->claims, (jwt->claim_count + 1) * sizeof(*grown));
    if (grown == NULL) {
        ld->oom = true;
        return;
    }
    jwt->claims = grown;
    grown[jwt->claim_count].name = strdup("sub");
    grown[jwt->claim_count].value = strdup(akenza->device);
    if (grown[jwt->claim_count].name == NULL || grown[jwt->claim_count].value == NULL) {
        free(grown[jwt->claim_count].name);
        free(grown[jwt->claim_count].value);
        ld->oom = true;
        return;
    }
    jwt->claim_count++;
}

void akenza_section_free(void *section)
{
    struct conf_akenza *akenza = section;

    if (akenza == NULL)
        return;
    free(akenza->device);
    free(akenza->child_key);
    free(akenza);
}

bool akenza_section_equal(const void *section_a, const void *section_b)
{
    const struct conf_akenza *a = section_a, *b = section_b;

    return conf_str_equal(a->device, b->device);
}
