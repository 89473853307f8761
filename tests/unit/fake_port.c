/* fake_port.c - the per-device session half of a profile port
 * (struct profile_port, profile.h) for the unit tests that run the profiles
 * against a recording stand-in for their uplink (test_profile.c,
 * test_profile_gcp.c: they fill the rest of the port). Opening a session
 * fails with -ENOSYS here; the integration tests (test_profile_akenza.py)
 * run the real thing. */
#include <errno.h>

#include "fake_port.h"

int fake_new(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
             const struct uplink_hooks *hooks, struct uplink **out)
{
    (void)loop;
    (void)conf;
    (void)gateway_id;
    (void)hooks;
    (void)out;
    return -ENOSYS;
}

int fake_open_spool_dir(struct uplink *uplink, const char *dir)
{
    (void)uplink;
    (void)dir;
    return -ENOSYS;
}

const char *fake_state_name(enum uplink_state state)
{
    (void)state;
    return "IDLE";
}

int fake_start(struct uplink *uplink)
{
    (void)uplink;
    return -ENOSYS;
}

void fake_free(struct uplink *uplink)
{
    (void)uplink;
}

void fake_stop(struct uplink *uplink, unsigned timeout_ms,
               void (*done_cb)(struct uplink *uplink, void *arg), void *arg)
{
    (void)timeout_ms;
    done_cb(uplink, arg);
}

int fake_reconfigure(struct uplink *uplink, const struct conf_uplink *conf)
{
    (void)uplink;
    (void)conf;
    return 0;
}

const struct profile_port fake_port = {
    .send_first = fake_publish_control,
    .publish = fake_publish,
    .subscribe = fake_subscribe,
    .unsubscribe = fake_unsubscribe,
    .reconnect = fake_reconnect,
    .state = fake_get_state,
    .state_name = fake_state_name,
    .stats = fake_get_stats,
    .session_new = fake_new,
    .session_open_spool = fake_open_spool_dir,
    .session_start = fake_start,
    .session_stop = fake_stop,
    .session_free = fake_free,
    .session_reconfigure = fake_reconfigure,
};
