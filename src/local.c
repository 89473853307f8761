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
 * What this first cut does not do yet (documented in the report/docs):
 * persistent sessions (clean session 0 is accepted but the session is not
 * kept after the connection closes, and CONNACK says session present 0),
 * authentication and ACLs, retransmission of unacknowledged QoS>0 messages.
 */
#include "local.h"

#include <errno.h>
#include <grp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "mqtt_codec.h"
#include "topic.h"
#include "util.h"

/* §3.1: the server SHOULD close a connection that sends no CONNECT within a
 * reasonable time; 10 s is generous for a local app. */
#define LOCAL_CONNECT_TIMEOUT_MS 10000
/* How long a closing connection may take to flush its last packets (e.g. a
 * refusing CONNACK) before it is closed anyway. */
#define LOCAL_FLUSH_TIMEOUT_MS 2000
/* Output a client may have queued before it counts as a slow consumer. */
#define LOCAL_OUT_MAX_BYTES (1024 * 1024)
/* Outbound QoS>0 messages without PUBACK/PUBCOMP, and inbound QoS 2 ids
 * awaiting PUBREL, per client. Far below 65535 so an id is always free. */
#define LOCAL_INFLIGHT_MAX 10000
/* Retained messages kept in memory (whole server). */
#define LOCAL_RETAINED_MAX 10000
/* Read granularity; the buffer grows to one whole packet when needed. */
#define LOCAL_READ_CHUNK 4096
/* Buffers above this are released when they become empty. */
#define LOCAL_BUF_KEEP 65536
/* Filters with this prefix are reported to the router (local.h). */
#define LOCAL_CLOUD_PREFIX "cloud/"

enum client_state {
    CLIENT_NEW,       /* accepted, waiting for CONNECT */
    CLIENT_CONNECTED, /* CONNACK 0 sent */
    CLIENT_CLOSING,   /* flushing and/or closing handles; ignored by fan-out */
};

static const char *const client_state_names[] = {
    [CLIENT_NEW] = "NEW",
    [CLIENT_CONNECTED] = "CONNECTED",
    [CLIENT_CLOSING] = "CLOSING",
};

/* Allowed moves; anything else is a bug in this file. */
static const bool client_transitions[3][3] = {
    [CLIENT_NEW] = {[CLIENT_CONNECTED] = true, [CLIENT_CLOSING] = true},
    [CLIENT_CONNECTED] = {[CLIENT_CLOSING] = true},
    [CLIENT_CLOSING] = {false},
};

enum close_mode {
    CLOSE_ABORT, /* drop queued output */
    CLOSE_FLUSH, /* write queued output first (bounded by LOCAL_FLUSH_TIMEOUT_MS) */
};

/* A set of 16-bit packet ids; the 8 KiB bitmap is allocated on first use so
 * QoS 0 clients never pay for it. */
struct idset {
    uint64_t *bits;
    size_t count;
};

struct out_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
};

struct local_client {
    struct local *local;
    struct local_client *prev, *next;
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } conn;
    uv_timer_t timer;
    uv_write_t write_req;
    int open_handles;
    enum client_state state;
    char peer[96]; /* "127.0.0.1:5555" or "pid 12 uid 1000", for logs */
    char *id;      /* NULL until CONNECT */
    uint16_t keepalive_s;

    uint8_t *rbuf; /* unparsed input */
    size_t rlen, rcap;
    size_t rneed; /* size of the packet being assembled, 0 if not yet known */

    struct out_buf pending; /* encoded, not yet handed to uv_write */
    struct out_buf writing; /* owned by the active uv_write */
    bool write_active;

    uint16_t next_packet_id;
    struct idset out_unacked;  /* sent QoS 1/2, waiting for PUBACK/PUBREC */
    struct idset out_released; /* QoS 2 after PUBREC: PUBREL sent, waiting for PUBCOMP */
    struct idset in_qos2;      /* received QoS 2, PUBREC sent, waiting for PUBREL */

    bool has_will;
    bool will_retain;
    uint8_t will_qos;
    char *will_topic;
    uint8_t *will_payload;
    size_t will_len;
    bool publish_will; /* decided when closing starts, acted on when freed */
};

struct listener {
    struct local *local;
    struct listener *next;
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    enum conf_listen_kind kind;
    char *url;
    char *path; /* Unix socket we created; unlinked on close */
    bool keep;  /* scratch for local_reconfigure() */
};

struct retained {
    struct retained *next;
    uint8_t qos;
    uint8_t *payload;
    size_t len;
    size_t topic_len;
    char topic[];
};

struct local {
    uv_loop_t *loop;
    const struct conf *conf;
    struct local_hooks hooks;
    struct listener *listeners;
    struct local_client *clients;
    size_t client_count;    /* allocated clients, any state */
    size_t connected_count; /* clients in CONNECTED */
    size_t live; /* listeners + clients + the close handle, until their close callbacks */
    uv_timer_t close_handle; /* never started; closed last so done_cb runs from the loop */
    struct topic_table subs;
    struct retained *retained;
    size_t retained_count;
    uint64_t generated_ids;
    bool closing;
    void (*done_cb)(void *arg);
    void *done_arg;
};

/* Log prefix for a client: its id (or "-" before CONNECT) and its peer. */
#define CLIENT_FMT     "client %s [%s]"
#define CLIENT_ARGS(c) ((c)->id ? (c)->id : "-"), (c)->peer

static void client_close(struct local_client *client, enum close_mode mode, bool abnormal,
                         const char *why);
static void client_flush(struct local_client *client);
static void local_check_done(struct local *local);

/* --- small helpers ----------------------------------------------------------- */

static bool idset_has(const struct idset *set, uint16_t id)
{
    return set->bits && (set->bits[id / 64] >> (id % 64)) & 1;
}

static int idset_add(struct idset *set, uint16_t id)
{
    if (!set->bits) {
        set->bits = calloc(65536 / 64, sizeof(uint64_t));
        if (!set->bits)
            return -ENOMEM;
    }
    if (!idset_has(set, id)) {
        set->bits[id / 64] |= UINT64_C(1) << (id % 64);
        set->count++;
    }
    return 0;
}

static bool idset_del(struct idset *set, uint16_t id)
{
    if (!idset_has(set, id))
        return false;
    set->bits[id / 64] &= ~(UINT64_C(1) << (id % 64));
    set->count--;
    return true;
}

static void idset_free(struct idset *set)
{
    free(set->bits);
    set->bits = NULL;
    set->count = 0;
}

static bool is_cloud_filter(const char *filter, size_t len)
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

static void local_live_put(struct local *local)
{
    local->live--;
    local_check_done(local);
}

/* --- client state and lifetime ---------------------------------------------- */

static void client_set_state(struct local_client *client, enum client_state to)
{
    enum client_state from = client->state;

    if (!client_transitions[from][to]) {
        log_err(CLIENT_FMT ": invalid state change %s -> %s (bug)", CLIENT_ARGS(client),
                client_state_names[from], client_state_names[to]);
        return;
    }
    log_debug(CLIENT_FMT ": %s -> %s", CLIENT_ARGS(client), client_state_names[from],
              client_state_names[to]);
    if (from == CLIENT_CONNECTED)
        client->local->connected_count--;
    if (to == CLIENT_CONNECTED)
        client->local->connected_count++;
    client->state = to;
}

static void local_dispatch(struct local *local, const char *topic, size_t topic_len,
                           const void *payload, size_t len, uint8_t qos, bool retain);

static void subs_last_cb(void *arg, const char *filter, size_t len)
{
    struct local *local = arg;

    if (is_cloud_filter(filter, len) && local->hooks.unsubscribe_cb)
        local->hooks.unsubscribe_cb(local->hooks.arg, filter);
}

/* Both handles are closed: publish the will if due, drop the session, free. */
static void client_finish(struct local_client *client)
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
    /* Clean sessions only (see the top of this file): subscriptions go with
     * the connection. */
    topic_table_remove_owner(&local->subs, client, subs_last_cb, local);

    if (client->prev)
        client->prev->next = client->next;
    else
        local->clients = client->next;
    if (client->next)
        client->next->prev = client->prev;
    local->client_count--;

    idset_free(&client->out_unacked);
    idset_free(&client->out_released);
    idset_free(&client->in_qos2);
    free(client->rbuf);
    free(client->pending.data);
    free(client->writing.data);
    free(client->will_topic);
    free(client->will_payload);
    free(client->id);
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
static void client_close(struct local_client *client, enum close_mode mode, bool abnormal,
                         const char *why)
{
    if (client->state == CLIENT_CLOSING)
        return;
    if (client->state == CLIENT_CONNECTED)
        log_info(CLIENT_FMT ": disconnected: %s", CLIENT_ARGS(client), why);
    else
        log_info(CLIENT_FMT ": connection closed before CONNECT completed: %s", CLIENT_ARGS(client),
                 why);
    client->publish_will = abnormal && client->state == CLIENT_CONNECTED;
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

/* A protocol violation by the client: §4.8 says close the connection. */
static void client_protocol_error(struct local_client *client, const char *what, const char *reason)
{
    char why[256];

    log_warn(CLIENT_FMT ": protocol error in %s: %s; closing the connection", CLIENT_ARGS(client),
             what, reason);
    snprintf(why, sizeof(why), "protocol error in %s: %s", what, reason);
    client_close(client, CLOSE_ABORT, true, why);
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
            client_close(client, CLOSE_ABORT, true, why);
        }
        return;
    }
    client_flush(client);
    if (client->state == CLIENT_CLOSING && !client->write_active)
        client_close_handles(client);
}

/* Hand the pending output to uv_write unless a write is already active (its
 * callback calls us again). */
static void client_flush(struct local_client *client)
{
    struct out_buf swap;
    uv_buf_t buf;
    int rc;

    if (client->write_active || client->pending.len == 0 || uv_is_closing(&client->conn.handle))
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
static uint8_t *client_reserve(struct local_client *client, size_t len)
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

static void client_send_bytes(struct local_client *client, const uint8_t *data, size_t len)
{
    uint8_t *p = client_reserve(client, len);

    if (!p)
        return;
    memcpy(p, data, len);
    client_flush(client);
}

static void client_send_ack(struct local_client *client, uint8_t type, uint16_t packet_id)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_ack(buf, sizeof(buf), type, packet_id, &len) == 0)
        client_send_bytes(client, buf, len);
}

static void client_send_connack(struct local_client *client, uint8_t code)
{
    uint8_t buf[4];
    size_t len;

    /* Session present is always 0: no session outlives its connection yet. */
    if (mqtt_encode_connack(buf, sizeof(buf), false, code, &len) == 0)
        client_send_bytes(client, buf, len);
}

static int client_alloc_packet_id(struct local_client *client, uint16_t *out)
{
    if (client->out_unacked.count + client->out_released.count >= LOCAL_INFLIGHT_MAX)
        return -ENOBUFS;
    /* Bounded: fewer than LOCAL_INFLIGHT_MAX of 65535 ids are in use. */
    for (unsigned tries = 0; tries < 65535; tries++) {
        uint16_t id = ++client->next_packet_id;
        if (id == 0)
            id = client->next_packet_id = 1; /* §2.3.1: ids are non-zero */
        if (!idset_has(&client->out_unacked, id) && !idset_has(&client->out_released, id)) {
            *out = id;
            return 0;
        }
    }
    return -ENOBUFS;
}

static void client_send_publish(struct local_client *client, const char *topic, size_t topic_len,
                                const void *payload, size_t len, uint8_t qos, bool retain)
{
    uint16_t packet_id = 0;
    size_t size;
    uint8_t *p;
    int rc;

    if (client->state != CLIENT_CONNECTED)
        return;
    if (qos > 0) {
        if (client_alloc_packet_id(client, &packet_id) < 0) {
            log_warn(CLIENT_FMT ": slow consumer: %d QoS>0 messages unacknowledged; "
                                "disconnecting",
                     CLIENT_ARGS(client), LOCAL_INFLIGHT_MAX);
            client_close(client, CLOSE_ABORT, true, "too many unacknowledged messages");
            return;
        }
    }
    rc = mqtt_encode_publish(NULL, 0, topic, topic_len, payload, len, qos, retain, false, packet_id,
                             &size);
    if (rc != -ENOBUFS) {
        log_warn(CLIENT_FMT ": cannot encode PUBLISH to '%.*s': %s", CLIENT_ARGS(client),
                 (int)topic_len, topic, strerror(-rc));
        return;
    }
    p = client_reserve(client, size);
    if (!p)
        return;
    if (qos > 0 && idset_add(&client->out_unacked, packet_id) < 0) {
        client_close(client, CLOSE_ABORT, true, "out of memory");
        return;
    }
    mqtt_encode_publish(p, size, topic, topic_len, payload, len, qos, retain, false, packet_id,
                        &size);
    client_flush(client);
}

/* --- retained messages and fan-out ------------------------------------------- */

static struct retained **retained_find(struct local *local, const char *topic, size_t len)
{
    struct retained **pp;

    for (pp = &local->retained; *pp; pp = &(*pp)->next)
        if ((*pp)->topic_len == len && memcmp((*pp)->topic, topic, len) == 0)
            return pp;
    return pp; /* the terminating NULL link, for insertion */
}

/* §3.3.1.3: a retained PUBLISH replaces the topic's retained message; an
 * empty payload deletes it (§3.3.1-10/11). */
static void retained_store(struct local *local, const char *topic, size_t topic_len,
                           const void *payload, size_t len, uint8_t qos)
{
    struct retained **pp = retained_find(local, topic, topic_len), *r = *pp;
    uint8_t *copy = NULL;

    if (len == 0) {
        if (r) {
            *pp = r->next;
            free(r->payload);
            free(r);
            local->retained_count--;
        }
        return;
    }
    copy = malloc(len);
    if (!copy) {
        log_warn("cannot retain message on '%.*s': out of memory", (int)topic_len, topic);
        return;
    }
    memcpy(copy, payload, len);
    if (!r) {
        if (local->retained_count >= LOCAL_RETAINED_MAX) {
            log_warn("not retaining message on '%.*s': already %d retained topics", (int)topic_len,
                     topic, LOCAL_RETAINED_MAX);
            free(copy);
            return;
        }
        r = malloc(sizeof(*r) + topic_len + 1);
        if (!r) {
            log_warn("cannot retain message on '%.*s': out of memory", (int)topic_len, topic);
            free(copy);
            return;
        }
        memcpy(r->topic, topic, topic_len);
        r->topic[topic_len] = '\0';
        r->topic_len = topic_len;
        r->payload = NULL;
        r->next = NULL;
        *pp = r;
        local->retained_count++;
    }
    free(r->payload);
    r->payload = copy;
    r->len = len;
    r->qos = qos;
}

struct dispatch {
    const char *topic;
    size_t topic_len;
    const void *payload;
    size_t len;
    uint8_t qos;
};

static void dispatch_match_cb(void *arg, void *owner, uint8_t sub_qos)
{
    const struct dispatch *d = arg;
    struct local_client *client = owner;

    /* §3.3.5: delivered at min(granted QoS, message QoS); §3.3.1-9: RETAIN 0
     * on messages that match an established subscription. */
    client_send_publish(client, d->topic, d->topic_len, d->payload, d->len,
                        sub_qos < d->qos ? sub_qos : d->qos, false);
}

/* Store (if retained) and deliver to every matching local subscriber. */
static void local_dispatch(struct local *local, const char *topic, size_t topic_len,
                           const void *payload, size_t len, uint8_t qos, bool retain)
{
    struct dispatch d = {
        .topic = topic, .topic_len = topic_len, .payload = payload, .len = len, .qos = qos};

    if (retain)
        retained_store(local, topic, topic_len, payload, len, qos);
    topic_table_match(&local->subs, topic, topic_len, dispatch_match_cb, &d);
}

/* --- packet handlers ---------------------------------------------------------- */

static void client_keepalive_cb(uv_timer_t *timer)
{
    struct local_client *client = container_of(timer, struct local_client, timer);
    char why[128];

    if (client->state == CLIENT_NEW) {
        snprintf(why, sizeof(why), "no CONNECT within %d s", LOCAL_CONNECT_TIMEOUT_MS / 1000);
        log_warn(CLIENT_FMT ": %s; closing", CLIENT_ARGS(client), why);
        client_close(client, CLOSE_ABORT, false, why);
        return;
    }
    /* §3.1.2-24: nothing received for one and a half keepalive periods. */
    snprintf(why, sizeof(why), "keepalive expired (nothing received for 1.5 x %u s)",
             client->keepalive_s);
    log_warn(CLIENT_FMT ": %s", CLIENT_ARGS(client), why);
    client_close(client, CLOSE_ABORT, true, why);
}

static void client_arm_keepalive(struct local_client *client)
{
    if (client->state == CLIENT_CONNECTED && client->keepalive_s)
        uv_timer_start(&client->timer, client_keepalive_cb, client->keepalive_s * 1500ull, 0);
}

static char *slice_strdup(const struct mqtt_slice *s)
{
    char *p = malloc(s->len + 1);

    if (p) {
        if (s->len)
            memcpy(p, s->data, s->len);
        p[s->len] = '\0';
    }
    return p;
}

static struct local_client *local_find_client(struct local *local, const char *id,
                                              const struct local_client *except)
{
    for (struct local_client *c = local->clients; c; c = c->next)
        if (c != except && c->state == CLIENT_CONNECTED && strcmp(c->id, id) == 0)
            return c;
    return NULL;
}

static void handle_connect(struct local_client *client, const struct mqtt_connect *c)
{
    struct local *local = client->local;
    struct local_client *old;

    if (c->client_id.len == 0) {
        /* §3.1.3-7/8: an empty id is only allowed with a clean session. */
        if (!c->clean_session) {
            log_warn(CLIENT_FMT ": empty client id with clean session 0; refusing with "
                                "CONNACK 2 (§3.1.3-8)",
                     CLIENT_ARGS(client));
            client_send_connack(client, MQTT_CONNACK_ID_REJECTED);
            client_close(client, CLOSE_FLUSH, false, "empty client id without clean session");
            return;
        }
        client->id = malloc(40);
        for (unsigned tries = 0; client->id && tries < 100; tries++) {
            snprintf(client->id, 40, "uplinkd-auto-%llu",
                     (unsigned long long)++local->generated_ids);
            if (!local_find_client(local, client->id, client))
                break;
        }
    } else {
        client->id = slice_strdup(&c->client_id);
    }
    if (c->will) {
        client->will_topic = slice_strdup(&c->will_topic);
        client->will_payload = malloc(c->will_payload.len ? c->will_payload.len : 1);
        if (client->will_payload && c->will_payload.len)
            memcpy(client->will_payload, c->will_payload.data, c->will_payload.len);
        client->will_len = c->will_payload.len;
        client->will_qos = c->will_qos;
        client->will_retain = c->will_retain;
        client->has_will = true;
    }
    if (!client->id || (c->will && (!client->will_topic || !client->will_payload))) {
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, "out of memory");
        return;
    }
    /* §3.1.4-2: a second connection with the same id takes over. */
    old = local_find_client(local, client->id, client);
    if (old) {
        log_info(CLIENT_FMT ": takes over client id '%s' from [%s] (§3.1.4-2)", CLIENT_ARGS(client),
                 client->id, old->peer);
        client_close(old, CLOSE_ABORT, true, "taken over by a new connection with the same id");
    }
    client->keepalive_s = c->keepalive_s;
    client_set_state(client, CLIENT_CONNECTED);
    client_send_connack(client, MQTT_CONNACK_ACCEPTED);
    uv_timer_stop(&client->timer);
    client_arm_keepalive(client);
    log_info(CLIENT_FMT ": connected (keepalive %u s, clean session %d%s)", CLIENT_ARGS(client),
             client->keepalive_s, c->clean_session,
             c->clean_session ? "" : ", persistent sessions not supported yet: treated as clean");
}

static void handle_publish(struct local_client *client, const struct mqtt_publish *p)
{
    struct local *local = client->local;
    char *topic;
    int rc = 0;

    if (p->qos == 2) {
        /* §4.3.3 (method: deliver on PUBLISH, remember the id until PUBREL):
         * a re-sent PUBLISH with a remembered id is not delivered again. */
        if (idset_has(&client->in_qos2, p->packet_id)) {
            client_send_ack(client, MQTT_PUBREC, p->packet_id);
            return;
        }
        if (client->in_qos2.count >= LOCAL_INFLIGHT_MAX) {
            client_protocol_error(client, "PUBLISH", "too many QoS 2 messages awaiting PUBREL");
            return;
        }
        if (idset_add(&client->in_qos2, p->packet_id) < 0) {
            client_close(client, CLOSE_ABORT, true, "out of memory");
            return;
        }
    }
    topic = slice_strdup(&p->topic);
    if (!topic) {
        client_close(client, CLOSE_ABORT, true, "out of memory");
        return;
    }
    /* The router first: when it cannot take a QoS>0 message, the client gets
     * no acknowledgement and the connection is closed, so the client keeps
     * the message and re-sends it (§4.4); delivering it locally now would
     * duplicate it on that re-send. */
    if (local->hooks.publish_cb)
        rc = local->hooks.publish_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                     p->payload.len, p->qos, p->retain);
    if (rc < 0 && p->qos > 0) {
        char why[160];
        log_warn(CLIENT_FMT
                 ": QoS %u message to '%s' not accepted by the router (%s); not "
                 "acknowledging it, closing the connection so the client re-sends it later",
                 CLIENT_ARGS(client), p->qos, topic, strerror(-rc));
        snprintf(why, sizeof(why), "router refused a QoS %u message: %s", p->qos, strerror(-rc));
        if (p->qos == 2)
            idset_del(&client->in_qos2, p->packet_id);
        free(topic);
        client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    local_dispatch(local, topic, p->topic.len, p->payload.data, p->payload.len, p->qos, p->retain);
    free(topic);
    if (p->qos == 1)
        client_send_ack(client, MQTT_PUBACK, p->packet_id);
    else if (p->qos == 2)
        client_send_ack(client, MQTT_PUBREC, p->packet_id);
}

static void send_retained(struct local_client *client, const char *filter, size_t len, uint8_t qos)
{
    for (struct retained *r = client->local->retained; r; r = r->next)
        if (topic_match(filter, len, r->topic, r->topic_len))
            /* §3.3.1-8: RETAIN 1 for messages sent because of a new subscription. */
            client_send_publish(client, r->topic, r->topic_len, r->payload, r->len,
                                qos < r->qos ? qos : r->qos, true);
}

static void handle_subscribe(struct local_client *client, const struct mqtt_subscribe *sub)
{
    struct local *local = client->local;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice filter;
    uint8_t qos, *codes;
    size_t i = 0, size;

    codes = malloc(sub->count);
    if (!codes) {
        client_close(client, CLOSE_ABORT, true, "out of memory");
        return;
    }
    while (i < sub->count && mqtt_subscribe_next(sub, &iter, &filter, &qos)) {
        const char *f = (const char *)filter.data, *reason;
        bool first = false;

        codes[i] = qos;
        if (topic_filter_check(f, filter.len, &reason) < 0) {
            /* §3.9.3: 0x80 refuses this filter; the rest still apply. */
            log_warn(CLIENT_FMT ": refusing subscription to '%.*s': %s", CLIENT_ARGS(client),
                     (int)filter.len, f, reason);
            codes[i] = MQTT_SUBACK_FAILURE;
        } else if (topic_table_add(&local->subs, client, f, filter.len, qos, &first) < 0) {
            log_warn(CLIENT_FMT ": refusing subscription to '%.*s': out of memory",
                     CLIENT_ARGS(client), (int)filter.len, f);
            codes[i] = MQTT_SUBACK_FAILURE;
        } else {
            log_debug(CLIENT_FMT ": subscribed to '%.*s' QoS %u", CLIENT_ARGS(client),
                      (int)filter.len, f, qos);
            if (first && is_cloud_filter(f, filter.len) && local->hooks.subscribe_cb) {
                char *copy = slice_strdup(&filter);
                if (copy)
                    local->hooks.subscribe_cb(local->hooks.arg, copy, qos);
                free(copy);
            }
        }
        i++;
    }
    if (mqtt_encode_suback(NULL, 0, sub->packet_id, codes, i, &size) == -ENOBUFS) {
        uint8_t *p = client_reserve(client, size);
        if (p) {
            mqtt_encode_suback(p, size, sub->packet_id, codes, i, &size);
            client_flush(client);
        }
    }
    /* §3.8.4-3: retained messages for every granted filter, also re-sent
     * when the subscription replaced an existing one. */
    iter.offset = 0;
    for (size_t k = 0; k < i && mqtt_subscribe_next(sub, &iter, &filter, &qos); k++)
        if (codes[k] != MQTT_SUBACK_FAILURE)
            send_retained(client, (const char *)filter.data, filter.len, codes[k]);
    free(codes);
}

static void handle_unsubscribe(struct local_client *client, const struct mqtt_subscribe *unsub)
{
    struct local *local = client->local;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice filter;

    while (mqtt_unsubscribe_next(unsub, &iter, &filter)) {
        const char *f = (const char *)filter.data;
        bool last = false;

        if (topic_table_remove(&local->subs, client, f, filter.len, &last) < 0)
            continue; /* §3.10.4-5: UNSUBACK even when nothing matched */
        log_debug(CLIENT_FMT ": unsubscribed from '%.*s'", CLIENT_ARGS(client), (int)filter.len, f);
        if (last && is_cloud_filter(f, filter.len) && local->hooks.unsubscribe_cb) {
            char *copy = slice_strdup(&filter);
            if (copy)
                local->hooks.unsubscribe_cb(local->hooks.arg, copy);
            free(copy);
        }
    }
    client_send_ack(client, MQTT_UNSUBACK, unsub->packet_id);
}

static void client_handle_packet(struct local_client *client, const uint8_t *data, size_t len)
{
    struct mqtt_packet pkt;
    const char *reason = "";
    size_t consumed;
    int rc;

    rc = mqtt_decode(data, len, 0, &pkt, &consumed, &reason);
    if (rc == -EPROTONOSUPPORT && client->state == CLIENT_NEW) {
        /* §3.1.2.2: unsupported protocol level -> CONNACK 1, then close. */
        log_warn(CLIENT_FMT ": refusing CONNECT: %s (only MQTT 3.1.1 is supported); "
                            "CONNACK 1",
                 CLIENT_ARGS(client), reason);
        client_send_connack(client, MQTT_CONNACK_BAD_PROTOCOL);
        client_close(client, CLOSE_FLUSH, false, "unsupported protocol version");
        return;
    }
    if (rc < 0) {
        client_protocol_error(client, mqtt_packet_type_name(data[0] >> 4), reason);
        return;
    }
    /* §3.1.2.10: any control packet resets the keepalive deadline. */
    client_arm_keepalive(client);

    if (client->state == CLIENT_NEW && pkt.type != MQTT_CONNECT) {
        /* §3.1.0-1: CONNECT must be the first packet. */
        client_protocol_error(client, mqtt_packet_type_name(pkt.type),
                              "first packet is not CONNECT (§3.1.0-1)");
        return;
    }
    switch (pkt.type) {
    case MQTT_CONNECT:
        if (client->state != CLIENT_NEW)
            client_protocol_error(client, "CONNECT", "second CONNECT (§3.1.0-2)");
        else
            handle_connect(client, &pkt.u.connect);
        break;
    case MQTT_PUBLISH:
        handle_publish(client, &pkt.u.publish);
        break;
    case MQTT_PUBACK:
        if (!idset_del(&client->out_unacked, pkt.u.packet_id))
            log_debug(CLIENT_FMT ": PUBACK for unknown packet id %u", CLIENT_ARGS(client),
                      pkt.u.packet_id);
        break;
    case MQTT_PUBREC:
        /* §4.3.3: QoS 2 sender, step 2: PUBREC -> PUBREL (also when repeated). */
        if (idset_del(&client->out_unacked, pkt.u.packet_id)) {
            if (idset_add(&client->out_released, pkt.u.packet_id) < 0) {
                client_close(client, CLOSE_ABORT, true, "out of memory");
                break;
            }
        }
        if (idset_has(&client->out_released, pkt.u.packet_id))
            client_send_ack(client, MQTT_PUBREL, pkt.u.packet_id);
        else
            log_debug(CLIENT_FMT ": PUBREC for unknown packet id %u", CLIENT_ARGS(client),
                      pkt.u.packet_id);
        break;
    case MQTT_PUBCOMP:
        if (!idset_del(&client->out_released, pkt.u.packet_id))
            log_debug(CLIENT_FMT ": PUBCOMP for unknown packet id %u", CLIENT_ARGS(client),
                      pkt.u.packet_id);
        break;
    case MQTT_PUBREL:
        /* §4.3.3: QoS 2 receiver: forget the id, answer PUBCOMP (also for an
         * id we no longer know: the sender is retrying after a lost PUBCOMP). */
        idset_del(&client->in_qos2, pkt.u.packet_id);
        client_send_ack(client, MQTT_PUBCOMP, pkt.u.packet_id);
        break;
    case MQTT_SUBSCRIBE:
        handle_subscribe(client, &pkt.u.subscribe);
        break;
    case MQTT_UNSUBSCRIBE:
        handle_unsubscribe(client, &pkt.u.unsubscribe);
        break;
    case MQTT_PINGREQ: {
        uint8_t buf[2];
        size_t n;
        if (mqtt_encode_simple(buf, sizeof(buf), MQTT_PINGRESP, &n) == 0)
            client_send_bytes(client, buf, n);
        break;
    }
    case MQTT_DISCONNECT:
        /* §3.14.4: discard the will, close. */
        client->has_will = false;
        client_close(client, CLOSE_FLUSH, false, "client sent DISCONNECT");
        break;
    default:
        client_protocol_error(client, mqtt_packet_type_name(pkt.type),
                              "server-to-client packet sent by a client");
        break;
    }
}

/* --- input ------------------------------------------------------------------- */

/* Handle every whole packet in the read buffer; keep the partial tail. */
static void client_process_input(struct local_client *client)
{
    size_t max_packet = local_max_packet(client->local);
    size_t off = 0;

    client->rneed = 0;
    while (client->state != CLIENT_CLOSING && off < client->rlen) {
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
            client_protocol_error(client, mqtt_packet_type_name(fh.type), detail);
            break;
        }
        if (rc < 0) {
            client_protocol_error(client, mqtt_packet_type_name(client->rbuf[off] >> 4), reason);
            break;
        }
        total = fh.header_len + fh.remaining_length;
        if (client->rlen - off < total) {
            client->rneed = total;
            break;
        }
        client_handle_packet(client, client->rbuf + off, total);
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

static void client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
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

static void client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
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
        client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    client->rlen += (size_t)nread;
    client_process_input(client);
}

/* --- listeners --------------------------------------------------------------- */

static void client_describe_peer(struct local_client *client, enum conf_listen_kind kind)
{
    snprintf(client->peer, sizeof(client->peer), "?");
    if (kind == CONF_LISTEN_TCP) {
        struct sockaddr_storage ss;
        int len = sizeof(ss);
        char host[64];

        if (uv_tcp_getpeername(&client->conn.tcp, (struct sockaddr *)&ss, &len) < 0)
            return;
        if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
            uv_ip6_name(sin6, host, sizeof(host));
            snprintf(client->peer, sizeof(client->peer), "[%s]:%u", host, ntohs(sin6->sin6_port));
        } else if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
            uv_ip4_name(sin, host, sizeof(host));
            snprintf(client->peer, sizeof(client->peer), "%s:%u", host, ntohs(sin->sin_port));
        }
    } else {
        /* Unix-socket clients are named by their credentials (SO_PEERCRED). */
        struct ucred cred;
        socklen_t len = sizeof(cred);
        uv_os_fd_t fd;

        if (uv_fileno(&client->conn.handle, &fd) == 0 &&
            getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
            snprintf(client->peer, sizeof(client->peer), "pid %ld uid %lu", (long)cred.pid,
                     (unsigned long)cred.uid);
        else
            snprintf(client->peer, sizeof(client->peer), "unix");
    }
}

static void listener_connection_cb(uv_stream_t *server, int status)
{
    struct listener *listener = container_of(server, struct listener, h.stream);
    struct local *local = listener->local;
    struct local_client *client;
    int rc;

    if (status < 0) {
        log_warn("listener %s: accept failed: %s", listener->url, uv_strerror(status));
        return;
    }
    client = calloc(1, sizeof(*client));
    if (!client) {
        log_err("listener %s: out of memory for a new client", listener->url);
        return;
    }
    client->local = local;
    if (listener->kind == CONF_LISTEN_TCP)
        rc = uv_tcp_init(local->loop, &client->conn.tcp);
    else
        rc = uv_pipe_init(local->loop, &client->conn.pipe, 0);
    if (rc < 0) {
        log_err("listener %s: cannot create a client handle: %s", listener->url, uv_strerror(rc));
        free(client);
        return;
    }
    uv_timer_init(local->loop, &client->timer);
    client->open_handles = 2;
    client->state = CLIENT_NEW;
    client->next = local->clients;
    if (local->clients)
        local->clients->prev = client;
    local->clients = client;
    local->client_count++;
    local->live++;

    rc = uv_accept(server, &client->conn.stream);
    if (rc < 0) {
        log_warn("listener %s: accept failed: %s", listener->url, uv_strerror(rc));
        client_close(client, CLOSE_ABORT, false, "accept failed");
        return;
    }
    client_describe_peer(client, listener->kind);
    if (local->client_count > local->conf->local.max_clients) {
        log_warn("listener %s: refusing connection from %s: local.max_clients (%u) reached",
                 listener->url, client->peer, local->conf->local.max_clients);
        client_close(client, CLOSE_ABORT, false, "max_clients reached");
        return;
    }
    log_debug(CLIENT_FMT ": accepted on %s", CLIENT_ARGS(client), listener->url);
    rc = uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb);
    if (rc < 0) {
        client_close(client, CLOSE_ABORT, false, uv_strerror(rc));
        return;
    }
    uv_timer_start(&client->timer, client_keepalive_cb, LOCAL_CONNECT_TIMEOUT_MS, 0);
}

static void listener_closed_cb(uv_handle_t *handle)
{
    struct listener *listener = container_of(handle, struct listener, h.handle);
    struct local *local = listener->local;

    if (listener->path && unlink(listener->path) < 0 && errno != ENOENT)
        log_warn("listener %s: cannot remove %s: %s", listener->url, listener->path,
                 strerror(errno));
    free(listener->url);
    free(listener->path);
    free(listener);
    local_live_put(local);
}

static void listener_close(struct listener *listener)
{
    if (!uv_is_closing(&listener->h.handle))
        uv_close(&listener->h.handle, listener_closed_cb);
}

/*
 * A Unix socket path left behind by a crashed daemon is removed; a path where
 * someone is listening, or that is not a socket, is left alone and refused.
 * This runs at start/reload: connect(2) on a Unix socket answers at once.
 */
static int unix_path_prepare(const char *url, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, rc;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        log_err("listener %s: socket path longer than %zu bytes", url, sizeof(addr.sun_path) - 1);
        return -ENAMETOOLONG;
    }
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(st.st_mode)) {
        log_err("listener %s: %s exists and is not a socket; remove it or choose another path", url,
                path);
        return -EEXIST;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    rc = connect(fd, (struct sockaddr *)&addr, sizeof(addr));
    close(fd);
    if (rc == 0) {
        log_err("listener %s: another process is listening on %s (is uplinkd already running?)",
                url, path);
        return -EADDRINUSE;
    }
    log_info("listener %s: removing stale socket %s", url, path);
    if (unlink(path) < 0 && errno != ENOENT)
        return -errno;
    return 0;
}

/* chmod/chgrp the socket: access control is by file permission (local.h). */
static int unix_path_permissions(const struct conf_local *conf, const char *url, const char *path)
{
    if (chmod(path, conf->socket_mode) < 0) {
        int err = errno;
        log_err("listener %s: chmod %o %s: %s", url, conf->socket_mode, path, strerror(err));
        return -err;
    }
    if (conf->socket_group) {
        /* NSS lookup at start/reload only, never from a client callback. */
        struct group grp, *found = NULL;
        char buf[4096];
        int err = getgrnam_r(conf->socket_group, &grp, buf, sizeof(buf), &found);

        if (!found) {
            log_err("listener %s: local.socket_group '%s': %s", url, conf->socket_group,
                    err ? strerror(err) : "no such group");
            return err ? -err : -ENOENT;
        }
        if (chown(path, (uid_t)-1, grp.gr_gid) < 0) {
            err = errno;
            log_err("listener %s: chgrp %s %s: %s", url, conf->socket_group, path, strerror(err));
            return -err;
        }
    }
    return 0;
}

static int listener_bind_tcp(struct listener *listener, const struct conf_listen *cl)
{
    struct sockaddr_storage ss;
    const char *host = strcmp(cl->host, "localhost") == 0 ? "127.0.0.1" : cl->host;
    int rc;

    if (uv_ip4_addr(host, cl->port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, cl->port, (struct sockaddr_in6 *)&ss) != 0) {
        log_err("listener %s: '%s' is not an IP address", cl->url, cl->host);
        return -EINVAL;
    }
    rc = uv_tcp_bind(&listener->h.tcp, (const struct sockaddr *)&ss, 0);
    if (rc < 0)
        log_err("listener %s: cannot bind: %s", cl->url, uv_strerror(rc));
    return rc;
}

static int listener_bind_unix(struct listener *listener, const struct conf_local *conf,
                              const struct conf_listen *cl)
{
    int rc = unix_path_prepare(cl->url, cl->path);

    if (rc < 0)
        return rc;
    rc = uv_pipe_bind(&listener->h.pipe, cl->path);
    if (rc < 0) {
        log_err("listener %s: cannot bind %s: %s", cl->url, cl->path, uv_strerror(rc));
        return rc;
    }
    listener->path = strdup(cl->path); /* from now on ours to unlink */
    if (!listener->path)
        return -ENOMEM;
    return unix_path_permissions(conf, cl->url, cl->path);
}

/* Create, bind and listen; on failure the listener is already being closed. */
static int listener_open(struct local *local, const struct conf_local *conf,
                         const struct conf_listen *cl, struct listener **out)
{
    struct listener *listener;
    int rc;

    listener = calloc(1, sizeof(*listener));
    if (!listener)
        return -ENOMEM;
    listener->local = local;
    listener->kind = cl->kind;
    listener->url = strdup(cl->url);
    if (!listener->url) {
        free(listener);
        return -ENOMEM;
    }
    if (cl->kind == CONF_LISTEN_TCP)
        rc = uv_tcp_init(local->loop, &listener->h.tcp);
    else
        rc = uv_pipe_init(local->loop, &listener->h.pipe, 0);
    if (rc < 0) {
        free(listener->url);
        free(listener);
        return rc;
    }
    local->live++;
    if (cl->kind == CONF_LISTEN_TCP)
        rc = listener_bind_tcp(listener, cl);
    else
        rc = listener_bind_unix(listener, conf, cl);
    if (rc < 0)
        goto err_after_init;
    rc = uv_listen(&listener->h.stream, 128, listener_connection_cb);
    if (rc < 0) {
        log_err("listener %s: cannot listen: %s", cl->url, uv_strerror(rc));
        goto err_after_init;
    }
    log_info("listening on %s", cl->url);
    *out = listener;
    return 0;

err_after_init:
    listener_close(listener);
    return rc;
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
    local->live = 1; /* close_handle */
    *out = local;
    return 0;
}

/* Bind every listener of @conf not already open; on failure close the ones
 * this call opened. New listeners are prepended to local->listeners. */
static int local_open_listeners(struct local *local, const struct conf *conf)
{
    struct listener *opened = NULL;
    int rc = 0;

    for (size_t i = 0; i < conf->local.listen_count; i++) {
        const struct conf_listen *cl = &conf->local.listen[i];
        struct listener *l, *found = NULL;

        for (l = local->listeners; l; l = l->next)
            if (strcmp(l->url, cl->url) == 0)
                found = l;
        if (found) {
            /* A reload may change local.socket_mode/socket_group. */
            if (found->path) {
                rc = unix_path_permissions(&conf->local, found->url, found->path);
                if (rc < 0)
                    goto err_close_opened;
            }
            found->keep = true;
            continue;
        }
        rc = listener_open(local, &conf->local, cl, &l);
        if (rc < 0)
            goto err_close_opened;
        l->keep = true;
        l->next = opened;
        opened = l;
    }
    while (opened) {
        struct listener *next = opened->next;
        opened->next = local->listeners;
        local->listeners = opened;
        opened = next;
    }
    return 0;

err_close_opened:
    while (opened) {
        struct listener *next = opened->next;
        listener_close(opened);
        opened = next;
    }
    for (struct listener *l = local->listeners; l; l = l->next)
        l->keep = false;
    return rc;
}

int local_start(struct local *local)
{
    if (local->closing)
        return -ECANCELED;
    return local_open_listeners(local, local->conf);
}

int local_reconfigure(struct local *local, const struct conf *conf)
{
    struct listener **pp;
    int rc;

    if (local->closing)
        return -ECANCELED;
    for (struct listener *l = local->listeners; l; l = l->next)
        l->keep = false;
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
    while (local->listeners) {
        struct listener *l = local->listeners;
        local->listeners = l->next;
        listener_close(l);
    }
}

static void local_close_handle_cb(uv_handle_t *handle)
{
    struct local *local = container_of(handle, struct local, close_handle);

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
        client_close(c, CLOSE_FLUSH, false, "server shutting down");
    /* Closed last and always asynchronous, so done_cb never runs from
     * inside local_close() even with no clients or listeners. */
    uv_close((uv_handle_t *)&local->close_handle, local_close_handle_cb);
}

void local_free(struct local *local)
{
    if (!local)
        return;
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
