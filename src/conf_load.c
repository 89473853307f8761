/* conf_load.c - YAML configuration -> validated, immutable struct conf.
 *
 * The file is parsed with libyaml's document API (yaml_parser_load), which
 * keeps a start mark on every node, so each complaint can name
 * FILE:LINE:COLUMN. Validation does not stop at the first problem: every
 * section is checked and all errors are returned together, so an operator
 * fixes a file in one round instead of one error per restart.
 *
 * Shape of the code: one function per YAML section, each beside what it
 * configures. This file reads the root, gateway, control, log and routes
 * and loads, frees and compares; conf_local.c reads local (listeners,
 * limits, passwords, ACL); conf_uplink.c reads uplinks[] (tls, auth, jwt,
 * spool, rate) and hands uplinks[].<profile> to the profile's own
 * src/profiles/<name>/section.c. All of them walk with conf_walk.c: a
 * mapping's keys are checked against the section's table and each value is
 * converted by a typed getter that reports what is wrong in words.
 * Cross-references (default port from tls.enabled, routes naming uplinks,
 * defaults derived from gateway.id) are resolved after the sections that
 * they depend on: gateway first, routes after uplinks.
 */
#include "conf.h"
#include "conf_walk.h"

#include "log.h"
#include "util.h"

#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <yaml.h>

#define CONF_MAX_FILE_SIZE  (1024 * 1024)
#define CONF_GATEWAY_ID_MAX 128

#define DEFAULT_CONTROL_SOCKET UPLINKD_DEFAULT_RUN_DIR "/control.sock"
#define DEFAULT_STATE_DIR      UPLINKD_DEFAULT_STATE_DIR
#define DEFAULT_SHUTDOWN_MS    5000

/* ------------------------------------------------------------------------ */
/* Sections                                                                  */

enum { GATEWAY_ID, GATEWAY_STATE_DIR, GATEWAY_KEYS };
static const char *const gateway_keys[GATEWAY_KEYS] = {
    [GATEWAY_ID] = "id",
    [GATEWAY_STATE_DIR] = "state_dir",
};

/* gateway.id becomes the default MQTT client id and topic prefix, so it is
 * limited to characters that are safe in both (MQTT 3.1.1 §3.1.3.1 only
 * promises [0-9a-zA-Z] in client ids; brokers accept these in practice). */
static void parse_gateway(struct conf_loader *ld, yaml_node_t *node, yaml_mark_t parent_mark)
{
    static const char id_expected[] = "1-128 characters from A-Z a-z 0-9 - _ . ~, starting with a "
                                      "letter or digit, e.g. \"gw-0001\"";
    yaml_node_t *values[GATEWAY_KEYS] = {NULL};
    yaml_mark_t marks[GATEWAY_KEYS];
    struct conf *conf = ld->conf;
    char quoted[CONF_QUOTE_MAX];

    if (conf_node_present(node) &&
        !conf_walk_mapping(ld, node, "gateway", gateway_keys, GATEWAY_KEYS, values, marks))
        return;
    if (!conf_node_present(values[GATEWAY_ID])) {
        yaml_mark_t mark = values[GATEWAY_ID]        ? values[GATEWAY_ID]->start_mark
                           : conf_node_present(node) ? node->start_mark
                                                     : parent_mark;
        conf_report(ld, mark, "gateway.id", "missing (required: %s)", id_expected);
    } else if (conf_get_text(ld, values[GATEWAY_ID], "gateway.id", id_expected, CONF_GATEWAY_ID_MAX,
                             &conf->gateway_id) == 0 &&
               conf->gateway_id != NULL) {
        const char *bad = conf_first_bad_char(conf->gateway_id, "-_.~");
        if (bad != NULL || !conf_is_alnum(conf->gateway_id[0])) {
            char what[48];
            conf_describe_char(what, sizeof(what), bad ? *bad : conf->gateway_id[0]);
            conf_report(ld, values[GATEWAY_ID]->start_mark, "gateway.id",
                        "%s contains %s (expected %s)",
                        conf_quote(conf->gateway_id, quoted, sizeof(quoted)), what, id_expected);
            free(conf->gateway_id);
            conf->gateway_id = NULL;
        }
    }
    if (conf_node_present(values[GATEWAY_STATE_DIR]))
        conf_get_absolute_path(ld, values[GATEWAY_STATE_DIR], "gateway.state_dir",
                               "the state directory", PATH_MAX, &conf->state_dir);
}

enum { CONTROL_SOCKET, CONTROL_KEYS };
static const char *const control_keys[CONTROL_KEYS] = {[CONTROL_SOCKET] = "socket"};

static void parse_control(struct conf_loader *ld, yaml_node_t *node)
{
    yaml_node_t *values[CONTROL_KEYS] = {NULL};
    yaml_mark_t marks[CONTROL_KEYS];
    struct sockaddr_un sun;

    if (!conf_walk_mapping(ld, node, "control", control_keys, CONTROL_KEYS, values, marks))
        return;
    if (conf_node_present(values[CONTROL_SOCKET]))
        conf_get_absolute_path(ld, values[CONTROL_SOCKET], "control.socket", "the control socket",
                               sizeof(sun.sun_path) - 1, &ld->conf->control_socket);
}

enum { LOG_LEVEL, LOG_KEYS };
static const char *const log_keys[LOG_KEYS] = {[LOG_LEVEL] = "level"};

static void parse_log(struct conf_loader *ld, yaml_node_t *node)
{
    static const char expected[] = "error, warning, notice, info or debug";
    yaml_node_t *values[LOG_KEYS] = {NULL};
    yaml_mark_t marks[LOG_KEYS];
    char quoted[CONF_QUOTE_MAX];
    const char *text;
    int level;

    if (!conf_walk_mapping(ld, node, "log", log_keys, LOG_KEYS, values, marks))
        return;
    if (!conf_node_present(values[LOG_LEVEL]))
        return;
    text = conf_scalar_text(ld, values[LOG_LEVEL], "log.level", expected);
    if (text == NULL)
        return;
    level = log_level_parse(text);
    if (level < 0) {
        conf_report(ld, values[LOG_LEVEL]->start_mark, "log.level",
                    "%s is not a log level (expected %s)", conf_quote(text, quoted, sizeof(quoted)),
                    expected);
        return;
    }
    ld->conf->log_level = level;
}

enum { ROUTE_CHILDREN, ROUTE_UPLINKS, ROUTE_KEYS };
static const char *const route_keys[ROUTE_KEYS] = {
    [ROUTE_CHILDREN] = "children",
    [ROUTE_UPLINKS] = "uplinks",
};

static void parse_route_uplinks(struct conf_loader *ld, yaml_node_t *node, const char *key,
                                struct conf_route *route)
{
    struct conf *conf = ld->conf;
    size_t count;

    route->uplinks = conf_sequence_alloc(ld, node, key, "a sequence of uplink names, e.g. [cloud]",
                                         "is empty (expected at least one uplink name)",
                                         sizeof(*route->uplinks), &count);
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        char item_key[CONF_KEY_MAX];
        char quoted[CONF_QUOTE_MAX];
        const char *name;
        size_t found;

        conf_key_format(item_key, sizeof(item_key), "%s[%zu]", key, i);
        name = conf_scalar_text(ld, item, item_key, "an uplink name");
        if (name == NULL)
            continue;
        for (found = 0; found < conf->uplink_count; found++) {
            if (conf->uplinks[found].name != NULL && strcmp(conf->uplinks[found].name, name) == 0)
                break;
        }
        if (found == conf->uplink_count) {
            const char **names = calloc(conf->uplink_count + 1, sizeof(*names));
            size_t named = 0;
            const char *suggestion;
            char known[512];

            if (names == NULL) {
                ld->oom = true;
                return;
            }
            for (size_t j = 0; j < conf->uplink_count; j++) {
                if (conf->uplinks[j].name != NULL)
                    names[named++] = conf->uplinks[j].name;
            }
            suggestion = conf_closest(name, names, named);
            conf_join_names(known, sizeof(known), names, named);
            if (suggestion != NULL)
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (did you mean \"%s\"?)",
                            conf_quote(name, quoted, sizeof(quoted)), suggestion);
            else if (named > 0)
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (expected one of: %s)",
                            conf_quote(name, quoted, sizeof(quoted)), known);
            else
                conf_report(ld, item->start_mark, item_key,
                            "%s is not the name of an uplink (no uplinks are configured)",
                            conf_quote(name, quoted, sizeof(quoted)));
            free(names);
            continue;
        }
        for (size_t j = 0; j < route->uplink_count; j++) {
            if (route->uplinks[j] == found) {
                conf_report(ld, item->start_mark, item_key, "%s is listed twice in this route",
                            conf_quote(name, quoted, sizeof(quoted)));
                found = SIZE_MAX;
                break;
            }
        }
        if (found != SIZE_MAX)
            route->uplinks[route->uplink_count++] = found;
    }
}

static void parse_routes(struct conf_loader *ld, yaml_node_t *node)
{
    struct conf *conf = ld->conf;
    size_t count;

    conf->routes = conf_sequence_alloc(ld, node, "routes",
                                       "a sequence of routes (each item \"- children: GLOB\" with "
                                       "\"uplinks: [NAME]\")",
                                       NULL, sizeof(*conf->routes), &count);
    conf->route_count = count;
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        yaml_node_t *values[ROUTE_KEYS];
        yaml_mark_t marks[ROUTE_KEYS];
        char path[CONF_KEY_MAX];
        char key[CONF_KEY_MAX];

        conf_key_format(path, sizeof(path), "routes[%zu]", i);
        if (!conf_walk_mapping(ld, item, path, route_keys, ROUTE_KEYS, values, marks))
            continue;
        conf_key_join(key, sizeof(key), path, "children");
        if (!conf_node_present(values[ROUTE_CHILDREN]))
            conf_report(
                ld, values[ROUTE_CHILDREN] ? values[ROUTE_CHILDREN]->start_mark : item->start_mark,
                key, "missing (required: a glob of child ids, e.g. \"*\" or \"modbus-*\")");
        else
            conf_get_text(ld, values[ROUTE_CHILDREN], key,
                          "a glob of child ids, e.g. \"*\" or \"modbus-*\"", 1024,
                          &conf->routes[i].children);
        conf_key_join(key, sizeof(key), path, "uplinks");
        if (!conf_node_present(values[ROUTE_UPLINKS]))
            conf_report(
                ld, values[ROUTE_UPLINKS] ? values[ROUTE_UPLINKS]->start_mark : item->start_mark,
                key, "missing (required: the names of the uplinks, e.g. [cloud])");
        else
            parse_route_uplinks(ld, values[ROUTE_UPLINKS], key, &conf->routes[i]);
    }
}

enum {
    ROOT_GATEWAY,
    ROOT_LOCAL,
    ROOT_CONTROL,
    ROOT_LOG,
    ROOT_SHUTDOWN_TIMEOUT,
    ROOT_UPLINKS,
    ROOT_ROUTES,
    ROOT_KEYS
};
static const char *const root_keys[ROOT_KEYS] = {
    [ROOT_GATEWAY] = "gateway",
    [ROOT_LOCAL] = "local",
    [ROOT_CONTROL] = "control",
    [ROOT_LOG] = "log",
    [ROOT_SHUTDOWN_TIMEOUT] = "shutdown_timeout",
    [ROOT_UPLINKS] = "uplinks",
    [ROOT_ROUTES] = "routes",
};

static void apply_defaults(struct conf_loader *ld)
{
    struct conf *conf = ld->conf;

    if (conf->state_dir == NULL)
        conf_set_string(ld, &conf->state_dir, DEFAULT_STATE_DIR);
    if (conf->control_socket == NULL)
        conf_set_string(ld, &conf->control_socket, DEFAULT_CONTROL_SOCKET);
    conf_local_finish(ld);
    if (conf->gateway_id == NULL)
        return; /* already reported; nothing to derive from */
    for (size_t i = 0; i < conf->uplink_count; i++) {
        struct conf_uplink *uplink = &conf->uplinks[i];
        if (uplink->client_id == NULL)
            conf_set_string(ld, &uplink->client_id, conf->gateway_id);
    }
}

static void parse_root(struct conf_loader *ld, yaml_node_t *root)
{
    yaml_node_t *values[ROOT_KEYS];
    yaml_mark_t marks[ROOT_KEYS];
    struct conf *conf = ld->conf;
    uint64_t ms;

    if (!conf_walk_mapping(ld, root, "", root_keys, ROOT_KEYS, values, marks))
        return;
    parse_gateway(ld, values[ROOT_GATEWAY], root->start_mark);
    conf_local_parse(ld, values[ROOT_LOCAL]);
    if (conf_node_present(values[ROOT_CONTROL]))
        parse_control(ld, values[ROOT_CONTROL]);
    if (conf_node_present(values[ROOT_LOG]))
        parse_log(ld, values[ROOT_LOG]);
    if (conf_node_present(values[ROOT_SHUTDOWN_TIMEOUT]) &&
        conf_get_duration_ms(ld, values[ROOT_SHUTDOWN_TIMEOUT], "shutdown_timeout", 0, 3600 * 1000,
                             &ms) == 0)
        conf->shutdown_timeout_ms = (unsigned)ms;
    if (conf_node_present(values[ROOT_UPLINKS]))
        conf_uplinks_parse(ld, values[ROOT_UPLINKS]);
    /* After uplinks: routes refer to uplinks by name. */
    if (conf_node_present(values[ROOT_ROUTES]))
        parse_routes(ld, values[ROOT_ROUTES]);
    apply_defaults(ld);
}

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */

/* libyaml reports reader errors (bad UTF-8, control characters) by byte
 * offset only; turn that into line:column. */
static yaml_mark_t mark_from_offset(const char *text, size_t len, size_t offset)
{
    yaml_mark_t mark = {0};

    for (size_t i = 0; i < offset && i < len; i++) {
        if (text[i] == '\n') {
            mark.line++;
            mark.column = 0;
        } else {
            mark.column++;
        }
    }
    mark.index = offset;
    return mark;
}

static void report_syntax_error(struct conf_loader *ld, const yaml_parser_t *parser,
                                const char *text, size_t len)
{
    yaml_mark_t mark = parser->problem_mark;
    const char *problem = parser->problem ? parser->problem : "unknown error";

    if (parser->error == YAML_MEMORY_ERROR) {
        ld->oom = true;
        return;
    }
    if (parser->error == YAML_READER_ERROR) {
        mark = mark_from_offset(text, len, parser->problem_offset);
        conf_report(ld, mark, NULL, "YAML syntax error: %s (the file must be UTF-8 text)", problem);
    } else if (parser->context != NULL) {
        conf_report(ld, mark, NULL, "YAML syntax error: %s (%s at line %zu, column %zu)", problem,
                    parser->context, parser->context_mark.line + 1,
                    parser->context_mark.column + 1);
    } else {
        conf_report(ld, mark, NULL, "YAML syntax error: %s", problem);
    }
}

/* The directory of @path as an absolute path, for resolving relative paths
 * in the file. NULL when it cannot be determined (then paths are used as
 * written). */
static char *config_dir(const char *path)
{
    char *absolute = realpath(path, NULL);
    char *slash;

    if (absolute == NULL)
        return NULL;
    slash = strrchr(absolute, '/');
    if (slash == absolute)
        slash[1] = '\0';
    else if (slash != NULL)
        *slash = '\0';
    return absolute;
}

int conf_load(const char *path, struct conf **out, char **errors)
{
    struct conf_loader ld = {.path = path};
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_document_t extra;
    yaml_node_t *root;
    struct conf *conf = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc;

    *out = NULL;
    *errors = NULL;

    rc = util_read_file(path, CONF_MAX_FILE_SIZE, &text, &len);
    if (rc < 0) {
        char line[PATH_MAX + 128];
        if (rc == -ENOMEM)
            return -ENOMEM;
        snprintf(line, sizeof(line), "cannot read %s: %s", path,
                 rc == -EFBIG ? "file is larger than 1 MiB" : strerror(-rc));
        *errors = strdup(line);
        return *errors ? rc : -ENOMEM;
    }
    ld.dir = config_dir(path);

    conf = calloc(1, sizeof(*conf));
    if (conf == NULL) {
        rc = -ENOMEM;
        goto err_after_read;
    }
    conf->path = strdup(path);
    if (conf->path == NULL) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    conf->log_level = LOG_INFO;
    conf->shutdown_timeout_ms = DEFAULT_SHUTDOWN_MS;
    conf_local_init(&conf->local);
    ld.conf = conf;

    if (!yaml_parser_initialize(&parser)) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        report_syntax_error(&ld, &parser, text, len);
        goto finish_after_parser;
    }
    ld.doc = &doc;
    root = yaml_document_get_root_node(&doc);
    if (root == NULL) {
        yaml_mark_t start = {0};
        conf_report(
            &ld, start, NULL,
            "the file is empty (expected a mapping with at least \"gateway: { id: NAME }\")");
        goto finish_after_doc;
    }
    parse_root(&ld, root);

    /* A second document ("---") would be silently ignored; say so. */
    if (!yaml_parser_load(&parser, &extra)) {
        report_syntax_error(&ld, &parser, text, len);
    } else {
        yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
        if (extra_root != NULL)
            conf_report(&ld, extra.start_mark, NULL,
                        "a second YAML document starts here (expected a single document; remove "
                        "the \"---\" line and what follows, or merge it into the first)");
        yaml_document_delete(&extra);
    }

finish_after_doc:
    yaml_document_delete(&doc);
finish_after_parser:
    yaml_parser_delete(&parser);
    ld.doc = NULL;
    if (ld.oom) {
        rc = -ENOMEM;
        goto err_after_conf;
    }
    if (ld.error_count > 0) {
        if (ld.error_count > CONF_MAX_ERRORS) {
            char more[64];
            snprintf(more, sizeof(more), "... and %u more errors",
                     ld.error_count - CONF_MAX_ERRORS);
            conf_errors_append(&ld, more);
        }
        if (ld.oom) {
            rc = -ENOMEM;
            goto err_after_conf;
        }
        *errors = ld.errors;
        ld.errors = NULL;
        rc = -EINVAL;
        goto err_after_conf;
    }
    free(ld.uplink_name_marks);
    free(ld.dir);
    free(text);
    *out = conf;
    return 0;

err_after_conf:
    conf_free(conf);
err_after_read:
    free(ld.errors);
    free(ld.uplink_name_marks);
    free(ld.dir);
    free(text);
    return rc;
}

void conf_free(struct conf *conf)
{
    if (conf == NULL)
        return;
    for (size_t i = 0; i < conf->uplink_count; i++)
        conf_uplink_free(&conf->uplinks[i]);
    free(conf->uplinks);
    for (size_t i = 0; i < conf->route_count; i++) {
        free(conf->routes[i].children);
        free(conf->routes[i].uplinks);
    }
    free(conf->routes);
    conf_local_free(&conf->local);
    free(conf->control_socket);
    free(conf->state_dir);
    free(conf->gateway_id);
    free(conf->path);
    free(conf);
}

const struct conf_uplink *conf_uplink_find(const struct conf *conf, const char *name)
{
    if (conf == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < conf->uplink_count; i++) {
        if (conf->uplinks[i].name != NULL && strcmp(conf->uplinks[i].name, name) == 0)
            return &conf->uplinks[i];
    }
    return NULL;
}
