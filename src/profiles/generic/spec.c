/* generic/spec.c - any MQTT broker (HiveMQ Cloud, mosquitto, EMQX, ...):
 * CONNECT carries the conf's own client id, user and password; no rules
 * beyond MQTT's. The topic templates are in generic.c. */
#include <stddef.h>

#include "conf.h"
#include "profiles/generic/section.h"
#include "profile_spec.h"

/* Managed brokers (HiveMQ Cloud, AWS IoT) answer a client they will not
 * serve with CONNACK 5 (MQTT 3.1.1 §3.2.2.3) and no reason; with TLS the
 * usual cause is a missing SNI or client certificate. A JWT uplink gets
 * the uplink's own JWT checklist instead (NULL here). */
static const char *generic_connack_text(const struct conf_uplink *uc, int rc)
{
    if (rc != 5 || !uc->tls.enabled || uc->auth.type == CONF_AUTH_JWT)
        return NULL;
    return "not authorized: the server may require SNI (uplinkd sends host as the SNI name: "
           "set host to the broker's name, not an IP address) or a client certificate "
           "(tls.cert and tls.key), or it refuses these credentials (auth)";
}

const struct profile_spec profile_spec_generic = {
    .name = "generic",
    .connack_text = generic_connack_text,
    .section_parse = generic_section_parse,
    .section_free = generic_section_free,
    .jwt_aud_required = true,
};
