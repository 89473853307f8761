/* test_json.c - json.c, the output builder: string escapes (RFC 8259 §7),
 * well-formed UTF-8 only (RFC 3629 §4: a bad byte becomes U+FFFD), growth,
 * and the failed flag when memory runs out (the failing allocator). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fail_alloc.h"
#include "json.h"

/* @text as a JSON string literal. */
static void assert_string_json(const char *text, const char *expected)
{
    struct json_buf buf;

    json_buf_init(&buf);
    json_append_string(&buf, text);
    assert_false(buf.failed);
    assert_string_equal(buf.data, expected);
    assert_int_equal(buf.len, strlen(expected));
    json_buf_deinit(&buf);
}

static void test_escapes(void **state)
{
    (void)state;
    assert_string_json("plain", "\"plain\"");
    assert_string_json("", "\"\"");
    assert_string_json("a\"b\\c", "\"a\\\"b\\\\c\"");
    assert_string_json("l1\nl2\r\t", "\"l1\\nl2\\r\\t\"");
    assert_string_json("\x01\x1f", "\"\\u0001\\u001f\"");
    assert_string_json("\x7f", "\"\x7f\"");
    assert_string_json(NULL, "null");
}

/* Well-formed UTF-8 passes as it is; anything else becomes U+FFFD, one
 * replacement per byte that starts no well-formed sequence. */
static void test_utf8(void **state)
{
    (void)state;
    assert_string_json("gr\xc3\xbc\xc3\x9f \xe2\x82\xac \xf0\x9f\x98\x80",
                       "\"gr\xc3\xbc\xc3\x9f \xe2\x82\xac \xf0\x9f\x98\x80\"");
    assert_string_json("a\xff"
                       "b",
                       "\"a\\ufffdb\"");                             /* never a lead byte */
    assert_string_json("\xc0\x80", "\"\\ufffd\\ufffd\"");            /* overlong NUL */
    assert_string_json("\xe0\x80\xaf", "\"\\ufffd\\ufffd\\ufffd\""); /* overlong '/' */
    assert_string_json("\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\""); /* a surrogate */
    assert_string_json("\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\""); /* > U+10FFFF */
    assert_string_json("\xe2\x82", "\"\\ufffd\\ufffd\"");                       /* cut at the end */
    assert_string_json("\xc3", "\"\\ufffd\"");
}

static void test_raw_fmt_and_growth(void **state)
{
    struct json_buf buf;
    char big[1000];

    (void)state;
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    json_buf_init(&buf);
    json_append_raw(&buf, "{\"n\":");
    json_append_fmt(&buf, "%d,\"s\":", 42);
    json_append_string(&buf, big);
    json_append_raw(&buf, "}");
    assert_false(buf.failed);
    assert_int_equal(buf.len, 5 + 7 + 1001 + 1);
    assert_memory_equal(buf.data, "{\"n\":42,\"s\":\"xxx", 16);
    assert_int_equal(buf.data[buf.len], '\0');
    json_buf_deinit(&buf);
    assert_null(buf.data);
}

/* Each allocation failing in turn: failed is set, later appends do
 * nothing, the text so far stays whole, and nothing leaks. */
static void test_out_of_memory(void **state)
{
    struct json_buf buf;
    size_t total;
    char big[700];

    (void)state;
    memset(big, 'y', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    fail_alloc_at(0);
    json_buf_init(&buf);
    json_append_string(&buf, big);
    json_append_string(&buf, big);
    json_buf_deinit(&buf);
    total = fail_alloc_count();
    assert_true(total >= 2);
    for (size_t i = 1; i <= total; i++) {
        fail_alloc_at(i);
        json_buf_init(&buf);
        json_append_string(&buf, big);
        size_t len = buf.len;
        json_append_string(&buf, big);
        json_append_raw(&buf, "tail");
        assert_true(fail_alloc_fired());
        assert_true(buf.failed);
        assert_true(buf.len <= len + 1 + sizeof(big));
        if (buf.data)
            assert_int_equal(strlen(buf.data), buf.len);
        json_buf_deinit(&buf);
    }
    fail_alloc_at(0);
}

/* The shape checks: first and last non-blank bytes only. */
static void test_shapes(void **state)
{
    (void)state;
    assert_true(json_shape_object(" {\"a\":1}\n", 8));
    assert_true(json_shape_object("{}", 2));
    assert_false(json_shape_object("[1]", 3));
    assert_false(json_shape_object("{", 1));
    assert_false(json_shape_object("", 0));
    assert_false(json_shape_object(" \t\r\n", 4));
    assert_true(json_shape_document("\n[1,2]", 6));
    assert_true(json_shape_document("{\"a\"", 4));
    assert_false(json_shape_document("21.5", 4));
    assert_false(json_shape_document("  ", 2));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_raw_fmt_and_growth),
        cmocka_unit_test(test_out_of_memory),
        cmocka_unit_test(test_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
