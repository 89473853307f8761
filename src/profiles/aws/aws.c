/* aws/aws.c - AWS IoT Core (profile aws), the daemon half.
 *
 * The uplink is the gateway's thing (aws.thing, default gateway.id),
 * authenticated by its certificate (mutual TLS on 8883, or on 443 with ALPN
 * x-amzn-mqtt-ca, section.c). Children speak through the gateway's
 * connection, on topics the gateway's policy must allow (docs/profiles.md,
 * "aws", has a policy for this layout). With aws.child_cert and
 * aws.child_key, a child whose certificate file exists is a thing of its
 * own instead: a session of its own (child_sessions.h) with its
 * certificate, client id = thing name = the child id, and the same
 * contract with its own thing as the connection's (dt/C/C, cmd/C/C, its
 * shadow and, with aws.jobs, its jobs).
 *
 * Local contract (docs/profiles.md, "aws"), for a child C (C = the gateway
 * itself for its own thing) and the gateway's thing G:
 *   dev/C/telemetry[/<sub>]      -> dt/G/C[/<sub>]
 *   cmd/G/C[/<sub>]              -> dev/C/commands[/<sub>]
 *   dev/C/state (JSON object)    -> $aws/things/C/shadow/update as
 *                                   {"state":{"reported":<object>}}
 *   $aws/things/C/shadow/get/accepted   -> dev/C/config/shadow (retained)
 *   $aws/things/C/shadow/update/delta   -> dev/C/config/delta
 * and for the gateway's thing only (a child's would need subscriptions that
 * AWS's 50-per-connection quota cannot hold for many children):
 *   dev/G/state/shadow/N         -> the named shadow N, as above, with
 *                                   dev/G/config/shadow/N and config/delta/N
 *   dev/G/state/jobs/<job id>    -> $aws/things/G/jobs/<job id>/update
 *   dev/G/state/jobs             -> $aws/things/G/jobs/start-next
 *   jobs/notify-next, jobs/$next/get/accepted -> dev/G/commands/jobs/next
 *                                   (retained: the job to do next, or none)
 *   jobs/start-next/accepted     -> dev/G/commands/jobs/started
 * A .../rejected answer goes to uplinkd/<uplink>/errors. On every connect
 * the gateway fetches its shadow, its named shadows (aws.shadows) and its
 * next job; a child's shadow is fetched, and its shadow topics subscribed,
 * before its first message on each connection (register_cb). Every topic
 * is checked against AWS's rules before it is queued (aws_topic_check()):
 * AWS closes the connection of a client that publishes where it may not.
 * QoS 2 becomes 1: AWS IoT Core has no QoS 2.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "aws.h"
#include "child_sessions.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "profile.h"
#include "profiles/aws/section.h"
#include "provision.h"
#include "tlscheck.h"

struct aws {
    struct aws_fleet *fleet;         /* aws.provisioning: fleet provisioning by claim, else NULL */
    struct child_sessions *sessions; /* children that are things of their own */
};

static struct aws_fleet *fleet_of(const struct profile_instance *pi)
{
    const struct aws *aws = pi->state;

    return aws ? aws->fleet : NULL;
}

static struct child_sessions *sessions_of(const struct profile_instance *pi)
{
    const struct aws *aws = pi->state;

    return aws ? aws->sessions : NULL;
}

static const struct child_session_ops aws_child_ops;

static int aws_new_cb(struct profile_instance *pi)
{
    struct aws *aws = calloc(1, sizeof(*aws));
    int rc;

    if (!aws)
        return -ENOMEM;
    pi->state = aws;
    if ((rc = child_sessions_new(pi, &aws_child_ops, &aws->sessions)) < 0)
        return rc;
    if (aws_conf(pi->uc)->template_name)
        return aws_fleet_new(pi, &aws->fleet);
    return 0;
}

static void aws_free_cb(struct profile_instance *pi)
{
    struct aws *aws = pi->state;

    if (aws) {
        aws_fleet_free(aws->fleet);
        child_sessions_free(aws->sessions);
    }
    free(aws);
    pi->state = NULL;
}

static void aws_close_cb(struct profile_instance *pi)
{
    struct aws *aws = pi->state;

    if (aws && aws->sessions)
        child_sessions_close(aws->sessions);
    else
        profile_instance_closed(pi);
}

static void aws_reconfigure_cb(struct profile_instance *pi)
{
    child_sessions_reconfigure(sessions_of(pi));
}

static void aws_child_json_cb(const struct profile_instance *pi, const char *child,
                              struct json_buf *out)
{
    child_sessions_child_json(sessions_of(pi), child, out);
}

/* The thing name of local child @child: the gateway's thing for the
 * gateway itself (gateway.id or aws.thing), else the child's id. */
static const char *thing_of(const struct profile_instance *pi, const char *child)
{
    const char *thing = aws_conf(pi->uc)->thing;

    if (strcmp(child, pi->conf->gateway_id) == 0)
        return thing;
    return child;
}

static bool is_gateway(const struct profile_instance *pi, const char *child)
{
    return strcmp(thing_of(pi, child), aws_conf(pi->uc)->thing) == 0;
}

/* The local child id of @thing: gateway.id for the gateway's thing. */
static const char *local_of(const struct profile_instance *pi, const char *thing)
{
    return strcmp(thing, aws_conf(pi->uc)->thing) == 0 ? pi->conf->gateway_id : thing;
}

/* The shadow answers of @thing (classic, and with @named its named
 * shadows) and, with @jobs, its job notifications. */
static void thing_filters(const char *thing, bool named, bool jobs, struct profile_msgs *filters)
{
    static const char *const shadow[] = {"get/+", "update/delta", "update/rejected"};
    static const char *const job[] = {"notify-next", "$next/get/+", "start-next/+",
                                      "+/update/rejected"};
    char filter[PROFILE_TOPIC_MAX];

    for (size_t i = 0; i < sizeof(shadow) / sizeof(shadow[0]); i++) {
        aws_shadow_topic(thing, NULL, shadow[i], filter, sizeof(filter));
        profile_msgs_add(filters, filter, NULL, 0, 1, false);
        if (named) {
            aws_shadow_topic(thing, "+", shadow[i], filter, sizeof(filter));
            profile_msgs_add(filters, filter, NULL, 0, 1, false);
        }
    }
    for (size_t i = 0; jobs && i < sizeof(job) / sizeof(job[0]); i++) {
        snprintf(filter, sizeof(filter), "$aws/things/%s/jobs/%s", thing, job[i]);
        profile_msgs_add(filters, filter, NULL, 0, 1, false);
    }
}

/* The gateway's own filters: its commands, shadows and jobs. */
static void gateway_filters(const struct profile_instance *pi, struct profile_msgs *filters)
{
    const struct conf_aws *aws = aws_conf(pi->uc);
    char filter[PROFILE_TOPIC_MAX];

    if (!aws->thing)
        return;
    snprintf(filter, sizeof(filter), "cmd/%s/#", aws->thing);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    thing_filters(aws->thing, true, aws->jobs, filters);
}

static void aws_subscriptions_cb(struct profile_instance *pi, struct profile_msgs *filters)
{
    /* With fleet provisioning, session_cb subscribes them once the thing
     * has its certificate: the claim policy allows provisioning only. */
    if (!fleet_of(pi))
        gateway_filters(pi, filters);
}

static void aws_session_cb(struct profile_instance *pi, struct uplink_session *session)
{
    struct profile_msgs filters;

    if (!fleet_of(pi))
        return;
    profile_msgs_init(&filters);
    gateway_filters(pi, &filters);
    aws_fleet_session(pi, fleet_of(pi), &filters, session);
    profile_msgs_deinit(&filters);
}

static void aws_status_json_cb(const struct profile_instance *pi, struct json_buf *out)
{
    if (fleet_of(pi))
        aws_fleet_status(pi, fleet_of(pi), out);
    child_sessions_status_json(sessions_of(pi), out);
}

/* What a thing's connection asks first: its shadows and its next job,
 * whose answers come on thing_filters(). */
static void thing_first(const char *thing, char *const *shadows, size_t shadow_count, bool jobs,
                        struct profile_msgs *first)
{
    char topic[PROFILE_TOPIC_MAX];

    aws_shadow_topic(thing, NULL, "get", topic, sizeof(topic));
    profile_msgs_add(first, topic, "{}", 2, 1, false);
    for (size_t i = 0; i < shadow_count; i++) {
        aws_shadow_topic(thing, shadows[i], "get", topic, sizeof(topic));
        profile_msgs_add(first, topic, "{}", 2, 1, false);
    }
    if (jobs) {
        snprintf(topic, sizeof(topic), "$aws/things/%s/jobs/$next/get", thing);
        profile_msgs_add(first, topic, "{}", 2, 1, false);
    }
}

static void aws_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    const struct conf_aws *aws = aws_conf(pi->uc);

    if (!aws->thing)
        return;
    if (!aws_fleet_done(fleet_of(pi))) {
        aws_fleet_online(pi, fleet_of(pi), first);
        return;
    }
    thing_first(aws->thing, aws->shadows, aws->shadow_count, aws->jobs, first);
}

/* Is @child a thing with a session of its own? Its session is open, or
 * aws.child_cert names a file that exists (a stat, not a read). */
static bool own_session(const struct profile_instance *pi, const char *child)
{
    char path[4096];

    if (!aws_conf(pi->uc)->child_cert || is_gateway(pi, child))
        return false;
    if (child_sessions_find(sessions_of(pi), child))
        return true;
    return profile_child_key_path(aws_conf(pi->uc)->child_cert, child, path, sizeof(path)) >= 0 &&
           access(path, F_OK) == 0;
}

/* A child's first message on this connection: subscribe to its shadow's
 * answers (kept for the uplink's life, sent again after a reconnect) and
 * fetch its shadow. */
static int aws_register_cb(struct profile_instance *pi, const char *child, struct profile_msgs *out,
                           struct profile_registration *how, const char **reason)
{
    struct profile_msgs filters;
    char topic[PROFILE_TOPIC_MAX];

    (void)reason;
    const struct conf_aws *aws = aws_conf(pi->uc);
    if (is_gateway(pi, child) || !aws->thing || !aws->child_shadows ||
        !aws_fleet_done(fleet_of(pi)) || own_session(pi, child))
        return 0; /* while claiming, nothing but provisioning may be sent */
    profile_msgs_init(&filters);
    thing_filters(child, false, false, &filters);
    for (size_t i = 0; i < filters.count; i++)
        pi->port->subscribe(pi->uplink, filters.msg[i].topic, filters.msg[i].qos);
    int rc = filters.failed ? -ENOMEM : 0;
    profile_msgs_deinit(&filters);
    if (rc < 0)
        return rc;
    how->per_connection = true;
    aws_shadow_topic(child, NULL, "get", topic, sizeof(topic));
    return profile_msgs_add(out, topic, "{}", 2, 1, false);
}

/* @topic built into @buf: checked against AWS's rules, then added. */
static int add_checked(struct profile_instance *pi, int n, const char *topic, const void *payload,
                       size_t len, int qos, bool retain, struct profile_msgs *out,
                       const char **reason)
{
    if (n < 0) {
        *reason = "the cloud topic would be longer than AWS IoT Core takes (256 bytes)";
        return -EINVAL;
    }
    const char *why = aws_topic_check(topic);
    if (why) {
        snprintf(pi->reason, sizeof(pi->reason), "%s (topic %.120s)", why, topic);
        *reason = pi->reason;
        return -EINVAL;
    }
    return profile_msgs_add(out, topic, payload, len, qos > 1 ? 1 : qos, retain);
}

/* A reported-state object as a shadow update document. */
static int shadow_update(struct profile_instance *pi, const char *thing, const char *shadow,
                         const void *payload, size_t len, int qos, struct profile_msgs *out,
                         const char **reason)
{
    static const char head[] = "{\"state\":{\"reported\":", tail[] = "}}";
    char topic[PROFILE_TOPIC_MAX];

    if (!json_shape_object(payload, len)) {
        *reason = "a shadow update (dev/<child>/state) must be a JSON object of reported "
                  "state, e.g. {\"temperature\":21.5}";
        return -EINVAL;
    }
    size_t doc_len = sizeof(head) - 1 + len + sizeof(tail) - 1;
    char *doc = malloc(doc_len);
    if (!doc)
        return -ENOMEM;
    memcpy(doc, head, sizeof(head) - 1);
    memcpy(doc + sizeof(head) - 1, payload, len);
    memcpy(doc + sizeof(head) - 1 + len, tail, sizeof(tail) - 1);
    int n = aws_shadow_topic(thing, shadow, "update", topic, sizeof(topic));
    int rc = add_checked(pi, n, topic, doc, doc_len, qos, false, out, reason);
    free(doc);
    return rc;
}

/* dev/G/state/jobs[/<job id>]: start the next job, or update one. */
static int job_update(struct profile_instance *pi, const char *thing, const char *job,
                      const void *payload, size_t len, int qos, struct profile_msgs *out,
                      const char **reason)
{
    char topic[PROFILE_TOPIC_MAX];
    int n;

    if (len > 0 && !json_shape_object(payload, len)) {
        *reason = "a job update (dev/<gateway>/state/jobs[/<job id>]) must be a JSON object, "
                  "e.g. {\"status\":\"SUCCEEDED\"}";
        return -EINVAL;
    }
    if (len == 0) {
        payload = "{}";
        len = 2;
    }
    if (job == NULL) {
        n = snprintf(topic, sizeof(topic), "$aws/things/%s/jobs/start-next", thing);
    } else if ((*reason = aws_job_id_check(job)) != NULL) {
        return -EINVAL;
    } else {
        n = snprintf(topic, sizeof(topic), "$aws/things/%s/jobs/%s/update", thing, job);
    }
    if ((size_t)n >= sizeof(topic))
        n = -1;
    return add_checked(pi, n, topic, payload, len, qos, false, out, reason);
}

/* dev/C/state[/<sub>]; @own: C is a thing with a session of its own. */
static int aws_state_up(struct profile_instance *pi, const struct mapping_local *m, bool own,
                        const void *payload, size_t len, int qos, struct profile_msgs *out,
                        const char **reason)
{
    const char *thing = thing_of(pi, m->child), *sub = m->sub;

    if (sub == NULL && !own && !is_gateway(pi, m->child) && !aws_conf(pi->uc)->child_shadows) {
        *reason = "aws.child_shadows is false: children send telemetry only";
        return -EINVAL;
    }
    if (sub == NULL)
        return shadow_update(pi, thing, NULL, payload, len, qos, out, reason);
    if (own && strncmp(sub, "shadow/", 7) == 0) {
        *reason = "a child that is a thing of its own has its classic shadow and jobs; named "
                  "shadows are the gateway's (aws.shadows)";
        return -EINVAL;
    }
    if (!own && !is_gateway(pi, m->child)) {
        *reason = "a child through the gateway has its classic shadow (dev/<child>/state) "
                  "only; named shadows and jobs are the gateway's (docs/profiles.md, aws)";
        return -EINVAL;
    }
    if (strncmp(sub, "shadow/", 7) == 0) {
        if ((*reason = aws_shadow_name_check(sub + 7)) != NULL)
            return -EINVAL;
        return shadow_update(pi, thing, sub + 7, payload, len, qos, out, reason);
    }
    if (strcmp(sub, "jobs") == 0 || strncmp(sub, "jobs/", 5) == 0) {
        if (!aws_conf(pi->uc)->jobs) {
            *reason = "aws.jobs is false: this gateway takes no part in AWS IoT Jobs (its "
                      "policy may not allow the jobs topics)";
            return -EINVAL;
        }
        return job_update(pi, thing, sub[4] ? sub + 5 : NULL, payload, len, qos, out, reason);
    }
    *reason = "a state sub-topic must be shadow/<name> (a named shadow), jobs (start the next "
              "job) or jobs/<job id> (update a job)";
    return -EINVAL;
}

static int aws_up_cb(struct profile_instance *pi, const struct mapping_local *m,
                     const void *payload, size_t len, int qos, bool retain,
                     struct profile_msgs *out, const char **reason)
{
    const struct conf_aws *aws = aws_conf(pi->uc);
    struct child_session *session = NULL;
    char topic[PROFILE_TOPIC_MAX];
    size_t first = out->count;
    const char *conn = aws->thing; /* the thing of the connection it leaves on */
    int rc;

    if (!aws->thing)
        return -EINVAL;
    if (len > AWS_MAX_PAYLOAD) {
        *reason = "AWS IoT Core takes messages of at most 128 KiB";
        return -EINVAL;
    }
    if (m->channel != MAPPING_STATE && m->channel != MAPPING_TELEMETRY) {
        *reason = "profile aws takes telemetry and state (device shadow, jobs) only";
        return -EINVAL;
    }
    if (own_session(pi, m->child)) {
        if ((rc = child_sessions_route(sessions_of(pi), m->child, &session)) < 0) {
            *reason = pi->reason;
            return rc;
        }
        conn = m->child;
    }
    if (m->channel == MAPPING_STATE) {
        rc = aws_state_up(pi, m, session != NULL, payload, len, qos, out, reason);
    } else {
        int n = aws_topic("dt", conn, thing_of(pi, m->child), m->sub, topic, sizeof(topic));
        rc = add_checked(pi, n, topic, payload, len, qos, retain, out, reason);
    }
    for (size_t i = first; rc == 0 && session && i < out->count; i++)
        out->msg[i].uplink = child_session_uplink(session);
    return rc;
}

/* Does an AWS error document say 404 ({"code":404,...})? A shape check,
 * not parsing: get/rejected with 404 means "no shadow yet", which is no
 * error for a thing that has not reported anything. */
static bool error_404(const char *payload, size_t len)
{
    static const char code[] = "\"code\"";
    const char *end = payload + len;

    for (const char *p = payload; p + sizeof(code) - 1 <= end; p++) {
        if (memcmp(p, code, sizeof(code) - 1) != 0)
            continue;
        p += sizeof(code) - 1;
        while (p < end && (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n' || *p == '\r'))
            p++;
        return end - p >= 3 && memcmp(p, "404", 3) == 0;
    }
    return false;
}

/* $aws/things/<thing>/...: shadow and job answers. */
static void aws_reserved_down(struct profile_instance *pi, const char *topic, const void *payload,
                              size_t len, int qos, struct profile_msgs *local)
{
    const char *prefix = pi->conf->local.topic_prefix;
    char local_topic[PROFILE_TOPIC_MAX], why[320];
    struct aws_reserved r;
    bool retain = false;
    int n = -1;

    if (aws_reserved_parse(topic, &r) < 0 || r.kind == AWS_RESERVED_NONE)
        return;
    const char *child = local_of(pi, r.thing);
    const char *slash = r.shadow[0] ? "/" : "";
    switch (r.kind) {
    case AWS_SHADOW_DOCUMENT:
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/config/shadow%s%s", prefix, child,
                     slash, r.shadow);
        retain = true; /* the whole document: what a late subscriber wants first */
        break;
    case AWS_SHADOW_DELTA:
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/config/delta%s%s", prefix, child,
                     slash, r.shadow);
        break;
    case AWS_JOBS_NEXT:
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/jobs/next", prefix, child);
        retain = true; /* the job to do next, or none: the latest is all that counts */
        break;
    case AWS_JOBS_STARTED:
        n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands/jobs/started", prefix,
                     child);
        break;
    case AWS_SHADOW_REJECTED:
        if (strncmp(r.what + strlen(r.what) - 3, "get", 3) == 0 && error_404(payload, len)) {
            log_child(LOG_INFO, pi->uc->name, child, "the thing %s has no %s%sshadow yet", r.thing,
                      r.shadow, r.shadow[0] ? " " : "");
            return;
        }
        /* fall through */
    case AWS_JOBS_REJECTED:
        snprintf(why, sizeof(why), "AWS IoT Core rejected the %s of thing %s: %.*s", r.what,
                 r.thing, (int)(len > 160 ? 160 : len), (const char *)payload);
        profile_report_error(pi, topic, why);
        return;
    default:
        return; /* accepted: nothing the local app needs */
    }
    if (n < 0 || (size_t)n >= sizeof(local_topic))
        return;
    profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, retain);
}

/* A message on the connection of @thing (the gateway's, or a child's own)
 * -> local messages in @local. */
static void aws_down(struct profile_instance *pi, const char *thing, const char *topic,
                     const void *payload, size_t len, int qos, struct profile_msgs *local)
{
    char prefix[PROFILE_TOPIC_MAX], local_topic[PROFILE_TOPIC_MAX], child[MAPPING_CHILD_MAX + 1];

    if (strncmp(topic, "$aws/", 5) == 0) {
        aws_reserved_down(pi, topic, payload, len, qos, local);
        return;
    }
    /* cmd/<gateway>/<child>[/<sub>] */
    int n = snprintf(prefix, sizeof(prefix), "cmd/%s/", thing);
    size_t plen = (size_t)n;
    if (n < 0 || plen >= sizeof(prefix) || strncmp(topic, prefix, plen) != 0)
        return;
    const char *rest = topic + plen, *sub = strchr(rest, '/');
    size_t clen = sub ? (size_t)(sub - rest) : strlen(rest);
    if (clen == 0 || clen > MAPPING_CHILD_MAX) {
        profile_report_error(pi, topic,
                             "a command topic must be cmd/<gateway>/<child>[/...]; "
                             "not delivered");
        return;
    }
    memcpy(child, rest, clen);
    child[clen] = '\0';
    if (strcmp(thing, aws_conf(pi->uc)->thing) != 0 && strcmp(child, thing) != 0) {
        profile_report_error(pi, topic,
                             "a child's own connection takes commands for itself only "
                             "(cmd/<child>/<child>[/...]); not delivered");
        return;
    }
    if (mapping_child_check(child, clen) != NULL || aws_thing_name_check(child) != NULL) {
        profile_report_error(pi, topic,
                             "the child id in this command topic is not a valid "
                             "thing name; not delivered");
        return;
    }
    n = snprintf(local_topic, sizeof(local_topic), "%s/%s/commands%s", pi->conf->local.topic_prefix,
                 local_of(pi, child), sub ? sub : "");
    if (n < 0 || (size_t)n >= sizeof(local_topic))
        return;
    profile_msgs_add(local, local_topic, payload, len, qos > 1 ? 1 : qos, false);
}

static void aws_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                        size_t len, int qos, bool retain, struct profile_msgs *local)
{
    (void)retain;
    if (!aws_conf(pi->uc)->thing)
        return;
    if (fleet_of(pi) && aws_fleet_down(pi, fleet_of(pi), topic, payload, len))
        return;
    aws_down(pi, aws_conf(pi->uc)->thing, topic, payload, len, qos, local);
}

/* --- children that are things of their own (child_sessions.h) ------------------------- */

struct aws_child {
    char cert[4096]; /* its certificate and key files: set once, read by the worker */
    char key[4096];
};

/* One allocation per conf: the uplink's settings with the child as the
 * thing, freed by the set. */
struct aws_child_conf {
    struct conf_uplink conf;
    struct conf_aws section;
};

static bool aws_children_enabled(const struct profile_instance *pi)
{
    return aws_conf(pi->uc)->child_cert != NULL && aws_conf(pi->uc)->child_key != NULL;
}

static uint64_t aws_children_idle_ms(const struct profile_instance *pi)
{
    return aws_conf(pi->uc)->session_idle_ms;
}

static const char *aws_self(const struct profile_instance *pi)
{
    return pi->conf->gateway_id;
}

/* Threadpool: the certificate and its key, as the TLS handshake will use
 * them (files readable, the key the certificate's, valid now). */
static int aws_child_load(struct child_session *s, char *why, size_t size)
{
    const struct aws_child *c = child_session_data(s);
    char err[TLSCHECK_MSG_SIZE];
    int rc =
        tlscheck_client_cert(c->cert, c->key, NULL, time(NULL), NULL, err, sizeof(err), NULL, 0);

    if (rc < 0)
        snprintf(why, size, "%s", err);
    return rc;
}

static struct conf_uplink *aws_child_conf(struct child_session *s)
{
    const struct profile_instance *pi = child_session_pi(s);
    const struct conf_aws *aws = aws_conf(pi->uc);
    struct aws_child *c = child_session_data(s);
    const char *child = child_session_id(s);
    struct aws_child_conf *cc;

    if (!c->cert[0] &&
        (profile_child_key_path(aws->child_cert, child, c->cert, sizeof(c->cert)) < 0 ||
         profile_child_key_path(aws->child_key, child, c->key, sizeof(c->key)) < 0))
        return NULL;
    cc = calloc(1, sizeof(*cc));
    if (!cc)
        return NULL;
    cc->conf = *pi->uc;
    cc->conf.name = (char *)child_session_name(s);
    cc->conf.client_id = (char *)child; /* = the thing name, as a thing policy expects */
    cc->conf.cert_cn = NULL;
    cc->conf.tls.cert = c->cert;
    cc->conf.tls.key = c->key;
    cc->conf.auth.type = CONF_AUTH_NONE;
    cc->section = *aws;
    cc->section.thing = (char *)child;
    cc->section.shadows = NULL;
    cc->section.shadow_count = 0;
    cc->section.template_name = NULL;
    cc->section.params = NULL;
    cc->section.param_count = 0;
    cc->section.child_cert = NULL;
    cc->section.child_key = NULL;
    cc->conf.section = &cc->section;
    return &cc->conf;
}

static void aws_child_filters(struct child_session *s, struct profile_msgs *filters)
{
    const char *thing = child_session_id(s);
    char filter[PROFILE_TOPIC_MAX];

    snprintf(filter, sizeof(filter), "cmd/%s/#", thing);
    profile_msgs_add(filters, filter, NULL, 0, 1, false);
    thing_filters(thing, false, aws_conf(child_session_pi(s)->uc)->jobs, filters);
}

static const char *aws_child_credential(const struct child_session *s, char *buf, size_t size)
{
    snprintf(buf, size, "certificate %s", ((const struct aws_child *)child_session_data(s))->cert);
    return buf;
}

static void aws_child_first(struct child_session *s, struct profile_msgs *first)
{
    thing_first(child_session_id(s), NULL, 0, aws_conf(child_session_pi(s)->uc)->jobs, first);
}

static void aws_child_down(struct child_session *s, const char *topic, const void *payload,
                           size_t len, int qos, bool retain, struct profile_msgs *local)
{
    (void)retain; /* AWS IoT Core retains nothing it sends a device */
    aws_down(child_session_pi(s), child_session_id(s), topic, payload, len, qos, local);
}

static const struct child_session_ops aws_child_ops = {
    .need = "AWS IoT Core authenticates each thing by its certificate, and this child's cannot "
            "be used (aws.child_cert and aws.child_key)",
    .enabled = aws_children_enabled,
    .idle_ms = aws_children_idle_ms,
    .self = aws_self,
    .load = aws_child_load,
    .conf = aws_child_conf,
    .filters = aws_child_filters,
    .credential = aws_child_credential,
    .data_size = sizeof(struct aws_child),
    .first = aws_child_first,
    .down = aws_child_down,
};

const struct profile profile_aws = {
    .name = "aws",
    .new_cb = aws_new_cb,
    .free_cb = aws_free_cb,
    .close_cb = aws_close_cb,
    .reconfigure_cb = aws_reconfigure_cb,
    .child_json_cb = aws_child_json_cb,
    .session_cb = aws_session_cb,
    .status_json_cb = aws_status_json_cb,
    .subscriptions_cb = aws_subscriptions_cb,
    .online_cb = aws_online_cb,
    .register_cb = aws_register_cb,
    .up_cb = aws_up_cb,
    .down_cb = aws_down_cb,
    .limits = {.max_payload = AWS_MAX_PAYLOAD},
};
