/* sm.c - the state-machine helper (see sm.h). */
#include "sm.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>

#include "log.h"

void sm_init(struct sm *sm, const struct sm_conf *conf, unsigned initial)
{
    sm->conf = conf;
    sm->state = initial;
    sm->bugs = 0;
}

const char *sm_state_name(const struct sm_conf *conf, unsigned state)
{
    if (state >= conf->count || conf->states[state].name == NULL)
        return "UNKNOWN";
    return conf->states[state].name;
}

bool sm_can(const struct sm *sm, unsigned to)
{
    const struct sm_conf *conf = sm->conf;

    return sm->state < conf->count && to < conf->count && to < SM_MAX_STATES &&
           (conf->states[sm->state].allowed & SM_TO(to)) != 0;
}

int sm_move_at(struct sm *sm, unsigned to, const char *reason, const char *file, int line,
               const char *func)
{
    const struct sm_conf *conf = sm->conf;
    const char *name = conf->log_name ? conf->log_name(sm) : NULL;
    const char *from = sm_state_name(conf, sm->state);
    char who[256] = "";
    char why[256];

    if (conf->describe) {
        conf->describe(sm, who, sizeof(who) - 2);
        snprintf(who + strnlen(who, sizeof(who) - 2), 3, ": ");
    }
    if (!sm_can(sm, to)) {
        sm->bugs++;
        log_emit(LOG_ERR, file, line, func, name, NULL,
                 "%sBUG: illegal state transition %s -> %s (%s) refused", who, from,
                 sm_state_name(conf, to), reason ? reason : "no reason given");
        return -EINVAL;
    }
    sm->state = to;
    if (reason)
        log_emit(conf->level, file, line, func, name, NULL, "%sstate %s -> %s (%s)", who, from,
                 sm_state_name(conf, to), reason);
    else
        log_emit(conf->level, file, line, func, name, NULL, "%sstate %s -> %s", who, from,
                 sm_state_name(conf, to));
    if (conf->invariant && !conf->invariant(sm, why, sizeof(why))) {
        sm->bugs++;
        log_emit(LOG_ERR, file, line, func, name, NULL, "%sBUG: in state %s: %s", who,
                 sm_state_name(conf, to), why);
    }
    return 0;
}
