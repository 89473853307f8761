/* gcp.c - Google Cloud IoT Core and ClearBlade IoT Core (the same
 * MQTT bridge protocol).
 *
 * Session: client id projects/<p>/locations/<r>/registries/<g>/devices/<d>,
 * user name ignored by the server ("unused"), password a JWT whose aud is
 * the project id (section.c makes that the default auth.aud) and whose life is
 * at most 24 h (jwt.h JWT_GCP_MAX_LIFETIME_S; the uplink rotates it).
 *
 * Topics ("Publishing over the MQTT bridge"), for the gateway and for each
 * attached child:
 *   dev/<id>/telemetry[/<sub>] -> /devices/<id>/events[/<sub>]  (<= 256 KiB)
 *   dev/<id>/state             -> /devices/<id>/state           (<= 64 KiB,
 *                                 at most one per second and device: newer
 *                                 ones are coalesced, the newest wins)
 *   /devices/<id>/config       -> dev/<id>/config (retained locally)
 *   /devices/<id>/commands[/s] -> dev/<id>/commands[/s]
 *   /devices/<gw>/errors       -> explained in the log and on
 *                                 uplinkd/<uplink>/errors (gateway mode)
 * QoS 2 is never sent: the bridge closes the connection on it (QoS 2 ->
 * 1), and it keeps no retained messages (the flag is dropped).
 *
 * Gateway mode ("Using gateways with the MQTT bridge"): a child is attached
 * (QoS 1 on /devices/<child>/attach, {"authorization":"<child JWT>"} when
 * gcp.child_key names a key file for it, else {}) before its first message,
 * and its data waits for the PUBACK (profile_registration wait_ack). An
 * attachment holds for one connection: every child used within
 * gcp.attach_idle is attached again after a reconnect, and after a restart
 * (the known children are kept in <state_dir>/gcp/<uplink>), and an idle
 * child is detached. Its config and commands are subscribed after the attach is
 * acknowledged (the bridge refuses subscriptions for unattached devices),
 * and dropped from the uplink's set before the next connection so they are
 * not re-sent ahead of the attach. At most 1000 children are attached at a
 * time.
 *
 * Threading: the loop thread, except a child's own key (gcp.child_key):
 * it is read once (again when the file changes) and its tokens signed on the
 * libuv threadpool, ahead of need (see "child tokens" below). PKCS#11 child
 * keys are not offered.
 */
#include <errno.h>
#include <fnmatch.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "conf.h"
#include "profiles/gcp/section.h"
#include "json.h"
#include "jwt.h"
#include "keys.h"
#include "log.h"
#include "profile.h"
#include "gcp.h"
#include "profile_spec.h"
#include "registry.h"
#include "util.h"

/* The sweep for idle children runs at attach_idle / 2, within these bounds. */
#define GCP_SWEEP_MIN_MS 500u
#define GCP_SWEEP_MAX_MS 60000u

/* --- pure rules (gcp.h) --------------------------------------------------------- */

int gcp_up_topic(const struct mapping_local *m, char *buf, size_t cap, const char **reason)
{
    int n;

    switch (m->channel) {
    case MAPPING_TELEMETRY:
        if (m->sub)
            n = snprintf(buf, cap, "/devices/%s/events/%s", m->child, m->sub);
        else
            n = snprintf(buf, cap, "/devices/%s/events", m->child);
        break;
    case MAPPING_STATE:
        if (m->sub) {
            *reason = "GCP has one state per device: publish on dev/<child>/state without a "
                      "sub-topic";
            return -EINVAL;
        }
        n = snprintf(buf, cap, "/devices/%s/state", m->child);
        break;
    default:
        *reason = "the gcp profile carries the telemetry and state channels only";
        return -EINVAL;
    }
    return profile_topic_result(n, cap, reason);
}

enum gcp_down_kind gcp_down_parse(const char *topic, char *id, const char **sub)
{
    static const char prefix[] = "/devices/";
    const char *p, *slash;
    enum gcp_down_kind kind;
    size_t len;

    *sub = NULL;
    id[0] = '\0';
    if (strncmp(topic, prefix, sizeof(prefix) - 1) != 0)
        return GCP_DOWN_OTHER;
    p = topic + sizeof(prefix) - 1;
    slash = strchr(p, '/');
    if (!slash)
        return GCP_DOWN_OTHER;
    len = (size_t)(slash - p);
    if (strcmp(slash, "/config") == 0) {
        kind = GCP_DOWN_CONFIG;
    } else if (strcmp(slash, "/errors") == 0) {
        kind = GCP_DOWN_ERRORS;
    } else if (strcmp(slash, "/commands") == 0) {
        kind = GCP_DOWN_COMMANDS;
    } else if (strncmp(slash, "/commands/", 10) == 0) {
        kind = GCP_DOWN_COMMANDS;
        if (slash[10] != '\0')
            *sub = slash + 10;
    } else {
        return GCP_DOWN_OTHER;
    }
    if (len == 0 || len > MAPPING_CHILD_MAX || mapping_child_check(p, len) != NULL)
        return GCP_DOWN_BAD_ID;
    memcpy(id, p, len);
    id[len] = '\0';
    return kind;
}

const char *gcp_error_explain(const char *error_type)
{
    static const struct {
        const char *type;
        const char *text;
    } known[] = {
        {"GATEWAY_DEVICE_NOT_FOUND",
         "the cloud found no attached device for the message: the child is not registered in "
         "the registry, not bound to this gateway, or was not attached (create the device and "
         "bind it to the gateway)"},
        {"GATEWAY_ATTACHMENT_ERROR",
         "the attach was refused: the child is not bound to this gateway, or its JWT (gcp."
         "child_key) does not match a key registered for it, or the gateway's auth method needs "
         "one"},
        {"GATEWAY_DETACHMENT_DEVICE_ERROR",
         "the cloud detached the child because of an error of that device"},
        {"GATEWAY_INVALID_MQTT_TOPIC",
         "the cloud could not parse a topic: a malformed topic or an invalid device id"},
        {"GATEWAY_UNEXPECTED_PACKET_ID",
         "the cloud could not match a packet id (for example a SUBACK nobody asked for)"},
        {"GATEWAY_UNEXPECTED_MESSAGE_TYPE",
         "the cloud received a message it does not support (an unsupported subscription or "
         "packet)"},
    };

    for (size_t i = 0; error_type && i < sizeof(known) / sizeof(known[0]); i++) {
        if (strcmp(known[i].type, error_type) == 0)
            return known[i].text;
    }
    return "an error the gateway documentation does not describe";
}

/* --- per-child state ------------------------------------------------------------ */

/* A child's own key (gcp.child_key) and its newest token. The fields up to
 * `busy` are the worker's while busy is set and the loop's otherwise. */
struct gcp_key {
    /* Inputs, set on the loop before a job (key_inputs()). */
    char path[4096];
    char *aud;
    uint32_t lifetime_s;
    uint32_t skew_s;
    /* The loaded key and the file it came from (reloaded when it changes). */
    struct jwt_signer *signer;
    dev_t dev;
    ino_t ino;
    struct timespec mtime;
    off_t size;
    bool absent;       /* no file at path: attach with {} */
    char *token;       /* the newest token, or NULL */
    time_t signed_at;  /* wall clock it was signed at */
    time_t expires_at; /* its exp */
    int status;        /* the last job: 0 or a negative errno with err */
    char err[KEYS_ERR_SIZE];
    bool busy;      /* a threadpool job owns the fields above */
    bool done;      /* a job or a signature on the loop ran since the inputs changed */
    uv_work_t work; /* the job */
};

struct gcp_child {
    struct gcp_child *next;
    struct profile_instance *pi;
    uint64_t used_ms; /* uv_now() of its last local message */
    bool self;        /* the gateway's own device */
    bool subscribed;  /* its config and commands filters are in the uplink's set */
    bool unrouted;    /* a reload took it from this uplink (routes, gateway: false): detach */
    bool removed;     /* unlinked; freed once its timer is closed and its job done */
    bool state_sent;  /* a state went up at state_sent_ms */
    uint64_t state_sent_ms;
    uv_timer_t state_timer; /* the coalesced state's turn */
    bool timer_init;        /* the timer is open (closed by child_remove) */
    void *state_payload;    /* the newest coalesced state, or NULL */
    size_t state_len;
    int state_qos;
    struct gcp_key key;
    char reported[KEYS_ERR_SIZE]; /* the last key error reported, not repeated */
    char id[];
};

struct gcp {
    struct gcp_child *children;
    size_t attached; /* children other than the gateway itself */
    uv_timer_t sweep;
    bool sweep_init;
    unsigned closing;                     /* handles and jobs whose callback is still to come */
    struct profile_connect_id connect_id; /* the session's client id */
    char *known_path;                     /* <state_dir>/gcp/<uplink>, or NULL: not kept */
    bool known_dirty; /* the children list changed since known_path was written */
};

static struct gcp *gcp_of(const struct profile_instance *pi)
{
    return pi->state;
}

static bool is_self(const struct profile_instance *pi, const char *child)
{
    return gcp_conf(pi->uc)->device && strcmp(gcp_conf(pi->uc)->device, child) == 0;
}

static struct gcp_child *child_find(struct gcp *gcp, const char *id)
{
    for (struct gcp_child *c = gcp->children; c; c = c->next) {
        if (strcmp(c->id, id) == 0)
            return c;
    }
    return NULL;
}

/* Add @id to *@out. Returns 0, -EINVAL with *@reason beyond
 * GCP_MAX_ATTACHED children, -ENOMEM. */
static int child_add(struct profile_instance *pi, const char *id, struct gcp_child **out,
                     const char **reason)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child *child;
    bool self = is_self(pi, id);

    if (!self && gcp->attached >= GCP_MAX_ATTACHED) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "GCP allows at most %u devices attached to one gateway connection and %zu are "
                 "(idle ones are detached after gcp.attach_idle; lower it, or split the "
                 "children over several gateways)",
                 GCP_MAX_ATTACHED, gcp->attached);
        *reason = pi->reason;
        return -EINVAL;
    }
    child = calloc(1, sizeof(*child) + strlen(id) + 1);
    if (!child)
        return -ENOMEM;
    strcpy(child->id, id);
    child->pi = pi;
    child->self = self;
    child->next = gcp->children;
    gcp->children = child;
    if (!self) {
        gcp->attached++;
        gcp->known_dirty = true;
    }
    *out = child;
    return 0;
}

/* The key and token only (the inputs stay). */
static void key_drop_secret(struct gcp_key *key)
{
    jwt_signer_free(key->signer);
    key->signer = NULL;
    if (key->token) {
        explicit_bzero(key->token, strlen(key->token));
        free(key->token);
        key->token = NULL;
    }
}

/* Everything the key holds. */
static void key_clear(struct gcp_key *key)
{
    key_drop_secret(key);
    free(key->aud);
    key->aud = NULL;
}

static void child_free(struct gcp_child *child)
{
    key_clear(&child->key);
    free(child->state_payload);
    free(child);
}

/* A removed child: free it once nothing refers to it any more. */
static void child_settle(struct gcp_child *child)
{
    struct profile_instance *pi = child->pi;
    struct gcp *gcp = gcp_of(pi);

    if (child->timer_init || child->key.busy)
        return;
    child_free(child);
    if (--gcp->closing == 0 && pi->closing)
        profile_instance_closed(pi);
}

static void child_timer_closed_cb(uv_handle_t *handle)
{
    struct gcp_child *child = handle->data;

    child->timer_init = false;
    child_settle(child);
}

/* Take @child out of the list and start freeing it (its timer closes, its
 * job finishes). The caller has unlinked it and fixed gcp->attached. */
static void child_release(struct gcp_child *child)
{
    struct gcp *gcp = gcp_of(child->pi);

    child->removed = true;
    if (!child->timer_init && !child->key.busy) {
        child_free(child);
        return;
    }
    gcp->closing++;
    if (child->timer_init)
        uv_close((uv_handle_t *)&child->state_timer, child_timer_closed_cb);
    if (child->key.busy)
        uv_cancel((uv_req_t *)&child->key.work); /* fails once running: then it finishes */
}

/* Unlink @child and free it (after its timer closed and its job ended). */
static void child_remove(struct profile_instance *pi, struct gcp_child *child)
{
    struct gcp *gcp = gcp_of(pi);

    for (struct gcp_child **link = &gcp->children; *link; link = &(*link)->next) {
        if (*link == child) {
            *link = child->next;
            break;
        }
    }
    if (!child->self) {
        gcp->attached--;
        gcp->known_dirty = true;
    }
    child_release(child);
}

static void child_filters(const char *id, char *config, char *commands, size_t cap)
{
    snprintf(config, cap, "/devices/%s/config", id);
    snprintf(commands, cap, "/devices/%s/commands/#", id);
}

static void child_unsubscribe(struct profile_instance *pi, struct gcp_child *child)
{
    char config[PROFILE_TOPIC_MAX], commands[PROFILE_TOPIC_MAX];

    if (!child->subscribed)
        return;
    child_filters(child->id, config, commands, sizeof(config));
    pi->port->unsubscribe(pi->uplink, config);
    pi->port->unsubscribe(pi->uplink, commands);
    child->subscribed = false;
}

/* --- child tokens ------------------------------------------------------------------
 * A child with a key of its own attaches with {"authorization": "<JWT>"}
 * signed by that key. Reading a key and signing cost about 0.8 ms and 1.1 ms
 * (RSA-2048; ES256 signs in 0.05 ms), so a reconnect re-attaching 1000 RSA
 * children would hold the loop for about 2 s. The key is therefore read once
 * per child (again when the file changes) and tokens are signed on the libuv
 * threadpool ahead of need: when a child first appears while offline, and by
 * the sweep for every token past half its life. The re-attach after a
 * reconnect takes the cached tokens and signs nothing.
 *
 * The one signature left on the loop is a child's first attach while online
 * (or after a reload changed what the token carries): its data waits for the
 * attach's PUBACK (profile_registration.wait_ack), and the uplink has no way
 * to hold the spool for an attach that is not queued yet. */

/* A cached token is used while it has at least this long to live. */
#define GCP_TOKEN_MIN_LEFT_S 120

/* Loop thread: fill @key's inputs for @child from the live conf; when they
 * differ from what @key holds (first use, or a reload changed the pattern,
 * the project or the token's life), its key, token and error are dropped.
 * Returns 0, -ENAMETOOLONG (err set), -ENOMEM. */
static int key_inputs(struct profile_instance *pi, struct gcp_child *child, struct gcp_key *key)
{
    const struct conf_gcp *cg = gcp_conf(pi->uc);
    const struct conf_jwt *jwt = &pi->uc->auth.jwt;
    char path[sizeof(key->path)];

    if (profile_child_key_path(cg->child_key, child->id, path, sizeof(path)) < 0) {
        snprintf(key->err, sizeof(key->err), "gcp.child_key gives a path that is too long");
        return -ENAMETOOLONG;
    }
    if (key->aud && strcmp(key->aud, cg->project) == 0 && strcmp(key->path, path) == 0 &&
        key->lifetime_s == jwt->lifetime_s && key->skew_s == jwt->skew_s)
        return 0;
    key_clear(key);
    key->done = false;
    key->absent = false;
    key->status = 0;
    key->err[0] = '\0';
    memcpy(key->path, path, sizeof(path));
    /* "Using gateways": the child's JWT has the same form as a device's:
     * aud = the project id. */
    key->aud = strdup(cg->project);
    if (!key->aud)
        return -ENOMEM;
    key->lifetime_s = jwt->lifetime_s;
    key->skew_s = jwt->skew_s;
    return 0;
}

/* Any thread, on a key nobody else touches: (re)load the key when its file
 * changed and sign a new token. Sets key->status and key->err. */
static void key_refresh(struct gcp_key *key)
{
    struct jwt_claims claims = {.aud = key->aud,
                                .lifetime_s = key->lifetime_s,
                                .max_lifetime_s = JWT_GCP_MAX_LIFETIME_S,
                                .skew_s = key->skew_s};
    EVP_PKEY *pkey = NULL;
    struct stat st;
    enum jwt_alg alg;
    char *token = NULL;
    time_t now, expires_at = 0;
    int rc;

    key->done = true;
    key->status = 0;
    key->err[0] = '\0';
    key->absent = false;
    if (stat(key->path, &st) < 0 && errno == ENOENT) {
        /* No key of its own: the gateway's association is enough. */
        key_drop_secret(key);
        key->absent = true;
        return;
    }
    if (!key->signer || st.st_dev != key->dev || st.st_ino != key->ino || st.st_size != key->size ||
        st.st_mtim.tv_sec != key->mtime.tv_sec || st.st_mtim.tv_nsec != key->mtime.tv_nsec) {
        key_drop_secret(key);
        rc = keys_load_private(key->path, NULL, &pkey, key->err, sizeof(key->err));
        if (rc == 0 && jwt_alg_for_key(pkey, &alg) < 0) {
            snprintf(key->err, sizeof(key->err), "%.400s is neither an RSA nor a P-256 key",
                     key->path);
            rc = -EINVAL;
        }
        if (rc == 0)
            rc = jwt_signer_new(pkey, alg, JWT_KID_NONE, NULL, &key->signer, key->err,
                                sizeof(key->err));
        EVP_PKEY_free(pkey);
        if (rc < 0) {
            key->status = rc;
            return;
        }
        key->dev = st.st_dev;
        key->ino = st.st_ino;
        key->size = st.st_size;
        key->mtime = st.st_mtim;
    }
    now = time(NULL);
    rc = jwt_sign(key->signer, &claims, now, &token, &expires_at, key->err, sizeof(key->err));
    if (rc < 0) {
        key->status = rc;
        return;
    }
    if (key->token) {
        explicit_bzero(key->token, strlen(key->token));
        free(key->token);
    }
    key->token = token;
    key->signed_at = now;
    key->expires_at = expires_at;
}

/* Tell the operator about a key that cannot sign, once per distinct error. */
static void child_report_key(struct profile_instance *pi, struct gcp_child *child,
                             const struct gcp_key *key)
{
    char text[PROFILE_REASON_MAX + KEYS_ERR_SIZE];

    if (key->status >= 0) {
        child->reported[0] = '\0';
        return;
    }
    if (strcmp(child->reported, key->err) == 0)
        return;
    snprintf(child->reported, sizeof(child->reported), "%s", key->err);
    /* A broken key file is the operator's to fix; attaching with {} still
     * works when the gateway's own auth covers the child. */
    snprintf(text, sizeof(text), "cannot sign the attach token for %s: %s (attaching with {})",
             child->id, key->err);
    profile_report_error(pi, NULL, text);
}

/* Threadpool. */
static void key_work_cb(uv_work_t *work)
{
    key_refresh(container_of(work, struct gcp_key, work));
    /* Release this threadpool thread's OpenSSL state (error queue, DRBG):
     * libuv's threads outlive OPENSSL_cleanup(), so it would be lost at exit
     * (valgrind "definitely lost"); see conn_work_cb in uplink.c. */
    OPENSSL_thread_stop();
}

/* Loop thread: a job ended (or was cancelled). */
static void key_done_cb(uv_work_t *work, int status)
{
    struct gcp_key *key = container_of(work, struct gcp_key, work);
    struct gcp_child *child = container_of(key, struct gcp_child, key);

    key->busy = false;
    if (child->removed) {
        child_settle(child);
        return;
    }
    if (status == 0)
        child_report_key(child->pi, child, key);
}

/* Sign @child's next token on the threadpool when it has none yet, or its
 * token is past half its life, or its key file was missing or broken at the
 * last look (a key put in place later is picked up). */
static void key_prepare(struct profile_instance *pi, struct gcp_child *child)
{
    struct gcp_key *key = &child->key;
    time_t now = time(NULL);

    if (child->self || child->removed || pi->closing || !gcp_conf(pi->uc)->gateway ||
        !gcp_conf(pi->uc)->child_key || key->busy)
        return;
    if (key_inputs(pi, child, key) < 0) {
        key->status = -ENAMETOOLONG;
        child_report_key(pi, child, key);
        return;
    }
    if (key->done && key->status == 0 && key->token &&
        now < key->signed_at + (key->expires_at - key->signed_at) / 2)
        return;
    if (uv_queue_work(pi->loop, &key->work, key_work_cb, key_done_cb) == 0)
        key->busy = true;
}

/* Loop thread, at an attach: the token @child attaches with (a copy the
 * caller frees) in *@token, or NULL when it has no key of its own. A cached
 * token with GCP_TOKEN_MIN_LEFT_S to live is used as it is; otherwise the
 * key is read (when it is not cached) and a token signed here. Returns 0,
 * or a negative errno after reporting the key's error (attach with {}). */
static int child_token(struct profile_instance *pi, struct gcp_child *child, char **token)
{
    struct gcp_key scratch, *key = &child->key;
    time_t now = time(NULL);
    int rc;

    *token = NULL;
    if (!gcp_conf(pi->uc)->child_key)
        return 0;
    if (key->busy) {
        /* A job holds the cached key: sign with a copy of our own, once. */
        memset(&scratch, 0, sizeof(scratch));
        key = &scratch;
    }
    rc = key_inputs(pi, child, key);
    if (rc == 0 && (!key->done || key->status < 0 || key->absent || !key->token ||
                    key->expires_at - now < GCP_TOKEN_MIN_LEFT_S))
        key_refresh(key); /* on the loop: see "child tokens" above */
    if (rc < 0) {
        key->status = rc;
    } else if (key->status == 0 && key->token && !(*token = strdup(key->token))) {
        key->status = -ENOMEM;
        snprintf(key->err, sizeof(key->err), "out of memory");
    }
    rc = key->status < 0 ? key->status : 0;
    child_report_key(pi, child, key);
    if (key == &scratch)
        key_clear(&scratch);
    return rc;
}

/* --- known children across restarts -----------------------------------------------
 * An attachment holds for one connection, and after a restart the profile
 * starts with no children: data spooled for a child before the restart (or
 * a crash) would go up unattached, and the bridge refuses it (an error on
 * /devices/<gw>/errors, the message lost). So the children this profile
 * knows are kept in <state_dir>/gcp/<uplink>, one id a line after a header
 * line, rewritten atomically with mode 0600 (registry_write_file()) when a
 * child is added, before its message is spooled, so before the local
 * client is acknowledged, and when one is forgotten. The sweep forgets a
 * child only when nothing is queued, so every child that may have records
 * in the spool is in the file. gcp_new_cb() adds them back, and
 * gcp_online_cb() attaches them at the CONNACK like after any reconnect:
 * their attaches are queued as gated control messages before anything of
 * the spool is sent (uplink.c conn_flush_control()). */

#define GCP_KNOWN_HEADER   "# uplinkd gcp attached children 1\n"
#define GCP_KNOWN_FILE_MAX (1024u * 1024u) /* 1000 ids of at most 255 bytes fit */

/* Write the file when the children changed. Returns 0 (written, nothing
 * changed, or nothing to keep: no state_dir or spool.durability none, so no
 * spooled data survives a restart anyway), -ENOMEM or the write's error
 * (logged; tried again at the next change or message). */
static int known_save(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    struct json_buf text; /* just a string builder here */
    int rc;

    if (!gcp->known_dirty || !gcp->known_path || pi->uc->spool.durability == CONF_SPOOL_NONE)
        return 0;
    json_buf_init(&text);
    json_append_raw(&text, GCP_KNOWN_HEADER);
    for (struct gcp_child *child = gcp->children; child; child = child->next) {
        if (!child->self)
            json_append_fmt(&text, "%s\n", child->id);
    }
    rc = text.failed ? -ENOMEM : registry_write_file(gcp->known_path, text.data, text.len, 0600);
    json_buf_deinit(&text);
    if (rc < 0) {
        log_uplink(LOG_ERR, pi->uc->name,
                   "cannot write %s: %s; a new child's messages are not acknowledged until it "
                   "can be written (check the disk under gateway.state_dir)",
                   gcp->known_path, strerror(-rc));
        return rc;
    }
    gcp->known_dirty = false;
    return 0;
}

/* Start-up: <state_dir>/gcp/<uplink> (the directory made with mode 0700)
 * into gcp->known_path, and, in gateway mode, the children it lists back
 * into the list. A missing file is no children; a bad line is skipped with
 * a warning (the file is rewritten at the next change). Failures are
 * logged: the uplink works on, without what could not be restored. */
static void known_load(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    char dir[4096], *text = NULL, *line, *next;
    size_t len = 0, count = 0;
    unsigned line_no = 0;
    bool skipped = false;
    int rc;

    if (!pi->conf->state_dir)
        return;
    snprintf(dir, sizeof(dir), "%s/gcp", pi->conf->state_dir);
    if ((mkdir(pi->conf->state_dir, 0700) < 0 && errno != EEXIST) ||
        (mkdir(dir, 0700) < 0 && errno != EEXIST)) {
        log_uplink(LOG_WARNING, pi->uc->name,
                   "cannot create %s: %s; the attached children are not kept across restarts "
                   "(data spooled for a child goes up only after it publishes again)",
                   dir, strerror(errno));
        return;
    }
    if (asprintf(&gcp->known_path, "%s/%s", dir, pi->uc->name) < 0) {
        gcp->known_path = NULL;
        log_uplink(LOG_ERR, pi->uc->name, "out of memory: the attached children are not kept");
        return;
    }
    if (!gcp_conf(pi->uc)->gateway)
        return;
    rc = util_read_file(gcp->known_path, GCP_KNOWN_FILE_MAX, &text, &len);
    if (rc == -ENOENT)
        return;
    if (rc < 0) {
        log_uplink(LOG_ERR, pi->uc->name,
                   "cannot read %s: %s; children with data spooled before the restart are "
                   "attached only when they publish again",
                   gcp->known_path, strerror(-rc));
        return;
    }
    for (line = text; *line; line = next) {
        struct gcp_child *child;
        const char *why, *reason = NULL;
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        else
            next = line + strlen(line);
        line_no++;
        if (line[0] == '\0' || line[0] == '#')
            continue;
        why = gcp_id_check(line);
        if (!why)
            why = mapping_child_check(line, strlen(line));
        if (why) {
            log_uplink(LOG_WARNING, pi->uc->name, "%s line %u: skipped, not a child id: %s",
                       gcp->known_path, line_no, why);
            skipped = true;
            continue;
        }
        if (is_self(pi, line) || child_find(gcp, line))
            continue;
        rc = child_add(pi, line, &child, &reason);
        if (rc < 0) {
            log_uplink(LOG_WARNING, pi->uc->name, "%s line %u: %s: skipped", gcp->known_path,
                       line_no, rc == -ENOMEM ? "out of memory" : reason);
            skipped = true;
            continue;
        }
        child->used_ms = uv_now(pi->loop);
        key_prepare(pi, child); /* offline now: sign its token off the loop */
        count++;
    }
    free(text);
    /* child_add() marked the list changed, but the file says just that,
     * unless a line was skipped: then the next save drops it. */
    gcp->known_dirty = skipped;
    if (count)
        log_uplink(LOG_INFO, pi->uc->name,
                   "%zu children known before the restart (their data may be in the spool): "
                   "attaching them on connect before anything of it is sent",
                   count);
}

/* --- attach ---------------------------------------------------------------------- */

static int gcp_register_cb(struct profile_instance *pi, const char *id, struct profile_msgs *out,
                           struct profile_registration *how, const char **reason)
{
    struct gcp_child *child = child_find(gcp_of(pi), id);
    char topic[PROFILE_TOPIC_MAX];
    char *token = NULL;
    char *payload;
    int rc;

    if (is_self(pi, id) || !gcp_conf(pi->uc)->gateway)
        return 0;
    /* An attachment lives as long as the connection: one made now would
     * fail, and gcp_online_cb attaches every recent child at the next
     * CONNACK anyway. Its token is signed meanwhile, off the loop. */
    if (pi->port->state(pi->uplink) != UPLINK_ONLINE) {
        if (child)
            key_prepare(pi, child);
        return 0;
    }
    how->wait_ack = true;
    how->per_connection = true;
    if (child && child_token(pi, child, &token) < 0)
        token = NULL; /* reported; {} may still do */
    if (token) {
        size_t len = strlen(token) + sizeof("{\"authorization\":\"\"}");
        payload = malloc(len);
        if (payload)
            snprintf(payload, len, "{\"authorization\":\"%s\"}", token);
        explicit_bzero(token, strlen(token));
        free(token);
    } else {
        payload = strdup("{}");
    }
    if (!payload) {
        *reason = "out of memory";
        return -ENOMEM;
    }
    snprintf(topic, sizeof(topic), "/devices/%s/attach", id);
    rc = profile_msgs_add(out, topic, payload, strlen(payload), 1, false);
    explicit_bzero(payload, strlen(payload));
    free(payload);
    return rc;
}

static void gcp_registered_cb(struct profile_instance *pi, const char *id, int status)
{
    struct gcp_child *child = child_find(gcp_of(pi), id);
    char config[PROFILE_TOPIC_MAX], commands[PROFILE_TOPIC_MAX];

    if (status < 0 || !child || child->self || child->subscribed)
        return;
    /* After the attach: the bridge refuses subscriptions for devices that
     * are not attached. No narrower filter than commands/# is allowed. */
    child_filters(id, config, commands, sizeof(config));
    pi->port->subscribe(pi->uplink, config, 1);
    pi->port->subscribe(pi->uplink, commands, 1);
    child->subscribed = true;
}

/* Do the routes still send @id to this uplink? The same rule as router.c's
 * select_uplinks(): no routes = every child to every uplink. */
static bool child_routed(const struct profile_instance *pi, const char *id)
{
    const struct conf *conf = pi->conf;
    size_t index = (size_t)(pi->uc - conf->uplinks);

    if (conf->route_count == 0)
        return true;
    for (size_t r = 0; r < conf->route_count; r++) {
        if (fnmatch(conf->routes[r].children, id, 0) != 0)
            continue;
        for (size_t i = 0; i < conf->routes[r].uplink_count; i++) {
            if (conf->routes[r].uplinks[i] == index)
                return true;
        }
    }
    return false;
}

/* Detach @child when it may still be attached, and forget it. */
static void child_detach(struct profile_instance *pi, struct gcp_child *child, const char *why)
{
    char topic[PROFILE_TOPIC_MAX];

    if (registry_get(pi->registry, child->id) == REGISTRY_DONE &&
        pi->port->state(pi->uplink) == UPLINK_ONLINE) {
        snprintf(topic, sizeof(topic), "/devices/%s/detach", child->id);
        if (pi->port->send_first(pi->uplink, topic, "{}", 2, 1, UPLINK_CONTROL_CONNECTION, NULL,
                                 NULL) == 0)
            log_child(LOG_INFO, pi->uc->name, child->id, "detaching: %s", why);
    }
    child_unsubscribe(pi, child);
    registry_set(pi->registry, child->id, REGISTRY_UNKNOWN, false);
    child_remove(pi, child);
    known_save(pi); /* a failure is logged; a stale id only costs an attach */
}

static void sweep_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;
    struct gcp *gcp = gcp_of(pi);
    uint64_t now = uv_now(pi->loop);
    struct uplink_stats stats;
    struct gcp_child *child, *next;
    char why[96];

    pi->port->stats(pi->uplink, &stats);
    for (child = gcp->children; child; child = next) {
        next = child->next;
        if (child->self)
            continue;
        if (!child->unrouted &&
            (child->state_payload || now - child->used_ms < gcp_conf(pi->uc)->attach_idle_ms)) {
            key_prepare(pi, child);
            continue;
        }
        /* Data still queued may be the child's: it must not follow a
         * detach. A held state was accepted while the child was ours. */
        if (stats.queued > 0 || child->state_payload ||
            registry_get(pi->registry, child->id) == REGISTRY_PENDING)
            continue;
        if (child->unrouted)
            snprintf(why, sizeof(why), "%s",
                     gcp_conf(pi->uc)->gateway ? "the routes no longer send it to this uplink"
                                               : "gcp.gateway is false now");
        else
            snprintf(why, sizeof(why), "idle for %llu s",
                     (unsigned long long)(gcp_conf(pi->uc)->attach_idle_ms / 1000));
        child_detach(pi, child, why);
    }
}

static void sweep_start(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    uint64_t every = gcp_conf(pi->uc)->attach_idle_ms / 2, first;
    bool children = false, unrouted = false;

    if (!gcp->sweep_init)
        return;
    uv_timer_stop(&gcp->sweep);
    for (struct gcp_child *child = gcp->children; child; child = child->next) {
        children = children || !child->self;
        unrouted = unrouted || child->unrouted;
    }
    /* Without gateway mode only children left over from before a reload
     * need it (to be detached). */
    if (!gcp_conf(pi->uc)->gateway && !children)
        return;
    if (every < GCP_SWEEP_MIN_MS)
        every = GCP_SWEEP_MIN_MS;
    if (every > GCP_SWEEP_MAX_MS)
        every = GCP_SWEEP_MAX_MS;
    /* Children a reload took away are detached soon, not after the idle time. */
    first = unrouted ? GCP_SWEEP_MIN_MS : every;
    uv_timer_start(&gcp->sweep, sweep_cb, first, every);
}

/* --- state coalescing ------------------------------------------------------------ */

static void state_send(struct profile_instance *pi, struct gcp_child *child)
{
    char topic[PROFILE_TOPIC_MAX];
    const char *reason = NULL;
    int rc;

    snprintf(topic, sizeof(topic), "/devices/%s/state", child->id);
    rc = profile_register_child(pi, child->id, &reason);
    if (rc < 0) {
        profile_report_error(pi, topic, reason ? reason : "cannot attach the device");
    } else {
        rc = pi->port->publish(pi->uplink, topic, child->state_payload, child->state_len,
                               child->state_qos, false);
        if (rc < 0)
            log_child(LOG_WARNING, pi->uc->name, child->id,
                      "the coalesced state update could not be queued: %s", strerror(-rc));
    }
    child->state_sent = true;
    child->state_sent_ms = uv_now(pi->loop);
    free(child->state_payload);
    child->state_payload = NULL;
    child->state_len = 0;
}

static void state_timer_cb(uv_timer_t *timer)
{
    struct gcp_child *child = timer->data;

    if (child->state_payload && !child->pi->closing)
        state_send(child->pi, child);
}

/* GCP takes one state update per second and device; a faster one is kept
 * (replacing any older waiting one) and sent when the second is over.
 * Returns 1 when the state goes out now, 0 when it waits, -ENOMEM. */
static int state_coalesce(struct profile_instance *pi, struct gcp_child *child, const void *payload,
                          size_t len, int qos)
{
    uint64_t now = uv_now(pi->loop);
    void *copy;

    if (!child->state_payload &&
        (!child->state_sent || now - child->state_sent_ms >= GCP_STATE_PERIOD_MS)) {
        child->state_sent = true;
        child->state_sent_ms = now;
        return 1;
    }
    copy = malloc(len ? len : 1);
    if (!copy)
        return -ENOMEM;
    if (len)
        memcpy(copy, payload, len);
    if (child->state_payload)
        log_child(LOG_DEBUG, pi->uc->name, child->id,
                  "state update replaced by a newer one (GCP: 1 per second)");
    free(child->state_payload);
    child->state_payload = copy;
    child->state_len = len;
    child->state_qos = qos;
    if (!child->timer_init) {
        uv_timer_init(pi->loop, &child->state_timer);
        uv_unref((uv_handle_t *)&child->state_timer);
        child->state_timer.data = child;
        child->timer_init = true;
    }
    uint64_t due = child->state_sent_ms + GCP_STATE_PERIOD_MS;
    uv_timer_start(&child->state_timer, state_timer_cb, due > now ? due - now : 0, 0);
    return 0;
}

/* --- the table --------------------------------------------------------------------- */

static int gcp_new_cb(struct profile_instance *pi)
{
    struct gcp *gcp = calloc(1, sizeof(*gcp));

    if (!gcp)
        return -ENOMEM;
    pi->state = gcp;
    uv_timer_init(pi->loop, &gcp->sweep);
    uv_unref((uv_handle_t *)&gcp->sweep);
    gcp->sweep.data = pi;
    gcp->sweep_init = true;
    known_load(pi);
    sweep_start(pi);
    if (gcp_conf(pi->uc)->gateway)
        log_uplink(LOG_INFO, pi->uc->name,
                   "GCP gateway %s: children are attached on their first message and detached "
                   "after %llu s idle",
                   gcp_conf(pi->uc)->device,
                   (unsigned long long)(gcp_conf(pi->uc)->attach_idle_ms / 1000));
    return 0;
}

static void gcp_free_cb(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child *child, *next;

    if (!gcp)
        return;
    /* Only children without a live timer are left (close_cb closed the rest). */
    for (child = gcp->children; child; child = next) {
        next = child->next;
        child_free(child);
    }
    free(gcp->known_path);
    free(gcp);
    pi->state = NULL;
}

static void sweep_closed_cb(uv_handle_t *handle)
{
    struct profile_instance *pi = handle->data;

    if (--gcp_of(pi)->closing == 0)
        profile_instance_closed(pi);
}

static void gcp_close_cb(struct profile_instance *pi)
{
    struct gcp *gcp = gcp_of(pi);
    struct gcp_child **link = &gcp->children;

    gcp->closing++;
    uv_close((uv_handle_t *)&gcp->sweep, sweep_closed_cb);
    while (*link) {
        struct gcp_child *child = *link;
        if (!child->timer_init && !child->key.busy) {
            link = &child->next; /* freed by gcp_free_cb */
            continue;
        }
        *link = child->next; /* freed once its timer closed and its job ended */
        if (!child->self)
            gcp->attached--;
        child_release(child);
    }
}

static void gcp_reconfigure_cb(struct profile_instance *pi)
{
    /* A child the routes no longer send here (or every child, without
     * gateway mode) is detached by the sweep once nothing of it is queued.
     * Child tokens notice a changed pattern, project or life themselves
     * (key_inputs()). */
    for (struct gcp_child *child = gcp_of(pi)->children; child; child = child->next) {
        if (!child->self)
            child->unrouted = !gcp_conf(pi->uc)->gateway || !child_routed(pi, child->id);
    }
    sweep_start(pi);
}

static void gcp_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    struct gcp *gcp = gcp_of(pi);

    /* The same rule uplinkctl diagnose uses (profile.h). */
    profile_connect_id(pi->uc, &gcp->connect_id);
    session->client_id = gcp->connect_id.client_id;
    /* A new connection attaches nobody yet: the children's filters must not
     * be re-sent ahead of their attach (gcp_registered_cb adds them back). */
    for (struct gcp_child *child = gcp->children; child; child = child->next)
        child_unsubscribe(pi, child);
}

static void gcp_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    struct gcp *gcp = gcp_of(pi);
    size_t count = 0;

    (void)first;
    if (!gcp_conf(pi->uc)->gateway)
        return;
    /* Attachments died with the last connection: attach again every child
     * used within attach_idle, before any of their spooled data. */
    for (struct gcp_child *child = gcp->children; child; child = child->next) {
        const char *reason = NULL;
        if (child->self || child->unrouted)
            continue;
        registry_set(pi->registry, child->id, REGISTRY_UNKNOWN, false);
        if (profile_register_child(pi, child->id, &reason) < 0)
            log_child(LOG_WARNING, pi->uc->name, child->id, "cannot attach: %s",
                      reason ? reason : "out of memory");
        count++;
    }
    if (count)
        log_uplink(LOG_INFO, pi->uc->name, "attaching %zu children again on the new connection",
                   count);
}

static void gcp_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    const char *device = gcp_conf(pi->uc)->device;
    char filter[PROFILE_TOPIC_MAX];

    if (!device)
        return;
    snprintf(filter, sizeof(filter), "/devices/%s/config", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    snprintf(filter, sizeof(filter), "/devices/%s/commands/#", device);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    if (gcp_conf(pi->uc)->gateway) {
        snprintf(filter, sizeof(filter), "/devices/%s/errors", device);
        profile_msgs_add(filters, filter, NULL, 0, 0, false);
    }
}

static int gcp_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                     const void *payload, size_t len, int qos, bool retain,
                     struct profile_msgs *out, const char **reason)
{
    const struct conf_gcp *cg = gcp_conf(pi->uc);
    char topic[PROFILE_TOPIC_MAX];
    struct gcp_child *child;
    size_t max;
    int rc;

    (void)retain; /* the bridge keeps no retained messages */
    if (!cg->gateway && !is_self(pi, m->child)) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "this GCP uplink is the device %s alone (gcp.gateway is false): set gateway: "
                 "true to attach other children",
                 cg->device);
        *reason = pi->reason;
        return -EINVAL;
    }
    rc = gcp_up_topic(m, topic, sizeof(topic), reason);
    if (rc < 0)
        return -EINVAL;
    max = m->channel == MAPPING_STATE ? GCP_STATE_MAX : GCP_EVENT_MAX;
    if (len > max) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "the payload is %zu bytes; GCP takes at most %zu bytes for a %s", len, max,
                 m->channel == MAPPING_STATE ? "state update" : "telemetry event");
        *reason = pi->reason;
        return -EINVAL;
    }
    child = child_find(gcp_of(pi), m->child);
    if (!child && (rc = child_add(pi, m->child, &child, reason)) < 0)
        return rc;
    /* A new child is on disk before its message is spooled (see "known
     * children"); otherwise the message is not acknowledged, and the
     * client's re-send tries again. -EINVAL would mean "refused". */
    rc = known_save(pi);
    if (rc < 0)
        return rc == -EINVAL ? -EIO : rc;
    child->used_ms = uv_now(pi->loop);
    child->unrouted = false; /* routed here again */
    qos = qos > 1 ? 1 : qos; /* the bridge closes the connection on QoS 2 */
    if (m->channel == MAPPING_STATE) {
        rc = state_coalesce(pi, child, payload, len, qos);
        if (rc <= 0)
            return rc;
    }
    return profile_msgs_add(out, topic, payload, len, qos, false);
}

/* /devices/<gw>/errors: {"error_type": "...", "device_id": "...",
 * "description": "...", "message_id": ...} in words. */
static void explain_error(struct profile_instance *pi, const char *topic, const void *payload,
                          size_t len)
{
    json_error_t error;
    json_t *root = json_loadb(payload, len, 0, &error);
    const char *type = NULL, *device = NULL, *description = NULL;
    char text[1024];

    if (root && json_is_object(root)) {
        type = json_string_value(json_object_get(root, "error_type"));
        device = json_string_value(json_object_get(root, "device_id"));
        description = json_string_value(json_object_get(root, "description"));
    }
    if (type)
        snprintf(text, sizeof(text), "%s%s%s%s%s: %s", type, device ? " for device " : "",
                 device ? device : "", description ? ": " : "", description ? description : "",
                 gcp_error_explain(type));
    else
        snprintf(text, sizeof(text), "gateway error: %.*s", (int)(len > 512 ? 512 : len),
                 (const char *)payload);
    profile_report_error(pi, topic, text);
    json_decref(root);
}

static void gcp_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                        size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const char *prefix = pi->conf->local.topic_prefix;
    char id[MAPPING_CHILD_MAX + 1];
    char local_topic[PROFILE_TOPIC_MAX];
    const char *sub;
    int n;

    switch (gcp_down_parse(topic, id, &sub)) {
    case GCP_DOWN_CONFIG:
        /* Config is state: retained locally so an app that starts later
         * still gets the last one. */
        snprintf(local_topic, sizeof(local_topic), "%s/%s/config", prefix, id);
        profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, true);
        return;
    case GCP_DOWN_COMMANDS:
        n = sub ? snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/%s", prefix, id, sub)
                : snprintf(local_topic, sizeof(local_topic), "%s/%s/commands", prefix, id);
        if (n > 0 && (size_t)n < sizeof(local_topic))
            profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, retain);
        return;
    case GCP_DOWN_ERRORS:
        explain_error(pi, topic, payload, len);
        return;
    case GCP_DOWN_BAD_ID:
        profile_report_error(pi, topic,
                             "cloud message names a device id the local topics "
                             "cannot carry; dropped");
        return;
    case GCP_DOWN_OTHER:
        return;
    }
}

const struct profile profile_gcp = {
    .name = "gcp",
    .new_cb = gcp_new_cb,
    .free_cb = gcp_free_cb,
    .close_cb = gcp_close_cb,
    .reconfigure_cb = gcp_reconfigure_cb,
    .session_cb = gcp_session_cb,
    .online_cb = gcp_online_cb,
    .subscriptions_cb = gcp_subscriptions_cb,
    .up_cb = gcp_up_cb,
    .register_cb = gcp_register_cb,
    .registered_cb = gcp_registered_cb,
    .down_cb = gcp_down_cb,
    .limits = {.max_payload = GCP_EVENT_MAX},
};
