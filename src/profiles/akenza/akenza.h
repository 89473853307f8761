/* akenza.h - the pure rules of the akenza profile, for the unit tests.
 * The profile itself is `profile_akenza` (akenza.c) and
 * `profile_spec_akenza` (spec.c); akenza's device MQTT API is documented
 * at docs.akenza.io ("MQTT device connectivity").
 */
#ifndef UPLINKD_PROFILES_AKENZA_H
#define UPLINKD_PROFILES_AKENZA_H

#include <stdbool.h>
#include <stddef.h>

#include "mapping.h"

/**
 * akenza_up_topic() - telemetry -> /up/device/id/<child>[/<sub>],
 * state -> /up/device/id/<child>/state[/<sub>]. Same returns as
 * gcp_up_topic().
 */
int akenza_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason);

/**
 * akenza_down_topic() - the local topic for a cloud message on
 * /down/device/id/<id>[/<rest>]: rest "config" (or "config/...") ->
 * <prefix>/<id>/config (retained), anything else (or nothing) ->
 * <prefix>/<id>/commands[/<rest>]. *@config says which.
 * Returns the length, 0 (not a downlink topic), -EINVAL (bad id),
 * -ENAMETOOLONG.
 */
int akenza_down_topic(const char *local_prefix, const char *topic, char *buf, size_t cap,
                      bool *config);

/**
 * akenza_child_aud() - the aud of a child's own session (per-device
 * sessions), in the form of the device's @device_aud: the default
 * https://akenza.io/devices/<device> becomes .../<child>, the bare device
 * id the bare child id, and any other value is used as it is.
 * Returns the length, -ENAMETOOLONG.
 */
int akenza_child_aud(const char *device_aud, const char *device, const char *child, char *buf,
                     size_t cap);

/**
 * akenza_connack_text() - CONNACK @rc in akenza's words, or NULL.
 */
const char *akenza_connack_text(int rc);

#endif
