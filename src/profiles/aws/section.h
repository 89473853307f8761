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
#include <stdint.h>

#include "conf.h"

struct conf_loader;
struct yaml_node_s;

/* One provisioning.parameters entry: a template parameter and its value. */
struct conf_aws_param {
    char *name;
    char *value;
};

/* uplinks[].aws (profile aws). */
struct conf_aws {
    /* thing: the gateway's thing name, default gateway.id; also the client
     * id unless uplinks[].client_id says otherwise */
    char *thing;
    char **shadows; /* shadows: named shadows of the thing fetched on every connect */
    size_t shadow_count;
    bool jobs; /* jobs: take part in AWS IoT Jobs (default true) */
    /* child_shadows: a child's first message on each connection fetches its
     * classic shadow and subscribes to its answers, and dev/<child>/state
     * updates it (default true); false: children send telemetry only, for
     * a policy that allows the gateway's own shadow only. */
    bool child_shadows;
    /* provisioning.template: fleet provisioning by claim, NULL = off; then
     * tls.cert and tls.key are the claim certificate, and the certificate
     * AWS issues is kept in <state_dir>/credentials/<uplink>/ (provision.c). */
    char *template_name;
    struct conf_aws_param *params; /* provisioning.parameters, default {ThingName: thing} */
    size_t param_count;
    /* child_cert, child_key: file patterns ("%c" = the child id) of a
     * child's own certificate and key. A child whose certificate exists is
     * a thing with a session of its own (child_sessions.h); any other goes
     * through the gateway's connection. NULL: all go through the gateway. */
    char *child_cert;
    char *child_key;
    uint64_t session_idle_ms; /* session_idle: close a child's session unused this long,
                                 default 10m */
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
