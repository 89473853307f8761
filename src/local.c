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
 */
#include "local.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "access.h"
#include "activation.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "mqtt_codec.h"
#include "record.h"
#include "sm.h"
#include "topic.h"
#include "util.h"

/* Pending connections (accepted, CONNECT not complete; see "pending
 * connections" below): defaults when the conf leaves them at 0 (conf_local.c has
 * the same), the quiet time that ends a burst of drops and the longest burst
 * summarised in one log line, and the file descriptors kept free for
 * everything else (uplink sockets, spool segments, control clients). */
#define LOCAL_DEFAULT_MAX_PENDING      128
#define LOCAL_DEFAULT_PENDING_PER_UID  32
#define LOCAL_DEFAULT_CONNECT_DEADLINE 5000
#define LOCAL_DROP_QUIET_MS            1000
#define LOCAL_DROP_REPORT_MAX_MS       10000
#define LOCAL_FD_HEADROOM              64
/* listen(2) backlog: the kernel's ceiling (net.core.somaxconn caps it), as
 * systemd's Backlog= default. A flood must not fill the queue in front of
 * accept(): on a Unix socket a full queue fails connect(2) with EAGAIN at
 * once, so a client would never reach the pending-connection policy. */
#define LOCAL_LISTEN_BACKLOG SOMAXCONN
/* Connections accepted per listener per loop iteration. libuv accepts until
 * accept(2) says EAGAIN, so a flood that reconnects as fast as it is closed
 * would keep the loop in one listener callback for ever, and the CONNECT of a
 * real client, waiting to be read, with it. */
#define LOCAL_ACCEPT_BURST 32
/* How long a closing connection may take to flush its last packets (e.g. a
 * refusing CONNACK) before it is closed anyway. */
#define LOCAL_FLUSH_TIMEOUT_MS 2000
/* Output a client may have queued before it counts as a slow consumer. */
#define LOCAL_OUT_MAX_BYTES (1024 * 1024)
/* Inbound QoS 2 ids awaiting PUBREL, per session. Far below 65535. */
#define LOCAL_INFLIGHT_MAX 10000
/* Sessions of any kind (connected or persistent and away). */
#define LOCAL_SESSIONS_MAX 65536
/* Defaults when the conf leaves a limit at 0 (tests that build a conf by hand). */
#define LOCAL_DEFAULT_MAX_INFLIGHT     100
#define LOCAL_DEFAULT_MAX_QUEUED       1000
#define LOCAL_DEFAULT_MAX_QUEUED_BYTES (64u * 1024 * 1024)
/* Retained messages kept in memory (whole server). */
#define LOCAL_RETAINED_MAX 10000
/* The retained store: file in gateway.state_dir, how long changes are
 * batched before one write, and the largest file loaded at start-up. */
#define RETAINED_FILE     "retained.db"
#define RETAINED_MAGIC    "UPLKRTN2"
#define RETAINED_FLUSH_MS 200
#define RETAINED_FILE_MAX (1024u * 1024 * 1024)
/* Read granularity; the buffer grows to one whole packet when needed. */
#define LOCAL_READ_CHUNK 4096
/* Buffers above this are released when they become empty. */
#define LOCAL_BUF_KEEP 65536
/* Filters with this prefix are reported to the router (local.h). */
#define LOCAL_CLOUD_PREFIX "cloud/"
/* Refused publishes and subscriptions are reported here (local only). */
#define LOCAL_ERRORS_TOPIC "uplinkd/local/errors"

enum client_state {
    CLIENT_NEW,       /* accepted, waiting for CONNECT */
    CLIENT_CONNECTED, /* CONNACK 0 sent */
    CLIENT_CLOSING,   /* flushing and/or closing handles; ignored by fan-out */
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

/* Password check of a CONNECT (see client_check_access()). */
enum auth_state {
    AUTH_NONE,   /* no check done (none needed, or not yet) */
    AUTH_OK,     /* the password matched local.password_file */
    AUTH_FAILED, /* it did not, or the user is unknown */
};
struct auth_check;

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
    struct sm sm; /* enum client_state, see client_states */
    /* While pending (NEW, in local.pending): the listener it came in on
     * (NULL if that listener was closed by a reload) and when. */
    struct listener *listener;
    struct local_client *pending_prev, *pending_next;
    bool in_pending;
    uint64_t accepted_ms;            /* uv_now() at accept */
    bool quiet_close;                /* closed by the pending policy: counted, logged at debug */
    char peer[96];                   /* "127.0.0.1:5555" or "pid 12 uid 1000", for logs */
    char *id;                        /* NULL until CONNECT */
    enum conf_listen_kind kind;      /* the listener it came in on */
    struct access_identity identity; /* peer credentials; .username once logged in */
    char *username;                  /* authenticated username (identity.username) */
    struct auth_check *auth;         /* password check on the threadpool, or NULL */
    enum auth_state auth_state;
    uint16_t keepalive_s;

    uint8_t *rbuf; /* unparsed input */
    size_t rlen, rcap;
    size_t rneed; /* size of the packet being assembled, 0 if not yet known */

    struct out_buf pending; /* encoded, not yet handed to uv_write */
    struct out_buf writing; /* owned by the active uv_write */
    bool write_active;

    /* The session this connection uses (set by CONNECT). While the client is
     * CLOSING the session no longer points back (session->client is NULL)
     * but this pointer stays, so client_finish() can free a clean session
     * outside any subscription walk. NULL when a new connection took the
     * session over. */
    struct local_session *session;
    bool detached; /* test seam: no socket, output kept in pending */

    bool has_will;
    bool will_retain;
    uint8_t will_qos;
    char *will_topic;
    uint8_t *will_payload;
    size_t will_len;
    bool publish_will; /* decided when closing starts, acted on when freed */

    /* Deferred acknowledgements (publish_async_cb), in PUBLISH order. */
    struct local_ack *acks_head, *acks_tail;
    unsigned acks_pending; /* not yet done */
    bool acks_paused;      /* reading stopped: too many pending */
};

/* One deferred PUBACK/PUBREC (local.h publish_async_cb). Lives until both
 * local_publish_done() was called and it left its client's list; a client
 * that goes away orphans its entries (client NULL). */
struct local_ack {
    struct local_ack *next;
    struct local_client *client;
    uint16_t packet_id;
    uint8_t qos;
    bool done;
    int status;
};

/* Why a connection was closed before it completed CONNECT, for the
 * rate-limited report (local_drop_note()) and uplinkctl status. */
enum local_drop {
    DROP_EVICTED,     /* oldest pending on a listener whose budget was full */
    DROP_EVICTED_UID, /* oldest pending of a uid over local.max_pending_per_uid */
    DROP_REFUSED,     /* the newcomer: nothing evictable (all from the same burst) */
    DROP_NO_FDS,      /* file descriptors running out */
    DROP_DEADLINE,    /* no complete CONNECT within local.connect_deadline */
    DROP_MAX_CLIENTS, /* CONNACK 3: local.max_clients connected already */
    DROP_PROTOCOL,    /* a protocol error before CONNECT completed */
    DROP_ACCEPT,      /* accept(2) failed */
    DROP_KINDS
};

static const char *const local_drop_names[DROP_KINDS] = {
    [DROP_EVICTED] = "evicted",   [DROP_EVICTED_UID] = "evicted_uid",
    [DROP_REFUSED] = "refused",   [DROP_NO_FDS] = "no_fds",
    [DROP_DEADLINE] = "deadline", [DROP_MAX_CLIENTS] = "max_clients",
    [DROP_PROTOCOL] = "protocol", [DROP_ACCEPT] = "accept_failed",
};

struct listener {
    struct local *local;
    struct listener *next;
    size_t pending_count; /* its clients in local.pending */
    uint64_t accepts_ms;  /* uv_now() of the current accept burst */
    unsigned accepts;     /* accepted in it (LOCAL_ACCEPT_BURST) */
    bool deferred;        /* a connection waits in libuv for uv_accept() */
    /* Drops since the current report window began, and the first one's
     * peer and reason (local_drop_note()). */
    uint64_t drops[DROP_KINDS];
    char first_drop[192];
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
    bool extra; /* passed by systemd for no local.listen entry: kept across reloads */
};

enum msg_state {
    MSG_QUEUED,   /* waiting for the client or for room in the in-flight window */
    MSG_SENT,     /* PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2) */
    MSG_RELEASED, /* QoS 2: PUBREL sent, waiting for PUBCOMP */
};

/* An outbound QoS>0 message held by a session until acknowledged (§4.4). */
struct session_msg {
    struct session_msg *next;
    enum msg_state state;
    uint16_t packet_id; /* 0 while queued */
    uint8_t qos;
    bool retain;
    size_t size; /* accounted in local.queued_bytes */
    size_t topic_len;
    size_t len;
    uint8_t *payload; /* points into this allocation, after the topic */
    char topic[];
};

struct msg_list {
    struct session_msg *head, *tail;
    size_t count;
};

/* MQTT session state (§3.1.2.4), see the top of this file. */
struct local_session {
    struct local *local;
    struct local_session *prev, *next; /* in local.sessions while linked */
    bool linked;
    bool clean; /* clean session 1: ends with its connection */
    char *id;
    struct local_client *client; /* connected client, NULL while away or closing */
    struct msg_list inflight;    /* MSG_SENT / MSG_RELEASED, in send order */
    struct msg_list queue;       /* MSG_QUEUED, oldest first */
    struct idset inflight_ids;   /* packet ids of inflight */
    struct idset in_qos2;        /* received QoS 2, PUBREC sent, waiting for PUBREL */
    uint16_t next_packet_id;
    uint64_t dropped; /* messages dropped by the queue policy */
    bool drop_logged; /* one log line per overflow episode */
    /* Who last attached (a copy of client->identity, .username pointing at
     * the own copy): delivery checks its local.acl deny_subscribe entries
     * also while the session is away. */
    struct access_identity identity;
    char *username;
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
    size_t connected_count; /* clients in CONNECTED; local.max_clients bounds it */
    /* Pending connections (NEW and from a listener), oldest first; each
     * listener's budget is local.max_pending_connects. */
    struct local_client *pending_head, *pending_tail;
    size_t pending_count;
    uint64_t drops_total[DROP_KINDS]; /* since start, for status */
    uv_timer_t drop_timer;            /* ends a report window (local_drop_note()) */
    uv_timer_t accept_timer;          /* resumes deferred accepts next iteration */
    bool drop_window;                 /* drops counted and not yet logged */
    uint64_t drop_window_start_ms, drop_last_ms;
    unsigned fd_limit; /* RLIMIT_NOFILE (soft) at start/reload, 0 = unknown or unlimited */
    int reserve_fd;    /* kept open to be closed when accept(2) says EMFILE; -1 when used */
    size_t live;       /* listeners + clients + the close handle, until their close callbacks */
    uv_timer_t close_handle; /* never started; closed last so done_cb runs from the loop */
    struct topic_table subs; /* owners are struct local_session */
    struct local_session *sessions;
    size_t session_count;
    size_t queued_bytes;       /* all session_msg sizes, bounded by local.max_queued_bytes */
    uint64_t dropped_messages; /* dropped by the queue policy, all sessions */
    struct retained *retained;
    size_t retained_count;
    /* Retained store on disk (see "retained store" below). */
    uv_timer_t retained_timer; /* batches changes into one write */
    bool retained_loaded;
    bool retained_dirty;   /* changed since the last snapshot */
    bool retained_writing; /* a snapshot is being written on the threadpool */
    uint64_t generated_ids;
    struct activation activation; /* sockets passed by systemd, during local_start() */
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
static void client_acks_orphan(struct local_client *client);
static void session_free(struct local_session *session, bool notify);
static void retained_changed(struct local *local);
static void auth_check_cancel(struct auth_check *check);

/* A connection's states:
 *
 *     NEW --(CONNECT accepted, CONNACK 0)--> CONNECTED
 *      |                                        |
 *      +----------> CLOSING <-------------------+
 *
 * CLOSING is final: the handles are closing and fan-out skips the client. */
static const struct sm_state client_states[] = {
    [CLIENT_NEW] = {"NEW", SM_TO(CLIENT_CONNECTED) | SM_TO(CLIENT_CLOSING)},
    [CLIENT_CONNECTED] = {"CONNECTED", SM_TO(CLIENT_CLOSING)},
    [CLIENT_CLOSING] = {"CLOSING", 0},
};

static void client_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    const struct local_client *client = container_of(sm, struct local_client, sm);

    snprintf(buf, size, CLIENT_FMT, CLIENT_ARGS(client));
}

/* CONNECTED means CONNECT was accepted: the client has its id and session;
 * NEW means it is still counted as pending (a test client has no listener). */
static bool client_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct local_client *client = container_of(sm, struct local_client, sm);

    if (sm_state(sm) == CLIENT_CONNECTED && (client->id == NULL || client->session == NULL)) {
        snprintf(why, size, "connected without %s", client->id == NULL ? "an id" : "a session");
        return false;
    }
    return true;
}

static const struct sm_conf client_sm = {
    .states = client_states,
    .count = ARRAY_SIZE(client_states),
    .level = LOG_DEBUG,
    .describe = client_sm_describe,
    .invariant = client_sm_invariant,
};

static enum client_state client_state_of(const struct local_client *client)
{
    return (enum client_state)sm_state(&client->sm);
}

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

/* --- pending connections ------------------------------------------------------ */

/*
 * A connection is pending from accept until its CONNECT is answered; until
 * then nobody knows whether it is a client at all. An idle or slowloris
 * flood must not take the slots of real clients (issue 12), so:
 *  - local.max_clients counts only connected clients (CONNACK 0 sent);
 *  - pending connections have their own budget per listener
 *    (local.max_pending_connects) and per peer uid where the peer is
 *    identified (local.max_pending_per_uid, all listeners together; the uid
 *    is struct access_identity's, read at accept), so their file
 *    descriptors are bounded too;
 *  - a pending connection has local.connect_deadline from accept to a
 *    complete CONNECT; bytes that trickle in do not extend it;
 *  - when a budget is full the oldest pending connection that can be
 *    evicted is closed to make room, not the newcomer: a client that sends
 *    its CONNECT at once leaves the pending set within one read, so a flood
 *    only ever evicts itself. Never evicted: a connection with unread bytes
 *    (a CONNECT that came with it, not read yet) or whose CONNECT is
 *    complete and waiting for the password check. Older connections go
 *    before those of the current burst of accepts, unidentified peers before
 *    identified ones (those are already held to their uid's budget); see
 *    pending_victim(). Only when nothing is evictable is the newcomer closed;
 *  - at most LOCAL_ACCEPT_BURST accepts per listener per loop iteration, so
 *    the reads of what was accepted come next.
 * Every such close is counted and logged once per burst (local_drop_note()).
 */

static unsigned local_max_pending(const struct local *local)
{
    unsigned max = local->conf->local.max_pending_connects;
    return max ? max : LOCAL_DEFAULT_MAX_PENDING;
}

static unsigned local_max_pending_per_uid(const struct local *local)
{
    unsigned max = local->conf->local.max_pending_per_uid;
    return max ? max : LOCAL_DEFAULT_PENDING_PER_UID;
}

static unsigned local_connect_deadline_ms(const struct local *local)
{
    unsigned ms = local->conf->local.connect_deadline_ms;
    return ms ? ms : LOCAL_DEFAULT_CONNECT_DEADLINE;
}

static void pending_link(struct local_client *client, struct listener *listener)
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

static void local_drop_report(struct local *local)
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
static void local_drop_note(struct local *local, struct listener *listener, enum local_drop kind,
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

static void client_set_state(struct local_client *client, enum client_state to)
{
    enum client_state from = client_state_of(client);

    if (sm_move(&client->sm, to, NULL) < 0)
        return;
    if (from == CLIENT_NEW)
        pending_unlink(client);
    if (from == CLIENT_CONNECTED)
        client->local->connected_count--;
    if (to == CLIENT_CONNECTED)
        client->local->connected_count++;
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
    client_acks_orphan(client);
    /* §3.1.2.4: a clean session ends with its connection (freed here, not
     * in client_close(), which may run inside a subscription walk). */
    if (client->session && client->session->clean)
        session_free(client->session, true);
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
    /* A password check still queued need not run (uv_cancel fails, harmlessly,
     * once it is running); auth_after_work_cb frees it either way. */
    if (client->auth)
        auth_check_cancel(client->auth);
    client->publish_will = abnormal && client_state_of(client) == CLIENT_CONNECTED;
    /* From now on messages for the session wait in its queue (persistent)
     * or are dropped (clean): a closing connection sends nothing more. */
    if (client->session && client->session->client == client)
        client->session->client = NULL;
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

    snprintf(why, sizeof(why), "protocol error in %s: %s", what, reason);
    if (client_state_of(client) == CLIENT_NEW) {
        /* Before CONNECT: anyone can cause this, as often as they like. */
        local_drop_note(client->local, client->listener, DROP_PROTOCOL, client->peer, why);
        client->quiet_close = true;
    } else {
        log_warn(CLIENT_FMT ": protocol error in %s: %s; closing the connection",
                 CLIENT_ARGS(client), what, reason);
    }
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
static void client_flush(struct local_client *client)
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
static uint8_t *client_reserve(struct local_client *client, size_t len)
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

/* CONNACK 0 (§3.2.2.2: session present only when a session was resumed). */
static void client_send_connack_accepted(struct local_client *client, bool session_present)
{
    uint8_t buf[4];
    size_t len;

    if (mqtt_encode_connack(buf, sizeof(buf), session_present, MQTT_CONNACK_ACCEPTED, &len) == 0)
        client_send_bytes(client, buf, len);
}

/* Encode one PUBLISH into the output; a client that cannot take it is
 * closed by client_reserve() (slow consumer). */
static void client_write_publish(struct local_client *client, const char *topic, size_t topic_len,
                                 const void *payload, size_t len, uint8_t qos, bool retain,
                                 bool dup, uint16_t packet_id)
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

/* --- sessions (§3.1.2.4, §4.4) ------------------------------------------------- */

#define SESSION_FMT     "session %s"
#define SESSION_ARGS(s) (s)->id

static unsigned local_max_inflight(const struct local *local)
{
    unsigned max = local->conf->local.max_inflight;
    return max ? max : LOCAL_DEFAULT_MAX_INFLIGHT;
}

static unsigned local_max_queued(const struct local *local)
{
    unsigned max = local->conf->local.max_queued;
    return max ? max : LOCAL_DEFAULT_MAX_QUEUED;
}

static size_t local_max_queued_bytes(const struct local *local)
{
    size_t max = local->conf->local.max_queued_bytes;
    return max ? max : LOCAL_DEFAULT_MAX_QUEUED_BYTES;
}

static void msg_list_append(struct msg_list *list, struct session_msg *msg)
{
    msg->next = NULL;
    if (list->tail)
        list->tail->next = msg;
    else
        list->head = msg;
    list->tail = msg;
    list->count++;
}

static struct session_msg *msg_list_pop(struct msg_list *list)
{
    struct session_msg *msg = list->head;

    if (msg) {
        list->head = msg->next;
        if (!list->head)
            list->tail = NULL;
        list->count--;
        msg->next = NULL;
    }
    return msg;
}

static void msg_free(struct local *local, struct session_msg *msg)
{
    local->queued_bytes -= msg->size;
    free(msg);
}

static void msg_list_free(struct local *local, struct msg_list *list)
{
    struct session_msg *msg;

    while ((msg = msg_list_pop(list)))
        msg_free(local, msg);
}

static bool session_online(const struct local_session *session)
{
    return session->client && client_state_of(session->client) == CLIENT_CONNECTED;
}

/* §2.3.1: a non-zero id not used by another message in flight. */
static int session_alloc_id(struct local_session *session, uint16_t *out)
{
    /* Bounded: local.max_inflight <= 65535 ids are in use, so one is free. */
    for (unsigned tries = 0; tries < 65535; tries++) {
        uint16_t id = ++session->next_packet_id;
        if (id == 0)
            id = session->next_packet_id = 1;
        if (!idset_has(&session->inflight_ids, id)) {
            if (idset_add(&session->inflight_ids, id) < 0)
                return -ENOMEM;
            *out = id;
            return 0;
        }
    }
    return -ENOBUFS;
}

/* Give @msg (not in any list) a packet id, put it in flight and send it. */
static void session_send(struct local_session *session, struct session_msg *msg)
{
    if (session_alloc_id(session, &msg->packet_id) < 0) {
        log_warn(SESSION_FMT ": no packet id free; dropping a message to '%s'",
                 SESSION_ARGS(session), msg->topic);
        msg_free(session->local, msg);
        return;
    }
    msg->state = MSG_SENT;
    msg_list_append(&session->inflight, msg);
    client_write_publish(session->client, msg->topic, msg->topic_len, msg->payload, msg->len,
                         msg->qos, msg->retain, false, msg->packet_id);
}

/* Fill the in-flight window from the queue (stops when the client closes). */
static void session_pump(struct local_session *session)
{
    unsigned max = local_max_inflight(session->local);

    while (session_online(session) && session->queue.head && session->inflight.count < max)
        session_send(session, msg_list_pop(&session->queue));
    if (!session->queue.head)
        session->drop_logged = false;
}

static void session_drop_oldest(struct local_session *session, const char *limit)
{
    struct session_msg *msg = msg_list_pop(&session->queue);

    if (!msg)
        return;
    session->dropped++;
    session->local->dropped_messages++;
    if (!session->drop_logged) {
        log_warn(SESSION_FMT ": %s reached: dropping the oldest queued message (to '%s'); "
                             "%llu dropped for this session, %llu in all",
                 SESSION_ARGS(session), limit, msg->topic, (unsigned long long)session->dropped,
                 (unsigned long long)session->local->dropped_messages);
        session->drop_logged = true; /* again once the queue has drained */
    }
    msg_free(session->local, msg);
}

/* A message does not fit: a connected client is a slow consumer and goes
 * (its persistent session keeps the queue), then the oldest waiting message
 * makes room (the policy at the top of this file). */
static void session_overflow(struct local_session *session, const char *limit)
{
    if (session->client) {
        char why[160];
        log_warn(CLIENT_FMT ": slow consumer: %s reached (%zu messages in flight, %zu queued); "
                            "disconnecting",
                 CLIENT_ARGS(session->client), limit, session->inflight.count,
                 session->queue.count);
        snprintf(why, sizeof(why), "slow consumer (%s reached)", limit);
        client_close(session->client, CLOSE_ABORT, true, why);
    }
    session_drop_oldest(session, limit);
}

/* Queue a QoS>0 message for @session; sent at once when the window allows. */
static void session_enqueue(struct local_session *session, const char *topic, size_t topic_len,
                            const void *payload, size_t len, uint8_t qos, bool retain)
{
    struct local *local = session->local;
    size_t size = sizeof(struct session_msg) + topic_len + 1 + len;
    size_t max_bytes = local_max_queued_bytes(local);
    bool direct = session_online(session) && !session->queue.head &&
                  session->inflight.count < local_max_inflight(local);
    struct session_msg *msg;

    if (!direct && session->queue.count >= local_max_queued(local))
        session_overflow(session, "local.max_queued");
    while (local->queued_bytes + size > max_bytes && session->queue.head)
        session_overflow(session, "local.max_queued_bytes");
    if (!session->client && session->clean)
        return; /* its connection is closing: nothing will ever read it */
    if (local->queued_bytes + size > max_bytes) {
        session->dropped++;
        local->dropped_messages++;
        log_warn(SESSION_FMT ": local.max_queued_bytes (%zu) reached by all sessions together: "
                             "dropping a message to '%.*s'",
                 SESSION_ARGS(session), max_bytes, (int)topic_len, topic);
        return;
    }
    msg = malloc(size);
    if (!msg) {
        log_warn(SESSION_FMT ": out of memory: dropping a message to '%.*s'", SESSION_ARGS(session),
                 (int)topic_len, topic);
        return;
    }
    msg->next = NULL;
    msg->state = MSG_QUEUED;
    msg->packet_id = 0;
    msg->qos = qos;
    msg->retain = retain;
    msg->size = size;
    msg->topic_len = topic_len;
    msg->len = len;
    memcpy(msg->topic, topic, topic_len);
    msg->topic[topic_len] = '\0';
    msg->payload = (uint8_t *)msg->topic + topic_len + 1;
    if (len)
        memcpy(msg->payload, payload, len);
    local->queued_bytes += size;
    if (direct && session_online(session))
        session_send(session, msg);
    else
        msg_list_append(&session->queue, msg);
}

/* Deliver to a session: QoS 0 only to a connected client, QoS>0 through
 * the session's queue (kept while a persistent session is away). */
static void session_deliver(struct local_session *session, const char *topic, size_t topic_len,
                            const void *payload, size_t len, uint8_t qos, bool retain)
{
    if (qos == 0) {
        if (session_online(session))
            client_write_publish(session->client, topic, topic_len, payload, len, 0, retain, false,
                                 0);
        return;
    }
    session_enqueue(session, topic, topic_len, payload, len, qos, retain);
}

/* The in-flight message with @packet_id, unlinked when @unlink. */
static struct session_msg *session_inflight(struct local_session *session, uint16_t packet_id,
                                            bool unlink)
{
    struct session_msg *prev = NULL;

    for (struct session_msg *msg = session->inflight.head; msg; prev = msg, msg = msg->next) {
        if (msg->packet_id != packet_id)
            continue;
        if (unlink) {
            if (prev)
                prev->next = msg->next;
            else
                session->inflight.head = msg->next;
            if (session->inflight.tail == msg)
                session->inflight.tail = prev;
            session->inflight.count--;
            idset_del(&session->inflight_ids, packet_id);
        }
        return msg;
    }
    return NULL;
}

/* PUBACK, PUBREC or PUBCOMP from the client for one of our messages (§4.3). */
static void session_ack(struct local_client *client, uint8_t type, uint16_t packet_id)
{
    struct local_session *session = client->session;
    struct session_msg *msg = session_inflight(session, packet_id, false);
    bool done = false;

    switch (type) {
    case MQTT_PUBACK:
        done = msg && msg->qos == 1 && msg->state == MSG_SENT;
        break;
    case MQTT_PUBREC:
        /* §4.3.3: PUBREC -> PUBREL, also when the PUBREC is repeated. */
        if (msg && msg->qos == 2) {
            msg->state = MSG_RELEASED;
            client_send_ack(client, MQTT_PUBREL, packet_id);
            return;
        }
        break;
    case MQTT_PUBCOMP:
        done = msg && msg->state == MSG_RELEASED;
        break;
    }
    if (!done) {
        log_debug(CLIENT_FMT ": %s for unknown packet id %u", CLIENT_ARGS(client),
                  mqtt_packet_type_name(type), packet_id);
        return;
    }
    msg_free(session->local, session_inflight(session, packet_id, true));
    session_pump(session);
}

/* §4.4: on a resumed session re-send every unacknowledged PUBLISH with DUP
 * and every unanswered PUBREL, with their original packet ids, in order;
 * then continue with the queue. */
static void session_resume(struct local_session *session)
{
    for (struct session_msg *msg = session->inflight.head; msg && session_online(session);
         msg = msg->next) {
        if (msg->state == MSG_RELEASED)
            client_send_ack(session->client, MQTT_PUBREL, msg->packet_id);
        else
            client_write_publish(session->client, msg->topic, msg->topic_len, msg->payload,
                                 msg->len, msg->qos, msg->retain, true, msg->packet_id);
    }
    session_pump(session);
}

static struct local_session *session_find(struct local *local, const char *id)
{
    for (struct local_session *s = local->sessions; s; s = s->next)
        if (strcmp(s->id, id) == 0)
            return s;
    return NULL;
}

static void session_unlink(struct local_session *session)
{
    struct local *local = session->local;

    if (!session->linked)
        return;
    if (session->prev)
        session->prev->next = session->next;
    else
        local->sessions = session->next;
    if (session->next)
        session->next->prev = session->prev;
    session->prev = session->next = NULL;
    session->linked = false;
    local->session_count--;
}

/* Free a session. @notify: remove its subscriptions (telling the router
 * about the last subscriber of a cloud/ filter); false at teardown, where
 * the whole tree goes. Never call it from inside a subscription walk. */
static void session_free(struct local_session *session, bool notify)
{
    struct local *local = session->local;

    session_unlink(session);
    if (notify)
        topic_table_remove_owner(&local->subs, session, subs_last_cb, local);
    if (session->client)
        session->client->session = NULL;
    msg_list_free(local, &session->inflight);
    msg_list_free(local, &session->queue);
    idset_free(&session->inflight_ids);
    idset_free(&session->in_qos2);
    free(session->username);
    free(session->id);
    free(session);
}

/* The session now belongs to @client's identity. Returns 0 or -ENOMEM. */
static int session_take_identity(struct local_session *session, const struct local_client *client)
{
    char *username = NULL;

    if (client->username && !(username = strdup(client->username)))
        return -ENOMEM;
    free(session->username);
    session->username = username;
    session->identity = client->identity;
    session->identity.username = username;
    return 0;
}

/*
 * CONNECT accepted: give @client its session (§3.1.2.4). A clean CONNECT
 * discards any previous session of that id; a persistent one resumes the
 * previous persistent session (*present = true) or starts a new one. A
 * persistent session never changes hands: one left by another identity is
 * discarded, as its subscriptions were granted by local.acl to that
 * identity and its queue holds what that identity may read. Any other
 * connection with this id has already been closed (takeover).
 * Returns 0, -ENOMEM or -EUSERS (too many sessions).
 */
static int session_attach(struct local_client *client, bool clean, bool *present)
{
    struct local *local = client->local;
    struct local_session *session = session_find(local, client->id);
    bool discard = clean, handed_over = false;

    *present = false;
    if (session && !clean && !session->clean &&
        !access_identity_same(&session->identity, &client->identity)) {
        char was[160], now[160];
        access_identity_describe(&session->identity, was, sizeof(was));
        access_identity_describe(&client->identity, now, sizeof(now));
        log_notice(SESSION_FMT ": discarding the persistent session of %s: this CONNECT is "
                               "from %s, and a session never changes hands",
                   SESSION_ARGS(session), was, now);
        discard = handed_over = true; /* below, like one a clean CONNECT ends */
    }
    if (session && (discard || session->clean)) {
        /* Discarded. Still referenced by a closing connection? Then that
         * connection's client_finish() frees it (marked clean, unlinked). */
        bool referenced = false;
        for (struct local_client *c = local->clients; c && !referenced; c = c->next)
            referenced = c != client && c->session == session;
        session_unlink(session);
        if (referenced) {
            session->clean = true;
        } else {
            if (!session->clean && !handed_over)
                log_info(SESSION_FMT ": discarding the persistent session (clean session 1, "
                                     "§3.1.2.4)",
                         SESSION_ARGS(session));
            session_free(session, true);
        }
        session = NULL;
    }
    if (session) {
        if (session_take_identity(session, client) < 0)
            return -ENOMEM;
        for (struct local_client *c = local->clients; c; c = c->next) {
            if (c != client && c->session == session) {
                /* The old connection's QoS 2 ids whose PUBREC never went out
                 * must leave the session now, while it can still find them,
                 * so their re-sent PUBLISH is stored again (§4.3.3). */
                client_acks_orphan(c);
                c->session = NULL; /* the old connection no longer owns it */
            }
        }
        *present = true;
    } else {
        if (local->session_count >= LOCAL_SESSIONS_MAX) {
            log_warn(CLIENT_FMT ": refusing: already %d sessions", CLIENT_ARGS(client),
                     LOCAL_SESSIONS_MAX);
            return -EUSERS;
        }
        session = calloc(1, sizeof(*session));
        if (!session)
            return -ENOMEM;
        session->id = strdup(client->id);
        if (!session->id || session_take_identity(session, client) < 0) {
            free(session->id);
            free(session);
            return -ENOMEM;
        }
        session->local = local;
        session->clean = clean;
        session->next = local->sessions;
        if (local->sessions)
            local->sessions->prev = session;
        local->sessions = session;
        session->linked = true;
        local->session_count++;
    }
    session->client = client;
    client->session = session;
    return 0;
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
            retained_changed(local);
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
    retained_changed(local);
}

/* --- retained store ---------------------------------------------------------------
 *
 * Retained messages survive a daemon restart in <state_dir>/retained.db, a
 * snapshot of the whole set (the set is bounded by LOCAL_RETAINED_MAX), in
 * the record framing of the spool (record.h):
 *
 *   file header: "UPLKRTN2" | count (u64) | CRC-32C | 0
 *   count x record: seq 1..count, time 0, flags QoS | retain, topic, payload
 *
 * so one damaged retained message loses only itself: the reader skips to
 * the next valid record, logs the byte range, and keeps a copy of the bad
 * bytes in <state_dir>/damaged/. Changes are batched for RETAINED_FLUSH_MS,
 * then the snapshot is serialised on the loop thread and written on the
 * threadpool (never blocking the loop): temp file, fsync, rename over the
 * old file, fsync of the directory, so a crash leaves either the old or the
 * new file. At shutdown pending changes are written before local_close()
 * completes. The first format ("UPLKRTN1" | count u32 | records: topic
 * length u16, QoS u8, payload length u32, topic, payload | CRC-32 of all,
 * big-endian) is read once on upgrade and rewritten in the new one. A file
 * that is not a store at all is reported, renamed to retained.db.corrupt
 * and skipped; it never stops the daemon. */

struct retained_write {
    uv_work_t req;
    struct local *local;
    char *path; /* <state_dir>/retained.db */
    uint8_t *data;
    size_t len;
    int err;          /* errno of the failed step, 0 on success */
    const char *step; /* which step failed, for the log */
};

/* CRC-32 (IEEE) of the first format, read on upgrade only. */
static uint32_t legacy_crc32(uint32_t crc, const uint8_t *p, size_t len)
{
    static uint32_t table[256];

    if (!table[1]) /* built once, on the loop thread (the worker never calls this) */
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    while (len--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint32_t get_be(const uint8_t *p, int bytes)
{
    uint32_t value = 0;

    for (int i = 0; i < bytes; i++)
        value = value << 8 | p[i];
    return value;
}

static char *retained_path(const struct local *local, const char *suffix)
{
    char *path;

    if (asprintf(&path, "%s/%s%s", local->conf->state_dir, RETAINED_FILE, suffix) < 0)
        return NULL;
    return path;
}

/* Threadpool: write, fsync, rename, fsync the directory. */
static void retained_write_work_cb(uv_work_t *req)
{
    struct retained_write *w = container_of(req, struct retained_write, req);
    char *tmp = NULL, *dir = NULL, *slash;
    size_t off = 0;
    int fd;

    if (asprintf(&tmp, "%s.tmp", w->path) < 0) {
        tmp = NULL;
        w->err = ENOMEM, w->step = "allocating";
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        w->err = errno, w->step = "creating the temporary file";
        goto out;
    }
    while (off < w->len) {
        ssize_t n = write(fd, w->data + off, w->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            w->err = errno, w->step = "writing";
            break;
        }
        off += (size_t)n;
    }
    if (!w->err && fsync(fd) < 0)
        w->err = errno, w->step = "fsync";
    close(fd);
    if (!w->err && rename(tmp, w->path) < 0)
        w->err = errno, w->step = "renaming the temporary file";
    if (w->err) {
        unlink(tmp);
        goto out;
    }
    /* The rename is durable only once the directory is synced. */
    dir = strdup(w->path);
    slash = dir ? strrchr(dir, '/') : NULL;
    if (slash) {
        *slash = '\0';
        fd = open(*dir ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
            if (fsync(fd) < 0)
                w->err = errno, w->step = "fsync of the directory";
            close(fd);
        }
    }
out:
    free(dir);
    free(tmp);
}

static void retained_write_start(struct local *local);

static void retained_write_done_cb(uv_work_t *req, int status)
{
    struct retained_write *w = container_of(req, struct retained_write, req);
    struct local *local = w->local;

    local->retained_writing = false;
    if (status < 0)
        log_warn("retained store %s: write cancelled: %s", w->path, uv_strerror(status));
    else if (w->err)
        log_warn("retained store %s: %s failed: %s; retained messages changed since the last "
                 "successful write would be lost by a restart (check gateway.state_dir)",
                 w->path, w->step, strerror(w->err));
    else
        log_debug("retained store %s: wrote %zu bytes", w->path, w->len);
    free(w->path);
    free(w->data);
    free(w);
    if (local->retained_dirty) {
        if (local->closing)
            retained_write_start(local);
        else
            retained_changed(local); /* changed while writing: one more batch */
    }
    local_live_put(local);
}

/* Serialise the current set (loop thread) and hand it to the threadpool. */
static void retained_write_start(struct local *local)
{
    struct retained_write *w;
    size_t len = RECORD_FILE_HEADER_SIZE;
    uint8_t *p;
    uint64_t count = 0;
    int rc;

    if (local->retained_writing || !local->retained_dirty || !local->conf->state_dir)
        return;
    for (const struct retained *r = local->retained; r; r = r->next)
        len += record_size(r->topic_len, r->len);
    w = calloc(1, sizeof(*w));
    if (!w || !(w->data = malloc(len)) || !(w->path = retained_path(local, ""))) {
        log_warn("retained store: out of memory; will retry");
        if (w)
            free(w->data);
        free(w);
        return; /* still dirty: the next change or shutdown retries */
    }
    p = w->data + RECORD_FILE_HEADER_SIZE;
    for (const struct retained *r = local->retained; r; r = r->next) {
        record_encode(p, ++count, 0, (uint8_t)(r->qos | RECORD_FLAG_RETAIN), r->topic, r->topic_len,
                      r->payload, r->len);
        p += record_size(r->topic_len, r->len);
    }
    record_file_header(w->data, RETAINED_MAGIC, count);
    w->len = len;
    w->local = local;
    rc = uv_queue_work(local->loop, &w->req, retained_write_work_cb, retained_write_done_cb);
    if (rc < 0) {
        log_warn("retained store %s: cannot queue the write: %s", w->path, uv_strerror(rc));
        free(w->path);
        free(w->data);
        free(w);
        return;
    }
    local->retained_dirty = false;
    local->retained_writing = true;
    local->live++; /* local_close() completes only after this write */
}

static void retained_timer_cb(uv_timer_t *timer)
{
    retained_write_start(container_of(timer, struct local, retained_timer));
}

/* The set changed: write it within RETAINED_FLUSH_MS (one write per batch). */
static void retained_changed(struct local *local)
{
    local->retained_dirty = true;
    if (!local->conf->state_dir || !local->retained_loaded || local->closing ||
        local->retained_writing || uv_is_active((uv_handle_t *)&local->retained_timer))
        return;
    uv_timer_start(&local->retained_timer, retained_timer_cb, RETAINED_FLUSH_MS, 0);
}

/* The first format (upgrade): all or nothing; -EINVAL names the problem. */
static int retained_parse_v1(struct local *local, const uint8_t *data, size_t len, const char **why)
{
    size_t off = 12;
    uint32_t count;

    if (len < 16 || memcmp(data, "UPLKRTN1", 8) != 0)
        return *why = "not a retained store (bad header)", -EINVAL;
    if (get_be(data + len - 4, 4) != legacy_crc32(0, data, len - 4))
        return *why = "checksum mismatch (torn or damaged file)", -EINVAL;
    count = get_be(data + 8, 4);
    if (count > LOCAL_RETAINED_MAX)
        return *why = "more records than the server keeps", -EINVAL;
    for (uint32_t i = 0; i < count; i++) {
        size_t topic_len, payload_len;
        const char *topic;
        uint8_t qos;

        if (len - 4 - off < 7)
            return *why = "truncated record", -EINVAL;
        topic_len = get_be(data + off, 2);
        qos = data[off + 2];
        payload_len = get_be(data + off + 3, 4);
        off += 7;
        if (topic_len > len - 4 - off || payload_len > len - 4 - off - topic_len)
            return *why = "record longer than the file", -EINVAL;
        topic = (const char *)data + off;
        if (qos > 2 || payload_len == 0 || topic_name_check(topic, topic_len, NULL) < 0)
            return *why = "invalid record (QoS, empty payload or topic)", -EINVAL;
        retained_store(local, topic, topic_len, data + off + topic_len, payload_len, qos);
        off += topic_len + payload_len;
    }
    if (off != len - 4)
        return *why = "trailing bytes after the last record", -EINVAL;
    return 0;
}

/* Damaged bytes [from, to) of the store with @lost messages (-1: unknown)
 * in them: log and keep a copy for the operator. */
static void retained_damage(struct local *local, const char *path, const uint8_t *data, size_t from,
                            size_t to, long long lost, const char *why)
{
    char dir[4096], copy[4400];
    int rc = -ENAMETOOLONG;

    copy[0] = '\0';
    if (snprintf(dir, sizeof(dir), "%s/%s", local->conf->state_dir, RECORD_DAMAGED_DIR) <
        (int)sizeof(dir))
        rc = record_keep_damaged(dir, RETAINED_FILE, from, data + from, to - from, copy,
                                 sizeof(copy));
    if (rc < 0)
        copy[0] = '\0';
    if (lost >= 0)
        log_warn("retained store %s is damaged at bytes %zu..%zu (%zu byte(s), %s): %lld retained "
                 "message(s) lost, the others are kept%s%s",
                 path, from, to - 1, to - from, why, lost,
                 copy[0] ? "; damaged bytes kept in " : "", copy);
    else
        log_warn("retained store %s is damaged at bytes %zu..%zu (%zu byte(s), %s): the messages "
                 "in them are lost, the others are kept%s%s",
                 path, from, to - 1, to - from, why, copy[0] ? "; damaged bytes kept in " : "",
                 copy);
}

/* Load the file into an empty set. Damage loses only the records it covers
 * (*@rewrite: write the good set back). -EINVAL: not a store at all. */
static int retained_parse(struct local *local, const char *path, const uint8_t *data, size_t len,
                          bool *rewrite, const char **why)
{
    struct record_scan scan;
    struct record rec;
    enum record_scan_result result;
    uint64_t count = 0;
    size_t loaded = 0;
    bool header_ok;

    *rewrite = false;
    if (len >= 8 && memcmp(data, "UPLKRTN1", 8) == 0) {
        *rewrite = true; /* the first format: upgrade */
        return retained_parse_v1(local, data, len, why);
    }
    if (len < RECORD_FILE_HEADER_SIZE)
        return *why = "not a retained store (bad header)", -EINVAL;
    header_ok = record_file_header_ok(data, len, RETAINED_MAGIC, &count);
    record_scan_init(&scan, data, len, RECORD_FILE_HEADER_SIZE, 1);
    while ((result = record_scan_next(&scan, &rec)) != RECORD_SCAN_END) {
        if (result == RECORD_SCAN_TORN) {
            retained_damage(local, path, data, scan.bad_from, scan.bad_to,
                            header_ok && count > scan.last_seq ? (long long)(count - scan.last_seq)
                                                               : -1,
                            scan.why);
            *rewrite = true;
            break;
        }
        if (result == RECORD_SCAN_DAMAGED) {
            retained_damage(local, path, data, scan.bad_from, scan.bad_to,
                            (long long)(scan.lost_last - scan.lost_first + 1), scan.why);
            *rewrite = true;
        }
        if (rec.payload_len == 0 ||
            topic_name_check((const char *)rec.topic, rec.topic_len, NULL) < 0) {
            log_warn("retained store %s: skipping an invalid record (seq %" PRIu64
                     ": empty payload or bad topic)",
                     path, rec.seq);
            *rewrite = true;
            continue;
        }
        retained_store(local, (const char *)rec.topic, rec.topic_len, rec.payload, rec.payload_len,
                       rec.flags & RECORD_FLAG_QOS_MASK);
        loaded++;
    }
    if (!header_ok) {
        if (loaded == 0)
            return *why = "not a retained store (bad header)", -EINVAL;
        retained_damage(local, path, data, 0, RECORD_FILE_HEADER_SIZE, 0, "damaged file header");
        *rewrite = true;
    }
    return 0;
}

/* Start-up, before the listeners bind: load <state_dir>/retained.db. A bad
 * file is reported and moved aside; the server starts without it. */
static bool retained_load(struct local *local)
{
    bool rewrite = false;
    char *path, *data = NULL;
    const char *why = NULL;
    size_t len = 0;
    int rc;

    if (!local->conf->state_dir)
        return false;
    path = retained_path(local, "");
    if (!path)
        return false;
    rc = util_read_file(path, RETAINED_FILE_MAX, &data, &len);
    if (rc == -ENOENT) {
        free(path);
        return false;
    }
    if (rc < 0) {
        log_err("retained store %s: cannot read: %s; starting without retained messages", path,
                strerror(-rc));
    } else if (retained_parse(local, path, (const uint8_t *)data, len, &rewrite, &why) < 0) {
        char *aside = retained_path(local, ".corrupt");

        log_err("retained store %s is corrupt: %s; starting without retained messages and "
                "keeping the file as %s for inspection",
                path, why, aside ? aside : "(out of memory)");
        if (aside && rename(path, aside) < 0)
            log_warn("retained store: cannot rename %s: %s", path, strerror(errno));
        free(aside);
        /* Drop whatever was loaded before the bad record: all or nothing. */
        while (local->retained) {
            struct retained *r = local->retained;
            local->retained = r->next;
            free(r->payload);
            free(r);
        }
        local->retained_count = 0;
        rewrite = false;
    } else {
        log_info("retained store %s: loaded %zu retained messages", path, local->retained_count);
    }
    local->retained_dirty = false;
    free(data);
    free(path);
    return rewrite;
}

struct dispatch {
    const char *topic;
    size_t topic_len;
    const void *payload;
    size_t len;
    uint8_t qos;
};

/* A granted wildcard subscription meets a local.acl deny_subscribe topic:
 * that message is not for this session (access_delivery_denied()). */
static bool session_delivery_denied(const struct local_session *session, const char *topic,
                                    size_t topic_len)
{
    if (!access_delivery_denied(&session->local->conf->local, &session->identity, topic, topic_len))
        return false;
    log_debug(SESSION_FMT ": not delivering '%.*s': local.acl deny_subscribe",
              SESSION_ARGS(session), (int)topic_len, topic);
    return true;
}

static void dispatch_match_cb(void *arg, void *owner, uint8_t sub_qos)
{
    const struct dispatch *d = arg;
    struct local_session *session = owner;

    if (session_delivery_denied(session, d->topic, d->topic_len))
        return;

    /* §3.3.5: delivered at min(granted QoS, message QoS); §3.3.1-9: RETAIN 0
     * on messages that match an established subscription. */
    session_deliver(session, d->topic, d->topic_len, d->payload, d->len,
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

    if (client_state_of(client) == CLIENT_NEW) {
        snprintf(why, sizeof(why), "no complete CONNECT within local.connect_deadline (%u ms)",
                 local_connect_deadline_ms(client->local));
        local_drop_note(client->local, client->listener, DROP_DEADLINE, client->peer, why);
        client->quiet_close = true;
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
    if (client_state_of(client) == CLIENT_CONNECTED && client->keepalive_s)
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
        if (c != except && client_state_of(c) == CLIENT_CONNECTED && strcmp(c->id, id) == 0)
            return c;
    return NULL;
}

/* --- identity and access (access.h) -------------------------------------------- */

static void client_handle_packet(struct local_client *client, const uint8_t *data, size_t len);
static void client_process_input(struct local_client *client);
static void client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
static void client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

/* A password check on the libuv threadpool: PBKDF2 is slow on purpose and
 * must not stall the loop. It holds a reference on the client (open_handles)
 * so the client outlives it, and a copy of everything it reads, so a reload
 * that frees the conf meanwhile does not matter. */
struct auth_check {
    uv_work_t req;
    struct local_client *client;
    struct access_passwd_entry entry; /* .user unused (NULL) */
    bool known_user;
    bool ok;
    uint8_t *password;
    size_t password_len;
    uint8_t *packet; /* the CONNECT, handled again once the check is done */
    size_t packet_len;
};

static void auth_check_free(struct auth_check *check)
{
    if (check->password) {
        explicit_bzero(check->password, check->password_len);
        free(check->password);
    }
    free(check->packet);
    explicit_bzero(&check->entry, sizeof(check->entry));
    free(check);
}

static void auth_check_cancel(struct auth_check *check)
{
    uv_cancel((uv_req_t *)&check->req);
}

static void auth_work_cb(uv_work_t *req)
{
    struct auth_check *check = container_of(req, struct auth_check, req);

    check->ok = access_passwd_verify(check->known_user ? &check->entry : NULL, check->password,
                                     check->password_len);
    /* PBKDF2 left OpenSSL state (error queue) in this threadpool thread;
     * libuv's threads outlive OPENSSL_cleanup(), so release it now
     * (valgrind "definitely lost"; see conn_work_cb in uplink.c). */
    OPENSSL_thread_stop();
}

static void auth_after_work_cb(uv_work_t *req, int status)
{
    struct auth_check *check = container_of(req, struct auth_check, req);
    struct local_client *client = check->client;

    client->auth = NULL;
    if (--client->open_handles == 0) {
        /* Closed while the check ran; the handles are already gone. */
        auth_check_free(check);
        client_finish(client);
        return;
    }
    if (client_state_of(client) == CLIENT_CLOSING) {
        auth_check_free(check);
        return;
    }
    client->auth_state = status == 0 && check->ok ? AUTH_OK : AUTH_FAILED;
    /* Second pass: client_check_access() now knows the answer. */
    client_handle_packet(client, check->packet, check->packet_len);
    auth_check_free(check);
    if (client_state_of(client) == CLIENT_CLOSING)
        return;
    if (uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb) < 0) {
        client_close(client, CLOSE_ABORT, true, "cannot read after authentication");
        return;
    }
    client_process_input(client); /* packets that came right behind CONNECT */
}

static void client_refuse(struct local_client *client, uint8_t code, const char *why)
{
    char who[160];

    access_identity_describe(&client->identity, who, sizeof(who));
    log_warn(CLIENT_FMT ": refusing CONNECT with CONNACK %u: %s (%s)", CLIENT_ARGS(client), code,
             why, who);
    client_send_connack(client, code);
    client_close(client, CLOSE_FLUSH, false, why);
}

/* Queue the password check of @c; the client stops reading until it is done
 * (input behind the CONNECT stays in rbuf). Returns 1, or -1 after refusing. */
static int client_start_auth_check(struct local_client *client, const struct mqtt_connect *c,
                                   const uint8_t *packet, size_t len)
{
    const struct access_passwd_entry *entry = access_passwords_find(
        client->local->conf->local.passwords, (const char *)c->username.data, c->username.len);
    struct auth_check *check = calloc(1, sizeof(*check));

    if (check) {
        check->client = client;
        check->known_user = entry != NULL;
        if (entry) {
            check->entry = *entry;
            check->entry.user = NULL;
        }
        check->password_len = c->password.len;
        check->password = malloc(c->password.len ? c->password.len : 1);
        check->packet = malloc(len);
        check->packet_len = len;
    }
    if (!check || !check->password || !check->packet) {
        if (check)
            auth_check_free(check);
        client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "out of memory");
        return -1;
    }
    memcpy(check->password, c->password.data, c->password.len);
    memcpy(check->packet, packet, len);
    if (uv_queue_work(client->local->loop, &check->req, auth_work_cb, auth_after_work_cb) < 0) {
        auth_check_free(check);
        client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "cannot queue the password check");
        return -1;
    }
    client->auth = check;
    client->open_handles++;
    uv_read_stop(&client->conn.stream);
    /* The CONNECT is complete: local.connect_deadline is met. The check
     * ends by itself; meanwhile the connection stays pending, not evictable. */
    uv_timer_stop(&client->timer);
    return 1;
}

/*
 * Credentials and will of a CONNECT, before handle_connect() (§3.1.4: the
 * server authenticates the client before acting on the CONNECT). With
 * local.password_file set, TCP clients must log in: no username gives
 * CONNACK 5, a wrong one or a wrong password CONNACK 4 (§3.2.2.3). Unix
 * socket peers are known by their uid and need no password; credentials they
 * do send are checked all the same, so a username is only ever one that was
 * proven. Returns 0 to go on, 1 while a password check runs (the packet is
 * handled again afterwards), -1 after refusing the connection.
 */
static int client_check_access(struct local_client *client, const struct mqtt_connect *c,
                               const uint8_t *packet, size_t len)
{
    const struct conf_local *conf = &client->local->conf->local;
    int rule;

    if (client->auth_state == AUTH_FAILED) {
        client_refuse(client, MQTT_CONNACK_BAD_CREDENTIALS, "wrong username or password");
        return -1;
    }
    if (client->auth_state == AUTH_NONE && conf->passwords && c->has_username) {
        if (!c->has_password) {
            client_refuse(client, MQTT_CONNACK_BAD_CREDENTIALS, "username without a password");
            return -1;
        }
        return client_start_auth_check(client, c, packet, len);
    }
    if (client->auth_state == AUTH_NONE && conf->passwords && client->kind == CONF_LISTEN_TCP) {
        client_refuse(client, MQTT_CONNACK_NOT_AUTHORIZED,
                      "no username and password, which this TCP listener requires "
                      "(local.password_file is set)");
        return -1;
    }
    if (client->auth_state == AUTH_OK && !client->username) {
        client->username = slice_strdup(&c->username);
        if (!client->username) {
            client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "out of memory");
            return -1;
        }
        client->identity.username = client->username;
    } else if (c->has_username && !conf->passwords) {
        log_debug(CLIENT_FMT ": ignoring the username: no local.password_file to check it against",
                  CLIENT_ARGS(client));
    }
    /* The will is published on the client's behalf later: the ACL decides
     * now, while the client can still be told (mosquitto does the same). */
    if (c->will &&
        access_acl_check(conf, &client->identity, ACCESS_PUBLISH, (const char *)c->will_topic.data,
                         c->will_topic.len, &rule) < 0) {
        client_refuse(client, MQTT_CONNACK_NOT_AUTHORIZED,
                      rule < 0 ? "will topic not allowed: no local.acl rule selects this client"
                               : "will topic not allowed by local.acl");
        return -1;
    }
    return 0;
}

/* Log a refused PUBLISH or SUBSCRIBE and tell local subscribers of
 * LOCAL_ERRORS_TOPIC, as JSON. */
static void client_report_denied(struct local_client *client, const char *action, const char *topic,
                                 size_t len, int rule, int rc)
{
    struct local *local = client->local;
    struct json_buf json;
    char who[160], reason[96], *copy;

    access_identity_describe(&client->identity, who, sizeof(who));
    if (rule < 0)
        snprintf(reason, sizeof(reason), "no local.acl rule selects this client");
    else if (rc == -EPERM)
        snprintf(reason, sizeof(reason), "denied by local.acl[%d].deny_%s", rule, action);
    else
        snprintf(reason, sizeof(reason), "not allowed by local.acl[%d]", rule);
    log_warn(CLIENT_FMT ": %s to '%.*s' denied: %s (%s)", CLIENT_ARGS(client), action,
             (int)(len > 200 ? 200 : len), topic, reason, who);
    copy = strndup(topic, len);
    json_buf_init(&json);
    json_append_raw(&json, "{\"error\":\"access denied\",\"action\":");
    json_append_string(&json, action);
    json_append_raw(&json, ",\"topic\":");
    json_append_string(&json, copy ? copy : "?");
    json_append_raw(&json, ",\"client_id\":");
    json_append_string(&json, client->id);
    json_append_raw(&json, ",\"identity\":");
    json_append_string(&json, who);
    json_append_raw(&json, ",\"reason\":");
    json_append_string(&json, reason);
    json_append_raw(&json, "}");
    if (!json.failed)
        local_dispatch(local, LOCAL_ERRORS_TOPIC, strlen(LOCAL_ERRORS_TOPIC), json.data, json.len,
                       0, false);
    json_buf_deinit(&json);
    free(copy);
}

/*
 * §3.3.5: a server that does not authorize a PUBLISH "has no way of informing
 * that Client. It MUST either make a positive acknowledgement, according to
 * the normal QoS rules, or close the Network Connection" [MQTT-3.3.5-2].
 * uplinkd acknowledges (PUBACK, or PUBREC then PUBCOMP for QoS 2) and drops
 * the message: closing would make the client re-send it for ever.
 */
static bool client_publish_denied(struct local_client *client, const struct mqtt_publish *p)
{
    int rule, rc;

    rc = access_acl_check(&client->local->conf->local, &client->identity, ACCESS_PUBLISH,
                          (const char *)p->topic.data, p->topic.len, &rule);
    if (rc == 0)
        return false;
    client_report_denied(client, "publish", (const char *)p->topic.data, p->topic.len, rule, rc);
    if (p->qos == 1)
        client_send_ack(client, MQTT_PUBACK, p->packet_id);
    else if (p->qos == 2)
        client_send_ack(client, MQTT_PUBREC, p->packet_id);
    return true;
}

/* §3.9.3: a refused filter gets return code 0x80 in SUBACK. */
static bool client_subscribe_denied(struct local_client *client, const char *filter, size_t len)
{
    int rule, rc;

    rc = access_acl_check(&client->local->conf->local, &client->identity, ACCESS_SUBSCRIBE, filter,
                          len, &rule);
    if (rc == 0)
        return false;
    client_report_denied(client, "subscribe", filter, len, rule, rc);
    return true;
}

static void handle_connect(struct local_client *client, const struct mqtt_connect *c)
{
    struct local *local = client->local;
    struct local_client *old;
    bool session_present = false;

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
    /* Only connected clients count against local.max_clients, so pending
     * connections cannot take their slots; §3.2.2.3: CONNACK 3, server
     * unavailable. Counted and logged per burst like the other drops. */
    if (local->connected_count >= local->conf->local.max_clients) {
        char why[96];
        snprintf(why, sizeof(why), "local.max_clients (%u) reached",
                 local->conf->local.max_clients);
        local_drop_note(local, client->listener, DROP_MAX_CLIENTS, client->peer, why);
        client->quiet_close = true;
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, why);
        return;
    }
    if (session_attach(client, c->clean_session, &session_present) < 0) {
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, "no session available");
        return;
    }
    client->keepalive_s = c->keepalive_s;
    client_set_state(client, CLIENT_CONNECTED);
    client_send_connack_accepted(client, session_present);
    uv_timer_stop(&client->timer);
    client_arm_keepalive(client);
    log_info(CLIENT_FMT ": connected (keepalive %u s, clean session %d, session present %d, "
                        "%zu messages in flight and %zu queued)",
             CLIENT_ARGS(client), client->keepalive_s, c->clean_session, session_present,
             client->session->inflight.count, client->session->queue.count);
    session_resume(client->session);
}

/* --- deferred acknowledgements (local.h publish_async_cb) --------------------- */

static void client_ack_append(struct local_client *client, struct local_ack *ack)
{
    if (client->acks_tail)
        client->acks_tail->next = ack;
    else
        client->acks_head = ack;
    client->acks_tail = ack;
    if (!ack->done && ++client->acks_pending >= LOCAL_ACKS_PENDING_MAX && !client->acks_paused &&
        !client->detached) {
        /* Backpressure: the spool is slower than this client (or full with
         * overflow: block); stop reading until half the acks are done. */
        client->acks_paused = true;
        uv_read_stop(&client->conn.stream);
        log_debug(CLIENT_FMT ": %u acknowledgements pending; pausing input", CLIENT_ARGS(client),
                  client->acks_pending);
    } else if (!ack->done && client->acks_pending >= LOCAL_ACKS_PENDING_MAX) {
        client->acks_paused = true;
    }
}

/* Send the acknowledgements that are due, in order; a failed one closes. */
static void client_acks_pump(struct local_client *client)
{
    struct local_ack *ack;

    while ((ack = client->acks_head) != NULL && ack->done &&
           client_state_of(client) != CLIENT_CLOSING) {
        client->acks_head = ack->next;
        if (!client->acks_head)
            client->acks_tail = NULL;
        if (ack->status < 0) {
            char why[160];
            log_warn(CLIENT_FMT
                     ": QoS %u message (packet id %u) could not be stored (%s); not "
                     "acknowledging it, closing the connection so the client re-sends it",
                     CLIENT_ARGS(client), ack->qos, ack->packet_id, strerror(-ack->status));
            snprintf(why, sizeof(why), "a QoS %u message could not be stored: %s", ack->qos,
                     strerror(-ack->status));
            if (ack->qos == 2 && client->session)
                idset_del(&client->session->in_qos2, ack->packet_id);
            free(ack);
            client_close(client, CLOSE_ABORT, true, why);
            return;
        }
        client_send_ack(client, ack->qos == 1 ? MQTT_PUBACK : MQTT_PUBREC, ack->packet_id);
        free(ack);
    }
    if (client->acks_paused && client->acks_pending <= LOCAL_ACKS_PENDING_MAX / 2 &&
        client_state_of(client) == CLIENT_CONNECTED) {
        client->acks_paused = false;
        if (!client->detached &&
            uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb) < 0) {
            client_close(client, CLOSE_ABORT, true, "cannot resume reading");
            return;
        }
        client_process_input(client); /* what was read before the pause */
    }
}

/* The client is going away: its pending entries are orphaned (freed by
 * local_publish_done()), finished ones freed. A QoS 2 id whose PUBREC never
 * went out is forgotten so the re-sent PUBLISH is stored again (§4.3.3). */
static void client_acks_orphan(struct local_client *client)
{
    struct local_ack *ack, *next;

    for (ack = client->acks_head; ack; ack = next) {
        next = ack->next;
        if (ack->qos == 2 && client->session)
            idset_del(&client->session->in_qos2, ack->packet_id);
        if (ack->done) {
            free(ack);
        } else {
            ack->client = NULL;
            ack->next = NULL;
        }
    }
    client->acks_head = client->acks_tail = NULL;
    client->acks_pending = 0;
}

void local_publish_done(struct local *local, struct local_ack *ack, int status)
{
    struct local_client *client = ack->client;

    if (!client) {
        free(ack);
        return;
    }
    ack->done = true;
    ack->status = status;
    client->acks_pending--;
    client_acks_pump(client);
}

static void handle_publish(struct local_client *client, const struct mqtt_publish *p)
{
    struct local *local = client->local;
    struct local_ack *ack = NULL;
    char *topic;
    int rc = 0;

    if (client_publish_denied(client, p))
        return;
    if (p->qos == 2) {
        /* §4.3.3 (method: deliver on PUBLISH, remember the id until PUBREL):
         * a re-sent PUBLISH with a remembered id is not delivered again. */
        struct idset *in_qos2 = &client->session->in_qos2;

        if (idset_has(in_qos2, p->packet_id)) {
            client_send_ack(client, MQTT_PUBREC, p->packet_id);
            return;
        }
        if (in_qos2->count >= LOCAL_INFLIGHT_MAX) {
            client_protocol_error(client, "PUBLISH", "too many QoS 2 messages awaiting PUBREL");
            return;
        }
        if (idset_add(in_qos2, p->packet_id) < 0) {
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
    if (local->hooks.publish_async_cb && p->qos > 0) {
        ack = calloc(1, sizeof(*ack));
        if (!ack) {
            free(topic);
            client_close(client, CLOSE_ABORT, true, "out of memory");
            return;
        }
        ack->client = client;
        ack->packet_id = p->packet_id;
        ack->qos = p->qos;
        rc = local->hooks.publish_async_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                           p->payload.len, p->qos, p->retain, ack);
    } else if (local->hooks.publish_async_cb) {
        rc = local->hooks.publish_async_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                           p->payload.len, p->qos, p->retain, NULL);
    } else if (local->hooks.publish_cb) {
        rc = local->hooks.publish_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                     p->payload.len, p->qos, p->retain);
    }
    if (ack && (rc == LOCAL_PUBLISH_PENDING || (rc == 0 && client->acks_head))) {
        /* Acknowledged later, or now but behind pending ones (§4.6 order). */
        ack->done = rc == 0;
        client_ack_append(client, ack);
        local_dispatch(local, topic, p->topic.len, p->payload.data, p->payload.len, p->qos,
                       p->retain);
        free(topic);
        if (rc == 0)
            client_acks_pump(client);
        return;
    }
    free(ack);
    if (rc > 0)
        rc = 0;
    if (rc < 0 && p->qos > 0) {
        char why[160];
        log_warn(CLIENT_FMT
                 ": QoS %u message to '%s' not accepted by the router (%s); not "
                 "acknowledging it, closing the connection so the client re-sends it later",
                 CLIENT_ARGS(client), p->qos, topic, strerror(-rc));
        snprintf(why, sizeof(why), "router refused a QoS %u message: %s", p->qos, strerror(-rc));
        if (p->qos == 2)
            idset_del(&client->session->in_qos2, p->packet_id);
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
        if (topic_match(filter, len, r->topic, r->topic_len) &&
            !session_delivery_denied(client->session, r->topic, r->topic_len))
            /* §3.3.1-8: RETAIN 1 for messages sent because of a new subscription. */
            session_deliver(client->session, r->topic, r->topic_len, r->payload, r->len,
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
        } else if (client_subscribe_denied(client, f, filter.len)) {
            codes[i] = MQTT_SUBACK_FAILURE;
        } else if (topic_table_add(&local->subs, client->session, f, filter.len, qos, &first) < 0) {
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

        if (topic_table_remove(&local->subs, client->session, f, filter.len, &last) < 0)
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
    if (rc == -EPROTONOSUPPORT && client_state_of(client) == CLIENT_NEW) {
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

    if (client_state_of(client) == CLIENT_NEW && pkt.type != MQTT_CONNECT) {
        /* §3.1.0-1: CONNECT must be the first packet. */
        client_protocol_error(client, mqtt_packet_type_name(pkt.type),
                              "first packet is not CONNECT (§3.1.0-1)");
        return;
    }
    switch (pkt.type) {
    case MQTT_CONNECT:
        if (client_state_of(client) != CLIENT_NEW)
            client_protocol_error(client, "CONNECT", "second CONNECT (§3.1.0-2)");
        else if (client_check_access(client, &pkt.u.connect, data, len) == 0)
            handle_connect(client, &pkt.u.connect);
        break;
    case MQTT_PUBLISH:
        handle_publish(client, &pkt.u.publish);
        break;
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBCOMP:
        session_ack(client, pkt.type, pkt.u.packet_id);
        break;
    case MQTT_PUBREL:
        /* §4.3.3: QoS 2 receiver: forget the id, answer PUBCOMP (also for an
         * id we no longer know: the sender is retrying after a lost PUBCOMP). */
        idset_del(&client->session->in_qos2, pkt.u.packet_id);
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
    while (client_state_of(client) != CLIENT_CLOSING && !client->auth && !client->acks_paused &&
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

    if (nread == 0 || client_state_of(client) == CLIENT_CLOSING)
        return;
    if (nread < 0) {
        char why[128];
        if (nread == UV_EOF)
            snprintf(why, sizeof(why), "connection closed by the client without DISCONNECT");
        else
            snprintf(why, sizeof(why), "read failed: %s", uv_strerror((int)nread));
        /* Anyone can open and close connections as fast as they like: before
         * CONNECT that is not worth a log line each. */
        client->quiet_close = client_state_of(client) == CLIENT_NEW;
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
    client->kind = kind;
    if (kind == CONF_LISTEN_TCP) {
        struct sockaddr_storage ss;
        int len = sizeof(ss);
        char host[64];
        struct sockaddr_storage own;
        int own_len = sizeof(own);
        const struct conf_local *conf = &client->local->conf->local;
        char why[160];

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
        /* A loopback peer is a local process: sock_diag names its uid, so
         * local.acl uid/gid rules hold over TCP as on the Unix socket. */
        if (uv_tcp_getsockname(&client->conn.tcp, (struct sockaddr *)&own, &own_len) < 0) {
            snprintf(why, sizeof(why), "cannot read the connection's own address");
        } else if (access_tcp_peer_identity((struct sockaddr *)&own, (struct sockaddr *)&ss,
                                            access_acl_selects_gids(conf), &client->identity, why,
                                            sizeof(why)) == 0) {
            why[0] = '\0';
        }
        if (why[0] && access_acl_selects_ids(conf, NULL))
            log_info("TCP connection from %s: peer not identified (%s); only local.acl rules "
                     "without uid/gid apply to it",
                     client->peer, why);
    } else {
        /* Unix-socket clients are named by their credentials (SO_PEERCRED),
         * which local.acl rules select by uid and gid. */
        uv_os_fd_t fd;

        if (uv_fileno(&client->conn.handle, &fd) == 0 &&
            access_peer_identity(fd, &client->identity) == 0)
            snprintf(client->peer, sizeof(client->peer), "pid %ld uid %lu",
                     (long)client->identity.pid, (unsigned long)client->identity.uid);
        else
            snprintf(client->peer, sizeof(client->peer), "unix");
    }
}

/* A new client joins the list with its connection and timer handles open
 * (open_handles counts what close callbacks must still see). */
static void client_link(struct local *local, struct local_client *client)
{
    client->open_handles = 2;
    sm_init(&client->sm, &client_sm, CLIENT_NEW);
    client->next = local->clients;
    if (local->clients)
        local->clients->prev = client;
    local->clients = client;
    local->client_count++;
    local->live++;
}

/* Bytes the kernel holds for @client that were not read yet: typically a
 * CONNECT that arrived with the connection, in the same burst of accepts. */
static bool pending_has_unread(const struct local_client *client)
{
    uv_os_fd_t fd;
    int n = 0;

    return uv_fileno(&client->conn.handle, &fd) == 0 && ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

/*
 * The pending connection to evict for a newcomer: of @uid when not NULL (any
 * listener), else on @on (any listener when NULL). Never one whose CONNECT
 * is complete (password check running) or has unread bytes waiting (it is
 * about to be served). The oldest from before this loop iteration first,
 * unidentified peers before identified ones; one accepted in this same
 * iteration (same uv_now(): a burst of accepts) only when the newcomer has
 * bytes waiting itself (@newcomer_speaks), else refusing the newcomer costs
 * the same and is cheaper. NULL when there is none.
 */
static struct local_client *pending_victim(struct local *local, const struct listener *on,
                                           const uid_t *uid, bool newcomer_speaks)
{
    uint64_t now = uv_now(local->loop);
    struct local_client *old_identified = NULL, *same_burst = NULL;

    for (struct local_client *c = local->pending_head; c; c = c->pending_next) {
        bool identified = c->identity.has_cred;

        if (client_state_of(c) != CLIENT_NEW || c->auth || (on && c->listener != on))
            continue;
        if (uid && (!identified || c->identity.uid != *uid))
            continue;
        if (c->accepted_ms == now) {
            if (newcomer_speaks && !same_burst && !pending_has_unread(c))
                same_burst = c;
            continue;
        }
        if (pending_has_unread(c))
            continue;
        if (uid || !identified)
            return c;
        if (!old_identified)
            old_identified = c;
    }
    return old_identified ? old_identified : same_burst;
}

static size_t pending_count_uid(const struct local *local, uid_t uid)
{
    size_t n = 0;

    for (const struct local_client *c = local->pending_head; c; c = c->pending_next)
        n += c->identity.has_cred && c->identity.uid == uid;
    return n;
}

/* Close a pending connection (or a newcomer not yet linked) under the
 * pending policy: counted, logged per burst, not one line each. */
static void pending_drop(struct local_client *client, struct listener *listener,
                         enum local_drop kind, const char *why)
{
    local_drop_note(client->local, listener, kind, client->peer, why);
    client->quiet_close = true;
    client_close(client, CLOSE_ABORT, false, why);
}

static void local_reserve_fd_open(struct local *local)
{
    if (local->reserve_fd < 0)
        local->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/*
 * Admit the accepted @client of @listener to the pending set, evicting to
 * make room (see "pending connections"), or close it. Returns 0 when
 * admitted, -1 when @client was closed.
 */
static int pending_admit(struct listener *listener, struct local_client *client)
{
    struct local *local = listener->local;
    struct local_client *victim;
    bool speaks = pending_has_unread(client);
    uv_os_fd_t fd = -1;

    /* File descriptors first: the last LOCAL_FD_HEADROOM stay for the
     * uplinks, the spool and the control socket. The kernel hands out the
     * lowest free number, so fd >= N means N descriptors are in use. */
    uv_fileno(&client->conn.handle, &fd);
    if (local->fd_limit && fd >= 0 && (unsigned)fd + LOCAL_FD_HEADROOM >= local->fd_limit) {
        victim = pending_victim(local, NULL, NULL, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_NO_FDS,
                         "out of file descriptors (RLIMIT_NOFILE), nothing pending to evict");
            local_reserve_fd_open(local);
            return -1;
        }
        pending_drop(victim, victim->listener, DROP_NO_FDS,
                     "evicted: file descriptors running out (RLIMIT_NOFILE)");
    }
    if (client->identity.has_cred &&
        pending_count_uid(local, client->identity.uid) >= local_max_pending_per_uid(local)) {
        victim = pending_victim(local, NULL, &client->identity.uid, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_REFUSED,
                         "local.max_pending_per_uid reached, none evictable");
            return -1;
        }
        pending_drop(victim, victim->listener, DROP_EVICTED_UID,
                     "evicted: oldest pending connection of a uid over local.max_pending_per_uid");
    }
    if (listener->pending_count >= local_max_pending(local)) {
        victim = pending_victim(local, listener, NULL, speaks);
        if (!victim) {
            pending_drop(client, listener, DROP_REFUSED,
                         "local.max_pending_connects reached, none evictable");
            return -1;
        }
        pending_drop(victim, listener, DROP_EVICTED,
                     "evicted: oldest pending connection, local.max_pending_connects reached");
    }
    pending_link(client, listener);
    return 0;
}

/*
 * accept(2) failed. libuv already keeps a spare descriptor for EMFILE (it
 * closes it, accepts and closes what is queued, reopens it) and calls this
 * only when that did not help, and then again at once: without a free
 * descriptor this would spin. So free one: evict the oldest pending
 * connection, or close our own reserve so that the next accept succeeds and
 * pending_admit() refuses it (and reopens the reserve).
 */
static void listener_accept_failed(struct listener *listener, int status)
{
    struct local *local = listener->local;
    struct local_client *victim;
    char why[128];

    snprintf(why, sizeof(why), "accept failed: %s", uv_strerror(status));
    local_drop_note(local, listener, DROP_ACCEPT, "-", why);
    if (status != UV_EMFILE && status != UV_ENFILE)
        return;
    victim = pending_victim(local, NULL, NULL, true);
    if (victim) {
        pending_drop(victim, victim->listener, DROP_NO_FDS,
                     "evicted: out of file descriptors (RLIMIT_NOFILE)");
    } else if (local->reserve_fd >= 0) {
        close(local->reserve_fd);
        local->reserve_fd = -1;
    }
}

/* Take the connection libuv has accepted on @listener. */
static void listener_accept(struct listener *listener)
{
    struct uv_stream_s *server = &listener->h.stream;
    struct local *local = listener->local;
    struct local_client *client;
    int rc;

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
    client_link(local, client);

    rc = uv_accept(server, &client->conn.stream);
    if (rc < 0) {
        pending_drop(client, listener, DROP_ACCEPT, "accept failed");
        return;
    }
    client->accepted_ms = uv_now(local->loop);
    client_describe_peer(client, listener->kind);
    if (pending_admit(listener, client) < 0)
        return;
    log_debug(CLIENT_FMT ": accepted on %s", CLIENT_ARGS(client), listener->url);
    rc = uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb);
    if (rc < 0) {
        client_close(client, CLOSE_ABORT, false, uv_strerror(rc));
        return;
    }
    /* From accept to a complete CONNECT; reads do not re-arm it. */
    uv_timer_start(&client->timer, client_keepalive_cb, local_connect_deadline_ms(local), 0);
}

/* Next loop iteration: take the connections deferred by the accept burst
 * limit; uv_accept() also makes libuv watch the listener again. */
static void local_accept_timer_cb(uv_timer_t *timer)
{
    struct local *local = timer->data;

    for (struct listener *l = local->listeners; l; l = l->next) {
        if (!l->deferred)
            continue;
        l->deferred = false;
        l->accepts_ms = uv_now(local->loop);
        l->accepts = 1;
        listener_accept(l);
    }
}

static void listener_connection_cb(uv_stream_t *server, int status)
{
    struct listener *listener = container_of(server, struct listener, h.stream);
    struct local *local = listener->local;
    uint64_t now = uv_now(local->loop);

    if (status < 0) {
        listener_accept_failed(listener, status);
        return;
    }
    if (listener->accepts_ms != now) {
        listener->accepts_ms = now;
        listener->accepts = 0;
    }
    if (++listener->accepts > LOCAL_ACCEPT_BURST) {
        /* Leaving the connection in libuv (no uv_accept()) stops it watching
         * the listener until local_accept_timer_cb() takes it: reads of the
         * connections accepted so far run first. */
        listener->deferred = true;
        uv_timer_start(&local->accept_timer, local_accept_timer_cb, 0, 0);
        return;
    }
    listener_accept(listener);
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
    /* Its pending clients stay pending (deadline, uid budget), on no
     * listener's budget. */
    for (struct local_client *c = listener->local->pending_head; c; c = c->pending_next)
        if (c->listener == listener)
            c->listener = NULL;
    listener->pending_count = 0;
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

/* Use a socket passed by systemd, already bound and listening. Its path,
 * mode and group belong to the .socket unit (SocketMode=, SocketGroup=), so
 * they are neither changed nor unlinked here (listener->path stays NULL). */
static int listener_adopt(struct listener *listener, int fd)
{
    int rc = listener->kind == CONF_LISTEN_TCP ? uv_tcp_open(&listener->h.tcp, fd)
                                               : uv_pipe_open(&listener->h.pipe, fd);

    if (rc < 0) {
        log_err("listener %s: cannot use the socket passed by systemd (fd %d): %s", listener->url,
                fd, uv_strerror(rc));
        close(fd);
        return rc;
    }
    log_info("listener %s: using the socket passed by systemd (fd %d) instead of binding",
             listener->url, fd);
    return 0;
}

/* Create, bind (or adopt @passed_fd, or a socket from systemd with the same
 * address) and listen; on failure the listener is already being closed.
 * @passed_fd (-1 for none) is owned by this function. */
static int listener_open(struct local *local, const struct conf_local *conf,
                         const struct conf_listen *cl, int passed_fd, struct listener **out)
{
    struct listener *listener;
    int fd, rc;

    listener = calloc(1, sizeof(*listener));
    if (!listener) {
        if (passed_fd >= 0)
            close(passed_fd);
        return -ENOMEM;
    }
    listener->local = local;
    listener->kind = cl->kind;
    listener->url = strdup(cl->url);
    if (!listener->url) {
        free(listener);
        if (passed_fd >= 0)
            close(passed_fd);
        return -ENOMEM;
    }
    if (cl->kind == CONF_LISTEN_TCP)
        rc = uv_tcp_init(local->loop, &listener->h.tcp);
    else
        rc = uv_pipe_init(local->loop, &listener->h.pipe, 0);
    if (rc < 0) {
        free(listener->url);
        free(listener);
        if (passed_fd >= 0)
            close(passed_fd);
        return rc;
    }
    local->live++;
    fd = passed_fd >= 0 ? passed_fd : activation_take(&local->activation, cl);
    if (fd >= 0)
        rc = listener_adopt(listener, fd);
    else if (cl->kind == CONF_LISTEN_TCP)
        rc = listener_bind_tcp(listener, cl);
    else
        rc = listener_bind_unix(listener, conf, cl);
    if (rc < 0)
        goto err_after_init;
    rc = uv_listen(&listener->h.stream, LOCAL_LISTEN_BACKLOG, listener_connection_cb);
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
        rc = listener_open(local, &conf->local, cl, -1, &l);
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

/*
 * Sockets systemd passed that no local.listen entry asked for are served
 * anyway, with a warning: refusing them would leave clients that the .socket
 * unit let connect hanging in the kernel's backlog. They keep serving across
 * reloads (a reload cannot get them back once closed).
 */
static int local_adopt_unmatched(struct local *local)
{
    const struct activation_socket *s;

    while ((s = activation_next_unmatched(&local->activation))) {
        struct conf_listen cl = {.kind = s->kind};
        struct listener *l;
        char url[sizeof(s->address) + 16];
        int rc;

        snprintf(url, sizeof(url), "systemd:%s", s->address);
        cl.url = url;
        log_warn("socket passed by systemd as fd %d%s%s (%s) matches no local.listen entry; "
                 "serving it anyway (add \"%s\" to local.listen to make it explicit)",
                 s->fd, s->name[0] ? ", named " : "", s->name, s->address, s->address);
        rc = listener_open(local, &local->conf->local, &cl, s->fd, &l);
        if (rc < 0)
            return rc;
        l->extra = true;
        l->next = local->listeners;
        local->listeners = l;
    }
    return 0;
}

/*
 * RLIMIT_NOFILE: raise the soft limit to the hard one (systemd's default
 * soft limit of 1024 exists for select(); libuv uses epoll), then say when
 * the local budgets do not fit. pending_admit() keeps LOCAL_FD_HEADROOM
 * descriptors free whatever the budgets say.
 */
static void local_fd_limit_update(struct local *local, const struct conf *conf)
{
    const struct conf_local *cl = &conf->local;
    unsigned long long need;
    struct rlimit rl;

    local->fd_limit = 0;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    if (rl.rlim_cur < rl.rlim_max && rl.rlim_max != RLIM_INFINITY) {
        struct rlimit raised = {.rlim_cur = rl.rlim_max, .rlim_max = rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) {
            log_info("raised the file descriptor limit (RLIMIT_NOFILE) from %llu to %llu",
                     (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max);
            rl.rlim_cur = rl.rlim_max;
        }
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > UINT_MAX)
        return;
    local->fd_limit = (unsigned)rl.rlim_cur;
    need = (unsigned long long)cl->max_clients +
           (unsigned long long)cl->listen_count * local_max_pending(local) + LOCAL_FD_HEADROOM;
    if (need > local->fd_limit)
        log_warn("the file descriptor limit (RLIMIT_NOFILE %u, hard limit %llu) is below what "
                 "local.max_clients (%u) + local.max_pending_connects (%u) x %zu listener(s) + "
                 "%u for the rest of uplinkd need (%llu): when they run out, new local "
                 "connections are refused; raise LimitNOFILE= or lower local.max_clients",
                 local->fd_limit, (unsigned long long)rl.rlim_max, cl->max_clients,
                 local_max_pending(local), cl->listen_count, LOCAL_FD_HEADROOM, need);
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
