/* test_jwt.c - JWT signing (jwt.c) and key loading (keys.c).
 *
 * Every token is verified here through OpenSSL's own verify path
 * (EVP_DigestVerify with the public key), after turning a JWS R||S ECDSA
 * signature back into DER, so a bug in jwt.c cannot hide behind a matching
 * bug in a hand-written verifier. Keys are generated at test time; the only
 * outside programs used are the openssl CLI (kid fingerprint) and softhsm2 /
 * pkcs11-tool (PKCS#11 test, skipped with a message when not installed).
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
#include <sys/stat.h>
#include <sys/timex.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "jwt.h"
#include "keys.h"

#define SOFTHSM_MODULE "/usr/lib/softhsm/libsofthsm2.so"

/* --- helpers ------------------------------------------------------------- */

static EVP_PKEY *make_key(enum jwt_alg alg)
{
    EVP_PKEY *key = NULL;

    switch (alg) {
    case JWT_ALG_RS256:
    case JWT_ALG_PS256:
        key = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
        break;
    case JWT_ALG_ES256:
        key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        break;
    case JWT_ALG_ES384:
        key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
        break;
    }
    assert_non_null(key);
    return key;
}

/* A public-only copy, so verification cannot use the private half (or an
 * engine behind it). */
static EVP_PKEY *public_copy(EVP_PKEY *key)
{
    unsigned char *der = NULL;
    int len = i2d_PUBKEY(key, &der);
    assert_true(len > 0);
    const unsigned char *pos = der;
    EVP_PKEY *pub = d2i_PUBKEY(NULL, &pos, len);
    OPENSSL_free(der);
    assert_non_null(pub);
    return pub;
}

struct token_parts {
    char *header;       /* decoded JSON, NUL-terminated */
    char *claims;       /* decoded JSON, NUL-terminated */
    unsigned char *sig; /* decoded signature */
    size_t sig_len;
    size_t signing_input_len; /* length of "b64(header).b64(claims)" */
};

static void token_parts_free(struct token_parts *parts)
{
    free(parts->header);
    free(parts->claims);
    free(parts->sig);
}

/* Splits a compact JWS into its three decoded parts (RFC 7515 §7.1). */
static void split_token(const char *token, struct token_parts *parts)
{
    const char *dot1 = strchr(token, '.');
    assert_non_null(dot1);
    const char *dot2 = strchr(dot1 + 1, '.');
    assert_non_null(dot2);
    assert_null(strchr(dot2 + 1, '.'));
    assert_null(strchr(token, '=')); /* RFC 7515 §2: no padding */
    size_t len;

    memset(parts, 0, sizeof(*parts));
    assert_int_equal(
        jwt_base64url_decode(token, (size_t)(dot1 - token), (unsigned char **)&parts->header, &len),
        0);
    assert_int_equal(jwt_base64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1),
                                          (unsigned char **)&parts->claims, &len),
                     0);
    assert_int_equal(jwt_base64url_decode(dot2 + 1, strlen(dot2 + 1), &parts->sig, &parts->sig_len),
                     0);
    parts->signing_input_len = (size_t)(dot2 - token);
}

/* R||S (RFC 7518 §3.4) back to the DER OpenSSL verifies. */
static unsigned char *raw_to_der(const unsigned char *raw, size_t raw_len, size_t *der_len)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, (int)(raw_len / 2), NULL);
    BIGNUM *s = BN_bin2bn(raw + raw_len / 2, (int)(raw_len / 2), NULL);
    unsigned char *der = NULL;

    assert_non_null(sig);
    assert_non_null(r);
    assert_non_null(s);
    assert_int_equal(ECDSA_SIG_set0(sig, r, s), 1);
    int len = i2d_ECDSA_SIG(sig, &der);
    assert_true(len > 0);
    ECDSA_SIG_free(sig);
    *der_len = (size_t)len;
    return der;
}

/* Verifies @token's signature with @key's public half; returns the parts. */
static void verify_token(const char *token, EVP_PKEY *key, enum jwt_alg alg,
                         struct token_parts *parts)
{
    EVP_PKEY *pub = public_copy(key);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    const unsigned char *sig;
    unsigned char *der = NULL;
    size_t sig_len;

    split_token(token, parts);
    sig = parts->sig;
    sig_len = parts->sig_len;
    if (alg == JWT_ALG_ES256 || alg == JWT_ALG_ES384) {
        assert_int_equal(parts->sig_len, alg == JWT_ALG_ES256 ? 64 : 96);
        der = raw_to_der(parts->sig, parts->sig_len, &sig_len);
        sig = der;
    } else {
        assert_int_equal(parts->sig_len, (size_t)EVP_PKEY_get_size(pub));
    }
    assert_non_null(ctx);
    assert_int_equal(EVP_DigestVerifyInit(
                         ctx, &pctx, alg == JWT_ALG_ES384 ? EVP_sha384() : EVP_sha256(), NULL, pub),
                     1);
    if (alg == JWT_ALG_PS256) {
        assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING), 1);
        /* RFC 7518 §3.5: the salt is exactly as long as the hash. */
        assert_int_equal(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32), 1);
        assert_int_equal(EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()), 1);
    }
    if (EVP_DigestVerify(ctx, sig, sig_len, (const unsigned char *)token,
                         parts->signing_input_len) != 1) {
        char reason[256];
        ERR_error_string_n(ERR_get_error(), reason, sizeof(reason));
        fail_msg("%s signature does not verify: %s\ntoken: %s", jwt_alg_name(alg), reason, token);
    }
    OPENSSL_free(der);
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(pub);
}

static char tmp_dir[64];

static int setup_tmp(void **state)
{
    strcpy(tmp_dir, "/tmp/uplk-jwt-XXXXXX");
    assert_non_null(mkdtemp(tmp_dir));
    return 0;
}

static int teardown_tmp(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp_dir);
    assert_int_equal(system(cmd), 0);
    return 0;
}

static void tmp_path(char *buf, size_t size, const char *name)
{
    int n = snprintf(buf, size, "%s/%s", tmp_dir, name);
    assert_true(n > 0 && (size_t)n < size);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* Runs a shell command and returns its first output line (trimmed). */
static void run_line(const char *cmd, char *out, size_t size)
{
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    if (fgets(out, (int)size, p) == NULL)
        out[0] = '\0';
    int status = pclose(p);
    if (status != 0)
        fail_msg("command failed (%d): %s", status, cmd);
    out[strcspn(out, "\r\n")] = '\0';
}

/* --- base64url ----------------------------------------------------------- */

static void check_b64(const void *data, size_t len, const char *expected)
{
    char *text = NULL;
    unsigned char *back = NULL;
    size_t back_len = 0;

    assert_int_equal(jwt_base64url_encode(data, len, &text), 0);
    assert_string_equal(text, expected);
    assert_int_equal(jwt_base64url_decode(text, strlen(text), &back, &back_len), 0);
    assert_int_equal(back_len, len);
    assert_memory_equal(back, data, len);
    free(text);
    free(back);
}

static void test_base64url(void **state)
{
    /* RFC 4648 §10 test vectors without padding: every length mod 3. */
    check_b64("", 0, "");
    check_b64("f", 1, "Zg");
    check_b64("fo", 2, "Zm8");
    check_b64("foo", 3, "Zm9v");
    check_b64("foob", 4, "Zm9vYg");
    check_b64("fooba", 5, "Zm9vYmE");
    check_b64("foobar", 6, "Zm9vYmFy");
    /* The two characters that differ from base64 (RFC 4648 §5). */
    check_b64("\xfb\xff", 2, "-_8");
    check_b64("\xff\xff\xfe", 3, "___-");
    check_b64("\x00", 1, "AA");
    check_b64("\x00\x00\x00\x00", 4, "AAAAAA");

    static const char *const bad[] = {
        "Zg==",         /* padding */
        "Z",            /* 1 mod 4: not a whole byte */
        "Zh",           /* unused bits not zero */
        "Zm9+",         /* base64, not base64url */
        "Zm9/", "Zm 9", /* space */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        unsigned char *out = NULL;
        size_t len = 0;
        if (jwt_base64url_decode(bad[i], strlen(bad[i]), &out, &len) != -EINVAL)
            fail_msg("\"%s\" was accepted", bad[i]);
    }
}

/* --- DER -> R||S ----------------------------------------------------------- */

static void test_der_to_raw(void **state)
{
    unsigned char raw[96];
    /* SEQUENCE { INTEGER r (31 bytes: R's top byte was zero),
     *            INTEGER s (0x00 + 32 bytes: high bit set) } */
    unsigned char der[2 + 2 + 31 + 2 + 33];
    size_t pos = 0;
    der[pos++] = 0x30;
    der[pos++] = sizeof(der) - 2;
    der[pos++] = 0x02;
    der[pos++] = 31;
    for (int i = 0; i < 31; i++)
        der[pos++] = (unsigned char)(0x11 + i);
    der[pos++] = 0x02;
    der[pos++] = 33;
    der[pos++] = 0x00;
    for (int i = 0; i < 32; i++)
        der[pos++] = (unsigned char)(0x80 + i);
    assert_int_equal(pos, sizeof(der));

    assert_int_equal(jwt_ecdsa_der_to_raw(der, sizeof(der), 32, raw), 0);
    assert_int_equal(raw[0], 0x00); /* left padding of the short R */
    for (int i = 0; i < 31; i++)
        assert_int_equal(raw[1 + i], 0x11 + i);
    for (int i = 0; i < 32; i++) /* S without its DER sign byte */
        assert_int_equal(raw[32 + i], 0x80 + i);

    /* Both very short (R = 1, S = 0x0100): 31 and 30 zero bytes of padding. */
    static const unsigned char tiny[] = {0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x01, 0x00};
    assert_int_equal(jwt_ecdsa_der_to_raw(tiny, sizeof(tiny), 32, raw), 0);
    for (int i = 0; i < 31; i++)
        assert_int_equal(raw[i], 0);
    assert_int_equal(raw[31], 0x01);
    for (int i = 32; i < 62; i++)
        assert_int_equal(raw[i], 0);
    assert_int_equal(raw[62], 0x01);
    assert_int_equal(raw[63], 0x00);

    /* ES384: 48-byte halves. */
    assert_int_equal(jwt_ecdsa_der_to_raw(tiny, sizeof(tiny), 48, raw), 0);
    assert_int_equal(raw[47], 0x01);
    assert_int_equal(raw[94], 0x01);
    assert_int_equal(raw[95], 0x00);

    /* An R of 33 significant bytes does not fit P-256's 32. */
    unsigned char wide[2 + 2 + 33 + 3];
    pos = 0;
    wide[pos++] = 0x30;
    wide[pos++] = sizeof(wide) - 2;
    wide[pos++] = 0x02;
    wide[pos++] = 33;
    for (int i = 0; i < 33; i++)
        wide[pos++] = 0x01;
    wide[pos++] = 0x02;
    wide[pos++] = 0x01;
    wide[pos++] = 0x01;
    assert_int_equal(jwt_ecdsa_der_to_raw(wide, sizeof(wide), 32, raw), -EINVAL);
    assert_int_equal(jwt_ecdsa_der_to_raw(wide, sizeof(wide), 48, raw), 0);

    /* Trailing bytes, truncation, not DER at all, a zero R. */
    unsigned char trailing[sizeof(tiny) + 1];
    memcpy(trailing, tiny, sizeof(tiny));
    trailing[sizeof(tiny)] = 0;
    assert_int_equal(jwt_ecdsa_der_to_raw(trailing, sizeof(trailing), 32, raw), -EINVAL);
    assert_int_equal(jwt_ecdsa_der_to_raw(tiny, sizeof(tiny) - 1, 32, raw), -EINVAL);
    static const unsigned char junk[] = {0x04, 0x02, 0x01, 0x01};
    assert_int_equal(jwt_ecdsa_der_to_raw(junk, sizeof(junk), 32, raw), -EINVAL);
    static const unsigned char zero_r[] = {0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x01};
    assert_int_equal(jwt_ecdsa_der_to_raw(zero_r, sizeof(zero_r), 32, raw), -EINVAL);
}

/* --- signing ------------------------------------------------------------- */

static void sign_and_verify(enum jwt_alg alg, int rounds)
{
    EVP_PKEY *key = make_key(alg);
    struct jwt_signer *signer = NULL;
    char err[KEYS_ERR_SIZE] = "";
    struct jwt_claims claims = {.aud = "my-project", .skew_s = 60};
    time_t now = time(NULL);

    if (jwt_signer_new(key, alg, JWT_KID_NONE, NULL, &signer, err, sizeof(err)) != 0)
        fail_msg("jwt_signer_new(%s): %s", jwt_alg_name(alg), err);
    for (int i = 0; i < rounds; i++) {
        struct token_parts parts;
        char *token = NULL;
        time_t exp = 0;
        char expected[256];

        if (jwt_sign(signer, &claims, now, &token, &exp, err, sizeof(err)) != 0)
            fail_msg("jwt_sign(%s): %s", jwt_alg_name(alg), err);
        verify_token(token, key, alg, &parts);
        snprintf(expected, sizeof(expected), "{\"alg\":\"%s\",\"typ\":\"JWT\"}", jwt_alg_name(alg));
        assert_string_equal(parts.header, expected);
        snprintf(expected, sizeof(expected), "{\"iat\":%lld,\"exp\":%lld,\"aud\":\"my-project\"}",
                 (long long)now - 60, (long long)now + 3600);
        assert_string_equal(parts.claims, expected);
        assert_int_equal(exp, now + 3600);
        token_parts_free(&parts);
        free(token);
    }
    jwt_signer_free(signer);
    EVP_PKEY_free(key);
}

static void test_sign_rs256(void **state)
{
    sign_and_verify(JWT_ALG_RS256, 2);
}

static void test_sign_ps256(void **state)
{
    sign_and_verify(JWT_ALG_PS256, 2);
}

/* Many rounds: about 1 in 128 ECDSA signatures has an R or S with a leading
 * zero byte, which a wrong conversion would drop. */
static void test_sign_es256(void **state)
{
    sign_and_verify(JWT_ALG_ES256, 300);
}

static void test_sign_es384(void **state)
{
    sign_and_verify(JWT_ALG_ES384, 300);
}

static void test_claims(void **state)
{
    EVP_PKEY *key = make_key(JWT_ALG_ES256);
    struct jwt_signer *signer = NULL;
    char err[KEYS_ERR_SIZE] = "";
    struct token_parts parts;
    char *token = NULL;
    time_t now = time(NULL), exp = 0;
    char expected[512];

    assert_int_equal(
        jwt_signer_new(key, JWT_ALG_ES256, JWT_KID_VALUE, "key-1", &signer, err, sizeof(err)), 0);
    assert_string_equal(jwt_signer_kid(signer), "key-1");

    /* Extra claims, JSON escaping, no aud, a lifetime that hits the cap. */
    struct jwt_claim extra[] = {{"sub", "gw-0001"}, {"note", "a \"quoted\"\\value\n"}};
    struct jwt_claims claims = {.lifetime_s = 24 * 3600,
                                .max_lifetime_s = JWT_GCP_MAX_LIFETIME_S,
                                .skew_s = 60,
                                .extra = extra,
                                .extra_count = 2};
    assert_int_equal(jwt_sign(signer, &claims, now, &token, &exp, err, sizeof(err)), 0);
    verify_token(token, key, JWT_ALG_ES256, &parts);
    assert_string_equal(parts.header, "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"key-1\"}");
    /* exp - iat may not pass the cap: exp gives way to the back-dated iat. */
    snprintf(expected, sizeof(expected),
             "{\"iat\":%lld,\"exp\":%lld,\"sub\":\"gw-0001\",\"note\":\"a \\\"quoted\\\"\\\\value"
             "\\n\"}",
             (long long)now - 60, (long long)now - 60 + 24 * 3600);
    assert_string_equal(parts.claims, expected);
    assert_int_equal(exp, now - 60 + 24 * 3600);
    token_parts_free(&parts);
    free(token);
    token = NULL;

    /* Default lifetime and skew 0. */
    struct jwt_claims plain = {.aud = "p"};
    assert_int_equal(jwt_sign(signer, &plain, now, &token, &exp, err, sizeof(err)), 0);
    assert_int_equal(exp, now + JWT_DEFAULT_LIFETIME_S);
    free(token);
    token = NULL;

    /* Over the cap. */
    claims.lifetime_s = 24 * 3600 + 1;
    assert_int_equal(jwt_sign(signer, &claims, now, &token, &exp, err, sizeof(err)), -ERANGE);
    assert_non_null(strstr(err, "lifetime"));
    assert_null(token);

    /* Reserved and duplicated extra claims. */
    claims.lifetime_s = 600;
    struct jwt_claim reserved[] = {{"exp", "1"}};
    claims.extra = reserved;
    claims.extra_count = 1;
    assert_int_equal(jwt_sign(signer, &claims, now, &token, &exp, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "\"exp\""));
    struct jwt_claim twice[] = {{"sub", "a"}, {"sub", "b"}};
    claims.extra = twice;
    claims.extra_count = 2;
    assert_int_equal(jwt_sign(signer, &claims, now, &token, &exp, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "twice"));

    jwt_signer_free(signer);
    EVP_PKEY_free(key);
}

static void test_key_alg_mismatch(void **state)
{
    EVP_PKEY *small = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    EVP_PKEY *p384 = make_key(JWT_ALG_ES384);
    EVP_PKEY *p256 = make_key(JWT_ALG_ES256);
    EVP_PKEY *k1 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "secp256k1");
    struct jwt_signer *signer = NULL;
    char err[KEYS_ERR_SIZE] = "";

    assert_non_null(small);
    assert_non_null(k1);
    assert_int_equal(
        jwt_signer_new(small, JWT_ALG_RS256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)),
        -EINVAL);
    assert_non_null(strstr(err, "1024 bits"));
    assert_non_null(strstr(err, "2048"));
    assert_int_equal(
        jwt_signer_new(small, JWT_ALG_PS256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)),
        -EINVAL);
    assert_int_equal(
        jwt_signer_new(p384, JWT_ALG_ES256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)),
        -EINVAL);
    assert_non_null(strstr(err, "P-256"));
    assert_int_equal(
        jwt_signer_new(p256, JWT_ALG_ES384, JWT_KID_NONE, NULL, &signer, err, sizeof(err)),
        -EINVAL);
    assert_int_equal(
        jwt_signer_new(k1, JWT_ALG_ES256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)), -EINVAL);
    assert_int_equal(
        jwt_signer_new(p256, JWT_ALG_RS256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)),
        -EINVAL);
    assert_non_null(strstr(err, "RSA"));
    assert_int_equal(
        jwt_signer_new(p256, JWT_ALG_ES256, JWT_KID_VALUE, "", &signer, err, sizeof(err)), -EINVAL);
    assert_null(signer);

    enum jwt_alg alg;
    assert_int_equal(jwt_alg_parse("ES384", &alg), 0);
    assert_int_equal(alg, JWT_ALG_ES384);
    assert_int_equal(jwt_alg_parse("es256", &alg), -EINVAL);
    assert_int_equal(jwt_alg_parse("HS256", &alg), -EINVAL);
    assert_int_equal(jwt_alg_parse("none", &alg), -EINVAL);

    EVP_PKEY_free(small);
    EVP_PKEY_free(p384);
    EVP_PKEY_free(p256);
    EVP_PKEY_free(k1);
}

static void check_fingerprint(EVP_PKEY *key, const char *name)
{
    char path[PATH_MAX], cmd[PATH_MAX + 128], expected[128], hex[65];
    struct jwt_signer *signer = NULL;
    char err[KEYS_ERR_SIZE];

    tmp_path(path, sizeof(path), name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PUBKEY(f, key), 1);
    assert_int_equal(fclose(f), 0);
    snprintf(cmd, sizeof(cmd), "openssl pkey -pubin -in '%s' -outform DER | sha256sum", path);
    run_line(cmd, expected, sizeof(expected));
    expected[strcspn(expected, " ")] = '\0';
    assert_int_equal(strlen(expected), 64);

    assert_int_equal(keys_public_der_sha256(key, hex), 0);
    assert_string_equal(hex, expected);
    assert_int_equal(
        jwt_signer_new(key,
                       EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA ? JWT_ALG_RS256 : JWT_ALG_ES256,
                       JWT_KID_FINGERPRINT, NULL, &signer, err, sizeof(err)),
        0);
    assert_string_equal(jwt_signer_kid(signer), expected);
    jwt_signer_free(signer);
}

static void test_kid_fingerprint(void **state)
{
    EVP_PKEY *ec = make_key(JWT_ALG_ES256);
    EVP_PKEY *rsa = make_key(JWT_ALG_RS256);

    check_fingerprint(ec, "ec-pub.pem");
    check_fingerprint(rsa, "rsa-pub.pem");
    EVP_PKEY_free(ec);
    EVP_PKEY_free(rsa);
}

/* --- clock and rotation ---------------------------------------------------- */

static void test_clock(void **state)
{
    EVP_PKEY *key = make_key(JWT_ALG_ES256);
    struct jwt_signer *signer = NULL;
    struct jwt_claims claims = {.aud = "p"};
    enum jwt_clock_state clock_state;
    char err[KEYS_ERR_SIZE] = "";
    char *token = NULL;

    assert_true(jwt_build_epoch() > 1700000000); /* built after November 2023 */
    assert_true(jwt_build_epoch() <= time(NULL));
    assert_int_equal(
        jwt_signer_new(key, JWT_ALG_ES256, JWT_KID_NONE, NULL, &signer, err, sizeof(err)), 0);

    /* A clock reset to 1970 (no RTC battery) or to the day before the build. */
    assert_int_equal(jwt_sign(signer, &claims, 1000, &token, NULL, err, sizeof(err)), JWT_ECLOCK);
    assert_null(token);
    assert_non_null(strstr(err, "1970-01-01 00:16:40 UTC"));
    assert_non_null(strstr(err, "before this uplinkd was built"));
    assert_int_equal(
        jwt_sign(signer, &claims, jwt_build_epoch() - 1, &token, NULL, err, sizeof(err)),
        JWT_ECLOCK);
    assert_int_equal(jwt_clock_check(1000, false, &clock_state, err, sizeof(err)), JWT_ECLOCK);
    assert_int_equal(clock_state, JWT_CLOCK_BEFORE_BUILD);
    assert_string_equal(jwt_clock_state_name(clock_state), "before-build-date");

    /* The build day itself is fine. */
    assert_int_equal(jwt_sign(signer, &claims, jwt_build_epoch(), &token, NULL, err, sizeof(err)),
                     0);
    free(token);
    assert_int_equal(jwt_clock_check(time(NULL), false, &clock_state, err, sizeof(err)), 0);
    assert_int_equal(clock_state, JWT_CLOCK_OK);

    /* With the sync requirement the answer is the kernel's. */
    struct timex tx = {.modes = 0};
    int kernel = adjtimex(&tx);
    bool synced = kernel >= 0 && kernel != TIME_ERROR && !(tx.status & STA_UNSYNC);
    int rc = jwt_clock_check(time(NULL), true, &clock_state, err, sizeof(err));
    if (synced) {
        assert_int_equal(rc, 0);
    } else {
        assert_int_equal(rc, JWT_ECLOCK);
        assert_int_equal(clock_state, JWT_CLOCK_UNSYNCED);
        assert_non_null(strstr(err, "synchronised"));
    }

    jwt_signer_free(signer);
    EVP_PKEY_free(key);
}

static void test_refresh(void **state)
{
    struct jwt_refresh half = {.percent = 50};
    struct jwt_refresh margin = {.margin_s = 1000};
    struct jwt_refresh over = {.percent = 250};
    struct jwt_refresh huge_margin = {.margin_s = 100000};

    /* Default: 80% of a 3600 s token. */
    assert_int_equal(jwt_refresh_at(1000, 4600, NULL), 1000 + 2880);
    assert_int_equal(jwt_refresh_at(1000, 4600, &half), 1000 + 1800);
    /* The margin wins when it asks for earlier. */
    assert_int_equal(jwt_refresh_at(1000, 4600, &margin), 3600);
    assert_int_equal(jwt_refresh_at(1000, 4600, &over), 4600);
    assert_int_equal(jwt_refresh_at(1000, 4600, &huge_margin), 1000);
    assert_int_equal(jwt_refresh_at(1000, 1000, NULL), 1000);
    /* Large times do not overflow. */
    time_t far = (time_t)1 << 40;
    assert_int_equal(jwt_refresh_at(far, far + 86400, NULL), far + 69120);
}

/* --- key files ----------------------------------------------------------- */

static EVP_PKEY *load_ok(const char *path, const char *passphrase_file)
{
    struct keys_options options = {.passphrase_file = passphrase_file};
    char err[KEYS_ERR_SIZE] = "";
    EVP_PKEY *key = NULL;

    if (keys_load_private(path, &options, &key, err, sizeof(err)) != 0)
        fail_msg("keys_load_private(%s): %s", path, err);
    return key;
}

static int load_fails(const char *path, const char *passphrase_file, const char *words)
{
    struct keys_options options = {.passphrase_file = passphrase_file};
    char err[KEYS_ERR_SIZE] = "";
    EVP_PKEY *key = NULL;
    int rc = keys_load_private(path, &options, &key, err, sizeof(err));

    assert_true(rc < 0);
    assert_null(key);
    if (strstr(err, words) == NULL)
        fail_msg("error for %s lacks \"%s\": %s", path, words, err);
    assert_non_null(strstr(err, path));
    return rc;
}

static void write_key(const char *path, EVP_PKEY *key, const char *format, const char *pass)
{
    BIO *bio = BIO_new_file(path, "w");
    const EVP_CIPHER *cipher = pass ? EVP_aes_256_cbc() : NULL;
    int ok;

    assert_non_null(bio);
    if (strcmp(format, "pkcs8") == 0)
        ok = PEM_write_bio_PKCS8PrivateKey(bio, key, cipher, NULL, 0, NULL, (void *)pass);
    else /* "traditional": SEC1 for EC, PKCS#1 for RSA, legacy Proc-Type encryption */
        ok = PEM_write_bio_PrivateKey_traditional(bio, key, cipher, (unsigned char *)pass,
                                                  pass ? (int)strlen(pass) : 0, NULL, NULL);
    assert_int_equal(ok, 1);
    assert_int_equal(BIO_free(bio), 1);
}

static void test_keys_pem(void **state)
{
    EVP_PKEY *ec = make_key(JWT_ALG_ES256);
    EVP_PKEY *rsa = make_key(JWT_ALG_RS256);
    char path[PATH_MAX], pass_path[PATH_MAX], wrong_path[PATH_MAX];
    char text[8192];
    EVP_PKEY *loaded;

    tmp_path(pass_path, sizeof(pass_path), "pass.txt");
    write_text(pass_path, "s3cret phrase\n");
    tmp_path(wrong_path, sizeof(wrong_path), "wrong.txt");
    write_text(wrong_path, "not it\n");

    struct {
        const char *name, *format, *pass, *label;
        EVP_PKEY *key;
    } cases[] = {
        {"ec-pkcs8.pem", "pkcs8", NULL, "-----BEGIN PRIVATE KEY-----", ec},
        {"ec-sec1.pem", "traditional", NULL, "-----BEGIN EC PRIVATE KEY-----", ec},
        {"rsa-pkcs1.pem", "traditional", NULL, "-----BEGIN RSA PRIVATE KEY-----", rsa},
        {"rsa-pkcs8.pem", "pkcs8", NULL, "-----BEGIN PRIVATE KEY-----", rsa},
        {"ec-pkcs8-enc.pem", "pkcs8", "s3cret phrase", "-----BEGIN ENCRYPTED PRIVATE KEY-----", ec},
        {"rsa-pkcs1-enc.pem", "traditional", "s3cret phrase", "Proc-Type: 4,ENCRYPTED", rsa},
        {"ec-sec1-enc.pem", "traditional", "s3cret phrase", "Proc-Type: 4,ENCRYPTED", ec},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        tmp_path(path, sizeof(path), cases[i].name);
        write_key(path, cases[i].key, cases[i].format, cases[i].pass);
        FILE *f = fopen(path, "r");
        assert_non_null(f);
        size_t n = fread(text, 1, sizeof(text) - 1, f);
        fclose(f);
        text[n] = '\0';
        assert_non_null(strstr(text, cases[i].label)); /* the format we meant to test */

        loaded = load_ok(path, cases[i].pass ? pass_path : NULL);
        assert_int_equal(EVP_PKEY_eq(loaded, cases[i].key), 1);
        EVP_PKEY_free(loaded);
        if (cases[i].pass != NULL) {
            assert_int_equal(load_fails(path, NULL, "passphrase_file"), -ENOKEY);
            assert_int_equal(load_fails(path, wrong_path, "does not decrypt"), -EKEYREJECTED);
        }
    }

    /* A certificate or public key where the key should be, junk, no file. */
    tmp_path(path, sizeof(path), "pub.pem");
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PUBKEY(f, ec), 1);
    fclose(f);
    assert_int_equal(load_fails(path, NULL, "only a public key"), -EINVAL);
    tmp_path(path, sizeof(path), "junk.pem");
    write_text(path, "hello\n");
    assert_int_equal(load_fails(path, NULL, "not PEM"), -EINVAL);
    tmp_path(path, sizeof(path), "damaged.pem");
    write_text(path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    assert_int_equal(load_fails(path, NULL, "cannot be parsed"), -EINVAL);
    tmp_path(path, sizeof(path), "missing.pem");
    assert_int_equal(load_fails(path, NULL, "check the path"), -ENOENT);
    tmp_path(path, sizeof(path), "ec-pkcs8-enc.pem");
    tmp_path(wrong_path, sizeof(wrong_path), "no-such-pass.txt");
    assert_int_equal(load_fails(wrong_path, NULL, "check the path"), -ENOENT);
    {
        struct keys_options options = {.passphrase_file = wrong_path};
        char err[KEYS_ERR_SIZE];
        EVP_PKEY *key = NULL;
        assert_int_equal(keys_load_private(path, &options, &key, err, sizeof(err)), -ENOENT);
        assert_non_null(strstr(err, "passphrase file"));
    }

    EVP_PKEY_free(ec);
    EVP_PKEY_free(rsa);
}

/* --- certificates -------------------------------------------------------- */

static X509 *make_cert(EVP_PKEY *key, EVP_PKEY *issuer_key, const char *cn, long from, long to)
{
    X509 *cert = X509_new();
    X509_NAME *name;

    assert_non_null(cert);
    assert_int_equal(X509_set_version(cert, 2), 1);
    assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(cert), 1), 1);
    assert_non_null(X509_gmtime_adj(X509_getm_notBefore(cert), from));
    assert_non_null(X509_gmtime_adj(X509_getm_notAfter(cert), to));
    assert_int_equal(X509_set_pubkey(cert, key), 1);
    name = X509_get_subject_name(cert);
    assert_int_equal(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                                (const unsigned char *)"uplinkd", -1, -1, 0),
                     1);
    assert_int_equal(
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0),
        1);
    assert_int_equal(X509_set_issuer_name(cert, name), 1);
    assert_true(X509_sign(cert, issuer_key, EVP_sha256()) > 0);
    return cert;
}

static void test_certs(void **state)
{
    EVP_PKEY *key = make_key(JWT_ALG_ES256);
    EVP_PKEY *other = make_key(JWT_ALG_ES256);
    X509 *leaf = make_cert(key, key, "gw-0001", -3600, 86400);
    X509 *ca = make_cert(other, other, "Test CA", -3600, 86400);
    char path[PATH_MAX], err[KEYS_ERR_SIZE];
    X509 *got = NULL;
    STACK_OF(X509) *chain = NULL;
    char *cn = NULL;
    time_t now = time(NULL);

    tmp_path(path, sizeof(path), "chain.pem");
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_X509(f, leaf), 1);
    assert_int_equal(PEM_write_X509(f, ca), 1);
    fclose(f);

    assert_int_equal(keys_load_cert_chain(path, &got, &chain, err, sizeof(err)), 0);
    assert_int_equal(X509_cmp(got, leaf), 0);
    assert_int_equal(sk_X509_num(chain), 1);
    assert_int_equal(X509_cmp(sk_X509_value(chain, 0), ca), 0);

    assert_int_equal(keys_check_cert_key(got, key, path, err, sizeof(err)), 0);
    assert_int_equal(keys_check_cert_key(got, other, path, err, sizeof(err)), -EKEYREJECTED);
    assert_non_null(strstr(err, "does not belong"));

    assert_int_equal(keys_check_cert_validity(got, now, path, err, sizeof(err)), 0);
    assert_int_equal(keys_check_cert_validity(got, now + 2 * 86400, path, err, sizeof(err)),
                     -EKEYEXPIRED);
    assert_non_null(strstr(err, "expired on"));
    assert_int_equal(keys_check_cert_validity(got, now - 2 * 3600, path, err, sizeof(err)),
                     -ERANGE);
    assert_non_null(strstr(err, "clock"));

    assert_int_equal(keys_cert_common_name(got, &cn), 0);
    assert_string_equal(cn, "gw-0001");
    free(cn);

    /* A key file given as the certificate. */
    char key_path[PATH_MAX];
    tmp_path(key_path, sizeof(key_path), "leaf-key.pem");
    write_key(key_path, key, "pkcs8", NULL);
    X509 *none = NULL;
    assert_int_equal(keys_load_cert_chain(key_path, &none, NULL, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "swapped"));

    sk_X509_pop_free(chain, X509_free);
    X509_free(got);
    X509_free(leaf);
    X509_free(ca);
    EVP_PKEY_free(key);
    EVP_PKEY_free(other);
}

/* --- PKCS#11 with softhsm2 ------------------------------------------------ */

static bool softhsm_available(void)
{
    return access(SOFTHSM_MODULE, R_OK) == 0 && access("/usr/bin/softhsm2-util", X_OK) == 0 &&
           access("/usr/bin/pkcs11-tool", X_OK) == 0 &&
           access("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so", R_OK) == 0;
}

static void run_quiet(const char *cmd)
{
    char full[2048];
    snprintf(full, sizeof(full), "%s >'%s/cmd.log' 2>&1", cmd, tmp_dir);
    if (system(full) != 0) {
        char log[PATH_MAX], line[512] = "";
        tmp_path(log, sizeof(log), "cmd.log");
        FILE *f = fopen(log, "r");
        if (f != NULL) {
            size_t n = fread(line, 1, sizeof(line) - 1, f);
            line[n] = '\0';
            fclose(f);
        }
        fail_msg("command failed: %s\n%s", cmd, line);
    }
}

static void test_pkcs11_softhsm(void **state)
{
    char conf[PATH_MAX], tokens[PATH_MAX], pin_path[PATH_MAX], wrong_pin[PATH_MAX];
    char text[PATH_MAX + 128], cmd[1024], err[KEYS_ERR_SIZE];

    if (!softhsm_available()) {
        print_message("SKIPPED: softhsm2, opensc (pkcs11-tool) or libengine-pkcs11-openssl "
                      "is not installed; add them to the test dependencies: apt-get install "
                      "softhsm2 opensc libengine-pkcs11-openssl\n");
        skip();
    }
    tmp_path(tokens, sizeof(tokens), "tokens");
    assert_int_equal(mkdir(tokens, 0700), 0);
    tmp_path(conf, sizeof(conf), "softhsm2.conf");
    snprintf(text, sizeof(text),
             "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", tokens);
    write_text(conf, text);
    assert_int_equal(setenv("SOFTHSM2_CONF", conf, 1), 0);
    tmp_path(pin_path, sizeof(pin_path), "pin.txt");
    write_text(pin_path, "1234\n");
    tmp_path(wrong_pin, sizeof(wrong_pin), "wrong-pin.txt");
    write_text(wrong_pin, "9999\n");

    run_quiet("softhsm2-util --init-token --free --label uplinkd-test --pin 1234 --so-pin 5678");
    /* Keys generated inside the token: the private halves never exist
     * outside it. */
    snprintf(cmd, sizeof(cmd),
             "pkcs11-tool --module " SOFTHSM_MODULE " --token-label uplinkd-test --login --pin "
             "1234 --keypairgen --key-type EC:prime256v1 --label jwt-ec --id 01");
    run_quiet(cmd);
    snprintf(cmd, sizeof(cmd),
             "pkcs11-tool --module " SOFTHSM_MODULE " --token-label uplinkd-test --login --pin "
             "1234 --keypairgen --key-type rsa:2048 --label jwt-rsa --id 02");
    run_quiet(cmd);

    struct keys_options options = {.passphrase_file = pin_path, .pkcs11_module = SOFTHSM_MODULE};
    static const struct {
        const char *uri;
        enum jwt_alg alg;
    } cases[] = {
        {"pkcs11:token=uplinkd-test;object=jwt-ec;type=private", JWT_ALG_ES256},
        {"pkcs11:token=uplinkd-test;object=jwt-rsa;type=private", JWT_ALG_RS256},
        {"pkcs11:token=uplinkd-test;object=jwt-rsa;type=private", JWT_ALG_PS256},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        EVP_PKEY *key = NULL;
        struct jwt_signer *signer = NULL;
        struct jwt_claims claims = {.aud = "hsm-project", .skew_s = 60};
        struct token_parts parts;
        char *token = NULL;

        assert_true(keys_is_uri(cases[i].uri));
        if (keys_load_private(cases[i].uri, &options, &key, err, sizeof(err)) != 0)
            fail_msg("keys_load_private(%s): %s", cases[i].uri, err);
        if (jwt_signer_new(key, cases[i].alg, JWT_KID_FINGERPRINT, NULL, &signer, err,
                           sizeof(err)) != 0)
            fail_msg("jwt_signer_new(%s): %s", jwt_alg_name(cases[i].alg), err);
        for (int round = 0; round < 5; round++) {
            if (jwt_sign(signer, &claims, time(NULL), &token, NULL, err, sizeof(err)) != 0)
                fail_msg("jwt_sign with %s: %s", cases[i].uri, err);
            verify_token(token, key, cases[i].alg, &parts);
            assert_non_null(strstr(parts.header, jwt_signer_kid(signer)));
            token_parts_free(&parts);
            free(token);
            token = NULL;
        }
        jwt_signer_free(signer);
        EVP_PKEY_free(key);
    }

    /* No such object. */
    EVP_PKEY *key = NULL;
    assert_int_equal(keys_load_private("pkcs11:token=uplinkd-test;object=nope;type=private",
                                       &options, &key, err, sizeof(err)),
                     -ENOKEY);
    assert_non_null(strstr(err, "object=nope"));
    assert_null(key);
    /* A PIN in the URI never appears in a message. */
    struct keys_options no_pin = {.pkcs11_module = SOFTHSM_MODULE};
    assert_int_equal(
        keys_load_private("pkcs11:token=uplinkd-test;object=nope;type=private?pin-value=4321",
                          &no_pin, &key, err, sizeof(err)),
        -ENOKEY);
    assert_null(strstr(err, "4321"));
    assert_non_null(strstr(err, "?pin-value=***"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base64url),
        cmocka_unit_test(test_der_to_raw),
        cmocka_unit_test(test_sign_rs256),
        cmocka_unit_test(test_sign_ps256),
        cmocka_unit_test(test_sign_es256),
        cmocka_unit_test(test_sign_es384),
        cmocka_unit_test(test_claims),
        cmocka_unit_test(test_key_alg_mismatch),
        cmocka_unit_test_setup_teardown(test_kid_fingerprint, setup_tmp, teardown_tmp),
        cmocka_unit_test(test_clock),
        cmocka_unit_test(test_refresh),
        cmocka_unit_test_setup_teardown(test_keys_pem, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_certs, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_pkcs11_softhsm, setup_tmp, teardown_tmp),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
