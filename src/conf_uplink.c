/* conf_uplink.c - uplinks[]: the broker, tls, auth (basic, jwt and its
 * key), reconnect, spool and rate of each uplink, then its profile's own
 * section through the profile's descriptor (profile_spec.h); freeing and
 * the reload comparison (conf_uplink_equal) live here too, beside the
 * fields they cover (docs/configuration.md, "uplinks").
 */
#include "conf_walk.h"

#include "jwt.h"
#include "keys.h"
#include "profile_spec.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONF_UPLINK_NAME_MAX        64
#define DEFAULT_PROFILE             "generic"
#define DEFAULT_KEEPALIVE_S         60
#define DEFAULT_RECONNECT_BASE_MS   1000
#define DEFAULT_RECONNECT_CAP_MS    120000
#define DEFAULT_MAX_QUEUED          10000
#define DEFAULT_UPLINK_MAX_INFLIGHT 100
#define MAX_UPLINK_MAX_INFLIGHT     10000
#define DEFAULT_PORT_TLS            8883
#define DEFAULT_PORT_PLAIN          1883

/* ------------------------------------------------------------------------ */
/* TLS                                                                       */

enum { TLS_ENABLED, TLS_CA, TLS_CERT, TLS_KEY, TLS_MIN_VERSION, TLS_ALPN, TLS_INSECURE, TLS_KEYS };
static const char *const tls_keys[TLS_KEYS] = {
    [TLS_ENABLED] = "enabled",
    [TLS_CA] = "ca",
    [TLS_CERT] = "cert",
    [TLS_KEY] = "key",
    [TLS_ALPN] = "alpn",
    [TLS_INSECURE] = "insecure",
    [TLS_MIN_VERSION] = "min_version",
};

/* tls.alpn: a protocol name or a list of them (RFC 7301 §3.1: 1-255 bytes
 * each). libmosquitto 2.0.11 puts exactly one name into the ClientHello
 * (lib/net_mosq.c net__init_ssl_ctx), so a longer list is refused rather
 * than silently cut. */
static void parse_alpn(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                       struct conf_tls *tls)
{
    static const char expected[] = "one ALPN protocol name, e.g. \"x-amzn-mqtt-ca\" or [\"mqtt\"]";
    const yaml_node_t *item = node;
    char item_key[CONF_KEY_MAX];

    conf_key_format(item_key, sizeof(item_key), "%s", key);
    if (node->type == YAML_SEQUENCE_NODE) {
        size_t n = conf_sequence_length(node);
        if (n == 0)
            return; /* an empty list offers nothing, like no key */
        if (n > 1) {
            conf_report(ld, node->start_mark, key,
                        "has %zu protocols, but libmosquitto 2.0 offers only one in the TLS "
                        "ClientHello (expected %s)",
                        n, expected);
            return;
        }
        item = conf_sequence_item(ld, node, 0);
        conf_key_format(item_key, sizeof(item_key), "%s[0]", key);
    }
    conf_get_text(ld, item, item_key, expected, 255, &tls->alpn);
}

static void parse_tls(struct conf_loader *ld, yaml_node_t *node, const char *path,
                      struct conf_tls *tls)
{
    yaml_node_t *values[TLS_KEYS] = {NULL};
    yaml_mark_t marks[TLS_KEYS];
    char key[CONF_KEY_MAX];
    char other[CONF_KEY_MAX];

    if (!conf_walk_mapping(ld, node, path, tls_keys, TLS_KEYS, values, marks))
        return;
    if (conf_node_present(values[TLS_ENABLED])) {
        conf_key_join(key, sizeof(key), path, "enabled");
        conf_get_bool(ld, values[TLS_ENABLED], key, &tls->enabled);
    }
    if (!tls->enabled) {
        /* A certificate that is silently not used is worse than an error. */
        for (int i = TLS_CA; i < TLS_KEYS; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, tls_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "has no effect because %s.enabled is false (remove it, or set %s.enabled: "
                        "true)",
                        path, path);
        }
        return;
    }
    if (conf_node_present(values[TLS_CA])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "ca");
        text = conf_scalar_text(ld, values[TLS_CA], key, "\"system\" or a path to a CA PEM file");
        if (text != NULL && strcmp(text, "system") == 0) {
            tls->ca_system = true;
        } else if (text != NULL &&
                   conf_get_readable_file(ld, values[TLS_CA], key,
                                          "\"system\" or a readable CA certificate PEM file",
                                          &tls->ca_file) == 0) {
            tls->ca_system = false;
            conf_set_where(ld, values[TLS_CA], &tls->ca_at);
        }
    }
    if (conf_node_present(values[TLS_CERT])) {
        conf_key_join(key, sizeof(key), path, "cert");
        if (conf_get_readable_file(ld, values[TLS_CERT], key,
                                   "a readable client certificate PEM file", &tls->cert) == 0)
            conf_set_where(ld, values[TLS_CERT], &tls->cert_at);
    }
    if (conf_node_present(values[TLS_KEY])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "key");
        text = conf_scalar_text(ld, values[TLS_KEY], key, "a PEM file or a pkcs11: URI");
        if (text != NULL && keys_is_uri(text)) {
            /* A token key: opened (PIN, object, match with tls.cert) by
             * tlscheck at start-up and by --check-config. Only the engine's
             * presence is checked here. */
            char err[KEYS_ERR_SIZE];
            if (conf_get_text(ld, values[TLS_KEY], key, "a pkcs11: URI", 4096, &tls->key) == 0 &&
                keys_pkcs11_available(err, sizeof(err)) < 0)
                conf_report(ld, values[TLS_KEY]->start_mark, key, "%s", err);
        } else if (text != NULL) {
            conf_get_readable_file(ld, values[TLS_KEY], key,
                                   "a readable private key PEM file or a pkcs11: URI", &tls->key);
        }
    }
    if (conf_node_present(values[TLS_MIN_VERSION])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "min_version");
        text = conf_scalar_text(ld, values[TLS_MIN_VERSION], key, "tls1.2 or tls1.3");
        if (text != NULL && strcmp(text, "tls1.2") == 0) {
            tls->min_version = CONF_TLS_1_2;
        } else if (text != NULL && strcmp(text, "tls1.3") == 0) {
            tls->min_version = CONF_TLS_1_3;
        } else if (text != NULL) {
            char quoted[CONF_QUOTE_MAX];
            conf_report(ld, values[TLS_MIN_VERSION]->start_mark, key,
                        "%s is not a TLS version uplinkd offers (expected tls1.2 or tls1.3; older "
                        "versions are not supported)",
                        conf_quote(text, quoted, sizeof(quoted)));
        }
    }
    if (conf_node_present(values[TLS_ALPN])) {
        conf_key_join(key, sizeof(key), path, "alpn");
        parse_alpn(ld, values[TLS_ALPN], key, tls);
    }
    if (conf_node_present(values[TLS_INSECURE])) {
        conf_key_join(key, sizeof(key), path, "insecure");
        conf_get_bool(ld, values[TLS_INSECURE], key, &tls->insecure);
    }
    /* Either one alone cannot authenticate: the key proves possession of
     * the certificate's public key (RFC 8446 §4.4.3 CertificateVerify). */
    if (conf_node_present(values[TLS_CERT]) != conf_node_present(values[TLS_KEY])) {
        int have = conf_node_present(values[TLS_CERT]) ? TLS_CERT : TLS_KEY;
        int lack = have == TLS_CERT ? TLS_KEY : TLS_CERT;
        conf_key_join(key, sizeof(key), path, tls_keys[have]);
        conf_key_join(other, sizeof(other), path, tls_keys[lack]);
        conf_report(ld, values[have]->start_mark, key,
                    "is set without %s (a client certificate needs "
                    "both cert and key; add %s or remove %s)",
                    other, other, key);
    }
}

/* The jwt keys come after AUTH_PASSWORD_FILE: AUTH_JWT_FIRST.. are the ones
 * only type jwt uses. */
enum {
    AUTH_TYPE,
    AUTH_USERNAME,
    AUTH_PASSWORD,
    AUTH_PASSWORD_FILE,
    AUTH_ALG,
    AUTH_KEY,
    AUTH_PASSPHRASE_FILE,
    AUTH_PKCS11_MODULE,
    AUTH_LIFETIME,
    AUTH_SKEW,
    AUTH_REFRESH,
    AUTH_AUD,
    AUTH_KID,
    AUTH_CLAIMS,
    AUTH_CLOCK_CHECK,
    AUTH_KEYS,
    AUTH_JWT_FIRST = AUTH_ALG,
};
static const char *const auth_keys[AUTH_KEYS] = {
    [AUTH_TYPE] = "type",
    [AUTH_USERNAME] = "username",
    [AUTH_PASSWORD] = "password",
    [AUTH_PASSWORD_FILE] = "password_file",
    [AUTH_ALG] = "alg",
    [AUTH_KEY] = "key",
    [AUTH_PASSPHRASE_FILE] = "passphrase_file",
    [AUTH_PKCS11_MODULE] = "pkcs11_module",
    [AUTH_LIFETIME] = "lifetime",
    [AUTH_SKEW] = "skew",
    [AUTH_REFRESH] = "refresh",
    [AUTH_AUD] = "aud",
    [AUTH_KID] = "kid",
    [AUTH_CLAIMS] = "claims",
    [AUTH_CLOCK_CHECK] = "clock_check",
};

/* JWT defaults and limits (docs/configuration.md, auth). */
#define JWT_USERNAME_DEFAULT "unused" /* GCP ignores the user name; any value works */
#define JWT_LIFETIME_MIN_S   10       /* shorter would reconnect all the time */
#define JWT_SKEW_MAX_S       3600
#define JWT_REFRESH_MIN_PCT  10
#define JWT_REFRESH_MAX_PCT  99

/* The cap on exp - iat without a profile rule: a token that lives longer
 * than a day is a risk (GCP IoT Core and ClearBlade refuse more, too). */
#define JWT_LIFETIME_MAX_S (24 * 3600)

/* auth.refresh: "80" or "80%". */
static void get_refresh_percent(struct conf_loader *ld, const yaml_node_t *node, const char *key,
                                uint32_t *out)
{
    char quoted[CONF_QUOTE_MAX];
    const char *text = conf_scalar_text(ld, node, key, "a percentage");
    unsigned value = 0;
    const char *p;

    if (text == NULL)
        return;
    for (p = text; *p >= '0' && *p <= '9' && value < 1000; p++)
        value = value * 10 + (unsigned)(*p - '0');
    if (p == text || (p[0] != '\0' && strcmp(p, "%") != 0) || value < JWT_REFRESH_MIN_PCT ||
        value > JWT_REFRESH_MAX_PCT) {
        conf_report(ld, node->start_mark, key,
                    "%s is not a valid refresh point (expected a percentage of the token's "
                    "lifetime from %d to %d, e.g. 80 or \"80%%\")",
                    conf_quote(text, quoted, sizeof(quoted)), JWT_REFRESH_MIN_PCT,
                    JWT_REFRESH_MAX_PCT);
        return;
    }
    *out = value;
}

/* auth.claims: a mapping of claim name -> string value. */
static void parse_jwt_claims(struct conf_loader *ld, yaml_node_t *node, const char *path,
                             struct conf_jwt *jwt)
{
    static const char expected[] = "a mapping of claim names to strings, e.g. {sub: gw-0001}";
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    size_t count;

    if (!conf_expect_kind(ld, node, path, YAML_MAPPING_NODE, expected))
        return;
    count = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    if (count == 0)
        return;
    if (count > CONF_JWT_MAX_CLAIMS) {
        conf_report(ld, node->start_mark, path, "has %zu claims (expected at most %d)", count,
                    CONF_JWT_MAX_CLAIMS);
        return;
    }
    jwt->claims = calloc(count, sizeof(*jwt->claims));
    if (jwt->claims == NULL) {
        ld->oom = true;
        return;
    }
    for (yaml_node_pair_t *pair = node->data.mapping.pairs.start;
         pair < node->data.mapping.pairs.top; pair++) {
        yaml_node_t *name_node = conf_node_at(ld, pair->key);
        yaml_node_t *value_node = conf_node_at(ld, pair->value);
        struct conf_jwt_claim claim = {NULL, NULL};
        bool ok = true;

        if (conf_get_text(ld, name_node, path, "a claim name", 256, &claim.name) < 0 ||
            claim.name == NULL)
            continue;
        conf_key_join(key, sizeof(key), path, claim.name);
        /* RFC 7519 §4.1: iat, exp and aud are ours to set. */
        if (strcmp(claim.name, "iat") == 0 || strcmp(claim.name, "exp") == 0 ||
            strcmp(claim.name, "aud") == 0) {
            conf_report(ld, name_node->start_mark, key,
                        "is set by uplinkd (iat and exp from the clock and auth.lifetime, aud from "
                        "auth.aud); remove it");
            ok = false;
        }
        for (size_t i = 0; ok && i < jwt->claim_count; i++) {
            if (strcmp(jwt->claims[i].name, claim.name) == 0) {
                conf_report(ld, name_node->start_mark, key, "%s is given twice",
                            conf_quote(claim.name, quoted, sizeof(quoted)));
                ok = false;
            }
        }
        if (ok && (conf_get_text(ld, value_node, key, "a string value", CONF_MQTT_STRING_MAX,
                                 &claim.value) < 0 ||
                   claim.value == NULL))
            ok = false;
        if (!ok) {
            free(claim.name);
            free(claim.value);
            continue;
        }
        jwt->claims[jwt->claim_count++] = claim;
    }
}

/* Load auth.key, fit it to auth.alg and sign a trial token, so that a bad
 * key, passphrase, PIN, alg or claim is reported now (and by
 * --check-config) rather than on the first connection attempt. */
void conf_jwt_claims(const struct conf_jwt *jwt, struct jwt_claim *extra, struct jwt_claims *out)
{
    for (size_t i = 0; i < jwt->claim_count; i++)
        extra[i] = (struct jwt_claim){.name = jwt->claims[i].name, .value = jwt->claims[i].value};
    *out = (struct jwt_claims){.aud = jwt->aud,
                               .lifetime_s = jwt->lifetime_s,
                               .max_lifetime_s = jwt->max_lifetime_s,
                               .skew_s = jwt->skew_s,
                               .extra = extra,
                               .extra_count = jwt->claim_count};
}

static void jwt_load_key(struct conf_loader *ld, yaml_node_t *auth_node, yaml_node_t *const *values,
                         const char *path, struct conf_jwt *jwt)
{
    struct keys_options options = {.passphrase_file = jwt->passphrase_file,
                                   .pkcs11_module = jwt->pkcs11_module};
    struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
    struct jwt_claims claims;
    struct jwt_signer *signer = NULL;
    yaml_node_t *alg_node = values[AUTH_ALG];
    char key[CONF_KEY_MAX];
    char err[KEYS_ERR_SIZE];
    char described[64];
    char *token = NULL;
    int rc;

    conf_key_join(key, sizeof(key), path, "key");
    rc = keys_load_private(jwt->key, &options, &jwt->private_key, err, sizeof(err));
    if (rc == -ENOMEM) {
        ld->oom = true;
        return;
    }
    if (rc < 0) {
        conf_report(ld, values[AUTH_KEY]->start_mark, key, "%s", err);
        return;
    }
    if (!conf_node_present(alg_node) && jwt_alg_for_key(jwt->private_key, &jwt->alg) < 0) {
        conf_report(ld, values[AUTH_KEY]->start_mark, key,
                    "is a %s key, which cannot sign a JWT (expected RSA of 2048 bits or more for "
                    "RS256/PS256, or EC P-256/P-384 for ES256/ES384)",
                    keys_describe(jwt->private_key, described, sizeof(described)));
        return;
    }
    rc = jwt_signer_new(jwt->private_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, err,
                        sizeof(err));
    if (rc == -ENOMEM) {
        ld->oom = true;
        return;
    }
    if (rc < 0) {
        conf_key_join(key, sizeof(key), path, conf_node_present(alg_node) ? "alg" : "key");
        conf_report(ld, (conf_node_present(alg_node) ? alg_node : values[AUTH_KEY])->start_mark,
                    key, "%s", err);
        return;
    }
    conf_jwt_claims(jwt, extra, &claims);
    /* Any time after the build date will do: this checks the key, not the
     * clock (the clock is checked before every real signature). */
    rc = jwt_sign(signer, &claims, jwt_build_epoch() + 86400, &token, NULL, err, sizeof(err));
    if (rc == -ENOMEM)
        ld->oom = true;
    else if (rc < 0)
        conf_report(ld, auth_node->start_mark, path, "cannot sign a test token: %s", err);
    if (token != NULL) {
        explicit_bzero(token, strlen(token));
        free(token);
    }
    jwt_signer_free(signer);
}

/* The auth keys of type jwt; the username default is set by the caller. */
static void parse_auth_jwt(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *const *values,
                           const char *path, const struct profile_spec *spec, struct conf_jwt *jwt)
{
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    unsigned errors_before = ld->error_count;
    const char *text;

    jwt->lifetime_s = JWT_DEFAULT_LIFETIME_S;
    jwt->max_lifetime_s =
        spec && spec->jwt_max_lifetime_s ? spec->jwt_max_lifetime_s : JWT_LIFETIME_MAX_S;
    jwt->skew_s = JWT_DEFAULT_SKEW_S;
    jwt->refresh_percent = JWT_DEFAULT_REFRESH_PCT;
    jwt->kid_mode = JWT_KID_NONE;
    jwt->clock_check = CONF_CLOCK_SYNC;

    conf_key_join(key, sizeof(key), path, "key");
    if (!conf_node_present(values[AUTH_KEY])) {
        conf_report(ld, values[AUTH_KEY] ? values[AUTH_KEY]->start_mark : node->start_mark, key,
                    "missing (required with type jwt: a private key PEM file or a pkcs11: URI)");
    } else {
        text = conf_scalar_text(ld, values[AUTH_KEY], key, "a PEM file or a pkcs11: URI");
        if (text != NULL && keys_is_uri(text))
            conf_get_text(ld, values[AUTH_KEY], key, "a pkcs11: URI", 4096, &jwt->key);
        else if (text != NULL)
            conf_get_readable_file(ld, values[AUTH_KEY], key, "a readable private key PEM file",
                                   &jwt->key);
    }
    if (conf_node_present(values[AUTH_PASSPHRASE_FILE])) {
        conf_key_join(key, sizeof(key), path, "passphrase_file");
        conf_get_readable_file(ld, values[AUTH_PASSPHRASE_FILE], key,
                               "a readable file whose first line is the passphrase or PIN",
                               &jwt->passphrase_file);
    }
    if (conf_node_present(values[AUTH_PKCS11_MODULE])) {
        conf_key_join(key, sizeof(key), path, "pkcs11_module");
        conf_get_readable_file(ld, values[AUTH_PKCS11_MODULE], key,
                               "a readable PKCS#11 module (.so), e.g. "
                               "/usr/lib/softhsm/libsofthsm2.so",
                               &jwt->pkcs11_module);
    }
    if (conf_node_present(values[AUTH_ALG])) {
        static const char expected[] = "RS256, PS256, ES256 or ES384";
        conf_key_join(key, sizeof(key), path, "alg");
        text = conf_scalar_text(ld, values[AUTH_ALG], key, expected);
        if (text != NULL && jwt_alg_parse(text, &jwt->alg) < 0) {
            enum jwt_alg upper;
            char fixed[8] = "";
            for (size_t i = 0; i < sizeof(fixed) - 1 && text[i]; i++)
                fixed[i] = (char)(text[i] >= 'a' && text[i] <= 'z' ? text[i] - 32 : text[i]);
            if (strlen(text) < sizeof(fixed) && jwt_alg_parse(fixed, &upper) == 0)
                conf_report(ld, values[AUTH_ALG]->start_mark, key,
                            "%s is not an algorithm name (JWS names are case-sensitive: write %s)",
                            conf_quote(text, quoted, sizeof(quoted)), fixed);
            else
                conf_report(ld, values[AUTH_ALG]->start_mark, key,
                            "%s is not a supported algorithm (expected %s)",
                            conf_quote(text, quoted, sizeof(quoted)), expected);
        }
    }
    if (conf_node_present(values[AUTH_LIFETIME])) {
        conf_key_join(key, sizeof(key), path, "lifetime");
        conf_get_seconds(ld, values[AUTH_LIFETIME], key, JWT_LIFETIME_MIN_S, jwt->max_lifetime_s,
                         &jwt->lifetime_s);
    }
    if (conf_node_present(values[AUTH_SKEW])) {
        conf_key_join(key, sizeof(key), path, "skew");
        conf_get_seconds(ld, values[AUTH_SKEW], key, 0, JWT_SKEW_MAX_S, &jwt->skew_s);
    }
    if (conf_node_present(values[AUTH_REFRESH])) {
        conf_key_join(key, sizeof(key), path, "refresh");
        get_refresh_percent(ld, values[AUTH_REFRESH], key, &jwt->refresh_percent);
    }
    conf_key_join(key, sizeof(key), path, "aud");
    if (conf_node_present(values[AUTH_AUD]))
        conf_get_text(ld, values[AUTH_AUD], key, "the audience the cloud expects",
                      CONF_MQTT_STRING_MAX, &jwt->aud);
    else if (spec != NULL && spec->jwt_aud_required)
        conf_report(
            ld, values[AUTH_AUD] ? values[AUTH_AUD]->start_mark : node->start_mark, key,
            "missing (required with type jwt and the generic profile: the audience the cloud "
            "expects, e.g. the project id)");
    if (conf_node_present(values[AUTH_KID])) {
        conf_key_join(key, sizeof(key), path, "kid");
        text = conf_scalar_text(ld, values[AUTH_KID], key, "auto or a key id");
        if (text != NULL && strcmp(text, "auto") == 0)
            jwt->kid_mode = JWT_KID_FINGERPRINT;
        else if (text != NULL &&
                 conf_get_text(ld, values[AUTH_KID], key,
                               "\"auto\" (hex SHA-256 of the public key) or the key id to send",
                               1024, &jwt->kid) == 0)
            jwt->kid_mode = JWT_KID_VALUE;
    }
    if (conf_node_present(values[AUTH_CLAIMS])) {
        conf_key_join(key, sizeof(key), path, "claims");
        parse_jwt_claims(ld, values[AUTH_CLAIMS], key, jwt);
    }
    if (conf_node_present(values[AUTH_CLOCK_CHECK])) {
        conf_key_join(key, sizeof(key), path, "clock_check");
        text = conf_scalar_text(ld, values[AUTH_CLOCK_CHECK], key, "sync or build-date");
        if (text != NULL && strcmp(text, "sync") == 0)
            jwt->clock_check = CONF_CLOCK_SYNC;
        else if (text != NULL && strcmp(text, "build-date") == 0)
            jwt->clock_check = CONF_CLOCK_BUILD_DATE;
        else if (text != NULL)
            conf_report(ld, values[AUTH_CLOCK_CHECK]->start_mark, key,
                        "%s is not a clock check (expected sync: wait until the kernel says the "
                        "clock is NTP-synchronised, or build-date: only refuse a clock before the "
                        "build date)",
                        conf_quote(text, quoted, sizeof(quoted)));
    }
    /* Only a section without other errors is worth opening a key (or a
     * token) for. */
    if (ld->error_count == errors_before && !ld->oom)
        jwt_load_key(ld, node, values, path, jwt);
}

static void parse_auth(struct conf_loader *ld, yaml_node_t *node, const char *path,
                       const struct profile_spec *spec, struct conf_auth *auth)
{
    yaml_node_t *values[AUTH_KEYS] = {NULL};
    yaml_mark_t marks[AUTH_KEYS];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];

    if (!conf_walk_mapping(ld, node, path, auth_keys, AUTH_KEYS, values, marks))
        return;
    if (conf_node_present(values[AUTH_TYPE])) {
        const char *text;
        conf_key_join(key, sizeof(key), path, "type");
        text = conf_scalar_text(ld, values[AUTH_TYPE], key, "none, basic or jwt");
        if (text != NULL && strcmp(text, "none") == 0) {
            auth->type = CONF_AUTH_NONE;
        } else if (text != NULL && strcmp(text, "basic") == 0) {
            auth->type = CONF_AUTH_BASIC;
        } else if (text != NULL && strcmp(text, "jwt") == 0) {
            auth->type = CONF_AUTH_JWT;
        } else if (text != NULL) {
            conf_report(ld, values[AUTH_TYPE]->start_mark, key,
                        "%s is not an auth type (expected none, basic or jwt)",
                        conf_quote(text, quoted, sizeof(quoted)));
            return; /* the checks below would only add noise */
        } else {
            return;
        }
    }
    if (auth->type == CONF_AUTH_NONE) {
        for (int i = AUTH_USERNAME; i < AUTH_KEYS; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, auth_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "is set but %s.type is none (add \"type: basic\" or remove it)", path);
        }
        return;
    }
    if (auth->type == CONF_AUTH_JWT) {
        for (int i = AUTH_PASSWORD; i <= AUTH_PASSWORD_FILE; i++) {
            if (!conf_node_present(values[i]))
                continue;
            conf_key_join(key, sizeof(key), path, auth_keys[i]);
            conf_report(ld, values[i]->start_mark, key,
                        "is not used with type jwt: the password is a token signed with %s.key "
                        "(remove it)",
                        path);
        }
        conf_key_join(key, sizeof(key), path, "username");
        if (conf_node_present(values[AUTH_USERNAME]))
            conf_get_text(ld, values[AUTH_USERNAME], key, "the MQTT user name",
                          CONF_MQTT_STRING_MAX, &auth->username);
        else
            conf_set_string(ld, &auth->username, JWT_USERNAME_DEFAULT);
        parse_auth_jwt(ld, node, values, path, spec, &auth->jwt);
        return;
    }
    for (int i = AUTH_JWT_FIRST; i < AUTH_KEYS; i++) {
        if (!conf_node_present(values[i]))
            continue;
        conf_key_join(key, sizeof(key), path, auth_keys[i]);
        conf_report(ld, values[i]->start_mark, key,
                    "is only used with type jwt (set %s.type: jwt, or remove it)", path);
    }

    conf_key_join(key, sizeof(key), path, "username");
    if (!conf_node_present(values[AUTH_USERNAME]))
        conf_report(ld,
                    values[AUTH_USERNAME] ? values[AUTH_USERNAME]->start_mark : node->start_mark,
                    key, "missing (required with type basic: the MQTT user name)");
    else
        conf_get_text(ld, values[AUTH_USERNAME], key, "the MQTT user name", CONF_MQTT_STRING_MAX,
                      &auth->username);

    if (conf_node_present(values[AUTH_PASSWORD]) && conf_node_present(values[AUTH_PASSWORD_FILE])) {
        conf_key_join(key, sizeof(key), path, "password_file");
        conf_report(ld, values[AUTH_PASSWORD_FILE]->start_mark, key,
                    "is set together with %s.password (line %zu, column %zu); use only one", path,
                    values[AUTH_PASSWORD]->start_mark.line + 1,
                    values[AUTH_PASSWORD]->start_mark.column + 1);
        return;
    }
    if (conf_node_present(values[AUTH_PASSWORD])) {
        /* An MQTT password is binary data (§3.1.3.5), so only its length is
         * checked; an empty one is an explicit choice, keep it. */
        const char *text;
        conf_key_join(key, sizeof(key), path, "password");
        text = conf_scalar_text(ld, values[AUTH_PASSWORD], key, "the MQTT password");
        if (text != NULL && strlen(text) > CONF_MQTT_STRING_MAX)
            conf_report(ld, values[AUTH_PASSWORD]->start_mark, key,
                        "is longer than 65535 bytes (MQTT 3.1.1 §3.1.3.5)");
        else if (text != NULL)
            conf_set_string(ld, &auth->password, text);
    }
    if (conf_node_present(values[AUTH_PASSWORD_FILE])) {
        conf_key_join(key, sizeof(key), path, "password_file");
        conf_read_password_file(ld, values[AUTH_PASSWORD_FILE], key, &auth->password);
    }
}

enum { RECONNECT_BASE, RECONNECT_CAP, RECONNECT_KEYS };
static const char *const reconnect_keys[RECONNECT_KEYS] = {
    [RECONNECT_BASE] = "base",
    [RECONNECT_CAP] = "cap",
};

static void parse_reconnect(struct conf_loader *ld, yaml_node_t *node, const char *path,
                            struct conf_uplink *uplink)
{
    yaml_node_t *values[RECONNECT_KEYS] = {NULL};
    yaml_mark_t marks[RECONNECT_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t ms;
    bool cap_ok = true;

    if (!conf_walk_mapping(ld, node, path, reconnect_keys, RECONNECT_KEYS, values, marks))
        return;
    if (conf_node_present(values[RECONNECT_BASE])) {
        conf_key_join(key, sizeof(key), path, "base");
        if (conf_get_duration_ms(ld, values[RECONNECT_BASE], key, 100, 3600 * 1000, &ms) == 0)
            uplink->reconnect_base_ms = (unsigned)ms;
    }
    if (conf_node_present(values[RECONNECT_CAP])) {
        conf_key_join(key, sizeof(key), path, "cap");
        if (conf_get_duration_ms(ld, values[RECONNECT_CAP], key, 100, 24 * 3600 * 1000, &ms) == 0)
            uplink->reconnect_cap_ms = (unsigned)ms;
        else
            cap_ok = false;
    }
    if (cap_ok && uplink->reconnect_cap_ms < uplink->reconnect_base_ms) {
        char base[32], cap[32];
        yaml_node_t *at = values[RECONNECT_CAP] ? values[RECONNECT_CAP] : values[RECONNECT_BASE];
        conf_format_ms(base, sizeof(base), uplink->reconnect_base_ms);
        conf_format_ms(cap, sizeof(cap), uplink->reconnect_cap_ms);
        conf_key_join(key, sizeof(key), path, values[RECONNECT_CAP] ? "cap" : "base");
        conf_report(ld, at->start_mark, key,
                    "cap (%s) is shorter than base (%s) (expected cap >= base)", cap, base);
    }
}

enum {
    SPOOL_DURABILITY,
    SPOOL_MAX_BYTES,
    SPOOL_MAX_AGE,
    SPOOL_OVERFLOW,
    SPOOL_COMMIT_INTERVAL,
    SPOOL_COMMIT_GAP,
    SPOOL_QOS0_OFFLINE,
    SPOOL_KEYS
};
static const char *const spool_keys[SPOOL_KEYS] = {
    [SPOOL_DURABILITY] = "durability",
    [SPOOL_MAX_BYTES] = "max_bytes",
    [SPOOL_MAX_AGE] = "max_age",
    [SPOOL_OVERFLOW] = "overflow",
    [SPOOL_COMMIT_INTERVAL] = "commit_interval",
    [SPOOL_COMMIT_GAP] = "commit_gap",
    [SPOOL_QOS0_OFFLINE] = "qos0_offline",
};

static void parse_spool(struct conf_loader *ld, yaml_node_t *node, const char *path,
                        struct conf_spool *spool)
{
    static const char *const durability[] = {"fsync", "none"};
    static const char *const overflow[] = {"block", "drop-oldest"};
    static const char *const qos0[] = {"drop", "spool"};
    yaml_node_t *values[SPOOL_KEYS] = {NULL};
    yaml_mark_t marks[SPOOL_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t number;
    int choice;

    if (!conf_walk_mapping(ld, node, path, spool_keys, SPOOL_KEYS, values, marks))
        return;
    if (conf_node_present(values[SPOOL_DURABILITY])) {
        conf_key_join(key, sizeof(key), path, "durability");
        if (conf_get_keyword(ld, values[SPOOL_DURABILITY], key, durability, 2, "fsync or none",
                             &choice) == 0)
            spool->durability = choice ? CONF_SPOOL_NONE : CONF_SPOOL_FSYNC;
    }
    if (conf_node_present(values[SPOOL_MAX_BYTES])) {
        conf_key_join(key, sizeof(key), path, "max_bytes");
        /* At least 64 KiB: a segment's worth, so the bound means something. */
        if (conf_get_size(ld, values[SPOOL_MAX_BYTES], key, 64 * 1024, 1ULL << 50, &number) == 0)
            spool->max_bytes = number;
    }
    if (conf_node_present(values[SPOOL_MAX_AGE])) {
        conf_key_join(key, sizeof(key), path, "max_age");
        if (conf_get_duration_ms(ld, values[SPOOL_MAX_AGE], key, 1000, 3650ULL * 24 * 3600 * 1000,
                                 &number) == 0)
            spool->max_age_ms = number;
    }
    if (conf_node_present(values[SPOOL_OVERFLOW])) {
        conf_key_join(key, sizeof(key), path, "overflow");
        if (conf_get_keyword(ld, values[SPOOL_OVERFLOW], key, overflow, 2, "block or drop-oldest",
                             &choice) == 0)
            spool->overflow = choice ? CONF_SPOOL_DROP_OLDEST : CONF_SPOOL_BLOCK;
    }
    if (conf_node_present(values[SPOOL_COMMIT_INTERVAL])) {
        conf_key_join(key, sizeof(key), path, "commit_interval");
        if (conf_get_duration_ms(ld, values[SPOOL_COMMIT_INTERVAL], key, 0, 1000, &number) == 0)
            spool->commit_interval_ms = (unsigned)number;
    }
    if (conf_node_present(values[SPOOL_COMMIT_GAP])) {
        conf_key_join(key, sizeof(key), path, "commit_gap");
        if (conf_get_duration_ms(ld, values[SPOOL_COMMIT_GAP], key, 0, 1000, &number) == 0)
            spool->commit_gap_ms = (unsigned)number;
    }
    if (conf_node_present(values[SPOOL_QOS0_OFFLINE])) {
        conf_key_join(key, sizeof(key), path, "qos0_offline");
        if (conf_get_keyword(ld, values[SPOOL_QOS0_OFFLINE], key, qos0, 2, "drop or spool",
                             &choice) == 0)
            spool->qos0_offline_spool = choice == 1;
    }
}

enum { RATE_MAX_MSGS, RATE_MAX_BYTES, RATE_KEYS };
static const char *const rate_keys[RATE_KEYS] = {
    [RATE_MAX_MSGS] = "max_msgs_per_s",
    [RATE_MAX_BYTES] = "max_bytes_per_s",
};

static void parse_rate(struct conf_loader *ld, yaml_node_t *node, const char *path,
                       struct conf_rate *rate)
{
    yaml_node_t *values[RATE_KEYS] = {NULL};
    yaml_mark_t marks[RATE_KEYS];
    char key[CONF_KEY_MAX];
    uint64_t number;

    if (!conf_walk_mapping(ld, node, path, rate_keys, RATE_KEYS, values, marks))
        return;
    if (conf_node_present(values[RATE_MAX_MSGS])) {
        conf_key_join(key, sizeof(key), path, "max_msgs_per_s");
        if (conf_get_uint(ld, values[RATE_MAX_MSGS], key, "a message rate", 1, 1000000, &number) ==
            0)
            rate->max_msgs_per_s = (uint32_t)number;
    }
    if (conf_node_present(values[RATE_MAX_BYTES])) {
        conf_key_join(key, sizeof(key), path, "max_bytes_per_s");
        if (conf_get_size(ld, values[RATE_MAX_BYTES], key, 1024, 1ULL << 40, &number) == 0)
            rate->max_bytes_per_s = number;
    }
}

enum {
    UPLINK_NAME,
    UPLINK_PROFILE,
    UPLINK_HOST,
    UPLINK_PORT,
    UPLINK_CLIENT_ID,
    UPLINK_KEEPALIVE,
    UPLINK_CLEAN_SESSION,
    UPLINK_TLS,
    UPLINK_AUTH,
    UPLINK_RECONNECT,
    UPLINK_MAX_QUEUED,
    UPLINK_MAX_INFLIGHT,
    UPLINK_SPOOL,
    UPLINK_RATE,
    UPLINK_SECTIONS, /* then one key per profile, named after it, in the list's order */
    UPLINK_KEYS = UPLINK_SECTIONS + PROFILE_COUNT
};
static const char *const uplink_keys[UPLINK_KEYS] = {[UPLINK_NAME] = "name",
                                                     [UPLINK_PROFILE] = "profile",
                                                     [UPLINK_HOST] = "host",
                                                     [UPLINK_PORT] = "port",
                                                     [UPLINK_CLIENT_ID] = "client_id",
                                                     [UPLINK_KEEPALIVE] = "keepalive",
                                                     [UPLINK_CLEAN_SESSION] = "clean_session",
                                                     [UPLINK_TLS] = "tls",
                                                     [UPLINK_AUTH] = "auth",
                                                     [UPLINK_RECONNECT] = "reconnect",
                                                     [UPLINK_MAX_QUEUED] = "max_queued",
                                                     [UPLINK_MAX_INFLIGHT] = "max_inflight",
                                                     [UPLINK_SPOOL] = "spool",
                                                     [UPLINK_RATE] = "rate",
#define PROFILE_SECTION_KEY(name) #name,
                                                     PROFILE_LIST(PROFILE_SECTION_KEY)
#undef PROFILE_SECTION_KEY
};

static void parse_uplink_name(struct conf_loader *ld, yaml_node_t *node, yaml_node_t *map,
                              const char *path, size_t index)
{
    static const char expected[] = "1-64 characters from A-Z a-z 0-9 _ -, e.g. \"cloud\"";
    struct conf_uplink *uplink = &ld->conf->uplinks[index];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    const char *bad;

    conf_key_join(key, sizeof(key), path, "name");
    if (!conf_node_present(node)) {
        conf_report(ld, node ? node->start_mark : map->start_mark, key, "missing (required: %s)",
                    expected);
        return;
    }
    if (conf_get_text(ld, node, key, expected, CONF_UPLINK_NAME_MAX, &uplink->name) < 0 ||
        uplink->name == NULL)
        return;
    bad = conf_first_bad_char(uplink->name, "_-");
    if (bad != NULL) {
        char what[48];
        conf_describe_char(what, sizeof(what), *bad);
        conf_report(ld, node->start_mark, key, "%s contains %s (expected %s)",
                    conf_quote(uplink->name, quoted, sizeof(quoted)), what, expected);
        free(uplink->name);
        uplink->name = NULL;
        return;
    }
    for (size_t j = 0; j < index; j++) {
        const struct conf_uplink *other = &ld->conf->uplinks[j];
        if (other->name != NULL && strcmp(other->name, uplink->name) == 0) {
            conf_report(
                ld, node->start_mark, key,
                "%s is already the name of uplinks[%zu] at %s:%zu:%zu (names must be unique)",
                conf_quote(uplink->name, quoted, sizeof(quoted)), j, ld->path,
                ld->uplink_name_marks[j].line + 1, ld->uplink_name_marks[j].column + 1);
            break;
        }
    }
    ld->uplink_name_marks[index] = node->start_mark;
}

/* uplinks[].<profile>: the uplink's own profile reads its section (also
 * when absent, for its defaults and rules); a section of another profile
 * is a mistake worth saying. */
static void parse_sections(struct conf_loader *ld, yaml_node_t *node, const char *path,
                           yaml_node_t *const *values, struct conf_uplink *uplink)
{
    const struct profile_spec *const *specs = profile_specs();
    char key[CONF_KEY_MAX];

    for (size_t i = 0; i < PROFILE_COUNT; i++) {
        const struct profile_spec *spec = specs[i];
        yaml_node_t *section = values[UPLINK_SECTIONS + i];

        if (spec != uplink->spec) {
            if (conf_node_present(section)) {
                conf_key_join(key, sizeof(key), path, spec->name);
                conf_report(ld, section->start_mark, key, "is only used with profile: %s",
                            spec->name);
            }
            continue;
        }
        if (spec->client_id_from != NULL && conf_node_present(values[UPLINK_CLIENT_ID])) {
            conf_key_join(key, sizeof(key), path, "client_id");
            conf_report(ld, values[UPLINK_CLIENT_ID]->start_mark, key,
                        "is set by profile %s (from %s.%s); remove it", spec->name, spec->name,
                        spec->client_id_from);
        }
        if (spec->section_parse != NULL) {
            spec->section_parse(ld, conf_node_present(section) ? section : NULL, node, path,
                                uplink);
        } else if (conf_node_present(section)) {
            conf_key_join(key, sizeof(key), path, spec->name);
            conf_report(ld, section->start_mark, key,
                        "is not used: profile %s has no settings of its own (remove it)",
                        spec->name);
        }
    }
}

static void parse_uplink(struct conf_loader *ld, yaml_node_t *node, size_t index)
{
    yaml_node_t *values[UPLINK_KEYS] = {NULL};
    yaml_mark_t marks[UPLINK_KEYS];
    struct conf_uplink *uplink = &ld->conf->uplinks[index];
    char path[CONF_KEY_MAX];
    char key[CONF_KEY_MAX];
    char quoted[CONF_QUOTE_MAX];
    uint64_t number;

    conf_key_format(path, sizeof(path), "uplinks[%zu]", index);
    uplink->keepalive_s = DEFAULT_KEEPALIVE_S;
    uplink->clean_session = true;
    uplink->tls.enabled = true;
    uplink->tls.ca_system = true;
    uplink->auth.type = CONF_AUTH_NONE;
    uplink->reconnect_base_ms = DEFAULT_RECONNECT_BASE_MS;
    uplink->reconnect_cap_ms = DEFAULT_RECONNECT_CAP_MS;
    uplink->max_queued_messages = DEFAULT_MAX_QUEUED;
    uplink->max_inflight = DEFAULT_UPLINK_MAX_INFLIGHT;
    uplink->spool.durability = CONF_SPOOL_FSYNC;
    uplink->spool.max_bytes = 256ULL * 1024 * 1024;
    uplink->spool.overflow = CONF_SPOOL_BLOCK;
    uplink->spool.commit_interval_ms = 5;

    if (!conf_walk_mapping(ld, node, path, uplink_keys, UPLINK_KEYS, values, marks))
        return;

    parse_uplink_name(ld, values[UPLINK_NAME], node, path, index);

    conf_key_join(key, sizeof(key), path, "profile");
    if (conf_node_present(values[UPLINK_PROFILE])) {
        const char *text = conf_scalar_text(ld, values[UPLINK_PROFILE], key, "a profile name");
        if (text != NULL && profile_spec_find(text) == NULL) {
            const char *const *names = profile_spec_names();
            size_t count = 0;
            char known[128];
            while (names[count])
                count++;
            conf_join_names(known, sizeof(known), names, count);
            conf_report(ld, values[UPLINK_PROFILE]->start_mark, key,
                        "%s is not a known profile (expected one of: %s)",
                        conf_quote(text, quoted, sizeof(quoted)), known);
        } else if (text != NULL) {
            conf_set_string(ld, &uplink->profile, text);
        }
    } else {
        conf_set_string(ld, &uplink->profile, DEFAULT_PROFILE);
    }
    uplink->spec = uplink->profile ? profile_spec_find(uplink->profile) : NULL;
    if (uplink->spec && uplink->spec->max_inflight_default)
        uplink->max_inflight = uplink->spec->max_inflight_default;

    conf_key_join(key, sizeof(key), path, "host");
    if (!conf_node_present(values[UPLINK_HOST])) {
        conf_report(ld, values[UPLINK_HOST] ? values[UPLINK_HOST]->start_mark : node->start_mark,
                    key,
                    "missing (required: the broker's DNS name or IP address, e.g. "
                    "\"broker.example.com\")");
    } else {
        const char *text =
            conf_scalar_text(ld, values[UPLINK_HOST], key, "a DNS name or IP address");
        char why[160];
        int rc = text ? conf_check_host(text, why, sizeof(why), &uplink->host) : 0;
        if (rc == -ENOMEM)
            ld->oom = true;
        else if (rc < 0)
            conf_report(ld, values[UPLINK_HOST]->start_mark, key,
                        "%s %s (expected a DNS name, an IPv4 address or an IPv6 address)",
                        conf_quote(text, quoted, sizeof(quoted)), why);
    }

    /* tls before port: the default port depends on tls.enabled. */
    if (conf_node_present(values[UPLINK_TLS])) {
        conf_key_join(key, sizeof(key), path, "tls");
        parse_tls(ld, values[UPLINK_TLS], key, &uplink->tls);
    }
    uplink->port = uplink->tls.enabled ? DEFAULT_PORT_TLS : DEFAULT_PORT_PLAIN;
    if (conf_node_present(values[UPLINK_PORT])) {
        conf_key_join(key, sizeof(key), path, "port");
        if (conf_get_uint(ld, values[UPLINK_PORT], key, "a port", 1, 65535, &number) == 0)
            uplink->port = (uint16_t)number;
    }

    if (conf_node_present(values[UPLINK_CLIENT_ID])) {
        conf_key_join(key, sizeof(key), path, "client_id");
        conf_get_text(ld, values[UPLINK_CLIENT_ID], key, "an MQTT client id", CONF_MQTT_STRING_MAX,
                      &uplink->client_id);
    }

    /* MQTT 3.1.1 §3.1.2.10: keep alive is a 16-bit number of seconds, 0
     * turns it off; libmosquitto refuses 1-4 s. */
    if (conf_node_present(values[UPLINK_KEEPALIVE])) {
        conf_key_join(key, sizeof(key), path, "keepalive");
        if (conf_get_duration_ms(ld, values[UPLINK_KEEPALIVE], key, 0, 65535 * 1000ULL, &number) ==
            0) {
            if (number % 1000 != 0 || (number > 0 && number < 5000))
                conf_report(
                    ld, values[UPLINK_KEEPALIVE]->start_mark, key,
                    "%s is not a valid keep alive (expected 0 to turn it off, or whole "
                    "seconds from 5s to 65535s)",
                    conf_quote(conf_node_text(values[UPLINK_KEEPALIVE]), quoted, sizeof(quoted)));
            else
                uplink->keepalive_s = (unsigned)(number / 1000);
        }
    }

    if (conf_node_present(values[UPLINK_CLEAN_SESSION])) {
        conf_key_join(key, sizeof(key), path, "clean_session");
        conf_get_bool(ld, values[UPLINK_CLEAN_SESSION], key, &uplink->clean_session);
    }

    if (conf_node_present(values[UPLINK_AUTH])) {
        conf_key_join(key, sizeof(key), path, "auth");
        parse_auth(ld, values[UPLINK_AUTH], key, uplink->spec, &uplink->auth);
    }

    if (conf_node_present(values[UPLINK_RECONNECT])) {
        conf_key_join(key, sizeof(key), path, "reconnect");
        parse_reconnect(ld, values[UPLINK_RECONNECT], key, uplink);
    }

    if (conf_node_present(values[UPLINK_MAX_QUEUED])) {
        conf_key_join(key, sizeof(key), path, "max_queued");
        if (conf_get_uint(ld, values[UPLINK_MAX_QUEUED], key, "a message count", 1, 10000000,
                          &number) == 0)
            uplink->max_queued_messages = (size_t)number;
    }

    if (conf_node_present(values[UPLINK_MAX_INFLIGHT])) {
        conf_key_join(key, sizeof(key), path, "max_inflight");
        if (conf_get_uint(ld, values[UPLINK_MAX_INFLIGHT], key, "a message count", 1,
                          MAX_UPLINK_MAX_INFLIGHT, &number) == 0)
            uplink->max_inflight = (unsigned)number;
    }

    if (conf_node_present(values[UPLINK_SPOOL])) {
        conf_key_join(key, sizeof(key), path, "spool");
        parse_spool(ld, values[UPLINK_SPOOL], key, &uplink->spool);
    }
    if (conf_node_present(values[UPLINK_RATE])) {
        conf_key_join(key, sizeof(key), path, "rate");
        parse_rate(ld, values[UPLINK_RATE], key, &uplink->rate);
    }

    parse_sections(ld, node, path, values, uplink);
}

void conf_uplinks_parse(struct conf_loader *ld, yaml_node_t *node)
{
    struct conf *conf = ld->conf;
    size_t count;

    if (!conf_expect_kind(ld, node, "uplinks", YAML_SEQUENCE_NODE,
                          "a sequence of uplinks (each item starts with \"- name: ...\")"))
        return;
    count = conf_sequence_length(node);
    if (count == 0)
        return;
    conf->uplinks = calloc(count, sizeof(*conf->uplinks));
    ld->uplink_name_marks = calloc(count, sizeof(*ld->uplink_name_marks));
    if (conf->uplinks == NULL || ld->uplink_name_marks == NULL) {
        ld->oom = true;
        return;
    }
    conf->uplink_count = count;
    for (size_t i = 0; i < count; i++)
        parse_uplink(ld, conf_sequence_item(ld, node, i), i);
}

/* The JWT settings, and the key itself: a key file replaced under the same
 * path is a new identity, so reload reconnects with a token it signed.
 * Public parts are compared (EVP_PKEY_eq), which works for token keys. */
static bool jwt_equal(const struct conf_jwt *a, const struct conf_jwt *b)
{
    if (a->claim_count != b->claim_count)
        return false;
    for (size_t i = 0; i < a->claim_count; i++) {
        if (!conf_str_equal(a->claims[i].name, b->claims[i].name) ||
            !conf_str_equal(a->claims[i].value, b->claims[i].value))
            return false;
    }
    if ((a->private_key == NULL) != (b->private_key == NULL) ||
        (a->private_key != NULL && EVP_PKEY_eq(a->private_key, b->private_key) != 1))
        return false;
    return a->alg == b->alg && conf_str_equal(a->key, b->key) &&
           conf_str_equal(a->passphrase_file, b->passphrase_file) &&
           conf_str_equal(a->pkcs11_module, b->pkcs11_module) && a->lifetime_s == b->lifetime_s &&
           a->max_lifetime_s == b->max_lifetime_s && a->skew_s == b->skew_s &&
           a->refresh_percent == b->refresh_percent && conf_str_equal(a->aud, b->aud) &&
           a->kid_mode == b->kid_mode && conf_str_equal(a->kid, b->kid) &&
           a->clock_check == b->clock_check;
}

/* The profile's section, as far as it goes into CONNECT (same profile). */
static bool section_equal(const struct conf_uplink *a, const struct conf_uplink *b)
{
    if (a->spec == NULL || a->spec->section_equal == NULL)
        return true;
    if (a->section == NULL || b->section == NULL)
        return a->section == b->section;
    return a->spec->section_equal(a->section, b->section);
}

/* Only what goes into the connection: the broker address, TLS, CONNECT
 * fields. reconnect.*, max_queued and generic.* are read by the uplink and
 * the router while running and change without a reconnect. File paths are
 * compared, not file contents: a renewed certificate under the same path is
 * picked up on the next reconnect, not forced by reload. The password is
 * compared by value, so a rotated password_file does force a reconnect. */
bool conf_uplink_equal(const struct conf_uplink *a, const struct conf_uplink *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return conf_str_equal(a->name, b->name) && conf_str_equal(a->profile, b->profile) &&
           conf_str_equal(a->host, b->host) && a->port == b->port &&
           conf_str_equal(a->client_id, b->client_id) && a->keepalive_s == b->keepalive_s &&
           a->clean_session == b->clean_session && a->tls.enabled == b->tls.enabled &&
           a->tls.ca_system == b->tls.ca_system && conf_str_equal(a->tls.ca_file, b->tls.ca_file) &&
           conf_str_equal(a->tls.cert, b->tls.cert) && conf_str_equal(a->tls.key, b->tls.key) &&
           a->auth.type == b->auth.type && conf_str_equal(a->auth.username, b->auth.username) &&
           conf_str_equal(a->auth.password, b->auth.password) &&
           a->tls.min_version == b->tls.min_version && conf_str_equal(a->tls.alpn, b->tls.alpn) &&
           a->tls.insecure == b->tls.insecure && jwt_equal(&a->auth.jwt, &b->auth.jwt) &&
           a->spec == b->spec && section_equal(a, b);
}

void conf_uplink_free(struct conf_uplink *uplink)
{
    free(uplink->name);
    free(uplink->profile);
    free(uplink->host);
    free(uplink->client_id);
    free(uplink->tls.ca_file);
    free(uplink->tls.cert);
    free(uplink->tls.key);
    free(uplink->tls.ca_at);
    free(uplink->tls.cert_at);
    free(uplink->auth.username);
    conf_free_secret(uplink->auth.password);
    free(uplink->tls.alpn);
    free(uplink->auth.jwt.key);
    free(uplink->auth.jwt.passphrase_file);
    free(uplink->auth.jwt.pkcs11_module);
    EVP_PKEY_free(uplink->auth.jwt.private_key);
    free(uplink->auth.jwt.aud);
    free(uplink->auth.jwt.kid);
    for (size_t j = 0; j < uplink->auth.jwt.claim_count; j++) {
        free(uplink->auth.jwt.claims[j].name);
        free(uplink->auth.jwt.claims[j].value);
    }
    free(uplink->auth.jwt.claims);
    if (uplink->spec != NULL && uplink->spec->section_free != NULL)
        uplink->spec->section_free(uplink->section);
    free(uplink->cert_cn);
}
