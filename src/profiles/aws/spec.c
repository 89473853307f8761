/* aws/spec.c - what AWS IoT Core asks of a connection, from the conf alone.
 * CONNECT needs nothing beyond the conf: the client id is the thing name
 * (section.c sets uplinks[].client_id to it unless given), the credential
 * the thing's certificate. The daemon half is aws.c. */
#include <stdio.h>

#include "aws.h"
#include "conf.h"
#include "profile_spec.h"
#include "profiles/aws/section.h"

/* AWS IoT Core answers CONNACK 5 for a certificate it does not know or
 * has not activated and for a policy that does not allow iot:Connect with
 * this client id; it often closes the connection without a CONNACK
 * instead (the uplink then says so). A second connection with the same
 * client id makes AWS close the first one. */
static const char *aws_connack_text(const struct conf_uplink *uc, int rc)
{
    (void)uc;
    switch (rc) {
    case 2:
        return "AWS IoT Core refused the client id: a thing name (uplinks[].client_id or "
               "aws.thing) is 1 to 128 characters";
    case 3:
        return "AWS IoT Core is unavailable or throttling this account (connect requests per "
               "second per account, or per client id: at most one per second); it retries "
               "with backoff";
    case 4:
    case 5:
        return "AWS IoT Core did not authorise the connection: the certificate (tls.cert) must "
               "be registered and ACTIVE in this account and region, attached to the thing, "
               "and its policy must allow iot:Connect for this client id; with a custom "
               "authorizer, the authorizer refused the user name or password";
    default:
        return NULL;
    }
}

static void aws_diagnose_refused(const struct conf_uplink *uc, const char *client_id, FILE *out)
{
    const struct conf_aws *aws = aws_conf(uc);

    fprintf(out,
            "  aws: the certificate in tls.cert must be ACTIVE in the account and region of %s, "
            "attached to the thing \"%s\", with a policy allowing iot:Connect on "
            "client/%s; the endpoint (host) must be the account's own "
            "(aws iot describe-endpoint --endpoint-type iot:Data-ATS)\n",
            uc->host ? uc->host : "(none)", aws->thing ? aws->thing : "(none)", client_id);
}

static const char *aws_child_check(const char *child)
{
    /* A child's id is a level of dt/<gateway>/<child> and its shadow's thing name. */
    return aws_thing_name_check(child);
}

const struct profile_spec profile_spec_aws = {
    .name = "aws",
    .connack_text = aws_connack_text,
    .diagnose_refused = aws_diagnose_refused,
    .child_check = aws_child_check,
    .cloud_topic_check = aws_topic_check,
    .section_parse = aws_section_parse,
    .section_free = aws_section_free,
    .section_equal = aws_section_equal,
};
