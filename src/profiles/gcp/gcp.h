/* gcp.h - the pure rules of the gcp profile, for conf.c (config-time
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
#include <string.h>

#include "mapping.h"

/* GCP limits ("Quotas and limits", MQTT bridge). */
#define GCP_EVENT_MAX       (256u * 1024u) /* telemetry event payload */
#define GCP_STATE_MAX       (64u * 1024u)  /* device state payload */
#define GCP_STATE_PERIOD_MS 1000u          /* state updates: 1 per second per device */
#define GCP_MAX_ATTACHED    1000u          /* devices attached to one gateway connection */
#define GCP_MSGS_PER_S      100u           /* incoming messages per second per connection */
#define GCP_ID_MIN          3u
#define GCP_ID_MAX          255u

/**
 * gcp_id_check() - does @id follow GCP's device id rule
 * [a-zA-Z][-a-zA-Z0-9._+~%]{2,254} and not start with "goog"?
 * Returns NULL when it does, else a static reason in words.
 * Inline so conf.c (core library) and the daemon share one definition.
 */
static inline const char *gcp_id_check(const char *id)
{
    size_t len = strlen(id);

    if (len < GCP_ID_MIN || len > GCP_ID_MAX)
        return "GCP device ids are 3 to 255 characters long";
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z')))
        return "GCP device ids start with a letter";
    for (const char *p = id + 1; *p; p++) {
        bool ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || strchr("-._+~%", *p) != NULL;
        if (!ok)
            return "GCP device ids contain only letters, digits and - . _ + ~ %";
    }
    /* Reserved for Google; the docs write it in lower case. */
    if (strncmp(id, "goog", 4) == 0)
        return "GCP device ids must not start with \"goog\"";
    return NULL;
}

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
