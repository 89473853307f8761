/* test_smartrest.c - SmartREST 2.0 CSV encoder, parser, validation, packing.
 *
 * Vectors from Cumulocity's documentation:
 *   [impl]   "MQTT implementation", SmartREST escaping,
 *            https://cumulocity.com/guides/mqtt/implementation/
 *   [static] "MQTT static templates", SoftwareAG/c8y-docs
 *            content/smartrest/mqtt-static-templates.md
 *   [mqtt]   "Device integration using MQTT" (16184-byte packet limit),
 *            https://cumulocity.com/docs/device-integration/mqtt/
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "smartrest.h"

/* ---- helpers ---- */

static char *encode(const char *const *fields, size_t count)
{
    char err[SMARTREST_ERR_LEN] = "";
    char *line = NULL;
    size_t len = 0;
    int rc = smartrest_encode(fields, count, &line, &len, err, sizeof(err));

    if (rc != 0)
        fail_msg("encode failed: %d %s", rc, err);
    assert_int_equal(strlen(line), len);
    return line;
}

#define ENCODE(expect, ...)                                                                        \
    do {                                                                                           \
        const char *f_[] = {__VA_ARGS__};                                                          \
        char *got_ = encode(f_, sizeof(f_) / sizeof(f_[0]));                                       \
        assert_string_equal(got_, expect);                                                         \
        free(got_);                                                                                \
    } while (0)

/* Parse @line and compare with @count expected fields. */
static void expect_fields(const char *line, size_t count, const char *const *fields)
{
    struct smartrest_record rec;
    char err[SMARTREST_ERR_LEN] = "";
    int rc = smartrest_parse_line(line, strlen(line), &rec, err, sizeof(err));

    if (rc != 0)
        fail_msg("parse '%s' failed: %d %s", line, rc, err);
    if (rec.count != count)
        fail_msg("parse '%s': %zu fields, want %zu", line, rec.count, count);
    for (size_t i = 0; i < count; i++) {
        assert_string_equal(rec.fields[i], fields[i]);
        assert_int_equal(rec.lengths[i], strlen(fields[i]));
    }
    smartrest_record_free(&rec);
}

#define PARSE(line, ...)                                                                           \
    do {                                                                                           \
        const char *f_[] = {__VA_ARGS__};                                                          \
        expect_fields(line, sizeof(f_) / sizeof(f_[0]), f_);                                       \
    } while (0)

/* Parse must fail with -EINVAL and words containing @words. */
static void expect_parse_error(const char *line, size_t len, const char *words)
{
    struct smartrest_record rec;
    char err[SMARTREST_ERR_LEN] = "";

    assert_int_equal(smartrest_parse_line(line, len, &rec, err, sizeof(err)), -EINVAL);
    assert_int_equal(rec.count, 0);
    assert_null(rec.fields);
    if (!strstr(err, words))
        fail_msg("error for '%s' is '%s', want '%s' in it", line, err, words);
}

static void expect_invalid(const char *line, bool template_ids, const char *words)
{
    char err[SMARTREST_ERR_LEN] = "";

    assert_int_equal(smartrest_validate_line(line, strlen(line), template_ids, err, sizeof(err)),
                     -EINVAL);
    if (!strstr(err, words))
        fail_msg("error for '%s' is '%s', want '%s' in it", line, err, words);
}

static void expect_valid(const char *line, bool template_ids)
{
    char err[SMARTREST_ERR_LEN] = "";
    int rc = smartrest_validate_line(line, strlen(line), template_ids, err, sizeof(err));

    if (rc != 0)
        fail_msg("'%s' refused: %s", line, err);
}

/* ---- encoder ---- */

static void test_encode_doc_vectors(void **state)
{
    /* [impl] publish example */
    ENCODE("100,\"This value, needs escaping\",This value does not need escaping", "100",
           "This value, needs escaping", "This value does not need escaping");
    /* [impl] subscribe example: the text between the quotes holds the two
     * characters '\' 'n' (literal in the page) and escaped quotes. */
    ENCODE("511,myDeviceSerial,\"execute this\\nand this\\nand \\\"this\\\"\"", "511",
           "myDeviceSerial", "execute this\\nand this\\nand \"this\"");
    /* [static] examples */
    ENCODE("200,c8y_Temperature,T,25", "200", "c8y_Temperature", "T", "25");
    ENCODE("100,myDevice,myType", "100", "myDevice", "myType");
    ENCODE("101,uniqueChildId,myChildDevice,myChildType", "101", "uniqueChildId", "myChildDevice",
           "myChildType");
    ENCODE("100,,myType", "100", "", "myType");
    ENCODE("210,-90,23,2016-06-22T17:03:14.000+02:00", "210", "-90", "23",
           "2016-06-22T17:03:14.000+02:00");
    /* The page quotes "Something was triggered" though nothing needs it; the
     * encoder quotes only when needed, and both parse the same. */
    ENCODE("400,c8y_MyEvent,Something was triggered", "400", "c8y_MyEvent",
           "Something was triggered");
    PARSE("400,c8y_MyEvent,\"Something was triggered\"", "400", "c8y_MyEvent",
          "Something was triggered");
    /* The last will */
    ENCODE("400,c8y_ConnectionEvent,Device connection was lost.", "400", "c8y_ConnectionEvent",
           "Device connection was lost.");
}

static void test_encode_quoting_rules(void **state)
{
    ENCODE("1,\" lead\"", "1", " lead");
    ENCODE("1,\"trail \"", "1", "trail ");
    ENCODE("1,inner space", "1", "inner space");
    ENCODE("1,\"a\tb\"", "1", "a\tb");
    ENCODE("1,\"a\rb\"", "1", "a\rb");
    ENCODE("1,\"a\nb\"", "1", "a\nb");
    ENCODE("1,\"a,b\"", "1", "a,b");
    ENCODE("1,\"\\\"\"", "1", "\"");
    ENCODE("1,\"say \\\"hi\\\"\"", "1", "say \"hi\"");
    ENCODE("1,\"\x01\"", "1", "\x01");
    ENCODE("1,,", "1", "", "");
    /* A backslash is literal; only \" is an escape. */
    ENCODE("1,C:\\dir", "1", "C:\\dir");
    ENCODE("1,\"C:\\dir, x\"", "1", "C:\\dir, x");
    ENCODE("1,ends\\", "1", "ends\\"); /* unquoted: no ambiguity */
    ENCODE("1,\"a\\\\\"b\"", "1", "a\\\"b");

    assert_false(smartrest_needs_quotes("", 0));
    assert_false(smartrest_needs_quotes("abc", 3));
    assert_true(smartrest_needs_quotes(" ", 1));
    assert_true(smartrest_needs_quotes("a\x7f", 2));
}

static void test_encode_refusals(void **state)
{
    struct smartrest_line line;
    char err[SMARTREST_ERR_LEN] = "";
    char *out = (char *)0x1;
    const char *bad[] = {"1", "needs quote, ends\\"};

    smartrest_line_init(&line);
    assert_int_equal(smartrest_line_add(&line, "a\0b", 3, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "NUL"));
    assert_int_equal(smartrest_line_add_str(&line, "x, y\\", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "backslash"));
    assert_int_equal(line.fields, 0);
    assert_int_equal(line.len, 0);
    smartrest_line_deinit(&line);

    assert_int_equal(smartrest_encode(bad, 2, &out, NULL, err, sizeof(err)), -EINVAL);
    assert_ptr_equal(out, (char *)0x1); /* untouched */
    assert_int_equal(smartrest_encode(bad, 0, &out, NULL, err, sizeof(err)), -EINVAL);
}

/* ---- parser ---- */

static void test_parse_doc_vectors(void **state)
{
    PARSE("100,\"This value, needs escaping\",This value does not need escaping", "100",
          "This value, needs escaping", "This value does not need escaping");
    PARSE("511,myDeviceSerial,\"execute this\\nand this\\nand \\\"this\\\"\"", "511",
          "myDeviceSerial", "execute this\\nand this\\nand \"this\"");
    PARSE("513,DeviceSerial,\"val1=1\\nval2=2\"", "513", "DeviceSerial", "val1=1\\nval2=2");
    PARSE("502,c8y_Restart,\"Could not restart\"", "502", "c8y_Restart", "Could not restart");
    PARSE("510,DeviceSerial", "510", "DeviceSerial");
    PARSE("70,tenant,user,password", "70", "tenant", "user", "password");
    PARSE("41,100,Device already existing", "41", "100", "Device already existing");
    PARSE("304,c8y_TemperatureAlarm,,2013-06-22T17:03:14.000+02:00", "304", "c8y_TemperatureAlarm",
          "", "2013-06-22T17:03:14.000+02:00");
    PARSE("100,,", "100", "", "");
    PARSE("100", "100");
    PARSE("530,DeviceSerial,10.0.0.67,22,eb5e9d13-1caa-486b-bdda-130ca0d87df8", "530",
          "DeviceSerial", "10.0.0.67", "22", "eb5e9d13-1caa-486b-bdda-130ca0d87df8");
    PARSE("527,DeviceSerial,$FW,firmwareName,1.0,http://www.my.url,true,dependency,$SW,"
          "softwareA,1.0,http://www.my.url1,action1,softwareB,2.0,http://www.my.url2,action2,"
          "$CONF,http://www.my.url1,type1,http://www.my.url2,type2",
          "527", "DeviceSerial", "$FW", "firmwareName", "1.0", "http://www.my.url", "true",
          "dependency", "$SW", "softwareA", "1.0", "http://www.my.url1", "action1", "softwareB",
          "2.0", "http://www.my.url2", "action2", "$CONF", "http://www.my.url1", "type1",
          "http://www.my.url2", "type2");
}

static void test_parse_forms(void **state)
{
    /* legacy "" escape */
    PARSE("502,c8y_Restart,\"Could not \"\"restart\"\"\"", "502", "c8y_Restart",
          "Could not \"restart\"");
    PARSE("1,\"\"\"\"", "1", "\"");
    /* both forms in one value */
    PARSE("1,\"a\\\"b\"\"c\"", "1", "a\"b\"c");
    /* empty quoted fields */
    PARSE("1,\"\",x", "1", "", "x");
    PARSE("1,\"\"", "1", "");
    /* CR LF ending */
    PARSE("100,a\r", "100", "a");
    PARSE("100,\"a\"\r", "100", "a");
    /* raw CR / LF inside quotes are data */
    PARSE("1,\"a\nb\",\"c\r\nd\"", "1", "a\nb", "c\r\nd");
    /* a lone backslash is literal, quoted or not */
    PARSE("1,a\\b,\"c\\d\"", "1", "a\\b", "c\\d");
    PARSE("1,ends\\", "1", "ends\\");
    /* spaces are kept as written */
    PARSE("1, a ,\" b \"", "1", " a ", " b ");
}

static void test_parse_errors(void **state)
{
    struct smartrest_record rec;
    char err[SMARTREST_ERR_LEN];
    const char *line;

    line = "100,\"abc";
    expect_parse_error(line, strlen(line), "unterminated quote");
    expect_parse_error(line, strlen(line), "column 5");
    line = "1,a,\"x\\\"";
    expect_parse_error(line, strlen(line), "column 5");
    line = "\"";
    expect_parse_error(line, strlen(line), "column 1");
    line = "100,\"a\"b";
    expect_parse_error(line, strlen(line), "after the closing quote at column 8");
    line = "100,a\"b";
    expect_parse_error(line, strlen(line), "double quote inside an unquoted value at column 6");
    expect_parse_error("1,a\0b", 5, "NUL byte at column 4");
    expect_parse_error("1,\"a\0b\"", 7, "NUL byte at column 5");
    /* a NULL err buffer is fine */
    assert_int_equal(smartrest_parse_line("\"", 1, &rec, NULL, 0), -EINVAL);
    /* a short buffer is truncated, still terminated */
    assert_int_equal(smartrest_parse_line("\"", 1, &rec, err, 8), -EINVAL);
    assert_int_equal(strlen(err), 7);
}

/* Deterministic xorshift, so a failure reproduces. */
static uint32_t next_random(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static void test_round_trip(void **state)
{
    static const char alphabet[] = {'a', 'Z', '0', ',', '"', '\\', ' ', '\n', '\r', '\t', '\x01'};
    uint32_t seed = 0x5eed1234;
    size_t checked = 0;

    for (int iter = 0; iter < 3000; iter++) {
        char values[3][12];
        const char *fields[4] = {"999", values[0], values[1], values[2]};
        struct smartrest_record rec;
        char err[SMARTREST_ERR_LEN] = "";
        char *line;
        size_t len;
        int rc;

        for (int v = 0; v < 3; v++) {
            size_t n = next_random(&seed) % 11;

            for (size_t i = 0; i < n; i++)
                values[v][i] = alphabet[next_random(&seed) % sizeof(alphabet)];
            values[v][n] = '\0';
        }
        rc = smartrest_encode(fields, 4, &line, &len, err, sizeof(err));
        if (rc == -EINVAL) {
            /* only the documented case: quoted and ending in a backslash */
            assert_non_null(strstr(err, "backslash"));
            continue;
        }
        assert_int_equal(rc, 0);
        /* what we encode must also pass upstream validation */
        if (smartrest_validate_line(line, len, false, err, sizeof(err)) != 0)
            fail_msg("encoded line refused: %s", err);
        rc = smartrest_parse_line(line, len, &rec, err, sizeof(err));
        if (rc != 0)
            fail_msg("round trip parse of '%s' failed: %s", line, err);
        /* A value ending in CR as the very last field loses it to the CR LF
         * rule only if unquoted, and CR always forces quotes: none lost. */
        assert_int_equal(rec.count, 4);
        for (int v = 0; v < 4; v++)
            assert_string_equal(rec.fields[v], fields[v]);
        smartrest_record_free(&rec);
        free(line);
        checked++;
    }
    assert_true(checked > 1000);
}

/* ---- multi-line payloads ---- */

static void test_next_line(void **state)
{
    const char payload[] = "200,a,b,1\n\n201,x\r\n\r\n  \n511,d,\"a\nb\"\n100,\"c\r\nd\",e";
    const char *want[] = {"200,a,b,1", "201,x", "511,d,\"a\nb\"", "100,\"c\r\nd\",e"};
    size_t pos = 0, len, n = 0;
    const char *line;

    while (smartrest_next_line(payload, sizeof(payload) - 1, &pos, &line, &len) == 1) {
        assert_true(n < 4);
        assert_int_equal(len, strlen(want[n]));
        assert_memory_equal(line, want[n], len);
        n++;
    }
    assert_int_equal(n, 4);
    assert_int_equal(smartrest_next_line(payload, sizeof(payload) - 1, &pos, &line, &len), 0);

    /* only empty lines */
    pos = 0;
    assert_int_equal(smartrest_next_line("\n\r\n\n", 4, &pos, &line, &len), 0);
    /* an unterminated quote runs to the end; the parser names it */
    pos = 0;
    assert_int_equal(smartrest_next_line("1,\"a\n2,b", 8, &pos, &line, &len), 1);
    assert_int_equal(len, 8);
}

static void test_validate(void **state)
{
    expect_valid("100,myDevice,myType", false);
    expect_valid("200,c8y_Temperature,T,25", false);
    expect_valid("501,c8y_Restart", false);
    expect_valid("500", false);
    expect_valid("100,a\r", false);
    expect_valid("1,\"tab\tinside\"", false);
    expect_valid("myTemplateMsg_1-a,x,y", true);
    expect_valid("200,c8y_Temperature,T,25", true);

    expect_invalid("myTemplateMsg,x", false, "is not a number");
    expect_invalid("abc", false, "custom template");
    expect_invalid("my.tpl,x", true, "character '.'");
    expect_invalid(",x", false, "no message id");
    expect_invalid("\"100\",x", false, "must not be quoted");
    expect_invalid("", false, "empty");
    expect_invalid("\r", false, "empty");
    expect_invalid("1 00,x", false, "not a number");
    expect_invalid("100,a\tb", false, "control character 0x09 at column 6");
    expect_invalid("100,a\x1b[31m", false, "control character 0x1b");
    expect_invalid("100,\"unterminated", false, "column 5");
    expect_invalid("100,x\ry", false, "control character 0x0d");
}

static void test_payload_split(void **state)
{
    struct smartrest_lines lines;
    char err[SMARTREST_ERR_LEN] = "";
    const char good[] = "100,gw,type\n\n101,child1,Child 1,c8y_Child\r\n200,c8y_Temperature,T,25\n";
    const char bad[] = "200,a,b,1\n\n200,a,\"b\n";

    smartrest_lines_init(&lines);
    assert_int_equal(
        smartrest_payload_split(good, sizeof(good) - 1, false, &lines, err, sizeof(err)), 3);
    assert_int_equal(lines.count, 3);
    assert_string_equal(lines.line[1], "101,child1,Child 1,c8y_Child");
    assert_int_equal(lines.len[1], strlen(lines.line[1]));
    assert_string_equal(lines.line[2], "200,c8y_Temperature,T,25");

    /* all or nothing, with the line number */
    assert_int_equal(smartrest_payload_split(bad, sizeof(bad) - 1, false, &lines, err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(lines.count, 3);
    assert_non_null(strstr(err, "line 3: unterminated quote"));
    assert_int_equal(smartrest_payload_split("100\nfoo,1", 9, false, &lines, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "line 2: message id 'foo'"));
    assert_int_equal(lines.count, 3);
    assert_int_equal(smartrest_payload_split("\n\n", 2, false, &lines, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "no SmartREST line"));

    smartrest_lines_truncate(&lines, 1);
    assert_int_equal(lines.count, 1);
    smartrest_lines_deinit(&lines);
    assert_int_equal(lines.count, 0);
    assert_null(lines.line);
}

/* ---- packet size and packing ---- */

static size_t size_of(size_t topic_len, size_t payload_len, int qos)
{
    size_t size = 0;

    assert_int_equal(smartrest_publish_size(topic_len, payload_len, qos, &size), 0);
    return size;
}

static void test_publish_size(void **state)
{
    size_t size;

    /* s/us, QoS 0, empty: 1 + 1 + (2 + 4) */
    assert_int_equal(size_of(4, 0, 0), 8);
    assert_int_equal(size_of(4, 0, 1), 10); /* + packet id */
    assert_int_equal(size_of(4, 0, 2), 10);
    /* §2.2.3 boundaries: remaining 127 | 128, 16383 | 16384, 2097151 | 2097152 */
    assert_int_equal(size_of(4, 121, 0), 1 + 1 + 127);
    assert_int_equal(size_of(4, 122, 0), 1 + 2 + 128);
    assert_int_equal(size_of(4, 16377, 0), 1 + 2 + 16383);
    assert_int_equal(size_of(4, 16378, 0), 1 + 3 + 16384);
    assert_int_equal(size_of(4, 2097145, 0), 1 + 3 + 2097151);
    assert_int_equal(size_of(4, 2097146, 0), 1 + 4 + 2097152);
    assert_int_equal(size_of(4, 268435449, 0), 1 + 4 + 268435455);
    assert_int_equal(smartrest_publish_size(4, 268435450, 0, &size), -EMSGSIZE);
    assert_int_equal(smartrest_publish_size(4, SIZE_MAX, 0, &size), -EMSGSIZE);
    assert_int_equal(smartrest_publish_size(4, 0, 3, &size), -EINVAL);
    assert_int_equal(smartrest_publish_size(4, 0, -1, &size), -EINVAL);
    assert_int_equal(smartrest_publish_size(65536, 0, 0, &size), -EINVAL);
    assert_int_equal(size_of(65535, 0, 0), 1 + 3 + 2 + 65535);
}

static void test_max_payload(void **state)
{
    size_t max = 0;

    assert_int_equal(smartrest_max_payload(4, 1, SMARTREST_MAX_PACKET, &max), 0);
    assert_int_equal(max, 16173);
    assert_int_equal(smartrest_max_payload(4, 0, SMARTREST_MAX_PACKET, &max), 0);
    assert_int_equal(max, 16175);
    /* Every limit: the answer fits exactly or is at a Remaining Length
     * width step, and one byte more never fits. */
    for (size_t limit = 8; limit < 20000; limit++) {
        assert_int_equal(smartrest_max_payload(4, 0, limit, &max), 0);
        assert_true(size_of(4, max, 0) <= limit);
        assert_true(size_of(4, max + 1, 0) > limit);
    }
    assert_int_equal(smartrest_max_payload(4, 0, 7, &max), -EMSGSIZE);
    assert_int_equal(smartrest_max_payload(4, 3, 100, &max), -EINVAL);
    /* the 268,435,455 ceiling */
    assert_int_equal(smartrest_max_payload(4, 0, SIZE_MAX, &max), 0);
    assert_int_equal(max, 268435455 - 6);
}

static char *filled(size_t len, char c)
{
    char *s = malloc(len + 1);

    assert_non_null(s);
    memset(s, c, len);
    memcpy(s, "200,", len < 4 ? len : 4);
    s[len] = '\0';
    return s;
}

/* Pack one line alone on @topic at @qos: 0 or the error. */
static int pack_one(const char *topic, int qos, size_t len, size_t *packet)
{
    char *line = filled(len, 'x'), *payload = NULL, err[SMARTREST_ERR_LEN] = "";
    const char *lines[1] = {line};
    size_t lens[1] = {len}, taken = 99, payload_len = 0;
    int rc = smartrest_pack(topic, qos, SMARTREST_MAX_PACKET, lines, lens, 1, &taken, &payload,
                            &payload_len, err, sizeof(err));

    if (rc == 0) {
        assert_int_equal(taken, 1);
        assert_int_equal(payload_len, len);
        assert_memory_equal(payload, line, len);
        *packet = size_of(strlen(topic), payload_len, qos);
        free(payload);
    } else {
        assert_int_equal(taken, 0);
        assert_non_null(strstr(err, "refused, not sent"));
        assert_non_null(strstr(err, "16184-byte limit"));
    }
    free(line);
    return rc;
}

static void test_pack_boundary(void **state)
{
    size_t packet = 0;

    /* [mqtt]: the whole packet <= 16184. On s/us at QoS 1 the overhead is
     * 1 (type) + 2 (remaining length) + 2 + 4 (topic) + 2 (packet id) = 11,
     * so a 16173-byte line makes exactly 16184 bytes and 16174 makes 16185. */
    assert_int_equal(pack_one("s/us", 1, 16173, &packet), 0);
    assert_int_equal(packet, 16184);
    assert_int_equal(pack_one("s/us", 1, 16174, &packet), -EMSGSIZE);
    assert_int_equal(size_of(4, 16174, 1), 16185);
    /* QoS 0 has no packet id: two more bytes of line fit. */
    assert_int_equal(pack_one("s/us", 0, 16175, &packet), 0);
    assert_int_equal(packet, 16184);
    assert_int_equal(pack_one("s/us", 0, 16176, &packet), -EMSGSIZE);
    /* A child topic costs its length. */
    assert_int_equal(pack_one("s/us/child-0001", 1, 16162, &packet), 0);
    assert_int_equal(packet, 16184);
    assert_int_equal(pack_one("s/us/child-0001", 1, 16163, &packet), -EMSGSIZE);
}

static void test_pack_error_words(void **state)
{
    char *line = filled(16174, 'x'), *payload = NULL, err[SMARTREST_ERR_LEN] = "";
    const char *lines[1] = {line};
    size_t lens[1] = {16174}, taken, payload_len;

    assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines, lens, 1, &taken,
                                    &payload, &payload_len, err, sizeof(err)),
                     -EMSGSIZE);
    assert_non_null(strstr(err, "16174 bytes"));
    assert_non_null(strstr(err, "16185-byte MQTT packet"));
    assert_non_null(strstr(err, "at most 16173 bytes"));
    assert_null(payload);
    /* a limit below the headers: nothing fits */
    assert_int_equal(smartrest_pack("s/us", 1, 10, lines, lens, 1, &taken, &payload, &payload_len,
                                    err, sizeof(err)),
                     -EMSGSIZE);
    assert_int_equal(smartrest_pack("s/us", 1, 10, lines, lens, 0, &taken, &payload, &payload_len,
                                    err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(smartrest_pack("s/us", 3, 100, lines, lens, 1, &taken, &payload, &payload_len,
                                    err, sizeof(err)),
                     -EINVAL);
    free(line);
}

static void test_pack_split(void **state)
{
    char *a = filled(100, 'a'), *b = filled(16072, 'b'), *c = filled(16073, 'c');
    char *payload, err[SMARTREST_ERR_LEN] = "";
    size_t taken, payload_len;

    /* 100 + "\n" + 16072 = 16173: both in one packet of exactly 16184 */
    {
        const char *lines[] = {a, b};
        size_t lens[] = {100, 16072};

        assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines, lens, 2, &taken,
                                        &payload, &payload_len, err, sizeof(err)),
                         0);
        assert_int_equal(taken, 2);
        assert_int_equal(payload_len, 16173);
        assert_int_equal(size_of(4, payload_len, 1), 16184);
        assert_memory_equal(payload, a, 100);
        assert_int_equal(payload[100], '\n');
        assert_memory_equal(payload + 101, b, 16072);
        assert_int_equal(payload[payload_len], '\0');
        free(payload);
    }
    /* one byte more would make 16185: the second line waits for the next */
    {
        const char *lines[] = {a, c};
        size_t lens[] = {100, 16073};

        assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines, lens, 2, &taken,
                                        &payload, &payload_len, err, sizeof(err)),
                         0);
        assert_int_equal(taken, 1);
        assert_int_equal(payload_len, 100);
        free(payload);
        assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines + 1, lens + 1, 1,
                                        &taken, &payload, &payload_len, err, sizeof(err)),
                         0);
        assert_int_equal(taken, 1);
        assert_int_equal(size_of(4, payload_len, 1), 16073 + 11);
        free(payload);
    }
    /* FIFO: a small line after one that does not fit is not pulled ahead */
    {
        const char *lines[] = {a, c, "500"};
        size_t lens[] = {100, 16073, 3};

        assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines, lens, 3, &taken,
                                        &payload, &payload_len, err, sizeof(err)),
                         0);
        assert_int_equal(taken, 1);
        free(payload);
    }
    free(a);
    free(b);
    free(c);
}

static void test_pack_many(void **state)
{
    enum { N = 1000, LEN = 100 };
    char *line = filled(LEN, 'm');
    const char **lines = calloc(N, sizeof(*lines));
    size_t *lens = calloc(N, sizeof(*lens)), done = 0, packets = 0;

    assert_non_null(lines);
    assert_non_null(lens);
    for (size_t i = 0; i < N; i++) {
        lines[i] = line;
        lens[i] = LEN;
    }
    while (done < N) {
        char *payload, err[SMARTREST_ERR_LEN];
        size_t taken, payload_len;

        assert_int_equal(smartrest_pack("s/us", 1, SMARTREST_MAX_PACKET, lines + done, lens + done,
                                        N - done, &taken, &payload, &payload_len, err, sizeof(err)),
                         0);
        /* 160 * 101 - 1 = 16159 <= 16173 < 161 * 101 - 1 */
        if (done + 160 <= N)
            assert_int_equal(taken, 160);
        assert_true(size_of(4, payload_len, 1) <= SMARTREST_MAX_PACKET);
        assert_int_equal(payload_len, taken * (LEN + 1) - 1);
        free(payload);
        done += taken;
        packets++;
    }
    assert_int_equal(done, N);
    assert_int_equal(packets, 7); /* ceil(1000 / 160) */
    free(lines);
    free(lens);
    free(line);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_doc_vectors), cmocka_unit_test(test_encode_quoting_rules),
        cmocka_unit_test(test_encode_refusals),    cmocka_unit_test(test_parse_doc_vectors),
        cmocka_unit_test(test_parse_forms),        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_round_trip),         cmocka_unit_test(test_next_line),
        cmocka_unit_test(test_validate),           cmocka_unit_test(test_payload_split),
        cmocka_unit_test(test_publish_size),       cmocka_unit_test(test_max_payload),
        cmocka_unit_test(test_pack_boundary),      cmocka_unit_test(test_pack_error_words),
        cmocka_unit_test(test_pack_split),         cmocka_unit_test(test_pack_many),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
