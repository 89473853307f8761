/* gcp/section.c - uplinks[].gcp: the project, region, registry and device
 * that make the client id, and the gateway's children (docs/
 * configuration.md, "gcp"). */
#include "profiles/gcp/section.h"

#include <stdlib.h>
#include <string.h>

#include "conf_walk.h"
#include "profiles/gcp/rules.h"

#define GCP_DEFAULT_ATTACH_IDLE_MS (30ULL * 60 * 1000)

enum {
    GCP_PROJECT,
    GCP_REGION,
    GCP_REGISTRY,
    GCP_DEVICE,
    GCP_GATEWAY,
    GCP_ATTACH_IDLE,
    GCP_CHILD_KEY,
    GCP_KEYS
};
static const char *const gcp_keys[GCP_KEYS] = {
    [GCP_PROJECT] = "project",     [GCP_REGION] = "region",   [GCP_REGISTRY] = "registry",
    [GCP_DEVICE] = "device",       [GCP_GATEWAY] = "gateway", [GCP_ATTACH_IDLE] = "attach_idle",
    [GCP_CHILD_KEY] = "child_key",
};

/* A GCP device id (gcp_id_check) or, for @what, a project/region/registry
 * name: they become levels of the client id, so no '/'. */
static void get_gcp_name(struct conf_loader *ld, yaml_node_t *node, const char *key, bool device,
                         const char *expected, char **dst)
{
    char quoted[CONF_QUOTE_MAX];
    char *value = NULL;
    const char *why = NULL;

    if (conf_get_text(ld, node, key, expected, device ? GCP_ID_MAX : 255, &value) < 0 ||
        value == NULL)
        return;
    if (device)
        why = gcp_id_check(value);
    else if (conf_first_bad_char(value, "-_.:") != NULL)
        why = "contains a character other than A-Z a-z 0-9 - _ . : (it becomes a level of the "
              "client id projects/<project>/locations/<region>/registries/<registry>/...)";
    if (why) {
        conf_report(ld, node->start_mark, key, "%s: %s (expected %s)",
                    conf_quote(value, quoted, sizeof(quoted)), why, expected);
        free(value);
        return;
    }
    free(*dst);
    *dst = value;
}

void gcp_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                       const char *uplink_path, struct conf_uplink *uplink)
{
    struct conf_gcp *gcp = calloc(1, sizeof(*gcp));
    yaml_node_t *values[GCP_KEYS] = {NULL};
    yaml_mark_t marks[GCP_KEYS];
    char path[CONF_KEY_MAX];
    char k[CONF_KEY_MAX];
    const char *gateway_id = ld->conf->gateway_id;

    if (gcp == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = gcp;
    conf_key_join(path, sizeof(path), uplink_path, "gcp");
    gcp->attach_idle_ms = GCP_DEFAULT_ATTACH_IDLE_MS;
    if (node == NULL) {
        conf_report(ld, uplink_node->start_mark, path,
                    "missing (required with profile gcp: {project, region, registry})");
        return;
    }
    if (!conf_walk_mapping(ld, node, path, gcp_keys, GCP_KEYS, values, marks))
        return;
    static const char *const required[] = {"the Google Cloud project id",
                                           "the cloud region, e.g. us-central1",
                                           "the device registry id"};
    char **dst[] = {&gcp->project, &gcp->region, &gcp->registry};
    for (int i = GCP_PROJECT; i <= GCP_REGISTRY; i++) {
        conf_key_join(k, sizeof(k), path, gcp_keys[i]);
        if (conf_node_present(values[i]))
            get_gcp_name(ld, values[i], k, false, required[i], dst[i]);
        else
            conf_report(ld, node->start_mark, k, "missing (required: %s)", required[i]);
    }
    conf_key_join(k, sizeof(k), path, "device");
    if (conf_node_present(values[GCP_DEVICE])) {
        get_gcp_name(ld, values[GCP_DEVICE], k, true, "the gateway's GCP device id", &gcp->device);
    } else if (gateway_id != NULL) {
        const char *why = gcp_id_check(gateway_id);
        if (why)
            conf_report(ld, node->start_mark, k,
                        "missing, and gateway.id \"%s\" is not a GCP device id: %s (set %s)",
                        gateway_id, why, k);
        else
            conf_set_string(ld, &gcp->device, gateway_id);
    }
    if (conf_node_present(values[GCP_GATEWAY])) {
        conf_key_join(k, sizeof(k), path, "gateway");
        conf_get_bool(ld, values[GCP_GATEWAY], k, &gcp->gateway);
    }
    if (conf_node_present(values[GCP_ATTACH_IDLE])) {
        conf_key_join(k, sizeof(k), path, "attach_idle");
        conf_get_duration_ms(ld, values[GCP_ATTACH_IDLE], k, 1000, 7 * 24 * 3600 * 1000ULL,
                             &gcp->attach_idle_ms);
    }
    if (conf_node_present(values[GCP_CHILD_KEY])) {
        conf_key_join(k, sizeof(k), path, "child_key");
        if (conf_get_text(ld, values[GCP_CHILD_KEY], k,
                          "a key file pattern with %c for the child id, e.g. "
                          "/etc/uplinkd/devices/%c.pem",
                          4000, &gcp->child_key) == 0 &&
            gcp->child_key != NULL && strstr(gcp->child_key, "%c") == NULL)
            conf_report(ld, values[GCP_CHILD_KEY]->start_mark, k,
                        "has no %%c (expected a key file pattern with %%c for the child id, e.g. "
                        "/etc/uplinkd/devices/%%c.pem)");
        else if (gcp->child_key != NULL && gcp->child_key[0] != '/')
            conf_report(ld, values[GCP_CHILD_KEY]->start_mark, k,
                        "must be an absolute path (expected e.g. /etc/uplinkd/devices/%%c.pem)");
    }
    if ((values[GCP_ATTACH_IDLE] || values[GCP_CHILD_KEY]) && !gcp->gateway) {
        conf_key_join(k, sizeof(k), path, values[GCP_CHILD_KEY] ? "child_key" : "attach_idle");
        conf_report(
            ld,
            (values[GCP_CHILD_KEY] ? values[GCP_CHILD_KEY] : values[GCP_ATTACH_IDLE])->start_mark,
            k, "is only used with gateway: true");
    }
    if (!conf_check_jwt_cloud(ld, uplink_node, uplink_path, uplink, "GCP IoT Core"))
        return;
    /* "Using JSON Web Tokens": aud is the project id. */
    if (uplink->auth.jwt.aud == NULL && gcp->project != NULL)
        conf_set_string(ld, &uplink->auth.jwt.aud, gcp->project);
    /* GCP quota: 100 incoming messages per second per connection, all
     * attached children together; the uplink's token bucket keeps to it.
     * Only rate.max_msgs_per_s replaces the default (parse_rate() ran
     * already and takes no 0): a rate section with max_bytes_per_s alone
     * must not lift it. */
    if (uplink->rate.max_msgs_per_s == 0)
        uplink->rate.max_msgs_per_s = GCP_MSGS_PER_S;
}

void gcp_section_free(void *section)
{
    struct conf_gcp *gcp = section;

    if (gcp == NULL)
        return;
    free(gcp->project);
    free(gcp->region);
    free(gcp->registry);
    free(gcp->device);
    free(gcp->child_key);
    free(gcp);
}

bool gcp_section_equal(const void *section_a, const void *section_b)
{
    const struct conf_gcp *a = section_a, *b = section_b;

    return conf_str_equal(a->project, b->project) && conf_str_equal(a->region, b->region) &&
           conf_str_equal(a->registry, b->registry) && conf_str_equal(a->device, b->device) &&
           a->gateway == b->gateway;
}
