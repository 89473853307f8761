/* json.c - JSON output builder (see json.h). */
#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void json_buf_init(struct json_buf *buf)
{
    memset(buf, 0, sizeof(*buf));
}

void json_buf_deinit(struct json_buf *buf)
{
    free(buf->data);
    memset(buf, 0, sizeof(*buf));
}

static bool reserve(struct json_buf *buf, size_t extra)
{
    if (buf->failed)
        return false;
    if (buf->len + extra + 1 <= buf->cap)
        return true;
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < buf->len + extra + 1)
        cap *= 2;
    char *grown = realloc(buf->data, cap);
    if (grown == NULL) {
        buf->failed = true;
        return false;
    }
    buf->data = grown;
    buf->cap = cap;
    return true;
}

static void append_bytes(struct json_buf *buf, const char *bytes, size_t n)
{
    if (!reserve(buf, n))
        return;
    memcpy(buf->data + buf->len, bytes, n);
    buf->len += n;
    buf->data[buf->len] = '\0';
}

void json_append_raw(struct json_buf *buf, const char *text)
{
    append_bytes(buf, text, strlen(text));
}

void json_append_fmt(struct json_buf *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !reserve(buf, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(buf->data + buf->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    buf->len += (size_t)n;
}

/* The length of the well-formed UTF-8 sequence at @p (RFC 3629 §4), or 0. */
static size_t utf8_sequence(const unsigned char *p)
{
    if (p[0] < 0x80)
        return 1;
    if (p[0] >= 0xc2 && p[0] <= 0xdf)
        return (p[1] & 0xc0) == 0x80 ? 2 : 0;
    if (p[0] >= 0xe0 && p[0] <= 0xef) {
        unsigned char lo = p[0] == 0xe0 ? 0xa0 : 0x80; /* no overlong form */
        unsigned char hi = p[0] == 0xed ? 0x9f : 0xbf; /* no surrogate */
        return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 ? 3 : 0;
    }
    if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        unsigned char lo = p[0] == 0xf0 ? 0x90 : 0x80; /* no overlong form */
        unsigned char hi = p[0] == 0xf4 ? 0x8f : 0xbf; /* nothing above U+10FFFF */
        return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 && (p[3] & 0xc0) == 0x80 ? 4 : 0;
    }
    return 0;
}

void json_append_string(struct json_buf *buf, const char *text)
{
    if (text == NULL) {
        json_append_raw(buf, "null");
        return;
    }
    append_bytes(buf, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"':
            append_bytes(buf, "\\\"", 2);
            break;
        case '\\':
            append_bytes(buf, "\\\\", 2);
            break;
        case '\n':
            append_bytes(buf, "\\n", 2);
            break;
        case '\r':
            append_bytes(buf, "\\r", 2);
            break;
        case '\t':
            append_bytes(buf, "\\t", 2);
            break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof(esc), "\\u%04x", *p);
                append_bytes(buf, esc, 6);
            } else {
                /* The checks stop at the terminating NUL: a continuation
                 * byte is never 0. */
                size_t n = utf8_sequence(p);
                if (n == 0) {
                    append_bytes(buf, "\\ufffd", 6);
                } else {
                    append_bytes(buf, (const char *)p, n);
                    p += n - 1;
                }
            }
        }
    }
    append_bytes(buf, "\"", 1);
}

/* RFC 8259 §2: the blanks around a JSON value. */
static bool json_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* @payload without its leading and trailing blanks: [*a, *b). */
static void json_trim(const char *p, size_t len, size_t *a, size_t *b)
{
    *a = 0;
    *b = len;
    while (*a < *b && json_blank(p[*a]))
        (*a)++;
    while (*b > *a && json_blank(p[*b - 1]))
        (*b)--;
}

bool json_shape_object(const void *payload, size_t len)
{
    const char *p = payload;
    size_t a, b;

    json_trim(p, len, &a, &b);
    return b - a >= 2 && p[a] == '{' && p[b - 1] == '}';
}

bool json_shape_document(const void *payload, size_t len)
{
    const char *p = payload;
    size_t a, b;

    json_trim(p, len, &a, &b);
    return a < b && (p[a] == '{' || p[a] == '[');
}
