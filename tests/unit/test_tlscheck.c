/* test_tlscheck.c - start-up checks of client certificates (tlscheck.c).
 *
 * Every certificate is made here with OpenSSL's APIs (a CA, an intermediate
 * and leaves with chosen validity periods and CNs) and written as PEM to a
 * temporary directory, so the checks run on real files like the daemon's.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "keys.h"
#include "tlscheck.h"

#define DAY (24 * 3600L)

struct pki {
    char dir[64];
    time_t now;
    EVP_PKEY *ca_key, *inter_key, *leaf_key, *other_key;
    X509 *ca, *inter;
};

static EVP_PKEY *make_key(void)
{
    EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(key);
    return key;
}

/* A certificate for @key named CN=@cn, valid from now+@from_s to now+@to_s,
 * signed by @issuer_key (self-signed when @issuer is NULL). */
static X509 *make_cert(struct pki *pki, EVP_PKEY *key, const char *cn, long from_s, long to_s,
                       X509 *issuer, EVP_PKEY *issuer_key, bool ca)
{
    static long serial = 1;
    X509 *cert = X509_new();
    X509V3_CTX ext_ctx;

    assert_non_null(cert);
    assert_int_equal(X509_set_version(cert, 2), 1);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), serial++);
    assert_non_null(X509_time_adj_ex(X509_getm_notBefore(cert), 0, from_s, &pki->now));
    assert_non_null(X509_time_adj_ex(X509_getm_notAfter(cert), 0, to_s, &pki->now));
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"tlscheck test", -1,
                               -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(cert, issuer ? X509_get_subject_name(issuer) : name);
    assert_int_equal(X509_set_pubkey(cert, key), 1);
    X509V3_set_ctx(&ext_ctx, issuer ? issuer : cert, cert, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &ext_ctx, NID_basic_constraints,
                                              ca ? "critical,CA:TRUE" : "CA:FALSE");
    assert_non_null(ext);
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    assert_true(X509_sign(cert, issuer_key, EVP_sha256()) > 0);
    return cert;
}

static void path_of(const struct pki *pki, const char *name, char *out, size_t size)
{
    snprintf(out, size, "%s/%s", pki->dir, name);
}

/* Writes the certificates (NULL-terminated) to @name in order. */
static void write_certs(const struct pki *pki, const char *name, ...)
{
    char path[PATH_MAX];
    va_list ap;

    path_of(pki, name, path, sizeof(path));
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    va_start(ap, name);
    for (X509 *cert; (cert = va_arg(ap, X509 *)) != NULL;)
        assert_int_equal(PEM_write_X509(f, cert), 1);
    va_end(ap);
    assert_int_equal(fclose(f), 0);
}

static void write_key(const struct pki *pki, const char *name, EVP_PKEY *key)
{
    char path[PATH_MAX];

    path_of(pki, name, path, sizeof(path));
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL), 1);
    assert_int_equal(fclose(f), 0);
}

static int setup(void **state)
{
    struct pki *pki = calloc(1, sizeof(*pki));

    assert_non_null(pki);
    snprintf(pki->dir, sizeof(pki->dir), "/tmp/test_tlscheck.XXXXXX");
    assert_non_null(mkdtemp(pki->dir));
    pki->now = time(NULL);
    pki->ca_key = make_key();
    pki->inter_key = make_key();
    pki->leaf_key = make_key();
    pki->other_key = make_key();
    pki->ca =
        make_cert(pki, pki->ca_key, "test root CA", -DAY, 3650 * DAY, NULL, pki->ca_key, true);
    pki->inter = make_cert(pki, pki->inter_key, "test intermediate", -DAY, 365 * DAY, pki->ca,
                           pki->ca_key, true);
    write_key(pki, "leaf.key", pki->leaf_key);
    write_key(pki, "other.key", pki->other_key);
    *state = pki;
    return 0;
}

static int teardown(void **state)
{
    struct pki *pki = *state;
    char command[128];

    snprintf(command, sizeof(command), "rm -rf '%s'", pki->dir);
    assert_int_equal(system(command), 0);
    X509_free(pki->ca);
    X509_free(pki->inter);
    EVP_PKEY_free(pki->ca_key);
    EVP_PKEY_free(pki->inter_key);
    EVP_PKEY_free(pki->leaf_key);
    EVP_PKEY_free(pki->other_key);
    free(pki);
    return 0;
}

/* tlscheck_client_cert() on DIR/@cert_name with DIR/@key_name. */
static int check(const struct pki *pki, const char *cert_name, const char *key_name,
                 const struct tlscheck_options *options, struct tlscheck_info *info, char *err,
                 char *warning)
{
    char cert_path[PATH_MAX], key_path[PATH_MAX];

    path_of(pki, cert_name, cert_path, sizeof(cert_path));
    path_of(pki, key_name, key_path, sizeof(key_path));
    err[0] = '\0';
    return tlscheck_client_cert(cert_path, key_path, options, pki->now, info, err,
                                TLSCHECK_MSG_SIZE, warning, TLSCHECK_MSG_SIZE);
}

static void format_date(time_t t, char *buf, size_t size)
{
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%d", &tm);
}

/* --- tests ----------------------------------------------------------------- */

/* Cumulocity's form: device certificate, intermediate, and the CA itself. */
static void test_full_chain_ok(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    struct tlscheck_info info;
    X509 *leaf =
        make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 90 * DAY, pki->inter, pki->inter_key, false);

    write_certs(pki, "chain.pem", leaf, pki->inter, pki->ca, NULL);
    assert_int_equal(check(pki, "chain.pem", "leaf.key", NULL, &info, err, warning), 0);
    assert_string_equal(warning, "");
    assert_int_equal(info.chain_len, 3);
    assert_non_null(strstr(info.subject, "CN=gw-0001"));
    assert_non_null(strstr(info.issuer, "CN=test intermediate"));

    /* The leaf alone is fine too. */
    write_certs(pki, "leaf.pem", leaf, NULL);
    assert_int_equal(check(pki, "leaf.pem", "leaf.key", NULL, &info, err, warning), 0);
    assert_int_equal(info.chain_len, 1);
    X509_free(leaf);
}

static void test_key_mismatch(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    X509 *leaf =
        make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 90 * DAY, pki->inter, pki->inter_key, false);

    write_certs(pki, "chain.pem", leaf, pki->inter, NULL);
    assert_int_equal(check(pki, "chain.pem", "other.key", NULL, NULL, err, warning), -EKEYREJECTED);
    assert_non_null(strstr(err, "chain.pem"));
    assert_non_null(strstr(err, "does not belong"));
    X509_free(leaf);
}

static void test_expired(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE], until[16], from[16];
    X509 *leaf = make_cert(pki, pki->leaf_key, "gw-0001", -30 * DAY, -2 * DAY, pki->inter,
                           pki->inter_key, false);

    write_certs(pki, "expired.pem", leaf, pki->inter, pki->ca, NULL);
    assert_int_equal(check(pki, "expired.pem", "leaf.key", NULL, NULL, err, warning), -EKEYEXPIRED);
    format_date(pki->now - 2 * DAY, until, sizeof(until));
    format_date(pki->now - 30 * DAY, from, sizeof(from));
    /* One sentence: the file, "expired", and both dates. */
    assert_non_null(strstr(err, "expired.pem"));
    assert_non_null(strstr(err, "expired on"));
    assert_non_null(strstr(err, until));
    assert_non_null(strstr(err, from));
    assert_null(strchr(err, '\n'));
    X509_free(leaf);
}

static void test_not_yet_valid(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE], from[16];
    X509 *leaf = make_cert(pki, pki->leaf_key, "gw-0001", 3 * DAY, 90 * DAY, pki->inter,
                           pki->inter_key, false);

    write_certs(pki, "future.pem", leaf, NULL);
    assert_int_equal(check(pki, "future.pem", "leaf.key", NULL, NULL, err, warning), -ERANGE);
    format_date(pki->now + 3 * DAY, from, sizeof(from));
    assert_non_null(strstr(err, "future.pem"));
    assert_non_null(strstr(err, "not valid yet"));
    assert_non_null(strstr(err, from));
    assert_non_null(strstr(err, "clock"));
    X509_free(leaf);
}

static void test_expires_soon_warns(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE], until[16];
    X509 *leaf = make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 5 * DAY + 3600, pki->inter,
                           pki->inter_key, false);

    write_certs(pki, "soon.pem", leaf, pki->inter, NULL);
    assert_int_equal(check(pki, "soon.pem", "leaf.key", NULL, NULL, err, warning), 0);
    format_date(pki->now + 5 * DAY + 3600, until, sizeof(until));
    assert_non_null(strstr(warning, "soon.pem"));
    assert_non_null(strstr(warning, "expires on"));
    assert_non_null(strstr(warning, until));
    assert_non_null(strstr(warning, "in 5 days"));

    /* A shorter window: no warning. */
    struct tlscheck_options options = {.warn_before_s = 2 * DAY};
    assert_int_equal(check(pki, "soon.pem", "leaf.key", &options, NULL, err, warning), 0);
    assert_string_equal(warning, "");
    X509_free(leaf);
}

static void test_common_name(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    X509 *leaf =
        make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 90 * DAY, pki->inter, pki->inter_key, false);

    write_certs(pki, "cn.pem", leaf, pki->inter, pki->ca, NULL);
    struct tlscheck_options same = {.expected_cn = "gw-0001"};
    assert_int_equal(check(pki, "cn.pem", "leaf.key", &same, NULL, err, warning), 0);

    struct tlscheck_options other = {.expected_cn = "gw-0002"};
    assert_int_equal(check(pki, "cn.pem", "leaf.key", &other, NULL, err, warning), -EPERM);
    assert_non_null(strstr(err, "cn.pem"));
    assert_non_null(strstr(err, "\"gw-0001\""));
    assert_non_null(strstr(err, "\"gw-0002\""));

    /* Exact: case matters, a prefix is not equal. */
    assert_int_equal(tlscheck_cert_cn(leaf, "GW-0001", "x.pem", err, sizeof(err)), -EPERM);
    assert_int_equal(tlscheck_cert_cn(leaf, "gw-000", "x.pem", err, sizeof(err)), -EPERM);
    assert_int_equal(tlscheck_cert_cn(leaf, "gw-0001", "x.pem", err, sizeof(err)), 0);
    X509_free(leaf);
}

static void test_chain_problems(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    X509 *leaf =
        make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 90 * DAY, pki->inter, pki->inter_key, false);
    X509 *old_inter = make_cert(pki, pki->inter_key, "test intermediate", -400 * DAY, -DAY, pki->ca,
                                pki->ca_key, true);

    /* An expired intermediate in the file breaks the chain the server sees. */
    write_certs(pki, "old-inter.pem", leaf, old_inter, pki->ca, NULL);
    assert_int_equal(check(pki, "old-inter.pem", "leaf.key", NULL, NULL, err, warning),
                     -EKEYEXPIRED);
    assert_non_null(strstr(err, "certificate 2 in"));
    assert_non_null(strstr(err, "old-inter.pem"));

    /* Out of order: allowed, with a warning. */
    write_certs(pki, "unordered.pem", leaf, pki->ca, pki->inter, NULL);
    assert_int_equal(check(pki, "unordered.pem", "leaf.key", NULL, NULL, err, warning), 0);
    assert_non_null(strstr(warning, "did not issue"));
    X509_free(old_inter);
    X509_free(leaf);
}

static void test_unreadable_files(void **state)
{
    struct pki *pki = *state;
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE];
    X509 *leaf =
        make_cert(pki, pki->leaf_key, "gw-0001", -DAY, 90 * DAY, pki->inter, pki->inter_key, false);

    assert_int_equal(check(pki, "missing.pem", "leaf.key", NULL, NULL, err, warning), -ENOENT);
    assert_non_null(strstr(err, "missing.pem"));
    /* cert and key swapped */
    write_certs(pki, "leaf.pem", leaf, NULL);
    assert_int_equal(check(pki, "leaf.key", "leaf.pem", NULL, NULL, err, warning), -EINVAL);
    assert_non_null(strstr(err, "swapped"));
    assert_int_equal(check(pki, "leaf.pem", "missing.key", NULL, NULL, err, warning), -ENOENT);
    assert_non_null(strstr(err, "missing.key"));
    X509_free(leaf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_full_chain_ok, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expired, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_yet_valid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expires_soon_warns, setup, teardown),
        cmocka_unit_test_setup_teardown(test_common_name, setup, teardown),
        cmocka_unit_test_setup_teardown(test_chain_problems, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreadable_files, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
