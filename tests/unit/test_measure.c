/* test_measure.c - JSON measurements -> SmartREST 200/201, pass-through,
 * refusals.
 *
 * The 200 and 201 vectors are the examples of Cumulocity's "MQTT static
 * templates" page (SoftwareAG/c8y-docs content/smartrest/
 * mqtt-static-templates.md, "Create custom measurement (200)" and "Create a
 * custom measurement with multiple fragments and series (201)").
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

#include "measure.h"

/* Convert @json; expect exactly the @count lines given. */
static void expect_lines(const char *json, const struct measure_options *opts, size_t count,
                         const char *const *want)
{
    struct smartrest_lines out;
    char err[SMARTREST_ERR_LEN] = "";
    int rc;

    smartrest_lines_init(&out);
    rc = measure_convert(json, strlen(json), opts, &out, err, sizeof(err));
    if (rc < 0)
        fail_msg("'%s' refused: %d %s", json, rc, err);
    assert_int_equal(rc, count);
    assert_int_equal(out.count, count);
    for (size_t i = 0; i < count; i++) {
        if (strcmp(out.line[i], want[i]) != 0)
            fail_msg("'%s' line %zu:\n got  %s\n want %s", json, i, out.line[i], want[i]);
        assert_int_equal(out.len[i], strlen(want[i]));
        /* every produced line passes upstream validation */
        assert_int_equal(smartrest_validate_line(out.line[i], out.len[i], false, err, sizeof(err)),
                         0);
    }
    smartrest_lines_deinit(&out);
}

#define CONVERT(json, ...)                                                                         \
    do {                                                                                           \
        const char *w_[] = {__VA_ARGS__};                                                          \
        expect_lines(json, NULL, sizeof(w_) / sizeof(w_[0]), w_);                                  \
    } while (0)

/* Conversion must fail with -EINVAL, words containing @words, and leave a
 * non-empty list untouched. */
static void expect_refused_len(const char *json, size_t len, const char *words)
{
    struct smartrest_lines out;
    char err[SMARTREST_ERR_LEN] = "";

    smartrest_lines_init(&out);
    assert_int_equal(smartrest_lines_push(&out, "500", 3), 0);
    assert_int_equal(measure_convert(json, len, NULL, &out, err, sizeof(err)), -EINVAL);
    if (!strstr(err, words))
        fail_msg("error for '%s' is '%s', want '%s' in it", json, err, words);
    assert_int_equal(out.count, 1);
    assert_string_equal(out.line[0], "500");
    smartrest_lines_deinit(&out);
}

static void expect_refused(const char *json, const char *words)
{
    expect_refused_len(json, strlen(json), words);
}

static void test_single_series(void **state)
{
    /* the examples */
    CONVERT("{\"temperature\": 21.5, \"time\": \"2026-11-23T10:00:00Z\"}",
            "200,temperature,temperature,21.5,,2026-11-23T10:00:00Z");
    CONVERT("{\"temperature\": {\"T\": 21.5}}", "200,temperature,T,21.5");
    CONVERT("{\"temperature\": {\"T\": {\"value\": 21.5, \"unit\": \"C\"}}}",
            "200,temperature,T,21.5,C");
    /* the 200 example of the static templates page */
    CONVERT("{\"c8y_Temperature\": {\"T\": 25}}", "200,c8y_Temperature,T,25");
    /* value object straight under the fragment */
    CONVERT("{\"temperature\": {\"value\": 21.5, \"unit\": \"C\"}}",
            "200,temperature,temperature,21.5,C");
    CONVERT("{\"temperature\": {\"value\": -3}}", "200,temperature,temperature,-3");
    /* with unit and time; time first in the document changes nothing */
    CONVERT("{\"time\": \"2016-06-22T17:03:14.000+02:00\", \"c8y_Temperature\": {\"T\": "
            "{\"value\": 25, \"unit\": \"C\"}}}",
            "200,c8y_Temperature,T,25,C,2016-06-22T17:03:14.000+02:00");
}

static void test_numbers(void **state)
{
    CONVERT("{\"n\": 42}", "200,n,n,42");
    CONVERT("{\"n\": -9223372036854775807}", "200,n,n,-9223372036854775807");
    CONVERT("{\"n\": 0.1}", "200,n,n,0.1");
    CONVERT("{\"n\": -0.25}", "200,n,n,-0.25");
    CONVERT("{\"n\": 100.0}", "200,n,n,100");
    CONVERT("{\"n\": 1e300}", "200,n,n,1e+300");
    CONVERT("{\"n\": 3.141592653589793}", "200,n,n,3.141592653589793");
    CONVERT("{\"n\": 1.5e-7}", "200,n,n,1.5e-07");
}

static void test_multiple_series(void **state)
{
    /* the 201 example of the static templates page, written as JSON */
    CONVERT("{\"type\": \"KamstrupA220Reading\", \"time\": \"2022-03-19T12:03:27.845Z\","
            " \"c8y_SinglePhaseEnergyMeasurement\": {"
            "   \"A+:1\": {\"value\": 1234, \"unit\": \"kWh\"},"
            "   \"A-:1\": {\"value\": 2345, \"unit\": \"kWh\"}},"
            " \"c8y_ThreePhaseEnergyMeasurement\": {"
            "   \"A+:1\": {\"value\": 123, \"unit\": \"kWh\"},"
            "   \"A+:2\": {\"value\": 234, \"unit\": \"kWh\"},"
            "   \"A+:3\": {\"value\": 345, \"unit\": \"kWh\"}}}",
            "201,KamstrupA220Reading,2022-03-19T12:03:27.845Z,c8y_SinglePhaseEnergyMeasurement,"
            "A+:1,1234,kWh,c8y_SinglePhaseEnergyMeasurement,A-:1,2345,kWh,"
            "c8y_ThreePhaseEnergyMeasurement,A+:1,123,kWh,c8y_ThreePhaseEnergyMeasurement,A+:2,"
            "234,kWh,c8y_ThreePhaseEnergyMeasurement,A+:3,345,kWh");
    /* no type: the default; empty units stay positional, the trailing one
     * is left out */
    CONVERT("{\"temperature\": {\"T1\": 21.5, \"T2\": 22}, \"humidity\": 40}",
            "201,uplinkd_Measurement,,temperature,T1,21.5,,temperature,T2,22,,humidity,humidity,"
            "40");
    /* a "type" forces 201 even for one series */
    CONVERT("{\"temperature\": 21.5, \"type\": \"myType\"}",
            "201,myType,,temperature,temperature,21.5");
    /* the caller's default type */
    {
        const struct measure_options opts = {.default_type = "gw_Measurement"};
        const char *want[] = {"201,gw_Measurement,,a,a,1,,b,b,2"};

        expect_lines("{\"a\": 1, \"b\": 2}", &opts, 1, want);
    }
}

static void test_escaping_names(void **state)
{
    CONVERT("{\"my, frag\": {\"s\\\"x\": 1}}", "200,\"my, frag\",\"s\\\"x\",1");
    CONVERT("{\"f\": {\"s\": {\"value\": 1, \"unit\": \" deg C\"}}}", "200,f,s,1,\" deg C\"");
    CONVERT("{\"type\": \"a,b\", \"x\": 1}", "201,\"a,b\",,x,x,1");
}

static void test_time_forms(void **state)
{
    CONVERT("{\"t\": 1, \"time\": 1700000000}", "200,t,t,1,,2023-11-14T22:13:20.000Z");
    CONVERT("{\"t\": 1, \"time\": 1700000000.5}", "200,t,t,1,,2023-11-14T22:13:20.500Z");
    CONVERT("{\"t\": 1, \"time\": \"2026-11-23T10:00:00.123456789-05:30\"}",
            "200,t,t,1,,2026-11-23T10:00:00.123456789-05:30");

    expect_refused("{\"t\": 1, \"time\": \"yesterday\"}",
                   "\"time\" 'yesterday' is not an ISO 8601");
    expect_refused("{\"t\": 1, \"time\": \"2026-11-23T10:00:00\"}", "with an offset");
    expect_refused("{\"t\": 1, \"time\": \"2026-11-23T10:00:00.Z\"}", "not an ISO 8601");
    expect_refused("{\"t\": 1, \"time\": \"2026-11-23T10:00:00+0100\"}", "not an ISO 8601");
    expect_refused("{\"t\": 1, \"time\": true}", "\"time\" is a boolean");
    expect_refused("{\"t\": 1, \"time\": -5}", "between 1970 and 9999");
    expect_refused("{\"t\": 1, \"time\": 1e20}", "between 1970 and 9999");
}

static void test_pass_through(void **state)
{
    /* the static templates page's own lines pass verbatim */
    CONVERT("200,c8y_Temperature,T,25", "200,c8y_Temperature,T,25");
    CONVERT("201,KamstrupA220Reading,2022-03-19T12:03:27.845Z,c8y_SinglePhaseEnergyMeasurement,"
            "A+:1,1234,kWh",
            "201,KamstrupA220Reading,2022-03-19T12:03:27.845Z,c8y_SinglePhaseEnergyMeasurement,"
            "A+:1,1234,kWh");
    CONVERT("211,25,2016-06-22T17:03:14.000+02:00\r\n212,95\n\n",
            "211,25,2016-06-22T17:03:14.000+02:00", "212,95");
    CONVERT("500", "500");

    assert_true(measure_is_smartrest("200,x", 5));
    assert_true(measure_is_smartrest("500", 3));
    assert_true(measure_is_smartrest("500\n", 4));
    assert_false(measure_is_smartrest("21.5", 4));
    assert_false(measure_is_smartrest("{\"a\":1}", 7));
    assert_false(measure_is_smartrest(" 200,x", 6));
    assert_false(measure_is_smartrest("", 0));

    /* broken SmartREST is refused like broken JSON */
    expect_refused("200,c8y_Temperature,\"T,25", "line 1: unterminated quote");
    expect_refused("200,a,b,1\n400,x\ty", "line 2: raw control character");
}

static void test_refusals(void **state)
{
    expect_refused("", "empty payload");
    expect_refused(" \r\n", "empty payload");
    expect_refused("{\"a\": ", "not valid JSON: line 1 column");
    expect_refused("{\"a\": 1} trailing", "not valid JSON");
    expect_refused("{a: 1}", "not valid JSON");
    expect_refused_len("{\"a\": 1}\0", 9, "not valid JSON");
    expect_refused("{\"a\": \"\\u0000\"}", "not valid JSON");
    expect_refused("{\"a\": 1, \"a\": 2}", "duplicate");
    expect_refused("[1, 2]", "must be a JSON object such as {\"temperature\": 21.5}, not an array");
    expect_refused("21.5", "not a number");
    expect_refused("\"hot\"", "not a string");
    expect_refused("{}", "no measurement values");
    expect_refused("{\"time\": \"2026-11-23T10:00:00Z\"}", "no measurement values");
    expect_refused("{\"a\": \"hot\"}", "a is a string, not a number");
    expect_refused("{\"a\": true}", "a is a boolean, not a number");
    expect_refused("{\"a\": null}", "a is null, not a number");
    expect_refused("{\"a\": [1, 2]}", "a is an array: arrays are not measurements");
    expect_refused("{\"a\": {\"b\": [1]}}", "a.b is an array");
    expect_refused("{\"a\": {\"b\": \"1\"}}", "a.b is a string");
    expect_refused("{\"a\": {}}", "a is an empty object");
    expect_refused("{\"a\": {\"b\": {\"c\": {\"d\": 1}}}}", "a.b.c is nested too deeply");
    expect_refused("{\"a\": {\"b\": {\"value\": {\"x\": 1}}}}", "a.b.value is nested too deeply");
    expect_refused("{\"a\": {\"value\": [1]}}", "a.value is an array");
    expect_refused("{\"a\": {\"value\": \"1\"}}", "a.value is a string");
    expect_refused("{\"a\": {\"b\": {\"value\": 1, \"foo\": 2}}}", "unexpected key \"foo\" in a.b");
    expect_refused("{\"a\": {\"b\": {\"unit\": \"C\"}}}", "a.b has no \"value\"");
    expect_refused("{\"a\": {\"b\": {\"value\": 1, \"unit\": 5}}}", "a.b.unit is a number");
    expect_refused("{\"\": 1}", "fragment name is empty");
    expect_refused("{\"a\": {\"\": 1}}", "series name in a is empty");
    expect_refused("{\"type\": 5, \"a\": 1}", "\"type\" must be a non-empty string");
    expect_refused("{\"type\": \"\", \"a\": 1}", "an empty one");
    expect_refused("{\"x, y\\\\\": 1}", "backslash");
    /* jansson's own nesting limit is far away; ours is three levels */
    expect_refused("{\"a\": {\"b\": {\"c\": {\"d\": {\"e\": {\"f\": 1}}}}}}", "nested too deeply");
}

static void test_max_line_split(void **state)
{
    /* header "201,t,2026-11-23T10:00:00Z" is 26 bytes, each ",f,sN,1," group
     * 8 more (the empty unit's comma included). */
    const char *json = "{\"type\": \"t\", \"time\": \"2026-11-23T10:00:00Z\","
                       " \"f\": {\"s1\": 1, \"s2\": 2, \"s3\": 3}}";
    const struct measure_options two = {.max_line = 26 + 8 + 8};
    const char *want_two[] = {"201,t,2026-11-23T10:00:00Z,f,s1,1,,f,s2,2",
                              "201,t,2026-11-23T10:00:00Z,f,s3,3"};
    const struct measure_options one = {.max_line = 26 + 8};
    const char *want_one[] = {"201,t,2026-11-23T10:00:00Z,f,s1,1",
                              "201,t,2026-11-23T10:00:00Z,f,s2,2",
                              "201,t,2026-11-23T10:00:00Z,f,s3,3"};
    const struct measure_options none = {.max_line = 26 + 7};
    struct smartrest_lines out;
    char err[SMARTREST_ERR_LEN] = "";

    expect_lines(json, &two, 2, want_two);
    expect_lines(json, &one, 3, want_one);

    smartrest_lines_init(&out);
    assert_int_equal(measure_convert(json, strlen(json), &none, &out, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "measurement f.s1 makes a SmartREST line of 34 bytes, over the "
                                "33-byte limit"));
    assert_int_equal(out.count, 0);
    /* 200 too */
    {
        const struct measure_options tiny = {.max_line = 8};

        assert_int_equal(measure_convert("{\"a\": 1}", 8, &tiny, &out, err, sizeof(err)), -EINVAL);
        assert_non_null(strstr(err, "line of 9 bytes, over the 8-byte limit"));
    }
    smartrest_lines_deinit(&out);
}

static void test_appends(void **state)
{
    struct smartrest_lines out;
    char err[SMARTREST_ERR_LEN] = "";

    smartrest_lines_init(&out);
    assert_int_equal(measure_convert("{\"a\": 1}", 8, NULL, &out, err, sizeof(err)), 1);
    assert_int_equal(measure_convert("{\"b\": 2}", 8, NULL, &out, err, sizeof(err)), 1);
    assert_int_equal(measure_convert("200,c,c,3\n200,d,d,4", 19, NULL, &out, err, sizeof(err)), 2);
    assert_int_equal(out.count, 4);
    assert_string_equal(out.line[0], "200,a,a,1");
    assert_string_equal(out.line[1], "200,b,b,2");
    assert_string_equal(out.line[3], "200,d,d,4");
    /* NULL err is fine */
    assert_int_equal(measure_convert("{", 1, NULL, &out, NULL, 0), -EINVAL);
    assert_int_equal(out.count, 4);
    smartrest_lines_deinit(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_series),   cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_multiple_series), cmocka_unit_test(test_escaping_names),
        cmocka_unit_test(test_time_forms),      cmocka_unit_test(test_pass_through),
        cmocka_unit_test(test_refusals),        cmocka_unit_test(test_max_line_split),
        cmocka_unit_test(test_appends),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
