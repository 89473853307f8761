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
 * RESOLVING says so. conn_after_work_cb() then puts a uv_poll on
 * mosquitto_socket(), a new one for every attempt because the fd changes.
 *
 * With an external loop libmosquitto 2.0.11 needs help in three places
 * (lib/loop.c, lib/net_mosq.c, lib/packet_mosq.c):
 *  - the non-blocking connect: mosquitto_connect_async() returns success while
 *    the TCP connect is still in progress, and a refused connect later shows
 *    up in SSL_connect() as SSL_ERROR_SYSCALL, which net__socket_connect_tls()
 *    treats as "try again". So we poll for WRITABLE first and read SO_ERROR
 *    ourselves (the attempt's TCP phase, enum conn_phase).
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
 * When the profile allows it (batch_separator_cb, Cumulocity SmartREST)
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
 * The uplink is six layered files around one private header, uplink_int.h
 * (its table of contents): this one (the public calls) over
 * uplink_machine.c (the state machine) over uplink_send.c over
 * uplink_conn.c (an attempt's set-up) over uplink_creds.c and
 * uplink_explain.c. A file calls only the ones below it; libmosquitto's
 * callbacks are handed down to the set-up in struct uplink_mosq_cbs.
 */
#include "profile.h"
#include "uplink_int.h"

int uplink_publish_control(struct uplink *uplink, const char *topic, const void *payload,
                           size_t len, int qos, unsigned flags,
                           void (*done_cb)(void *arg, int status), void *arg)
{
    struct uplink_control *c, **link;

    if (!topic || qos < 0 || qos > 1 || mosquitto_pub_topic_check(topic) != MOSQ_ERR_SUCCESS)
        return -EINVAL;
    if (uplink_state_of(uplink) == UPLINK_STOPPING || uplink_state_of(uplink) == UPLINK_STOPPED)
        return -ESHUTDOWN;
    if ((qos == 0 || (flags & UPLINK_CONTROL_CONNECTION)) &&
        uplink_state_of(uplink) != UPLINK_ONLINE)
        return -ENOTCONN;
    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->topic = strdup(topic);
    c->payload = len ? malloc(len) : NULL;
    if (!c->topic || (len && !c->payload)) {
        uplink_control_free(c);
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

uv_loop_t *uplink_loop(const struct uplink *uplink)
{
    return uplink->loop;
}

const struct conf_uplink *uplink_get_conf(const struct uplink *uplink)
{
    return uplink->conf;
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
    sm_init(&uplink->rotate_sm, &uplink_rotate_sm, ROTATE_IDLE);
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

    if (uplink_state_of(uplink) != UPLINK_IDLE)
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

int uplink_publish_async(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, bool retain, void (*done_cb)(void *arg, int status), void *arg)
{
    size_t topic_len;
    int rc;

    if (uplink_state_of(uplink) == UPLINK_STOPPING || uplink_state_of(uplink) == UPLINK_STOPPED)
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
        if (uplink_state_of(uplink) == UPLINK_ONLINE && conn && !conn->failed &&
            !uplink_draining(uplink)) {
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
    if (uplink_state_of(uplink) == UPLINK_ONLINE)
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
    if (uplink_state_of(uplink) == UPLINK_ONLINE && uplink->conn && !uplink->conn->failed) {
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
    if (uplink_state_of(uplink) == UPLINK_ONLINE && uplink->conn && !uplink->conn->failed) {
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
    switch (uplink_state_of(uplink)) {
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

int uplink_reload_credentials(struct uplink *uplink, char *report, size_t report_size)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_creds now = {.taken = true};
    EVP_PKEY *jwt_key = NULL;
    char changed[64] = "", err[TLSCHECK_MSG_SIZE] = "", warning[TLSCHECK_MSG_SIZE];
    char jwt_err[KEYS_ERR_SIZE] = "";
    bool tls_changed = false, ca_changed = false, jwt_changed = false;
    int rc;

    if (uplink_state_of(uplink) == UPLINK_IDLE || uplink_state_of(uplink) == UPLINK_STOPPING ||
        uplink_state_of(uplink) == UPLINK_STOPPED || !uplink->creds.taken) {
        snprintf(report, report_size,
                 "credentials unchanged (no connection set up yet; the next attempt reads the "
                 "files)");
        log_uplink(LOG_INFO, uplink->name, "%s", report);
        return UPLINK_CREDS_UNCHANGED;
    }
    /* The same files, in the same way, as uplink_conn_new() + uplink_conn_take_creds(). */
    if (conf->tls.enabled) {
        if (conf->tls.cert)
            uplink_creds_fp_file(conf->tls.cert, now.cert);
        if (conf->tls.key)
            uplink_creds_fp_key_spec(conf->tls.key, now.key);
        if (conf->tls.ca_file && !conf->tls.ca_system)
            uplink_creds_fp_file(conf->tls.ca_file, now.ca);
    }
    if (conf->auth.type == CONF_AUTH_JWT) {
        const struct conf_jwt *jwt = &conf->auth.jwt;
        struct keys_options options = {.passphrase_file = jwt->passphrase_file,
                                       .pkcs11_module = jwt->pkcs11_module};
        if (keys_is_uri(jwt->key)) {
            uplink_creds_fp_key_spec(jwt->key, now.jwt);
        } else if (keys_load_private(jwt->key, &options, &jwt_key, jwt_err, sizeof(jwt_err)) < 0) {
            snprintf(now.jwt, sizeof(now.jwt), "unreadable:%.140s", jwt_err);
        } else {
            uplink_creds_fp_jwt_key(jwt_key, jwt->key, now.jwt);
        }
    }
    tls_changed =
        uplink_creds_changed(now.cert, uplink->creds.cert, changed, sizeof(changed), "tls.cert");
    tls_changed |=
        uplink_creds_changed(now.key, uplink->creds.key, changed, sizeof(changed), "tls.key");
    ca_changed = uplink_creds_changed(now.ca, uplink->creds.ca, changed, sizeof(changed), "tls.ca");
    jwt_changed =
        uplink_creds_changed(now.jwt, uplink->creds.jwt, changed, sizeof(changed), "auth.key");
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
        rc = uplink_creds_check(conf, tls_changed, ca_changed, jwt_changed ? jwt_key : NULL, err,
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
        uplink->jwt_key = jwt_key; /* uplink_conn_copy_jwt() signs with it from now on */
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
    /* The claims and signer a connection attempt would use (uplink_conn_copy_jwt),
     * signed under the same lock. This runs on the loop thread: a manual
     * request, and a signature takes milliseconds. */
    conn = calloc(1, sizeof(*conn));
    if (!conn)
        return -ENOMEM;
    conn->uplink = uplink;
    rc = uplink_conn_copy_jwt(conn, &conf->auth.jwt);
    if (rc < 0) {
        snprintf(err, err_size, "cannot prepare the signer: %s", strerror(-rc));
        uplink_conn_free(conn);
        return rc;
    }
    rc = uplink_creds_sign(conn->signer, &conn->claims, time(NULL), token_out, expires_at, err,
                           err_size);
    uplink_conn_free(conn);
    return rc;
}

void uplink_stop(struct uplink *uplink, unsigned timeout_ms,
                 void (*done_cb)(struct uplink *uplink, void *arg), void *arg)
{
    struct uplink_conn *conn = uplink->conn;

    if (uplink_state_of(uplink) == UPLINK_STOPPING || uplink_state_of(uplink) == UPLINK_STOPPED) {
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
                         uplink_state_of(uplink) == UPLINK_ONLINE && uplink_unsent(uplink)
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
    if (uplink->handles_init && uplink_state_of(uplink) != UPLINK_STOPPED) {
        log_err("uplink %s: BUG: uplink_free() in state %s before uplink_stop() finished; "
                "leaking it",
                uplink->name, uplink_state_name(uplink_state_of(uplink)));
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
    profile_instance_free(uplink->profile);
    while (uplink->retired_profiles) {
        struct profile_instance *pi = uplink->retired_profiles;
        uplink->retired_profiles = pi->retired_next;
        profile_instance_free(pi);
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
    return uplink_state_of(uplink);
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

/* --- the profile it owns ---------------------------------------------------------- */

/* All that a profile may ask of an uplink (profile.h, struct profile_port). */
static const struct profile_port uplink_port = {
    .send_first = uplink_publish_control,
    .publish = uplink_publish,
    .subscribe = uplink_subscribe,
    .unsubscribe = uplink_unsubscribe,
    .reconnect = uplink_reconnect,
    .state = uplink_get_state,
    .state_name = uplink_state_name,
    .stats = uplink_get_stats,
    .session_new = uplink_new,
    .session_open_spool = uplink_open_spool_dir,
    .session_start = uplink_start,
    .session_stop = uplink_stop,
    .session_free = uplink_free,
    .session_reconfigure = uplink_reconfigure,
};

int uplink_set_profile(struct uplink *uplink, const struct profile *profile,
                       const struct conf *conf,
                       void (*deliver)(void *arg, const char *topic, const void *payload,
                                       size_t len, int qos, bool retain),
                       void *deliver_arg)
{
    struct profile_instance *pi = uplink->profile;
    int rc;

    if (pi != NULL && pi->profile == profile) {
        profile_instance_reconfigure(pi, conf, uplink->conf);
    } else {
        if (pi != NULL) {
            /* A reload changed the profile: a new instance (the uplink
             * reconnects, conf_uplink_equal() compares the profile). */
            log_uplink(LOG_NOTICE, uplink->name, "profile changed from %s to %s", pi->profile->name,
                       profile ? profile->name : "?");
            profile_instance_close(pi, uplink_profile_closed_cb);
            profile_instance_subscribe(pi); /* drops its filters */
            pi->retired_next = uplink->retired_profiles;
            uplink->retired_profiles = pi;
            uplink->profile = NULL;
        }
        rc = profile_instance_new(uplink->loop, conf, uplink->conf, profile, uplink, &uplink_port,
                                  &pi);
        if (rc < 0) {
            log_uplink(LOG_ERR, uplink->name, "cannot set up the profile: %s", strerror(-rc));
            return rc;
        }
        pi->deliver = deliver;
        pi->deliver_arg = deliver_arg;
        uplink->profile = pi;
    }
    profile_instance_subscribe(pi);
    return 0;
}

struct profile_instance *uplink_profile(const struct uplink *uplink)
{
    return uplink->profile;
}
