/* uplink.h - one session to a cloud MQTT broker over TLS (libmosquitto).
 *
 * libmosquitto is driven from the libuv loop: a uv_poll on mosquitto_socket()
 * (re-created after every reconnect), mosquitto_loop_read/write/misc, and
 * mosquitto_want_write(); no mosquitto_loop_start() thread. DNS resolution
 * and the TCP connect run on the libuv threadpool so a DNS stall never
 * freezes local clients. Reconnects use decorrelated-jitter backoff.
 *
 * States (every transition is checked against a table and logged with the
 * reason in words):
 *   IDLE -> RESOLVING (threadpool connect) -> CONNECTING (TLS + CONNECT sent)
 *   -> ONLINE -> (BACKOFF -> RESOLVING ...) ; any -> STOPPING -> STOPPED
 *
 * Threading: every function here must be called from the loop thread. The
 * hooks run on the loop thread too. A hook may call uplink_publish(),
 * uplink_subscribe() and uplink_unsubscribe(); the work they cause is done
 * when the current event has been handled. A hook must not call
 * uplink_free().
 */
#ifndef UPLINKD_UPLINK_H
#define UPLINKD_UPLINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct conf_uplink;
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

struct uplink_hooks {
    /* A message arrived from the cloud on one of the uplink's subscriptions. */
    void (*message_cb)(void *arg, struct uplink *uplink, const char *topic, const void *payload,
                       size_t len, int qos, bool retain);
    /* The state changed (after logging). Optional. Called in the middle of
     * the state machine: only read state here (status, sd_notify). */
    void (*state_cb)(void *arg, struct uplink *uplink, enum uplink_state state);
    void *arg;
};

/**
 * uplink_new() - create a session object; does not connect.
 * @conf: borrowed; must outlive the uplink or be replaced with
 *        uplink_reconfigure().
 * @gateway_id: borrowed; copied (the client id when conf has none).
 * @hooks: copied; may be NULL.
 * Only values are checked here (keepalive range, cert without key, ...);
 * files (tls.ca/cert/key) are read on every connection attempt, on the
 * threadpool, and a problem with them is reported as that attempt's error.
 * Returns 0, -ENOMEM, or -EINVAL (an invalid setting; logged).
 */
int uplink_new(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
               const struct uplink_hooks *hooks, struct uplink **out);

/**
 * uplink_start() - begin connecting (IDLE -> RESOLVING). From then on the
 * uplink reconnects by itself until uplink_stop().
 * Returns 0, -EALREADY when not IDLE, or a libuv error.
 */
int uplink_start(struct uplink *uplink);

/**
 * uplink_publish() - queue a message for the cloud. While offline messages
 * wait in a bounded in-memory queue (conf max_queued) and are sent in order
 * after the next CONNACK; QoS >= 1 messages stay queued until the broker's
 * PUBACK and are re-sent after a reconnect (at least once: a message whose
 * PUBACK was lost is sent again, without DUP, on the new connection). QoS 2
 * is accepted and is at-least-once across reconnects. Copies topic and
 * payload.
 * Returns 0, -ENOBUFS when the queue is full (the caller logs and counts the
 * drop), -EINVAL (qos not 0..2, topic with wildcards, empty or not UTF-8),
 * -EMSGSIZE (larger than an MQTT packet can be), -ESHUTDOWN (stopping),
 * -ENOMEM.
 */
int uplink_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                   int qos, bool retain);

/**
 * uplink_subscribe() / uplink_unsubscribe() - add or drop a cloud-side
 * subscription. The set is remembered and re-sent after every reconnect
 * (subscribing again to a known filter changes its QoS). A SUBACK failure
 * (0x80) is logged and becomes uplink_last_error(). Copies @filter.
 * Returns 0, -EINVAL (invalid filter or qos), -ENOENT (unsubscribe: not
 * subscribed), -ENOMEM.
 */
int uplink_subscribe(struct uplink *uplink, const char *filter, int qos);
int uplink_unsubscribe(struct uplink *uplink, const char *filter);

/**
 * uplink_reconfigure() - adopt a changed conf section. When the session would
 * differ (conf_uplink_equal() false) the uplink disconnects cleanly and
 * reconnects with the new settings at once; queued messages are kept and
 * unacknowledged ones are re-sent.
 * @conf: borrowed like in uplink_new(); the old one may be freed as soon as
 *        this returns (nothing keeps pointers into it). The name must stay.
 * Returns 0.
 */
int uplink_reconfigure(struct uplink *uplink, const struct conf_uplink *conf);

/**
 * uplink_stop() - graceful stop: when ONLINE, keep sending the queue and wait
 * up to @timeout_ms until every queued and in-flight publish is
 * acknowledged; then send DISCONNECT and close the socket. When not ONLINE
 * it does not connect again. @done_cb
 * runs from the loop when all handles are closed (also when a threadpool
 * connect was running: it is waited for); then uplink_free(), which may be
 * called from @done_cb. Messages still queued are dropped with the uplink.
 * Legal in every state; a second call is ignored (logged).
 */
void uplink_stop(struct uplink *uplink, unsigned timeout_ms,
                 void (*done_cb)(struct uplink *uplink, void *arg), void *arg);

/**
 * uplink_free() - free after uplink_stop() finished, or an uplink that was
 * never started. NULL is allowed. Anything else is a bug: logged, and the
 * uplink is leaked rather than freed under the loop's feet.
 */
void uplink_free(struct uplink *uplink);

/** uplink_name() - the configured name (borrowed). */
const char *uplink_name(const struct uplink *uplink);

/** uplink_get_state() / uplink_state_name() - current state and its name. */
enum uplink_state uplink_get_state(const struct uplink *uplink);
const char *uplink_state_name(enum uplink_state state);

/**
 * uplink_last_error() - the last failure in words, or "" (borrowed, valid
 * until the next loop event). It is the same line that was logged, e.g.
 * "TLS handshake with HOST:PORT failed: certificate verify failed: ...", and
 * it is kept after a later successful connect (it is the *last* error).
 */
const char *uplink_last_error(const struct uplink *uplink);

/** Counters for status. */
struct uplink_stats {
    uint64_t published; /* acknowledged (QoS>=1) or written (QoS 0) upstream */
    uint64_t received;  /* messages from the cloud */
    uint64_t dropped;   /* refused by uplink_publish() because the queue was full */
    size_t queued;      /* waiting or in flight */
    uint64_t connects;  /* successful CONNACKs */
};
void uplink_get_stats(const struct uplink *uplink, struct uplink_stats *out);

#endif
