/* conf_walk.c - the YAML walker and typed getters (conf_walk.h): every
 * message a config value can earn is worded here, once.
 *
 * The file is read with libyaml's document API (yaml_parser_load), which
 * keeps a start mark on every node, so each complaint can name
 * FILE:LINE:COLUMN.
 */
#include "conf_walk.h"

#include "util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DURATION_EXAMPLES                                                                          \
    "e.g. \"250ms\", \"5s\", \"10m\", \"1h\", \"1h30m\" or a number of seconds"
#define SIZE_EXAMPLES "e.g. \"512\", \"64KiB\", \"256MiB\", \"1GiB\" or \"10MB\""

/* ------------------------------------------------------------------------ */
/* Messages                                                                  */

void conf_errors_append(struct conf_loader *ld, const char *line)
{
    size_t len = strlen(line);
    size_t need = ld->errors_len + len + 2;

    if (ld->oom)
        return;
    if (need > ld->errors_cap) {
        size_t cap = ld->errors_cap ? ld->errors_cap : 512;
        char *grown;

        while (cap < need)
            cap *= 2;
        grown = realloc(ld->errors, cap);
        if (grown == NULL) {
            ld->oom = true;
            return;
        }
        ld->errors = grown;
        ld->errors_cap = cap;
    }
    if (ld->errors_len > 0)
        ld->errors[ld->errors_len++] = '\n';
    memcpy(ld->errors + ld->errors_len, line, len + 1);
    ld->errors_len += len;
}

__attribute__((format(printf, 4, 5))) void conf_report(struct conf_loader *ld, yaml_mark_t mark,
                                                       const char *key, const char *fmt, ...)
{
    char message[CONF_MESSAGE_MAX];
    char line[CONF_MESSAGE_MAX + CONF_KEY_MAX + 256];
    va_list ap;

    ld->error_count++;
    if (ld->error_count > CONF_MAX_ERRORS)
        return;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    snprintf(line, sizeof(line), "%s:%zu:%zu: %s%s%s", ld->path, mark.line + 1, mark.column + 1,
             key ? key : "", key ? ": " : "", message);
    conf_errors_append(ld, line);
}

const char *conf_quote(const char *text, char *buf, size_t size)
{
    size_t out = 0;
    const size_t keep = size - 8; /* room for '"', an escape, "...", '"', NUL */

    buf[out++] = '"';
    for (const unsigned char *p = (const unsigned char *)text; *p != '\0'; p++) {
        if (out >= keep) {
            memcpy(buf + out, "...", 3);
            out += 3;
            break;
        }
        if (*p == '"' || *p == '\\') {
            buf[out++] = '\\';
            buf[out++] = (char)*p;
        } else if (*p < 0x20 || *p == 0x7f) {
            out += (size_t)snprintf(buf + out, size - out, "\\x%02x", *p);
        } else {
            buf[out++] = (char)*p;
        }
    }
    buf[out++] = '"';
    buf[out] = '\0';
    return buf;
}

__attribute__((format(printf, 3, 4))) void conf_key_format(char *buf, size_t size, const char *fmt,
                                                           ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

void conf_key_join(char *buf, size_t size, const char *parent, const char *child)
{
    if (parent == NULL || parent[0] == '\0')
        conf_key_format(buf, size, "%s", child);
    else
        conf_key_format(buf, size, "%s.%s", parent, child);
}

static const char *node_kind_name(const yaml_node_t *node)
{
    switch (node->type) {
    case YAML_SCALAR_NODE:
        return "a scalar";
    case YAML_SEQUENCE_NODE:
        return "a sequence";
    case YAML_MAPPING_NODE:
        return "a mapping";
    default:
        return "nothing";
    }
}

/* Optimal string alignment distance (Levenshtein plus adjacent
 * transposition), so "hots" is one edit from "host". Returns a large value
 * for strings too long to bother with. */
static unsigned edit_distance(const char *a, const char *b)
{
    enum { MAX = 64 };
    unsigned d[MAX + 1][MAX + 1];
    size_t la = strlen(a);
    size_t lb = strlen(b);

    if (la > MAX || lb > MAX)
        return 1000;
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (unsigned)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            unsigned cost = a[i - 1] == b[j - 1] ? 0 : 1;
            unsigned best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best)
                best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best)
                best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

const char *conf_closest(const char *word, const char *const *candidates, size_t count)
{
    const char *best = NULL;
    unsigned best_distance = 3;

    if (strlen(word) < 2)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        unsigned distance = edit_distance(word, candidates[i]);
        if (distance < best_distance) {
            best_distance = distance;
            best = candidates[i];
        }
    }
    return best;
}

void conf_join_names(char *buf, size_t size, const char *const *names, size_t count)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < count && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s", i ? ", " : "", names[i]);
}

/* ------------------------------------------------------------------------ */
/* Nodes                                                                     */

yaml_node_t *conf_node_at(struct conf_loader *ld, int index)
{
    return yaml_document_get_node(ld->doc, index);
}

const char *conf_node_text(const yaml_node_t *node)
{
    return (const char *)node->data.scalar.value;
}

/* YAML null: an empty plain value ("key:"), "~" or "null". A null value means
 * "not set" everywhere, so "socket_group:" keeps the default. */
static bool node_is_null(const yaml_node_t *node)
{
    const char *text;

    if (node == NULL)
        return true;
    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    text = conf_node_text(node);
    return text[0] == '\0' || strcmp(text, "~") == 0 || strcmp(text, "null") == 0 ||
           strcmp(text, "Null") == 0 || strcmp(text, "NULL") == 0;
}

bool conf_node_present(const yaml_node_t *node)
{
    return !node_is_null(node);
}

size_t conf_sequence_length(const yaml_node_t *node)
{
    return (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
}

yaml_node_t *conf_sequence_item(struct conf_loader *ld, const yaml_node_t *node, size_t i)
{
    return conf_node_at(ld, node->data.sequence.items.start[i]);
}

bool conf_expect_kind(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                      yaml_node_type_t kind, const char *expected)
{
    char quoted[CONF_QUOTE_MAX];

    if (node->type == kind)
        return true;
    if (node->type == YAML_SCALAR_NODE)
        conf_report(ld, node->start_mark, key, "expected %s, found a scalar (%s)", expected,
                    conf_quote(conf_node_text(node), quoted, sizeof(quoted)));
    else
        conf_report(ld, node->start_mark, key, "expected %s, found %s", expected,
                    node_kind_name(node));
    return false;
}

void *conf_sequence_alloc(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *expected, const char *empty_error, size_t size, size_t *count)
{
    void *items;

    *count = 0;
    if (!conf_expect_kind(ld, node, key, YAML_SEQUENCE_NODE, expected))
        return NULL;
    if (conf_sequence_length(node) == 0) {
        if (empty_error)
            conf_report(ld, node->start_mark, key, "%s", empty_error);
        return NULL;
    }
    items = calloc(conf_sequence_length(node), size);
    if (items == NULL) {
        ld->oom = true;
        return NULL;
    }
    *count = conf_sequence_length(node);
    return items;
}

/* Look a key up in a section's table; report it when unknown. Returns its
 * index or key_count. */
static size_t lookup_key(struct conf_loader *ld, const yaml_node_t *key, const char *path,
                         const char *const *keys, size_t key_count)
{
    const char *name = conf_node_text(key);
    char key_path[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    const char *suggestion;
    char known[512];

    for (size_t i = 0; i < key_count; i++) {
        if (strcmp(name, keys[i]) == 0)
            return i;
    }
    /* The key is the user's text: quote it when it could break the line. */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '\\') {
            name = conf_quote(name, quoted, sizeof(quoted));
            break;
        }
    }
    conf_key_join(key_path, sizeof(key_path), path, name);
    suggestion = conf_closest(name, keys, key_count);
    if (suggestion != NULL) {
        conf_report(ld, key->start_mark, key_path, "unknown key (did you mean \"%s\"?)",
                    suggestion);
    } else {
        conf_join_names(known, sizeof(known), keys, key_count);
        conf_report(ld, key->start_mark, key_path, "unknown key (expected one of: %s)", known);
    }
    return key_count;
}

static bool is_merge_key(const yaml_node_t *key)
{
    return key->type == YAML_SCALAR_NODE && key->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
           strcmp(conf_node_text(key), "<<") == 0;
}

/* YAML merge key ("<<: *defaults", yaml.org/type/merge.html): the merged
 * mapping's keys apply where the mapping itself does not set them; in a
 * list of mappings the earlier ones win. @depth bounds nested merges, which
 * also stops an anchor that merges itself. */
static void merge_mapping(struct conf_loader *ld, const yaml_node_t *merged, const char *path,
                          const char *const *keys, size_t key_count, yaml_node_t **values,
                          yaml_mark_t *key_marks, int depth)
{
    char key_path[CONF_KEY_MAX];

    conf_key_join(key_path, sizeof(key_path), path, "<<");
    if (depth > 8) {
        conf_report(ld, merged->start_mark, key_path, "merge keys nested too deeply");
        return;
    }
    if (merged->type == YAML_SEQUENCE_NODE) {
        for (size_t i = 0; i < conf_sequence_length(merged); i++) {
            yaml_node_t *item = conf_sequence_item(ld, merged, i);
            if (conf_expect_kind(ld, item, key_path, YAML_MAPPING_NODE, "a mapping to merge"))
                merge_mapping(ld, item, path, keys, key_count, values, key_marks, depth + 1);
        }
        return;
    }
    if (!conf_expect_kind(ld, merged, key_path, YAML_MAPPING_NODE,
                          "a mapping or a list of mappings to merge"))
        return;
    /* Own keys first, then the mapping's own merges underneath them. */
    for (yaml_node_pair_t *pair = merged->data.mapping.pairs.start;
         pair < merged->data.mapping.pairs.top; pair++) {
        yaml_node_t *key = conf_node_at(ld, pair->key);
        size_t i;

        if (key->type != YAML_SCALAR_NODE || is_merge_key(key))
            continue;
        i = lookup_key(ld, key, path, keys, key_count);
        if (i < key_count && values[i] == NULL) {
            values[i] = conf_node_at(ld, pair->value);
            key_marks[i] = key->start_mark;
        }
    }
    for (yaml_node_pair_t *pair = merged->data.mapping.pairs.start;
         pair < merged->data.mapping.pairs.top; pair++) {
        if (is_merge_key(conf_node_at(ld, pair->key)))
            merge_mapping(ld, conf_node_at(ld, pair->value), path, keys, key_count, values,
                          key_marks, depth + 1);
    }
}

bool conf_walk_mapping(struct conf_loader *ld, yaml_node_t *map, const char *path,
                       const char *const *keys, size_t key_count, yaml_node_t **values,
                       yaml_mark_t *key_marks)
{
    for (size_t i = 0; i < key_count; i++)
        values[i] = NULL;
    if (!conf_expect_kind(ld, map, path[0] ? path : "(top level)", YAML_MAPPING_NODE, "a mapping"))
        return false;

    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        yaml_node_t *key = conf_node_at(ld, pair->key);
        char key_path[CONF_KEY_MAX];
        size_t i;

        if (key->type != YAML_SCALAR_NODE) {
            conf_report(ld, key->start_mark, path[0] ? path : NULL,
                        "a key must be a plain word, found %s", node_kind_name(key));
            continue;
        }
        if (is_merge_key(key))
            continue; /* below, once the explicit keys are known */
        i = lookup_key(ld, key, path, keys, key_count);
        if (i == key_count)
            continue;
        if (values[i] != NULL) {
            conf_key_join(key_path, sizeof(key_path), path, keys[i]);
            conf_report(ld, key->start_mark, key_path,
                        "duplicate key (first set at line %zu, column %zu; keep only one)",
                        key_marks[i].line + 1, key_marks[i].column + 1);
            continue;
        }
        values[i] = conf_node_at(ld, pair->value);
        key_marks[i] = key->start_mark;
    }
    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        if (is_merge_key(conf_node_at(ld, pair->key)))
            merge_mapping(ld, conf_node_at(ld, pair->value), path, keys, key_count, values,
                          key_marks, 0);
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* Typed values                                                              */

void conf_set_string(struct conf_loader *ld, char **dst, const char *text)
{
    char *copy = strdup(text);

    if (copy == NULL) {
        ld->oom = true;
        return;
    }
    free(*dst);
    *dst = copy;
}

const char *conf_scalar_text(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                             const char *expected)
{
    const char *text;

    if (!conf_expect_kind(ld, node, key, YAML_SCALAR_NODE, expected))
        return NULL;
    text = conf_node_text(node);
    if (strlen(text) != node->data.scalar.length) {
        conf_report(ld, node->start_mark, key, "contains a NUL character (expected %s)", expected);
        return NULL;
    }
    return text;
}

int conf_get_text(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                  const char *expected, size_t max_len, char **dst)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "a string");

    if (text == NULL)
        return -EINVAL;
    if (text[0] == '\0') {
        conf_report(ld, node->start_mark, key, "is empty (expected %s)", expected);
        return -EINVAL;
    }
    if (strlen(text) > max_len) {
        conf_report(ld, node->start_mark, key, "%s is longer than %zu bytes (expected %s)",
                    conf_quote(text, quoted, sizeof(quoted)), max_len, expected);
        return -EINVAL;
    }
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            conf_report(ld, node->start_mark, key, "%s contains a control character (expected %s)",
                        conf_quote(text, quoted, sizeof(quoted)), expected);
            return -EINVAL;
        }
    }
    conf_set_string(ld, dst, text);
    return 0;
}

int conf_get_uint(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                  const char *noun, uint64_t min, uint64_t max, uint64_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "an integer");
    uint64_t value = 0;
    const char *p;

    if (text == NULL)
        return -EINVAL;
    p = text;
    if (*p == '\0')
        goto bad;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            goto bad;
        if (value > (UINT64_MAX - (uint64_t)(*p - '0')) / 10)
            goto bad;
        value = value * 10 + (uint64_t)(*p - '0');
    }
    if (value < min || value > max)
        goto bad;
    *out = value;
    return 0;
bad:
    conf_report(ld, node->start_mark, key, "%s is not %s (expected an integer %llu-%llu)",
                conf_quote(text, quoted, sizeof(quoted)), noun, (unsigned long long)min,
                (unsigned long long)max);
    return -EINVAL;
}

int conf_get_bool(struct conf_loader *ld, const yaml_node_t *node, const char *key, bool *out)
{
    static const char *const yes[] = {"true", "True", "TRUE", "yes", "Yes",
                                      "YES",  "on",   "On",   "ON"};
    static const char *const no[] = {"false", "False", "FALSE", "no", "No",
                                     "NO",    "off",   "Off",   "OFF"};
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "true or false");

    if (text == NULL)
        return -EINVAL;
    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcmp(text, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcmp(text, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    conf_report(ld, node->start_mark, key, "%s is not a boolean (expected true or false)",
                conf_quote(text, quoted, sizeof(quoted)));
    return -EINVAL;
}

void conf_format_ms(char *buf, size_t size, uint64_t ms)
{
    if (ms % 3600000 == 0 && ms > 0)
        snprintf(buf, size, "%lluh", (unsigned long long)(ms / 3600000));
    else if (ms % 60000 == 0 && ms > 0)
        snprintf(buf, size, "%llum", (unsigned long long)(ms / 60000));
    else if (ms % 1000 == 0)
        snprintf(buf, size, "%llus", (unsigned long long)(ms / 1000));
    else
        snprintf(buf, size, "%llums", (unsigned long long)ms);
}

int conf_get_duration_ms(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                         uint64_t min_ms, uint64_t max_ms, uint64_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    char low[32], high[32];
    const char *text = conf_scalar_text(ld, node, key, "a duration");
    uint64_t value;
    int rc;

    if (text == NULL)
        return -EINVAL;
    conf_format_ms(low, sizeof(low), min_ms);
    conf_format_ms(high, sizeof(high), max_ms);
    rc = util_parse_duration_ms(text, &value);
    if (rc == -EINVAL) {
        conf_report(ld, node->start_mark, key,
                    "%s is not a duration (expected " DURATION_EXAMPLES ")",
                    conf_quote(text, quoted, sizeof(quoted)));
        return -EINVAL;
    }
    /* -ERANGE gets the range message too. */
    if (rc < 0 || value < min_ms || value > max_ms) {
        conf_report(ld, node->start_mark, key, "%s is out of range (expected %s to %s)",
                    conf_quote(text, quoted, sizeof(quoted)), low, high);
        return -EINVAL;
    }
    *out = value;
    return 0;
}

int conf_get_size(struct conf_loader *ld, const yaml_node_t *node, const char *key, uint64_t min,
                  uint64_t max, uint64_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "a size");
    uint64_t value;
    int rc;

    if (text == NULL)
        return -EINVAL;
    rc = util_parse_size(text, &value);
    if (rc == -EINVAL) {
        conf_report(ld, node->start_mark, key, "%s is not a size (expected " SIZE_EXAMPLES ")",
                    conf_quote(text, quoted, sizeof(quoted)));
        return -EINVAL;
    }
    if (rc < 0 || value < min || value > max) {
        conf_report(ld, node->start_mark, key, "%s is out of range (expected %llu to %llu bytes)",
                    conf_quote(text, quoted, sizeof(quoted)), (unsigned long long)min,
                    (unsigned long long)max);
        return -EINVAL;
    }
    *out = value;
    return 0;
}

int conf_get_mode(struct conf_loader *ld, const yaml_node_t *node, const char *key, unsigned *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "an octal file mode");
    const char *digits;
    unsigned value = 0;

    if (text == NULL)
        return -EINVAL;
    if (strncmp(text, "0o", 2) == 0)
        digits = text + 2;
    else if (text[0] == '0')
        digits = text;
    else
        goto bad;
    if (*digits == '\0' || strlen(digits) > 5)
        goto bad;
    for (const char *p = digits; *p; p++) {
        if (*p < '0' || *p > '7')
            goto bad;
        value = value * 8 + (unsigned)(*p - '0');
    }
    if (value > 0777)
        goto bad;
    *out = value;
    return 0;
bad:
    conf_report(ld, node->start_mark, key,
                "%s is not a file mode (expected octal permission bits with a leading 0, "
                "e.g. \"0660\", at most 0777)",
                conf_quote(text, quoted, sizeof(quoted)));
    return -EINVAL;
}

int conf_get_absolute_path(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                           const char *what, size_t max_len, char **dst)
{
    char quoted[CONF_QUOTE_MAX];
    char expected[128];
    const char *text;

    snprintf(expected, sizeof(expected), "an absolute path to %s", what);
    text = conf_scalar_text(ld, node, key, expected);
    if (text == NULL)
        return -EINVAL;
    if (text[0] != '/') {
        conf_report(ld, node->start_mark, key, "%s is not an absolute path (expected %s)",
                    conf_quote(text, quoted, sizeof(quoted)), expected);
        return -EINVAL;
    }
    if (strlen(text) > max_len) {
        conf_report(ld, node->start_mark, key, "%s is longer than %zu bytes (expected %s)",
                    conf_quote(text, quoted, sizeof(quoted)), max_len, expected);
        return -EINVAL;
    }
    conf_set_string(ld, dst, text);
    return 0;
}

/* Relative paths are taken relative to the configuration file's directory,
 * not the working directory: under systemd that is "/", which is never what
 * "certs/ca.pem" meant. */
static int conf_resolve_path(struct conf_loader *ld, const char *text, char **out)
{
    size_t len;

    if (text[0] == '/' || ld->dir == NULL) {
        *out = strdup(text);
    } else {
        len = strlen(ld->dir) + 1 + strlen(text) + 1;
        *out = malloc(len);
        if (*out != NULL)
            snprintf(*out, len, "%s/%s", ld->dir, text);
    }
    if (*out == NULL) {
        ld->oom = true;
        return -ENOMEM;
    }
    return 0;
}

/* Open and close: checks what access(2) cannot (effective ids, ACLs,
 * that it is not a directory). */
static int check_readable(const char *path)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    int rc = 0;

    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0)
        rc = -errno;
    else if (S_ISDIR(st.st_mode))
        rc = -EISDIR;
    close(fd);
    return rc;
}

void conf_set_where(struct conf_loader *ld, const yaml_node_t *node, char **dst)
{
    char buf[CONF_KEY_MAX + 64];

    snprintf(buf, sizeof(buf), "%s:%zu:%zu", ld->path, node->start_mark.line + 1,
             node->start_mark.column + 1);
    free(*dst);
    *dst = strdup(buf);
    if (*dst == NULL)
        ld->oom = true;
}

int conf_get_readable_file(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                           const char *what, char **dst)
{
    char quoted[CONF_QUOTE_MAX];
    char *path = NULL;
    const char *text = conf_scalar_text(ld, node, key, what);
    int rc;

    if (text == NULL)
        return -EINVAL;
    if (text[0] == '\0') {
        conf_report(ld, node->start_mark, key, "is empty (expected %s)", what);
        return -EINVAL;
    }
    rc = conf_resolve_path(ld, text, &path);
    if (rc < 0)
        return rc;
    rc = check_readable(path);
    if (rc < 0) {
        conf_report(ld, node->start_mark, key, "cannot read %s: %s (expected %s)",
                    conf_quote(path, quoted, sizeof(quoted)), strerror(-rc), what);
        free(path);
        return -EINVAL;
    }
    free(*dst);
    *dst = path;
    return 0;
}

int conf_get_file_pattern(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *example, char **dst)
{
    char quoted[CONF_QUOTE_MAX], what[300];
    char *text = NULL;

    snprintf(what, sizeof(what), "a file pattern with %%c for the child id, e.g. %s", example);
    if (conf_get_text(ld, node, key, what, 4000, &text) < 0 || text == NULL)
        return -EINVAL;
    if (text[0] != '/' || strstr(text, "%c") == NULL) {
        conf_report(ld, node->start_mark, key,
                    "%s is not an absolute path with %%c (expected e.g. %s)",
                    conf_quote(text, quoted, sizeof(quoted)), example);
        free(text);
        return -EINVAL;
    }
    free(*dst);
    *dst = text;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Syntax checks of names, hosts, topics                                     */

bool conf_is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

const char *conf_first_bad_char(const char *text, const char *extra)
{
    for (const char *p = text; *p; p++) {
        if (!conf_is_alnum(*p) && strchr(extra, *p) == NULL)
            return p;
    }
    return NULL;
}

void conf_describe_char(char *buf, size_t size, char c)
{
    if (c == ' ')
        snprintf(buf, size, "a space");
    else if ((unsigned char)c < 0x20 || c == 0x7f)
        snprintf(buf, size, "control character 0x%02x", (unsigned char)c);
    else if ((unsigned char)c >= 0x80)
        snprintf(buf, size, "a non-ASCII character");
    else
        snprintf(buf, size, "'%c'", c);
}

int conf_check_host(const char *text, char *why, size_t why_size, char **host)
{
    struct in6_addr addr6;
    struct in_addr addr4;
    char what[48];
    size_t len = strlen(text);
    size_t label_len = 0;
    bool all_numeric = true;
    char inner[INET6_ADDRSTRLEN + 1];

    *host = NULL;
    if (len == 0) {
        snprintf(why, why_size, "is empty");
        return -EINVAL;
    }
    if (strstr(text, "://") != NULL) {
        snprintf(
            why, why_size,
            "is a URL; write only the host name, the port goes in \"port\" and TLS in \"tls\"");
        return -EINVAL;
    }
    if (text[0] == '[' && text[len - 1] == ']') {
        if (len - 2 >= sizeof(inner))
            goto bad_ipv6;
        memcpy(inner, text + 1, len - 2);
        inner[len - 2] = '\0';
        if (inet_pton(AF_INET6, inner, &addr6) != 1)
            goto bad_ipv6;
        *host = strdup(inner);
        return *host ? 0 : -ENOMEM;
    }
    if (strchr(text, ':') != NULL) {
        if (inet_pton(AF_INET6, text, &addr6) == 1) {
            *host = strdup(text);
            return *host ? 0 : -ENOMEM;
        }
        if (strchr(text, ':') == strrchr(text, ':')) {
            snprintf(why, why_size, "contains a port; put the port in \"port\" instead");
            return -EINVAL;
        }
        goto bad_ipv6;
    }
    for (const char *p = text; *p; p++) {
        if (*p == ' ' || *p == '\t') {
            snprintf(why, why_size, "contains a space");
            return -EINVAL;
        }
        if (!(*p >= '0' && *p <= '9') && *p != '.')
            all_numeric = false;
    }
    if (all_numeric) {
        if (inet_pton(AF_INET, text, &addr4) != 1) {
            snprintf(why, why_size, "is not a valid IPv4 address");
            return -EINVAL;
        }
        *host = strdup(text);
        return *host ? 0 : -ENOMEM;
    }
    /* A trailing dot (fully qualified) is allowed and not counted. */
    if (text[len - 1] == '.')
        len--;
    if (len > CONF_DNS_NAME_MAX) {
        snprintf(why, why_size, "is longer than %d characters", CONF_DNS_NAME_MAX);
        return -EINVAL;
    }
    for (size_t i = 0; i <= len; i++) {
        char c = i < len ? text[i] : '.';
        if (c == '.') {
            if (label_len == 0) {
                snprintf(why, why_size, "has an empty label (two dots, or a leading dot)");
                return -EINVAL;
            }
            if (text[i - 1] == '-') {
                snprintf(why, why_size, "has a label that ends with '-'");
                return -EINVAL;
            }
            label_len = 0;
            continue;
        }
        if (!conf_is_alnum(c) && c != '-') {
            conf_describe_char(what, sizeof(what), c);
            snprintf(why, why_size, "contains %s at position %zu%s", what, i + 1,
                     (unsigned char)c >= 0x80
                         ? " (write an internationalized name in its ASCII xn-- form)"
                         : "");
            return -EINVAL;
        }
        if (c == '-' && label_len == 0) {
            snprintf(why, why_size, "has a label that starts with '-'");
            return -EINVAL;
        }
        if (++label_len > CONF_DNS_LABEL_MAX) {
            snprintf(why, why_size, "has a label longer than %d characters", CONF_DNS_LABEL_MAX);
            return -EINVAL;
        }
    }
    /* Stored without the trailing dot: SNI carries the name without it
     * (RFC 6066 §3) and certificate names never have one. */
    *host = strndup(text, len);
    return *host ? 0 : -ENOMEM;

bad_ipv6:
    snprintf(why, why_size, "is not a valid IPv6 address");
    return -EINVAL;
}

int conf_get_topic_prefix(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          bool local, char **dst)
{
    static const char expected[] =
        "a topic prefix without '+', '#' or a trailing '/', e.g. \"dev\"";
    char quoted[CONF_QUOTE_MAX];
    char *value = NULL;
    size_t len;

    if (conf_get_text(ld, node, key, expected, CONF_TOPIC_PREFIX_MAX, &value) < 0)
        return -EINVAL;
    if (value == NULL)
        return -ENOMEM;
    len = strlen(value);
    if (strpbrk(value, "+#") != NULL || value[len - 1] == '/') {
        conf_report(ld, node->start_mark, key, "%s is not a valid topic prefix (expected %s)",
                    conf_quote(value, quoted, sizeof(quoted)), expected);
        free(value);
        return -EINVAL;
    }
    /* MQTT 3.1.1 §4.7.2: topics starting with '$' are not matched by '#'
     * or '+' subscriptions, so local apps could not subscribe broadly. */
    if (local && value[0] == '$') {
        conf_report(ld, node->start_mark, key,
                    "%s starts with '$' (local topics starting with '$' are not matched by "
                    "wildcard subscriptions; choose another prefix)",
                    conf_quote(value, quoted, sizeof(quoted)));
        free(value);
        return -EINVAL;
    }
    free(*dst);
    *dst = value;
    return 0;
}

void conf_get_string_list(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *expected, int (*check)(const char *, const char **),
                          char ***out, size_t *count)
{
    size_t n;

    *out = conf_sequence_alloc(ld, node, key, expected, NULL, sizeof(**out), &n);
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *item = conf_sequence_item(ld, node, i);
        char item_key[CONF_KEY_MAX];
        char quoted[CONF_QUOTE_MAX];
        const char *reason;
        char *text = NULL;

        conf_key_format(item_key, sizeof(item_key), "%s[%zu]", key, i);
        if (conf_get_text(ld, item, item_key, expected, CONF_MQTT_STRING_MAX, &text) < 0 ||
            text == NULL)
            continue;
        if (check != NULL && check(text, &reason) < 0) {
            conf_report(ld, item->start_mark, item_key, "%s: %s (expected %s)",
                        conf_quote(text, quoted, sizeof(quoted)), reason, expected);
            free(text);
            continue;
        }
        (*out)[(*count)++] = text;
    }
}

int conf_get_seconds(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                     uint32_t min_s, uint32_t max_s, uint32_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    uint64_t ms;

    if (conf_get_duration_ms(ld, node, key, (uint64_t)min_s * 1000, (uint64_t)max_s * 1000, &ms) <
        0)
        return -EINVAL;
    if (ms % 1000 != 0) {
        conf_report(ld, node->start_mark, key, "%s is not a whole number of seconds",
                    conf_quote(conf_node_text(node), quoted, sizeof(quoted)));
        return -EINVAL;
    }
    *out = (uint32_t)(ms / 1000);
    return 0;
}

int conf_get_keyword(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                     const char *const *choices, size_t count, const char *expected, int *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, expected);

    if (text == NULL)
        return -EINVAL;
    for (size_t i = 0; i < count; i++) {
        if (strcmp(text, choices[i]) == 0) {
            *out = (int)i;
            return 0;
        }
    }
    conf_report(ld, node->start_mark, key, "%s is not valid (expected %s)",
                conf_quote(text, quoted, sizeof(quoted)), expected);
    return -EINVAL;
}

void conf_free_secret(char *secret)
{
    if (secret != NULL) {
        explicit_bzero(secret, strlen(secret));
        free(secret);
    }
}

void conf_free_strings(char **strings, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(strings[i]);
    free(strings);
}

bool conf_str_equal(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

void conf_read_password_file(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                             char **password)
{
    static const char what[] = "a readable file that holds the password";
    char quoted[CONF_QUOTE_MAX];
    char *path = NULL;
    char *content = NULL;
    size_t len = 0;
    const char *text = conf_scalar_text(ld, node, key, what);
    int rc;

    if (text == NULL)
        return;
    if (text[0] == '\0') {
        conf_report(ld, node->start_mark, key, "is empty (expected %s)", what);
        return;
    }
    if (conf_resolve_path(ld, text, &path) < 0)
        return;
    rc = util_read_file(path, CONF_MQTT_STRING_MAX + 2, &content, &len);
    if (rc == -ENOMEM) {
        ld->oom = true;
        goto out;
    }
    if (rc < 0) {
        conf_report(ld, node->start_mark, key, "cannot read %s: %s (expected %s)",
                    conf_quote(path, quoted, sizeof(quoted)),
                    rc == -EFBIG ? "file too large" : strerror(-rc), what);
        goto out;
    }
    if (len > 0 && content[len - 1] == '\n')
        content[--len] = '\0';
    if (len > 0 && content[len - 1] == '\r')
        content[--len] = '\0';
    if (len == 0 || strlen(content) != len || len > CONF_MQTT_STRING_MAX) {
        conf_report(ld, node->start_mark, key, "%s %s (expected %s)",
                    conf_quote(path, quoted, sizeof(quoted)),
                    len == 0                 ? "is empty"
                    : strlen(content) != len ? "contains a NUL byte"
                                             : "is longer than 65535 bytes",
                    what);
        goto out;
    }
    *password = content;
    content = NULL;
out:
    if (content != NULL) {
        explicit_bzero(content, len);
        free(content);
    }
    free(path);
}

/* ------------------------------------------------------------------------ */
/* Rules several profiles share                                              */

bool conf_check_jwt_cloud(struct conf_loader *ld, yaml_node_t *uplink_node, const char *path,
                          const struct conf_uplink *uplink, const char *cloud)
{
    char k[CONF_KEY_MAX];

    conf_key_join(k, sizeof(k), path, "auth");
    if (uplink->auth.type != CONF_AUTH_JWT) {
        conf_report(ld, uplink_node->start_mark, k,
                    "%s needs type jwt (a JWT signed with the device's private key is the MQTT "
                    "password: add auth: {type: jwt, key: /etc/uplinkd/device.key})",
                    cloud);
        return false;
    }
    /* GCP and akenza register RS256 and ES256 public keys only. */
    if (uplink->auth.jwt.alg != JWT_ALG_RS256 && uplink->auth.jwt.alg != JWT_ALG_ES256) {
        conf_key_join(k, sizeof(k), path, "auth.alg");
        conf_report(
            ld, uplink_node->start_mark, k,
            "%s is not accepted by %s (expected RS256 with an RSA key or ES256 with a P-256 "
            "key)",
            jwt_alg_name(uplink->auth.jwt.alg), cloud);
        return false;
    }
    return true;
}
