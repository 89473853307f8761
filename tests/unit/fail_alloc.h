/* fail_alloc.h - an allocator that fails on demand, for unit tests.
 *
 * A test program linked with fail_alloc.c and the linker flags in
 * tests/unit/meson.build (fail_alloc_link_args: -Wl,--wrap=malloc and the
 * same for calloc, realloc, strdup and strndup) routes every allocation of
 * the code under test through here. fail_alloc_at(N) makes the Nth call
 * from then on return NULL (errno ENOMEM), once; the rest succeed. A test
 * counts the allocations of a successful run with fail_alloc_count(), then
 * repeats the run failing each one in turn: the code must report the
 * failure, leak nothing (ASan and valgrind check that) and crash nowhere.
 *
 * Only the code linked into the test program is wrapped: allocations
 * inside shared libraries (libyaml, OpenSSL) are not counted or failed.
 * Only the allocations of the thread that called fail_alloc_at() count:
 * those of libuv's threadpool run at their own pace.
 */
#ifndef UPLINKD_TEST_FAIL_ALLOC_H
#define UPLINKD_TEST_FAIL_ALLOC_H

#include <stddef.h>

/* Fail the @n-th allocation from now (1 = the next one); 0 turns it off.
 * Resets the count. */
void fail_alloc_at(size_t n);

/* Allocations since the last fail_alloc_at(). */
size_t fail_alloc_count(void);

/* Whether the requested failure has happened. */
int fail_alloc_fired(void);

#endif
