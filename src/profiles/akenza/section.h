/* akenza/section.h - uplinks[].akenza: the settings of profile akenza.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_akenza (spec.c), and nothing outside this folder
 * (and its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_AKENZA_SECTION_H
#define UPLINKD_PROFILES_AKENZA_SECTION_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* uplinks[].akenza (profile akenza). */
struct conf_akenza {
    char *device;             /* device: the akenza device id (= client id), default gateway.id */
    char *child_key;          /* child_key: per-device sessions: a child's key file, "%c" = the
                        child id; NULL = the device alone */
    uint64_t session_idle_ms; /* session_idle: close a child's session unused this long,
                                 default 10m */
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_akenza *akenza_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].akenza (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path; free it. */
void akenza_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                          struct yaml_node_s *uplink_node, const char *uplink_path,
                          struct conf_uplink *uplink);
void akenza_section_free(void *section);

/* What of the section goes into CONNECT: reload reconnects when false. */
bool akenza_section_equal(const void *a, const void *b);

#endif
