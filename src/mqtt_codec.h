/* mqtt_codec.h - pure encode/decode of MQTT 3.1.1 packets (OASIS standard,
 * 29 October 2014). No I/O.
 *
 * Decoding never allocates: every string or blob in a decoded packet is a
 * borrowed slice (pointer + length, NOT NUL-terminated) into the caller's
 * input buffer, valid as long as that buffer is. Decoding is two steps:
 * mqtt_decode_fixed_header() frames a packet from a byte stream, then
 * mqtt_decode() (or one of the per-type decoders) checks the whole packet.
 *
 * Errors are negative errno values:
 *   -EAGAIN           the buffer holds only part of a packet; read more
 *   -EPROTO           malformed: the connection must be closed (§4.8)
 *   -EMSGSIZE         the packet is larger than the caller's limit
 *   -EPROTONOSUPPORT  CONNECT with a protocol name/level other than "MQTT"/4;
 *                     answer CONNACK 1 (§3.1.2.2) and close
 * Decoders also set *reason to a short static English string for logs
 * ("reserved flag bit set in CONNECT", ...); @reason may be NULL.
 *
 * Protocol versions: only MQTT 3.1.1 ("MQTT", level 4) is accepted. An MQTT
 * 3.1 client ("MQIsdp", level 3) gets -EPROTONOSUPPORT so the server answers
 * CONNACK 1 "unacceptable protocol version", which MQTT 3.1 clients also
 * understand, instead of a silent close.
 *
 * Encoders write into a caller buffer and never allocate. They return 0 and
 * the packet length in *len; with a NULL or too small buffer they return
 * -ENOBUFS and still set *len to the size needed, so the usual pattern is
 * "call with NULL, allocate *len bytes, call again". -EMSGSIZE when the
 * packet cannot be represented (remaining length > 268,435,455 or a string
 * longer than 65,535 bytes), -EINVAL for an invalid argument (e.g. QoS 3).
 */
#ifndef UPLINKD_MQTT_CODEC_H
#define UPLINKD_MQTT_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* §2.2.3: four length bytes of 7 bits each. */
#define MQTT_MAX_REMAINING_LENGTH 268435455u
/* Largest fixed header: one type byte + four length bytes. */
#define MQTT_MAX_FIXED_HEADER 5u

/* Control packet types, §2.2.1 Table 2.1. */
enum mqtt_packet_type {
    MQTT_CONNECT = 1,
    MQTT_CONNACK = 2,
    MQTT_PUBLISH = 3,
    MQTT_PUBACK = 4,
    MQTT_PUBREC = 5,
    MQTT_PUBREL = 6,
    MQTT_PUBCOMP = 7,
    MQTT_SUBSCRIBE = 8,
    MQTT_SUBACK = 9,
    MQTT_UNSUBSCRIBE = 10,
    MQTT_UNSUBACK = 11,
    MQTT_PINGREQ = 12,
    MQTT_PINGRESP = 13,
    MQTT_DISCONNECT = 14,
};

/* CONNACK return codes, §3.2.2.3 Table 3.1. */
enum mqtt_connack_code {
    MQTT_CONNACK_ACCEPTED = 0,
    MQTT_CONNACK_BAD_PROTOCOL = 1,
    MQTT_CONNACK_ID_REJECTED = 2,
    MQTT_CONNACK_SERVER_UNAVAILABLE = 3,
    MQTT_CONNACK_BAD_CREDENTIALS = 4,
    MQTT_CONNACK_NOT_AUTHORIZED = 5,
};

/* SUBACK return code for a refused filter, §3.9.3. */
#define MQTT_SUBACK_FAILURE 0x80

/* A borrowed slice of the input buffer; not NUL-terminated. */
struct mqtt_slice {
    const uint8_t *data;
    size_t len;
};

struct mqtt_fixed_header {
    uint8_t type;            /* enum mqtt_packet_type */
    uint8_t flags;           /* low nibble of the first byte */
    size_t remaining_length; /* bytes after the fixed header */
    size_t header_len;       /* 2..5: bytes of the fixed header itself */
};

struct mqtt_connect {
    uint8_t protocol_level; /* 4 */
    bool clean_session;
    uint16_t keepalive_s;        /* 0 = no keepalive (§3.1.2.10) */
    struct mqtt_slice client_id; /* may be empty (§3.1.3-6) */
    bool will;
    uint8_t will_qos;
    bool will_retain;
    struct mqtt_slice will_topic;   /* valid topic name when will is set */
    struct mqtt_slice will_payload; /* binary */
    bool has_username;
    struct mqtt_slice username;
    bool has_password;
    struct mqtt_slice password; /* binary */
};

struct mqtt_publish {
    bool dup;
    uint8_t qos;
    bool retain;
    struct mqtt_slice topic; /* valid topic name: UTF-8, no wildcards, non-empty */
    uint16_t packet_id;      /* 0 for QoS 0, non-zero otherwise (§2.3.1) */
    struct mqtt_slice payload;
};

/* SUBSCRIBE / UNSUBSCRIBE: the list itself stays in the buffer; walk it with
 * mqtt_subscribe_next() / mqtt_unsubscribe_next(). The decoder has already
 * checked every entry. */
struct mqtt_subscribe {
    uint16_t packet_id;
    size_t count;             /* number of filters, >= 1 (§3.8.3-3, §3.10.3-2) */
    struct mqtt_slice topics; /* the payload, for the iterators */
};

struct mqtt_packet {
    uint8_t type; /* enum mqtt_packet_type */
    union {
        struct mqtt_connect connect;
        struct mqtt_publish publish;
        uint16_t packet_id;                /* PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK */
        struct mqtt_subscribe subscribe;   /* SUBSCRIBE */
        struct mqtt_subscribe unsubscribe; /* UNSUBSCRIBE (count = filters) */
        struct {
            bool session_present;
            uint8_t code;
        } connack;
        struct {
            uint16_t packet_id;
            size_t count;
            const uint8_t *codes; /* borrowed, count bytes */
        } suback;
    } u;
};

/* Iterator state for the SUBSCRIBE / UNSUBSCRIBE lists; zero-initialise. */
struct mqtt_topic_iter {
    size_t offset;
};

/**
 * mqtt_utf8_check() - §1.5.3 UTF-8 string rules: well-formed UTF-8 (RFC 3629:
 * no overlong forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF)
 * and no U+0000. Control characters and non-characters are allowed (the
 * spec says SHOULD NOT / MUST NOT be rejected respectively).
 * Returns 0 or -EPROTO.
 */
int mqtt_utf8_check(const uint8_t *s, size_t len);

/**
 * mqtt_decode_fixed_header() - frame one packet at the start of @buf.
 * @max_packet: largest whole packet (fixed header + remaining length) the
 *              caller accepts; 0 means the protocol maximum.
 *
 * Returns 0 with @out filled when the header is complete (the body may still
 * be incomplete: the packet is out->header_len + out->remaining_length bytes),
 * -EAGAIN when more bytes are needed to read the header, -EPROTO for a
 * remaining length longer than four bytes (§2.2.3) or a reserved packet type
 * (0 or 15), -EMSGSIZE when the packet exceeds @max_packet (known as soon as
 * the length is decoded, so the caller never buffers it).
 */
int mqtt_decode_fixed_header(const uint8_t *buf, size_t len, size_t max_packet,
                             struct mqtt_fixed_header *out, const char **reason);

/**
 * mqtt_decode() - decode one whole packet at the start of @buf.
 * @consumed: set to the packet's total length on success.
 *
 * Frames the packet (as mqtt_decode_fixed_header(), including -EAGAIN when
 * the body is incomplete) and checks it completely: fixed-header flags
 * (§2.2.2), lengths, strings, and the per-type rules documented in the
 * per-type decoders below. On success every slice in @out points into @buf.
 * Server-to-client types (CONNACK, SUBACK, UNSUBACK, PINGRESP) decode too, for
 * tests and tools.
 */
int mqtt_decode(const uint8_t *buf, size_t len, size_t max_packet, struct mqtt_packet *out,
                size_t *consumed, const char **reason);

/**
 * mqtt_decode_connect() - CONNECT body (§3.1). @body is the variable header +
 * payload, @len its length (the remaining length), @flags the fixed-header
 * flags (must be 0). Checks: protocol name and level (-EPROTONOSUPPORT, see
 * above), reserved connect flag bit 0 (§3.1.2-3), will flags consistency
 * (§3.1.2-11..15: no will => will QoS and retain 0; will QoS <= 2), password
 * flag without username flag (§3.1.2-22), UTF-8 strings (§1.5.3), will topic
 * a valid topic name, no trailing bytes.
 */
int mqtt_decode_connect(uint8_t flags, const uint8_t *body, size_t len, struct mqtt_connect *out,
                        const char **reason);

/**
 * mqtt_decode_publish() - PUBLISH body (§3.3). QoS 3 is malformed
 * (§3.3.1-4); DUP with QoS 0 is tolerated (§3.3.1-2 binds the sender and
 * the flag carries no meaning for the receiver). The topic must be a
 * non-empty UTF-8 topic name without wildcards (§3.3.2-2, §4.7.3), the packet
 * id non-zero for QoS > 0 (§2.3.1-1).
 */
int mqtt_decode_publish(uint8_t flags, const uint8_t *body, size_t len, struct mqtt_publish *out,
                        const char **reason);

/**
 * mqtt_decode_subscribe() - SUBSCRIBE body (§3.8): flags 0b0010 (§3.8.1-1),
 * non-zero packet id, at least one filter (§3.8.3-3), each filter non-empty
 * UTF-8 (§4.7.3) with requested QoS <= 2 and reserved bits 0 (§3.8.3-4).
 * Wildcard placement is NOT checked here: the server answers a misplaced
 * wildcard with a SUBACK failure code for that filter (topic_filter_check()).
 */
int mqtt_decode_subscribe(uint8_t flags, const uint8_t *body, size_t len,
                          struct mqtt_subscribe *out, const char **reason);

/**
 * mqtt_decode_unsubscribe() - UNSUBSCRIBE body (§3.10): flags 0b0010
 * (§3.10.1-1), non-zero packet id, at least one non-empty UTF-8 filter
 * (§3.10.3-2).
 */
int mqtt_decode_unsubscribe(uint8_t flags, const uint8_t *body, size_t len,
                            struct mqtt_subscribe *out, const char **reason);

/**
 * mqtt_subscribe_next() - next (filter, requested QoS) of a decoded
 * SUBSCRIBE. Returns true and fills @filter/@qos, or false at the end.
 */
bool mqtt_subscribe_next(const struct mqtt_subscribe *sub, struct mqtt_topic_iter *iter,
                         struct mqtt_slice *filter, uint8_t *qos);

/** mqtt_unsubscribe_next() - next filter of a decoded UNSUBSCRIBE. */
bool mqtt_unsubscribe_next(const struct mqtt_subscribe *unsub, struct mqtt_topic_iter *iter,
                           struct mqtt_slice *filter);

/** mqtt_packet_type_name() - "CONNECT", "PUBLISH", ... ("reserved" otherwise). */
const char *mqtt_packet_type_name(uint8_t type);

/* --- Encoders (see the contract at the top of this file) --- */

/** mqtt_encode_connack() - CONNACK (§3.2); @code an enum mqtt_connack_code. */
int mqtt_encode_connack(uint8_t *buf, size_t cap, bool session_present, uint8_t code, size_t *len);

/**
 * mqtt_encode_publish() - PUBLISH (§3.3). @topic is @topic_len bytes (not
 * checked for wildcards: the caller owns that); @packet_id is ignored for
 * QoS 0 and must be non-zero otherwise (-EINVAL).
 */
int mqtt_encode_publish(uint8_t *buf, size_t cap, const char *topic, size_t topic_len,
                        const void *payload, size_t payload_len, uint8_t qos, bool retain, bool dup,
                        uint16_t packet_id, size_t *len);

/**
 * mqtt_encode_ack() - the 4-byte packets carrying only a packet id: PUBACK,
 * PUBREC, PUBREL (flags 0b0010, §3.6.1-1), PUBCOMP, UNSUBACK. -EINVAL for any
 * other @type.
 */
int mqtt_encode_ack(uint8_t *buf, size_t cap, uint8_t type, uint16_t packet_id, size_t *len);

/** mqtt_encode_suback() - SUBACK (§3.9) with @count return codes. */
int mqtt_encode_suback(uint8_t *buf, size_t cap, uint16_t packet_id, const uint8_t *codes,
                       size_t count, size_t *len);

/** mqtt_encode_simple() - PINGREQ, PINGRESP or DISCONNECT (2 bytes). */
int mqtt_encode_simple(uint8_t *buf, size_t cap, uint8_t type, size_t *len);

/**
 * mqtt_encode_connect() - CONNECT (§3.1), "MQTT" level 4. For tests and tools.
 * Fields of @c whose has_/will flag is false are ignored.
 */
int mqtt_encode_connect(uint8_t *buf, size_t cap, const struct mqtt_connect *c, size_t *len);

/**
 * mqtt_encode_subscribe() - SUBSCRIBE (§3.8) with @count filters (each a
 * NUL-terminated string) and their QoS. For tests and tools.
 */
int mqtt_encode_subscribe(uint8_t *buf, size_t cap, uint16_t packet_id, const char *const *filters,
                          const uint8_t *qos, size_t count, size_t *len);

/** mqtt_encode_unsubscribe() - UNSUBSCRIBE (§3.10). For tests and tools. */
int mqtt_encode_unsubscribe(uint8_t *buf, size_t cap, uint16_t packet_id,
                            const char *const *filters, size_t count, size_t *len);

#endif
