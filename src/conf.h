/* conf.h - validated, immutable configuration (see docs/configuration.md).
 *
 * conf_load() parses a YAML file with libyaml, checks every key, and builds a
 * struct conf that is never modified afterwards. Reload builds a new one and
 * swaps pointers; runtime code never calls the parser.
 */
#ifndef UPLINKD_CONF_H
#define UPLINKD_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct profile_spec;

#include "jwt.h" /* enum jwt_alg, enum jwt_kid_mode, EVP_PKEY */

enum conf_listen_kind {
    CONF_LISTEN_TCP,  /* tcp://HOST:PORT, HOST an IPv4/IPv6 literal or "localhost" */
    CONF_LISTEN_UNIX, /* unix:///absolute/path */
};

/* One local listener, parsed from a URL in local.listen. */
struct conf_listen {
    enum conf_listen_kind kind;
    char *url;     /* the URL as written, for logs */
    char *host;    /* TCP only: address to bind (brackets removed for IPv6) */
    uint16_t port; /* TCP only */
    char *path;    /* UNIX only: socket path */
};

/* One local.acl rule (see access.h for how rules are evaluated). */
struct conf_acl_rule {
    bool has_uid; /* uid: the rule selects Unix-socket peers with this uid */
    uint32_t uid;
    bool has_gid; /* gid: ... whose primary or supplementary group is this gid */
    uint32_t gid;
    char *user;      /* user: ... clients authenticated with this username */
    char **children; /* children: globs of child ids that "%c" may stand for */
    size_t children_count;
    char **publish; /* publish: patterns of topics the client may publish to */
    size_t publish_count;
    char **subscribe; /* subscribe: patterns of filters the client may subscribe to */
    size_t subscribe_count;
    char **deny_publish; /* deny_publish: patterns of topics it may not publish to, checked
                            before publish (deny wins) */
    size_t deny_publish_count;
    char **deny_subscribe; /* deny_subscribe: patterns it may not subscribe to nor receive */
    size_t deny_subscribe_count;
};

struct access_passwords;

struct conf_local {
    struct conf_listen *listen; /* default: tcp://127.0.0.1:1883, unix:///run/uplinkd/local.sock */
    size_t listen_count;
    unsigned socket_mode;   /* local.socket_mode, octal string, default 0660 */
    char *socket_group;     /* local.socket_group, NULL = leave the group alone */
    size_t max_packet_size; /* local.max_packet_size, default 256 KiB */
    unsigned max_clients;   /* local.max_clients: clients that completed CONNECT, default 1024 */
    unsigned max_pending_connects; /* local.max_pending_connects: connections per listener that
                                      have not completed CONNECT, default 128 */
    unsigned max_pending_per_uid;  /* local.max_pending_per_uid: the same per peer uid (where
                                      the peer is identified), all listeners, default 32 */
    unsigned connect_deadline_ms;  /* local.connect_deadline: accept to a complete CONNECT,
                                      default 5 s */
    char *topic_prefix;            /* local.topic_prefix, default "dev" */
    unsigned max_inflight;         /* local.max_inflight: QoS>0 messages sent to one client and
                                  not yet acknowledged, default 100 */
    unsigned max_queued;           /* local.max_queued: QoS>0 messages queued for one client
                                  (offline persistent session or window full), default 1000 */
    size_t max_queued_bytes;       /* local.max_queued_bytes: payload+topic bytes queued for all
                                  clients together, default 64 MiB */
    char *password_file;           /* local.password_file: TCP clients must log in; NULL = no */
    struct access_passwords *passwords; /* its parsed contents (access.h), NULL without */
    struct conf_acl_rule *acl;          /* local.acl; none = every local client may do everything */
    size_t acl_count;
};

enum conf_auth_type {
    CONF_AUTH_NONE,
    CONF_AUTH_BASIC, /* MQTT username + password */
    CONF_AUTH_JWT,   /* MQTT password = a JWT signed for each connection (jwt.h) */
};

enum conf_tls_version {
    CONF_TLS_1_2, /* tls.min_version: tls1.2 (default; 1.3 stays allowed) */
    CONF_TLS_1_3, /* tls.min_version: tls1.3 */
};

struct conf_tls {
    bool enabled;                      /* tls.enabled, default true */
    bool ca_system;                    /* tls.ca: system (default) */
    char *ca_file;                     /* tls.ca: /path/to/ca.pem */
    char *cert;                        /* tls.cert: client certificate (chain) PEM, optional */
    char *key;                         /* tls.key: private key PEM, required with cert */
    enum conf_tls_version min_version; /* tls.min_version */
    /* tls.alpn: the ALPN protocol offered, NULL = none (libmosquitto 2.0
     * offers one protocol, so the list in the file holds at most one). */
    char *alpn;
    /* tls.insecure: no host name check (the chain is still verified);
     * default false, warned about on every connect. */
    bool insecure;
    /* Where tls.ca and tls.cert are set ("FILE:LINE:COL"), so that
     * tlscheck's messages about the files point at the line; NULL when not
     * set in the file. Not part of conf_uplink_equal(). */
    char *ca_at;
    char *cert_at;
};

/* When the clock is good enough to sign a JWT (jwt_clock_check()). */
enum conf_clock_check {
    CONF_CLOCK_SYNC,       /* auth.clock_check: sync (default): after the build date and
                              the kernel says NTP-synchronised (no STA_UNSYNC) */
    CONF_CLOCK_BUILD_DATE, /* auth.clock_check: build-date: only after the build date */
};

/* One auth.claims entry: an extra string claim. */
struct conf_jwt_claim {
    char *name;
    char *value;
};

/* auth with type jwt. The key is loaded and a trial token signed by
 * conf_load(), so --check-config reports a bad key, passphrase, PIN or
 * alg in words. */
struct conf_jwt {
    /* auth.alg; default from the key: ES256 (P-256), ES384 (P-384), RS256 (RSA) */
    enum jwt_alg alg;
    char *key;                     /* auth.key: PEM path (absolute) or pkcs11: URI, required */
    char *passphrase_file;         /* auth.passphrase_file (absolute), NULL = none */
    char *pkcs11_module;           /* auth.pkcs11_module, NULL = default (p11-kit proxy) */
    EVP_PKEY *private_key;         /* the loaded key, owned (EVP_PKEY_free in conf_free) */
    uint32_t lifetime_s;           /* auth.lifetime, default 60m */
    uint32_t max_lifetime_s;       /* the profile's cap on exp - iat (generic: 24 h) */
    uint32_t skew_s;               /* auth.skew: iat back-dated, default 60s */
    uint32_t refresh_percent;      /* auth.refresh: new token at this % of the life, default 80 */
    char *aud;                     /* auth.aud: required with the generic profile */
    enum jwt_kid_mode kid_mode;    /* auth.kid: absent = none, "auto" = fingerprint, else VALUE */
    char *kid;                     /* auth.kid's literal value (JWT_KID_VALUE) */
    struct conf_jwt_claim *claims; /* auth.claims: extra string claims */
    size_t claim_count;
    enum conf_clock_check clock_check; /* auth.clock_check */
};

/* auth.claims holds at most this many extra claims. */
#define CONF_JWT_MAX_CLAIMS 32

/* The claims @jwt describes (aud, lifetime, cap, skew and auth.claims), as
 * jwt_sign() takes them. @extra must have room for CONF_JWT_MAX_CLAIMS
 * entries; the strings in it and in @out stay owned by @jwt. */
void conf_jwt_claims(const struct conf_jwt *jwt, struct jwt_claim *extra, struct jwt_claims *out);

struct conf_auth {
    enum conf_auth_type type; /* auth.type: none (default) | basic | jwt */
    char *username;           /* auth.username (jwt: default "unused", as GCP ignores it) */
    char *password;           /* auth.password, or the contents of auth.password_file */
    struct conf_jwt jwt;      /* type jwt only */
};

/* uplinks[].spool: the store-and-forward queue (spool.h, docs/design/spool.md). */
enum conf_spool_durability {
    CONF_SPOOL_FSYNC, /* durability: fsync (default): acknowledged means on disk */
    CONF_SPOOL_NONE,  /* durability: none: in memory, lost on restart */
};

enum conf_spool_overflow {
    CONF_SPOOL_BLOCK,       /* overflow: block (default): stop acknowledging and reading */
    CONF_SPOOL_DROP_OLDEST, /* overflow: drop-oldest: discard the oldest, counted and logged */
};

struct conf_spool {
    enum conf_spool_durability durability; /* spool.durability */
    uint64_t max_bytes;                    /* spool.max_bytes, default 256 MiB */
    uint64_t max_age_ms;                   /* spool.max_age, default 0 = none */
    enum conf_spool_overflow overflow;     /* spool.overflow */
    unsigned commit_interval_ms;           /* spool.commit_interval: group commit wait, 5 ms */
    unsigned commit_gap_ms;                /* spool.commit_gap: between commit starts, 0 */
    bool qos0_offline_spool;               /* spool.qos0_offline: spool | drop (default) */
};

/* uplinks[].rate: token bucket for the cloud's quotas; 0 = unlimited. */
struct conf_rate {
    uint32_t max_msgs_per_s;  /* rate.max_msgs_per_s */
    uint64_t max_bytes_per_s; /* rate.max_bytes_per_s (a size: "64KiB") */
};

struct conf_uplink {
    char *name;           /* uplinks[].name: required, unique, [A-Za-z0-9_-]{1,64} */
    char *profile;        /* uplinks[].profile: default "generic" (profile_spec.h) */
    char *host;           /* uplinks[].host: required; also the TLS SNI and verified name */
    uint16_t port;        /* uplinks[].port: default 8883 with TLS, 1883 without */
    char *client_id;      /* uplinks[].client_id: default gateway.id */
    unsigned keepalive_s; /* uplinks[].keepalive: default 60 s */
    bool clean_session;   /* uplinks[].clean_session: default true */
    struct conf_tls tls;
    struct conf_auth auth;
    unsigned reconnect_base_ms; /* uplinks[].reconnect.base: default 1 s */
    unsigned reconnect_cap_ms;  /* uplinks[].reconnect.cap: default 120 s */
    size_t max_queued_messages; /* uplinks[].max_queued: obsolete (the spool bounds the queue) */
    unsigned max_inflight;      /* uplinks[].max_inflight: QoS 1 publishes awaiting PUBACK, 100 */
    struct conf_spool spool;    /* uplinks[].spool (see spool.h) */
    struct conf_rate rate;      /* uplinks[].rate */
    const struct profile_spec *spec; /* the profile's descriptor (static), NULL if unknown */
    void *section; /* owned: uplinks[].<profile>, the profile's own struct conf_<profile>
                      (src/profiles/<profile>/conf.h; read with <profile>_conf()), NULL
                      when the profile has none; freed by its section_free hook */
    char *cert_cn; /* the CN tls.cert must carry (profile rule: Cumulocity's device_id),
                      NULL = any; checked by tlscheck_uplink() */
};

/* Which children go to which uplinks. A child matches `children` by fnmatch(3)
 * glob. With no routes configured, every child goes to every uplink. */
struct conf_route {
    char *children;  /* glob, e.g. "*" or "modbus-*" */
    size_t *uplinks; /* indexes into conf.uplinks */
    size_t uplink_count;
};

struct conf {
    char *path;       /* the file this was loaded from */
    char *gateway_id; /* gateway.id: required */
    char *state_dir;  /* gateway.state_dir: default /var/lib/uplinkd */
    struct conf_local local;
    char *control_socket; /* control.socket: default /run/uplinkd/control.sock */
    int log_level; /* log.level: error|warning|notice|info|debug, default info (syslog priority) */
    unsigned shutdown_timeout_ms; /* shutdown_timeout: default 5 s */
    struct conf_uplink *uplinks;
    size_t uplink_count;
    struct conf_route *routes;
    size_t route_count;
};

/**
 * conf_load() - parse and validate a configuration file.
 * @path: file to read (borrowed).
 * @out: on success, a new conf that the caller owns (free with conf_free()).
 * @errors: on failure, a malloc'd text of one or more lines, each
 *          "FILE:LINE:COLUMN: KEY: what is wrong (expected ...)"; the caller frees
 *          it. Set to NULL on success.
 *
 * Returns 0, -EINVAL for an invalid file, -ENOENT/-EACCES/... when the file
 * cannot be read (errors then says so in words), -ENOMEM.
 */
int conf_load(const char *path, struct conf **out, char **errors);

/**
 * conf_free() - free a conf from conf_load(). NULL is allowed.
 */
void conf_free(struct conf *conf);

/**
 * conf_uplink_find() - the uplink named @name, or NULL.
 */
const struct conf_uplink *conf_uplink_find(const struct conf *conf, const char *name);

/**
 * conf_uplink_equal() - true when two uplink sections would produce the same
 * session (used by reload to decide whether an uplink must reconnect).
 */
bool conf_uplink_equal(const struct conf_uplink *a, const struct conf_uplink *b);

#endif
