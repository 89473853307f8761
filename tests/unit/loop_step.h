/* loop_step.h - stepping a libuv loop in unit tests, bounded (after dqlite's
 * test/lib/uv.h). Include after <cmocka.h>.
 *
 * LOOP_STEP(loop, n): n iterations that never block (UV_RUN_NOWAIT): what
 * is ready now runs, in the order libuv runs it, and nothing else.
 *
 * LOOP_UNTIL(loop, cond, max): iterations that wait for the next due timer
 * or I/O (UV_RUN_ONCE) until @cond is true; the test fails, naming @cond,
 * after @max of them. A loop with nothing left to run returns at once, so
 * the bound also ends a wait for something that cannot happen.
 */
#ifndef UPLINKD_TEST_LOOP_STEP_H
#define UPLINKD_TEST_LOOP_STEP_H

#include <uv.h>

#define LOOP_STEP(loop, n)                                                                         \
    do {                                                                                           \
        for (int loop_step_i_ = 0; loop_step_i_ < (n); loop_step_i_++)                             \
            uv_run((loop), UV_RUN_NOWAIT);                                                         \
    } while (0)

#define LOOP_UNTIL(loop, cond, max)                                                                \
    do {                                                                                           \
        int loop_until_steps_ = 0;                                                                 \
        while (!(cond)) {                                                                          \
            if (loop_until_steps_++ >= (max))                                                      \
                fail_msg("loop: \"%s\" not reached in %d steps", #cond, (int)(max));               \
            uv_run((loop), UV_RUN_ONCE);                                                           \
        }                                                                                          \
    } while (0)

#endif
