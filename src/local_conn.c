/* local_conn.c - one local connection's lifetime and output: the bottom layer
 * of the local server (local_int.h lists the layers). It calls no other
 * local_*.c file.
 *
 * Every connection is a struct local_client with its stream handle, one timer
 * (CONNECT deadline, then keepalive, then the flush deadline while closing)
 * and a state: NEW (waiting for CONNECT) -> CONNECTED -> CLOSING. Memory is
 * freed only once both handles' close callbacks have run, so no callback ever
 * sees a freed client; in particular a client found to be a slow consumer
 * while a message is being fanned out is only marked CLOSING and skipped.
 * A connection leaves the pending list (local_listen.c admits to it) when it
 * leaves NEW; what was closed before CONNECT completed is counted and
 * reported here (local_drop_note()).
 *
 * Output is coalesced: packets are encoded into a per-client pending buffer
 * and at most one uv_write is in flight, so the bytes a client can hold
 * queued are exactly bounded (local_out_limit()).
 *
 * What the end of a connection means to the layers above (the password
 * check, the will, the deferred acknowledgements, the session) is theirs:
 * client_close() and client_finish() hand it up through
 * local.client_event_cb (enum client_event in local_int.h).
 */
#include "local_int.h"

#include <string.h>

static const char *const local_drop_names[DROP_KINDS] = {
    [DROP_EVICTED] = "evicted",   [DROP_EVICTED_UID] = "evicted_uid",
    [DROP_REFUSED] = "refused",   [DROP_NO_FDS] = "no_fds",
    [DROP_DEADLINE] = "deadline", [DROP_MAX_CLIENTS] = "max_clients",
    [DROP_PROTOCOL] = "protocol", [DROP_ACCEPT] = "accept_failed",
};

/* --- states ------------------------------------------------------------------ */

/* A connection's states:
 *
 *     NEW --(CONNECT accepted, CONNACK 0)----------------> CONNECTED
 *      |  \                                                 ^     |
 *      |   +--(CONNECT with a password)--> AUTHENTICATING --+     |
 *      |                                        |                 |
 *      +----------> CLOSING <-------------------+-----------------+
 *
 * AUTHENTICATING: the password check runs on the threadpool; the client
 * reads nothing meanwhile, its CONNECT deadline is met and it stays pending
 * (not evictable); when the check ends, its CONNECT is handled again with
 * the verdict (auth_ok). CLOSING is final: the handles are closing and
 * fan-out skips the client. */
static const struct sm_state client_states[] = {
    [CLIENT_NEW] = {"NEW",
                    SM_TO(CLIENT_AUTHENTICATING) | SM_TO(CLIENT_CONNECTED) | SM_TO(CLIENT_CLOSING)},
    [CLIENT_AUTHENTICATING] = {"AUTHENTICATING", SM_TO(CLIENT_CONNECTED) | SM_TO(CLIENT_CLOSING)},
    [CLIENT_CONNECTED] = {"CONNECTED", SM_TO(CLIENT_CLOSING)},
    [CLIENT_CLOSING] = {"CLOSING", 0},
};

static void client_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    const struct local_client *client = container_of(sm, struct local_client, sm);

    snprintf(buf, size, CLIENT_FMT, CLIENT_ARGS(client));
}

/* CONNECTED means CONNECT was accepted: the client has its id and session;
 * NEW means it is still counted as pending (a test client has no listener);
 * AUTHENTICATING starts with a password check queued. */
static bool client_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct local_client *client = container_of(sm, struct local_client, sm);

    if (sm_state(sm) == CLIENT_AUTHENTICATING && client->auth == NULL) {
        snprintf(why, size, "authenticating without a password check");
        return false;
    }

    if (sm_state(sm) == CLIENT_CONNECTED && (client->id == NULL || client->session == NULL)) {
        snprintf(why, size, "connected without %s", client->id == NULL ? "an id" : "a session");
        return false;
    }
    return true;
}

const struct sm_conf client_sm = {
    .states = client_states,
    .count = ARRAY_SIZE(client_states),
    .level = LOG_DEBUG,
    .describe = client_sm_describe,
    .invariant = client_sm_invariant,
};

/* --- the pending list and drop reports ---------------------------------------- */

void pending_link(struct local_client *client, struct listener *listener)
{
    struct local *local = client->local;

    client->listener = listener;
    client->in_pending = true;
    client->pending_prev = local->pending_tail;
    client->pending_next = NULL;
    if (local->pending_tail)
        local->pending_tail->pending_next = client;
    else
        local->pending_head = client;
    local->pending_tail = client;
    local->pending_count++;
    listener->pending_count++;
}

static void pending_unlink(struct local_client *client)
{
    struct local *local = client->local;

    if (!client->in_pending)
        return;
    if (client->pending_prev)
        client->pending_prev->pending_next = client->pending_next;
    else
        local->pending_head = client->pending_next;
    if (client->pending_next)
        client->pending_next->pending_prev = client->pending_prev;
    else
        local->pending_tail = client->pending_prev;
    local->pending_count--;
    if (client->listener)
        client->listener->pending_count--;
    client->listener = NULL;
    client->in_pending = false;
    client->pending_prev = client->pending_next = NULL;
}

void local_drop_report(struct local *local)
{
    double seconds = (double)(local->drop_last_ms - local->drop_window_start_ms) / 1000.0;

    for (struct listener *l = local->listeners; l; l = l->next) {
        uint64_t total = 0;
        char counts[512];
        size_t off = 0;

        for (int kind = 0; kind < DROP_KINDS; kind++)
            total += l->drops[kind];
        if (total == 0)
            continue;
        counts[0] = '\0';
        for (int kind = 0; kind < DROP_KINDS; kind++)
            if (l->drops[kind] && off < sizeof(counts))
                off += (size_t)snprintf(counts + off, sizeof(counts) - off, "%s%s %llu",
                                        off ? ", " : "", local_drop_names[kind],
                                        (unsigned long long)l->drops[kind]);
        log_warn("listener %s: closed %llu connection(s) before CONNECT completed in %.1f s (%s; "
                 "local.max_pending_connects %u, local.max_pending_per_uid %u, "
                 "local.connect_deadline %u ms); %zu pending, %zu connected now; first: %s",
                 l->url, (unsigned long long)total, seconds, counts, local_max_pending(local),
                 local_max_pending_per_uid(local), local_connect_deadline_ms(local),
                 l->pending_count, local->connected_count, l->first_drop);
        memset(l->drops, 0, sizeof(l->drops));
        l->first_drop[0] = '\0';
    }
    local->drop_window = false;
}

static void local_drop_timer_cb(uv_timer_t *timer)
{
    struct local *local = timer->data;
    uint64_t now = uv_now(local->loop);
    uint64_t quiet_end = local->drop_last_ms + LOCAL_DROP_QUIET_MS;
    uint64_t window_end = local->drop_window_start_ms + LOCAL_DROP_REPORT_MAX_MS;

    if (now >= quiet_end || now >= window_end) {
        local_drop_report(local);
        return;
    }
    uv_timer_start(timer, local_drop_timer_cb,
                   (quiet_end < window_end ? quiet_end : window_end) - now, 0);
}

/*
 * Count a connection closed before CONNECT completed. Logging each one would
 * let a flood flood the log too: the counts go into one line per listener
 * per burst (a burst ends after LOCAL_DROP_QUIET_MS without drops, or is cut
 * every LOCAL_DROP_REPORT_MAX_MS), with the first drop's peer and reason.
 * @listener may be NULL (a test client, or a listener closed by a reload):
 * then only the totals count it.
 */
void local_drop_note(struct local *local, struct listener *listener, enum local_drop kind,
                     const char *peer, const char *why)
{
    uint64_t now = uv_now(local->loop);

    local->drops_total[kind]++;
    log_debug("closing [%s] before CONNECT completed: %s", peer, why);
    if (!listener || local->closing)
        return;
    if (!local->drop_window) {
        local->drop_window = true;
        local->drop_window_start_ms = now;
        uv_timer_start(&local->drop_timer, local_drop_timer_cb, LOCAL_DROP_QUIET_MS, 0);
    }
    local->drop_last_ms = now;
    if (!listener->first_drop[0])
        snprintf(listener->first_drop, sizeof(listener->first_drop), "[%s] %s", peer, why);
    listener->drops[kind]++;
}

/* --- client state and lifetime ---------------------------------------------- */

void client_set_state(struct local_client *client, enum client_state to)
{
    enum client_state from = client_state_of(client);

    if (sm_move(&client->sm, to, NULL) < 0)
        return;
    if ((from == CLIENT_NEW || from == CLIENT_AUTHENTICATING) && to != CLIENT_AUTHENTICATING)
        pending_unlink(client); /* an authenticating client stays pending */
    if (from == CLIENT_CONNECTED)
        client->local->connected_count--;
    if (to == CLIENT_CONNECTED)
        client->local->connected_count++;
}

/* Both handles are closed: the layers above publish the will if due and drop
 * the session (CLIENT_EVENT_FINISHED), then the client is freed. */
void client_finish(struct local_client *client)
{
    struct local *local = client->local;

    local->client_event_cb(client, CLIENT_EVENT_FINISHED, false);
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
        client_finish(client);
}

static void client_timer_closed_cb(uv_handle_t *handle)
{
    struct local_client *client = container_of(handle, struct local_client, timer);

    if (--client->open_handles == 0)
        client_finish(client);
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

/*
 * Start closing. @abnormal decides whether the will is published (§3.1.2.5);
 * @why goes to the log. Safe to call from any callback, repeatedly: the
 * client stays allocated until its close callbacks have run.
 */
void client_close(struct local_client *client, enum close_mode mode, bool abnormal, const char *why)
{
    if (client_state_of(client) == CLIENT_CLOSING)
        return;
    if (client_state_of(client) == CLIENT_CONNECTED)
        log_info(CLIENT_FMT ": disconnected: %s", CLIENT_ARGS(client), why);
    else if (client->quiet_close)
        log_debug(CLIENT_FMT ": connection closed before CONNECT completed: %s",
                  CLIENT_ARGS(client), why);
    else
        log_info(CLIENT_FMT ": connection closed before CONNECT completed: %s", CLIENT_ARGS(client),
                 why);
    /* Before the move: the layers above cancel a password check, decide
     * the will on the state it leaves and detach the session. */
    client->local->client_event_cb(client, CLIENT_EVENT_CLOSING, abnormal);
    client_set_state(client, CLIENT_CLOSING);
    uv_read_stop(&client->conn.stream);
    uv_timer_stop(&client->timer);
    if (mode == CLOSE_FLUSH && (client->write_active || client->pending.len)) {
        client_flush(client);
        if (client->write_active) {
            uv_timer_start(&client->timer, client_flush_timeout_cb, LOCAL_FLUSH_TIMEOUT_MS, 0);
            return;
        }
    }
    client_close_handles(client);
}

/* --- output ------------------------------------------------------------------ */

/* A client must be able to hold at least two maximum-size packets. */
static size_t local_out_limit(const struct local *local)
{
    size_t two_packets = 2 * local_max_packet(local);
    return two_packets > LOCAL_OUT_MAX_BYTES ? two_packets : LOCAL_OUT_MAX_BYTES;
}

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
        if (client_state_of(client) == CLIENT_CLOSING) {
            client_close_handles(client);
        } else {
            char why[128];
            snprintf(why, sizeof(why), "write failed: %s", uv_strerror(status));
            client_close(client, CLOSE_ABORT, true, why);
        }
        return;
    }
    client_flush(client);
    if (client_state_of(client) == CLIENT_CLOSING && !client->write_active)
        client_close_handles(client);
}

/* Hand the pending output to uv_write unless a write is already active (its
 * callback calls us again). */
void client_flush(struct local_client *client)
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
        if (client_state_of(client) == CLIENT_CLOSING)
            client_close_handles(client);
        else
            client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    client->write_active = true;
}

/*
 * Reserve @len bytes at the end of the pending output and return them, or
 * NULL when the client is closing or would exceed its output bound (then it
 * is disconnected as a slow consumer: memory stays bounded).
 */
uint8_t *client_reserve(struct local_client *client, size_t len)
{
    struct out_buf *out = &client->pending;
    size_t queued = client->pending.len + client->writing.len;
    size_t limit = local_out_limit(client->local);
    uint8_t *p;

    if (client_state_of(client) == CLIENT_CLOSING)
        return NULL;
    if (queued + len > limit) {
        char why[160];
        log_warn(CLIENT_FMT ": slow consumer: %zu bytes of output queued (limit %zu); "
                            "disconnecting",
                 CLIENT_ARGS(client), queued + len, limit);
        snprintf(why, sizeof(why), "slow consumer (%zu bytes queued)", queued + len);
        client_close(client, CLOSE_ABORT, true, why);
        return NULL;
    }
    if (out->cap - out->len < len) {
        size_t cap = out->cap ? out->cap * 2 : LOCAL_READ_CHUNK;
        while (cap < out->len + len)
            cap *= 2;
        p = realloc(out->data, cap);
        if (!p) {
            client_close(client, CLOSE_ABORT, true, "out of memory for output");
            return NULL;
        }
        out->data = p;
        out->cap = cap;
    }
    p = out->data + out->len;
    out->len += len;
    return p;
}

void client_send_bytes(struct local_client *client, const uint8_t *data, size_t len)
{
    uint8_t *p = client_reserve(client, len);

    if (!p)
        return;
    memcpy(p, data, len);
    client_flush(client);
}

void client_send_ack(struct local_client *client, uint8_t type, uint16_t packet_id)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_ack(buf, sizeof(buf), type, packet_id, &len) == 0)
        client_send_bytes(client, buf, len);
}

void client_send_connack(struct local_client *client, uint8_t code)
{
    uint8_t buf[4];
    size_t len;

    /* Session present is always 0: no session outlives its connection yet. */
    if (mqtt_encode_connack(buf, sizeof(buf), false, code, &len) == 0)
        client_send_bytes(client, buf, len);
}

/* CONNACK 0 (§3.2.2.2: session present only when a session was resumed). */
void client_send_connack_accepted(struct local_client *client, bool session_present)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_connack(buf, sizeof(buf), session_present, MQTT_CONNACK_ACCEPTED, &len) == 0)
        client_send_bytes(client, buf, len);
}

/* Encode one PUBLISH into the output; a client that cannot take it is
 * closed by client_reserve() (slow consumer). */
void client_write_publish(struct local_client *client, const char *topic, size_t topic_len,
                          const void *payload, size_t len, uint8_t qos, bool retain, bool dup,
                          uint16_t packet_id)
{
    size_t size;
    uint8_t *p;
    int rc;

    if (client_state_of(client) != CLIENT_CONNECTED)
        return;
    rc = mqtt_encode_publish(NULL, 0, topic, topic_len, payload, len, qos, retain, dup, packet_id,
                             &size);
    if (rc != -ENOBUFS) {
        log_warn(CLIENT_FMT ": cannot encode PUBLISH to '%.*s': %s", CLIENT_ARGS(client),
                 (int)topic_len, topic, strerror(-rc));
        return;
    }
    p = client_reserve(client, size);
    if (!p)
        return;
    mqtt_encode_publish(p, size, topic, topic_len, payload, len, qos, retain, dup, packet_id,
                        &size);
    client_flush(client);
}
