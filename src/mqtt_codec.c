/* mqtt_codec.c - MQTT 3.1.1 encode/decode (see mqtt_codec.h for the contract). */
#include "mqtt_codec.h"

#include <errno.h>
#include <string.h>

/* Set *reason (when asked) and return the error; keeps decoders one-liners. */
static int fail(const char **reason, int err, const char *why)
{
    if (reason)
        *reason = why;
    return err;
}

int mqtt_utf8_check(const uint8_t *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint8_t c = s[i];
        size_t extra;
        uint32_t cp, min;

        if (c == 0)
            return -EPROTO; /* §1.5.3-2: U+0000 is not allowed */
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            extra = 1;
            cp = c & 0x1F;
            min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            extra = 2;
            cp = c & 0x0F;
            min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            extra = 3;
            cp = c & 0x07;
            min = 0x10000;
        } else {
            return -EPROTO; /* continuation byte or 0xF8..0xFF as a lead byte */
        }
        if (len - i <= extra)
            return -EPROTO; /* truncated sequence */
        for (size_t k = 1; k <= extra; k++) {
            uint8_t b = s[i + k];
            if ((b & 0xC0) != 0x80)
                return -EPROTO;
            cp = (cp << 6) | (b & 0x3F);
        }
        /* §1.5.3-1: ill-formed includes overlong forms (which would smuggle
         * U+0000 as C0 80) and UTF-16 surrogates. */
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -EPROTO;
        i += extra + 1;
    }
    return 0;
}

/* --- Decoding -------------------------------------------------------------- */

struct reader {
    const uint8_t *data;
    size_t len;
    size_t off;
};

static size_t reader_left(const struct reader *r)
{
    return r->len - r->off;
}

static int read_u8(struct reader *r, uint8_t *out)
{
    if (reader_left(r) < 1)
        return -EPROTO;
    *out = r->data[r->off++];
    return 0;
}

static int read_u16(struct reader *r, uint16_t *out)
{
    if (reader_left(r) < 2)
        return -EPROTO;
    *out = (uint16_t)((r->data[r->off] << 8) | r->data[r->off + 1]);
    r->off += 2;
    return 0;
}

/* §1.5.3 / §3.1.3.3: two-byte length followed by that many bytes. */
static int read_binary(struct reader *r, struct mqtt_slice *out)
{
    uint16_t n;

    if (read_u16(r, &n) < 0 || reader_left(r) < n)
        return -EPROTO;
    out->data = r->data + r->off;
    out->len = n;
    r->off += n;
    return 0;
}

static int read_string(struct reader *r, struct mqtt_slice *out)
{
    if (read_binary(r, out) < 0)
        return -EPROTO;
    return mqtt_utf8_check(out->data, out->len);
}

static bool slice_has_wildcard(const struct mqtt_slice *s)
{
    return memchr(s->data, '+', s->len) || memchr(s->data, '#', s->len);
}

static bool slice_equals(const struct mqtt_slice *s, const char *text)
{
    size_t n = strlen(text);
    return s->len == n && memcmp(s->data, text, n) == 0;
}

const char *mqtt_packet_type_name(uint8_t type)
{
    static const char *const names[] = {
        [MQTT_CONNECT] = "CONNECT",   [MQTT_CONNACK] = "CONNACK",
        [MQTT_PUBLISH] = "PUBLISH",   [MQTT_PUBACK] = "PUBACK",
        [MQTT_PUBREC] = "PUBREC",     [MQTT_PUBREL] = "PUBREL",
        [MQTT_PUBCOMP] = "PUBCOMP",   [MQTT_SUBSCRIBE] = "SUBSCRIBE",
        [MQTT_SUBACK] = "SUBACK",     [MQTT_UNSUBSCRIBE] = "UNSUBSCRIBE",
        [MQTT_UNSUBACK] = "UNSUBACK", [MQTT_PINGREQ] = "PINGREQ",
        [MQTT_PINGRESP] = "PINGRESP", [MQTT_DISCONNECT] = "DISCONNECT",
    };
    if (type < sizeof(names) / sizeof(names[0]) && names[type])
        return names[type];
    return "reserved";
}

int mqtt_decode_fixed_header(const uint8_t *buf, size_t len, size_t max_packet,
                             struct mqtt_fixed_header *out, const char **reason)
{
    size_t value = 0, multiplier = 1;

    if (len < 1)
        return fail(reason, -EAGAIN, "need more bytes");
    out->type = buf[0] >> 4;
    out->flags = buf[0] & 0x0F;
    /* §2.2.1: 0 and 15 are reserved (15 is AUTH only in MQTT 5). */
    if (out->type == 0 || out->type == 15)
        return fail(reason, -EPROTO, "reserved packet type");
    /* §2.2.3: up to four bytes, 7 bits each, least significant first. */
    for (size_t i = 1; i <= 4; i++) {
        if (i >= len)
            return fail(reason, -EAGAIN, "need more bytes");
        value += (size_t)(buf[i] & 0x7F) * multiplier;
        if (!(buf[i] & 0x80)) {
            out->remaining_length = value;
            out->header_len = i + 1;
            if (max_packet && out->header_len + value > max_packet)
                return fail(reason, -EMSGSIZE, "packet larger than the configured maximum");
            return 0;
        }
        multiplier *= 128;
    }
    return fail(reason, -EPROTO, "remaining length longer than 4 bytes");
}

int mqtt_decode_connect(uint8_t flags, const uint8_t *body, size_t len, struct mqtt_connect *out,
                        const char **reason)
{
    struct reader r = {.data = body, .len = len};
    struct mqtt_slice name;
    uint8_t connect_flags;

    memset(out, 0, sizeof(*out));
    if (flags != 0)
        return fail(reason, -EPROTO, "CONNECT fixed-header flags not 0 (§2.2.2)");
    if (read_binary(&r, &name) < 0 || read_u8(&r, &out->protocol_level) < 0)
        return fail(reason, -EPROTO, "CONNECT truncated in the protocol name/level");
    if (slice_equals(&name, "MQTT")) {
        if (out->protocol_level != 4)
            return fail(reason, -EPROTONOSUPPORT, "unsupported MQTT protocol level (§3.1.2.2)");
    } else if (slice_equals(&name, "MQIsdp")) {
        return fail(reason, -EPROTONOSUPPORT, "MQTT 3.1 (MQIsdp) is not supported");
    } else {
        return fail(reason, -EPROTO, "unknown protocol name (§3.1.2-1)");
    }
    if (read_u8(&r, &connect_flags) < 0 || read_u16(&r, &out->keepalive_s) < 0)
        return fail(reason, -EPROTO, "CONNECT truncated in the variable header");
    if (connect_flags & 0x01)
        return fail(reason, -EPROTO, "CONNECT reserved flag bit set (§3.1.2-3)");
    out->clean_session = connect_flags & 0x02;
    out->will = connect_flags & 0x04;
    out->will_qos = (connect_flags >> 3) & 0x03;
    out->will_retain = connect_flags & 0x20;
    out->has_password = connect_flags & 0x40;
    out->has_username = connect_flags & 0x80;
    if (!out->will && (out->will_qos || out->will_retain))
        return fail(reason, -EPROTO, "will QoS/retain set without will flag (§3.1.2-13/15)");
    if (out->will_qos == 3)
        return fail(reason, -EPROTO, "will QoS 3 (§3.1.2-14)");
    if (out->has_password && !out->has_username)
        return fail(reason, -EPROTO, "password flag without username flag (§3.1.2-22)");

    /* §3.1.3: payload fields in this order, each present iff flagged. */
    if (read_string(&r, &out->client_id) < 0)
        return fail(reason, -EPROTO, "client id missing or not valid UTF-8 (§3.1.3-4)");
    if (out->will) {
        if (read_string(&r, &out->will_topic) < 0)
            return fail(reason, -EPROTO, "will topic missing or not valid UTF-8");
        if (out->will_topic.len == 0 || slice_has_wildcard(&out->will_topic))
            return fail(reason, -EPROTO, "will topic empty or has wildcards (§4.7)");
        if (read_binary(&r, &out->will_payload) < 0)
            return fail(reason, -EPROTO, "will message missing");
    }
    if (out->has_username && read_string(&r, &out->username) < 0)
        return fail(reason, -EPROTO, "user name missing or not valid UTF-8 (§3.1.3-11)");
    if (out->has_password && read_binary(&r, &out->password) < 0)
        return fail(reason, -EPROTO, "password missing");
    if (reader_left(&r))
        return fail(reason, -EPROTO, "trailing bytes after CONNECT payload");
    return 0;
}

int mqtt_decode_publish(uint8_t flags, const uint8_t *body, size_t len, struct mqtt_publish *out,
                        const char **reason)
{
    struct reader r = {.data = body, .len = len};

    memset(out, 0, sizeof(*out));
    out->dup = flags & 0x08;
    out->qos = (flags >> 1) & 0x03;
    out->retain = flags & 0x01;
    if (out->qos == 3)
        return fail(reason, -EPROTO, "PUBLISH with QoS 3 (§3.3.1-4)");
    if (read_string(&r, &out->topic) < 0)
        return fail(reason, -EPROTO, "PUBLISH topic missing or not valid UTF-8");
    if (out->topic.len == 0)
        return fail(reason, -EPROTO, "PUBLISH topic empty (§4.7.3-1)");
    if (slice_has_wildcard(&out->topic))
        return fail(reason, -EPROTO, "PUBLISH topic contains a wildcard (§3.3.2-2)");
    if (out->qos > 0) {
        if (read_u16(&r, &out->packet_id) < 0)
            return fail(reason, -EPROTO, "PUBLISH truncated in the packet id");
        if (out->packet_id == 0)
            return fail(reason, -EPROTO, "PUBLISH QoS>0 with packet id 0 (§2.3.1-1)");
    }
    /* The payload is whatever is left, possibly nothing (§3.3.3). */
    out->payload.data = body + r.off;
    out->payload.len = reader_left(&r);
    return 0;
}

/* Shared by SUBSCRIBE and UNSUBSCRIBE: @with_qos says whether each filter is
 * followed by a requested-QoS byte. */
static int decode_topic_list(uint8_t flags, const uint8_t *body, size_t len, bool with_qos,
                             struct mqtt_subscribe *out, const char **reason)
{
    struct reader r = {.data = body, .len = len};

    memset(out, 0, sizeof(*out));
    if (flags != 0x02)
        return fail(reason, -EPROTO,
                    with_qos ? "SUBSCRIBE flags not 0b0010 (§3.8.1-1)"
                             : "UNSUBSCRIBE flags not 0b0010 (§3.10.1-1)");
    if (read_u16(&r, &out->packet_id) < 0)
        return fail(reason, -EPROTO, "truncated packet id");
    if (out->packet_id == 0)
        return fail(reason, -EPROTO, "packet id 0 (§2.3.1-1)");
    out->topics.data = body + r.off;
    out->topics.len = reader_left(&r);
    while (reader_left(&r)) {
        struct mqtt_slice filter;
        uint8_t qos;

        if (read_string(&r, &filter) < 0)
            return fail(reason, -EPROTO, "topic filter truncated or not valid UTF-8");
        if (filter.len == 0)
            return fail(reason, -EPROTO, "empty topic filter (§4.7.3-1)");
        if (with_qos) {
            if (read_u8(&r, &qos) < 0)
                return fail(reason, -EPROTO, "requested QoS missing");
            if (qos & 0xFC)
                return fail(reason, -EPROTO, "requested QoS reserved bits set (§3.8.3-4)");
            if (qos > 2)
                return fail(reason, -EPROTO, "requested QoS 3 (§3.8.3-4)");
        }
        out->count++;
    }
    if (out->count == 0)
        return fail(reason, -EPROTO,
                    with_qos ? "SUBSCRIBE without topic filters (§3.8.3-3)"
                             : "UNSUBSCRIBE without topic filters (§3.10.3-2)");
    return 0;
}

int mqtt_decode_subscribe(uint8_t flags, const uint8_t *body, size_t len,
                          struct mqtt_subscribe *out, const char **reason)
{
    return decode_topic_list(flags, body, len, true, out, reason);
}

int mqtt_decode_unsubscribe(uint8_t flags, const uint8_t *body, size_t len,
                            struct mqtt_subscribe *out, const char **reason)
{
    return decode_topic_list(flags, body, len, false, out, reason);
}

/* The list was fully checked by decode_topic_list(), so plain reads suffice. */
static bool topic_list_next(const struct mqtt_subscribe *sub, struct mqtt_topic_iter *iter,
                            bool with_qos, struct mqtt_slice *filter, uint8_t *qos)
{
    struct reader r = {.data = sub->topics.data, .len = sub->topics.len, .off = iter->offset};

    if (reader_left(&r) == 0 || read_binary(&r, filter) < 0)
        return false;
    if (with_qos && read_u8(&r, qos) < 0)
        return false;
    iter->offset = r.off;
    return true;
}

bool mqtt_subscribe_next(const struct mqtt_subscribe *sub, struct mqtt_topic_iter *iter,
                         struct mqtt_slice *filter, uint8_t *qos)
{
    return topic_list_next(sub, iter, true, filter, qos);
}

bool mqtt_unsubscribe_next(const struct mqtt_subscribe *unsub, struct mqtt_topic_iter *iter,
                           struct mqtt_slice *filter)
{
    return topic_list_next(unsub, iter, false, filter, NULL);
}

/* §2.2.2 Table 2.2: fixed flags for every type except PUBLISH. */
static int check_fixed_flags(uint8_t type, uint8_t flags)
{
    uint8_t expected = 0;

    if (type == MQTT_PUBLISH)
        return 0;
    if (type == MQTT_PUBREL || type == MQTT_SUBSCRIBE || type == MQTT_UNSUBSCRIBE)
        expected = 0x02;
    return flags == expected ? 0 : -EPROTO;
}

static int decode_packet_id_only(const uint8_t *body, size_t len, uint16_t *id, const char **reason)
{
    if (len != 2)
        return fail(reason, -EPROTO, "acknowledgement remaining length not 2");
    *id = (uint16_t)((body[0] << 8) | body[1]);
    if (*id == 0)
        return fail(reason, -EPROTO, "packet id 0 (§2.3.1-1)");
    return 0;
}

int mqtt_decode(const uint8_t *buf, size_t len, size_t max_packet, struct mqtt_packet *out,
                size_t *consumed, const char **reason)
{
    struct mqtt_fixed_header fh;
    const uint8_t *body;
    size_t n;
    int rc;

    rc = mqtt_decode_fixed_header(buf, len, max_packet, &fh, reason);
    if (rc < 0)
        return rc;
    if (len - fh.header_len < fh.remaining_length)
        return fail(reason, -EAGAIN, "need more bytes");
    if (check_fixed_flags(fh.type, fh.flags) < 0)
        return fail(reason, -EPROTO, "reserved fixed-header flags set (§2.2.2-2)");
    body = buf + fh.header_len;
    n = fh.remaining_length;
    memset(out, 0, sizeof(*out));
    out->type = fh.type;

    switch (fh.type) {
    case MQTT_CONNECT:
        rc = mqtt_decode_connect(fh.flags, body, n, &out->u.connect, reason);
        break;
    case MQTT_CONNACK:
        if (n != 2)
            return fail(reason, -EPROTO, "CONNACK remaining length not 2");
        if (body[0] & 0xFE)
            return fail(reason, -EPROTO, "CONNACK reserved flags set (§3.2.2.1)");
        if (body[1] > MQTT_CONNACK_NOT_AUTHORIZED)
            return fail(reason, -EPROTO, "CONNACK reserved return code");
        out->u.connack.session_present = body[0] & 0x01;
        out->u.connack.code = body[1];
        rc = 0;
        break;
    case MQTT_PUBLISH:
        rc = mqtt_decode_publish(fh.flags, body, n, &out->u.publish, reason);
        break;
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBREL:
    case MQTT_PUBCOMP:
    case MQTT_UNSUBACK:
        rc = decode_packet_id_only(body, n, &out->u.packet_id, reason);
        break;
    case MQTT_SUBSCRIBE:
        rc = mqtt_decode_subscribe(fh.flags, body, n, &out->u.subscribe, reason);
        break;
    case MQTT_SUBACK:
        if (n < 3)
            return fail(reason, -EPROTO, "SUBACK without return codes");
        out->u.suback.packet_id = (uint16_t)((body[0] << 8) | body[1]);
        out->u.suback.codes = body + 2;
        out->u.suback.count = n - 2;
        for (size_t i = 2; i < n; i++)
            if (body[i] > 2 && body[i] != MQTT_SUBACK_FAILURE)
                return fail(reason, -EPROTO, "SUBACK reserved return code (§3.9.3-2)");
        rc = 0;
        break;
    case MQTT_UNSUBSCRIBE:
        rc = mqtt_decode_unsubscribe(fh.flags, body, n, &out->u.unsubscribe, reason);
        break;
    case MQTT_PINGREQ:
    case MQTT_PINGRESP:
    case MQTT_DISCONNECT:
        rc = n == 0 ? 0 : fail(reason, -EPROTO, "remaining length not 0");
        break;
    default:
        rc = fail(reason, -EPROTO, "reserved packet type");
        break;
    }
    if (rc < 0)
        return rc;
    *consumed = fh.header_len + n;
    return 0;
}

/* --- Encoding -------------------------------------------------------------- */

struct writer {
    uint8_t *p;
};

static void put_u8(struct writer *w, uint8_t v)
{
    *w->p++ = v;
}

static void put_u16(struct writer *w, uint16_t v)
{
    *w->p++ = (uint8_t)(v >> 8);
    *w->p++ = (uint8_t)v;
}

static void put_bytes(struct writer *w, const void *data, size_t len)
{
    if (len)
        memcpy(w->p, data, len);
    w->p += len;
}

/* Length-prefixed; the caller checked len <= 65535. */
static void put_binary(struct writer *w, const void *data, size_t len)
{
    put_u16(w, (uint16_t)len);
    put_bytes(w, data, len);
}

static size_t remaining_length_size(size_t value)
{
    if (value < 128)
        return 1;
    if (value < 16384)
        return 2;
    if (value < 2097152)
        return 3;
    return 4;
}

static void put_remaining_length(struct writer *w, size_t value)
{
    do {
        uint8_t b = value % 128;
        value /= 128;
        if (value)
            b |= 0x80;
        put_u8(w, b);
    } while (value);
}

/*
 * Common prologue: check the body fits the protocol and the buffer, set *len,
 * and write the fixed header. Returns 0 with @w positioned at the body.
 */
static int begin_packet(uint8_t *buf, size_t cap, uint8_t first_byte, size_t body_len,
                        struct writer *w, size_t *len)
{
    if (body_len > MQTT_MAX_REMAINING_LENGTH)
        return -EMSGSIZE;
    *len = 1 + remaining_length_size(body_len) + body_len;
    if (!buf || cap < *len)
        return -ENOBUFS;
    w->p = buf;
    put_u8(w, first_byte);
    put_remaining_length(w, body_len);
    return 0;
}

int mqtt_encode_connack(uint8_t *buf, size_t cap, bool session_present, uint8_t code, size_t *len)
{
    struct writer w;
    int rc;

    if (code > MQTT_CONNACK_NOT_AUTHORIZED)
        return -EINVAL;
    rc = begin_packet(buf, cap, MQTT_CONNACK << 4, 2, &w, len);
    if (rc < 0)
        return rc;
    put_u8(&w, session_present ? 1 : 0);
    put_u8(&w, code);
    return 0;
}

int mqtt_encode_publish(uint8_t *buf, size_t cap, const char *topic, size_t topic_len,
                        const void *payload, size_t payload_len, uint8_t qos, bool retain, bool dup,
                        uint16_t packet_id, size_t *len)
{
    struct writer w;
    size_t body;
    uint8_t first;
    int rc;

    if (qos > 2 || (qos > 0 && packet_id == 0))
        return -EINVAL;
    if (topic_len > UINT16_MAX)
        return -EMSGSIZE;
    body = 2 + topic_len + (qos ? 2 : 0);
    if (payload_len > MQTT_MAX_REMAINING_LENGTH - body)
        return -EMSGSIZE;
    body += payload_len;
    first = (uint8_t)(MQTT_PUBLISH << 4 | (dup ? 0x08 : 0) | qos << 1 | (retain ? 0x01 : 0));
    rc = begin_packet(buf, cap, first, body, &w, len);
    if (rc < 0)
        return rc;
    put_binary(&w, topic, topic_len);
    if (qos)
        put_u16(&w, packet_id);
    put_bytes(&w, payload, payload_len);
    return 0;
}

int mqtt_encode_ack(uint8_t *buf, size_t cap, uint8_t type, uint16_t packet_id, size_t *len)
{
    struct writer w;
    uint8_t first;
    int rc;

    switch (type) {
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBCOMP:
    case MQTT_UNSUBACK:
        first = (uint8_t)(type << 4);
        break;
    case MQTT_PUBREL:
        first = (uint8_t)(type << 4 | 0x02); /* §3.6.1-1 */
        break;
    default:
        return -EINVAL;
    }
    rc = begin_packet(buf, cap, first, 2, &w, len);
    if (rc < 0)
        return rc;
    put_u16(&w, packet_id);
    return 0;
}

int mqtt_encode_suback(uint8_t *buf, size_t cap, uint16_t packet_id, const uint8_t *codes,
                       size_t count, size_t *len)
{
    struct writer w;
    int rc;

    if (count == 0)
        return -EINVAL;
    if (count > MQTT_MAX_REMAINING_LENGTH - 2)
        return -EMSGSIZE;
    rc = begin_packet(buf, cap, MQTT_SUBACK << 4, 2 + count, &w, len);
    if (rc < 0)
        return rc;
    put_u16(&w, packet_id);
    put_bytes(&w, codes, count);
    return 0;
}

int mqtt_encode_simple(uint8_t *buf, size_t cap, uint8_t type, size_t *len)
{
    struct writer w;

    if (type != MQTT_PINGREQ && type != MQTT_PINGRESP && type != MQTT_DISCONNECT)
        return -EINVAL;
    return begin_packet(buf, cap, (uint8_t)(type << 4), 0, &w, len);
}

int mqtt_encode_connect(uint8_t *buf, size_t cap, const struct mqtt_connect *c, size_t *len)
{
    struct writer w;
    size_t body = 10 + 2 + c->client_id.len; /* name(6) level flags keepalive(2) + id */
    uint8_t flags = 0;
    int rc;

    if (c->client_id.len > UINT16_MAX)
        return -EMSGSIZE;
    if (c->will) {
        if (c->will_qos > 2)
            return -EINVAL;
        if (c->will_topic.len > UINT16_MAX || c->will_payload.len > UINT16_MAX)
            return -EMSGSIZE;
        body += 2 + c->will_topic.len + 2 + c->will_payload.len;
        flags |= (uint8_t)(0x04 | c->will_qos << 3 | (c->will_retain ? 0x20 : 0));
    }
    if (c->has_username) {
        if (c->username.len > UINT16_MAX)
            return -EMSGSIZE;
        body += 2 + c->username.len;
        flags |= 0x80;
    }
    if (c->has_password) {
        if (c->password.len > UINT16_MAX)
            return -EMSGSIZE;
        body += 2 + c->password.len;
        flags |= 0x40;
    }
    if (c->clean_session)
        flags |= 0x02;
    rc = begin_packet(buf, cap, MQTT_CONNECT << 4, body, &w, len);
    if (rc < 0)
        return rc;
    put_binary(&w, "MQTT", 4);
    put_u8(&w, 4);
    put_u8(&w, flags);
    put_u16(&w, c->keepalive_s);
    put_binary(&w, c->client_id.data, c->client_id.len);
    if (c->will) {
        put_binary(&w, c->will_topic.data, c->will_topic.len);
        put_binary(&w, c->will_payload.data, c->will_payload.len);
    }
    if (c->has_username)
        put_binary(&w, c->username.data, c->username.len);
    if (c->has_password)
        put_binary(&w, c->password.data, c->password.len);
    return 0;
}

static int encode_topic_list(uint8_t *buf, size_t cap, uint8_t type, uint16_t packet_id,
                             const char *const *filters, const uint8_t *qos, size_t count,
                             size_t *len)
{
    struct writer w;
    size_t body = 2;
    int rc;

    if (count == 0 || packet_id == 0)
        return -EINVAL;
    for (size_t i = 0; i < count; i++) {
        size_t n = strlen(filters[i]);
        if (n > UINT16_MAX)
            return -EMSGSIZE;
        if (qos && qos[i] > 2)
            return -EINVAL;
        body += 2 + n + (qos ? 1 : 0);
    }
    rc = begin_packet(buf, cap, (uint8_t)(type << 4 | 0x02), body, &w, len);
    if (rc < 0)
        return rc;
    put_u16(&w, packet_id);
    for (size_t i = 0; i < count; i++) {
        put_binary(&w, filters[i], strlen(filters[i]));
        if (qos)
            put_u8(&w, qos[i]);
    }
    return 0;
}

int mqtt_encode_subscribe(uint8_t *buf, size_t cap, uint16_t packet_id, const char *const *filters,
                          const uint8_t *qos, size_t count, size_t *len)
{
    if (!qos)
        return -EINVAL;
    return encode_topic_list(buf, cap, MQTT_SUBSCRIBE, packet_id, filters, qos, count, len);
}

int mqtt_encode_unsubscribe(uint8_t *buf, size_t cap, uint16_t packet_id,
                            const char *const *filters, size_t count, size_t *len)
{
    return encode_topic_list(buf, cap, MQTT_UNSUBSCRIBE, packet_id, filters, NULL, count, len);
}
