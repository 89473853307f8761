/* local.h - the local MQTT 3.1.1 server (uv_tcp and uv_pipe listeners).
 *
 * Local apps connect over loopback TCP or a Unix socket and speak MQTT 3.1.1.
 * The server implements broker semantics among local clients (publish,
 * subscribe with + and #, QoS 0/1/2, retained messages kept in
 * <state_dir>/retained.db across restarts, clean and persistent sessions kept
 * in memory) and hands every inbound PUBLISH to the router
 * through local_hooks.publish_cb. Subscriptions whose filter starts with
 * "cloud/" are also reported through subscribe_cb/unsubscribe_cb so the
 * router can subscribe upstream.
 */
#ifndef UPLINKD_LOCAL_H
#define UPLINKD_LOCAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct conf;
struct local;
struct local_ack;

/* publish_async_cb() return value: the acknowledgement is deferred. */
#define LOCAL_PUBLISH_PENDING 1
/* Deferred acknowledgements per client before its reading pauses. */
#define LOCAL_ACKS_PENDING_MAX 1024

/* Callbacks into the router. All pointers are borrowed for the call only. */
struct local_hooks {
    /* A local client published (after the server accepted the packet).
     * Returns 0 when the router took the message (QoS 1: the server sends
     * PUBACK), or a negative errno when it could not (e.g. -ENOBUFS: an
     * uplink queue is full): the server then does NOT acknowledge a QoS 1
     * message and closes the connection with a log line, so the client keeps
     * the message and re-sends it (MQTT 3.1.1 §4.4) instead of it being lost
     * after an acknowledgement. */
    int (*publish_cb)(void *arg, const char *client_id, const char *topic, const void *payload,
                      size_t len, int qos, bool retain);
    /* Optional; when set, used instead of publish_cb for a client's PUBLISH
     * (not for wills). Same contract, plus: for QoS 1/2 it may return
     * LOCAL_PUBLISH_PENDING, meaning "taken, acknowledge later": the server
     * then holds the PUBACK (QoS 1) or PUBREC (QoS 2) until
     * local_publish_done(@ack), which the router MUST call exactly once per
     * LOCAL_PUBLISH_PENDING, even after the client is gone. Acknowledgements
     * still go out in the order the PUBLISHes came (MQTT 3.1.1 §4.6). While
     * LOCAL_ACKS_PENDING_MAX acknowledgements of one client are pending, the
     * server stops reading that client (backpressure) until half are done.
     * @ack is opaque and owned by the server. */
    int (*publish_async_cb)(void *arg, const char *client_id, const char *topic,
                            const void *payload, size_t len, int qos, bool retain,
                            struct local_ack *ack);
    /* The first local subscription to a filter appeared / the last went away. */
    void (*subscribe_cb)(void *arg, const char *filter, int qos);
    void (*unsubscribe_cb)(void *arg, const char *filter);
    void *arg;
};

/**
 * local_new() - create the server; nothing is bound yet.
 * @conf: borrowed; must outlive the server or be replaced by local_reconfigure().
 * Returns 0 or -ENOMEM.
 */
int local_new(uv_loop_t *loop, const struct conf *conf, const struct local_hooks *hooks,
              struct local **out);

/**
 * local_start() - bind every listener in conf->local.listen (a Unix socket
 * path that exists and is stale is removed first; its mode is set from
 * local.socket_mode). Returns 0 or a negative errno after logging which
 * listener failed and why.
 *
 * Also raises the process's RLIMIT_NOFILE soft limit to its hard limit
 * (libuv uses epoll, so descriptors above FD_SETSIZE are fine) and warns when
 * local.max_clients plus every listener's local.max_pending_connects plus a
 * reserve for the rest of the daemon do not fit (again at each reload).
 */
int local_start(struct local *local);

/**
 * local_reconfigure() - adopt a new conf after reload: listeners that were
 * added are bound, removed ones closed, unchanged ones kept (with their
 * clients). @conf is borrowed as in local_new(). Returns 0 or a negative
 * errno (the old listeners stay in place on failure).
 */
int local_reconfigure(struct local *local, const struct conf *conf);

/**
 * local_deliver() - publish a message to local subscribers (from an uplink or
 * the daemon itself). @retain keeps it as the retained message of @topic.
 */
void local_deliver(struct local *local, const char *topic, const void *payload, size_t len, int qos,
                   bool retain);

/**
 * local_publish_done() - finish a publish for which publish_async_cb returned
 * LOCAL_PUBLISH_PENDING. @status 0: the message is safe (e.g. durable in the
 * spool): the PUBACK/PUBREC is sent (in order). A negative errno: it is not;
 * no acknowledgement is sent and the connection is closed with a log line,
 * so the client re-sends it (MQTT 3.1.1 §4.4). When the client is gone
 * meanwhile, @ack is just released. @ack is invalid afterwards.
 */
void local_publish_done(struct local *local, struct local_ack *ack, int status);

/** local_stop_accepting() - close the listeners; connected clients stay. */
void local_stop_accepting(struct local *local);

/**
 * local_close() - close every client and listener. @done_cb runs (from the
 * loop) once all handles are closed; then local_free() may be called.
 * MQTT 3.1.1 has no server DISCONNECT (§3.14 is client-to-server only), so
 * the server flushes pending writes and closes the connection.
 */
void local_close(struct local *local, void (*done_cb)(void *arg), void *arg);

/** local_free() - free after local_close() finished. NULL is allowed. */
void local_free(struct local *local);

/** local_client_count() - connected clients (for status). */
size_t local_client_count(const struct local *local);

/* Connections closed before CONNECT completed, by reason (see local_listen.c,
 * "pending connections"), counted since start. */
struct local_stats {
    size_t connected;     /* clients that completed CONNECT (local.max_clients) */
    size_t pending;       /* accepted, CONNECT not complete yet */
    uint64_t evicted;     /* oldest pending closed for a newcomer (listener or uid budget) */
    uint64_t refused;     /* newcomers closed: budget full of this burst, or no fds left */
    uint64_t deadline;    /* no complete CONNECT within local.connect_deadline */
    uint64_t max_clients; /* CONNACK 3: local.max_clients connected already */
    uint64_t other;       /* protocol errors before CONNECT, failed accepts */
};

/** local_get_stats() - fill @out (for uplinkctl status). */
void local_get_stats(const struct local *local, struct local_stats *out);

/* --- Test and fuzzing seam --------------------------------------------------
 * A client without a socket, driven through the same per-client state
 * machine as a real connection: bytes go in through local_test_client_input()
 * (exactly as if read from the socket), and what the server would have
 * written stays in the client's output buffer for local_test_client_output().
 * Used by tests/unit/test_local.c and fuzz/fuzz_session.c; the daemon never
 * calls these. The output buffer is bounded as for a real client: a test that
 * never drains it sees the client disconnected as a slow consumer. */
struct local_client;

/**
 * local_test_client_new() - a new socket-less client waiting for CONNECT.
 * The server owns it; it stays valid until it is closing and the loop has
 * run its close callbacks. It is on no listener's pending budget; local.max_clients
 * applies when it sends CONNECT (CONNACK 3). Returns 0, -ENOMEM or -ECANCELED
 * (server closing).
 */
int local_test_client_new(struct local *local, struct local_client **out);

/** local_test_client_input() - as if @len bytes of @data (borrowed) arrived. */
void local_test_client_input(struct local_client *client, const void *data, size_t len);

/**
 * local_test_client_output() - take the bytes the server has sent so far:
 * *@data (malloc'd, the caller frees; NULL when none) and *@len. With @data
 * NULL the output is discarded.
 */
void local_test_client_output(struct local_client *client, uint8_t **data, size_t *len);

/** local_test_client_lose() - the connection breaks (the will is published). */
void local_test_client_lose(struct local_client *client);

/** local_test_client_closing() - true once the server is closing the client. */
bool local_test_client_closing(const struct local_client *client);

#endif
