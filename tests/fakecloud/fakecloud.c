/*
 * fakecloud - a mosquitto 2.0 plugin (plugin API v5) that makes a stock broker behave like a
 * JWT-password cloud (Google Cloud IoT Core, ClearBlade IoT Core, akenza) for uplinkd's tests.
 *
 * Each CONNECT password is checked as a JWT (RFC 7519) in compact JWS form (RFC 7515 §7.1):
 * strict base64url, alg in {RS256, PS256, ES256, ES384} backed by a configured public key of the
 * right type, the signature, aud, iat, exp and the lifetime. A refused CONNECT gets CONNACK 5
 * ("not authorised"), which is what GCP answered for a bad JWT. A client still connected when
 * its token passes exp + skew is kicked, as GCP does. Every decision is appended to a JSON-lines
 * log for the tests. See README.md beside this file for the options and the log format.
 *
 * With plugin_opt_hub it plays Azure IoT Hub instead: each CONNECT must carry the user name
 * "<hub>/<client id>/?api-version=<v>" and a shared access signature as the password
 * ("SharedAccessSignature sr=...&sig=...&se=..."), which is checked against the device keys of
 * plugin_opt_sas_keys: the resource is <hub>/devices/<client id>, the signature HMAC-SHA256 of
 * the URL-encoded resource, "\n" and the expiry, and the expiry in the future. A refused
 * CONNECT gets CONNACK 5; a session whose token expired is kicked, as IoT Hub does.
 *
 * This is test code loaded into a test broker; it still refuses anything malformed rather than
 * guessing, because its job is to catch the classic client bugs (padding, DER ECDSA signatures,
 * wrong aud, tokens never rotated).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* mosquitto_plugin.h uses mosquitto_plugin_id_t from mosquitto_broker.h without including it. */
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mosquitto.h>

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define FAKECLOUD_DEFAULT_SKEW         600   /* GCP allowed 10 minutes of clock skew */
#define FAKECLOUD_DEFAULT_MAX_LIFETIME 86400 /* GCP: a token lives at most 24 h (+ skew) */
#define FAKECLOUD_MAX_KEYS             16
#define FAKECLOUD_MIN_RSA_BITS         2048
#define FAKECLOUD_MAX_SAS_DEVICES      16
#define FAKECLOUD_SAS_KEY_MAX          128

enum fakecloud_key_type {
    FAKECLOUD_KEY_RSA,
    FAKECLOUD_KEY_P256,
    FAKECLOUD_KEY_P384,
};

/* One configured public key (a verifier the "device registry" knows). */
struct fakecloud_key {
    EVP_PKEY *pkey;
    enum fakecloud_key_type type;
    char *path;
    char kid[2 * 32 + 1]; /* lowercase hex SHA-256 of the SubjectPublicKeyInfo DER */
};

/* RFC 7518 §3.1: the JWS algorithms this cloud accepts. */
struct fakecloud_alg {
    const char *name;
    enum fakecloud_key_type key_type;
    const char *digest;
    int rsa_padding;       /* RSA algorithms only */
    size_t ecdsa_sig_size; /* ECDSA only: RFC 7518 §3.4, R||S each padded to the curve size */
};

static const struct fakecloud_alg fakecloud_algs[] = {
    {"RS256", FAKECLOUD_KEY_RSA, "SHA256", RSA_PKCS1_PADDING, 0},
    {"PS256", FAKECLOUD_KEY_RSA, "SHA256", RSA_PKCS1_PSS_PADDING, 0},
    {"ES256", FAKECLOUD_KEY_P256, "SHA256", 0, 64},
    {"ES384", FAKECLOUD_KEY_P384, "SHA384", 0, 96},
};

/* A client that connected with a valid token, remembered until it leaves or is kicked. */
struct fakecloud_session {
    struct fakecloud_session *next;
    char *client_id;
    /* Identity of the connection the token belongs to, compared but never dereferenced: after a
     * session takeover the old connection's disconnect must not forget the new token. */
    const struct mosquitto *client;
    long long exp;
};

/* A device the fake IoT Hub knows, with its symmetric key (decoded). */
struct fakecloud_sas_device {
    char *id;
    unsigned char key[FAKECLOUD_SAS_KEY_MAX];
    size_t key_len;
    /* X.509 device ("device=x509:..."): "ca" (CA-signed: the chain verified by the broker, the
     * CN must be the device id) or the registered thumbprint, SHA-1 or SHA-256 in hex; "" for
     * a SAS device. */
    char x509[80];
};

struct fakecloud {
    mosquitto_plugin_id_t *plugin_id;
    char *hub; /* set: the fake IoT Hub (SAS tokens), not the JWT cloud */
    struct fakecloud_sas_device sas[FAKECLOUD_MAX_SAS_DEVICES];
    size_t sas_count;
    struct fakecloud_key keys[FAKECLOUD_MAX_KEYS];
    size_t key_count;
    char *aud;
    long long skew;
    long long max_lifetime;
    bool require_kid;
    char *observer_user;
    char *observer_password;
    FILE *log;
    struct fakecloud_session *sessions;
    /* Hub mode: the device the next cloud-side $iothub messages go to (the
     * last "fakehub/to/<id>" published), as IoT Hub answers on the one
     * connection of the device concerned. */
    char iothub_to[256];
};

/* What one CONNECT was judged; reason == NULL means accepted. */
struct fakecloud_verdict {
    const char *reason; /* short and stable: tests match on it */
    char detail[256];   /* the same in words, with the values */
    json_t *header;     /* owned, NULL until decoded */
    json_t *claims;     /* owned, NULL until decoded */
    const char *alg;    /* borrowed from header */
    const char *kid;    /* borrowed from header, may stay NULL */
    const struct fakecloud_key *key;
    long long now;
};

static int fakecloud_refuse(struct fakecloud_verdict *verdict, const char *reason, const char *fmt,
                            ...) __attribute__((format(printf, 3, 4)));

/* Sets the refusal reason and detail; returns -EACCES so callers can `return fakecloud_refuse()`. */
static int fakecloud_refuse(struct fakecloud_verdict *verdict, const char *reason, const char *fmt,
                            ...)
{
    va_list ap;

    verdict->reason = reason;
    va_start(ap, fmt);
    vsnprintf(verdict->detail, sizeof(verdict->detail), fmt, ap);
    va_end(ap);
    return -EACCES;
}

/* ------------------------------------------------------------------------------------------ */
/* Log                                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* Appends `line` (stolen) as one JSON line with a "ts" field; flushed at once so a test polling
 * the file sees every decision as soon as the CONNACK is out. */
static void fakecloud_log_write(struct fakecloud *fc, json_t *line)
{
    struct timespec now;
    char *text;

    if (fc->log == NULL || line == NULL) {
        json_decref(line);
        return;
    }
    clock_gettime(CLOCK_REALTIME, &now);
    json_object_set_new(line, "ts", json_real((double)now.tv_sec + (double)now.tv_nsec / 1e9));
    text = json_dumps(line, JSON_COMPACT | JSON_SORT_KEYS);
    if (text != NULL) {
        fprintf(fc->log, "%s\n", text);
        fflush(fc->log);
        free(text);
    }
    json_decref(line);
}

/* json_string() that maps NULL to JSON null (and keeps invalid UTF-8 out of the log). */
static json_t *fakecloud_json_str(const char *s)
{
    json_t *value;

    if (s == NULL) {
        return json_null();
    }
    value = json_string(s);
    return value != NULL ? value : json_string("(not UTF-8)");
}

/* ------------------------------------------------------------------------------------------ */
/* Token checks                                                                                */
/* ------------------------------------------------------------------------------------------ */

static int fakecloud_b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }
    if (c == '-') {
        return 62;
    }
    if (c == '_') {
        return 63;
    }
    return -1;
}

/*
 * Decodes one base64url segment. RFC 7515 §2 and §C: JWS uses base64url with all trailing '='
 * removed, so padding, the standard alphabet's '+' and '/', an impossible length and non-zero
 * unused bits (RFC 4648 §3.5, non-canonical) are each refused with their own reason.
 * On success *out (malloc'd, NUL-terminated for JSON) takes `*out_len` bytes.
 */
static int fakecloud_b64url_decode(const char *what, const char *in, size_t len,
                                   unsigned char **out, size_t *out_len,
                                   struct fakecloud_verdict *verdict)
{
    unsigned char *buf;
    unsigned int acc = 0;
    size_t bits = 0;
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        if (in[i] == '=') {
            return fakecloud_refuse(verdict, "padding",
                                    "%s segment has '=' padding at offset %zu; RFC 7515 §2 "
                                    "base64url has no padding",
                                    what, i);
        }
    }
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '+' || in[i] == '/') {
            return fakecloud_refuse(verdict, "base64url alphabet",
                                    "%s segment has '%c' at offset %zu: standard base64, not "
                                    "base64url ('-' and '_')",
                                    what, in[i], i);
        }
        if (fakecloud_b64url_value(in[i]) < 0) {
            return fakecloud_refuse(verdict, "base64url",
                                    "%s segment has byte 0x%02x at offset %zu, not base64url", what,
                                    (unsigned char)in[i], i);
        }
    }
    if (len % 4 == 1) {
        return fakecloud_refuse(verdict, "base64url",
                                "%s segment length %zu is impossible for base64url (%zu mod 4 = 1)",
                                what, len, len);
    }
    buf = malloc(len * 3 / 4 + 1);
    if (buf == NULL) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < len; i++) {
        acc = (acc << 6) | (unsigned int)fakecloud_b64url_value(in[i]);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf[n++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) {
        free(buf);
        return fakecloud_refuse(verdict, "base64url",
                                "%s segment has non-zero unused bits in its last character "
                                "(non-canonical, RFC 4648 §3.5)",
                                what);
    }
    buf[n] = '\0';
    *out = buf;
    *out_len = n;
    return 0;
}

static const struct fakecloud_alg *fakecloud_alg_find(const char *name)
{
    for (size_t i = 0; i < sizeof(fakecloud_algs) / sizeof(fakecloud_algs[0]); i++) {
        if (strcmp(fakecloud_algs[i].name, name) == 0) {
            return &fakecloud_algs[i];
        }
    }
    return NULL;
}

/* Returns 1 when `sig` verifies over `data` with `key` for `alg`, 0 when it does not,
 * negative errno on an internal failure. `sig` is already in OpenSSL's form (DER for ECDSA). */
static int fakecloud_verify_one(const struct fakecloud_alg *alg, const struct fakecloud_key *key,
                                const unsigned char *data, size_t data_len,
                                const unsigned char *sig, size_t sig_len)
{
    EVP_MD_CTX *md_ctx;
    EVP_PKEY_CTX *pkey_ctx = NULL;
    int rc = -ENOMEM;

    md_ctx = EVP_MD_CTX_new();
    if (md_ctx == NULL) {
        goto err;
    }
    if (EVP_DigestVerifyInit_ex(md_ctx, &pkey_ctx, alg->digest, NULL, NULL, key->pkey, NULL) != 1) {
        rc = -EINVAL;
        goto err_after_ctx;
    }
    if (alg->key_type == FAKECLOUD_KEY_RSA) {
        if (EVP_PKEY_CTX_set_rsa_padding(pkey_ctx, alg->rsa_padding) != 1) {
            rc = -EINVAL;
            goto err_after_ctx;
        }
        /* RFC 7518 §3.5: PS256 uses MGF1 with SHA-256 and a salt as long as the hash. */
        if (alg->rsa_padding == RSA_PKCS1_PSS_PADDING &&
            (EVP_PKEY_CTX_set_rsa_pss_saltlen(pkey_ctx, RSA_PSS_SALTLEN_DIGEST) != 1 ||
             EVP_PKEY_CTX_set_rsa_mgf1_md_name(pkey_ctx, alg->digest, NULL) != 1)) {
            rc = -EINVAL;
            goto err_after_ctx;
        }
    }
    rc = EVP_DigestVerify(md_ctx, sig, sig_len, data, data_len) == 1 ? 1 : 0;
err_after_ctx:
    EVP_MD_CTX_free(md_ctx);
err:
    ERR_clear_error(); /* a failed verify leaves errors queued; the broker's TLS must not see them */
    return rc;
}

/* RFC 7518 §3.4: turns the raw R||S signature into the DER ECDSA-Sig-Value OpenSSL verifies. */
static int fakecloud_ecdsa_raw_to_der(const unsigned char *raw, size_t raw_len, unsigned char **der,
                                      size_t *der_len)
{
    ECDSA_SIG *ecdsa_sig;
    BIGNUM *r, *s;
    unsigned char *out = NULL;
    int len;
    int rc = -ENOMEM;

    ecdsa_sig = ECDSA_SIG_new();
    r = BN_bin2bn(raw, (int)(raw_len / 2), NULL);
    s = BN_bin2bn(raw + raw_len / 2, (int)(raw_len / 2), NULL);
    if (ecdsa_sig == NULL || r == NULL || s == NULL) {
        BN_free(r);
        BN_free(s);
        goto err_after_sig;
    }
    ECDSA_SIG_set0(ecdsa_sig, r, s); /* takes r and s */
    len = i2d_ECDSA_SIG(ecdsa_sig, &out);
    if (len <= 0) {
        goto err_after_sig;
    }
    *der = out;
    *der_len = (size_t)len;
    rc = 0;
err_after_sig:
    ECDSA_SIG_free(ecdsa_sig);
    return rc;
}

/* True when `sig` is exactly one DER ECDSA-Sig-Value: the classic bug of sending OpenSSL's
 * output as is. */
static bool fakecloud_is_der_ecdsa(const unsigned char *sig, size_t sig_len)
{
    const unsigned char *p = sig;
    ECDSA_SIG *parsed;
    bool whole;

    parsed = d2i_ECDSA_SIG(NULL, &p, (long)sig_len);
    whole = parsed != NULL && p == sig + sig_len;
    ECDSA_SIG_free(parsed);
    ERR_clear_error();
    return whole;
}

/* Checks the signature against every configured key of the algorithm's type. */
static int fakecloud_check_signature(struct fakecloud *fc, const struct fakecloud_alg *alg,
                                     const char *signing_input, size_t signing_input_len,
                                     const unsigned char *sig, size_t sig_len,
                                     struct fakecloud_verdict *verdict)
{
    unsigned char *der = NULL;
    const unsigned char *openssl_sig = sig;
    size_t openssl_sig_len = sig_len;
    size_t candidates = 0;
    int rc;

    for (size_t i = 0; i < fc->key_count; i++) {
        candidates += fc->keys[i].type == alg->key_type;
    }
    if (candidates == 0) {
        return fakecloud_refuse(verdict, "no key for alg",
                                "alg %s, but no configured public key is of that type "
                                "(the alg must match the key registered for the device)",
                                alg->name);
    }
    if (alg->ecdsa_sig_size != 0) {
        if (sig_len != alg->ecdsa_sig_size) {
            if (fakecloud_is_der_ecdsa(sig, sig_len)) {
                return fakecloud_refuse(verdict, "DER signature",
                                        "%s signature is %zu bytes of DER; RFC 7518 §3.4 wants "
                                        "the raw R||S of %zu bytes",
                                        alg->name, sig_len, alg->ecdsa_sig_size);
            }
            return fakecloud_refuse(verdict, "signature length",
                                    "%s signature is %zu bytes, RFC 7518 §3.4 wants %zu (R||S)",
                                    alg->name, sig_len, alg->ecdsa_sig_size);
        }
        rc = fakecloud_ecdsa_raw_to_der(sig, sig_len, &der, &openssl_sig_len);
        if (rc < 0) {
            return rc;
        }
        openssl_sig = der;
    }
    rc = fakecloud_refuse(verdict, "bad signature",
                          "%s signature does not verify with any of the %zu configured key(s) "
                          "of that type",
                          alg->name, candidates);
    for (size_t i = 0; i < fc->key_count; i++) {
        int ok;

        if (fc->keys[i].type != alg->key_type) {
            continue;
        }
        ok = fakecloud_verify_one(alg, &fc->keys[i], (const unsigned char *)signing_input,
                                  signing_input_len, openssl_sig, openssl_sig_len);
        if (ok < 0) {
            rc = ok;
            break;
        }
        if (ok == 1) {
            verdict->reason = NULL;
            verdict->detail[0] = '\0';
            verdict->key = &fc->keys[i];
            rc = 0;
            break;
        }
    }
    OPENSSL_free(der);
    return rc;
}

/* Reads a NumericDate claim (RFC 7519 §2: seconds, possibly fractional) as whole seconds. */
static bool fakecloud_claim_time(json_t *claims, const char *name, long long *value)
{
    json_t *item = json_object_get(claims, name);

    if (json_is_integer(item)) {
        *value = (long long)json_integer_value(item);
        return true;
    }
    if (json_is_real(item) && json_real_value(item) > -1e15 && json_real_value(item) < 1e15) {
        *value = (long long)json_real_value(item);
        return true;
    }
    return false;
}

/* RFC 7519 §4.1: the registered claims, checked the way GCP documents them. */
static int fakecloud_check_claims(struct fakecloud *fc, struct fakecloud_verdict *verdict)
{
    json_t *aud = json_object_get(verdict->claims, "aud");
    long long iat, exp, now = verdict->now;

    if (aud == NULL) {
        return fakecloud_refuse(verdict, "aud missing", "no aud claim; expected \"%s\"", fc->aud);
    }
    if (!json_is_string(aud) || strcmp(json_string_value(aud), fc->aud) != 0) {
        char *shown = json_dumps(aud, JSON_ENCODE_ANY | JSON_COMPACT);

        fakecloud_refuse(verdict, "wrong aud", "aud is %.100s, expected \"%.100s\"",
                         shown != NULL ? shown : "?", fc->aud);
        free(shown);
        return -EACCES;
    }
    if (!fakecloud_claim_time(verdict->claims, "iat", &iat)) {
        return fakecloud_refuse(verdict, "iat missing", "no numeric iat claim");
    }
    if (!fakecloud_claim_time(verdict->claims, "exp", &exp)) {
        return fakecloud_refuse(verdict, "exp missing", "no numeric exp claim");
    }
    if (iat > now + fc->skew) {
        return fakecloud_refuse(verdict, "iat in future",
                                "iat %lld is %lld s after now %lld, more than the skew of %lld s "
                                "(is the client's clock right?)",
                                iat, iat - now, now, fc->skew);
    }
    if (exp <= iat) {
        return fakecloud_refuse(verdict, "exp before iat", "exp %lld is not after iat %lld", exp,
                                iat);
    }
    if (exp - iat > fc->max_lifetime + fc->skew) {
        return fakecloud_refuse(verdict, "lifetime too long",
                                "exp - iat = %lld s, more than the maximum %lld s + skew %lld s",
                                exp - iat, fc->max_lifetime, fc->skew);
    }
    if (now >= exp + fc->skew) {
        return fakecloud_refuse(verdict, "expired",
                                "exp %lld is %lld s before now %lld (skew %lld s)", exp, now - exp,
                                now, fc->skew);
    }
    return 0;
}

/*
 * Judges one CONNECT password as a compact JWS (RFC 7515 §7.1):
 * BASE64URL(header) '.' BASE64URL(claims) '.' BASE64URL(signature).
 * Returns 0 when accepted, -EACCES when refused (verdict->reason says why), -ENOMEM.
 */
static int fakecloud_judge(struct fakecloud *fc, const char *password,
                           struct fakecloud_verdict *verdict)
{
    static const char *const segment_names[3] = {"header", "claims", "signature"};
    const char *segment[3];
    size_t segment_len[3];
    unsigned char *decoded[3] = {NULL, NULL, NULL};
    size_t decoded_len[3];
    const char *dot1, *dot2;
    const struct fakecloud_alg *alg;
    json_t *typ;
    json_error_t json_err;
    int rc;

    if (password == NULL || password[0] == '\0') {
        return fakecloud_refuse(verdict, "no password",
                                "the CONNECT has no password; it must carry the JWT");
    }
    dot1 = strchr(password, '.');
    dot2 = dot1 != NULL ? strchr(dot1 + 1, '.') : NULL;
    if (dot1 == NULL || dot2 == NULL || strchr(dot2 + 1, '.') != NULL) {
        return fakecloud_refuse(verdict, "not a JWT",
                                "the password is not three '.'-separated segments");
    }
    segment[0] = password;
    segment_len[0] = (size_t)(dot1 - password);
    segment[1] = dot1 + 1;
    segment_len[1] = (size_t)(dot2 - dot1 - 1);
    segment[2] = dot2 + 1;
    segment_len[2] = strlen(dot2 + 1);

    for (int i = 0; i < 3; i++) {
        rc = fakecloud_b64url_decode(segment_names[i], segment[i], segment_len[i], &decoded[i],
                                     &decoded_len[i], verdict);
        if (rc < 0) {
            goto out;
        }
    }

    verdict->header =
        json_loadb((const char *)decoded[0], decoded_len[0], JSON_REJECT_DUPLICATES, &json_err);
    if (!json_is_object(verdict->header)) {
        rc = fakecloud_refuse(verdict, "header not JSON", "header: %s",
                              verdict->header == NULL ? json_err.text : "not a JSON object");
        goto out;
    }
    verdict->claims =
        json_loadb((const char *)decoded[1], decoded_len[1], JSON_REJECT_DUPLICATES, &json_err);
    if (!json_is_object(verdict->claims)) {
        rc = fakecloud_refuse(verdict, "claims not JSON", "claims: %s",
                              verdict->claims == NULL ? json_err.text : "not a JSON object");
        goto out;
    }

    verdict->alg = json_string_value(json_object_get(verdict->header, "alg"));
    verdict->kid = json_string_value(json_object_get(verdict->header, "kid"));
    if (verdict->alg == NULL) {
        rc = fakecloud_refuse(verdict, "alg missing", "the header has no alg string");
        goto out;
    }
    alg = fakecloud_alg_find(verdict->alg);
    if (alg == NULL) {
        rc = fakecloud_refuse(verdict, "alg unsupported",
                              "alg \"%.40s\" is not one of RS256, PS256, ES256, ES384",
                              verdict->alg);
        goto out;
    }
    typ = json_object_get(verdict->header, "typ");
    if (typ != NULL && (!json_is_string(typ) || strcmp(json_string_value(typ), "JWT") != 0)) {
        rc = fakecloud_refuse(verdict, "typ not JWT", "header typ is not \"JWT\"");
        goto out;
    }

    /* RFC 7515 §5.2: the signing input is the first two segments exactly as sent. */
    rc = fakecloud_check_signature(fc, alg, password, (size_t)(dot2 - password), decoded[2],
                                   decoded_len[2], verdict);
    if (rc < 0) {
        goto out;
    }
    if (fc->require_kid && (verdict->kid == NULL || strcmp(verdict->kid, verdict->key->kid) != 0)) {
        rc = fakecloud_refuse(verdict, "kid mismatch",
                              "kid %.70s, expected %s (SHA-256 of the public key DER)",
                              verdict->kid != NULL ? verdict->kid : "missing", verdict->key->kid);
        goto out;
    }
    rc = fakecloud_check_claims(fc, verdict);
out:
    for (int i = 0; i < 3; i++) {
        free(decoded[i]);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Sessions and kicks                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* Remembers (or replaces, for a takeover or a reconnect) the token expiry of `client_id`. */
static int fakecloud_session_put(struct fakecloud *fc, const char *client_id,
                                 const struct mosquitto *client, long long exp)
{
    struct fakecloud_session *session;

    for (session = fc->sessions; session != NULL; session = session->next) {
        if (strcmp(session->client_id, client_id) == 0) {
            session->client = client;
            session->exp = exp;
            return 0;
        }
    }
    session = calloc(1, sizeof(*session));
    if (session == NULL) {
        return -ENOMEM;
    }
    session->client_id = strdup(client_id);
    if (session->client_id == NULL) {
        free(session);
        return -ENOMEM;
    }
    session->client = client;
    session->exp = exp;
    session->next = fc->sessions;
    fc->sessions = session;
    return 0;
}

static void fakecloud_session_free(struct fakecloud_session *session)
{
    free(session->client_id);
    free(session);
}

/* ------------------------------------------------------------------------------------------ */
/* The fake IoT Hub: shared access signatures                                                 */
/* ------------------------------------------------------------------------------------------ */

static int fakecloud_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes `in` (`len` bytes) into `out` (at least len + 1 bytes); -EINVAL on a bad
 * escape. */
static int fakecloud_url_decode(const char *in, size_t len, char *out)
{
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        if (in[i] == '%') {
            int hi, lo;
            if (i + 2 >= len)
                return -EINVAL;
            hi = fakecloud_hex(in[i + 1]);
            lo = fakecloud_hex(in[i + 2]);
            if (hi < 0 || lo < 0)
                return -EINVAL;
            out[n++] = (char)(hi << 4 | lo);
            i += 2;
        } else {
            out[n++] = in[i];
        }
    }
    out[n] = '\0';
    return (int)n;
}

/* The value of `name` in a SAS token's "k=v&k=v" list, or NULL; *len its length. */
static const char *fakecloud_sas_field(const char *fields, const char *name, size_t *len)
{
    size_t name_len = strlen(name);
    const char *p = fields;

    while (*p) {
        const char *end = strchr(p, '&');
        size_t field_len = end ? (size_t)(end - p) : strlen(p);
        if (field_len > name_len && strncmp(p, name, name_len) == 0 && p[name_len] == '=') {
            *len = field_len - name_len - 1;
            return p + name_len + 1;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return NULL;
}

static const struct fakecloud_sas_device *fakecloud_sas_device(const struct fakecloud *fc,
                                                               const char *id)
{
    for (size_t i = 0; i < fc->sas_count; i++) {
        if (strcmp(fc->sas[i].id, id) == 0)
            return &fc->sas[i];
    }
    return NULL;
}

/* An X.509 device: the client certificate (mosquitto verified its chain against cafile, as
 * the hub does against a verified CA) is the credential; a CA-signed one must carry the device
 * id as CN, a self-signed one must have the registered thumbprint. No password needed. */
static int fakecloud_judge_x509(struct mosquitto *client, const struct fakecloud_sas_device *device,
                                const char *client_id, struct fakecloud_verdict *verdict)
{
    X509 *cert = mosquitto_client_certificate(client);
    unsigned char digest[EVP_MAX_MD_SIZE];
    char hex[2 * EVP_MAX_MD_SIZE + 1], cn[256] = "";
    unsigned int len = 0;
    bool sha256 = strlen(device->x509) == 64;
    int rc = 0;

    verdict->alg = "X509";
    if (cert == NULL)
        return fakecloud_refuse(verdict, "no certificate", "device %s authenticates by X.509",
                                client_id);
    if (strcmp(device->x509, "ca") == 0) {
        X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof(cn));
        if (strcmp(cn, client_id) != 0)
            rc = fakecloud_refuse(verdict, "wrong CN", "CN %s, expected the device id %s", cn,
                                  client_id);
    } else if (!X509_digest(cert, sha256 ? EVP_sha256() : EVP_sha1(), digest, &len)) {
        rc = -ENOMEM;
    } else {
        for (unsigned int i = 0; i < len; i++)
            snprintf(hex + 2 * i, 3, "%02X", digest[i]);
        if (strcasecmp(hex, device->x509) != 0)
            rc = fakecloud_refuse(verdict, "bad thumbprint", "thumbprint %s, registered %s", hex,
                                  device->x509);
    }
    X509_free(cert);
    return rc;
}

static int fakecloud_judge_sas(struct fakecloud *fc, struct mosquitto *client,
                               const char *client_id, const char *username, const char *password,
                               struct fakecloud_verdict *verdict, long long *exp)
{
    static const char prefix[] = "SharedAccessSignature ";
    char expected_user[512], resource[512], decoded[1024], sig_decoded[256], to_sign[1100];
    unsigned char mac[32], mac_b64[64];
    const struct fakecloud_sas_device *device;
    const char *sr, *sig, *se, *fields;
    size_t sr_len = 0, sig_len = 0, se_len = 0, mac_len = 0;
    char *end;

    verdict->alg = "SAS";
    if (client_id == NULL || (device = fakecloud_sas_device(fc, client_id)) == NULL)
        return fakecloud_refuse(verdict, "unknown device", "no device %.100s in this hub",
                                client_id ? client_id : "(no client id)");
    snprintf(expected_user, sizeof(expected_user), "%s/%s/?api-version=", fc->hub, client_id);
    if (username == NULL || strncmp(username, expected_user, strlen(expected_user)) != 0 ||
        username[strlen(expected_user)] == '\0')
        return fakecloud_refuse(verdict, "bad username", "user name %.150s, expected %s<version>",
                                username ? username : "(none)", expected_user);
    if (device->x509[0] != '\0')
        return fakecloud_judge_x509(client, device, client_id, verdict);
    if (password == NULL || strncmp(password, prefix, strlen(prefix)) != 0)
        return fakecloud_refuse(verdict, "not a SAS token",
                                "the password must start with \"SharedAccessSignature \"");
    fields = password + strlen(prefix);
    sr = fakecloud_sas_field(fields, "sr", &sr_len);
    sig = fakecloud_sas_field(fields, "sig", &sig_len);
    se = fakecloud_sas_field(fields, "se", &se_len);
    if (!sr || !sig || !se || sr_len >= sizeof(decoded) || sig_len >= sizeof(sig_decoded) ||
        se_len == 0 || se_len > 20)
        return fakecloud_refuse(verdict, "malformed SAS", "sr, sig and se are all required");
    snprintf(resource, sizeof(resource), "%s/devices/%s", fc->hub, client_id);
    if (fakecloud_url_decode(sr, sr_len, decoded) < 0 || strcmp(decoded, resource) != 0)
        return fakecloud_refuse(verdict, "wrong resource", "sr %.*s, expected (encoded) %s",
                                (int)(sr_len > 200 ? 200 : sr_len), sr, resource);
    *exp = strtoll(se, &end, 10);
    if (end != se + se_len || *exp <= 0)
        return fakecloud_refuse(verdict, "malformed SAS", "se is not Unix seconds");
    if (*exp + fc->skew <= verdict->now)
        return fakecloud_refuse(verdict, "expired", "se %lld is in the past (now %lld)", *exp,
                                verdict->now);
    /* The string to sign: the encoded resource as sent, a newline, the expiry. */
    int n = snprintf(to_sign, sizeof(to_sign), "%.*s\n%.*s", (int)sr_len, sr, (int)se_len, se);
    if (EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, device->key, device->key_len,
                  (const unsigned char *)to_sign, (size_t)n, mac, sizeof(mac), &mac_len) == NULL)
        return -ENOMEM;
    EVP_EncodeBlock(mac_b64, mac, (int)mac_len);
    if (fakecloud_url_decode(sig, sig_len, sig_decoded) < 0 ||
        strcmp(sig_decoded, (const char *)mac_b64) != 0)
        return fakecloud_refuse(verdict, "bad signature",
                                "sig does not match HMAC-SHA256 of sr and se with the device key");
    return 0;
}

static int fakecloud_basic_auth_cb(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_basic_auth *auth = event_data;
    struct fakecloud *fc = userdata;
    struct fakecloud_verdict verdict = {0};
    const char *client_id = mosquitto_client_id(auth->client);
    long long iat = 0, exp = 0, sas_exp = 0;
    bool have_iat, have_exp;
    json_t *line, *aud;
    int rc;

    verdict.now = (long long)time(NULL);
    if (fc->observer_user != NULL && auth->username != NULL &&
        strcmp(auth->username, fc->observer_user) == 0) {
        /* The tests' own cloud-side clients: a plain password, never a token, never kicked. */
        if (auth->password != NULL && strcmp(auth->password, fc->observer_password) == 0) {
            rc = 0;
        } else {
            rc = fakecloud_refuse(&verdict, "observer password", "wrong observer password");
        }
    } else if (fc->hub != NULL) {
        rc = fakecloud_judge_sas(fc, auth->client, client_id, auth->username, auth->password,
                                 &verdict, &sas_exp);
    } else {
        rc = fakecloud_judge(fc, auth->password, &verdict);
    }
    if (rc == -ENOMEM) {
        json_decref(verdict.header);
        json_decref(verdict.claims);
        return MOSQ_ERR_NOMEM;
    }

    have_iat = verdict.claims != NULL && fakecloud_claim_time(verdict.claims, "iat", &iat);
    have_exp = verdict.claims != NULL && fakecloud_claim_time(verdict.claims, "exp", &exp);
    if (sas_exp != 0) {
        exp = sas_exp;
        have_exp = true;
    }
    if (rc == 0 && (verdict.claims != NULL || sas_exp != 0) && client_id != NULL) {
        if (fakecloud_session_put(fc, client_id, auth->client, exp) < 0) {
            json_decref(verdict.header);
            json_decref(verdict.claims);
            return MOSQ_ERR_NOMEM;
        }
    }

    line = json_object();
    json_object_set_new(line, "event", json_string("connect"));
    json_object_set_new(line, "result", json_string(rc == 0 ? "accepted" : "refused"));
    json_object_set_new(
        line, "reason",
        json_string(rc == 0 ? (verdict.claims != NULL || sas_exp != 0 || verdict.alg != NULL
                                   ? "ok"
                                   : "observer")
                            : verdict.reason));
    json_object_set_new(line, "detail", fakecloud_json_str(rc == 0 ? NULL : verdict.detail));
    json_object_set_new(line, "now", json_integer(verdict.now));
    json_object_set_new(line, "client_id", fakecloud_json_str(client_id));
    json_object_set_new(line, "username", fakecloud_json_str(auth->username));
    json_object_set_new(line, "address",
                        fakecloud_json_str(mosquitto_client_address(auth->client)));
    json_object_set_new(line, "alg", fakecloud_json_str(verdict.alg));
    json_object_set_new(line, "kid", fakecloud_json_str(verdict.kid));
    json_object_set_new(line, "key", fakecloud_json_str(verdict.key ? verdict.key->path : NULL));
    json_object_set_new(line, "key_kid", fakecloud_json_str(verdict.key ? verdict.key->kid : NULL));
    aud = verdict.claims != NULL ? json_object_get(verdict.claims, "aud") : NULL;
    json_object_set(line, "aud", aud != NULL ? aud : json_null());
    json_object_set_new(line, "iat", have_iat ? json_integer(iat) : json_null());
    json_object_set_new(line, "exp", have_exp ? json_integer(exp) : json_null());
    json_object_set_new(line, "header", verdict.header ? verdict.header : json_null());
    json_object_set_new(line, "claims", verdict.claims ? verdict.claims : json_null());
    fakecloud_log_write(fc, line); /* header and claims now belong to the log line, and are gone */

    if (rc == 0) {
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "fakecloud: accepted %s",
                             client_id ? client_id : "?");
        return MOSQ_ERR_SUCCESS;
    }
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "fakecloud: refused %s: %s: %s",
                         client_id ? client_id : "?", verdict.reason, verdict.detail);
    /* MQTT 3.1.1 §3.2.2.3: mosquitto answers MOSQ_ERR_AUTH with CONNACK 5 (not authorised),
     * the code GCP IoT Core sent for a bad JWT. */
    return MOSQ_ERR_AUTH;
}

/* GCP closes a connection whose token passed exp (+ skew); so does this, on the broker's tick
 * (about every 100 ms in mosquitto 2.0's main loop). */
static int fakecloud_tick_cb(int event, void *event_data, void *userdata)
{
    struct fakecloud *fc = userdata;
    struct fakecloud_session **link = &fc->sessions;
    struct fakecloud_session *expired = NULL;
    long long now = (long long)time(NULL);

    /* Unlink first, kick afterwards: a kick runs the disconnect callback, which walks the list. */
    while (*link != NULL) {
        struct fakecloud_session *session = *link;

        if (now >= session->exp + fc->skew) {
            *link = session->next;
            session->next = expired;
            expired = session;
        } else {
            link = &session->next;
        }
    }
    while (expired != NULL) {
        struct fakecloud_session *session = expired;
        json_t *line = json_object();
        int rc;

        expired = session->next;
        rc = mosquitto_kick_client_by_clientid(session->client_id, false);
        json_object_set_new(line, "event", json_string("kick"));
        json_object_set_new(line, "reason", json_string("token expired"));
        json_object_set_new(line, "client_id", fakecloud_json_str(session->client_id));
        json_object_set_new(line, "exp", json_integer(session->exp));
        json_object_set_new(line, "skew", json_integer(fc->skew));
        json_object_set_new(line, "now", json_integer(now));
        json_object_set_new(line, "found", json_boolean(rc == MOSQ_ERR_SUCCESS));
        fakecloud_log_write(fc, line);
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "fakecloud: kicked %s: token expired at %lld",
                             session->client_id, session->exp);
        fakecloud_session_free(session);
    }
    return MOSQ_ERR_SUCCESS;
}

/* A client left (or was taken over): forget its token, and log how long it had left. */
static int fakecloud_disconnect_cb(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_disconnect *disconnect = event_data;
    struct fakecloud *fc = userdata;
    const char *client_id = mosquitto_client_id(disconnect->client);
    struct fakecloud_session **link;
    long long now = (long long)time(NULL);

    if (client_id == NULL) {
        return MOSQ_ERR_SUCCESS; /* refused at CONNECT: mosquitto already dropped its id */
    }
    for (link = &fc->sessions; *link != NULL; link = &(*link)->next) {
        struct fakecloud_session *session = *link;
        json_t *line;

        if (strcmp(session->client_id, client_id) != 0 || session->client != disconnect->client) {
            continue;
        }
        *link = session->next;
        line = json_object();
        json_object_set_new(line, "event", json_string("disconnect"));
        json_object_set_new(line, "client_id", fakecloud_json_str(client_id));
        json_object_set_new(line, "exp", json_integer(session->exp));
        json_object_set_new(line, "now", json_integer(now));
        json_object_set_new(line, "left", json_integer(session->exp - now));
        fakecloud_log_write(fc, line);
        fakecloud_session_free(session);
        break;
    }
    return MOSQ_ERR_SUCCESS;
}

/* Hub mode: IoT Hub's $iothub topics belong to one connection, a plain broker's to everyone
 * subscribed. A test names the device first ("fakehub/to/<id>", any payload); the
 * hub-to-device families are then delivered to that client only. What a device publishes on
 * $iothub is logged with its client id ("iothub" lines), so a test can tell whose it was. */
static bool fakecloud_iothub_down(const char *topic)
{
    return strncmp(topic, "$iothub/twin/res/", 17) == 0 ||
           strncmp(topic, "$iothub/twin/PATCH/properties/desired/", 38) == 0 ||
           strncmp(topic, "$iothub/methods/POST/", 21) == 0;
}

static int fakecloud_acl_cb(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_acl_check *acl = event_data;
    struct fakecloud *fc = userdata;
    const char *client_id = mosquitto_client_id(acl->client);

    (void)event;
    if (acl->topic == NULL || client_id == NULL) {
        return MOSQ_ERR_SUCCESS;
    }
    if (acl->access == MOSQ_ACL_WRITE && strncmp(acl->topic, "fakehub/to/", 11) == 0) {
        snprintf(fc->iothub_to, sizeof(fc->iothub_to), "%s", acl->topic + 11);
    } else if (acl->access == MOSQ_ACL_WRITE && strncmp(acl->topic, "$iothub/", 8) == 0 &&
               !fakecloud_iothub_down(acl->topic)) {
        json_t *line = json_object();
        json_object_set_new(line, "event", json_string("iothub"));
        json_object_set_new(line, "client_id", fakecloud_json_str(client_id));
        json_object_set_new(line, "topic", fakecloud_json_str(acl->topic));
        fakecloud_log_write(fc, line);
    } else if (acl->access == MOSQ_ACL_READ && fakecloud_iothub_down(acl->topic) &&
               strcmp(client_id, fc->iothub_to) != 0) {
        return MOSQ_ERR_ACL_DENIED;
    }
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Loads one PEM public key (SubjectPublicKeyInfo) or certificate into `key`. */
static int fakecloud_key_load(const char *path, struct fakecloud_key *key)
{
    unsigned char digest[32];
    unsigned char *der = NULL;
    char curve[64] = "";
    X509 *cert;
    FILE *f;
    int der_len;
    int rc = -EINVAL;

    f = fopen(path, "r");
    if (f == NULL) {
        rc = -errno;
        mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: cannot open key %s: %s", path,
                             strerror(errno));
        return rc;
    }
    key->pkey = PEM_read_PUBKEY(f, NULL, NULL, NULL);
    if (key->pkey == NULL) {
        rewind(f);
        cert = PEM_read_X509(f, NULL, NULL, NULL);
        if (cert != NULL) {
            key->pkey = X509_get_pubkey(cert);
            X509_free(cert);
        }
    }
    fclose(f);
    ERR_clear_error();
    if (key->pkey == NULL) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: %s holds no PEM PUBLIC KEY or CERTIFICATE",
                             path);
        return -EINVAL;
    }
    if (EVP_PKEY_get_base_id(key->pkey) == EVP_PKEY_RSA) {
        if (EVP_PKEY_get_bits(key->pkey) < FAKECLOUD_MIN_RSA_BITS) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: %s: RSA key of %d bits, need %d+", path,
                                 EVP_PKEY_get_bits(key->pkey), FAKECLOUD_MIN_RSA_BITS);
            goto err_after_pkey;
        }
        key->type = FAKECLOUD_KEY_RSA;
    } else if (EVP_PKEY_get_base_id(key->pkey) == EVP_PKEY_EC &&
               EVP_PKEY_get_group_name(key->pkey, curve, sizeof(curve), NULL) == 1 &&
               strcmp(curve, "prime256v1") == 0) {
        key->type = FAKECLOUD_KEY_P256;
    } else if (EVP_PKEY_get_base_id(key->pkey) == EVP_PKEY_EC && strcmp(curve, "secp384r1") == 0) {
        key->type = FAKECLOUD_KEY_P384;
    } else {
        mosquitto_log_printf(MOSQ_LOG_ERR,
                             "fakecloud: %s: key type %s %s is not RSA, P-256 or P-384", path,
                             OBJ_nid2sn(EVP_PKEY_get_base_id(key->pkey)), curve);
        goto err_after_pkey;
    }
    /* The kid akenza uses: hex SHA-256 of the SubjectPublicKeyInfo DER. */
    der_len = i2d_PUBKEY(key->pkey, &der);
    if (der_len <= 0 || EVP_Digest(der, (size_t)der_len, digest, NULL, EVP_sha256(), NULL) != 1) {
        rc = -ENOMEM;
        goto err_after_der;
    }
    for (size_t i = 0; i < sizeof(digest); i++) {
        snprintf(&key->kid[2 * i], 3, "%02x", digest[i]);
    }
    key->path = strdup(path);
    if (key->path == NULL) {
        rc = -ENOMEM;
        goto err_after_der;
    }
    OPENSSL_free(der);
    return 0;
err_after_der:
    OPENSSL_free(der);
err_after_pkey:
    EVP_PKEY_free(key->pkey);
    key->pkey = NULL;
    ERR_clear_error();
    return rc;
}

/* Loads the comma-separated key list of plugin_opt_keys. */
static int fakecloud_keys_load(struct fakecloud *fc, const char *list)
{
    char *copy = strdup(list);
    char *saveptr = NULL;
    int rc = 0;

    if (copy == NULL) {
        return -ENOMEM;
    }
    for (char *path = strtok_r(copy, ",", &saveptr); path != NULL;
         path = strtok_r(NULL, ",", &saveptr)) {
        while (*path == ' ') {
            path++;
        }
        if (*path == '\0') {
            continue;
        }
        if (fc->key_count == FAKECLOUD_MAX_KEYS) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: more than %d keys", FAKECLOUD_MAX_KEYS);
            rc = -E2BIG;
            break;
        }
        rc = fakecloud_key_load(path, &fc->keys[fc->key_count]);
        if (rc < 0) {
            break;
        }
        fc->key_count++;
    }
    free(copy);
    return rc;
}

/* Parses a whole number of seconds in [0, 10 years]. */
static int fakecloud_parse_seconds(const char *key, const char *value, long long *out)
{
    char *end;
    long long n;

    errno = 0;
    n = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || n < 0 || n > 10LL * 366 * 86400) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: plugin_opt_%s \"%s\" is not seconds", key,
                             value);
        return -EINVAL;
    }
    *out = n;
    return 0;
}

/* plugin_opt_sas_keys: "device=path,device=path", each file holding the device's key in
 * base64 as the Azure portal shows it. */
static int fakecloud_sas_keys_load(struct fakecloud *fc, const char *list)
{
    char *copy = strdup(list), *save = NULL;

    if (copy == NULL)
        return -ENOMEM;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '='), text[512];
        struct fakecloud_sas_device *device;
        size_t len;
        FILE *f;
        int n;

        if (eq == NULL || fc->sas_count == FAKECLOUD_MAX_SAS_DEVICES) {
            mosquitto_log_printf(MOSQ_LOG_ERR,
                                 "fakecloud: plugin_opt_sas_keys: %s is not "
                                 "device=path (or too many)",
                                 item);
            free(copy);
            return -EINVAL;
        }
        *eq = '\0';
        if (strncmp(eq + 1, "x509:", 5) == 0) {
            device = &fc->sas[fc->sas_count];
            snprintf(device->x509, sizeof(device->x509), "%s", eq + 6);
            device->id = strdup(item);
            if (device->id == NULL) {
                free(copy);
                return -ENOMEM;
            }
            fc->sas_count++;
            continue;
        }
        f = fopen(eq + 1, "r");
        if (f == NULL || fgets(text, sizeof(text), f) == NULL) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: cannot read SAS key %s", eq + 1);
            if (f)
                fclose(f);
            free(copy);
            return -EINVAL;
        }
        fclose(f);
        len = strcspn(text, " \t\r\n");
        text[len] = '\0';
        device = &fc->sas[fc->sas_count];
        unsigned char buf[FAKECLOUD_SAS_KEY_MAX + 3];
        n = len % 4 == 0 && len / 4 * 3 <= sizeof(buf)
                ? EVP_DecodeBlock(buf, (unsigned char *)text, (int)len)
                : -1;
        if (n <= 0) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: SAS key %s is not base64", eq + 1);
            free(copy);
            return -EINVAL;
        }
        n -= (len > 0 && text[len - 1] == '=') + (len > 1 && text[len - 2] == '=');
        memcpy(device->key, buf, (size_t)n);
        device->key_len = (size_t)n;
        device->id = strdup(item);
        if (device->id == NULL) {
            free(copy);
            return -ENOMEM;
        }
        fc->sas_count++;
    }
    free(copy);
    return 0;
}

static int fakecloud_conf_parse(struct fakecloud *fc, struct mosquitto_opt *options,
                                int option_count)
{
    const char *keys = NULL, *log_path = NULL, *sas_keys = NULL;
    int rc;

    fc->skew = FAKECLOUD_DEFAULT_SKEW;
    fc->max_lifetime = FAKECLOUD_DEFAULT_MAX_LIFETIME;
    for (int i = 0; i < option_count; i++) {
        const char *key = options[i].key, *value = options[i].value;
        char **target = NULL;

        if (strcmp(key, "keys") == 0) {
            keys = value;
        } else if (strcmp(key, "hub") == 0) {
            target = &fc->hub;
        } else if (strcmp(key, "sas_keys") == 0) {
            sas_keys = value;
        } else if (strcmp(key, "aud") == 0) {
            target = &fc->aud;
        } else if (strcmp(key, "log") == 0) {
            log_path = value;
        } else if (strcmp(key, "observer_user") == 0) {
            target = &fc->observer_user;
        } else if (strcmp(key, "observer_password") == 0) {
            target = &fc->observer_password;
        } else if (strcmp(key, "skew") == 0) {
            rc = fakecloud_parse_seconds(key, value, &fc->skew);
            if (rc < 0) {
                return rc;
            }
        } else if (strcmp(key, "max_lifetime") == 0) {
            rc = fakecloud_parse_seconds(key, value, &fc->max_lifetime);
            if (rc < 0) {
                return rc;
            }
        } else if (strcmp(key, "require_kid") == 0) {
            if (strcmp(value, "true") != 0 && strcmp(value, "false") != 0) {
                mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: require_kid must be true or false");
                return -EINVAL;
            }
            fc->require_kid = strcmp(value, "true") == 0;
        } else {
            /* A typo must not silently turn a check off. */
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: unknown option plugin_opt_%s", key);
            return -EINVAL;
        }
        if (target != NULL) {
            free(*target);
            *target = strdup(value);
            if (*target == NULL) {
                return -ENOMEM;
            }
        }
    }
    if (fc->hub != NULL) {
        if (sas_keys == NULL || keys != NULL || fc->aud != NULL) {
            mosquitto_log_printf(MOSQ_LOG_ERR,
                                 "fakecloud: plugin_opt_hub takes plugin_opt_sas_keys "
                                 "(and no JWT keys or aud)");
            return -EINVAL;
        }
        rc = fakecloud_sas_keys_load(fc, sas_keys);
        if (rc < 0)
            return rc;
    } else if (keys == NULL || fc->aud == NULL) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: plugin_opt_keys and plugin_opt_aud are "
                                           "required");
        return -EINVAL;
    }
    if ((fc->observer_user == NULL) != (fc->observer_password == NULL)) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: plugin_opt_observer_user and "
                                           "plugin_opt_observer_password go together");
        return -EINVAL;
    }
    if (fc->hub == NULL) {
        rc = fakecloud_keys_load(fc, keys);
        if (rc < 0) {
            return rc;
        }
        if (fc->key_count == 0) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: plugin_opt_keys lists no key");
            return -EINVAL;
        }
    }
    if (log_path != NULL) {
        fc->log = fopen(log_path, "a");
        if (fc->log == NULL) {
            rc = -errno;
            mosquitto_log_printf(MOSQ_LOG_ERR, "fakecloud: cannot open log %s: %s", log_path,
                                 strerror(errno));
            return rc;
        }
    }
    return 0;
}

static void fakecloud_free(struct fakecloud *fc)
{
    while (fc->sessions != NULL) {
        struct fakecloud_session *session = fc->sessions;

        fc->sessions = session->next;
        fakecloud_session_free(session);
    }
    for (size_t i = 0; i < fc->key_count; i++) {
        EVP_PKEY_free(fc->keys[i].pkey);
        free(fc->keys[i].path);
    }
    if (fc->log != NULL) {
        fclose(fc->log);
    }
    for (size_t i = 0; i < fc->sas_count; i++) {
        free(fc->sas[i].id);
        OPENSSL_cleanse(fc->sas[i].key, sizeof(fc->sas[i].key));
    }
    free(fc->hub);
    free(fc->aud);
    free(fc->observer_user);
    free(fc->observer_password);
    free(fc);
}

static void fakecloud_log_start(struct fakecloud *fc)
{
    json_t *line = json_object();
    json_t *keys = json_array();
    static const char *const type_names[] = {"RSA", "P-256", "P-384"};

    for (size_t i = 0; i < fc->key_count; i++) {
        json_array_append_new(keys,
                              json_pack("{s:s, s:s, s:s}", "path", fc->keys[i].path, "type",
                                        type_names[fc->keys[i].type], "kid", fc->keys[i].kid));
    }
    json_object_set_new(line, "event", json_string("start"));
    json_object_set_new(line, "aud", fakecloud_json_str(fc->aud));
    json_object_set_new(line, "skew", json_integer(fc->skew));
    json_object_set_new(line, "max_lifetime", json_integer(fc->max_lifetime));
    json_object_set_new(line, "require_kid", json_boolean(fc->require_kid));
    json_object_set_new(line, "keys", keys);
    fakecloud_log_write(fc, line);
}

/* ------------------------------------------------------------------------------------------ */
/* Plugin entry points (mosquitto_plugin.h, version 5)                                         */
/* ------------------------------------------------------------------------------------------ */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5) {
            return 5;
        }
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
    struct fakecloud *fc;
    int rc;

    fc = calloc(1, sizeof(*fc));
    if (fc == NULL) {
        return MOSQ_ERR_NOMEM;
    }
    fc->plugin_id = identifier;
    rc = fakecloud_conf_parse(fc, options, option_count);
    if (rc < 0) {
        goto err_after_alloc;
    }
    if (mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, fakecloud_basic_auth_cb, NULL,
                                    fc) != MOSQ_ERR_SUCCESS) {
        goto err_after_alloc;
    }
    if (mosquitto_callback_register(identifier, MOSQ_EVT_TICK, fakecloud_tick_cb, NULL, fc) !=
        MOSQ_ERR_SUCCESS) {
        goto err_after_basic_auth;
    }
    if (mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT, fakecloud_disconnect_cb, NULL,
                                    fc) != MOSQ_ERR_SUCCESS) {
        goto err_after_tick;
    }
    if (fc->hub != NULL &&
        mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, fakecloud_acl_cb, NULL, fc) !=
            MOSQ_ERR_SUCCESS) {
        goto err_after_disconnect;
    }
    fakecloud_log_start(fc);
    mosquitto_log_printf(MOSQ_LOG_INFO,
                         "fakecloud: %zu key(s), aud \"%s\", skew %lld s, max lifetime %lld s",
                         fc->key_count, fc->aud, fc->skew, fc->max_lifetime);
    *userdata = fc;
    return MOSQ_ERR_SUCCESS;

err_after_disconnect:
    mosquitto_callback_unregister(identifier, MOSQ_EVT_DISCONNECT, fakecloud_disconnect_cb, NULL);
err_after_tick:
    mosquitto_callback_unregister(identifier, MOSQ_EVT_TICK, fakecloud_tick_cb, NULL);
err_after_basic_auth:
    mosquitto_callback_unregister(identifier, MOSQ_EVT_BASIC_AUTH, fakecloud_basic_auth_cb, NULL);
err_after_alloc:
    fakecloud_free(fc);
    return rc == -ENOMEM ? MOSQ_ERR_NOMEM : MOSQ_ERR_INVAL;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    struct fakecloud *fc = userdata;

    if (fc == NULL) {
        return MOSQ_ERR_SUCCESS;
    }
    mosquitto_callback_unregister(fc->plugin_id, MOSQ_EVT_BASIC_AUTH, fakecloud_basic_auth_cb,
                                  NULL);
    mosquitto_callback_unregister(fc->plugin_id, MOSQ_EVT_TICK, fakecloud_tick_cb, NULL);
    mosquitto_callback_unregister(fc->plugin_id, MOSQ_EVT_DISCONNECT, fakecloud_disconnect_cb,
                                  NULL);
    if (fc->hub != NULL) {
        mosquitto_callback_unregister(fc->plugin_id, MOSQ_EVT_ACL_CHECK, fakecloud_acl_cb, NULL);
    }
    fakecloud_free(fc);
    return MOSQ_ERR_SUCCESS;
}
