/* jwt.h - JSON Web Tokens used as MQTT passwords (GCP/ClearBlade IoT Core,
 * akenza).
 *
 * RFC 7519 (JWT) in the JWS compact serialisation of RFC 7515 §7.1:
 *   base64url(header) "." base64url(claims) "." base64url(signature)
 * with base64url always unpadded (RFC 7515 §2). Algorithms (RFC 7518 §3):
 * RS256 (RSASSA-PKCS1-v1_5), PS256 (RSASSA-PSS, salt = 32 bytes), ES256 (P-256)
 * and ES384 (P-384) with the signature as the raw fixed-width R||S, never
 * OpenSSL's DER.
 *
 * Use by an uplink:
 *   1. at configuration time: keys_load_private() + jwt_signer_new();
 *   2. before each CONNECT: jwt_clock_check(), then jwt_sign() with
 *      time(NULL); the token is the MQTT password;
 *   3. arm a (monotonic) timer for jwt_refresh_at() - now seconds; when it
 *      fires, drain, disconnect, sign anew and reconnect.
 *
 * Threading: a signer is immutable after jwt_signer_new(); jwt_sign() may run
 * on any thread (e.g. the libuv threadpool) but not concurrently on the same
 * signer (a PKCS#11 token session is not shared safely).
 */
#ifndef UPLINKD_JWT_H
#define UPLINKD_JWT_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <openssl/evp.h>

/* Returned by jwt_sign() and jwt_clock_check() when the clock cannot be
 * trusted; the caller logs the message, waits and checks again. Distinct
 * from every error of a bad key or configuration. */
#define JWT_ECLOCK (-ETIME)

/* Defaults (see the config keys in docs): */
#define JWT_DEFAULT_LIFETIME_S  3600u         /* auth.lifetime: 60m */
#define JWT_DEFAULT_SKEW_S      60u           /* auth.skew: iat back-dated by this */
#define JWT_DEFAULT_REFRESH_PCT 80u           /* auth.refresh: at 80% of the lifetime */
#define JWT_GCP_MAX_LIFETIME_S  (24u * 3600u) /* GCP IoT Core: exp - iat <= 24 h */

enum jwt_alg {
    JWT_ALG_RS256,
    JWT_ALG_PS256,
    JWT_ALG_ES256,
    JWT_ALG_ES384,
};

/**
 * jwt_alg_parse() - "RS256", "PS256", "ES256" or "ES384" (exact case, as in
 * the JWS "alg" header) to @out. Returns 0 or -EINVAL.
 */
int jwt_alg_parse(const char *name, enum jwt_alg *out);

/** jwt_alg_name() - the JWS "alg" value of @alg. */
const char *jwt_alg_name(enum jwt_alg alg);

/* Where the header's "kid" comes from. */
enum jwt_kid_mode {
    JWT_KID_NONE,        /* no kid in the header (GCP) */
    JWT_KID_VALUE,       /* the configured string */
    JWT_KID_FINGERPRINT, /* lowercase hex SHA-256 of the public key's DER SPKI (akenza) */
};

struct jwt_signer;

/**
 * jwt_signer_new() - a signer for @alg with @key.
 * @key: borrowed; the signer takes its own reference (EVP_PKEY_up_ref), so
 *       the caller may free its own.
 * @kid_mode, @kid: @kid (borrowed, copied) is used only with JWT_KID_VALUE.
 * @err: the reason in words on failure (KEYS_ERR_SIZE is enough); may be NULL.
 *
 * Checks that the key fits the algorithm: RS256/PS256 need RSA of at least
 * 2048 bits (RFC 7518 §3.3), ES256 a P-256 key, ES384 a P-384 key.
 * Returns 0, -EINVAL (key and alg do not fit, RSA too small, empty kid) or
 * -ENOMEM.
 */
int jwt_signer_new(EVP_PKEY *key, enum jwt_alg alg, enum jwt_kid_mode kid_mode, const char *kid,
                   struct jwt_signer **out, char *err, size_t err_size);

/** jwt_signer_free() - NULL is allowed. */
void jwt_signer_free(struct jwt_signer *signer);

/** jwt_signer_kid() - the kid the header carries, or NULL (borrowed). */
const char *jwt_signer_kid(const struct jwt_signer *signer);

/** jwt_signer_alg() - the signer's algorithm. */
enum jwt_alg jwt_signer_alg(const struct jwt_signer *signer);

/* One extra string claim ("sub", ...). Both borrowed. */
struct jwt_claim {
    const char *name;
    const char *value;
};

/* What goes into the claims set. Everything is borrowed. */
struct jwt_claims {
    const char *aud;               /* "aud"; NULL omits it (GCP: the project id) */
    uint32_t lifetime_s;           /* exp = now + lifetime; 0: JWT_DEFAULT_LIFETIME_S */
    uint32_t max_lifetime_s;       /* the profile's cap on exp - iat; 0: no cap */
    uint32_t skew_s;               /* iat = now - skew_s (server clocks run behind) */
    const struct jwt_claim *extra; /* more string claims; not iat, exp or aud */
    size_t extra_count;
};

/**
 * jwt_sign() - make a token.
 * @now: the wall-clock time to sign at (time(NULL); tests pass others).
 * @token_out: the compact token, malloc'd, NUL-terminated; the caller frees.
 * @expires_at_out: the token's "exp"; may be NULL.
 * @err: the reason in words on failure; may be NULL.
 *
 * iat = now - skew_s; exp = now + lifetime_s, brought down to iat +
 * max_lifetime_s when the skew would push exp - iat over the cap.
 * Returns 0; JWT_ECLOCK when @now is before the build date (the clock was
 * reset; nothing signed then would be accepted); -ERANGE when lifetime_s is
 * larger than max_lifetime_s or does not leave room for a positive exp;
 * -EINVAL for an extra claim that is empty, duplicated or names iat/exp/aud;
 * -EIO when the key cannot sign (token removed, ...) with OpenSSL's reason;
 * -ENOMEM.
 */
int jwt_sign(const struct jwt_signer *signer, const struct jwt_claims *claims, time_t now,
             char **token_out, time_t *expires_at_out, char *err, size_t err_size);

/* Why the clock is not trusted (for `uplinkctl status`). */
enum jwt_clock_state {
    JWT_CLOCK_OK,
    JWT_CLOCK_BEFORE_BUILD, /* earlier than the day this program was built */
    JWT_CLOCK_UNSYNCED,     /* the kernel says STA_UNSYNC (no NTP sync yet) */
};

/**
 * jwt_build_epoch() - the start (00:00 UTC) of the day this program was
 * built (SOURCE_DATE_EPOCH when set at configure time); no real clock can be
 * earlier.
 */
time_t jwt_build_epoch(void);

/**
 * jwt_clock_check() - decide whether the system clock can be used to sign.
 * @now: time(NULL).
 * @require_sync: also require the kernel's NTP-synchronised state
 *                (adjtimex(2) without STA_UNSYNC). A gateway without any
 *                time sync daemon never gets there: make it configurable.
 * @state_out: may be NULL.
 * Returns 0 or JWT_ECLOCK with @err saying what is wrong and what to do.
 */
int jwt_clock_check(time_t now, bool require_sync, enum jwt_clock_state *state_out, char *err,
                    size_t err_size);

/** jwt_clock_state_name() - "ok", "before-build-date" or "unsynchronised". */
const char *jwt_clock_state_name(enum jwt_clock_state state);

/* When to sign the next token. */
struct jwt_refresh {
    uint32_t percent;  /* at this % of the token's life (iat..exp seen from now); 0: 80 */
    uint32_t margin_s; /* and at the latest this long before exp; 0: no such bound */
};

/**
 * jwt_refresh_at() - the wall-clock time at which to replace a token signed
 * at @signed_at (the @now given to jwt_sign(), not iat) that expires at
 * @expires_at: signed_at + percent% of (expires_at - signed_at), or earlier
 * when margin_s requires, never before @signed_at. @policy may be NULL.
 * Arm a monotonic timer for the difference to now: a wall-clock step must
 * not make the token outlive its exp.
 */
time_t jwt_refresh_at(time_t signed_at, time_t expires_at, const struct jwt_refresh *policy);

/**
 * jwt_base64url_encode() - RFC 4648 §5 base64url without '=' padding
 * (RFC 7515 §2).
 * @out: malloc'd NUL-terminated text the caller frees.
 * Returns 0 or -ENOMEM.
 */
int jwt_base64url_encode(const void *data, size_t len, char **out);

/**
 * jwt_base64url_decode() - the inverse, strict: '=' padding, characters
 * outside the base64url alphabet, a length of 1 mod 4 and non-zero unused
 * bits are refused (-EINVAL).
 * @out: malloc'd bytes (plus a NUL for convenience) the caller frees;
 * @out_len: their number.
 * Returns 0, -EINVAL or -ENOMEM.
 */
int jwt_base64url_decode(const char *text, size_t text_len, unsigned char **out, size_t *out_len);

/**
 * jwt_ecdsa_der_to_raw() - an ECDSA signature from OpenSSL (DER
 * ECDSA-Sig-Value, RFC 3279 §2.2.3) as R||S, each left-padded with zero bytes
 * to @half bytes (32 for ES256, 48 for ES384; RFC 7518 §3.4).
 * @raw: receives 2 * @half bytes.
 * Returns 0 or -EINVAL (not DER, trailing bytes, R or S wider than @half).
 */
int jwt_ecdsa_der_to_raw(const unsigned char *der, size_t der_len, size_t half, unsigned char *raw);

/**
 * jwt_alg_for_key() - the algorithm a key is normally used with, for when
 * auth.alg (or uplinkctl jwt --alg) is left out: RS256 for RSA, ES256 for
 * P-256 and ES384 for larger EC keys. Returns 0 or -EINVAL (another key type).
 */
int jwt_alg_for_key(const EVP_PKEY *key, enum jwt_alg *out);

#endif
