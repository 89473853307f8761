/* uplinkctl_keys.c - `uplinkctl jwt` and `uplinkctl keygen` (see
 * uplinkctl_keys.h). Both work offline with the same jwt_/keys_ code the
 * daemon uses, so a token printed here is the token uplinkd would send. */
#include "uplinkctl_keys.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "jwt.h"
#include "keys.h"
#include "util.h"

/* More claims than this on a command line is a mistake, not a token. */
#define MAX_EXTRA_CLAIMS 32

static void jwt_usage(FILE *out)
{
    fprintf(out, "Usage: uplinkctl jwt --key KEY [OPTIONS]\n"
                 "Sign a JWT as uplinkd would and print it (e.g. as an MQTT password).\n\n"
                 "  -k, --key KEY            PEM private key file or pkcs11: URI (required)\n"
                 "  -a, --alg ALG            RS256, PS256, ES256 or ES384 (default: from the key:\n"
                 "                           ES256 for P-256, ES384 for P-384, RS256 for RSA)\n"
                 "  -A, --aud AUD            audience claim (GCP/ClearBlade: the project id)\n"
                 "  -l, --lifetime DURATION  exp = now + DURATION (default 60m)\n"
                 "  -m, --max-lifetime DUR   refuse a longer lifetime (GCP: 24h)\n"
                 "      --skew DURATION      back-date iat by this (default 60s)\n"
                 "      --kid auto|VALUE     add a kid header: auto = hex SHA-256 of the public\n"
                 "                           key's DER, else the VALUE given\n"
                 "  -c, --claim NAME=VALUE   an extra string claim (repeatable)\n"
                 "  -p, --passphrase-file F  passphrase of an encrypted key, or a token's PIN\n"
                 "      --pkcs11-module SO   PKCS#11 module for pkcs11: keys\n"
                 "      --require-sync       refuse unless the kernel says the clock is synced\n"
                 "      --now SECONDS        sign as if the time were SECONDS since the epoch\n"
                 "  -v, --verbose            print alg, kid, iat and exp on stderr\n");
}

static int parse_duration_s(const char *option, const char *text, uint32_t *out)
{
    uint64_t ms = 0;

    if (util_parse_duration_ms(text, &ms) < 0 || ms / 1000 > UINT32_MAX || ms % 1000 != 0) {
        fprintf(stderr,
                "uplinkctl jwt: %s \"%s\" is not a duration in whole seconds (e.g. 90s, 60m, "
                "24h)\n",
                option, text);
        return -EINVAL;
    }
    *out = (uint32_t)(ms / 1000);
    return 0;
}

int uplinkctl_jwt_main(int argc, char **argv)
{
    static const struct option options[] = {
        {"key", required_argument, NULL, 'k'},
        {"alg", required_argument, NULL, 'a'},
        {"aud", required_argument, NULL, 'A'},
        {"lifetime", required_argument, NULL, 'l'},
        {"max-lifetime", required_argument, NULL, 'm'},
        {"skew", required_argument, NULL, 'S'},
        {"kid", required_argument, NULL, 'K'},
        {"claim", required_argument, NULL, 'c'},
        {"passphrase-file", required_argument, NULL, 'p'},
        {"pkcs11-module", required_argument, NULL, 'M'},
        {"require-sync", no_argument, NULL, 'R'},
        {"now", required_argument, NULL, 'N'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct jwt_claim extra[MAX_EXTRA_CLAIMS];
    struct jwt_claims claims = {.skew_s = JWT_DEFAULT_SKEW_S, .extra = extra};
    struct keys_options key_options = {0};
    const char *key_spec = NULL, *alg_name = NULL, *kid = NULL;
    bool require_sync = false, verbose = false;
    time_t now = time(NULL);
    char err[KEYS_ERR_SIZE];
    EVP_PKEY *key = NULL;
    struct jwt_signer *signer = NULL;
    char *token = NULL;
    time_t expires_at = 0;
    enum jwt_alg alg;
    int opt, rc;

    optind = 0; /* GNU getopt: full re-initialisation for this argv */
    while ((opt = getopt_long(argc, argv, "k:a:A:l:m:c:p:vh", options, NULL)) != -1) {
        switch (opt) {
        case 'k':
            key_spec = optarg;
            break;
        case 'a':
            alg_name = optarg;
            break;
        case 'A':
            claims.aud = optarg;
            break;
        case 'l':
            if (parse_duration_s("--lifetime", optarg, &claims.lifetime_s) < 0)
                return 2;
            if (claims.lifetime_s == 0) {
                fprintf(stderr, "uplinkctl jwt: --lifetime must be at least 1s\n");
                return 2;
            }
            break;
        case 'm':
            if (parse_duration_s("--max-lifetime", optarg, &claims.max_lifetime_s) < 0)
                return 2;
            break;
        case 'S':
            if (parse_duration_s("--skew", optarg, &claims.skew_s) < 0)
                return 2;
            break;
        case 'K':
            kid = optarg;
            break;
        case 'c': {
            char *eq = strchr(optarg, '=');
            if (eq == NULL || eq == optarg) {
                fprintf(stderr, "uplinkctl jwt: --claim \"%s\" is not NAME=VALUE\n", optarg);
                return 2;
            }
            if (claims.extra_count == MAX_EXTRA_CLAIMS) {
                fprintf(stderr, "uplinkctl jwt: more than %d --claim options\n", MAX_EXTRA_CLAIMS);
                return 2;
            }
            *eq = '\0'; /* argv strings are ours to modify (C11 §5.1.2.2.1) */
            extra[claims.extra_count++] = (struct jwt_claim){.name = optarg, .value = eq + 1};
            break;
        }
        case 'p':
            key_options.passphrase_file = optarg;
            break;
        case 'M':
            key_options.pkcs11_module = optarg;
            break;
        case 'R':
            require_sync = true;
            break;
        case 'N': {
            char *end;
            errno = 0;
            long long value = strtoll(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0' || value < 0) {
                fprintf(stderr, "uplinkctl jwt: --now \"%s\" is not a number of seconds\n", optarg);
                return 2;
            }
            now = (time_t)value;
            break;
        }
        case 'v':
            verbose = true;
            break;
        case 'h':
            jwt_usage(stdout);
            return 0;
        default:
            jwt_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        /* Signing with an uplink's configured key needs the auth.jwt
         * section of the configuration, which conf.c does not parse yet. */
        fprintf(stderr,
                "uplinkctl jwt: signing for uplink \"%s\" from the configuration is not "
                "supported yet; give the key and claims with --key/--alg/--aud\n",
                argv[optind]);
        return 2;
    }
    if (key_spec == NULL) {
        fprintf(stderr, "uplinkctl jwt: --key is required\n");
        jwt_usage(stderr);
        return 2;
    }
    if (alg_name != NULL && jwt_alg_parse(alg_name, &alg) < 0) {
        fprintf(stderr, "uplinkctl jwt: unknown --alg \"%s\" (RS256, PS256, ES256, ES384)\n",
                alg_name);
        return 2;
    }

    rc = keys_load_private(key_spec, &key_options, &key, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        return 1;
    }
    if (alg_name == NULL && jwt_alg_for_key(key, &alg) < 0) {
        fprintf(stderr, "uplinkctl jwt: the key %s is neither RSA nor EC; give --alg\n", key_spec);
        rc = 1;
        goto out;
    }
    enum jwt_kid_mode kid_mode = kid == NULL                ? JWT_KID_NONE
                                 : strcmp(kid, "auto") == 0 ? JWT_KID_FINGERPRINT
                                                            : JWT_KID_VALUE;
    rc = jwt_signer_new(key, alg, kid_mode, kid, &signer, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s: %s\n", key_spec, err);
        rc = 1;
        goto out;
    }
    if (require_sync && jwt_clock_check(now, true, NULL, err, sizeof(err)) < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        rc = 1;
        goto out;
    }
    rc = jwt_sign(signer, &claims, now, &token, &expires_at, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        rc = 1;
        goto out;
    }
    if (verbose) {
        const char *signer_kid = jwt_signer_kid(signer);
        fprintf(stderr, "alg: %s\nkid: %s\niat: %lld\nexp: %lld\n", jwt_alg_name(alg),
                signer_kid ? signer_kid : "(none)", (long long)(now - (time_t)claims.skew_s),
                (long long)expires_at);
    }
    printf("%s\n", token);
    rc = fflush(stdout) == 0 ? 0 : 1;

out:
    free(token);
    jwt_signer_free(signer);
    EVP_PKEY_free(key);
    return rc;
}

/* --- keygen -------------------------------------------------------------- */

static void keygen_usage(FILE *out)
{
    fprintf(out, "Usage: uplinkctl keygen --type ec|rsa --out DIR [OPTIONS]\n"
                 "Write a new key pair to DIR (TYPE_private.pem, mode 0600, and\n"
                 "TYPE_public.pem) and print the public key, its alg and kid.\n\n"
                 "  -t, --type ec|rsa     key type (required)\n"
                 "  -o, --out DIR         directory, created (mode 0700) if missing (required)\n"
                 "      --curve P-256|P-384  EC curve (default P-256: ES256)\n"
                 "      --bits N          RSA size, 2048 to 8192 (default 2048)\n");
}

/* Writes @text to a new file at @path with @mode; never replaces one. */
static int write_new_file(const char *path, const char *text, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    int rc = 0;

    if (fd < 0) {
        rc = -errno;
        fprintf(stderr, "uplinkctl keygen: %s: %s%s\n", path, strerror(errno),
                errno == EEXIST ? " (keygen never overwrites a key; choose another --out)" : "");
        return rc;
    }
    for (size_t done = 0; done < len;) {
        ssize_t n = write(fd, text + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            fprintf(stderr, "uplinkctl keygen: write %s: %s\n", path, strerror(errno));
            break;
        }
        done += (size_t)n;
    }
    if (rc == 0 && fsync(fd) < 0) {
        rc = -errno;
        fprintf(stderr, "uplinkctl keygen: fsync %s: %s\n", path, strerror(errno));
    }
    close(fd);
    if (rc < 0)
        unlink(path);
    return rc;
}

/* The PKCS#8 PEM of @key as a malloc'd string. */
static char *private_pem(EVP_PKEY *key)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL, *text = NULL;

    if (bio == NULL)
        return NULL;
    if (PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL) == 1) {
        long len = BIO_get_mem_data(bio, &data);
        text = malloc((size_t)len + 1);
        if (text != NULL) {
            memcpy(text, data, (size_t)len);
            text[len] = '\0';
        }
    }
    BIO_free(bio); /* BIO_s_mem frees (not cleanses) its buffer; the key is on disk anyway */
    return text;
}

int uplinkctl_keygen_main(int argc, char **argv)
{
    static const struct option options[] = {
        {"type", required_argument, NULL, 't'},  {"out", required_argument, NULL, 'o'},
        {"curve", required_argument, NULL, 'C'}, {"bits", required_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    const char *type = NULL, *dir = NULL, *curve = "P-256";
    unsigned long bits = 2048;
    char private_path[PATH_MAX], public_path[PATH_MAX];
    char kid[65], reason[256];
    EVP_PKEY *key = NULL;
    char *private_text = NULL, *public_text = NULL;
    enum jwt_alg alg;
    int opt, rc = 1;

    optind = 0;
    while ((opt = getopt_long(argc, argv, "t:o:h", options, NULL)) != -1) {
        switch (opt) {
        case 't':
            type = optarg;
            break;
        case 'o':
            dir = optarg;
            break;
        case 'C':
            curve = optarg;
            break;
        case 'b': {
            char *end;
            errno = 0;
            bits = strtoul(optarg, &end, 10);
            if (errno != 0 || *end != '\0' || bits < 2048 || bits > 8192) {
                fprintf(stderr, "uplinkctl keygen: --bits must be 2048 to 8192\n");
                return 2;
            }
            break;
        }
        case 'h':
            keygen_usage(stdout);
            return 0;
        default:
            keygen_usage(stderr);
            return 2;
        }
    }
    if (type == NULL || dir == NULL || optind < argc) {
        keygen_usage(stderr);
        return 2;
    }
    ERR_clear_error();
    if (strcmp(type, "ec") == 0) {
        if (strcmp(curve, "P-256") != 0 && strcmp(curve, "P-384") != 0) {
            fprintf(stderr, "uplinkctl keygen: --curve must be P-256 or P-384\n");
            return 2;
        }
        alg = strcmp(curve, "P-256") == 0 ? JWT_ALG_ES256 : JWT_ALG_ES384;
        key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", curve);
    } else if (strcmp(type, "rsa") == 0) {
        alg = JWT_ALG_RS256;
        key = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
    } else {
        fprintf(stderr, "uplinkctl keygen: --type must be ec or rsa\n");
        return 2;
    }
    if (key == NULL) {
        ERR_error_string_n(ERR_peek_last_error(), reason, sizeof(reason));
        fprintf(stderr, "uplinkctl keygen: key generation failed: %s\n", reason);
        return 1;
    }
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        fprintf(stderr, "uplinkctl keygen: mkdir %s: %s\n", dir, strerror(errno));
        goto out;
    }
    if (snprintf(private_path, sizeof(private_path), "%s/%s_private.pem", dir, type) >=
            (int)sizeof(private_path) ||
        snprintf(public_path, sizeof(public_path), "%s/%s_public.pem", dir, type) >=
            (int)sizeof(public_path)) {
        fprintf(stderr, "uplinkctl keygen: --out path too long\n");
        goto out;
    }
    private_text = private_pem(key);
    if (private_text == NULL || keys_public_pem(key, &public_text) < 0 ||
        keys_public_der_sha256(key, kid) < 0) {
        fprintf(stderr, "uplinkctl keygen: cannot encode the key (out of memory?)\n");
        goto out;
    }
    if (write_new_file(private_path, private_text, strlen(private_text), 0600) < 0)
        goto out;
    if (write_new_file(public_path, public_text, strlen(public_text), 0644) < 0) {
        unlink(private_path); /* no half pair left behind */
        goto out;
    }
    printf("private key: %s\npublic key: %s\nalg: %s\nkid: %s\n%s", private_path, public_path,
           jwt_alg_name(alg), kid, public_text);
    rc = fflush(stdout) == 0 ? 0 : 1;

out:
    if (private_text != NULL) {
        OPENSSL_cleanse(private_text, strlen(private_text));
        free(private_text);
    }
    free(public_text);
    EVP_PKEY_free(key);
    return rc;
}
