/* aws/section.h - uplinks[].aws: the settings of profile aws.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_aws (spec.c), and nothing outside this folder (and
 * its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_AWS_SECTION_H
#define UPLINKD_PROFILES_AWS_SECTION_H

#include <stdbool.h>
#include <stddef.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* uplinks[].aws (profile aws). */
struct conf_aws {
    char *thing;    /* thing: the gateway's thing name, default gateway.id; also the
                           client id unless uplinks[].client_id says otherwise */
    char **shadows; /* shadows: named shadows of the thing fetched on every connect */
    size_t shadow_count;
    bool jobs; /* jobs: take part in AWS IoT Jobs (default true) */
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_aws *aws_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].aws (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path (TLS, ALPN on 443,
 * the in-flight window); free it. */
void aws_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                       struct yaml_node_s *uplink_node, const char *uplink_path,
                       struct conf_uplink *uplink);
void aws_section_free(void *section);

/* What of the section changes the connection: reload reconnects when false. */
bool aws_section_equal(const void *a, const void *b);

#endif
