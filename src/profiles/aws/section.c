/* aws/section.c - uplinks[].aws: the thing, its named shadows and jobs, and
 * the rules AWS IoT Core sets for the rest of the uplink (docs/
 * configuration.md, "aws"). */
#include "profiles/aws/section.h"

#include <stdlib.h>
#include <string.h>

#include "aws.h"
#include "conf_walk.h"
#include "mapping.h"

enum {
    AWS_THING,
    AWS_SHADOWS,
    AWS_JOBS,
    AWS_CHILD_SHADOWS,
    AWS_PROVISIONING,
    AWS_CHILD_CERT,
    AWS_CHILD_KEY,
    AWS_SESSION_IDLE,
    AWS_KEYS
};
static const char *const aws_keys[AWS_KEYS] = {
    [AWS_THING] = "thing",
    [AWS_SHADOWS] = "shadows",
    [AWS_JOBS] = "jobs",
    [AWS_CHILD_SHADOWS] = "child_shadows",
    [AWS_PROVISIONING] = "provisioning",
    [AWS_CHILD_CERT] = "child_cert",
    [AWS_CHILD_KEY] = "child_key",
    [AWS_SESSION_IDLE] = "session_idle",
};

#define AWS_DEFAULT_SESSION_IDLE_MS (10ULL * 60 * 1000)

enum { PROV_TEMPLATE, PROV_PARAMETERS, PROV_KEYS };
static const char *const prov_keys[PROV_KEYS] = {
    [PROV_TEMPLATE] = "template",
    [PROV_PARAMETERS] = "parameters",
};

static int shadow_check(const char *name, const char **reason)
{
    *reason = aws_shadow_name_check(name);
    return *reason ? -1 : 0;
}

static void get_thing(struct conf_loader *ld, yaml_node_t *node, const char *path,
                      struct conf_aws *aws)
{
    static const char expected[] = "the gateway's AWS IoT thing name";
    char k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];

    conf_key_join(k, sizeof(k), path, "thing");
    if (!conf_node_present(node)) {
        /* gateway.id was checked as a child id, not as a thing name. */
        if (ld->conf->gateway_id != NULL && aws_thing_name_check(ld->conf->gateway_id) == NULL)
            conf_set_string(ld, &aws->thing, ld->conf->gateway_id);
        return;
    }
    if (conf_get_text(ld, node, k, expected, AWS_THING_MAX, &aws->thing) < 0 || !aws->thing)
        return;
    const char *why = aws_thing_name_check(aws->thing);
    if (why == NULL)
        why = mapping_child_check(aws->thing, strlen(aws->thing));
    if (why) {
        conf_report(ld, node->start_mark, k, "%s: %s (expected %s)",
                    conf_quote(aws->thing, quoted, sizeof(quoted)), why, expected);
        free(aws->thing);
        aws->thing = NULL;
    }
}

/* provisioning.parameters: a mapping of template parameter -> string. */
static void get_params(struct conf_loader *ld, yaml_node_t *node, const char *path,
                       struct conf_aws *aws)
{
    static const char expected[] = "a mapping of template parameters to strings, e.g. "
                                   "{SerialNumber: \"0001\"}";
    char key[CONF_KEY_MAX];

    if (!conf_expect_kind(ld, node, path, YAML_MAPPING_NODE, expected))
        return;
    size_t count = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    if (count == 0)
        return;
    aws->params = calloc(count, sizeof(*aws->params));
    if (aws->params == NULL) {
        ld->oom = true;
        return;
    }
    for (yaml_node_pair_t *pair = node->data.mapping.pairs.start;
         pair < node->data.mapping.pairs.top; pair++) {
        struct conf_aws_param param = {NULL, NULL};

        if (conf_get_text(ld, conf_node_at(ld, pair->key), path, "a parameter name", 256,
                          &param.name) < 0 ||
            param.name == NULL)
            continue;
        conf_key_join(key, sizeof(key), path, param.name);
        if (conf_get_text(ld, conf_node_at(ld, pair->value), key, "a string value",
                          CONF_MQTT_STRING_MAX, &param.value) < 0 ||
            param.value == NULL) {
            free(param.name);
            continue;
        }
        aws->params[aws->param_count++] = param;
    }
}

/* provisioning: {template, parameters}; the template's parameters default
 * to {ThingName: <thing>}, so that the thing AWS registers is the one whose
 * topics the spool already holds. */
static void get_provisioning(struct conf_loader *ld, yaml_node_t *node, const char *path,
                             struct conf_aws *aws)
{
    yaml_node_t *values[PROV_KEYS] = {NULL};
    yaml_mark_t marks[PROV_KEYS];
    char k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];

    if (!conf_walk_mapping(ld, node, path, prov_keys, PROV_KEYS, values, marks))
        return;
    conf_key_join(k, sizeof(k), path, "template");
    if (!conf_node_present(values[PROV_TEMPLATE])) {
        conf_report(ld, node->start_mark, k,
                    "missing: the name of the fleet provisioning template to register with");
    } else if (conf_get_text(ld, values[PROV_TEMPLATE], k, "a provisioning template name", 36,
                             &aws->template_name) == 0 &&
               aws->template_name && conf_first_bad_char(aws->template_name, "_-") != NULL) {
        conf_report(ld, values[PROV_TEMPLATE]->start_mark, k,
                    "%s: a template name is 1 to 36 characters of A-Z a-z 0-9 _ -",
                    conf_quote(aws->template_name, quoted, sizeof(quoted)));
        free(aws->template_name);
        aws->template_name = NULL;
    }
    if (conf_node_present(values[PROV_PARAMETERS])) {
        conf_key_join(k, sizeof(k), path, "parameters");
        get_params(ld, values[PROV_PARAMETERS], k, aws);
    } else if (aws->thing != NULL) {
        aws->params = calloc(1, sizeof(*aws->params));
        if (aws->params == NULL) {
            ld->oom = true;
            return;
        }
        aws->param_count = 1;
        conf_set_string(ld, &aws->params[0].name, "ThingName");
        conf_set_string(ld, &aws->params[0].value, aws->thing);
    }
}

/* TLS (always), mutual TLS or a custom authorizer's user name, the
 * in-flight window, and ALPN on port 443. */
static void check_uplink(struct conf_loader *ld, yaml_node_t *uplink_node, const char *uplink_path,
                         struct conf_uplink *uplink, const struct conf_aws *aws, bool thing_given)
{
    char k[CONF_KEY_MAX];

    if (aws->thing == NULL && !thing_given) {
        conf_key_join(k, sizeof(k), uplink_path, "aws.thing");
        conf_report(ld, uplink_node->start_mark, k,
                    "missing: gateway.id is not a valid thing name (1 to 128 characters of "
                    "A-Z a-z 0-9 : _ -); set aws.thing");
    }
    if (!uplink->tls.enabled) {
        conf_key_join(k, sizeof(k), uplink_path, "tls.enabled");
        conf_report(ld, uplink_node->start_mark, k,
                    "AWS IoT Core accepts MQTT only over TLS (port 8883, or 443 with ALPN): "
                    "remove tls.enabled: false");
        return;
    }
    if (uplink->auth.type == CONF_AUTH_JWT) {
        conf_key_join(k, sizeof(k), uplink_path, "auth.type");
        conf_report(ld, uplink_node->start_mark, k,
                    "AWS IoT Core takes no JWT password: use a device certificate (tls.cert "
                    "and tls.key), or auth.type: basic for a custom authorizer");
    } else if (uplink->tls.cert == NULL && uplink->auth.type == CONF_AUTH_NONE) {
        conf_key_join(k, sizeof(k), uplink_path, "tls.cert");
        conf_report(ld, uplink_node->start_mark, k,
                    "missing: AWS IoT Core authenticates a device by its X.509 certificate "
                    "(tls.cert and tls.key, the files AWS made for the thing; tls.ca the "
                    "Amazon root CA), or by a custom authorizer (auth.type: basic)");
    }
    if (uplink->max_inflight > AWS_MAX_INFLIGHT) {
        conf_key_join(k, sizeof(k), uplink_path, "max_inflight");
        conf_report(ld, uplink_node->start_mark, k,
                    "%u is above AWS IoT Core's limit of 100 unacknowledged QoS 1 publishes "
                    "per connection (it closes the connection); use at most 100",
                    uplink->max_inflight);
    }
    /* Port 443 serves HTTPS too: AWS picks MQTT by ALPN, x-amzn-mqtt-ca for
     * a certificate, "mqtt" for a custom authorizer. */
    if (uplink->port == 443 && uplink->tls.alpn == NULL)
        conf_set_string(ld, &uplink->tls.alpn, uplink->tls.cert ? AWS_ALPN_MTLS : "mqtt");
}

/* Children as things of their own: a certificate and key pattern, both or
 * neither. */
static void get_child_identity(struct conf_loader *ld, yaml_node_t *const *values,
                               yaml_node_t *node, const char *path, struct conf_aws *aws)
{
    char k[CONF_KEY_MAX];

    if (conf_node_present(values[AWS_CHILD_CERT])) {
        conf_key_join(k, sizeof(k), path, "child_cert");
        conf_get_file_pattern(ld, values[AWS_CHILD_CERT], k, "/etc/uplinkd/things/%c/cert.pem",
                              &aws->child_cert);
    }
    if (conf_node_present(values[AWS_CHILD_KEY])) {
        conf_key_join(k, sizeof(k), path, "child_key");
        conf_get_file_pattern(ld, values[AWS_CHILD_KEY], k, "/etc/uplinkd/things/%c/private.key",
                              &aws->child_key);
    }
    if (conf_node_present(values[AWS_CHILD_CERT]) != conf_node_present(values[AWS_CHILD_KEY])) {
        conf_key_join(k, sizeof(k), path,
                      conf_node_present(values[AWS_CHILD_CERT]) ? "child_key" : "child_cert");
        conf_report(ld, node->start_mark, k,
                    "missing: a child's own certificate needs its key (set both aws.child_cert "
                    "and aws.child_key)");
    }
    if (conf_node_present(values[AWS_SESSION_IDLE])) {
        conf_key_join(k, sizeof(k), path, "session_idle");
        if (!conf_node_present(values[AWS_CHILD_CERT]))
            conf_report(ld, values[AWS_SESSION_IDLE]->start_mark, k,
                        "is only used with child_cert and child_key (children as things of "
                        "their own)");
        else
            conf_get_duration_ms(ld, values[AWS_SESSION_IDLE], k, 1000, 7 * 24 * 3600 * 1000ULL,
                                 &aws->session_idle_ms);
    }
}

void aws_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                       const char *uplink_path, struct conf_uplink *uplink)
{
    struct conf_aws *aws = calloc(1, sizeof(*aws));
    yaml_node_t *values[AWS_KEYS] = {NULL};
    yaml_mark_t marks[AWS_KEYS];
    char path[CONF_KEY_MAX], k[CONF_KEY_MAX];

    if (aws == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = aws;
    aws->jobs = true;
    aws->child_shadows = true;
    aws->session_idle_ms = AWS_DEFAULT_SESSION_IDLE_MS;
    conf_key_join(path, sizeof(path), uplink_path, "aws");
    if (node != NULL && !conf_walk_mapping(ld, node, path, aws_keys, AWS_KEYS, values, marks))
        return;
    get_thing(ld, values[AWS_THING], path, aws);
    if (conf_node_present(values[AWS_SHADOWS])) {
        conf_key_join(k, sizeof(k), path, "shadows");
        conf_get_string_list(ld, values[AWS_SHADOWS], k,
                             "a list of named shadows of the thing, e.g. [config, firmware]",
                             shadow_check, &aws->shadows, &aws->shadow_count);
    }
    if (conf_node_present(values[AWS_JOBS])) {
        conf_key_join(k, sizeof(k), path, "jobs");
        conf_get_bool(ld, values[AWS_JOBS], k, &aws->jobs);
    }
    if (conf_node_present(values[AWS_CHILD_SHADOWS])) {
        conf_key_join(k, sizeof(k), path, "child_shadows");
        conf_get_bool(ld, values[AWS_CHILD_SHADOWS], k, &aws->child_shadows);
    }
    if (conf_node_present(values[AWS_PROVISIONING])) {
        conf_key_join(k, sizeof(k), path, "provisioning");
        get_provisioning(ld, values[AWS_PROVISIONING], k, aws);
        if (uplink->tls.cert == NULL)
            conf_report(ld, values[AWS_PROVISIONING]->start_mark, k,
                        "needs the claim certificate in tls.cert and tls.key (the certificate "
                        "that the template's claim policy is attached to)");
    }
    if (node != NULL)
        get_child_identity(ld, values, node, path, aws);
    check_uplink(ld, uplink_node, uplink_path, uplink, aws, conf_node_present(values[AWS_THING]));
    /* The client id is the thing name unless the operator set one (a thing
     * policy with ${iot:Connection.Thing.ThingName} needs them equal). */
    if (uplink->client_id == NULL && aws->thing != NULL)
        conf_set_string(ld, &uplink->client_id, aws->thing);
}

void aws_section_free(void *section)
{
    struct conf_aws *aws = section;

    if (aws == NULL)
        return;
    free(aws->thing);
    conf_free_strings(aws->shadows, aws->shadow_count);
    free(aws->template_name);
    for (size_t i = 0; i < aws->param_count; i++) {
        free(aws->params[i].name);
        free(aws->params[i].value);
    }
    free(aws->params);
    free(aws->child_cert);
    free(aws->child_key);
    free(aws);
}

bool aws_section_equal(const void *section_a, const void *section_b)
{
    const struct conf_aws *a = section_a, *b = section_b;

    if (!conf_str_equal(a->thing, b->thing) || a->jobs != b->jobs ||
        a->child_shadows != b->child_shadows || a->shadow_count != b->shadow_count ||
        !conf_str_equal(a->template_name, b->template_name) || a->param_count != b->param_count)
        return false;
    for (size_t i = 0; i < a->param_count; i++) {
        if (!conf_str_equal(a->params[i].name, b->params[i].name) ||
            !conf_str_equal(a->params[i].value, b->params[i].value))
            return false;
    }
    for (size_t i = 0; i < a->shadow_count; i++) {
        if (!conf_str_equal(a->shadows[i], b->shadows[i]))
            return false;
    }
    return true;
}
