/* gcp.h - the pure rules of the gcp profile, for section.c (config-time
 * checks) and the unit tests. The profile itself is `profile_gcp` (gcp.c)
 * and `profile_spec_gcp` (spec.c).
 *
 * Google Cloud IoT Core and ClearBlade IoT Core speak the same protocol
 * ("Publishing over the MQTT bridge", "Using gateways with the MQTT
 * bridge").
 */
#ifndef UPLINKD_PROFILES_GCP_H
#define UPLINKD_PROFILES_GCP_H

#include <stdbool.h>
#include <stddef.h>

#include "mapping.h"
#include "rules.h" /* limits and the device id rule */

/**
 * gcp_up_topic() - the cloud topic of a local device message:
 * telemetry -> /devices/<child>/events[/<sub>], state -> /devices/<child>/state.
 * Returns the length, -EINVAL with *@reason (a channel GCP has no topic
 * for, or a sub-topic on state), -ENAMETOOLONG.
 */
int gcp_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason);

/* What a cloud topic received by a gcp uplink is. */
enum gcp_down_kind {
    GCP_DOWN_OTHER,    /* not one of ours (raw copies only) */
    GCP_DOWN_CONFIG,   /* /devices/<id>/config */
    GCP_DOWN_COMMANDS, /* /devices/<id>/commands[/<sub>] */
    GCP_DOWN_ERRORS,   /* /devices/<id>/errors (gateway errors) */
    GCP_DOWN_BAD_ID,   /* one of the above naming an id the local contract cannot carry */
};

/**
 * gcp_down_parse() - classify @topic; @id (MAPPING_CHILD_MAX + 1 bytes)
 * receives the device id and *@sub the commands sub-folder (NULL: none).
 */
enum gcp_down_kind gcp_down_parse(const char *topic, char *id, const char **sub);

/**
 * gcp_error_explain() - what a gateway error_type means and what to do
 * ("Using gateways with the MQTT bridge", errors topic). Never NULL.
 */
const char *gcp_error_explain(const char *error_type);

#endif
