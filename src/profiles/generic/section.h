/* generic/section.h - uplinks[].generic: the topic mapping of profile generic.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_generic (spec.c), and nothing outside this folder
 * (and its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_GENERIC_SECTION_H
#define UPLINKD_PROFILES_GENERIC_SECTION_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"
#include "mapping.h" /* enum mapping_channel */

struct conf_loader;
struct yaml_node_s;

/* Topic mapping of the generic profile: dev/<child>/<channel>[/<sub>] ->
 * <topic_prefix>/<child>/<channel>[/<sub>]. */
struct conf_generic_rule {
    enum mapping_channel channel; /* local: up telemetry|state, down config|commands */
    char *cloud; /* cloud: topic template; levels may be {child} and (last) {sub} */
    int qos;     /* qos: 0|1|2; -1 = up: as published locally, down: 1 */
};

struct conf_generic {
    char *topic_prefix;           /* generic.topic_prefix, default "<gateway.id>" */
    struct conf_generic_rule *up; /* generic.up: when given, only these rules go up */
    size_t up_count;
    struct conf_generic_rule *down; /* generic.down: when given, only these are subscribed */
    size_t down_count;
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_generic *generic_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].generic (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path; free it. */
void generic_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                           struct yaml_node_s *uplink_node, const char *uplink_path,
                           struct conf_uplink *uplink);
void generic_section_free(void *section);

#endif
