/* fake_port.h - the struct profile_port that the profiles under test reach
 * their uplink through (fake_port.c): the test defines the uplink half
 * (fake_publish_control() ... fake_reconnect(), recording what the profile
 * asked); the per-device session half fails to open a session. */
#ifndef UPLINKD_TEST_FAKE_PORT_H
#define UPLINKD_TEST_FAKE_PORT_H

#include "profile.h"

extern const struct profile_port fake_port;

/* Defined by the test. */
int fake_publish_control(struct uplink *uplink, const char *topic, const void *payload, size_t len,
                         int qos, unsigned flags, void (*done_cb)(void *arg, int status),
                         void *arg);
int fake_publish(struct uplink *uplink, const char *topic, const void *payload, size_t len, int qos,
                 bool retain);
int fake_subscribe(struct uplink *uplink, const char *filter, int qos);
int fake_unsubscribe(struct uplink *uplink, const char *filter);
enum uplink_state fake_get_state(const struct uplink *uplink);
void fake_get_stats(const struct uplink *uplink, struct uplink_stats *out);
void fake_reconnect(struct uplink *uplink, const char *reason);

/* fake_port.c: per-device sessions. */
int fake_new(uv_loop_t *loop, const struct conf_uplink *conf, const char *gateway_id,
             const struct uplink_hooks *hooks, struct uplink **out);
int fake_open_spool_dir(struct uplink *uplink, const char *dir);
const char *fake_state_name(enum uplink_state state);
int fake_start(struct uplink *uplink);
void fake_free(struct uplink *uplink);
void fake_stop(struct uplink *uplink, unsigned timeout_ms,
               void (*done_cb)(struct uplink *uplink, void *arg), void *arg);
int fake_reconfigure(struct uplink *uplink, const struct conf_uplink *conf);

#endif
