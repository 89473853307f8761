/* local.c - the local MQTT 3.1.1 server on the libuv loop (see local.h): its
 * public calls and the test and fuzzing seam. This is the top of six files in
 * layers; local_int.h lists them and has the overview.
 */
#include "local_int.h"

#include <string.h>

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
    client_events_install(local);
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
        bool rewrite = retained_load(local);
        local->retained_loaded = true; /* only now do changes schedule writes */
        if (rewrite)
            retained_changed(local); /* upgrade, or drop the damaged bytes */
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
        listener_close(l);
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

void local_stop_accepting(struct local *local)
{
    if (local->drop_window)
        local_drop_report(local); /* per listener: before they go */
    while (local->listeners) {
        struct listener *l = local->listeners;
        local->listeners = l->next;
        listener_close(l);
    }
}

static void local_close_handle_cb(uv_handle_t *handle)
{
    struct local *local = handle->data;

    local_live_put(local);
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
        client_close(c, CLOSE_FLUSH, false, "server shutting down");
    /* Pending retained changes are written before done_cb (the write holds
     * a live reference). */
    uv_timer_stop(&local->retained_timer);
    uv_close((uv_handle_t *)&local->retained_timer, local_close_handle_cb);
    if (local->drop_window)
        local_drop_report(local);
    uv_timer_stop(&local->drop_timer);
    uv_close((uv_handle_t *)&local->drop_timer, local_close_handle_cb);
    uv_close((uv_handle_t *)&local->accept_timer, local_close_handle_cb);
    retained_write_start(local);
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
        session_free(local->sessions, false); /* the tree goes as a whole below */
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
    client_link(local, client);
    snprintf(client->peer, sizeof(client->peer), "test %lu", ++serial);
    client->accepted_ms = uv_now(local->loop);
    uv_timer_start(&client->timer, client_keepalive_cb, local_connect_deadline_ms(local), 0);
    *out = client;
    return 0;
}

void local_test_client_input(struct local_client *client, const void *data, size_t len)
{
    const uint8_t *p = data;

    /* The same path as socket reads: client_alloc_cb sizes the buffer. */
    while (len > 0 && client_state_of(client) != CLIENT_CLOSING) {
        uv_buf_t buf;
        size_t n;

        client_alloc_cb(&client->conn.handle, LOCAL_READ_CHUNK, &buf);
        if (!buf.base) {
            client_read_cb(&client->conn.stream, UV_ENOBUFS, &buf);
            return;
        }
        n = buf.len < len ? buf.len : len;
        memcpy(buf.base, p, n);
        client_read_cb(&client->conn.stream, (ssize_t)n, &buf);
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
    client_close(client, CLOSE_ABORT, true, "connection lost");
}

bool local_test_client_closing(const struct local_client *client)
{
    return client_state_of(client) == CLIENT_CLOSING;
}
