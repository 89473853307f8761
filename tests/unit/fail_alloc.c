/* fail_alloc.c - the allocator that fails on demand (fail_alloc.h). */
#include "fail_alloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

void *__real_malloc(size_t size);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t size);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);

void *__wrap_malloc(size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t size);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);

static size_t fail_at; /* 0: never */
static size_t count;   /* allocations since fail_alloc_at() */
static int fired;
/* The thread that called fail_alloc_at(): only its allocations count. A
 * daemon under test also allocates in work it puts on libuv's threadpool
 * (an uplink's connection set-up), at that thread's own pace; counting
 * those would make the Nth allocation a different one from run to run. */
static pthread_t owner;

void fail_alloc_at(size_t n)
{
    owner = pthread_self();
    fail_at = n;
    count = 0;
    fired = 0;
}

size_t fail_alloc_count(void)
{
    return count;
}

int fail_alloc_fired(void)
{
    return fired;
}

/* true when this allocation is the one to fail. */
static int should_fail(void)
{
    if (!pthread_equal(pthread_self(), owner))
        return 0;
    count++;
    if (fail_at != 0 && count == fail_at) {
        fired = 1;
        errno = ENOMEM;
        return 1;
    }
    return 0;
}

void *__wrap_malloc(size_t size)
{
    return should_fail() ? NULL : __real_malloc(size);
}

void *__wrap_calloc(size_t n, size_t size)
{
    return should_fail() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t size)
{
    return should_fail() ? NULL : __real_realloc(p, size);
}

char *__wrap_strdup(const char *s)
{
    return should_fail() ? NULL : __real_strdup(s);
}

char *__wrap_strndup(const char *s, size_t n)
{
    return should_fail() ? NULL : __real_strndup(s, n);
}
