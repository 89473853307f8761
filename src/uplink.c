/* uplink.c - one session to a cloud MQTT broker (libmosquitto driven by libuv).
 *
 * Shape of a session
 * ------------------
 * Every connection attempt gets its own struct uplink_conn with a fresh
 * struct mosquitto. The attempt starts on the libuv threadpool
 * (uplink_conn_work_cb): mosquitto_new(), options, TLS files, then
 * mosquitto_connect_async(), which resolves the host (getaddrinfo may stall
 * for many seconds), starts a non-blocking TCP connect, creates the SSL
 * object (SNI = the host we pass, i.e. conf->host) and queues CONNECT. While
 * that work runs the loop thread never touches conn->mosq; the state
 * RESOLVING says so. uplink_conn_after_work_cb() then puts a uv_poll on
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
 *
 * The uplink is five files around one private header, uplink_int.h (its
 * table of contents): this one (the state machine, its driver and the
 * public calls), uplink_conn.c, uplink_send.c, uplink_creds.c and
 * uplink_explain.c.
 */
#include "uplink_int.h"

/* --- state machine ------------------------------------------------------ */

static const char *const state_names[] = {
    [UPLINK_IDLE] = "IDLE",
    [UPLINK_RESOLVING] = "RESOLVING",
    [UPLINK_CONNECTING] = "CONNECTING",
    [UPLINK_ONLINE] = "ONLINE",
    [UPLINK_BACKOFF] = "BACKOFF",
    [UPLINK_STOPPING] = "STOPPING",
    [UPLINK_STOPPED] = "STOPPED",
};

/* allowed[from] is a bit set of the states reachable from it. */
#define S(x) (1u << (x))
static const unsigned state_allowed[] = {
    /* IDLE -> BACKOFF: a JWT uplink whose clock cannot be trusted yet. */
    [UPLINK_IDLE] = S(UPLINK_RESOLVING) | S(UPLINK_BACKOFF) | S(UPLINK_STOPPING),
    [UPLINK_RESOLVING] = S(UPLINK_CONNECTING) | S(UPLINK_BACKOFF) | S(UPLINK_STOPPING),
    [UPLINK_CONNECTING] = S(UPLINK_ONLINE) | S(UPLINK_BACKOFF) | S(UPLINK_STOPPING),
    [UPLINK_ONLINE] = S(UPLINK_BACKOFF) | S(UPLINK_STOPPING),
    [UPLINK_BACKOFF] = S(UPLINK_RESOLVING) | S(UPLINK_STOPPING),
    [UPLINK_STOPPING] = S(UPLINK_STOPPED),
    [UPLINK_STOPPED] = 0,
};
#undef S

const char *uplink_state_name(enum uplink_state state)
{
    if ((unsigned)state >= ARRAY_SIZE(state_names) || !state_names[state])
        return "UNKNOWN";
    return state_names[state];
}

/* Move to @to, logging the reason; an illegal move is a bug and is refused. */

int uplink_set_state(struct uplink *uplink, enum uplink_state to, const char *fmt, ...)
{
    char reason[UPLINK_ERROR_MAX];
    enum uplink_state from = uplink->state;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);

    if ((unsigned)from >= ARRAY_SIZE(state_allowed) || !(state_allowed[from] & (1u << to))) {
        log_err("uplink %s: BUG: illegal state transition %s -> %s (%s) refused", uplink->name,
                uplink_state_name(from), uplink_state_name(to), reason);
        return -EINVAL;
    }
    uplink->state = to;
    log_uplink(LOG_NOTICE, uplink->name, "state %s -> %s (%s)", uplink_state_name(from),
               uplink_state_name(to), reason);
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

void uplink_set_error(struct uplink *uplink, const char *text)
{
    snprintf(uplink->last_error, sizeof(uplink->last_error), "%s", text);
}

bool uplink_conn_on_loop_thread(const struct uplink_conn *conn)
{
    return pthread_equal(pthread_self(), conn->uplink->loop_thread);
}

/* Record the first failure of a connection; uplink_service() acts on it. */

void uplink_conn_fail(struct uplink_conn *conn, const char *fmt, ...)
{
    va_list ap;

    if (conn->failed)
        return;
    conn->failed = true;
    va_start(ap, fmt);
    vsnprintf(conn->error, sizeof(conn->error), fmt, ap);
    va_end(ap);
}

void uplink_rates_update(struct uplink *uplink)
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

/* --- connection life cycle ----------------------------------------------- */

static void conn_close_cb(uv_handle_t *handle)
{
    struct uplink_conn *conn = container_of((uv_poll_t *)handle, struct uplink_conn, poll);
    struct uplink *uplink = conn->uplink;

    uplink_conn_free(conn);
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
        uplink_conn_free(conn);
}

void uplink_connect(struct uplink *uplink, const char *reason)
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
    conn = uplink_conn_new(uplink);
    if (!conn) {
        log_uplink(LOG_ERR, uplink->name, "out of memory starting a connection attempt");
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CONNECT_TIMEOUT_MS, 0);
        return;
    }
    if (uplink_set_state(uplink, UPLINK_RESOLVING, "%s; resolving %s", reason, conn->host) < 0) {
        uplink_conn_free(conn);
        return;
    }
    uv_timer_stop(&uplink->timer);
    uplink->conn = conn;
    conn->work_pending = true;
    rc = uv_queue_work(uplink->loop, &conn->work, uplink_conn_work_cb, uplink_conn_after_work_cb);
    if (rc < 0) {
        conn->work_pending = false;
        uplink_conn_fail(conn, "cannot start the connection attempt: %s", uv_strerror(rc));
        uplink_service(uplink);
    }
}

void uplink_backoff(struct uplink *uplink, int64_t delay_ms, const char *reason)
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

void uplink_timer_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, timer);
    struct uplink_conn *conn = uplink->conn;
    SSL *ssl;

    switch (uplink->state) {
    case UPLINK_BACKOFF:
        uplink_connect(uplink, "backoff elapsed");
        break;
    case UPLINK_CONNECTING:
        if (!conn)
            break;
        ssl = conn->mosq ? mosquitto_ssl_get(conn->mosq) : NULL;
        if (conn->tcp_pending)
            uplink_conn_fail(conn,
                             "TCP connect to %s:%d timed out after %d s (wrong host, or a firewall "
                             "drops the packets)",
                             conn->host, conn->port, UPLINK_CONNECT_TIMEOUT_MS / 1000);
        else if (ssl && !SSL_is_init_finished(ssl))
            uplink_conn_fail(conn, "TLS handshake with %s:%d timed out after %d s", conn->host,
                             conn->port, UPLINK_CONNECT_TIMEOUT_MS / 1000);
        else
            uplink_conn_fail(conn, "no CONNACK from %s:%d within %d s", conn->host, conn->port,
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

void uplink_reconnect(struct uplink *uplink, const char *reason)
{
    switch (uplink->state) {
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

/* Tear the connection down after a failure and decide what comes next. */
static void uplink_conn_failed(struct uplink *uplink)
{
    struct uplink_conn *conn = uplink->conn;
    bool stable = conn->online &&
                  (conn->acked || uv_now(uplink->loop) - conn->online_since >= UPLINK_STABLE_MS);
    bool was_online = conn->online;

    if (uplink->state == UPLINK_STOPPING) {
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
    if (jwt_refused && uplink->state == UPLINK_BACKOFF) {
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

bool uplink_step(struct uplink *uplink)
{
    struct uplink_conn *conn = uplink->conn;

    if (conn && conn->work_pending)
        return false; /* the threadpool owns conn->mosq; after_work comes back here */

    if (conn && conn->failed) {
        uplink_conn_failed(uplink);
        return true;
    }

    switch (uplink->state) {
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
        if (uplink->state == UPLINK_CONNECTING && conn->connack_seen && conn->connack_rc == 0 &&
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
            uplink_conn_subscribe_all(conn);
            if (uplink->hooks.online_cb)
                uplink->hooks.online_cb(uplink->hooks.arg, uplink);
            return true;
        }
        if (uplink->state == UPLINK_ONLINE && uplink->rotating &&
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
        if (uplink->state == UPLINK_ONLINE && !uplink->rotating &&
            !uplink_conn_flush_control(conn) && !conn->hold_spool)
            uplink_conn_flush(conn);
        uplink_conn_write(conn);
        if (conn->failed)
            return true;
        uplink_conn_update_poll(conn);
        break;
    case UPLINK_STOPPING:
        if (conn) {
            /* hold_spool (bootstrap session): nothing may go, so no wait. */
            if (conn->online && !conn->hold_spool && uplink_unsent(uplink) > 0 &&
                !uplink->stop_deadline_passed) {
                /* Use the grace period to collect the acks of what is in
                 * flight (fewer duplicates after the restart) and, with a
                 * memory spool, to send what is queued. */
                uplink_conn_flush(conn);
                uplink_conn_write(conn);
                if (conn->failed)
                    return true;
                uplink_conn_update_poll(conn);
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

void uplink_service(struct uplink *uplink)
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
    uplink->state = UPLINK_IDLE;
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

    if (uplink->state != UPLINK_IDLE)
        return -EALREADY;
    rc = uplink_handles_init(uplink);
    if (rc < 0)
        return rc;
    uplink_connect(uplink, "start");
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
    switch (uplink->state) {
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

void uplink_stop(struct uplink *uplink, unsigned timeout_ms,
                 void (*done_cb)(struct uplink *uplink, void *arg), void *arg)
{
    struct uplink_conn *conn = uplink->conn;

    if (uplink->state == UPLINK_STOPPING || uplink->state == UPLINK_STOPPED) {
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
                         uplink->state == UPLINK_ONLINE && uplink_unsent(uplink)
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
    if (uplink->handles_init && uplink->state != UPLINK_STOPPED) {
        log_err("uplink %s: BUG: uplink_free() in state %s before uplink_stop() finished; "
                "leaking it",
                uplink->name, uplink_state_name(uplink->state));
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
        uplink_control_free(c); /* no done_cb: the owner may be gone already */
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
    return uplink->state;
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
