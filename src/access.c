/* access.c - peer identity, the password file and local.acl (see access.h). */
#include "access.h"

#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "conf.h"
#include "topic.h"
#include "util.h"

#define PASSWD_FILE_MAX (1024 * 1024)
#define NEW_SALT_LEN    16

/* --- identity ----------------------------------------------------------------- */

int access_peer_identity(int fd, struct access_identity *id)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    gid_t groups[ACCESS_GROUPS_MAX];

    id->has_cred = false;
    id->group_count = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return -errno;
    id->has_cred = true;
    id->uid = cred.uid;
    id->gid = cred.gid;
    id->pid = cred.pid;
#ifdef SO_PEERGROUPS
    /* Supplementary groups as of connect(2). Without them a gid rule sees
     * only the primary group; a peer with more than ACCESS_GROUPS_MAX groups
     * (ERANGE) is treated the same way rather than guessed at. */
    len = sizeof(groups);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0) {
        id->group_count = len / sizeof(gid_t);
        memcpy(id->groups, groups, id->group_count * sizeof(gid_t));
    }
#else
    (void)groups;
#endif
    return 0;
}

/* 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104. */
static bool addr_is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return false;
}

/* Address and port of @sa into the inet_diag_sockid fields (network order). */
static void diag_addr(const struct sockaddr *sa, __be16 *port, __be32 addr[4])
{
    memset(addr, 0, 4 * sizeof(addr[0]));
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        *port = sin->sin_port;
        memcpy(addr, &sin->sin_addr, sizeof(sin->sin_addr));
    } else {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        *port = sin6->sin6_port;
        memcpy(addr, &sin6->sin6_addr, sizeof(sin6->sin6_addr));
    }
}

/* The groups of @uid from the user and group databases (NSS). */
static int groups_of_uid(uid_t uid, struct access_identity *id, char *why, size_t why_size)
{
    struct passwd pw, *found = NULL;
    char buf[4096];
    gid_t groups[ACCESS_GROUPS_MAX];
    int count = ACCESS_GROUPS_MAX;
    int rc = getpwuid_r(uid, &pw, buf, sizeof(buf), &found);

    if (rc != 0 || !found) {
        snprintf(why, why_size, "uid %lu has no passwd entry to take its groups from%s%s",
                 (unsigned long)uid, rc ? ": " : "", rc ? strerror(rc) : "");
        return rc ? -rc : -ENOENT;
    }
    id->gid = pw.pw_gid;
    /* More than ACCESS_GROUPS_MAX: keep the primary group only, as for
     * SO_PEERGROUPS' ERANGE (see access_peer_identity()). */
    if (getgrouplist(pw.pw_name, pw.pw_gid, groups, &count) >= 0) {
        id->group_count = (size_t)count;
        memcpy(id->groups, groups, id->group_count * sizeof(gid_t));
    }
    return 0;
}

int access_tcp_peer_identity(const struct sockaddr *local, const struct sockaddr *peer,
                             bool want_groups, struct access_identity *id, char *why,
                             size_t why_size)
{
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } request;
    union {
        struct nlmsghdr nlh;
        char bytes[8192];
    } reply;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    struct timeval timeout = {.tv_sec = 0, .tv_usec = 100 * 1000};
    char host[INET6_ADDRSTRLEN] = "?";
    ssize_t n;
    int fd, rc;

    id->has_cred = false;
    id->group_count = 0;
    if (peer->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, host, sizeof(host));
    else if (peer->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)peer)->sin6_addr, host, sizeof(host));
    if (!addr_is_loopback(peer) || local->sa_family != peer->sa_family) {
        snprintf(why, why_size, "the peer address %s is not on loopback", host);
        return -EADDRNOTAVAIL;
    }
    memset(&request, 0, sizeof(request));
    request.nlh.nlmsg_len = sizeof(request);
    request.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    request.nlh.nlmsg_flags = NLM_F_REQUEST; /* no NLM_F_DUMP: one exact match */
    request.nlh.nlmsg_seq = 1;
    request.req.sdiag_family = (uint8_t)peer->sa_family;
    request.req.sdiag_protocol = IPPROTO_TCP;
    request.req.idiag_states = ~0u;
    /* The peer's own socket: bound to @peer, connected to @local. For
     * AF_INET6 with v4-mapped addresses the kernel looks up the IPv4 socket
     * (inet_diag_find_one_icsk). */
    diag_addr(peer, &request.req.id.idiag_sport, request.req.id.idiag_src);
    diag_addr(local, &request.req.id.idiag_dport, request.req.id.idiag_dst);
    request.req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
    request.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;

    fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot open a NETLINK_SOCK_DIAG socket: %s", strerror(-rc));
        return rc;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    if (sendto(fd, &request, sizeof(request), 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
        rc = -errno;
        snprintf(why, why_size, "sock_diag request failed: %s", strerror(-rc));
        goto out;
    }
    do
        n = recv(fd, &reply, sizeof(reply), 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        rc = -errno;
        snprintf(why, why_size, "no sock_diag answer: %s",
                 rc == -EAGAIN ? "timed out after 100 ms" : strerror(-rc));
        goto out;
    }
    if (!NLMSG_OK(&reply.nlh, (size_t)n)) {
        rc = -EPROTO;
        snprintf(why, why_size, "short sock_diag answer (%zd bytes)", n);
        goto out;
    }
    if (reply.nlh.nlmsg_type == NLMSG_ERROR) {
        const struct nlmsgerr *err = NLMSG_DATA(&reply.nlh);
        rc = err->error < 0 ? err->error : -EPROTO;
        snprintf(why, why_size, "%s",
                 rc == -ENOENT ? "no such socket: the peer is in another network namespace, "
                                 "or already gone"
                               : strerror(-rc));
        goto out;
    }
    if (reply.nlh.nlmsg_type != SOCK_DIAG_BY_FAMILY ||
        reply.nlh.nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) {
        rc = -EPROTO;
        snprintf(why, why_size, "unexpected sock_diag answer (type %u)",
                 (unsigned)reply.nlh.nlmsg_type);
        goto out;
    }
    {
        const struct inet_diag_msg *msg = NLMSG_DATA(&reply.nlh);
        id->uid = msg->idiag_uid;
        id->gid = (gid_t)-1;
        id->pid = 0;
        id->tcp_peer = true;
    }
    rc = 0;
    if (want_groups)
        rc = groups_of_uid(id->uid, id, why, why_size);
    id->has_cred = rc == 0;
out:
    close(fd);
    return rc;
}

void access_identity_describe(const struct access_identity *id, char *buf, size_t size)
{
    if (id->has_cred && id->tcp_peer) {
        /* A TCP peer: uid from sock_diag, gid only when gid rules asked. */
        char gid[32] = "";
        if (id->gid != (gid_t)-1)
            snprintf(gid, sizeof(gid), " gid %lu", (unsigned long)id->gid);
        snprintf(buf, size, "uid %lu%s (tcp)%s%s", (unsigned long)id->uid, gid,
                 id->username ? " user " : "", id->username ? id->username : "");
    } else if (id->has_cred && id->username)
        snprintf(buf, size, "uid %lu gid %lu pid %ld user %s", (unsigned long)id->uid,
                 (unsigned long)id->gid, (long)id->pid, id->username);
    else if (id->has_cred)
        snprintf(buf, size, "uid %lu gid %lu pid %ld", (unsigned long)id->uid,
                 (unsigned long)id->gid, (long)id->pid);
    else if (id->username)
        snprintf(buf, size, "user %s", id->username);
    else
        snprintf(buf, size, "anonymous");
}

bool access_identity_same(const struct access_identity *a, const struct access_identity *b)
{
    if ((a->username == NULL) != (b->username == NULL))
        return false;
    if (a->username)
        return strcmp(a->username, b->username) == 0;
    return a->has_cred == b->has_cred && (!a->has_cred || a->uid == b->uid);
}

/* --- passwords ------------------------------------------------------------------- */

/* Standard base64 (RFC 4648 §4) with padding into @out (at most @max bytes).
 * EVP_DecodeBlock counts the padding as zero bytes, hence the correction. */
static int b64_decode(const char *text, size_t len, uint8_t *out, size_t max, size_t *out_len)
{
    uint8_t
        buf[((ACCESS_SALT_MAX > ACCESS_HASH_MAX ? ACCESS_SALT_MAX : ACCESS_HASH_MAX) + 3) / 3 * 3];
    size_t pad = 0;
    int n;

    if (len == 0 || len % 4 != 0 || len / 4 * 3 > sizeof(buf))
        return -EINVAL;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '+' || c == '/';
        if (c == '=' && i >= len - 2) {
            pad++;
            continue;
        }
        if (!ok || pad)
            return -EINVAL;
    }
    n = EVP_DecodeBlock(buf, (const unsigned char *)text, (int)len);
    if (n < 0 || (size_t)n < pad || (size_t)n - pad > max)
        return -EINVAL;
    *out_len = (size_t)n - pad;
    memcpy(out, buf, *out_len);
    OPENSSL_cleanse(buf, sizeof(buf));
    return 0;
}

static int check_user(const char *user, size_t len, char *why, size_t why_size)
{
    if (len == 0) {
        snprintf(why, why_size, "empty user name");
        return -EINVAL;
    }
    if (len > ACCESS_USER_MAX) {
        snprintf(why, why_size, "user name longer than %d bytes", ACCESS_USER_MAX);
        return -EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)user[i];
        if (c == ':' || c < 0x20 || c == 0x7f) {
            snprintf(why, why_size,
                     "user name contains %s (not allowed: ':' and control characters)",
                     c == ':' ? "':'" : "a control character");
            return -EINVAL;
        }
    }
    return 0;
}

/* Parse "$pbkdf2-sha512$ITER$SALT$HASH" (@len bytes) into @e. */
static int parse_hash_field(const char *field, size_t len, struct access_passwd_entry *e, char *why,
                            size_t why_size)
{
    size_t scheme_len = strlen(ACCESS_PBKDF2_SCHEME);
    const char *p, *end = field + len, *dollar;
    unsigned long long iterations = 0;

    if (len == 0 || field[0] != '$') {
        snprintf(why, why_size,
                 "the password is in plain text, which uplinkd refuses (store a salted hash: "
                 "run \"uplinkctl passwd FILE USER\" to set it)");
        return -EINVAL;
    }
    if (len < scheme_len || memcmp(field, ACCESS_PBKDF2_SCHEME, scheme_len) != 0) {
        dollar = memchr(field + 1, '$', len - 1);
        snprintf(why, why_size,
                 "unsupported hash scheme \"%.*s\" (expected " ACCESS_PBKDF2_SCHEME
                 "; mosquitto_passwd and crypt(3) hashes are not accepted: set the password "
                 "again with \"uplinkctl passwd FILE USER\")",
                 (int)(dollar ? (size_t)(dollar - field) + 1 : (len < 20 ? len : 20)), field);
        return -EINVAL;
    }
    p = field + scheme_len;
    if (p == end || *p < '0' || *p > '9')
        goto bad_iterations;
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        iterations = iterations * 10 + (unsigned)(*p - '0');
        if (iterations > ACCESS_PBKDF2_MAX_ITERATIONS)
            goto bad_iterations;
    }
    if (p == end || *p != '$')
        goto bad_iterations;
    if (iterations < ACCESS_PBKDF2_MIN_ITERATIONS) {
        snprintf(why, why_size,
                 "%llu PBKDF2 iterations are too few (at least %u; set the password again with "
                 "\"uplinkctl passwd FILE USER\")",
                 iterations, ACCESS_PBKDF2_MIN_ITERATIONS);
        return -EINVAL;
    }
    e->iterations = (unsigned)iterations;
    p++;
    dollar = memchr(p, '$', (size_t)(end - p));
    if (!dollar ||
        b64_decode(p, (size_t)(dollar - p), e->salt, ACCESS_SALT_MAX, &e->salt_len) < 0 ||
        e->salt_len < ACCESS_SALT_MIN) {
        snprintf(why, why_size, "the salt is not base64 of %d to %d bytes", ACCESS_SALT_MIN,
                 ACCESS_SALT_MAX);
        return -EINVAL;
    }
    p = dollar + 1;
    if (b64_decode(p, (size_t)(end - p), e->hash, ACCESS_HASH_MAX, &e->hash_len) < 0 ||
        e->hash_len < ACCESS_HASH_MIN) {
        snprintf(why, why_size, "the hash is not base64 of %d to %d bytes", ACCESS_HASH_MIN,
                 ACCESS_HASH_MAX);
        return -EINVAL;
    }
    return 0;

bad_iterations:
    snprintf(why, why_size, "the iteration count is not a number from %u to %u",
             ACCESS_PBKDF2_MIN_ITERATIONS, ACCESS_PBKDF2_MAX_ITERATIONS);
    return -EINVAL;
}

int access_passwords_parse(const char *text, size_t len, struct access_passwords **out, char *why,
                           size_t why_size)
{
    struct access_passwords *pw;
    const char *line = text, *end = text + len;
    size_t cap = 0;
    unsigned lineno = 0;
    char detail[256];
    int rc;

    *out = NULL;
    pw = calloc(1, sizeof(*pw));
    if (!pw)
        return -ENOMEM;
    while (line < end) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *stop = nl ? nl : end;
        const char *colon;
        struct access_passwd_entry *e;

        lineno++;
        if (stop > line && stop[-1] == '\r')
            stop--; /* a file edited on Windows */
        if (stop == line || line[0] == '#')
            goto next_line;
        colon = memchr(line, ':', (size_t)(stop - line));
        if (!colon) {
            snprintf(why, why_size, "line %u: expected USER:" ACCESS_PBKDF2_SCHEME "...", lineno);
            rc = -EINVAL;
            goto err_after_alloc;
        }
        if (check_user(line, (size_t)(colon - line), detail, sizeof(detail)) < 0) {
            snprintf(why, why_size, "line %u: %s", lineno, detail);
            rc = -EINVAL;
            goto err_after_alloc;
        }
        if (access_passwords_find(pw, line, (size_t)(colon - line))) {
            snprintf(why, why_size, "line %u: user \"%.*s\" is listed twice (keep one line)",
                     lineno, (int)(colon - line), line);
            rc = -EINVAL;
            goto err_after_alloc;
        }
        if (pw->count == cap) {
            size_t grown_cap = cap ? cap * 2 : 8;
            void *grown = realloc(pw->entries, grown_cap * sizeof(*pw->entries));
            if (!grown) {
                rc = -ENOMEM;
                goto err_after_alloc;
            }
            pw->entries = grown;
            cap = grown_cap;
        }
        e = &pw->entries[pw->count];
        memset(e, 0, sizeof(*e));
        if (parse_hash_field(colon + 1, (size_t)(stop - colon - 1), e, detail, sizeof(detail)) <
            0) {
            snprintf(why, why_size, "line %u: user \"%.*s\": %s", lineno, (int)(colon - line), line,
                     detail);
            OPENSSL_cleanse(e, sizeof(*e));
            rc = -EINVAL;
            goto err_after_alloc;
        }
        e->user = strndup(line, (size_t)(colon - line));
        if (!e->user) {
            rc = -ENOMEM;
            goto err_after_alloc;
        }
        pw->count++;
    next_line:
        line = nl ? nl + 1 : end;
    }
    *out = pw;
    return 0;

err_after_alloc:
    access_passwords_free(pw);
    return rc;
}

int access_passwords_load(const char *path, struct access_passwords **out, char *why,
                          size_t why_size)
{
    char *text = NULL;
    size_t len = 0;
    int rc = util_read_file(path, PASSWD_FILE_MAX, &text, &len);

    *out = NULL;
    if (rc < 0) {
        snprintf(why, why_size, "cannot read %s: %s", path,
                 rc == -EFBIG ? "file is larger than 1 MiB" : strerror(-rc));
        return rc;
    }
    rc = access_passwords_parse(text, len, out, why, why_size);
    OPENSSL_cleanse(text, len);
    free(text);
    return rc;
}

void access_passwords_free(struct access_passwords *passwords)
{
    if (!passwords)
        return;
    for (size_t i = 0; i < passwords->count; i++)
        free(passwords->entries[i].user);
    if (passwords->entries)
        OPENSSL_cleanse(passwords->entries, passwords->count * sizeof(*passwords->entries));
    free(passwords->entries);
    free(passwords);
}

const struct access_passwd_entry *access_passwords_find(const struct access_passwords *passwords,
                                                        const char *user, size_t len)
{
    if (!passwords)
        return NULL;
    for (size_t i = 0; i < passwords->count; i++) {
        const struct access_passwd_entry *e = &passwords->entries[i];
        if (strlen(e->user) == len && memcmp(e->user, user, len) == 0)
            return e;
    }
    return NULL;
}

bool access_passwd_verify(const struct access_passwd_entry *entry, const void *password, size_t len)
{
    /* Unknown users cost as much as known ones (default iteration count). */
    static const struct access_passwd_entry dummy = {
        .iterations = ACCESS_PBKDF2_DEFAULT_ITERATIONS,
        .salt = "uplinkd-dummy-salt",
        .salt_len = NEW_SALT_LEN,
        .hash_len = ACCESS_HASH_MAX,
    };
    const struct access_passwd_entry *e = entry ? entry : &dummy;
    uint8_t computed[ACCESS_HASH_MAX];
    bool ok;

    if (len > INT_MAX)
        return false;
    if (PKCS5_PBKDF2_HMAC(password, (int)len, e->salt, (int)e->salt_len, (int)e->iterations,
                          EVP_sha512(), (int)e->hash_len, computed) != 1)
        return false;
    ok = CRYPTO_memcmp(computed, e->hash, e->hash_len) == 0 && entry != NULL;
    OPENSSL_cleanse(computed, sizeof(computed));
    return ok;
}

int access_passwd_line(const char *user, const void *password, size_t len, unsigned iterations,
                       char **out, char *why, size_t why_size)
{
    uint8_t salt[NEW_SALT_LEN], hash[ACCESS_HASH_MAX];
    char salt_b64[4 * ((NEW_SALT_LEN + 2) / 3) + 1], hash_b64[4 * ((ACCESS_HASH_MAX + 2) / 3) + 1];
    size_t size;
    int rc;

    *out = NULL;
    if (iterations == 0)
        iterations = ACCESS_PBKDF2_DEFAULT_ITERATIONS;
    rc = check_user(user, strlen(user), why, why_size);
    if (rc < 0)
        return rc;
    if (iterations < ACCESS_PBKDF2_MIN_ITERATIONS || iterations > ACCESS_PBKDF2_MAX_ITERATIONS ||
        len > INT_MAX) {
        snprintf(why, why_size, "iterations must be from %u to %u", ACCESS_PBKDF2_MIN_ITERATIONS,
                 ACCESS_PBKDF2_MAX_ITERATIONS);
        return -EINVAL;
    }
    if (RAND_bytes(salt, sizeof(salt)) != 1) {
        snprintf(why, why_size, "no random bytes for the salt (OpenSSL RAND_bytes failed)");
        return -EIO;
    }
    if (PKCS5_PBKDF2_HMAC(password, (int)len, salt, sizeof(salt), (int)iterations, EVP_sha512(),
                          sizeof(hash), hash) != 1) {
        snprintf(why, why_size, "PBKDF2 failed (OpenSSL)");
        return -EIO;
    }
    EVP_EncodeBlock((unsigned char *)salt_b64, salt, sizeof(salt));
    EVP_EncodeBlock((unsigned char *)hash_b64, hash, sizeof(hash));
    OPENSSL_cleanse(hash, sizeof(hash));
    size =
        strlen(user) + strlen(ACCESS_PBKDF2_SCHEME) + 16 + strlen(salt_b64) + strlen(hash_b64) + 4;
    *out = malloc(size);
    if (!*out)
        return -ENOMEM;
    snprintf(*out, size, "%s:" ACCESS_PBKDF2_SCHEME "%u$%s$%s", user, iterations, salt_b64,
             hash_b64);
    return 0;
}

/* The directory of @path ("." when it has none), malloc'd. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/*
 * Give the temporary file @fd (which replaces @path) the owner, group and
 * permission bits of the file it replaces (@old; NULL: there is none), before
 * anything is written to it. A password file that root rewrites must stay
 * readable by the daemon's group (the documented "chgrp uplinkd; chmod 0640"):
 * mkstemp(3) alone makes it the caller's, 0600, and the next reload fails.
 * A new file gets @dir's group and 0640 (in /etc/uplinkd, root:uplinkd 0750,
 * that is what the daemon needs), or stays 0600 when the caller may not give
 * it that group.
 */
static int passwd_file_take_owner(int fd, const char *path, const char *dir, const struct stat *old,
                                  const char *tmp, char *why, size_t why_size)
{
    struct stat tmp_st, dir_st;
    int rc;

    if (fstat(fd, &tmp_st) < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot stat %s: %s", tmp, strerror(-rc));
        return rc;
    }
    if (!old) {
        if (stat(dir, &dir_st) == 0 &&
            (dir_st.st_gid == tmp_st.st_gid || fchown(fd, (uid_t)-1, dir_st.st_gid) == 0) &&
            fchmod(fd, 0640) == 0)
            return 0;
        if (fchmod(fd, 0600) < 0) {
            rc = -errno;
            snprintf(why, why_size, "chmod 0600 %s: %s", tmp, strerror(-rc));
            return rc;
        }
        return 0;
    }
    if ((old->st_uid != tmp_st.st_uid || old->st_gid != tmp_st.st_gid) &&
        fchown(fd, old->st_uid, old->st_gid) < 0) {
        rc = -errno;
        snprintf(why, why_size,
                 "cannot keep the owner of %s (uid %u, gid %u) on the new file: %s; nothing "
                 "changed (run uplinkctl passwd as root or as the file's owner)",
                 path, (unsigned)old->st_uid, (unsigned)old->st_gid, strerror(-rc));
        return rc;
    }
    if (fchmod(fd, old->st_mode & 07777) < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot keep the mode of %s (%04o) on the new file: %s", path,
                 (unsigned)(old->st_mode & 07777), strerror(-rc));
        return rc;
    }
    return 0;
}

int access_passwd_file_set(const char *path, const char *line, char *why, size_t why_size)
{
    const char *colon = strchr(line, ':');
    size_t user_len = colon ? (size_t)(colon - line) : 0;
    char *old = NULL, *dir = NULL, *tmp = NULL;
    size_t old_len = 0, tmp_size;
    struct stat old_st;
    bool replaced = false, have_old = false;
    int fd = -1, dir_fd, rc;

    if (!colon) {
        snprintf(why, why_size, "not a password file line");
        return -EINVAL;
    }
    rc = util_read_file(path, PASSWD_FILE_MAX, &old, &old_len);
    if (rc == -ENOENT) {
        old = NULL;
        old_len = 0;
    } else if (rc < 0) {
        snprintf(why, why_size, "cannot read %s: %s", path, strerror(-rc));
        return rc;
    }
    /* stat() after a successful read: the owner and mode the new file copies. */
    have_old = old && stat(path, &old_st) == 0;
    dir = dir_of(path);
    tmp_size = strlen(path) + 16;
    tmp = malloc(tmp_size);
    if (!dir || !tmp) {
        rc = -ENOMEM;
        snprintf(why, why_size, "out of memory");
        goto out;
    }
    snprintf(tmp, tmp_size, "%s.XXXXXX", path);
    fd = mkostemp(tmp, O_CLOEXEC); /* mode 0600 already (mkstemp(3)) */
    if (fd < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot create a temporary file next to %s: %s", path,
                 strerror(-rc));
        goto out;
    }
    rc = passwd_file_take_owner(fd, path, dir, have_old ? &old_st : NULL, tmp, why, why_size);
    if (rc < 0)
        goto err_after_tmp;
    /* Copy every line, replacing the user's own (the first of them). */
    for (const char *p = old, *end = old + old_len; p && p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);

        if (n > user_len && p[user_len] == ':' && memcmp(p, line, user_len) == 0 && !replaced &&
            p[0] != '#') {
            rc = write_all(fd, line, strlen(line));
            replaced = true;
        } else {
            rc = write_all(fd, p, n);
        }
        if (rc == 0)
            rc = write_all(fd, "\n", 1);
        if (rc < 0)
            goto err_write;
        p = nl ? nl + 1 : end;
    }
    if (!replaced) {
        rc = write_all(fd, line, strlen(line));
        if (rc == 0)
            rc = write_all(fd, "\n", 1);
        if (rc < 0)
            goto err_write;
    }
    if (fsync(fd) < 0) {
        rc = -errno;
        goto err_write;
    }
    if (close(fd) < 0) {
        fd = -1;
        rc = -errno;
        goto err_write;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        rc = -errno;
        snprintf(why, why_size, "cannot rename %s to %s: %s", tmp, path, strerror(-rc));
        goto err_after_tmp;
    }
    /* The rename itself is durable only once the directory is synced. */
    dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
        fsync(dir_fd);
        close(dir_fd);
    }
    rc = 0;
    goto out;

err_write:
    snprintf(why, why_size, "cannot write %s: %s", tmp, strerror(-rc));
err_after_tmp:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
out:
    if (old) {
        OPENSSL_cleanse(old, old_len);
        free(old);
    }
    free(dir);
    free(tmp);
    return rc;
}

/* --- ACL ------------------------------------------------------------------------- */

static bool level_is(const char *level, size_t len, const char *word)
{
    return strlen(word) == len && memcmp(level, word, len) == 0;
}

/* fnmatch(3) on a (pointer, length) level: '*', '?' and brackets; levels
 * never contain '/', so FNM_PATHNAME does not matter. */
static bool glob_match(const char *glob, size_t glob_len, const char *text, size_t text_len)
{
    char small[2][128];
    char *g = glob_len < sizeof(small[0]) ? small[0] : malloc(glob_len + 1);
    char *t = text_len < sizeof(small[1]) ? small[1] : malloc(text_len + 1);
    bool match = false;

    if (g && t) {
        memcpy(g, glob, glob_len);
        g[glob_len] = '\0';
        memcpy(t, text, text_len);
        t[text_len] = '\0';
        /* A level with a NUL (not valid MQTT) never matches. */
        match = strlen(t) == text_len && fnmatch(g, t, 0) == 0;
    }
    if (g != small[0])
        free(g);
    if (t != small[1])
        free(t);
    return match;
}

static bool has_glob(const char *level, size_t len)
{
    return memchr(level, '*', len) || memchr(level, '?', len) || memchr(level, '[', len);
}

static bool child_allowed(const struct conf_acl_rule *rule, const char *child, size_t len)
{
    for (size_t i = 0; i < rule->children_count; i++)
        if (glob_match(rule->children[i], strlen(rule->children[i]), child, len))
            return true;
    return false;
}

/* Does pattern level @p cover topic level @t? @t_plus: @t is the '+' of a
 * filter (covered only by what covers every level). */
static bool level_covers(const struct conf_acl_rule *rule, const struct access_identity *id,
                         const char *p, size_t pl, const char *t, size_t tl, bool t_plus)
{
    if (level_is(p, pl, "+"))
        return true;
    if (level_is(p, pl, "%c")) {
        if (rule->children_count == 0)
            return true; /* any child: like '+' */
        return !t_plus && child_allowed(rule, t, tl);
    }
    if (level_is(p, pl, "%u")) {
        /* A name with '/', '+' or '#' would not be one level: never matches. */
        return !t_plus && id->username && !strpbrk(id->username, "/+#") &&
               level_is(t, tl, id->username);
    }
    if (t_plus)
        return false;
    if (has_glob(p, pl))
        return glob_match(p, pl, t, tl);
    return pl == tl && memcmp(p, t, tl) == 0;
}

/* Level by level; see access_acl_check() for what "covers" means. */
static bool pattern_covers(const struct conf_acl_rule *rule, const struct access_identity *id,
                           const char *pattern, const char *topic, size_t len, bool filter)
{
    const char *p = pattern, *t = topic, *t_end = topic + len;

    /* §4.7.2: a leading wildcard does not match a '$' topic (nor filter). */
    if (len > 0 && topic[0] == '$' && (pattern[0] == '+' || pattern[0] == '#'))
        return false;
    for (;;) {
        const char *p_slash = strchr(p, '/');
        size_t pl = p_slash ? (size_t)(p_slash - p) : strlen(p);
        const char *t_slash;
        size_t tl;

        if (level_is(p, pl, "#"))
            return true; /* the rest, and (§4.7.1-2) the parent level itself */
        if (t == NULL) {
            /* The topic ended: only a final "#" is left to cover nothing. */
            return false;
        }
        t_slash = memchr(t, '/', (size_t)(t_end - t));
        tl = t_slash ? (size_t)(t_slash - t) : (size_t)(t_end - t);
        if (filter && level_is(t, tl, "#"))
            return false; /* only a pattern "#" covers a filter "#" */
        if (!level_covers(rule, id, p, pl, t, tl, filter && level_is(t, tl, "+")))
            return false;
        t = t_slash ? t_slash + 1 : NULL;
        if (!p_slash)
            return t == NULL;
        p = p_slash + 1;
        if (t == NULL) {
            /* "a/#" covers "a" (§4.7.1-2); anything else longer does not. */
            return strcmp(p, "#") == 0;
        }
    }
}

bool access_rule_matches(const struct conf_acl_rule *rule, const struct access_identity *id)
{
    if (rule->has_uid && !(id->has_cred && id->uid == rule->uid))
        return false;
    if (rule->has_gid) {
        bool found = id->has_cred && id->gid == rule->gid;
        for (size_t i = 0; !found && id->has_cred && i < id->group_count; i++)
            found = id->groups[i] == rule->gid;
        if (!found)
            return false;
    }
    if (rule->user && !(id->username && strcmp(id->username, rule->user) == 0))
        return false;
    return true;
}

bool access_acl_selects_ids(const struct conf_local *local, size_t *rule_index)
{
    for (size_t i = 0; i < local->acl_count; i++) {
        if (local->acl[i].has_uid || local->acl[i].has_gid) {
            if (rule_index)
                *rule_index = i;
            return true;
        }
    }
    return false;
}

bool access_acl_selects_gids(const struct conf_local *local)
{
    for (size_t i = 0; i < local->acl_count; i++)
        if (local->acl[i].has_gid)
            return true;
    return false;
}

/* A listener bound to loopback only (127.0.0.0/8, ::1, "localhost") takes
 * connections from loopback peers only, which sock_diag identifies. */
static bool listener_is_loopback(const struct conf_listen *listen)
{
    struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6};
    struct sockaddr_in sin = {.sin_family = AF_INET};

    if (listen->kind != CONF_LISTEN_TCP)
        return true; /* a Unix socket: SO_PEERCRED */
    if (strcmp(listen->host, "localhost") == 0)
        return true;
    if (inet_pton(AF_INET, listen->host, &sin.sin_addr) == 1)
        return addr_is_loopback((const struct sockaddr *)&sin);
    if (inet_pton(AF_INET6, listen->host, &sin6.sin6_addr) == 1)
        return addr_is_loopback((const struct sockaddr *)&sin6);
    return false;
}

static void describe_selector(const struct conf_acl_rule *rule, char *buf, size_t size)
{
    if (rule->has_uid && rule->has_gid)
        snprintf(buf, size, "uid %lu gid %lu", (unsigned long)rule->uid, (unsigned long)rule->gid);
    else if (rule->has_uid)
        snprintf(buf, size, "uid %lu", (unsigned long)rule->uid);
    else
        snprintf(buf, size, "gid %lu", (unsigned long)rule->gid);
}

bool access_acl_sidestep(const struct conf_local *local, const struct conf_listen *listen,
                         char *buf, size_t size)
{
    size_t selecting, open = local->acl_count;
    char selector[64];

    /* With local.password_file every TCP client logs in and is held to its
     * user's rule; without a uid/gid rule there is nothing to side-step. */
    if (local->passwords || local->password_file || listener_is_loopback(listen) ||
        !access_acl_selects_ids(local, &selecting))
        return false;
    /* An unidentified, unauthenticated client gets the first rule without
     * uid, gid or user. Without one it gets nothing: no way around. */
    for (size_t i = 0; i < local->acl_count && open == local->acl_count; i++)
        if (!local->acl[i].has_uid && !local->acl[i].has_gid && !local->acl[i].user)
            open = i;
    if (open == local->acl_count)
        return false;
    describe_selector(&local->acl[selecting], selector, sizeof(selector));
    snprintf(buf, size,
             "local.listen %s: peers that connect to it from a non-loopback address cannot be "
             "identified, so a local process can side-step local.acl[%zu] (%s) by connecting "
             "to this host's network address: it then gets local.acl[%zu], the first rule "
             "without uid/gid/user. Fix: bind the listener to 127.0.0.1 (or use the Unix "
             "socket), or set local.password_file so TCP clients must log in, or narrow "
             "local.acl[%zu] to what any network client may do",
             listen->url, selecting, selector, open, open);
    return true;
}

/* Is the first level of @topic (@len bytes) the literal @level? */
static bool first_level_is(const char *topic, size_t len, const char *level)
{
    const char *slash = memchr(topic, '/', len);

    return level_is(topic, slash ? (size_t)(slash - topic) : len, level);
}

int access_acl_check(const struct conf_local *local, const struct access_identity *id,
                     enum access_action action, const char *topic, size_t len, int *rule_index)
{
    /* cloud/<uplink>/<topic> goes to the uplink raw, past the profile's
     * child-id rules (and GCP's attach): only a pattern that names "cloud"
     * as its first level grants it, never "#" or "+/..." in passing. */
    bool raw = first_level_is(topic, len, "cloud");

    if (rule_index)
        *rule_index = -1;
    if (local->acl_count == 0)
        return 0;
    for (size_t i = 0; i < local->acl_count; i++) {
        const struct conf_acl_rule *rule = &local->acl[i];
        char *const *patterns, *const *denied;
        size_t count;

        if (!access_rule_matches(rule, id))
            continue;
        if (rule_index)
            *rule_index = (int)i;
        /* Deny entries first: deny wins. A filter is refused only when a
         * deny pattern covers all of it; one that merely overlaps ("#"
         * against a denied "test/nosubscribe") is granted, and
         * access_delivery_denied() holds back the denied topics. */
        denied = action == ACCESS_PUBLISH ? rule->deny_publish : rule->deny_subscribe;
        count = action == ACCESS_PUBLISH ? rule->deny_publish_count : rule->deny_subscribe_count;
        for (size_t k = 0; k < count; k++)
            if (pattern_covers(rule, id, denied[k], topic, len, action == ACCESS_SUBSCRIBE))
                return -EPERM;
        patterns = action == ACCESS_PUBLISH ? rule->publish : rule->subscribe;
        count = action == ACCESS_PUBLISH ? rule->publish_count : rule->subscribe_count;
        for (size_t k = 0; k < count; k++)
            if ((!raw || first_level_is(patterns[k], strlen(patterns[k]), "cloud")) &&
                pattern_covers(rule, id, patterns[k], topic, len, action == ACCESS_SUBSCRIBE))
                return 0;
        return -EACCES;
    }
    return -EACCES;
}

bool access_delivery_denied(const struct conf_local *local, const struct access_identity *id,
                            const char *topic, size_t len)
{
    for (size_t i = 0; i < local->acl_count; i++) {
        const struct conf_acl_rule *rule = &local->acl[i];

        if (!access_rule_matches(rule, id))
            continue;
        for (size_t k = 0; k < rule->deny_subscribe_count; k++)
            if (pattern_covers(rule, id, rule->deny_subscribe[k], topic, len, false))
                return true;
        return false;
    }
    return false;
}

int access_pattern_check(const char *pattern, const char **reason)
{
    const char *p = pattern;

    if (topic_filter_check(pattern, strlen(pattern), reason) < 0)
        return -EINVAL;
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        const char *pct = memchr(p, '%', n);

        if (pct && !level_is(p, n, "%c") && !level_is(p, n, "%u") && pct + 1 < p + n &&
            (pct[1] == 'c' || pct[1] == 'u')) {
            *reason = "\"%c\" and \"%u\" must be a whole topic level (e.g. \"dev/%c/#\")";
            return -EINVAL;
        }
        if (!slash)
            return 0;
        p = slash + 1;
    }
}

int access_child_glob_check(const char *glob, const char **reason)
{
    if (glob[0] == '\0') {
        *reason = "empty glob";
        return -EINVAL;
    }
    for (const unsigned char *p = (const unsigned char *)glob; *p; p++) {
        if (*p == '/' || *p == '+' || *p == '#') {
            *reason = "a child id glob cannot contain '/', '+' or '#'";
            return -EINVAL;
        }
        if (*p < 0x20 || *p == 0x7f) {
            *reason = "contains a control character";
            return -EINVAL;
        }
    }
    return 0;
}
