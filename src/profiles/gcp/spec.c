/* gcp/spec.c - what Google Cloud IoT Core and ClearBlade IoT Core ask of a
 * connection, from the conf alone ("Publishing over the MQTT bridge":
 * client id projects/<p>/locations/<r>/registries/<g>/devices/<d>, a JWT as
 * the password; "Using JSON Web Tokens"). The daemon half is gcp.c. */
#include <stdio.h>

#include "conf.h"
#include "profiles/gcp/section.h"
#include "jwt.h"
#include "profile_spec.h"
#include "rules.h"

static void gcp_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out)
{
    snprintf(out->client_id, sizeof(out->client_id),
             "projects/%s/locations/%s/registries/%s/devices/%s", gcp_conf(uc)->project,
             gcp_conf(uc)->region, gcp_conf(uc)->registry, gcp_conf(uc)->device);
}

static const char *gcp_connack_text(const struct conf_uplink *uc, int rc)
{
    (void)uc;
    /* Google Cloud IoT Core and ClearBlade answer every JWT problem with
     * CONNACK 4 or 5 and nothing more ("Using JSON Web Tokens"). */
    if (rc == 4 || rc == 5)
        return "GCP/ClearBlade IoT Core rejected the JWT: check alg against the key registered "
               "for the device, aud = the project id, exp <= 24 h after iat, and the clock";
    return NULL;
}

static void gcp_diagnose_refused(const struct conf_uplink *uc, const char *client_id, FILE *out)
{
    const struct conf_jwt *jwt = &uc->auth.jwt;

    fprintf(out,
            "  GCP (Google Cloud IoT Core / ClearBlade): the bridge refused the JWT or the "
            "device: the token's aud must be the project id (it is \"%s\"; gcp.project is "
            "\"%s\"), %s must match a public key registered for device %s in registry %s "
            "(%s), exp at most 24 h after iat, and the clock right; the client id %s must name "
            "an existing device\n",
            jwt->aud ? jwt->aud : "(none)", gcp_conf(uc)->project, jwt_alg_name(jwt->alg),
            gcp_conf(uc)->device, gcp_conf(uc)->registry, gcp_conf(uc)->region, client_id);
}

const struct profile_spec profile_spec_gcp = {
    .name = "gcp",
    .connect_id = gcp_connect_id,
    .connack_text = gcp_connack_text,
    .diagnose_refused = gcp_diagnose_refused,
    .child_check = gcp_id_check,
    .section_parse = gcp_section_parse,
    .section_free = gcp_section_free,
    .section_equal = gcp_section_equal,
    .client_id_from = "project, region, registry and device",
    .jwt_max_lifetime_s = JWT_GCP_MAX_LIFETIME_S,
};
