/* smartrest.c - Cumulocity SmartREST 2.0 CSV: encode, parse, validate, pack.
 *
 * References:
 *   - Cumulocity, "MQTT implementation", SmartREST escaping
 *     (https://cumulocity.com/guides/mqtt/implementation/): quote a value
 *     holding ',', '"', CR or LF; escape an embedded '"' as \".
 *   - Cumulocity, "MQTT static templates" (SoftwareAG/c8y-docs
 *     content/smartrest/mqtt-static-templates.md): numeric message ids,
 *     optional trailing fields may be left out.
 *   - Cumulocity, "Device integration using MQTT": 16184 bytes per packet,
 *     header and body together.
 *   - MQTT 3.1.1 §2.2.3 (Remaining Length), §3.3 (PUBLISH).
 */
#include "smartrest.h"
#include "util.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* MQTT 3.1.1 §2.2.3: four bytes of Remaining Length encode at most this. */
#define MQTT_MAX_REMAINING 268435455u
#define MQTT_MAX_TOPIC     65535u

static bool is_control(unsigned char c)
{
    return c < 0x20 || c == 0x7f;
}

/* ------------------------------------------------------------------------ */
/* Encoder                                                                  */

void smartrest_line_init(struct smartrest_line *line)
{
    memset(line, 0, sizeof(*line));
}

void smartrest_line_deinit(struct smartrest_line *line)
{
    free(line->data);
    smartrest_line_init(line);
}

static bool line_reserve(struct smartrest_line *line, size_t extra)
{
    size_t need, cap;
    char *data;

    if (line->failed)
        return false;
    if (extra > SIZE_MAX - line->len - 1)
        goto err_failed;
    need = line->len + extra + 1;
    if (need <= line->cap)
        return true;
    cap = line->cap ? line->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    data = realloc(line->data, cap);
    if (!data)
        goto err_failed;
    line->data = data;
    line->cap = cap;
    return true;

err_failed:
    line->failed = true;
    return false;
}

bool smartrest_needs_quotes(const char *value, size_t len)
{
    if (len == 0)
        return false;
    /* Leading/trailing spaces: a CSV reader may trim them; quoting keeps
     * them. Control characters: a raw one outside quotes is refused by
     * smartrest_validate_line(), so the encoder never produces one. */
    if (value[0] == ' ' || value[len - 1] == ' ')
        return true;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)value[i];

        if (c == ',' || c == '"' || is_control(c))
            return true;
    }
    return false;
}

int smartrest_line_add(struct smartrest_line *line, const char *value, size_t len, char *err,
                       size_t err_len)
{
    bool quote;
    size_t quotes = 0;

    if (memchr(value, '\0', len)) {
        util_set_err(err, err_len, "a SmartREST value cannot contain a NUL byte");
        return -EINVAL;
    }
    quote = smartrest_needs_quotes(value, len);
    /* Inside quotes \" is an escaped quote, so a value ending in a backslash
     * would swallow its own closing quote. Cumulocity documents no escape for
     * the backslash itself, so there is no safe way to write it. */
    if (quote && value[len - 1] == '\\') {
        util_set_err(err, err_len,
                     "a SmartREST value that needs quotes cannot end with a backslash (the closing "
                     "quote would read as an escaped quote \\\"): remove the trailing backslash");
        return -EINVAL;
    }
    for (size_t i = 0; i < len; i++)
        quotes += value[i] == '"';
    /* comma + value + one backslash per quote + the two quotes */
    if (!line_reserve(line, 1 + len + quotes + 2))
        return -ENOMEM;
    if (line->fields > 0)
        line->data[line->len++] = ',';
    if (quote)
        line->data[line->len++] = '"';
    for (size_t i = 0; i < len; i++) {
        if (value[i] == '"')
            line->data[line->len++] = '\\';
        line->data[line->len++] = value[i];
    }
    if (quote)
        line->data[line->len++] = '"';
    line->data[line->len] = '\0';
    line->fields++;
    return 0;
}

int smartrest_line_add_str(struct smartrest_line *line, const char *value, char *err,
                           size_t err_len)
{
    return smartrest_line_add(line, value, strlen(value), err, err_len);
}

int smartrest_encode(const char *const *fields, size_t count, char **out, size_t *out_len,
                     char *err, size_t err_len)
{
    struct smartrest_line line;
    int rc;

    if (count == 0) {
        util_set_err(err, err_len, "a SmartREST line needs at least a message id");
        return -EINVAL;
    }
    smartrest_line_init(&line);
    for (size_t i = 0; i < count; i++) {
        rc = smartrest_line_add_str(&line, fields[i], err, err_len);
        if (rc < 0)
            goto err_line;
    }
    *out = line.data;
    if (out_len)
        *out_len = line.len;
    return 0;

err_line:
    smartrest_line_deinit(&line);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Parser                                                                   */

/* One pass over a line. With @fields NULL it only counts fields and checks
 * the syntax; otherwise it writes the decoded values into @storage. Both
 * passes run the same code, so the counting pass cannot disagree with the
 * decoding one. */
static int parse_pass(const char *line, size_t len, bool control_ok, size_t *count, char **fields,
                      size_t *lengths, char *storage, char *err, size_t err_len)
{
    size_t pos = 0, n = 0, out = 0;

    for (;;) {
        size_t start = out;

        if (pos < len && line[pos] == '"') {
            size_t open = pos++;

            for (;;) {
                unsigned char c;

                if (pos >= len) {
                    util_set_err(err, err_len,
                                 "unterminated quote: the value opened with '\"' at column %zu has "
                                 "no closing quote",
                                 open + 1);
                    return -EINVAL;
                }
                c = (unsigned char)line[pos];
                if (c == '\0')
                    goto err_nul;
                /* \" is Cumulocity's escape, "" the legacy CSV one. */
                if ((c == '\\' || c == '"') && pos + 1 < len && line[pos + 1] == '"') {
                    if (storage)
                        storage[out] = '"';
                    out++;
                    pos += 2;
                    continue;
                }
                if (c == '"') {
                    pos++;
                    break;
                }
                if (storage)
                    storage[out] = (char)c;
                out++;
                pos++;
            }
            if (pos < len && line[pos] != ',') {
                util_set_err(err, err_len,
                             "unexpected character after the closing quote at column %zu: a quoted "
                             "value must be followed by ',' or the end of the line",
                             pos + 1);
                return -EINVAL;
            }
        } else {
            while (pos < len && line[pos] != ',') {
                unsigned char c = (unsigned char)line[pos];

                if (c == '\0')
                    goto err_nul;
                if (c == '"') {
                    util_set_err(err, err_len,
                                 "double quote inside an unquoted value at column %zu: enclose the "
                                 "whole value in quotes and escape the quote as \\\"",
                                 pos + 1);
                    return -EINVAL;
                }
                if (!control_ok && is_control(c)) {
                    util_set_err(err, err_len,
                                 "raw control character 0x%02x at column %zu: enclose the value in "
                                 "double quotes",
                                 c, pos + 1);
                    return -EINVAL;
                }
                if (storage)
                    storage[out] = (char)c;
                out++;
                pos++;
            }
        }
        if (storage) {
            fields[n] = storage + start;
            lengths[n] = out - start;
            storage[out] = '\0';
        }
        out++; /* room for the NUL */
        n++;
        if (pos >= len)
            break;
        pos++; /* the comma; a comma at the very end opens an empty last field */
    }
    *count = n;
    return 0;

err_nul:
    util_set_err(err, err_len, "NUL byte at column %zu: SmartREST is text", pos + 1);
    return -EINVAL;
}

static int parse(const char *line, size_t len, bool control_ok, struct smartrest_record *out,
                 char *err, size_t err_len)
{
    size_t count, head;
    char *block;
    int rc;

    memset(out, 0, sizeof(*out));
    if (len > 0 && line[len - 1] == '\r')
        len--;
    rc = parse_pass(line, len, control_ok, &count, NULL, NULL, NULL, err, err_len);
    if (rc < 0)
        return rc;
    /* One block: field pointers, lengths, then the decoded text, which is
     * never longer than the line plus one NUL per field. */
    head = count * (sizeof(char *) + sizeof(size_t));
    block = malloc(head + len + count);
    if (!block)
        return -ENOMEM;
    out->fields = (char **)(void *)block;
    out->lengths = (size_t *)(void *)(block + count * sizeof(char *));
    rc = parse_pass(line, len, control_ok, &out->count, out->fields, out->lengths, block + head,
                    err, err_len);
    if (rc < 0) { /* cannot happen: the first pass accepted the same bytes */
        free(block);
        memset(out, 0, sizeof(*out));
    }
    return rc;
}

int smartrest_parse_line(const char *line, size_t len, struct smartrest_record *out, char *err,
                         size_t err_len)
{
    return parse(line, len, true, out, err, err_len);
}

void smartrest_record_free(struct smartrest_record *record)
{
    free(record->fields); /* one block, see parse() */
    memset(record, 0, sizeof(*record));
}

static bool is_blank(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

int smartrest_next_line(const char *payload, size_t len, size_t *pos, const char **line,
                        size_t *line_len)
{
    while (*pos < len) {
        size_t start = *pos, i = start, end;
        bool field_start = true, quoted = false;

        /* Mirror parse_pass()'s quoting so a LF inside quotes stays in the
         * line; a stray quote in an unquoted value is left for the parser to
         * report. */
        while (i < len) {
            char c = payload[i];

            if (quoted) {
                if ((c == '\\' || c == '"') && i + 1 < len && payload[i + 1] == '"') {
                    i += 2;
                    continue;
                }
                if (c == '"')
                    quoted = false;
                i++;
                continue;
            }
            if (c == '\n')
                break;
            if (field_start && c == '"')
                quoted = true;
            field_start = c == ',';
            i++;
        }
        end = i;
        *pos = i < len ? i + 1 : len;
        if (end > start && payload[end - 1] == '\r')
            end--;
        if (is_blank(payload + start, end - start))
            continue;
        *line = payload + start;
        *line_len = end - start;
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Validation                                                               */

static bool id_char_ok(unsigned char c, bool template_ids)
{
    if (c >= '0' && c <= '9')
        return true;
    if (!template_ids)
        return false;
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
}

int smartrest_validate_line(const char *line, size_t len, bool template_ids, char *err,
                            size_t err_len)
{
    struct smartrest_record record;
    size_t id_len;
    int rc;

    if (len > 0 && line[len - 1] == '\r')
        len--;
    if (len == 0) {
        util_set_err(err, err_len, "empty SmartREST line");
        return -EINVAL;
    }
    if (line[0] == '"') {
        util_set_err(err, err_len, "the message id must not be quoted");
        return -EINVAL;
    }
    rc = parse(line, len, false, &record, err, err_len);
    if (rc < 0)
        return rc;
    id_len = record.lengths[0];
    if (id_len == 0) {
        util_set_err(err, err_len, "the line has no message id (it starts with a comma)");
        rc = -EINVAL;
        goto out;
    }
    for (size_t i = 0; i < id_len; i++) {
        unsigned char c = (unsigned char)record.fields[0][i];

        if (id_char_ok(c, template_ids))
            continue;
        if (template_ids)
            util_set_err(err, err_len,
                         "message id '%.*s' has character '%c' at column %zu: ids are made of "
                         "A-Z a-z 0-9 _ -",
                         (int)(id_len > 40 ? 40 : id_len), record.fields[0], c, i + 1);
        else
            util_set_err(err, err_len,
                         "message id '%.*s' is not a number: static templates use numeric ids such "
                         "as 100, 200, 400, 501 (a custom template id needs a template configured "
                         "for this uplink)",
                         (int)(id_len > 40 ? 40 : id_len), record.fields[0]);
        rc = -EINVAL;
        goto out;
    }
out:
    smartrest_record_free(&record);
    return rc;
}

void smartrest_lines_init(struct smartrest_lines *lines)
{
    memset(lines, 0, sizeof(*lines));
}

void smartrest_lines_truncate(struct smartrest_lines *lines, size_t count)
{
    while (lines->count > count)
        free(lines->line[--lines->count]);
}

void smartrest_lines_deinit(struct smartrest_lines *lines)
{
    smartrest_lines_truncate(lines, 0);
    free(lines->line);
    free(lines->len);
    smartrest_lines_init(lines);
}

int smartrest_lines_push(struct smartrest_lines *lines, const char *text, size_t len)
{
    char *copy;

    if (lines->count == lines->cap) {
        size_t cap = lines->cap ? lines->cap * 2 : 8;
        char **line;
        size_t *lens;

        if (cap > SIZE_MAX / sizeof(char *))
            return -ENOMEM;
        /* Grow both arrays before touching either, so a failure leaves the
         * list consistent. */
        line = realloc(lines->line, cap * sizeof(*line));
        if (!line)
            return -ENOMEM;
        lines->line = line;
        lens = realloc(lines->len, cap * sizeof(*lens));
        if (!lens)
            return -ENOMEM;
        lines->len = lens;
        lines->cap = cap;
    }
    if (len == SIZE_MAX)
        return -ENOMEM;
    copy = malloc(len + 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, text, len);
    copy[len] = '\0';
    lines->line[lines->count] = copy;
    lines->len[lines->count] = len;
    lines->count++;
    return 0;
}

int smartrest_payload_split(const char *payload, size_t len, bool template_ids,
                            struct smartrest_lines *out, char *err, size_t err_len)
{
    size_t before = out->count, pos = 0, line_len;
    const char *line;
    char why[SMARTREST_ERR_LEN];
    int rc, found = 0;

    while (smartrest_next_line(payload, len, &pos, &line, &line_len) == 1) {
        rc = smartrest_validate_line(line, line_len, template_ids, why, sizeof(why));
        if (rc == -EINVAL) {
            size_t number = 1;

            for (const char *p = payload; p < line; p++)
                number += *p == '\n';
            util_set_err(err, err_len, "line %zu: %s", number, why);
        }
        if (rc < 0)
            goto err_truncate;
        rc = smartrest_lines_push(out, line, line_len);
        if (rc < 0)
            goto err_truncate;
        found++;
    }
    if (found == 0) {
        util_set_err(err, err_len, "no SmartREST line in the payload");
        return -EINVAL;
    }
    return found;

err_truncate:
    smartrest_lines_truncate(out, before);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Packing                                                                  */

/* MQTT 3.1.1 §2.2.3: 7 bits per byte, at most 4 bytes. */
static size_t remaining_length_bytes(size_t remaining)
{
    if (remaining < 128)
        return 1;
    if (remaining < 16384)
        return 2;
    if (remaining < 2097152)
        return 3;
    return 4;
}

/* The variable header: topic name with its 2-byte length (§3.3.2.1) and,
 * for QoS 1 and 2, the packet identifier (§3.3.2.2). */
static size_t variable_header_size(size_t topic_len, int qos)
{
    return 2 + topic_len + (qos > 0 ? 2 : 0);
}

int smartrest_publish_size(size_t topic_len, size_t payload_len, int qos, size_t *size)
{
    size_t remaining;

    if (qos < 0 || qos > 2 || topic_len > MQTT_MAX_TOPIC)
        return -EINVAL;
    if (payload_len > MQTT_MAX_REMAINING)
        return -EMSGSIZE;
    remaining = variable_header_size(topic_len, qos) + payload_len;
    if (remaining > MQTT_MAX_REMAINING)
        return -EMSGSIZE;
    *size = 1 + remaining_length_bytes(remaining) + remaining;
    return 0;
}

int smartrest_max_payload(size_t topic_len, int qos, size_t max_packet, size_t *max)
{
    size_t header, best = 0;
    bool fits = false;

    if (qos < 0 || qos > 2 || topic_len > MQTT_MAX_TOPIC)
        return -EINVAL;
    header = variable_header_size(topic_len, qos);
    /* Try each Remaining Length width; keep the largest payload whose
     * remaining length really encodes in that many bytes. */
    for (size_t width = 1; width <= 4; width++) {
        size_t remaining;

        if (max_packet < 1 + width + header)
            continue;
        remaining = max_packet - 1 - width;
        if (remaining > MQTT_MAX_REMAINING)
            remaining = MQTT_MAX_REMAINING;
        if (remaining_length_bytes(remaining) > width) /* clamp to this width's largest */
            remaining = width == 1 ? 127 : width == 2 ? 16383 : 2097151;
        if (remaining < header)
            continue;
        if (!fits || remaining - header > best)
            best = remaining - header;
        fits = true;
    }
    if (!fits)
        return -EMSGSIZE;
    *max = best;
    return 0;
}

int smartrest_pack(const char *topic, int qos, size_t max_packet, const char *const *lines,
                   const size_t *lens, size_t count, size_t *taken, char **payload,
                   size_t *payload_len, char *err, size_t err_len)
{
    size_t topic_len = strlen(topic), limit = 0, total, n, size;
    bool fits;
    char *buf, *p;

    *taken = 0;
    if (count == 0 || qos < 0 || qos > 2 || topic_len > MQTT_MAX_TOPIC) {
        util_set_err(err, err_len, "nothing to pack, or a bad QoS or topic");
        return -EINVAL;
    }
    fits = smartrest_max_payload(topic_len, qos, max_packet, &limit) == 0;
    if (!fits || lens[0] > limit) {
        if (smartrest_publish_size(topic_len, lens[0], qos, &size) < 0)
            size = SIZE_MAX;
        util_set_err(
            err, err_len,
            "SmartREST line of %zu bytes would make a %zu-byte MQTT packet on '%s', over the "
            "%zu-byte limit (at most %zu bytes of line fit): refused, not sent",
            lens[0], size, topic, max_packet, fits ? limit : 0);
        return -EMSGSIZE;
    }
    total = lens[0];
    for (n = 1; n < count; n++) {
        /* FIFO: stop at the first line that does not fit rather than skip
         * ahead, so lines go out in the order they were queued. */
        if (lens[n] > limit - total || 1 > limit - total - lens[n])
            break;
        total += 1 + lens[n];
    }
    buf = malloc(total + 1);
    if (!buf)
        return -ENOMEM;
    p = buf;
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            *p++ = '\n';
        memcpy(p, lines[i], lens[i]);
        p += lens[i];
    }
    *p = '\0';
    *taken = n;
    *payload = buf;
    *payload_len = total;
    return 0;
}
