/* daemon_fixture.c - a whole daemon on a test's own loop (daemon_fixture.h). */
#include <errno.h>
#include <ftw.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>
#include <mosquitto.h>

#include "daemon_fixture.h"

#include "conf.h"
#include "log.h"
#include "loop_step.h"

#define HEARTBEAT_MS 5

static void heartbeat_cb(uv_timer_t *timer)
{
    /* Only wakes the loop: see DAEMON_FIXTURE_STEPS. */
}

/* A loopback port where nothing listens: bound, then closed at once. */
static unsigned closed_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

int daemon_fixture_listen(struct daemon_fixture *f)
{
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons((uint16_t)f->port)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int on = 1;

    assert_true(fd >= 0);
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)), 0);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        fail_msg("bind 127.0.0.1:%u: %s", f->port, strerror(errno));
    assert_int_equal(listen(fd, 4), 0);
    return fd;
}

static bool accepted(int listen_fd, int *conn_fd)
{
    *conn_fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (*conn_fd < 0 && errno != EAGAIN && errno != EINTR)
        fail_msg("accept: %s", strerror(errno));
    return *conn_fd >= 0;
}

int daemon_fixture_accept(struct daemon_fixture *f, int listen_fd)
{
    int conn_fd = -1;

    LOOP_UNTIL(&f->loop, accepted(listen_fd, &conn_fd), DAEMON_FIXTURE_STEPS);
    return conn_fd;
}

int daemon_fixture_group_setup(void **state)
{
    signal(SIGPIPE, SIG_IGN);
    log_init(LOG_NOTICE);
    mosquitto_lib_init();
    return 0;
}

int daemon_fixture_group_teardown(void **state)
{
    mosquitto_lib_cleanup();
    return 0;
}

struct daemon_fixture *daemon_fixture_new(const char *template)
{
    struct daemon_fixture *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    daemon_fixture_init(f);
    daemon_fixture_start(f, template);
    daemon_fixture_wait_uplinks(f, UPLINK_BACKOFF);
    return f;
}

void daemon_fixture_free(struct daemon_fixture *f)
{
    daemon_fixture_deinit(f);
    free(f);
}

int daemon_fixture_teardown(void **state)
{
    daemon_fixture_free(*state);
    return 0;
}

void daemon_fixture_init(struct daemon_fixture *f)
{
    const char *tmp = getenv("TMPDIR");

    memset(f, 0, sizeof(*f));
    int n = snprintf(f->dir, sizeof(f->dir), "%s/uplinkd-test-daemon-XXXXXX",
                     tmp && tmp[0] ? tmp : "/tmp");
    assert_true(n > 0 && (size_t)n < sizeof(f->dir));
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->config_path, sizeof(f->config_path), "%s/uplinkd.yaml", f->dir);
    snprintf(f->control_path, sizeof(f->control_path), "%s/control.sock", f->dir);
    f->port = closed_port();
    assert_int_equal(uv_loop_init(&f->loop), 0);
    uv_timer_init(&f->loop, &f->heartbeat);
    uv_timer_start(&f->heartbeat, heartbeat_cb, HEARTBEAT_MS, HEARTBEAT_MS);
}

void daemon_fixture_write(struct daemon_fixture *f, const char *template)
{
    char port[16];
    FILE *out = fopen(f->config_path, "w");

    assert_non_null(out);
    snprintf(port, sizeof(port), "%u", f->port);
    for (const char *p = template; *p;) {
        if (strncmp(p, "@DIR@", 5) == 0) {
            fputs(f->dir, out);
            p += 5;
        } else if (strncmp(p, "@PORT@", 6) == 0) {
            fputs(port, out);
            p += 6;
        } else {
            fputc(*p++, out);
        }
    }
    assert_int_equal(fclose(out), 0);
}

void daemon_fixture_start(struct daemon_fixture *f, const char *template)
{
    struct daemon *d = &f->daemon;
    char *errors = NULL;

    daemon_fixture_write(f, template);
    d->loop = &f->loop;
    d->config_path = f->config_path;
    if (conf_load(f->config_path, &d->conf, &errors) < 0)
        fail_msg("the test's configuration does not load:\n%s", errors ? errors : "");
    d->state = DAEMON_STARTING;
    assert_int_equal(daemon_start(d), 0);
    assert_int_equal(daemon_ctl_open(d), 0);
    d->state = DAEMON_RUNNING;
}

struct uplink *daemon_fixture_uplink(struct daemon_fixture *f, const char *name)
{
    for (size_t i = 0; i < f->daemon.uplink_count; i++) {
        struct uplink *uplink = f->daemon.uplinks[i];
        if (uplink != NULL && strcmp(uplink_name(uplink), name) == 0)
            return uplink;
    }
    return NULL;
}

static bool all_uplinks_in(struct daemon_fixture *f, enum uplink_state state)
{
    for (size_t i = 0; i < f->daemon.uplink_count; i++) {
        if (f->daemon.uplinks[i] == NULL || uplink_get_state(f->daemon.uplinks[i]) != state)
            return false;
    }
    return true;
}

void daemon_fixture_wait_uplinks(struct daemon_fixture *f, enum uplink_state state)
{
    LOOP_UNTIL(&f->loop, all_uplinks_in(f, state), DAEMON_FIXTURE_STEPS);
}

struct answer {
    int fd;
    char *text;
    size_t len;
};

/* Reads what is there; true at the end of the answer (the daemon closed). */
static bool answer_complete(struct answer *a)
{
    char buf[4096];

    for (;;) {
        ssize_t n = recv(a->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0)
            return true;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return false;
            fail_msg("control socket: recv: %s", strerror(errno));
        }
        a->text = realloc(a->text, a->len + (size_t)n + 1);
        assert_non_null(a->text);
        memcpy(a->text + a->len, buf, (size_t)n);
        a->len += (size_t)n;
        a->text[a->len] = '\0';
    }
}

char *daemon_fixture_ask_at(struct daemon_fixture *f, const char *path, const char *command)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct answer a = {.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    char line[512];

    assert_true(a.fd >= 0);
    assert_true(strlen(path) < sizeof(sa.sun_path));
    memcpy(sa.sun_path, path, strlen(path) + 1);
    /* A Unix stream connect completes into the listen backlog at once, before
     * the daemon's loop accepts: no step is needed to get here. */
    if (connect(a.fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int err = errno;
        close(a.fd);
        if (err == ENOENT || err == ECONNREFUSED)
            return NULL;
        fail_msg("control socket %s: connect: %s", path, strerror(err));
    }
    int n = snprintf(line, sizeof(line), "%s\n", command);
    assert_true(n > 0 && (size_t)n < sizeof(line));
    assert_int_equal(send(a.fd, line, (size_t)n, MSG_NOSIGNAL), n);
    LOOP_UNTIL(&f->loop, answer_complete(&a), DAEMON_FIXTURE_STEPS);
    close(a.fd);
    assert_non_null(a.text);
    assert_true(a.len > 0 && a.text[a.len - 1] == '\n');
    a.text[a.len - 1] = '\0';
    return a.text;
}

json_t *daemon_fixture_ask(struct daemon_fixture *f, const char *command)
{
    char *text = daemon_fixture_ask_at(f, f->control_path, command);
    json_error_t error;

    if (text == NULL)
        fail_msg("nothing listens at %s", f->control_path);
    json_t *answer = json_loads(text, 0, &error);
    if (answer == NULL || !json_is_object(answer))
        fail_msg("\"%s\": the answer is not a JSON object (%s): %s", command, error.text, text);
    free(text);
    return answer;
}

const char *daemon_fixture_string(json_t *object, const char *key)
{
    json_t *value = json_object_get(object, key);

    if (!json_is_string(value))
        fail_msg("\"%s\" is not a string in the answer", key);
    return json_string_value(value);
}

static int remove_cb(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    return remove(path);
}

void daemon_fixture_deinit(struct daemon_fixture *f)
{
    struct daemon *d = &f->daemon;

    if (d->conf != NULL) {
        daemon_stop(d, "end of test");
        LOOP_UNTIL(&f->loop, d->pending_stops == 0 && d->retiring_uplinks == 0,
                   DAEMON_FIXTURE_STEPS);
    }
    uv_close((uv_handle_t *)&f->heartbeat, NULL);
    LOOP_UNTIL(&f->loop, !uv_loop_alive(&f->loop), DAEMON_FIXTURE_STEPS);
    daemon_deinit(d);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    nftw(f->dir, remove_cb, 16, FTW_DEPTH | FTW_PHYS);
}
