/* test_codec.c - MQTT 3.1.1 codec: round trips, framing, malformed input. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mqtt_codec.h"

#define BUF_SIZE 4096

static struct mqtt_slice slice(const char *s)
{
    return (struct mqtt_slice){.data = (const uint8_t *)s, .len = strlen(s)};
}

static bool slice_is(struct mqtt_slice s, const char *text)
{
    return s.len == strlen(text) && memcmp(s.data, text, s.len) == 0;
}

/* Decode a whole packet that must be valid and consume exactly @len bytes. */
static void decode_ok(const uint8_t *buf, size_t len, struct mqtt_packet *pkt)
{
    const char *reason = NULL;
    size_t consumed = 0;
    int rc = mqtt_decode(buf, len, 0, pkt, &consumed, &reason);

    if (rc != 0)
        fail_msg("decode failed: %d (%s)", rc, reason ? reason : "?");
    assert_int_equal(consumed, len);
}

static int decode_rc(const uint8_t *buf, size_t len)
{
    struct mqtt_packet pkt;
    const char *reason = NULL;
    size_t consumed;
    int rc = mqtt_decode(buf, len, 0, &pkt, &consumed, &reason);

    if (rc != 0 && rc != -EAGAIN)
        assert_non_null(reason); /* every error has words for the log */
    return rc;
}

/* Every strict prefix of a valid packet needs more bytes, never more or less. */
static void assert_truncations_need_more(const uint8_t *buf, size_t len)
{
    for (size_t cut = 0; cut < len; cut++)
        assert_int_equal(decode_rc(buf, cut), -EAGAIN);
}

/* --- fixed header ------------------------------------------------------------ */

static void test_remaining_length_boundaries(void **state)
{
    static const struct {
        size_t value;
        size_t bytes;
    } cases[] = {{0, 1},     {127, 1},     {128, 2},     {16383, 2},
                 {16384, 3}, {2097151, 3}, {2097152, 4}, {268435455, 4}};

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t buf[8] = {0x30};
        struct mqtt_fixed_header fh;
        size_t v = cases[i].value, n = 1;

        do {
            uint8_t b = v % 128;
            v /= 128;
            buf[n++] = b | (v ? 0x80 : 0);
        } while (v);
        assert_int_equal(n - 1, cases[i].bytes);
        assert_int_equal(mqtt_decode_fixed_header(buf, n, 0, &fh, NULL), 0);
        assert_int_equal(fh.remaining_length, cases[i].value);
        assert_int_equal(fh.header_len, n);
        assert_int_equal(fh.type, MQTT_PUBLISH);
        /* One byte short of the length field: need more. */
        assert_int_equal(mqtt_decode_fixed_header(buf, n - 1, 0, &fh, NULL), -EAGAIN);
    }
}

static void test_remaining_length_five_bytes(void **state)
{
    const uint8_t buf[] = {0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01};
    struct mqtt_fixed_header fh;
    const char *reason = NULL;

    assert_int_equal(mqtt_decode_fixed_header(buf, sizeof(buf), 0, &fh, &reason), -EPROTO);
    assert_non_null(reason);
    /* The fourth length byte still says "more follows": malformed without
     * waiting for a fifth; with three length bytes seen, need more. */
    assert_int_equal(mqtt_decode_fixed_header(buf, 5, 0, &fh, NULL), -EPROTO);
    assert_int_equal(mqtt_decode_fixed_header(buf, 4, 0, &fh, NULL), -EAGAIN);
}

static void test_non_minimal_length_accepted(void **state)
{
    /* §2.2.3 does not forbid a non-minimal encoding (0x80 0x00 = 0). */
    const uint8_t buf[] = {0xC0, 0x80, 0x00};
    struct mqtt_packet pkt;

    decode_ok(buf, sizeof(buf), &pkt);
    assert_int_equal(pkt.type, MQTT_PINGREQ);
}

static void test_max_packet_size(void **state)
{
    const uint8_t buf[] = {0x30, 0x80, 0x08}; /* 1024 bytes follow */
    struct mqtt_fixed_header fh;

    assert_int_equal(mqtt_decode_fixed_header(buf, sizeof(buf), 1027, &fh, NULL), 0);
    assert_int_equal(mqtt_decode_fixed_header(buf, sizeof(buf), 1026, &fh, NULL), -EMSGSIZE);
    /* Known as soon as the length is decoded: no need for the body. */
    assert_int_equal(fh.remaining_length, 1024);
}

static void test_reserved_types(void **state)
{
    const uint8_t zero[] = {0x00, 0x00}, fifteen[] = {0xF0, 0x00};

    assert_int_equal(decode_rc(zero, sizeof(zero)), -EPROTO);
    assert_int_equal(decode_rc(fifteen, sizeof(fifteen)), -EPROTO);
}

static void test_fixed_header_flags(void **state)
{
    /* §2.2.2: every type but PUBLISH has fixed flags; try all wrong ones. */
    static const uint8_t types_zero[] = {MQTT_PUBACK,   MQTT_PUBREC,  MQTT_PUBCOMP,
                                         MQTT_UNSUBACK, MQTT_PINGREQ, MQTT_DISCONNECT};
    for (size_t i = 0; i < sizeof(types_zero); i++) {
        uint8_t buf[4] = {(uint8_t)(types_zero[i] << 4), 0, 0, 1};
        size_t len = types_zero[i] >= MQTT_PINGREQ ? 2 : 4;

        buf[1] = (uint8_t)(len - 2);
        assert_int_equal(decode_rc(buf, len), 0);
        for (uint8_t flags = 1; flags < 16; flags++) {
            buf[0] = (uint8_t)(types_zero[i] << 4 | flags);
            assert_int_equal(decode_rc(buf, len), -EPROTO);
        }
    }
    for (uint8_t flags = 0; flags < 16; flags++) {
        uint8_t pubrel[] = {(uint8_t)(MQTT_PUBREL << 4 | flags), 2, 0, 1};
        assert_int_equal(decode_rc(pubrel, sizeof(pubrel)), flags == 2 ? 0 : -EPROTO);
    }
}

/* --- UTF-8 ------------------------------------------------------------------- */

static void test_utf8(void **state)
{
    static const struct {
        const char *bytes;
        size_t len;
        int rc;
    } cases[] = {
        {"plain/ascii", 11, 0},
        {"\xc3\xa9", 2, 0},                   /* é */
        {"\xe2\x82\xac", 3, 0},               /* € */
        {"\xf0\x9f\x98\x80", 4, 0},           /* U+1F600 */
        {"\xef\xbf\xbf", 3, 0},               /* U+FFFF: a non-character, allowed (§1.5.3-3) */
        {"\x01\x1f\x7f", 3, 0},               /* control characters: SHOULD NOT, not MUST */
        {"\xf4\x8f\xbf\xbf", 4, 0},           /* U+10FFFF, the last code point */
        {"a\0b", 3, -EPROTO},                 /* U+0000 (§1.5.3-2) */
        {"\xc0\x80", 2, -EPROTO},             /* overlong U+0000 */
        {"\xc1\xbf", 2, -EPROTO},             /* overlong '\x7f' */
        {"\xe0\x80\xaf", 3, -EPROTO},         /* overlong '/' */
        {"\xf0\x80\x80\xaf", 4, -EPROTO},     /* overlong '/' */
        {"\xed\xa0\x80", 3, -EPROTO},         /* surrogate U+D800 (§1.5.3-1) */
        {"\xed\xbf\xbf", 3, -EPROTO},         /* surrogate U+DFFF */
        {"\xf4\x90\x80\x80", 4, -EPROTO},     /* U+110000 */
        {"\xf8\x88\x80\x80\x80", 5, -EPROTO}, /* 5-byte form */
        {"\x80", 1, -EPROTO},                 /* lone continuation byte */
        {"\xc3", 1, -EPROTO},                 /* truncated */
        {"\xe2\x82", 2, -EPROTO},             /* truncated */
        {"\xe2\x28\xa1", 3, -EPROTO},         /* bad continuation */
        {"\xff", 1, -EPROTO},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = mqtt_utf8_check((const uint8_t *)cases[i].bytes, cases[i].len);
        if (rc != cases[i].rc)
            fail_msg("utf8 case %zu: got %d want %d", i, rc, cases[i].rc);
    }
}

/* --- CONNECT ----------------------------------------------------------------- */

static size_t encode_connect(uint8_t *buf, const struct mqtt_connect *c)
{
    size_t len = 0;

    assert_int_equal(mqtt_encode_connect(NULL, 0, c, &len), -ENOBUFS);
    assert_int_equal(mqtt_encode_connect(buf, len - 1, c, &len), -ENOBUFS);
    assert_int_equal(mqtt_encode_connect(buf, BUF_SIZE, c, &len), 0);
    return len;
}

static void test_connect_round_trip(void **state)
{
    struct mqtt_connect c = {
        .clean_session = true,
        .keepalive_s = 30,
        .client_id = slice("sensor-1"),
        .will = true,
        .will_qos = 1,
        .will_retain = true,
        .will_topic = slice("dev/sensor-1/state"),
        .will_payload = slice("offline"),
        .has_username = true,
        .username = slice("user"),
        .has_password = true,
        .password = {.data = (const uint8_t *)"p\0ss", .len = 4}, /* binary */
    };
    uint8_t buf[BUF_SIZE];
    struct mqtt_packet pkt;
    size_t len = encode_connect(buf, &c);

    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.type, MQTT_CONNECT);
    assert_int_equal(pkt.u.connect.protocol_level, 4);
    assert_true(pkt.u.connect.clean_session);
    assert_int_equal(pkt.u.connect.keepalive_s, 30);
    assert_true(slice_is(pkt.u.connect.client_id, "sensor-1"));
    assert_true(pkt.u.connect.will);
    assert_int_equal(pkt.u.connect.will_qos, 1);
    assert_true(pkt.u.connect.will_retain);
    assert_true(slice_is(pkt.u.connect.will_topic, "dev/sensor-1/state"));
    assert_true(slice_is(pkt.u.connect.will_payload, "offline"));
    assert_true(slice_is(pkt.u.connect.username, "user"));
    assert_int_equal(pkt.u.connect.password.len, 4);
    assert_memory_equal(pkt.u.connect.password.data, "p\0ss", 4);
    /* Borrowed slices point into the input buffer. */
    assert_true(pkt.u.connect.client_id.data > buf && pkt.u.connect.client_id.data < buf + len);
    assert_truncations_need_more(buf, len);

    /* A shorter declared length cuts a field: malformed, never a read past. */
    for (size_t rem = 0; rem < buf[1]; rem++) {
        uint8_t copy[BUF_SIZE];
        memcpy(copy, buf, len);
        copy[1] = (uint8_t)rem;
        assert_int_equal(decode_rc(copy, 2 + rem), -EPROTO);
    }
}

static void test_connect_minimal(void **state)
{
    struct mqtt_connect c = {.clean_session = true};
    uint8_t buf[BUF_SIZE];
    struct mqtt_packet pkt;
    size_t len = encode_connect(buf, &c);

    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.u.connect.client_id.len, 0);
    assert_false(pkt.u.connect.will);
    assert_false(pkt.u.connect.has_username);
    assert_false(pkt.u.connect.has_password);
    assert_int_equal(pkt.u.connect.keepalive_s, 0);
}

/* Offsets in the packet encode_connect() builds for a 1-byte client id. */
#define CONNECT_LEVEL_OFF 8
#define CONNECT_FLAGS_OFF 9

static size_t connect_base(uint8_t *buf)
{
    struct mqtt_connect c = {.clean_session = true, .client_id = slice("x")};
    return encode_connect(buf, &c);
}

static void test_connect_bad_flags(void **state)
{
    static const uint8_t bad_flags[] = {
        0x03, /* reserved bit 0 (§3.1.2-3) */
        0x0A, /* will QoS 1 without will flag (§3.1.2-13) */
        0x22, /* will retain without will flag (§3.1.2-15) */
        0x42, /* password without username (§3.1.2-22) */
    };
    uint8_t buf[BUF_SIZE];

    for (size_t i = 0; i < sizeof(bad_flags); i++) {
        size_t len = connect_base(buf);
        buf[CONNECT_FLAGS_OFF] = bad_flags[i];
        assert_int_equal(decode_rc(buf, len), -EPROTO);
    }
}

static void test_connect_will_qos3(void **state)
{
    struct mqtt_connect c = {.client_id = slice("x"),
                             .will = true,
                             .will_qos = 2,
                             .will_topic = slice("t"),
                             .will_payload = slice("p")};
    uint8_t buf[BUF_SIZE];
    size_t len = encode_connect(buf, &c);

    assert_int_equal(decode_rc(buf, len), 0);
    buf[CONNECT_FLAGS_OFF] |= 0x18; /* QoS 3 */
    assert_int_equal(decode_rc(buf, len), -EPROTO);
}

static void test_connect_will_topic_rules(void **state)
{
    const char *bad[] = {"a/+", "#", ""};
    uint8_t buf[BUF_SIZE];

    for (size_t i = 0; i < 3; i++) {
        struct mqtt_connect c = {.client_id = slice("x"),
                                 .will = true,
                                 .will_topic = slice(bad[i]),
                                 .will_payload = slice("p")};
        size_t len = encode_connect(buf, &c);
        assert_int_equal(decode_rc(buf, len), -EPROTO);
    }
}

static void test_connect_protocol(void **state)
{
    uint8_t buf[BUF_SIZE];
    size_t len = connect_base(buf);
    const char *reason = NULL;
    struct mqtt_packet pkt;
    size_t consumed;

    buf[CONNECT_LEVEL_OFF] = 5;
    assert_int_equal(mqtt_decode(buf, len, 0, &pkt, &consumed, &reason), -EPROTONOSUPPORT);
    assert_non_null(reason);
    buf[CONNECT_LEVEL_OFF] = 4;
    memcpy(buf + 4, "MQTX", 4);
    assert_int_equal(decode_rc(buf, len), -EPROTO);

    /* MQTT 3.1: "MQIsdp" level 3 is answered with CONNACK 1 by the caller. */
    const uint8_t mqisdp[] = {0x10, 15, 0,    6, 'M', 'Q', 'I', 's', 'd',
                              'p',  3,  0x02, 0, 60,  0,   1,   'x'};
    assert_int_equal(decode_rc(mqisdp, sizeof(mqisdp)), -EPROTONOSUPPORT);
}

static void test_connect_bad_utf8_and_trailing(void **state)
{
    uint8_t buf[BUF_SIZE];
    size_t len = connect_base(buf);

    buf[len - 1] = 0; /* client id "x" -> U+0000 */
    assert_int_equal(decode_rc(buf, len), -EPROTO);
    buf[len - 1] = 0xC3; /* truncated 2-byte sequence */
    assert_int_equal(decode_rc(buf, len), -EPROTO);

    len = connect_base(buf);
    buf[1]++;
    buf[len++] = 'z'; /* a byte after the last field */
    assert_int_equal(decode_rc(buf, len), -EPROTO);
}

/* --- CONNACK ----------------------------------------------------------------- */

static void test_connack_round_trip(void **state)
{
    uint8_t buf[8];
    struct mqtt_packet pkt;
    size_t len;

    for (uint8_t code = 0; code <= MQTT_CONNACK_NOT_AUTHORIZED; code++) {
        assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), code == 0, code, &len), 0);
        assert_int_equal(len, 4);
        decode_ok(buf, len, &pkt);
        assert_int_equal(pkt.type, MQTT_CONNACK);
        assert_int_equal(pkt.u.connack.code, code);
        assert_int_equal(pkt.u.connack.session_present, code == 0);
        assert_truncations_need_more(buf, len);
    }
    assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), false, 6, &len), -EINVAL);
    buf[2] = 0x02; /* reserved acknowledge flag */
    assert_int_equal(decode_rc(buf, 4), -EPROTO);
}

/* --- PUBLISH ----------------------------------------------------------------- */

static void test_publish_round_trip(void **state)
{
    uint8_t buf[BUF_SIZE];
    struct mqtt_packet pkt;

    for (uint8_t qos = 0; qos <= 2; qos++) {
        for (int retain = 0; retain <= 1; retain++) {
            size_t len;
            assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), "dev/c/telemetry", 15, "21.5", 4,
                                                 qos, retain, qos > 0, 0x1234, &len),
                             0);
            decode_ok(buf, len, &pkt);
            assert_int_equal(pkt.type, MQTT_PUBLISH);
            assert_int_equal(pkt.u.publish.qos, qos);
            assert_int_equal(pkt.u.publish.retain, retain);
            assert_int_equal(pkt.u.publish.dup, qos > 0);
            assert_true(slice_is(pkt.u.publish.topic, "dev/c/telemetry"));
            assert_true(slice_is(pkt.u.publish.payload, "21.5"));
            assert_int_equal(pkt.u.publish.packet_id, qos ? 0x1234 : 0);
            assert_truncations_need_more(buf, len);
        }
    }
}

static void test_publish_sizes(void **state)
{
    static uint8_t payload[300000];
    uint8_t *buf;
    struct mqtt_packet pkt;
    size_t len, need;

    /* Empty payload (e.g. clearing a retained message) is valid. */
    uint8_t small[32];
    assert_int_equal(
        mqtt_encode_publish(small, sizeof(small), "t", 1, NULL, 0, 0, true, false, 0, &len), 0);
    decode_ok(small, len, &pkt);
    assert_int_equal(pkt.u.publish.payload.len, 0);

    /* A 3-byte remaining length, sized with a NULL buffer first. */
    memset(payload, 'x', sizeof(payload));
    assert_int_equal(
        mqtt_encode_publish(NULL, 0, "big", 3, payload, sizeof(payload), 1, false, false, 1, &need),
        -ENOBUFS);
    buf = malloc(need);
    assert_non_null(buf);
    assert_int_equal(mqtt_encode_publish(buf, need, "big", 3, payload, sizeof(payload), 1, false,
                                         false, 1, &len),
                     0);
    assert_int_equal(len, need);
    assert_int_equal(len, 1 + 3 + 2 + 3 + 2 + sizeof(payload));
    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.u.publish.payload.len, sizeof(payload));
    {
        const char *reason;
        size_t consumed;
        assert_int_equal(mqtt_decode(buf, len, len - 1, &pkt, &consumed, &reason), -EMSGSIZE);
    }
    free(buf);
}

static void test_publish_malformed(void **state)
{
    uint8_t buf[64];
    size_t len;

    /* QoS 3 (§3.3.1-4). */
    assert_int_equal(
        mqtt_encode_publish(buf, sizeof(buf), "a", 1, "p", 1, 1, false, false, 1, &len), 0);
    buf[0] |= 0x06;
    assert_int_equal(decode_rc(buf, len), -EPROTO);

    /* Packet id 0 with QoS > 0 (§2.3.1-1): built by hand, the encoder refuses. */
    assert_int_equal(
        mqtt_encode_publish(buf, sizeof(buf), "a", 1, "p", 1, 1, false, false, 0, &len), -EINVAL);
    const uint8_t id0[] = {0x32, 5, 0, 1, 'a', 0, 0};
    assert_int_equal(decode_rc(id0, sizeof(id0)), -EPROTO);

    /* Wildcards in a topic name (§3.3.2-2), empty topic, bad UTF-8. */
    const char *bad_topics[] = {"a/+", "+", "a/#", "#", "", "a\xc0\x80"};
    for (size_t i = 0; i < sizeof(bad_topics) / sizeof(bad_topics[0]); i++) {
        assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), bad_topics[i], strlen(bad_topics[i]),
                                             "p", 1, 0, false, false, 0, &len),
                         0);
        assert_int_equal(decode_rc(buf, len), -EPROTO);
    }
    /* Topic length running past the packet. */
    const uint8_t overrun[] = {0x30, 4, 0, 9, 'a', 'b'};
    assert_int_equal(decode_rc(overrun, sizeof(overrun)), -EPROTO);
    /* QoS 1 without room for the packet id. */
    const uint8_t no_id[] = {0x32, 3, 0, 1, 'a'};
    assert_int_equal(decode_rc(no_id, sizeof(no_id)), -EPROTO);
}

/* --- acknowledgements and simple packets ---------------------------------------- */

static void test_acks_round_trip(void **state)
{
    static const uint8_t types[] = {MQTT_PUBACK, MQTT_PUBREC, MQTT_PUBREL, MQTT_PUBCOMP,
                                    MQTT_UNSUBACK};
    uint8_t buf[8] = {0};
    struct mqtt_packet pkt;
    size_t len;

    for (size_t i = 0; i < sizeof(types); i++) {
        assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), types[i], 0xBEEF, &len), 0);
        assert_int_equal(len, 4);
        assert_int_equal(buf[0] & 0x0F, types[i] == MQTT_PUBREL ? 2 : 0);
        decode_ok(buf, len, &pkt);
        assert_int_equal(pkt.type, types[i]);
        assert_int_equal(pkt.u.packet_id, 0xBEEF);
        assert_truncations_need_more(buf, len);
        buf[1] = 3; /* wrong remaining length */
        assert_int_equal(decode_rc(buf, 5), -EPROTO);
        buf[1] = 2;
        buf[2] = buf[3] = 0; /* packet id 0 */
        assert_int_equal(decode_rc(buf, 4), -EPROTO);
    }
    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), MQTT_CONNECT, 1, &len), -EINVAL);
    assert_int_equal(mqtt_encode_ack(buf, 3, MQTT_PUBACK, 1, &len), -ENOBUFS);
    assert_int_equal(len, 4);
}

static void test_simple_round_trip(void **state)
{
    static const uint8_t types[] = {MQTT_PINGREQ, MQTT_PINGRESP, MQTT_DISCONNECT};
    uint8_t buf[4];
    struct mqtt_packet pkt;
    size_t len;

    for (size_t i = 0; i < sizeof(types); i++) {
        assert_int_equal(mqtt_encode_simple(buf, sizeof(buf), types[i], &len), 0);
        assert_int_equal(len, 2);
        decode_ok(buf, len, &pkt);
        assert_int_equal(pkt.type, types[i]);
        assert_truncations_need_more(buf, len);
        buf[1] = 1;
        buf[2] = 0;
        assert_int_equal(decode_rc(buf, 3), -EPROTO); /* must be empty */
    }
    assert_int_equal(mqtt_encode_simple(buf, sizeof(buf), MQTT_PUBACK, &len), -EINVAL);
}

/* --- SUBSCRIBE / SUBACK / UNSUBSCRIBE ------------------------------------------ */

static void test_subscribe_round_trip(void **state)
{
    const char *const filters[] = {"dev/+/telemetry", "cloud/c8y/#", "a"};
    const uint8_t qos[] = {0, 1, 2};
    uint8_t buf[BUF_SIZE];
    struct mqtt_packet pkt;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice f;
    uint8_t q;
    size_t len, n = 0;

    assert_int_equal(mqtt_encode_subscribe(buf, sizeof(buf), 42, filters, qos, 3, &len), 0);
    assert_int_equal(buf[0], 0x82);
    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.type, MQTT_SUBSCRIBE);
    assert_int_equal(pkt.u.subscribe.packet_id, 42);
    assert_int_equal(pkt.u.subscribe.count, 3);
    while (mqtt_subscribe_next(&pkt.u.subscribe, &iter, &f, &q)) {
        assert_true(n < 3);
        assert_true(slice_is(f, filters[n]));
        assert_int_equal(q, qos[n]);
        n++;
    }
    assert_int_equal(n, 3);
    assert_truncations_need_more(buf, len);
}

static void test_subscribe_malformed(void **state)
{
    const char *const one[] = {"a/b"};
    const uint8_t qos1[] = {1};
    uint8_t buf[BUF_SIZE];
    size_t len;

    /* No filters at all (§3.8.3-3). */
    const uint8_t empty[] = {0x82, 2, 0, 1};
    assert_int_equal(decode_rc(empty, sizeof(empty)), -EPROTO);
    /* Flags other than 0b0010 (§3.8.1-1). */
    assert_int_equal(mqtt_encode_subscribe(buf, sizeof(buf), 1, one, qos1, 1, &len), 0);
    for (uint8_t flags = 0; flags < 16; flags++) {
        buf[0] = (uint8_t)(MQTT_SUBSCRIBE << 4 | flags);
        assert_int_equal(decode_rc(buf, len), flags == 2 ? 0 : -EPROTO);
    }
    /* Requested QoS 3 and reserved bits (§3.8.3-4). */
    buf[len - 1] = 3;
    assert_int_equal(decode_rc(buf, len), -EPROTO);
    buf[len - 1] = 0x41;
    assert_int_equal(decode_rc(buf, len), -EPROTO);
    /* Missing QoS byte. */
    buf[1]--;
    assert_int_equal(decode_rc(buf, len - 1), -EPROTO);
    /* Empty filter, packet id 0, bad UTF-8. */
    const uint8_t empty_filter[] = {0x82, 5, 0, 1, 0, 0, 0};
    assert_int_equal(decode_rc(empty_filter, sizeof(empty_filter)), -EPROTO);
    const uint8_t id0[] = {0x82, 6, 0, 0, 0, 1, 'a', 0};
    assert_int_equal(decode_rc(id0, sizeof(id0)), -EPROTO);
    const uint8_t bad_utf8[] = {0x82, 6, 0, 1, 0, 1, 0xFF, 0};
    assert_int_equal(decode_rc(bad_utf8, sizeof(bad_utf8)), -EPROTO);
    /* Wildcard placement is the server's call (SUBACK 0x80), not malformed. */
    const uint8_t misplaced[] = {0x82, 8, 0, 1, 0, 3, 'a', '#', 'b', 0};
    assert_int_equal(decode_rc(misplaced, sizeof(misplaced)), 0);
}

static void test_suback_round_trip(void **state)
{
    const uint8_t codes[] = {0, 1, 2, MQTT_SUBACK_FAILURE};
    uint8_t buf[16];
    struct mqtt_packet pkt;
    size_t len;

    assert_int_equal(mqtt_encode_suback(buf, sizeof(buf), 7, codes, 4, &len), 0);
    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.type, MQTT_SUBACK);
    assert_int_equal(pkt.u.suback.packet_id, 7);
    assert_int_equal(pkt.u.suback.count, 4);
    assert_memory_equal(pkt.u.suback.codes, codes, 4);
    assert_truncations_need_more(buf, len);
    buf[len - 1] = 3; /* reserved return code */
    assert_int_equal(decode_rc(buf, len), -EPROTO);
    assert_int_equal(mqtt_encode_suback(buf, sizeof(buf), 7, codes, 0, &len), -EINVAL);
}

static void test_unsubscribe_round_trip(void **state)
{
    const char *const filters[] = {"a/+", "cloud/#"};
    uint8_t buf[BUF_SIZE];
    struct mqtt_packet pkt;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice f;
    size_t len, n = 0;

    assert_int_equal(mqtt_encode_unsubscribe(buf, sizeof(buf), 9, filters, 2, &len), 0);
    assert_int_equal(buf[0], 0xA2);
    decode_ok(buf, len, &pkt);
    assert_int_equal(pkt.type, MQTT_UNSUBSCRIBE);
    assert_int_equal(pkt.u.unsubscribe.packet_id, 9);
    assert_int_equal(pkt.u.unsubscribe.count, 2);
    while (mqtt_unsubscribe_next(&pkt.u.unsubscribe, &iter, &f))
        assert_true(slice_is(f, filters[n++]));
    assert_int_equal(n, 2);
    assert_truncations_need_more(buf, len);

    const uint8_t empty[] = {0xA2, 2, 0, 1};
    assert_int_equal(decode_rc(empty, sizeof(empty)), -EPROTO); /* §3.10.3-2 */
    buf[0] = 0xA0;
    assert_int_equal(decode_rc(buf, len), -EPROTO); /* §3.10.1-1 */
}

static void test_stream_of_packets(void **state)
{
    /* Several packets back to back decode one after another. */
    uint8_t buf[BUF_SIZE];
    size_t off = 0, len, consumed;
    struct mqtt_packet pkt;
    uint8_t seen[4];
    size_t count = 0;

    mqtt_encode_simple(buf + off, sizeof(buf) - off, MQTT_PINGREQ, &len);
    off += len;
    mqtt_encode_publish(buf + off, sizeof(buf) - off, "t", 1, "x", 1, 1, false, false, 5, &len);
    off += len;
    mqtt_encode_ack(buf + off, sizeof(buf) - off, MQTT_PUBACK, 5, &len);
    off += len;
    mqtt_encode_simple(buf + off, sizeof(buf) - off, MQTT_DISCONNECT, &len);
    off += len;
    for (size_t pos = 0; pos < off; pos += consumed) {
        assert_int_equal(mqtt_decode(buf + pos, off - pos, 0, &pkt, &consumed, NULL), 0);
        seen[count++] = pkt.type;
    }
    assert_int_equal(count, 4);
    assert_int_equal(seen[0], MQTT_PINGREQ);
    assert_int_equal(seen[1], MQTT_PUBLISH);
    assert_int_equal(seen[2], MQTT_PUBACK);
    assert_int_equal(seen[3], MQTT_DISCONNECT);
}

static void test_type_names(void **state)
{
    assert_string_equal(mqtt_packet_type_name(MQTT_CONNECT), "CONNECT");
    assert_string_equal(mqtt_packet_type_name(MQTT_DISCONNECT), "DISCONNECT");
    assert_string_equal(mqtt_packet_type_name(0), "reserved");
    assert_string_equal(mqtt_packet_type_name(15), "reserved");
    assert_string_equal(mqtt_packet_type_name(200), "reserved");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_remaining_length_boundaries),
        cmocka_unit_test(test_remaining_length_five_bytes),
        cmocka_unit_test(test_non_minimal_length_accepted),
        cmocka_unit_test(test_max_packet_size),
        cmocka_unit_test(test_reserved_types),
        cmocka_unit_test(test_fixed_header_flags),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_connect_round_trip),
        cmocka_unit_test(test_connect_minimal),
        cmocka_unit_test(test_connect_bad_flags),
        cmocka_unit_test(test_connect_will_qos3),
        cmocka_unit_test(test_connect_will_topic_rules),
        cmocka_unit_test(test_connect_protocol),
        cmocka_unit_test(test_connect_bad_utf8_and_trailing),
        cmocka_unit_test(test_connack_round_trip),
        cmocka_unit_test(test_publish_round_trip),
        cmocka_unit_test(test_publish_sizes),
        cmocka_unit_test(test_publish_malformed),
        cmocka_unit_test(test_acks_round_trip),
        cmocka_unit_test(test_simple_round_trip),
        cmocka_unit_test(test_subscribe_round_trip),
        cmocka_unit_test(test_subscribe_malformed),
        cmocka_unit_test(test_suback_round_trip),
        cmocka_unit_test(test_unsubscribe_round_trip),
        cmocka_unit_test(test_stream_of_packets),
        cmocka_unit_test(test_type_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
