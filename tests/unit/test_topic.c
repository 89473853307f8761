/* test_topic.c - topic name/filter rules (§4.7), matching, subscription table. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "topic.h"

static int name_check(const char *s)
{
    const char *reason = NULL;
    int rc = topic_name_check(s, strlen(s), &reason);

    if (rc < 0)
        assert_non_null(reason);
    return rc;
}

static int filter_check(const char *s)
{
    const char *reason = NULL;
    int rc = topic_filter_check(s, strlen(s), &reason);

    if (rc < 0)
        assert_non_null(reason);
    return rc;
}

static void test_names(void **state)
{
    static const struct {
        const char *name;
        int rc;
    } cases[] = {
        {"a", 0},
        {"/", 0},
        {"//", 0},
        {"dev/child-1/telemetry", 0},
        {"$SYS/broker/clients", 0},
        {"with space/and\xc3\xa9", 0},
        {"", -EINVAL},    /* §4.7.3-1 */
        {"a/+", -EINVAL}, /* §4.7.1-1 */
        {"a/#", -EINVAL},
        {"+", -EINVAL},
        {"a+b", -EINVAL},           /* no wildcards at all, even inside a level */
        {"a\xc0\x80", -EINVAL},     /* overlong U+0000 */
        {"a\xed\xa0\x80", -EINVAL}, /* surrogate */
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (name_check(cases[i].name) != cases[i].rc)
            fail_msg("name '%s': want %d", cases[i].name, cases[i].rc);
    /* U+0000 inside (length-delimited input). */
    assert_int_equal(topic_name_check("a\0b", 3, NULL), -EINVAL);
}

static void test_name_length(void **state)
{
    char *big = malloc(TOPIC_MAX_LEN + 2);

    assert_non_null(big);
    memset(big, 'a', TOPIC_MAX_LEN + 1);
    assert_int_equal(topic_name_check(big, TOPIC_MAX_LEN, NULL), 0);
    assert_int_equal(topic_name_check(big, TOPIC_MAX_LEN + 1, NULL), -EINVAL);
    assert_int_equal(topic_filter_check(big, TOPIC_MAX_LEN + 1, NULL), -EINVAL);
    free(big);
}

static void test_filters(void **state)
{
    static const struct {
        const char *filter;
        int rc;
    } cases[] = {
        {"#", 0},           {"+", 0},
        {"a/#", 0},         {"a/+/b", 0},
        {"+/+", 0},         {"/+", 0},
        {"+/", 0},          {"a//#", 0},
        {"$SYS/#", 0},      {"sport/tennis/+/#", 0},
        {"", -EINVAL},      {"a#", -EINVAL}, /* §4.7.1-2: '#' must be a whole level */
        {"a/#/b", -EINVAL},                  /* ... and the last one */
        {"#/", -EINVAL},    {"##", -EINVAL},
        {"a+", -EINVAL}, /* §4.7.1-3: '+' must be a whole level */
        {"+a", -EINVAL},    {"a/+b/c", -EINVAL},
        {"++", -EINVAL},    {"a\xff", -EINVAL},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (filter_check(cases[i].filter) != cases[i].rc)
            fail_msg("filter '%s': want %d", cases[i].filter, cases[i].rc);
}

static void test_match(void **state)
{
    static const struct {
        const char *filter;
        const char *name;
        bool match;
    } cases[] = {
        /* §4.7.1 examples */
        {"sport/tennis/player1/#", "sport/tennis/player1", true},
        {"sport/tennis/player1/#", "sport/tennis/player1/ranking", true},
        {"sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true},
        {"sport/#", "sport", true},
        {"#", "sport/tennis", true},
        {"#", "/", true},
        {"sport/tennis/+", "sport/tennis/player1", true},
        {"sport/tennis/+", "sport/tennis/player2", true},
        {"sport/tennis/+", "sport/tennis/player1/ranking", false},
        {"sport/+", "sport", false},
        {"sport/+", "sport/", true},
        {"+/+", "/finance", true},
        {"/+", "/finance", true},
        {"+", "/finance", false},
        {"+", "finance", true},
        {"+/tennis/#", "sport/tennis/player1", true},
        /* exact and near misses */
        {"a/b", "a/b", true},
        {"a/b", "a/bc", false},
        {"a/bc", "a/b", false},
        {"a/b", "a/b/", false},
        {"a/b/", "a/b/", true},
        {"a//b", "a//b", true},
        {"a/+/b", "a//b", true},
        {"a/+/b", "a/x/y/b", false},
        {"a/#", "a", true},
        {"a/#", "ab", false},
        {"a/#", "a/", true},
        {"+/#", "a", true},
        {"dev/+/telemetry/#", "dev/c1/telemetry", true},
        {"dev/+/telemetry/#", "dev/c1/telemetry/x/y", true},
        {"dev/+/telemetry/#", "dev/c1/state", false},
        /* §4.7.2: '$' topics are not matched by a leading wildcard */
        {"#", "$SYS/broker", false},
        {"+/broker", "$SYS/broker", false},
        {"+", "$SYS", false},
        {"$SYS/#", "$SYS/broker/clients", true},
        {"$SYS/+/clients", "$SYS/broker/clients", true},
        {"$SYS", "$SYS", true},
        {"a/#", "a/$SYS", true}, /* '$' only matters at the start */
        {"a/+", "a/$x", true},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bool got = topic_match(cases[i].filter, strlen(cases[i].filter), cases[i].name,
                               strlen(cases[i].name));
        if (got != cases[i].match)
            fail_msg("filter '%s' name '%s': want %s", cases[i].filter, cases[i].name,
                     cases[i].match ? "match" : "no match");
    }
}

/* --- subscription table -------------------------------------------------------- */

struct hits {
    void *owner[8];
    uint8_t qos[8];
    size_t count;
};

static void record_cb(void *arg, void *owner, uint8_t qos)
{
    struct hits *h = arg;

    assert_true(h->count < 8);
    h->owner[h->count] = owner;
    h->qos[h->count] = qos;
    h->count++;
}

static bool hits_has(const struct hits *h, void *owner, uint8_t qos)
{
    for (size_t i = 0; i < h->count; i++)
        if (h->owner[i] == owner)
            return h->qos[i] == qos;
    return false;
}

static void add(struct topic_table *t, void *owner, const char *filter, uint8_t qos,
                bool want_first)
{
    bool first = !want_first;

    assert_int_equal(topic_table_add(t, owner, filter, strlen(filter), qos, &first), 0);
    assert_int_equal(first, want_first);
}

static void test_table_first_last(void **state)
{
    struct topic_table t = {0};
    int a, b;
    bool last = true;

    add(&t, &a, "cloud/x/#", 1, true);
    add(&t, &b, "cloud/x/#", 0, false);
    add(&t, &a, "cloud/x/#", 2, false); /* replace (§3.8.4-3), not a new one */
    assert_int_equal(t.count, 2);
    assert_int_equal(topic_table_remove(&t, &a, "cloud/x/#", 9, &last), 0);
    assert_false(last);
    assert_int_equal(topic_table_remove(&t, &a, "cloud/x/#", 9, &last), -ENOENT);
    assert_int_equal(topic_table_remove(&t, &b, "cloud/x/#", 9, &last), 0);
    assert_true(last);
    assert_int_equal(t.count, 0);
    assert_null(t.head);
    topic_table_deinit(&t);
}

static void test_table_match_once_per_owner(void **state)
{
    struct topic_table t = {0};
    struct hits h = {0};
    int a, b, c;

    /* Interleaved adds: the table keeps each owner's entries together. */
    add(&t, &a, "s/+", 0, true);
    add(&t, &b, "s/#", 1, true);
    add(&t, &a, "s/#", 2, false);
    add(&t, &c, "other", 1, true);
    add(&t, &b, "s/x", 0, true);
    add(&t, &a, "s/x", 1, false);

    topic_table_match(&t, "s/x", 3, record_cb, &h);
    assert_int_equal(h.count, 2);
    assert_true(hits_has(&h, &a, 2)); /* max over s/+ (0), s/# (2), s/x (1) */
    assert_true(hits_has(&h, &b, 1));

    memset(&h, 0, sizeof(h));
    topic_table_match(&t, "s/y", 3, record_cb, &h);
    assert_int_equal(h.count, 2);
    assert_true(hits_has(&h, &a, 2));
    assert_true(hits_has(&h, &b, 1));

    memset(&h, 0, sizeof(h));
    topic_table_match(&t, "nothing", 7, record_cb, &h);
    assert_int_equal(h.count, 0);
    topic_table_deinit(&t);
}

struct last_filters {
    char names[4][32];
    size_t count;
};

static void last_cb(void *arg, const char *filter, size_t len)
{
    struct last_filters *l = arg;

    assert_true(l->count < 4);
    assert_int_equal(strlen(filter), len); /* NUL-terminated */
    strcpy(l->names[l->count++], filter);
}

static void test_table_remove_owner(void **state)
{
    struct topic_table t = {0};
    struct last_filters l = {0};
    struct hits h = {0};
    int a, b;

    add(&t, &a, "cloud/one", 1, true);
    add(&t, &a, "cloud/two", 1, true);
    add(&t, &b, "cloud/two", 1, false);
    add(&t, &a, "local", 0, true);
    topic_table_remove_owner(&t, &a, last_cb, &l);
    assert_int_equal(t.count, 1);
    assert_int_equal(l.count, 2); /* cloud/two is still used by b */
    assert_true((strcmp(l.names[0], "cloud/one") == 0 && strcmp(l.names[1], "local") == 0) ||
                (strcmp(l.names[1], "cloud/one") == 0 && strcmp(l.names[0], "local") == 0));
    topic_table_match(&t, "cloud/two", 9, record_cb, &h);
    assert_int_equal(h.count, 1);
    assert_ptr_equal(h.owner[0], &b);
    topic_table_remove_owner(&t, &b, NULL, NULL);
    assert_int_equal(t.count, 0);
    topic_table_deinit(&t);
}

/* The tree against the linear definition (topic_match) on random filters
 * and names over a tiny alphabet, so '+', '#', empty levels, '$' topics and
 * overlaps all occur; with adds, removes and owner removals in between. */
#define RAND_OWNERS  6
#define RAND_FILTERS 40

struct model_sub {
    char filter[16];
    int owner; /* -1 = removed */
    uint8_t qos;
};

struct seen {
    int qos[RAND_OWNERS]; /* -1 = not delivered */
    int calls[RAND_OWNERS];
    int *base;
};

static void seen_cb(void *arg, void *owner, uint8_t qos)
{
    struct seen *s = arg;
    int i = (int)((int *)owner - s->base);

    assert_true(i >= 0 && i < RAND_OWNERS);
    s->calls[i]++;
    s->qos[i] = qos;
}

static void random_level(char *out, unsigned r, bool filter)
{
    static const char *const levels[] = {"a", "b", "", "$x", "a"};
    unsigned pick = r % (filter ? 7 : 5);

    if (pick == 5)
        strcpy(out, "+");
    else if (pick == 6)
        strcpy(out, "#");
    else
        strcpy(out, levels[pick]);
}

static void random_topic(char *out, bool filter)
{
    unsigned levels = 1 + (unsigned)rand() % 3;

    out[0] = '\0';
    for (unsigned i = 0; i < levels; i++) {
        char level[4];
        random_level(level, (unsigned)rand(), filter);
        if (i > 0 && strcmp(level, "$x") == 0)
            strcpy(level, "b");
        if (i)
            strcat(out, "/");
        strcat(out, level);
        if (strcmp(level, "#") == 0)
            break;
    }
    if (out[0] == '\0' && !filter)
        strcpy(out, "/"); /* names are non-empty; "/" is two empty levels */
    if (out[0] == '\0')
        strcpy(out, "+");
}

static void test_tree_against_linear(void **state)
{
    int owners[RAND_OWNERS];
    struct model_sub model[RAND_FILTERS];
    struct topic_table t = {0};

    srand(12345);
    for (int round = 0; round < 300; round++) {
        size_t n = 0;

        for (int i = 0; i < RAND_FILTERS; i++) {
            random_topic(model[i].filter, true);
            model[i].owner = rand() % RAND_OWNERS;
            model[i].qos = (uint8_t)(rand() % 3);
            /* Same (owner, filter) twice: the later QoS replaces the earlier. */
            for (int k = 0; k < i; k++)
                if (model[k].owner == model[i].owner &&
                    strcmp(model[k].filter, model[i].filter) == 0)
                    model[k].owner = -1;
            assert_int_equal(topic_table_add(&t, &owners[model[i].owner], model[i].filter,
                                             strlen(model[i].filter), model[i].qos, NULL),
                             0);
        }
        /* Remove a few, and every subscription of one owner. */
        for (int i = 0; i < RAND_FILTERS; i += 7) {
            if (model[i].owner < 0)
                continue;
            assert_int_equal(topic_table_remove(&t, &owners[model[i].owner], model[i].filter,
                                                strlen(model[i].filter), NULL),
                             0);
            model[i].owner = -1;
        }
        topic_table_remove_owner(&t, &owners[round % RAND_OWNERS], NULL, NULL);
        for (int i = 0; i < RAND_FILTERS; i++) {
            if (model[i].owner == round % RAND_OWNERS)
                model[i].owner = -1;
            if (model[i].owner >= 0)
                n++;
        }
        assert_int_equal(t.count, n);

        for (int probe = 0; probe < 30; probe++) {
            char name[16];
            struct seen seen = {.base = owners};
            int want[RAND_OWNERS];

            random_topic(name, false);
            for (int o = 0; o < RAND_OWNERS; o++)
                want[o] = seen.qos[o] = -1;
            for (int i = 0; i < RAND_FILTERS; i++)
                if (model[i].owner >= 0 &&
                    topic_match(model[i].filter, strlen(model[i].filter), name, strlen(name)) &&
                    model[i].qos > want[model[i].owner])
                    want[model[i].owner] = model[i].qos;
            topic_table_match(&t, name, strlen(name), seen_cb, &seen);
            for (int o = 0; o < RAND_OWNERS; o++) {
                if (want[o] != seen.qos[o] || seen.calls[o] > 1)
                    fail_msg("round %d name '%s' owner %d: want QoS %d, got %d in %d calls", round,
                             name, o, want[o], seen.qos[o], seen.calls[o]);
            }
        }
        for (int o = 0; o < RAND_OWNERS; o++)
            topic_table_remove_owner(&t, &owners[o], NULL, NULL);
        assert_int_equal(t.count, 0);
        assert_null(t.head); /* every node pruned */
    }
    topic_table_deinit(&t);
}

static void test_tree_dollar_and_parent(void **state)
{
    struct topic_table t = {0};
    struct hits h = {0};
    int a, b, c, d;

    add(&t, &a, "#", 1, true);
    add(&t, &b, "+/status", 1, true);
    add(&t, &c, "$SYS/#", 2, true);
    add(&t, &d, "sport/#", 0, true);
    /* §4.7.2-1: leading wildcards do not see '$' topics; "$SYS/#" does. */
    topic_table_match(&t, "$SYS/status", 11, record_cb, &h);
    assert_int_equal(h.count, 1);
    assert_true(hits_has(&h, &c, 2));
    /* §4.7.1-2: "sport/#" matches "sport" itself. */
    memset(&h, 0, sizeof(h));
    topic_table_match(&t, "sport", 5, record_cb, &h);
    assert_int_equal(h.count, 2);
    assert_true(hits_has(&h, &a, 1));
    assert_true(hits_has(&h, &d, 0));
    /* A deep filter: the walk is iterative, not recursive. */
    {
        size_t len = 2 * 20000 - 1;
        char *deep = malloc(len + 1);
        for (size_t i = 0; i < len; i += 2) {
            deep[i] = 'x';
            if (i + 1 < len)
                deep[i + 1] = '/';
        }
        deep[len] = '\0';
        assert_int_equal(topic_table_add(&t, &b, deep, len, 1, NULL), 0);
        memset(&h, 0, sizeof(h));
        topic_table_match(&t, deep, len, record_cb, &h);
        assert_int_equal(h.count, 2); /* "#" (a) and the deep filter (b) */
        assert_int_equal(topic_table_remove(&t, &b, deep, len, NULL), 0);
        free(deep);
    }
    topic_table_deinit(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_name_length),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_match),
        cmocka_unit_test(test_table_first_last),
        cmocka_unit_test(test_table_match_once_per_owner),
        cmocka_unit_test(test_table_remove_owner),
        cmocka_unit_test(test_tree_against_linear),
        cmocka_unit_test(test_tree_dollar_and_parent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
