/* local.h - the local MQTT 3.1.1 server (uv_tcp and uv_pipe listeners).
 *
 * Local apps connect over loopback TCP or a Unix socket and speak MQTT 3.1.1.
 * The server implements broker semantics among local clients (publish,
 * subscribe with + and #) and hands every inbound PUBLISH to the router
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
void local_deliver(struct local *local, const char *topic, const void *payload, size_t len,
                   int qos, bool retain);

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

#endif
