/* rules.h - Google Cloud IoT Core's limits and device id rule, header
 * only: section.c checks ids and sets the rate default with them at load
 * time, and both halves of the profile (spec.c, gcp.c) use them, so the
 * pure half needs nothing of the daemon half.
 */
#ifndef UPLINKD_PROFILES_GCP_RULES_H
#define UPLINKD_PROFILES_GCP_RULES_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

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
 * Inline so section.c, spec.c and gcp.c share one definition.
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

#endif
