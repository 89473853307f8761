/* aws/provision.h - fleet provisioning by claim (daemon half, provision.c).
 *
 * With aws.provisioning, tls.cert and tls.key are the claim certificate.
 * Until AWS has issued the thing its own certificate, each connection uses
 * the claim certificate, holds the spool (local data is kept, nothing of it
 * is sent), subscribes only to the provisioning answers and asks:
 *   $aws/certificates/create/json {}  -> .../accepted: the new certificate,
 *       its key and a certificateOwnershipToken (CreateKeysAndCertificate)
 *   $aws/provisioning-templates/<template>/provision/json
 *       {"certificateOwnershipToken":..,"parameters":{..}}
 *       -> .../accepted: {"thingName":..} (RegisterThing)
 * Then it stores certificate.pem, private.key (both 0600) and thing in
 * <state_dir>/provisioned/<uplink>/ (each file written atomically, the
 * thing last: its presence means done) and reconnects with them; from then
 * on, and after every restart, the stored certificate is used. A refusal
 * is reported on uplinkd/<uplink>/errors; the next connection asks again.
 */
#ifndef UPLINKD_PROFILES_AWS_PROVISION_H
#define UPLINKD_PROFILES_AWS_PROVISION_H

#include <stdbool.h>
#include <stddef.h>

struct json_buf;
struct profile_instance;
struct profile_msgs;
struct uplink_session;
struct aws_fleet;

/**
 * aws_fleet_new() - the provisioning state of @pi's uplink (aws.provisioning
 * set): provisioned when <state_dir>/provisioned/<uplink>/ holds a complete
 * set. Returns 0 or -ENOMEM.
 */
int aws_fleet_new(const struct profile_instance *pi, struct aws_fleet **out);
void aws_fleet_free(struct aws_fleet *fleet);

/** aws_fleet_done() - has AWS issued the certificate? (NULL: no provisioning = true) */
bool aws_fleet_done(const struct aws_fleet *fleet);

/** aws_fleet_thing() - the thing AWS registered, or NULL before. */
const char *aws_fleet_thing(const struct aws_fleet *fleet);

/**
 * aws_fleet_session() - this attempt's certificate: the issued one, or the
 * claim certificate with the spool held and the provisioning answers
 * subscribed (the thing's own filters, @thing_filters, are unsubscribed
 * while claiming and subscribed once provisioned).
 */
void aws_fleet_session(struct profile_instance *pi, struct aws_fleet *fleet,
                       const struct profile_msgs *thing_filters, struct uplink_session *session);

/** aws_fleet_online() - CONNACK with the claim certificate: ask for a certificate. */
void aws_fleet_online(struct profile_instance *pi, struct aws_fleet *fleet,
                      struct profile_msgs *first);

/**
 * aws_fleet_down() - an answer of the provisioning API: act on it and return
 * true; false for any other topic.
 */
bool aws_fleet_down(struct profile_instance *pi, struct aws_fleet *fleet, const char *topic,
                    const void *payload, size_t len);

/** aws_fleet_status() - ,"provisioning":{...} for uplinkctl status. */
void aws_fleet_status(const struct profile_instance *pi, const struct aws_fleet *fleet,
                      struct json_buf *out);

#endif
