/* aws/aws.c - AWS IoT Core (profile aws), the daemon half.
 *
 * The uplink is the gateway's thing (aws.thing, default gateway.id),
 * authenticated by its certificate (mutual TLS on 8883, or on 443 with ALPN
 * x-amzn-mqtt-ca, section.c). Children speak through the gateway's
 * connection, on topics the gateway's policy must allow (docs/profiles.md,
 * "aws", has a policy for this layout).
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

#include "aws.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "profile.h"
#include "profiles/aws/section.h"
#include "provision.h"

struct aws {
    struct aws_fleet *fleet; /* aws.provisioning: fleet provisioning by claim, else NULL */
};

static struct aws_fleet *fleet_of(const struct profile_instance *pi)
{
    const struct aws *aws = pi->state;

    return aws ? aws->fleet : NULL;
}

static int aws_new_cb(struct profile_instance *pi)
{
    struct aws *aws = calloc(1, sizeof(*aws));

    if (!aws)
        return -ENOMEM;
    pi->state = aws;
    if (aws_conf(pi->uc)->template_name)
        return aws_fleet_new(pi, &aws->fleet);
    return 0;
}

static void aws_free_cb(struct profile_instance *pi)
{
    struct aws *aws = pi->state;

    if (aws)
        aws_fleet_free(aws->fleet);
    free(aws);
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
}

/* Every connection: the shadows and the next job, whose answers come on
 * the filters above. */
static void aws_online_cb(struct profile_instance *pi, struct profile_msgs *first)
{
    const struct conf_aws *aws = aws_conf(pi->uc);
    char topic[PROFILE_TOPIC_MAX];

    if (!aws->thing)
        return;
    if (!aws_fleet_done(fleet_of(pi))) {
        aws_fleet_online(pi, fleet_of(pi), first);
        return;
    }
    aws_shadow_topic(aws->thing, NULL, "get", topic, sizeof(topic));
    profile_msgs_add(first, topic, "{}", 2, 1, false);
    for (size_t i = 0; i < aws->shadow_count; i++) {
        aws_shadow_topic(aws->thing, aws->shadows[i], "get", topic, sizeof(topic));
        profile_msgs_add(first, topic, "{}", 2, 1, false);
    }
    if (aws->jobs) {
        snprintf(topic, sizeof(topic), "$aws/things/%s/jobs/$next/get", aws->thing);
        profile_msgs_add(first, topic, "{}", 2, 1, false);
    }
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
        !aws_fleet_done(fleet_of(pi)))
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

static int aws_state_up(struct profile_instance *pi, const struct mapping_local *m,
                        const void *payload, size_t len, int qos, struct profile_msgs *out,
                        const char **reason)
{
    const char *thing = thing_of(pi, m->child), *sub = m->sub;

    if (sub == NULL && !is_gateway(pi, m->child) && !aws_conf(pi->uc)->child_shadows) {
        *reason = "aws.child_shadows is false: children send telemetry only";
        return -EINVAL;
    }
    if (sub == NULL)
        return shadow_update(pi, thing, NULL, payload, len, qos, out, reason);
    if (!is_gateway(pi, m->child)) {
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
    char topic[PROFILE_TOPIC_MAX];

    if (!aws->thing)
        return -EINVAL;
    if (len > AWS_MAX_PAYLOAD) {
        *reason = "AWS IoT Core takes messages of at most 128 KiB";
        return -EINVAL;
    }
    if (m->channel == MAPPING_STATE)
        return aws_state_up(pi, m, payload, len, qos, out, reason);
    if (m->channel != MAPPING_TELEMETRY) {
        *reason = "profile aws takes telemetry and state (device shadow, jobs) only";
        return -EINVAL;
    }
    int n = aws_topic("dt", aws->thing, thing_of(pi, m->child), m->sub, topic, sizeof(topic));
    return add_checked(pi, n, topic, payload, len, qos, retain, out, reason);
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

static void aws_down_cb(struct profile_instance *pi, const char *topic, const void *payload,
                        size_t len, int qos, bool retain, struct profile_msgs *local)
{
    const char *thing = aws_conf(pi->uc)->thing;
    char prefix[PROFILE_TOPIC_MAX], local_topic[PROFILE_TOPIC_MAX], child[MAPPING_CHILD_MAX + 1];

    (void)retain;
    if (!thing)
        return;
    if (fleet_of(pi) && aws_fleet_down(pi, fleet_of(pi), topic, payload, len))
        return;
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

const struct profile profile_aws = {
    .name = "aws",
    .new_cb = aws_new_cb,
    .free_cb = aws_free_cb,
    .session_cb = aws_session_cb,
    .status_json_cb = aws_status_json_cb,
    .subscriptions_cb = aws_subscriptions_cb,
    .online_cb = aws_online_cb,
    .register_cb = aws_register_cb,
    .up_cb = aws_up_cb,
    .down_cb = aws_down_cb,
    .limits = {.max_payload = AWS_MAX_PAYLOAD},
};
