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
#include <time.h>
#include <uv.h>

#include "spool.h"
#include "uplink_types.h" /* states, session, hooks, stats, control flags */

struct conf;
struct conf_uplink;
struct profile;
struct profile_instance;
struct uplink;

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
 * uplink_set_profile() - give the uplink its profile instance, or adopt a
 * reloaded conf in it: the first call makes an instance of @profile
 * (profile_instance_new(), with the uplink's port) before uplink_start();
 * a later one with the same @profile reconfigures it for @conf, and one
 * with another @profile (a reload changed it) retires the old instance
 * (closed, its cloud filters dropped, freed with the uplink) and makes a
 * new one. Either way the instance's cloud subscriptions are brought in
 * line afterwards. The uplink asks the instance for every session, CONNACK
 * text, batch and on-connect message from then on, tells it when the
 * connection ends, and closes it when stopping.
 * @deliver, @deliver_arg: where the instance's local messages go (the
 * router's local_deliver()).
 * Returns 0, or -ENOMEM/-ENOENT/the registry's error (logged; the uplink
 * goes on with the old instance, or with none).
 */
int uplink_set_profile(struct uplink *uplink, const struct profile *profile,
                       const struct conf *conf,
                       void (*deliver)(void *arg, const char *topic, const void *payload,
                                       size_t len, int qos, bool retain),
                       void *deliver_arg);

/** uplink_profile() - the profile instance the uplink owns, or NULL. */
struct profile_instance *uplink_profile(const struct uplink *uplink);

/**
 * uplink_open_spool() - open and recover the uplink's spool in
 * <@state_dir>/spool/<name> (spool.durability fsync), or an in-memory one
 * (durability none, or @state_dir NULL). Call it after uplink_new() and
 * before uplink_start(); recovery runs synchronously (before READY=1). An
 * uplink whose owner never calls it gets a memory spool on first use.
 * Returns 0, -EALREADY, or the spool's error (logged with the path).
 */
int uplink_open_spool(struct uplink *uplink, const char *state_dir);

/**
 * uplink_open_spool_dir() - uplink_open_spool() with the spool directory
 * given (@dir, borrowed, created when missing) instead of derived from the
 * uplink's name: per-device sessions (child_sessions.c) keep theirs under
 * their uplink's. @dir NULL, or spool.durability none: in memory.
 * Returns as uplink_open_spool().
 */
int uplink_open_spool_dir(struct uplink *uplink, const char *dir);

/* Joined publishes (its profile's batch_separator_cb): at most this many records, and
 * this many bytes when the hook states no packet limit. */
#define UPLINK_BATCH_MAX_RECORDS 64
#define UPLINK_BATCH_MAX_BYTES   (64 * 1024)

/* uplink_publish_async() return value: @done_cb will be called. */
#define UPLINK_PUBLISH_PENDING 1

/**
 * uplink_publish_async() - hand a message to the uplink.
 * QoS >= 1: appended to the spool; it is sent in order at QoS 1 (QoS 2 too:
 * at least once is what holds across reconnects) and leaves the spool only
 * on the broker's PUBACK; unacknowledged records are re-sent after a
 * reconnect, and after a restart with a durable spool. QoS 0: straight
 * upstream while ONLINE; otherwise dropped and counted (stats.dropped_qos0)
 * or, with spool.qos0_offline: spool, spooled.
 * Copies topic and payload.
 * Returns 0 (taken; nothing to wait for: QoS 0 or a memory spool),
 * UPLINK_PUBLISH_PENDING: @done_cb(@arg, status) follows exactly once from
 * the loop, status 0 once the record is durable (the local client may be
 * acknowledged now) or a negative errno (not durable: do not acknowledge;
 * -ECANCELED when the uplink stopped first). Or a negative errno and the
 * message was not taken: -ENOBUFS (spool full and its waiting room too),
 * -ENOSPC/-EIO (the spool cannot write; it retries by itself), -EINVAL (qos
 * not 0..2, topic with wildcards, empty or not UTF-8), -EMSGSIZE (larger
 * than an MQTT packet or than a quarter of spool.max_bytes), -ESHUTDOWN
 * (stopping), -ENOMEM.
 */
int uplink_publish_async(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, bool retain, void (*done_cb)(void *arg, int status), void *arg);

/**
 * uplink_publish() - uplink_publish_async() for a caller that does not wait
 * for durability: UPLINK_PUBLISH_PENDING is reported as 0.
 */
int uplink_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                   int qos, bool retain);

/**
 * uplink_publish_control() - a message that goes out before anything in the
 * spool: registration of a child (Cumulocity 101, GCP attach), start-up
 * messages after CONNACK, bootstrap requests. Kept in memory in order; sent
 * when ONLINE (and not draining for a JWT rotation); a QoS 1 one that is
 * not acknowledged when the connection ends is sent again first on the next
 * one (unless UPLINK_CONTROL_CONNECTION). Copies topic and payload.
 * @done_cb (may be NULL): called once from the loop with 0 when the broker
 * acknowledged it (QoS 0: when written), -ECONNRESET (CONNECTION message,
 * connection ended), -ECANCELED (uplink stopping) or -EINVAL (libmosquitto
 * refused it: too large, bad UTF-8). Not called when the uplink is freed.
 * Returns 0, -EINVAL (qos not 0/1, bad topic), -ENOTCONN (QoS 0 or
 * CONNECTION while not ONLINE), -ESHUTDOWN (stopping) or -ENOMEM.
 */
int uplink_publish_control(struct uplink *uplink, const char *topic, const void *payload,
                           size_t len, int qos, unsigned flags,
                           void (*done_cb)(void *arg, int status), void *arg);

/**
 * uplink_reconnect() - drop the current connection (DISCONNECT when online)
 * and connect again at once, e.g. with credentials a profile just received.
 * @reason is logged. Ignored when stopping or idle.
 */
void uplink_reconnect(struct uplink *uplink, const char *reason);

/** uplink_loop() - the loop the uplink runs on (for a profile's timers). */
uv_loop_t *uplink_loop(const struct uplink *uplink);

/** uplink_get_conf() - the uplink's current conf section (borrowed). */
const struct conf_uplink *uplink_get_conf(const struct uplink *uplink);

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

/* uplink_reload_credentials() results (a refusal is a negative errno). */
#define UPLINK_CREDS_UNCHANGED 0
#define UPLINK_CREDS_CHANGED   1

/**
 * uplink_reload_credentials() - compare tls.cert, tls.key, tls.ca and
 * auth.key (JWT) on disk with what the last connection attempt was set up
 * with: SHA-256 of the file bytes; a pkcs11: URI by its text; auth.key by
 * its public key (a re-encrypted copy of the same key is no change). When
 * something changed, the new files get the start-up checks first (tlscheck:
 * key matches the certificate, chain valid now, the profile's CN; tls.ca
 * holds a certificate; auth.key loads and signs with auth.alg); only when
 * they pass does the uplink reconnect (uplink_reconnect(): in-flight
 * messages are re-sent, the spool is kept), with a changed auth.key used
 * for every token from then on. For SIGHUP (conf unchanged) and `uplinkctl
 * reload-credentials`. Reads the files on the calling (loop) thread.
 * @report: one line in words (what changed, or why refused), also logged:
 *          info when unchanged, notice when changed, error when refused.
 * Returns UPLINK_CREDS_UNCHANGED (also when no attempt was made yet),
 * UPLINK_CREDS_CHANGED (reconnecting), or the check's negative errno
 * (-EKEYREJECTED, -EKEYEXPIRED, -ERANGE, -EPERM, -ENOENT, -ENOKEY,
 * -EINVAL...): the session goes on with the credentials it has.
 */
int uplink_reload_credentials(struct uplink *uplink, char *report, size_t report_size);

/**
 * uplink_sign_jwt() - the token the uplink would send if it connected now:
 * same key (including one installed by uplink_reload_credentials()), alg,
 * kid, aud and profile claims, same clock check. Signs on the calling
 * (loop) thread under the lock the connection attempts use.
 * @token_out: malloc'd token the caller frees (and should wipe).
 * @expires_at: its exp; may be NULL.
 * Returns 0, -ENOKEY (the uplink does not use JWT auth), JWT_ECLOCK (the
 * clock cannot be trusted), or jwt_sign()'s error, with @err in words.
 */
int uplink_sign_jwt(struct uplink *uplink, char **token_out, time_t *expires_at, char *err,
                    size_t err_size);

/**
 * uplink_stop() - graceful stop: when ONLINE, wait up to @timeout_ms for the
 * PUBACKs of what is in flight (with a memory spool: send the whole queue and
 * wait for it); then send DISCONNECT and close the socket. When not ONLINE
 * it does not connect again. @done_cb
 * runs from the loop when all handles are closed (also when a threadpool
 * connect was running: it is waited for) and the spool has committed what
 * was pending; then uplink_free(), which may be called from @done_cb.
 * Messages still queued stay in a durable spool for the next start; with
 * spool.durability none they are dropped with the uplink.
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

void uplink_get_stats(const struct uplink *uplink, struct uplink_stats *out);

#endif
