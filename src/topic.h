/* topic.h - MQTT 3.1.1 topic names, topic filters (§4.7) and a subscription
 * table.
 *
 * Names and filters are passed as (pointer, length) so that slices decoded by
 * mqtt_codec can be checked without copying; they need no NUL terminator.
 *
 * The subscription table is a topic tree (see below): matching costs what
 * the topic's levels cost, not what the number of subscriptions costs.
 */
#ifndef UPLINKD_TOPIC_H
#define UPLINKD_TOPIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* §4.7.3: a topic name or filter is a UTF-8 string of at most 65535 bytes. */
#define TOPIC_MAX_LEN 65535u

/**
 * topic_name_check() - is @name a valid topic name for PUBLISH (§4.7): 1 to
 * 65535 bytes (§4.7.3-1), valid UTF-8 without U+0000 (§1.5.3, §4.7.3-2), no
 * '+' or '#' (§4.7.1-1). Returns 0 or -EINVAL with a static *reason (@reason
 * may be NULL).
 */
int topic_name_check(const char *name, size_t len, const char **reason);

/**
 * topic_filter_check() - is @filter a valid topic filter for SUBSCRIBE
 * (§4.7): length and UTF-8 as for names; '#' only as a whole last level
 * (§4.7.1-2); '+' only as a whole level (§4.7.1-3). Returns 0 or -EINVAL with
 * a static *reason.
 */
int topic_filter_check(const char *filter, size_t len, const char **reason);

/**
 * topic_match() - does the (valid) @filter match the (valid) topic @name?
 * '+' matches exactly one level (possibly empty), '#' the parent level and
 * any number of child levels (§4.7.1-2: "sport/#" matches "sport"). A name
 * starting with '$' is not matched by a filter starting with a wildcard
 * (§4.7.2-1), so "#" does not see "$SYS/...".
 */
bool topic_match(const char *filter, size_t filter_len, const char *name, size_t name_len);

/* --- Subscription table ---------------------------------------------------- */

/*
 * A topic tree: one node per filter level, with the exact-level children of a
 * node in a sorted array (binary search) and its '+' and '#' children apart.
 * Matching a topic of L levels visits at most the nodes on the paths the
 * topic can take (exact, '+', '#' at every level), independent of the number
 * of subscriptions; see docs/performance.md for the numbers against the
 * linear scan it replaced.
 */

/* One (owner, filter) subscription, kept in the node where its filter ends. */
struct topic_sub {
    struct topic_sub *next;
    void *owner; /* opaque, borrowed (a local session) */
    uint8_t qos;
};

struct topic_node; /* private to topic.c */

/* Zero-initialised is an empty table. */
struct topic_table {
    struct topic_node *head; /* root (the level before the first), NULL when empty */
    size_t count;            /* subscriptions */
    /* Scratch reused by topic_table_match() so a publish does not allocate. */
    void *scratch;
    bool matching; /* guards against re-entry from a match callback */
};

/**
 * topic_table_add() - subscribe @owner to @filter (copied) at @qos. An
 * existing (owner, filter) subscription is replaced, i.e. its QoS updated
 * (§3.8.4-3). @first (may be NULL) is set to true when no owner had
 * subscribed to this exact filter before. The filter is not validated here.
 * Returns 0 or -ENOMEM.
 */
int topic_table_add(struct topic_table *table, void *owner, const char *filter, size_t filter_len,
                    uint8_t qos, bool *first);

/**
 * topic_table_remove() - drop @owner's subscription to exactly @filter.
 * @last (may be NULL) is set to true when no other owner still subscribes to
 * that filter. Returns 0 or -ENOENT when there was no such subscription.
 */
int topic_table_remove(struct topic_table *table, void *owner, const char *filter,
                       size_t filter_len, bool *last);

/**
 * topic_table_remove_owner() - drop every subscription of @owner (a walk of
 * the whole tree: called when a session ends, never per message). @last_cb
 * (may be NULL) is called, before the entry is freed, for each filter that
 * no other owner subscribes to any more; @filter is NUL-terminated, borrowed
 * for the call, and the callback must not touch the table.
 */
void topic_table_remove_owner(struct topic_table *table, void *owner,
                              void (*last_cb)(void *arg, const char *filter, size_t len),
                              void *arg);

/**
 * topic_table_match() - call @match_cb once per owner with at least one
 * subscription matching @name, with the highest QoS among that owner's
 * matching subscriptions (§3.3.5: the server delivers at the maximum QoS of
 * all overlapping matches). A name starting with '$' is not matched by the
 * '+' and '#' subscriptions of the first level (§4.7.2-1). The callback must
 * not modify the table nor match again (defer removals until the walk has
 * returned); the order of owners is unspecified. Never allocates once the
 * scratch space has grown to the largest match so far; on allocation failure
 * matches are delivered possibly twice to an owner rather than lost.
 */
void topic_table_match(struct topic_table *table, const char *name, size_t name_len,
                       void (*match_cb)(void *arg, void *owner, uint8_t qos), void *arg);

/** topic_table_deinit() - free every entry; the table is empty afterwards. */
void topic_table_deinit(struct topic_table *table);

#endif
