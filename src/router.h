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
struct local_ack;
struct profile_instance;

/* A child device the router has seen publish upstream (uplinkctl children). */
struct router_child {
    char *id;          /* owned */
    uint64_t messages; /* upstream device messages from it */
    int64_t last_seen; /* Unix seconds of the last one */
};

/* At most this many children are tracked; more are served but not listed. */
#define ROUTER_CHILDREN_MAX 65536

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
    /* Children seen, sorted by id for binary search (router_child_seen). */
    struct router_child *children;
    size_t child_count;
    size_t child_cap;
    bool children_full_logged;
};

/**
 * router_children_json() - append the children the router has seen as the
 * JSON array value of "children": id, message count, last seen (Unix s) and,
 * per uplink that carries it, the registration state in that cloud's
 * registry ("done", "pending" or "none").
 */
struct json_buf;
void router_children_json(const struct router *router, struct json_buf *out);

/**
 * router_uplink_status_json() - append @uplink's profile figures to its
 * object in uplinkctl status (members starting with ','; akenza: the
 * per-device "sessions"). Nothing when the profile has none.
 */
void router_uplink_status_json(const struct router *router, const struct uplink *uplink,
                               struct json_buf *out);

/** router_init() - empty router for @conf and @local (both borrowed). */
void router_init(struct router *router, const struct conf *conf, struct local *local);

/** router_deinit() - free the raw subscription list and the children. */
void router_deinit(struct router *router);

/**
 * router_attach_uplink() - give @uplink (of @conf) its profile instance, or
 * bring the instance up to date after a reload (uplink_set_profile() with
 * the profile its section names; local messages of the instance go to
 * local_deliver()). Call it before uplink_start(). Returns as
 * uplink_set_profile().
 */
int router_attach_uplink(struct router *router, const struct conf *conf, struct uplink *uplink);

/**
 * router_set_uplinks() - adopt a (new) conf and its uplinks after start-up or
 * reload. @uplinks[i] belongs to conf->uplinks[i]; the array is borrowed.
 * Subscribes every uplink in @new_uplinks (those not seen before; may be
 * NULL for none) to its device command topics and to the raw subscriptions
 * that name it.
 */
void router_set_uplinks(struct router *router, const struct conf *conf, struct uplink **uplinks,
                        size_t count, struct uplink **new_uplinks, size_t new_count);

/* local_hooks callbacks; @arg is the struct router. */
int router_local_publish_cb(void *arg, const char *client_id, const char *topic,
                            const void *payload, size_t len, int qos, bool retain);
/* The durable-before-ack variant (local_hooks.publish_async_cb): returns
 * LOCAL_PUBLISH_PENDING when an uplink's spool must commit first, and calls
 * local_publish_done() once every selected uplink has its copy durable (or
 * with the first failure). */
int router_local_publish_async_cb(void *arg, const char *client_id, const char *topic,
                                  const void *payload, size_t len, int qos, bool retain,
                                  struct local_ack *ack);
void router_local_subscribe_cb(void *arg, const char *filter, int qos);
void router_local_unsubscribe_cb(void *arg, const char *filter);

/* uplink_hooks callbacks; @arg is the struct router. */
void router_uplink_message_cb(void *arg, struct uplink *uplink, const char *topic,
                              const void *payload, size_t len, int qos, bool retain);
void router_uplink_state_cb(void *arg, struct uplink *uplink, enum uplink_state state);

#endif
