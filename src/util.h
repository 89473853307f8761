/* util.h - small helpers shared by the daemon modules and tests. */
#ifndef UPLINKD_UTIL_H
#define UPLINKD_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef container_of
#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#endif

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/**
 * util_parse_duration_ms() - parse "250ms", "5s", "10m", "1h", "2d" or a bare
 * number of seconds into milliseconds. Returns 0 or -EINVAL (bad form) /
 * -ERANGE (does not fit in @out).
 */
int util_parse_duration_ms(const char *text, uint64_t *out);

/**
 * util_parse_size() - parse "512", "64KiB", "256MiB", "1GiB" (also kB/MB/GB as
 * powers of 1000) into bytes. Returns 0, -EINVAL or -ERANGE.
 */
int util_parse_size(const char *text, uint64_t *out);

/**
 * util_set_err() - format a message into @err (@size bytes) for a caller
 * that asked for one; does nothing when @err is NULL or @size is 0.
 */
void util_set_err(char *err, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/** util_strdup_or_null() - strdup() that passes NULL through. */
char *util_strdup_or_null(const char *s);

/** util_now_ms() - CLOCK_MONOTONIC in milliseconds. */
uint64_t util_now_ms(void);

/**
 * util_read_file() - read a whole (small) file into a NUL-terminated malloc'd
 * buffer, at most @max bytes. Returns 0 or a negative errno (-EFBIG when
 * larger than @max).
 */
int util_read_file(const char *path, size_t max, char **out, size_t *len);

#endif
