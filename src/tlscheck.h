/* tlscheck.h - start-up checks of an uplink's client certificate.
 *
 * A gateway whose certificate expired or whose key belongs to another
 * certificate would otherwise only see "handshake failure" or CONNACK 5 from
 * the cloud, reconnecting forever. These checks run at start-up (and in
 * `uplinkd --check-config`, and `uplinkctl diagnose`) and turn each such
 * mistake into one error that names the file and says what to do. A reload
 * (SIGHUP) runs them on the uplink sections it changes before applying any.
 *
 * The certificate file may hold the whole chain: the device certificate
 * first, then intermediates, even the root CA (Cumulocity wants them all).
 *
 * tlscheck_client_cert() and tlscheck_cert_cn() are pure apart from reading
 * the files (no logging), so both the daemon and uplinkctl can word the
 * result their own way; tlscheck_uplink() and tlscheck_conf() log, for the
 * daemon.
 */
#ifndef UPLINKD_TLSCHECK_H
#define UPLINKD_TLSCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/x509.h>

#include "keys.h"

struct conf;
struct conf_uplink;

/* A certificate that expires within this many days draws a warning: at
 * load, and from a running uplink once a day in the log and in status. */
#define TLSCHECK_WARN_DAYS 30u

/* Size of a buffer that holds any tlscheck message. */
#define TLSCHECK_MSG_SIZE 768

/* What to check beyond "key matches, certificate valid now". */
struct tlscheck_options {
    /* When non-NULL, the leaf's subject CN must equal it (profiles whose
     * cloud binds the client id to the certificate, e.g. Cumulocity).
     * Borrowed. */
    const char *expected_cn;
    /* Warn when the leaf expires within this many seconds of @now;
     * 0: TLSCHECK_WARN_DAYS days. */
    time_t warn_before_s;
    /* How to open the key (passphrase file, PKCS#11 module); may be NULL. */
    const struct keys_options *key_options;
};

/* The facts a check found, for printing (uplinkctl diagnose). */
struct tlscheck_info {
    size_t chain_len;  /* certificates in the file, the leaf included */
    time_t not_before; /* of the leaf */
    time_t not_after;  /* of the leaf */
    char subject[256]; /* of the leaf, one line (RFC 2253) */
    char issuer[256];  /* of the leaf */
};

/**
 * tlscheck_client_cert() - check a client certificate (chain) file and its
 * private key.
 * @cert_path: PEM file: the leaf first, then optionally its chain (borrowed).
 * @key_spec: PEM key file or pkcs11: URI (borrowed).
 * @options: may be NULL (no CN check, default warning window, no passphrase).
 * @now: the time to check validity at (time(NULL); tests pass others).
 * @info: filled as far as the file could be read; may be NULL.
 * @err: on failure, one sentence naming the file, what is wrong (with the
 *       dates for validity problems) and the fix (TLSCHECK_MSG_SIZE bytes).
 * @warning: on success, set to "" or a warning (expires soon, chain out of
 *           order, an expired certificate later in the chain...); may be NULL.
 *
 * Checks, in this order, stopping at the first failure: the file holds a
 * PEM certificate; the key can be opened; the key is the private half of the
 * leaf; the leaf is valid at @now; every other certificate in the file is
 * valid at @now; the CN equals options->expected_cn.
 * Returns 0; -ENOENT/-EACCES/... (unreadable file), -EINVAL (no certificate
 * or no key in the file), -EKEYREJECTED (key does not match, wrong
 * passphrase), -EKEYEXPIRED (expired), -ERANGE (not yet valid), -EPERM
 * (CN differs), -ENOKEY/-ENOTSUP (see keys_load_private()), -ENOMEM.
 */
/**
 * tlscheck_cert_not_after() - when the first certificate in @cert_path (a
 * PEM file) stops being valid, as Unix seconds; 0 when it cannot be read.
 * Any thread.
 */
time_t tlscheck_cert_not_after(const char *cert_path);

int tlscheck_client_cert(const char *cert_path, const char *key_spec,
                         const struct tlscheck_options *options, time_t now,
                         struct tlscheck_info *info, char *err, size_t err_size, char *warning,
                         size_t warning_size);

/**
 * tlscheck_cert_cn() - check that the subject CN of @cert equals @expected
 * (exact, case-sensitive: clouds compare the client id byte for byte).
 * @cert_name: file name for the message (borrowed).
 * Returns 0 or -EPERM (different CN, or none) / -EINVAL (a CN with an
 * embedded NUL) / -ENOMEM, with @err in words.
 */
int tlscheck_cert_cn(const X509 *cert, const char *expected, const char *cert_name, char *err,
                     size_t err_size);

/**
 * tlscheck_key_options() - how to open @uplink's tls.key.
 * @out: filled with pointers borrowed from @uplink (valid as long as it is).
 *
 * A PEM tls.key has no passphrase (none is configurable for it). For a
 * pkcs11: URI the PIN comes from the URI (pin-value=, or pin-source=
 * file:/PATH); without one, from auth.passphrase_file when auth.key is a
 * pkcs11: URI too. The module is auth.pkcs11_module when auth.key is a
 * pkcs11: URI, else the one already in use, $PKCS11_MODULE_PATH or
 * p11-kit-proxy (see struct keys_options). This matches the engine, which
 * has one module and one PIN per process anyway: one token key can sign the
 * JWT and the TLS handshake with one set of settings.
 */
void tlscheck_key_options(const struct conf_uplink *uplink, struct keys_options *out);

/**
 * tlscheck_uplink() - the credential checks of one uplink, as start-up,
 * `uplinkd --check-config` and a reload run them: tlscheck_client_cert() for
 * tls.cert and tls.key (when TLS is on and a certificate is configured) and,
 * for a tls.ca file, that it holds a PEM certificate. (auth.key is checked
 * by conf_load(): it must sign a test token.) Logs each failure as one error
 * line with the uplink's name, the file, what is wrong and the fix, and a
 * passing check's warning (expires soon...).
 * @context: put before every logged line (e.g. "reload refused: "); NULL
 *           or "" for none (borrowed).
 * Reads the files on the calling thread.
 * Returns 0 (nothing to check, or fine) or the first failure's negative
 * errno (see tlscheck_client_cert(); -EINVAL: tls.ca holds no certificate).
 */
int tlscheck_uplink(const struct conf_uplink *uplink, time_t now, const char *context);

/**
 * tlscheck_conf() - tlscheck_uplink() for the uplinks of @conf (all of
 * them, so every broken file is reported at once).
 * @running: NULL at start-up and for --check-config: every uplink is
 *           checked. For a reload, the configuration in force (borrowed):
 *           only the uplinks whose section differs from their section in
 *           @running (conf_uplink_equal()), or that @running lacks, are
 *           checked, and their lines start with "reload refused: ".
 *           Unchanged sections are uplink_reload_credentials()'s business:
 *           it checks renewed files itself and keeps the session on failure.
 * @failed: when not NULL, the names of the uplinks that failed, comma
 *          separated (truncated to @failed_size); "" when none.
 * Returns 0, or the first failure's negative errno.
 */
int tlscheck_conf(const struct conf *conf, const struct conf *running, time_t now, char *failed,
                  size_t failed_size);

#endif
