/* akenza/spec.c - what akenza asks of a connection, from the conf alone
 * (docs.akenza.io, "MQTT device connectivity": client id = the device id,
 * a JWT with aud, sub and kid as the password). The daemon half is
 * akenza.c. */
#include <stdio.h>

#include "akenza.h"
#include "conf.h"
#include "profiles/akenza/section.h"
#include "profile_spec.h"

static void akenza_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out)
{
    if (akenza_conf(uc)->device)
        snprintf(out->client_id, sizeof(out->client_id), "%s", akenza_conf(uc)->device);
}

const char *akenza_connack_text(int rc)
{
    if (rc == 4 || rc == 5)
        return "akenza rejected the JWT: check alg (RS256 or ES256) against the key uploaded to "
               "akenza, aud (https://akenza.io/devices/<id>, or the bare id), sub = the device "
               "id, kid = SHA-256 of the public key, and the clock";
    return NULL;
}

static const char *akenza_spec_connack_text(const struct conf_uplink *uc, int rc)
{
    (void)uc;
    return akenza_connack_text(rc);
}

static void akenza_diagnose_refused(const struct conf_uplink *uc, const char *client_id, FILE *out)
{
    const struct conf_jwt *jwt = &uc->auth.jwt;

    fprintf(out,
            "  akenza: the token must carry aud \"%s\" (auth.aud), sub = the device id, and "
            "kid = the hex SHA-256 of the registered public key (auth.kid auto); the client id "
            "%s must be the device id\n",
            jwt->aud ? jwt->aud : "(none)", client_id);
}

const struct profile_spec profile_spec_akenza = {
    .name = "akenza",
    .connect_id = akenza_connect_id,
    .connack_text = akenza_spec_connack_text,
    .diagnose_refused = akenza_diagnose_refused,
    .section_parse = akenza_section_parse,
    .section_free = akenza_section_free,
    .section_equal = akenza_section_equal,
    .client_id_from = "device",
};
