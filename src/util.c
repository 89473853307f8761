/* util.c - small helpers shared by the daemon modules and tests. */
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Reads a run of decimal digits at *pos. Sets *pos past them. Returns 0,
 * -EINVAL when there is no digit, -ERANGE when the number exceeds UINT64_MAX. */
static int parse_digits(const char **pos, uint64_t *out)
{
    const char *p = *pos;
    uint64_t value = 0;

    if (*p < '0' || *p > '9')
        return -EINVAL;
    while (*p >= '0' && *p <= '9') {
        unsigned digit = (unsigned)(*p - '0');
        if (value > (UINT64_MAX - digit) / 10)
            return -ERANGE;
        value = value * 10 + digit;
        p++;
    }
    *pos = p;
    *out = value;
    return 0;
}

static int mul_add(uint64_t *acc, uint64_t value, uint64_t factor)
{
    if (factor != 0 && value > UINT64_MAX / factor)
        return -ERANGE;
    if (*acc > UINT64_MAX - value * factor)
        return -ERANGE;
    *acc += value * factor;
    return 0;
}

static void skip_spaces(const char **pos)
{
    while (**pos == ' ')
        (*pos)++;
}

struct unit {
    const char *suffix;
    uint64_t factor;
};

/* Longest suffixes first so that "ms" is not read as "m" followed by junk. */
static const struct unit duration_units[] = {
    {"ms", 1}, {"s", 1000}, {"m", 60 * 1000}, {"h", 3600 * 1000}, {"d", 86400 * 1000},
};

/* Duration grammar: a bare number of seconds ("30"), or one or more
 * NUMBER UNIT terms ("1h30m"), with optional spaces between a number and its
 * unit. Fractions are not accepted: "1.5s" is written "1500ms". */
int util_parse_duration_ms(const char *text, uint64_t *out)
{
    const char *p = text;
    uint64_t total = 0;
    int terms = 0;
    int rc;

    if (text == NULL || out == NULL)
        return -EINVAL;
    while (*p != '\0') {
        uint64_t value;
        const struct unit *unit = NULL;

        rc = parse_digits(&p, &value);
        if (rc < 0)
            return rc;
        skip_spaces(&p);
        if (*p == '\0' && terms == 0) {
            /* a bare number is seconds */
            rc = mul_add(&total, value, 1000);
            if (rc < 0)
                return rc;
            terms++;
            break;
        }
        for (size_t i = 0; i < ARRAY_SIZE(duration_units); i++) {
            size_t n = strlen(duration_units[i].suffix);
            if (strncmp(p, duration_units[i].suffix, n) == 0 && !(p[n] >= 'a' && p[n] <= 'z')) {
                unit = &duration_units[i];
                p += n;
                break;
            }
        }
        if (unit == NULL)
            return -EINVAL;
        rc = mul_add(&total, value, unit->factor);
        if (rc < 0)
            return rc;
        terms++;
    }
    if (terms == 0)
        return -EINVAL;
    *out = total;
    return 0;
}

static const struct unit size_units[] = {
    {"B", 1},
    {"KiB", 1024ULL},
    {"MiB", 1024ULL * 1024},
    {"GiB", 1024ULL * 1024 * 1024},
    {"TiB", 1024ULL * 1024 * 1024 * 1024},
    {"kB", 1000ULL},
    {"KB", 1000ULL},
    {"MB", 1000ULL * 1000},
    {"GB", 1000ULL * 1000 * 1000},
    {"TB", 1000ULL * 1000 * 1000 * 1000},
};

int util_parse_size(const char *text, uint64_t *out)
{
    const char *p = text;
    uint64_t value;
    uint64_t total = 0;
    uint64_t factor = 1;
    int rc;

    if (text == NULL || out == NULL)
        return -EINVAL;
    rc = parse_digits(&p, &value);
    if (rc < 0)
        return rc;
    skip_spaces(&p);
    if (*p != '\0') {
        size_t i;
        for (i = 0; i < ARRAY_SIZE(size_units); i++) {
            if (strcmp(p, size_units[i].suffix) == 0)
                break;
        }
        if (i == ARRAY_SIZE(size_units))
            return -EINVAL;
        factor = size_units[i].factor;
    }
    rc = mul_add(&total, value, factor);
    if (rc < 0)
        return rc;
    *out = total;
    return 0;
}

char *util_strdup_or_null(const char *s)
{
    return s == NULL ? NULL : strdup(s);
}

uint64_t util_now_ms(void)
{
    struct timespec ts;

    /* CLOCK_MONOTONIC cannot fail with a valid pointer on Linux. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int util_read_file(const char *path, size_t max, char **out, size_t *len)
{
    struct stat st;
    char *buf = NULL;
    size_t used = 0;
    size_t cap;
    int fd;
    int rc;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto err_after_open;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = -EISDIR;
        goto err_after_open;
    }
    /* st_size is only a hint (procfs, pipes report 0); read until EOF. */
    cap = (S_ISREG(st.st_mode) && st.st_size > 0 && (uint64_t)st.st_size <= max)
              ? (size_t)st.st_size + 1
              : 4096;
    buf = malloc(cap);
    if (buf == NULL) {
        rc = -ENOMEM;
        goto err_after_open;
    }
    for (;;) {
        ssize_t n;

        if (used == cap - 1) {
            size_t new_cap;
            char *grown;

            if (used > max) {
                rc = -EFBIG;
                goto err_after_alloc;
            }
            new_cap = cap * 2;
            if (max < SIZE_MAX - 2 && new_cap > max + 2)
                new_cap = max + 2; /* room for one byte past max, to detect EFBIG */
            if (new_cap <= cap) {
                rc = -EFBIG;
                goto err_after_alloc;
            }
            grown = realloc(buf, new_cap);
            if (grown == NULL) {
                rc = -ENOMEM;
                goto err_after_alloc;
            }
            buf = grown;
            cap = new_cap;
        }
        n = read(fd, buf + used, cap - 1 - used);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto err_after_alloc;
        }
        if (n == 0)
            break;
        used += (size_t)n;
        if (used > max) {
            rc = -EFBIG;
            goto err_after_alloc;
        }
    }
    close(fd);
    buf[used] = '\0';
    *out = buf;
    if (len != NULL)
        *len = used;
    return 0;

err_after_alloc:
    free(buf);
err_after_open:
    close(fd);
    return rc;
}

void util_set_err(char *err, size_t size, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || size == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}
