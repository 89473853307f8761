/* child_sessions.h - per-device sessions: one upstream connection per child,
 * for clouds that take one device per MQTT connection (akenza, Azure IoT
 * Hub, AWS things with certificates of their own).
 *
 * A profile instance that wants them makes a set (child_sessions_new()) with
 * a table of what is its own (struct child_session_ops): whether they are
 * on, the child's credential (checked on the loop, loaded on the
 * threadpool), the session's settings, and the hooks of its uplink (its
 * CONNECT, its subscriptions, what its cloud messages become). The set
 * does the rest, the same for every profile:
 *
 *   - a child's session opens on its first message (child_sessions_route()),
 *     with the uplink's settings and the child's identity, its spool in
 *     <state_dir>/spool/<uplink>/devices/<child> (durability fsync; else in
 *     memory), its credential loaded off the loop before it starts;
 *   - it closes after idle_ms without messages once its spool is empty (an
 *     idle session holds no fds), and the directory goes with it;
 *   - at start-up, children whose spool still holds messages get their
 *     session back, so those leave without waiting for the child;
 *   - a child whose credential cannot be used is refused with the reason;
 *     what it spooled stays on disk until the credential is fixed;
 *   - status: "sessions" counts per uplink, "session" per child.
 *
 * Messages for a session leave through the router like any other: up_cb
 * sets profile_msg.uplink to child_session_uplink(). Everything runs on the
 * loop thread except ops->load.
 */
#ifndef UPLINKD_CHILD_SESSIONS_H
#define UPLINKD_CHILD_SESSIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "profile.h"

struct child_session;
struct child_sessions;
struct json_buf;

/* Room for what is wrong with a child's credential. */
#define CHILD_SESSION_ERR_MAX 256

struct child_session_ops {
    /* The words that start every refusal: why this cloud needs a session
     * per child and which setting gives its credential, e.g. "akenza needs
     * a session and key per device, and this child has no usable key
     * (akenza.child_key)". Required. */
    const char *need;
    /* Are per-device sessions configured for this uplink? Required. */
    bool (*enabled)(const struct profile_instance *pi);
    /* Close a session unused this long (ms). Required. */
    uint64_t (*idle_ms)(const struct profile_instance *pi);
    /* The uplink's own device, never a child with a session. Required. */
    const char *(*self)(const struct profile_instance *pi);
    /* Loop thread, before a child's first message is taken: 0 when its
     * credential may exist (a stat, not a read), else -EINVAL with @why.
     * Optional. */
    int (*check)(const struct profile_instance *pi, const char *child, char *why, size_t size);
    /* Threadpool: read the child's credential into child_session_data().
     * 0, or a negative errno with @why. Touches nothing but the session's
     * data. Required. */
    int (*load)(struct child_session *s, char *why, size_t size);
    /* Loop thread: the session's settings, a new copy of pi->uc with the
     * child's identity, for the session's uplink (which borrows it until
     * the next call or the session's end: the set frees it). Called when
     * the session opens, after the load, and on every reload. NULL: out of
     * memory. Required. */
    struct conf_uplink *(*conf)(struct child_session *s);
    /* The session's cloud filters (child_session_id() says whose). Required. */
    void (*filters)(struct child_session *s, struct profile_msgs *filters);
    /* Where the child's credential comes from, for the log ("key
     * /etc/uplinkd/children/valve-2.pem"). Optional. */
    const char *(*credential)(const struct child_session *s, char *buf, size_t size);
    /* Free what load and conf left in the data. Optional. */
    void (*data_free)(void *data);
    /* Bytes of child_session_data(), zeroed at open. */
    size_t data_size;
    /* Before each connection attempt of the session (uplink_hooks
     * .session_cb, @arg the struct child_session): what the conf alone does
     * not say (Azure: the SAS token). Optional. */
    void (*session_cb)(void *arg, struct uplink *uplink, struct uplink_session *session);
    /* After each CONNACK 0: messages to send first on this connection
     * (shadow or twin GET), ahead of the spool. Optional. */
    void (*first)(struct child_session *s, struct profile_msgs *first);
    /* A message from the cloud on the session -> local messages in @local,
     * which the set delivers. Required. */
    void (*down)(struct child_session *s, const char *topic, const void *payload, size_t len,
                 int qos, bool retain, struct profile_msgs *local);
    /* CONNACK texts are the profile's (profile_spec.connack_text). */
};

/**
 * child_sessions_new() - the set of @pi's per-device sessions, with its idle
 * sweep, reopening the sessions whose spool holds messages (when enabled).
 * @ops: static. Returns 0 or -ENOMEM.
 */
int child_sessions_new(struct profile_instance *pi, const struct child_session_ops *ops,
                       struct child_sessions **out);

/**
 * child_sessions_close() - stop every session and the sweep; the set calls
 * profile_instance_closed(pi) once all have finished (for a profile whose
 * close_cb owns nothing else).
 */
void child_sessions_close(struct child_sessions *set);

/** child_sessions_free() - after the close. NULL is allowed. */
void child_sessions_free(struct child_sessions *set);

/**
 * child_sessions_reconfigure() - a reload: sessions take the uplink's new
 * settings (a changed one reconnects), or all close when ops->enabled is
 * now false (their spools stay on disk for when they are turned on again).
 */
void child_sessions_reconfigure(struct child_sessions *set);

/**
 * child_sessions_route() - the session for @child's message: found, or
 * opened now. Returns 0 (*@out set), -EINVAL with pi->reason (no usable
 * credential: refuse the message), -EAGAIN (its last session is still
 * closing: refuse it unacknowledged, the client re-sends), -ENOMEM.
 */
int child_sessions_route(struct child_sessions *set, const char *child, struct child_session **out);

/** child_sessions_find() - @child's open session, or NULL. */
struct child_session *child_sessions_find(const struct child_sessions *set, const char *child);

/** child_sessions_status_json() - ,"sessions":{open, online, ...} (when enabled). */
void child_sessions_status_json(const struct child_sessions *set, struct json_buf *out);

/** child_sessions_child_json() - ,"session":{state, queued, ...} or null. */
void child_sessions_child_json(const struct child_sessions *set, const char *child,
                               struct json_buf *out);

/* A session's parts, for the ops. */
const char *child_session_id(const struct child_session *s);
const char *child_session_name(const struct child_session *s); /* "<uplink>.<child>" */
struct profile_instance *child_session_pi(const struct child_session *s);
struct uplink *child_session_uplink(const struct child_session *s);
const struct conf_uplink *child_session_conf(const struct child_session *s); /* ops->conf's */
void *child_session_data(const struct child_session *s);

#endif
