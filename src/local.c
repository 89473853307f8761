/* local.c - the local MQTT 3.1.1 server on the libuv loop (see local.h).
 *
 * Every connection is a struct local_client with its stream handle, one timer
 * (CONNECT deadline, then keepalive, then the flush deadline while closing)
 * and a state: NEW (waiting for CONNECT) -> CONNECTED -> CLOSING. Memory is
 * freed only once both handles' close callbacks have run, so no callback ever
 * sees a freed client; in particular a client found to be a slow consumer
 * while a message is being fanned out is only marked CLOSING and skipped.
 *
 * Output is coalesced: packets are encoded into a per-client pending buffer
 * and at most one uv_write is in flight, so the bytes a client can hold
 * queued are exactly bounded (local_out_limit()).
 *
 * Sessions (MQTT 3.1.1 §3.1.2.4) are struct local_session, separate from
 * the connection: the subscription tree's owners are sessions, and every
 * outbound QoS>0 message lives in its session (queued, then in flight until
 * PUBACK/PUBCOMP) so a persistent session (clean session 0) keeps its
 * subscriptions and messages while its client is away, and re-sends what was
 * not acknowledged with DUP after a reconnect (§4.4). Inbound QoS 2 packet
 * ids awaiting PUBREL are kept in the session too, so a PUBLISH re-sent with
 * DUP after a reconnect is not delivered twice (§4.3.3). Sessions live in
 * memory only; retained messages are also kept on disk (the retained store
 * below).
 *
 * Queue policy (documented in docs/configuration.md): a session holds at most
 * local.max_inflight messages in flight and local.max_queued waiting, and all
 * sessions together at most local.max_queued_bytes. When a message does not
 * fit, a connected client is disconnected as a slow consumer, and the oldest
 * waiting message of that session is dropped (logged, counted) to make room;
 * QoS 0 messages are never queued for an absent client.
 *
 * The server is five files around one private header, local_int.h (its
 * table of contents): this one (clients, output, input, the public calls),
 * local_listen.c, local_packet.c, local_session.c and local_retained.c.
 */
#include "local_int.h"

static void local_check_done(struct local *local);

/* --- small helpers ----------------------------------------------------------- */

bool local_is_cloud_filter(const char *filter, size_t len)
{
    size_t n = strlen(LOCAL_CLOUD_PREFIX);
    return len >= n && memcmp(filter, LOCAL_CLOUD_PREFIX, n) == 0;
}

static size_t local_max_packet(const struct local *local)
{
    size_t max = local->conf->local.max_packet_size;
    return max ? max : MQTT_MAX_FIXED_HEADER + MQTT_MAX_REMAINING_LENGTH;
}

/* A client must be able to hold at least two maximum-size packets. */
static size_t local_out_limit(const struct local *local)
{
    size_t two_packets = 2 * local_max_packet(local);
    return two_packets > LOCAL_OUT_MAX_BYTES ? two_packets : LOCAL_OUT_MAX_BYTES;
}

void local_live_put(struct local *local)
{
    local->live--;
    local_check_done(local);
}

/* --- client state and lifetime ---------------------------------------------- */

void local_client_set_state(struct local_client *client, enum client_state to)
{
    enum client_state from = client->state;

    if (!client_transitions[from][to]) {
        log_err(CLIENT_FMT ": invalid state change %s -> %s (bug)", CLIENT_ARGS(client),
                client_state_names[from], client_state_names[to]);
        return;
    }
    log_debug(CLIENT_FMT ": %s -> %s", CLIENT_ARGS(client), client_state_names[from],
              client_state_names[to]);
    if (from == CLIENT_NEW)
        local_pending_unlink(client);
    if (from == CLIENT_CONNECTED)
        client->local->connected_count--;
    if (to == CLIENT_CONNECTED)
        client->local->connected_count++;
    client->state = to;
}

void local_subs_last_cb(void *arg, const char *filter, size_t len)
{
    struct local *local = arg;

    if (local_is_cloud_filter(filter, len) && local->hooks.unsubscribe_cb)
        local->hooks.unsubscribe_cb(local->hooks.arg, filter);
}

void local_client_finish(struct local_client *client)
{
    struct local *local = client->local;

    /* §3.1.2.5: the will is published when the connection ends without
     * DISCONNECT; §3.14.4-3 discards it on DISCONNECT (has_will cleared). */
    if (client->publish_will && client->has_will && !local->closing) {
        log_info(CLIENT_FMT ": publishing will message to '%s'", CLIENT_ARGS(client),
                 client->will_topic);
        local_dispatch(local, client->will_topic, strlen(client->will_topic), client->will_payload,
                       client->will_len, client->will_qos, client->will_retain);
        if (local->hooks.publish_cb)
            local->hooks.publish_cb(local->hooks.arg, client->id, client->will_topic,
                                    client->will_payload, client->will_len, client->will_qos,
                                    client->will_retain);
    }
    local_client_acks_orphan(client);
    /* §3.1.2.4: a clean session ends with its connection (freed here, not
     * in local_client_close(), which may run inside a subscription walk). */
    if (client->session && client->session->clean)
        local_session_free(client->session, true);
    client->session = NULL;

    if (client->prev)
        client->prev->next = client->next;
    else
        local->clients = client->next;
    if (client->next)
        client->next->prev = client->prev;
    local->client_count--;

    free(client->rbuf);
    free(client->pending.data);
    free(client->writing.data);
    free(client->will_topic);
    free(client->will_payload);
    free(client->id);
    free(client->username);
    free(client);
    local_live_put(local);
}

static void client_handle_closed_cb(uv_handle_t *handle)
{
    struct local_client *client = container_of(handle, struct local_client, conn.handle);

    if (--client->open_handles == 0)
        local_client_finish(client);
}

static void client_timer_closed_cb(uv_handle_t *handle)
{
    struct local_client *client = container_of(handle, struct local_client, timer);

    if (--client->open_handles == 0)
        local_client_finish(client);
}

static void client_close_handles(struct local_client *client)
{
    if (!uv_is_closing(&client->conn.handle))
        uv_close(&client->conn.handle, client_handle_closed_cb);
    if (!uv_is_closing((uv_handle_t *)&client->timer))
        uv_close((uv_handle_t *)&client->timer, client_timer_closed_cb);
}

static void client_flush_timeout_cb(uv_timer_t *timer)
{
    struct local_client *client = container_of(timer, struct local_client, timer);

    log_debug(CLIENT_FMT ": output not flushed within %d ms, closing anyway", CLIENT_ARGS(client),
              LOCAL_FLUSH_TIMEOUT_MS);
    client_close_handles(client);
}

void local_client_close(struct local_client *client, enum close_mode mode, bool abnormal,
                        const char *why)
{
    if (client->state == CLIENT_CLOSING)
        return;
    if (client->state == CLIENT_CONNECTED)
        log_info(CLIENT_FMT ": disconnected: %s", CLIENT_ARGS(client), why);
    else if (client->quiet_close)
        log_debug(CLIENT_FMT ": connection closed before CONNECT completed: %s",
                  CLIENT_ARGS(client), why);
    else
        log_info(CLIENT_FMT ": connection closed before CONNECT completed: %s", CLIENT_ARGS(client),
                 why);
    /* A password check still queued need not run (uv_cancel fails, harmlessly,
     * once it is running); local_auth_after_work_cb frees it either way. */
    if (client->auth)
        local_auth_check_cancel(client->auth);
    client->publish_will = abnormal && client->state == CLIENT_CONNECTED;
    /* From now on messages for the session wait in its queue (persistent)
     * or are dropped (clean): a closing connection sends nothing more. */
    if (client->session && client->session->client == client)
        client->session->client = NULL;
    local_client_set_state(client, CLIENT_CLOSING);
    uv_read_stop(&client->conn.stream);
    uv_timer_stop(&client->timer);
    if (mode == CLOSE_FLUSH && (client->write_active || client->pending.len)) {
        local_client_flush(client);
        if (client->write_active) {
            uv_timer_start(&client->timer, client_flush_timeout_cb, LOCAL_FLUSH_TIMEOUT_MS, 0);
            return;
        }
    }
    client_close_handles(client);
}

void local_client_protocol_error(struct local_client *client, const char *what, const char *reason)
{
    char why[256];

    snprintf(why, sizeof(why), "protocol error in %s: %s", what, reason);
    if (client->state == CLIENT_NEW) {
        /* Before CONNECT: anyone can cause this, as often as they like. */
        local_drop_note(client->local, client->listener, DROP_PROTOCOL, client->peer, why);
        client->quiet_close = true;
    } else {
        log_warn(CLIENT_FMT ": protocol error in %s: %s; closing the connection",
                 CLIENT_ARGS(client), what, reason);
    }
    local_client_close(client, CLOSE_ABORT, true, why);
}

/* --- output ------------------------------------------------------------------ */

static void client_write_cb(uv_write_t *req, int status)
{
    struct local_client *client = container_of(req, struct local_client, write_req);

    client->write_active = false;
    client->writing.len = 0;
    if (client->writing.cap > LOCAL_BUF_KEEP) {
        free(client->writing.data);
        client->writing.data = NULL;
        client->writing.cap = 0;
    }
    if (status < 0) {
        if (client->state == CLIENT_CLOSING) {
            client_close_handles(client);
        } else {
            char why[128];
            snprintf(why, sizeof(why), "write failed: %s", uv_strerror(status));
            local_client_close(client, CLOSE_ABORT, true, why);
        }
        return;
    }
    local_client_flush(client);
    if (client->state == CLIENT_CLOSING && !client->write_active)
        client_close_handles(client);
}

void local_client_flush(struct local_client *client)
{
    struct out_buf swap;
    uv_buf_t buf;
    int rc;

    if (client->write_active || client->pending.len == 0 || uv_is_closing(&client->conn.handle) ||
        client->detached)
        return;
    swap = client->writing;
    client->writing = client->pending;
    client->pending = swap;
    buf = uv_buf_init((char *)client->writing.data, (unsigned)client->writing.len);
    rc = uv_write(&client->write_req, &client->conn.stream, &buf, 1, client_write_cb);
    if (rc < 0) {
        char why[128];

        client->writing.len = 0;
        snprintf(why, sizeof(why), "write failed: %s", uv_strerror(rc));
        if (client->state == CLIENT_CLOSING)
            client_close_handles(client);
        else
            local_client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    client->write_active = true;
}

uint8_t *local_client_reserve(struct local_client *client, size_t len)
{
    struct out_buf *out = &client->pending;
    size_t queued = client->pending.len + client->writing.len;
    size_t limit = local_out_limit(client->local);
    uint8_t *p;

    if (client->state == CLIENT_CLOSING)
        return NULL;
    if (queued + len > limit) {
        char why[160];
        log_warn(CLIENT_FMT ": slow consumer: %zu bytes of output queued (limit %zu); "
                            "disconnecting",
                 CLIENT_ARGS(client), queued + len, limit);
        snprintf(why, sizeof(why), "slow consumer (%zu bytes queued)", queued + len);
        local_client_close(client, CLOSE_ABORT, true, why);
        return NULL;
    }
    if (out->cap - out->len < len) {
        size_t cap = out->cap ? out->cap * 2 : LOCAL_READ_CHUNK;
        while (cap < out->len + len)
            cap *= 2;
        p = realloc(out->data, cap);
        if (!p) {
            local_client_close(client, CLOSE_ABORT, true, "out of memory for output");
            return NULL;
        }
        out->data = p;
        out->cap = cap;
    }
    p = out->data + out->len;
    out->len += len;
    return p;
}

void local_client_send_bytes(struct local_client *client, const uint8_t *data, size_t len)
{
    uint8_t *p = local_client_reserve(client, len);

    if (!p)
        return;
    memcpy(p, data, len);
    local_client_flush(client);
}

void local_client_send_ack(struct local_client *client, uint8_t type, uint16_t packet_id)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_ack(buf, sizeof(buf), type, packet_id, &len) == 0)
        local_client_send_bytes(client, buf, len);
}

void local_client_send_connack(struct local_client *client, uint8_t code)
{
    uint8_t buf[4];
    size_t len;

    /* Session present is always 0: no session outlives its connection yet. */
    if (mqtt_encode_connack(buf, sizeof(buf), false, code, &len) == 0)
        local_client_send_bytes(client, buf, len);
}

void local_client_send_connack_accepted(struct local_client *client, bool session_present)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_connack(buf, sizeof(buf), session_present, MQTT_CONNACK_ACCEPTED, &len) == 0)
        local_client_send_bytes(client, buf, len);
}

void local_client_write_publish(struct local_client *client, const char *topic, size_t topic_len,
                                const void *payload, size_t len, uint8_t qos, bool retain, bool dup,
                                uint16_t packet_id)
{
    size_t size;
    uint8_t *p;
    int rc;

    if (client->state != CLIENT_CONNECTED)
        return;
    rc = mqtt_encode_publish(NULL, 0, topic, topic_len, payload, len, qos, retain, dup, packet_id,
                             &size);
    if (rc != -ENOBUFS) {
        log_warn(CLIENT_FMT ": cannot encode PUBLISH to '%.*s': %s", CLIENT_ARGS(client),
                 (int)topic_len, topic, strerror(-rc));
        return;
    }
    p = local_client_reserve(client, size);
    if (!p)
        return;
    mqtt_encode_publish(p, size, topic, topic_len, payload, len, qos, retain, dup, packet_id,
                        &size);
    local_client_flush(client);
}

/* --- packet handlers ---------------------------------------------------------- */

void local_client_keepalive_cb(uv_timer_t *timer)
{
    struct local_client *client = container_of(timer, struct local_client, timer);
    char why[128];

    if (client->state == CLIENT_NEW) {
        snprintf(why, sizeof(why), "no complete CONNECT within local.connect_deadline (%u ms)",
                 local_connect_deadline_ms(client->local));
        local_drop_note(client->local, client->listener, DROP_DEADLINE, client->peer, why);
        client->quiet_close = true;
        local_client_close(client, CLOSE_ABORT, false, why);
        return;
    }
    /* §3.1.2-24: nothing received for one and a half keepalive periods. */
    snprintf(why, sizeof(why), "keepalive expired (nothing received for 1.5 x %u s)",
             client->keepalive_s);
    log_warn(CLIENT_FMT ": %s", CLIENT_ARGS(client), why);
    local_client_close(client, CLOSE_ABORT, true, why);
}

void local_client_arm_keepalive(struct local_client *client)
{
    if (client->state == CLIENT_CONNECTED && client->keepalive_s)
        uv_timer_start(&client->timer, local_client_keepalive_cb, client->keepalive_s * 1500ull, 0);
}

/* --- input ------------------------------------------------------------------- */

void local_client_process_input(struct local_client *client)
{
    size_t max_packet = local_max_packet(client->local);
    size_t off = 0;

    client->rneed = 0;
    while (client->state != CLIENT_CLOSING && !client->auth && !client->acks_paused &&
           off < client->rlen) {
        struct mqtt_fixed_header fh;
        const char *reason = "";
        size_t total;
        int rc;

        rc = mqtt_decode_fixed_header(client->rbuf + off, client->rlen - off, max_packet, &fh,
                                      &reason);
        if (rc == -EAGAIN)
            break;
        if (rc == -EMSGSIZE) {
            char detail[160];
            snprintf(detail, sizeof(detail),
                     "packet of %zu bytes exceeds local.max_packet_size (%zu)",
                     fh.header_len + fh.remaining_length, max_packet);
            local_client_protocol_error(client, mqtt_packet_type_name(fh.type), detail);
            break;
        }
        if (rc < 0) {
            local_client_protocol_error(client, mqtt_packet_type_name(client->rbuf[off] >> 4),
                                        reason);
            break;
        }
        total = fh.header_len + fh.remaining_length;
        if (client->rlen - off < total) {
            client->rneed = total;
            break;
        }
        local_client_handle_packet(client, client->rbuf + off, total);
        off += total;
    }
    if (off) {
        memmove(client->rbuf, client->rbuf + off, client->rlen - off);
        client->rlen -= off;
    }
    if (client->rlen == 0 && client->rcap > LOCAL_BUF_KEEP) {
        free(client->rbuf);
        client->rbuf = NULL;
        client->rcap = 0;
    }
}

void local_client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    struct local_client *client = container_of(handle, struct local_client, conn.handle);
    size_t want = client->rlen + LOCAL_READ_CHUNK;

    /* rneed is at most max_packet_size, so the buffer is bounded by it. */
    if (want < client->rneed)
        want = client->rneed;
    if (client->rcap < want) {
        uint8_t *p = realloc(client->rbuf, want);
        if (!p) {
            *buf = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
            return;
        }
        client->rbuf = p;
        client->rcap = want;
    }
    *buf =
        uv_buf_init((char *)client->rbuf + client->rlen, (unsigned)(client->rcap - client->rlen));
}

void local_client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct local_client *client = container_of(stream, struct local_client, conn.stream);

    if (nread == 0 || client->state == CLIENT_CLOSING)
        return;
    if (nread < 0) {
        char why[128];
        if (nread == UV_EOF)
            snprintf(why, sizeof(why), "connection closed by the client without DISCONNECT");
        else
            snprintf(why, sizeof(why), "read failed: %s", uv_strerror((int)nread));
        /* Anyone can open and close connections as fast as they like: before
         * CONNECT that is not worth a log line each. */
        client->quiet_close = client->state == CLIENT_NEW;
        local_client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    client->rlen += (size_t)nread;
    local_client_process_input(client);
}

/* --- public interface ---------------------------------------------------------- */

int local_new(uv_loop_t *loop, const struct conf *conf, const struct local_hooks *hooks,
              struct local **out)
{
    struct local *local = calloc(1, sizeof(*local));

    if (!local)
        return -ENOMEM;
    local->loop = loop;
    local->conf = conf;
    if (hooks)
        local->hooks = *hooks;
    uv_timer_init(loop, &local->close_handle);
    uv_timer_init(loop, &local->retained_timer);
    uv_timer_init(loop, &local->drop_timer);
    uv_timer_init(loop, &local->accept_timer);
    local->close_handle.data = local;
    local->retained_timer.data = local;
    local->drop_timer.data = local;
    local->accept_timer.data = local;
    local->live = 4; /* close_handle, retained_timer, drop_timer, accept_timer */
    local->reserve_fd = -1;
    *out = local;
    return 0;
}

int local_start(struct local *local)
{
    char why[256];
    int rc, passed;

    if (local->closing)
        return -ECANCELED;
    /* Retained messages are back before the first client can subscribe. */
    if (!local->retained_loaded) {
        bool rewrite = local_retained_load(local);
        local->retained_loaded = true; /* only now do changes schedule writes */
        if (rewrite)
            local_retained_changed(local); /* upgrade, or drop the damaged bytes */
    }
    passed = activation_collect(&local->activation, why, sizeof(why));
    if (why[0])
        log_warn("%s", why);
    if (passed < 0)
        log_warn("ignoring the sockets passed by systemd (LISTEN_FDS): %s", strerror(-passed));
    else if (passed > 0)
        log_info("systemd passed %d listening socket(s) (socket activation)", passed);
    local_fd_limit_update(local, local->conf);
    local_reserve_fd_open(local);
    rc = local_open_listeners(local, local->conf);
    if (rc == 0)
        rc = local_adopt_unmatched(local);
    activation_release(&local->activation);
    return rc;
}

int local_reconfigure(struct local *local, const struct conf *conf)
{
    struct listener **pp;
    int rc;

    if (local->closing)
        return -ECANCELED;
    for (struct listener *l = local->listeners; l; l = l->next)
        l->keep = l->extra;
    rc = local_open_listeners(local, conf);
    if (rc < 0)
        return rc;
    pp = &local->listeners;
    while (*pp) {
        struct listener *l = *pp;
        if (l->keep) {
            l->keep = false;
            pp = &l->next;
            continue;
        }
        log_info("closing listener %s (removed from the configuration)", l->url);
        *pp = l->next;
        local_listener_close(l);
    }
    local->conf = conf;
    local_fd_limit_update(local, conf);
    return 0;
}

void local_deliver(struct local *local, const char *topic, const void *payload, size_t len, int qos,
                   bool retain)
{
    size_t topic_len = strlen(topic);
    const char *reason;

    if (topic_name_check(topic, topic_len, &reason) < 0) {
        log_warn("not delivering to local subscribers: topic '%s': %s", topic, reason);
        return;
    }
    if (qos < 0 || qos > 2) {
        log_warn("not delivering '%s' to local subscribers: QoS %d", topic, qos);
        return;
    }
    local_dispatch(local, topic, topic_len, payload, len, (uint8_t)qos, retain);
}

static void local_close_handle_cb(uv_handle_t *handle)
{
    struct local *local = handle->data;

    local_live_put(local);
}

static void local_check_done(struct local *local)
{
    if (local->closing && local->live == 0 && local->done_cb) {
        void (*done_cb)(void *) = local->done_cb;
        local->done_cb = NULL;
        done_cb(local->done_arg);
    }
}

void local_close(struct local *local, void (*done_cb)(void *arg), void *arg)
{
    if (local->closing)
        return;
    local->closing = true;
    local->done_cb = done_cb;
    local->done_arg = arg;
    local_stop_accepting(local);
    for (struct local_client *c = local->clients; c; c = c->next)
        local_client_close(c, CLOSE_FLUSH, false, "server shutting down");
    /* Pending retained changes are written before done_cb (the write holds
     * a live reference). */
    uv_timer_stop(&local->retained_timer);
    uv_close((uv_handle_t *)&local->retained_timer, local_close_handle_cb);
    if (local->drop_window)
        local_drop_report(local);
    uv_timer_stop(&local->drop_timer);
    uv_close((uv_handle_t *)&local->drop_timer, local_close_handle_cb);
    uv_close((uv_handle_t *)&local->accept_timer, local_close_handle_cb);
    local_retained_write_start(local);
    /* Closed last and always asynchronous, so done_cb never runs from
     * inside local_close() even with no clients or listeners. */
    uv_close((uv_handle_t *)&local->close_handle, local_close_handle_cb);
}

void local_free(struct local *local)
{
    if (!local)
        return;
    if (local->reserve_fd >= 0)
        close(local->reserve_fd);
    while (local->sessions)
        local_session_free(local->sessions, false); /* the tree goes as a whole below */
    topic_table_deinit(&local->subs);
    while (local->retained) {
        struct retained *r = local->retained;
        local->retained = r->next;
        free(r->payload);
        free(r);
    }
    free(local);
}

size_t local_client_count(const struct local *local)
{
    return local->connected_count;
}

void local_get_stats(const struct local *local, struct local_stats *out)
{
    const uint64_t *d = local->drops_total;

    out->connected = local->connected_count;
    out->pending = local->pending_count;
    out->evicted = d[DROP_EVICTED] + d[DROP_EVICTED_UID];
    out->refused = d[DROP_REFUSED] + d[DROP_NO_FDS];
    out->deadline = d[DROP_DEADLINE];
    out->max_clients = d[DROP_MAX_CLIENTS];
    out->other = d[DROP_PROTOCOL] + d[DROP_ACCEPT];
}

/* --- test and fuzzing seam (local.h) ---------------------------------------------- */

int local_test_client_new(struct local *local, struct local_client **out)
{
    static unsigned long serial;
    struct local_client *client;

    if (local->closing)
        return -ECANCELED;
    client = calloc(1, sizeof(*client));
    if (!client)
        return -ENOMEM;
    client->local = local;
    client->detached = true;
    /* A pipe handle never opened: reading and writing go through the seam,
     * closing goes through the usual close callbacks. */
    uv_pipe_init(local->loop, &client->conn.pipe, 0);
    uv_timer_init(local->loop, &client->timer);
    local_client_link(local, client);
    snprintf(client->peer, sizeof(client->peer), "test %lu", ++serial);
    client->accepted_ms = uv_now(local->loop);
    uv_timer_start(&client->timer, local_client_keepalive_cb, local_connect_deadline_ms(local), 0);
    *out = client;
    return 0;
}

void local_test_client_input(struct local_client *client, const void *data, size_t len)
{
    const uint8_t *p = data;

    /* The same path as socket reads: local_client_alloc_cb sizes the buffer. */
    while (len > 0 && client->state != CLIENT_CLOSING) {
        uv_buf_t buf;
        size_t n;

        local_client_alloc_cb(&client->conn.handle, LOCAL_READ_CHUNK, &buf);
        if (!buf.base) {
            local_client_read_cb(&client->conn.stream, UV_ENOBUFS, &buf);
            return;
        }
        n = buf.len < len ? buf.len : len;
        memcpy(buf.base, p, n);
        local_client_read_cb(&client->conn.stream, (ssize_t)n, &buf);
        p += n;
        len -= n;
    }
}

void local_test_client_output(struct local_client *client, uint8_t **data, size_t *len)
{
    if (data) {
        *data = client->pending.data;
        *len = client->pending.len;
        client->pending.data = NULL;
        client->pending.cap = 0;
    }
    client->pending.len = 0;
}

void local_test_client_lose(struct local_client *client)
{
    local_client_close(client, CLOSE_ABORT, true, "connection lost");
}

bool local_test_client_closing(const struct local_client *client)
{
    return client->state == CLIENT_CLOSING;
}
