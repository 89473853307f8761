/* p11.h - what uplinkd asks of a PKCS#11 token directly, through p11-kit:
 * a key pair made inside it (`uplinkctl cert create --key pkcs11:...`), a
 * device secret imported into it (`uplinkctl secret import`), and an
 * HMAC-SHA256 computed by it (Azure SAS tokens with azure.key_file a
 * pkcs11: URI). Keys never leave the token. Private keys for TLS and JWT
 * signatures go through the PKCS#11 engine instead (keys.h).
 *
 * A URI (RFC 7512) names the token (token= or another token attribute) and
 * the object (object= and/or id=); the user PIN comes from a PIN file, or
 * the URI's pin-source=file:PATH or pin-value=.
 *
 * Threading: any thread, one struct p11 per thread at a time.
 */
#ifndef UPLINKD_P11_H
#define UPLINKD_P11_H

#include <stddef.h>
#include <stdint.h>

struct p11;

/**
 * p11_open() - a logged-in read-write session on the token @uri names.
 * @module: the PKCS#11 module (.so), or NULL for every module registered
 *          with p11-kit (softhsm2 and opensc register themselves).
 * @pin_file: file whose first line is the user PIN, or NULL (the URI's).
 * @err: a sentence in words on failure (@err_size bytes).
 * Returns 0 (*@out set; p11_close() it), -EINVAL (not a usable URI),
 * -ENOENT (no such token or module), -EACCES (PIN refused or unreadable),
 * -EIO, -ENOMEM.
 */
int p11_open(const char *uri, const char *module, const char *pin_file, struct p11 **out, char *err,
             size_t err_size);

/** p11_close() - log out, close the session, unload the modules. NULL is allowed. */
void p11_close(struct p11 *p);

/** p11_module_file() - the file of the module that holds the token. */
const char *p11_module_file(const struct p11 *p);

/**
 * p11_ensure_ec_key() - make sure the token holds the URI's private key;
 * generate an EC P-256 pair inside it when it has none (sensitive, never
 * extractable, the public half stored beside it).
 * Returns 1 (generated now), 0 (there already: used as it is), -ENOTSUP
 * (the token cannot make EC P-256 keys), -EIO.
 */
int p11_ensure_ec_key(struct p11 *p, char *err, size_t err_size);

/**
 * p11_import_secret() - store @key (@len bytes) in the token as the URI's
 * generic secret key for HMAC signing (sensitive, never extractable).
 * Returns 0, -EEXIST (the token holds one with that label/id), -EIO.
 */
int p11_import_secret(struct p11 *p, const uint8_t *key, size_t len, char *err, size_t err_size);

/**
 * p11_hmac_sha256() - HMAC-SHA256 of @data with the URI's secret key,
 * computed by the token (CKM_SHA256_HMAC), into @out.
 * Returns 32, -ENOKEY (no such secret key), -EIO.
 */
int p11_hmac_sha256(struct p11 *p, const void *data, size_t len, uint8_t out[32], char *err,
                    size_t err_size);

#endif
