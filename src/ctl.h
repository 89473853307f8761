/* ctl.h - the control socket server (protocol: include/uplinkd/ctl.h). */
#ifndef UPLINKD_CTL_H
#define UPLINKD_CTL_H

#include <uv.h>

struct json_buf;
struct ctl;

/* Answers one command into @out (a JSON document without the final '\n'). */
typedef void (*ctl_command_cb)(void *arg, const char *command, struct json_buf *out);

/**
 * ctl_new() - listen on the Unix socket @path (a stale socket file is
 * replaced; mode 0660). @path is copied. Returns 0 or a negative errno
 * (logged with the path).
 */
int ctl_new(uv_loop_t *loop, const char *path, ctl_command_cb command_cb, void *arg,
            struct ctl **out);

/** ctl_path() - the path @ctl listens on (borrowed from @ctl). */
const char *ctl_path(const struct ctl *ctl);

/**
 * ctl_close() - stop listening, drop open requests, unlink the socket, and
 * free everything once the handles are closed. NULL is allowed.
 */
void ctl_close(struct ctl *ctl);

#endif
