/* local_int.h - the local MQTT server's internals, shared by its files and
 * nothing else (local.h is the interface). The structs below are the whole
 * state; the prototypes are grouped by the file that defines them, so this
 * header is also the table of contents. The files are layered: each calls
 * only files below it, never one above.
 *
 *   local.c          the public calls of local.h, the test and fuzzing seam
 *      |
 *   local_listen.c   listeners (TCP, Unix, systemd's sockets), accept and its
 *      |             burst limit, admission of pending connections
 *      |
 *   local_client.c   one client's MQTT protocol: input, keepalive, password
 *      |             check, CONNECT, PUBLISH/SUBSCRIBE/UNSUBSCRIBE, deferred
 *      |             acknowledgements; what the end of a connection means
 *      |
 *   local_session.c  sessions (§3.1.2.4): queues, in-flight windows, resume;
 *      |      |      fan-out of a message to the matching sessions
 *      |      |
 *      |   local_retain.c  retained messages, in memory and on disk
 *      |
 *   local_conn.c     one connection's lifetime and output: its state machine,
 *                    the pending list, drop reports, close, writes
 *
 * local_retain.c and local_conn.c call none of the others. A file may also
 * skip a layer (local.c closes clients with local_conn.c's client_close()).
 *
 * How they work together: a listener accepts a connection (struct
 * local_client), which stays pending, on its listener's and its uid's
 * budget, until its CONNECT is answered. CONNECT gives it a session (struct
 * local_session), which outlives the connection when persistent and owns its
 * subscriptions and its QoS>0 messages. A PUBLISH from a client (after
 * local.acl and the router) or from an uplink (local_deliver()) is fanned
 * out to the sessions whose subscriptions match (local_dispatch()) and kept
 * if retained. The one thing a lower layer must tell an upper one is the end
 * of a connection: local_conn.c calls local.client_event_cb, which
 * local_client.c installs (enum client_event).
 */
#ifndef UPLINKD_LOCAL_INT_H
#define UPLINKD_LOCAL_INT_H
#include "local.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "access.h"
#include "activation.h"
#include "conf.h"
#include "log.h"
#include "mqtt_codec.h"
#include "sm.h"
#include "topic.h"
#include "util.h"

/* Pending connections (accepted, CONNECT not complete; see "pending
 * connections" in local_listen.c): defaults when the conf leaves them at 0
 * (conf_local.c has the same), the quiet time that ends a burst of drops and
 * the longest burst summarised in one log line, and the file descriptors kept
 * free for everything else (uplink sockets, spool segments, control clients). */
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
/* Read granularity; the buffer grows to one whole packet when needed. */
#define LOCAL_READ_CHUNK 4096
/* Buffers above this are released when they become empty. */
#define LOCAL_BUF_KEEP 65536
/* Filters with this prefix are reported to the router (local.h). */
#define LOCAL_CLOUD_PREFIX "cloud/"
/* Refused publishes and subscriptions are reported here (local only). */
#define LOCAL_ERRORS_TOPIC "uplinkd/local/errors"

enum client_state {
    CLIENT_NEW,            /* accepted, waiting for CONNECT */
    CLIENT_AUTHENTICATING, /* CONNECT read; its password is checked on the threadpool */
    CLIENT_CONNECTED,      /* CONNACK 0 sent */
    CLIENT_CLOSING,        /* flushing and/or closing handles; ignored by fan-out */
};

enum close_mode {
    CLOSE_ABORT, /* drop queued output */
    CLOSE_FLUSH, /* write queued output first (bounded by LOCAL_FLUSH_TIMEOUT_MS) */
};

/*
 * What local_conn.c tells the layer above about the end of a connection,
 * through local.client_event_cb (local_client.c installs it; the lower layer
 * never calls up by name). Sent once each per client, CLOSING first:
 *  - CLIENT_EVENT_CLOSING: client_close() has logged why and not yet moved
 *    the state: the client is NEW or CONNECTED still. @abnormal is
 *    client_close()'s (no DISCONNECT: the will of a CONNECTED client is due,
 *    §3.1.2.5). The callback cancels a queued password check, decides the
 *    will on that state and detaches the session; it must not close or free
 *    the client.
 *  - CLIENT_EVENT_FINISHED: client_finish(): both handles are closed and no
 *    password check holds the client, which is still in local.clients and is
 *    freed right after. @abnormal is false. The callback publishes the will,
 *    orphans the deferred acknowledgements and frees a clean session.
 */
enum client_event {
    CLIENT_EVENT_CLOSING,  /* close started, state not yet CLOSING */
    CLIENT_EVENT_FINISHED, /* handles closed, memory freed next */
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
    bool auth_ok; /* AUTHENTICATING, check done: the password matched local.password_file */
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

/* MQTT session state (§3.1.2.4), see the top of local_session.c. */
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
    /* What a connection's end means above local_conn.c (enum client_event):
     * set by client_events_install() in local_new(), never NULL after. */
    void (*client_event_cb)(struct local_client *client, enum client_event event, bool abnormal);
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
    /* Retained store on disk (see "retained store" in local_retain.c). */
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

/* --- small helpers shared by the layers ------------------------------------- */

/* @client's state (struct sm holds it as an int). */
static inline enum client_state client_state_of(const struct local_client *client)
{
    return (enum client_state)sm_state(&client->sm);
}

/* Before CONNECT completed: still pending, and its closes are not worth a
 * log line each (anyone can cause them). */
static inline bool client_before_connect(const struct local_client *client)
{
    return client_state_of(client) == CLIENT_NEW ||
           client_state_of(client) == CLIENT_AUTHENTICATING;
}

/* True for a filter the router is told about (LOCAL_CLOUD_PREFIX). */
static inline bool is_cloud_filter(const char *filter, size_t len)
{
    size_t n = strlen(LOCAL_CLOUD_PREFIX);
    return len >= n && memcmp(filter, LOCAL_CLOUD_PREFIX, n) == 0;
}

/* local.max_packet_size, or the largest packet MQTT allows when it is 0. */
static inline size_t local_max_packet(const struct local *local)
{
    size_t max = local->conf->local.max_packet_size;
    return max ? max : MQTT_MAX_FIXED_HEADER + MQTT_MAX_REMAINING_LENGTH;
}

/* local.max_pending_connects, local.max_pending_per_uid and
 * local.connect_deadline, or their defaults when 0. */
static inline unsigned local_max_pending(const struct local *local)
{
    unsigned max = local->conf->local.max_pending_connects;
    return max ? max : LOCAL_DEFAULT_MAX_PENDING;
}

static inline unsigned local_max_pending_per_uid(const struct local *local)
{
    unsigned max = local->conf->local.max_pending_per_uid;
    return max ? max : LOCAL_DEFAULT_PENDING_PER_UID;
}

static inline unsigned local_connect_deadline_ms(const struct local *local)
{
    unsigned ms = local->conf->local.connect_deadline_ms;
    return ms ? ms : LOCAL_DEFAULT_CONNECT_DEADLINE;
}

/* Once nothing is live while closing, local_close()'s done_cb runs (once). */
static inline void local_check_done(struct local *local)
{
    if (local->closing && local->live == 0 && local->done_cb) {
        void (*done_cb)(void *) = local->done_cb;
        local->done_cb = NULL;
        done_cb(local->done_arg);
    }
}

/* A listener, client, timer or retained write is gone (its close or done
 * callback ran). */
static inline void local_live_put(struct local *local)
{
    local->live--;
    local_check_done(local);
}

/* --- local_listen.c ------------------------------------------------------------ */

/* A new client joins local.clients in state NEW with its connection and
 * timer handles open (the test seam's clients too). */
void client_link(struct local *local, struct local_client *client);
/* Keep one descriptor open to close when accept(2) says EMFILE. */
void local_reserve_fd_open(struct local *local);
/* Close @listener (freed in its close callback); its pending clients stay
 * pending, on no listener's budget. */
void listener_close(struct listener *listener);
/* Bind every listener of @conf not already open and mark the ones to keep
 * (listener.keep); on failure close the ones this call opened. Returns 0 or a
 * negative errno. */
int local_open_listeners(struct local *local, const struct conf *conf);
/* Serve the sockets systemd passed that no local.listen entry asked for.
 * Returns 0 or a negative errno. */
int local_adopt_unmatched(struct local *local);
/* Raise RLIMIT_NOFILE to the hard limit, note it in local.fd_limit, warn when
 * @conf's budgets do not fit in it. */
void local_fd_limit_update(struct local *local, const struct conf *conf);

/* --- local_client.c ------------------------------------------------------------ */

/* Point local.client_event_cb at the client layer (from local_new()). */
void client_events_install(struct local *local);
/* A client's timer: local.connect_deadline while NEW, keepalive after. */
void client_keepalive_cb(uv_timer_t *timer);
/* libuv's read callbacks of a client's stream; the test seam feeds its input
 * through them too. */
void client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
void client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

/* --- local_session.c ----------------------------------------------------------- */

/* struct idset: has, add (0 or -ENOMEM), delete (false when absent). */
bool idset_has(const struct idset *set, uint16_t id);
int idset_add(struct idset *set, uint16_t id);
bool idset_del(struct idset *set, uint16_t id);
/* Deliver to @session: QoS 0 only to a connected client, QoS>0 through its
 * queue (the queue policy). Pointers are borrowed for the call. */
void session_deliver(struct local_session *session, const char *topic, size_t topic_len,
                     const void *payload, size_t len, uint8_t qos, bool retain);
/* PUBACK, PUBREC or PUBCOMP from @client for a message of its session (§4.3). */
void session_ack(struct local_client *client, uint8_t type, uint16_t packet_id);
/* A resumed session: re-send what is in flight (§4.4), then the queue. */
void session_resume(struct local_session *session);
/* Free @session; @notify: remove its subscriptions, telling the router.
 * Never from inside a subscription walk. */
void session_free(struct local_session *session, bool notify);
/* @client's deferred acknowledgements are orphaned (freed later by
 * local_publish_done()) and its unanswered QoS 2 ids leave its session. */
void client_acks_orphan(struct local_client *client);
/* CONNECT accepted: give @client its session. Returns 0, -ENOMEM or -EUSERS. */
int session_attach(struct local_client *client, bool clean, bool *present);
/* True (and logged) when local.acl's deny_subscribe keeps @topic from @session. */
bool session_delivery_denied(const struct local_session *session, const char *topic,
                             size_t topic_len);
/* Store (if @retain) and deliver to every matching local subscriber.
 * Pointers are borrowed for the call. */
void local_dispatch(struct local *local, const char *topic, size_t topic_len, const void *payload,
                    size_t len, uint8_t qos, bool retain);

/* --- local_retain.c ------------------------------------------------------------ */

/* Replace the retained message of @topic (copied); an empty payload deletes it. */
void retained_store(struct local *local, const char *topic, size_t topic_len, const void *payload,
                    size_t len, uint8_t qos);
/* The set changed: written within RETAINED_FLUSH_MS. */
void retained_changed(struct local *local);
/* Write the set now if it changed (at shutdown: holds a local.live reference). */
void retained_write_start(struct local *local);
/* Start-up: load the retained store; true when it should be rewritten. */
bool retained_load(struct local *local);

/* --- local_conn.c -------------------------------------------------------------- */

/* The client state machine (client_states). */
extern const struct sm_conf client_sm;
/* @client (NEW) joins the pending list, on @listener's budget. */
void pending_link(struct local_client *client, struct listener *listener);
/* Log the drop counts of the current report window, per listener. */
void local_drop_report(struct local *local);
/* Count a connection closed before CONNECT completed; @listener may be NULL. */
void local_drop_note(struct local *local, struct listener *listener, enum local_drop kind,
                     const char *peer, const char *why);
/* Move @client to @to (checked and logged), keeping the counts. */
void client_set_state(struct local_client *client, enum client_state to);
/* Both handles are closed (and no password check holds it): free @client. */
void client_finish(struct local_client *client);
/* Start closing @client; safe from any callback, repeatedly. @abnormal
 * decides the will (§3.1.2.5), @why goes to the log. */
void client_close(struct local_client *client, enum close_mode mode, bool abnormal,
                  const char *why);
/* Hand the pending output to uv_write unless a write is active. */
void client_flush(struct local_client *client);
/* @len bytes at the end of the pending output, or NULL (closing, or closed
 * now as a slow consumer). */
uint8_t *client_reserve(struct local_client *client, size_t len);
/* Queue bytes and packets for @client (dropped when it is closing). */
void client_send_bytes(struct local_client *client, const uint8_t *data, size_t len);
void client_send_ack(struct local_client *client, uint8_t type, uint16_t packet_id);
void client_send_connack(struct local_client *client, uint8_t code);
void client_send_connack_accepted(struct local_client *client, bool session_present);
void client_write_publish(struct local_client *client, const char *topic, size_t topic_len,
                          const void *payload, size_t len, uint8_t qos, bool retain, bool dup,
                          uint16_t packet_id);

#endif
