/* uplinkctl_cert.c - `uplinkctl cert create` and `uplinkctl cert show`:
 * a device key and certificate (or CSR) with the subject a cloud expects,
 * and what the cloud needs to know of it (uplinkctl_cert.h). */
#include "uplinkctl_cert.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "keys.h"
#include "tlscheck.h"
#include "p11.h"

static void cert_usage(FILE *out)
{
    fprintf(out,
            "Usage: uplinkctl cert create --cn ID --out DIR [--days N] [--csr] [--force]\n"
            "                              [--key pkcs11:URI [--pin-file FILE] [--module SO]]\n"
            "       uplinkctl cert show FILE\n\n"
            "create: a new EC P-256 key DIR/ID.key (mode 0600) and a self-signed certificate\n"
            "DIR/ID.pem for CN=ID (valid N days, default 365), or with --csr a signing\n"
            "request DIR/ID.csr for a CA to sign. With --key the key is made inside the\n"
            "PKCS#11 token the URI names (or the one it already holds there is used), and\n"
            "never leaves it: no key file, tls.key is the URI. The CN is what the cloud\n"
            "expects:\n"
            "  cumulocity  the device id (cumulocity.device_id, default gateway.id)\n"
            "  azure       the device id (azure.device_id)\n"
            "  aws         the thing name (aws.thing), by convention\n"
            "Existing files are kept unless --force. Then set tls.cert and tls.key.\n"
            "show: subject, issuer, validity, days left and the SHA-1 and SHA-256\n"
            "thumbprints of a certificate file (the first certificate in it), and what to\n"
            "register where.\n");
}

/* The certificate's thumbprint with @md as upper-case hex (Azure's form). */
static void thumbprint(X509 *cert, const EVP_MD *md, char *out, size_t cap)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;

    out[0] = '\0';
    if (!X509_digest(cert, md, digest, &len))
        return;
    for (unsigned int i = 0; i < len && 2 * i + 2 < cap; i++)
        snprintf(out + 2 * i, cap - 2 * i, "%02X", digest[i]);
}

static void print_time(const char *label, const ASN1_TIME *t)
{
    struct tm tm;
    char text[64] = "?";

    if (ASN1_TIME_to_tm(t, &tm))
        strftime(text, sizeof(text), "%Y-%m-%d %H:%M:%S UTC", &tm);
    printf("%-12s %s\n", label, text);
}

static void print_name(const char *label, const X509_NAME *name)
{
    char text[512];

    X509_NAME_oneline(name, text, sizeof(text));
    printf("%-12s %s\n", label, text);
}

/* What to register where, for each cloud that takes X.509. */
static void print_next_steps(const char *path, bool self_signed, const char *sha1)
{
    printf("\nRegister it:\n");
    if (self_signed) {
        printf("  azure       IoT Hub > Devices > Add device, authentication \"X.509 self-"
               "signed\",\n              primary thumbprint %s\n",
               sha1);
        printf("  aws         aws iot register-certificate-without-ca --status ACTIVE \\\n"
               "                --certificate-pem file://%s\n"
               "              then attach a policy and the thing to the certificate ARN\n",
               path);
        printf("  cumulocity  Device management > Management > Trusted certificates: add %s\n"
               "              (with auto registration), or sign a CSR with a trusted CA\n",
               path);
    } else {
        printf("  the issuing CA must be registered with the cloud (Cumulocity trusted\n"
               "  certificates, Azure IoT Hub certificates, AWS register-ca-certificate);\n"
               "  tls.cert should hold this certificate followed by its issuers\n");
    }
}

int uplinkctl_cert_show(const char *path)
{
    FILE *f = fopen(path, "r");
    X509 *cert;
    char sha1[2 * EVP_MAX_MD_SIZE + 1], sha256[2 * EVP_MAX_MD_SIZE + 1];

    if (!f) {
        fprintf(stderr, "uplinkctl cert show: cannot open %s: %s\n", path, strerror(errno));
        return 1;
    }
    cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (!cert) {
        fprintf(stderr, "uplinkctl cert show: %s holds no PEM certificate\n", path);
        ERR_clear_error();
        return 1;
    }
    bool self_signed = X509_check_issued(cert, cert) == X509_V_OK;
    thumbprint(cert, EVP_sha1(), sha1, sizeof(sha1));
    thumbprint(cert, EVP_sha256(), sha256, sizeof(sha256));
    printf("%-12s %s\n", "file", path);
    print_name("subject", X509_get_subject_name(cert));
    print_name("issuer", X509_get_issuer_name(cert));
    print_time("not before", X509_get0_notBefore(cert));
    print_time("not after", X509_get0_notAfter(cert));
    int days = 0, secs = 0;
    if (ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(cert)))
        printf("%-12s %d%s\n", "days left", days,
               days < 0 || secs < 0             ? " (expired)"
               : days < (int)TLSCHECK_WARN_DAYS ? " (renew it soon)"
                                                : "");
    printf("%-12s %s\n", "self-signed", self_signed ? "yes" : "no");
    printf("%-12s %s\n", "sha1", sha1);
    printf("%-12s %s\n", "sha256", sha256);
    print_next_steps(path, self_signed, sha1);
    X509_free(cert);
    return 0;
}

/* @path written with @write_cb, created with @mode; an existing file is
 * kept unless @force. Returns 0, or 1 after saying why. */
static int write_pem(const char *path, unsigned mode, bool force, int (*write_cb)(FILE *, void *),
                     void *arg)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | (force ? 0 : O_EXCL), mode);
    if (fd < 0) {
        fprintf(stderr, "uplinkctl cert create: cannot create %s: %s%s\n", path, strerror(errno),
                errno == EEXIST ? " (kept; --force replaces it)" : "");
        return 1;
    }
    if (fchmod(fd, mode) < 0) {
        fprintf(stderr, "uplinkctl cert create: cannot set mode on %s: %s\n", path,
                strerror(errno));
        close(fd);
        return 1;
    }
    FILE *f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        return 1;
    }
    int ok = write_cb(f, arg);
    if (fclose(f) != 0 || !ok) {
        fprintf(stderr, "uplinkctl cert create: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

static int write_key(FILE *f, void *key)
{
    return PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
}

static int write_cert(FILE *f, void *cert)
{
    return PEM_write_X509(f, cert);
}

static int write_csr(FILE *f, void *req)
{
    return PEM_write_X509_REQ(f, req);
}

/* The certificate (or with @csr the request) for CN=@cn with @key. */
static int sign(EVP_PKEY *key, const char *cn, long days, bool csr, X509 **cert, X509_REQ **req)
{
    X509_NAME *name = X509_NAME_new();

    if (!name || !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn,
                                             -1, -1, 0)) {
        X509_NAME_free(name);
        return -1;
    }
    int ok = 0;
    if (csr) {
        *req = X509_REQ_new();
        ok = *req && X509_REQ_set_version(*req, 0) && X509_REQ_set_subject_name(*req, name) &&
             X509_REQ_set_pubkey(*req, key) && X509_REQ_sign(*req, key, EVP_sha256());
    } else {
        unsigned char serial[16];
        *cert = X509_new();
        BIGNUM *bn = NULL;
        if (RAND_bytes(serial, sizeof(serial)) == 1) {
            serial[0] &= 0x7f; /* RFC 5280 §4.1.2.2: a positive integer */
            bn = BN_bin2bn(serial, sizeof(serial), NULL);
        }
        ok = *cert && bn && X509_set_version(*cert, 2) &&
             BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(*cert)) &&
             X509_gmtime_adj(X509_getm_notBefore(*cert), -300) &&
             X509_gmtime_adj(X509_getm_notAfter(*cert), days * 24 * 3600) &&
             X509_set_subject_name(*cert, name) && X509_set_issuer_name(*cert, name) &&
             X509_set_pubkey(*cert, key) && X509_sign(*cert, key, EVP_sha256());
        BN_free(bn);
    }
    X509_NAME_free(name);
    return ok ? 0 : -1;
}

/* The CN becomes a file name and, for the clouds, an id: no '/' and no
 * control characters, 1 to 64 bytes (X.520's ub-common-name). */
static bool cn_ok(const char *cn)
{
    size_t len = strlen(cn);

    if (len == 0 || len > 64 || cn[0] == '.')
        return false;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)cn[i] < 0x21 || cn[i] == '/' || cn[i] == 0x7f)
            return false;
    }
    return true;
}

static int cert_create(int argc, char **argv)
{
    static const struct option options[] = {
        {"cn", required_argument, NULL, 'n'},       {"out", required_argument, NULL, 'o'},
        {"days", required_argument, NULL, 'd'},     {"csr", no_argument, NULL, 'r'},
        {"force", no_argument, NULL, 'f'},          {"key", required_argument, NULL, 'k'},
        {"pin-file", required_argument, NULL, 'p'}, {"module", required_argument, NULL, 'm'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    const char *cn = NULL, *dir = NULL, *token_key = NULL, *pin_file = NULL, *module = NULL;
    long days = 365;
    bool csr = false, force = false;
    int opt;

    optind = 0;
    while ((opt = getopt_long(argc, argv, "n:o:d:rfk:p:m:h", options, NULL)) != -1) {
        char *end;
        switch (opt) {
        case 'n':
            cn = optarg;
            break;
        case 'o':
            dir = optarg;
            break;
        case 'd':
            errno = 0;
            days = strtol(optarg, &end, 10);
            if (errno || *end || days < 1 || days > 36500) {
                fprintf(stderr, "uplinkctl cert create: --days \"%s\" is not 1 to 36500\n", optarg);
                return 2;
            }
            break;
        case 'r':
            csr = true;
            break;
        case 'f':
            force = true;
            break;
        case 'k':
            token_key = optarg;
            break;
        case 'p':
            pin_file = optarg;
            break;
        case 'm':
            module = optarg;
            break;
        case 'h':
            cert_usage(stdout);
            return 0;
        default:
            cert_usage(stderr);
            return 2;
        }
    }
    if (!cn || !dir || optind != argc) {
        fprintf(stderr, "uplinkctl cert create: --cn and --out are required\n");
        return 2;
    }
    if (!cn_ok(cn)) {
        fprintf(stderr,
                "uplinkctl cert create: --cn \"%s\" must be 1 to 64 printable characters "
                "without '/' or spaces (the device id or thing name)\n",
                cn);
        return 2;
    }
    if (token_key && !keys_is_uri(token_key)) {
        fprintf(stderr,
                "uplinkctl cert create: --key \"%s\" is not a pkcs11: URI (without --key the "
                "key is made in DIR/ID.key)\n",
                token_key);
        return 2;
    }
    if ((pin_file || module) && !token_key) {
        fprintf(stderr,
                "uplinkctl cert create: --pin-file and --module go with --key pkcs11:URI\n");
        return 2;
    }
    char key_path[4096], out_path[4096];
    snprintf(key_path, sizeof(key_path), "%s/%s.key", dir, cn);
    snprintf(out_path, sizeof(out_path), "%s/%s.%s", dir, cn, csr ? "csr" : "pem");

    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    X509_REQ *req = NULL;
    int rc = 1, made = 0;
    if (token_key) {
        char err[KEYS_ERR_SIZE], found[4096] = "";
        struct p11 *p11;
        made = p11_open(token_key, module, pin_file, &p11, err, sizeof(err));
        if (made == 0) {
            snprintf(found, sizeof(found), "%s", p11_module_file(p11));
            made = p11_ensure_ec_key(p11, err, sizeof(err));
            p11_close(p11);
        }
        if (made < 0) {
            fprintf(stderr, "uplinkctl cert create: %s\n", err);
            goto out;
        }
        /* Signed through the module that holds the token (not p11-kit's
         * proxy, which keeps every registered module loaded to the end). */
        const struct keys_options opts = {.passphrase_file = pin_file,
                                          .pkcs11_module = module     ? module
                                                           : found[0] ? found
                                                                      : NULL};
        if (keys_load_private(token_key, &opts, &key, err, sizeof(err)) < 0) {
            fprintf(stderr, "uplinkctl cert create: %s\n", err);
            goto out;
        }
    } else {
        key = EVP_EC_gen("P-256");
    }
    if (!key || sign(key, cn, days, csr, &cert, &req) < 0) {
        fprintf(stderr, "uplinkctl cert create: OpenSSL could not make the key or certificate\n");
        goto out;
    }
    if (!token_key && write_pem(key_path, 0600, force, write_key, key) != 0)
        goto out;
    if (write_pem(out_path, 0644, force, csr ? write_csr : write_cert,
                  csr ? (void *)req : (void *)cert) != 0)
        goto out;
    if (token_key) {
        /* The URI as given may carry pin-value=: not printed. */
        snprintf(key_path, sizeof(key_path), "%s",
                 strstr(token_key, "pin-value=") ? "the --key URI" : token_key);
        printf("key          %s (%s; it never leaves the token)\n", key_path,
               made ? "EC P-256, generated in the token" : "already in the token, used as it is");
    } else {
        printf("key          %s (EC P-256, mode 0600)\n", key_path);
    }
    if (csr) {
        printf("request      %s (CN=%s): have it signed by a CA the cloud trusts, then set\n"
               "             tls.cert to the signed certificate and tls.key to the key\n",
               out_path, cn);
        rc = 0;
    } else {
        printf("certificate  %s: set tls.cert: %s and tls.key: %s\n\n", out_path, out_path,
               key_path);
        rc = uplinkctl_cert_show(out_path);
    }
out:
    ERR_clear_error();
    X509_free(cert);
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    if (token_key)
        keys_pkcs11_release();
    return rc;
}

/* cert import-secret: a base64 key file into a token's secret key. */
static int import_secret(int argc, char **argv)
{
    static const struct option options[] = {
        {"from", required_argument, NULL, 'i'},     {"key", required_argument, NULL, 'k'},
        {"pin-file", required_argument, NULL, 'p'}, {"module", required_argument, NULL, 'm'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    const char *from = NULL, *uri = NULL, *pin_file = NULL, *module = NULL;
    unsigned char text[1024], key[768];
    char err[KEYS_ERR_SIZE];
    struct p11 *p11;
    int opt, len, rc;

    optind = 0;
    while ((opt = getopt_long(argc, argv, "i:k:p:m:h", options, NULL)) != -1) {
        switch (opt) {
        case 'i':
            from = optarg;
            break;
        case 'k':
            uri = optarg;
            break;
        case 'p':
            pin_file = optarg;
            break;
        case 'm':
            module = optarg;
            break;
        case 'h':
            cert_usage(stdout);
            return 0;
        default:
            cert_usage(stderr);
            return 2;
        }
    }
    if (!from || !uri || optind != argc || !keys_is_uri(uri)) {
        fprintf(stderr, "uplinkctl cert import-secret: --from FILE and --key pkcs11:URI are "
                        "required\n");
        return 2;
    }
    FILE *f = fopen(from, "r");
    size_t n = f ? fread(text, 1, sizeof(text) - 1, f) : 0;
    if (f)
        fclose(f);
    text[n] = '\0';
    n = strcspn((char *)text, " \t\r\n");
    len = n > 0 && n % 4 == 0 ? EVP_DecodeBlock(key, text, (int)n) : -1;
    if (len > 0)
        len -= (text[n - 1] == '=') + (n > 1 && text[n - 2] == '=');
    OPENSSL_cleanse(text, sizeof(text));
    if (!f || len <= 0) {
        fprintf(stderr,
                "uplinkctl cert import-secret: %s %s (expected the key in base64 on one line, "
                "as the portal shows it)\n",
                from, f ? "does not hold a base64 key" : "cannot be read");
        OPENSSL_cleanse(key, sizeof(key));
        return 1;
    }
    rc = p11_open(uri, module, pin_file, &p11, err, sizeof(err));
    if (rc == 0) {
        rc = p11_import_secret(p11, key, (size_t)len, err, sizeof(err));
        p11_close(p11);
    }
    OPENSSL_cleanse(key, sizeof(key));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl cert import-secret: %s\n", err);
        return 1;
    }
    printf("secret       %d-byte key from %s stored in the token (never extractable)\n"
           "             set azure.key_file: \"%s\"\n"
           "             (with pin-source=file:/PATH in the URI: uplinkd reads the PIN there)\n",
           len, from, strstr(uri, "pin-value=") ? "<the --key URI>" : uri);
    return 0;
}

int uplinkctl_cert_main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "create") == 0)
        return cert_create(argc - 1, argv + 1);
    if (argc == 3 && strcmp(argv[1], "show") == 0)
        return uplinkctl_cert_show(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "import-secret") == 0)
        return import_secret(argc - 1, argv + 1);
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        cert_usage(stdout);
        return 0;
    }
    cert_usage(stderr);
    return 2;
}
