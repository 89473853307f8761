/* akenza.c - akenza (docs.akenza.io, "MQTT device connectivity"
 * with JWT authentication).
 *
 * Session: client id = the akenza device id (akenza.device, default
 * gateway.id), user name ignored, password a JWT (RS256 or ES256) with
 * aud https://akenza.io/devices/<id> (auth.aud may say otherwise: older
 * docs use the bare id), sub = the device id and the header kid = hex
 * SHA-256 of the public key's DER; section.c fills those defaults.
 *
 * Topics:
 *   dev/<id>/telemetry[/<sub>] -> /up/device/id/<id>[/<sub>]
 *   dev/<id>/state[/<sub>]     -> /up/device/id/<id>/state[/<sub>]
 *   /down/device/id/<id>/config[/...] -> dev/<id>/config (retained locally)
 *   /down/device/id/<id>[/<rest>]     -> dev/<id>/commands[/<rest>]
 * akenza leaves the downlink sub-topic to the application, so "config" is
 * the one name given a meaning here; everything else is a command.
 *
 * akenza has no gateways: every device needs a session of its own. The
 * uplink itself is akenza.device. With akenza.child_key, every other child
 * gets its own upstream session (per-device sessions): a struct uplink of
 * this profile's, with the uplink's settings but the child's client id,
 * key (the file the pattern names), aud and sub, opened on the child's
 * first message and stopped after akenza.session_idle without messages.
 * Their messages leave through the router like any other (profile_msg
 * .uplink names the session), but their queues are in memory: a restart
 * loses what they had not sent. Reconnects after an outage are spread by
 * each session's own decorrelated-jitter backoff (uplink.c). Without
 * child_key other children are refused with the reason.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "conf.h"
#include "profiles/akenza/section.h"
#include "json.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile.h"
#include "akenza.h"
#include "profile_spec.h"
#include "sm.h"
#include "util.h"

/* The idle sweep runs at session_idle / 2, within these bounds. */
#define AKENZA_SWEEP_MIN_MS 500u
#define AKENZA_SWEEP_MAX_MS 60000u

#define AKENZA_UP   "/up/device/id/"
#define AKENZA_DOWN "/down/device/id/"

int akenza_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason)
{
    int n;

    switch (m->channel) {
    case MAPPING_TELEMETRY:
        n = m->sub ? snprintf(buf, cap, AKENZA_UP "%s/%s", m->child, m->sub)
                   : snprintf(buf, cap, AKENZA_UP "%s", m->child);
        break;
    case MAPPING_STATE:
        n = m->sub ? snprintf(buf, cap, AKENZA_UP "%s/state/%s", m->child, m->sub)
                   : snprintf(buf, cap, AKENZA_UP "%s/state", m->child);
        break;
    default:
        *reason = "the akenza profile carries the telemetry and state channels only";
        return -EINVAL;
    }
    return profile_topic_result(n, cap, reason);
}

int akenza_down_topic(const char *local_prefix, const char *topic, char *buf, size_t cap,
                      bool *config)
{
    const char *id = topic + strlen(AKENZA_DOWN);
    const char *rest;
    size_t id_len;
    int n;

    *config = false;
    if (strncmp(topic, AKENZA_DOWN, strlen(AKENZA_DOWN)) != 0)
        return 0;
    rest = strchr(id, '/');
    id_len = rest ? (size_t)(rest - id) : strlen(id);
    if (id_len == 0 || id_len > MAPPING_CHILD_MAX || mapping_child_check(id, id_len) != NULL)
        return -EINVAL;
    if (rest && rest[1] == '\0')
        rest = NULL; /* "/down/device/id/<id>/": no sub-topic */
    else if (rest)
        rest++;
    if (rest && (strcmp(rest, "config") == 0 || strncmp(rest, "config/", 7) == 0)) {
        *config = true;
        n = snprintf(buf, cap, "%s/%.*s/config", local_prefix, (int)id_len, id);
    } else if (rest) {
        n = snprintf(buf, cap, "%s/%.*s/commands/%s", local_prefix, (int)id_len, id, rest);
    } else {
        n = snprintf(buf, cap, "%s/%.*s/commands", local_prefix, (int)id_len, id);
    }
    if (n < 0 || (size_t)n >= cap)
        return -ENAMETOOLONG;
    return n;
}

int akenza_child_aud(const char *device_aud, const char *device, const char *child, char *buf,
                     size_t cap)
{
    size_t prefix = strlen("https://akenza.io/devices/");
    int n;

    if (strncmp(device_aud, "https://akenza.io/devices/", prefix) == 0 &&
        strcmp(device_aud + prefix, device) == 0)
        n = snprintf(buf, cap, "https://akenza.io/devices/%s", child);
    else if (strcmp(device_aud, device) == 0)
        n = snprintf(buf, cap, "%s", child);
    else
        n = snprintf(buf, cap, "%s", device_aud);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : n;
}

/* --- per-device sessions ------------------------------------------------------------- */

/* A session's life:
 *   KEY_LOADING (spool open, uplink created, the key read on the threadpool)
 *   -> RUNNING (uplink started) | NO_KEY (the key could not be used: the
 *   uplink is never started, what it spooled stays on disk)
 *   any -> STOPPING (uplink_stop(), then freed once the uplink and a running
 *   key load have both finished). */
enum session_state {
    SESSION_KEY_LOADING,
    SESSION_RUNNING,
    SESSION_NO_KEY,
    SESSION_STOPPING,
};

struct akenza_session {
    struct akenza_session *next;
    struct profile_instance *pi;
    struct uplink *uplink;
    struct conf_uplink *conf; /* owned; borrowed by the uplink */
    struct sm sm;             /* enum session_state, see session_states */
    bool was_no_key;          /* stopped from NO_KEY: new messages are refused, not delayed */
    bool work_busy;           /* key_work queued or running */
    bool uplink_done;         /* uplink stopped and freed (or never made) */
    bool remove_dir;          /* the spool was empty at the end: delete its directory */
    uv_work_t key_work;
    /* Written by the worker, read after it on the loop thread. */
    EVP_PKEY *loaded;
    int key_rc;
    char key_err[KEYS_ERR_SIZE];
    EVP_PKEY *key; /* owned, once loaded */
    enum jwt_alg alg;
    char *key_path;             /* owned */
    char *name;                 /* "<uplink>.<child>", owned */
    char *aud;                  /* owned */
    char *spool_dir;            /* owned; NULL: memory spool */
    struct conf_jwt_claim sub;  /* "sub" = the child id (value points to id) */
    struct conf_akenza section; /* conf->section: the uplink's, with the child's id */
    uint64_t used_ms;           /* uv_now() of its last message */
    char id[];
};

/* A child's session:
 *
 *     KEY_LOADING --key read, uplink started--> RUNNING
 *          |                                       |
 *          +--no usable key--> NO_KEY              |
 *          |                     |                 |
 *          +---------------------+-----------------+--> STOPPING
 *
 * The names are what `uplinkctl status` shows. */
static const struct sm_state session_states[] = {
    [SESSION_KEY_LOADING] = {"loading-key", SM_TO(SESSION_RUNNING) | SM_TO(SESSION_NO_KEY) |
                                                SM_TO(SESSION_STOPPING)},
    [SESSION_RUNNING] = {"running", SM_TO(SESSION_STOPPING)},
    [SESSION_NO_KEY] = {"no-key", SM_TO(SESSION_STOPPING)},
    [SESSION_STOPPING] = {"STOPPING", 0},
};

static void session_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    snprintf(buf, size, "session %s", container_of(sm, struct akenza_session, sm)->id);
}

static const char *session_sm_uplink(const struct sm *sm)
{
    return container_of(sm, struct akenza_session, sm)->pi->uc->name;
}

/* RUNNING means the key is loaded and handed to the session's uplink. */
static bool session_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct akenza_session *s = container_of(sm, struct akenza_session, sm);

    if (sm_state(sm) == SESSION_RUNNING && (s->key == NULL || s->work_busy)) {
        snprintf(why, size, "running %s", s->key == NULL ? "without a key" : "while loading one");
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

static enum session_state session_state_of(const struct akenza_session *s)
{
    return (enum session_state)sm_state(&s->sm);
}

struct akenza {
    struct akenza_session *sessions; /* open */
    struct akenza_session *stopping; /* stopped, waiting for their uplink to finish */
    uv_timer_t sweep;
    bool sweep_closed;
    bool scanned; /* the devices' spools were looked at (akenza_scan) */
};

static struct akenza *akenza_of(const struct profile_instance *pi)
{
    return pi->state;
}

static void session_free(struct akenza_session *s)
{
    free(s->conf);
    EVP_PKEY_free(s->key);
    EVP_PKEY_free(s->loaded);
    free(s->key_path);
    free(s->name);
    free(s->aud);
    free(s->spool_dir);
    free(s);
}

static struct akenza_session *session_find(struct akenza_session *list, const char *child)
{
    for (; list; list = list->next) {
        if (strcmp(list->id, child) == 0)
            return list;
    }
    return NULL;
}

static void session_unlink(struct akenza_session **list, struct akenza_session *s)
{
    for (struct akenza_session **link = list; *link; link = &(*link)->next) {
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

static int akenza_dir_encode(const char *child, char *buf, size_t cap)
{
    int n = child[0] == '.' || child[0] == '%'
                ? snprintf(buf, cap, "%%%02X%s", (unsigned char)child[0], child + 1)
                : snprintf(buf, cap, "%s", child);
    /* NAME_MAX: a 255-byte id starting with '.' does not fit. */
    return n < 0 || (size_t)n >= cap || n > 255 ? -ENAMETOOLONG : n;
}

static int akenza_dir_decode(const char *name, char *child, size_t cap)
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
static void session_remove_dir(const struct akenza_session *s)
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
        log_child(LOG_WARNING, s->pi->uc->name, s->id,
                  "its session's spool is empty but %s stays: %s", s->spool_dir, strerror(errno));
}

/* The session's settings: the uplink's, with the child's identity; its
 * spool follows the uplink's spool settings (durability, max_bytes,
 * overflow, ...) in a directory of its own. */
static struct conf_uplink *session_conf(const struct profile_instance *pi, struct akenza_session *s)
{
    struct conf_uplink *conf = malloc(sizeof(*conf));

    if (!conf)
        return NULL;
    *conf = *pi->uc;
    conf->name = s->name;
    conf->client_id = (char *)s->id;
    s->section = *akenza_conf(pi->uc);
    s->section.device = (char *)s->id;
    s->section.child_key = NULL;
    conf->section = &s->section;
    conf->cert_cn = NULL;
    conf->auth.jwt.key = s->key_path;
    conf->auth.jwt.passphrase_file = NULL;
    conf->auth.jwt.private_key = s->key; /* NULL until loaded: not started before */
    conf->auth.jwt.alg = s->alg;
    conf->auth.jwt.aud = s->aud;
    conf->auth.jwt.kid_mode = JWT_KID_FINGERPRINT; /* akenza identifies the key by it */
    conf->auth.jwt.kid = NULL;
    conf->auth.jwt.claims = (struct conf_jwt_claim *)&s->sub;
    conf->auth.jwt.claim_count = 1;
    return conf;
}

static void session_message_cb(void *arg, struct uplink *uplink, const char *topic,
                               const void *payload, size_t len, int qos, bool retain)
{
    struct akenza_session *s = arg;
    struct profile_instance *pi = s->pi;
    char local_topic[PROFILE_TOPIC_MAX];
    bool config;
    int n = akenza_down_topic(pi->conf->local.topic_prefix, topic, local_topic, sizeof(local_topic),
                              &config);

    (void)uplink;
    if (n == -EINVAL)
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
    if (n > 0)
        profile_deliver(pi, local_topic, payload, len, qos > 1 ? 1 : qos, retain || config);
}

static const char *session_connack_text_cb(void *arg, struct uplink *uplink, int rc)
{
    (void)arg;
    (void)uplink;
    return akenza_connack_text(rc);
}

static void maybe_closed(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);

    if (pi->closing && ak->sweep_closed && !ak->sessions && !ak->stopping)
        profile_instance_closed(pi);
}

/* Free a stopping session once nothing runs for it any more. */
static void session_release(struct akenza_session *s)
{
    struct profile_instance *pi = s->pi;

    if (s->work_busy || !s->uplink_done)
        return;
    session_unlink(&akenza_of(pi)->stopping, s);
    if (s->remove_dir && s->spool_dir)
        session_remove_dir(s);
    session_free(s);
    maybe_closed(pi);
}

static void session_stopped_cb(struct uplink *uplink, void *arg)
{
    struct akenza_session *s = arg;
    struct uplink_stats stats;

    s->pi->port->stats(uplink, &stats);
    s->remove_dir = stats.spool.depth == 0 && stats.spool.io_error == 0;
    if (!s->remove_dir && s->spool_dir)
        log_child(LOG_INFO, s->pi->uc->name, s->id,
                  "%llu message(s) stay in %s and are sent when its session opens again "
                  "(its next message or the next start)",
                  (unsigned long long)stats.spool.depth, s->spool_dir);
    s->pi->port->session_free(uplink);
    s->uplink = NULL;
    s->uplink_done = true;
    session_release(s);
}

/* Stop @s (open) for @why; it is freed once its uplink has finished. */
static void session_stop(struct profile_instance *pi, struct akenza_session *s, const char *why)
{
    struct akenza *ak = akenza_of(pi);
    unsigned timeout_ms = pi->conf->shutdown_timeout_ms ? pi->conf->shutdown_timeout_ms : 5000;

    session_unlink(&ak->sessions, s);
    s->next = ak->stopping;
    ak->stopping = s;
    s->was_no_key = session_state_of(s) == SESSION_NO_KEY;
    sm_move(&s->sm, SESSION_STOPPING, NULL);
    if (s->work_busy)
        uv_cancel((uv_req_t *)&s->key_work); /* fails harmlessly once it runs */
    log_child(LOG_INFO, pi->uc->name, s->id, "closing its session: %s", why);
    pi->port->session_stop(s->uplink, timeout_ms, session_stopped_cb, s);
}

/* One key file load at a time: an OpenSSL engine (a pkcs11: pattern) is not
 * known to be safe for concurrent loads; files take microseconds anyway. */
static pthread_mutex_t akenza_key_lock = PTHREAD_MUTEX_INITIALIZER;

/* Threadpool: read and parse the child's key (file access and, for a
 * pkcs11: URI, a token round trip stay off the loop). Touches only the
 * worker fields. */
static void session_key_work_cb(uv_work_t *req)
{
    struct akenza_session *s = req->data;

    pthread_mutex_lock(&akenza_key_lock);
    s->key_rc = keys_load_private(s->key_path, NULL, &s->loaded, s->key_err, sizeof(s->key_err));
    pthread_mutex_unlock(&akenza_key_lock);
    /* Release this threadpool thread's OpenSSL state (error queue, DRBG):
     * libuv's threads outlive OPENSSL_cleanup(), so it would be lost at exit
     * (valgrind "definitely lost"); see conn_work_cb in uplink.c. */
    OPENSSL_thread_stop();
}

/* The key's JWT algorithm (akenza takes RS256 and ES256), or -EINVAL. */
static int session_key_alg(EVP_PKEY *key, enum jwt_alg *alg)
{
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA)
        *alg = JWT_ALG_RS256;
    else if (EVP_PKEY_get_base_id(key) == EVP_PKEY_EC && EVP_PKEY_get_bits(key) == 256)
        *alg = JWT_ALG_ES256;
    else
        return -EINVAL;
    return 0;
}

static void session_key_after_cb(uv_work_t *req, int status)
{
    struct akenza_session *s = req->data;
    struct profile_instance *pi = s->pi;
    char reason[PROFILE_REASON_MAX];
    int rc;

    s->work_busy = false;
    if (session_state_of(s) == SESSION_STOPPING || status < 0) {
        session_release(s);
        return;
    }
    rc = s->key_rc;
    if (rc == 0 && session_key_alg(s->loaded, &s->alg) < 0) {
        snprintf(s->key_err, sizeof(s->key_err),
                 "%.200s is neither RSA nor EC P-256 (akenza takes RS256 and ES256)", s->key_path);
        rc = -EINVAL;
    }
    if (rc < 0) {
        struct uplink_stats stats;
        s->pi->port->stats(s->uplink, &stats);
        sm_move(&s->sm, SESSION_NO_KEY, NULL);
        snprintf(reason, sizeof(reason),
                 "akenza needs a session and key per device, and this child has no usable key "
                 "(akenza.child_key): %.140s",
                 s->key_err);
        profile_report_error(pi, NULL, reason);
        log_child(LOG_ERR, pi->uc->name, s->id,
                  "its session cannot connect; %llu queued message(s) stay in its spool until "
                  "the key is fixed",
                  (unsigned long long)stats.spool.depth);
        return;
    }
    s->key = s->loaded;
    s->loaded = NULL;
    s->conf->auth.jwt.private_key = s->key;
    s->conf->auth.jwt.alg = s->alg;
    rc = s->pi->port->session_start(s->uplink);
    if (rc < 0) {
        log_child(LOG_ERR, pi->uc->name, s->id, "cannot start its session: %s", strerror(-rc));
        sm_move(&s->sm, SESSION_NO_KEY, NULL); /* retried when it is reopened */
        return;
    }
    sm_move(&s->sm, SESSION_RUNNING, NULL);
}

/* Open @child's session: spool (recovered now), uplink, subscription; the
 * key is loaded on the threadpool and the uplink starts after it. With
 * @recovered (start-up scan) only when its spool holds something to send.
 * Returns 0 (*@out set, or NULL: nothing to send), -EINVAL with pi->reason
 * (no key file, unusable spool), -ENOMEM. */
static int session_open(struct profile_instance *pi, const char *child, bool recovered,
                        struct akenza_session **out)
{
    struct akenza *ak = akenza_of(pi);
    struct uplink_hooks hooks = {.message_cb = session_message_cb,
                                 .connack_text_cb = session_connack_text_cb};
    char path[4096], aud[1024], filter[PROFILE_TOPIC_MAX], dir[4096], enc[300];
    struct uplink_stats stats;
    struct akenza_session *s;
    size_t name_len;
    int rc, n;

    *out = NULL;
    if (profile_child_key_path(akenza_conf(pi->uc)->child_key, child, path, sizeof(path)) < 0 ||
        akenza_child_aud(pi->uc->auth.jwt.aud ? pi->uc->auth.jwt.aud : "",
                         akenza_conf(pi->uc)->device, child, aud, sizeof(aud)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "the key path or aud for this child is too long");
        return -EINVAL;
    }
    /* Refuse a child without a key file before taking its data; whether the
     * file holds a usable key is learnt on the threadpool. access() is a
     * stat of a local file, not a read. */
    if (!recovered && !keys_is_uri(path) && access(path, R_OK) < 0) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "akenza needs a session and key per device, and this child has no usable key "
                 "(akenza.child_key): cannot read %.120s: %s",
                 path, strerror(errno));
        return -EINVAL;
    }
    s = calloc(1, sizeof(*s) + strlen(child) + 1);
    if (!s)
        return -ENOMEM;
    strcpy(s->id, child);
    s->pi = pi;
    s->uplink_done = true; /* until there is an uplink */
    sm_init(&s->sm, &session_sm, SESSION_KEY_LOADING);
    s->sub.name = "sub";
    s->sub.value = s->id;
    s->key_work.data = s;
    s->alg = JWT_ALG_ES256; /* replaced once the key is read */
    name_len = strlen(pi->uc->name) + 1 + strlen(child) + 1;
    s->name = malloc(name_len);
    s->key_path = strdup(path);
    s->aud = strdup(aud);
    if (!s->name || !s->key_path || !s->aud) {
        rc = -ENOMEM;
        goto err;
    }
    snprintf(s->name, name_len, "%s.%s", pi->uc->name, child);
    if (pi->uc->spool.durability == CONF_SPOOL_FSYNC) {
        if ((n = devices_dir(pi, dir, sizeof(dir))) < 0 ||
            akenza_dir_encode(child, enc, sizeof(enc)) < 0 ||
            snprintf(dir + n, sizeof(dir) - (size_t)n, "/%s", enc) >= (int)(sizeof(dir) - n)) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "the child id is too long for a spool directory of its own");
            rc = -EINVAL;
            goto err;
        }
        if (!(s->spool_dir = strdup(dir))) {
            rc = -ENOMEM;
            goto err;
        }
    }
    s->conf = session_conf(pi, s);
    if (!s->conf) {
        rc = -ENOMEM;
        goto err;
    }
    hooks.arg = s;
    rc = pi->port->session_new(pi->loop, s->conf, pi->conf->gateway_id, &hooks, &s->uplink);
    if (rc < 0)
        goto err;
    s->uplink_done = false;
    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", child);
    if ((rc = pi->port->session_open_spool(s->uplink, s->spool_dir)) < 0) {
        snprintf(pi->reason, sizeof(pi->reason), "cannot open the child's spool in %.150s: %s",
                 s->spool_dir ? s->spool_dir : "memory", strerror(-rc));
        rc = -EINVAL;
        goto err_after_uplink;
    }
    if ((rc = pi->port->subscribe(s->uplink, filter, 1)) < 0)
        goto err_after_uplink;
    s->used_ms = uv_now(pi->loop);
    s->next = ak->sessions;
    ak->sessions = s;
    s->pi->port->stats(s->uplink, &stats);
    if (recovered && stats.spool.depth == 0) {
        /* Nothing to send: close it again, which deletes the directory. */
        session_stop(pi, s, "its spool holds nothing to send");
        return 0;
    }
    rc = uv_queue_work(pi->loop, &s->key_work, session_key_work_cb, session_key_after_cb);
    if (rc < 0) {
        sm_move(&s->sm, SESSION_NO_KEY, NULL);
        snprintf(s->key_err, sizeof(s->key_err), "cannot queue the key load: %s", uv_strerror(rc));
    } else {
        s->work_busy = true;
    }
    if (recovered)
        log_child(LOG_INFO, pi->uc->name, child,
                  "%llu message(s) recovered from %s; opening its session as %s to send them",
                  (unsigned long long)stats.spool.depth, s->spool_dir, s->name);
    else
        log_child(LOG_INFO, pi->uc->name, child, "opening a session of its own as %s (key %s)",
                  s->name, path);
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
 * while the cloud was away, an idle close with a broken key) get their
 * session back now, so those messages leave without waiting for the
 * child's next message. Spool recovery is synchronous, like the uplink's
 * own, and runs before READY=1. */
static void akenza_scan(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);
    char dir[4096], child[MAPPING_CHILD_MAX + 1];
    struct akenza_session *s;
    struct dirent *de;
    DIR *d;

    if (!akenza_conf(pi->uc)->child_key || ak->scanned ||
        pi->uc->spool.durability != CONF_SPOOL_FSYNC)
        return;
    ak->scanned = true;
    if (devices_dir(pi, dir, sizeof(dir)) < 0 || !(d = opendir(dir)))
        return; /* none yet */
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        if (akenza_dir_decode(de->d_name, child, sizeof(child)) < 0 ||
            strcmp(child, akenza_conf(pi->uc)->device) == 0) {
            log_uplink(LOG_WARNING, pi->uc->name, "%s/%s is not the spool of a child id; ignored",
                       dir, de->d_name);
            continue;
        }
        if (session_find(ak->sessions, child) || session_find(ak->stopping, child))
            continue;
        pi->reason[0] = '\0';
        if (session_open(pi, child, true, &s) < 0)
            log_child(LOG_ERR, pi->uc->name, child, "cannot reopen its session: %s", pi->reason);
    }
    closedir(d);
}

static void stop_all(struct profile_instance *pi, const char *why)
{
    while (akenza_of(pi)->sessions)
        session_stop(pi, akenza_of(pi)->sessions, why);
}

static void sweep_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;
    uint64_t now = uv_now(pi->loop);
    struct akenza_session *s, *next;

    for (s = akenza_of(pi)->sessions; s; s = next) {
        struct uplink_stats stats;
        next = s->next;
        if (now - s->used_ms < akenza_conf(pi->uc)->session_idle_ms)
            continue;
        if (session_state_of(s) == SESSION_NO_KEY) {
            /* Its spool stays on disk; the next message or start retries. */
            session_stop(pi, s, "idle, without a usable key");
            continue;
        }
        if (session_state_of(s) != SESSION_RUNNING)
            continue;
        /* Unsent messages keep it open until they are acknowledged, so a
         * session's spool never waits on disk for a message that may not
         * come; an idle, empty session holds no fds. */
        s->pi->port->stats(s->uplink, &stats);
        if (stats.queued == 0)
            session_stop(pi, s, "idle");
    }
}

static void sweep_start(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);
    uint64_t every = akenza_conf(pi->uc)->session_idle_ms / 2;

    uv_timer_stop(&ak->sweep);
    if (!akenza_conf(pi->uc)->child_key)
        return;
    every = every < AKENZA_SWEEP_MIN_MS ? AKENZA_SWEEP_MIN_MS : every;
    every = every > AKENZA_SWEEP_MAX_MS ? AKENZA_SWEEP_MAX_MS : every;
    uv_timer_start(&ak->sweep, sweep_cb, every, every);
}

static int akenza_new_cb(struct profile_instance *pi)
{
    struct akenza *ak = calloc(1, sizeof(*ak));

    if (!ak)
        return -ENOMEM;
    pi->state = ak;
    uv_timer_init(pi->loop, &ak->sweep);
    uv_unref((uv_handle_t *)&ak->sweep);
    ak->sweep.data = pi;
    sweep_start(pi);
    akenza_scan(pi);
    return 0;
}

static void akenza_free_cb(struct profile_instance *pi)
{
    struct akenza *ak = akenza_of(pi);

    /* close_cb stopped every session and waited for them. */
    free(ak);
    pi->state = NULL;
}

static void sweep_closed_cb(uv_handle_t *handle)
{
    struct profile_instance *pi = handle->data;

    akenza_of(pi)->sweep_closed = true;
    maybe_closed(pi);
}

static void akenza_close_cb(struct profile_instance *pi)
{
    stop_all(pi, "stopping");
    uv_close((uv_handle_t *)&akenza_of(pi)->sweep, sweep_closed_cb);
}

/* A reload: sessions take the uplink's new settings (a changed one
 * reconnects), or close when per-device sessions were turned off (their
 * spools stay on disk for when they are turned on again). */
static void akenza_reconfigure_cb(struct profile_instance *pi)
{
    sweep_start(pi);
    if (!akenza_conf(pi->uc)->child_key) {
        stop_all(pi, "akenza.child_key was removed");
        akenza_of(pi)->scanned = false;
        return;
    }
    akenza_scan(pi);
    for (struct akenza_session *s = akenza_of(pi)->sessions; s; s = s->next) {
        char aud[1024];
        char *old_aud = s->aud, *new_aud = NULL;
        struct conf_uplink *conf = NULL;
        if (akenza_child_aud(pi->uc->auth.jwt.aud ? pi->uc->auth.jwt.aud : "",
                             akenza_conf(pi->uc)->device, s->id, aud, sizeof(aud)) >= 0 &&
            (new_aud = strdup(aud)) != NULL) {
            s->aud = new_aud;
            conf = session_conf(pi, s);
        }
        if (!conf) {
            s->aud = old_aud;
            free(new_aud);
            log_child(LOG_ERR, pi->uc->name, s->id,
                      "cannot adopt the new settings (out of memory)");
            continue;
        }
        /* The uplink compares the old settings with the new ones, so the
         * old conf and aud are freed only after it has adopted them. */
        s->pi->port->session_reconfigure(s->uplink, conf);
        free(s->conf);
        free(old_aud);
        s->conf = conf;
    }
}

/* "state" of a session for status: the uplink's while running. */
static const char *session_state_text(const struct akenza_session *s)
{
    if (session_state_of(s) == SESSION_RUNNING)
        return s->pi->port->state_name(s->pi->port->state(s->uplink));
    return sm_state_name(&session_sm, sm_state(&s->sm));
}

static void akenza_status_json_cb(const struct profile_instance *pi, struct json_buf *out)
{
    const struct akenza *ak = akenza_of(pi);
    size_t open = 0, online = 0, connecting = 0, backoff = 0, no_key = 0, stopping = 0;
    uint64_t queued = 0;

    if (!ak || !akenza_conf(pi->uc)->child_key)
        return;
    for (const struct akenza_session *s = ak->sessions; s; s = s->next) {
        struct uplink_stats stats;
        open++;
        s->pi->port->stats(s->uplink, &stats);
        queued += stats.spool.depth;
        if (session_state_of(s) == SESSION_NO_KEY)
            no_key++;
        else if (session_state_of(s) != SESSION_RUNNING)
            connecting++;
        else if (s->pi->port->state(s->uplink) == UPLINK_ONLINE)
            online++;
        else if (s->pi->port->state(s->uplink) == UPLINK_BACKOFF)
            backoff++;
        else
            connecting++;
    }
    for (const struct akenza_session *s = ak->stopping; s; s = s->next)
        stopping++;
    json_append_fmt(out,
                    ",\"sessions\":{\"open\":%zu,\"online\":%zu,\"connecting\":%zu,"
                    "\"backoff\":%zu,\"no_key\":%zu,\"stopping\":%zu,\"queued\":%llu}",
                    open, online, connecting, backoff, no_key, stopping,
                    (unsigned long long)queued);
}

static void akenza_child_json_cb(const struct profile_instance *pi, const char *child,
                                 struct json_buf *out)
{
    const struct akenza *ak = akenza_of(pi);
    const struct akenza_session *s;
    struct uplink_stats stats;

    if (!ak || !akenza_conf(pi->uc)->child_key || strcmp(child, akenza_conf(pi->uc)->device) == 0)
        return;
    s = session_find(ak->sessions, child);
    if (!s) {
        json_append_raw(out, ",\"session\":null");
        return;
    }
    s->pi->port->stats(s->uplink, &stats);
    json_append_raw(out, ",\"session\":{\"state\":");
    json_append_string(out, session_state_text(s));
    json_append_fmt(out, ",\"queued\":%llu,\"published\":%llu,\"connects\":%llu}",
                    (unsigned long long)stats.spool.depth, (unsigned long long)stats.published,
                    (unsigned long long)stats.connects);
}

static void akenza_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    session->client_id = akenza_conf(pi->uc)->device;
}

static void akenza_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    char filter[PROFILE_TOPIC_MAX];

    if (!akenza_conf(pi->uc)->device)
        return;
    snprintf(filter, sizeof(filter), AKENZA_DOWN "%s/#", akenza_conf(pi->uc)->device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
}

static int akenza_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                        const void *payload, size_t len, int qos, bool retain,
                        struct profile_msgs *out, const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];

    struct akenza_session *session = NULL, *stopping;
    int rc;

    (void)retain;
    if (!akenza_conf(pi->uc)->device)
        return -EINVAL;
    if (strcmp(m->child, akenza_conf(pi->uc)->device) != 0) {
        if (!akenza_conf(pi->uc)->child_key) {
            snprintf(pi->reason, sizeof(pi->reason),
                     "akenza has no gateways and this uplink is the device %s alone: other "
                     "children need a session of their own (set akenza.child_key)",
                     akenza_conf(pi->uc)->device);
            *reason = pi->reason;
            return -EINVAL;
        }
        session = session_find(akenza_of(pi)->sessions, m->child);
        if (!session && (stopping = session_find(akenza_of(pi)->stopping, m->child))) {
            if (stopping->was_no_key) {
                snprintf(pi->reason, sizeof(pi->reason),
                         "akenza needs a session and key per device, and this child has no "
                         "usable key (akenza.child_key): %.140s",
                         stopping->key_err);
                *reason = pi->reason;
                return -EINVAL;
            }
            /* Its old session is still closing (a few ms) and owns the
             * spool directory: not taken now, so a QoS 1/2 message is not
             * acknowledged and the local client sends it again. */
            log_child(LOG_INFO, pi->uc->name, m->child,
                      "a message arrived while its session was closing; not taken, the local "
                      "client re-sends it");
            return -EAGAIN;
        }
        if (!session && (rc = session_open(pi, m->child, false, &session)) < 0) {
            *reason = pi->reason;
            return rc;
        }
        session->used_ms = uv_now(pi->loop);
        if (session_state_of(session) == SESSION_NO_KEY) {
            /* Closing it lets the next message try the key again; what it
             * spooled stays on disk. */
            snprintf(pi->reason, sizeof(pi->reason),
                     "akenza needs a session and key per device, and this child has no usable "
                     "key (akenza.child_key): %.140s",
                     session->key_err);
            *reason = pi->reason;
            session_stop(pi, session, "no usable key");
            return -EINVAL;
        }
    }
    if (akenza_up_topic(m, topic, sizeof(topic), reason) < 0)
        return -EINVAL;
    /* akenza's broker takes QoS 0 and 1. */
    rc = profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, false);
    if (rc == 0 && session)
        out->msg[out->count - 1].uplink = session->uplink;
    return rc;
}

static void akenza_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                           size_t len, int qos, bool retain, struct profile_msgs *local)
{
    char local_topic[PROFILE_TOPIC_MAX];
    bool config;
    int n = akenza_down_topic(pi->conf->local.topic_prefix, topic, local_topic, sizeof(local_topic),
                              &config);

    if (n == -EINVAL)
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
    if (n <= 0)
        return;
    profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, retain || config);
}

const struct profile profile_akenza = {
    .name = "akenza",
    .new_cb = akenza_new_cb,
    .free_cb = akenza_free_cb,
    .close_cb = akenza_close_cb,
    .reconfigure_cb = akenza_reconfigure_cb,
    .session_cb = akenza_session_cb,
    .subscriptions_cb = akenza_subscriptions_cb,
    .up_cb = akenza_up_cb,
    .down_cb = akenza_down_cb,
    .status_json_cb = akenza_status_json_cb,
    .child_json_cb = akenza_child_json_cb,
};
