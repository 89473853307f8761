/* json.h - the little JSON *output* uplinkd needs (status, errors).
 * Parsing JSON is never hand-written here; output is a string builder. */
#ifndef UPLINKD_JSON_H
#define UPLINKD_JSON_H

#include <stdbool.h>
#include <stddef.h>

/* A growable output buffer. After any allocation failure `failed` is set and
 * further appends do nothing, so callers check once at the end. */
struct json_buf {
    char *data; /* NUL-terminated, owned */
    size_t len;
    size_t cap;
    bool failed;
};

/** json_buf_init() / json_buf_deinit() - empty buffer / free its memory. */
void json_buf_init(struct json_buf *buf);
void json_buf_deinit(struct json_buf *buf);

/** json_append_raw() - append text as is (punctuation, numbers). */
void json_append_raw(struct json_buf *buf, const char *text);

/** json_append_fmt() - append printf-formatted text as is. */
void json_append_fmt(struct json_buf *buf, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/**
 * json_append_string() - append @text as a JSON string literal with quotes,
 * escaping '"', '\\' and control characters (RFC 8259 §7). JSON text is
 * UTF-8 (RFC 8259 §8.1): a byte that does not start a well-formed UTF-8
 * sequence (RFC 3629 §4: no overlong forms, no surrogates, nothing above
 * U+10FFFF) becomes U+FFFD, so a stray byte in an error text or a file name
 * cannot make the whole status unreadable. NULL gives null.
 */
void json_append_string(struct json_buf *buf, const char *text);

/* Shape checks, not parsing: enough to decide how to label or wrap a
 * payload that the cloud parses and checks itself. */

/**
 * json_shape_object() - does @payload look like a JSON object (its first
 * and last non-blank bytes '{' and '}', RFC 8259 §2)? The cloud checks the
 * rest (IoT Hub answers a bad twin patch with 400, AWS a bad shadow update
 * on .../rejected).
 */
bool json_shape_object(const void *payload, size_t len);

/**
 * json_shape_document() - does @payload start (after blanks) like a JSON
 * object or array? (IoT Hub's routing reads a body only when the topic says
 * it is JSON.)
 */
bool json_shape_document(const void *payload, size_t len);

#endif
