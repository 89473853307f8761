/* cumulocity/section.h - uplinks[].cumulocity: the settings of profile cumulocity.
 *
 * The struct lives in uplinks[].section; conf_uplink.c calls the hooks below
 * through profile_spec_cumulocity (spec.c), and nothing outside this folder
 * (and its tests) reads the struct.
 */
#ifndef UPLINKD_PROFILES_CUMULOCITY_SECTION_H
#define UPLINKD_PROFILES_CUMULOCITY_SECTION_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* cumulocity.children[]: how a child appears in Cumulocity (first match wins). */
struct conf_c8y_child {
    char *match;  /* match: fnmatch(3) glob on the child id, default "*" */
    char *parent; /* parent: the child id it hangs below (nested: 101 on s/us/<parent>);
                     NULL = the gateway */
    char *name;   /* name: 101 name, "{child}" replaced; default the child id */
    char *type;   /* type: 101 type, default "c8y_MQTTChildDevice" */
};

/* uplinks[].cumulocity (profile cumulocity). */
struct conf_cumulocity {
    char *device_id;   /* device_id: default gateway.id; no ':' (client id d:<id>[:<template>]) */
    char *template_id; /* template: default SmartREST 2.0 template X-ID, NULL = none */
    char *tenant;      /* tenant: basic auth user name becomes "<tenant>/<auth.username>" */
    char *name;        /* name: 100 name, default device_id */
    char *type;        /* type: 100 type, default "c8y_MQTTDevice" */
    char *hardware_serial; /* hardware: {serial, model, revision} -> 110; NULL = no 110 */
    char *hardware_model;
    char *hardware_revision;
    char **supported_operations; /* supported_operations: [...] -> 114; none = no 114 */
    size_t supported_operation_count;
    int required_interval_min;       /* required_interval (minutes) -> 117; -1 = no 117 */
    bool bootstrap;                  /* bootstrap: present */
    char *bootstrap_user;            /* bootstrap.user, default "management/devicebootstrap" */
    char *bootstrap_password;        /* bootstrap.password (or password_file), required */
    unsigned bootstrap_interval_ms;  /* bootstrap.interval: s/ucr period, default 5 s */
    bool will;                       /* will: false turns the last will off */
    char *will_topic;                /* will.topic, default "s/us" */
    char *will_message;              /* will.message, default 400,c8y_ConnectionEvent,"Device
                                    connection was lost." */
    struct conf_c8y_child *children; /* children: [...] */
    size_t child_count;
    bool token; /* token: true: keep a device token (s/uat -> 71 on s/dat), refreshed at half
                   its lifetime, retained locally on uplinkd/<uplink>/c8y/token */
};

/* The section of @uc, an uplink of this profile (borrowed from it). */
static inline const struct conf_cumulocity *cumulocity_conf(const struct conf_uplink *uc)
{
    return uc->section;
}

/* profile_spec hooks (profile_spec.h): read uplinks[].cumulocity (@section NULL
 * when the uplink has none) into a new uplink->section and check the rules
 * that tie it to the rest of the uplink at @uplink_path; free it. */
void cumulocity_section_parse(struct conf_loader *ld, struct yaml_node_s *section,
                              struct yaml_node_s *uplink_node, const char *uplink_path,
                              struct conf_uplink *uplink);
void cumulocity_section_free(void *section);

/* What of the section goes into CONNECT: reload reconnects when false. */
bool cumulocity_section_equal(const void *a, const void *b);

#endif
