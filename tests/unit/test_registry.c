/* test_registry.c - registry.c, the children a profile registered with its
 * cloud: persistent entries survive a reopen (file mode 0600), volatile ones
 * do not, removal, bad ids, a damaged file refused, a registry kept in
 * memory only, and a file that cannot be written (the memory state still
 * set, the error returned). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "registry.h"

static char state_dir[64];

static int group_setup(void **unused)
{
    (void)unused;
    snprintf(state_dir, sizeof(state_dir), "/tmp/test_registry.XXXXXX");
    return mkdtemp(state_dir) ? 0 : -1;
}

static int group_teardown(void **unused)
{
    char cmd[128];

    (void)unused;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", state_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_registry_persists(void **unused)
{
    char path[256];
    struct registry *reg;
    struct stat st;

    (void)unused;
    snprintf(path, sizeof(path), "%s/reg-test", state_dir);
    unlink(path);
    assert_int_equal(registry_open(path, "t", &reg), 0);
    assert_int_equal(registry_get(reg, "a"), REGISTRY_UNKNOWN);
    assert_int_equal(registry_set(reg, "a", REGISTRY_PENDING, true), 0);
    assert_int_equal(registry_set(reg, "b", REGISTRY_DONE, true), 0);
    assert_int_equal(registry_set(reg, "v", REGISTRY_DONE, false), 0);
    assert_int_equal(registry_set(reg, "bad id", REGISTRY_DONE, true), -EINVAL);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    registry_forget_volatile(reg);
    assert_int_equal(registry_get(reg, "v"), REGISTRY_UNKNOWN);
    registry_free(reg);

    assert_int_equal(registry_open(path, "t", &reg), 0);
    assert_int_equal(registry_get(reg, "a"), REGISTRY_PENDING);
    assert_int_equal(registry_get(reg, "b"), REGISTRY_DONE);
    assert_int_equal(registry_count(reg), 2);
    assert_int_equal(registry_set(reg, "a", REGISTRY_UNKNOWN, true), 0);
    registry_free(reg);
    assert_int_equal(registry_open(path, "t", &reg), 0);
    assert_int_equal(registry_count(reg), 1);
    registry_free(reg);

    FILE *f = fopen(path, "w");
    fputs("# uplinkd child registry 1\nmaybe x\n", f);
    fclose(f);
    assert_int_equal(registry_open(path, "t", &reg), -EINVAL);
    unlink(path);
}

/* NULL path: memory only; entries come back by index with their state. */
static void test_registry_in_memory(void **unused)
{
    struct registry *reg;
    enum registry_state state;
    size_t done = 0, pending = 0;

    (void)unused;
    assert_int_equal(registry_open(NULL, "t", &reg), 0);
    assert_int_equal(registry_set(reg, "c1", REGISTRY_DONE, true), 0);
    assert_int_equal(registry_set(reg, "c2", REGISTRY_PENDING, true), 0);
    assert_int_equal(registry_set(reg, "", REGISTRY_DONE, true), -EINVAL);
    assert_int_equal(registry_count(reg), 2);
    for (size_t i = 0; i < registry_count(reg); i++) {
        const char *child = registry_entry(reg, i, &state);
        if (strcmp(child, "c1") == 0 && state == REGISTRY_DONE)
            done++;
        if (strcmp(child, "c2") == 0 && state == REGISTRY_PENDING)
            pending++;
    }
    assert_int_equal(done, 1);
    assert_int_equal(pending, 1);
    registry_free(reg);
}

/* The file's directory is gone: the write fails with its errno, the state
 * in memory is set anyway (the child is served; it registers again after
 * a restart). */
static void test_registry_write_fails(void **unused)
{
    char dir[128], path[160];
    struct registry *reg;

    (void)unused;
    snprintf(dir, sizeof(dir), "%s/gone", state_dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/reg", dir);
    assert_int_equal(registry_open(path, "t", &reg), 0);
    assert_int_equal(rmdir(dir), 0);
    assert_int_equal(registry_set(reg, "a", REGISTRY_DONE, true), -ENOENT);
    assert_int_equal(registry_get(reg, "a"), REGISTRY_DONE);
    registry_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry_persists),
        cmocka_unit_test(test_registry_in_memory),
        cmocka_unit_test(test_registry_write_fails),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
