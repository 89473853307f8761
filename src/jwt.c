/* jwt.c - JWS compact tokens signed with RSA or ECDSA (see jwt.h). */
#include "jwt.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timex.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>

#include "config.h"
#include "json.h"
#include "keys.h"
#include "util.h"

#ifndef UPLINKD_BUILD_EPOCH
#error "config.h must define UPLINKD_BUILD_EPOCH (meson.build)"
#endif

/* RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used". */
#define RSA_MIN_BITS 2048

struct jwt_signer {
    EVP_PKEY *key; /* own reference */
    enum jwt_alg alg;
    char *kid; /* NULL: no kid */
};

static const char *const alg_names[] = {
    [JWT_ALG_RS256] = "RS256",
    [JWT_ALG_PS256] = "PS256",
    [JWT_ALG_ES256] = "ES256",
    [JWT_ALG_ES384] = "ES384",
};

int jwt_alg_parse(const char *name, enum jwt_alg *out)
{
    for (size_t i = 0; i < sizeof(alg_names) / sizeof(alg_names[0]); i++) {
        if (name != NULL && strcmp(name, alg_names[i]) == 0) {
            *out = (enum jwt_alg)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *jwt_alg_name(enum jwt_alg alg)
{
    if ((size_t)alg >= sizeof(alg_names) / sizeof(alg_names[0]))
        return "unknown";
    return alg_names[alg];
}

static bool alg_is_ecdsa(enum jwt_alg alg)
{
    return alg == JWT_ALG_ES256 || alg == JWT_ALG_ES384;
}

static const EVP_MD *alg_digest(enum jwt_alg alg)
{
    return alg == JWT_ALG_ES384 ? EVP_sha384() : EVP_sha256();
}

/* Bytes of R (and of S) in a raw ECDSA signature, RFC 7518 §3.4. */
static size_t alg_ecdsa_half(enum jwt_alg alg)
{
    return alg == JWT_ALG_ES384 ? 48 : 32;
}

/* --- base64url ----------------------------------------------------------- */

static const char b64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int jwt_base64url_encode(const void *data, size_t len, char **out)
{
    const unsigned char *in = data;
    /* 4 characters per 3 bytes, rounded up, no padding (RFC 7515 §2). */
    size_t cap = len / 3 * 4 + (len % 3 ? len % 3 + 1 : 0) + 1;
    char *text = malloc(cap);
    size_t pos = 0, i = 0;

    if (text == NULL)
        return -ENOMEM;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        text[pos++] = b64url_alphabet[v >> 18 & 63];
        text[pos++] = b64url_alphabet[v >> 12 & 63];
        text[pos++] = b64url_alphabet[v >> 6 & 63];
        text[pos++] = b64url_alphabet[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        text[pos++] = b64url_alphabet[v >> 18 & 63];
        text[pos++] = b64url_alphabet[v >> 12 & 63];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        text[pos++] = b64url_alphabet[v >> 18 & 63];
        text[pos++] = b64url_alphabet[v >> 12 & 63];
        text[pos++] = b64url_alphabet[v >> 6 & 63];
    }
    text[pos] = '\0';
    *out = text;
    return 0;
}

static int b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

int jwt_base64url_decode(const char *text, size_t text_len, unsigned char **out, size_t *out_len)
{
    /* A lone trailing character carries 6 bits: never a whole byte. */
    if (text_len % 4 == 1)
        return -EINVAL;
    size_t cap = text_len / 4 * 3 + (text_len % 4 ? text_len % 4 - 1 : 0);
    unsigned char *bytes = malloc(cap + 1);
    uint32_t acc = 0;
    unsigned bits = 0;
    size_t pos = 0;

    if (bytes == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < text_len; i++) {
        int v = b64url_value(text[i]);
        if (v < 0)
            goto err_invalid;
        acc = (acc << 6 | (uint32_t)v) & 0xffffff;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            bytes[pos++] = (unsigned char)(acc >> bits);
        }
    }
    /* The leftover bits of the last character must be zero, else two
     * different texts would decode to the same bytes (RFC 4648 §3.5). */
    if ((acc & ((1u << bits) - 1)) != 0)
        goto err_invalid;
    bytes[pos] = '\0';
    *out = bytes;
    *out_len = pos;
    return 0;

err_invalid:
    free(bytes);
    return -EINVAL;
}

/* --- ECDSA: DER -> R||S -------------------------------------------------- */

int jwt_ecdsa_der_to_raw(const unsigned char *der, size_t der_len, size_t half, unsigned char *raw)
{
    const unsigned char *pos = der;
    const BIGNUM *r, *s;
    ECDSA_SIG *sig;
    int rc = -EINVAL;

    if (der_len > LONG_MAX)
        return -EINVAL;
    sig = d2i_ECDSA_SIG(NULL, &pos, (long)der_len);
    if (sig == NULL) {
        ERR_clear_error();
        return -EINVAL;
    }
    if (pos != der + der_len)
        goto out;
    ECDSA_SIG_get0(sig, &r, &s);
    if (BN_is_negative(r) || BN_is_negative(s) || BN_is_zero(r) || BN_is_zero(s))
        goto out;
    if ((size_t)BN_num_bytes(r) > half || (size_t)BN_num_bytes(s) > half)
        goto out;
    /* DER drops leading zero bytes (and adds one before a high bit); JWS
     * wants each integer as exactly half big-endian bytes, RFC 7518 §3.4. */
    if (BN_bn2binpad(r, raw, (int)half) != (int)half ||
        BN_bn2binpad(s, raw + half, (int)half) != (int)half)
        goto out;
    rc = 0;
out:
    ECDSA_SIG_free(sig);
    return rc;
}

/* --- Signer -------------------------------------------------------------- */

/* Checks that @key can make @alg signatures; says why not in @err. */
static int check_key_for_alg(EVP_PKEY *key, enum jwt_alg alg, char *err, size_t err_size)
{
    char desc[64];
    int base_id = EVP_PKEY_get_base_id(key);
    int bits = EVP_PKEY_get_bits(key);

    keys_describe(key, desc, sizeof(desc));
    if (!alg_is_ecdsa(alg)) {
        if (base_id != EVP_PKEY_RSA && !(alg == JWT_ALG_PS256 && base_id == EVP_PKEY_RSA_PSS)) {
            util_set_err(err, err_size,
                         "alg %s needs an RSA key, but the key is %s; use alg %s or an RSA key",
                         jwt_alg_name(alg), desc,
                         base_id == EVP_PKEY_EC ? (bits > 256 ? "ES384" : "ES256") : "ES256");
            return -EINVAL;
        }
        if (bits < RSA_MIN_BITS) {
            util_set_err(err, err_size,
                         "alg %s: the RSA key has %d bits; at least %d are required (RFC 7518 "
                         "§3.3) and clouds refuse smaller keys: make a new one, e.g. uplinkctl "
                         "keygen --type rsa",
                         jwt_alg_name(alg), bits, RSA_MIN_BITS);
            return -EINVAL;
        }
        return 0;
    }

    const char *want_group = alg == JWT_ALG_ES256 ? "prime256v1" : "secp384r1";
    const char *want_nist = alg == JWT_ALG_ES256 ? "P-256" : "P-384";
    char group[64];
    size_t group_len = 0;

    if (base_id != EVP_PKEY_EC) {
        util_set_err(err, err_size, "alg %s needs an EC %s key, but the key is %s",
                     jwt_alg_name(alg), want_nist, desc);
        return -EINVAL;
    }
    if (EVP_PKEY_get_group_name(key, group, sizeof(group), &group_len) == 1) {
        if (strcmp(group, want_group) != 0) {
            util_set_err(
                err, err_size,
                "alg %s needs a key on curve %s, but the key is %s; ES256 goes with P-256, "
                "ES384 with P-384",
                jwt_alg_name(alg), want_nist, desc);
            return -EINVAL;
        }
        return 0;
    }
    /* Some token (engine) keys do not say their group; the size still
     * tells P-256 from P-384. */
    ERR_clear_error();
    if ((size_t)bits != alg_ecdsa_half(alg) * 8) {
        util_set_err(err, err_size, "alg %s needs a key on curve %s, but the key is %s",
                     jwt_alg_name(alg), want_nist, desc);
        return -EINVAL;
    }
    return 0;
}

int jwt_signer_new(EVP_PKEY *key, enum jwt_alg alg, enum jwt_kid_mode kid_mode, const char *kid,
                   struct jwt_signer **out, char *err, size_t err_size)
{
    struct jwt_signer *signer;
    char fingerprint[65];
    int rc;

    if ((size_t)alg >= sizeof(alg_names) / sizeof(alg_names[0])) {
        util_set_err(err, err_size, "unknown JWT algorithm %d", (int)alg);
        return -EINVAL;
    }
    rc = check_key_for_alg(key, alg, err, err_size);
    if (rc < 0)
        return rc;
    signer = calloc(1, sizeof(*signer));
    if (signer == NULL)
        goto err_nomem;
    signer->alg = alg;
    switch (kid_mode) {
    case JWT_KID_NONE:
        break;
    case JWT_KID_VALUE:
        if (kid == NULL || kid[0] == '\0') {
            util_set_err(err, err_size, "kid is empty; leave it out or give a value");
            rc = -EINVAL;
            goto err_after_alloc;
        }
        signer->kid = strdup(kid);
        if (signer->kid == NULL)
            goto err_nomem_after_alloc;
        break;
    case JWT_KID_FINGERPRINT:
        rc = keys_public_der_sha256(key, fingerprint);
        if (rc < 0) {
            util_set_err(err, err_size, "cannot compute the key fingerprint for kid (%s)",
                         strerror(-rc));
            goto err_after_alloc;
        }
        signer->kid = strdup(fingerprint);
        if (signer->kid == NULL)
            goto err_nomem_after_alloc;
        break;
    }
    if (EVP_PKEY_up_ref(key) != 1)
        goto err_nomem_after_alloc;
    signer->key = key;
    *out = signer;
    return 0;

err_nomem_after_alloc:
    rc = -ENOMEM;
    util_set_err(err, err_size, "out of memory");
err_after_alloc:
    free(signer->kid);
    free(signer);
    return rc;
err_nomem:
    util_set_err(err, err_size, "out of memory");
    return -ENOMEM;
}

void jwt_signer_free(struct jwt_signer *signer)
{
    if (signer == NULL)
        return;
    EVP_PKEY_free(signer->key);
    free(signer->kid);
    free(signer);
}

const char *jwt_signer_kid(const struct jwt_signer *signer)
{
    return signer->kid;
}

enum jwt_alg jwt_signer_alg(const struct jwt_signer *signer)
{
    return signer->alg;
}

/* --- Signing ------------------------------------------------------------- */

static int check_extra_claims(const struct jwt_claims *claims, char *err, size_t err_size)
{
    static const char *const reserved[] = {"iat", "exp", "aud"};

    for (size_t i = 0; i < claims->extra_count; i++) {
        const struct jwt_claim *claim = &claims->extra[i];
        if (claim->name == NULL || claim->name[0] == '\0' || claim->value == NULL) {
            util_set_err(err, err_size, "extra claim %zu has no name or no value", i + 1);
            return -EINVAL;
        }
        for (size_t r = 0; r < sizeof(reserved) / sizeof(reserved[0]); r++) {
            if (strcmp(claim->name, reserved[r]) == 0) {
                util_set_err(err, err_size,
                             "extra claim \"%s\" is set by uplinkd itself; remove it from claims "
                             "(use aud/lifetime instead)",
                             claim->name);
                return -EINVAL;
            }
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(claims->extra[j].name, claim->name) == 0) {
                util_set_err(err, err_size, "extra claim \"%s\" is given twice", claim->name);
                return -EINVAL;
            }
        }
    }
    return 0;
}

/* Signs @input with the signer's key; the result is in JWS form (raw R||S
 * for ECDSA). */
static int sign_input(const struct jwt_signer *signer, const char *input, size_t input_len,
                      unsigned char **sig_out, size_t *sig_len_out, char *err, size_t err_size)
{
    char reason[256];
    EVP_MD_CTX *md_ctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pkey_ctx = NULL;
    unsigned char *der = NULL;
    unsigned char *raw = NULL;
    size_t der_len = 0;
    int rc = -EIO;

    if (md_ctx == NULL) {
        util_set_err(err, err_size, "out of memory");
        return -ENOMEM;
    }
    ERR_clear_error();
    if (EVP_DigestSignInit(md_ctx, &pkey_ctx, alg_digest(signer->alg), NULL, signer->key) != 1)
        goto err_openssl;
    /* RFC 7518 §3.5: PSS with MGF1 on SHA-256 and a salt as long as the hash. */
    if (signer->alg == JWT_ALG_PS256 &&
        (EVP_PKEY_CTX_set_rsa_padding(pkey_ctx, RSA_PKCS1_PSS_PADDING) != 1 ||
         EVP_PKEY_CTX_set_rsa_pss_saltlen(pkey_ctx, RSA_PSS_SALTLEN_DIGEST) != 1 ||
         EVP_PKEY_CTX_set_rsa_mgf1_md(pkey_ctx, EVP_sha256()) != 1))
        goto err_openssl;
    if (EVP_DigestSign(md_ctx, NULL, &der_len, (const unsigned char *)input, input_len) != 1)
        goto err_openssl;
    der = malloc(der_len);
    if (der == NULL) {
        rc = -ENOMEM;
        util_set_err(err, err_size, "out of memory");
        goto out;
    }
    if (EVP_DigestSign(md_ctx, der, &der_len, (const unsigned char *)input, input_len) != 1)
        goto err_openssl;

    if (!alg_is_ecdsa(signer->alg)) {
        *sig_out = der;
        *sig_len_out = der_len;
        der = NULL;
        rc = 0;
        goto out;
    }
    size_t half = alg_ecdsa_half(signer->alg);
    raw = malloc(2 * half);
    if (raw == NULL) {
        rc = -ENOMEM;
        util_set_err(err, err_size, "out of memory");
        goto out;
    }
    if (jwt_ecdsa_der_to_raw(der, der_len, half, raw) < 0) {
        util_set_err(err, err_size, "the key returned an ECDSA signature that is not valid DER");
        free(raw);
        goto out;
    }
    *sig_out = raw;
    *sig_len_out = 2 * half;
    rc = 0;
    goto out;

err_openssl:
    util_set_err(err, err_size, "signing with the %s key failed: %s", jwt_alg_name(signer->alg),
                 keys_openssl_reason(reason, sizeof(reason)));
out:
    free(der);
    EVP_MD_CTX_free(md_ctx);
    return rc;
}

/* Appends "." and the base64url of @data to @token (a json_buf used as a
 * plain string builder). */
static int append_b64(struct json_buf *token, const void *data, size_t len, bool dot)
{
    char *text = NULL;

    if (jwt_base64url_encode(data, len, &text) < 0)
        return -ENOMEM;
    if (dot)
        json_append_raw(token, ".");
    json_append_raw(token, text);
    free(text);
    return token->failed ? -ENOMEM : 0;
}

int jwt_sign(const struct jwt_signer *signer, const struct jwt_claims *claims, time_t now,
             char **token_out, time_t *expires_at_out, char *err, size_t err_size)
{
    struct json_buf header, body, token;
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    int rc;

    rc = jwt_clock_check(now, false, NULL, err, err_size);
    if (rc < 0)
        return rc;
    uint32_t lifetime = claims->lifetime_s ? claims->lifetime_s : JWT_DEFAULT_LIFETIME_S;
    if (claims->max_lifetime_s != 0 && lifetime > claims->max_lifetime_s) {
        util_set_err(err, err_size,
                     "token lifetime %" PRIu32 " s is longer than the %" PRIu32
                     " s this cloud accepts; lower lifetime",
                     lifetime, claims->max_lifetime_s);
        return -ERANGE;
    }
    rc = check_extra_claims(claims, err, err_size);
    if (rc < 0)
        return rc;

    /* Back-dating iat lets a server whose clock is a little behind ours
     * accept the token; the cap applies to exp - iat, so exp gives way. */
    time_t issued_at = now - (time_t)claims->skew_s;
    time_t expires_at = now + (time_t)lifetime;
    if (claims->max_lifetime_s != 0 && expires_at - issued_at > (time_t)claims->max_lifetime_s)
        expires_at = issued_at + (time_t)claims->max_lifetime_s;
    if (expires_at <= now) {
        util_set_err(err, err_size,
                     "a skew of %" PRIu32 " s leaves no validity under the %" PRIu32
                     " s limit; lower skew",
                     claims->skew_s, claims->max_lifetime_s);
        return -ERANGE;
    }

    json_buf_init(&header);
    json_buf_init(&body);
    json_buf_init(&token);

    /* RFC 7515 §4.1: alg, typ and kid header parameters. */
    json_append_raw(&header, "{\"alg\":");
    json_append_string(&header, jwt_alg_name(signer->alg));
    json_append_raw(&header, ",\"typ\":\"JWT\"");
    if (signer->kid != NULL) {
        json_append_raw(&header, ",\"kid\":");
        json_append_string(&header, signer->kid);
    }
    json_append_raw(&header, "}");

    /* RFC 7519 §4.1: NumericDate values are seconds since the epoch. */
    json_append_fmt(&body, "{\"iat\":%lld,\"exp\":%lld", (long long)issued_at,
                    (long long)expires_at);
    if (claims->aud != NULL) {
        json_append_raw(&body, ",\"aud\":");
        json_append_string(&body, claims->aud);
    }
    for (size_t i = 0; i < claims->extra_count; i++) {
        json_append_raw(&body, ",");
        json_append_string(&body, claims->extra[i].name);
        json_append_raw(&body, ":");
        json_append_string(&body, claims->extra[i].value);
    }
    json_append_raw(&body, "}");
    if (header.failed || body.failed)
        goto err_nomem;

    /* RFC 7515 §5.1: the signing input is ASCII(b64(header) "." b64(claims)). */
    if (append_b64(&token, header.data, header.len, false) < 0 ||
        append_b64(&token, body.data, body.len, true) < 0)
        goto err_nomem;
    rc = sign_input(signer, token.data, token.len, &sig, &sig_len, err, err_size);
    if (rc < 0)
        goto out;
    if (append_b64(&token, sig, sig_len, true) < 0)
        goto err_nomem;

    *token_out = token.data;
    token.data = NULL; /* ownership passes to the caller */
    if (expires_at_out != NULL)
        *expires_at_out = expires_at;
    rc = 0;
    goto out;

err_nomem:
    rc = -ENOMEM;
    util_set_err(err, err_size, "out of memory");
out:
    free(sig);
    json_buf_deinit(&token);
    json_buf_deinit(&body);
    json_buf_deinit(&header);
    return rc;
}

/* --- Clock --------------------------------------------------------------- */

time_t jwt_build_epoch(void)
{
    /* The day, not the second: a build host whose clock ran a few hours
     * ahead must not make a correct device clock look wrong. */
    return (time_t)UPLINKD_BUILD_EPOCH / 86400 * 86400;
}

static const char *format_utc(time_t t, char *buf, size_t size)
{
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(buf, size, "%lld", (long long)t);
    return buf;
}

int jwt_clock_check(time_t now, bool require_sync, enum jwt_clock_state *state_out, char *err,
                    size_t err_size)
{
    char now_text[64], build_text[64];
    enum jwt_clock_state state = JWT_CLOCK_OK;
    int rc = 0;

    if (now < jwt_build_epoch()) {
        state = JWT_CLOCK_BEFORE_BUILD;
        rc = JWT_ECLOCK;
        util_set_err(
            err, err_size,
            "the system clock says %s, before this uplinkd was built (%s): it has not "
            "been set yet, and the cloud would reject a token signed now; set the clock or "
            "wait for time synchronisation (timedatectl)",
            format_utc(now, now_text, sizeof(now_text)),
            format_utc(jwt_build_epoch(), build_text, sizeof(build_text)));
    } else if (require_sync) {
        struct timex tx = {.modes = 0};
        int status = adjtimex(&tx);
        if (status < 0) {
            state = JWT_CLOCK_UNSYNCED;
            rc = JWT_ECLOCK;
            util_set_err(err, err_size,
                         "cannot ask the kernel whether the clock is synchronised (adjtimex: %s); "
                         "turn the sync requirement off if this system cannot tell",
                         strerror(errno));
        } else if (status == TIME_ERROR || (tx.status & STA_UNSYNC)) {
            state = JWT_CLOCK_UNSYNCED;
            rc = JWT_ECLOCK;
            util_set_err(
                err, err_size,
                "the kernel reports the clock as not synchronised (adjtimex STA_UNSYNC), so "
                "a token's iat/exp may be wrong; wait for NTP (timedatectl show -p "
                "NTPSynchronized), or turn the sync requirement off on gateways without "
                "time sync");
        }
    }
    if (state_out != NULL)
        *state_out = state;
    return rc;
}

const char *jwt_clock_state_name(enum jwt_clock_state state)
{
    switch (state) {
    case JWT_CLOCK_OK:
        return "ok";
    case JWT_CLOCK_BEFORE_BUILD:
        return "before-build-date";
    case JWT_CLOCK_UNSYNCED:
        return "unsynchronised";
    }
    return "unknown";
}

/* --- Rotation ------------------------------------------------------------ */

time_t jwt_refresh_at(time_t signed_at, time_t expires_at, const struct jwt_refresh *policy)
{
    uint32_t percent = policy && policy->percent ? policy->percent : JWT_DEFAULT_REFRESH_PCT;
    uint32_t margin = policy ? policy->margin_s : 0;

    if (percent > 100)
        percent = 100;
    if (expires_at <= signed_at)
        return signed_at;
    time_t life = expires_at - signed_at;
    time_t at = signed_at + life / 100 * (time_t)percent + life % 100 * (time_t)percent / 100;
    if (margin != 0 && at > expires_at - (time_t)margin)
        at = expires_at - (time_t)margin;
    return at < signed_at ? signed_at : at;
}

int jwt_alg_for_key(const EVP_PKEY *key, enum jwt_alg *out)
{
    switch (EVP_PKEY_get_base_id(key)) {
    case EVP_PKEY_RSA:
        *out = JWT_ALG_RS256;
        return 0;
    case EVP_PKEY_EC:
        *out = EVP_PKEY_get_bits(key) > 256 ? JWT_ALG_ES384 : JWT_ALG_ES256;
        return 0;
    default:
        return -EINVAL;
    }
}
