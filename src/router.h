/* router.h - glue between the local server and the uplinks.
 *
 * A local publish is classified by mapping_parse_local(); device topics go to
 * the uplinks that conf.routes selects for the child (all uplinks when no
 * routes are configured), raw cloud/<uplink>/<topic> to that uplink. Cloud
 * messages come back as dev/<child>/config|commands[/<sub>] and, for local
 * subscriptions to cloud/<uplink>/<filter>, as cloud/<uplink>/<topic>.
 * Rejected input is logged and reported on uplinkd/<uplink>/errors; every
 * uplink's state is published retained on uplinkd/<uplink>/status.
 */
#ifndef UPLINKD_ROUTER_H
#define UPLINKD_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "uplink.h"

struct conf;
struct local;

/* A local subscription to cloud/<uplink>/<filter>, mirrored upstream. */
struct router_raw_sub {
    char *uplink;
    char *cloud_filter;
    int qos;
};

struct router {
    const struct conf *conf; /* borrowed, the live conf */
    struct local *local;     /* borrowed */
    struct uplink **uplinks; /* borrowed array, parallel to conf->uplinks */
    size_t uplink_count;
    struct router_raw_sub *raw_subs;
    size_t raw_sub_count;
    uint64_t forwarded; /* messages handed to at least one uplink */
    uint64_t rejected;  /* refused local input (bad child id, channel, ...) */
    uint64_t unrouted;  /* device messages no route selected */
};

/** router_init() - empty router for @conf and @local (both borrowed). */
void router_init(struct router *router, const struct conf *conf, struct local *local);

/** router_deinit() - free the raw subscription list. */
void router_deinit(struct router *router);

/**
 * router_set_uplinks() - adopt a (new) conf and its uplinks after start-up or
 * reload. @uplinks[i] belongs to conf->uplinks[i]; the array is borrowed.
 * Subscribes every uplink in @new_uplinks (those not seen before; may be
 * NULL for none) to its device command topics and to the raw subscriptions
 * that name it.
 */
void router_set_uplinks(struct router *router, const struct conf *conf, struct uplink **uplinks,
                        size_t count, struct uplink **new_uplinks, size_t new_count);

/**
 * router_unsubscribe_device_topics() - drop the device command subscriptions
 * made for @old_prefix (reload changed generic.topic_prefix; the new ones
 * are made by router_set_uplinks() when the uplink is passed as new).
 */
void router_unsubscribe_device_topics(struct router *router, struct uplink *uplink,
                                      const char *old_prefix);

/* local_hooks callbacks; @arg is the struct router. */
int router_local_publish_cb(void *arg, const char *client_id, const char *topic,
                            const void *payload, size_t len, int qos, bool retain);
void router_local_subscribe_cb(void *arg, const char *filter, int qos);
void router_local_unsubscribe_cb(void *arg, const char *filter);

/* uplink_hooks callbacks; @arg is the struct router. */
void router_uplink_message_cb(void *arg, struct uplink *uplink, const char *topic,
                              const void *payload, size_t len, int qos, bool retain);
void router_uplink_state_cb(void *arg, struct uplink *uplink, enum uplink_state state);

#endif
