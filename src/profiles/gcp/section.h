/* gcp/section.h - uplinks[].gcp: the settings of profile gcp.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_gcp (spec.c), and nothing outside this folder
 * (and its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_GCP_SECTION_H
#define UPLINKD_PROFILES_GCP_SECTION_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* uplinks[].gcp (profile gcp): Google Cloud IoT Core / ClearBlade IoT Core.
 * The client id is projects/<project>/locations/<region>/registries/
 * <registry>/devices/<device>. */
struct conf_gcp {
    char *project;           /* project: required; also the default auth.aud */
    char *region;            /* region: required, e.g. us-central1 */
    char *registry;          /* registry: required */
    char *device;            /* device: this gateway's device id, default gateway.id */
    bool gateway;            /* gateway: attach children (default false: the device alone) */
    uint64_t attach_idle_ms; /* attach_idle: detach a child unused this long, default 30m */
    char *child_key;         /* child_key: a child's own key file, "%c" = the child id;
                                NULL = attach with {} (the gateway's auth) */
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_gcp *gcp_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].gcp (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path; free it. */
void gcp_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                       struct yaml_node_s *uplink_node, const char *uplink_path,
                       struct conf_uplink *uplink);
void gcp_section_free(void *section);

/* What of the section goes into CONNECT: reload reconnects when false. */
bool gcp_section_equal(const void *a, const void *b);

#endif
