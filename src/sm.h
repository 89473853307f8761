/* sm.h - a small state machine for uplinkd's long-lived objects: a table of
 * legal moves, checked and logged on every move, and an invariant checked
 * after each one. The model is dqlite's src/lib/sm.h.
 *
 * A user describes its states once, as a table indexed by its own enum:
 *
 *     static const struct sm_state spool_states[] = {
 *         [SPOOL_OPEN] = {"OPEN", SM_TO(SPOOL_CLOSING)},
 *         [SPOOL_CLOSING] = {"CLOSING", SM_TO(SPOOL_CLOSED)},
 *         [SPOOL_CLOSED] = {"CLOSED", 0},
 *     };
 *     static const struct sm_conf spool_sm = {
 *         .states = spool_states, .count = 3, .level = LOG_DEBUG,
 *         .describe = spool_describe, .invariant = spool_invariant,
 *     };
 *
 * embeds a struct sm in its object, sm_init()s it, and changes state only
 * with sm_move(). The diagram of each machine is in the comment above its
 * table. A move the table does not allow is a bug: it is logged at LOG_ERR
 * and refused (the state stays); an invariant that fails after a move is
 * logged too. Both are counted in sm.bugs, which tests assert on.
 *
 * Threading: one object, one thread (the loop's). No allocation.
 */
#ifndef UPLINKD_SM_H
#define UPLINKD_SM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SM_TO(state)  (1u << (state))
#define SM_MAX_STATES 32

struct sm;

/* One state: its name in logs and status, and the states it may move to
 * (SM_TO(a) | SM_TO(b) ...; 0 for a final state). */
struct sm_state {
    const char *name;
    uint32_t allowed;
};

/* A machine's description, static and shared by every object of the kind. */
struct sm_conf {
    const struct sm_state *states; /* indexed by the user's enum */
    unsigned count;                /* entries in @states, at most SM_MAX_STATES */
    int level;                     /* syslog priority of the line logged per move */
    /* Optional: who the object is, for the log line ("client gw [pid 12]");
     * without it the line starts with "state". */
    void (*describe)(const struct sm *sm, char *buf, size_t size);
    /* Optional: the name of the uplink the object belongs to (the journal's UPLINK=). */
    const char *(*log_name)(const struct sm *sm);
    /* Optional: true when the object is consistent in its (new) state;
     * otherwise @why says what is wrong. Called after every move. */
    bool (*invariant)(const struct sm *sm, char *why, size_t size);
};

/* Embedded in its object; recover the object with container_of. */
struct sm {
    const struct sm_conf *conf; /* borrowed, static */
    unsigned state;
    unsigned bugs; /* illegal moves refused and invariants broken, since sm_init() */
};

/**
 * sm_init() - start @sm in @initial (an index of @conf->states).
 * Nothing is logged.
 */
void sm_init(struct sm *sm, const struct sm_conf *conf, unsigned initial);

/**
 * sm_move() - move @sm to @to for @reason (words for the log, may be NULL).
 * Logs "<describe>: state FROM -> TO (reason)" at the conf's level, then
 * checks the invariant. Returns 0, or -EINVAL for a move the table does
 * not allow (logged as a bug; the state is unchanged). Use the macro: it
 * passes the caller's place to the journal.
 */
#define sm_move(sm, to, reason) sm_move_at((sm), (to), (reason), __FILE__, __LINE__, __func__)
int sm_move_at(struct sm *sm, unsigned to, const char *reason, const char *file, int line,
               const char *func);

/** sm_state() - the current state. */
static inline unsigned sm_state(const struct sm *sm)
{
    return sm->state;
}

/** sm_can() - may @sm move to @to now? */
bool sm_can(const struct sm *sm, unsigned to);

/**
 * sm_state_name() - the name of @state in @conf, or "UNKNOWN" for an
 * index outside the table.
 */
const char *sm_state_name(const struct sm_conf *conf, unsigned state);

#endif
