/* uplink_machine.c - the uplink's state machine and its driver
 * (uplink_int.h): each connection attempt from RESOLVING to ONLINE, the
 * socket and the TLS handshake on the loop, libmosquitto's callbacks,
 * backoff, JWT rotation and the clock checks, and stopping. The
 * workarounds for libmosquitto are explained at the top of uplink.c.
 */
#include "profile.h"
#include "uplink_int.h"

static void conn_poll_cb(uv_poll_t *handle, int status, int events);
static void uplink_backoff(struct uplink *uplink, int64_t delay_ms, const char *reason);
static void conn_after_work_cb(uv_work_t *req, int status);
static void uplink_rotate_cb(uv_timer_t *timer);

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
        if (conn == NULL || !conn_online(conn) || conn->work_pending) {
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

const struct sm_conf uplink_sm = {
    .states = uplink_states,
    .count = ARRAY_SIZE(uplink_states),
    .level = LOG_NOTICE,
    .log_name = uplink_sm_uplink,
    .invariant = uplink_sm_invariant,
};

/* The rotate timer's jobs (the diagram is above enum rotate_job). */
static const struct sm_state rotate_jobs[] = {
    [ROTATE_IDLE] = {"IDLE", SM_TO(ROTATE_REFRESH) | SM_TO(ROTATE_CLOCK_WATCH)},
    [ROTATE_REFRESH] = {"REFRESH", SM_TO(ROTATE_DRAINING) | SM_TO(ROTATE_IDLE)},
    [ROTATE_DRAINING] = {"DRAINING", SM_TO(ROTATE_IDLE)},
    [ROTATE_CLOCK_WATCH] = {"CLOCK_WATCH", SM_TO(ROTATE_IDLE)},
};

static void rotate_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    (void)sm;
    snprintf(buf, size, "JWT rotation");
}

static const char *rotate_sm_uplink(const struct sm *sm)
{
    return container_of(sm, struct uplink, rotate_sm)->name;
}

/* REFRESH and DRAINING belong to an online session, CLOCK_WATCH to BACKOFF. */
static bool rotate_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct uplink *uplink = container_of(sm, struct uplink, rotate_sm);
    enum uplink_state state = uplink_state_of(uplink);

    switch ((enum rotate_job)sm_state(sm)) {
    case ROTATE_REFRESH:
    case ROTATE_DRAINING:
        if (state != UPLINK_ONLINE) {
            snprintf(why, size, "a token rotation while %s", uplink_state_name(state));
            return false;
        }
        return true;
    case ROTATE_CLOCK_WATCH:
        if (state != UPLINK_BACKOFF) {
            snprintf(why, size, "a clock watch while %s", uplink_state_name(state));
            return false;
        }
        return true;
    default:
        return true;
    }
}

const struct sm_conf uplink_rotate_sm = {
    .states = rotate_jobs,
    .count = ARRAY_SIZE(rotate_jobs),
    .level = LOG_DEBUG,
    .describe = rotate_sm_describe,
    .log_name = rotate_sm_uplink,
    .invariant = rotate_sm_invariant,
};

/* Stop the rotate timer and give it back (any job ends). */
static void uplink_rotate_idle(struct uplink *uplink, const char *why)
{
    if (uplink->handles_init)
        uv_timer_stop(&uplink->rotate);
    if (uplink_rotate_job(uplink) != ROTATE_IDLE)
        sm_move(&uplink->rotate_sm, ROTATE_IDLE, why);
}

const char *uplink_state_name(enum uplink_state state)
{
    return sm_state_name(&uplink_sm, (unsigned)state);
}

/* Move to @to, logging the reason; an illegal move is a bug and is refused. */

int uplink_set_state(struct uplink *uplink, enum uplink_state to, const char *fmt, ...)
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
    if (to != UPLINK_ONLINE)
        uplink_tell_offline(uplink);
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

/* Record the first failure of a connection; uplink_service() acts on it. */

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

/* --- libmosquitto callbacks (loop thread, except the log callback) ------- */

static void uplink_conn_connect_cb(struct mosquitto *mosq, void *obj, int rc)
{
    struct uplink_conn *conn = obj;

    /* A handshake that finished inside a read elsewhere is done too. */
    if (conn_phase_of(conn) == CONN_TLS)
        uplink_conn_move(conn, CONN_MQTT, "TLS handshake finished");
    if (conn_phase_of(conn) == CONN_MQTT)
        uplink_conn_move(conn, CONN_CONNACKED, "CONNACK");
    conn->connack_rc = rc;
}

static void uplink_conn_disconnect_cb(struct mosquitto *mosq, void *obj, int rc)
{
    struct uplink_conn *conn = obj;

    conn->disconnect_rc = rc;
}

static void uplink_conn_publish_cb(struct mosquitto *mosq, void *obj, int mid)
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

static void uplink_conn_message_cb(struct mosquitto *mosq, void *obj,
                                   const struct mosquitto_message *m)
{
    struct uplink_conn *conn = obj;
    struct uplink *uplink = conn->uplink;

    uplink->stats.received++;
    if (uplink->hooks.message_cb)
        uplink->hooks.message_cb(uplink->hooks.arg, uplink, m->topic, m->payload,
                                 (size_t)m->payloadlen, m->qos, m->retain);
}

static void uplink_conn_subscribe_cb(struct mosquitto *mosq, void *obj, int mid, int count,
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

static const struct uplink_mosq_cbs machine_mosq_cbs = {
    .connect = uplink_conn_connect_cb,
    .disconnect = uplink_conn_disconnect_cb,
    .publish = uplink_conn_publish_cb,
    .message = uplink_conn_message_cb,
    .subscribe = uplink_conn_subscribe_cb,
};

/* --- I/O ----------------------------------------------------------------- */

static void conn_update_poll(struct uplink_conn *conn)
{
    SSL *ssl;
    int events;

    if (!conn->poll_init || conn->failed || mosquitto_socket(conn->mosq) == -1)
        return;
    ssl = mosquitto_ssl_get(conn->mosq);
    if (conn_phase_of(conn) == CONN_TCP) {
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
            uplink_conn_fail(conn, "cannot watch the socket to %s:%d: %s", conn->host, conn->port,
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
        uplink_conn_explain_tls(conn);
        return false;
    }
    if (SSL_is_init_finished(ssl)) {
        uplink_conn_move(conn, CONN_MQTT, "TLS handshake finished");
        log_uplink(LOG_INFO, uplink->name, "TLS %s with %s:%d established (%s)",
                   SSL_get_version(ssl), conn->host, conn->port, SSL_get_cipher_name(ssl));
        return true;
    }
    if (SSL_want(ssl) == SSL_NOTHING || (events & UV_DISCONNECT) ||
        ++conn->handshake_events > 1000) {
        /* SSL_ERROR_SYSCALL, which libmosquitto reports as success, or the
         * peer hung up and OpenSSL has nothing more to read. */
        if (strstr(conn->captured, "OpenSSL Error"))
            uplink_conn_explain_tls(conn);
        else
            uplink_conn_fail(
                conn,
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
            uplink_conn_fail(
                conn,
                "TLS handshake with %s:%d failed: the server reset the connection (not a "
                "TLS port, or it requires SNI or a client certificate)",
                conn->host, conn->port);
        else
            uplink_conn_explain_closed(conn, err);
    } else if (conn_phase_of(conn) == CONN_TCP) {
        uplink_conn_fail(conn, "connection to %s:%d failed: %s%s", conn->host, conn->port,
                         strerror(err), uplink_errno_hint(err));
    } else {
        uplink_conn_explain_closed(conn, err);
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
            uplink_conn_fail(conn, "connection to %s:%d failed: %s", conn->host, conn->port,
                             uv_strerror(status));
        else
            conn_socket_error(conn, err);
        goto out;
    }
    if (conn_phase_of(conn) == CONN_TCP) {
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
        log_uplink(LOG_DEBUG, uplink->name, "TCP connection to %s:%d established", conn->host,
                   conn->port);
        ssl = mosquitto_ssl_get(conn->mosq);
        uplink_conn_move(conn, ssl && !SSL_is_init_finished(ssl) ? CONN_TLS : CONN_MQTT,
                         "SO_ERROR 0");
    }
    ssl = mosquitto_ssl_get(conn->mosq);
    if (ssl && !SSL_is_init_finished(ssl)) {
        conn_handshake(conn, ssl, events);
        goto out; /* uplink_service() writes CONNECT once the handshake is done */
    }
    if (ssl) {
        /* Once the handshake is done (here or already in uplink_conn_work_cb):
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
            uplink_conn_check(conn, rc, err);
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
    uplink_conn_check(conn, rc, err);
    uplink_service(uplink);
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
    if (uplink->handles_init)
        uv_timer_stop(&uplink->tick);
    uplink_rotate_idle(uplink, "the connection was dropped");
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

bool uplink_clock_blocks(struct uplink *uplink)
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
    if (uplink_state_of(uplink) == UPLINK_BACKOFF)
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CLOCK_RECHECK_MS, 0);
    else
        uplink_backoff(uplink, UPLINK_CLOCK_RECHECK_MS,
                       "waiting for a clock good enough to sign a JWT");
    return true;
}

void uplink_connect(struct uplink *uplink, const char *reason)
{
    struct uplink_conn *conn;
    int rc;

    if (uplink_rotate_job(uplink) == ROTATE_CLOCK_WATCH)
        uplink_rotate_idle(uplink, "leaving BACKOFF: the timer is the session's again");
    if (uplink_clock_blocks(uplink))
        return;
    if (uplink->conf->tls.enabled && uplink->conf->tls.insecure)
        log_uplink(LOG_WARNING, uplink->name,
                   "tls.insecure is true: the server certificate is not checked against host "
                   "\"%s\", so anyone with a certificate from tls.ca can pose as the broker",
                   uplink->conf->host);
    conn = uplink_conn_new(uplink, &machine_mosq_cbs);
    if (!conn) {
        log_uplink(LOG_ERR, uplink->name, "out of memory starting a connection attempt");
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CONNECT_TIMEOUT_MS, 0);
        return;
    }
    uplink->conn = conn; /* before the move: RESOLVING has its attempt (uplink_sm_invariant) */
    if (uplink_set_state(uplink, UPLINK_RESOLVING, "%s; resolving %s", reason, conn->host) < 0) {
        uplink->conn = NULL;
        uplink_conn_free(conn);
        return;
    }
    uv_timer_stop(&uplink->timer);
    conn->work_pending = true;
    rc = uv_queue_work(uplink->loop, &conn->work, uplink_conn_work_cb, conn_after_work_cb);
    if (rc < 0) {
        conn->work_pending = false;
        uplink_conn_fail(conn, "cannot start the connection attempt: %s", uv_strerror(rc));
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

/* The client certificate this attempt uses: its expiry for status, and a
 * warning in the log, at most once a day, within TLSCHECK_WARN_DAYS (the
 * load-time check says so only at start and reload; a gateway runs for
 * months). */
static void uplink_note_cert_expiry(struct uplink *uplink, const struct uplink_conn *conn)
{
    static const uint64_t day_ms = 24ULL * 3600 * 1000;
    time_t now = time(NULL), left;
    char date[40];

    uplink->stats.cert_expires_at = conn->cert_not_after;
    if (!conn->cert_not_after)
        return;
    left = conn->cert_not_after - now;
    if (left >= (time_t)TLSCHECK_WARN_DAYS * 24 * 3600)
        return;
    if (uplink->cert_warned_ms && util_now_ms() - uplink->cert_warned_ms < day_ms)
        return;
    uplink->cert_warned_ms = util_now_ms();
    log_uplink(LOG_WARNING, uplink->name,
               "client certificate %s %s %s (%s%ld day%s); renew it (uplinkctl "
               "reload-credentials %s after replacing the file) or the cloud will refuse the "
               "connection",
               conn->cert, left > 0 ? "expires at" : "expired at",
               uplink_format_utc(conn->cert_not_after, date, sizeof(date)), left > 0 ? "in " : "",
               (long)((left > 0 ? left : -left) / (24 * 3600)),
               (left > 0 ? left : -left) / (24 * 3600) == 1 ? "" : "s", uplink->name);
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
        uplink_conn_fail(conn, "connection attempt cancelled");
        uplink_service(uplink);
        return;
    }
    if (uplink_state_of(uplink) != UPLINK_RESOLVING || uplink->reconnect_requested ||
        conn->failed) {
        /* Stopping, reconfigured, or set-up failed: uplink_service() decides. */
        uplink_service(uplink);
        return;
    }
    if (conn->connect_rc != MOSQ_ERR_SUCCESS) {
        err = conn->connect_errno;
        if (conn->connect_rc == MOSQ_ERR_EAI)
            uplink_conn_fail(conn, "cannot resolve host \"%s\": %s (check host and DNS)",
                             conn->host, gai_strerror(err));
        else
            uplink_conn_explain_rc(conn, conn->connect_rc, err);
        uplink_service(uplink);
        return;
    }

    rc = uv_poll_init_socket(uplink->loop, &conn->poll, mosquitto_socket(conn->mosq));
    if (rc < 0) {
        uplink_conn_fail(conn, "cannot watch the socket to %s:%d: %s", conn->host, conn->port,
                         uv_strerror(rc));
        uplink_service(uplink);
        return;
    }
    conn->poll_init = true;
    uplink_conn_move(conn, CONN_TCP, "the worker connected");
    uplink_note_cert_expiry(uplink, conn);
    if (conn->token_expires_at) {
        char exp[40];
        uplink->stats.token_expires_at = conn->token_expires_at;
        if (conn->signer)
            log_uplink(LOG_INFO, uplink->name, "signed a new JWT (%s%s%s), expires at %s",
                       jwt_alg_name(jwt_signer_alg(conn->signer)),
                       jwt_signer_kid(conn->signer) ? ", kid " : "",
                       jwt_signer_kid(conn->signer) ? jwt_signer_kid(conn->signer) : "",
                       uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)));
        else
            log_uplink(LOG_INFO, uplink->name, "the profile made a new token, expires at %s",
                       uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)));
    }
    if (uplink_set_state(uplink, UPLINK_CONNECTING, "%s resolved, connecting to port %d%s",
                         conn->host, conn->port, conn->tls ? " with TLS" : "") < 0)
        return;
    uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CONNECT_TIMEOUT_MS, 0);
    uv_timer_start(&uplink->tick, conn_tick_cb, UPLINK_TICK_MS, UPLINK_TICK_MS);
    uplink_service(uplink);
}

void uplink_timer_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, timer);
    struct uplink_conn *conn = uplink->conn;
    SSL *ssl;

    switch (uplink_state_of(uplink)) {
    case UPLINK_BACKOFF:
        uplink_connect(uplink, "backoff elapsed");
        break;
    case UPLINK_CONNECTING:
        if (!conn)
            break;
        ssl = conn->mosq ? mosquitto_ssl_get(conn->mosq) : NULL;
        if (conn_phase_of(conn) == CONN_TCP)
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
    switch (uplink_state_of(uplink)) {
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

/* An instance closes on its own when a reload retires it, or here when the
 * uplink stops; only the closes still to come once the uplink's handles are
 * closing are counted (uplink_profiles_close()). Its timers were counted
 * first, so uplink->closing cannot reach 0 inside uplink_profiles_close(). */
void uplink_profile_closed_cb(struct profile_instance *pi)
{
    struct uplink *uplink = pi->uplink;

    if (uplink->handles_closing)
        uplink_closed_one(uplink);
}

void uplink_profiles_close(struct uplink *uplink)
{
    struct profile_instance *pi;

    for (pi = uplink->retired_profiles; pi; pi = pi->retired_next)
        uplink->closing += !pi->closed;
    if (uplink->profile == NULL)
        return;
    uplink->closing++;
    profile_instance_close(uplink->profile, uplink_profile_closed_cb);
}

/* A JWT refused with CONNACK 4/5 right after a clock step, or after the
 * clock check had failed, was most likely signed with the old time: sign
 * again at once instead of waiting out the backoff. Once; after that the
 * normal backoff applies until a CONNACK 0. */
static bool uplink_jwt_resign_now(struct uplink *uplink, const struct uplink_conn *conn)
{
    int64_t wall_ms, mono_ms;
    bool stepped;

    if (!conn->token_expires_at || !conn_connacked(conn) ||
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
    bool stable = conn_online(conn) &&
                  (conn->acked || uv_now(uplink->loop) - conn->online_since >= UPLINK_STABLE_MS);
    bool was_online = conn_online(conn);

    if (uplink_state_of(uplink) == UPLINK_STOPPING) {
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
    bool jwt_refused = conn->token_expires_at && conn_connacked(conn) &&
                       (conn->connack_rc == 4 || conn->connack_rc == 5);
    time_t signed_at = conn->token_signed_at;
    uint64_t signed_mono_ms = conn->token_signed_mono_ms;
    uplink_drop_conn(uplink);
    if (stable)
        uplink->backoff_ms = 0; /* the session worked: start the jitter from base again */
    uplink_backoff(uplink, -1, was_online ? "connection lost" : "connection attempt failed");
    if (jwt_refused && uplink_state_of(uplink) == UPLINK_BACKOFF) {
        /* The clock that signed the refused token may be corrected during
         * the backoff (NTP stepping it): uplink_clock_watch(). The rotate
         * timer is free in BACKOFF (uplink_drop_conn stopped it). */
        uplink->refused_signed_at = signed_at;
        uplink->refused_signed_mono_ms = signed_mono_ms;
        uv_timer_start(&uplink->rotate, uplink_rotate_cb, UPLINK_CLOCK_WATCH_MS,
                       UPLINK_CLOCK_WATCH_MS);
        sm_move(&uplink->rotate_sm, ROTATE_CLOCK_WATCH, "the JWT was refused");
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

    if (uplink_state_of(uplink) != UPLINK_BACKOFF) {
        uplink_rotate_idle(uplink, "no longer in BACKOFF");
        return;
    }
    wall_ms = ((int64_t)time(NULL) - (int64_t)uplink->refused_signed_at) * 1000;
    mono_ms = (int64_t)(util_now_ms() - uplink->refused_signed_mono_ms);
    step_ms = wall_ms - mono_ms;
    if (step_ms <= UPLINK_CLOCK_STEP_MS && step_ms >= -UPLINK_CLOCK_STEP_MS)
        return;
    uplink_rotate_idle(uplink, "the clock was stepped");
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

    if (uplink_rotate_job(uplink) == ROTATE_CLOCK_WATCH) {
        uplink_clock_watch(uplink); /* BACKOFF after a refused JWT */
        return;
    }
    if (uplink_state_of(uplink) != UPLINK_ONLINE || !conn || !conn_online(conn))
        return;
    if (uplink_rotate_job(uplink) == ROTATE_REFRESH) {
        /* The drain must end before exp: the server may drop us there. */
        left_ms = ((int64_t)conn->token_expires_at - (int64_t)time(NULL)) * 1000 - 1000;
        drain_ms = left_ms <= 0                       ? 0
                   : left_ms < UPLINK_ROTATE_DRAIN_MS ? (uint64_t)left_ms
                                                      : UPLINK_ROTATE_DRAIN_MS;
        sm_move(&uplink->rotate_sm, ROTATE_DRAINING, "the refresh point");
        uplink->rotate_deadline = uv_now(uplink->loop) + drain_ms;
        log_uplink(LOG_NOTICE, uplink->name,
                   "rotating the JWT that expires at %s: waiting up to %.1f s for %zu in-flight "
                   "publish(es), then reconnecting with a new token",
                   uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)),
                   (double)drain_ms / 1000.0, uplink->inflight);
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
    sm_move(&uplink->rotate_sm, ROTATE_REFRESH, "CONNACK 0 with a JWT");
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

    switch (uplink_state_of(uplink)) {
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
            if (conn_online(conn))
                mosquitto_disconnect(conn->mosq); /* sends DISCONNECT if the socket takes it */
            uplink_drop_conn(uplink);
            uplink_backoff(uplink, 0, "configuration changed");
            return true;
        }
        if (uplink_state_of(uplink) == UPLINK_CONNECTING && conn_phase_of(conn) == CONN_CONNACKED &&
            conn->connack_rc == 0) {
            uplink_conn_move(conn, CONN_ONLINE, "CONNACK 0");
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
            uplink_tell_online(uplink);
            return true;
        }
        if (uplink_state_of(uplink) == UPLINK_ONLINE && uplink_draining(uplink) &&
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
        if (uplink_state_of(uplink) == UPLINK_ONLINE && !uplink_draining(uplink) &&
            !uplink_conn_flush_control(conn) && !conn->hold_spool)
            uplink_conn_flush(conn);
        uplink_conn_write(conn);
        if (conn->failed)
            return true;
        conn_update_poll(conn);
        break;
    case UPLINK_STOPPING:
        if (conn) {
            /* hold_spool (bootstrap session): nothing may go, so no wait. */
            if (conn_online(conn) && !conn->hold_spool && uplink_unsent(uplink) > 0 &&
                !uplink->stop_deadline_passed) {
                /* Use the grace period to collect the acks of what is in
                 * flight (fewer duplicates after the restart) and, with a
                 * memory spool, to send what is queued. */
                uplink_conn_flush(conn);
                uplink_conn_write(conn);
                if (conn->failed)
                    return true;
                conn_update_poll(conn);
                break;
            }
            if (conn_online(conn)) {
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
            uplink_rotate_idle(uplink, "stopping");
            uplink->closing += 3;
            uv_close((uv_handle_t *)&uplink->tick, uplink_handle_close_cb);
            uv_close((uv_handle_t *)&uplink->timer, uplink_handle_close_cb);
            uv_close((uv_handle_t *)&uplink->rotate, uplink_handle_close_cb);
            uplink_profiles_close(uplink);
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
