/* conf_walk.h - the YAML walker and the typed getters under every config
 * section: conf_load.c (the root, routes, loading), conf_local.c,
 * conf_uplink.c and each profile's src/profiles/<name>/section.c. Private to the core
 * library; nothing outside the configuration code includes it.
 *
 * How a section reads its mapping: conf_walk_mapping() checks the keys
 * against the section's table (unknown keys with a suggestion, duplicates,
 * YAML merge keys) and hands back the value nodes by key index; the section
 * then converts each value with a conf_get_*() helper, which reports what is
 * wrong with it in words ("FILE:LINE:COLUMN: KEY: message") and returns
 * -EINVAL. Reports never stop the walk: every section is checked and all
 * errors come back together from conf_load().
 *
 * Ownership: the nodes belong to the libyaml document (borrowed, valid
 * while conf_load() runs); strings stored through conf_set_string() and the
 * getters belong to the struct conf being built.
 */
#ifndef UPLINKD_CONF_WALK_H
#define UPLINKD_CONF_WALK_H

#include "conf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <yaml.h>

#define CONF_MAX_ERRORS       50    /* lines kept; the rest are counted */
#define CONF_KEY_MAX          256   /* longest key path shown in a message */
#define CONF_QUOTE_MAX        160   /* buffer for a quoted value in a message */
#define CONF_MESSAGE_MAX      1024  /* one error line */
#define CONF_MQTT_STRING_MAX  65535 /* MQTT 3.1.1 §1.5.3: UTF-8 string length is 16 bits */
#define CONF_TOPIC_PREFIX_MAX 1024
#define CONF_DNS_NAME_MAX     253 /* RFC 1035 §2.3.4, without the trailing dot */
#define CONF_DNS_LABEL_MAX    63

/* One conf_load() run: the document being read and the errors so far. */
struct conf_loader {
    const char *path; /* as given by the caller: used in every message */
    char *dir;        /* absolute directory of the file: base for relative paths */
    yaml_document_t *doc;
    struct conf *conf; /* being built; freed by conf_load() when errors were reported */

    char *errors; /* '\n'-separated lines */
    size_t errors_len;
    size_t errors_cap;
    unsigned error_count;
    bool oom; /* an allocation failed: conf_load() returns -ENOMEM */

    yaml_mark_t *uplink_name_marks; /* where each uplink's name was written */
};

/* Append one finished line to the error text (ld->oom when it cannot grow). */
void conf_errors_append(struct conf_loader *ld, const char *line);

/* Report one problem as "FILE:LINE:COLUMN: KEY: message". libyaml marks are
 * 0-based; editors and compilers count from 1. */
__attribute__((format(printf, 4, 5))) void conf_report(struct conf_loader *ld, yaml_mark_t mark,
                                                       const char *key, const char *fmt, ...);

/* Quote a value for a message: "text", with control characters and quotes
 * escaped (a config value must never inject lines into the log) and long
 * values shortened. */
const char *conf_quote(const char *text, char *buf, size_t size);

/* Key paths are for messages only: a very long one is cut, never an error. */
__attribute__((format(printf, 3, 4))) void conf_key_format(char *buf, size_t size, const char *fmt,
                                                           ...);

/* "@parent.@child" (or @child when @parent is empty) into @buf, for messages. */
void conf_key_join(char *buf, size_t size, const char *parent, const char *child);

/* The closest candidate within two edits, or NULL. A one-letter key is too
 * short for a suggestion to mean anything. */
const char *conf_closest(const char *word, const char *const *candidates, size_t count);

/* @names joined by ", " into @buf (cut to fit), for "expected one of" messages. */
void conf_join_names(char *buf, size_t size, const char *const *names, size_t count);

/* The document's node number @index (a yaml_node_pair_t member). Borrowed. */
yaml_node_t *conf_node_at(struct conf_loader *ld, int index);

/* A scalar node's text (call it only on scalars). Borrowed from the document. */
const char *conf_node_text(const yaml_node_t *node);

/* true when @node exists and is not a YAML null ("key:", ~, null): a null
 * value means "not set" everywhere, so the default applies. */
bool conf_node_present(const yaml_node_t *node);

/* The number of items of a sequence node. */
size_t conf_sequence_length(const yaml_node_t *node);

/* Item @i (< conf_sequence_length()) of a sequence node. Borrowed. */
yaml_node_t *conf_sequence_item(struct conf_loader *ld, const yaml_node_t *node, size_t i);

/* true when @node is of @kind; otherwise reports "expected @expected, found ...". */
bool conf_expect_kind(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                      yaml_node_type_t kind, const char *expected);

/* The sequence at @key as an array of zeroed @size-byte items, one per
 * entry, its length in *@count. NULL when it is not a sequence (reported,
 * @expected says what was wanted), when it is empty (reported with
 * @empty_error when that is not NULL; otherwise an empty sequence is
 * allowed and nothing is said), or out of memory (ld->oom). */
void *conf_sequence_alloc(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *expected, const char *empty_error, size_t size,
                          size_t *count);

/* Check the keys of a mapping against @keys: each must be a scalar, known,
 * and appear once. values[i] receives the value node of keys[i] (NULL when
 * absent), key_marks[i] where its key was written. Returns false when @map
 * is not a mapping (reported). */
bool conf_walk_mapping(struct conf_loader *ld, yaml_node_t *map, const char *path,
                       const char *const *keys, size_t key_count, yaml_node_t **values,
                       yaml_mark_t *key_marks);

/* Replace *@dst by a copy of @text (the old one is freed; ld->oom on failure). */
void conf_set_string(struct conf_loader *ld, char **dst, const char *text);

/* The text of a scalar, or NULL after reporting why there is none. */
const char *conf_scalar_text(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                             const char *expected);

/* Plain text without control characters (they would corrupt logs and
 * protocol strings). */
int conf_get_text(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                  const char *expected, size_t max_len, char **dst);

/* An unsigned integer @noun within [@min, @max] into *@out; 0 or -EINVAL (reported). */
int conf_get_uint(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                  const char *noun, uint64_t min, uint64_t max, uint64_t *out);

/* YAML 1.1 spellings too, because operators write "yes" and "off". */
int conf_get_bool(struct conf_loader *ld, const yaml_node_t *node, const char *key, bool *out);

/* A duration in milliseconds in one unit, for messages: "2h", "5m", "3s", "250ms". */
void conf_format_ms(char *buf, size_t size, uint64_t ms);

/* A duration ("250ms", "5s", "1h30m" or seconds) within [@min_ms, @max_ms] into
 * *@out, in milliseconds; 0 or -EINVAL (reported). */
int conf_get_duration_ms(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                         uint64_t min_ms, uint64_t max_ms, uint64_t *out);

/* A size ("512", "64KiB", "10MB") within [@min, @max] bytes into *@out; 0 or
 * -EINVAL (reported). */
int conf_get_size(struct conf_loader *ld, const yaml_node_t *node, const char *key, uint64_t min,
                  uint64_t max, uint64_t *out);

/* A file mode the way chmod(1) writes it: octal digits with a leading 0
 * ("0660", also "0o660"). YAML 1.1 reads a plain 0660 as the octal integer
 * 432 and YAML 1.2 as decimal 660; reading the text ourselves gives the
 * chmod meaning either way. A number without the leading 0 is refused rather
 * than guessed: "660" and "432" would each be right under one reading. */
int conf_get_mode(struct conf_loader *ld, const yaml_node_t *node, const char *key, unsigned *out);

/* An absolute path of at most @max_len bytes (@what names it in messages)
 * into *@dst; 0 or -EINVAL (reported). */
int conf_get_absolute_path(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                           const char *what, size_t max_len, char **dst);

/* "FILE:LINE:COL" of @node, malloc'd into *@dst (for messages written after
 * loading: tlscheck). */
void conf_set_where(struct conf_loader *ld, const yaml_node_t *node, char **dst);

/* A path to a file that must be readable now, relative to the config's
 * directory when not absolute. */
int conf_get_readable_file(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                           const char *what, char **dst);

/* A per-child file pattern (akenza.child_key, azure.child_key): an absolute
 * path with %c for the child id (profile_child_key_path()); @example
 * completes "expected e.g. ..." in the message. Its files are looked at when
 * a child's session opens, not now. */
int conf_get_file_pattern(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *example, char **dst);

/* A-Z a-z 0-9 in the C locale, whatever the process locale says. */
bool conf_is_alnum(char c);

/* Returns the first character of @text not in [A-Za-z0-9] or @extra, or
 * NULL when all are allowed. */
const char *conf_first_bad_char(const char *text, const char *extra);

/* A character in words for a message: "a space", "control character 0x07",
 * "a non-ASCII character" or "'/'". */
void conf_describe_char(char *buf, size_t size, char c);

/* Check an uplink host: a DNS name (RFC 1123 §2.1 labels), an IPv4 literal,
 * or an IPv6 literal (bare or in brackets). On success *host is the name to
 * connect to (brackets removed). @why receives the problem otherwise. */
int conf_check_host(const char *text, char *why, size_t why_size, char **host);

/* A topic prefix: local apps and clouds see "<prefix>/<child>/...", so no
 * wildcards (MQTT 3.1.1 §4.7.1: '+' and '#' are not allowed in topic
 * names), no trailing '/' (it would make an empty level), and no control
 * characters. */
int conf_get_topic_prefix(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          bool local, char **dst);

/* A sequence of strings, each checked by @check (NULL: plain text). */
void conf_get_string_list(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                          const char *expected, int (*check)(const char *, const char **),
                          char ***out, size_t *count);

/* A duration in whole seconds within [min_s, max_s]. */
int conf_get_seconds(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                     uint32_t min_s, uint32_t max_s, uint32_t *out);

/* A scalar that must be one of @choices; *@out is its index. */
int conf_get_keyword(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                     const char *const *choices, size_t count, const char *expected, int *out);

/* Free a secret (password) after wiping it; NULL is fine. */
void conf_free_secret(char *secret);

/* Free an array of @count strings and the array. */
void conf_free_strings(char **strings, size_t count);

/* Two optional strings are equal (both NULL, or the same text). */
bool conf_str_equal(const char *a, const char *b);

/* Read a password file: the whole content, minus one trailing newline
 * (echo and editors add one; a password never ends with it). */
void conf_read_password_file(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                             char **password);

/* The rules both JWT clouds (gcp, akenza) share, for the uplink at @path
 * (its @uplink_node for the mark): auth.type jwt, and RS256 or ES256, the
 * only algorithms they register. Reports with @cloud's name and returns
 * false when one is broken. */
bool conf_check_jwt_cloud(struct conf_loader *ld, yaml_node_t *uplink_node, const char *path,
                          const struct conf_uplink *uplink, const char *cloud);

/* ------------------------------------------------------------------------ */
/* The sections, by file (each reads its part of the struct conf)          */

/* conf_local.c */
/* Set the local defaults before anything is read. */
void conf_local_init(struct conf_local *local);
/* local: (@node may be NULL: the section is optional). */
void conf_local_parse(struct conf_loader *ld, yaml_node_t *node);
/* After the root is read: the default topic prefix and listeners. */
void conf_local_finish(struct conf_loader *ld);
/* Free what conf_local_parse() stored in @local (not @local itself). */
void conf_local_free(struct conf_local *local);

/* conf_uplink.c */
/* uplinks: the sequence, each item into ld->conf->uplinks[]. */
void conf_uplinks_parse(struct conf_loader *ld, yaml_node_t *node);
/* Free what conf_uplinks_parse() stored in @uplink, with its profile
 * section (not @uplink itself). */
void conf_uplink_free(struct conf_uplink *uplink);

#endif
