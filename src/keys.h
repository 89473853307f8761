/* keys.h - private keys and X.509 certificates for TLS and JWT signing.
 *
 * A key is named by a "key spec": either a PEM file path (PKCS#8, SEC1
 * "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY", optionally encrypted) or an
 * RFC 7512 PKCS#11 URI ("pkcs11:token=gw;object=jwt-key;type=private").
 * PKCS#11 keys are used through the OpenSSL "pkcs11" engine of libp11
 * (Debian: libengine-pkcs11-openssl): the returned EVP_PKEY only refers to
 * the key, every signature is computed inside the token, and the private
 * key never enters this process.
 *
 * Every error is returned as a negative errno plus a sentence in @err that
 * names the file or URI, what is wrong and the likely fix; OpenSSL's own
 * error string is appended where it adds something.
 *
 * Threading: these functions may run on any thread (e.g. the libuv
 * threadpool); the PKCS#11 engine is set up once per process under a lock.
 */
#ifndef UPLINKD_KEYS_H
#define UPLINKD_KEYS_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/types.h>
#include <openssl/x509.h>

/* Size of an error buffer that always holds a whole keys_/jwt_ message. */
#define KEYS_ERR_SIZE 512

/* How to open a private key. Every pointer is borrowed and may be NULL. */
struct keys_options {
    /* File whose first line is the passphrase of an encrypted PEM key or,
     * for a pkcs11: URI, the token's user PIN. A trailing newline is not
     * part of it. For a URI, pin-value=PIN or pin-source=file:/PATH (read
     * the same way, first line) in the URI take precedence. */
    const char *passphrase_file;
    /* PKCS#11 module (.so) for pkcs11: URIs. NULL: the module this process
     * already uses for pkcs11: keys, else $PKCS11_MODULE_PATH, else libp11's
     * default, p11-kit-proxy, which reaches every module registered with
     * p11-kit (softhsm2 and opensc register themselves). */
    const char *pkcs11_module;
};

/**
 * keys_is_uri() - true when @spec names a key in a token ("pkcs11:...")
 * rather than a file.
 */
bool keys_is_uri(const char *spec);

/**
 * keys_load_private() - open the private key named by @spec.
 * @spec: PEM file path or pkcs11: URI (borrowed).
 * @options: may be NULL (no passphrase, default module).
 * @out: on success a new key the caller owns (EVP_PKEY_free()).
 * @err: on failure, a sentence in words (@err_size bytes, KEYS_ERR_SIZE is
 *       enough); may be NULL.
 *
 * Returns 0; -ENOENT/-EACCES/... when the file (or passphrase file) cannot be
 * read; -EINVAL when it holds no private key (a certificate, a public key,
 * not PEM); -EKEYREJECTED for a wrong passphrase; -ENOKEY when the key is
 * encrypted and no passphrase file is configured, or the token gives no such
 * key (libp11 does not tell a wrong PIN from a missing object: @err names
 * both); -ENOTSUP when the PKCS#11 engine is not installed; -ENOMEM.
 * A PIN from the URI never appears in @err. The engine keeps the last PIN
 * set for re-logins, so all pkcs11: keys of a process share one PIN.
 */
int keys_load_private(const char *spec, const struct keys_options *options, EVP_PKEY **out,
                      char *err, size_t err_size);

/**
 * keys_describe() - "RSA 2048", "EC P-256", "Ed25519"... for logs and
 * errors. Writes at most @size bytes to @buf and returns @buf.
 */
const char *keys_describe(const EVP_PKEY *key, char *buf, size_t size);

/**
 * keys_public_der_sha256() - the lowercase hex SHA-256 of the DER
 * SubjectPublicKeyInfo of @key (what `openssl pkey -pubout -outform DER |
 * sha256sum` prints; akenza and others use it as the JWT "kid").
 * @hex: receives 64 hex digits and a NUL.
 * Returns 0, -EINVAL (no public part) or -ENOMEM.
 */
int keys_public_der_sha256(const EVP_PKEY *key, char hex[65]);

/**
 * keys_public_pem() - the public half of @key as a PEM "PUBLIC KEY" block
 * (SubjectPublicKeyInfo), ready to paste into a cloud console.
 * @out: malloc'd NUL-terminated text the caller frees.
 * Returns 0, -EINVAL or -ENOMEM.
 */
int keys_public_pem(const EVP_PKEY *key, char **out);

/**
 * keys_load_cert_chain() - read a PEM file holding a certificate and,
 * optionally, the rest of its chain (intermediates, even the CA: Cumulocity
 * wants them all).
 * @leaf: the first certificate, owned by the caller (X509_free()).
 * @chain: the others in file order, owned by the caller
 *         (sk_X509_pop_free(chain, X509_free)); may be NULL when not wanted.
 * Returns 0, -ENOENT/-EACCES/..., -EINVAL (no certificate in the file) or
 * -ENOMEM, with @err in words.
 */
int keys_load_cert_chain(const char *path, X509 **leaf, STACK_OF(X509) * *chain, char *err,
                         size_t err_size);

/**
 * keys_check_cert_key() - check that @key is the private half of @cert's
 * public key (compares the public parts, so it works for token keys too).
 * @cert_name: file name for the message (borrowed).
 * Returns 0 or -EKEYREJECTED with @err in words.
 */
int keys_check_cert_key(const X509 *cert, const EVP_PKEY *key, const char *cert_name, char *err,
                        size_t err_size);

/**
 * keys_use_client_cert() - give @ctx a client certificate chain and its
 * private key, for TLS client authentication.
 * @ctx: the context to set up (borrowed; it takes its own references to the
 *       certificates and the key, so a token key lives as long as @ctx).
 * @cert_path: PEM file, the leaf first, then optionally its chain; the
 *             chain is sent as it is in the file (borrowed).
 * @key_spec: PEM key file or pkcs11: URI (borrowed).
 * @options: as for keys_load_private(); may be NULL.
 * Works the same for a PEM key and a token key (the handshake signature is
 * then made in the token), which libmosquitto's own key loading cannot.
 * Returns 0, or the negative errno of keys_load_cert_chain(),
 * keys_load_private() or keys_check_cert_key() (-EKEYREJECTED: not the
 * certificate's key), or -EINVAL when OpenSSL refuses the pair; @err in
 * words, naming the file or URI (never a PIN).
 */
int keys_use_client_cert(SSL_CTX *ctx, const char *cert_path, const char *key_spec,
                         const struct keys_options *options, char *err, size_t err_size);

/**
 * keys_pkcs11_available() - whether pkcs11: keys can be used at all: the
 * OpenSSL PKCS#11 engine can be found. Does not load a PKCS#11 module or
 * open a token (configuration checks call it before any key is loaded).
 * Returns 0, or -ENOTSUP with @err saying what to install.
 */
int keys_pkcs11_available(char *err, size_t err_size);

/**
 * keys_pkcs11_release() - let go of the PKCS#11 engine and its module (the
 * module's C_Finalize), for a one-shot program that is done with every
 * token key (uplinkctl): keys loaded through it must be freed first. The
 * daemon keeps it for its life.
 */
void keys_pkcs11_release(void);

/**
 * keys_check_cert_validity() - check notBefore <= @now <= notAfter.
 * Returns 0, -EKEYEXPIRED (expired: @err gives the date) or -ERANGE (not yet
 * valid: @err gives the date and suggests checking the clock).
 */
int keys_check_cert_validity(const X509 *cert, time_t now, const char *cert_name, char *err,
                             size_t err_size);

/**
 * keys_cert_common_name() - the (last) CN of @cert's subject.
 * @out: malloc'd UTF-8 string the caller frees.
 * Returns 0, -ENOENT (no CN), -EINVAL (a CN with an embedded NUL) or
 * -ENOMEM.
 */
int keys_cert_common_name(const X509 *cert, char **out);

/**
 * keys_openssl_reason() - the most recent OpenSSL error of this thread as
 * text in @buf (or "no OpenSSL error recorded"), then clears the queue so
 * the next operation starts clean. Returns @buf.
 */
const char *keys_openssl_reason(char *buf, size_t size);

#endif
