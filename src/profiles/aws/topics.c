/* aws/topics.c - AWS IoT Core's names and topics (aws.h), pure. */
#include "aws.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "conf_walk.h"

/* 1 to @max bytes, each in [A-Za-z0-9] or @extra (conf_first_bad_char()). */
static bool name_ok(const char *name, size_t max, const char *extra)
{
    size_t len = strlen(name);

    return len > 0 && len <= max && conf_first_bad_char(name, extra) == NULL;
}

const char *aws_thing_name_check(const char *name)
{
    if (!name_ok(name, AWS_THING_MAX, ":_-"))
        return "an AWS IoT thing name is 1 to 128 characters of A-Z a-z 0-9 : _ -";
    return NULL;
}

const char *aws_shadow_name_check(const char *name)
{
    if (!name_ok(name, AWS_SHADOW_NAME_MAX, ":_-"))
        return "a shadow name is 1 to 64 characters of A-Z a-z 0-9 : _ -";
    return NULL;
}

const char *aws_job_id_check(const char *id)
{
    if (!name_ok(id, AWS_JOB_ID_MAX, "_-"))
        return "a job id is 1 to 64 characters of A-Z a-z 0-9 _ -";
    return NULL;
}

/* Does @topic start with "$aws/things/<thing>/<family>/"? */
static bool thing_family(const char *topic, const char *family)
{
    static const char things[] = "$aws/things/";
    const char *thing = topic + strlen(things), *slash;

    if (strncmp(topic, things, strlen(things)) != 0 || (slash = strchr(thing, '/')) == NULL ||
        slash == thing)
        return false;
    return strncmp(slash + 1, family, strlen(family)) == 0 && slash[1 + strlen(family)] == '/';
}

const char *aws_topic_check(const char *topic)
{
    size_t slashes = 0;
    const char *counted = topic;

    if (strlen(topic) > AWS_TOPIC_MAX_BYTES)
        return "AWS IoT Core takes topics of at most 256 bytes";
    if (topic[0] == '$') {
        static const char *const open_families[] = {"$aws/rules/", "$aws/certificates/",
                                                    "$aws/provisioning-templates/"};
        bool allowed = thing_family(topic, "shadow") || thing_family(topic, "jobs") ||
                       thing_family(topic, "defender");
        for (size_t i = 0; i < sizeof(open_families) / sizeof(open_families[0]); i++)
            allowed = allowed || strncmp(topic, open_families[i], strlen(open_families[i])) == 0;
        if (!allowed)
            return "topics starting with $ are reserved by AWS IoT Core; a device may publish "
                   "only to $aws/things/<thing>/shadow/, jobs/ and defender/, $aws/rules/, "
                   "$aws/certificates/ and $aws/provisioning-templates/";
        if (strncmp(topic, "$aws/rules/", 11) == 0) {
            /* Basic Ingest: "$aws/rules/<rule>/" does not count. */
            const char *rule_end = strchr(topic + 11, '/');
            counted = rule_end ? rule_end + 1 : "";
        }
    }
    for (const char *p = counted; *p; p++)
        slashes += *p == '/';
    if (slashes > AWS_TOPIC_MAX_SLASHES)
        return "AWS IoT Core takes topics with at most 7 '/' (8 levels); shorten the sub-topic";
    return NULL;
}

static int result(int n, size_t cap)
{
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : n;
}

int aws_topic(const char *a, const char *b, const char *c, const char *sub, char *buf, size_t cap)
{
    if (sub)
        return result(snprintf(buf, cap, "%s/%s/%s/%s", a, b, c, sub), cap);
    return result(snprintf(buf, cap, "%s/%s/%s", a, b, c), cap);
}

int aws_shadow_topic(const char *thing, const char *shadow, const char *op, char *buf, size_t cap)
{
    if (shadow)
        return result(snprintf(buf, cap, "$aws/things/%s/shadow/name/%s/%s", thing, shadow, op),
                      cap);
    return result(snprintf(buf, cap, "$aws/things/%s/shadow/%s", thing, op), cap);
}

/* The next level of *@p (at most @cap - 1 bytes) into @out; *@p moves past
 * it and its '/'. Returns false when there is none or it is too long. */
static bool next_level(const char **p, char *out, size_t cap)
{
    const char *end = strchr(*p, '/');
    size_t len = end ? (size_t)(end - *p) : strlen(*p);

    if (**p == '\0' || len >= cap)
        return false;
    memcpy(out, *p, len);
    out[len] = '\0';
    *p += len + (end != NULL);
    return true;
}

/* shadow[/name/N]/<op>/<result>, after "$aws/things/<thing>/shadow/". */
static int shadow_parse(const char *rest, struct aws_reserved *out)
{
    char op[16], res[16];

    if (strncmp(rest, "name/", 5) == 0) {
        rest += 5;
        if (!next_level(&rest, out->shadow, sizeof(out->shadow)) ||
            aws_shadow_name_check(out->shadow) != NULL)
            return -EINVAL;
    }
    if (!next_level(&rest, op, sizeof(op)) || !next_level(&rest, res, sizeof(res)) || *rest)
        return 0; /* get, update, delete themselves: what others sent */
    bool get = strcmp(op, "get") == 0, update = strcmp(op, "update") == 0;
    if (get && strcmp(res, "accepted") == 0)
        out->kind = AWS_SHADOW_DOCUMENT;
    else if (update && strcmp(res, "delta") == 0)
        out->kind = AWS_SHADOW_DELTA;
    else if (update && strcmp(res, "accepted") == 0)
        out->kind = AWS_SHADOW_ACCEPTED;
    else if ((get || update) && strcmp(res, "rejected") == 0)
        out->kind = AWS_SHADOW_REJECTED;
    snprintf(out->what, sizeof(out->what), "shadow %s%s%s", out->shadow, out->shadow[0] ? " " : "",
             op);
    return 0;
}

/* After "$aws/things/<thing>/jobs/". */
static int jobs_parse(const char *rest, struct aws_reserved *out)
{
    char job[AWS_JOB_ID_MAX + 2], op[16], res[16] = "";

    if (strcmp(rest, "notify-next") == 0) {
        out->kind = AWS_JOBS_NEXT;
        return 0;
    }
    if (!next_level(&rest, job, sizeof(job)) || !next_level(&rest, op, sizeof(op)))
        return 0;
    if (strcmp(job, "start-next") == 0) {
        snprintf(res, sizeof(res), "%s", op);
        snprintf(out->what, sizeof(out->what), "jobs start-next");
        if (*rest)
            return 0;
        if (strcmp(res, "accepted") == 0)
            out->kind = AWS_JOBS_STARTED;
        else if (strcmp(res, "rejected") == 0)
            out->kind = AWS_JOBS_REJECTED;
        return 0;
    }
    if (!next_level(&rest, res, sizeof(res)) || *rest)
        return 0;
    snprintf(out->what, sizeof(out->what), "job %s %s", job, op);
    if (strcmp(job, "$next") == 0 && strcmp(op, "get") == 0 && strcmp(res, "accepted") == 0)
        out->kind = AWS_JOBS_NEXT;
    else if (strcmp(res, "rejected") == 0)
        out->kind = AWS_JOBS_REJECTED;
    else if (strcmp(op, "update") == 0 && strcmp(res, "accepted") == 0)
        out->kind = AWS_JOBS_ACCEPTED;
    return 0;
}

int aws_reserved_parse(const char *topic, struct aws_reserved *out)
{
    static const char things[] = "$aws/things/";
    const char *rest = topic + strlen(things);
    char family[16];

    memset(out, 0, sizeof(*out));
    if (strncmp(topic, things, strlen(things)) != 0)
        return 0;
    if (!next_level(&rest, out->thing, sizeof(out->thing)) ||
        aws_thing_name_check(out->thing) != NULL)
        return -EINVAL;
    if (!next_level(&rest, family, sizeof(family)))
        return 0;
    if (strcmp(family, "shadow") == 0)
        return shadow_parse(rest, out);
    if (strcmp(family, "jobs") == 0)
        return jobs_parse(rest, out);
    return 0;
}
