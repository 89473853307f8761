/* cumulocity/spec.c - what Cumulocity IoT asks of a connection, from the
 * conf alone ("Device integration using MQTT": client id d:<device
 * id>[:<template X-ID>], user <tenant>/<user>, clean session, the CONNACK
 * codes it sends). The daemon half is cumulocity.c. */
#include <stdio.h>
#include <string.h>

#include "conf.h"
#include "profiles/cumulocity/section.h"
#include "profile_spec.h"

static void c8y_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out)
{
    const struct conf_cumulocity *cc = cumulocity_conf(uc);

    if (cc->template_id)
        snprintf(out->client_id, sizeof(out->client_id), "d:%s:%s", cc->device_id, cc->template_id);
    else
        snprintf(out->client_id, sizeof(out->client_id), "d:%s", cc->device_id);
    out->clean_session = true;
    if (cc->bootstrap) {
        out->c8y_bootstrap = true;
        snprintf(out->username, sizeof(out->username), "%s", cc->bootstrap_user);
        out->password = cc->bootstrap_password;
    } else if (uc->auth.type == CONF_AUTH_BASIC && cc->tenant && uc->auth.username &&
               !strchr(uc->auth.username, '/')) {
        snprintf(out->username, sizeof(out->username), "%s/%s", cc->tenant, uc->auth.username);
        out->password = uc->auth.password;
    }
}

static const char *c8y_connack_text(const struct conf_uplink *uc, int rc)
{
    (void)uc;
    switch (rc) {
    case 2:
        return "identifier rejected: the client id must be d:<device id>[:<template X-ID>] "
               "(check cumulocity.device_id and cumulocity.template)";
    case 3:
        return "server unavailable: Cumulocity cannot take the connection now (maintenance or "
               "overload); nothing to fix here, uplinkd retries later by itself";
    case 4:
        return "bad user name or password: wrong tenant, user or password; Cumulocity expects "
               "<tenant>/<user> and that user's password (check cumulocity.tenant, "
               "auth.username and auth.password)";
    case 5:
        return "not authorized: a user without device permissions, or a certificate problem: "
               "the CN must be the device id, the CA must be trusted by the tenant, and "
               "tls.cert must hold the whole chain including that CA (after bootstrap: remove "
               "the stored credentials to bootstrap again)";
    default:
        return NULL;
    }
}

static void c8y_diagnose_refused(const struct conf_uplink *uc, const char *client_id, FILE *out)
{
    (void)uc;
    fprintf(out,
            "  Cumulocity: the user name is <tenant>/<user> (cumulocity.tenant), or with "
            "X.509 the certificate's CN must equal the device id in the client id %s and the "
            "CA be trusted by the tenant\n",
            client_id);
}

static const char *c8y_child_check(const char *child)
{
    if (strchr(child, ':'))
        return "the child id contains ':' (Cumulocity client and device ids use it as a "
               "separator)";
    return NULL;
}

const struct profile_spec profile_spec_cumulocity = {
    .name = "cumulocity",
    .connect_id = c8y_connect_id,
    .connack_text = c8y_connack_text,
    .diagnose_refused = c8y_diagnose_refused,
    .child_check = c8y_child_check,
    .section_parse = cumulocity_section_parse,
    .section_free = cumulocity_section_free,
    .section_equal = cumulocity_section_equal,
};
