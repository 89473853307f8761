/* uplinkctl_keys.c - `uplinkctl jwt` and `uplinkctl keygen` (see
 * uplinkctl_keys.h). Both work offline with the same jwt_/keys_ code the
 * daemon uses, so a token printed here is the token uplinkd would send.
 * `uplinkctl jwt UPLINK` asks the running daemon first (it signs: a token
 * key or a key file only uplinkd may read works), and signs here from the
 * configuration file only when no daemon listens. */
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

#include <jansson.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "conf.h"
#include "config.h"
#include "jwt.h"
#include "keys.h"
#include "uplinkctl_ask.h"
#include "util.h"
#include "uplinkd/ctl.h"

/* More claims than this on a command line is a mistake, not a token. */
#define MAX_EXTRA_CLAIMS 32

static void jwt_usage(FILE *out)
{
    fprintf(out, "Usage: uplinkctl jwt UPLINK [--config FILE] [-v]\n"
                 "       uplinkctl jwt --key KEY [OPTIONS]\n"
                 "Sign a JWT as uplinkd would and print it (e.g. as an MQTT password).\n\n"
                 "With UPLINK: the token that configured uplink would send now (its key,\n"
                 "alg, kid, aud and profile claims), signed by the running uplinkd (uplinkctl\n"
                 "-s SOCKET); when uplinkd is not running, signed here from the configuration\n"
                 "file. stderr says which. uplinkctl --json prints it as JSON.\n"
                 "      --config FILE        configuration for the local fallback (default\n"
                 "                           " UPLINKD_DEFAULT_CONFIG ")\n\n"
                 "Without UPLINK, from the options alone:\n"
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

/* Prints the decoded header and claims of @token on stderr (-v), or adds
 * them to @json. */
static void jwt_describe(const char *token, json_t *json)
{
    const char *dot1 = strchr(token, '.');
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    const char *start[2] = {token, dot1 ? dot1 + 1 : NULL};
    const char *end[2] = {dot1, dot2};
    static const char *const names[2] = {"header", "claims"};

    for (int i = 0; i < 2 && dot2; i++) {
        unsigned char *text = NULL;
        size_t len = 0;
        if (jwt_base64url_decode(start[i], (size_t)(end[i] - start[i]), &text, &len) < 0)
            continue;
        if (json)
            json_object_set_new(json, names[i], json_loadb((const char *)text, len, 0, NULL));
        else
            fprintf(stderr, "%s: %.*s\n", names[i], (int)len, text);
        free(text);
    }
}

/* Prints @token (stdout) the way the caller asked. Returns the exit status. */
static int jwt_print(const char *name, const char *token, long long expires_at, const char *source,
                     bool json_output, bool verbose)
{
    if (json_output) {
        json_t *root = json_pack("{s:s, s:s, s:I, s:s}", "uplink", name, "token", token, "exp",
                                 (json_int_t)expires_at, "source", source);
        if (root == NULL)
            return 1;
        jwt_describe(token, root);
        char *text = json_dumps(root, JSON_COMPACT);
        json_decref(root);
        if (text == NULL)
            return 1;
        printf("%s\n", text);
        free(text);
    } else {
        if (verbose)
            jwt_describe(token, NULL);
        printf("%s\n", token);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

/* No daemon: sign from the configuration, exactly as the uplink does
 * (conn_copy_jwt in uplink.c: conf_load() resolved the profile's aud, kid
 * and sub into auth; the clock check comes first). */
static int jwt_sign_from_config(const struct conf *conf, const char *name, char **token,
                                time_t *expires_at)
{
    const struct conf_uplink *uc = conf_uplink_find(conf, name);
    struct jwt_signer *signer = NULL;
    struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
    struct jwt_claims claims;
    char err[KEYS_ERR_SIZE];
    int rc = 1;

    if (uc == NULL) {
        fprintf(stderr, "uplinkctl jwt: %s has no uplink named \"%s\" (known:", conf->path, name);
        for (size_t i = 0; i < conf->uplink_count; i++)
            fprintf(stderr, " %s", conf->uplinks[i].name);
        fprintf(stderr, ")\n");
        return 1;
    }
    if (uc->auth.type != CONF_AUTH_JWT) {
        fprintf(stderr, "uplinkctl jwt: uplink \"%s\" does not use JWT auth (auth.type is %s)\n",
                name, uc->auth.type == CONF_AUTH_BASIC ? "basic" : "none");
        return 1;
    }
    const struct conf_jwt *jwt = &uc->auth.jwt;
    time_t now = time(NULL);
    if (jwt_clock_check(now, jwt->clock_check == CONF_CLOCK_SYNC, NULL, err, sizeof(err)) < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        return 1;
    }
    conf_jwt_claims(jwt, extra, &claims);
    if (jwt_signer_new(jwt->private_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, err,
                       sizeof(err)) < 0 ||
        jwt_sign(signer, &claims, now, token, expires_at, err, sizeof(err)) < 0) {
        fprintf(stderr, "uplinkctl jwt: uplink \"%s\": %s\n", name, err);
        goto out;
    }
    rc = 0;
out:
    jwt_signer_free(signer);
    return rc;
}

/* Asks the daemon at @socket_path for uplink @name's token. Returns 0
 * (printed), UPLINKCTL_DOWN, or an exit status after printing why. */
static int jwt_ask_daemon(const char *socket_path, const char *name, bool json_output, bool verbose)
{
    char request[UPLINKD_CTL_MAX_REQUEST], *answer = NULL;
    json_error_t error;
    int n = snprintf(request, sizeof(request), "jwt %s\n", name);
    int rc = uplinkctl_ask(socket_path, request, (size_t)n, true, &answer);

    if (rc != 0)
        return rc;
    json_t *root = json_loads(answer, 0, &error);
    free(answer);
    if (root == NULL) {
        fprintf(stderr, "uplinkctl jwt: the daemon's answer is not JSON (%s)\n", error.text);
        return 2;
    }
    const char *token = json_string_value(json_object_get(root, "token"));
    if (token == NULL) {
        const char *words = json_string_value(json_object_get(root, "error"));
        fprintf(stderr, "uplinkctl jwt: uplinkd: %s\n", words ? words : "no token in the answer");
        json_decref(root);
        return 1;
    }
    fprintf(stderr, "uplinkctl jwt: signed by the running uplinkd (%s)\n", socket_path);
    rc = jwt_print(name, token, (long long)json_integer_value(json_object_get(root, "exp")),
                   "daemon", json_output, verbose);
    json_decref(root);
    return rc;
}

/* `uplinkctl jwt UPLINK`: the daemon first, the configuration file second. */
static int jwt_for_uplink(const char *name, const char *config_path, const char *socket_path,
                          bool socket_given, bool json_output, bool verbose)
{
    struct conf *conf = NULL;
    char *errors = NULL, *token = NULL;
    time_t expires_at = 0;

    if (strlen(name) > 64 || strpbrk(name, " \t\n") != NULL) {
        fprintf(stderr, "uplinkctl jwt: \"%s\" is not an uplink name\n", name);
        return 2;
    }
    int rc = jwt_ask_daemon(socket_path, name, json_output, verbose);
    if (rc != UPLINKCTL_DOWN)
        return rc;
    rc = conf_load(config_path, &conf, &errors);
    if (rc < 0) {
        fprintf(stderr, "%s%s", errors ? errors : strerror(-rc),
                errors && errors[0] && errors[strlen(errors) - 1] == '\n' ? "" : "\n");
        fprintf(stderr,
                "uplinkctl jwt: uplinkd is not running (nothing listens on %s), and the "
                "configuration %s cannot be loaded to sign here (give --config FILE)\n",
                socket_path, config_path);
        free(errors);
        return 1;
    }
    /* A daemon on the control.socket this configuration names, when no -s
     * said where to look. */
    if (!socket_given && strcmp(conf->control_socket, socket_path) != 0) {
        rc = jwt_ask_daemon(conf->control_socket, name, json_output, verbose);
        if (rc != UPLINKCTL_DOWN) {
            conf_free(conf);
            return rc;
        }
    }
    rc = jwt_sign_from_config(conf, name, &token, &expires_at);
    if (rc == 0) {
        fprintf(stderr,
                "uplinkctl jwt: uplinkd is not running (nothing listens on %s); signed here with "
                "the key and claims of uplink \"%s\" in %s\n",
                socket_path, name, config_path);
        rc = jwt_print(name, token, (long long)expires_at, "local", json_output, verbose);
    }
    if (token) {
        explicit_bzero(token, strlen(token));
        free(token);
    }
    conf_free(conf);
    return rc;
}

/* Everything `uplinkctl jwt` was given. */
struct jwt_cli {
    const char *config_path;
    const char *offline_option; /* one given, for "not with UPLINK" */
    struct jwt_claim extra[MAX_EXTRA_CLAIMS];
    struct jwt_claims claims;
    struct keys_options key_options;
    const char *key_spec, *alg_name, *kid;
    bool require_sync, verbose, json_output;
    time_t now;
};

/* Parse the options into @cli; returns -1 to go on, else the exit status
 * (0 after --help, 2 for a usage error, said on stderr). */
static int jwt_parse_options(int argc, char **argv, struct jwt_cli *cli)
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
        {"config", required_argument, NULL, 'F'},
        {"json", no_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    int opt;

    optind = 0; /* GNU getopt: full re-initialisation for this argv */
    while ((opt = getopt_long(argc, argv, "k:a:A:l:m:c:p:vjh", options, NULL)) != -1) {
        for (const struct option *o = options; o->name && opt != 'v' && opt != 'F' && opt != 'j';
             o++)
            if (o->val == opt)
                cli->offline_option = o->name;
        switch (opt) {
        case 'F':
            cli->config_path = optarg;
            break;
        case 'j':
            cli->json_output = true;
            break;
        case 'k':
            cli->key_spec = optarg;
            break;
        case 'a':
            cli->alg_name = optarg;
            break;
        case 'A':
            cli->claims.aud = optarg;
            break;
        case 'l':
            if (parse_duration_s("--lifetime", optarg, &cli->claims.lifetime_s) < 0)
                return 2;
            if (cli->claims.lifetime_s == 0) {
                fprintf(stderr, "uplinkctl jwt: --lifetime must be at least 1s\n");
                return 2;
            }
            break;
        case 'm':
            if (parse_duration_s("--max-lifetime", optarg, &cli->claims.max_lifetime_s) < 0)
                return 2;
            break;
        case 'S':
            if (parse_duration_s("--skew", optarg, &cli->claims.skew_s) < 0)
                return 2;
            break;
        case 'K':
            cli->kid = optarg;
            break;
        case 'c': {
            char *eq = strchr(optarg, '=');
            if (eq == NULL || eq == optarg) {
                fprintf(stderr, "uplinkctl jwt: --claim \"%s\" is not NAME=VALUE\n", optarg);
                return 2;
            }
            if (cli->claims.extra_count == MAX_EXTRA_CLAIMS) {
                fprintf(stderr, "uplinkctl jwt: more than %d --claim options\n", MAX_EXTRA_CLAIMS);
                return 2;
            }
            *eq = '\0'; /* argv strings are ours to modify (C11 §5.1.2.2.1) */
            cli->extra[cli->claims.extra_count++] =
                (struct jwt_claim){.name = optarg, .value = eq + 1};
            break;
        }
        case 'p':
            cli->key_options.passphrase_file = optarg;
            break;
        case 'M':
            cli->key_options.pkcs11_module = optarg;
            break;
        case 'R':
            cli->require_sync = true;
            break;
        case 'N': {
            char *end;
            errno = 0;
            long long value = strtoll(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0' || value < 0) {
                fprintf(stderr, "uplinkctl jwt: --now \"%s\" is not a number of seconds\n", optarg);
                return 2;
            }
            cli->now = (time_t)value;
            break;
        }
        case 'v':
            cli->verbose = true;
            break;
        case 'h':
            jwt_usage(stdout);
            return 0;
        default:
            jwt_usage(stderr);
            return 2;
        }
    }
    return -1;
}

/* Sign a token from the options alone (no uplink) and print it. */
static int jwt_sign_offline(struct jwt_cli *cli)
{
    char err[KEYS_ERR_SIZE];
    EVP_PKEY *key = NULL;
    struct jwt_signer *signer = NULL;
    char *token = NULL;
    time_t expires_at = 0;
    enum jwt_alg alg;
    int rc;

    if (cli->key_spec == NULL) {
        fprintf(stderr, "uplinkctl jwt: --key is required\n");
        jwt_usage(stderr);
        return 2;
    }
    if (cli->alg_name != NULL && jwt_alg_parse(cli->alg_name, &alg) < 0) {
        fprintf(stderr, "uplinkctl jwt: unknown --alg \"%s\" (RS256, PS256, ES256, ES384)\n",
                cli->alg_name);
        return 2;
    }

    rc = keys_load_private(cli->key_spec, &cli->key_options, &key, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        return 1;
    }
    if (cli->alg_name == NULL && jwt_alg_for_key(key, &alg) < 0) {
        fprintf(stderr, "uplinkctl jwt: the key %s is neither RSA nor EC; give --alg\n",
                cli->key_spec);
        rc = 1;
        goto out;
    }
    const char *kid = cli->kid;
    enum jwt_kid_mode kid_mode = kid == NULL                ? JWT_KID_NONE
                                 : strcmp(kid, "auto") == 0 ? JWT_KID_FINGERPRINT
                                                            : JWT_KID_VALUE;
    rc = jwt_signer_new(key, alg, kid_mode, kid, &signer, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s: %s\n", cli->key_spec, err);
        rc = 1;
        goto out;
    }
    if (cli->require_sync && jwt_clock_check(cli->now, true, NULL, err, sizeof(err)) < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        rc = 1;
        goto out;
    }
    rc = jwt_sign(signer, &cli->claims, cli->now, &token, &expires_at, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl jwt: %s\n", err);
        rc = 1;
        goto out;
    }
    if (cli->verbose) {
        const char *signer_kid = jwt_signer_kid(signer);
        fprintf(stderr, "alg: %s\nkid: %s\niat: %lld\nexp: %lld\n", jwt_alg_name(alg),
                signer_kid ? signer_kid : "(none)",
                (long long)(cli->now - (time_t)cli->claims.skew_s), (long long)expires_at);
    }
    printf("%s\n", token);
    rc = fflush(stdout) == 0 ? 0 : 1;

out:
    free(token);
    jwt_signer_free(signer);
    EVP_PKEY_free(key);
    return rc;
}

int uplinkctl_jwt_main(int argc, char **argv, const char *socket_path, bool socket_given,
                       bool json_output)
{
    struct jwt_cli cli = {
        .config_path = UPLINKD_DEFAULT_CONFIG,
        .claims = {.skew_s = JWT_DEFAULT_SKEW_S},
        .json_output = json_output,
        .now = time(NULL),
    };
    int rc;

    cli.claims.extra = cli.extra;
    rc = jwt_parse_options(argc, argv, &cli);
    if (rc >= 0)
        return rc;
    if (optind < argc) {
        if (optind + 1 < argc) {
            fprintf(stderr, "uplinkctl jwt: unexpected argument \"%s\"\n", argv[optind + 1]);
            return 2;
        }
        if (cli.offline_option != NULL) {
            fprintf(stderr,
                    "uplinkctl jwt: --%s signs from the options; with uplink \"%s\" the key and "
                    "claims come from its configuration: give one or the other\n",
                    cli.offline_option, argv[optind]);
            return 2;
        }
        return jwt_for_uplink(argv[optind], cli.config_path, socket_path, socket_given,
                              cli.json_output, cli.verbose);
    }
    return jwt_sign_offline(&cli);
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
