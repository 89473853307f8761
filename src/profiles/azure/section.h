/* azure/section.h - uplinks[].azure: the settings of profile azure.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_azure (spec.c), and nothing outside this folder (and
 * its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_AZURE_SECTION_H
#define UPLINKD_PROFILES_AZURE_SECTION_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* uplinks[].azure (profile azure). */
struct conf_azure {
    char *hub;              /* hub: <name>.azure-devices.net, default uplinks[].host */
    char *device_id;        /* device_id: the IoT Hub device (= client id), default gateway.id */
    char *key_file;         /* key_file: the device's key (base64), for SAS tokens; NULL =
                               X.509 (tls.cert and tls.key) */
    char *policy;           /* policy: a shared access policy name (skn=), NULL = device key */
    uint64_t token_life_ms; /* token_lifetime: how long a SAS token is valid, default 1h */
    char *api_version;      /* api_version: default AZURE_API_VERSION */
    /* Children: IoT Hub takes one device per connection, so each child is a
     * session of its own (child_sessions.h), with its key from one of: */
    char *child_key;          /* child_key: a key file pattern, "%c" = the child id */
    char *group_key_file;     /* group_key_file: a group enrolment key; a child's key is
                                 HMAC-SHA256(group key, child id) */
    uint64_t session_idle_ms; /* session_idle: close a child's session unused this long,
                                 default 10m */
    /* Not from YAML: this is a child session's copy (azure.c), device_id the
     * child, whose key comes from child_key or group_key_file. */
    bool child;
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_azure *azure_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].azure (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path; free it. */
void azure_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                         struct yaml_node_s *uplink_node, const char *uplink_path,
                         struct conf_uplink *uplink);
void azure_section_free(void *section);

/* What of the section goes into CONNECT: reload reconnects when false. */
bool azure_section_equal(const void *a, const void *b);

#endif
