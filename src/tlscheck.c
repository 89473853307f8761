/* tlscheck.c - start-up checks of an uplink's client certificate (see
 * tlscheck.h). */
#include "tlscheck.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "conf.h"
#include "keys.h"
#include "log.h"
#include "util.h"

/* ASN1_TIME to time_t; (time_t)-1 when unreadable. */
static time_t asn1_to_time(const ASN1_TIME *t)
{
    struct tm tm;

    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1)
        return (time_t)-1;
    return timegm(&tm);
}

static const char *format_time(time_t t, char *buf, size_t size)
{
    struct tm tm;

    if (t == (time_t)-1 || gmtime_r(&t, &tm) == NULL ||
        strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(buf, size, "(unreadable date)");
    return buf;
}

static void name_oneline(const X509_NAME *name, char *out, size_t size)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL;
    long len;

    out[0] = '\0';
    if (bio == NULL)
        return;
    if (X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0) {
        len = BIO_get_mem_data(bio, &data);
        snprintf(out, size, "%.*s", (int)len, data);
    }
    BIO_free(bio);
}

int tlscheck_cert_cn(const X509 *cert, const char *expected, const char *cert_name, char *err,
                     size_t err_size)
{
    char *cn = NULL;
    int rc = keys_cert_common_name(cert, &cn);

    if (rc == -ENOENT) {
        util_set_err(err, err_size,
                     "certificate %s has no CN in its subject, but the cloud requires CN = \"%s\" "
                     "(the client id); issue a certificate with that CN",
                     cert_name, expected);
        return -EPERM;
    }
    if (rc == -EINVAL) {
        util_set_err(err, err_size,
                     "certificate %s has a CN with an embedded NUL byte; refusing it", cert_name);
        return -EINVAL;
    }
    if (rc < 0) {
        util_set_err(err, err_size, "certificate %s: out of memory", cert_name);
        return rc;
    }
    if (strcmp(cn, expected) != 0) {
        util_set_err(
            err, err_size,
            "certificate %s is issued for CN \"%s\", but the device id is \"%s\"; the cloud "
            "refuses a certificate whose CN is not the device id (CONNACK 5): set the device "
            "id (cumulocity.device_id) to \"%s\" or issue a certificate for \"%s\"",
            cert_name, cn, expected, cn, expected);
        rc = -EPERM;
    }
    free(cn);
    return rc;
}

/* The other certificates of the file: each must be valid now, and they
 * should follow the leaf in issuing order (RFC 8446 §4.4.2 and RFC 5246
 * §7.4.2 want "each following certificate certifies the one preceding it";
 * servers tend to forgive the order, so that is only a warning). */
static int check_chain(const char *cert_path, const X509 *leaf, STACK_OF(X509) * chain, time_t now,
                       char *err, size_t err_size, char *warning, size_t warning_size)
{
    const X509 *previous = leaf;
    char subject[256], date[64];

    for (int i = 0; i < sk_X509_num(chain); i++) {
        X509 *cert = sk_X509_value(chain, i);
        time_t not_after = asn1_to_time(X509_get0_notAfter(cert));

        name_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
        if (X509_cmp_time(X509_get0_notAfter(cert), &now) != 1) {
            util_set_err(
                err, err_size,
                "certificate %d in %s (%s) expired on %s; the server will refuse the chain: "
                "put the renewed intermediate/CA certificate in the file",
                i + 2, cert_path, subject, format_time(not_after, date, sizeof(date)));
            return -EKEYEXPIRED;
        }
        /* X509_check_issued() takes non-const pointers but changes nothing
         * we rely on (it may cache extensions). */
        if (warning != NULL && warning[0] == '\0' &&
            X509_check_issued(cert, (X509 *)previous) != X509_V_OK)
            util_set_err(
                warning, warning_size,
                "certificate %d in %s (%s) did not issue the one before it; servers expect "
                "the device certificate first, then each issuer in turn",
                i + 2, cert_path, subject);
        previous = cert;
    }
    return 0;
}

time_t tlscheck_cert_not_after(const char *cert_path)
{
    char err[TLSCHECK_MSG_SIZE];
    X509 *leaf = NULL;
    STACK_OF(X509) *chain = NULL;
    time_t not_after = 0;

    if (keys_load_cert_chain(cert_path, &leaf, &chain, err, sizeof(err)) == 0) {
        not_after = asn1_to_time(X509_get0_notAfter(leaf));
        if (not_after == (time_t)-1)
            not_after = 0;
    }
    sk_X509_pop_free(chain, X509_free);
    X509_free(leaf);
    ERR_clear_error();
    return not_after;
}

int tlscheck_client_cert(const char *cert_path, const char *key_spec,
                         const struct tlscheck_options *options, time_t now,
                         struct tlscheck_info *info, char *err, size_t err_size, char *warning,
                         size_t warning_size)
{
    static const struct tlscheck_options no_options = {0};
    char date[64], date2[64], date_now[64];
    X509 *leaf = NULL;
    STACK_OF(X509) *chain = NULL;
    EVP_PKEY *key = NULL;
    int rc;

    if (options == NULL)
        options = &no_options;
    util_set_err(warning, warning_size, "%s", "");
    if (info != NULL)
        memset(info, 0, sizeof(*info));

    rc = keys_load_cert_chain(cert_path, &leaf, &chain, err, err_size);
    if (rc < 0)
        return rc;
    time_t not_before = asn1_to_time(X509_get0_notBefore(leaf));
    time_t not_after = asn1_to_time(X509_get0_notAfter(leaf));
    if (info != NULL) {
        info->chain_len = 1 + (size_t)sk_X509_num(chain);
        info->not_before = not_before;
        info->not_after = not_after;
        name_oneline(X509_get_subject_name(leaf), info->subject, sizeof(info->subject));
        name_oneline(X509_get_issuer_name(leaf), info->issuer, sizeof(info->issuer));
    }

    rc = keys_load_private(key_spec, options->key_options, &key, err, err_size);
    if (rc < 0)
        goto out;
    rc = keys_check_cert_key(leaf, key, cert_path, err, err_size);
    if (rc < 0) {
        /* Name the key file too: either file may be the wrong one. Not a
         * pkcs11: URI, which may hold a PIN. */
        if (!keys_is_uri(key_spec)) {
            char why[TLSCHECK_MSG_SIZE];
            snprintf(why, sizeof(why), "%s", err);
            util_set_err(err, err_size, "key file %s: %s", key_spec, why);
        }
        goto out;
    }
    /* keys_check_cert_validity() words it, but with the whole validity
     * period the user sees at once whether the clock or the certificate is
     * wrong. */
    rc = keys_check_cert_validity(leaf, now, cert_path, err, err_size);
    if (rc == -EKEYEXPIRED) {
        util_set_err(err, err_size,
                     "certificate %s expired on %s (valid %s to %s); install a renewed certificate "
                     "(or, if that date is still to come, fix the system clock)",
                     cert_path, format_time(not_after, date, sizeof(date)),
                     format_time(not_before, date2, sizeof(date2)), date);
        goto out;
    }
    if (rc == -ERANGE) {
        util_set_err(err, err_size,
                     "certificate %s is not valid yet: valid from %s to %s, and the clock says %s; "
                     "if that date has passed, the system clock is wrong",
                     cert_path, format_time(not_before, date, sizeof(date)),
                     format_time(not_after, date2, sizeof(date2)),
                     format_time(now, date_now, sizeof(date_now)));
        goto out;
    }
    if (rc < 0)
        goto out;
    rc = check_chain(cert_path, leaf, chain, now, err, err_size, warning, warning_size);
    if (rc < 0)
        goto out;
    if (options->expected_cn != NULL) {
        rc = tlscheck_cert_cn(leaf, options->expected_cn, cert_path, err, err_size);
        if (rc < 0)
            goto out;
    }

    time_t window = options->warn_before_s > 0 ? options->warn_before_s
                                               : (time_t)TLSCHECK_WARN_DAYS * 24 * 3600;
    if (warning != NULL && not_after != (time_t)-1 && not_after - now < window) {
        /* Takes precedence over a chain-order warning: it is the one that
         * will stop the gateway. */
        long days = (long)((not_after - now) / (24 * 3600));
        util_set_err(
            warning, warning_size,
            "certificate %s expires on %s (in %ld day%s); renew it before then or the cloud "
            "will refuse the connection",
            cert_path, format_time(not_after, date, sizeof(date)), days, days == 1 ? "" : "s");
    }
    rc = 0;

out:
    EVP_PKEY_free(key);
    sk_X509_pop_free(chain, X509_free);
    X509_free(leaf);
    ERR_clear_error();
    return rc;
}

void tlscheck_key_options(const struct conf_uplink *uplink, struct keys_options *out)
{
    const struct conf_jwt *jwt = &uplink->auth.jwt;

    *out = (struct keys_options){0};
    if (!keys_is_uri(uplink->tls.key))
        return;
    if (uplink->auth.type == CONF_AUTH_JWT && keys_is_uri(jwt->key)) {
        out->passphrase_file = jwt->passphrase_file;
        out->pkcs11_module = jwt->pkcs11_module;
    }
}

/* tls.ca: libmosquitto would load it only at the first handshake, and a file
 * without a certificate would then fail every connection attempt. */
static int check_ca_file(const char *ca_file, char *err, size_t err_size)
{
    char why[TLSCHECK_MSG_SIZE];
    X509 *first = NULL;
    int rc = keys_load_cert_chain(ca_file, &first, NULL, why, sizeof(why));

    X509_free(first);
    ERR_clear_error();
    if (rc < 0)
        util_set_err(err, err_size,
                     "tls.ca: %s; set tls.ca to a PEM file with the CA certificate(s) that issued "
                     "the server's certificate, or to \"system\"",
                     why);
    return rc;
}

/* The "FILE:LINE:COL" of a key, or "". */
static const char *at(const char *where)
{
    return where ? where : "";
}

int tlscheck_uplink(const struct conf_uplink *uplink, time_t now, const char *context)
{
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    int ca_rc = 0, rc;

    if (context == NULL)
        context = "";
    if (!uplink->tls.enabled)
        return 0;
    /* Both the CA and the client certificate, so that one run names every
     * broken file. */
    if (uplink->tls.ca_file != NULL && !uplink->tls.ca_system) {
        ca_rc = check_ca_file(uplink->tls.ca_file, err, sizeof(err));
        if (ca_rc < 0)
            log_uplink(LOG_ERR, uplink->name, "%s%s%s%s", context, at(uplink->tls.ca_at),
                       uplink->tls.ca_at ? ": " : "", err);
    }
    if (uplink->tls.cert == NULL)
        return ca_rc;
    if (uplink->tls.key == NULL) {
        /* conf_uplink.c requires both; say so anyway rather than crash on NULL. */
        log_uplink(LOG_ERR, uplink->name, "%stls.cert %s is set but tls.key is not", context,
                   uplink->tls.cert);
        return ca_rc < 0 ? ca_rc : -EINVAL;
    }
    /* cert_cn is the profile's rule (Cumulocity: the CN is the device id). */
    struct keys_options key_options;
    tlscheck_key_options(uplink, &key_options);
    struct tlscheck_options options = {.expected_cn = uplink->cert_cn, .key_options = &key_options};
    rc = tlscheck_client_cert(uplink->tls.cert, uplink->tls.key, &options, now, NULL, err,
                              sizeof(err), warning, sizeof(warning));
    if (rc < 0) {
        log_uplink(LOG_ERR, uplink->name, "%s%s%s%s", context, at(uplink->tls.cert_at),
                   uplink->tls.cert_at ? ": " : "", err);
        return ca_rc < 0 ? ca_rc : rc;
    }
    if (warning[0] != '\0')
        log_uplink(LOG_WARNING, uplink->name, "%s", warning);
    return ca_rc;
}

int tlscheck_conf(const struct conf *conf, const struct conf *running, time_t now, char *failed,
                  size_t failed_size)
{
    int first = 0;

    if (failed != NULL && failed_size > 0)
        failed[0] = '\0';
    for (size_t i = 0; i < conf->uplink_count; i++) {
        const struct conf_uplink *uplink = &conf->uplinks[i];
        if (running != NULL && conf_uplink_equal(conf_uplink_find(running, uplink->name), uplink))
            continue;
        int rc = tlscheck_uplink(uplink, now, running != NULL ? "reload refused: " : NULL);
        if (rc == 0)
            continue;
        if (first == 0)
            first = rc;
        if (failed != NULL && failed_size > 0) {
            size_t used = strlen(failed);
            snprintf(failed + used, failed_size - used, "%s%s", used ? ", " : "", uplink->name);
        }
    }
    return first;
}
