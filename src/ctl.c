/* ctl.c - control socket: one command line in, one JSON line out. */
#include "ctl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"
#include "log.h"
#include "util.h"
#include "uplinkd/ctl.h"

struct ctl_conn {
    uv_pipe_t pipe;
    uv_write_t write_req;
    struct ctl *ctl;
    struct ctl_conn *next;
    char request[UPLINKD_CTL_MAX_REQUEST];
    size_t request_len;
    struct json_buf response;
    bool answered;
};

struct ctl {
    uv_pipe_t server;
    char *path;
    ctl_command_cb command_cb;
    void *arg;
    struct ctl_conn *conns; /* open connections, closed with the server */
    unsigned open_handles;  /* server + conns still to see their close_cb */
    bool closing;
};

static void ctl_maybe_free(struct ctl *ctl)
{
    if (ctl->closing && ctl->open_handles == 0) {
        free(ctl->path);
        free(ctl);
    }
}

static void conn_close_cb(uv_handle_t *handle)
{
    struct ctl_conn *conn = container_of((uv_pipe_t *)handle, struct ctl_conn, pipe);
    struct ctl *ctl = conn->ctl;

    for (struct ctl_conn **p = &ctl->conns; *p; p = &(*p)->next) {
        if (*p == conn) {
            *p = conn->next;
            break;
        }
    }
    json_buf_deinit(&conn->response);
    free(conn);
    ctl->open_handles--;
    ctl_maybe_free(ctl);
}

static void conn_close(struct ctl_conn *conn)
{
    if (!uv_is_closing((uv_handle_t *)&conn->pipe))
        uv_close((uv_handle_t *)&conn->pipe, conn_close_cb);
}

static void conn_write_cb(uv_write_t *req, int status)
{
    struct ctl_conn *conn = container_of(req, struct ctl_conn, write_req);
    conn_close(conn);
}

static void conn_answer(struct ctl_conn *conn)
{
    struct ctl *ctl = conn->ctl;

    conn->answered = true;
    uv_read_stop((uv_stream_t *)&conn->pipe);
    json_buf_init(&conn->response);
    ctl->command_cb(ctl->arg, conn->request, &conn->response);
    json_append_raw(&conn->response, "\n");
    if (conn->response.failed) {
        conn_close(conn);
        return;
    }
    uv_buf_t buf = uv_buf_init(conn->response.data, (unsigned)conn->response.len);
    if (uv_write(&conn->write_req, (uv_stream_t *)&conn->pipe, &buf, 1, conn_write_cb) < 0)
        conn_close(conn);
}

static void conn_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    struct ctl_conn *conn = container_of((uv_pipe_t *)handle, struct ctl_conn, pipe);
    size_t room = sizeof(conn->request) - 1 - conn->request_len;
    *buf = uv_buf_init(conn->request + conn->request_len, (unsigned)room);
}

static void conn_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct ctl_conn *conn = container_of((uv_pipe_t *)stream, struct ctl_conn, pipe);

    if (nread < 0) {
        conn_close(conn);
        return;
    }
    conn->request_len += (size_t)nread;
    conn->request[conn->request_len] = '\0';
    char *newline = strchr(conn->request, '\n');
    if (newline != NULL) {
        *newline = '\0';
        conn_answer(conn);
    } else if (conn->request_len >= sizeof(conn->request) - 1) {
        snprintf(conn->request, sizeof(conn->request), "%s", "request-too-long");
        conn_answer(conn);
    }
}

static void server_connection_cb(uv_stream_t *server, int status)
{
    struct ctl *ctl = container_of((uv_pipe_t *)server, struct ctl, server);

    if (status < 0) {
        log_warn("control socket %s: accept failed: %s", ctl->path, uv_strerror(status));
        return;
    }
    struct ctl_conn *conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        return;
    conn->ctl = ctl;
    uv_pipe_init(server->loop, &conn->pipe, 0);
    ctl->open_handles++;
    conn->next = ctl->conns;
    ctl->conns = conn;
    if (uv_accept(server, (uv_stream_t *)&conn->pipe) < 0 ||
        uv_read_start((uv_stream_t *)&conn->pipe, conn_alloc_cb, conn_read_cb) < 0)
        conn_close(conn);
}

static void server_close_cb(uv_handle_t *handle)
{
    struct ctl *ctl = container_of((uv_pipe_t *)handle, struct ctl, server);
    ctl->open_handles--;
    ctl_maybe_free(ctl);
}

int ctl_new(uv_loop_t *loop, const char *path, ctl_command_cb command_cb, void *arg,
            struct ctl **out)
{
    struct ctl *ctl = calloc(1, sizeof(*ctl));
    int rc;

    if (ctl == NULL)
        return -ENOMEM;
    ctl->path = strdup(path);
    if (ctl->path == NULL) {
        free(ctl);
        return -ENOMEM;
    }
    ctl->command_cb = command_cb;
    ctl->arg = arg;
    uv_pipe_init(loop, &ctl->server, 0);
    ctl->open_handles = 1;

    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path); /* stale from a crash; a live daemon would own a lock first */
    rc = uv_pipe_bind(&ctl->server, path);
    if (rc < 0)
        goto err_after_init;
    chmod(path, 0660);
    rc = uv_listen((uv_stream_t *)&ctl->server, 16, server_connection_cb);
    if (rc < 0)
        goto err_after_bind;
    *out = ctl;
    return 0;

err_after_bind:
    unlink(path);
err_after_init:
    log_err("control socket %s: cannot listen: %s (check control.socket and that its directory "
            "exists and is writable)",
            path, uv_strerror(rc));
    ctl->closing = true;
    uv_close((uv_handle_t *)&ctl->server, server_close_cb);
    return rc;
}

const char *ctl_path(const struct ctl *ctl)
{
    return ctl->path;
}

void ctl_close(struct ctl *ctl)
{
    if (ctl == NULL)
        return;
    ctl->closing = true;
    unlink(ctl->path);
    for (struct ctl_conn *conn = ctl->conns; conn; conn = conn->next)
        conn_close(conn);
    uv_close((uv_handle_t *)&ctl->server, server_close_cb);
}
