/* aws/provision.c - fleet provisioning by claim (provision.h). */
#include "provision.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "aws.h"
#include "json.h"
#include "log.h"
#include "profile.h"
#include "profiles/aws/section.h"
#include "registry.h"
#include "sm.h"
#include "util.h"

/*
 * The exchange, one per connection with the claim certificate:
 *
 *   CLAIM ---- create/json/accepted ----> REGISTERING
 *     ^                                    |      |
 *     +---- rejected, or the connection ---+      | provision/json/accepted,
 *           ended (the token is for one try)      | the files are stored
 *                                                 v
 *                                                DONE (final)
 */
enum fleet_state { FLEET_CLAIM, FLEET_REGISTERING, FLEET_DONE };

static const struct sm_state fleet_states[] = {
    [FLEET_CLAIM] = {"CLAIM", SM_TO(FLEET_REGISTERING)},
    [FLEET_REGISTERING] = {"REGISTERING", SM_TO(FLEET_CLAIM) | SM_TO(FLEET_DONE)},
    [FLEET_DONE] = {"DONE", 0},
};

struct aws_fleet {
    struct sm sm;
    const char *uplink;            /* borrowed: the uplink's name, for the log */
    char dir[PATH_MAX - 32];       /* <state_dir>/provisioned/<uplink> */
    char cert[PATH_MAX];           /* dir/certificate.pem */
    char key[PATH_MAX];            /* dir/private.key */
    char thing[AWS_THING_MAX + 1]; /* DONE: the thing AWS registered */
    char *new_cert, *new_key;      /* REGISTERING: what CreateKeysAndCertificate issued */
    char provision_topic[128];     /* $aws/provisioning-templates/<template>/provision/json */
};

static const char *fleet_log_name(const struct sm *sm)
{
    return container_of(sm, struct aws_fleet, sm)->uplink;
}

static bool fleet_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct aws_fleet *fleet = container_of(sm, struct aws_fleet, sm);
    bool pending = fleet->new_cert && fleet->new_key;

    if ((sm_state(sm) == FLEET_REGISTERING) != pending) {
        snprintf(why, size, "an issued certificate is held %s",
                 pending ? "outside REGISTERING" : "in none");
        return false;
    }
    return sm_state(sm) != FLEET_DONE || fleet->thing[0];
}

static const struct sm_conf fleet_sm = {
    .states = fleet_states,
    .count = 3,
    .level = LOG_INFO,
    .log_name = fleet_log_name,
    .invariant = fleet_invariant,
};

static void forget_issued(struct aws_fleet *fleet)
{
    if (fleet->new_key) {
        OPENSSL_cleanse(fleet->new_key, strlen(fleet->new_key));
        free(fleet->new_key);
    }
    free(fleet->new_cert);
    fleet->new_key = fleet->new_cert = NULL;
}

/* The thing name stored by an earlier run, or "" when there is none. */
static void read_thing(struct aws_fleet *fleet)
{
    char path[PATH_MAX + 8], line[AWS_THING_MAX + 2] = "";
    FILE *f;

    snprintf(path, sizeof(path), "%s/thing", fleet->dir);
    if (!(f = fopen(path, "r")))
        return;
    if (fgets(line, sizeof(line), f))
        line[strcspn(line, "\n")] = '\0';
    fclose(f);
    if (aws_thing_name_check(line) != NULL || access(fleet->cert, R_OK) != 0 ||
        access(fleet->key, R_OK) != 0) {
        log_uplink(LOG_WARNING, fleet->uplink,
                   "%s holds no complete provisioned identity; provisioning again with the "
                   "claim certificate",
                   fleet->dir);
        return;
    }
    snprintf(fleet->thing, sizeof(fleet->thing), "%s", line);
}

int aws_fleet_new(const struct profile_instance *pi, struct aws_fleet **out)
{
    const struct conf_aws *aws = aws_conf(pi->uc);
    struct aws_fleet *fleet = calloc(1, sizeof(*fleet));

    *out = NULL;
    if (!fleet)
        return -ENOMEM;
    fleet->uplink = pi->uc->name;
    if (snprintf(fleet->dir, sizeof(fleet->dir), "%s/provisioned/%s", pi->conf->state_dir,
                 pi->uc->name) >= (int)sizeof(fleet->dir)) {
        free(fleet);
        return -ENAMETOOLONG;
    }
    snprintf(fleet->cert, sizeof(fleet->cert), "%s/certificate.pem", fleet->dir);
    snprintf(fleet->key, sizeof(fleet->key), "%s/private.key", fleet->dir);
    snprintf(fleet->provision_topic, sizeof(fleet->provision_topic), AWS_PROVISION_FORMAT,
             aws->template_name ? aws->template_name : "");
    read_thing(fleet);
    sm_init(&fleet->sm, &fleet_sm, FLEET_CLAIM);
    if (fleet->thing[0]) {
        /* A complete set from an earlier run: straight to DONE. */
        sm_init(&fleet->sm, &fleet_sm, FLEET_DONE);
        log_uplink(LOG_INFO, fleet->uplink,
                   "fleet provisioning: using the certificate issued for thing %s (%s)",
                   fleet->thing, fleet->cert);
    }
    *out = fleet;
    return 0;
}

void aws_fleet_free(struct aws_fleet *fleet)
{
    if (!fleet)
        return;
    forget_issued(fleet);
    free(fleet);
}

bool aws_fleet_done(const struct aws_fleet *fleet)
{
    return fleet == NULL || sm_state(&fleet->sm) == FLEET_DONE;
}

const char *aws_fleet_thing(const struct aws_fleet *fleet)
{
    return fleet && fleet->thing[0] ? fleet->thing : NULL;
}

static const char *const claim_filters[] = {
    AWS_CREATE_CERT "/accepted",
    AWS_CREATE_CERT "/rejected",
};

void aws_fleet_session(struct profile_instance *pi, struct aws_fleet *fleet,
                       const struct profile_msgs *thing_filters, struct uplink_session *session)
{
    char filter[PROFILE_TOPIC_MAX];
    bool done = aws_fleet_done(fleet);

    if (sm_state(&fleet->sm) == FLEET_REGISTERING) {
        forget_issued(fleet); /* the ownership token was for the connection that ended */
        sm_move(&fleet->sm, FLEET_CLAIM, "the connection ended before RegisterThing answered");
    }
    for (size_t i = 0; i < thing_filters->count; i++) {
        if (done)
            pi->port->subscribe(pi->uplink, thing_filters->msg[i].topic, thing_filters->msg[i].qos);
        else
            pi->port->unsubscribe(pi->uplink, thing_filters->msg[i].topic);
    }
    for (size_t i = 0; i < 3; i++) {
        if (i < 2)
            snprintf(filter, sizeof(filter), "%s", claim_filters[i]);
        else
            snprintf(filter, sizeof(filter), "%s/+", fleet->provision_topic);
        if (done)
            pi->port->unsubscribe(pi->uplink, filter);
        else
            pi->port->subscribe(pi->uplink, filter, 1);
    }
    if (done) {
        session->cert = fleet->cert;
        session->key = fleet->key;
        session->client_id = fleet->thing;
    } else {
        session->hold_spool = true; /* the claim policy allows provisioning, nothing else */
    }
}

void aws_fleet_online(struct profile_instance *pi, struct aws_fleet *fleet,
                      struct profile_msgs *first)
{
    (void)pi;
    if (sm_state(&fleet->sm) != FLEET_CLAIM)
        return;
    log_uplink(LOG_NOTICE, fleet->uplink,
               "fleet provisioning: connected with the claim certificate; asking AWS IoT Core "
               "for the thing's own certificate (template %s)",
               aws_conf(pi->uc)->template_name);
    profile_msgs_add(first, AWS_CREATE_CERT, "{}", 2, 1, false);
}

static void refused(struct profile_instance *pi, struct aws_fleet *fleet, const char *topic,
                    const char *what, const void *payload, size_t len)
{
    char why[400];

    snprintf(why, sizeof(why),
             "AWS IoT Core refused fleet provisioning (%s, template %s): %.*s; local data stays "
             "in the spool, and the next connection asks again (uplinkctl reconnect %s)",
             what, aws_conf(pi->uc)->template_name, (int)(len > 200 ? 200 : len),
             (const char *)payload, pi->uc->name);
    profile_report_error(pi, topic, why);
    if (sm_state(&fleet->sm) == FLEET_REGISTERING) {
        forget_issued(fleet);
        sm_move(&fleet->sm, FLEET_CLAIM, "RegisterThing refused");
    }
}

/* CreateKeysAndCertificate answered: keep the certificate and key, and
 * register the thing with the ownership token. */
static void created(struct profile_instance *pi, struct aws_fleet *fleet, const void *payload,
                    size_t len)
{
    static const char *const names[] = {"certificatePem", "privateKey",
                                        "certificateOwnershipToken"};
    char *values[3];
    struct json_buf request;

    if (sm_state(&fleet->sm) != FLEET_CLAIM)
        return; /* an answer to an earlier request */
    int rc = aws_json_strings(payload, len, names, values, 3);
    if (rc < 0 || !values[0] || !values[1] || !values[2]) {
        profile_report_error(pi, AWS_CREATE_CERT "/accepted",
                             "CreateKeysAndCertificate answered without certificatePem, "
                             "privateKey and certificateOwnershipToken; not provisioned");
        for (int i = 0; rc == 0 && i < 3; i++) {
            if (values[i])
                OPENSSL_cleanse(values[i], strlen(values[i]));
            free(values[i]);
        }
        return;
    }
    fleet->new_cert = values[0];
    fleet->new_key = values[1];
    sm_move(&fleet->sm, FLEET_REGISTERING, "CreateKeysAndCertificate issued a certificate");
    const struct conf_aws *aws = aws_conf(pi->uc);
    json_buf_init(&request);
    aws_provision_request(values[2], aws->params, aws->param_count, &request);
    OPENSSL_cleanse(values[2], strlen(values[2]));
    free(values[2]);
    if (request.failed ||
        pi->port->send_first(pi->uplink, fleet->provision_topic, request.data, request.len, 1,
                             UPLINK_CONTROL_CONNECTION, NULL, NULL) < 0) {
        log_uplink(LOG_ERR, fleet->uplink, "fleet provisioning: cannot queue RegisterThing");
        forget_issued(fleet);
        sm_move(&fleet->sm, FLEET_CLAIM, "RegisterThing could not be queued");
    }
    if (request.data)
        OPENSSL_cleanse(request.data, request.len);
    json_buf_deinit(&request);
}

/* <dir> and its parent, mode 0700. */
static int make_dirs(const char *dir)
{
    char parent[PATH_MAX];
    const char *slash = strrchr(dir, '/');

    snprintf(parent, sizeof(parent), "%.*s", (int)(slash - dir), dir);
    if (mkdir(parent, 0700) < 0 && errno != EEXIST)
        return -errno;
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* RegisterThing answered: store the identity and connect with it. */
static void registered(struct profile_instance *pi, struct aws_fleet *fleet, const void *payload,
                       size_t len)
{
    static const char *const names[] = {"thingName"};
    char *thing = NULL, path[PATH_MAX + 8], why[512];
    int rc;

    if (sm_state(&fleet->sm) != FLEET_REGISTERING)
        return;
    rc = aws_json_strings(payload, len, names, &thing, 1);
    if (rc < 0 || !thing || aws_thing_name_check(thing) != NULL) {
        refused(pi, fleet, fleet->provision_topic, "RegisterThing gave no valid thingName", payload,
                len);
        free(thing);
        return;
    }
    snprintf(path, sizeof(path), "%s/thing", fleet->dir);
    char line[AWS_THING_MAX + 2];
    int n = snprintf(line, sizeof(line), "%s\n", thing);
    if ((rc = make_dirs(fleet->dir)) < 0 ||
        (rc = registry_write_file(fleet->key, fleet->new_key, strlen(fleet->new_key), 0600)) < 0 ||
        (rc = registry_write_file(fleet->cert, fleet->new_cert, strlen(fleet->new_cert), 0600)) <
            0 ||
        (rc = registry_write_file(path, line, (size_t)n, 0600)) < 0) {
        snprintf(why, sizeof(why),
                 "fleet provisioning: cannot store the issued certificate in %.200s: %s; it is "
                 "lost, the next connection asks for another one (free disk space or fix "
                 "gateway.state_dir)",
                 fleet->dir, strerror(-rc));
        profile_report_error(pi, NULL, why);
        free(thing);
        forget_issued(fleet);
        sm_move(&fleet->sm, FLEET_CLAIM, "storing the identity failed");
        return;
    }
    snprintf(fleet->thing, sizeof(fleet->thing), "%s", thing);
    free(thing);
    forget_issued(fleet);
    sm_move(&fleet->sm, FLEET_DONE, "RegisterThing registered the thing");
    const char *configured = aws_conf(pi->uc)->thing;
    if (configured && strcmp(configured, fleet->thing) != 0)
        log_uplink(LOG_WARNING, fleet->uplink,
                   "fleet provisioning: AWS registered the thing %s, but the topics use "
                   "aws.thing %s; set aws.thing: %s (or make the template name the thing "
                   "after its ThingName parameter)",
                   fleet->thing, configured, fleet->thing);
    snprintf(why, sizeof(why),
             "fleet provisioning: thing %s has its own certificate (%.200s); connecting with it",
             fleet->thing, fleet->cert);
    pi->port->reconnect(pi->uplink, why);
}

bool aws_fleet_down(struct profile_instance *pi, struct aws_fleet *fleet, const char *topic,
                    const void *payload, size_t len)
{
    size_t plen = strlen(fleet->provision_topic);

    if (strcmp(topic, AWS_CREATE_CERT "/accepted") == 0) {
        created(pi, fleet, payload, len);
    } else if (strcmp(topic, AWS_CREATE_CERT "/rejected") == 0) {
        refused(pi, fleet, topic, "CreateKeysAndCertificate", payload, len);
    } else if (strncmp(topic, fleet->provision_topic, plen) == 0 &&
               strcmp(topic + plen, "/accepted") == 0) {
        registered(pi, fleet, payload, len);
    } else if (strncmp(topic, fleet->provision_topic, plen) == 0 &&
               strcmp(topic + plen, "/rejected") == 0) {
        refused(pi, fleet, topic, "RegisterThing", payload, len);
    } else {
        return false;
    }
    return true;
}

void aws_fleet_status(const struct profile_instance *pi, const struct aws_fleet *fleet,
                      struct json_buf *out)
{
    json_append_raw(out, ",\"provisioning\":{\"template\":");
    json_append_string(out, aws_conf(pi->uc)->template_name);
    json_append_raw(out, ",\"state\":");
    json_append_string(out, sm_state_name(&fleet_sm, sm_state(&fleet->sm)));
    json_append_raw(out, ",\"thing\":");
    json_append_string(out, fleet->thing[0] ? fleet->thing : NULL);
    json_append_raw(out, "}");
}
