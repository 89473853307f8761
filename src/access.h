/* access.h - who a local client is, and what it may do (see docs/configuration.md,
 * "Identity and access").
 *
 * Three parts, all without I/O on the event loop:
 *  - identity: the peer credentials of a Unix-socket client (SO_PEERCRED and
 *    SO_PEERGROUPS, read once at accept) and, for clients that presented a
 *    password checked against local.password_file, the username;
 *  - passwords: a file of salted PBKDF2-SHA512 hashes, one user per line,
 *    "USER:$pbkdf2-sha512$ITERATIONS$SALT$HASH" (SALT and HASH in standard
 *    base64, RFC 4648 §4, with padding). Plain-text passwords are refused when
 *    the file is loaded. Verification is deliberately slow (that is the point
 *    of PBKDF2), so the daemon runs access_passwd_verify() on the libuv
 *    threadpool, never on the loop;
 *  - ACL: local.acl rules (struct conf_acl_rule) evaluated against an
 *    identity for PUBLISH (topic names) and SUBSCRIBE (topic filters).
 */
#ifndef UPLINKD_ACCESS_H
#define UPLINKD_ACCESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct conf_local;
struct sockaddr;
struct conf_acl_rule;
struct conf_listen;

/* Scheme tag of the password file format. */
#define ACCESS_PBKDF2_SCHEME "$pbkdf2-sha512$"
/* Iterations written by access_passwd_line() unless told otherwise (OWASP
 * 2023 recommendation for PBKDF2-HMAC-SHA512). */
#define ACCESS_PBKDF2_DEFAULT_ITERATIONS 210000u
/* Fewer iterations than this are refused when a file is loaded: such a hash
 * is too cheap to brute-force to be worth calling a hash. */
#define ACCESS_PBKDF2_MIN_ITERATIONS 1000u
#define ACCESS_PBKDF2_MAX_ITERATIONS 100000000u
#define ACCESS_SALT_MIN              8
#define ACCESS_SALT_MAX              64
#define ACCESS_HASH_MIN              16
#define ACCESS_HASH_MAX              64 /* SHA-512 output size */
#define ACCESS_USER_MAX              256
#define ACCESS_GROUPS_MAX            64 /* supplementary groups of a peer kept for gid rules */

/* --- identity ----------------------------------------------------------------- */

/* What is known about a local client. Zero-initialised means "nothing known"
 * (a TCP client before authentication). */
struct access_identity {
    bool has_cred; /* uid/gid known: Unix socket (SO_PEERCRED) or loopback TCP (sock_diag) */
    uid_t uid;
    gid_t gid;          /* primary group */
    pid_t pid;          /* 0 when unknown (a TCP peer) */
    bool tcp_peer;      /* has_cred came from sock_diag: no pid, gid from the user database */
    size_t group_count; /* supplementary groups (SO_PEERGROUPS) */
    gid_t groups[ACCESS_GROUPS_MAX];
    const char *username; /* authenticated MQTT username or NULL; borrowed */
};

/**
 * access_peer_identity() - read SO_PEERCRED (and SO_PEERGROUPS where the
 * kernel has it, Linux >= 4.13) of the connected Unix socket @fd into @id
 * (other fields untouched). The kernel records these at connect(2), so they
 * name the process that connected, not whoever holds the socket later.
 * Returns 0 or a negative errno (then id->has_cred is false).
 */
int access_peer_identity(int fd, struct access_identity *id);

/**
 * access_tcp_peer_identity() - who owns the other end of the accepted TCP
 * connection whose own address is @local and whose peer is @peer (both
 * AF_INET or AF_INET6, as getsockname/getpeername return them)?
 *
 * Only a loopback peer (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) is looked
 * up: its socket lives in this network namespace. One exact-match
 * NETLINK_SOCK_DIAG request (inet_diag_req_v2, INET_DIAG_NOCOOKIE) for the
 * socket bound to @peer and connected to @local; the reply's idiag_uid is
 * the uid that created it (like SO_PEERCRED, fixed at creation). Bounded by
 * a 100 ms receive timeout, so it may run on the event loop.
 *
 * With @want_groups, the gid and supplementary groups are those of the
 * uid's passwd entry and group database (getpwuid_r, getgrouplist): an
 * approximation, the process may have changed its groups. Without it gid
 * is left (uid_t)-1 and no groups.
 *
 * On success fills uid/gid and sets id->has_cred (pid stays 0). On failure
 * returns a negative errno and @why says why in words ("the peer
 * 192.0.2.7 is not on loopback", "no such socket: the peer is in another
 * network namespace or already gone", ...).
 */
int access_tcp_peer_identity(const struct sockaddr *local, const struct sockaddr *peer,
                             bool want_groups, struct access_identity *id, char *why,
                             size_t why_size);

/**
 * access_acl_selects_ids() - does any local.acl rule select by uid or gid
 * (index of the first into *@rule_index when not NULL)?
 */
bool access_acl_selects_ids(const struct conf_local *local, size_t *rule_index);

/**
 * access_acl_sidestep() - can local.acl's uid/gid rules be side-stepped
 * through @listen (one of @local->listen)? True when @listen is a TCP
 * listener not bound to loopback (peers from other addresses cannot be
 * identified), local.password_file is not set, a rule selects by uid/gid and
 * a rule without uid/gid/user exists (what an unidentified client gets).
 * Then @buf holds one warning naming the listener, the rules and the fixes.
 */
bool access_acl_sidestep(const struct conf_local *local, const struct conf_listen *listen,
                         char *buf, size_t size);

/**
 * access_acl_selects_gids() - does any local.acl rule select by gid?
 */
bool access_acl_selects_gids(const struct conf_local *local);

/* --- passwords ------------------------------------------------------------------- */

struct access_passwd_entry {
    char *user;
    unsigned iterations;
    uint8_t salt[ACCESS_SALT_MAX];
    size_t salt_len;
    uint8_t hash[ACCESS_HASH_MAX];
    size_t hash_len;
};

struct access_passwords {
    struct access_passwd_entry *entries;
    size_t count;
};

/**
 * access_passwords_parse() - parse the text of a password file. Blank lines
 * and lines starting with '#' are skipped. @text need not be NUL-terminated.
 * @out: on success a new table the caller frees with access_passwords_free().
 * @why: on -EINVAL, "line N: what is wrong (what to do)"; the first problem
 *       only. A line whose password field is not a "$pbkdf2-sha512$" hash
 *       (plain text, or another tool's format) is such a problem.
 * Returns 0, -EINVAL or -ENOMEM.
 */
int access_passwords_parse(const char *text, size_t len, struct access_passwords **out, char *why,
                           size_t why_size);

/**
 * access_passwords_load() - read @path (at most 1 MiB) and parse it. @why as
 * above, or the read error in words. Returns 0, -EINVAL, -ENOMEM or the
 * negative errno of the read.
 */
int access_passwords_load(const char *path, struct access_passwords **out, char *why,
                          size_t why_size);

/** access_passwords_free() - free a table (hashes are wiped). NULL is allowed. */
void access_passwords_free(struct access_passwords *passwords);

/**
 * access_passwords_find() - the entry of user @user (@len bytes, not
 * NUL-terminated), or NULL. Borrowed from @passwords.
 */
const struct access_passwd_entry *access_passwords_find(const struct access_passwords *passwords,
                                                        const char *user, size_t len);

/**
 * access_passwd_verify() - does @password match @entry? Runs PBKDF2 with the
 * entry's salt and iterations and compares in constant time (CRYPTO_memcmp).
 * With @entry NULL (unknown user) it does the same amount of work against a
 * fixed dummy entry and returns false, so response time does not tell which
 * usernames exist. Slow by design: call it off the event loop. Thread-safe.
 */
bool access_passwd_verify(const struct access_passwd_entry *entry, const void *password,
                          size_t len);

/**
 * access_passwd_line() - a new password file line "USER:$pbkdf2-sha512$..."
 * (no newline) for @user and @password with a fresh 16-byte random salt and
 * @iterations (0 = ACCESS_PBKDF2_DEFAULT_ITERATIONS). @out is malloc'd.
 * Returns 0, -EINVAL (bad user name, @why says why), -EIO (no randomness)
 * or -ENOMEM.
 */
int access_passwd_line(const char *user, const void *password, size_t len, unsigned iterations,
                       char **out, char *why, size_t why_size);

/**
 * access_passwd_file_set() - add @line (from access_passwd_line()) to the
 * password file @path, replacing the line of the same user; other lines are
 * kept as they are. The file is written to a temporary file in the same
 * directory that has the owner, group and mode of the file it replaces (a new
 * file: the directory's group and 0640, or 0600 when the caller may not give
 * it that group), fsync'd and renamed over @path, so readers see the old or
 * the new file, never a mix. Returns 0 or a negative errno with @why in words
 * (-EPERM: the caller may not keep the old owner; nothing changed).
 */
int access_passwd_file_set(const char *path, const char *line, char *why, size_t why_size);

/* --- ACL ------------------------------------------------------------------------- */

enum access_action {
    ACCESS_PUBLISH,   /* @topic is a topic name */
    ACCESS_SUBSCRIBE, /* @topic is a topic filter */
};

/**
 * access_delivery_denied() - may a message on topic name @topic (@len bytes)
 * not be delivered to the client @id? True when the rule that selects @id
 * has a deny_subscribe pattern covering @topic: its granted wildcard
 * subscriptions ("#") still never carry a denied topic. Cheap when no rule
 * has deny entries (one pass over the rules until one selects @id).
 */
bool access_delivery_denied(const struct conf_local *local, const struct access_identity *id,
                            const char *topic, size_t len);

/**
 * access_pattern_check() - is @pattern usable in local.acl[].publish or
 * .subscribe: a valid MQTT topic filter (§4.7) whose levels may also hold
 * the globs '*' and '?', and where "%c" and "%u" stand alone as a level.
 * Returns 0 or -EINVAL with a static *reason.
 */
int access_pattern_check(const char *pattern, const char **reason);

/**
 * access_child_glob_check() - is @glob usable in local.acl[].children (no
 * '/', '+', '#', control characters; not empty). Returns 0 or -EINVAL with a
 * static *reason.
 */
int access_child_glob_check(const char *glob, const char **reason);

/**
 * access_rule_matches() - does @rule select @id: every selector the rule has
 * (uid, gid, user) matches, and a rule without selectors matches everyone.
 * gid matches the primary or a supplementary group.
 */
bool access_rule_matches(const struct conf_acl_rule *rule, const struct access_identity *id);

/**
 * access_acl_check() - may @id do @action on @topic (@len bytes)?
 *
 * With no rules (local->acl_count == 0) everything is allowed. Otherwise the
 * first rule that selects the client (access_rule_matches()) decides, and it
 * allows exactly what one of its patterns for @action covers; a client no
 * rule selects may do nothing. A pattern covers a topic name when it matches
 * it like a subscription filter would; it covers a filter when every topic
 * the filter can match is covered ("dev/+/x" is covered by "dev/#" but not
 * by "dev/a/x"). Levels in a pattern: '+' and '#' as in MQTT, globs with '*'
 * and '?' match one literal level, "%c" matches one level that is a child id
 * allowed by the rule's `children` globs (any level when it has none), "%u"
 * the client's authenticated username.
 *
 * Raw pass-through: a topic or filter whose first level is "cloud"
 * (cloud/<uplink>/<topic>, sent to the uplink as it is, past the profile's
 * rules) is covered only by a pattern whose first level is the literal
 * "cloud" ("cloud/#", "cloud/c8y/#"); "#" and "+/..." do not grant it.
 *
 * Deny entries: before its allow-lists, the deciding rule's deny_publish
 * patterns refuse every topic name they cover, and its deny_subscribe
 * patterns every filter they cover wholly ("test/nosubscribe", "test/+"
 * against a denied "test/+"). A filter that only overlaps a denied topic
 * ("#", "+/+" against "test/nosubscribe") is granted, and delivery holds
 * that topic back (access_delivery_denied()). Globs, "%c" and "%u" work as
 * in allow patterns; "cloud" needs no literal.
 *
 * @rule_index: set to the deciding rule's index, or -1 when no rule selected
 * the client (may be NULL). Returns 0 (allowed), -EPERM (a deny entry of
 * that rule refused it) or -EACCES (not allowed).
 */
int access_acl_check(const struct conf_local *local, const struct access_identity *id,
                     enum access_action action, const char *topic, size_t len, int *rule_index);

/**
 * access_identity_describe() - "uid 1001 gid 1001 pid 42", "user NAME" or
 * "anonymous" into @buf, for log lines.
 */
void access_identity_describe(const struct access_identity *id, char *buf, size_t size);

/**
 * access_identity_same() - the same local identity: the same authenticated
 * username, or without one the same known uid (or both unidentified).
 * Groups, gid and pid may change between connections; the identity does
 * not. A persistent session is resumed only by the same identity.
 */
bool access_identity_same(const struct access_identity *a, const struct access_identity *b);

#endif
