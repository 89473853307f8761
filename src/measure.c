/* measure.c - local JSON measurements -> Cumulocity SmartREST 200/201 lines.
 *
 * Static templates used (Cumulocity "MQTT static templates", SoftwareAG/
 * c8y-docs content/smartrest/mqtt-static-templates.md, sections
 * "Create custom measurement (200)" and "Create a custom measurement with
 * multiple fragments and series (201)"):
 *   200: 1 fragment (mandatory), 2 series (mandatory), 3 value (Number,
 *        mandatory), 4 unit, 5 time (default: server time)
 *        e.g. 200,c8y_Temperature,T,25
 *   201: 1 type (mandatory), 2 time, then 4 values per fragment-series
 *        combination: fragment, series, value (Number), unit
 *        e.g. 201,KamstrupA220Reading,2022-03-19T12:03:27.845Z,
 *             c8y_SinglePhaseEnergyMeasurement,A+:1,1234,kWh,...
 * The same page: trailing empty optional fields may be left out.
 */
#include "measure.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

/* Longest "time" string accepted: ISO 8601 with nanoseconds and an offset
 * is 35 bytes. */
#define TIME_MAX_LEN 40
/* A JSON number printed with at most 17 significant digits and an
 * exponent, or a 64-bit integer. */
#define VALUE_MAX_LEN 32

struct series {
    const char *fragment; /* borrowed from the JSON document */
    const char *name;
    const char *unit; /* NULL when none */
    char value[VALUE_MAX_LEN];
};

struct measurement {
    struct series *series;
    size_t count;
    size_t cap;
    const char *type; /* NULL when the JSON names none */
    char time[TIME_MAX_LEN + 1];
};

static const char *json_kind(const json_t *value)
{
    switch (json_typeof(value)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "unknown";
}

bool measure_is_smartrest(const char *payload, size_t len)
{
    size_t i = 0;

    while (i < len && payload[i] >= '0' && payload[i] <= '9')
        i++;
    if (i == 0)
        return false;
    return i == len || payload[i] == ',' || payload[i] == '\r' || payload[i] == '\n';
}

/* The shortest decimal text that reads back as the same double, so 21.5
 * stays "21.5" and 0.1 does not become 0.10000000000000001. */
static void format_number(const json_t *number, char *out, size_t out_len)
{
    if (json_is_integer(number)) {
        snprintf(out, out_len, "%" JSON_INTEGER_FORMAT, json_integer_value(number));
        return;
    }
    double v = json_real_value(number);

    for (int precision = 1; precision <= 17; precision++) {
        const char *e;

        snprintf(out, out_len, "%.*g", precision, v);
        if (strtod(out, NULL) != v)
            continue;
        /* %g chose an exponent because the precision was short ("1e+02"
         * for 100): print the integer digits instead while they are few. */
        e = strchr(out, 'e');
        if (e && atoi(e + 1) >= 0 && atoi(e + 1) < 17)
            snprintf(out, out_len, "%.*g", atoi(e + 1) + 1, v);
        return;
    }
}

static bool digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* ISO 8601 / RFC 3339 date-time with an explicit offset, the form of
 * Cumulocity's examples (2016-06-22T17:03:14.000+02:00,
 * 2022-03-19T12:03:27.845Z). Without an offset the cloud would have to
 * guess the zone, so it is refused here with a reason instead of there. */
static bool iso8601_ok(const char *s)
{
    size_t len = strlen(s), i = 19;

    if (len < 20 || len > TIME_MAX_LEN)
        return false;
    if (!digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) || s[7] != '-' || !digits(s + 8, 2) ||
        s[10] != 'T' || !digits(s + 11, 2) || s[13] != ':' || !digits(s + 14, 2) || s[16] != ':' ||
        !digits(s + 17, 2))
        return false;
    if (s[i] == '.') {
        size_t start = ++i;

        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (s[i] == 'Z')
        return i + 1 == len;
    if (s[i] != '+' && s[i] != '-')
        return false;
    return len - i == 6 && digits(s + i + 1, 2) && s[i + 3] == ':' && digits(s + i + 4, 2);
}

static int parse_time(const json_t *value, struct measurement *m, char *err, size_t err_len)
{
    if (json_is_string(value)) {
        const char *text = json_string_value(value);

        if (!iso8601_ok(text)) {
            util_set_err(err, err_len,
                         "\"time\" '%.40s' is not an ISO 8601 date-time with an offset, such as "
                         "2026-11-23T10:00:00Z or 2026-11-23T11:00:00.000+01:00",
                         text);
            return -EINVAL;
        }
        snprintf(m->time, sizeof(m->time), "%s", text);
        return 0;
    }
    if (json_is_number(value)) {
        /* Unix seconds, as many sensors count; written in UTC with ms. */
        double seconds = json_number_value(value);
        struct tm tm;
        time_t whole;
        long ms;

        if (!(seconds >= 0 && seconds < 253402300800.0)) { /* year 10000 */
            util_set_err(err, err_len,
                         "\"time\" %.3f is not a Unix time in seconds between 1970 and 9999",
                         seconds);
            return -EINVAL;
        }
        whole = (time_t)seconds;
        ms = (long)((seconds - (double)whole) * 1000.0);
        if (!gmtime_r(&whole, &tm)) {
            util_set_err(err, err_len, "\"time\" %.3f cannot be converted to a date", seconds);
            return -EINVAL;
        }
        snprintf(m->time, sizeof(m->time), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 ms);
        return 0;
    }
    util_set_err(err, err_len,
                 "\"time\" is %s: give an ISO 8601 string such as \"2026-11-23T10:00:00Z\" or Unix "
                 "seconds",
                 json_kind(value));
    return -EINVAL;
}

static int add_series(struct measurement *m, const char *fragment, const char *name,
                      const json_t *value, const char *unit)
{
    struct series *s;

    if (m->count == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 8;
        struct series *grown = realloc(m->series, cap * sizeof(*grown));

        if (!grown)
            return -ENOMEM;
        m->series = grown;
        m->cap = cap;
    }
    s = &m->series[m->count++];
    s->fragment = fragment;
    s->name = name;
    s->unit = unit;
    format_number(value, s->value, sizeof(s->value));
    return 0;
}

/* Words for a value that should have been a number; @path is where the
 * user put it ("temperature" or "temperature.T"). */
static int not_a_number(const char *path, const json_t *value, char *err, size_t err_len)
{
    if (json_is_array(value))
        util_set_err(err, err_len,
                     "%s is an array: arrays are not measurements, send one value per series "
                     "(e.g. {\"temperature\": {\"T1\": 21.5, \"T2\": 22}})",
                     path);
    else if (json_is_object(value))
        util_set_err(err, err_len,
                     "%s is nested too deeply: measurements are fragment.series.value, e.g. "
                     "{\"temperature\": {\"T\": {\"value\": 21.5, \"unit\": \"C\"}}}",
                     path);
    else
        util_set_err(err, err_len, "%s is %s, not a number", path, json_kind(value));
    return -EINVAL;
}

/* Whether @object has the keys of {"value": ..., "unit": ...}: value
 * required, unit optional, nothing else. */
static bool is_value_object(const json_t *object)
{
    size_t size = json_object_size(object);

    if (!json_object_get(object, "value"))
        return false;
    return size == 1 || (size == 2 && json_object_get(object, "unit"));
}

/* A {"value", "unit"} object at @path as the series @name of @fragment. */
static int add_value_object(struct measurement *m, const char *fragment, const char *name,
                            const char *path, const json_t *object, char *err, size_t err_len)
{
    const json_t *value = json_object_get(object, "value");
    const json_t *unit = json_object_get(object, "unit");
    char where[SMARTREST_ERR_LEN];
    const char *key;
    json_t *member;

    json_object_foreach((json_t *)object, key, member)
    {
        if (strcmp(key, "value") == 0 || strcmp(key, "unit") == 0)
            continue;
        snprintf(where, sizeof(where), "%s.%s", path, key);
        if (json_is_object(member) || json_is_array(member))
            return not_a_number(where, member, err, err_len);
        util_set_err(err, err_len,
                     "unexpected key \"%s\" in %s: a series holds a number, or only \"value\" and "
                     "\"unit\"",
                     key, path);
        return -EINVAL;
    }
    if (!value) {
        util_set_err(err, err_len, "%s has no \"value\"", path);
        return -EINVAL;
    }
    if (!json_is_number(value)) {
        snprintf(where, sizeof(where), "%s.value", path);
        return not_a_number(where, value, err, err_len);
    }
    if (unit && !json_is_string(unit)) {
        util_set_err(err, err_len, "%s.unit is %s, not a string", path, json_kind(unit));
        return -EINVAL;
    }
    return add_series(m, fragment, name, value, unit ? json_string_value(unit) : NULL);
}

static int add_fragment(struct measurement *m, const char *fragment, const json_t *value, char *err,
                        size_t err_len)
{
    char path[SMARTREST_ERR_LEN];
    const char *name;
    json_t *member;
    int rc;

    if (fragment[0] == '\0') {
        util_set_err(err, err_len, "a fragment name is empty");
        return -EINVAL;
    }
    /* {"temperature": 21.5}: the series takes the fragment's name. */
    if (json_is_number(value))
        return add_series(m, fragment, fragment, value, NULL);
    if (!json_is_object(value))
        return not_a_number(fragment, value, err, err_len);
    if (json_object_size(value) == 0) {
        util_set_err(err, err_len, "%s is an empty object: no series in it", fragment);
        return -EINVAL;
    }
    /* {"temperature": {"value": 21.5, "unit": "C"}}: likewise, with a unit. */
    if (is_value_object(value))
        return add_value_object(m, fragment, fragment, fragment, value, err, err_len);
    json_object_foreach((json_t *)value, name, member)
    {
        if (name[0] == '\0') {
            util_set_err(err, err_len, "a series name in %s is empty", fragment);
            return -EINVAL;
        }
        snprintf(path, sizeof(path), "%s.%s", fragment, name);
        if (json_is_number(member))
            rc = add_series(m, fragment, name, member, NULL);
        else if (json_is_object(member))
            rc = add_value_object(m, fragment, name, path, member, err, err_len);
        else
            rc = not_a_number(path, member, err, err_len);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int collect(const json_t *root, struct measurement *m, char *err, size_t err_len)
{
    const char *key;
    json_t *value;
    int rc;

    if (!json_is_object(root)) {
        util_set_err(err, err_len,
                     "a measurement must be a JSON object such as {\"temperature\": 21.5}, not %s",
                     json_kind(root));
        return -EINVAL;
    }
    /* "time" and "type" are the measurement's own properties in
     * Cumulocity's measurement model, never fragments. */
    json_object_foreach((json_t *)root, key, value)
    {
        if (strcmp(key, "time") == 0) {
            rc = parse_time(value, m, err, err_len);
        } else if (strcmp(key, "type") == 0) {
            if (!json_is_string(value) || json_string_value(value)[0] == '\0') {
                util_set_err(err, err_len, "\"type\" must be a non-empty string, not %s",
                             json_is_string(value) ? "an empty one" : json_kind(value));
                return -EINVAL;
            }
            m->type = json_string_value(value);
            rc = 0;
        } else {
            rc = add_fragment(m, key, value, err, err_len);
        }
        if (rc < 0)
            return rc;
    }
    if (m->count == 0) {
        util_set_err(err, err_len,
                     "no measurement values: give at least one, e.g. {\"temperature\": 21.5}");
        return -EINVAL;
    }
    return 0;
}

/* The words for an encoder failure carry the value's origin. */
static int add_field(struct smartrest_line *line, const char *value, char *err, size_t err_len)
{
    int rc = smartrest_line_add_str(line, value, err, err_len);

    if (rc == -ENOMEM || line->failed)
        return -ENOMEM;
    return rc;
}

static int emit_200(const struct measurement *m, size_t max_line, struct smartrest_lines *out,
                    char *err, size_t err_len)
{
    const struct series *s = &m->series[0];
    const char *fields[6] = {"200",  s->fragment, s->name, s->value, s->unit ? s->unit : "",
                             m->time};
    size_t count = 6;
    struct smartrest_line line;
    int rc = 0;

    /* Optional trailing fields may be left out (static templates page). */
    while (count > 4 && fields[count - 1][0] == '\0')
        count--;
    smartrest_line_init(&line);
    for (size_t i = 0; i < count && rc == 0; i++)
        rc = add_field(&line, fields[i], err, err_len);
    if (rc < 0)
        goto out;
    if (max_line && line.len > max_line) {
        util_set_err(
            err, err_len,
            "measurement %s.%s makes a SmartREST line of %zu bytes, over the %zu-byte limit",
            s->fragment, s->name, line.len, max_line);
        rc = -EINVAL;
        goto out;
    }
    rc = smartrest_lines_push(out, line.data, line.len);
out:
    smartrest_line_deinit(&line);
    return rc;
}

static int start_201(struct smartrest_line *line, const char *type, const char *time, char *err,
                     size_t err_len)
{
    int rc = add_field(line, "201", err, err_len);

    if (rc == 0)
        rc = add_field(line, type, err, err_len);
    if (rc == 0)
        rc = add_field(line, time, err, err_len);
    return rc;
}

/* Push a 201 line without its trailing empty fields: an empty field adds
 * nothing but its comma, and a quoted one ends with '"', so stripping the
 * trailing commas drops exactly the empty optional fields at the end. */
static int push_201(struct smartrest_lines *out, const struct smartrest_line *line)
{
    size_t len = line->len;

    while (len > 0 && line->data[len - 1] == ',')
        len--;
    return smartrest_lines_push(out, line->data, len);
}

static int emit_201(const struct measurement *m, const char *type, size_t max_line,
                    struct smartrest_lines *out, char *err, size_t err_len)
{
    struct smartrest_line line;
    size_t groups = 0;
    int rc;

    smartrest_line_init(&line);
    rc = start_201(&line, type, m->time, err, err_len);
    for (size_t i = 0; i < m->count && rc == 0; i++) {
        const struct series *s = &m->series[i];
        size_t saved_len = line.len, saved_fields = line.fields;

        rc = add_field(&line, s->fragment, err, err_len);
        if (rc == 0)
            rc = add_field(&line, s->name, err, err_len);
        if (rc == 0)
            rc = add_field(&line, s->value, err, err_len);
        if (rc == 0)
            rc = add_field(&line, s->unit ? s->unit : "", err, err_len);
        if (rc < 0)
            break;
        if (!max_line || line.len <= max_line) {
            groups++;
            continue;
        }
        if (groups == 0) {
            util_set_err(err, err_len,
                         "measurement %s.%s makes a SmartREST line of %zu bytes, over the %zu-byte "
                         "limit",
                         s->fragment, s->name, line.len, max_line);
            rc = -EINVAL;
            break;
        }
        /* Too long: close this line before the series and start another
         * 201 with the same type and time for it. */
        line.len = saved_len;
        line.fields = saved_fields;
        line.data[line.len] = '\0';
        rc = push_201(out, &line);
        if (rc < 0)
            break;
        line.len = 0;
        line.fields = 0;
        groups = 0;
        rc = start_201(&line, type, m->time, err, err_len);
        i--; /* this series again, on the fresh line */
    }
    if (rc == 0 && groups > 0)
        rc = push_201(out, &line);
    smartrest_line_deinit(&line);
    return rc;
}

int measure_convert(const char *payload, size_t len, const struct measure_options *opts,
                    struct smartrest_lines *out, char *err, size_t err_len)
{
    static const struct measure_options defaults;
    struct measurement m = {0};
    size_t before = out->count, i = 0;
    json_error_t jerr;
    json_t *root;
    int rc;

    if (!opts)
        opts = &defaults;
    while (i < len &&
           (payload[i] == ' ' || payload[i] == '\t' || payload[i] == '\r' || payload[i] == '\n'))
        i++;
    if (i == len) {
        util_set_err(err, err_len, "empty payload: send SmartREST lines or a JSON measurement");
        return -EINVAL;
    }
    if (measure_is_smartrest(payload, len))
        return smartrest_payload_split(payload, len, false, out, err, err_len);

    /* Duplicate keys would silently drop a value: refuse them. Any top
     * level is decoded so that "21.5" is refused as "not an object". */
    root = json_loadb(payload, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        util_set_err(err, err_len, "not SmartREST and not valid JSON: line %d column %d: %s",
                     jerr.line, jerr.column, jerr.text);
        return -EINVAL;
    }
    rc = collect(root, &m, err, err_len);
    if (rc < 0)
        goto out;
    if (m.count == 1 && !m.type)
        rc = emit_200(&m, opts->max_line, out, err, err_len);
    else
        rc = emit_201(&m,
                      m.type               ? m.type
                      : opts->default_type ? opts->default_type
                                           : MEASURE_DEFAULT_TYPE,
                      opts->max_line, out, err, err_len);
    if (rc == -ENOMEM)
        util_set_err(err, err_len, "out of memory converting a measurement");
out:
    if (rc < 0)
        smartrest_lines_truncate(out, before);
    else
        rc = (int)(out->count - before);
    free(m.series);
    json_decref(root);
    return rc;
}
