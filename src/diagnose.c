/* diagnose.c - step-by-step connection diagnosis (see diagnose.h and
 * docs/diagnostics.md).
 *
 * Every step prints one line "STEP: OK ..." or "STEP: FAILED ...", indented
 * details below it, and for a failure a "fix:" line. The wording follows
 * what users actually get wrong (DESIGN.md "Why it exists"): a CA that did
 * not issue the server's certificate, an IP address where a managed broker
 * needs SNI, a certificate past its date, credentials the broker refuses.
 *
 * The code is plain blocking I/O with timeouts: poll() bounds the TCP
 * connect and every read, SO_RCVTIMEO/SO_SNDTIMEO bound what OpenSSL does
 * inside SSL_connect().
 */
#include "diagnose.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "conf.h"
#include "jwt.h"
#include "keys.h"
#include "mqtt_codec.h"
#include "profile_spec.h"
#include "tlscheck.h"
#include "util.h"

#define DEFAULT_TIMEOUT_MS 10000u
/* A CONNACK is 4 bytes; anything the server sends first is read into this. */
#define READ_BUF_SIZE 4096

/* --- output ---------------------------------------------------------------- */

static void say(FILE *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void say(FILE *out, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
    fflush(out);
}

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static const char *format_time(time_t t, char *buf, size_t size)
{
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(buf, size, "(unreadable date)");
    return buf;
}

static const char *format_asn1(const ASN1_TIME *t, char *buf, size_t size)
{
    struct tm tm;

    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1)
        snprintf(buf, size, "(unreadable date)");
    else
        strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm);
    return buf;
}

static void name_oneline(const X509_NAME *name, char *out, size_t size)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL;

    out[0] = '\0';
    if (bio == NULL)
        return;
    if (X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0) {
        long len = BIO_get_mem_data(bio, &data);
        snprintf(out, size, "%.*s", (int)len, data);
    }
    BIO_free(bio);
}

/* The DNS and IP subjectAltNames of @cert, comma-separated, for a
 * "certificate is for ..." hint. */
static void cert_names(X509 *cert, char *out, size_t size)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    size_t used = 0;

    out[0] = '\0';
    for (int i = 0; names != NULL && i < sk_GENERAL_NAME_num(names) && used < size; i++) {
        const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        char ip[INET6_ADDRSTRLEN] = "";
        int n = 0;

        if (name->type == GEN_DNS) {
            n = snprintf(out + used, size - used, "%sDNS:%.*s", used ? ", " : "",
                         ASN1_STRING_length(name->d.dNSName),
                         (const char *)ASN1_STRING_get0_data(name->d.dNSName));
        } else if (name->type == GEN_IPADD) {
            int len = ASN1_STRING_length(name->d.iPAddress);
            const unsigned char *data = ASN1_STRING_get0_data(name->d.iPAddress);
            inet_ntop(len == 4 ? AF_INET : AF_INET6, data, ip, sizeof(ip));
            if (len == 4 || len == 16)
                n = snprintf(out + used, size - used, "%sIP:%s", used ? ", " : "", ip);
        }
        if (n > 0)
            used += (size_t)n;
    }
    GENERAL_NAMES_free(names);
    if (out[0] == '\0') {
        char subject[256];
        name_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
        snprintf(out, size, "no subjectAltName; subject %s", subject);
    }
}

/* --- settings -------------------------------------------------------------- */

/* The TLS settings as uplink.c applies them. */
struct tls_settings {
    int min_version;  /* TLS1_2_VERSION or TLS1_3_VERSION */
    const char *alpn; /* one protocol name, or NULL */
    bool insecure;    /* tls.insecure: no host name check; the chain is still verified */
};

static void tls_settings_get(const struct conf_uplink *uplink, struct tls_settings *out)
{
    *out = (struct tls_settings){
        .min_version = uplink->tls.min_version == CONF_TLS_1_3 ? TLS1_3_VERSION : TLS1_2_VERSION,
        .alpn = uplink->tls.alpn,
        .insecure = uplink->tls.insecure,
    };
}

/* Signs the token uplinkd would send now, with the key conf_load() loaded.
 * Returns 0 with *token (malloc'd) set, 0 with *token NULL when the uplink
 * does not use JWT, or a negative errno after printing why (a clock uplinkd
 * would not sign with counts: then the daemon does not connect either). */
static int jwt_token_get(const struct conf_uplink *uplink, char **token, FILE *out)
{
    const struct conf_jwt *jwt = &uplink->auth.jwt;
    struct jwt_claim extra[CONF_JWT_MAX_CLAIMS];
    struct jwt_claims claims;
    struct jwt_signer *signer = NULL;
    char err[KEYS_ERR_SIZE];
    time_t now = time(NULL);
    int rc;

    *token = NULL;
    if (uplink->auth.type != CONF_AUTH_JWT)
        return 0;
    conf_jwt_claims(jwt, extra, &claims); /* conf_load() caps auth.claims */
    rc = jwt_clock_check(now, jwt->clock_check == CONF_CLOCK_SYNC, NULL, err, sizeof(err));
    if (rc < 0) {
        say(out, "MQTT: FAILED: uplinkd would not sign a token now: %s", err);
        say(out, "  fix: get the clock synchronised (timedatectl; systemd-timesyncd or chrony), "
                 "or set auth.clock_check: build-date on a gateway without time sync");
        return rc;
    }
    rc = jwt_signer_new(jwt->private_key, jwt->alg, jwt->kid_mode, jwt->kid, &signer, err,
                        sizeof(err));
    if (rc == 0)
        rc = jwt_sign(signer, &claims, now, token, NULL, err, sizeof(err));
    jwt_signer_free(signer);
    if (rc < 0) {
        say(out, "MQTT: FAILED: cannot sign a token with auth.key %s: %s", jwt->key, err);
        say(out, "  fix: check auth.key and auth.alg (uplinkctl jwt shows the same error)");
    }
    return rc;
}

/* --- running daemon -------------------------------------------------------- */

/* Asks the running uplinkd (control socket) for @name's state. Returns true
 * when it answers and the uplink is online, so a CONNECT with its client id
 * would take over its session. A daemon that is not running or does not
 * answer within @timeout_ms counts as "not online". */
static bool daemon_uplink_online(const char *socket_path, const char *name, unsigned timeout_ms)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char answer[65536], pattern[128];
    size_t len = 0;
    bool online = false;
    int fd;

    if (socket_path == NULL || strlen(socket_path) >= sizeof(addr.sun_path))
        return false;
    strcpy(addr.sun_path, socket_path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || write(fd, "status\n", 7) != 7)
        goto out;
    /* Bounded: the buffer size and the deadline end the loop. */
    double deadline = now_ms() + timeout_ms;
    while (len + 1 < sizeof(answer)) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        double left = deadline - now_ms();
        if (left <= 0 || poll(&pfd, 1, (int)left + 1) <= 0)
            break;
        ssize_t n = read(fd, answer + len, sizeof(answer) - len - 1);
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    answer[len] = '\0';
    /* {"name":"NAME",...,"state":"ONLINE",...}: uplink names are
     * [A-Za-z0-9_-], so they appear in the JSON unescaped. */
    snprintf(pattern, sizeof(pattern), "\"name\":\"%s\"", name);
    const char *entry = strstr(answer, pattern);
    if (entry != NULL) {
        const char *end = strchr(entry, '}');
        const char *state = strstr(entry, "\"state\":\"");
        if (state != NULL && (end == NULL || state < end))
            online = strncasecmp(state + 9, "online\"", 7) == 0;
    }
out:
    close(fd);
    return online;
}

/* --- DNS ------------------------------------------------------------------- */

static int step_dns(const struct conf_uplink *uplink, struct addrinfo **result, FILE *out)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_protocol = IPPROTO_TCP};
    char port[8];

    snprintf(port, sizeof(port), "%u", (unsigned)uplink->port);
    double started = now_ms();
    int rc = getaddrinfo(uplink->host, port, &hints, result);
    double took = now_ms() - started;
    if (rc != 0) {
        const char *fix;
        switch (rc) {
        case EAI_NONAME:
#ifdef EAI_NODATA
        case EAI_NODATA:
#endif
            fix = "the name does not exist: check uplinks[].host for a typo, or that this "
                  "network's DNS knows it (getent hosts NAME)";
            break;
        case EAI_AGAIN:
            fix = "no DNS server answered: check the network and /etc/resolv.conf (or "
                  "systemd-resolved: resolvectl status)";
            break;
        case EAI_FAIL:
            fix = "the DNS server failed: try again, or check /etc/resolv.conf";
            break;
        default:
            fix = "check uplinks[].host and the resolver configuration";
            break;
        }
        say(out, "DNS: FAILED: %s does not resolve: %s (after %.1f ms)", uplink->host,
            rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc), took);
        say(out, "  fix: %s", fix);
        return -ENOENT;
    }
    size_t count = 0;
    for (const struct addrinfo *ai = *result; ai != NULL; ai = ai->ai_next)
        count++;
    say(out, "DNS: OK: %s resolves to %zu address%s in %.1f ms", uplink->host, count,
        count == 1 ? "" : "es", took);
    for (const struct addrinfo *ai = *result; ai != NULL; ai = ai->ai_next) {
        char host[NI_MAXHOST];
        if (getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof(host), NULL, 0, NI_NUMERICHOST) ==
            0)
            say(out, "  %s", host);
    }
    return 0;
}

/* --- TCP ------------------------------------------------------------------- */

static const char *connect_error_words(int err)
{
    switch (err) {
    case ECONNREFUSED:
        return "connection refused: nothing listens on that port";
    case ETIMEDOUT:
        return "no answer: a firewall drops the packets, or the host is down";
    case ENETUNREACH:
        return "network unreachable: no route to that network";
    case EHOSTUNREACH:
        return "host unreachable";
    case EADDRNOTAVAIL:
        return "address not available here (e.g. IPv6 without an IPv6 address)";
    default:
        return strerror(err);
    }
}

/* Connects to one address within @timeout_ms; returns the socket (blocking,
 * with send/receive timeouts set) or a negative errno. */
static int tcp_connect_one(const struct addrinfo *ai, unsigned timeout_ms)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    int err = 0;
    socklen_t err_len = sizeof(err);

    if (fd < 0)
        return -errno;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            err = errno;
            goto err_after_socket;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int n = poll(&pfd, 1, (int)timeout_ms);
        if (n == 0) {
            err = ETIMEDOUT;
            goto err_after_socket;
        }
        if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0) {
            err = errno;
            goto err_after_socket;
        }
        if (err != 0)
            goto err_after_socket;
    }
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0) {
        err = errno;
        goto err_after_socket;
    }
    return fd;

err_after_socket:
    close(fd);
    return -err;
}

static int step_tcp(const struct conf_uplink *uplink, const struct addrinfo *addresses,
                    unsigned timeout_ms, FILE *out)
{
    char lines[8][NI_MAXHOST + 160];
    size_t line_count = 0;
    bool refused_only = true;

    for (const struct addrinfo *ai = addresses; ai != NULL; ai = ai->ai_next) {
        char host[NI_MAXHOST] = "?";
        getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof(host), NULL, 0, NI_NUMERICHOST);
        double started = now_ms();
        int fd = tcp_connect_one(ai, timeout_ms);
        double took = now_ms() - started;
        if (fd >= 0) {
            say(out, "TCP: OK: connected to %s port %u in %.1f ms", host, (unsigned)uplink->port,
                took);
            for (size_t i = 0; i < line_count; i++)
                say(out, "  (before: %s)", lines[i]);
            return fd;
        }
        if (-fd != ECONNREFUSED)
            refused_only = false;
        if (line_count < ARRAY_SIZE(lines))
            snprintf(lines[line_count++], sizeof(lines[0]), "%s port %u: %s (after %.1f ms)", host,
                     (unsigned)uplink->port, connect_error_words(-fd), took);
    }
    say(out, "TCP: FAILED: no address of %s accepts a connection on port %u", uplink->host,
        (unsigned)uplink->port);
    for (size_t i = 0; i < line_count; i++)
        say(out, "  %s", lines[i]);
    if (refused_only)
        say(out, "  fix: check uplinks[].port (MQTT over TLS is usually 8883, plain 1883, "
                 "some clouds use 443) and that the broker runs");
    else
        say(out,
            "  fix: check the network path: firewall rules (outgoing port %u), proxy, "
            "routing",
            (unsigned)uplink->port);
    return -ECONNREFUSED;
}

/* --- TLS ------------------------------------------------------------------- */

/* What OpenSSL told us about the handshake, through its callbacks. */
struct tls_trace {
    bool server_spoke;        /* at least one handshake message came from the server */
    char alert_received[64];  /* the last alert the server sent, long description */
    char alert_sent[64];      /* the last alert we sent */
    int verify_error;         /* first certificate verification problem, X509_V_OK if none */
    int verify_depth;         /* its depth in the chain (0 = the server's own cert) */
    char verify_subject[256]; /* of the certificate it concerns */
    char verify_issuer[256];
    char verify_names[512]; /* SANs of that certificate (hostname mismatch) */
};

static int trace_index = -1; /* SSL ex_data slot for the trace */

static void tls_info_cb(const SSL *ssl, int where, int value)
{
    struct tls_trace *trace = SSL_get_ex_data(ssl, trace_index);

    if (trace == NULL || !(where & SSL_CB_ALERT))
        return;
    /* OpenSSL 3.0 has no text for TLS 1.3's certificate_required (RFC 8446
     * §6.2: 116), the alert a server sends when no certificate came. */
    int description = value & 0xff;
    snprintf((where & SSL_CB_READ) ? trace->alert_received : trace->alert_sent,
             sizeof(trace->alert_received), "%s",
             description == 116 ? "certificate required" : SSL_alert_desc_string_long(value));
}

static void tls_msg_cb(int write_p, int version, int content_type, const void *buf, size_t len,
                       SSL *ssl, void *arg)
{
    struct tls_trace *trace = SSL_get_ex_data(ssl, trace_index);

    if (trace != NULL && !write_p && content_type == SSL3_RT_HANDSHAKE)
        trace->server_spoke = true;
}

/* Records the first verification problem and lets the handshake go on, so
 * the chain can be printed; the caller refuses the connection afterwards
 * and sends nothing over it. */
static int tls_verify_cb(int preverify_ok, X509_STORE_CTX *store)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    struct tls_trace *trace = ssl ? SSL_get_ex_data(ssl, trace_index) : NULL;

    if (!preverify_ok && trace != NULL && trace->verify_error == X509_V_OK) {
        X509 *cert = X509_STORE_CTX_get_current_cert(store);
        trace->verify_error = X509_STORE_CTX_get_error(store);
        trace->verify_depth = X509_STORE_CTX_get_error_depth(store);
        if (cert != NULL) {
            name_oneline(X509_get_subject_name(cert), trace->verify_subject,
                         sizeof(trace->verify_subject));
            name_oneline(X509_get_issuer_name(cert), trace->verify_issuer,
                         sizeof(trace->verify_issuer));
            cert_names(cert, trace->verify_names, sizeof(trace->verify_names));
        }
    }
    return 1;
}

static bool host_is_address(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

static void print_server_chain(SSL *ssl, FILE *out)
{
    STACK_OF(X509) *chain = SSL_get_peer_cert_chain(ssl);
    char subject[256], issuer[256], from[64], until[64];
    time_t now = time(NULL);

    if (chain == NULL || sk_X509_num(chain) == 0) {
        say(out, "  server chain: none received");
        return;
    }
    say(out, "  server chain (%d certificate%s, as sent):", sk_X509_num(chain),
        sk_X509_num(chain) == 1 ? "" : "s");
    for (int i = 0; i < sk_X509_num(chain); i++) {
        X509 *cert = sk_X509_value(chain, i);
        const char *state = "";
        name_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
        name_oneline(X509_get_issuer_name(cert), issuer, sizeof(issuer));
        if (X509_cmp_time(X509_get0_notAfter(cert), &now) != 1)
            state = "  EXPIRED";
        else if (X509_cmp_time(X509_get0_notBefore(cert), &now) != -1)
            state = "  NOT YET VALID";
        say(out, "    %d subject: %s", i, subject);
        say(out, "      issuer:  %s", issuer);
        say(out, "      valid:   %s to %s%s",
            format_asn1(X509_get0_notBefore(cert), from, sizeof(from)),
            format_asn1(X509_get0_notAfter(cert), until, sizeof(until)), state);
        if (i == 0) {
            char names[512];
            cert_names(cert, names, sizeof(names));
            say(out, "      names:   %s", names);
        }
    }
}

/* Explains a verification problem (the handshake itself worked). */
static void explain_verify(const struct tls_trace *trace, const struct conf_uplink *uplink,
                           const char *ca_desc, FILE *out)
{
    int error = trace->verify_error;

    switch (error) {
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
        say(out,
            "TLS: FAILED: unknown CA: the server's certificate chain does not lead to a CA "
            "in %s (%s)",
            ca_desc, X509_verify_cert_error_string(error));
        say(out, "  untrusted certificate %d: %s", trace->verify_depth, trace->verify_subject);
        say(out, "  issued by: %s", trace->verify_issuer);
        say(out, "  fix: set tls.ca to the CA that issued the server's certificate (the \"issued "
                 "by\" above; the cloud's documentation names it), or use tls.ca: system for a "
                 "public CA");
        break;
    case X509_V_ERR_CERT_HAS_EXPIRED:
        say(out, "TLS: FAILED: the server's certificate %d (%s) has expired", trace->verify_depth,
            trace->verify_subject);
        say(out, "  fix: if the dates above are in the past, the server must renew it; if they "
                 "look right, this machine's clock is wrong (date -u; timedatectl)");
        break;
    case X509_V_ERR_CERT_NOT_YET_VALID:
        say(out, "TLS: FAILED: the server's certificate %d (%s) is not valid yet",
            trace->verify_depth, trace->verify_subject);
        say(out, "  fix: this machine's clock is probably behind (date -u); enable time "
                 "synchronisation (timedatectl set-ntp true)");
        break;
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        say(out,
            "TLS: FAILED: hostname mismatch: the server's certificate is not issued for "
            "\"%s\"",
            uplink->host);
        say(out, "  the certificate is for: %s", trace->verify_names);
        say(out, "  fix: set uplinks[].host to one of those names (the exact endpoint name from "
                 "the cloud's console), not an IP address or an alias");
        break;
    default:
        say(out, "TLS: FAILED: the server's certificate %d (%s) does not verify: %s",
            trace->verify_depth, trace->verify_subject, X509_verify_cert_error_string(error));
        say(out, "  fix: check tls.ca and the server's certificate chain");
        break;
    }
}

/* Explains a handshake that did not complete. */
static void explain_handshake(const struct tls_trace *trace, const struct conf_uplink *uplink,
                              const struct tls_settings *tls, bool sni_sent, int ssl_error,
                              int sys_errno, FILE *out)
{
    char reason[256] = "";
    unsigned long code = ERR_peek_last_error();
    const char *alert = trace->alert_received;

    if (code != 0)
        ERR_error_string_n(code, reason, sizeof(reason));
    if (reason[0] != '\0')
        say(out, "  OpenSSL: %s", reason);
    if (alert[0] != '\0')
        say(out, "  alert from the server: %s", alert);

    if ((ssl_error == SSL_ERROR_WANT_READ || ssl_error == SSL_ERROR_WANT_WRITE ||
         sys_errno == EAGAIN || sys_errno == EWOULDBLOCK) &&
        alert[0] == '\0') {
        say(out, "TLS: FAILED: the handshake got no answer in time");
        say(out, "  fix: the port may not be a TLS port (a plain MQTT port waits for CONNECT), or "
                 "the path drops packets; check uplinks[].port");
    } else if (strcmp(alert, "protocol version") == 0 || strstr(reason, "unsupported protocol") ||
               strstr(reason, "no protocols available")) {
        say(out,
            "TLS: FAILED: protocol version: the server and this client have no TLS version "
            "in common (this client offers TLS %s and later)",
            tls->min_version == TLS1_3_VERSION ? "1.3" : "1.2");
        say(out, "  fix: the server only speaks an older (insecure) TLS, or a newer one than "
                 "tls.min_version allows; use the cloud's current endpoint");
    } else if (strcmp(alert, "unrecognized name") == 0) {
        say(out, "TLS: FAILED: the server does not know the name \"%s\" sent as SNI",
            sni_sent ? uplink->host : "(none)");
        say(out, "  fix: set uplinks[].host to the exact endpoint name from the cloud's console");
    } else if (strcmp(alert, "handshake failure") == 0) {
        say(out, "TLS: FAILED: handshake failure: the server refused the handshake");
        say(out, "  fix: the server may require a client certificate (tls.cert, tls.key), SNI "
                 "(connect by host name, not IP), ALPN (tls.alpn), or a cipher this client does "
                 "not offer");
    } else if (strcmp(alert, "certificate required") == 0 ||
               strcmp(alert, "bad certificate") == 0 || strcmp(alert, "unknown CA") == 0 ||
               strcmp(alert, "certificate expired") == 0 ||
               strcmp(alert, "certificate unknown") == 0 ||
               strcmp(alert, "certificate revoked") == 0 || strcmp(alert, "access denied") == 0 ||
               strcmp(alert, "unsupported certificate") == 0) {
        say(out, "TLS: FAILED: the server rejected the client certificate (alert: %s)", alert);
        say(out, "  fix: %s",
            uplink->tls.cert == NULL
                ? "the server requires a client certificate: set tls.cert and tls.key"
                : "check that tls.cert is registered with the cloud, is still valid, and holds "
                  "the chain up to the CA the server trusts");
    } else if (strstr(reason, "wrong version number") || strstr(reason, "packet length too long") ||
               strstr(reason, "record layer failure") || strstr(reason, "http request")) {
        say(out, "TLS: FAILED: the server does not speak TLS on port %u", (unsigned)uplink->port);
        say(out, "  fix: use the broker's TLS port (usually 8883), or set tls.enabled: false for "
                 "a plain MQTT port");
    } else if (!trace->server_spoke) {
        say(out, "TLS: FAILED: the server closed the connection right after our ClientHello%s",
            sys_errno == ECONNRESET ? " (connection reset)" : "");
        if (!sni_sent)
            say(out,
                "  fix: no SNI was sent because host \"%s\" is an IP address; servers behind "
                "a name-based front (managed brokers, load balancers) need SNI: set "
                "uplinks[].host to the broker's host name",
                uplink->host);
        else
            say(out,
                "  fix: the server may not serve the name \"%s\" (SNI routing found no "
                "backend for it), or port %u is not its TLS port; check host and port%s",
                uplink->host, (unsigned)uplink->port,
                tls->alpn ? "" : " (some endpoints on port 443 also need tls.alpn)");
    } else {
        say(out, "TLS: FAILED: the handshake broke off (%s)",
            reason[0] ? reason : (sys_errno ? strerror(sys_errno) : "no details from OpenSSL"));
        say(out, "  fix: check port, tls.cert/tls.key and tls.ca; the server's log may say more");
    }
}

/* Our client certificate, checked locally before the handshake. Returns
 * false when it has a problem (already printed); the handshake still runs,
 * to show what the server says and sends. */
static bool check_client_cert(const struct conf_uplink *uplink, FILE *out)
{
    char err[TLSCHECK_MSG_SIZE], warning[TLSCHECK_MSG_SIZE], from[64], until[64];
    struct tlscheck_info info;

    if (uplink->tls.cert == NULL) {
        say(out, "  client certificate: none configured");
        return true;
    }
    struct keys_options key_options;
    tlscheck_key_options(uplink, &key_options);
    struct tlscheck_options options = {.key_options = &key_options};
    int rc = tlscheck_client_cert(uplink->tls.cert, uplink->tls.key, &options, time(NULL), &info,
                                  err, sizeof(err), warning, sizeof(warning));
    if (info.chain_len > 0) {
        say(out, "  client certificate: %s (%zu certificate%s in the file)", uplink->tls.cert,
            info.chain_len, info.chain_len == 1 ? "" : "s");
        say(out, "    subject: %s", info.subject);
        say(out, "    issuer:  %s", info.issuer);
        say(out, "    valid:   %s to %s", format_time(info.not_before, from, sizeof(from)),
            format_time(info.not_after, until, sizeof(until)));
    }
    if (rc < 0) {
        say(out, "  client certificate problem: %s", err);
        return false;
    }
    if (warning[0] != '\0')
        say(out, "  warning: %s", warning);
    return true;
}

/* The context for one diagnosis: CA, client certificate, versions. Returns
 * NULL after printing why. */
static SSL_CTX *tls_context(const struct conf_uplink *uplink, const struct tls_settings *tls,
                            const char *ca_desc, FILE *out)
{
    char err[KEYS_ERR_SIZE], reason[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    X509 *leaf = NULL;
    STACK_OF(X509) *chain = NULL;
    EVP_PKEY *key = NULL;

    if (ctx == NULL) {
        say(out, "TLS: FAILED: cannot create an OpenSSL context (out of memory?)");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, tls->min_version);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, tls_verify_cb);
    SSL_CTX_set_info_callback(ctx, tls_info_cb);
    SSL_CTX_set_msg_callback(ctx, tls_msg_cb);
    ERR_clear_error();
    if (uplink->tls.ca_file != NULL && !uplink->tls.ca_system) {
        if (SSL_CTX_load_verify_file(ctx, uplink->tls.ca_file) != 1) {
            ERR_error_string_n(ERR_peek_last_error(), reason, sizeof(reason));
            say(out, "TLS: FAILED: cannot load CA certificates from %s (%s)", ca_desc, reason);
            say(out, "  fix: tls.ca must be a PEM file of CA certificates (or \"system\")");
            goto err_after_ctx;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        say(out, "TLS: FAILED: cannot load the system CA store");
        say(out, "  fix: apt-get install ca-certificates");
        goto err_after_ctx;
    }
    if (uplink->tls.cert != NULL && uplink->tls.key != NULL) {
        /* The same key options as the daemon: a pkcs11: tls.key gets its
         * module and PIN the same way (tlscheck_key_options()). */
        struct keys_options key_options;
        tlscheck_key_options(uplink, &key_options);
        if (keys_load_cert_chain(uplink->tls.cert, &leaf, &chain, err, sizeof(err)) < 0 ||
            keys_load_private(uplink->tls.key, &key_options, &key, err, sizeof(err)) < 0) {
            say(out, "TLS: FAILED: %s", err);
            say(out,
                "  fix: point tls.cert and tls.key at the PEM certificate (chain) and its key");
            goto err_after_ctx;
        }
        /* override = 1: the chain goes out exactly as in the file, the CA
         * included when it is there (Cumulocity wants it). */
        if (SSL_CTX_use_cert_and_key(ctx, leaf, key, chain, 1) != 1) {
            ERR_error_string_n(ERR_peek_last_error(), reason, sizeof(reason));
            say(out, "TLS: FAILED: OpenSSL refuses tls.cert %s with tls.key %s (%s)",
                uplink->tls.cert, uplink->tls.key, reason);
            say(out, "  fix: tls.key must be the private key of the first certificate in tls.cert");
            goto err_after_ctx;
        }
    }
    if (tls->alpn != NULL) {
        size_t len = strlen(tls->alpn);
        unsigned char wire[256];
        if (len == 0 || len > 255) {
            say(out, "TLS: FAILED: tls.alpn \"%s\" is not 1 to 255 bytes", tls->alpn);
            goto err_after_ctx;
        }
        wire[0] = (unsigned char)len; /* RFC 7301 §3.1: length-prefixed names */
        memcpy(wire + 1, tls->alpn, len);
        SSL_CTX_set_alpn_protos(ctx, wire, (unsigned)len + 1);
    }
    X509_free(leaf);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
    return ctx;

err_after_ctx:
    X509_free(leaf);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}

/* TLS 1.3 (RFC 8446 §4.4.2.4): the server judges the client's certificate
 * after the client's side of the handshake is complete, so a refusal comes
 * as an alert after SSL_connect() succeeded. Waits briefly for the server's
 * first records after the handshake (session tickets, or that alert) and
 * returns true when the server refused. */
static bool tls_await_verdict(SSL *ssl, int fd, const struct tls_trace *trace)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    unsigned char byte;
    int flags = fcntl(fd, F_GETFL);

    /* OpenSSL servers send their tickets at once; a server that sends
     * nothing costs this wait. */
    if (poll(&pfd, 1, 500) <= 0 || flags < 0)
        return false;
    /* Non-blocking for this one look: SSL_peek() handles the tickets and
     * then says WANT_READ instead of waiting for application data. */
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int ret = SSL_peek(ssl, &byte, 1);
    int error = ret > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl, ret);
    fcntl(fd, F_SETFL, flags);
    ERR_clear_error();
    return trace->alert_received[0] != '\0' ||
           (error != SSL_ERROR_NONE && error != SSL_ERROR_WANT_READ &&
            error != SSL_ERROR_WANT_WRITE);
}

/* Runs the TLS step on the connected @fd. On success *ssl_out is the
 * connection to send CONNECT over. Returns 0 or -EPROTO (printed). */
static int step_tls(const struct conf_uplink *uplink, int fd, struct tls_trace *trace,
                    SSL_CTX **ctx_out, SSL **ssl_out, FILE *out)
{
    struct tls_settings tls;
    char ca_desc[300];
    bool sni_sent, client_cert_ok;
    SSL_CTX *ctx;
    SSL *ssl = NULL;
    int rc = -EPROTO;

    tls_settings_get(uplink, &tls);
    if (uplink->tls.ca_file != NULL && !uplink->tls.ca_system)
        snprintf(ca_desc, sizeof(ca_desc), "tls.ca %s", uplink->tls.ca_file);
    else
        snprintf(ca_desc, sizeof(ca_desc), "the system CA store (tls.ca: system)");

    client_cert_ok = check_client_cert(uplink, out);
    ctx = tls_context(uplink, &tls, ca_desc, out);
    if (ctx == NULL)
        return -EPROTO;
    ssl = SSL_new(ctx);
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1) {
        say(out, "TLS: FAILED: cannot create an OpenSSL connection (out of memory?)");
        goto err_after_ctx;
    }
    SSL_set_ex_data(ssl, trace_index, trace);
    /* RFC 6066 §3: "Literal IPv4 and IPv6 addresses are not permitted in
     * HostName", so an address gets no SNI and is verified as an address. */
    sni_sent = !host_is_address(uplink->host);
    if (sni_sent)
        SSL_set_tlsext_host_name(ssl, uplink->host);
    if (!tls.insecure) {
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (sni_sent)
            X509_VERIFY_PARAM_set1_host(param, uplink->host, 0);
        else
            X509_VERIFY_PARAM_set1_ip_asc(param, uplink->host);
    }
    say(out, "  SNI sent: %s", sni_sent ? uplink->host : "none (host is an IP address)");
    say(out, "  ALPN offered: %s", tls.alpn ? tls.alpn : "none");
    say(out, "  CA: %s", ca_desc);

    double started = now_ms();
    ERR_clear_error();
    errno = 0;
    int ret = SSL_connect(ssl);
    int sys_errno = errno;
    double took = now_ms() - started;
    if (ret != 1) {
        int ssl_error = SSL_get_error(ssl, ret);
        print_server_chain(ssl, out);
        explain_handshake(trace, uplink, &tls, sni_sent, ssl_error, sys_errno, out);
        goto err_after_ssl;
    }

    const unsigned char *alpn = NULL;
    unsigned alpn_len = 0;
    SSL_get0_alpn_selected(ssl, &alpn, &alpn_len);
    say(out, "  negotiated: %s, %s, ALPN %s%.*s (%.1f ms)", SSL_get_version(ssl),
        SSL_get_cipher_name(ssl), alpn_len ? "" : "none", (int)alpn_len,
        alpn ? (const char *)alpn : "", took);
    print_server_chain(ssl, out);
    if (tls.insecure)
        say(out, "  warning: tls.insecure is set: the server's host name is NOT checked; a "
                 "server with any certificate from a trusted CA is accepted");
    if (trace->verify_error != X509_V_OK) {
        explain_verify(trace, uplink, ca_desc, out);
        goto err_after_ssl;
    }
    if (!client_cert_ok) {
        say(out, "TLS: FAILED: the client certificate has a problem (above); a cloud refuses it "
                 "(handshake alert, or CONNACK 5)");
        say(out, "  fix: install a valid certificate and key pair as tls.cert / tls.key");
        goto err_after_ssl;
    }
    if (SSL_version(ssl) == TLS1_3_VERSION && tls_await_verdict(ssl, fd, trace)) {
        explain_handshake(trace, uplink, &tls, sni_sent, SSL_ERROR_SSL, 0, out);
        goto err_after_ssl;
    }
    if (tls.alpn != NULL && alpn_len == 0)
        say(out, "  warning: the server chose no ALPN protocol although \"%s\" was offered",
            tls.alpn);
    say(out, "TLS: OK: %s handshake with %s, server certificate verified%s", SSL_get_version(ssl),
        uplink->host, tls.insecure ? " (host name NOT checked: tls.insecure)" : "");
    *ctx_out = ctx;
    *ssl_out = ssl;
    return 0;

err_after_ssl:
    SSL_free(ssl);
err_after_ctx:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

/* --- MQTT ------------------------------------------------------------------ */

struct diag_conn {
    int fd;
    SSL *ssl; /* NULL without TLS */
};

/* Returns 0, or a negative errno (-ETIMEDOUT, -EPROTO for a TLS error). */
static int conn_write(struct diag_conn *conn, const uint8_t *data, size_t len)
{
    size_t done = 0;

    while (done < len) { /* each pass writes at least one byte or returns */
        ssize_t n;
        if (conn->ssl != NULL) {
            int ret = SSL_write(conn->ssl, data + done, (int)(len - done));
            if (ret <= 0)
                return SSL_get_error(conn->ssl, ret) == SSL_ERROR_SYSCALL && errno ? -errno
                                                                                   : -EPROTO;
            n = ret;
        } else {
            n = write(conn->fd, data + done, len - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
        }
        done += (size_t)n;
    }
    return 0;
}

/* Reads what is there (waiting at most until @deadline). Returns the number
 * of bytes, 0 at EOF, -ETIMEDOUT, -EPROTO (TLS error: see the trace) or
 * another negative errno. */
static int conn_read(struct diag_conn *conn, uint8_t *buf, size_t size, double deadline)
{
    if (conn->ssl == NULL || SSL_pending(conn->ssl) == 0) {
        struct pollfd pfd = {.fd = conn->fd, .events = POLLIN};
        double left = deadline - now_ms();
        int n = left > 0 ? poll(&pfd, 1, (int)left + 1) : 0;
        if (n == 0)
            return -ETIMEDOUT;
        if (n < 0)
            return -errno;
    }
    if (conn->ssl != NULL) {
        int ret = SSL_read(conn->ssl, buf, (int)size);
        if (ret > 0)
            return ret;
        switch (SSL_get_error(conn->ssl, ret)) {
        case SSL_ERROR_ZERO_RETURN:
            return 0;
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            return -ETIMEDOUT;
        case SSL_ERROR_SYSCALL:
            return errno ? -errno : 0;
        default:
            return -EPROTO;
        }
    }
    ssize_t n = read(conn->fd, buf, size);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
    return (int)n;
}

/* MQTT 3.1.1 §3.2.2.3 Table 3.1, in words, for the generic profile. */
static void explain_connack(int code, const struct conf_uplink *uplink, const char *client_id,
                            bool used_token, FILE *out)
{
    switch (code) {
    case MQTT_CONNACK_BAD_PROTOCOL:
        say(out, "CONNACK: FAILED: 1, unacceptable protocol version: the server does not accept "
                 "MQTT 3.1.1");
        say(out, "  fix: use an endpoint that speaks MQTT 3.1.1");
        break;
    case MQTT_CONNACK_ID_REJECTED:
        say(out, "CONNACK: FAILED: 2, identifier rejected: the server refuses client id \"%s\"",
            client_id);
        say(out, "  fix: set client_id to the id the cloud expects (its length and characters, "
                 "or the device id registered in the console)");
        break;
    case MQTT_CONNACK_SERVER_UNAVAILABLE:
        say(out, "CONNACK: FAILED: 3, server unavailable: the MQTT service cannot take the "
                 "connection now");
        say(out, "  fix: try again later; uplinkd keeps retrying with backoff");
        break;
    case MQTT_CONNACK_BAD_CREDENTIALS:
        say(out, "CONNACK: FAILED: 4, bad user name or password");
        say(out, "  fix: %s",
            used_token ? "the token was rejected: check auth.alg against the key "
                         "registered in the cloud, aud, the lifetime, and the clock"
                       : "check auth.username and auth.password (password_file)");
        break;
    case MQTT_CONNACK_NOT_AUTHORIZED:
        say(out, "CONNACK: FAILED: 5, not authorised: the server does not let this client "
                 "connect");
        say(out,
            "  fix: check the credentials%s (%s); with TLS, 5 may also mean the server "
            "requires SNI (connect by host name, not IP) or a client certificate (tls.cert, "
            "tls.key)%s",
            used_token ? " and the token" : "",
            uplink->auth.type == CONF_AUTH_BASIC ? "auth.username/auth.password"
            : uplink->auth.type == CONF_AUTH_JWT ? "the JWT: alg, aud, exp, the registered key"
                                                 : "none are configured: auth.type is none",
            uplink->tls.cert ? "; and that tls.cert is registered for this client id" : "");
        break;
    default:
        say(out, "CONNACK: FAILED: %d, a return code MQTT 3.1.1 does not define", code);
        say(out, "  fix: the server may speak MQTT 5 only; check the endpoint");
        break;
    }
}

/* The profile's own words after a refused CONNACK: what its cloud checks,
 * with the values this CONNECT carried (profile_spec.diagnose_refused). */
static void explain_connack_profile(int code, const struct conf_uplink *uplink,
                                    const char *client_id, FILE *out)
{
    const struct profile_spec *spec = uplink->spec; /* set by conf_load() */

    if (code != MQTT_CONNACK_BAD_CREDENTIALS && code != MQTT_CONNACK_NOT_AUTHORIZED)
        return;
    if (spec && spec->diagnose_refused) {
        spec->diagnose_refused(uplink, client_id, out);
        fflush(out);
    }
}

/* Cumulocity bootstrap: the device credentials the daemon stored in
 * <state_dir>/credentials/<uplink> ("<tenant>/<user>\n<password>\n"), in
 * *@text (the caller cleanses and frees it) split at *@password. */
static int c8y_stored_credentials(const struct conf *conf, const struct conf_uplink *uplink,
                                  char *path, size_t path_size, char **text, size_t *len_out,
                                  char **password)
{
    size_t len = 0;
    char *nl, *end;
    int rc;

    snprintf(path, path_size, "%s/credentials/%s", conf->state_dir, uplink->name);
    rc = util_read_file(path, 64 * 1024, text, &len);
    if (rc < 0)
        return rc;
    nl = strchr(*text, '\n');
    end = nl ? strchr(nl + 1, '\n') : NULL;
    if (!nl || !end || nl == *text) {
        OPENSSL_cleanse(*text, len);
        free(*text);
        *text = NULL;
        return -EINVAL;
    }
    *nl = '\0';
    *end = '\0';
    *password = nl + 1;
    *len_out = len;
    return 0;
}

/* The secrets step_mqtt() holds: a signed JWT, Cumulocity's stored device
 * credentials (stored_len bytes). Cleansed when freed. */
struct diag_secrets {
    char *token;
    char *stored;
    size_t stored_len;
};

static void diag_secrets_free(struct diag_secrets *s)
{
    if (s->stored != NULL) {
        OPENSSL_cleanse(s->stored, s->stored_len);
        free(s->stored);
    }
    if (s->token != NULL) {
        OPENSSL_cleanse(s->token, strlen(s->token));
        free(s->token);
    }
}

/* CONNECT's user name and password as the daemon would send them: a JWT
 * signed now, the profile's user (Cumulocity: the bootstrap's stored device
 * credentials), auth.username/password, or none; said on @out. The secrets
 * land in @s (diag_secrets_free()). Returns 0, or -EPROTO when no JWT could
 * be signed (said). */
static int mqtt_credentials(const struct conf *conf, const struct conf_uplink *uplink,
                            const struct profile_connect_id *ids, const char *profile,
                            struct mqtt_connect *connect, struct diag_secrets *s, FILE *out)
{
    if (jwt_token_get(uplink, &s->token, out) < 0)
        return -EPROTO;
    const char *token = s->token;
    if (token != NULL) {
        const char *username = uplink->auth.username ? uplink->auth.username : "unused";
        connect->has_username = true;
        connect->username = (struct mqtt_slice){(const uint8_t *)username, strlen(username)};
        connect->has_password = true;
        connect->password = (struct mqtt_slice){(const uint8_t *)token, strlen(token)};
        say(out, "  user name: %s, password: a JWT signed now with %s (%s):", username,
            uplink->auth.jwt.key, jwt_alg_name(uplink->auth.jwt.alg));
        diagnose_print_token(token, (long long)time(NULL), out);
    } else if (ids->username[0] != '\0') {
        const char *username = ids->username, *password = ids->password;
        char path[4096], *stored_password = NULL;
        say(out, "  token: no JWT configured");
        if (ids->c8y_bootstrap) {
            int crc = c8y_stored_credentials(conf, uplink, path, sizeof(path), &s->stored,
                                             &s->stored_len, &stored_password);
            if (crc == 0) {
                username = s->stored;
                password = stored_password;
                say(out, "  credentials: the device's, stored by the bootstrap in %s", path);
            } else {
                say(out,
                    "  credentials: no device credentials in %s (%s): the bootstrap user's, as "
                    "the daemon uses them until Cumulocity hands out the device's",
                    path, crc == -EINVAL ? "not a credentials file" : strerror(-crc));
            }
        }
        connect->has_username = true;
        connect->username = (struct mqtt_slice){(const uint8_t *)username, strlen(username)};
        connect->has_password = password != NULL;
        if (password)
            connect->password = (struct mqtt_slice){(const uint8_t *)password, strlen(password)};
        say(out, "  user name: %s (profile %s), password: %s", username, profile,
            ids->token[0] ? "a token made now (not shown)"
            : password    ? "(set, not shown)"
                          : "(none)");
        if (ids->token[0]) {
            char when[40];
            time_t exp = (time_t)ids->token_expires_at;
            struct tm tm;
            strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&exp, &tm));
            say(out, "  token: expires at %lld = %s", ids->token_expires_at, when);
        } else if (ids->token_error[0]) {
            say(out, "  token: none could be made: %s", ids->token_error);
        }
    } else if (uplink->auth.type == CONF_AUTH_BASIC) {
        say(out, "  token: no JWT configured");
        connect->has_username = uplink->auth.username != NULL;
        if (connect->has_username)
            connect->username = (struct mqtt_slice){(const uint8_t *)uplink->auth.username,
                                                    strlen(uplink->auth.username)};
        connect->has_password = uplink->auth.password != NULL && connect->has_username;
        if (connect->has_password)
            connect->password = (struct mqtt_slice){(const uint8_t *)uplink->auth.password,
                                                    strlen(uplink->auth.password)};
        say(out, "  user name: %s, password: %s",
            uplink->auth.username ? uplink->auth.username : "(none)",
            connect->has_password ? "(set, not shown)" : "(none)");
    } else {
        say(out, "  token: no JWT configured");
        say(out, "  credentials: none (auth.type none%s)",
            uplink->tls.cert ? "; the client certificate identifies this gateway" : "");
    }

    return 0;
}

/* Read the server's first packet until @timeout_ms: 0 with a CONNACK in
 * *@answer; otherwise what went wrong is said on @out and the result is
 * -EKEYREJECTED (a TLS alert: the client certificate was refused) or
 * -EPROTO. */
static int await_connack(struct diag_conn *conn, const struct tls_trace *trace,
                         const struct conf_uplink *uplink, unsigned timeout_ms,
                         struct mqtt_packet *answer, FILE *out)
{
    uint8_t buf[READ_BUF_SIZE];
    size_t have = 0;

    /* Bounded: each pass reads at least one byte into a fixed buffer or
     * returns. */
    double deadline = now_ms() + timeout_ms;
    size_t consumed = 0;
    const char *reason = NULL;
    for (;;) {
        int n = conn_read(conn, buf + have, sizeof(buf) - have, deadline);
        if (n == 0 || n == -ECONNRESET || n == -EPROTO || n == -EPIPE) {
            if (trace->alert_received[0] != '\0') {
                /* TLS 1.3: the server checks our certificate after the
                 * client's handshake is over, so its verdict arrives here
                 * (RFC 8446 §4.4.2.4). */
                say(out,
                    "CONNACK: FAILED: the server ended the TLS session before CONNACK with "
                    "alert \"%s\"",
                    trace->alert_received);
                say(out, "  this is a TLS failure: the server rejected the client certificate");
                say(out, "  fix: %s",
                    uplink->tls.cert == NULL
                        ? "the server requires a client certificate: set tls.cert and tls.key"
                        : "check that tls.cert is valid, registered with the cloud, and holds "
                          "the chain the server trusts");
                return -EKEYREJECTED;
            } else {
                say(out, "CONNACK: FAILED: the server closed the connection without a CONNACK%s",
                    n == -ECONNRESET ? " (connection reset)" : "");
                say(out, "  fix: the broker refused this client before answering: check client_id "
                         "(another client with the same id?), the credentials, the client "
                         "certificate, and the broker's log");
            }
            return -EPROTO;
        }
        if (n == -ETIMEDOUT) {
            say(out, "CONNACK: FAILED: no CONNACK within %.1f s", timeout_ms / 1000.0);
            say(out,
                "  fix: the server accepted the connection but does not answer MQTT: check "
                "that port %u is an MQTT port (not HTTP or WebSocket)",
                (unsigned)uplink->port);
            return -EPROTO;
        }
        if (n < 0) {
            say(out, "CONNACK: FAILED: reading the answer: %s", strerror(-n));
            return -EPROTO;
        }
        have += (size_t)n;
        int drc = mqtt_decode(buf, have, sizeof(buf), answer, &consumed, &reason);
        if (drc == -EAGAIN && have < sizeof(buf))
            continue;
        if (drc < 0 || answer->type != MQTT_CONNACK) {
            say(out, "CONNACK: FAILED: the server's first packet is not a CONNACK (%s)",
                drc < 0 ? (reason ? reason : strerror(-drc)) : "another packet type");
            say(out, "  fix: check that port %u is an MQTT broker", (unsigned)uplink->port);
            return -EPROTO;
        }
        return 0;
    }
}

static int step_mqtt(const struct conf *conf, const struct conf_uplink *uplink,
                     const struct diagnose_options *options, struct diag_conn *conn,
                     const struct tls_trace *trace, unsigned timeout_ms, FILE *out)
{
    struct profile_connect_id ids;
    const char *client_id = options->client_id;
    const char *profile = uplink->profile ? uplink->profile : "generic";
    struct mqtt_connect connect = {
        .protocol_level = 4,
        /* As configured: a persistent session stays as the daemon left it
         * (clean_session 1 would discard it, §3.1.2.4). */
        .clean_session = uplink->clean_session,
        .keepalive_s = (uint16_t)(uplink->keepalive_s > 65535 ? 65535 : uplink->keepalive_s),
    };
    uint8_t *packet = NULL;
    size_t len = 0;
    struct diag_secrets secrets = {0};
    int rc = -EPROTO;

    /* What the daemon's profile sends (profile_spec.h): the client id, the user
     * name and clean session; the JWT's claims come from auth.jwt as in the
     * daemon (the profile's section.c set its aud, sub and kid there). */
    profile_connect_id(uplink, &ids);
    if (ids.clean_session)
        connect.clean_session = true;
    if (client_id == NULL && ids.client_id[0] != '\0')
        client_id = ids.client_id;
    if (client_id == NULL)
        client_id = uplink->client_id;
    if (client_id == NULL)
        client_id = conf->gateway_id;
    connect.client_id = (struct mqtt_slice){(const uint8_t *)client_id, strlen(client_id)};
    say(out, "  client id: %s%s%s%s", client_id,
        options->client_id         ? " (from --client-id)"
        : ids.client_id[0] != '\0' ? " (profile "
                                   : "",
        options->client_id == NULL && ids.client_id[0] != '\0' ? profile : "",
        options->client_id == NULL && ids.client_id[0] != '\0' ? ")" : "");

    if (mqtt_credentials(conf, uplink, &ids, profile, &connect, &secrets, out) < 0)
        goto out;

    if (mqtt_encode_connect(NULL, 0, &connect, &len) != -ENOBUFS ||
        (packet = malloc(len)) == NULL || mqtt_encode_connect(packet, len, &connect, &len) < 0) {
        say(out, "MQTT: FAILED: cannot encode CONNECT (client id or credentials longer than "
                 "65535 bytes?)");
        goto out;
    }
    double started = now_ms();
    int werr = conn_write(conn, packet, len);
    if (werr < 0) {
        say(out, "MQTT: FAILED: cannot send CONNECT: %s", strerror(-werr));
        if (trace->alert_received[0] != '\0')
            say(out, "  alert from the server: %s", trace->alert_received);
        goto out;
    }
    say(out, "MQTT: OK: CONNECT sent (%zu bytes, MQTT 3.1.1, clean session %s, keepalive %u s)",
        len, connect.clean_session ? "1" : "0", (unsigned)connect.keepalive_s);

    struct mqtt_packet answer;
    rc = await_connack(conn, trace, uplink, timeout_ms, &answer, out);
    if (rc < 0)
        goto out;
    rc = -EPROTO;
    double took = now_ms() - started;
    if (answer.u.connack.code != MQTT_CONNACK_ACCEPTED) {
        explain_connack(answer.u.connack.code, uplink, client_id, secrets.token != NULL, out);
        explain_connack_profile(answer.u.connack.code, uplink, client_id, out);
        goto out;
    }
    say(out, "CONNACK: OK: 0, connection accepted in %.1f ms (session present: %s)", took,
        answer.u.connack.session_present ? "yes" : "no");
    /* §3.14: a clean goodbye, so the broker publishes no will and logs a
     * normal disconnect. */
    uint8_t disconnect[2];
    size_t disconnect_len = 0;
    if (mqtt_encode_simple(disconnect, sizeof(disconnect), MQTT_DISCONNECT, &disconnect_len) == 0)
        conn_write(conn, disconnect, disconnect_len);
    rc = 0;

out:
    free(packet);
    diag_secrets_free(&secrets);
    return rc;
}

/* --- token display --------------------------------------------------------- */

/* Prints "iat"/"exp"/"nbf" of @claims (JSON text) as dates. */
static void print_claim_time(const char *claims, const char *name, long long now, FILE *out)
{
    char pattern[16], date[64];

    snprintf(pattern, sizeof(pattern), "\"%s\":", name);
    const char *p = strstr(claims, pattern);
    if (p == NULL)
        return;
    p += strlen(pattern);
    while (*p == ' ')
        p++;
    char *end;
    long long value = strtoll(p, &end, 10);
    if (end == p)
        return;
    long long delta = value - now;
    say(out, "    %s: %lld = %s (%lld s %s)", name, value,
        format_time((time_t)value, date, sizeof(date)), delta < 0 ? -delta : delta,
        delta < 0 ? "ago" : "from now");
}

int diagnose_print_token(const char *token, long long now, FILE *out)
{
    const char *dot1 = strchr(token, '.');
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    unsigned char *header = NULL, *claims = NULL, *signature = NULL;
    size_t header_len = 0, claims_len = 0, signature_len = 0;
    int rc = -EINVAL;

    if (dot2 == NULL || strchr(dot2 + 1, '.') != NULL ||
        jwt_base64url_decode(token, (size_t)(dot1 - token), &header, &header_len) < 0 ||
        jwt_base64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), &claims, &claims_len) < 0 ||
        jwt_base64url_decode(dot2 + 1, strlen(dot2 + 1), &signature, &signature_len) < 0 ||
        header[0] != '{' || claims[0] != '{') {
        say(out, "    not a JWT (three unpadded base64url parts with JSON header and claims)");
        goto out;
    }
    say(out, "    header: %.*s", (int)header_len, (const char *)header);
    say(out, "    claims: %.*s", (int)claims_len, (const char *)claims);
    print_claim_time((const char *)claims, "iat", now, out);
    print_claim_time((const char *)claims, "exp", now, out);
    say(out, "    signature: %zu bytes (not shown)", signature_len);
    rc = 0;
out:
    free(header);
    free(claims);
    free(signature);
    return rc;
}

/* --- the whole run --------------------------------------------------------- */

int diagnose_uplink(const struct conf *conf, const struct conf_uplink *uplink,
                    const struct diagnose_options *options, FILE *out)
{
    static const struct diagnose_options defaults = {0};
    unsigned timeout_ms;
    struct addrinfo *addresses = NULL;
    struct tls_trace trace = {.verify_error = X509_V_OK};
    struct diag_conn conn = {.fd = -1};
    SSL_CTX *ctx = NULL;
    int result;

    if (options == NULL)
        options = &defaults;
    timeout_ms = options->timeout_ms ? options->timeout_ms : DEFAULT_TIMEOUT_MS;
    if (trace_index < 0)
        trace_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);

    say(out, "uplink %s: %s port %u, %s, profile %s", uplink->name, uplink->host,
        (unsigned)uplink->port, uplink->tls.enabled ? "TLS" : "no TLS",
        uplink->profile ? uplink->profile : "generic");

    if (step_dns(uplink, &addresses, out) < 0) {
        result = DIAGNOSE_EXIT_DNS;
        goto out;
    }
    conn.fd = step_tcp(uplink, addresses, timeout_ms, out);
    if (conn.fd < 0) {
        result = DIAGNOSE_EXIT_TCP;
        goto out;
    }
    if (uplink->tls.enabled) {
        if (step_tls(uplink, conn.fd, &trace, &ctx, &conn.ssl, out) < 0) {
            result = DIAGNOSE_EXIT_TLS;
            goto out;
        }
    } else {
        say(out, "TLS: SKIPPED: tls.enabled is false: credentials and data cross the network in "
                 "clear text");
    }

    const char *socket_path =
        options->control_socket ? options->control_socket : conf->control_socket;
    if (options->client_id == NULL && !options->force &&
        daemon_uplink_online(socket_path, uplink->name, timeout_ms)) {
        say(out,
            "MQTT: SKIPPED: the running uplinkd (%s) has uplink %s online; a CONNECT with "
            "its client id would take over its session (MQTT 3.1.1 §3.1.4-2)",
            socket_path, uplink->name);
        say(out, "  to test CONNECT anyway: --client-id ID (another id), or --force (the "
                 "daemon reconnects)");
        result = DIAGNOSE_EXIT_OK;
        goto out;
    }
    int rc = step_mqtt(conf, uplink, options, &conn, &trace, timeout_ms, out);
    result = rc == 0               ? DIAGNOSE_EXIT_OK
             : rc == -EKEYREJECTED ? DIAGNOSE_EXIT_TLS
                                   : DIAGNOSE_EXIT_MQTT;

out:
    if (conn.ssl != NULL) {
        SSL_shutdown(conn.ssl); /* close_notify; the answer does not matter */
        SSL_free(conn.ssl);
    }
    SSL_CTX_free(ctx);
    if (conn.fd >= 0)
        close(conn.fd);
    if (addresses != NULL)
        freeaddrinfo(addresses);
    ERR_clear_error();
    static const char *const step_names[] = {
        [DIAGNOSE_EXIT_DNS] = "DNS",
        [DIAGNOSE_EXIT_TCP] = "TCP",
        [DIAGNOSE_EXIT_TLS] = "TLS",
        [DIAGNOSE_EXIT_MQTT] = "MQTT CONNECT/CONNACK",
    };
    if (result == DIAGNOSE_EXIT_OK)
        say(out, "result: OK: every step passed");
    else
        say(out, "result: FAILED at the %s step (exit %d)", step_names[result], result);
    return result;
}
