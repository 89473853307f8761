/* measure.h - local JSON measurements -> Cumulocity SmartREST 200/201 lines.
 *
 * A local app publishes on dev/<child>/telemetry either SmartREST lines
 * (passed through after validation) or one JSON object:
 *
 *   {"temperature": 21.5}                          one series, named after
 *                                                  its fragment
 *   {"temperature": {"value": 21.5, "unit": "C"}}  the same with a unit
 *   {"temperature": {"T": 21.5}}                   fragment / series
 *   {"temperature": {"T": {"value": 21.5, "unit": "C"}}}
 *   ... plus optional "time" (ISO 8601 string, or Unix seconds as a number)
 *   and "type" (the measurement type, forces the 201 form).
 *
 * One series and no "type" becomes a static template 200 line
 *   200,<fragment>,<series>,<value>,<unit>,<time>
 * anything else one 201 line (several when it would not fit in @max_line)
 *   201,<type>,<time>,<fragment>,<series>,<value>,<unit>,...
 * (Cumulocity "MQTT static templates", 200 and 201; SoftwareAG/c8y-docs
 * content/smartrest/mqtt-static-templates.md). Series keep the JSON
 * document's order.
 *
 * Parsing is jansson's; nothing here reads JSON by hand.
 */
#ifndef UPLINKD_MEASURE_H
#define UPLINKD_MEASURE_H

#include <stdbool.h>
#include <stddef.h>

#include "smartrest.h"

/* The 201 type when the JSON names none. */
#define MEASURE_DEFAULT_TYPE "uplinkd_Measurement"

/* Options for measure_convert(); a zeroed struct gives the defaults. */
struct measure_options {
    const char *default_type; /* 201 type when JSON has no "type";
                                 NULL = MEASURE_DEFAULT_TYPE. Borrowed. */
    size_t max_line;          /* longest line to produce, in bytes; a 201
                                 measurement is split across lines to stay
                                 within it. 0 = no limit. The caller derives
                                 it from the packet limit and the topic. */
};

/**
 * measure_is_smartrest() - whether @payload looks like SmartREST rather than
 * JSON: it starts with a numeric message id followed by ',', a line break
 * or the end (e.g. "200,c8y_Temperature,T,25" or "500"). A JSON document
 * never does: a bare number is no measurement object.
 */
bool measure_is_smartrest(const char *payload, size_t len);

/**
 * measure_convert() - turn one telemetry payload into SmartREST lines.
 * @payload, @len: the local publish's payload (borrowed; need not be
 *                 NUL-terminated).
 * @opts: options, may be NULL for the defaults.
 * @out: the lines are appended here (all or nothing: on error @out is as it
 *       was). Each line is ready for smartrest_pack().
 *
 * SmartREST input (measure_is_smartrest()) is split and validated with
 * smartrest_payload_split() (numeric ids only) and passes through verbatim.
 *
 * Returns the number of lines appended (>= 1), -ENOMEM, or -EINVAL with the
 * reason in words in @err: broken JSON (with jansson's line and column), a
 * top level that is not an object, a value that is not a number (strings,
 * booleans, null), an array, nesting deeper than fragment.series.value, an
 * unknown key beside "value"/"unit", a "time" that is not ISO 8601, no
 * values at all, or one series too long for @max_line.
 */
int measure_convert(const char *payload, size_t len, const struct measure_options *opts,
                    struct smartrest_lines *out, char *err, size_t err_len);

#endif
