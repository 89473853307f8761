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
                append_bytes(buf, (const char *)p, 1);
            }
        }
    }
    append_bytes(buf, "\"", 1);
}
