/* cumulocity.c - Cumulocity IoT over MQTT 3.1.1 with SmartREST 2.0.
 *
 * What Cumulocity wants (Cumulocity "Device integration using MQTT",
 * sections "MQTT implementation" and "SmartREST 2.0"; "MQTT static
 * templates" for the message ids):
 *  - client id d:<device id>[:<default template X-ID>]; clean session 1
 *    (the MQTT implementation keeps no session state); a last will on s/us
 *    such as 400,c8y_ConnectionEvent,"Device connection was lost.".
 *  - user name <tenant>/<user> and password, or a client certificate whose
 *    CN is the device id; or the bootstrap flow: connect as the bootstrap
 *    user, subscribe s/dcr, publish empty messages on s/ucr until the
 *    platform answers 70,<tenant>,<user>,<password>.
 *  - after connecting: 100 (create the device if needed), 110 hardware, 114
 *    supported operations, 117 required interval, all on s/us.
 *  - child devices: 101,<child id>,<name>,<type> on s/us (or s/us/<parent>
 *    for a nested child) before the child's first message; its data on
 *    s/us/<child id>.
 *  - a PUBLISH of at most 16184 bytes, header included; several SmartREST
 *    lines may share one PUBLISH, separated by line breaks.
 *  - downstream: s/ds (static templates: operations 5xx, the target device
 *    id in field 2), s/dc/<X-ID> (custom templates), s/e (errors, e.g.
 *    41,100,Device already existing).
 */
#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include "conf.h"
#include "profiles/cumulocity/section.h"
#include "jwt.h"
#include "log.h"
#include "measure.h"
#include "profile.h"
#include "registry.h"
#include "smartrest.h"
#include "util.h"

#define C8Y_UP            "s/us"
#define C8Y_DOWN          "s/ds"
#define C8Y_ERRORS        "s/e"
#define C8Y_CREDS_REQUEST "s/ucr"
#define C8Y_CREDS_REPLY   "s/dcr"
#define C8Y_TOKEN_REQUEST "s/uat"
#define C8Y_TOKEN_REPLY   "s/dat"
/* A token whose lifetime cannot be read is asked for again after this. */
#define C8Y_TOKEN_FALLBACK_MS (10 * 60 * 1000)
/* How deep nested children may go before we call it a loop. */
#define C8Y_MAX_NESTING 8

struct c8y {
    struct profile_connect_id connect_id; /* client id, user: profile_connect_id() */
    bool bootstrapping;                   /* no device credentials yet */
    char *username;                       /* from the bootstrap (stored in the state dir) */
    char *password;
    char creds_path[4096];
    uv_timer_t timer; /* bootstrap: s/ucr every bootstrap.interval */
    bool timer_running;
    bool timer_closing;
    uv_timer_t token_timer; /* token: true: the refresh at half the lifetime */
    unsigned handles_open;  /* timers not yet closed */
    unsigned nesting;       /* register_cb recursion (parents first) */
};

static struct c8y *c8y_of(const struct profile_instance *pi)
{
    return pi->state;
}

/* Is @child the gateway device itself (its data goes to plain s/us)? */
static bool c8y_is_self(const struct profile_instance *pi, const char *child)
{
    return strcmp(child, cumulocity_conf(pi->uc)->device_id) == 0 ||
           strcmp(child, pi->conf->gateway_id) == 0;
}

static void secret_free(char *secret)
{
    if (secret) {
        explicit_bzero(secret, strlen(secret));
        free(secret);
    }
}

/* --- stored device credentials (bootstrap) ------------------------------- */

/* <state_dir>/credentials/<uplink>: "<tenant>/<user>\n<password>\n", 0600. */
static int creds_load(struct profile_instance *pi)
{
    struct c8y *c8y = c8y_of(pi);
    char *text = NULL;
    size_t len = 0;
    int rc = util_read_file(c8y->creds_path, 64 * 1024, &text, &len);

    if (rc < 0)
        return rc;
    char *nl = strchr(text, '\n');
    char *end = nl ? strchr(nl + 1, '\n') : NULL;
    if (!nl || !end || nl == text) {
        log_uplink(LOG_ERR, pi->uc->name,
                   "%s is not a credentials file (expected user and password lines); "
                   "bootstrapping again",
                   c8y->creds_path);
        explicit_bzero(text, len);
        free(text);
        return -EINVAL;
    }
    *nl = '\0';
    *end = '\0';
    secret_free(c8y->password);
    free(c8y->username);
    c8y->username = strdup(text);
    c8y->password = strdup(nl + 1);
    explicit_bzero(text, len);
    free(text);
    return c8y->username && c8y->password ? 0 : -ENOMEM;
}

static int creds_store(struct profile_instance *pi, const char *tenant, const char *user,
                       const char *password)
{
    struct c8y *c8y = c8y_of(pi);
    char dir[4096];
    char *text = NULL;
    int n, rc;

    snprintf(dir, sizeof(dir), "%s/credentials", pi->conf->state_dir);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return -errno;
    n = asprintf(&text, "%s/%s\n%s\n", tenant, user, password);
    if (n < 0)
        return -ENOMEM;
    rc = registry_write_file(c8y->creds_path, text, (size_t)n, 0600);
    explicit_bzero(text, (size_t)n);
    free(text);
    return rc;
}

/* --- bootstrap ---------------------------------------------------------------- */

static void c8y_timer_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;
    struct c8y *c8y = c8y_of(pi);

    if (!c8y->bootstrapping || pi->closing) {
        uv_timer_stop(timer);
        c8y->timer_running = false;
        return;
    }
    if (pi->port->state(pi->uplink) != UPLINK_ONLINE)
        return;
    /* An empty message asks for the credentials (Cumulocity "Device
     * integration using MQTT", "Device bootstrap"). */
    int rc = pi->port->send_first(pi->uplink, C8Y_CREDS_REQUEST, NULL, 0, 0,
                                  UPLINK_CONTROL_CONNECTION, NULL, NULL);
    if (rc < 0)
        log_uplink(LOG_DEBUG, pi->uc->name, "bootstrap request not sent: %s", strerror(-rc));
    else
        log_uplink(LOG_INFO, pi->uc->name,
                   "bootstrap: asked for device credentials on s/ucr (accept device \"%s\" in "
                   "Device management > Device registration)",
                   cumulocity_conf(pi->uc)->device_id);
}

static void c8y_credentials_received(struct profile_instance *pi, const char *payload, size_t len)
{
    struct c8y *c8y = c8y_of(pi);
    struct smartrest_record rec;
    char err[SMARTREST_ERR_LEN];
    const char *line;
    size_t line_len, pos = 0;

    if (!c8y->bootstrapping)
        return;
    while (smartrest_next_line(payload, len, &pos, &line, &line_len) == 1) {
        if (smartrest_parse_line(line, line_len, &rec, err, sizeof(err)) < 0) {
            profile_report_error(pi, C8Y_CREDS_REPLY, err);
            continue;
        }
        if (rec.count == 4 && strcmp(rec.fields[0], "70") == 0 && rec.lengths[1] &&
            rec.lengths[2] && rec.lengths[3]) {
            int rc = creds_store(pi, rec.fields[1], rec.fields[2], rec.fields[3]);
            /* Never the password in the log. */
            if (rc < 0)
                log_uplink(LOG_ERR, pi->uc->name,
                           "cannot store the device credentials in %s: %s; using them until "
                           "the next restart",
                           c8y->creds_path, strerror(-rc));
            free(c8y->username);
            secret_free(c8y->password);
            if (asprintf(&c8y->username, "%s/%s", rec.fields[1], rec.fields[2]) < 0)
                c8y->username = NULL;
            c8y->password = strdup(rec.fields[3]);
            explicit_bzero(rec.fields[3], rec.lengths[3]);
            smartrest_record_free(&rec);
            if (!c8y->username || !c8y->password) {
                log_uplink(LOG_ERR, pi->uc->name, "out of memory keeping the credentials");
                return;
            }
            log_uplink(LOG_NOTICE, pi->uc->name,
                       "bootstrap: received device credentials for user %s (stored in %s)",
                       c8y->username, c8y->creds_path);
            c8y->bootstrapping = false;
            pi->port->reconnect(pi->uplink, "bootstrap done");
            return;
        }
        log_uplink(LOG_DEBUG, pi->uc->name, "bootstrap: ignoring a line on s/dcr with id %s",
                   rec.count ? rec.fields[0] : "");
        smartrest_record_free(&rec);
    }
}

/* --- table ----------------------------------------------------------------------- */

static int c8y_new_cb(struct profile_instance *pi)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);
    struct c8y *c8y = calloc(1, sizeof(*c8y));

    if (!c8y)
        return -ENOMEM;
    pi->state = c8y;
    snprintf(c8y->creds_path, sizeof(c8y->creds_path), "%s/credentials/%s", pi->conf->state_dir,
             pi->uc->name);
    uv_timer_init(pi->loop, &c8y->timer);
    c8y->timer.data = pi;
    uv_timer_init(pi->loop, &c8y->token_timer);
    c8y->token_timer.data = pi;
    c8y->handles_open = 2;
    /* Stopping the daemon must not wait for them. */
    uv_unref((uv_handle_t *)&c8y->timer);
    uv_unref((uv_handle_t *)&c8y->token_timer);
    if (cc->bootstrap) {
        int rc = creds_load(pi);
        c8y->bootstrapping = rc < 0;
        if (rc == 0)
            log_uplink(LOG_INFO, pi->uc->name, "using the device credentials in %s (user %s)",
                       c8y->creds_path, c8y->username);
        else
            log_uplink(LOG_NOTICE, pi->uc->name,
                       "no device credentials in %s yet: bootstrapping as %s", c8y->creds_path,
                       cc->bootstrap_user);
    }
    if (!pi->uc->clean_session)
        log_uplink(LOG_NOTICE, pi->uc->name,
                   "clean_session: false is ignored: Cumulocity sessions are always clean");
    return 0;
}

static void c8y_free_cb(struct profile_instance *pi)
{
    struct c8y *c8y = c8y_of(pi);

    if (!c8y)
        return;
    free(c8y->username);
    secret_free(c8y->password);
    free(c8y);
}

static void c8y_timer_closed_cb(uv_handle_t *handle)
{
    struct profile_instance *pi = handle->data;

    if (--c8y_of(pi)->handles_open == 0)
        profile_instance_closed(pi);
}

static void c8y_close_cb(struct profile_instance *pi)
{
    struct c8y *c8y = c8y_of(pi);

    c8y->timer_closing = true;
    uv_close((uv_handle_t *)&c8y->timer, c8y_timer_closed_cb);
    uv_close((uv_handle_t *)&c8y->token_timer, c8y_timer_closed_cb);
}

/* --- device token (token: true) ---------------------------------------------
 * Cumulocity "Device integration using MQTT", "JWT token retrieval": an
 * empty message on s/uat is answered with 71,<JWT> on s/dat. Local apps use
 * it for HTTP calls; it is asked for again at half its lifetime. */

static void c8y_token_request(struct profile_instance *pi)
{
    int rc = pi->port->send_first(pi->uplink, C8Y_TOKEN_REQUEST, NULL, 0, 0,
                                  UPLINK_CONTROL_CONNECTION, NULL, NULL);
    if (rc < 0)
        log_uplink(LOG_DEBUG, pi->uc->name, "device token request not sent: %s", strerror(-rc));
}

static void c8y_token_timer_cb(uv_timer_t *timer)
{
    struct profile_instance *pi = timer->data;

    /* Offline: the next CONNACK asks anyway (online_cb). */
    if (!pi->closing && pi->port->state(pi->uplink) == UPLINK_ONLINE)
        c8y_token_request(pi);
}

/* iat and exp of a JWT (RFC 7519 §4.1.4/6), without checking the signature:
 * only to know when to ask for a new one. Returns 0 or -EINVAL. */
static int token_times(const char *token, size_t len, long long *iat, long long *exp)
{
    const char *dot1 = memchr(token, '.', len);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
    unsigned char *claims = NULL;
    size_t claims_len = 0;
    json_t *root;
    int rc = -EINVAL;

    if (!dot2 ||
        jwt_base64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), &claims, &claims_len) < 0)
        return -EINVAL;
    root = json_loadb((const char *)claims, claims_len, 0, NULL);
    free(claims);
    if (root && json_is_integer(json_object_get(root, "exp"))) {
        *exp = json_integer_value(json_object_get(root, "exp"));
        json_t *issued = json_object_get(root, "iat");
        *iat = json_is_integer(issued) ? json_integer_value(issued) : (long long)time(NULL);
        rc = *exp > *iat ? 0 : -EINVAL;
    }
    json_decref(root);
    return rc;
}

static void c8y_token_received(struct profile_instance *pi, const char *line, size_t len)
{
    struct c8y *c8y = c8y_of(pi);
    char topic[128];
    long long iat = 0, exp = 0;
    uint64_t delay_ms = C8Y_TOKEN_FALLBACK_MS;

    if (len < 4 || memcmp(line, "71,", 3) != 0)
        return;
    line += 3;
    len -= 3;
    /* Retained, so an app that starts later gets the current one; the
     * local ACL decides who may subscribe to it. */
    snprintf(topic, sizeof(topic), "uplinkd/%s/c8y/token", pi->uc->name);
    profile_deliver(pi, topic, line, len, 1, true);
    if (token_times(line, len, &iat, &exp) == 0) {
        long long refresh_at = iat + (exp - iat) / 2;
        long long now = (long long)time(NULL);
        delay_ms = refresh_at > now ? (uint64_t)(refresh_at - now) * 1000 : 1000;
        log_uplink(LOG_INFO, pi->uc->name,
                   "received a device token (valid for %lld s); asking again in %llu s", exp - iat,
                   (unsigned long long)(delay_ms / 1000));
    } else {
        log_uplink(LOG_WARNING, pi->uc->name,
                   "received a device token whose lifetime cannot be read; asking again in "
                   "%d min",
                   C8Y_TOKEN_FALLBACK_MS / 60000);
    }
    if (!c8y->timer_closing)
        uv_timer_start(&c8y->token_timer, c8y_token_timer_cb, delay_ms, 0);
}

static void c8y_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    const struct conf_uplink *uc = pi->uc;
    const struct conf_cumulocity *cc = cumulocity_conf(uc);
    struct c8y *c8y = c8y_of(pi);

    /* The same rule uplinkctl diagnose uses (profile_spec.h, spec.c). */
    profile_connect_id(uc, &c8y->connect_id);
    session->client_id = c8y->connect_id.client_id;
    session->clean_session = c8y->connect_id.clean_session;
    if (cc->bootstrap && c8y->bootstrapping) {
        session->username = c8y->connect_id.username; /* the bootstrap user */
        session->password = c8y->connect_id.password;
        session->hold_spool = true; /* data waits for the device's own credentials */
    } else if (cc->bootstrap) {
        session->username = c8y->username;
        session->password = c8y->password;
    } else if (c8y->connect_id.username[0]) { /* <tenant>/<auth.username> */
        session->username = c8y->connect_id.username;
        session->password = c8y->connect_id.password;
    }
    if (cc->will && !c8y->bootstrapping) {
        session->will_topic = cc->will_topic;
        session->will_payload = cc->will_message;
        session->will_len = strlen(cc->will_message);
    }
    /* Bootstrap and device sessions subscribe to different topics. */
    profile_instance_subscribe(pi);
}

static void c8y_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);
    char filter[PROFILE_TOPIC_MAX];

    if (c8y_of(pi)->bootstrapping) {
        profile_msgs_add(filters, C8Y_CREDS_REPLY, NULL, 0, 0, false);
        return;
    }
    profile_msgs_add(filters, C8Y_DOWN, NULL, 0, 1, false);
    profile_msgs_add(filters, C8Y_ERRORS, NULL, 0, 1, false);
    if (cc->token)
        profile_msgs_add(filters, C8Y_TOKEN_REPLY, NULL, 0, 1, false);
    if (cc->template_id) {
        snprintf(filter, sizeof(filter), "s/dc/%s", cc->template_id);
        profile_msgs_add(filters, filter, NULL, 0, 1, false);
    }
}

/* Encode @fields as one line and add it for s/us (QoS 1). */
static void add_line(struct profile_instance *pi, struct profile_msgs *out, const char *topic,
                     const char *const *fields, size_t count)
{
    char err[SMARTREST_ERR_LEN];
    char *line = NULL;
    size_t len = 0;

    if (smartrest_encode(fields, count, &line, &len, err, sizeof(err)) < 0) {
        log_uplink(LOG_ERR, pi->uc->name, "cannot encode a %s line: %s", fields[0], err);
        return;
    }
    profile_msgs_add(out, topic, line, len, 1, false);
    free(line);
}

static void c8y_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);
    struct c8y *c8y = c8y_of(pi);

    if (c8y->bootstrapping) {
        if (!c8y->timer_running && !c8y->timer_closing) {
            uv_timer_start(&c8y->timer, c8y_timer_cb, 0, cc->bootstrap_interval_ms);
            c8y->timer_running = true;
        }
        return;
    }
    if (cc->token)
        c8y_token_request(pi);
    const char *create[] = {"100", cc->name, cc->type};
    add_line(pi, first, C8Y_UP, create, 3);
    if (cc->hardware_serial) {
        const char *hw[] = {"110", cc->hardware_serial, cc->hardware_model, cc->hardware_revision};
        add_line(pi, first, C8Y_UP, hw, 4);
    }
    if (cc->supported_operation_count) {
        const char *ops[1 + 64];
        size_t n = 1;
        ops[0] = "114";
        for (size_t i = 0; i < cc->supported_operation_count && n < 65; i++)
            ops[n++] = cc->supported_operations[i];
        add_line(pi, first, C8Y_UP, ops, n);
    }
    if (cc->required_interval_min >= 0) {
        char minutes[16];
        snprintf(minutes, sizeof(minutes), "%d", cc->required_interval_min);
        const char *interval[] = {"117", minutes};
        add_line(pi, first, C8Y_UP, interval, 2);
    }
}

/* s/us for the gateway, s/us/<child> for a child. */
static void up_topic(const struct profile_instance *pi, const char *child, char *buf, size_t cap)
{
    if (c8y_is_self(pi, child))
        snprintf(buf, cap, C8Y_UP);
    else
        snprintf(buf, cap, C8Y_UP "/%s", child);
}

static int c8y_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                     const void *payload, size_t len, int qos, bool retain,
                     struct profile_msgs *out, const char **reason)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);
    struct smartrest_lines lines;
    char topic[PROFILE_TOPIC_MAX];
    char err[SMARTREST_ERR_LEN];
    size_t overhead = 0, done = 0;
    int rc;

    if (m->sub != NULL) {
        snprintf(pi->reason, sizeof(pi->reason),
                 "Cumulocity takes no sub-topic after the %s channel",
                 mapping_channel_name(m->channel));
        return -EINVAL;
    }
    up_topic(pi, m->child, topic, sizeof(topic));
    qos = qos ? 1 : 0;
    /* The longest line that still fits one PUBLISH on this topic. */
    smartrest_publish_size(strlen(topic), 16000, qos, &overhead);
    overhead -= 16000;

    smartrest_lines_init(&lines);
    err[0] = '\0';
    if (m->channel == MAPPING_TELEMETRY) {
        /* JSON measurements become 200/201; SmartREST passes through. */
        struct measure_options opts = {.max_line = SMARTREST_MAX_PACKET - overhead};
        rc = measure_convert(payload, len, &opts, &lines, err, sizeof(err));
    } else {
        /* smartrest (and state: inventory updates as SmartREST lines). */
        rc = smartrest_payload_split(payload, len, cc->template_id != NULL, &lines, err,
                                     sizeof(err));
    }
    if (rc == -EINVAL) {
        snprintf(pi->reason, sizeof(pi->reason), "%s", err[0] ? err : "not valid SmartREST");
        goto out;
    }
    if (rc < 0)
        goto out;
    rc = 0;
    /* As many lines per PUBLISH as fit in 16184 bytes. All or nothing: a
     * line too long for any packet refuses the whole message. */
    while (done < lines.count) {
        size_t taken = 0, payload_len = 0;
        char *packed = NULL;
        rc = smartrest_pack(topic, qos, SMARTREST_MAX_PACKET,
                            (const char *const *)lines.line + done, lines.len + done,
                            lines.count - done, &taken, &packed, &payload_len, err, sizeof(err));
        if (rc == -EMSGSIZE) {
            snprintf(pi->reason, sizeof(pi->reason), "line %zu: %s", done + 1, err);
            rc = -EINVAL;
            goto out;
        }
        if (rc < 0)
            goto out;
        /* Cumulocity keeps no retained messages. */
        rc = profile_msgs_add(out, topic, packed, payload_len, qos, false);
        free(packed);
        if (rc < 0)
            goto out;
        done += taken;
    }
out:
    if (rc == -EINVAL) {
        /* Nothing of this message goes up. */
        profile_msgs_deinit(out);
        *reason = pi->reason;
    }
    smartrest_lines_deinit(&lines);
    (void)retain;
    return rc;
}

static const struct conf_c8y_child *child_rule(const struct profile_instance *pi, const char *child)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);

    for (size_t i = 0; i < cc->child_count; i++) {
        if (cc->children[i].match && fnmatch(cc->children[i].match, child, 0) == 0)
            return &cc->children[i];
    }
    return NULL;
}

static int c8y_register_cb(struct profile_instance *pi, const char *child, struct profile_msgs *out,
                           struct profile_registration *how, const char **reason)
{
    const struct conf_c8y_child *rule = child_rule(pi, child);
    struct c8y *c8y = c8y_of(pi);
    const char *parent = rule ? rule->parent : NULL;
    char topic[PROFILE_TOPIC_MAX];
    char name[512];
    int rc = 0;

    if (c8y_is_self(pi, child))
        return 0; /* the gateway is created by 100 on every connection */
    /* Cumulocity "Device integration using MQTT": a child is created by
     * 101 on its parent's topic; the data that follows refers to it, so
     * it must be acknowledged first. */
    how->wait_ack = true;
    how->per_connection = false;
    if (parent && !c8y_is_self(pi, parent)) {
        if (strcmp(parent, child) == 0 || c8y->nesting >= C8Y_MAX_NESTING) {
            *reason = "cumulocity.children: the parent chain of this child loops or is deeper "
                      "than 8";
            return -EINVAL;
        }
        /* The parent first: 101 for it must precede ours. */
        c8y->nesting++;
        rc = profile_register_child(pi, parent, reason);
        c8y->nesting--;
        if (rc < 0)
            return rc;
    }
    up_topic(pi, parent ? parent : cumulocity_conf(pi->uc)->device_id, topic, sizeof(topic));
    /* name: "{child}" stands for the child id. */
    const char *tmpl = rule && rule->name ? rule->name : "{child}";
    const char *at = strstr(tmpl, "{child}");
    if (at)
        snprintf(name, sizeof(name), "%.*s%s%s", (int)(at - tmpl), tmpl, child, at + 7);
    else
        snprintf(name, sizeof(name), "%s", tmpl);
    const char *fields[] = {"101", child, name,
                            rule && rule->type ? rule->type : "c8y_MQTTChildDevice"};
    add_line(pi, out, topic, fields, 4);
    return 0;
}

/* One operation line: to dev/<target>/operations, verbatim. */
static void route_operation(struct profile_instance *pi, const char *topic, const char *line,
                            size_t len, struct profile_msgs *local)
{
    const char *gateway = pi->conf->gateway_id;
    struct smartrest_record rec;
    char err[SMARTREST_ERR_LEN];
    char local_topic[PROFILE_TOPIC_MAX];
    const char *target = gateway;

    if (smartrest_parse_line(line, len, &rec, err, sizeof(err)) < 0) {
        char text[SMARTREST_ERR_LEN + 64];
        snprintf(text, sizeof(text), "cannot parse a line from the cloud: %s", err);
        profile_report_error(pi, topic, text);
        return;
    }
    /* Static templates 5xx (and custom templates' responses) carry the
     * device the operation is for in field 2. */
    if (rec.count >= 2 && rec.lengths[1] > 0 && !c8y_is_self(pi, rec.fields[1])) {
        const char *why = mapping_child_check(rec.fields[1], rec.lengths[1]);
        if (why) {
            char text[2 * PROFILE_REASON_MAX];
            snprintf(text, sizeof(text), "operation %.64s for an invalid child id: %s; dropped",
                     rec.fields[0], why);
            profile_report_error(pi, topic, text);
            smartrest_record_free(&rec);
            return;
        }
        target = rec.fields[1];
    }
    snprintf(local_topic, sizeof(local_topic), "%s/%s/operations", pi->conf->local.topic_prefix,
             target);
    log_child(LOG_INFO, pi->uc->name, target, "operation %s from %s", rec.fields[0], topic);
    profile_msgs_add(local, local_topic, line, len, 1, false);
    smartrest_record_free(&rec);
}

static void c8y_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                        size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const struct conf_cumulocity *cc = cumulocity_conf(pi->uc);
    const char *line;
    size_t line_len, pos = 0;
    bool operations =
        strcmp(topic, C8Y_DOWN) == 0 || (cc->template_id && strncmp(topic, "s/dc/", 5) == 0 &&
                                         strcmp(topic + 5, cc->template_id) == 0);

    if (strcmp(topic, C8Y_CREDS_REPLY) == 0) {
        c8y_credentials_received(pi, payload, len);
        return;
    }
    while (smartrest_next_line(payload, len, &pos, &line, &line_len) == 1) {
        if (operations) {
            route_operation(pi, topic, line, line_len, local);
        } else if (strcmp(topic, C8Y_TOKEN_REPLY) == 0) {
            c8y_token_received(pi, line, line_len);
        } else if (strcmp(topic, C8Y_ERRORS) == 0) {
            char text[1024];
            snprintf(text, sizeof(text), "%.*s", (int)line_len, line);
            profile_report_error(pi, topic, text);
        }
    }
}

static const char *c8y_batch_separator_cb(const struct profile_instance *pi, const char *topic)
{
    return strncmp(topic, "s/u", 3) == 0 ? "\n" : NULL;
}

const struct profile profile_cumulocity = {
    .name = "cumulocity",
    .new_cb = c8y_new_cb,
    .free_cb = c8y_free_cb,
    .close_cb = c8y_close_cb,
    .session_cb = c8y_session_cb,
    .online_cb = c8y_online_cb,
    .subscriptions_cb = c8y_subscriptions_cb,
    .up_cb = c8y_up_cb,
    .register_cb = c8y_register_cb,
    .down_cb = c8y_down_cb,
    .batch_separator_cb = c8y_batch_separator_cb,
    .limits = {.max_packet = SMARTREST_MAX_PACKET},
};
