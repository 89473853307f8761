/* child_sessions.c - per-device sessions (child_sessions.h): one upstream
 * session per child, opened on its first message, closed when idle, its
 * spool in a directory of its own. What differs between clouds is in the
 * profile's struct child_session_ops. */
#include "child_sessions.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "conf.h"
#include "json.h"
#include "log.h"
#include "sm.h"
#include "util.h"

/* The idle sweep runs at idle_ms / 2, within these bounds. */
#define SWEEP_MIN_MS 500u
#define SWEEP_MAX_MS 60000u

/* A session's life:
 *   LOADING (spool open, uplink created, the credential read on the
 *   threadpool) -> RUNNING (uplink started) | NO_KEY (the credential could
 *   not be used: the uplink is never started, what it spooled stays on disk)
 *   any -> STOPPING (uplink stopped, then freed once the uplink and a
 *   running load have both finished). */
enum session_state {
    SESSION_LOADING,
    SESSION_RUNNING,
    SESSION_NO_KEY,
    SESSION_STOPPING,
};

struct child_session {
    struct child_session *next;
    struct child_sessions *set;
    struct uplink *uplink;
    struct conf_uplink *conf; /* from ops->conf, owned; borrowed by the uplink */
    struct sm sm;             /* enum session_state, see session_states */
    bool was_no_key;          /* stopped from NO_KEY: new messages are refused, not delayed */
    bool work_busy;           /* the load is queued or running */
    bool uplink_done;         /* uplink stopped and freed (or never made) */
    bool remove_dir;          /* the spool was empty at the end: delete its directory */
    uv_work_t work;
    int load_rc;                     /* written by the worker, read after it */
    char err[CHILD_SESSION_ERR_MAX]; /* what is wrong with the credential */
    void *data;                      /* ops->data_size bytes, the profile's */
    char *name;                      /* "<uplink>.<child>", owned */
    char *spool_dir;                 /* owned; NULL: memory spool */
    uint64_t used_ms;                /* uv_now() of its last message */
    char id[];
};

struct child_sessions {
    struct profile_instance *pi;
    const struct child_session_ops *ops;
    struct child_session *open;
    struct child_session *stopping; /* stopped, waiting for their uplink to finish */
    uv_timer_t sweep;
    bool closing;
    bool sweep_closed;
    bool scanned; /* the devices' spools were looked at (scan()) */
};

/* A child's session:
 *
 *     LOADING --credential read, uplink started--> RUNNING
 *        |                                            |
 *        +--no usable credential--> NO_KEY            |
 *        |                             |              |
 *        +-----------------------------+--------------+--> STOPPING
 *
 * The names are what `uplinkctl status` shows. */
static const struct sm_state session_states[] = {
    [SESSION_LOADING] = {"loading-key",
                         SM_TO(SESSION_RUNNING) | SM_TO(SESSION_NO_KEY) | SM_TO(SESSION_STOPPING)},
    [SESSION_RUNNING] = {"running", SM_TO(SESSION_STOPPING)},
    [SESSION_NO_KEY] = {"no-key", SM_TO(SESSION_STOPPING)},
    [SESSION_STOPPING] = {"STOPPING", 0},
};

static void session_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    snprintf(buf, size, "session %s", container_of(sm, struct child_session, sm)->id);
}

static const char *session_sm_uplink(const struct sm *sm)
{
    return container_of(sm, struct child_session, sm)->set->pi->uc->name;
}

/* RUNNING means the credential was loaded and the uplink started with it. */
static bool session_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct child_session *s = container_of(sm, struct child_session, sm);

    if (sm_state(sm) == SESSION_RUNNING && s->work_busy) {
        snprintf(why, size, "running while loading its credential");
        return false;
    }
    return true;
}

static const struct sm_conf session_sm = {
    .states = session_states,
    .count = ARRAY_SIZE(session_states),
    .level = LOG_DEBUG,
    .describe = session_sm_describe,
    .log_name = session_sm_uplink,
    .invariant = session_sm_invariant,
};

static enum session_state state_of(const struct child_session *s)
{
    return (enum session_state)sm_state(&s->sm);
}

const char *child_session_id(const struct child_session *s)
{
    return s->id;
}

const char *child_session_name(const struct child_session *s)
{
    return s->name;
}

struct profile_instance *child_session_pi(const struct child_session *s)
{
    return s->set->pi;
}

struct uplink *child_session_uplink(const struct child_session *s)
{
    return s->uplink;
}

const struct conf_uplink *child_session_conf(const struct child_session *s)
{
    return s->conf;
}

void *child_session_data(const struct child_session *s)
{
    return s->data;
}

static void session_free(struct child_session *s)
{
    if (s->data && s->set->ops->data_free)
        s->set->ops->data_free(s->data);
    if (s->data)
        OPENSSL_cleanse(s->data, s->set->ops->data_size);
    free(s->data);
    free(s->conf);
    free(s->name);
    free(s->spool_dir);
    free(s);
}

static struct child_session *find(struct child_session *list, const char *child)
{
    for (; list; list = list->next) {
        if (strcmp(list->id, child) == 0)
            return list;
    }
    return NULL;
}

struct child_session *child_sessions_find(const struct child_sessions *set, const char *child)
{
    return find(set->open, child);
}

static void unlink_from(struct child_session **list, struct child_session *s)
{
    for (struct child_session **link = list; *link; link = &(*link)->next) {
        if (*link == s) {
            *link = s->next;
            return;
        }
    }
}

/* Spool directories: <state_dir>/spool/<uplink>/devices/<child>, beside the
 * uplink's own spool files (spool.c only looks at its *.seg and cursor).
 * A child id never holds '/' (mapping_child_check), so it is one path
 * component once "." and ".." are ruled out: a leading '.' or '%' is written
 * as %2E or %25, which also keeps the name reversible. */
static int devices_dir(const struct profile_instance *pi, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "%s/spool/%s/devices", pi->conf->state_dir, pi->uc->name);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : n;
}

static int dir_encode(const char *child, char *buf, size_t cap)
{
    int n = child[0] == '.' || child[0] == '%'
                ? snprintf(buf, cap, "%%%02X%s", (unsigned char)child[0], child + 1)
                : snprintf(buf, cap, "%s", child);
    /* NAME_MAX: a 255-byte id starting with '.' does not fit. */
    return n < 0 || (size_t)n >= cap || n > 255 ? -ENAMETOOLONG : n;
}

static int dir_decode(const char *name, char *child, size_t cap)
{
    size_t len = strlen(name);

    if (name[0] == '%') {
        unsigned c;
        char hex[3] = {name[1], name[1] ? name[2] : '\0', '\0'};
        if (len < 3 || sscanf(hex, "%2X", &c) != 1 || (c != '.' && c != '%'))
            return -EINVAL;
        if (len - 2 >= cap)
            return -ENAMETOOLONG;
        child[0] = (char)c;
        memcpy(child + 1, name + 3, len - 3 + 1);
        len -= 2;
    } else {
        if (len >= cap)
            return -ENAMETOOLONG;
        memcpy(child, name, len + 1);
    }
    return mapping_child_check(child, len) ? -EINVAL : (int)len;
}

/* The spool files of an empty session; anything else (a damaged segment
 * kept as .corrupt) keeps the directory. Plain unlink() on the loop: a few
 * files, once per session that closes. */
static void remove_dir(const struct child_session *s)
{
    DIR *dir = opendir(s->spool_dir);
    struct dirent *de;
    char path[4400];

    if (!dir)
        return;
    while ((de = readdir(dir)) != NULL) {
        size_t len = strlen(de->d_name);
        if (strcmp(de->d_name, "cursor") != 0 &&
            (len != 20 || strcmp(de->d_name + 16, ".seg") != 0))
            continue;
        snprintf(path, sizeof(path), "%s/%s", s->spool_dir, de->d_name);
        unlink(path);
    }
    closedir(dir);
    if (rmdir(s->spool_dir) < 0 && errno != ENOENT)
        log_child(LOG_WARNING, s->set->pi->uc->name, s->id,
                  "its session's spool is empty but %s stays: %s", s->spool_dir, strerror(errno));
}

static void maybe_closed(struct child_sessions *set)
{
    if (set->closing && set->sweep_closed && !set->open && !set->stopping)
        profile_instance_closed(set->pi);
}

/* Free a stopping session once nothing runs for it any more. */
static void release(struct child_session *s)
{
    struct child_sessions *set = s->set;

    if (s->work_busy || !s->uplink_done)
        return;
    unlink_from(&set->stopping, s);
    if (s->remove_dir && s->spool_dir)
        remove_dir(s);
    session_free(s);
    maybe_closed(set);
}

static void stopped_cb(struct uplink *uplink, void *arg)
{
    struct child_session *s = arg;
    const struct profile_port *port = s->set->pi->port;
    struct uplink_stats stats;

    port->stats(uplink, &stats);
    s->remove_dir = stats.spool.depth == 0 && stats.spool.io_error == 0;
    if (!s->remove_dir && s->spool_dir)
        log_child(LOG_INFO, s->set->pi->uc->name, s->id,
                  "%llu message(s) stay in %s and are sent when its session opens again "
                  "(its next message or the next start)",
                  (unsigned long long)stats.spool.depth, s->spool_dir);
    port->session_free(uplink);
    s->uplink = NULL;
    s->uplink_done = true;
    release(s);
}

/* Stop @s (open) for @why; it is freed once its uplink has finished. */
static void stop(struct child_session *s, const char *why)
{
    struct child_sessions *set = s->set;
    struct profile_instance *pi = set->pi;
    unsigned timeout_ms = pi->conf->shutdown_timeout_ms ? pi->conf->shutdown_timeout_ms : 5000;

    unlink_from(&set->open, s);
    s->next = set->stopping;
    set->stopping = s;
    s->was_no_key = state_of(s) == SESSION_NO_KEY;
    sm_move(&s->sm, SESSION_STOPPING, NULL);
    if (s->work_busy)
        uv_cancel((uv_req_t *)&s->work); /* fails harmlessly once it runs */
    log_child(LOG_INFO, pi->uc->name, s->id, "closing its session: %s", why);
    pi->port->session_stop(s->uplink, timeout_ms, stopped_cb, s);
}

/* Threadpool: the profile reads the credential (file access and, for a
 * pkcs11: URI, a token round trip stay off the loop). */
static void load_work_cb(uv_work_t *req)
{
    struct child_session *s = req->data;

    s->load_rc = s->set->ops->load(s, s->err, sizeof(s->err));
    /* Release this threadpool thread's OpenSSL state (error queue, DRBG):
     * libuv's threads outlive OPENSSL_cleanup(), so it would be lost at exit
     * (valgrind "definitely lost"); see conn_work_cb in uplink.c. */
    OPENSSL_thread_stop();
}

/* The refusal for a child whose credential cannot be used, in pi->reason. */
static void no_key_reason(const struct child_session *s)
{
    struct profile_instance *pi = s->set->pi;

    snprintf(pi->reason, sizeof(pi->reason), "%.130s: %.120s", s->set->ops->need, s->err);
}

static void load_after_cb(uv_work_t *req, int status)
{
    struct child_session *s = req->data;
    struct profile_instance *pi = s->set->pi;
    struct conf_uplink *conf;
    int rc;

    s->work_busy = false;
    if (state_of(s) == SESSION_STOPPING || status < 0) {
        release(s);
        return;
    }
    rc = s->load_rc;
    /* The settings again, now with what was loaded (the uplink has not
     * started, so nothing compares them yet). */
    if (rc == 0 && !(conf = s->set->ops->conf(s))) {
        snprintf(s->err, sizeof(s->err), "out of memory");
        rc = -ENOMEM;
    } else if (rc == 0) {
        pi->port->session_reconfigure(s->uplink, conf);
        free(s->conf);
        s->conf = conf;
    }
    if (rc < 0) {
        struct uplink_stats stats;
        pi->port->stats(s->uplink, &stats);
        sm_move(&s->sm, SESSION_NO_KEY, NULL);
        no_key_reason(s);
        profile_report_error(pi, NULL, pi->reason);
        log_child(LOG_ERR, pi->uc->name, s->id,
                  "its session cannot connect; %llu queued message(s) stay in its spool until "
                  "the credential is fixed",
                  (unsigned long long)stats.spool.depth);
        return;
    }
    rc = pi->port->session_start(s->uplink);
    if (rc < 0) {
        log_child(LOG_ERR, pi->uc->name, s->id, "cannot start its session: %s", strerror(-rc));
        snprintf(s->err, sizeof(s->err), "cannot start its session: %s", strerror(-rc));
        sm_move(&s->sm, SESSION_NO_KEY, NULL); /* retried when it is reopened */
        return;
    }
    sm_move(&s->sm, SESSION_RUNNING, NULL);
}

static int session_spool_dir(struct child_session *s)
{
    struct profile_instance *pi = s->set->pi;
    char dir[4096], enc[300];
    int n;

    if (pi->uc->spool.durability != CONF_SPOOL_FSYNC)
        return 0;
    if ((n = devices_dir(pi, dir, sizeof(dir))) < 0 || dir_encode(s->id, enc, sizeof(enc)) < 0 ||
        snprintf(dir + n, sizeof(dir) - (size_t)n, "/%s", enc) >= (int)(sizeof(dir) - (size_t)n)) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "the child id is too long for a spool directory of its own");
        return -EINVAL;
    }
    return (s->spool_dir = strdup(dir)) ? 0 : -ENOMEM;
}

/* Subscribe the session to its filters. */
static int session_subscribe(struct child_session *s)
{
    const struct profile_port *port = s->set->pi->port;
    struct profile_msgs filters = {0};
    int rc = 0;

    s->set->ops->filters(s, &filters);
    if (filters.failed)
        rc = -ENOMEM;
    for (size_t i = 0; rc == 0 && i < filters.count; i++)
        rc = port->subscribe(s->uplink, filters.msg[i].topic, filters.msg[i].qos);
    profile_msgs_deinit(&filters);
    return rc;
}

/* The session uplink's hooks: @arg is the struct child_session. */
static void session_online_cb(void *arg, struct uplink *uplink)
{
    struct child_session *s = arg;
    struct profile_instance *pi = s->set->pi;
    struct profile_msgs first = {0};

    if (!s->set->ops->first)
        return;
    s->set->ops->first(s, &first);
    for (size_t i = 0; i < first.count; i++) {
        const struct profile_msg *msg = &first.msg[i];
        if (pi->port->send_first(uplink, msg->topic, msg->payload, msg->len, msg->qos ? 1 : 0,
                                 UPLINK_CONTROL_CONNECTION | UPLINK_CONTROL_GATE |
                                     UPLINK_CONTROL_FRONT,
                                 NULL, NULL) < 0)
            log_child(LOG_WARNING, pi->uc->name, s->id, "cannot queue \"%s\" on its session",
                      msg->topic);
    }
    if (first.failed)
        log_child(LOG_ERR, pi->uc->name, s->id, "out of memory building its first messages");
    profile_msgs_deinit(&first);
}

static const char *session_connack_text_cb(void *arg, struct uplink *uplink, int rc)
{
    const struct profile_instance *pi = ((struct child_session *)arg)->set->pi;

    (void)uplink;
    return pi->spec && pi->spec->connack_text ? pi->spec->connack_text(pi->uc, rc) : NULL;
}

static void session_message_cb(void *arg, struct uplink *uplink, const char *topic,
                               const void *payload, size_t len, int qos, bool retain)
{
    struct child_session *s = arg;
    struct profile_instance *pi = s->set->pi;
    struct profile_msgs local = {0};

    (void)uplink;
    s->set->ops->down(s, topic, payload, len, qos, retain, &local);
    for (size_t i = 0; i < local.count; i++)
        profile_deliver(pi, local.msg[i].topic, local.msg[i].payload, local.msg[i].len,
                        local.msg[i].qos, local.msg[i].retain);
    profile_msgs_deinit(&local);
}

/* Open @child's session: spool (recovered now), uplink, subscriptions; the
 * credential is loaded on the threadpool and the uplink starts after it.
 * With @recovered (start-up scan) only when its spool holds something to
 * send. Returns 0 (*@out set, or NULL: nothing to send), -EINVAL with
 * pi->reason (no credential, unusable spool), -ENOMEM. */
static int session_open(struct child_sessions *set, const char *child, bool recovered,
                        struct child_session **out)
{
    struct profile_instance *pi = set->pi;
    const struct child_session_ops *ops = set->ops;
    struct uplink_hooks hooks = {
        .session_cb = ops->session_cb,
        .online_cb = session_online_cb,
        .connack_text_cb = session_connack_text_cb,
        .message_cb = session_message_cb,
    };
    char why[CHILD_SESSION_ERR_MAX];
    struct uplink_stats stats;
    struct child_session *s;
    size_t name_len;
    int rc;

    *out = NULL;
    /* Refuse a child without a credential before taking its data; whether
     * it is usable is learnt on the threadpool. */
    if (!recovered && ops->check && ops->check(pi, child, why, sizeof(why)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "%.130s: %.120s", ops->need, why);
        return -EINVAL;
    }
    s = calloc(1, sizeof(*s) + strlen(child) + 1);
    if (!s)
        return -ENOMEM;
    strcpy(s->id, child);
    s->set = set;
    s->uplink_done = true; /* until there is an uplink */
    sm_init(&s->sm, &session_sm, SESSION_LOADING);
    s->work.data = s;
    name_len = strlen(pi->uc->name) + 1 + strlen(child) + 1;
    s->name = malloc(name_len);
    s->data = calloc(1, ops->data_size ? ops->data_size : 1);
    if (!s->name || !s->data) {
        rc = -ENOMEM;
        goto err;
    }
    snprintf(s->name, name_len, "%s.%s", pi->uc->name, child);
    if ((rc = session_spool_dir(s)) < 0)
        goto err;
    if (!(s->conf = ops->conf(s))) {
        rc = -ENOMEM;
        goto err;
    }
    hooks.arg = s;
    rc = pi->port->session_new(pi->loop, s->conf, pi->conf->gateway_id, &hooks, &s->uplink);
    if (rc < 0)
        goto err;
    s->uplink_done = false;
    if ((rc = pi->port->session_open_spool(s->uplink, s->spool_dir)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "cannot open the child's spool in %.150s: %s",
                 s->spool_dir ? s->spool_dir : "memory", strerror(-rc));
        rc = -EINVAL;
        goto err_after_uplink;
    }
    if ((rc = session_subscribe(s)) < 0)
        goto err_after_uplink;
    s->used_ms = uv_now(pi->loop);
    s->next = set->open;
    set->open = s;
    pi->port->stats(s->uplink, &stats);
    if (recovered && stats.spool.depth == 0) {
        /* Nothing to send: close it again, which deletes the directory. */
        stop(s, "its spool holds nothing to send");
        return 0;
    }
    rc = uv_queue_work(pi->loop, &s->work, load_work_cb, load_after_cb);
    if (rc < 0) {
        sm_move(&s->sm, SESSION_NO_KEY, NULL);
        snprintf(s->err, sizeof(s->err), "cannot queue the credential's load: %s", uv_strerror(rc));
    } else {
        s->work_busy = true;
    }
    if (recovered)
        log_child(LOG_INFO, pi->uc->name, child,
                  "%llu message(s) recovered from %s; opening its session as %s to send them",
                  (unsigned long long)stats.spool.depth, s->spool_dir, s->name);
    else
        log_child(LOG_INFO, pi->uc->name, child, "opening a session of its own as %s%s%s%s",
                  s->name, ops->credential ? " (" : "",
                  ops->credential ? ops->credential(s, why, sizeof(why)) : "",
                  ops->credential ? ")" : "");
    *out = s;
    return 0;

err_after_uplink:
    pi->port->session_free(s->uplink);
err:
    if (rc == -ENOMEM)
        snprintf(pi->reason, sizeof(pi->reason), "out of memory");
    else if (rc < 0 && !pi->reason[0])
        snprintf(pi->reason, sizeof(pi->reason), "cannot open the child's session: %s",
                 strerror(-rc));
    session_free(s);
    return rc == -ENOMEM ? rc : -EINVAL;
}

/* Start-up: children whose spool still holds messages (a crash, a stop
 * while the cloud was away, an idle close with a broken credential) get
 * their session back now, so those messages leave without waiting for the
 * child's next message. Spool recovery is synchronous, like the uplink's
 * own, and runs before READY=1. */
static void scan(struct child_sessions *set)
{
    struct profile_instance *pi = set->pi;
    char dir[4096], child[MAPPING_CHILD_MAX + 1];
    const char *self = set->ops->self(pi);
    struct child_session *s;
    struct dirent *de;
    DIR *d;

    if (!set->ops->enabled(pi) || set->scanned || pi->uc->spool.durability != CONF_SPOOL_FSYNC)
        return;
    set->scanned = true;
    if (devices_dir(pi, dir, sizeof(dir)) < 0 || !(d = opendir(dir)))
        return; /* none yet */
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        if (dir_decode(de->d_name, child, sizeof(child)) < 0 ||
            (self && strcmp(child, self) == 0)) {
            log_uplink(LOG_WARNING, pi->uc->name, "%s/%s is not the spool of a child id; ignored",
                       dir, de->d_name);
            continue;
        }
        if (find(set->open, child) || find(set->stopping, child))
            continue;
        pi->reason[0] = '\0';
        if (session_open(set, child, true, &s) < 0)
            log_child(LOG_ERR, pi->uc->name, child, "cannot reopen its session: %s", pi->reason);
    }
    closedir(d);
}

static void stop_all(struct child_sessions *set, const char *why)
{
    while (set->open)
        stop(set->open, why);
}

static void sweep_cb(uv_timer_t *timer)
{
    struct child_sessions *set = timer->data;
    struct profile_instance *pi = set->pi;
    uint64_t now = uv_now(pi->loop), idle = set->ops->idle_ms(pi);
    struct child_session *s, *next;

    for (s = set->open; s; s = next) {
        struct uplink_stats stats;
        next = s->next;
        if (now - s->used_ms < idle)
            continue;
        if (state_of(s) == SESSION_NO_KEY) {
            /* Its spool stays on disk; the next message or start retries. */
            stop(s, "idle, without a usable credential");
            continue;
        }
        if (state_of(s) != SESSION_RUNNING)
            continue;
        /* Unsent messages keep it open until they are acknowledged, so a
         * session's spool never waits on disk for a message that may not
         * come; an idle, empty session holds no fds. */
        pi->port->stats(s->uplink, &stats);
        if (stats.queued == 0)
            stop(s, "idle");
    }
}

static void sweep_start(struct child_sessions *set)
{
    uint64_t every = set->ops->idle_ms(set->pi) / 2;

    uv_timer_stop(&set->sweep);
    if (!set->ops->enabled(set->pi))
        return;
    every = every < SWEEP_MIN_MS ? SWEEP_MIN_MS : every;
    every = every > SWEEP_MAX_MS ? SWEEP_MAX_MS : every;
    uv_timer_start(&set->sweep, sweep_cb, every, every);
}

int child_sessions_new(struct profile_instance *pi, const struct child_session_ops *ops,
                       struct child_sessions **out)
{
    struct child_sessions *set = calloc(1, sizeof(*set));

    if (!set)
        return -ENOMEM;
    set->pi = pi;
    set->ops = ops;
    uv_timer_init(pi->loop, &set->sweep);
    uv_unref((uv_handle_t *)&set->sweep);
    set->sweep.data = set;
    sweep_start(set);
    scan(set);
    *out = set;
    return 0;
}

static void sweep_closed_cb(uv_handle_t *handle)
{
    struct child_sessions *set = handle->data;

    set->sweep_closed = true;
    maybe_closed(set);
}

void child_sessions_close(struct child_sessions *set)
{
    set->closing = true;
    stop_all(set, "stopping");
    uv_close((uv_handle_t *)&set->sweep, sweep_closed_cb);
}

void child_sessions_free(struct child_sessions *set)
{
    /* The close stopped every session and waited for them. */
    free(set);
}

void child_sessions_reconfigure(struct child_sessions *set)
{
    struct profile_instance *pi = set->pi;

    sweep_start(set);
    if (!set->ops->enabled(pi)) {
        stop_all(set, "per-device sessions were turned off");
        set->scanned = false;
        return;
    }
    scan(set);
    for (struct child_session *s = set->open; s; s = s->next) {
        struct conf_uplink *conf = set->ops->conf(s);
        if (!conf) {
            log_child(LOG_ERR, pi->uc->name, s->id,
                      "cannot adopt the new settings (out of memory)");
            continue;
        }
        /* The uplink compares the old settings with the new ones, so the
         * old conf is freed only after it has adopted them. */
        pi->port->session_reconfigure(s->uplink, conf);
        free(s->conf);
        s->conf = conf;
    }
}

int child_sessions_route(struct child_sessions *set, const char *child, struct child_session **out)
{
    struct profile_instance *pi = set->pi;
    struct child_session *s = find(set->open, child), *stopping;
    int rc;

    *out = NULL;
    if (!s && (stopping = find(set->stopping, child))) {
        if (stopping->was_no_key) {
            no_key_reason(stopping);
            return -EINVAL;
        }
        /* Its old session is still closing (a few ms) and owns the spool
         * directory: not taken now, so a QoS 1/2 message is not
         * acknowledged and the local client sends it again. */
        log_child(LOG_INFO, pi->uc->name, child,
                  "a message arrived while its session was closing; not taken, the local "
                  "client re-sends it");
        return -EAGAIN;
    }
    if (!s && (rc = session_open(set, child, false, &s)) < 0)
        return rc;
    s->used_ms = uv_now(pi->loop);
    if (state_of(s) == SESSION_NO_KEY) {
        /* Closing it lets the next message try the credential again; what
         * it spooled stays on disk. */
        no_key_reason(s);
        stop(s, "no usable credential");
        return -EINVAL;
    }
    *out = s;
    return 0;
}

/* "state" of a session for status: the uplink's while running. */
static const char *state_text(const struct child_session *s)
{
    const struct profile_port *port = s->set->pi->port;

    if (state_of(s) == SESSION_RUNNING)
        return port->state_name(port->state(s->uplink));
    return sm_state_name(&session_sm, sm_state(&s->sm));
}

void child_sessions_status_json(const struct child_sessions *set, struct json_buf *out)
{
    size_t open = 0, online = 0, connecting = 0, backoff = 0, no_key = 0, stopping = 0;
    const struct profile_port *port;
    uint64_t queued = 0;

    if (!set || !set->ops->enabled(set->pi))
        return;
    port = set->pi->port;
    for (const struct child_session *s = set->open; s; s = s->next) {
        struct uplink_stats stats;
        open++;
        port->stats(s->uplink, &stats);
        queued += stats.spool.depth;
        if (state_of(s) == SESSION_NO_KEY)
            no_key++;
        else if (state_of(s) != SESSION_RUNNING)
            connecting++;
        else if (port->state(s->uplink) == UPLINK_ONLINE)
            online++;
        else if (port->state(s->uplink) == UPLINK_BACKOFF)
            backoff++;
        else
            connecting++;
    }
    for (const struct child_session *s = set->stopping; s; s = s->next)
        stopping++;
    json_append_fmt(out,
                    ",\"sessions\":{\"open\":%zu,\"online\":%zu,\"connecting\":%zu,"
                    "\"backoff\":%zu,\"no_key\":%zu,\"stopping\":%zu,\"queued\":%llu}",
                    open, online, connecting, backoff, no_key, stopping,
                    (unsigned long long)queued);
}

void child_sessions_child_json(const struct child_sessions *set, const char *child,
                               struct json_buf *out)
{
    const char *self;
    const struct child_session *s;
    struct uplink_stats stats;

    if (!set || !set->ops->enabled(set->pi))
        return;
    self = set->ops->self(set->pi);
    if (self && strcmp(child, self) == 0)
        return;
    s = find(set->open, child);
    if (!s) {
        json_append_raw(out, ",\"session\":null");
        return;
    }
    set->pi->port->stats(s->uplink, &stats);
    json_append_raw(out, ",\"session\":{\"state\":");
    json_append_string(out, state_text(s));
    json_append_fmt(out, ",\"queued\":%llu,\"published\":%llu,\"connects\":%llu}",
                    (unsigned long long)stats.spool.depth, (unsigned long long)stats.published,
                    (unsigned long long)stats.connects);
}
