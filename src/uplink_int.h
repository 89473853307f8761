/* uplink_int.h - one cloud session's internals, shared by the uplink's files
 * and nothing else (uplink.h is the interface). The structs below are the
 * whole state; the prototypes are grouped by the file that defines them, so
 * this header is also the table of contents. The files are layered: each
 * calls only the ones below it (what a lower one must tell an upper one
 * goes through a callback the upper one hands down).
 *
 *   uplink.c          the public calls: create, start, publish, subscribe,
 *                     reconfigure, reload credentials, stop, free
 *   uplink_machine.c  the state machine and its driver: connection attempts,
 *                     the socket and TLS handshake, libmosquitto's callbacks,
 *                     backoff, JWT rotation and the clock checks
 *   uplink_send.c     the spool's records out within the window and the rate,
 *                     batching, control messages, subscriptions
 *   uplink_conn.c     one attempt's set-up on the threadpool: options, TLS
 *                     files, the JWT, connect_async
 *   uplink_creds.c    fingerprints of the credential files, and signing
 *   uplink_explain.c  why an attempt failed, in words
 *
 * The overview of how they work together is at the top of uplink.c.
 */
#ifndef UPLINKD_UPLINK_INT_H
#define UPLINKD_UPLINK_INT_H
#include "uplink.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "conf.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "record.h"
#include "sm.h"
#include "spool.h"
#include "tlscheck.h"
#include "util.h"

/* Unacknowledged QoS>=1 publishes per connection (and libmosquitto's send quota). */
/* mosquitto_loop_misc() period: keepalive granularity is one second anyway. */
#define UPLINK_TICK_MS 1000
/* TCP connect + TLS handshake + CONNACK must finish within this. */
#define UPLINK_CONNECT_TIMEOUT_MS 30000
/* A session that lasted this long (or saw a PUBACK) resets the backoff. */
#define UPLINK_STABLE_MS 10000
/* Floor for reconnect.base so a zero in the config cannot make a busy loop. */
#define UPLINK_MIN_BACKOFF_MS 100
/* Bound on mosquitto_loop_read() calls per readable event (conn_poll_cb). */
#define UPLINK_READ_ROUNDS 4096
#define UPLINK_ERROR_MAX   1024 /* the longest: a refused JWT with the profile's checklist */
#define UPLINK_CAPTURE_MAX 1024
/* JWT: how often an untrusted clock is checked again. */
#define UPLINK_CLOCK_RECHECK_MS 5000
/* JWT rotation: the longest wait for in-flight PUBACKs before DISCONNECT
 * (what is still unacknowledged then is re-sent on the next connection). */
#define UPLINK_ROTATE_DRAIN_MS 10000
/* JWT: wall clock and monotonic clock disagreeing by more than this since
 * a token was signed means the clock was stepped. */
#define UPLINK_CLOCK_STEP_MS 5000
/* JWT: how often a BACKOFF after a refused token looks for such a step. */
#define UPLINK_CLOCK_WATCH_MS 1000

/* Credential fingerprints: "" (not configured), "sha256:HEX" of a file's
 * bytes, "uri:HEX" (SHA-256 of a pkcs11: URI: the token's key cannot be
 * read, so the URI is what is compared), "pub:HEX" (the JWT key: SHA-256 of
 * the public key the signer really holds, so a re-encrypted copy of the same
 * key is no change) or "unreadable:WORDS". */
#define UPLINK_FP_SIZE 160

/* What tls.cert, tls.key, tls.ca and auth.key held when a connection was set
 * up; uplink_reload_credentials() compares the files on disk with it. */
struct uplink_creds {
    bool taken;
    char cert[UPLINK_FP_SIZE];
    char key[UPLINK_FP_SIZE];
    char ca[UPLINK_FP_SIZE];
    char jwt[UPLINK_FP_SIZE];
};

/* A publish handed to the current connection, waiting for its PUBACK: the
 * spool records first_seq..last_seq (several when joined, see uplink_conn_flush). */
struct uplink_inflight {
    int mid;
    uint64_t first_seq, last_seq;
    size_t records; /* records it carries (the range may hold skipped ones) */
};

struct uplink_sub {
    struct uplink_sub *next;
    char *filter;
    int qos;
    int mid; /* of the last SUBSCRIBE sent, to match the SUBACK */
};

/* libmosquitto's callbacks for a connection attempt. They are the state
 * machine's (uplink_machine.c); the set-up below it (uplink_conn.c)
 * installs the ones it is handed in uplink_conn_new(). */
struct uplink_mosq_cbs {
    void (*connect)(struct mosquitto *mosq, void *obj, int rc);
    void (*disconnect)(struct mosquitto *mosq, void *obj, int rc);
    void (*publish)(struct mosquitto *mosq, void *obj, int mid);
    void (*message)(struct mosquitto *mosq, void *obj, const struct mosquitto_message *m);
    void (*subscribe)(struct mosquitto *mosq, void *obj, int mid, int count, const int *granted);
};

/* How far a connection attempt got (conn_sm in uplink_conn.c):
 *
 *   SETUP --(worker connected)--> TCP --(SO_ERROR 0, TLS still to do)--> TLS
 *                                  |                                      |
 *                                  +--(plain, or handshake done)--> MQTT <+
 *   MQTT --(CONNACK)--> CONNACKED --(CONNACK 0 taken)--> ONLINE
 *
 * A failure ends the attempt in whatever phase it reached (conn->failed and
 * its words in conn->error): the explanation and the backoff ask how far it
 * got. Whether the threadpool holds the libmosquitto object is a separate
 * question (work_pending), true only during SETUP. */
enum conn_phase {
    CONN_SETUP,     /* made on the loop thread; the worker resolves and connects */
    CONN_TCP,       /* the non-blocking connect is not confirmed by SO_ERROR yet */
    CONN_TLS,       /* TCP is up; the TLS handshake runs */
    CONN_MQTT,      /* the transport is up; CONNECT goes out, CONNACK awaited */
    CONN_CONNACKED, /* CONNACK arrived (connack_rc), accepted or refused */
    CONN_ONLINE,    /* CONNACK 0 taken: the session is up */
};

/* What the uplink's rotate timer is for (rotate_sm in uplink_machine.c):
 *
 *   IDLE --(CONNACK 0 with a JWT)--> REFRESH --(refresh point)--> DRAINING
 *     ^  \                              |                            |
 *     |   +--(JWT refused)--> CLOCK_WATCH  +----(connection dropped)---+
 *     +------(backoff ends, clock stepped, stopping)--+--> IDLE
 *
 * REFRESH: ONLINE, waiting for the token's refresh point. DRAINING: ONLINE
 * but sending nothing new until the in-flight publishes are acknowledged or
 * the drain deadline passes, then a reconnect with a new token. CLOCK_WATCH:
 * BACKOFF after a refused JWT, watching for a wall-clock step. */
enum rotate_job {
    ROTATE_IDLE,
    ROTATE_REFRESH,
    ROTATE_DRAINING,
    ROTATE_CLOCK_WATCH,
};

/* One connection attempt: lives from RESOLVING until its poll handle closed. */
struct uplink_conn {
    struct uplink *uplink;
    const struct uplink_mosq_cbs *cbs; /* static, the state machine's */
    uv_work_t work;
    uv_poll_t poll;
    bool work_pending; /* the threadpool owns mosq until after_work */
    bool poll_init;
    int poll_events;
    struct mosquitto *mosq;

    /* Copies for the worker thread: the conf may be swapped meanwhile. */
    char *host;
    int port;
    int keepalive;
    unsigned window; /* uplinks[].max_inflight when the connection was made */
    char *client_id;
    bool clean_session;
    bool tls;
    bool ca_system;
    char *ca_file;
    char *cert;
    char *key;
    /* A pkcs11: tls.key's PIN file and module (tlscheck_key_options()). */
    char *key_pin_file;
    char *key_module;
    char *username;  /* NULL unless auth.type is basic or jwt */
    char *password;  /* jwt: the token, signed by the worker (conn_sign) */
    int tls_version; /* enum conf_tls_version */
    char *alpn;
    bool insecure;
    /* From the profile (uplink_hooks.session_cb): the last will and whether
     * this connection may send spooled data. */
    char *will_topic;
    void *will_payload;
    size_t will_len;
    int will_qos;
    bool will_retain;
    bool hold_spool;

    /* auth.type jwt: a signer of our own (its own key reference, so a
     * reload may free the conf while the worker signs) and copies of the
     * claims. */
    struct jwt_signer *signer;
    struct jwt_claims claims;
    char *jwt_aud;
    struct jwt_claim *jwt_extra;
    uint32_t refresh_percent;
    time_t token_signed_at;        /* wall clock given to jwt_sign() */
    uint64_t token_signed_mono_ms; /* util_now_ms() at the same moment */
    time_t token_expires_at;       /* the token's exp; 0 = no token */
    time_t cert_not_after;         /* the client certificate's notAfter (worker); 0 = none */
    /* Fingerprints of the credential files this attempt uses: jwt on the
     * loop thread (uplink_conn_copy_jwt), the TLS files by the worker just before
     * libmosquitto reads them. */
    struct uplink_creds creds;

    /* Results of the worker. */
    int connect_rc;
    int connect_errno;

    /* What libmosquitto logged at error/warning level (OpenSSL errors among
     * them); written by the worker, later by the loop thread, never both. */
    char captured[UPLINK_CAPTURE_MAX];
    size_t captured_len;

    struct sm sm;              /* enum conn_phase, see above */
    unsigned handshake_events; /* guard against a handshake that never progresses */
    int connack_rc;            /* from CONNACKED on */
    uint64_t online_since;     /* uv_now() when ONLINE */
    bool acked;                /* at least one PUBACK in this session */
    int disconnect_rc;         /* from on_disconnect, -1 = none */

    bool failed;
    char error[UPLINK_ERROR_MAX];
};

static inline enum conn_phase conn_phase_of(const struct uplink_conn *conn)
{
    return (enum conn_phase)sm_state(&conn->sm);
}

/* The session is up (CONNACK 0 taken). */
static inline bool conn_online(const struct uplink_conn *conn)
{
    return conn_phase_of(conn) == CONN_ONLINE;
}

/* A CONNACK arrived on this attempt (connack_rc is its code). */
static inline bool conn_connacked(const struct uplink_conn *conn)
{
    return conn_phase_of(conn) >= CONN_CONNACKED;
}

/* uplink_conn.c: move @conn to @to (checked against conn_sm and logged at
 * debug level with @reason). */
#define uplink_conn_move(conn, to, reason) sm_move(&(conn)->sm, (to), (reason))

struct uplink {
    uv_loop_t *loop;
    const struct conf_uplink *conf;
    char *name;
    char *gateway_id;
    struct uplink_hooks hooks; /* the owner's (router: messages, state) or, without a
                                  profile, a per-device session's owner's */
    /* The profile instance it owns (uplink_set_profile()), NULL for a
     * per-device session; instances a reload replaced, closed and kept
     * until uplink_free() because queued registrations point at them. */
    struct profile_instance *profile;
    struct profile_instance *retired_profiles;
    struct sm sm; /* enum uplink_state, see uplink_states */
    pthread_t loop_thread;

    uv_timer_t tick;   /* mosquitto_loop_misc() */
    uv_timer_t timer;  /* per state: connect timeout, backoff, stop deadline */
    uv_timer_t rotate; /* JWT: refresh point, then the drain deadline */
    bool handles_init;
    bool handles_closing;
    unsigned closing; /* close callbacks still to come */

    struct uplink_conn *conn;
    bool in_io;      /* inside a libmosquitto call that may run callbacks */
    bool in_service; /* uplink_service() is running */
    bool service_again;

    bool reconnect_requested;
    bool stop_deadline_passed;
    void (*done_cb)(struct uplink *uplink, void *arg);
    void *done_arg;

    uint64_t backoff_ms; /* previous sleep, for decorrelated jitter */

    /* JWT (see uplink_rotate_cb and uplink_clock_blocks). */
    struct sm rotate_sm;      /* enum rotate_job: what the rotate timer is for */
    uint64_t rotate_deadline; /* uv_now() when the drain gives up */
    bool clock_bad;           /* the last clock check failed (logged once) */
    bool clock_was_bad;       /* it failed since the last CONNACK 0 */
    bool resigned_at_once;    /* the one immediate re-sign after a rejection is used */
    /* After a refused JWT (ROTATE_CLOCK_WATCH): the refused token's signing
     * moment on both clocks. */
    time_t refused_signed_at;
    uint64_t refused_signed_mono_ms;
    /* Credentials (uplink_reload_credentials): what the last connection
     * attempt was set up with, and a newer auth.key than the conf's one
     * (owned; NULL = use conf->auth.jwt.private_key). */
    struct uplink_creds creds;
    EVP_PKEY *jwt_key;
    uint64_t rng;

    struct spool *spool; /* uplink_open_spool(), or in memory on first use */
    bool spool_closing;
    /* Publishes awaiting their PUBACK, a ring in send order: @inflight
     * entries from @inflight_head, acknowledged ones (mid -1) inside it until
     * everything older is acknowledged too. The window counts the whole span,
     * so an out-of-order PUBACK never lets more than the window out. */
    struct uplink_inflight *inflight_tab;
    size_t inflight_cap;     /* entries allocated: the window of the connection */
    size_t inflight_head;    /* oldest entry */
    size_t inflight;         /* span of the ring in use (publishes) */
    size_t inflight_records; /* records the unacknowledged ones carry */
    char *topic_buf;         /* NUL-terminated copy of a spool record's topic */
    char *batch_buf;         /* joined payloads (uplink_batch_take), batch_cap bytes */
    size_t batch_cap;

    /* rate: token buckets refilled from uv_now(); when they run dry the
     * sender waits for the next event (a PUBACK, or the 1 s tick). */
    double msg_tokens, byte_tokens;
    uint64_t tokens_at;
    /* Rates for status: counts over a window of at least a second. */
    uint64_t in_count, out_count, in_mark, out_mark, rate_since;
    double rate_in, rate_out;
    struct uplink_sub *subs;
    struct uplink_control *controls; /* uplink_publish_control(), in order */

    char last_error[UPLINK_ERROR_MAX];
    struct uplink_stats stats;
    uint64_t cert_warned_ms; /* util_now_ms() of the last "certificate expires" warning, 0 = none */
};

/* A message of uplink_publish_control(), sent ahead of the spool. */
struct uplink_control {
    struct uplink_control *next;
    char *topic;
    void *payload;
    size_t len;
    int qos;
    unsigned flags;
    bool sent; /* handed to libmosquitto on the current connection */
    int mid;
    void (*done_cb)(void *arg, int status);
    void *arg;
};

/* uplink.c: the public calls only (uplink.h). */

/* uplink_machine.c */

/* The uplink's state table (enum uplink_state) and its invariant. */
extern const struct sm_conf uplink_sm;
extern const struct sm_conf uplink_rotate_sm;

static inline enum rotate_job uplink_rotate_job(const struct uplink *uplink)
{
    return (enum rotate_job)sm_state(&uplink->rotate_sm);
}

/* ONLINE but draining for a JWT rotation: nothing new is sent. */
static inline bool uplink_draining(const struct uplink *uplink)
{
    return uplink_rotate_job(uplink) == ROTATE_DRAINING;
}

/* The current state (read on every send: inline). */
static inline enum uplink_state uplink_state_of(const struct uplink *uplink)
{
    return (enum uplink_state)sm_state(&uplink->sm);
}

/* Move to @to (checked against uplink_states, logged with the reason @fmt);
 * returns 0, or -EINVAL for a move the table forbids (a bug, logged). */
int uplink_set_state(struct uplink *uplink, enum uplink_state to, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Rates for status over windows of at least a second. */
void uplink_rates_update(struct uplink *uplink);

/* JWT: true when the clock cannot be trusted to sign (RFC 7519 §4.1.4/6: a
 * token from a wrong clock is refused or expires at once). Then the uplink
 * waits in BACKOFF and checks again every UPLINK_CLOCK_RECHECK_MS; the
 * problem is logged once, and its end too. */
bool uplink_clock_blocks(struct uplink *uplink);

/* BACKOFF/IDLE -> RESOLVING: start a connection attempt on the threadpool. */
void uplink_connect(struct uplink *uplink, const char *reason);

/* The per-state timer: connect timeout, end of backoff, stop deadline. */
void uplink_timer_cb(uv_timer_t *timer);

/* Act on whatever the last event changed. Never runs inside a libmosquitto
 * callback (in_io) and never nests: API calls from hooks just ask again. */
void uplink_service(struct uplink *uplink);

/* uplink_send.c */

/* Send spooled records while the window, the rate and the profile allow. */
void uplink_conn_flush(struct uplink_conn *conn);

/* Free a control message. */
void uplink_control_free(struct uplink_control *c);

/* uplink_conn_publish_cb(): true when @mid was a control message. */
bool uplink_control_acked(struct uplink *uplink, int mid);

/* The connection ended: per-connection messages go, the rest is re-sent
 * (first) on the next one. @status for the dropped ones. */
void uplink_control_reset(struct uplink *uplink, bool drop_all, int status);

/* Send what is not sent yet, in order, within the rate limit. Returns true
 * while spooled data must wait: a UPLINK_CONTROL_GATE message is not sent
 * (out of tokens) or not acknowledged yet. */
bool uplink_conn_flush_control(struct uplink_conn *conn);

/* After CONNACK 0: SUBSCRIBE every filter of the uplink again. */
void uplink_conn_subscribe_all(struct uplink_conn *conn);

/* Write what libmosquitto has queued, if the socket takes it. */
void uplink_conn_write(struct uplink_conn *conn);

/* true when an acknowledgement means on disk (spool.durability fsync). */
bool uplink_durable(const struct uplink *uplink);

/* What a graceful stop waits for: in-flight records (durable: the rest
 * survives in the spool), or everything (memory spool). */
size_t uplink_unsent(const struct uplink *uplink);

/* uplink_conn.c */

/* Free an attempt whose handles are closed and whose worker is done. */
void uplink_conn_free(struct uplink_conn *conn);

/* Loop thread: what the worker needs to sign this attempt's token. */
int uplink_conn_copy_jwt(struct uplink_conn *conn, const struct conf_jwt *jwt);

/* A new attempt with copies of everything the worker needs (the conf may
 * be swapped while it runs); NULL when out of memory. */
struct uplink_conn *uplink_conn_new(struct uplink *uplink, const struct uplink_mosq_cbs *cbs);

/* Threadpool: set up the mosquitto object and start connect_async. */
void uplink_conn_work_cb(uv_work_t *req);

/* uplink_creds.c */

/* jwt_sign() under the process-wide signing lock: one signature at a time
 * (a signer is not thread-safe, and PKCS#11 keys of several uplinks may
 * share one token session). Any thread. */
int uplink_creds_sign(struct jwt_signer *signer, const struct jwt_claims *claims, time_t now,
                      char **token, time_t *expires_at, char *err, size_t err_size);

/* "sha256:HEX" of the bytes of @path, or "unreadable:WHY". Any thread. */
void uplink_creds_fp_file(const char *path, char out[UPLINK_FP_SIZE]);

/* A key spec: a pkcs11: URI by its text (the key stays in the token), a
 * file by its bytes. */
void uplink_creds_fp_key_spec(const char *spec, char out[UPLINK_FP_SIZE]);

/* auth.key: the public half of the key a signer holds (@key), or the URI. */
void uplink_creds_fp_jwt_key(const EVP_PKEY *key, const char *spec, char out[UPLINK_FP_SIZE]);

/* Threadpool, before libmosquitto reads the TLS files: if one changes in
 * between, the next check sees a difference and reconnects once more,
 * which is harmless; the other order could miss a change. */
void uplink_conn_take_creds(struct uplink_conn *conn);

/* Whether the fingerprint @now differs from @before; if so, @name is added
 * to the comma-separated @list (of @size bytes) for the log line. */
bool uplink_creds_changed(const char *now, const char *before, char *list, size_t size,
                          const char *name);

/* The start-up checks on the files now on disk, for what changed. A new
 * auth.key that passes goes to *@jwt_key_out (the caller owns it). */
int uplink_creds_check(const struct conf_uplink *conf, bool tls_changed, bool ca_changed,
                       EVP_PKEY *jwt_key, char *err, size_t err_size, char *warning,
                       size_t warning_size);

/* uplink_explain.c */

/* Set the last error that status and the state callback report. */
void uplink_set_error(struct uplink *uplink, const char *text);

/* Record the first failure of a connection; uplink_service() acts on it. */
void uplink_conn_fail(struct uplink_conn *conn, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The likely fix for a socket errno, as " (...)", or "". */
const char *uplink_errno_hint(int err);

/* One line for a TLS failure: what failed, with which host, and the fix. */
void uplink_conn_explain_tls(struct uplink_conn *conn);

/* A wall-clock time as "YYYY-MM-DD HH:MM:SS UTC" into @buf; returns @buf. */
const char *uplink_format_utc(time_t t, char *buf, size_t size);

/* An established connection ended (EOF, reset, or a TLS read error without
 * details, which libmosquitto turns into EPROTO). */
void uplink_conn_explain_closed(struct uplink_conn *conn, int err);

/* A libmosquitto call returned @rc or closed the socket: say why in words. */
void uplink_conn_explain_rc(struct uplink_conn *conn, int rc, int err);

/* After any libmosquitto call on a live connection. */
void uplink_conn_check(struct uplink_conn *conn, int rc, int err);

/* uplink_ask.c: what the uplink asks its profile instance when it has one
 * (every configured uplink), else its hooks (a per-device session, whose
 * profile drives it from outside). */
bool uplink_asks_session(const struct uplink *uplink);
void uplink_ask_session(struct uplink *uplink, struct uplink_session *session);
void uplink_tell_online(struct uplink *uplink);
void uplink_tell_offline(struct uplink *uplink);
const char *uplink_ask_connack_text(struct uplink *uplink, int rc);
const char *uplink_ask_batch(struct uplink *uplink, const char *topic, size_t *max_packet);

/* uplink_machine.c: close the instances when the uplink stops (counted in
 * uplink->closing), and the close callback of every instance it closes. */
void uplink_profiles_close(struct uplink *uplink);
void uplink_profile_closed_cb(struct profile_instance *pi);

#endif
