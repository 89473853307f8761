/* cumulocity/section.c - uplinks[].cumulocity: the device, its SmartREST
 * template, registration (100/110/114/117), bootstrap, the last will and
 * how children appear (docs/configuration.md, "cumulocity"). */
#include "profiles/cumulocity/section.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf_walk.h"
#include "mapping.h"

#define C8Y_DEFAULT_TYPE       "c8y_MQTTDevice"
#define C8Y_DEFAULT_CHILD_TYPE "c8y_MQTTChildDevice"
#define C8Y_DEFAULT_BOOTSTRAP  "management/devicebootstrap"
#define C8Y_DEFAULT_WILL_TOPIC "s/us"
#define C8Y_DEFAULT_WILL       "400,c8y_ConnectionEvent,\"Device connection was lost.\""

/* A Cumulocity device id (also a child's parent): a child id of the local
 * contract (mapping_child_check) without ':' (the client id is
 * d:<device_id>[:<template>], Cumulocity "MQTT implementation"). */
static void get_c8y_id(struct conf_loader *ld, yaml_node_t *node, const char *key, char **dst)
{
    static const char expected[] = "a device id without ':', ',', '/', '+', '#', quotes or spaces";
    char quoted[CONF_QUOTE_MAX];
    char *value = NULL;
    const char *why;

    if (conf_get_text(ld, node, key, expected, MAPPING_CHILD_MAX, &value) < 0 || value == NULL)
        return;
    why = strchr(value, ':') ? "contains ':' (Cumulocity's client id d:<device_id>[:<template>] "
                               "uses it as the separator)"
                             : mapping_child_check(value, strlen(value));
    if (why) {
        conf_report(ld, node->start_mark, key, "%s: %s (expected %s)",
                    conf_quote(value, quoted, sizeof(quoted)), why, expected);
        free(value);
        return;
    }
    free(*dst);
    *dst = value;
}

enum { C8Y_HW_SERIAL, C8Y_HW_MODEL, C8Y_HW_REVISION, C8Y_HW_KEYS };
static const char *const c8y_hw_keys[C8Y_HW_KEYS] = {
    [C8Y_HW_SERIAL] = "serial", [C8Y_HW_MODEL] = "model", [C8Y_HW_REVISION] = "revision"};

enum { C8Y_BS_USER, C8Y_BS_PASSWORD, C8Y_BS_PASSWORD_FILE, C8Y_BS_INTERVAL, C8Y_BS_KEYS };
static const char *const c8y_bs_keys[C8Y_BS_KEYS] = {
    [C8Y_BS_USER] = "user",
    [C8Y_BS_PASSWORD] = "password",
    [C8Y_BS_PASSWORD_FILE] = "password_file",
    [C8Y_BS_INTERVAL] = "interval",
};

enum { C8Y_WILL_TOPIC, C8Y_WILL_MESSAGE, C8Y_WILL_KEYS };
static const char *const c8y_will_keys[C8Y_WILL_KEYS] = {
    [C8Y_WILL_TOPIC] = "topic", [C8Y_WILL_MESSAGE] = "message"};

enum { C8Y_CHILD_MATCH, C8Y_CHILD_PARENT, C8Y_CHILD_NAME, C8Y_CHILD_TYPE, C8Y_CHILD_KEYS };
static const char *const c8y_child_keys[C8Y_CHILD_KEYS] = {
    [C8Y_CHILD_MATCH] = "match",
    [C8Y_CHILD_PARENT] = "parent",
    [C8Y_CHILD_NAME] = "name",
    [C8Y_CHILD_TYPE] = "type",
};

enum {
    C8Y_DEVICE_ID,
    C8Y_TEMPLATE,
    C8Y_TENANT,
    C8Y_NAME,
    C8Y_TYPE,
    C8Y_HARDWARE,
    C8Y_SUPPORTED_OPERATIONS,
    C8Y_REQUIRED_INTERVAL,
    C8Y_BOOTSTRAP,
    C8Y_WILL,
    C8Y_CHILDREN,
    C8Y_TOKEN,
    C8Y_KEYS
};
static const char *const c8y_keys[C8Y_KEYS] = {
    [C8Y_DEVICE_ID] = "device_id",
    [C8Y_TEMPLATE] = "template",
    [C8Y_TENANT] = "tenant",
    [C8Y_NAME] = "name",
    [C8Y_TYPE] = "type",
    [C8Y_HARDWARE] = "hardware",
    [C8Y_SUPPORTED_OPERATIONS] = "supported_operations",
    [C8Y_REQUIRED_INTERVAL] = "required_interval",
    [C8Y_BOOTSTRAP] = "bootstrap",
    [C8Y_WILL] = "will",
    [C8Y_CHILDREN] = "children",
    [C8Y_TOKEN] = "token",
};

static void parse_c8y_children(struct conf_loader *ld, yaml_node_t *node, const char *key,
                               struct conf_cumulocity *c8y)
{
    size_t n;

    c8y->children =
        conf_sequence_alloc(ld, node, key, "a sequence of {match, parent, name, type} rules", NULL,
                            sizeof(*c8y->children), &n);
    c8y->child_count = n;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        yaml_node_t *values[C8Y_CHILD_KEYS];
        yaml_mark_t marks[C8Y_CHILD_KEYS];
        struct conf_c8y_child *child = &c8y->children[i];
        char path[CONF_KEY_MAX], k[CONF_KEY_MAX];

        conf_key_format(path, sizeof(path), "%s[%zu]", key, i);
        if (!conf_walk_mapping(ld, item, path, c8y_child_keys, C8Y_CHILD_KEYS, values, marks))
            continue;
        conf_key_join(k, sizeof(k), path, "match");
        if (conf_node_present(values[C8Y_CHILD_MATCH]))
            conf_get_text(ld, values[C8Y_CHILD_MATCH], k, "a glob of child ids, e.g. \"modbus-*\"",
                          256, &child->match);
        conf_key_join(k, sizeof(k), path, "parent");
        if (conf_node_present(values[C8Y_CHILD_PARENT]))
            get_c8y_id(ld, values[C8Y_CHILD_PARENT], k, &child->parent);
        conf_key_join(k, sizeof(k), path, "name");
        if (conf_node_present(values[C8Y_CHILD_NAME]))
            conf_get_text(ld, values[C8Y_CHILD_NAME], k, "a device name ({child} is the child id)",
                          256, &child->name);
        conf_key_join(k, sizeof(k), path, "type");
        if (conf_node_present(values[C8Y_CHILD_TYPE]))
            conf_get_text(ld, values[C8Y_CHILD_TYPE], k, "a device type", 256, &child->type);
        if (child->match == NULL)
            conf_set_string(ld, &child->match, "*");
        if (child->name == NULL)
            conf_set_string(ld, &child->name, "{child}");
        if (child->type == NULL)
            conf_set_string(ld, &child->type, C8Y_DEFAULT_CHILD_TYPE);
    }
}

static void parse_c8y_bootstrap(struct conf_loader *ld, yaml_node_t *node, const char *path,
                                struct conf_cumulocity *c8y)
{
    yaml_node_t *values[C8Y_BS_KEYS];
    yaml_mark_t marks[C8Y_BS_KEYS];
    char k[CONF_KEY_MAX];
    uint64_t ms;

    if (!conf_walk_mapping(ld, node, path, c8y_bs_keys, C8Y_BS_KEYS, values, marks))
        return;
    c8y->bootstrap = true;
    c8y->bootstrap_interval_ms = 5000;
    conf_key_join(k, sizeof(k), path, "user");
    if (conf_node_present(values[C8Y_BS_USER]))
        conf_get_text(ld, values[C8Y_BS_USER], k,
                      "the bootstrap user, e.g. management/devicebootstrap", CONF_MQTT_STRING_MAX,
                      &c8y->bootstrap_user);
    else
        conf_set_string(ld, &c8y->bootstrap_user, C8Y_DEFAULT_BOOTSTRAP);
    if (conf_node_present(values[C8Y_BS_PASSWORD]) &&
        conf_node_present(values[C8Y_BS_PASSWORD_FILE])) {
        conf_key_join(k, sizeof(k), path, "password_file");
        conf_report(ld, values[C8Y_BS_PASSWORD_FILE]->start_mark, k,
                    "give either password or password_file, not both");
    } else if (conf_node_present(values[C8Y_BS_PASSWORD])) {
        conf_key_join(k, sizeof(k), path, "password");
        conf_get_text(ld, values[C8Y_BS_PASSWORD], k, "the bootstrap password",
                      CONF_MQTT_STRING_MAX, &c8y->bootstrap_password);
    } else if (conf_node_present(values[C8Y_BS_PASSWORD_FILE])) {
        conf_key_join(k, sizeof(k), path, "password_file");
        conf_read_password_file(ld, values[C8Y_BS_PASSWORD_FILE], k, &c8y->bootstrap_password);
    } else {
        conf_key_join(k, sizeof(k), path, "password");
        conf_report(ld, node->start_mark, k,
                    "missing (required: the bootstrap password from Cumulocity, or password_file)");
    }
    if (conf_node_present(values[C8Y_BS_INTERVAL])) {
        conf_key_join(k, sizeof(k), path, "interval");
        if (conf_get_duration_ms(ld, values[C8Y_BS_INTERVAL], k, 100, 3600 * 1000ULL, &ms) == 0)
            c8y->bootstrap_interval_ms = (unsigned)ms;
    }
}

static void parse_c8y_will(struct conf_loader *ld, yaml_node_t *node, const char *path,
                           struct conf_cumulocity *c8y)
{
    yaml_node_t *values[C8Y_WILL_KEYS];
    yaml_mark_t marks[C8Y_WILL_KEYS];
    char k[CONF_KEY_MAX];

    if (node->type == YAML_SCALAR_NODE) {
        bool on = true;
        if (conf_get_bool(ld, node, path, &on) == 0 && on)
            conf_report(ld, node->start_mark, path,
                        "true is the default (expected false, or {topic, message})");
        c8y->will = on;
        return;
    }
    if (!conf_walk_mapping(ld, node, path, c8y_will_keys, C8Y_WILL_KEYS, values, marks))
        return;
    if (conf_node_present(values[C8Y_WILL_TOPIC])) {
        conf_key_join(k, sizeof(k), path, "topic");
        conf_get_text(ld, values[C8Y_WILL_TOPIC], k, "a topic such as s/us", CONF_TOPIC_PREFIX_MAX,
                      &c8y->will_topic);
    }
    if (conf_node_present(values[C8Y_WILL_MESSAGE])) {
        conf_key_join(k, sizeof(k), path, "message");
        conf_get_text(ld, values[C8Y_WILL_MESSAGE], k, "a SmartREST line", 16000,
                      &c8y->will_message);
    }
}

static void parse_section(struct conf_loader *ld, yaml_node_t *node, const char *path,
                          struct conf_cumulocity *c8y)
{
    yaml_node_t *values[C8Y_KEYS] = {NULL};
    yaml_mark_t marks[C8Y_KEYS];
    char k[CONF_KEY_MAX], quoted[CONF_QUOTE_MAX];
    uint64_t number;

    c8y->required_interval_min = -1;
    c8y->will = true;
    if (node != NULL && !conf_walk_mapping(ld, node, path, c8y_keys, C8Y_KEYS, values, marks))
        return;
    conf_key_join(k, sizeof(k), path, "device_id");
    if (conf_node_present(values[C8Y_DEVICE_ID]))
        get_c8y_id(ld, values[C8Y_DEVICE_ID], k, &c8y->device_id);
    if (conf_node_present(values[C8Y_TEMPLATE])) {
        conf_key_join(k, sizeof(k), path, "template");
        if (conf_get_text(ld, values[C8Y_TEMPLATE], k, "a SmartREST template collection id (X-ID)",
                          256, &c8y->template_id) == 0 &&
            c8y->template_id && conf_first_bad_char(c8y->template_id, "_-.") != NULL) {
            conf_report(
                ld, values[C8Y_TEMPLATE]->start_mark, k,
                "%s contains a character other than A-Z a-z 0-9 _ - . (it becomes part of the "
                "client id and of s/uc/<template>)",
                conf_quote(c8y->template_id, quoted, sizeof(quoted)));
        }
    }
    if (conf_node_present(values[C8Y_TENANT])) {
        conf_key_join(k, sizeof(k), path, "tenant");
        if (conf_get_text(ld, values[C8Y_TENANT], k, "a tenant id such as t12345", 256,
                          &c8y->tenant) == 0 &&
            c8y->tenant && strchr(c8y->tenant, '/'))
            conf_report(ld, values[C8Y_TENANT]->start_mark, k,
                        "%s contains '/' (expected a tenant id)",
                        conf_quote(c8y->tenant, quoted, sizeof(quoted)));
    }
    conf_key_join(k, sizeof(k), path, "name");
    if (conf_node_present(values[C8Y_NAME]))
        conf_get_text(ld, values[C8Y_NAME], k, "the device name shown in Cumulocity", 256,
                      &c8y->name);
    conf_key_join(k, sizeof(k), path, "type");
    if (conf_node_present(values[C8Y_TYPE]))
        conf_get_text(ld, values[C8Y_TYPE], k, "a device type", 256, &c8y->type);
    else
        conf_set_string(ld, &c8y->type, C8Y_DEFAULT_TYPE);
    if (conf_node_present(values[C8Y_HARDWARE])) {
        yaml_node_t *hw[C8Y_HW_KEYS];
        yaml_mark_t hw_marks[C8Y_HW_KEYS];
        char hw_path[CONF_KEY_MAX];
        conf_key_join(hw_path, sizeof(hw_path), path, "hardware");
        if (conf_walk_mapping(ld, values[C8Y_HARDWARE], hw_path, c8y_hw_keys, C8Y_HW_KEYS, hw,
                              hw_marks)) {
            char **dst[C8Y_HW_KEYS] = {&c8y->hardware_serial, &c8y->hardware_model,
                                       &c8y->hardware_revision};
            for (size_t i = 0; i < C8Y_HW_KEYS; i++) {
                conf_key_join(k, sizeof(k), hw_path, c8y_hw_keys[i]);
                if (conf_node_present(hw[i]))
                    conf_get_text(ld, hw[i], k, "text", 256, dst[i]);
                else
                    conf_set_string(ld, dst[i], "");
            }
        }
    }
    if (conf_node_present(values[C8Y_SUPPORTED_OPERATIONS])) {
        conf_key_join(k, sizeof(k), path, "supported_operations");
        conf_get_string_list(ld, values[C8Y_SUPPORTED_OPERATIONS], k,
                             "a list of operation fragments, e.g. [c8y_Restart]", NULL,
                             &c8y->supported_operations, &c8y->supported_operation_count);
    }
    if (conf_node_present(values[C8Y_REQUIRED_INTERVAL])) {
        conf_key_join(k, sizeof(k), path, "required_interval");
        if (conf_get_uint(ld, values[C8Y_REQUIRED_INTERVAL], k, "a number of minutes", 0, 525600,
                          &number) == 0)
            c8y->required_interval_min = (int)number;
    }
    if (conf_node_present(values[C8Y_BOOTSTRAP])) {
        conf_key_join(k, sizeof(k), path, "bootstrap");
        parse_c8y_bootstrap(ld, values[C8Y_BOOTSTRAP], k, c8y);
    }
    if (conf_node_present(values[C8Y_WILL])) {
        conf_key_join(k, sizeof(k), path, "will");
        parse_c8y_will(ld, values[C8Y_WILL], k, c8y);
    }
    if (c8y->will && c8y->will_topic == NULL)
        conf_set_string(ld, &c8y->will_topic, C8Y_DEFAULT_WILL_TOPIC);
    if (c8y->will && c8y->will_message == NULL)
        conf_set_string(ld, &c8y->will_message, C8Y_DEFAULT_WILL);
    if (conf_node_present(values[C8Y_CHILDREN])) {
        conf_key_join(k, sizeof(k), path, "children");
        parse_c8y_children(ld, values[C8Y_CHILDREN], k, c8y);
    }
    if (conf_node_present(values[C8Y_TOKEN])) {
        conf_key_join(k, sizeof(k), path, "token");
        conf_get_bool(ld, values[C8Y_TOKEN], k, &c8y->token);
    }
}

/* After the whole uplink is read: the Cumulocity rules that tie profile,
 * auth and tls together (Cumulocity "MQTT implementation": user name
 * <tenant>/<user>, or a client certificate whose CN is the device id). */
static void check_uplink(struct conf_loader *ld, yaml_node_t *uplink_node, const char *path,
                         const struct conf_uplink *uplink)
{
    const struct conf_cumulocity *c8y = cumulocity_conf(uplink);
    char k[CONF_KEY_MAX];
    bool cert = uplink->tls.enabled && uplink->tls.cert != NULL;

    conf_key_join(k, sizeof(k), path, "auth");
    if (uplink->auth.type == CONF_AUTH_JWT) {
        conf_report(ld, uplink_node->start_mark, k,
                    "type jwt is not used by Cumulocity (expected basic, or none with a client "
                    "certificate in tls.cert or cumulocity.bootstrap)");
    } else if (c8y->bootstrap && uplink->auth.type != CONF_AUTH_NONE) {
        conf_report(ld, uplink_node->start_mark, k,
                    "cumulocity.bootstrap fetches the credentials; leave auth out (or type none)");
    } else if (uplink->auth.type == CONF_AUTH_BASIC && c8y->tenant == NULL &&
               (uplink->auth.username == NULL || strchr(uplink->auth.username, '/') == NULL)) {
        conf_report(ld, uplink_node->start_mark, k,
                    "username must be <tenant>/<user> for Cumulocity (or set cumulocity.tenant)");
    } else if (uplink->auth.type == CONF_AUTH_NONE && !cert && !c8y->bootstrap) {
        conf_report(ld, uplink_node->start_mark, k,
                    "missing: Cumulocity needs auth type basic (<tenant>/<user> and password), a "
                    "client certificate (tls.cert, CN = the device id) or cumulocity.bootstrap");
    }
}

void cumulocity_section_parse(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *uplink_node,
                              const char *uplink_path, struct conf_uplink *uplink)
{
    struct conf_cumulocity *c8y = calloc(1, sizeof(*c8y));
    const char *gateway_id = ld->conf->gateway_id;
    char path[CONF_KEY_MAX];

    if (c8y == NULL) {
        ld->oom = true;
        return;
    }
    uplink->section = c8y;
    conf_key_join(path, sizeof(path), uplink_path, "cumulocity");
    parse_section(ld, node, path, c8y);
    check_uplink(ld, uplink_node, uplink_path, uplink);
    /* Defaults from gateway.id (parsed before the uplinks; NULL when it
     * was wrong, which is reported there). */
    if (gateway_id == NULL)
        return;
    if (c8y->device_id == NULL)
        conf_set_string(ld, &c8y->device_id, gateway_id);
    if (c8y->name == NULL && c8y->device_id != NULL)
        conf_set_string(ld, &c8y->name, c8y->device_id);
    /* X.509: Cumulocity takes the device from the certificate's CN. */
    if (uplink->tls.enabled && uplink->tls.cert != NULL && c8y->device_id != NULL)
        conf_set_string(ld, &uplink->cert_cn, c8y->device_id);
}

void cumulocity_section_free(void *section)
{
    struct conf_cumulocity *c8y = section;

    if (c8y == NULL)
        return;
    free(c8y->device_id);
    free(c8y->template_id);
    free(c8y->tenant);
    free(c8y->name);
    free(c8y->type);
    free(c8y->hardware_serial);
    free(c8y->hardware_model);
    free(c8y->hardware_revision);
    conf_free_strings(c8y->supported_operations, c8y->supported_operation_count);
    free(c8y->bootstrap_user);
    conf_free_secret(c8y->bootstrap_password);
    free(c8y->will_topic);
    free(c8y->will_message);
    for (size_t i = 0; i < c8y->child_count; i++) {
        free(c8y->children[i].match);
        free(c8y->children[i].parent);
        free(c8y->children[i].name);
        free(c8y->children[i].type);
    }
    free(c8y->children);
    free(c8y);
}

/* Cumulocity settings that go into CONNECT (client id, user name, will). */
bool cumulocity_section_equal(const void *section_a, const void *section_b)
{
    const struct conf_cumulocity *a = section_a, *b = section_b;

    return conf_str_equal(a->device_id, b->device_id) &&
           conf_str_equal(a->template_id, b->template_id) && conf_str_equal(a->tenant, b->tenant) &&
           a->bootstrap == b->bootstrap && conf_str_equal(a->bootstrap_user, b->bootstrap_user) &&
           conf_str_equal(a->bootstrap_password, b->bootstrap_password) && a->will == b->will &&
           conf_str_equal(a->will_topic, b->will_topic) &&
           conf_str_equal(a->will_message, b->will_message);
}
