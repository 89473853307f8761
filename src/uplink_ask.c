/* uplink_ask.c - what an uplink asks its profile (profile.h): the session
 * of the next attempt, what its CONNACK code means, whether queued records
 * may be joined, and that it went online or offline. An uplink from
 * uplinkd.yaml owns a profile instance (uplink_set_profile()) and asks it;
 * a per-device session has none and asks its hooks (struct uplink_hooks),
 * which the profile that drives it from outside set. The lowest floor of
 * the uplink: it calls nothing of the uplink's own files. */
#include "profile.h"
#include "uplink_int.h"

bool uplink_asks_session(const struct uplink *uplink)
{
    return uplink->profile != NULL || uplink->hooks.session_cb != NULL;
}

void uplink_ask_session(struct uplink *uplink, struct uplink_session *session)
{
    if (uplink->profile)
        profile_instance_session(uplink->profile, session);
    else if (uplink->hooks.session_cb)
        uplink->hooks.session_cb(uplink->hooks.arg, uplink, session);
}

void uplink_tell_online(struct uplink *uplink)
{
    if (uplink->profile)
        profile_instance_online(uplink->profile);
    else if (uplink->hooks.online_cb)
        uplink->hooks.online_cb(uplink->hooks.arg, uplink);
}

const char *uplink_ask_connack_text(struct uplink *uplink, int rc)
{
    if (uplink->profile)
        return profile_instance_connack_text(uplink->profile, rc);
    return uplink->hooks.connack_text_cb
               ? uplink->hooks.connack_text_cb(uplink->hooks.arg, uplink, rc)
               : NULL;
}

const char *uplink_ask_batch(struct uplink *uplink, const char *topic, size_t *max_packet)
{
    if (uplink->profile)
        return profile_instance_batch(uplink->profile, topic, max_packet);
    return uplink->hooks.batch_cb
               ? uplink->hooks.batch_cb(uplink->hooks.arg, uplink, topic, max_packet)
               : NULL;
}

void uplink_tell_offline(struct uplink *uplink)
{
    if (uplink->profile)
        profile_instance_offline(uplink->profile); /* per-connection registrations end */
}
