/* uplink_session_stubs.c - link-time stand-ins for the uplink lifecycle
 * calls that profiles/akenza/akenza.c's per-device sessions make (uplink_new,
 * uplink_start, uplink_stop, ...), for the unit tests that link the profiles
 * with a recording stand-in for the rest of uplink.h (test_profile.c,
 * test_profile_gcp.c). Opening a session fails with -ENOSYS here; the
 * integration tests (test_profile_akenza.py) run the real thing. */
#include <errno.h>

#include "uplink.h"

int uplink_new(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
               const struct uplink_hooks *hooks, struct uplink **out)
{
    (void)loop;
    (void)conf;
    (void)gateway_id;
    (void)hooks;
    (void)out;
    return -ENOSYS;
}

int uplink_open_spool(struct uplink *uplink, const char *state_dir)
{
    (void)uplink;
    (void)state_dir;
    return -ENOSYS;
}

int uplink_open_spool_dir(struct uplink *uplink, const char *dir)
{
    (void)uplink;
    (void)dir;
    return -ENOSYS;
}

const char *uplink_state_name(enum uplink_state state)
{
    (void)state;
    return "IDLE";
}

int uplink_start(struct uplink *uplink)
{
    (void)uplink;
    return -ENOSYS;
}

void uplink_free(struct uplink *uplink)
{
    (void)uplink;
}

void uplink_stop(struct uplink *uplink, unsigned timeout_ms,
                 void (*done_cb)(struct uplink *uplink, void *arg), void *arg)
{
    (void)timeout_ms;
    done_cb(uplink, arg);
}

int uplink_reconfigure(struct uplink *uplink, const struct conf_uplink *conf)
{
    (void)uplink;
    (void)conf;
    return 0;
}
