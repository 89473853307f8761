/* uplink.c - one session to a cloud MQTT broker (libmosquitto driven by libuv).
 *
 * Shape of a session
 * ------------------
 * Every connection attempt gets its own struct uplink_conn with a fresh
 * struct mosquitto. The attempt starts on the libuv threadpool
 * (conn_work_cb): mosquitto_new(), options, TLS files, then
 * mosquitto_connect_async(), which resolves the host (getaddrinfo may stall
 * for many seconds), starts a non-blocking TCP connect, creates the SSL
 * object (SNI = the host we pass, i.e. conf->host) and queues CONNECT. While
 * that work runs the loop thread never touches conn->mosq; the state
 * RESOLVING says so. conn_after_work_cb() then puts a uv_poll on
 * mosquitto_socket(), a new one for every attempt because the fd changes.
 *
 * With an external loop libmosquitto 2.0.11 needs help in three places
 * (lib/loop.c, lib/net_mosq.c, lib/packet_mosq.c):
 *  - the non-blocking connect: mosquitto_connect_async() returns success while
 *    the TCP connect is still in progress, and a refused connect later shows
 *    up in SSL_connect() as SSL_ERROR_SYSCALL, which net__socket_connect_tls()
 *    treats as "try again". So we poll for WRITABLE first and read SO_ERROR
 *    ourselves (conn->tcp_pending).
 *  - the TLS handshake: it continues only inside mosquitto_loop_read() (when
 *    mosq->want_connect is set); mosquitto_loop_write() does nothing while the
 *    handshake runs. mosquitto_want_write() can stay true from an earlier
 *    SSL_ERROR_WANT_WRITE, so during the handshake we ask OpenSSL directly
 *    (SSL_want_write() on mosquitto_ssl_get()) which direction to wait for,
 *    and call mosquitto_loop_read() on either event. A handshake that fails
 *    with SSL_ERROR_SYSCALL (peer closed) leaves SSL_want() == SSL_NOTHING;
 *    we detect that, or we would spin on a readable EOF.
 *  - writes: packets queued from inside a libmosquitto callback are not
 *    written at once, so after every event we try mosquitto_loop_write() when
 *    mosquitto_want_write() says so, and poll for WRITABLE only when that
 *    write hit EAGAIN (plain TCP) or OpenSSL wants to write.
 * A uv_timer calls mosquitto_loop_misc() once a second for keepalive pings.
 *
 * Message queue and reconnects
 * ----------------------------
 * Every QoS>=1 message goes through the uplink's spool (spool.h): durable on
 * disk with spool.durability fsync, in memory with none. uplink_publish()
 * appends; the local acknowledgement waits for the spool's group commit
 * (UPLINK_PUBLISH_PENDING and the done callback). When ONLINE we take
 * records from the spool in order (spool_next) and hand them to
 * mosquitto_publish() at QoS 1, at most max_inflight unacknowledged at
 * a time (the same number is libmosquitto's send quota, so libmosquitto never
 * holds back a message we count as sent), within the rate limit. A record
 * leaves the spool only on on_publish() (PUBACK) for its mid (spool_ack).
 * When the profile allows it (uplink_hooks.batch_cb, Cumulocity SmartREST)
 * a run of records already queued for one topic goes out as one PUBLISH;
 * its PUBACK then releases them all (uplink_batch_take, spool_ack_range).
 * QoS 0 messages go straight to libmosquitto while ONLINE; offline they are
 * dropped and counted, or spooled (spool.qos0_offline) and then sent at QoS 0.
 *
 * Choice on re-sending: libmosquitto keeps its own outgoing QoS>=1 state in
 * the mosq object across mosquitto_reconnect*() and re-sends it after CONNACK
 * (message__retry_check() in lib/messages_mosq.c), whatever clean_session
 * says. Because we destroy the mosq object after every connection, that state
 * dies with it and the spool is the only copy: after a reconnect we re-publish
 * every unacknowledged message ourselves (spool_rewind), in the original
 * order, with new packet ids. Nothing is sent twice by both of us, nothing is lost when
 * libmosquitto drops its state, and a changed configuration or a rotated
 * password simply means the next mosq object is built differently. The cost:
 * a re-sent message does not carry DUP=1 (MQTT 3.1.1 §3.3.1.1 only asks for
 * DUP within one session's retransmission) and QoS 2 is at-least-once across
 * reconnects. Both are within "at least once", which is what we promise.
 */
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
 * spool records first_seq..last_seq (several when joined, see conn_flush). */
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

/* One connection attempt: lives from RESOLVING until its poll handle closed. */
struct uplink_conn {
    struct uplink *uplink;
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
    /* Fingerprints of the credential files this attempt uses: jwt on the
     * loop thread (conn_copy_jwt), the TLS files by the worker just before
     * libmosquitto reads them. */
    struct uplink_creds creds;

    /* Results of the worker. */
    int connect_rc;
    int connect_errno;

    /* What libmosquitto logged at error/warning level (OpenSSL errors among
     * them); written by the worker, later by the loop thread, never both. */
    char captured[UPLINK_CAPTURE_MAX];
    size_t captured_len;

    bool tcp_pending;          /* non-blocking connect not yet confirmed by SO_ERROR */
    bool tls_done;             /* handshake finished (logged once) */
    unsigned handshake_events; /* guard against a handshake that never progresses */
    bool connack_seen;
    int connack_rc;
    bool online;
    uint64_t online_since; /* uv_now() */
    bool acked;            /* at least one PUBACK in this session */
    int disconnect_rc;     /* from on_disconnect, -1 = none */

    bool failed;
    char error[UPLINK_ERROR_MAX];
};

struct uplink {
    uv_loop_t *loop;
    const struct conf_uplink *conf;
    char *name;
    char *gateway_id;
    struct uplink_hooks hooks;
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
    bool rotating;            /* ONLINE but draining: nothing new is sent */
    uint64_t rotate_deadline; /* uv_now() when the drain gives up */
    bool clock_bad;           /* the last clock check failed (logged once) */
    bool clock_was_bad;       /* it failed since the last CONNACK 0 */
    bool resigned_at_once;    /* the one immediate re-sign after a rejection is used */
    /* After a refused JWT: the rotate timer watches for a wall-clock step
     * while in BACKOFF (uplink_clock_watch); the refused token's signing
     * moment on both clocks. */
    bool clock_watch;
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
};

static void uplink_service(struct uplink *uplink);
static bool uplink_control_acked(struct uplink *uplink, int mid);
static void uplink_control_reset(struct uplink *uplink, bool drop_all, int status);
static bool uplink_durable(const struct uplink *uplink);
static size_t uplink_unsent(const struct uplink *uplink);

/* --- state machine ------------------------------------------------------ */

/* The uplink's states (uplink.h, enum uplink_state):
 *
 *     IDLE --> RESOLVING --> CONNECTING --> ONLINE
 *       |          |              |           |
 *       |          v              v           v
 *       +------> BACKOFF <--------+-----------+
 *                  |  ^
 *                  |  +-- (every failure; then RESOLVING again)
 *                  v
 *     any state but STOPPED --> STOPPING --> STOPPED
 *
 * IDLE -> BACKOFF: a JWT uplink whose clock cannot be trusted yet. */
static const struct sm_state uplink_states[] = {
    [UPLINK_IDLE] = {"IDLE",
                     SM_TO(UPLINK_RESOLVING) | SM_TO(UPLINK_BACKOFF) | SM_TO(UPLINK_STOPPING)},
    [UPLINK_RESOLVING] = {"RESOLVING", SM_TO(UPLINK_CONNECTING) | SM_TO(UPLINK_BACKOFF) |
                                           SM_TO(UPLINK_STOPPING)},
    [UPLINK_CONNECTING] = {"CONNECTING",
                           SM_TO(UPLINK_ONLINE) | SM_TO(UPLINK_BACKOFF) | SM_TO(UPLINK_STOPPING)},
    [UPLINK_ONLINE] = {"ONLINE", SM_TO(UPLINK_BACKOFF) | SM_TO(UPLINK_STOPPING)},
    [UPLINK_BACKOFF] = {"BACKOFF", SM_TO(UPLINK_RESOLVING) | SM_TO(UPLINK_STOPPING)},
    [UPLINK_STOPPING] = {"STOPPING", SM_TO(UPLINK_STOPPED)},
    [UPLINK_STOPPED] = {"STOPPED", 0},
};

static const char *uplink_sm_uplink(const struct sm *sm)
{
    return container_of(sm, struct uplink, sm)->name;
}

/* What each state promises about the connection attempt. */
static bool uplink_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct uplink *uplink = container_of(sm, struct uplink, sm);
    const struct uplink_conn *conn = uplink->conn;

    switch ((enum uplink_state)sm_state(sm)) {
    case UPLINK_RESOLVING:
    case UPLINK_CONNECTING:
        if (conn == NULL) {
            snprintf(why, size, "no connection attempt");
            return false;
        }
        return true;
    case UPLINK_ONLINE:
        if (conn == NULL || !conn->online || conn->work_pending) {
            snprintf(why, size, "online without an online connection");
            return false;
        }
        return true;
    case UPLINK_STOPPED:
        if (uplink->closing != 0) {
            snprintf(why, size, "%u close callbacks still to come", uplink->closing);
            return false;
        }
        return true;
    default:
        return true;
    }
}

static const struct sm_conf uplink_sm = {
    .states = uplink_states,
    .count = ARRAY_SIZE(uplink_states),
    .level = LOG_NOTICE,
    .uplink = uplink_sm_uplink,
    .invariant = uplink_sm_invariant,
};

static enum uplink_state state_of(const struct uplink *uplink)
{
    return (enum uplink_state)sm_state(&uplink->sm);
}

const char *uplink_state_name(enum uplink_state state)
{
    return sm_state_name(&uplink_sm, (unsigned)state);
}

/* Move to @to, logging the reason; an illegal move is a bug and is refused. */
static int uplink_set_state(struct uplink *uplink, enum uplink_state to, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int uplink_set_state(struct uplink *uplink, enum uplink_state to, const char *fmt, ...)
{
    char reason[UPLINK_ERROR_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);

    if (sm_move(&uplink->sm, to, reason) < 0)
        return -EINVAL;
    if (uplink->hooks.state_cb)
        uplink->hooks.state_cb(uplink->hooks.arg, uplink, to);
    return 0;
}

/* --- small helpers ------------------------------------------------------ */

static uint64_t uplink_random(struct uplink *uplink)
{
    /* xorshift64*: jitter only needs to differ between gateways, not be secret. */
    uint64_t x = uplink->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    uplink->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t uplink_random_between(struct uplink *uplink, uint64_t lo, uint64_t hi)
{
    if (hi <= lo)
        return lo;
    return lo + uplink_random(uplink) % (hi - lo + 1);
}

static void uplink_set_error(struct uplink *uplink, const char *text)
{
    snprintf(uplink->last_error, sizeof(uplink->last_error), "%s", text);
}

static bool conn_on_loop_thread(const struct uplink_conn *conn)
{
    return pthread_equal(pthread_self(), conn->uplink->loop_thread);
}

/* Record the first failure of a connection; uplink_service() acts on it. */
static void conn_fail(struct uplink_conn *conn, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void conn_fail(struct uplink_conn *conn, const char *fmt, ...)
{
    va_list ap;

    if (conn->failed)
        return;
    conn->failed = true;
    va_start(ap, fmt);
    vsnprintf(conn->error, sizeof(conn->error), fmt, ap);
    va_end(ap);
}

/* Rates for status over windows of at least a second. */
static void uplink_rates_update(struct uplink *uplink)
{
    uint64_t now = uv_now(uplink->loop);
    uint64_t elapsed = now - uplink->rate_since;

    if (elapsed < 1000)
        return;
    uplink->rate_in = (double)(uplink->in_count - uplink->in_mark) * 1000.0 / (double)elapsed;
    uplink->rate_out = (double)(uplink->out_count - uplink->out_mark) * 1000.0 / (double)elapsed;
    uplink->in_mark = uplink->in_count;
    uplink->out_mark = uplink->out_count;
    uplink->rate_since = now;
}

/* --- libmosquitto callbacks (loop thread, except the log callback) ------- */

static void conn_log_cb(struct mosquitto *mosq, void *obj, int level, const char *text)
{
    struct uplink_conn *conn = obj;
    size_t len;

    if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING)) {
        /* Keep the text for the one-line explanation (OpenSSL errors arrive
         * here as "OpenSSL Error[0]: error:...:certificate verify failed"). */
        len = strlen(text);
        if (conn->captured_len + len + 2 < sizeof(conn->captured)) {
            if (conn->captured_len)
                conn->captured[conn->captured_len++] = '\n';
            memcpy(conn->captured + conn->captured_len, text, len + 1);
            conn->captured_len += len;
        }
    }
    /* log.c is not promised to be thread-safe: from the worker we only keep
     * the text; the failure it explains is logged from the loop thread. */
    if (conn_on_loop_thread(conn))
        log_uplink(LOG_DEBUG, conn->uplink->name, "libmosquitto: %s", text);
}

static void conn_connect_cb(struct mosquitto *mosq, void *obj, int rc)
{
    struct uplink_conn *conn = obj;

    conn->connack_seen = true;
    conn->connack_rc = rc;
}

static void conn_disconnect_cb(struct mosquitto *mosq, void *obj, int rc)
{
    struct uplink_conn *conn = obj;

    conn->disconnect_rc = rc;
}

static void conn_publish_cb(struct mosquitto *mosq, void *obj, int mid)
{
    struct uplink_conn *conn = obj;
    struct uplink *uplink = conn->uplink;
    struct uplink_inflight *e = NULL;
    size_t i;

    /* QoS 0 messages also end up here when written; they were never in the
     * in-flight table, so only QoS 1 messages match. In theory a QoS 0 mid
     * could equal the mid of a QoS 1 message still waiting after 65535 other
     * publishes; with a window of at most 10000 and PUBACKs in order
     * (MQTT 3.1.1 §4.6) that does not occur. */
    if (uplink_control_acked(uplink, mid))
        return;
    /* A broker acknowledges in order, so the match is the oldest entry
     * nearly always: the scan starts there. */
    for (i = 0; i < uplink->inflight; i++) {
        e = &uplink->inflight_tab[(uplink->inflight_head + i) % uplink->inflight_cap];
        if (e->mid == mid)
            break;
    }
    if (i == uplink->inflight)
        return;
    /* One PUBACK releases every record the publish carried. */
    spool_ack_range(uplink->spool, e->first_seq, e->last_seq);
    uplink->stats.published += e->records;
    uplink->stats.publishes++;
    uplink->out_count += e->records;
    uplink->inflight_records -= e->records;
    e->mid = -1;
    while (uplink->inflight && uplink->inflight_tab[uplink->inflight_head].mid == -1) {
        uplink->inflight_head = (uplink->inflight_head + 1) % uplink->inflight_cap;
        uplink->inflight--;
    }
    uplink_rates_update(uplink);
    conn->acked = true;
}

static void conn_message_cb(struct mosquitto *mosq, void *obj, const struct mosquitto_message *m)
{
    struct uplink_conn *conn = obj;
    struct uplink *uplink = conn->uplink;

    uplink->stats.received++;
    if (uplink->hooks.message_cb)
        uplink->hooks.message_cb(uplink->hooks.arg, uplink, m->topic, m->payload,
                                 (size_t)m->payloadlen, m->qos, m->retain);
}

static void conn_subscribe_cb(struct mosquitto *mosq, void *obj, int mid, int count,
                              const int *granted)
{
    struct uplink_conn *conn = obj;
    struct uplink *uplink = conn->uplink;
    struct uplink_sub *sub;
    char text[UPLINK_ERROR_MAX];

    for (sub = uplink->subs; sub; sub = sub->next) {
        if (sub->mid == mid)
            break;
    }
    if (!sub || count < 1)
        return;
    /* MQTT 3.1.1 §3.9.3: return code 0x80 means the subscription failed. */
    if (granted[0] == 0x80) {
        snprintf(text, sizeof(text),
                 "broker %s:%d refused the subscription to \"%s\" (SUBACK 0x80: not authorized "
                 "or not a valid filter for this broker)",
                 conn->host, conn->port, sub->filter);
        log_uplink(LOG_ERR, uplink->name, "%s", text);
        uplink_set_error(uplink, text);
    } else {
        log_uplink(LOG_INFO, uplink->name, "subscribed to \"%s\" (granted QoS %d)", sub->filter,
                   granted[0]);
    }
}

/* --- credential fingerprints (uplink_reload_credentials) ----------------- */

static void creds_fp_hex(const char *prefix, const unsigned char *md, unsigned len,
                         char out[UPLINK_FP_SIZE])
{
    static const char digits[] = "0123456789abcdef";
    size_t used = (size_t)snprintf(out, UPLINK_FP_SIZE, "%s:", prefix);

    for (unsigned i = 0; i < len && used + 2 < UPLINK_FP_SIZE; i++) {
        out[used++] = digits[md[i] >> 4];
        out[used++] = digits[md[i] & 0xf];
    }
    out[used] = '\0';
}

/* "sha256:HEX" of the bytes of @path, or "unreadable:WHY". Any thread. */
static void creds_fp_file(const char *path, char out[UPLINK_FP_SIZE])
{
    unsigned char buf[4096], md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;
    EVP_MD_CTX *ctx = NULL;
    FILE *f;
    size_t n;
    bool ok;

    f = fopen(path, "rbe");
    if (!f) {
        snprintf(out, UPLINK_FP_SIZE, "unreadable:%s", strerror(errno));
        return;
    }
    ctx = EVP_MD_CTX_new();
    ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
    while (ok && (n = fread(buf, 1, sizeof(buf), f)) > 0)
        ok = EVP_DigestUpdate(ctx, buf, n) == 1;
    ok = ok && !ferror(f) && EVP_DigestFinal_ex(ctx, md, &md_len) == 1;
    if (ok)
        creds_fp_hex("sha256", md, md_len, out);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:%s",
                 ferror(f) ? "read error" : "cannot compute SHA-256");
    EVP_MD_CTX_free(ctx);
    fclose(f);
}

/* A key spec: a pkcs11: URI by its text (the key stays in the token), a
 * file by its bytes. */
static void creds_fp_key_spec(const char *spec, char out[UPLINK_FP_SIZE])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    if (!keys_is_uri(spec)) {
        creds_fp_file(spec, out);
        return;
    }
    if (EVP_Digest(spec, strlen(spec), md, &md_len, EVP_sha256(), NULL) == 1)
        creds_fp_hex("uri", md, md_len, out);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:cannot compute SHA-256");
}

/* auth.key: the public half of the key a signer holds (@key), or the URI. */
static void creds_fp_jwt_key(const EVP_PKEY *key, const char *spec, char out[UPLINK_FP_SIZE])
{
    char hex[65];

    if (keys_is_uri(spec))
        creds_fp_key_spec(spec, out);
    else if (key && keys_public_der_sha256(key, hex) == 0)
        snprintf(out, UPLINK_FP_SIZE, "pub:%s", hex);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:no public key");
}

/* Threadpool, before libmosquitto reads the TLS files: if one changes in
 * between, the next check sees a difference and reconnects once more,
 * which is harmless; the other order could miss a change. */
static void conn_take_creds(struct uplink_conn *conn)
{
    if (conn->tls) {
        if (conn->cert)
            creds_fp_file(conn->cert, conn->creds.cert);
        if (conn->key)
            creds_fp_key_spec(conn->key, conn->creds.key);
        if (conn->ca_file && !conn->ca_system)
            creds_fp_file(conn->ca_file, conn->creds.ca);
    }
    conn->creds.taken = true;
}

/* --- the threadpool part of a connection attempt ------------------------- */

static void conn_free(struct uplink_conn *conn)
{
    if (!conn)
        return;
    free(conn->host);
    free(conn->client_id);
    free(conn->ca_file);
    free(conn->cert);
    free(conn->key);
    free(conn->key_pin_file);
    free(conn->key_module);
    free(conn->username);
    if (conn->password) {
        explicit_bzero(conn->password, strlen(conn->password));
        free(conn->password);
    }
    free(conn->alpn);
    free(conn->will_topic);
    free(conn->will_payload);
    jwt_signer_free(conn->signer);
    free(conn->jwt_aud);
    for (size_t i = 0; conn->jwt_extra && i < conn->claims.extra_count; i++) {
        free((char *)conn->jwt_extra[i].name);
        free((char *)conn->jwt_extra[i].value);
    }
    free(conn->jwt_extra);
    free(conn);
}

/* Loop thread: what the worker needs to sign this attempt's token. */
static int conn_copy_jwt(struct uplink_conn *conn, const struct conf_jwt *jwt)
{
    /* A key that uplink_reload_credentials() found newer than the conf's. */
    EVP_PKEY *key = conn->uplink->jwt_key ? conn->uplink->jwt_key : jwt->private_key;
    char err[KEYS_ERR_SIZE];
    int rc;

    creds_fp_jwt_key(key, jwt->key, conn->creds.jwt);
    rc = jwt_signer_new(key, jwt->alg, jwt->kid_mode, jwt->kid, &conn->signer, err, sizeof(err));
    if (rc < 0) {
        /* conf_load() built the same signer, so only memory can fail here. */
        log_uplink(LOG_ERR, conn->uplink->name, "cannot prepare the JWT signer: %s", err);
        return rc;
    }
    if (jwt->aud && !(conn->jwt_aud = strdup(jwt->aud)))
        return -ENOMEM;
    if (jwt->claim_count) {
        conn->jwt_extra = calloc(jwt->claim_count, sizeof(*conn->jwt_extra));
        if (!conn->jwt_extra)
            return -ENOMEM;
    }
    for (size_t i = 0; i < jwt->claim_count; i++) {
        conn->jwt_extra[i].name = strdup(jwt->claims[i].name);
        conn->jwt_extra[i].value = strdup(jwt->claims[i].value);
        conn->claims.extra_count++;
        if (!conn->jwt_extra[i].name || !conn->jwt_extra[i].value)
            return -ENOMEM;
    }
    conn->claims.aud = conn->jwt_aud;
    conn->claims.extra = conn->jwt_extra;
    conn->claims.lifetime_s = jwt->lifetime_s;
    conn->claims.max_lifetime_s = jwt->max_lifetime_s;
    conn->claims.skew_s = jwt->skew_s;
    conn->refresh_percent = jwt->refresh_percent;
    return 0;
}

/* Loop thread: let the profile set client id, credentials, will and clean
 * session for this attempt (uplink_hooks.session_cb). */
static int conn_apply_session(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct uplink_session session;

    memset(&session, 0, sizeof(session));
    uplink->hooks.session_cb(uplink->hooks.arg, uplink, &session);
    if (session.client_id) {
        free(conn->client_id);
        if (!(conn->client_id = strdup(session.client_id)))
            return -ENOMEM;
    }
    if (session.clean_session)
        conn->clean_session = true;
    if (session.username) {
        free(conn->username);
        if (conn->password) {
            explicit_bzero(conn->password, strlen(conn->password));
            free(conn->password);
            conn->password = NULL;
        }
        if (!(conn->username = strdup(session.username)))
            return -ENOMEM;
        if (session.password && !(conn->password = strdup(session.password)))
            return -ENOMEM;
    }
    if (session.will_topic) {
        if (!(conn->will_topic = strdup(session.will_topic)))
            return -ENOMEM;
        if (session.will_len) {
            if (!(conn->will_payload = malloc(session.will_len)))
                return -ENOMEM;
            memcpy(conn->will_payload, session.will_payload, session.will_len);
        }
        conn->will_len = session.will_len;
        conn->will_qos = session.will_qos;
        conn->will_retain = session.will_retain;
    }
    conn->hold_spool = session.hold_spool;
    return 0;
}

static struct uplink_conn *conn_new(struct uplink *uplink)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_conn *conn;

    conn = calloc(1, sizeof(*conn));
    if (!conn)
        return NULL;
    conn->uplink = uplink;
    conn->port = conf->port;
    conn->keepalive = (int)conf->keepalive_s;
    conn->window = conf->max_inflight ? conf->max_inflight : 100;
    if (uplink->inflight_cap != conn->window) {
        /* No connection, so nothing is in flight: the ring starts afresh. */
        struct uplink_inflight *tab = calloc(conn->window, sizeof(*tab));
        if (!tab) {
            free(conn);
            return NULL;
        }
        free(uplink->inflight_tab);
        uplink->inflight_tab = tab;
        uplink->inflight_cap = conn->window;
        uplink->inflight_head = 0;
    }
    conn->clean_session = conf->clean_session;
    conn->tls = conf->tls.enabled;
    conn->ca_system = conf->tls.ca_system || !conf->tls.ca_file;
    conn->disconnect_rc = -1;
    conn->host = strdup(conf->host);
    conn->client_id = strdup(conf->client_id ? conf->client_id : uplink->gateway_id);
    if (!conn->host || !conn->client_id)
        goto err;
    if (conn->tls) {
        if (conf->tls.ca_file && !(conn->ca_file = strdup(conf->tls.ca_file)))
            goto err;
        if (conf->tls.cert && !(conn->cert = strdup(conf->tls.cert)))
            goto err;
        if (conf->tls.key && !(conn->key = strdup(conf->tls.key)))
            goto err;
        struct keys_options key_options;
        tlscheck_key_options(conf, &key_options);
        if (key_options.passphrase_file &&
            !(conn->key_pin_file = strdup(key_options.passphrase_file)))
            goto err;
        if (key_options.pkcs11_module && !(conn->key_module = strdup(key_options.pkcs11_module)))
            goto err;
        if (conf->tls.alpn && !(conn->alpn = strdup(conf->tls.alpn)))
            goto err;
        conn->tls_version = conf->tls.min_version;
        conn->insecure = conf->tls.insecure;
    }
    if (conf->auth.type == CONF_AUTH_BASIC) {
        if (!(conn->username = strdup(conf->auth.username ? conf->auth.username : "")))
            goto err;
        if (conf->auth.password && !(conn->password = strdup(conf->auth.password)))
            goto err;
    }
    if (conf->auth.type == CONF_AUTH_JWT) {
        if (!(conn->username = strdup(conf->auth.username ? conf->auth.username : "unused")))
            goto err;
        if (conn_copy_jwt(conn, &conf->auth.jwt) < 0)
            goto err;
    }
    if (uplink->hooks.session_cb && conn_apply_session(conn) < 0)
        goto err;
    return conn;

err:
    conn_free(conn);
    return NULL;
}

/* One signature at a time in the whole process: jwt_sign() must not run
 * concurrently on one signer, and PKCS#11 keys of several uplinks may share
 * one token session in the engine. Signing takes milliseconds. */
static pthread_mutex_t uplink_sign_lock = PTHREAD_MUTEX_INITIALIZER;

/* Threadpool: sign this attempt's token (a slow PKCS#11 token never stalls
 * the loop). The clock was checked on the loop thread just before. */
static int conn_sign(struct uplink_conn *conn)
{
    char err[KEYS_ERR_SIZE];
    time_t now = time(NULL);
    time_t expires_at = 0;
    int rc;

    pthread_mutex_lock(&uplink_sign_lock);
    rc = jwt_sign(conn->signer, &conn->claims, now, &conn->password, &expires_at, err, sizeof(err));
    pthread_mutex_unlock(&uplink_sign_lock);
    if (rc < 0) {
        conn_fail(conn, "cannot sign a JWT with auth.key: %s", err);
        return rc;
    }
    conn->token_signed_at = now;
    conn->token_signed_mono_ms = util_now_ms();
    conn->token_expires_at = expires_at;
    return 0;
}

/* Threadpool: tls.key is a pkcs11: URI. libmosquitto 2.0.11 cannot take it
 * as a key file: mosquitto_tls_set() fopen()s every file it is given, and
 * its MOSQ_OPT_TLS_ENGINE path makes the engine OpenSSL's default for every
 * algorithm (ENGINE_set_default(ENGINE_METHOD_ALL)) and leaks the key on
 * each connect (lib/options.c, lib/net_mosq.c net__init_ssl_ctx). So the
 * whole SSL_CTX is ours, handed over with MOSQ_OPT_SSL_CTX: the certificate
 * chain and token key (keys_use_client_cert, the code of the start-up
 * check), tls.ca, peer and host name verification, TLS version and ALPN as
 * libmosquitto sets them for a PEM key. Not MOSQ_OPT_SSL_CTX_WITH_DEFAULTS:
 * with a context given, 2.0.11 skips net__init_tls(), so its verify callback
 * finds no mosq in the SSL (ex_data index -1) and refuses every server
 * certificate until some other connection in the process initialised it.
 * libmosquitto still sets SNI to conn->host (net__socket_connect_step3).
 * The handshake signature is made in the token, on the loop thread. */
static int conn_use_token_key(struct uplink_conn *conn)
{
    struct keys_options options = {.passphrase_file = conn->key_pin_file,
                                   .pkcs11_module = conn->key_module};
    char err[KEYS_ERR_SIZE];
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    int rc = -EINVAL;

    if (!ctx) {
        conn_fail(conn, "cannot create a TLS context (out of memory?)");
        return -ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, conn->tls_version == CONF_TLS_1_3 ? TLS1_3_VERSION
                                                                         : TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (conn->ca_system ? SSL_CTX_set_default_verify_paths(ctx) != 1
                        : SSL_CTX_load_verify_file(ctx, conn->ca_file) != 1) {
        conn_fail(conn, "cannot load CA certificates from %s (not PEM certificates?)",
                  conn->ca_system ? "the system CA store" : conn->ca_file);
        goto out;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (!conn->insecure) {
        /* RFC 6125 §6.4: the host must match the certificate; an IP address
         * is matched against iPAddress entries instead. */
        X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (X509_VERIFY_PARAM_set1_ip_asc(param, conn->host) != 1 &&
            X509_VERIFY_PARAM_set1_host(param, conn->host, 0) != 1) {
            conn_fail(conn, "cannot set the host name \"%s\" to verify", conn->host);
            goto out;
        }
    }
    if (conn->alpn) {
        unsigned char wire[256];
        size_t len = strnlen(conn->alpn, 255);
        wire[0] = (unsigned char)len; /* RFC 7301 §3.1: length-prefixed names */
        memcpy(wire + 1, conn->alpn, len);
        SSL_CTX_set_alpn_protos(ctx, wire, (unsigned)len + 1);
    }
    rc = keys_use_client_cert(ctx, conn->cert, conn->key, &options, err, sizeof(err));
    if (rc < 0) {
        conn_fail(conn, "cannot use tls.cert/tls.key: %s", err);
        goto out;
    }
    /* libmosquitto takes its own reference (SSL_CTX_up_ref) and frees it in
     * mosquitto_destroy(). */
    if (mosquitto_int_option(conn->mosq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0) != MOSQ_ERR_SUCCESS ||
        mosquitto_void_option(conn->mosq, MOSQ_OPT_SSL_CTX, ctx) != MOSQ_ERR_SUCCESS) {
        conn_fail(conn, "libmosquitto refused the TLS context for tls.key");
        rc = -EINVAL;
    }
out:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return rc;
}

/* libmosquitto 2.0.11 sets up its TLS globals (a UI_METHOD, the SSL ex_data
 * index its certificate verify callback finds the client by) on the first
 * TLS connect, in net__init_tls(), behind an unlocked flag
 * (lib/net_mosq.c). Two first connects on two threadpool threads (an
 * uplink and its per-device sessions start together) both run it: one
 * UI_METHOD leaks (LeakSanitizer: 88 + 35 bytes from UI_create_method) and
 * an SSL tagged with the first index is looked up with the second, which
 * fails its certificate check. So TLS connects take turns until one has
 * created its SSL object through that path; after that the globals are
 * only read. Both are used only in conn_setup(). */
static pthread_mutex_t mosq_tls_init_lock = PTHREAD_MUTEX_INITIALIZER;
static bool mosq_tls_initialised; /* guarded by mosq_tls_init_lock */

/* Runs on the threadpool: everything that may block (file access for the TLS
 * files, DNS, the connect() call). Touches only @conn. */
static int conn_setup(struct uplink_conn *conn)
{
    struct mosquitto *mosq;
    const char *ca_file = NULL, *ca_path = NULL;
    bool tls_init_turn = false;
    int rc;

    mosq = mosquitto_new(conn->client_id, conn->clean_session, conn);
    if (!mosq) {
        conn_fail(conn, "cannot create the MQTT client: %s", strerror(errno));
        return -ENOMEM;
    }
    conn->mosq = mosq;
    mosquitto_log_callback_set(mosq, conn_log_cb);
    mosquitto_connect_callback_set(mosq, conn_connect_cb);
    mosquitto_disconnect_callback_set(mosq, conn_disconnect_cb);
    mosquitto_publish_callback_set(mosq, conn_publish_cb);
    mosquitto_message_callback_set(mosq, conn_message_cb);
    mosquitto_subscribe_callback_set(mosq, conn_subscribe_cb);
    /* Our window and libmosquitto's send quota are the same number. */
    mosquitto_int_option(mosq, MOSQ_OPT_SEND_MAXIMUM, (int)conn->window);
    /* MQTT packets are small and latency matters more than segment count. */
    mosquitto_int_option(mosq, MOSQ_OPT_TCP_NODELAY, 1);

    if (conn->signer && conn_sign(conn) < 0)
        return -EINVAL;
    if (conn->username) {
        rc = mosquitto_username_pw_set(mosq, conn->username, conn->password);
        if (rc) {
            conn_fail(conn, "libmosquitto refused auth.username: %s", mosquitto_strerror(rc));
            return -EINVAL;
        }
    }
    /* MQTT 3.1.1 §3.1.2.5: the broker publishes the will when the
     * connection is lost without a DISCONNECT. */
    if (conn->will_topic) {
        rc = mosquitto_will_set(mosq, conn->will_topic, (int)conn->will_len, conn->will_payload,
                                conn->will_qos, conn->will_retain);
        if (rc) {
            conn_fail(conn, "libmosquitto refused the last will on \"%s\": %s", conn->will_topic,
                      mosquitto_strerror(rc));
            return -EINVAL;
        }
    }

    if (conn->tls) {
        bool token_key = conn->cert && keys_is_uri(conn->key);
        /* mosquitto_tls_set() only says MOSQ_ERR_INVAL for an unreadable file;
         * check first so the user learns which file and why. */
        if (conn->ca_file && !conn->ca_system && access(conn->ca_file, R_OK) != 0) {
            conn_fail(conn, "cannot read tls.ca=%s: %s", conn->ca_file, strerror(errno));
            return -EINVAL;
        }
        if (conn->cert && access(conn->cert, R_OK) != 0) {
            conn_fail(conn, "cannot read tls.cert=%s: %s", conn->cert, strerror(errno));
            return -EINVAL;
        }
        if (conn->key && !token_key && access(conn->key, R_OK) != 0) {
            conn_fail(conn, "cannot read tls.key=%s: %s", conn->key, strerror(errno));
            return -EINVAL;
        }
        if (token_key) {
            if (conn_use_token_key(conn) < 0)
                return -EINVAL;
        } else if (conn->ca_system) {
            /* 2.0.11 has MOSQ_OPT_TLS_USE_OS_CERTS (SSL_CTX_set_default_verify_paths,
             * which also honours SSL_CERT_FILE/SSL_CERT_DIR). A client
             * certificate can only be given through mosquitto_tls_set(), which
             * insists on a CA file or directory: pass OpenSSL's own directory. */
            mosquitto_int_option(mosq, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
            ca_path = X509_get_default_cert_dir();
        } else {
            ca_file = conn->ca_file;
        }
        if (!token_key && (ca_file || conn->cert)) {
            rc = mosquitto_tls_set(mosq, ca_file, ca_path, conn->cert, conn->key, NULL);
            if (rc) {
                conn_fail(conn,
                          "libmosquitto refused the TLS files (tls.ca, tls.cert, tls.key): %s",
                          mosquitto_strerror(rc));
                return -EINVAL;
            }
        }
        /* Verify the peer, TLS 1.2 at least (1.3 stays allowed) unless
         * tls.min_version says 1.3. tls.insecure turns off only the host
         * name check (the chain is still verified against tls.ca). SNI is
         * sent either way. */
        rc = mosquitto_tls_opts_set(
            mosq, SSL_VERIFY_PEER, conn->tls_version == CONF_TLS_1_3 ? "tlsv1.3" : "tlsv1.2", NULL);
        if (!rc)
            rc = mosquitto_tls_insecure_set(mosq, conn->insecure);
        /* RFC 7301; AWS IoT on port 443 wants "x-amzn-mqtt-ca". */
        if (!rc && conn->alpn)
            rc = mosquitto_string_option(mosq, MOSQ_OPT_TLS_ALPN, conn->alpn);
        if (rc) {
            conn_fail(conn, "libmosquitto refused the TLS options: %s", mosquitto_strerror(rc));
            return -EINVAL;
        }
    }

    /* Resolves conf->host, connects non-blocking, creates the SSL object with
     * SNI set to this same host (lib/net_mosq.c net__socket_connect_step3)
     * and queues CONNECT. */
    if (conn->tls) {
        pthread_mutex_lock(&mosq_tls_init_lock);
        tls_init_turn = !mosq_tls_initialised;
        if (!tls_init_turn)
            pthread_mutex_unlock(&mosq_tls_init_lock);
    }
    errno = 0;
    conn->connect_rc = mosquitto_connect_async(mosq, conn->host, conn->port, conn->keepalive);
    conn->connect_errno = errno;
    if (tls_init_turn) {
        /* A context of our own (tls.key on a token) skips net__init_tls(). */
        if (mosquitto_ssl_get(mosq) != NULL && !(conn->cert && keys_is_uri(conn->key)))
            mosq_tls_initialised = true;
        pthread_mutex_unlock(&mosq_tls_init_lock);
    }
    return conn->connect_rc == MOSQ_ERR_SUCCESS ? 0 : -EIO;
}

static void conn_work_cb(uv_work_t *req)
{
    struct uplink_conn *conn = container_of(req, struct uplink_conn, work);

    conn_take_creds(conn);
    conn_setup(conn);
    /* OpenSSL keeps per-thread state (error queue, DRBG) for this threadpool
     * thread; libuv's threads never exit before the process does, so release
     * it now instead of leaving one block per worker behind (valgrind's
     * "definitely lost"). OpenSSL re-creates it if the thread signs again. */
    OPENSSL_thread_stop();
}

/* --- explaining failures ------------------------------------------------- */

static const char *connack_text(int rc)
{
    /* MQTT 3.1.1 §3.2.2.3 */
    switch (rc) {
    case 1:
        return "unacceptable protocol version (the broker does not speak MQTT 3.1.1)";
    case 2:
        return "identifier rejected (check client_id)";
    case 3:
        return "server unavailable (the broker is up but the MQTT service is not; try later)";
    case 4:
        return "bad user name or password - check auth.username/password";
    case 5:
        return "not authorized (the broker does not let these credentials or this client "
               "certificate connect; check auth and tls.cert)";
    default:
        return "unknown return code";
    }
}

static const char *errno_hint(int err)
{
    switch (err) {
    case ECONNREFUSED:
        return " (nothing listens there: check host and port, and that the broker runs)";
    case ENETUNREACH:
    case EHOSTUNREACH:
        return " (no route: check the network connection)";
    case ETIMEDOUT:
        return " (no answer: a firewall may drop the packets)";
    default:
        return "";
    }
}

/* The reason part of the last "OpenSSL Error[n]: error:XXXX:lib:func:reason". */
static void captured_openssl_reason(const struct uplink_conn *conn, char *out, size_t size)
{
    const char *line = NULL, *p = conn->captured, *end, *colon;

    out[0] = '\0';
    while ((p = strstr(p, "OpenSSL Error[")) != NULL) {
        line = p;
        p++;
    }
    if (!line)
        return;
    end = strchr(line, '\n');
    if (!end)
        end = line + strlen(line);
    colon = NULL;
    for (p = line; p < end; p++) {
        if (*p == ':')
            colon = p;
    }
    if (!colon || colon + 1 >= end)
        return;
    snprintf(out, size, "%.*s", (int)(end - colon - 1), colon + 1);
}

/* One line for a TLS failure: what failed, with which host, and the fix. */
static void conn_explain_tls(struct uplink_conn *conn)
{
    char reason[160], ca[300];
    const char *hint = "";
    SSL *ssl = conn->mosq ? mosquitto_ssl_get(conn->mosq) : NULL;
    long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;

    if (conn->ca_system)
        snprintf(ca, sizeof(ca), "the system CA store (tls.ca: system)");
    else
        snprintf(ca, sizeof(ca), "tls.ca=%s", conn->ca_file);

    if (strstr(conn->captured, "host name verification failed")) {
        conn_fail(conn,
                  "TLS handshake with %s:%d failed: host name verification failed (the server "
                  "certificate is not issued for \"%s\"; check host, or the certificate's "
                  "subjectAltName)",
                  conn->host, conn->port, conn->host);
    } else if (strstr(conn->captured, "certificate verify failed") || verify != X509_V_OK) {
        switch (verify) {
        case X509_V_ERR_CERT_HAS_EXPIRED:
        case X509_V_ERR_CERT_NOT_YET_VALID:
            conn_fail(conn,
                      "TLS handshake with %s:%d failed: certificate verify failed: %s (check the "
                      "system clock and the server certificate's validity)",
                      conn->host, conn->port, X509_verify_cert_error_string(verify));
            break;
        default:
            conn_fail(conn,
                      "TLS handshake with %s:%d failed: certificate verify failed%s%s (the server "
                      "certificate is not signed by a CA in %s; check tls.ca or the host name)",
                      conn->host, conn->port, verify != X509_V_OK ? ": " : "",
                      verify != X509_V_OK ? X509_verify_cert_error_string(verify) : "", ca);
            break;
        }
    } else if (strstr(conn->captured, "Unable to load CA certificates")) {
        conn_fail(conn, "cannot load CA certificates from %s (not PEM certificates?)", ca);
    } else if (strstr(conn->captured, "Unable to load client certificate")) {
        conn_fail(conn, "cannot load the client certificate tls.cert=%s (not a PEM chain?)",
                  conn->cert);
    } else if (strstr(conn->captured, "Unable to load client key")) {
        conn_fail(conn, "cannot load the private key tls.key=%s (not PEM, or encrypted?)",
                  conn->key);
    } else if (strstr(conn->captured, "certificate/key are inconsistent")) {
        conn_fail(conn, "tls.cert=%s and tls.key=%s do not belong together", conn->cert, conn->key);
    } else {
        captured_openssl_reason(conn, reason, sizeof(reason));
        if (strstr(reason, "wrong version number") || strstr(reason, "packet length too long"))
            hint = " (the server does not speak TLS on this port; check port and tls.enabled)";
        else if (strstr(reason, "unexpected eof"))
            hint = " (the server hung up during the handshake: not a TLS port, or it requires SNI "
                   "or a client certificate)";
        else if (strstr(reason, "alert certificate required") ||
                 strstr(reason, "alert bad certificate") || strstr(reason, "alert unknown ca") ||
                 strstr(reason, "alert handshake failure"))
            hint = " (the server rejected or requires a client certificate; check tls.cert and "
                   "tls.key)";
        conn_fail(conn, "TLS handshake with %s:%d failed: %s%s", conn->host, conn->port,
                  reason[0] ? reason : "no details from OpenSSL", hint);
    }
}

static const char *format_utc(time_t t, char *buf, size_t size)
{
    struct tm tm;

    if (!gmtime_r(&t, &tm) || !strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm))
        snprintf(buf, size, "%lld", (long long)t);
    return buf;
}

/* CONNACK 4 or 5 to a JWT: GCP, ClearBlade and akenza say nothing more, so
 * one line carries what this cloud usually means by it (the profile's
 * connack_text_cb: which checks apply there) and the facts to check them
 * against: what the token carried and what the local clock says. */
static void conn_explain_jwt_refused(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    const char *text =
        uplink->hooks.connack_text_cb
            ? uplink->hooks.connack_text_cb(uplink->hooks.arg, uplink, conn->connack_rc)
            : NULL;
    char iat[40], exp[40], clock[40];

    conn_fail(conn,
              "broker %s:%d: the server refused the JWT (CONNACK %d): %s (sent: alg %s%s%s, aud "
              "\"%s\", iat %s, exp %s; local clock %s)",
              conn->host, conn->port, conn->connack_rc,
              text ? text : "check alg matches the registered key, aud, exp <= 24 h, and the clock",
              jwt_alg_name(jwt_signer_alg(conn->signer)),
              jwt_signer_kid(conn->signer) ? ", kid " : "",
              jwt_signer_kid(conn->signer) ? jwt_signer_kid(conn->signer) : "",
              conn->jwt_aud ? conn->jwt_aud : "",
              format_utc(conn->token_signed_at - (time_t)conn->claims.skew_s, iat, sizeof(iat)),
              format_utc(conn->token_expires_at, exp, sizeof(exp)),
              format_utc(time(NULL), clock, sizeof(clock)));
}

/* An established connection ended (EOF, reset, or a TLS read error without
 * details, which libmosquitto turns into EPROTO). */
static void conn_explain_closed(struct uplink_conn *conn, int err)
{
    char why[128] = "";
    char exp[40];

    if (err && err != EPROTO)
        snprintf(why, sizeof(why), " (%s)", strerror(err));
    if (conn->online && conn->token_expires_at && time(NULL) >= conn->token_expires_at)
        conn_fail(conn,
                  "connection to %s:%d lost: closed by the server%s after the JWT expired at %s "
                  "(JWT clouds drop a session at exp; the token was not rotated in time)",
                  conn->host, conn->port, why,
                  format_utc(conn->token_expires_at, exp, sizeof(exp)));
    else if (conn->online)
        conn_fail(conn, "connection to %s:%d lost: closed by the server%s", conn->host, conn->port,
                  why);
    else if (err == ECONNREFUSED || err == ENETUNREACH || err == EHOSTUNREACH || err == ETIMEDOUT)
        /* The TCP connect itself failed: on loopback, mosquitto_connect_async()
         * already returns ECONNREFUSED; nothing was closed, nothing listened. */
        conn_fail(conn, "connection to %s:%d failed: %s%s", conn->host, conn->port, strerror(err),
                  errno_hint(err));
    else
        conn_fail(conn,
                  "%s:%d closed the connection before CONNACK%s (wrong port, a TLS port without "
                  "tls.enabled, or the broker rejected client_id, credentials or the client "
                  "certificate: check tls.cert/tls.key)",
                  conn->host, conn->port, why);
}

/* A libmosquitto call returned @rc or closed the socket: say why in words. */
static void conn_explain_rc(struct uplink_conn *conn, int rc, int err)
{
    if (conn->failed)
        return;
    if (rc == MOSQ_ERR_SUCCESS && conn->disconnect_rc > 0)
        rc = conn->disconnect_rc;

    if (conn->connack_seen && (conn->connack_rc == 4 || conn->connack_rc == 5) &&
        conn->token_expires_at) {
        conn_explain_jwt_refused(conn);
    } else if (conn->connack_seen && conn->connack_rc != 0) {
        /* The profile may know what this cloud means by the code. */
        const char *text = conn->uplink->hooks.connack_text_cb
                               ? conn->uplink->hooks.connack_text_cb(conn->uplink->hooks.arg,
                                                                     conn->uplink, conn->connack_rc)
                               : NULL;
        conn_fail(conn, "broker %s:%d refused the connection: CONNACK %d %s", conn->host,
                  conn->port, conn->connack_rc, text ? text : connack_text(conn->connack_rc));
    } else if (rc == MOSQ_ERR_TLS || (strstr(conn->captured, "OpenSSL Error") && !conn->online)) {
        conn_explain_tls(conn);
    } else if (rc == MOSQ_ERR_KEEPALIVE) {
        if (conn->online)
            conn_fail(conn, "connection to %s:%d lost: no answer to PINGREQ within keepalive %d s",
                      conn->host, conn->port, conn->keepalive);
        else
            conn_fail(conn, "no CONNACK from %s:%d within keepalive %d s", conn->host, conn->port,
                      conn->keepalive);
    } else if (rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_SUCCESS || rc == MOSQ_ERR_NO_CONN) {
        conn_explain_closed(conn, 0);
    } else if (rc == MOSQ_ERR_ERRNO) {
        if (err == EPROTO && strstr(conn->captured, "OpenSSL Error"))
            conn_explain_tls(conn);
        else
            conn_explain_closed(conn, err);
    } else if (rc == MOSQ_ERR_PROTOCOL || rc == MOSQ_ERR_MALFORMED_PACKET) {
        conn_fail(conn, "protocol error from %s:%d (%s); is this an MQTT 3.1.1 broker?", conn->host,
                  conn->port, mosquitto_strerror(rc));
    } else {
        conn_fail(conn, "connection to %s:%d failed: %s", conn->host, conn->port,
                  mosquitto_strerror(rc));
    }
}

/* After any libmosquitto call on a live connection. */
static void conn_check(struct uplink_conn *conn, int rc, int err)
{
    if (rc == MOSQ_ERR_SUCCESS && mosquitto_socket(conn->mosq) != -1)
        return;
    conn_explain_rc(conn, rc, err);
}

/* --- I/O ----------------------------------------------------------------- */

static void conn_poll_cb(uv_poll_t *handle, int status, int events);

static void conn_update_poll(struct uplink_conn *conn)
{
    SSL *ssl;
    int events;

    if (!conn->poll_init || conn->failed || mosquitto_socket(conn->mosq) == -1)
        return;
    ssl = mosquitto_ssl_get(conn->mosq);
    if (conn->tcp_pending) {
        events = UV_WRITABLE; /* connect() completion (or its error) */
    } else if (ssl && !SSL_is_init_finished(ssl)) {
        /* UV_DISCONNECT (EPOLLRDHUP): a peer that hangs up mid-handshake
         * must end the attempt, not make a readable/writable storm. */
        events = (SSL_want_write(ssl) ? UV_WRITABLE : UV_READABLE) | UV_DISCONNECT;
    } else {
        events = UV_READABLE;
        /* want_write can be stale after the handshake (it is only cleared by
         * SSL_write), so with TLS ask OpenSSL whether a write is blocked. */
        if (mosquitto_want_write(conn->mosq) && (!ssl || SSL_want_write(ssl)))
            events |= UV_WRITABLE;
    }
    if (events != conn->poll_events) {
        int rc = uv_poll_start(&conn->poll, events, conn_poll_cb);
        if (rc < 0) {
            conn_fail(conn, "cannot watch the socket to %s:%d: %s", conn->host, conn->port,
                      uv_strerror(rc));
            return;
        }
        conn->poll_events = events;
    }
}

/* Continue the TLS handshake; returns true when it is finished. */
static bool conn_handshake(struct uplink_conn *conn, SSL *ssl, int events)
{
    struct uplink *uplink = conn->uplink;
    int rc, err;

    uplink->in_io = true;
    errno = 0;
    rc = mosquitto_loop_read(conn->mosq, 1); /* runs SSL_connect() while want_connect */
    err = errno;
    uplink->in_io = false;
    if (rc != MOSQ_ERR_SUCCESS || mosquitto_socket(conn->mosq) == -1) {
        conn_explain_tls(conn);
        return false;
    }
    if (SSL_is_init_finished(ssl)) {
        conn->tls_done = true;
        log_uplink(LOG_INFO, uplink->name, "TLS %s with %s:%d established (%s)",
                   SSL_get_version(ssl), conn->host, conn->port, SSL_get_cipher_name(ssl));
        return true;
    }
    if (SSL_want(ssl) == SSL_NOTHING || (events & UV_DISCONNECT) ||
        ++conn->handshake_events > 1000) {
        /* SSL_ERROR_SYSCALL, which libmosquitto reports as success, or the
         * peer hung up and OpenSSL has nothing more to read. */
        if (strstr(conn->captured, "OpenSSL Error"))
            conn_explain_tls(conn);
        else
            conn_fail(conn,
                      "TLS handshake with %s:%d failed: the server closed the connection%s%s "
                      "(some servers require SNI, a client certificate or a TLS version we do "
                      "not offer)",
                      conn->host, conn->port, err ? ": " : "", err ? strerror(err) : "");
    }
    return false;
}

/* The socket reported @err (SO_ERROR). */
static void conn_socket_error(struct uplink_conn *conn, int err)
{
    SSL *ssl = mosquitto_ssl_get(conn->mosq);

    if (err == ECONNRESET || err == EPIPE) {
        /* Connected, then reset: the server hung up on what we sent. */
        if (conn->tls && (!ssl || !SSL_is_init_finished(ssl)))
            conn_fail(conn,
                      "TLS handshake with %s:%d failed: the server reset the connection (not a "
                      "TLS port, or it requires SNI or a client certificate)",
                      conn->host, conn->port);
        else
            conn_explain_closed(conn, err);
    } else if (conn->tcp_pending) {
        conn_fail(conn, "connection to %s:%d failed: %s%s", conn->host, conn->port, strerror(err),
                  errno_hint(err));
    } else {
        conn_explain_closed(conn, err);
    }
}

static void conn_poll_cb(uv_poll_t *handle, int status, int events)
{
    struct uplink_conn *conn = container_of(handle, struct uplink_conn, poll);
    struct uplink *uplink = conn->uplink;
    SSL *ssl;
    int rc, err = 0;
    socklen_t len = sizeof(err);
    struct sockaddr_storage peer;
    socklen_t peer_len = sizeof(peer);

    if (conn->failed || uplink->conn != conn)
        goto out;
    if (status < 0) {
        /* libuv reports EPOLLERR as UV_EBADF and stops the handle; the
         * socket knows the real reason (ECONNREFUSED, ECONNRESET, ...). */
        if (getsockopt(mosquitto_socket(conn->mosq), SOL_SOCKET, SO_ERROR, &err, &len) < 0 || !err)
            conn_fail(conn, "connection to %s:%d failed: %s", conn->host, conn->port,
                      uv_strerror(status));
        else
            conn_socket_error(conn, err);
        goto out;
    }
    if (conn->tcp_pending) {
        if (getsockopt(mosquitto_socket(conn->mosq), SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            conn_socket_error(conn, err);
            goto out;
        }
        /* On loopback the RST can arrive before the worker's first
         * SSL_connect(), whose failed write then consumes SO_ERROR (and
         * libmosquitto ignores that SSL_ERROR_SYSCALL). getpeername() still
         * tells a failed connect from a good one; errno from the worker is
         * the best account of why. */
        if (getpeername(mosquitto_socket(conn->mosq), (struct sockaddr *)&peer, &peer_len) < 0) {
            err = conn->connect_errno ? conn->connect_errno : errno;
            conn_socket_error(conn, err);
            goto out;
        }
        conn->tcp_pending = false;
        log_uplink(LOG_DEBUG, uplink->name, "TCP connection to %s:%d established", conn->host,
                   conn->port);
    }
    ssl = mosquitto_ssl_get(conn->mosq);
    if (ssl && !SSL_is_init_finished(ssl)) {
        conn_handshake(conn, ssl, events);
        goto out; /* uplink_service() writes CONNECT once the handshake is done */
    }
    if (ssl) {
        /* Once the handshake is done (here or already in conn_work_cb):
         * libmosquitto sets SSL_MODE_RELEASE_BUFFERS, so OpenSSL frees and
         * re-allocates its buffers around every record, i.e. every message;
         * and without read_ahead it reads each record with two read()s
         * (header, body), one PUBACK at a time. With read_ahead one read()
         * takes all that arrived. Two flag updates: cheap enough to repeat. */
        SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
        SSL_set_read_ahead(ssl, 1);
    }
    if (events & UV_READABLE) {
        /* With read_ahead (above) OpenSSL can hold whole records
         * beyond the packets one mosquitto_loop_read() processes; they do not
         * make the socket readable again, so read until it holds none. Each
         * round consumes at least one buffered packet and the buffer holds
         * well under UPLINK_READ_ROUNDS records, so the bound is not reached. */
        for (unsigned round = 0; round < UPLINK_READ_ROUNDS; round++) {
            uplink->in_io = true;
            errno = 0;
            rc = mosquitto_loop_read(conn->mosq, 1);
            err = errno;
            uplink->in_io = false;
            conn_check(conn, rc, err);
            /* After an error libmosquitto has freed the SSL object: fetch again. */
            ssl = mosquitto_ssl_get(conn->mosq);
            if (rc != MOSQ_ERR_SUCCESS || conn->failed || !ssl || !SSL_has_pending(ssl))
                break;
        }
    }
    /* UV_WRITABLE: uplink_service() writes whenever libmosquitto wants to. */
out:
    uplink_service(uplink);
}

static void conn_tick_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, tick);
    struct uplink_conn *conn = uplink->conn;
    int rc, err;

    if (!conn || conn->work_pending || conn->failed || !conn->mosq)
        return;
    uplink->in_io = true;
    errno = 0;
    rc = mosquitto_loop_misc(conn->mosq); /* PINGREQ, or keepalive expiry */
    err = errno;
    uplink->in_io = false;
    conn_check(conn, rc, err);
    uplink_service(uplink);
}

/* --- connection life cycle ----------------------------------------------- */

static void conn_close_cb(uv_handle_t *handle)
{
    struct uplink_conn *conn = container_of((uv_poll_t *)handle, struct uplink_conn, poll);
    struct uplink *uplink = conn->uplink;

    conn_free(conn);
    uplink->closing--;
    uplink_service(uplink);
}

/* Forget the current connection. In-flight messages go back to waiting and
 * are re-sent, in order, on the next connection (see the top comment). */
static void uplink_drop_conn(struct uplink *uplink)
{
    struct uplink_conn *conn = uplink->conn;

    if (!conn)
        return;
    uplink->conn = NULL;
    if (uplink->handles_init) {
        uv_timer_stop(&uplink->tick);
        uv_timer_stop(&uplink->rotate);
    }
    uplink->rotating = false;
    uplink->stats.token_refresh_at = 0;
    if (uplink->spool)
        spool_rewind(uplink->spool);
    uplink->inflight = 0;
    uplink->inflight_head = 0;
    uplink->inflight_records = 0;
    /* Before the spool's records: registrations are re-sent first. */
    uplink_control_reset(uplink, false, -ECONNRESET);

    if (conn->poll_init) {
        /* Stop watching before mosquitto_destroy() closes the fd, so the fd
         * number is not removed from epoll after someone else reused it. */
        uv_close((uv_handle_t *)&conn->poll, conn_close_cb);
        uplink->closing++;
    }
    if (conn->mosq) {
        mosquitto_destroy(conn->mosq);
        conn->mosq = NULL;
    }
    if (!conn->poll_init)
        conn_free(conn);
}

static void uplink_timer_cb(uv_timer_t *timer);
static void conn_after_work_cb(uv_work_t *req, int status);

static void uplink_backoff(struct uplink *uplink, int64_t delay_ms, const char *reason);
static void uplink_rotate_cb(uv_timer_t *timer);

/* JWT: true when the clock cannot be trusted to sign (RFC 7519 §4.1.4/6: a
 * token from a wrong clock is refused or expires at once). Then the uplink
 * waits in BACKOFF and checks again every UPLINK_CLOCK_RECHECK_MS; the
 * problem is logged once, and its end too. */
static bool uplink_clock_blocks(struct uplink *uplink)
{
    const struct conf_uplink *conf = uplink->conf;
    enum jwt_clock_state clock = JWT_CLOCK_OK;
    char err[KEYS_ERR_SIZE];

    if (conf->auth.type != CONF_AUTH_JWT) {
        uplink->stats.clock = NULL;
        return false;
    }
    if (jwt_clock_check(time(NULL), conf->auth.jwt.clock_check == CONF_CLOCK_SYNC, &clock, err,
                        sizeof(err)) == 0) {
        if (uplink->clock_bad)
            log_uplink(LOG_NOTICE, uplink->name, "the clock can be trusted now; signing a JWT");
        uplink->clock_bad = false;
        uplink->stats.clock = jwt_clock_state_name(JWT_CLOCK_OK);
        return false;
    }
    uplink->stats.clock = jwt_clock_state_name(clock);
    if (!uplink->clock_bad) {
        log_uplink(LOG_WARNING, uplink->name,
                   "not signing a JWT: %s (checking again every %d s; auth.clock_check: "
                   "build-date accepts an unsynchronised clock)",
                   err, UPLINK_CLOCK_RECHECK_MS / 1000);
        uplink_set_error(uplink, err);
    } else {
        log_uplink(LOG_DEBUG, uplink->name, "clock still %s; checking again in %d s",
                   jwt_clock_state_name(clock), UPLINK_CLOCK_RECHECK_MS / 1000);
    }
    uplink->clock_bad = true;
    uplink->clock_was_bad = true;
    if (state_of(uplink) == UPLINK_BACKOFF)
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CLOCK_RECHECK_MS, 0);
    else
        uplink_backoff(uplink, UPLINK_CLOCK_RECHECK_MS,
                       "waiting for a clock good enough to sign a JWT");
    return true;
}

/* BACKOFF/IDLE -> RESOLVING: start a connection attempt on the threadpool. */
static void uplink_connect(struct uplink *uplink, const char *reason)
{
    struct uplink_conn *conn;
    int rc;

    if (uplink->clock_watch) {
        /* Leaving BACKOFF: the rotate timer is the session's again. */
        uplink->clock_watch = false;
        uv_timer_stop(&uplink->rotate);
    }
    if (uplink_clock_blocks(uplink))
        return;
    if (uplink->conf->tls.enabled && uplink->conf->tls.insecure)
        log_uplink(LOG_WARNING, uplink->name,
                   "tls.insecure is true: the server certificate is not checked against host "
                   "\"%s\", so anyone with a certificate from tls.ca can pose as the broker",
                   uplink->conf->host);
    conn = conn_new(uplink);
    if (!conn) {
        log_uplink(LOG_ERR, uplink->name, "out of memory starting a connection attempt");
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CONNECT_TIMEOUT_MS, 0);
        return;
    }
    if (uplink_set_state(uplink, UPLINK_RESOLVING, "%s; resolving %s", reason, conn->host) < 0) {
        conn_free(conn);
        return;
    }
    uv_timer_stop(&uplink->timer);
    uplink->conn = conn;
    conn->work_pending = true;
    rc = uv_queue_work(uplink->loop, &conn->work, conn_work_cb, conn_after_work_cb);
    if (rc < 0) {
        conn->work_pending = false;
        conn_fail(conn, "cannot start the connection attempt: %s", uv_strerror(rc));
        uplink_service(uplink);
    }
}

/* Go to BACKOFF and arm the retry. @delay_ms < 0: decorrelated jitter,
 * sleep = min(cap, random_between(base, previous_sleep * 3)). */
static void uplink_backoff(struct uplink *uplink, int64_t delay_ms, const char *reason)
{
    const struct conf_uplink *conf = uplink->conf;
    uint64_t base = conf->reconnect_base_ms > UPLINK_MIN_BACKOFF_MS ? conf->reconnect_base_ms
                                                                    : UPLINK_MIN_BACKOFF_MS;
    uint64_t cap = conf->reconnect_cap_ms > base ? conf->reconnect_cap_ms : base;
    uint64_t sleep_ms;

    if (delay_ms >= 0) {
        sleep_ms = (uint64_t)delay_ms;
    } else {
        if (uplink->backoff_ms < base)
            uplink->backoff_ms = base;
        sleep_ms = uplink_random_between(uplink, base, uplink->backoff_ms * 3);
        if (sleep_ms > cap)
            sleep_ms = cap;
        uplink->backoff_ms = sleep_ms;
    }
    if (uplink_set_state(uplink, UPLINK_BACKOFF, "%s; next attempt in %.1f s", reason,
                         (double)sleep_ms / 1000.0) < 0)
        return;
    uv_timer_start(&uplink->timer, uplink_timer_cb, sleep_ms, 0);
}

static void conn_after_work_cb(uv_work_t *req, int status)
{
    struct uplink_conn *conn = container_of(req, struct uplink_conn, work);
    struct uplink *uplink = conn->uplink;
    int rc, err;

    conn->work_pending = false;
    if (conn->creds.taken)
        uplink->creds = conn->creds; /* what this attempt was set up with */
    if (status == UV_ECANCELED) {
        conn_fail(conn, "connection attempt cancelled");
        uplink_service(uplink);
        return;
    }
    if (state_of(uplink) != UPLINK_RESOLVING || uplink->reconnect_requested || conn->failed) {
        /* Stopping, reconfigured, or set-up failed: uplink_service() decides. */
        uplink_service(uplink);
        return;
    }
    if (conn->connect_rc != MOSQ_ERR_SUCCESS) {
        err = conn->connect_errno;
        if (conn->connect_rc == MOSQ_ERR_EAI)
            conn_fail(conn, "cannot resolve host \"%s\": %s (check host and DNS)", conn->host,
                      gai_strerror(err));
        else
            conn_explain_rc(conn, conn->connect_rc, err);
        uplink_service(uplink);
        return;
    }

    rc = uv_poll_init_socket(uplink->loop, &conn->poll, mosquitto_socket(conn->mosq));
    if (rc < 0) {
        conn_fail(conn, "cannot watch the socket to %s:%d: %s", conn->host, conn->port,
                  uv_strerror(rc));
        uplink_service(uplink);
        return;
    }
    conn->poll_init = true;
    conn->tcp_pending = true;
    if (conn->token_expires_at) {
        char exp[40];
        uplink->stats.token_expires_at = conn->token_expires_at;
        log_uplink(LOG_INFO, uplink->name, "signed a new JWT (%s%s%s), expires at %s",
                   jwt_alg_name(jwt_signer_alg(conn->signer)),
                   jwt_signer_kid(conn->signer) ? ", kid " : "",
                   jwt_signer_kid(conn->signer) ? jwt_signer_kid(conn->signer) : "",
                   format_utc(conn->token_expires_at, exp, sizeof(exp)));
    }
    if (uplink_set_state(uplink, UPLINK_CONNECTING, "%s resolved, connecting to port %d%s",
                         conn->host, conn->port, conn->tls ? " with TLS" : "") < 0)
        return;
    uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CONNECT_TIMEOUT_MS, 0);
    uv_timer_start(&uplink->tick, conn_tick_cb, UPLINK_TICK_MS, UPLINK_TICK_MS);
    uplink_service(uplink);
}

static void uplink_timer_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, timer);
    struct uplink_conn *conn = uplink->conn;
    SSL *ssl;

    switch (state_of(uplink)) {
    case UPLINK_BACKOFF:
        uplink_connect(uplink, "backoff elapsed");
        break;
    case UPLINK_CONNECTING:
        if (!conn)
            break;
        ssl = conn->mosq ? mosquitto_ssl_get(conn->mosq) : NULL;
        if (conn->tcp_pending)
            conn_fail(conn,
                      "TCP connect to %s:%d timed out after %d s (wrong host, or a firewall "
                      "drops the packets)",
                      conn->host, conn->port, UPLINK_CONNECT_TIMEOUT_MS / 1000);
        else if (ssl && !SSL_is_init_finished(ssl))
            conn_fail(conn, "TLS handshake with %s:%d timed out after %d s", conn->host, conn->port,
                      UPLINK_CONNECT_TIMEOUT_MS / 1000);
        else
            conn_fail(conn, "no CONNACK from %s:%d within %d s", conn->host, conn->port,
                      UPLINK_CONNECT_TIMEOUT_MS / 1000);
        break;
    case UPLINK_STOPPING:
        uplink->stop_deadline_passed = true;
        if (uplink_unsent(uplink))
            log_uplink(LOG_WARNING, uplink->name,
                       "stop: %zu message(s) not acknowledged by the broker within the shutdown "
                       "timeout; %s",
                       uplink_unsent(uplink),
                       uplink_durable(uplink) ? "they stay in the spool and are sent after the "
                                                "next start"
                                              : "they are dropped (spool.durability: none)");
        break;
    default:
        break;
    }
    uplink_service(uplink);
}

/* --- sending --------------------------------------------------------------- */

/* Take a token for one message of @bytes (0: the size is not known yet);
 * false when the rate limit says wait. The sender tries again on the next
 * event: a PUBACK, a new message, or the 1 s tick. */
static bool uplink_rate_take(struct uplink *uplink, size_t bytes)
{
    const struct conf_rate *rate = &uplink->conf->rate;
    uint64_t now = uv_now(uplink->loop);
    double elapsed = (double)(now - uplink->tokens_at) / 1000.0;

    if (!rate->max_msgs_per_s && !rate->max_bytes_per_s)
        return true;
    uplink->tokens_at = now;
    /* A bucket holds at most one second's worth, so a burst after a quiet
     * spell stays within a per-second quota. */
    if (rate->max_msgs_per_s) {
        uplink->msg_tokens += elapsed * rate->max_msgs_per_s;
        if (uplink->msg_tokens > rate->max_msgs_per_s)
            uplink->msg_tokens = rate->max_msgs_per_s;
        if (uplink->msg_tokens < 1)
            return false;
    }
    if (rate->max_bytes_per_s) {
        uplink->byte_tokens += elapsed * (double)rate->max_bytes_per_s;
        if (uplink->byte_tokens > (double)rate->max_bytes_per_s)
            uplink->byte_tokens = (double)rate->max_bytes_per_s;
        /* Sent on credit: the bucket may go negative by one message, so a
         * message larger than the bucket still goes out eventually. */
        if (uplink->byte_tokens <= 0)
            return false;
    }
    if (rate->max_msgs_per_s)
        uplink->msg_tokens -= 1;
    if (rate->max_bytes_per_s)
        uplink->byte_tokens -= (double)bytes;
    return true;
}

/* Size of a whole PUBLISH packet (MQTT 3.1.1 §3.3): fixed header byte,
 * Remaining Length (1-4 bytes, §2.2.3), topic name with its 2-byte length
 * (§3.3.2.1), packet identifier for QoS > 0 (§3.3.2.2), payload. */
static size_t publish_packet_size(size_t topic_len, size_t payload_len, int qos)
{
    size_t remaining = 2 + topic_len + (qos > 0 ? 2 : 0) + payload_len;
    size_t width = remaining < 128 ? 1 : remaining < 16384 ? 2 : remaining < 2097152 ? 3 : 4;

    return 1 + width + remaining;
}

/* The publish that starts with @first (just taken from the spool; its topic
 * is in topic_buf) may carry the records queued right behind it when the
 * profile allows (uplink_hooks.batch_cb): consecutive records with the same
 * topic, QoS and retain flag, payloads joined by its separator, while the
 * whole packet stays within its limit. Only what is already queued is
 * joined: a lone record goes out at once. A batch is a run of consecutive
 * records, so the spool's order (and each topic's) is kept, and the
 * look-ahead holds one record at a time (spool_unnext() gives back the one
 * that does not fit). On return *@payload and *@len are what to send and
 * *@last_seq the last record taken. Returns the number of records taken. */
static size_t uplink_batch_take(struct uplink *uplink, const struct spool_record *first, int qos,
                                const void **payload, size_t *len, uint64_t *last_seq)
{
    struct spool_record next;
    const char *sep;
    size_t sep_len, max_packet = 0, total, count = 1;

    *payload = first->payload;
    *len = first->len;
    *last_seq = first->seq;
    if (!uplink->hooks.batch_cb)
        return 1;
    sep = uplink->hooks.batch_cb(uplink->hooks.arg, uplink, uplink->topic_buf, &max_packet);
    if (!sep)
        return 1;
    if (!max_packet || max_packet > UPLINK_BATCH_MAX_BYTES)
        max_packet = UPLINK_BATCH_MAX_BYTES;
    sep_len = strlen(sep);
    /* Not even one more byte would fit: send it as it is (a record over
     * the limit was not made by the profile, which refuses those; it goes
     * alone, as without batching). */
    if (publish_packet_size(first->topic_len, first->len + sep_len + 1, qos) > max_packet)
        return 1;
    if (uplink->batch_cap < max_packet) {
        char *buf = realloc(uplink->batch_buf, max_packet);
        if (!buf)
            return 1; /* unbatched still works */
        uplink->batch_buf = buf;
        uplink->batch_cap = max_packet;
    }
    /* Copy now: @first's pointers die with the next call into the spool. */
    memcpy(uplink->batch_buf, first->payload, first->len);
    total = first->len;
    while (count < UPLINK_BATCH_MAX_RECORDS && spool_next(uplink->spool, &next) == 0) {
        if (next.topic_len != first->topic_len ||
            memcmp(next.topic, uplink->topic_buf, next.topic_len) != 0 ||
            (next.qos ? 1 : 0) != qos || next.retain != first->retain ||
            publish_packet_size(next.topic_len, total + sep_len + next.len, qos) > max_packet) {
            /* Just handed out, so it can be given back (spool.h). */
            if (spool_unnext(uplink->spool) < 0)
                log_uplink(LOG_ERR, uplink->name,
                           "BUG: spool record %" PRIu64 " could not be given back; it is sent "
                           "after the next reconnect",
                           next.seq);
            break;
        }
        memcpy(uplink->batch_buf + total, sep, sep_len);
        memcpy(uplink->batch_buf + total + sep_len, next.payload, next.len);
        total += sep_len + next.len;
        *last_seq = next.seq;
        count++;
    }
    *payload = uplink->batch_buf;
    *len = total;
    return count;
}

/* Hand spooled records to libmosquitto, in order, within the window and the
 * rate limit (one token per PUBLISH: that is what the cloud counts). */
/* TCP_CORK on (@on) or off the connection's socket; off sends what it held
 * at once. Returns whether it is corked now. Only a cost, never a
 * correctness matter: a failure just leaves the socket as it was. */
static bool conn_cork(struct uplink_conn *conn, bool on)
{
    int fd = mosquitto_socket(conn->mosq), value = on;

    if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_CORK, &value, sizeof(value)) < 0)
        return false;
    return on;
}

static void conn_flush(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct spool_record rec;
    const void *payload;
    size_t len, records;
    uint64_t last_seq;
    int rc, mid = 0, err, qos;
    unsigned published = 0;
    bool corked = false;

    while (uplink->inflight < conn->window && !conn->failed) {
        if (!uplink_rate_take(uplink, 0))
            break;
        if (spool_next(uplink->spool, &rec) < 0) {
            if (uplink->conf->rate.max_msgs_per_s)
                uplink->msg_tokens += 1; /* nothing sent: give the token back */
            break;
        }
        memcpy(uplink->topic_buf, rec.topic, rec.topic_len);
        uplink->topic_buf[rec.topic_len] = '\0';
        /* Spooled QoS 1 and 2 go up at QoS 1: at least once is what holds
         * across reconnects anyway (see the top of this file). */
        qos = rec.qos ? 1 : 0;
        records = uplink_batch_take(uplink, &rec, qos, &payload, &len, &last_seq);
        if (uplink->conf->rate.max_bytes_per_s)
            uplink->byte_tokens -= (double)(len + rec.topic_len);
        /* libmosquitto writes every PUBLISH with its own SSL_write(); when
         * several go out together, cork the socket so they leave in a few
         * segments and the broker reads them in one go (conn_cork). */
        if (++published == 2)
            corked = conn_cork(conn, true);
        uplink->in_io = true;
        errno = 0;
        rc = mosquitto_publish(conn->mosq, &mid, uplink->topic_buf, (int)len, payload, qos,
                               rec.retain);
        err = errno;
        uplink->in_io = false;
        switch (rc) {
        case MOSQ_ERR_SUCCESS:
            if (qos == 0) {
                uplink->stats.published += records;
                uplink->stats.publishes++;
                uplink->out_count += records;
                spool_ack_range(uplink->spool, rec.seq, last_seq);
            } else {
                struct uplink_inflight *e =
                    &uplink->inflight_tab[(uplink->inflight_head + uplink->inflight) %
                                          uplink->inflight_cap];
                e->mid = mid;
                e->first_seq = rec.seq;
                e->last_seq = last_seq;
                e->records = records;
                uplink->inflight++;
                uplink->inflight_records += records;
            }
            break;
        case MOSQ_ERR_INVAL:
        case MOSQ_ERR_PAYLOAD_SIZE:
        case MOSQ_ERR_MALFORMED_UTF8:
        case MOSQ_ERR_OVERSIZE_PACKET:
        case MOSQ_ERR_QOS_NOT_SUPPORTED:
            /* Cannot ever be sent: drop it rather than block the queue. */
            log_uplink(LOG_ERR, uplink->name, "dropping %zu message(s) for \"%s\" (%zu bytes): %s",
                       records, uplink->topic_buf, len, mosquitto_strerror(rc));
            uplink->stats.dropped += records;
            spool_ack_range(uplink->spool, rec.seq, last_seq);
            break;
        default:
            /* Out of memory or a write error: the records stay in the spool
             * and the next connection sends them again (spool_rewind). */
            conn_check(conn, rc, err);
            if (!conn->failed)
                conn_fail(conn, "sending to %s:%d failed: %s", conn->host, conn->port,
                          mosquitto_strerror(rc));
            return; /* the socket is closed: nothing corked to send */
        }
    }
    if (corked)
        conn_cork(conn, false);
}

/* --- control messages (uplink_publish_control) ----------------------------
 * A short in-memory list that goes out before the spool: a profile's
 * registration and start-up messages must precede the data they are about,
 * including data spooled before a reconnect or a restart. */

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

static void control_free(struct uplink_control *c)
{
    free(c->topic);
    free(c->payload);
    free(c);
}

/* Unlink-then-call: done_cb may add new control messages. */
static void control_finish(struct uplink_control *c, int status)
{
    void (*done_cb)(void *, int) = c->done_cb;
    void *arg = c->arg;

    control_free(c);
    if (done_cb)
        done_cb(arg, status);
}

/* conn_publish_cb(): true when @mid was a control message. */
static bool uplink_control_acked(struct uplink *uplink, int mid)
{
    struct uplink_control **link, *c;

    for (link = &uplink->controls; (c = *link) != NULL; link = &c->next) {
        if (c->sent && c->qos > 0 && c->mid == mid) {
            *link = c->next;
            control_finish(c, 0);
            return true;
        }
    }
    return false;
}

/* The connection ended: per-connection messages go, the rest is re-sent
 * (first) on the next one. @status for the dropped ones. */
static void uplink_control_reset(struct uplink *uplink, bool drop_all, int status)
{
    struct uplink_control **link = &uplink->controls, *c;

    while ((c = *link) != NULL) {
        if (drop_all || (c->flags & UPLINK_CONTROL_CONNECTION)) {
            *link = c->next;
            control_finish(c, status);
            link = &uplink->controls; /* done_cb may have changed the list */
            continue;
        }
        c->sent = false;
        link = &c->next;
    }
}

/* Send what is not sent yet, in order, within the rate limit. Returns true
 * while spooled data must wait: a UPLINK_CONTROL_GATE message is not sent
 * (out of tokens) or not acknowledged yet. */
static bool conn_flush_control(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct uplink_control **link = &uplink->controls, *c;
    bool gate = false;
    int rc, err, mid;

    while ((c = *link) != NULL && !conn->failed) {
        if (!c->sent) {
            /* Control messages count against rate.* like data: the cloud
             * counts them (GCP: an attach is one of the 100 messages/s of
             * the connection), and a reconnect re-attaching many children
             * must not burst past it. Out of tokens: the rest waits for
             * the next event (a PUBACK or the 1 s tick), and a gate among
             * them keeps the spool held. */
            if (!uplink_rate_take(uplink, strlen(c->topic) + c->len)) {
                for (; c != NULL; c = c->next)
                    gate = gate || (c->flags & UPLINK_CONTROL_GATE);
                return gate;
            }
            mid = 0;
            uplink->in_io = true;
            errno = 0;
            rc = mosquitto_publish(conn->mosq, &mid, c->topic, (int)c->len, c->payload, c->qos,
                                   false);
            err = errno;
            uplink->in_io = false;
            if (rc == MOSQ_ERR_SUCCESS) {
                c->sent = true;
                c->mid = mid;
                if (c->qos == 0) {
                    *link = c->next;
                    control_finish(c, 0);
                    link = &uplink->controls;
                    continue;
                }
            } else if (rc == MOSQ_ERR_INVAL || rc == MOSQ_ERR_PAYLOAD_SIZE ||
                       rc == MOSQ_ERR_MALFORMED_UTF8 || rc == MOSQ_ERR_OVERSIZE_PACKET) {
                log_uplink(LOG_ERR, uplink->name, "dropping control message for \"%s\": %s",
                           c->topic, mosquitto_strerror(rc));
                *link = c->next;
                control_finish(c, -EINVAL);
                link = &uplink->controls;
                continue;
            } else {
                conn_check(conn, rc, err);
                if (!conn->failed)
                    conn_fail(conn, "sending to %s:%d failed: %s", conn->host, conn->port,
                              mosquitto_strerror(rc));
                return true;
            }
        }
        if (c->flags & UPLINK_CONTROL_GATE)
            gate = true;
        link = &c->next;
    }
    return gate;
}

int uplink_publish_control(struct uplink *uplink, const char *topic, const void *payload,
                           size_t len, int qos, unsigned flags,
                           void (*done_cb)(void *arg, int status), void *arg)
{
    struct uplink_control *c, **link;

    if (!topic || qos < 0 || qos > 1 || mosquitto_pub_topic_check(topic) != MOSQ_ERR_SUCCESS)
        return -EINVAL;
    if (state_of(uplink) == UPLINK_STOPPING || state_of(uplink) == UPLINK_STOPPED)
        return -ESHUTDOWN;
    if ((qos == 0 || (flags & UPLINK_CONTROL_CONNECTION)) && state_of(uplink) != UPLINK_ONLINE)
        return -ENOTCONN;
    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->topic = strdup(topic);
    c->payload = len ? malloc(len) : NULL;
    if (!c->topic || (len && !c->payload)) {
        control_free(c);
        return -ENOMEM;
    }
    if (len)
        memcpy(c->payload, payload, len);
    c->len = len;
    c->qos = qos;
    c->flags = flags;
    c->done_cb = done_cb;
    c->arg = arg;
    for (link = &uplink->controls; *link; link = &(*link)->next) {
        if ((flags & UPLINK_CONTROL_FRONT) && !((*link)->flags & UPLINK_CONTROL_FRONT) &&
            !(*link)->sent)
            break;
    }
    c->next = *link;
    *link = c;
    uplink_service(uplink);
    return 0;
}

void uplink_reconnect(struct uplink *uplink, const char *reason)
{
    switch (state_of(uplink)) {
    case UPLINK_BACKOFF:
        log_uplink(LOG_NOTICE, uplink->name, "%s; connecting now", reason);
        uplink->backoff_ms = 0;
        uv_timer_start(&uplink->timer, uplink_timer_cb, 0, 0);
        break;
    case UPLINK_RESOLVING:
    case UPLINK_CONNECTING:
    case UPLINK_ONLINE:
        log_uplink(LOG_NOTICE, uplink->name, "%s; reconnecting", reason);
        uplink->reconnect_requested = true;
        uplink->backoff_ms = 0;
        uplink_service(uplink);
        break;
    default:
        break;
    }
}

uv_loop_t *uplink_loop(const struct uplink *uplink)
{
    return uplink->loop;
}

const struct conf_uplink *uplink_get_conf(const struct uplink *uplink)
{
    return uplink->conf;
}

static void conn_subscribe_all(struct uplink_conn *conn)
{
    struct uplink_sub *sub;
    int rc;

    for (sub = conn->uplink->subs; sub; sub = sub->next) {
        rc = mosquitto_subscribe(conn->mosq, &sub->mid, sub->filter, sub->qos);
        if (rc)
            log_uplink(LOG_ERR, conn->uplink->name, "cannot subscribe to \"%s\": %s", sub->filter,
                       mosquitto_strerror(rc));
    }
}

/* Write what libmosquitto has queued, if the socket takes it. */
static void conn_write(struct uplink_conn *conn)
{
    int rc, err;

    if (conn->failed || conn->tcp_pending || !conn->mosq || !mosquitto_want_write(conn->mosq))
        return;
    conn->uplink->in_io = true;
    errno = 0;
    rc = mosquitto_loop_write(conn->mosq, 1);
    err = errno;
    conn->uplink->in_io = false;
    conn_check(conn, rc, err);
}

/* --- the state machine's driver -------------------------------------------- */

static void uplink_closed_one(struct uplink *uplink)
{
    void (*done_cb)(struct uplink *, void *);

    if (--uplink->closing > 0)
        return;
    if (uplink_set_state(uplink, UPLINK_STOPPED, "all handles closed") < 0)
        return;
    done_cb = uplink->done_cb;
    if (done_cb)
        done_cb(uplink, uplink->done_arg); /* may free the uplink: touch nothing after */
}

static void uplink_handle_close_cb(uv_handle_t *handle)
{
    uplink_closed_one(handle->data);
}

static void uplink_spool_closed_cb(void *arg)
{
    uplink_closed_one(arg);
}

/* A JWT refused with CONNACK 4/5 right after a clock step, or after the
 * clock check had failed, was most likely signed with the old time: sign
 * again at once instead of waiting out the backoff. Once; after that the
 * normal backoff applies until a CONNACK 0. */
static bool uplink_jwt_resign_now(struct uplink *uplink, const struct uplink_conn *conn)
{
    int64_t wall_ms, mono_ms;
    bool stepped;

    if (!conn->token_expires_at || !conn->connack_seen ||
        (conn->connack_rc != 4 && conn->connack_rc != 5) || uplink->resigned_at_once)
        return false;
    wall_ms = ((int64_t)time(NULL) - (int64_t)conn->token_signed_at) * 1000;
    mono_ms = (int64_t)(util_now_ms() - conn->token_signed_mono_ms);
    stepped = wall_ms - mono_ms > UPLINK_CLOCK_STEP_MS || mono_ms - wall_ms > UPLINK_CLOCK_STEP_MS;
    if (!stepped && !uplink->clock_was_bad)
        return false;
    uplink->resigned_at_once = true;
    log_uplink(LOG_NOTICE, uplink->name, "%s; signing a new JWT now instead of backing off (once)",
               stepped ? "the wall clock was stepped since the token was signed"
                       : "the clock was not trustworthy earlier");
    return true;
}

/* Tear the connection down after a failure and decide what comes next. */
static void uplink_conn_failed(struct uplink *uplink)
{
    struct uplink_conn *conn = uplink->conn;
    bool stable = conn->online &&
                  (conn->acked || uv_now(uplink->loop) - conn->online_since >= UPLINK_STABLE_MS);
    bool was_online = conn->online;

    if (state_of(uplink) == UPLINK_STOPPING) {
        log_uplink(LOG_NOTICE, uplink->name, "%s", conn->error);
        uplink_drop_conn(uplink);
        return;
    }
    log_uplink(LOG_ERR, uplink->name, "%s", conn->error);
    uplink_set_error(uplink, conn->error);
    if (uplink_jwt_resign_now(uplink, conn)) {
        uplink_drop_conn(uplink);
        uplink_backoff(uplink, 0, "signing a new JWT at once because the clock changed");
        return;
    }
    bool jwt_refused = conn->token_expires_at && conn->connack_seen &&
                       (conn->connack_rc == 4 || conn->connack_rc == 5);
    time_t signed_at = conn->token_signed_at;
    uint64_t signed_mono_ms = conn->token_signed_mono_ms;
    uplink_drop_conn(uplink);
    if (stable)
        uplink->backoff_ms = 0; /* the session worked: start the jitter from base again */
    uplink_backoff(uplink, -1, was_online ? "connection lost" : "connection attempt failed");
    if (jwt_refused && state_of(uplink) == UPLINK_BACKOFF) {
        /* The clock that signed the refused token may be corrected during
         * the backoff (NTP stepping it): uplink_clock_watch(). The rotate
         * timer is free in BACKOFF (uplink_drop_conn stopped it). */
        uplink->clock_watch = true;
        uplink->refused_signed_at = signed_at;
        uplink->refused_signed_mono_ms = signed_mono_ms;
        uv_timer_start(&uplink->rotate, uplink_rotate_cb, UPLINK_CLOCK_WATCH_MS,
                       UPLINK_CLOCK_WATCH_MS);
    }
}

/* In BACKOFF after a refused JWT, every UPLINK_CLOCK_WATCH_MS: when the wall
 * clock moved more than UPLINK_CLOCK_STEP_MS away from the monotonic clock
 * since the refused token was signed, it was stepped (NTP, chrony, an RTC
 * read late), so the refusal was most likely the old clock's fault
 * (RFC 7519 §4.1.4/§4.1.6: exp and iat are judged by the server's clock).
 * Sign again now rather than wait out a backoff that may be minutes long. */
static void uplink_clock_watch(struct uplink *uplink)
{
    int64_t wall_ms, mono_ms, step_ms;

    if (state_of(uplink) != UPLINK_BACKOFF) {
        uplink->clock_watch = false;
        uv_timer_stop(&uplink->rotate);
        return;
    }
    wall_ms = ((int64_t)time(NULL) - (int64_t)uplink->refused_signed_at) * 1000;
    mono_ms = (int64_t)(util_now_ms() - uplink->refused_signed_mono_ms);
    step_ms = wall_ms - mono_ms;
    if (step_ms <= UPLINK_CLOCK_STEP_MS && step_ms >= -UPLINK_CLOCK_STEP_MS)
        return;
    uplink->clock_watch = false;
    uv_timer_stop(&uplink->rotate);
    log_uplink(LOG_NOTICE, uplink->name,
               "the wall clock was stepped by %+.0f s since the refused JWT was signed; signing "
               "a new JWT now instead of waiting out the backoff",
               (double)step_ms / 1000.0);
    uplink_connect(uplink, "the clock was stepped after the JWT was refused");
    uplink_service(uplink);
}

/* The rotate timer: first at the token's refresh point (start draining),
 * then at the drain deadline. uplink_step() disconnects once nothing is in
 * flight or the deadline passed, and the next attempt signs a new token. */
static void uplink_rotate_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, rotate);
    struct uplink_conn *conn = uplink->conn;
    int64_t left_ms;
    uint64_t drain_ms;
    char exp[40];

    if (uplink->clock_watch) {
        uplink_clock_watch(uplink); /* BACKOFF after a refused JWT */
        return;
    }
    if (state_of(uplink) != UPLINK_ONLINE || !conn || !conn->online)
        return;
    if (!uplink->rotating) {
        /* The drain must end before exp: the server may drop us there. */
        left_ms = ((int64_t)conn->token_expires_at - (int64_t)time(NULL)) * 1000 - 1000;
        drain_ms = left_ms <= 0                       ? 0
                   : left_ms < UPLINK_ROTATE_DRAIN_MS ? (uint64_t)left_ms
                                                      : UPLINK_ROTATE_DRAIN_MS;
        uplink->rotating = true;
        uplink->rotate_deadline = uv_now(uplink->loop) + drain_ms;
        log_uplink(LOG_NOTICE, uplink->name,
                   "rotating the JWT that expires at %s: waiting up to %.1f s for %zu in-flight "
                   "publish(es), then reconnecting with a new token",
                   format_utc(conn->token_expires_at, exp, sizeof(exp)), (double)drain_ms / 1000.0,
                   uplink->inflight);
        uv_timer_start(&uplink->rotate, uplink_rotate_cb, drain_ms, 0);
    }
    uplink_service(uplink);
}

/* On CONNACK 0 of a JWT session: arm the rotate timer for
 * jwt_refresh_at(). The delay is measured on the monotonic clock from the
 * moment of signing, so a wall-clock step cannot make the token outlive
 * its exp (jwt.h). */
static void uplink_arm_rotation(struct uplink *uplink, const struct uplink_conn *conn)
{
    struct jwt_refresh policy = {.percent = conn->refresh_percent};
    time_t refresh_at;
    int64_t delay_ms;

    if (!conn->token_expires_at)
        return;
    refresh_at = jwt_refresh_at(conn->token_signed_at, conn->token_expires_at, &policy);
    delay_ms = ((int64_t)refresh_at - (int64_t)conn->token_signed_at) * 1000 -
               (int64_t)(util_now_ms() - conn->token_signed_mono_ms);
    if (delay_ms < 0)
        delay_ms = 0;
    uplink->stats.token_refresh_at = refresh_at;
    log_uplink(LOG_INFO, uplink->name, "the JWT will be replaced in %.1f s",
               (double)delay_ms / 1000.0);
    uv_timer_start(&uplink->rotate, uplink_rotate_cb, (uint64_t)delay_ms, 0);
}

static bool uplink_step(struct uplink *uplink)
{
    struct uplink_conn *conn = uplink->conn;

    if (conn && conn->work_pending)
        return false; /* the threadpool owns conn->mosq; after_work comes back here */

    if (conn && conn->failed) {
        uplink_conn_failed(uplink);
        return true;
    }

    switch (state_of(uplink)) {
    case UPLINK_RESOLVING:
        if (conn && uplink->reconnect_requested) {
            uplink->reconnect_requested = false;
            uplink_drop_conn(uplink);
            uplink_backoff(uplink, 0, "configuration changed");
            return true;
        }
        break;
    case UPLINK_CONNECTING:
    case UPLINK_ONLINE:
        if (!conn)
            break;
        if (uplink->reconnect_requested) {
            uplink->reconnect_requested = false;
            if (conn->online)
                mosquitto_disconnect(conn->mosq); /* sends DISCONNECT if the socket takes it */
            uplink_drop_conn(uplink);
            uplink_backoff(uplink, 0, "configuration changed");
            return true;
        }
        if (state_of(uplink) == UPLINK_CONNECTING && conn->connack_seen && conn->connack_rc == 0 &&
            !conn->online) {
            conn->online = true;
            conn->online_since = uv_now(uplink->loop);
            uplink->clock_was_bad = false;
            uplink->resigned_at_once = false;
            conn->captured_len = 0;
            conn->captured[0] = '\0';
            uplink->stats.connects++;
            uv_timer_stop(&uplink->timer);
            if (uplink_set_state(uplink, UPLINK_ONLINE, "CONNACK accepted by %s:%d", conn->host,
                                 conn->port) < 0)
                return false;
            uplink_arm_rotation(uplink, conn);
            conn_subscribe_all(conn);
            if (uplink->hooks.online_cb)
                uplink->hooks.online_cb(uplink->hooks.arg, uplink);
            return true;
        }
        if (state_of(uplink) == UPLINK_ONLINE && uplink->rotating &&
            (uplink->inflight == 0 || uv_now(uplink->loop) >= uplink->rotate_deadline)) {
            if (uplink->inflight)
                log_uplink(LOG_WARNING, uplink->name,
                           "JWT rotation: %zu publish(es) still unacknowledged after %d s; they "
                           "are re-sent on the new connection",
                           uplink->inflight, UPLINK_ROTATE_DRAIN_MS / 1000);
            /* MQTT 3.1.1 §3.14: a clean DISCONNECT, so no will is sent. */
            mosquitto_disconnect(conn->mosq);
            uplink_drop_conn(uplink);
            uplink->stats.rotations++;
            uplink->backoff_ms = 0;
            uplink_backoff(uplink, 0, "rotating the JWT: reconnecting with a new token");
            return true;
        }
        /* Control messages first; a gated one holds the spool back. */
        if (state_of(uplink) == UPLINK_ONLINE && !uplink->rotating && !conn_flush_control(conn) &&
            !conn->hold_spool)
            conn_flush(conn);
        conn_write(conn);
        if (conn->failed)
            return true;
        conn_update_poll(conn);
        break;
    case UPLINK_STOPPING:
        if (conn) {
            /* hold_spool (bootstrap session): nothing may go, so no wait. */
            if (conn->online && !conn->hold_spool && uplink_unsent(uplink) > 0 &&
                !uplink->stop_deadline_passed) {
                /* Use the grace period to collect the acks of what is in
                 * flight (fewer duplicates after the restart) and, with a
                 * memory spool, to send what is queued. */
                conn_flush(conn);
                conn_write(conn);
                if (conn->failed)
                    return true;
                conn_update_poll(conn);
                break;
            }
            if (conn->online) {
                /* MQTT 3.1.1 §3.14: DISCONNECT tells the broker not to send the will. */
                mosquitto_disconnect(conn->mosq);
            }
            uplink_drop_conn(uplink);
            return true;
        }
        if (uplink->closing == 0 && !uplink->handles_closing) {
            uplink_control_reset(uplink, true, -ECANCELED);
            uplink->handles_closing = true;
            uv_timer_stop(&uplink->tick);
            uv_timer_stop(&uplink->timer);
            uv_timer_stop(&uplink->rotate);
            uplink->closing += 3;
            uv_close((uv_handle_t *)&uplink->tick, uplink_handle_close_cb);
            uv_close((uv_handle_t *)&uplink->timer, uplink_handle_close_cb);
            uv_close((uv_handle_t *)&uplink->rotate, uplink_handle_close_cb);
            if (uplink->spool && !uplink->spool_closing) {
                /* Commits what is pending and persists the cursor. */
                uplink->spool_closing = true;
                uplink->closing++;
                spool_close(uplink->spool, uplink_spool_closed_cb, uplink);
            }
        }
        break;
    default:
        break;
    }
    return false;
}

/* Act on whatever the last event changed. Never runs inside a libmosquitto
 * callback (in_io) and never nests: API calls from hooks just ask again. */
static void uplink_service(struct uplink *uplink)
{
    unsigned rounds = 0;

    if (uplink->in_io)
        return;
    if (uplink->in_service) {
        uplink->service_again = true;
        return;
    }
    uplink->in_service = true;
    do {
        uplink->service_again = false;
        /* Bounded: each step makes progress (a transition or a drop); the
         * limit only guards against a bug turning into a hang. */
        while (uplink_step(uplink) && ++rounds < 64)
            ;
    } while (uplink->service_again && ++rounds < 64);
    uplink->in_service = false;
}

static int uplink_handles_init(struct uplink *uplink)
{
    int rc;

    if (uplink->handles_init)
        return 0;
    rc = uv_timer_init(uplink->loop, &uplink->tick);
    if (rc < 0)
        return rc;
    rc = uv_timer_init(uplink->loop, &uplink->timer);
    if (rc < 0) {
        /* The tick timer was never started: closing it costs one loop turn. */
        uplink->tick.data = NULL;
        uv_close((uv_handle_t *)&uplink->tick, NULL);
        return rc;
    }
    rc = uv_timer_init(uplink->loop, &uplink->rotate);
    if (rc < 0) {
        uplink->tick.data = NULL;
        uplink->timer.data = NULL;
        uv_close((uv_handle_t *)&uplink->tick, NULL);
        uv_close((uv_handle_t *)&uplink->timer, NULL);
        return rc;
    }
    uplink->tick.data = uplink;
    uplink->timer.data = uplink;
    uplink->rotate.data = uplink;
    uplink->handles_init = true;
    return 0;
}

/* --- public API ------------------------------------------------------------ */

int uplink_new(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
               const struct uplink_hooks *hooks, struct uplink **out)
{
    struct uplink *uplink;
    const char *name = conf && conf->name ? conf->name : "?";

    *out = NULL;
    if (!conf || !conf->name || !conf->host || !conf->host[0]) {
        log_err("uplink %s: host is required", name);
        return -EINVAL;
    }
    if (conf->port == 0) {
        log_uplink(LOG_ERR, name, "port 0 is not valid");
        return -EINVAL;
    }
    /* libmosquitto: keepalive is 0 (off) or 5..65535 s (lib/connect.c). */
    if (conf->keepalive_s != 0 && (conf->keepalive_s < 5 || conf->keepalive_s > 65535)) {
        log_uplink(LOG_ERR, name, "keepalive %u s is not valid (0, or 5 to 65535 s)",
                   conf->keepalive_s);
        return -EINVAL;
    }
    if (!conf->client_id && (!gateway_id || !gateway_id[0])) {
        log_uplink(LOG_ERR, name, "no client_id and no gateway.id to use instead");
        return -EINVAL;
    }
    if (conf->tls.enabled && (!conf->tls.cert != !conf->tls.key)) {
        log_uplink(LOG_ERR, name, "tls.cert and tls.key must be given together");
        return -EINVAL;
    }
    if (conf->tls.enabled && !conf->tls.ca_system && !conf->tls.ca_file) {
        log_uplink(LOG_ERR, name, "tls.ca is neither \"system\" nor a file");
        return -EINVAL;
    }

    uplink = calloc(1, sizeof(*uplink));
    if (!uplink)
        return -ENOMEM;
    uplink->name = strdup(conf->name);
    uplink->gateway_id = strdup(gateway_id ? gateway_id : "");
    uplink->topic_buf = malloc(65536); /* MQTT 3.1.1 §1.5.3: topics are < 64 KiB */
    if (!uplink->name || !uplink->gateway_id || !uplink->topic_buf) {
        free(uplink->name);
        free(uplink->gateway_id);
        free(uplink->topic_buf);
        free(uplink);
        return -ENOMEM;
    }
    uplink->loop = loop;
    uplink->rate_since = uv_now(loop);
    uplink->conf = conf;
    uplink->loop_thread = pthread_self();
    sm_init(&uplink->sm, &uplink_sm, UPLINK_IDLE);
    if (hooks)
        uplink->hooks = *hooks;
    if (getrandom(&uplink->rng, sizeof(uplink->rng), GRND_NONBLOCK) != sizeof(uplink->rng))
        uplink->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)uplink;
    if (uplink->rng == 0)
        uplink->rng = 0x9E3779B97F4A7C15ULL;
    *out = uplink;
    return 0;
}

int uplink_start(struct uplink *uplink)
{
    int rc;

    if (state_of(uplink) != UPLINK_IDLE)
        return -EALREADY;
    rc = uplink_handles_init(uplink);
    if (rc < 0)
        return rc;
    uplink_connect(uplink, "start");
    return 0;
}

/* Spool options from the uplink's conf section. */
static void uplink_spool_options(const struct uplink *uplink, const char *dir,
                                 struct spool_options *opts)
{
    const struct conf_spool *cs = &uplink->conf->spool;

    memset(opts, 0, sizeof(*opts));
    opts->dir = dir;
    opts->name = uplink->name;
    opts->durability = dir && cs->durability == CONF_SPOOL_FSYNC ? SPOOL_DURABLE : SPOOL_MEMORY;
    opts->overflow = cs->overflow == CONF_SPOOL_DROP_OLDEST ? SPOOL_DROP_OLDEST : SPOOL_BLOCK;
    opts->max_bytes = cs->max_bytes;
    opts->max_age_ms = cs->max_age_ms;
    opts->commit_interval_ms = cs->commit_interval_ms;
    opts->commit_gap_ms = cs->commit_gap_ms;
}

static int uplink_open_spool_in(struct uplink *uplink, const char *dir, const char *damaged_dir)
{
    struct spool_options opts;
    int rc;

    if (uplink->spool)
        return -EALREADY;
    if (dir && uplink->conf->spool.durability == CONF_SPOOL_FSYNC) {
        uplink_spool_options(uplink, dir, &opts);
        opts.damaged_dir = damaged_dir;
    } else {
        uplink_spool_options(uplink, NULL, &opts);
        log_uplink(LOG_NOTICE, uplink->name,
                   "spool.durability is none: queued messages are kept in memory only and are "
                   "lost on restart");
    }
    rc = spool_open(uplink->loop, &opts, &uplink->spool);
    if (rc < 0)
        log_uplink(LOG_ERR, uplink->name, "cannot open the spool%s%s: %s", opts.dir ? " in " : "",
                   opts.dir ? opts.dir : "", strerror(-rc));
    return rc;
}

int uplink_open_spool(struct uplink *uplink, const char *state_dir)
{
    char dir[4096], damaged[4096];

    if (state_dir &&
        (snprintf(dir, sizeof(dir), "%s/spool/%s", state_dir, uplink->name) >= (int)sizeof(dir) ||
         snprintf(damaged, sizeof(damaged), "%s/%s", state_dir, RECORD_DAMAGED_DIR) >=
             (int)sizeof(damaged)))
        return -ENAMETOOLONG;
    return uplink_open_spool_in(uplink, state_dir ? dir : NULL, state_dir ? damaged : NULL);
}

int uplink_open_spool_dir(struct uplink *uplink, const char *dir)
{
    /* Per-device sessions do not know the state directory: their damaged
     * bytes are reported in the log, not copied. */
    return uplink_open_spool_in(uplink, dir, NULL);
}

/* A memory spool for an uplink whose owner did not call uplink_open_spool(). */
static int uplink_ensure_spool(struct uplink *uplink)
{
    return uplink->spool ? 0 : uplink_open_spool(uplink, NULL);
}

static bool uplink_durable(const struct uplink *uplink)
{
    struct spool_stats st;

    if (!uplink->spool)
        return false;
    spool_get_stats(uplink->spool, &st);
    return st.durable;
}

/* What a graceful stop waits for: in-flight records (durable: the rest
 * survives in the spool), or everything (memory spool). */
static size_t uplink_unsent(const struct uplink *uplink)
{
    struct spool_stats st;

    if (!uplink->spool)
        return 0;
    spool_get_stats(uplink->spool, &st);
    return st.durable ? uplink->inflight : (size_t)st.depth;
}

int uplink_publish_async(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, bool retain, void (*done_cb)(void *arg, int status), void *arg)
{
    size_t topic_len;
    int rc;

    if (state_of(uplink) == UPLINK_STOPPING || state_of(uplink) == UPLINK_STOPPED)
        return -ESHUTDOWN;
    if (qos < 0 || qos > 2 || !topic || (topic_len = strlen(topic)) > 65535)
        return -EINVAL;
    /* MQTT 3.1.1 §4.7: no wildcards in a topic name; §1.5.3: valid UTF-8. */
    if (mosquitto_pub_topic_check(topic) != MOSQ_ERR_SUCCESS ||
        mosquitto_validate_utf8(topic, (int)topic_len) != MOSQ_ERR_SUCCESS)
        return -EINVAL;
    /* MQTT 3.1.1 §2.2.3: remaining length (topic, packet id, payload) < 256 MiB. */
    if (len > 268435455 - 4 - topic_len)
        return -EMSGSIZE;
    rc = uplink_ensure_spool(uplink);
    if (rc < 0)
        return rc;
    uplink->in_count++;
    uplink_rates_update(uplink);

    if (qos == 0) {
        struct uplink_conn *conn = uplink->conn;
        if (state_of(uplink) == UPLINK_ONLINE && conn && !conn->failed && !uplink->rotating) {
            /* Straight upstream: QoS 0 promises nothing to wait for. */
            int mid;
            uplink->in_io = true;
            rc = mosquitto_publish(conn->mosq, &mid, topic, (int)len, payload, 0, retain);
            uplink->in_io = false;
            if (rc == MOSQ_ERR_SUCCESS) {
                uplink->stats.published++;
                uplink->stats.publishes++;
                uplink->out_count++;
            } else {
                uplink->stats.dropped_qos0++;
            }
            uplink_service(uplink);
            return 0;
        }
        if (!uplink->conf->spool.qos0_offline_spool) {
            uplink->stats.dropped_qos0++;
            return 0;
        }
        rc = spool_append(uplink->spool, topic, topic_len, payload, len, 0, retain,
                          SPOOL_APPEND_NOWAIT, NULL, NULL);
        if (rc < 0) {
            uplink->stats.dropped_qos0++;
            return rc;
        }
        return 0;
    }

    rc = spool_append(uplink->spool, topic, topic_len, payload, len, qos, retain, 0, done_cb, arg);
    if (rc < 0) {
        uplink->stats.dropped++;
        return rc;
    }
    if (state_of(uplink) == UPLINK_ONLINE)
        uplink_service(uplink);
    return rc == SPOOL_PENDING ? UPLINK_PUBLISH_PENDING : 0;
}

static void uplink_ignore_done_cb(void *arg, int status)
{
}

int uplink_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                   int qos, bool retain)
{
    int rc =
        uplink_publish_async(uplink, topic, payload, len, qos, retain, uplink_ignore_done_cb, NULL);
    return rc == UPLINK_PUBLISH_PENDING ? 0 : rc;
}

int uplink_subscribe(struct uplink *uplink, const char *filter, int qos)
{
    struct uplink_sub *sub;
    int rc;

    if (!filter || qos < 0 || qos > 2)
        return -EINVAL;
    /* MQTT 3.1.1 §4.7.1: '#' last and alone in its level, '+' alone in its level. */
    if (mosquitto_sub_topic_check(filter) != MOSQ_ERR_SUCCESS ||
        mosquitto_validate_utf8(filter, (int)strlen(filter)) != MOSQ_ERR_SUCCESS)
        return -EINVAL;
    for (sub = uplink->subs; sub; sub = sub->next) {
        if (strcmp(sub->filter, filter) == 0)
            break;
    }
    if (!sub) {
        sub = calloc(1, sizeof(*sub));
        if (!sub)
            return -ENOMEM;
        sub->filter = strdup(filter);
        if (!sub->filter) {
            free(sub);
            return -ENOMEM;
        }
        sub->next = uplink->subs;
        uplink->subs = sub;
    }
    sub->qos = qos;
    if (state_of(uplink) == UPLINK_ONLINE && uplink->conn && !uplink->conn->failed) {
        rc = mosquitto_subscribe(uplink->conn->mosq, &sub->mid, sub->filter, sub->qos);
        if (rc)
            log_uplink(LOG_ERR, uplink->name, "cannot subscribe to \"%s\": %s", filter,
                       mosquitto_strerror(rc));
        uplink_service(uplink);
    }
    return 0;
}

int uplink_unsubscribe(struct uplink *uplink, const char *filter)
{
    struct uplink_sub **link, *sub;

    for (link = &uplink->subs; (sub = *link) != NULL; link = &sub->next) {
        if (strcmp(sub->filter, filter) == 0)
            break;
    }
    if (!sub)
        return -ENOENT;
    *link = sub->next;
    if (state_of(uplink) == UPLINK_ONLINE && uplink->conn && !uplink->conn->failed) {
        mosquitto_unsubscribe(uplink->conn->mosq, NULL, sub->filter);
        uplink_service(uplink);
    }
    free(sub->filter);
    free(sub);
    return 0;
}

int uplink_reconfigure(struct uplink *uplink, const struct conf_uplink *conf)
{
    bool same = conf_uplink_equal(uplink->conf, conf);
    struct spool_options opts;

    if (uplink->spool && conf->spool.durability != uplink->conf->spool.durability)
        log_uplink(LOG_WARNING, uplink->name,
                   "spool.durability changed; it takes effect at the next start");
    uplink->conf = conf;
    /* The new conf loaded auth.key from the file just now: it is at least as
     * new as a key uplink_reload_credentials() installed. */
    EVP_PKEY_free(uplink->jwt_key);
    uplink->jwt_key = NULL;
    if (uplink->spool) {
        /* Bounds, overflow, commit_interval and commit_gap apply at once. */
        uplink_spool_options(uplink, NULL, &opts);
        spool_set_limits(uplink->spool, &opts);
    }
    if (same)
        return 0;
    switch (state_of(uplink)) {
    case UPLINK_BACKOFF:
        log_uplink(LOG_NOTICE, uplink->name, "configuration changed; reconnecting now");
        uplink->backoff_ms = 0;
        uv_timer_start(&uplink->timer, uplink_timer_cb, 0, 0);
        break;
    case UPLINK_RESOLVING:
    case UPLINK_CONNECTING:
    case UPLINK_ONLINE:
        log_uplink(LOG_NOTICE, uplink->name,
                   "configuration changed; reconnecting with the new settings");
        uplink->reconnect_requested = true;
        uplink->backoff_ms = 0;
        uplink_service(uplink);
        break;
    default:
        break; /* IDLE: used at start; STOPPING/STOPPED: irrelevant */
    }
    return 0;
}

/* Appends @name to the comma-separated list @list. */
/* Whether the fingerprint @now differs from @before; if so, @name is added
 * to the comma-separated @list (of @size bytes) for the log line. */
static bool creds_changed(const char *now, const char *before, char *list, size_t size,
                          const char *name)
{
    size_t used = strlen(list);

    if (strcmp(now, before) == 0)
        return false;
    snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
    return true;
}

/* The start-up checks on the files now on disk, for what changed. A new
 * auth.key that passes goes to *@jwt_key_out (the caller owns it). */
static int creds_check(const struct conf_uplink *conf, bool tls_changed, bool ca_changed,
                       EVP_PKEY *jwt_key, char *err, size_t err_size, char *warning,
                       size_t warning_size)
{
    char described[64];
    int rc;

    warning[0] = '\0';
    if (tls_changed && conf->tls.cert) {
        /* tlscheck.h: the key is the certificate's, every certificate of
         * the chain valid now, the CN the profile's (Cumulocity). */
        struct keys_options key_options;
        tlscheck_key_options(conf, &key_options); /* a pkcs11: key's PIN file and module */
        struct tlscheck_options options = {.expected_cn = conf->cert_cn,
                                           .key_options = &key_options};
        rc = tlscheck_client_cert(conf->tls.cert, conf->tls.key, &options, time(NULL), NULL, err,
                                  err_size, warning, warning_size);
        if (rc < 0)
            return rc;
    }
    if (ca_changed && conf->tls.ca_file && !conf->tls.ca_system) {
        X509 *leaf = NULL;
        rc = keys_load_cert_chain(conf->tls.ca_file, &leaf, NULL, err, err_size);
        X509_free(leaf);
        if (rc < 0)
            return rc;
    }
    if (jwt_key) {
        /* What conf_load() checks: the key fits auth.alg and can sign. */
        const struct conf_jwt *jwt = &conf->auth.jwt;
        struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
        struct jwt_claims claims;
        struct jwt_signer *signer = NULL;
        char *token = NULL;
        char why[KEYS_ERR_SIZE];

        conf_jwt_claims(jwt, extra, &claims);
        rc = jwt_signer_new(jwt_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, why, sizeof(why));
        if (rc == 0)
            rc = jwt_sign(signer, &claims, jwt_build_epoch() + 86400, &token, NULL, why,
                          sizeof(why));
        if (token) {
            explicit_bzero(token, strlen(token));
            free(token);
        }
        jwt_signer_free(signer);
        if (rc < 0) {
            snprintf(err, err_size,
                     "auth.key=%s (%s) cannot sign as %s: %s (auth.alg is the one the "
                     "configuration was loaded with; after changing the key type, reload the "
                     "configuration: systemctl reload uplinkd)",
                     jwt->key, keys_describe(jwt_key, described, sizeof(described)),
                     jwt_alg_name(jwt->alg), why);
            return rc;
        }
    }
    return 0;
}

int uplink_reload_credentials(struct uplink *uplink, char *report, size_t report_size)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_creds now = {.taken = true};
    EVP_PKEY *jwt_key = NULL;
    char changed[64] = "", err[TLSCHECK_MSG_SIZE] = "", warning[TLSCHECK_MSG_SIZE];
    char jwt_err[KEYS_ERR_SIZE] = "";
    bool tls_changed = false, ca_changed = false, jwt_changed = false;
    int rc;

    if (state_of(uplink) == UPLINK_IDLE || state_of(uplink) == UPLINK_STOPPING ||
        state_of(uplink) == UPLINK_STOPPED || !uplink->creds.taken) {
        snprintf(report, report_size,
                 "credentials unchanged (no connection set up yet; the next attempt reads the "
                 "files)");
        log_uplink(LOG_INFO, uplink->name, "%s", report);
        return UPLINK_CREDS_UNCHANGED;
    }
    /* The same files, in the same way, as conn_new() + conn_take_creds(). */
    if (conf->tls.enabled) {
        if (conf->tls.cert)
            creds_fp_file(conf->tls.cert, now.cert);
        if (conf->tls.key)
            creds_fp_key_spec(conf->tls.key, now.key);
        if (conf->tls.ca_file && !conf->tls.ca_system)
            creds_fp_file(conf->tls.ca_file, now.ca);
    }
    if (conf->auth.type == CONF_AUTH_JWT) {
        const struct conf_jwt *jwt = &conf->auth.jwt;
        struct keys_options options = {.passphrase_file = jwt->passphrase_file,
                                       .pkcs11_module = jwt->pkcs11_module};
        if (keys_is_uri(jwt->key)) {
            creds_fp_key_spec(jwt->key, now.jwt);
        } else if (keys_load_private(jwt->key, &options, &jwt_key, jwt_err, sizeof(jwt_err)) < 0) {
            snprintf(now.jwt, sizeof(now.jwt), "unreadable:%.140s", jwt_err);
        } else {
            creds_fp_jwt_key(jwt_key, jwt->key, now.jwt);
        }
    }
    tls_changed = creds_changed(now.cert, uplink->creds.cert, changed, sizeof(changed), "tls.cert");
    tls_changed |= creds_changed(now.key, uplink->creds.key, changed, sizeof(changed), "tls.key");
    ca_changed = creds_changed(now.ca, uplink->creds.ca, changed, sizeof(changed), "tls.ca");
    jwt_changed = creds_changed(now.jwt, uplink->creds.jwt, changed, sizeof(changed), "auth.key");
    if (!changed[0]) {
        EVP_PKEY_free(jwt_key);
        snprintf(report, report_size, "credentials unchanged");
        log_uplink(LOG_INFO, uplink->name, "%s", report);
        return UPLINK_CREDS_UNCHANGED;
    }

    if (jwt_changed && !jwt_key && !keys_is_uri(conf->auth.jwt.key)) {
        snprintf(err, sizeof(err), "%s", jwt_err); /* the new auth.key cannot be loaded */
        rc = -ENOKEY;
    } else {
        rc = creds_check(conf, tls_changed, ca_changed, jwt_changed ? jwt_key : NULL, err,
                         sizeof(err), warning, sizeof(warning));
    }
    if (rc < 0) {
        EVP_PKEY_free(jwt_key);
        snprintf(report, report_size, "new %s refused, keeping the current session: %s", changed,
                 err);
        log_uplink(LOG_ERR, uplink->name, "%s", report);
        return rc;
    }
    if (warning[0])
        log_uplink(LOG_WARNING, uplink->name, "%s", warning);
    if (jwt_changed && jwt_key) {
        EVP_PKEY_free(uplink->jwt_key);
        uplink->jwt_key = jwt_key; /* conn_copy_jwt() signs with it from now on */
        jwt_key = NULL;
    }
    EVP_PKEY_free(jwt_key);
    snprintf(report, report_size, "credentials changed (%s); the new files passed the checks",
             changed);
    uplink_reconnect(uplink, report);
    return UPLINK_CREDS_CHANGED;
}

int uplink_sign_jwt(struct uplink *uplink, char **token_out, time_t *expires_at, char *err,
                    size_t err_size)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_conn *conn;
    int rc;

    *token_out = NULL;
    if (conf->auth.type != CONF_AUTH_JWT) {
        snprintf(err, err_size, "uplink \"%s\" does not use JWT auth (auth.type is %s)",
                 uplink->name, conf->auth.type == CONF_AUTH_BASIC ? "basic" : "none");
        return -ENOKEY;
    }
    /* The clock rule of uplink_clock_blocks(), without its waiting. */
    rc = jwt_clock_check(time(NULL), conf->auth.jwt.clock_check == CONF_CLOCK_SYNC, NULL, err,
                         err_size);
    if (rc < 0)
        return rc;
    /* The claims and signer a connection attempt would use (conn_copy_jwt),
     * signed under the same lock. This runs on the loop thread: a manual
     * request, and a signature takes milliseconds. */
    conn = calloc(1, sizeof(*conn));
    if (!conn)
        return -ENOMEM;
    conn->uplink = uplink;
    rc = conn_copy_jwt(conn, &conf->auth.jwt);
    if (rc < 0) {
        snprintf(err, err_size, "cannot prepare the signer: %s", strerror(-rc));
        conn_free(conn);
        return rc;
    }
    pthread_mutex_lock(&uplink_sign_lock);
    rc = jwt_sign(conn->signer, &conn->claims, time(NULL), token_out, expires_at, err, err_size);
    pthread_mutex_unlock(&uplink_sign_lock);
    conn_free(conn);
    return rc;
}

void uplink_stop(struct uplink *uplink, unsigned timeout_ms,
                 void (*done_cb)(struct uplink *uplink, void *arg), void *arg)
{
    struct uplink_conn *conn = uplink->conn;

    if (state_of(uplink) == UPLINK_STOPPING || state_of(uplink) == UPLINK_STOPPED) {
        log_uplink(LOG_WARNING, uplink->name, "uplink_stop() called twice; ignored");
        return;
    }
    if (uplink_handles_init(uplink) < 0) {
        log_err("uplink %s: cannot initialise timers to stop", uplink->name);
        return;
    }
    uplink->done_cb = done_cb;
    uplink->done_arg = arg;
    uv_timer_stop(&uplink->timer);
    if (uplink_set_state(uplink, UPLINK_STOPPING, "stop requested%s",
                         state_of(uplink) == UPLINK_ONLINE && uplink_unsent(uplink)
                             ? ", waiting for acknowledgements"
                             : "") < 0)
        return;
    if (conn && conn->work_pending)
        uv_cancel((uv_req_t *)&conn->work); /* fails harmlessly once the work started */
    if (uplink_unsent(uplink) && timeout_ms)
        uv_timer_start(&uplink->timer, uplink_timer_cb, timeout_ms, 0);
    else
        uplink->stop_deadline_passed = true;
    uplink_service(uplink);
}

void uplink_free(struct uplink *uplink)
{
    struct uplink_sub *sub, *next_sub;

    if (!uplink)
        return;
    if (uplink->handles_init && state_of(uplink) != UPLINK_STOPPED) {
        log_err("uplink %s: BUG: uplink_free() in state %s before uplink_stop() finished; "
                "leaking it",
                uplink->name, uplink_state_name(state_of(uplink)));
        return;
    }
    spool_free(uplink->spool);
    free(uplink->topic_buf);
    free(uplink->batch_buf);
    free(uplink->inflight_tab);
    for (sub = uplink->subs; sub; sub = next_sub) {
        next_sub = sub->next;
        free(sub->filter);
        free(sub);
    }
    while (uplink->controls) {
        struct uplink_control *c = uplink->controls;
        uplink->controls = c->next;
        control_free(c); /* no done_cb: the owner may be gone already */
    }
    EVP_PKEY_free(uplink->jwt_key);
    free(uplink->name);
    free(uplink->gateway_id);
    free(uplink);
}

const char *uplink_name(const struct uplink *uplink)
{
    return uplink->name;
}

enum uplink_state uplink_get_state(const struct uplink *uplink)
{
    return state_of(uplink);
}

const char *uplink_last_error(const struct uplink *uplink)
{
    return uplink->last_error;
}

void uplink_get_stats(const struct uplink *uplink, struct uplink_stats *out)
{
    uint64_t now = uv_now(uplink->loop);

    *out = uplink->stats;
    memset(&out->spool, 0, sizeof(out->spool));
    if (uplink->spool)
        spool_get_stats(uplink->spool, &out->spool);
    out->queued = (size_t)out->spool.depth;
    out->inflight = uplink->inflight_records;
    /* A rate window older than two seconds means no traffic since. */
    out->rate_in = now - uplink->rate_since > 2000 ? 0 : uplink->rate_in;
    out->rate_out = now - uplink->rate_since > 2000 ? 0 : uplink->rate_out;
}
