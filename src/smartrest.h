/* smartrest.h - Cumulocity SmartREST 2.0 CSV: encode, parse, validate, pack.
 *
 * Pure functions, no I/O, no logging: the cumulocity profile calls them and
 * decides what to log or republish on uplinkd/<uplink>/errors.
 *
 * The format (Cumulocity "MQTT implementation", section "SmartREST
 * escaping", https://cumulocity.com/guides/mqtt/implementation/):
 *   - one message per line, fields separated by ',', the first field is the
 *     message id (static templates 1xx..5xx, or a custom template id);
 *   - a field containing ',', '"', CR or LF is enclosed in double quotes and
 *     each embedded '"' is escaped with a backslash: \"
 *     e.g. 100,"This value, needs escaping",This value does not need escaping
 *          511,myDeviceSerial,"execute this\nand this\nand \"this\""
 *   - several messages travel in one PUBLISH separated by line breaks.
 * uplinkd also quotes values with leading or trailing spaces or a TAB (so
 * the cloud never trims them) and accepts the legacy CSV form "" for an
 * embedded quote on input (SmartREST 1.0 and RFC 4180 writers).
 *
 * Every function returns 0 (or a count) or a negative errno. Where the
 * cause is something a user did, the words go to @err (a caller buffer of
 * @err_len bytes, always NUL-terminated when @err_len > 0; @err may be NULL).
 */
#ifndef UPLINKD_SMARTREST_H
#define UPLINKD_SMARTREST_H

#include <stdbool.h>
#include <stddef.h>

/* Cumulocity accepts at most 16184 bytes per MQTT packet, header and body
 * together (Cumulocity "Device integration using MQTT": "the maximum accepted
 * payload size is 16184 bytes, which includes both message header and
 * body"). A larger packet makes the broker drop the connection. */
#define SMARTREST_MAX_PACKET 16184

/* Room for the words put in @err; longer buffers are fine, shorter ones
 * truncate the message. */
#define SMARTREST_ERR_LEN 192

/* ------------------------------------------------------------------------ */
/* Encoder                                                                  */

/* A line under construction. After an allocation failure `failed` is set and
 * further appends do nothing, so callers check once at the end (like
 * struct json_buf). */
struct smartrest_line {
    char *data; /* NUL-terminated, owned; NULL while empty */
    size_t len;
    size_t cap;
    size_t fields; /* fields appended so far */
    bool failed;   /* allocation failed: content is incomplete */
};

/** smartrest_line_init() - an empty line. Never fails. */
void smartrest_line_init(struct smartrest_line *line);

/** smartrest_line_deinit() - free the line's memory; it is empty again. */
void smartrest_line_deinit(struct smartrest_line *line);

/**
 * smartrest_needs_quotes() - whether @value (@len bytes) must be enclosed in
 * double quotes: it contains ',', '"', CR, LF, TAB or another control
 * character, or starts or ends with a space.
 */
bool smartrest_needs_quotes(const char *value, size_t len);

/**
 * smartrest_line_add() - append one field (a comma first unless it is the
 * first field), quoted and escaped as needed. @value is borrowed.
 *
 * Returns 0; -ENOMEM (also sets line->failed); -EINVAL with words in @err
 * when the value cannot be written safely: it contains a NUL byte, or it
 * must be quoted and ends with a backslash (the closing quote would read
 * as an escaped quote \" and the line would be misparsed).
 */
int smartrest_line_add(struct smartrest_line *line, const char *value, size_t len, char *err,
                       size_t err_len);

/** smartrest_line_add_str() - smartrest_line_add() for a C string. */
int smartrest_line_add_str(struct smartrest_line *line, const char *value, char *err,
                           size_t err_len);

/**
 * smartrest_encode() - encode @count fields into one line.
 * @out: receives a malloc'd NUL-terminated line (no line break), owned by
 *       the caller; @out_len (may be NULL) its length. Untouched on error.
 * Returns 0, -ENOMEM, or -EINVAL as smartrest_line_add() (@count == 0 too).
 */
int smartrest_encode(const char *const *fields, size_t count, char **out, size_t *out_len,
                     char *err, size_t err_len);

/* ------------------------------------------------------------------------ */
/* Parser                                                                   */

/* The decoded fields of one line. */
struct smartrest_record {
    size_t count;    /* number of fields; a line "100" has 1, "100," has 2 */
    char **fields;   /* count decoded NUL-terminated values, owned */
    size_t *lengths; /* their lengths */
};

/**
 * smartrest_parse_line() - split one line into decoded fields.
 * @line, @len: one line without its LF; a trailing CR (CR LF line ending) is
 *              ignored. Need not be NUL-terminated.
 * @out: filled on success; free with smartrest_record_free(). Zeroed on
 *       error.
 *
 * A field that starts with '"' is quoted: inside it \" and "" both stand for
 * one '"', any other character (also a backslash, CR or LF) is literal, and
 * the closing quote must be followed by ',' or the end of the line.
 *
 * Returns 0; -ENOMEM; -EINVAL with words in @err (1-based byte column) for
 * an unterminated quote, text after a closing quote, a '"' inside an
 * unquoted value, or a NUL byte.
 */
int smartrest_parse_line(const char *line, size_t len, struct smartrest_record *out, char *err,
                         size_t err_len);

/** smartrest_record_free() - free what smartrest_parse_line() filled in. */
void smartrest_record_free(struct smartrest_record *record);

/**
 * smartrest_next_line() - iterate over the lines of a multi-line payload.
 * @payload, @len: the whole payload.
 * @pos: cursor, start at 0; advanced past the line returned.
 * @line, @line_len: set to the next non-empty line, borrowed from @payload,
 *                   without its LF or a CR before it.
 *
 * Lines end at LF outside quotes: a quoted value may hold a line break
 * (Cumulocity's 511/513 examples), so a LF inside quotes does not split.
 * Empty lines (also a lone CR) are skipped.
 * Returns 1 when a line was found, 0 at the end of the payload.
 */
int smartrest_next_line(const char *payload, size_t len, size_t *pos, const char **line,
                        size_t *line_len);

/* ------------------------------------------------------------------------ */
/* Validation of lines going upstream                                       */

/**
 * smartrest_validate_line() - check one line before it is sent upstream.
 * @template_ids: true when the uplink has a custom template collection
 *                configured: then the message id may be any non-empty
 *                [A-Za-z0-9_-]+; otherwise it must be all digits
 *                (static templates such as 100, 200, 400, 501).
 *
 * The line must parse (smartrest_parse_line() rules), start with a bare (not
 * quoted) message id, and hold no raw control character outside quotes
 * (a final CR of a CR LF ending is allowed).
 * Returns 0, -ENOMEM, or -EINVAL with the reason in words in @err.
 */
int smartrest_validate_line(const char *line, size_t len, bool template_ids, char *err,
                            size_t err_len);

/* A list of owned lines, e.g. the result of splitting a payload or of
 * converting a JSON measurement. line[i]/len[i] plug straight into
 * smartrest_pack(). */
struct smartrest_lines {
    char **line; /* count NUL-terminated lines, owned, without line breaks */
    size_t *len;
    size_t count;
    size_t cap;
};

/** smartrest_lines_init() - an empty list. Never fails. */
void smartrest_lines_init(struct smartrest_lines *lines);

/** smartrest_lines_deinit() - free every line and the list; it is empty again. */
void smartrest_lines_deinit(struct smartrest_lines *lines);

/**
 * smartrest_lines_truncate() - free the lines from index @count on, so that
 * @count remain (undo of appends). Nothing happens when fewer are held.
 */
void smartrest_lines_truncate(struct smartrest_lines *lines, size_t count);

/** smartrest_lines_push() - append a copy of @text (@len bytes). 0 or -ENOMEM. */
int smartrest_lines_push(struct smartrest_lines *lines, const char *text, size_t len);

/**
 * smartrest_payload_split() - split a (multi-line) payload with
 * smartrest_next_line() and validate every line with
 * smartrest_validate_line(); append the lines to @out.
 *
 * All or nothing: on any error @out is left as it was, and @err names the
 * line number (1-based, counting the payload's lines) and the reason.
 * Returns the number of lines appended (>= 1), -ENOMEM, or -EINVAL (a bad
 * line, or no line at all).
 */
int smartrest_payload_split(const char *payload, size_t len, bool template_ids,
                            struct smartrest_lines *out, char *err, size_t err_len);

/* ------------------------------------------------------------------------ */
/* Packing lines into one PUBLISH                                           */

/**
 * smartrest_publish_size() - the size in bytes of the whole MQTT 3.1.1
 * PUBLISH packet carrying @payload_len bytes to a topic of @topic_len bytes
 * at @qos: fixed header (1 byte + 1..4 bytes of Remaining Length, §2.2.3),
 * topic name (2-byte length + bytes, §3.3.2.1), packet identifier (2 bytes,
 * only for QoS 1 and 2, §3.3.2.2), payload.
 * Returns 0 and sets @size; -EINVAL for a bad @qos or a topic longer than
 * 65535 bytes; -EMSGSIZE when the Remaining Length would exceed MQTT's
 * 268,435,455.
 */
int smartrest_publish_size(size_t topic_len, size_t payload_len, int qos, size_t *size);

/**
 * smartrest_max_payload() - the largest payload that keeps a PUBLISH to a
 * topic of @topic_len bytes at @qos within @max_packet bytes in all (e.g.
 * 16173 for s/us at QoS 1 and SMARTREST_MAX_PACKET). Use it as the
 * longest line a converter may produce (struct measure_options.max_line).
 * Returns 0 and sets @max; -EINVAL for a bad @qos or topic length;
 * -EMSGSIZE when not even an empty payload fits.
 */
int smartrest_max_payload(size_t topic_len, int qos, size_t max_packet, size_t *max);

/**
 * smartrest_pack() - join as many of @lines, from the first, as fit into one
 * PUBLISH to @topic at @qos whose whole packet is at most @max_packet bytes
 * (SMARTREST_MAX_PACKET for Cumulocity), separated by "\n".
 * @lines, @lens: @count queued lines (borrowed), without line breaks.
 * @taken: number of lines used (>= 1 on success, 0 on error).
 * @payload, @payload_len: the joined payload, malloc'd, owned by the caller
 *                         (NUL-terminated for convenience; the NUL is not
 *                         counted or sent).
 *
 * Returns 0; -ENOMEM; -EINVAL (@count == 0, bad @qos); -EMSGSIZE when the
 * first line cannot fit even alone: it must be refused, never sent (the
 * cloud would drop the connection); @err says how big it is and what fits.
 * The caller drops that line and calls again for the rest.
 */
int smartrest_pack(const char *topic, int qos, size_t max_packet, const char *const *lines,
                   const size_t *lens, size_t count, size_t *taken, char **payload,
                   size_t *payload_len, char *err, size_t err_len);

#endif
