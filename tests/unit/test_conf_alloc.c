/* test_conf_alloc.c - conf_load() when memory runs out: every allocation of
 * loading a fixture is failed in turn (fail_alloc.h). Each run must report
 * -ENOMEM (not a configuration error, and never a configuration that
 * loaded with a piece missing), give no conf, and leak nothing (the
 * sanitizer and valgrind runs of the suite check the leaks). */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "conf.h"
#include "fail_alloc.h"

static void fixture_path(char *buf, size_t size, const char *name)
{
    const char *dir = getenv("UPLINKD_TEST_DATA");
    int n;

    if (dir == NULL)
        fail_msg("UPLINKD_TEST_DATA is not set (run through meson test)");
    n = snprintf(buf, size, "%s/conf/%s", dir, name);
    assert_true(n > 0 && (size_t)n < size);
}

static void fail_each_allocation(const char *name)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    char *errors = NULL;
    size_t total;

    fixture_path(path, sizeof(path), name);
    fail_alloc_at(0);
    assert_int_equal(conf_load(path, &conf, &errors), 0);
    total = fail_alloc_count();
    conf_free(conf);
    assert_true(total > 10); /* the fixture exercises the loader */
    print_message("%s: failing each of %zu allocations\n", name, total);
    for (size_t i = 1; i <= total; i++) {
        conf = NULL;
        errors = NULL;
        fail_alloc_at(i);
        int rc = conf_load(path, &conf, &errors);
        bool fired = fail_alloc_fired();
        fail_alloc_at(0);
        assert_true(fired); /* the run allocates as the counted one did */
        if (rc != -ENOMEM)
            fail_msg("%s: allocation %zu of %zu failed: conf_load = %d (expected -ENOMEM)%s%s",
                     name, i, total, rc, errors ? ":\n" : "", errors ? errors : "");
        assert_null(conf);
        free(errors);
    }
}

static void test_full(void **state)
{
    (void)state;
    fail_each_allocation("good-full.yaml");
}

static void test_gcp(void **state)
{
    (void)state;
    fail_each_allocation("good-gcp.yaml");
}

static void test_acl(void **state)
{
    (void)state;
    fail_each_allocation("good-acl.yaml");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_gcp),
        cmocka_unit_test(test_acl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
