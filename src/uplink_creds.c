/* uplink_creds.c - fingerprints of an uplink's credential files
 * (uplink_int.h): what a connection was set up with, and whether the files
 * on disk still say the same (uplink_reload_credentials()).
 */
#include "uplink_int.h"

/* One signature at a time in the whole process: jwt_sign() must not run
 * concurrently on one signer, and PKCS#11 keys of several uplinks may share
 * one token session in the engine. Signing takes milliseconds. */
static pthread_mutex_t uplink_sign_lock = PTHREAD_MUTEX_INITIALIZER;

int uplink_creds_sign(struct jwt_signer *signer, const struct jwt_claims *claims, time_t now,
                      char **token, time_t *expires_at, char *err, size_t err_size)
{
    int rc;

    pthread_mutex_lock(&uplink_sign_lock);
    rc = jwt_sign(signer, claims, now, token, expires_at, err, err_size);
    pthread_mutex_unlock(&uplink_sign_lock);
    return rc;
}

/* --- credential fingerprints (uplink_reload_credentials) ----------------- */

static void creds_fp_hex(const char *prefix, const unsigned char *md, unsigned len,
                         char out[UPLINK_FP_SIZE])
{
    static const char digits[] = "0123456789abcdef";
    size_t used = (size_t)snprintf(out, UPLINK_FP_SIZE, "%s:", prefix);

    for (unsigned i = 0; i < len && used + 2 < UPLINK_FP_SIZE; i++) {
        out[used++] = digits[md[i] >> 4];
        out[used++] = digits[md[i] & 0xf];
    }
    out[used] = '\0';
}

void uplink_creds_fp_file(const char *path, char out[UPLINK_FP_SIZE])
{
    unsigned char buf[4096], md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;
    EVP_MD_CTX *ctx = NULL;
    FILE *f;
    size_t n;
    bool ok;

    f = fopen(path, "rbe");
    if (!f) {
        snprintf(out, UPLINK_FP_SIZE, "unreadable:%s", strerror(errno));
        return;
    }
    ctx = EVP_MD_CTX_new();
    ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
    while (ok && (n = fread(buf, 1, sizeof(buf), f)) > 0)
        ok = EVP_DigestUpdate(ctx, buf, n) == 1;
    ok = ok && !ferror(f) && EVP_DigestFinal_ex(ctx, md, &md_len) == 1;
    if (ok)
        creds_fp_hex("sha256", md, md_len, out);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:%s",
                 ferror(f) ? "read error" : "cannot compute SHA-256");
    EVP_MD_CTX_free(ctx);
    fclose(f);
}

void uplink_creds_fp_key_spec(const char *spec, char out[UPLINK_FP_SIZE])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    if (!keys_is_uri(spec)) {
        uplink_creds_fp_file(spec, out);
        return;
    }
    if (EVP_Digest(spec, strlen(spec), md, &md_len, EVP_sha256(), NULL) == 1)
        creds_fp_hex("uri", md, md_len, out);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:cannot compute SHA-256");
}

void uplink_creds_fp_jwt_key(const EVP_PKEY *key, const char *spec, char out[UPLINK_FP_SIZE])
{
    char hex[65];

    if (keys_is_uri(spec))
        uplink_creds_fp_key_spec(spec, out);
    else if (key && keys_public_der_sha256(key, hex) == 0)
        snprintf(out, UPLINK_FP_SIZE, "pub:%s", hex);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:no public key");
}

void uplink_conn_take_creds(struct uplink_conn *conn)
{
    if (conn->tls) {
        if (conn->cert)
            uplink_creds_fp_file(conn->cert, conn->creds.cert);
        if (conn->key)
            uplink_creds_fp_key_spec(conn->key, conn->creds.key);
        if (conn->ca_file && !conn->ca_system)
            uplink_creds_fp_file(conn->ca_file, conn->creds.ca);
    }
    conn->creds.taken = true;
}

bool uplink_creds_changed(const char *now, const char *before, char *list, size_t size,
                          const char *name)
{
    size_t used = strlen(list);

    if (strcmp(now, before) == 0)
        return false;
    snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
    return true;
}

int uplink_creds_check(const struct conf_uplink *conf, bool tls_changed, bool ca_changed,
                       EVP_PKEY *jwt_key, char *err, size_t err_size, char *warning,
                       size_t warning_size)
{
    char described[64];
    int rc;

    warning[0] = '\0';
    if (tls_changed && conf->tls.cert) {
        /* tlscheck.h: the key is the certificate's, every certificate of
         * the chain valid now, the CN the profile's (Cumulocity). */
        struct keys_options key_options;
        tlscheck_key_options(conf, &key_options); /* a pkcs11: key's PIN file and module */
        struct tlscheck_options options = {.expected_cn = conf->cert_cn,
                                           .key_options = &key_options};
        rc = tlscheck_client_cert(conf->tls.cert, conf->tls.key, &options, time(NULL), NULL, err,
                                  err_size, warning, warning_size);
        if (rc < 0)
            return rc;
    }
    if (ca_changed && conf->tls.ca_file && !conf->tls.ca_system) {
        X509 *leaf = NULL;
        rc = keys_load_cert_chain(conf->tls.ca_file, &leaf, NULL, err, err_size);
        X509_free(leaf);
        if (rc < 0)
            return rc;
    }
    if (jwt_key) {
        /* What conf_load() checks: the key fits auth.alg and can sign. */
        const struct conf_jwt *jwt = &conf->auth.jwt;
        struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
        struct jwt_claims claims;
        struct jwt_signer *signer = NULL;
        char *token = NULL;
        char why[KEYS_ERR_SIZE];

        conf_jwt_claims(jwt, extra, &claims);
        rc = jwt_signer_new(jwt_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, why, sizeof(why));
        if (rc == 0)
            rc = jwt_sign(signer, &claims, jwt_build_epoch() + 86400, &token, NULL, why,
                          sizeof(why));
        if (token) {
            explicit_bzero(token, strlen(token));
            free(token);
        }
        jwt_signer_free(signer);
        if (rc < 0) {
            snprintf(err, err_size,
                     "auth.key=%s (%s) cannot sign as %s: %s (auth.alg is the one the "
                     "configuration was loaded with; after changing the key type, reload the "
                     "configuration: systemctl reload uplinkd)",
                     jwt->key, keys_describe(jwt_key, described, sizeof(described)),
                     jwt_alg_name(jwt->alg), why);
            return rc;
        }
    }
    return 0;
}
