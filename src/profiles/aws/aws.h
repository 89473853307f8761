/* aws/aws.h - AWS IoT Core's rules and topics, pure: for the profile
 * (aws.c, spec.c, section.c) and its unit tests. The sources are the AWS IoT
 * Core developer guide: "AWS IoT Core message broker and protocol limits
 * and quotas", "Reserved topics" (Device Shadow and Jobs), "Device Shadow
 * service MQTT topics" and "Jobs device MQTT API operations".
 *
 * The topics this profile builds, for a thing T (the gateway's own thing,
 * aws.thing, or a child through the gateway's connection) and a named
 * shadow N:
 *   dt/<gateway>/<child>[/<sub>]                telemetry (the whitepaper
 *                                               "Designing MQTT Topics for
 *                                               AWS IoT Core" layout)
 *   cmd/<gateway>/<child>[/<sub>]               commands to a child
 *   $aws/things/T/shadow[/name/N]/<op>          op: get, update
 *   $aws/things/T/shadow[/name/N]/<op>/<result> result: accepted, rejected,
 *                                               delta (update only)
 *   $aws/things/T/jobs/notify-next, jobs/$next/get[/<result>],
 *   jobs/start-next[/<result>], jobs/<job id>/update[/<result>]
 */
#ifndef UPLINKD_PROFILES_AWS_H
#define UPLINKD_PROFILES_AWS_H

#include <stdbool.h>
#include <stddef.h>

/* Quotas that are not adjustable, or their defaults. */
#define AWS_MAX_PAYLOAD       (128 * 1024) /* bytes of one PUBLISH payload */
#define AWS_MAX_INFLIGHT      100          /* unacknowledged QoS 1 publishes per connection */
#define AWS_TOPIC_MAX_BYTES   256          /* UTF-8 bytes of a topic name */
#define AWS_TOPIC_MAX_SLASHES 7            /* '/' in a topic (Basic Ingest's first 3 excepted) */
#define AWS_THING_MAX         128          /* [a-zA-Z0-9:_-]{1,128} */
#define AWS_SHADOW_NAME_MAX   64           /* [a-zA-Z0-9:_-]{1,64} */
#define AWS_JOB_ID_MAX        64           /* [a-zA-Z0-9_-]{1,64} */
/* ALPN for mutual TLS on port 443 ("Protocols, port mappings, and authentication"). */
#define AWS_ALPN_MTLS "x-amzn-mqtt-ca"

/** aws_thing_name_check() - NULL when @name is a valid thing name, else why not. */
const char *aws_thing_name_check(const char *name);

/** aws_shadow_name_check() - NULL when @name is a valid named-shadow name. */
const char *aws_shadow_name_check(const char *name);

/**
 * aws_topic_check() - NULL when AWS IoT Core takes a PUBLISH to @topic from
 * a device, else why not: at most 256 bytes and 7 '/' (not counting
 * "$aws/rules/<rule>/" of Basic Ingest), and a topic starting with '$' only
 * in the reserved families a device publishes to ($aws/things/<T>/shadow/,
 * $aws/things/<T>/jobs/, $aws/rules/, $aws/certificates/,
 * $aws/provisioning-templates/, $aws/things/<T>/defender/). AWS closes the
 * connection of a client that publishes where it may not, so a message it
 * would refuse must never reach the spool.
 */
const char *aws_topic_check(const char *topic);

/**
 * aws_topic() - "<a>/<b>/<c>[/<sub>]" into @buf (@cap bytes), for the
 * telemetry and command layouts (a = "dt" or "cmd", b the gateway's thing,
 * c the child). @sub may be NULL. Returns the length, -ENAMETOOLONG.
 */
int aws_topic(const char *a, const char *b, const char *c, const char *sub, char *buf, size_t cap);

/**
 * aws_shadow_topic() - "$aws/things/<thing>/shadow[/name/<shadow>]/<op>"
 * (@shadow NULL: the classic shadow). Returns the length, -ENAMETOOLONG.
 */
int aws_shadow_topic(const char *thing, const char *shadow, const char *op, char *buf, size_t cap);

/* What a topic under $aws/things/<thing>/ is, for down_cb. */
enum aws_reserved_kind {
    AWS_RESERVED_NONE,   /* not one this profile reads */
    AWS_SHADOW_DOCUMENT, /* shadow[/name/N]/get/accepted: the whole document */
    AWS_SHADOW_DELTA,    /* shadow[/name/N]/update/delta */
    AWS_SHADOW_REJECTED, /* shadow[/name/N]/{get,update}/rejected */
    AWS_SHADOW_ACCEPTED, /* shadow[/name/N]/update/accepted (nothing to do) */
    AWS_JOBS_NEXT,       /* jobs/notify-next, jobs/$next/get/accepted */
    AWS_JOBS_STARTED,    /* jobs/start-next/accepted */
    AWS_JOBS_REJECTED,   /* jobs/.../rejected */
    AWS_JOBS_ACCEPTED,   /* jobs/<id>/update/accepted (nothing to do) */
};

struct aws_reserved {
    enum aws_reserved_kind kind;
    char thing[AWS_THING_MAX + 1];
    char shadow[AWS_SHADOW_NAME_MAX + 1]; /* "" = classic, or not a shadow topic */
    char what[128]; /* rejected: the request ("shadow get", "job 42 update") */
};

/**
 * aws_reserved_parse() - what @topic (from the cloud) is; fills @out. Returns
 * 0, or -EINVAL when it is under $aws/things/ but not well formed (a thing
 * or shadow name AWS would not send).
 */
int aws_reserved_parse(const char *topic, struct aws_reserved *out);

/**
 * aws_job_id_check() - NULL when @id is a valid job id ([a-zA-Z0-9_-]{1,64}).
 */
const char *aws_job_id_check(const char *id);

/* Fleet provisioning by claim ("Device provisioning MQTT API"): the
 * topics, and reading AWS's JSON answers. */
#define AWS_CREATE_CERT      "$aws/certificates/create/json"
#define AWS_PROVISION_FORMAT "$aws/provisioning-templates/%s/provision/json"

struct json_buf;
struct conf_aws_param;

/**
 * aws_json_strings() - the string members @names[0..@n) of the JSON object
 * @payload (@len bytes), each copied into @values[i] (malloc'd; NULL when
 * absent or not a string). JSON is read with libyaml (JSON's syntax is
 * YAML's flow style; escapes such as \n in a PEM are decoded), not by hand.
 * Returns 0, -EINVAL (not a JSON object; @values all NULL), -ENOMEM.
 */
int aws_json_strings(const void *payload, size_t len, const char *const *names, char **values,
                     size_t n);

/**
 * aws_provision_request() - the RegisterThing request
 * {"certificateOwnershipToken":@token,"parameters":{...}} into @out.
 */
void aws_provision_request(const char *token, const struct conf_aws_param *params, size_t count,
                           struct json_buf *out);

#endif
