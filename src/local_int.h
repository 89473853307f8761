/* local_int.h - the local MQTT server's internals, shared by its files and
 * nothing else (local.h is the interface). The structs below are the whole
 * state; the prototypes are grouped by the file that defines them, so this
 * header is also the table of contents:
 *
 *   local.c          client state and lifetime, output, input, the public calls
 *   local_listen.c   listeners, accepting, pending connections and their budget
 *   local_packet.c   CONNECT and its access checks, PUBLISH, SUBSCRIBE,
 *                    UNSUBSCRIBE and the deferred acknowledgements
 *   local_session.c  MQTT sessions (§3.1.2.4, §4.4), retained messages, fan-out
 *   local_retained.c the retained store on disk (retained.db)
 *
 * The overview of how they work together is at the top of local.c.
 */
#ifndef UPLINKD_LOCAL_INT_H
#define UPLINKD_LOCAL_INT_H

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
#include "topic.h"
#include "util.h"

/* Pending connections (accepted, CONNECT not complete; see "pending
 * connections" below): defaults when the conf leaves them at 0 (conf.c has
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
    enum client_state state;
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
     * but this pointer stays, so local_client_finish() can free a clean session
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

/* local.c */

/* true when @filter (@len bytes) starts with "cloud/": the router mirrors it upstream. */
bool local_is_cloud_filter(const char *filter, size_t len);

/* One of the handles counted in local.live finished closing; may complete local_close(). */
void local_live_put(struct local *local);

/* Move @client to @to, checked against client_transitions and logged at debug. */
void local_client_set_state(struct local_client *client, enum client_state to);

/* topic_table callback: the last owner of @filter left; tells the router for cloud/ filters. */
void local_subs_last_cb(void *arg, const char *filter, size_t len);

/* Both handles are closed: publish the will if due, drop the session, free. */
void local_client_finish(struct local_client *client);

/*
 * Start closing. @abnormal decides whether the will is published (§3.1.2.5);
 * @why goes to the log. Safe to call from any callback, repeatedly: the
 * client stays allocated until its close callbacks have run.
 */
void local_client_close(struct local_client *client, enum close_mode mode, bool abnormal,
                        const char *why);

/* A protocol violation by the client: §4.8 says close the connection. */
void local_client_protocol_error(struct local_client *client, const char *what, const char *reason);

/* Hand the pending output to uv_write unless a write is already active (its
 * callback calls us again). */
void local_client_flush(struct local_client *client);

/*
 * Reserve @len bytes at the end of the pending output and return them, or
 * NULL when the client is closing or would exceed its output bound (then it
 * is disconnected as a slow consumer: memory stays bounded).
 */
uint8_t *local_client_reserve(struct local_client *client, size_t len);

/* Queue @len encoded bytes for @client (coalesced into one uv_write). */
void local_client_send_bytes(struct local_client *client, const uint8_t *data, size_t len);

/* Send a PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK (@type) for @packet_id. */
void local_client_send_ack(struct local_client *client, uint8_t type, uint16_t packet_id);

/* Send CONNACK with return code @code (MQTT 3.1.1 §3.2.2.3), session present 0. */
void local_client_send_connack(struct local_client *client, uint8_t code);

/* CONNACK 0 (§3.2.2.2: session present only when a session was resumed). */
void local_client_send_connack_accepted(struct local_client *client, bool session_present);

/* Encode one PUBLISH into the output; a client that cannot take it is
 * closed by local_client_reserve() (slow consumer). */
void local_client_write_publish(struct local_client *client, const char *topic, size_t topic_len,
                                const void *payload, size_t len, uint8_t qos, bool retain, bool dup,
                                uint16_t packet_id);

/* The client timer fired: the CONNECT deadline or 1.5 x keep alive passed (§3.1.2.10). */
void local_client_keepalive_cb(uv_timer_t *timer);

/* (Re)start the keep-alive timer after input from a CONNECTED client. */
void local_client_arm_keepalive(struct local_client *client);

/* Handle every whole packet in the read buffer; keep the partial tail. */
void local_client_process_input(struct local_client *client);

/* uv_read_start() allocator: room in the client's input buffer. */
void local_client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);

/* uv_read_start() callback: input, EOF or a read error of a client. */
void local_client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

/* local_listen.c */

/* local.connect_deadline, or its default when the conf leaves it at 0. */
unsigned local_connect_deadline_ms(const struct local *local);

/* Take @client out of the pending set (CONNECT done or closing); no-op if not in it. */
void local_pending_unlink(struct local_client *client);

/* Log the pending-connection drops counted since the report window began, per listener. */
void local_drop_report(struct local *local);

/*
 * Count a connection closed before CONNECT completed. Logging each one would
 * let a flood flood the log too: the counts go into one line per listener
 * per burst (a burst ends after LOCAL_DROP_QUIET_MS without drops, or is cut
 * every LOCAL_DROP_REPORT_MAX_MS), with the first drop's peer and reason.
 * @listener may be NULL (a test client, or a listener closed by a reload):
 * then only the totals count it.
 */
void local_drop_note(struct local *local, struct listener *listener, enum local_drop kind,
                     const char *peer, const char *why);

/* A new client joins the list with its connection and timer handles open
 * (open_handles counts what close callbacks must still see). */
void local_client_link(struct local *local, struct local_client *client);

/* Re-open the spare descriptor that is closed when accept(2) says EMFILE. */
void local_reserve_fd_open(struct local *local);

/* Close and unlink @listener (its Unix socket file is removed in the close callback). */
void local_listener_close(struct listener *listener);

/* Bind every listener of @conf not already open; on failure close the ones
 * this call opened. New listeners are prepended to local->listeners. */
int local_open_listeners(struct local *local, const struct conf *conf);

/*
 * Sockets systemd passed that no local.listen entry asked for are served
 * anyway, with a warning: refusing them would leave clients that the .socket
 * unit let connect hanging in the kernel's backlog. They keep serving across
 * reloads (a reload cannot get them back once closed).
 */
int local_adopt_unmatched(struct local *local);

/*
 * RLIMIT_NOFILE: raise the soft limit to the hard one (systemd's default
 * soft limit of 1024 exists for select(); libuv uses epoll), then say when
 * the local budgets do not fit. pending_admit() keeps LOCAL_FD_HEADROOM
 * descriptors free whatever the budgets say.
 */
void local_fd_limit_update(struct local *local, const struct conf *conf);

/* local_session.c */

/* Is @id in @set? */
bool local_idset_has(const struct idset *set, uint16_t id);

/* Add @id to @set (the bitmap is allocated on first use). Returns 0 or -ENOMEM. */
int local_idset_add(struct idset *set, uint16_t id);

/* Remove @id from @set; returns whether it was there. */
bool local_idset_del(struct idset *set, uint16_t id);

/* PUBACK, PUBREC or PUBCOMP from the client for one of our messages (§4.3). */
void local_session_ack(struct local_client *client, uint8_t type, uint16_t packet_id);

/* §4.4: on a resumed session re-send every unacknowledged PUBLISH with DUP
 * and every unanswered PUBREL, with their original packet ids, in order;
 * then continue with the queue. */
void local_session_resume(struct local_session *session);

/* Free a session. @notify: remove its subscriptions (telling the router
 * about the last subscriber of a cloud/ filter); false at teardown, where
 * the whole tree goes. Never call it from inside a subscription walk. */
void local_session_free(struct local_session *session, bool notify);

/*
 * CONNECT accepted: give @client its session (§3.1.2.4). A clean CONNECT
 * discards any previous session of that id; a persistent one resumes the
 * previous persistent session (*present = true) or starts a new one. Any
 * other connection with this id has already been closed (takeover).
 * Returns 0, -ENOMEM or -EUSERS (too many sessions).
 */
int local_session_attach(struct local_client *client, bool clean, bool *present);

/* §3.3.1.3: a retained PUBLISH replaces the topic's retained message; an
 * empty payload deletes it (§3.3.1-10/11). */
void local_retained_store(struct local *local, const char *topic, size_t topic_len,
                          const void *payload, size_t len, uint8_t qos);

/* Store (if retained) and deliver to every matching local subscriber. */
void local_dispatch(struct local *local, const char *topic, size_t topic_len, const void *payload,
                    size_t len, uint8_t qos, bool retain);

/* A new subscription @filter (@len) at @qos: send the matching retained messages (§3.3.1-6). */
void local_send_retained(struct local_client *client, const char *filter, size_t len, uint8_t qos);

/* local_retained.c */

/* Serialise the current set (loop thread) and hand it to the threadpool. */
void local_retained_write_start(struct local *local);

/* The set changed: write it within RETAINED_FLUSH_MS (one write per batch). */
void local_retained_changed(struct local *local);

/* Start-up, before the listeners bind: load <state_dir>/retained.db. A bad
 * file is reported and moved aside; the server starts without it. */
bool local_retained_load(struct local *local);

/* local_packet.c */

/* The client of @check is closing: its result will be ignored. */
void local_auth_check_cancel(struct auth_check *check);

/* The password check of a CONNECT finished on the threadpool: resume the client. */
void local_auth_after_work_cb(uv_work_t *req, int status);

/* The client is going away: its pending entries are orphaned (freed by
 * local_publish_done()), finished ones freed. A QoS 2 id whose PUBREC never
 * went out is forgotten so the re-sent PUBLISH is stored again (§4.3.3). */
void local_client_acks_orphan(struct local_client *client);

/* Handle one complete MQTT packet (@data, @len) from @client. */
void local_client_handle_packet(struct local_client *client, const uint8_t *data, size_t len);

#endif
