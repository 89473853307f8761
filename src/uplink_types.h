/* uplink_types.h - the words the uplink and the profiles share.
 *
 * The uplink (uplink.h) owns its profile instance and calls it; the profile
 * answers and asks for what it sends itself through the narrow port of
 * profile.h, never through uplink.h. Both speak of an uplink's state, the
 * session decided before each connection attempt, its counters and the
 * flags of a message that goes out ahead of the spool: those live here, in a
 * header that depends on nothing of either side (only spool.h, for the
 * spool's counters inside the uplink's).
 */
#ifndef UPLINKD_UPLINK_TYPES_H
#define UPLINKD_UPLINK_TYPES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "spool.h" /* struct spool_stats */

struct uplink;

enum uplink_state {
    UPLINK_IDLE,
    UPLINK_RESOLVING,
    UPLINK_CONNECTING,
    UPLINK_ONLINE,
    UPLINK_BACKOFF,
    UPLINK_STOPPING,
    UPLINK_STOPPED,
};

/* What a profile decides about the next connection attempt
 * (uplink_hooks.session_cb). Zeroed before the call; strings and the will
 * payload are borrowed for the call only (the uplink copies them). */
struct uplink_session {
    const char *client_id;  /* NULL: uplinks[].client_id, else gateway.id */
    const char *username;   /* non-NULL: replaces auth.username and auth.password */
    const char *password;   /* with username; may be NULL (no password) */
    bool clean_session;     /* true: clean session 1 whatever the conf says */
    const char *will_topic; /* non-NULL: the last will (MQTT 3.1.1 §3.1.2.5) */
    const void *will_payload;
    size_t will_len;
    int will_qos;
    bool will_retain;
    bool hold_spool; /* send nothing from the spool on this connection
                        (e.g. Cumulocity bootstrap: only control messages) */
    /* A password the profile made that expires (an Azure SAS token): when
     * it stops being valid, 0 = never. The uplink then rotates as for a
     * JWT: at @password_refresh_percent of its life (0: 80) it stops
     * sending, waits for what is in flight, and reconnects with a new
     * session, so the cloud never has to drop an expired one. */
    time_t password_expires_at;
    unsigned password_refresh_percent;
    /* Non-NULL: the client certificate (chain) and key files for this
     * attempt instead of tls.cert and tls.key (AWS fleet provisioning: the
     * certificate AWS issued replaces the claim certificate). */
    const char *cert;
    const char *key;
};

struct uplink_hooks {
    /* Optional: called before every connection attempt (on the loop
     * thread) to fill @session; see struct uplink_session. It may call
     * uplink_subscribe()/uplink_unsubscribe() (the uplink is not online). */
    void (*session_cb)(void *arg, struct uplink *uplink, struct uplink_session *session);
    /* Optional: CONNACK 0 arrived. Runs after the subscriptions were re-sent
     * and before anything from the spool: messages it hands to
     * uplink_publish_control() go out first. */
    void (*online_cb)(void *arg, struct uplink *uplink);
    /* Optional: CONNACK @rc (MQTT 3.1.1 §3.2.2.3, not 0) in the cloud's own
     * words, or NULL for the generic text. Static strings only. */
    const char *(*connack_text_cb)(void *arg, struct uplink *uplink, int rc);
    /* Optional: may consecutive queued records for @topic be joined into one
     * PUBLISH (Cumulocity: SmartREST lines joined by "\n")? Return the
     * separator to put between payloads (a static string), and set
     * *@max_packet to the largest whole PUBLISH packet allowed, header
     * included (0: UPLINK_BATCH_MAX_BYTES); NULL: one record per publish.
     * Asked once per publish that starts with a spooled record. Only
     * records already queued are joined, never waited for. */
    const char *(*batch_cb)(void *arg, struct uplink *uplink, const char *topic,
                            size_t *max_packet);
    /* A message arrived from the cloud on one of the uplink's subscriptions. */
    void (*message_cb)(void *arg, struct uplink *uplink, const char *topic, const void *payload,
                       size_t len, int qos, bool retain);
    /* The state changed (after logging). Optional. Called in the middle of
     * the state machine: only read state here (status, sd_notify). */
    void (*state_cb)(void *arg, struct uplink *uplink, enum uplink_state state);
    void *arg;
};

/* uplink_publish_control() flags. */
#define UPLINK_CONTROL_GATE 0x1 /* no spooled data goes out until this is acknowledged */
#define UPLINK_CONTROL_CONNECTION                                                                  \
    0x2 /* belongs to the current connection: dropped when it
                                         ends (done_cb -ECONNRESET), never re-sent */
#define UPLINK_CONTROL_FRONT                                                                       \
    0x4 /* queued ahead of every control message without
                                         this flag (start-up messages before pending
                                         registrations) */

/** Counters for status. */
struct uplink_stats {
    uint64_t published;    /* records acknowledged (QoS>=1) or written (QoS 0) upstream */
    uint64_t publishes;    /* PUBLISH packets that carried them: fewer than published
                              when queued records were joined (uplink_hooks.batch_cb) */
    uint64_t received;     /* messages from the cloud */
    uint64_t dropped;      /* refused by uplink_publish() (spool full, I/O error) or unsendable */
    uint64_t dropped_qos0; /* QoS 0 dropped while offline (spool.qos0_offline: drop) */
    size_t queued;         /* in the spool, waiting or in flight (spool.depth) */
    size_t inflight;       /* records sent, waiting for PUBACK */
    double rate_in;        /* messages/s handed to the uplink, over the last second or so */
    double rate_out;       /* messages/s acknowledged (or written, QoS 0) upstream */
    struct spool_stats spool;
    uint64_t connects; /* successful CONNACKs */
    /* The client certificate (tls.cert, or the one a profile chose) of the
     * current or last connection attempt: its notAfter, 0 = none. */
    int64_t cert_expires_at;
    /* auth.type jwt only (0 / NULL otherwise): */
    int64_t token_expires_at; /* "exp" of the token of the current or last connection */
    int64_t token_refresh_at; /* when the session rotates to a new token (while ONLINE) */
    uint64_t rotations;       /* reconnects made to replace a token before it expired */
    const char *clock;        /* jwt_clock_state_name() of the last check: "ok",
                                 "before-build-date", "unsynchronised" (static string) */
};
#endif
