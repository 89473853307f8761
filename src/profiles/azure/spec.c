/* azure/spec.c - what Azure IoT Hub asks of a connection, from the conf
 * alone (learn.microsoft.com, "Communicate with an IoT hub using the MQTT
 * protocol": client id = the device id, user name
 * "<hub>/<device>/?api-version=<v>"; the SAS token password is made at
 * connect time by azure.c). The daemon half is azure.c. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "azure.h"
#include "conf.h"
#include "keys.h"
#include "p11.h"
#include "profile_spec.h"
#include "profiles/azure/section.h"

/* The device's key: azure.key_file for the uplink's own device; for a
 * child's session (azure->child) the file child_key names, or the key
 * derived from the group enrolment key. Returns its length, or a negative
 * errno with @why. */
static int azure_device_key(const struct conf_azure *azure, uint8_t key[AZURE_KEY_MAX], char *why,
                            size_t size)
{
    char path[4096];
    int len;

    if (!azure->child)
        return azure_key_read(azure->key_file, key, why, size);
    if (azure->child_key) {
        if (profile_child_key_path(azure->child_key, azure->device_id, path, sizeof(path)) < 0) {
            snprintf(why, size, "the key path for this child is too long");
            return -ENAMETOOLONG;
        }
        return azure_key_read(path, key, why, size);
    }
    len = azure_key_read(azure->group_key_file, key, why, size);
    if (len < 0)
        return len;
    uint8_t derived[32];
    len = azure_derive_device_key(key, (size_t)len, azure->device_id, derived);
    if (len < 0)
        snprintf(why, size, "cannot derive the child's key from %.200s", azure->group_key_file);
    else
        memcpy(key, derived, sizeof(derived));
    OPENSSL_cleanse(derived, sizeof(derived));
    return len;
}

/* azure_mac_fn for a device key inside a PKCS#11 token. */
struct token_mac {
    struct p11 *p11;
    char *err;
    size_t err_size;
};

static int token_mac_cb(void *arg, const void *data, size_t len, uint8_t out[32])
{
    struct token_mac *t = arg;

    return p11_hmac_sha256(t->p11, data, len, out, t->err, t->err_size);
}

/* The SAS token signed inside the token azure.key_file names (a pkcs11:
 * URI with its PIN in pin-source= or pin-value=). Returns as
 * azure_sas_token(); -EACCES/-ENOENT/-ENOKEY/... with @out->token_error. */
static int token_sas(const struct conf_azure *azure, time_t expiry, struct profile_connect_id *out)
{
    struct token_mac t = {NULL, out->token_error, sizeof(out->token_error)};
    int rc = p11_open(azure->key_file, NULL, NULL, &t.p11, t.err, t.err_size);

    if (rc < 0)
        return rc;
    rc = azure_sas_token_mac(token_mac_cb, &t, azure->hub, azure->device_id, azure->policy, expiry,
                             out->token, sizeof(out->token));
    p11_close(t.p11);
    return rc;
}

static void azure_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out)
{
    const struct conf_azure *azure = azure_conf(uc);

    if (azure->device_id == NULL || azure->hub == NULL)
        return;
    snprintf(out->client_id, sizeof(out->client_id), "%s", azure->device_id);
    snprintf(out->username, sizeof(out->username), "%s/%s/?api-version=%s", azure->hub,
             azure->device_id, azure->api_version ? azure->api_version : AZURE_API_VERSION);
    if (azure->key_file == NULL && !azure->child)
        return; /* X.509: no password */
    time_t expiry = time(NULL) + (time_t)(azure->token_life_ms / 1000);
    if (!azure->child && keys_is_uri(azure->key_file)) {
        int rc = token_sas(azure, expiry, out);
        if (rc < 0) {
            if (!out->token_error[0] || rc == -ENAMETOOLONG)
                snprintf(out->token_error, sizeof(out->token_error),
                         "cannot make a SAS token in the PKCS#11 token: %s", strerror(-rc));
            out->token[0] = '\0';
            return;
        }
        out->password = out->token;
        out->token_expires_at = (long long)expiry;
        return;
    }
    /* A SAS token made now from the key file, read every time (a replaced
     * key is used at once), for the daemon and uplinkctl diagnose alike. */
    uint8_t key[AZURE_KEY_MAX];
    int len = azure_device_key(azure, key, out->token_error, sizeof(out->token_error));
    if (len < 0)
        return;
    int n = azure_sas_token(key, (size_t)len, azure->hub, azure->device_id,
                            azure->child ? NULL : azure->policy, expiry, out->token,
                            sizeof(out->token));
    OPENSSL_cleanse(key, sizeof(key));
    if (n < 0) {
        snprintf(out->token_error, sizeof(out->token_error), "cannot make a SAS token: %s",
                 strerror(-n));
        out->token[0] = '\0';
        return;
    }
    out->password = out->token;
    out->token_expires_at = (long long)expiry;
}

/* IoT Hub's CONNACK codes ("Communicate with an IoT hub using the MQTT
 * protocol", "Using the MQTT protocol directly (as a device)"). */
static const char *azure_connack_text(const struct conf_uplink *uc, int rc)
{
    (void)uc;
    switch (rc) {
    case 2:
        return "IoT Hub refused the client id: it must be the device id (azure.device_id)";
    case 3:
        return "IoT Hub is unavailable or throttling this device (the hub's quota of "
               "connections or messages per unit): it retries with backoff";
    case 4:
        return "IoT Hub refused the credentials: the user name must be "
               "<hub>/<device>/?api-version=..., the SAS token signed with the device's key "
               "(azure.key_file: its primary or secondary key, base64) for "
               "<hub>/devices/<device>, and not expired (check the clock)";
    case 5:
        return "IoT Hub did not authorise the device: it is not registered in this hub, it is "
               "disabled, or the key or certificate is not the one registered for it";
    default:
        return NULL;
    }
}

static void azure_diagnose_refused(const struct conf_uplink *uc, const char *client_id, FILE *out)
{
    const struct conf_azure *azure = azure_conf(uc);

    fprintf(out,
            "  azure: the device \"%s\" must exist and be enabled in hub %s; with a SAS token, "
            "azure.key_file must hold its primary or secondary key (base64, as the portal "
            "shows it); with X.509, the registered thumbprint or CA must match tls.cert "
            "(client id sent: %s)\n",
            azure->device_id ? azure->device_id : "(none)", azure->hub ? azure->hub : "(none)",
            client_id);
}

const struct profile_spec profile_spec_azure = {
    .name = "azure",
    .connect_id = azure_connect_id,
    .connack_text = azure_connack_text,
    .diagnose_refused = azure_diagnose_refused,
    .child_check = azure_device_id_check,
    .section_parse = azure_section_parse,
    .section_free = azure_section_free,
    .section_equal = azure_section_equal,
    .client_id_from = "device_id",
    /* "Receive Maximum ... is 16" (IoT Hub MQTT 5 support, the one place
     * IoT Hub states its limit of unacknowledged device-to-cloud QoS 1
     * publishes per connection). */
    .max_inflight_default = AZURE_MAX_INFLIGHT,
};
