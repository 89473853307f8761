/* keys.c - private keys (PEM files, PKCS#11 tokens) and X.509 helpers.
 *
 * PKCS#11 goes through OpenSSL's ENGINE API because that is what Debian 12
 * ships for it (libengine-pkcs11-openssl, libp11 0.4.12); there is no
 * pkcs11 provider there yet. The ENGINE API is deprecated in OpenSSL 3, so
 * deprecation warnings are silenced for this file only.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include "keys.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/opensslv.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/ui.h>
#include <openssl/x509.h>
#ifndef OPENSSL_NO_ENGINE
#include <openssl/engine.h>
#endif

#include "util.h"

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "keys.c needs OpenSSL 3.0 or later (EVP_PKEY_get_group_name, decoders)"
#endif

/* Key and passphrase files are small; anything bigger is not what we want. */
#define KEY_FILE_MAX        (1024 * 1024)
#define PASSPHRASE_FILE_MAX 4096

const char *keys_openssl_reason(char *buf, size_t size)
{
    unsigned long code = ERR_peek_last_error();

    if (code == 0)
        snprintf(buf, size, "no OpenSSL error recorded");
    else
        ERR_error_string_n(code, buf, size);
    ERR_clear_error();
    return buf;
}

bool keys_is_uri(const char *spec)
{
    return spec != NULL && strncmp(spec, "pkcs11:", 7) == 0;
}

/* Reads the first line of a passphrase/PIN file into a malloc'd string.
 * The caller cleanses and frees it. */
static int read_passphrase(const char *path, char **out, char *err, size_t err_size)
{
    char *text = NULL;
    size_t len = 0;
    int rc = util_read_file(path, PASSPHRASE_FILE_MAX, &text, &len);

    if (rc < 0) {
        util_set_err(err, err_size, "passphrase file %s: %s%s", path, strerror(-rc),
                     rc == -EFBIG ? " (a passphrase file holds one line)" : "");
        return rc;
    }
    text[strcspn(text, "\r\n")] = '\0';
    if (text[0] == '\0') {
        OPENSSL_cleanse(text, len);
        free(text);
        util_set_err(err, err_size, "passphrase file %s: the first line is empty", path);
        return -EINVAL;
    }
    *out = text;
    return 0;
}

/* --- PEM files ----------------------------------------------------------- */

struct passphrase_ctx {
    const char *passphrase; /* NULL when none is configured */
    bool asked;             /* OpenSSL found an encrypted key */
};

static int passphrase_cb(char *buf, int size, int rwflag, void *arg)
{
    struct passphrase_ctx *ctx = arg;

    ctx->asked = true;
    if (ctx->passphrase == NULL)
        return -1;
    size_t len = strlen(ctx->passphrase);
    if (size < 0 || len > (size_t)size)
        return -1;
    memcpy(buf, ctx->passphrase, len);
    return (int)len;
}

/* Explains why a file that PEM_read_bio_PrivateKey() refused holds no usable
 * private key, from the PEM labels in it. */
static int explain_unreadable_pem(const char *path, const char *text, const char *reason, char *err,
                                  size_t err_size)
{
    if (strstr(text, "-----BEGIN ") == NULL) {
        util_set_err(err, err_size,
                     "key file %s is not PEM (no \"-----BEGIN\" line); if it is DER, convert it: "
                     "openssl pkey -inform DER -in %s -out key.pem",
                     path, path);
        return -EINVAL;
    }
    if (strstr(text, "PRIVATE KEY-----") == NULL) {
        const char *what = strstr(text, "-----BEGIN CERTIFICATE") ? "a certificate"
                           : strstr(text, "PUBLIC KEY-----")      ? "only a public key"
                           : strstr(text, "PARAMETERS-----")      ? "only key parameters"
                                                                  : "no private key";
        util_set_err(err, err_size,
                     "key file %s holds %s, not a private key; point the key setting at the file "
                     "with \"-----BEGIN ... PRIVATE KEY-----\"",
                     path, what);
        return -EINVAL;
    }
    util_set_err(err, err_size,
                 "key file %s: the private key cannot be parsed (%s); check that the file is "
                 "complete and not damaged, e.g. with: openssl pkey -in %s -noout",
                 path, reason, path);
    return -EINVAL;
}

static int load_pem(const char *path, const struct keys_options *options, EVP_PKEY **out, char *err,
                    size_t err_size)
{
    char reason[256];
    char *text = NULL;
    char *passphrase = NULL;
    size_t len = 0;
    BIO *bio = NULL;
    EVP_PKEY *key = NULL;
    int rc;

    rc = util_read_file(path, KEY_FILE_MAX, &text, &len);
    if (rc < 0) {
        util_set_err(err, err_size, "key file %s: %s%s", path, strerror(-rc),
                     rc == -ENOENT   ? " (check the path)"
                     : rc == -EACCES ? " (uplinkd must be able to read it: check owner and mode)"
                     : rc == -EFBIG  ? " (a key file is a few kilobytes)"
                                     : "");
        return rc;
    }
    if (options != NULL && options->passphrase_file != NULL) {
        rc = read_passphrase(options->passphrase_file, &passphrase, err, err_size);
        if (rc < 0)
            goto err_after_read;
    }
    bio = BIO_new_mem_buf(text, (int)len);
    if (bio == NULL) {
        rc = -ENOMEM;
        util_set_err(err, err_size, "key file %s: out of memory", path);
        goto err_after_passphrase;
    }

    struct passphrase_ctx ctx = {.passphrase = passphrase};
    ERR_clear_error();
    /* Reads PKCS#8 ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"), SEC1 ("EC
     * PRIVATE KEY") and PKCS#1 ("RSA PRIVATE KEY", with or without legacy
     * Proc-Type encryption), skipping other PEM blocks before the key. */
    key = PEM_read_bio_PrivateKey(bio, NULL, passphrase_cb, &ctx);
    if (key == NULL) {
        keys_openssl_reason(reason, sizeof(reason));
        if (ctx.asked && passphrase == NULL) {
            rc = -ENOKEY;
            util_set_err(err, err_size,
                         "key file %s is encrypted and no passphrase file is configured; set "
                         "passphrase_file to a file holding the passphrase",
                         path);
        } else if (ctx.asked) {
            rc = -EKEYREJECTED;
            util_set_err(err, err_size,
                         "key file %s: the passphrase from %s does not decrypt it (wrong "
                         "passphrase, or a damaged file: %s)",
                         path, options->passphrase_file, reason);
        } else {
            rc = explain_unreadable_pem(path, text, reason, err, err_size);
        }
        goto err_after_bio;
    }
    *out = key;
    rc = 0;

err_after_bio:
    BIO_free(bio);
err_after_passphrase:
    if (passphrase != NULL) {
        OPENSSL_cleanse(passphrase, strlen(passphrase));
        free(passphrase);
    }
err_after_read:
    /* The file may hold an unencrypted private key. */
    OPENSSL_cleanse(text, len);
    free(text);
    return rc;
}

/* --- PKCS#11 through the libp11 engine ---------------------------------- */

#ifndef OPENSSL_NO_ENGINE
static pthread_mutex_t pkcs11_lock = PTHREAD_MUTEX_INITIALIZER;
/* Initialised once and kept for the life of the process: keys loaded
 * through it refer to it, and libp11 keeps the module's sessions in it. */
static ENGINE *pkcs11_engine;
static char *pkcs11_engine_module; /* the module it was initialised with, or NULL */

/* libp11 asks for a PIN through a UI when none is set. A daemon has no one
 * to ask, so the PIN must come from the configuration: this UI refuses. */
static int no_prompt_reader_cb(UI *ui, UI_STRING *uis)
{
    return -1;
}

static int pkcs11_engine_get(const char *module, ENGINE **out, char *err, size_t err_size)
{
    char reason[256];
    ENGINE *engine = NULL;
    int rc = 0;

    pthread_mutex_lock(&pkcs11_lock);
    /* No module asked for: any module this process already uses will do
     * (tls.key without a module of its own shares auth.pkcs11_module's). */
    if (module == NULL && pkcs11_engine != NULL) {
        *out = pkcs11_engine;
        goto out;
    }
    if (module == NULL)
        module = getenv("PKCS11_MODULE_PATH");
    if (pkcs11_engine != NULL) {
        /* libp11 loads one module per engine; a second one cannot be added. */
        bool same = (module == NULL && pkcs11_engine_module == NULL) ||
                    (module != NULL && pkcs11_engine_module != NULL &&
                     strcmp(module, pkcs11_engine_module) == 0);
        if (!same) {
            rc = -EINVAL;
            util_set_err(err, err_size,
                         "PKCS#11 module %s requested, but this process already uses %s; all "
                         "pkcs11: keys of one uplinkd must come from the same module",
                         module ? module : "(default)",
                         pkcs11_engine_module ? pkcs11_engine_module : "the default module");
            goto out;
        }
        *out = pkcs11_engine;
        goto out;
    }

    ERR_clear_error();
    /* ENGINE_by_id() falls back to loading engines-3/pkcs11.so dynamically. */
    engine = ENGINE_by_id("pkcs11");
    if (engine == NULL) {
        rc = -ENOTSUP;
        util_set_err(err, err_size,
                     "pkcs11: keys need the OpenSSL PKCS#11 engine, which cannot be loaded (%s); "
                     "install it: apt-get install libengine-pkcs11-openssl",
                     keys_openssl_reason(reason, sizeof(reason)));
        goto out;
    }
    /* libp11 prints its own diagnostics on stderr, URI (and so any
     * pin-value) included; our error says it in words instead. Optional:
     * older libp11 has no QUIET. */
    ENGINE_ctrl_cmd_string(engine, "QUIET", NULL, 1);
    ERR_clear_error();
    if (module != NULL && !ENGINE_ctrl_cmd_string(engine, "MODULE_PATH", module, 0)) {
        rc = -EINVAL;
        util_set_err(err, err_size, "PKCS#11 engine refused module path %s (%s)", module,
                     keys_openssl_reason(reason, sizeof(reason)));
        goto err_after_by_id;
    }
    if (!ENGINE_init(engine)) {
        rc = -ENOTSUP;
        util_set_err(err, err_size,
                     "PKCS#11 engine cannot initialise module %s (%s); check that the module path "
                     "is right and the token software is installed",
                     module ? module : "(default p11-kit-proxy)",
                     keys_openssl_reason(reason, sizeof(reason)));
        goto err_after_by_id;
    }
    if (module != NULL) {
        pkcs11_engine_module = strdup(module);
        if (pkcs11_engine_module == NULL) {
            rc = -ENOMEM;
            util_set_err(err, err_size, "out of memory");
            ENGINE_finish(engine);
            goto err_after_by_id;
        }
    }
    /* ENGINE_init() took a functional reference, which we keep. */
    ENGINE_free(engine);
    pkcs11_engine = engine;
    *out = engine;
    goto out;

err_after_by_id:
    ENGINE_free(engine);
out:
    pthread_mutex_unlock(&pkcs11_lock);
    return rc;
}

/* Copies @uri for a message with the value of any pin-value= attribute
 * (RFC 7512 §2.3) replaced, so a PIN never reaches a log. */
static void redact_uri(const char *uri, char *out, size_t size)
{
    static const char attr[] = "pin-value=";
    size_t pos = 0;

    for (const char *p = uri; *p != '\0' && pos + 1 < size;) {
        if (strncmp(p, attr, sizeof(attr) - 1) == 0 && (p == uri || strchr(":;?&", p[-1]))) {
            int n = snprintf(out + pos, size - pos, "%s***", attr);
            pos = n < 0 || (size_t)n >= size - pos ? size - 1 : pos + (size_t)n;
            p += sizeof(attr) - 1 + strcspn(p + sizeof(attr) - 1, ";?&");
            continue;
        }
        out[pos++] = *p++;
    }
    out[pos < size ? pos : size - 1] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* RFC 7512 §2.4 "pin-source": where the PIN is. We take "file:PATH" (also
 * "file://PATH") or a plain absolute PATH, percent-decoded (RFC 7512 §2.3).
 * libp11 0.4.12 would read the file itself, but it keeps the trailing
 * newline every editor writes as part of the PIN ("PIN incorrect"); so we
 * read it like passphrase_file (the first line) and give libp11 the URI
 * without the attribute. *pin_file: malloc'd path, NULL when the URI has no
 * pin-source; *engine_uri: malloc'd URI without it (NULL likewise). */
static int split_pin_source(const char *uri, char **pin_file, char **engine_uri, char *err,
                            size_t err_size)
{
    static const char attr[] = "pin-source=";
    const char *at = NULL;
    char *path = NULL, *rest = NULL;

    *pin_file = NULL;
    *engine_uri = NULL;
    for (const char *p = strstr(uri, attr); p != NULL; p = strstr(p + 1, attr)) {
        if (p > uri && strchr(":;?&", p[-1]) != NULL) {
            at = p;
            break;
        }
    }
    if (at == NULL)
        return 0;
    const char *value = at + sizeof(attr) - 1;
    size_t value_len = strcspn(value, ";?&");
    const char *end = value + value_len;

    path = malloc(value_len + 1);
    rest = malloc(strlen(uri) + 1);
    if (path == NULL || rest == NULL)
        goto err_nomem;
    size_t n = 0;
    for (size_t i = 0; i < value_len; i++) {
        int high, low;
        if (value[i] == '%' && i + 2 < value_len && (high = hex_value(value[i + 1])) >= 0 &&
            (low = hex_value(value[i + 2])) >= 0) {
            path[n++] = (char)(high * 16 + low);
            i += 2;
        } else {
            path[n++] = value[i];
        }
    }
    path[n] = '\0';
    const char *file = path;
    if (strncmp(file, "file://", 7) == 0)
        file += 7;
    else if (strncmp(file, "file:", 5) == 0)
        file += 5;
    if (file[0] != '/' || strlen(file) != n - (size_t)(file - path)) {
        char shown[512];
        redact_uri(uri, shown, sizeof(shown));
        util_set_err(err, err_size,
                     "%s: pin-source must be file:/absolute/path of a file whose first line is "
                     "the PIN (e.g. pin-source=file:/etc/uplinkd/token.pin)",
                     shown);
        free(path);
        free(rest);
        return -EINVAL;
    }
    memmove(path, file, strlen(file) + 1);

    /* Cut the attribute and one separator next to it: "a;pin-source=x;b" ->
     * "a;b", "a?pin-source=x&b" -> "a?b", "a?pin-source=x" -> "a",
     * "pkcs11:pin-source=x;b" -> "pkcs11:b". */
    size_t cut_from = (size_t)(at - uri), cut_to = (size_t)(end - uri);
    if (*end == '&' || ((at[-1] == ':' || at[-1] == '?') && *end == ';'))
        cut_to++;
    else if (at[-1] != ':')
        cut_from--;
    memcpy(rest, uri, cut_from);
    strcpy(rest + cut_from, uri + cut_to);
    *pin_file = path;
    *engine_uri = rest;
    return 0;

err_nomem:
    free(path);
    free(rest);
    util_set_err(err, err_size, "out of memory");
    return -ENOMEM;
}

static int load_pkcs11(const char *uri, const struct keys_options *options, EVP_PKEY **out,
                       char *err, size_t err_size)
{
    char reason[256];
    char *pin = NULL;
    char *pin_file = NULL, *engine_uri = NULL;
    const char *pin_path = options ? options->passphrase_file : NULL;
    UI_METHOD *ui = NULL;
    ENGINE *engine = NULL;
    EVP_PKEY *key = NULL;
    int rc;

    rc = pkcs11_engine_get(options ? options->pkcs11_module : NULL, &engine, err, err_size);
    if (rc < 0)
        return rc;
    rc = split_pin_source(uri, &pin_file, &engine_uri, err, err_size);
    if (rc < 0)
        return rc;
    /* The URI's own pin-source is more specific than passphrase_file. */
    if (pin_file != NULL)
        pin_path = pin_file;
    if (pin_path != NULL) {
        rc = read_passphrase(pin_path, &pin, err, err_size);
        if (rc < 0)
            goto out;
    }
    ui = UI_create_method("uplinkd: no PIN prompt");
    if (ui == NULL || UI_method_set_reader(ui, no_prompt_reader_cb) != 0) {
        rc = -ENOMEM;
        util_set_err(err, err_size, "out of memory");
        goto out;
    }

    /* The engine keeps one PIN; serialise set-PIN + load. */
    pthread_mutex_lock(&pkcs11_lock);
    ERR_clear_error();
    if (pin != NULL && !ENGINE_ctrl_cmd_string(engine, "PIN", pin, 0)) {
        pthread_mutex_unlock(&pkcs11_lock);
        rc = -EINVAL;
        util_set_err(err, err_size, "PKCS#11 engine refused the PIN from %s (%s)", pin_path,
                     keys_openssl_reason(reason, sizeof(reason)));
        goto out;
    }
    key = ENGINE_load_private_key(engine, engine_uri ? engine_uri : uri, ui, NULL);
    pthread_mutex_unlock(&pkcs11_lock);
    if (key == NULL) {
        char shown[512];
        bool pin_given = pin != NULL || strstr(uri, "pin-value=");
        rc = -ENOKEY;
        redact_uri(uri, shown, sizeof(shown));
        util_set_err(err, err_size,
                     "no private key at %s (%s); %s; list the objects with: pkcs11-tool "
                     "--list-objects --login",
                     shown, keys_openssl_reason(reason, sizeof(reason)),
                     pin_given
                         ? "the PIN may be wrong, or no object matches the token and object "
                           "names"
                         : "no PIN is configured (passphrase_file, or pin-value=/pin-source= in "
                           "the URI), or no object matches the token and object names");
        goto out;
    }
    *out = key;
    rc = 0;

out:
    UI_destroy_method(ui);
    if (pin != NULL) {
        OPENSSL_cleanse(pin, strlen(pin));
        free(pin);
    }
    free(pin_file);
    free(engine_uri);
    return rc;
}
#else
static int load_pkcs11(const char *uri, const struct keys_options *options, EVP_PKEY **out,
                       char *err, size_t err_size)
{
    util_set_err(err, err_size,
                 "%s: this OpenSSL is built without engines, so pkcs11: keys "
                 "cannot be used",
                 uri);
    return -ENOTSUP;
}
#endif

int keys_load_private(const char *spec, const struct keys_options *options, EVP_PKEY **out,
                      char *err, size_t err_size)
{
    if (spec == NULL || spec[0] == '\0') {
        util_set_err(err, err_size, "no private key configured");
        return -EINVAL;
    }
    if (keys_is_uri(spec))
        return load_pkcs11(spec, options, out, err, err_size);
    return load_pem(spec, options, out, err, err_size);
}

const char *keys_describe(const EVP_PKEY *key, char *buf, size_t size)
{
    char group[64];
    size_t group_len = 0;
    const char *type;

    switch (EVP_PKEY_get_base_id(key)) {
    case EVP_PKEY_RSA:
        type = "RSA";
        break;
    case EVP_PKEY_RSA_PSS:
        type = "RSA-PSS";
        break;
    case EVP_PKEY_EC:
        type = "EC";
        break;
    case EVP_PKEY_ED25519:
        type = "Ed25519";
        break;
    case EVP_PKEY_ED448:
        type = "Ed448";
        break;
    default:
        type = OBJ_nid2sn(EVP_PKEY_get_base_id(key));
        break;
    }
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_EC &&
        EVP_PKEY_get_group_name(key, group, sizeof(group), &group_len) == 1) {
        int nid = OBJ_sn2nid(group);
        const char *nist = nid != NID_undef ? EC_curve_nid2nist(nid) : NULL;
        snprintf(buf, size, "EC %s", nist ? nist : group);
    } else {
        snprintf(buf, size, "%s %d", type ? type : "unknown", EVP_PKEY_get_bits(key));
    }
    return buf;
}

int keys_public_der_sha256(const EVP_PKEY *key, char hex[65])
{
    unsigned char digest[32];
    unsigned char *der = NULL;
    int der_len;

    /* i2d_PUBKEY() takes a non-const key but does not change it. */
    der_len = i2d_PUBKEY((EVP_PKEY *)key, &der);
    if (der_len <= 0)
        return -EINVAL;
    if (EVP_Digest(der, (size_t)der_len, digest, NULL, EVP_sha256(), NULL) != 1) {
        OPENSSL_free(der);
        return -ENOMEM;
    }
    OPENSSL_free(der);
    for (size_t i = 0; i < sizeof(digest); i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    return 0;
}

int keys_public_pem(const EVP_PKEY *key, char **out)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL;
    long len;
    int rc = 0;

    if (bio == NULL)
        return -ENOMEM;
    if (PEM_write_bio_PUBKEY(bio, (EVP_PKEY *)key) != 1) {
        rc = -EINVAL;
        goto out;
    }
    len = BIO_get_mem_data(bio, &data);
    *out = malloc((size_t)len + 1);
    if (*out == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    memcpy(*out, data, (size_t)len);
    (*out)[len] = '\0';
out:
    BIO_free(bio);
    ERR_clear_error();
    return rc;
}

/* --- Certificates -------------------------------------------------------- */

int keys_load_cert_chain(const char *path, X509 **leaf, STACK_OF(X509) * *chain, char *err,
                         size_t err_size)
{
    char *text = NULL;
    size_t len = 0;
    BIO *bio = NULL;
    X509 *first = NULL;
    STACK_OF(X509) *rest = NULL;
    int rc;

    rc = util_read_file(path, KEY_FILE_MAX, &text, &len);
    if (rc < 0) {
        util_set_err(err, err_size, "certificate file %s: %s", path, strerror(-rc));
        return rc;
    }
    bio = BIO_new_mem_buf(text, (int)len);
    rest = sk_X509_new_null();
    if (bio == NULL || rest == NULL) {
        rc = -ENOMEM;
        util_set_err(err, err_size, "certificate file %s: out of memory", path);
        goto out;
    }
    ERR_clear_error();
    first = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    if (first == NULL) {
        rc = -EINVAL;
        util_set_err(
            err, err_size,
            "certificate file %s holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")%s",
            path,
            strstr(text, "PRIVATE KEY-----") ? "; it looks like a key file: the cert and "
                                               "key settings may be swapped"
                                             : "");
        goto out;
    }
    for (int i = 0; i < 64; i++) { /* a chain deeper than 64 is not a chain */
        X509 *next = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (next == NULL)
            break;
        if (sk_X509_push(rest, next) == 0) {
            X509_free(next);
            rc = -ENOMEM;
            util_set_err(err, err_size, "certificate file %s: out of memory", path);
            goto out;
        }
    }
    /* The loop ends on "no start line" at the end of the file. */
    ERR_clear_error();
    *leaf = first;
    first = NULL;
    if (chain != NULL) {
        *chain = rest;
        rest = NULL;
    }
    rc = 0;
out:
    X509_free(first);
    sk_X509_pop_free(rest, X509_free);
    BIO_free(bio);
    free(text);
    return rc;
}

int keys_check_cert_key(const X509 *cert, const EVP_PKEY *key, const char *cert_name, char *err,
                        size_t err_size)
{
    EVP_PKEY *cert_key = X509_get0_pubkey(cert);
    char cert_desc[64], key_desc[64];

    if (cert_key != NULL && EVP_PKEY_eq(cert_key, key) == 1) {
        ERR_clear_error();
        return 0;
    }
    ERR_clear_error();
    util_set_err(err, err_size,
                 "the private key (%s) does not belong to certificate %s (%s); the key and cert "
                 "settings name files from different pairs",
                 keys_describe(key, key_desc, sizeof(key_desc)), cert_name,
                 cert_key ? keys_describe(cert_key, cert_desc, sizeof(cert_desc))
                          : "no public key");
    return -EKEYREJECTED;
}

int keys_use_client_cert(SSL_CTX *ctx, const char *cert_path, const char *key_spec,
                         const struct keys_options *options, char *err, size_t err_size)
{
    char reason[256];
    X509 *leaf = NULL;
    STACK_OF(X509) *chain = NULL;
    EVP_PKEY *key = NULL;
    int rc;

    rc = keys_load_cert_chain(cert_path, &leaf, &chain, err, err_size);
    if (rc < 0)
        return rc;
    rc = keys_load_private(key_spec, options, &key, err, err_size);
    if (rc < 0)
        goto out;
    rc = keys_check_cert_key(leaf, key, cert_path, err, err_size);
    if (rc < 0)
        goto out;
    ERR_clear_error();
    /* override = 1: the chain goes out exactly as in the file, the CA
     * included when it is there (Cumulocity wants it), instead of OpenSSL
     * building one from the trust store. */
    if (SSL_CTX_use_cert_and_key(ctx, leaf, key, chain, 1) != 1) {
        rc = -EINVAL;
        util_set_err(err, err_size, "OpenSSL refuses certificate %s with its key (%s)", cert_path,
                     keys_openssl_reason(reason, sizeof(reason)));
        goto out;
    }
    rc = 0;
out:
    EVP_PKEY_free(key);
    sk_X509_pop_free(chain, X509_free);
    X509_free(leaf);
    return rc;
}

void keys_pkcs11_release(void)
{
#ifndef OPENSSL_NO_ENGINE
    pthread_mutex_lock(&pkcs11_lock);
    if (pkcs11_engine != NULL)
        ENGINE_finish(pkcs11_engine); /* the functional reference pkcs11_engine_get() kept */
    pkcs11_engine = NULL;
    free(pkcs11_engine_module);
    pkcs11_engine_module = NULL;
    pthread_mutex_unlock(&pkcs11_lock);
#endif
}

int keys_pkcs11_available(char *err, size_t err_size)
{
#ifndef OPENSSL_NO_ENGINE
    char reason[256];
    ENGINE *engine;

    ERR_clear_error();
    /* A structural reference only: the module is not loaded here, so the
     * choice of module stays with the first keys_load_private(). */
    engine = ENGINE_by_id("pkcs11");
    if (engine == NULL) {
        util_set_err(err, err_size,
                     "pkcs11: keys need the OpenSSL PKCS#11 engine, which cannot be loaded (%s); "
                     "install it: apt-get install libengine-pkcs11-openssl",
                     keys_openssl_reason(reason, sizeof(reason)));
        return -ENOTSUP;
    }
    ENGINE_free(engine);
    return 0;
#else
    util_set_err(err, err_size,
                 "this OpenSSL is built without engines, so pkcs11: keys cannot be used");
    return -ENOTSUP;
#endif
}

static const char *format_asn1_time(const ASN1_TIME *t, char *buf, size_t size)
{
    struct tm tm;

    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1 ||
        strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(buf, size, "(unreadable date)");
    return buf;
}

int keys_check_cert_validity(const X509 *cert, time_t now, const char *cert_name, char *err,
                             size_t err_size)
{
    const ASN1_TIME *not_before = X509_get0_notBefore(cert);
    const ASN1_TIME *not_after = X509_get0_notAfter(cert);
    char date[64];

    /* X509_cmp_time(): -1 when the ASN.1 time is <= now, 1 when later. */
    if (X509_cmp_time(not_before, &now) != -1) {
        util_set_err(err, err_size,
                     "certificate %s is not valid before %s; if that date has passed, the system "
                     "clock is wrong",
                     cert_name, format_asn1_time(not_before, date, sizeof(date)));
        return -ERANGE;
    }
    if (X509_cmp_time(not_after, &now) != 1) {
        util_set_err(err, err_size, "certificate %s expired on %s; install a renewed certificate",
                     cert_name, format_asn1_time(not_after, date, sizeof(date)));
        return -EKEYEXPIRED;
    }
    return 0;
}

int keys_cert_common_name(const X509 *cert, char **out)
{
    const X509_NAME *subject = X509_get_subject_name(cert);
    unsigned char *utf8 = NULL;
    int index = -1, last = -1;

    while ((index = X509_NAME_get_index_by_NID(subject, NID_commonName, index)) >= 0)
        last = index;
    if (last < 0)
        return -ENOENT;
    const ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, last));
    int len = ASN1_STRING_to_UTF8(&utf8, data);
    if (len < 0)
        return -ENOMEM;
    /* An embedded NUL would make the CN compare equal to a prefix of it. */
    if (memchr(utf8, '\0', (size_t)len) != NULL) {
        OPENSSL_free(utf8);
        return -EINVAL;
    }
    *out = strndup((const char *)utf8, (size_t)len);
    OPENSSL_free(utf8);
    return *out ? 0 : -ENOMEM;
}
