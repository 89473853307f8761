/* azure/sas.c - Azure IoT Hub's shared access signatures and device ids
 * (see azure.h). Pure: no I/O, any thread. */
#include "azure.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define AZURE_KEY_FILE_MAX 4096

const char *azure_device_id_check(const char *id)
{
    size_t len = strlen(id);

    if (len == 0)
        return "an IoT Hub device id must not be empty";
    if (len > AZURE_DEVICE_ID_MAX)
        return "an IoT Hub device id has at most 128 characters";
    for (const char *p = id; *p; p++) {
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
              strchr(AZURE_DEVICE_ID_EXTRA, *p)))
            return "an IoT Hub device id holds only letters, digits and - . + % _ # * ? ! ( ) , "
                   ": = @ $ '";
    }
    return NULL;
}

int azure_url_encode(const char *in, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;

    for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
        bool plain = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                     (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~';
        size_t need = plain ? 1 : 3;
        if (n + need >= cap)
            return -ENAMETOOLONG;
        if (plain) {
            out[n++] = (char)*p;
        } else {
            out[n++] = '%';
            out[n++] = hex[*p >> 4];
            out[n++] = hex[*p & 15];
        }
    }
    if (cap == 0)
        return -ENAMETOOLONG;
    out[n] = '\0';
    return (int)n;
}

int azure_key_decode(const char *text, uint8_t key[AZURE_KEY_MAX])
{
    unsigned char buf[(AZURE_KEY_MAX + 2) / 3 * 3 + 3];
    char clean[(AZURE_KEY_MAX + 2) / 3 * 4 + 1];
    size_t len = 0, pad = 0;
    int n;

    while (isspace((unsigned char)*text))
        text++;
    for (; *text && !isspace((unsigned char)*text); text++) {
        char c = *text;
        bool b64 = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                   c == '+' || c == '/';
        if (c == '=' && len > 0)
            pad++;
        else if (!b64 || pad > 0)
            return -EINVAL; /* not base64, or data after the padding */
        if (len + 1 >= sizeof(clean))
            return -EINVAL;
        clean[len++] = c;
    }
    while (isspace((unsigned char)*text))
        text++;
    if (*text || len == 0 || len % 4 != 0 || pad > 2)
        return -EINVAL;
    clean[len] = '\0';
    n = EVP_DecodeBlock(buf, (const unsigned char *)clean, (int)len);
    if (n < 0 || (size_t)n < pad)
        return -EINVAL;
    n -= (int)pad; /* EVP_DecodeBlock counts the padding as zero bytes */
    if (n == 0 || n > AZURE_KEY_MAX)
        return -EINVAL;
    memcpy(key, buf, (size_t)n);
    OPENSSL_cleanse(buf, sizeof(buf));
    OPENSSL_cleanse(clean, sizeof(clean));
    return n;
}

static int hmac_sha256(const uint8_t *key, size_t key_len, const void *data, size_t len,
                       uint8_t out[32])
{
    size_t out_len = 0;

    if (EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, key, key_len, data, len, out, 32, &out_len) ==
            NULL ||
        out_len != 32)
        return -EIO;
    return 32;
}

struct key_mac {
    const uint8_t *key;
    size_t len;
};

static int key_mac_cb(void *arg, const void *data, size_t len, uint8_t out[32])
{
    const struct key_mac *k = arg;

    return hmac_sha256(k->key, k->len, data, len, out);
}

int azure_sas_token(const uint8_t *key, size_t key_len, const char *hub, const char *device,
                    const char *policy, time_t expiry, char *out, size_t cap)
{
    struct key_mac k = {key, key_len};

    return azure_sas_token_mac(key_mac_cb, &k, hub, device, policy, expiry, out, cap);
}

int azure_sas_token_mac(azure_mac_fn mac_fn, void *arg, const char *hub, const char *device,
                        const char *policy, time_t expiry, char *out, size_t cap)
{
    char resource[2 * AZURE_DEVICE_ID_MAX + 300], sr[3 * sizeof(resource)],
        to_sign[sizeof(sr) + 24];
    char sig_b64[48], sig[3 * sizeof(sig_b64)], skn[3 * 256];
    uint8_t mac[32];
    int n;

    if (snprintf(resource, sizeof(resource), "%s/devices/%s", hub, device) >= (int)sizeof(resource))
        return -ENAMETOOLONG;
    if (azure_url_encode(resource, sr, sizeof(sr)) < 0)
        return -ENAMETOOLONG;
    n = snprintf(to_sign, sizeof(to_sign), "%s\n%lld", sr, (long long)expiry);
    if (n < 0 || n >= (int)sizeof(to_sign))
        return -ENAMETOOLONG;
    if (mac_fn(arg, to_sign, (size_t)n, mac) < 0)
        return -EIO;
    EVP_EncodeBlock((unsigned char *)sig_b64, mac, sizeof(mac));
    OPENSSL_cleanse(mac, sizeof(mac));
    if (azure_url_encode(sig_b64, sig, sizeof(sig)) < 0)
        return -ENAMETOOLONG;
    skn[0] = '\0';
    if (policy && azure_url_encode(policy, skn, sizeof(skn)) < 0)
        return -ENAMETOOLONG;
    n = snprintf(out, cap, "SharedAccessSignature sr=%s&sig=%s&se=%lld%s%s", sr, sig,
                 (long long)expiry, policy ? "&skn=" : "", skn);
    if (n < 0 || (size_t)n >= cap)
        return -ENAMETOOLONG;
    return n;
}

int azure_derive_device_key(const uint8_t *group_key, size_t group_len, const char *device,
                            uint8_t out[32])
{
    return hmac_sha256(group_key, group_len, device, strlen(device), out);
}

int azure_d2c_topic(const char *device, const char *sub, bool json, char *buf, size_t cap)
{
    char subject[3 * 256];
    int n = snprintf(buf, cap, "devices/%s/messages/events/", device);

    if (n < 0 || (size_t)n >= cap)
        return -ENAMETOOLONG;
    if (json) {
        int m = snprintf(buf + n, cap - (size_t)n, "%%24.ct=application%%2Fjson&%%24.ce=utf-8");
        if (m < 0 || (size_t)m >= cap - (size_t)n)
            return -ENAMETOOLONG;
        n += m;
    }
    if (sub) {
        if (azure_url_encode(sub, subject, sizeof(subject)) < 0)
            return -ENAMETOOLONG;
        int m = snprintf(buf + n, cap - (size_t)n, "%ssubject=%s", json ? "&" : "", subject);
        if (m < 0 || (size_t)m >= cap - (size_t)n)
            return -ENAMETOOLONG;
        n += m;
    }
    return n;
}

/* A request id or method name as one local topic level: no / + # & and
 * nothing below 0x21. */
static bool level_ok(const char *s, size_t len, size_t max)
{
    if (len == 0 || len > max)
        return false;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] <= ' ' || strchr("/+#&", s[i]))
            return false;
    }
    return true;
}

static int copy_level(const char *s, size_t len, size_t max, char *out, size_t cap)
{
    if (!level_ok(s, len, max) || len >= cap)
        return -EINVAL;
    memcpy(out, s, len);
    out[len] = '\0';
    return 0;
}

/* "<digits>" of 3 characters in 100-599 at @s (ending at @end or NUL). */
static int parse_status(const char *s, size_t len, int *status)
{
    if (len != 3)
        return -EINVAL;
    for (size_t i = 0; i < 3; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -EINVAL;
    }
    *status = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    return *status >= 100 && *status <= 599 ? 0 : -EINVAL;
}

int azure_method_answer(const char *sub, char *rid, size_t cap, int *status)
{
    const char *p, *slash;

    if (strncmp(sub, "methods/", 8) != 0)
        return -EINVAL;
    p = sub + 8;
    slash = strchr(p, '/');
    if (!slash || copy_level(p, (size_t)(slash - p), 63, rid, cap) < 0)
        return -EINVAL;
    return parse_status(slash + 1, strlen(slash + 1), status);
}

/* "?$rid=<rid>[&...]" at @q into @rid. */
static int parse_rid(const char *q, char *rid, size_t cap)
{
    size_t len;

    if (strncmp(q, "?$rid=", 6) != 0)
        return -EINVAL;
    q += 6;
    len = strcspn(q, "&");
    return copy_level(q, len, 63, rid, cap);
}

int azure_twin_response(const char *rest, int *status, char *rid, size_t cap)
{
    const char *slash = strchr(rest, '/');

    if (!slash || parse_status(rest, (size_t)(slash - rest), status) < 0)
        return -EINVAL;
    return parse_rid(slash + 1, rid, cap);
}

int azure_method_request(const char *rest, char *name, size_t name_cap, char *rid, size_t rid_cap)
{
    const char *slash = strchr(rest, '/');

    if (!slash || copy_level(rest, (size_t)(slash - rest), 127, name, name_cap) < 0)
        return -EINVAL;
    return parse_rid(slash + 1, rid, rid_cap);
}

int azure_key_read(const char *path, uint8_t key[AZURE_KEY_MAX], char *why, size_t why_size)
{
    char text[AZURE_KEY_FILE_MAX + 1];
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc;

    if (fd < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot open %s: %s", path, strerror(errno));
        return rc;
    }
    n = read(fd, text, AZURE_KEY_FILE_MAX);
    rc = n < 0 ? -errno : 0;
    close(fd);
    if (n < 0) {
        snprintf(why, why_size, "cannot read %s: %s", path, strerror(-rc));
        return rc;
    }
    text[n] = '\0';
    rc = azure_key_decode(text, key);
    OPENSSL_cleanse(text, sizeof(text));
    if (rc < 0)
        snprintf(why, why_size,
                 "%s does not hold a key: expected the device's primary or secondary key as "
                 "the portal shows it (base64, e.g. \"Q2hh...bmc=\"), on one line",
                 path);
    return rc;
}
