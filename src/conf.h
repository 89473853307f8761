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

enum conf_listen_kind {
    CONF_LISTEN_TCP,  /* tcp://HOST:PORT, HOST an IPv4/IPv6 literal or "localhost" */
    CONF_LISTEN_UNIX, /* unix:///absolute/path */
};

/* One local listener, parsed from a URL in local.listen. */
struct conf_listen {
    enum conf_listen_kind kind;
    char *url;  /* the URL as written, for logs */
    char *host; /* TCP only: address to bind (brackets removed for IPv6) */
    uint16_t port; /* TCP only */
    char *path; /* UNIX only: socket path */
};

/* One local.acl rule (see access.h for how rules are evaluated). */
struct conf_acl_rule {
    bool has_uid;       /* uid: the rule selects Unix-socket peers with this uid */
    uint32_t uid;
    bool has_gid;       /* gid: ... whose primary or supplementary group is this gid */
    uint32_t gid;
    char *user;         /* user: ... clients authenticated with this username */
    char **children;    /* children: globs of child ids that "%c" may stand for */
    size_t children_count;
    char **publish;     /* publish: patterns of topics the client may publish to */
    size_t publish_count;
    char **subscribe;   /* subscribe: patterns of filters the client may subscribe to */
    size_t subscribe_count;
};

struct access_passwords;

struct conf_local {
    struct conf_listen *listen; /* default: tcp://127.0.0.1:1883, unix:///run/uplinkd/local.sock */
    size_t listen_count;
    unsigned socket_mode;      /* local.socket_mode, octal string, default 0660 */
    char *socket_group;        /* local.socket_group, NULL = leave the group alone */
    size_t max_packet_size;    /* local.max_packet_size, default 256 KiB */
    unsigned max_clients;      /* local.max_clients, default 1024 */
    char *topic_prefix;        /* local.topic_prefix, default "dev" */
    unsigned max_inflight;     /* local.max_inflight: QoS>0 messages sent to one client and
                                  not yet acknowledged, default 100 */
    unsigned max_queued;       /* local.max_queued: QoS>0 messages queued for one client
                                  (offline persistent session or window full), default 1000 */
    size_t max_queued_bytes;   /* local.max_queued_bytes: payload+topic bytes queued for all
                                  clients together, default 64 MiB */
    char *password_file;       /* local.password_file: TCP clients must log in; NULL = no */
    struct access_passwords *passwords; /* its parsed contents (access.h), NULL without */
    struct conf_acl_rule *acl; /* local.acl; none = every local client may do everything */
    size_t acl_count;
};

enum conf_auth_type {
    CONF_AUTH_NONE,
    CONF_AUTH_BASIC, /* MQTT username + password */
};

struct conf_tls {
    bool enabled;       /* tls.enabled, default true */
    bool ca_system;     /* tls.ca: system (default) */
    char *ca_file;      /* tls.ca: /path/to/ca.pem */
    char *cert;         /* tls.cert: client certificate (chain) PEM, optional */
    char *key;          /* tls.key: private key PEM, required with cert */
};

struct conf_auth {
    enum conf_auth_type type; /* auth.type: none (default) | basic */
    char *username;           /* auth.username */
    char *password;           /* auth.password, or the contents of auth.password_file */
};

/* Topic mapping of the generic profile: dev/<child>/<channel>[/<sub>] ->
 * <topic_prefix>/<child>/<channel>[/<sub>]. */
struct conf_generic {
    char *topic_prefix; /* generic.topic_prefix, default "<gateway.id>" */
};

struct conf_uplink {
    char *name;          /* uplinks[].name: required, unique, [A-Za-z0-9_-]{1,64} */
    char *profile;       /* uplinks[].profile: "generic" (the only one so far) */
    char *host;          /* uplinks[].host: required; also the TLS SNI and verified name */
    uint16_t port;       /* uplinks[].port: default 8883 with TLS, 1883 without */
    char *client_id;     /* uplinks[].client_id: default gateway.id */
    unsigned keepalive_s;    /* uplinks[].keepalive: default 60 s */
    bool clean_session;      /* uplinks[].clean_session: default true */
    struct conf_tls tls;
    struct conf_auth auth;
    unsigned reconnect_base_ms; /* uplinks[].reconnect.base: default 1 s */
    unsigned reconnect_cap_ms;  /* uplinks[].reconnect.cap: default 120 s */
    size_t max_queued_messages; /* uplinks[].max_queued: default 10000, in-memory until the spool lands */
    struct conf_generic generic;
};

/* Which children go to which uplinks. A child matches `children` by fnmatch(3)
 * glob. With no routes configured, every child goes to every uplink. */
struct conf_route {
    char *children;       /* glob, e.g. "*" or "modbus-*" */
    size_t *uplinks;      /* indexes into conf.uplinks */
    size_t uplink_count;
};

struct conf {
    char *path;               /* the file this was loaded from */
    char *gateway_id;         /* gateway.id: required */
    char *state_dir;          /* gateway.state_dir: default /var/lib/uplinkd */
    struct conf_local local;
    char *control_socket;     /* control.socket: default /run/uplinkd/control.sock */
    int log_level;            /* log.level: error|warning|notice|info|debug, default info (syslog priority) */
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
