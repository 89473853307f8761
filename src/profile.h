/* profile.h - cloud dialects as small tables of callbacks.
 *
 * A profile says how one cloud wants to be spoken to: the client id and the
 * credentials of a session, where a local message goes (topic, QoS, payload
 * conversion, or a refusal in words), what comes back from the cloud and to
 * which local topic, what has to be sent before a child's first message
 * (Cumulocity 101, GCP attach), what to send after every CONNACK, the
 * cloud's size limits and what its CONNACK codes mean.
 *
 * Adding a cloud = one folder, src/profiles/<name>/, and its name in the
 * list in src/profiles/meson.build (see profile_spec.h for what the folder
 * holds). The daemon half, `const struct profile profile_<name>`, is this
 * table; the pure half (client id, CONNACK texts, child id rules, diagnose
 * hints) is the folder's `struct profile_spec`. The router (router.c) only
 * dispatches through the table; it never asks which cloud it is talking to.
 *
 * Lifetime: every uplink owns one struct profile_instance
 * (uplink_set_profile(): profile_instance_new() before the uplink starts);
 * the uplink asks it for each session, CONNACK text, batch and on-connect
 * messages, and the profile asks the uplink for what it sends itself only
 * through the instance's port (struct profile_port). The router reaches the
 * instance through uplink_profile() for up_cb and down_cb. A reload that
 * changes the profile retires the old instance (closed at once, freed with
 * the uplink, because queued registrations still point at it); stopping
 * the uplink closes its instances (profile_instance_close(), asynchronous
 * because a profile may own libuv handles such as a bootstrap timer or
 * per-device sessions), and the uplink is STOPPED only once they are
 * closed. The instance points to the live conf; a reload updates the
 * pointers (profile_instance_reconfigure()) before the next callback runs.
 *
 * Threading: everything runs on the loop thread.
 */
#ifndef UPLINKD_PROFILE_H
#define UPLINKD_PROFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "conf.h"
#include "mapping.h"
#include "profile_spec.h" /* the pure half: descriptors, PROFILE_LIST */
#include "uplink_types.h" /* states, sessions, hooks, stats: words shared with the uplink */

struct conf;
struct conf_uplink;
struct json_buf;
struct uplink;
struct uplink_session;
struct registry;

/* Longest topic a profile builds (clouds cap far below MQTT's 65535). */
#define PROFILE_TOPIC_MAX 1024
/* Room for a refusal reason built at run time (profile_instance.reason). */
#define PROFILE_REASON_MAX 256

/* One message a profile produced: for the cloud (upstream, registration,
 * on-connect) or for local subscribers (downstream). Owned by the list. */
struct profile_msg {
    char *topic;
    void *payload; /* may be NULL when len is 0 */
    size_t len;
    int qos;
    bool retain;
    /* up_cb only: the session to send it on, when not the instance's own
     * uplink (per-device sessions, child_sessions.h); NULL (what
     * profile_msgs_add() sets) = pi->uplink. Borrowed. */
    struct uplink *uplink;
};

/* A growable list of messages; after a failed allocation `failed` is set and
 * further adds do nothing, so callers check once. */
struct profile_msgs {
    struct profile_msg *msg;
    size_t count;
    size_t cap;
    bool failed;
};

/** profile_msgs_init() / profile_msgs_deinit() - empty list / free it all. */
void profile_msgs_init(struct profile_msgs *msgs);
void profile_msgs_deinit(struct profile_msgs *msgs);

/**
 * profile_topic_result() - the end of building a cloud topic with
 * snprintf(3): @n (its return) when the topic fit into @cap bytes, else
 * -ENAMETOOLONG with *@reason saying so.
 */
int profile_topic_result(int n, size_t cap, const char **reason);

/**
 * profile_msgs_add() - append a copy of @topic and @payload (@len bytes).
 * Returns 0 or -ENOMEM (then msgs->failed is set).
 */
int profile_msgs_add(struct profile_msgs *msgs, const char *topic, const void *payload, size_t len,
                     int qos, bool retain);

/* The cloud's size limits; 0 = none beyond MQTT's own. */
struct profile_limits {
    size_t max_packet;  /* whole MQTT packet, header included (Cumulocity: 16184) */
    size_t max_payload; /* payload bytes of one publish (GCP events: 256 KiB) */
};

/* What to send before a child's first message, and how. */
struct profile_registration {
    /* The messages were added to @msgs by register_cb; they go out before
     * any spooled data of this uplink (uplink_publish_control()). */
    bool wait_ack;       /* hold spooled data until they are acknowledged */
    bool per_connection; /* forget registrations when the connection ends and
                            register again before the child's next message
                            (GCP re-attach); false: the registry keeps them
                            across reconnects and restarts (Cumulocity 101) */
};

struct profile_instance;

/*
 * The port: all that a profile may ask of an uplink. The uplink that owns
 * the instance fills it (uplink_profile.c) and calls the instance; the
 * profile never calls uplink.h itself, so the two do not depend on each
 * other in a circle. Its own uplink (pi->uplink, first argument):
 *   send_first  - a message ahead of the spool: registration, start-up,
 *                 bootstrap (uplink_publish_control() semantics and flags);
 *   publish     - a message through the spool (GCP device state);
 *   subscribe / unsubscribe - a cloud filter, re-sent after every reconnect;
 *   reconnect   - drop the connection and connect again at once (new
 *                 credentials); state / stats - what it is doing.
 * Per-device sessions (akenza; Azure and AWS things next): a session of its
 * own per child is an uplink without a profile, driven by @hooks that the
 * profile passes; the profile owns it from session_new to session_free:
 *   session_new (+ session_open_spool before session_start), session_stop
 *   (graceful, @done_cb once closed), session_free, session_reconfigure,
 *   and subscribe/state/stats as for its own uplink.
 * Every function runs on the loop thread; returns as uplink.h documents.
 */
struct profile_port {
    int (*send_first)(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                      int qos, unsigned flags, void (*done_cb)(void *arg, int status), void *arg);
    int (*publish)(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                   int qos, bool retain);
    int (*subscribe)(struct uplink *uplink, const char *filter, int qos);
    int (*unsubscribe)(struct uplink *uplink, const char *filter);
    void (*reconnect)(struct uplink *uplink, const char *reason);
    enum uplink_state (*state)(const struct uplink *uplink);
    const char *(*state_name)(enum uplink_state state);
    void (*stats)(const struct uplink *uplink, struct uplink_stats *out);

    int (*session_new)(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
                       const struct uplink_hooks *hooks, struct uplink **out);
    int (*session_open_spool)(struct uplink *session, const char *dir);
    int (*session_start)(struct uplink *session);
    void (*session_stop)(struct uplink *session, unsigned timeout_ms,
                         void (*done_cb)(struct uplink *session, void *arg), void *arg);
    void (*session_free)(struct uplink *session);
    int (*session_reconfigure)(struct uplink *session, const struct conf_uplink *conf);
};

/* The table. Every callback is optional unless marked required. Callbacks
 * get the instance; pi->state is the profile's own per-uplink data. */
struct profile {
    const char *name; /* required: the uplinks[].profile value */

    /* Create / free pi->state. new_cb returns 0 or a negative errno. */
    int (*new_cb)(struct profile_instance *pi);
    void (*free_cb)(struct profile_instance *pi);
    /* Start closing libuv handles owned by pi->state; call
     * profile_instance_closed(pi) once they are all closed. Without it the
     * instance is freed at once. */
    void (*close_cb)(struct profile_instance *pi);
    /* A reload changed the uplink's conf (pi->uc already points to it). */
    void (*reconfigure_cb)(struct profile_instance *pi);

    /* Before each connection attempt: client id, credentials, will, clean
     * session (uplink_hooks.session_cb). Strings are copied by the uplink
     * before this returns; they may point into pi->state. */
    void (*session_cb)(struct profile_instance *pi, struct uplink_session *session);

    /* After CONNACK 0, before anything spooled is sent: messages to send
     * first on every connection (Cumulocity 100/110/114/117, GCP re-attach).
     * Added to @first; sent in order, before spooled data. */
    void (*online_cb)(struct profile_instance *pi, struct profile_msgs *first);

    /* The cloud filters to subscribe to (the uplink re-sends them after every
     * reconnect). Added to @filters as messages whose topic is the filter and
     * qos the requested QoS. Called when the router adopts the uplink. */
    void (*subscriptions_cb)(struct profile_instance *pi, struct profile_msgs *filters);

    /* Upstream: a local device message (m->kind MAPPING_DEV, an upstream
     * channel) -> zero or more cloud messages added to @out. @qos/@retain as
     * the local client published them. Returns 0, or -EINVAL with
     * pi->reason set (or a static text in *@reason) when the message must be
     * refused (nothing is sent then; the router reports it on
     * uplinkd/<uplink>/errors), -ENOMEM. Required. */
    int (*up_cb)(struct profile_instance *pi, const struct mapping_local *m, const void *payload,
                 size_t len, int qos, bool retain, struct profile_msgs *out, const char **reason);

    /* Child registration: add the messages that must precede @child's first
     * message (nothing to add = nothing needed) and say how to send them.
     * Called only for children the registry does not know yet (or, with
     * per_connection, not yet in this connection). The gateway itself is
     * never passed. Returns 0 or a negative errno (-EINVAL with *@reason:
     * the child's data is refused). */
    int (*register_cb)(struct profile_instance *pi, const char *child, struct profile_msgs *out,
                       struct profile_registration *how, const char **reason);

    /* A registration queued by register_cb finished: @status 0 when the
     * cloud acknowledged every message, else the first error (-ECONNRESET:
     * the connection ended first, -ECANCELED: stopping, -EINVAL: refused by
     * libmosquitto). Not called while closing. Optional (GCP subscribes to
     * an attached child's config and commands only after the attach). */
    void (*registered_cb)(struct profile_instance *pi, const char *child, int status);

    /* Downstream: a message from the cloud -> local messages added to
     * @local (topics in the local contract: dev/<child>/operations,
     * uplinkd/<uplink>/errors, ...). Raw cloud/<uplink>/ copies are made by
     * the router independently. Required. */
    void (*down_cb)(struct profile_instance *pi, const char *topic, const void *payload, size_t len,
                    int qos, bool retain, struct profile_msgs *local);

    /* Batching: may a queued record for @topic be joined with the records
     * queued right behind it for the same topic, and how (Cumulocity: lines
     * joined by "\n" while the whole PUBLISH stays within
     * limits.max_packet)? Returns the separator to put between payloads (a
     * static string), or NULL when records must go one by one. The uplink
     * asks through profile_instance_batch() (uplink_ask.c) and joins
     * only records already queued (uplink.c, uplink_batch_take). */
    const char *(*batch_separator_cb)(const struct profile_instance *pi, const char *topic);

    /* uplinkctl status: append members (each starting with ',') to the
     * uplink's JSON object, e.g. akenza's per-device "sessions". */
    void (*status_json_cb)(const struct profile_instance *pi, struct json_buf *out);
    /* uplinkctl children: append members (each starting with ',') to
     * @child's object for this uplink, e.g. its session's state. */
    void (*child_json_cb)(const struct profile_instance *pi, const char *child,
                          struct json_buf *out);

    struct profile_limits limits;
};

/* One uplink's profile: created and owned by its uplink (uplink_set_profile()). */
struct profile_instance {
    const struct profile *profile;
    const struct profile_spec *spec; /* the pure half: child id rules, CONNACK texts */
    uv_loop_t *loop;                 /* borrowed */
    struct uplink *uplink;           /* the owner; only through @port */
    const struct profile_port *port; /* what the profile may ask of an uplink */
    const struct conf *conf;         /* borrowed, the live conf */
    const struct conf_uplink *uc;    /* borrowed, this uplink's section of it */
    struct registry *registry;       /* children registered with this uplink's cloud; owned */
    void *state;                     /* the profile's own, from new_cb */
    char reason[PROFILE_REASON_MAX]; /* a refusal built at run time (up_cb) */
    /* Set by the router: deliver to local subscribers (status, errors). */
    void (*deliver)(void *arg, const char *topic, const void *payload, size_t len, int qos,
                    bool retain);
    void *deliver_arg;
    bool closing;
    bool closed;                                    /* every handle closed */
    void (*closed_cb)(struct profile_instance *pi); /* set by profile_instance_close() */
    struct profile_instance *retired_next;          /* the owner's list of replaced instances */
};

/**
 * profile_find() - the profile registered under @name (NULL: "generic"), or
 * NULL when there is none (profile_table.c, the one list of the daemon
 * halves).
 */
const struct profile *profile_find(const char *name);

/**
 * profile_instance_new() - an instance of @profile for @uplink, which owns
 * it (uplink_set_profile()) and reaches it through @port.
 * @conf, @uc, @uplink, @port, @loop: borrowed (see struct profile_instance).
 * Opens the child registry (<state_dir>/registry/<uplink>, see registry.h)
 * and calls new_cb. Returns 0, -ENOENT (@profile NULL: conf_uplink.c
 * prevents it), -ENOMEM, or the registry's or new_cb's error (logged).
 */
int profile_instance_new(uv_loop_t *loop, const struct conf *conf, const struct conf_uplink *uc,
                         const struct profile *profile, struct uplink *uplink,
                         const struct profile_port *port, struct profile_instance **out);

/** profile_instance_reconfigure() - adopt a reloaded conf (same uplink name). */
void profile_instance_reconfigure(struct profile_instance *pi, const struct conf *conf,
                                  const struct conf_uplink *uc);

/**
 * profile_instance_close() - stop the instance; @closed_cb(pi) runs once its
 * handles are closed (maybe from inside this call), then
 * profile_instance_free() may be called.
 */
void profile_instance_close(struct profile_instance *pi,
                            void (*closed_cb)(struct profile_instance *pi));

/** profile_instance_closed() - for close_cb: every handle is closed now. */
void profile_instance_closed(struct profile_instance *pi);

/** profile_instance_free() - free after close (or never started). NULL is allowed. */
void profile_instance_free(struct profile_instance *pi);

/**
 * profile_deliver() - hand a message to local subscribers through the
 * router (for profiles reacting to timers, not to a callback with an
 * output list).
 */
void profile_deliver(struct profile_instance *pi, const char *topic, const void *payload,
                     size_t len, int qos, bool retain);

/**
 * profile_report_error() - publish {"uplink":..,"error":..} (and @topic when
 * not NULL) on uplinkd/<uplink>/errors and log it as a warning. @text is
 * borrowed.
 */
void profile_report_error(struct profile_instance *pi, const char *topic, const char *text);

/**
 * profile_register_child() - make sure @child is registered before its data
 * is sent: when the registry does not know it, register_cb's messages are
 * queued with uplink_publish_control() (they go out before the spool) and
 * the child is recorded as pending, then done on the acknowledgement.
 * Returns 0 (registered, queued, or nothing needed), or -EINVAL with
 * *@reason (the child's data must be refused), -ENOMEM.
 */
int profile_register_child(struct profile_instance *pi, const char *child, const char **reason);

/**
 * profile_instance_online() - CONNACK 0: queue online_cb's messages first
 * (per connection, ahead of pending registrations, holding the spool until
 * acknowledged).
 */
void profile_instance_online(struct profile_instance *pi);

/** profile_instance_offline() - the connection ended: forget per-connection registrations. */
void profile_instance_offline(struct profile_instance *pi);

/* What the owning uplink asks its instance (uplink_int.h): */
/** profile_instance_session() - session_cb for the next attempt (not while closing). */
void profile_instance_session(struct profile_instance *pi, struct uplink_session *session);
/** profile_instance_connack_text() - CONNACK @rc in the cloud's words, or NULL. */
const char *profile_instance_connack_text(const struct profile_instance *pi, int rc);
/**
 * profile_instance_batch() - batch_separator_cb for @topic; with a separator
 * *@max_packet is set to limits.max_packet. NULL: one record per publish.
 */
const char *profile_instance_batch(const struct profile_instance *pi, const char *topic,
                                   size_t *max_packet);

/**
 * profile_instance_subscribe() - bring the uplink's cloud subscriptions in
 * line with subscriptions_cb: subscribe the new filters, unsubscribe the
 * ones this instance made before and no longer wants (after a reload). On a
 * closing instance: unsubscribe everything it subscribed.
 */
void profile_instance_subscribe(struct profile_instance *pi);

/* Generic template rules (profiles/generic/generic.c), pure, for unit tests. A
 * template is a topic whose levels may be exactly "{child}" or, as the last
 * level, "{sub}" (one or more levels). */

/**
 * profile_template_expand() - fill @tmpl with @child and @sub (NULL: the
 * "{sub}" level and its '/' are left out). Returns the length, -EINVAL with
 * *@reason (a sub-topic but no {sub} in the template), -ENAMETOOLONG.
 */
int profile_template_expand(const char *tmpl, const char *child, const char *sub, char *buf,
                            size_t cap, const char **reason);

/** profile_template_filter() - the subscription filter: {child} -> +, {sub} -> #. */
int profile_template_filter(const char *tmpl, char *buf, size_t cap);

/**
 * profile_template_match() - does @topic match @tmpl? On a match @child
 * (MAPPING_CHILD_MAX + 1 bytes) receives the child id and *@sub points into
 * @topic at the sub-topic (NULL when none). Returns 1 on a match, 0 when not,
 * -EINVAL when it matches but the child id is invalid.
 */
int profile_template_match(const char *tmpl, const char *topic, char *child, const char **sub);

/* The daemon half of every profile: profile_<name> in
 * src/profiles/<name>/<name>.c, one for each entry of PROFILE_LIST. */
#define PROFILE_DECLARE(name) extern const struct profile profile_##name;
PROFILE_LIST(PROFILE_DECLARE)
#undef PROFILE_DECLARE

#endif
