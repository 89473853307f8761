/* uplink_creds.c - an uplink's credentials (uplink_int.h): fingerprints of
 * the files a connection used and their reload, signing the JWT, rotation
 * before it expires, and the clock checks a JWT depends on.
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

/* "sha256:HEX" of the bytes of @path, or "unreadable:WHY". Any thread. */
static void creds_fp_file(const char *path, char out[UPLINK_FP_SIZE])
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

/* A key spec: a pkcs11: URI by its text (the key stays in the token), a
 * file by its bytes. */
static void creds_fp_key_spec(const char *spec, char out[UPLINK_FP_SIZE])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    if (!keys_is_uri(spec)) {
        creds_fp_file(spec, out);
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
        creds_fp_key_spec(spec, out);
    else if (key && keys_public_der_sha256(key, hex) == 0)
        snprintf(out, UPLINK_FP_SIZE, "pub:%s", hex);
    else
        snprintf(out, UPLINK_FP_SIZE, "unreadable:no public key");
}

void uplink_conn_take_creds(struct uplink_conn *conn)
{
    if (conn->tls) {
        if (conn->cert)
            creds_fp_file(conn->cert, conn->creds.cert);
        if (conn->key)
            creds_fp_key_spec(conn->key, conn->creds.key);
        if (conn->ca_file && !conn->ca_system)
            creds_fp_file(conn->ca_file, conn->creds.ca);
    }
    conn->creds.taken = true;
}

bool uplink_clock_blocks(struct uplink *uplink)
{
    const struct conf_uplink *conf = uplink->conf;
    enum jwt_clock_state clock = JWT_CLOCK_OK;
    char err[KEYS_ERR_SIZE];

    if (conf->auth.type != CONF_AUTH_JWT) {
        uplink->stats.clock = NULL;
        return false;
    }
    if (jwt_clock_check(time(NULL), conf->auth.jwt.clock_check == CONF_CLOCK_SYNC, &clock, err,
                        sizeof(err)) == 0) {
        if (uplink->clock_bad)
            log_uplink(LOG_NOTICE, uplink->name, "the clock can be trusted now; signing a JWT");
        uplink->clock_bad = false;
        uplink->stats.clock = jwt_clock_state_name(JWT_CLOCK_OK);
        return false;
    }
    uplink->stats.clock = jwt_clock_state_name(clock);
    if (!uplink->clock_bad) {
        log_uplink(LOG_WARNING, uplink->name,
                   "not signing a JWT: %s (checking again every %d s; auth.clock_check: "
                   "build-date accepts an unsynchronised clock)",
                   err, UPLINK_CLOCK_RECHECK_MS / 1000);
        uplink_set_error(uplink, err);
    } else {
        log_uplink(LOG_DEBUG, uplink->name, "clock still %s; checking again in %d s",
                   jwt_clock_state_name(clock), UPLINK_CLOCK_RECHECK_MS / 1000);
    }
    uplink->clock_bad = true;
    uplink->clock_was_bad = true;
    if (uplink->state == UPLINK_BACKOFF)
        uv_timer_start(&uplink->timer, uplink_timer_cb, UPLINK_CLOCK_RECHECK_MS, 0);
    else
        uplink_backoff(uplink, UPLINK_CLOCK_RECHECK_MS,
                       "waiting for a clock good enough to sign a JWT");
    return true;
}
bool uplink_jwt_resign_now(struct uplink *uplink, const struct uplink_conn *conn)
{
    int64_t wall_ms, mono_ms;
    bool stepped;

    if (!conn->token_expires_at || !conn->connack_seen ||
        (conn->connack_rc != 4 && conn->connack_rc != 5) || uplink->resigned_at_once)
        return false;
    wall_ms = ((int64_t)time(NULL) - (int64_t)conn->token_signed_at) * 1000;
    mono_ms = (int64_t)(util_now_ms() - conn->token_signed_mono_ms);
    stepped = wall_ms - mono_ms > UPLINK_CLOCK_STEP_MS || mono_ms - wall_ms > UPLINK_CLOCK_STEP_MS;
    if (!stepped && !uplink->clock_was_bad)
        return false;
    uplink->resigned_at_once = true;
    log_uplink(LOG_NOTICE, uplink->name, "%s; signing a new JWT now instead of backing off (once)",
               stepped ? "the wall clock was stepped since the token was signed"
                       : "the clock was not trustworthy earlier");
    return true;
}
void uplink_clock_watch(struct uplink *uplink)
{
    int64_t wall_ms, mono_ms, step_ms;

    if (uplink->state != UPLINK_BACKOFF) {
        uplink->clock_watch = false;
        uv_timer_stop(&uplink->rotate);
        return;
    }
    wall_ms = ((int64_t)time(NULL) - (int64_t)uplink->refused_signed_at) * 1000;
    mono_ms = (int64_t)(util_now_ms() - uplink->refused_signed_mono_ms);
    step_ms = wall_ms - mono_ms;
    if (step_ms <= UPLINK_CLOCK_STEP_MS && step_ms >= -UPLINK_CLOCK_STEP_MS)
        return;
    uplink->clock_watch = false;
    uv_timer_stop(&uplink->rotate);
    log_uplink(LOG_NOTICE, uplink->name,
               "the wall clock was stepped by %+.0f s since the refused JWT was signed; signing "
               "a new JWT now instead of waiting out the backoff",
               (double)step_ms / 1000.0);
    uplink_connect(uplink, "the clock was stepped after the JWT was refused");
    uplink_service(uplink);
}
void uplink_rotate_cb(uv_timer_t *timer)
{
    struct uplink *uplink = container_of(timer, struct uplink, rotate);
    struct uplink_conn *conn = uplink->conn;
    int64_t left_ms;
    uint64_t drain_ms;
    char exp[40];

    if (uplink->clock_watch) {
        uplink_clock_watch(uplink); /* BACKOFF after a refused JWT */
        return;
    }
    if (uplink->state != UPLINK_ONLINE || !conn || !conn->online)
        return;
    if (!uplink->rotating) {
        /* The drain must end before exp: the server may drop us there. */
        left_ms = ((int64_t)conn->token_expires_at - (int64_t)time(NULL)) * 1000 - 1000;
        drain_ms = left_ms <= 0                       ? 0
                   : left_ms < UPLINK_ROTATE_DRAIN_MS ? (uint64_t)left_ms
                                                      : UPLINK_ROTATE_DRAIN_MS;
        uplink->rotating = true;
        uplink->rotate_deadline = uv_now(uplink->loop) + drain_ms;
        log_uplink(LOG_NOTICE, uplink->name,
                   "rotating the JWT that expires at %s: waiting up to %.1f s for %zu in-flight "
                   "publish(es), then reconnecting with a new token",
                   uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)),
                   (double)drain_ms / 1000.0, uplink->inflight);
        uv_timer_start(&uplink->rotate, uplink_rotate_cb, drain_ms, 0);
    }
    uplink_service(uplink);
}
void uplink_arm_rotation(struct uplink *uplink, const struct uplink_conn *conn)
{
    struct jwt_refresh policy = {.percent = conn->refresh_percent};
    time_t refresh_at;
    int64_t delay_ms;

    if (!conn->token_expires_at)
        return;
    refresh_at = jwt_refresh_at(conn->token_signed_at, conn->token_expires_at, &policy);
    delay_ms = ((int64_t)refresh_at - (int64_t)conn->token_signed_at) * 1000 -
               (int64_t)(util_now_ms() - conn->token_signed_mono_ms);
    if (delay_ms < 0)
        delay_ms = 0;
    uplink->stats.token_refresh_at = refresh_at;
    log_uplink(LOG_INFO, uplink->name, "the JWT will be replaced in %.1f s",
               (double)delay_ms / 1000.0);
    uv_timer_start(&uplink->rotate, uplink_rotate_cb, (uint64_t)delay_ms, 0);
}
/* Appends @name to the comma-separated list @list. */
/* Whether the fingerprint @now differs from @before; if so, @name is added
 * to the comma-separated @list (of @size bytes) for the log line. */
static bool creds_changed(const char *now, const char *before, char *list, size_t size,
                          const char *name)
{
    size_t used = strlen(list);

    if (strcmp(now, before) == 0)
        return false;
    snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
    return true;
}
/* The start-up checks on the files now on disk, for what changed. A new
 * auth.key that passes goes to *@jwt_key_out (the caller owns it). */
static int creds_check(const struct conf_uplink *conf, bool tls_changed, bool ca_changed,
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
int uplink_reload_credentials(struct uplink *uplink, char *report, size_t report_size)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_creds now = {.taken = true};
    EVP_PKEY *jwt_key = NULL;
    char changed[64] = "", err[TLSCHECK_MSG_SIZE] = "", warning[TLSCHECK_MSG_SIZE];
    char jwt_err[KEYS_ERR_SIZE] = "";
    bool tls_changed = false, ca_changed = false, jwt_changed = false;
    int rc;

    if (uplink->state == UPLINK_IDLE || uplink->state == UPLINK_STOPPING ||
        uplink->state == UPLINK_STOPPED || !uplink->creds.taken) {
        snprintf(report, report_size,
                 "credentials unchanged (no connection set up yet; the next attempt reads the "
                 "files)");
        log_uplink(LOG_INFO, uplink->name, "%s", report);
        return UPLINK_CREDS_UNCHANGED;
    }
    /* The same files, in the same way, as uplink_conn_new() + uplink_conn_take_creds(). */
    if (conf->tls.enabled) {
        if (conf->tls.cert)
            creds_fp_file(conf->tls.cert, now.cert);
        if (conf->tls.key)
            creds_fp_key_spec(conf->tls.key, now.key);
        if (conf->tls.ca_file && !conf->tls.ca_system)
            creds_fp_file(conf->tls.ca_file, now.ca);
    }
    if (conf->auth.type == CONF_AUTH_JWT) {
        const struct conf_jwt *jwt = &conf->auth.jwt;
        struct keys_options options = {.passphrase_file = jwt->passphrase_file,
                                       .pkcs11_module = jwt->pkcs11_module};
        if (keys_is_uri(jwt->key)) {
            creds_fp_key_spec(jwt->key, now.jwt);
        } else if (keys_load_private(jwt->key, &options, &jwt_key, jwt_err, sizeof(jwt_err)) < 0) {
            snprintf(now.jwt, sizeof(now.jwt), "unreadable:%.140s", jwt_err);
        } else {
            uplink_creds_fp_jwt_key(jwt_key, jwt->key, now.jwt);
        }
    }
    tls_changed = creds_changed(now.cert, uplink->creds.cert, changed, sizeof(changed), "tls.cert");
    tls_changed |= creds_changed(now.key, uplink->creds.key, changed, sizeof(changed), "tls.key");
    ca_changed = creds_changed(now.ca, uplink->creds.ca, changed, sizeof(changed), "tls.ca");
    jwt_changed = creds_changed(now.jwt, uplink->creds.jwt, changed, sizeof(changed), "auth.key");
    if (!changed[0]) {
        EVP_PKEY_free(jwt_key);
        snprintf(report, report_size, "credentials unchanged");
        log_uplink(LOG_INFO, uplink->name, "%s", report);
        return UPLINK_CREDS_UNCHANGED;
    }

    if (jwt_changed && !jwt_key && !keys_is_uri(conf->auth.jwt.key)) {
        snprintf(err, sizeof(err), "%s", jwt_err); /* the new auth.key cannot be loaded */
        rc = -ENOKEY;
    } else {
        rc = creds_check(conf, tls_changed, ca_changed, jwt_changed ? jwt_key : NULL, err,
                         sizeof(err), warning, sizeof(warning));
    }
    if (rc < 0) {
        EVP_PKEY_free(jwt_key);
        snprintf(report, report_size, "new %s refused, keeping the current session: %s", changed,
                 err);
        log_uplink(LOG_ERR, uplink->name, "%s", report);
        return rc;
    }
    if (warning[0])
        log_uplink(LOG_WARNING, uplink->name, "%s", warning);
    if (jwt_changed && jwt_key) {
        EVP_PKEY_free(uplink->jwt_key);
        uplink->jwt_key = jwt_key; /* uplink_conn_copy_jwt() signs with it from now on */
        jwt_key = NULL;
    }
    EVP_PKEY_free(jwt_key);
    snprintf(report, report_size, "credentials changed (%s); the new files passed the checks",
             changed);
    uplink_reconnect(uplink, report);
    return UPLINK_CREDS_CHANGED;
}
int uplink_sign_jwt(struct uplink *uplink, char **token_out, time_t *expires_at, char *err,
                    size_t err_size)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_conn *conn;
    int rc;

    *token_out = NULL;
    if (conf->auth.type != CONF_AUTH_JWT) {
        snprintf(err, err_size, "uplink \"%s\" does not use JWT auth (auth.type is %s)",
                 uplink->name, conf->auth.type == CONF_AUTH_BASIC ? "basic" : "none");
        return -ENOKEY;
    }
    /* The clock rule of uplink_clock_blocks(), without its waiting. */
    rc = jwt_clock_check(time(NULL), conf->auth.jwt.clock_check == CONF_CLOCK_SYNC, NULL, err,
                         err_size);
    if (rc < 0)
        return rc;
    /* The claims and signer a connection attempt would use (uplink_conn_copy_jwt),
     * signed under the same lock. This runs on the loop thread: a manual
     * request, and a signature takes milliseconds. */
    conn = calloc(1, sizeof(*conn));
    if (!conn)
        return -ENOMEM;
    conn->uplink = uplink;
    rc = uplink_conn_copy_jwt(conn, &conf->auth.jwt);
    if (rc < 0) {
        snprintf(err, err_size, "cannot prepare the signer: %s", strerror(-rc));
        uplink_conn_free(conn);
        return rc;
    }
    rc = uplink_creds_sign(conn->signer, &conn->claims, time(NULL), token_out, expires_at, err,
                           err_size);
    uplink_conn_free(conn);
    return rc;
}
