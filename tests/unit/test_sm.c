/* test_sm.c - the state-machine helper (src/sm.h): legal moves, refused
 * illegal ones, the invariant and the names. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "sm.h"
#include "log.h"
#include "util.h"

enum door_state { DOOR_OPEN, DOOR_CLOSED, DOOR_LOCKED, DOOR_STATES };

/* OPEN <-> CLOSED <-> LOCKED; OPEN cannot be locked. */
static const struct sm_state door_states[] = {
    [DOOR_OPEN] = {"OPEN", SM_TO(DOOR_CLOSED)},
    [DOOR_CLOSED] = {"CLOSED", SM_TO(DOOR_OPEN) | SM_TO(DOOR_LOCKED)},
    [DOOR_LOCKED] = {"LOCKED", SM_TO(DOOR_CLOSED)},
};

struct door {
    struct sm sm;
    bool key_inside; /* the invariant: a locked door has no key inside */
    char label[16];
};

static void door_describe(const struct sm *sm, char *buf, size_t size)
{
    snprintf(buf, size, "door %s", container_of(sm, struct door, sm)->label);
}

static bool door_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct door *door = container_of(sm, struct door, sm);

    if (sm_state(sm) == DOOR_LOCKED && door->key_inside) {
        snprintf(why, size, "the key is inside");
        return false;
    }
    return true;
}

static const struct sm_conf door_sm = {
    .states = door_states,
    .count = ARRAY_SIZE(door_states),
    .level = LOG_DEBUG,
    .describe = door_describe,
    .invariant = door_invariant,
};

static void test_legal_moves(void **state)
{
    struct door door = {.label = "front"};

    (void)state;
    sm_init(&door.sm, &door_sm, DOOR_OPEN);
    assert_int_equal(sm_state(&door.sm), DOOR_OPEN);
    assert_true(sm_can(&door.sm, DOOR_CLOSED));
    assert_false(sm_can(&door.sm, DOOR_LOCKED));
    assert_int_equal(sm_move(&door.sm, DOOR_CLOSED, "wind"), 0);
    assert_int_equal(sm_move(&door.sm, DOOR_LOCKED, NULL), 0);
    assert_int_equal(sm_state(&door.sm), DOOR_LOCKED);
    assert_int_equal(door.sm.bugs, 0);
}

static void test_illegal_move_refused(void **state)
{
    struct door door = {.label = "back"};

    (void)state;
    sm_init(&door.sm, &door_sm, DOOR_OPEN);
    assert_int_equal(sm_move(&door.sm, DOOR_LOCKED, "in a hurry"), -EINVAL);
    assert_int_equal(sm_state(&door.sm), DOOR_OPEN); /* unchanged */
    assert_int_equal(door.sm.bugs, 1);
    /* A state outside the table is refused too, not read past its end. */
    assert_int_equal(sm_move(&door.sm, 17, NULL), -EINVAL);
    assert_int_equal(sm_move(&door.sm, 40, NULL), -EINVAL);
    assert_int_equal(sm_state(&door.sm), DOOR_OPEN);
    assert_int_equal(door.sm.bugs, 3);
}

static void test_invariant_counted(void **state)
{
    struct door door = {.label = "shed", .key_inside = true};

    (void)state;
    sm_init(&door.sm, &door_sm, DOOR_CLOSED);
    /* The move happens (it is legal); the broken promise is a bug. */
    assert_int_equal(sm_move(&door.sm, DOOR_LOCKED, "locked with the key inside"), 0);
    assert_int_equal(sm_state(&door.sm), DOOR_LOCKED);
    assert_int_equal(door.sm.bugs, 1);
    door.key_inside = false;
    assert_int_equal(sm_move(&door.sm, DOOR_CLOSED, NULL), 0);
    assert_int_equal(sm_move(&door.sm, DOOR_LOCKED, NULL), 0);
    assert_int_equal(door.sm.bugs, 1);
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(sm_state_name(&door_sm, DOOR_LOCKED), "LOCKED");
    assert_string_equal(sm_state_name(&door_sm, DOOR_STATES), "UNKNOWN");
    assert_string_equal(sm_state_name(&door_sm, 99), "UNKNOWN");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_legal_moves),
        cmocka_unit_test(test_illegal_move_refused),
        cmocka_unit_test(test_invariant_counted),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
