/* profile_spec.h - the pure half of every cloud profile: what follows from
 * the configuration alone, for the daemon, `--check-config` and
 * `uplinkctl diagnose` alike (all three link it: core library).
 *
 * A profile is one folder, src/profiles/<name>/: its descriptor
 * (spec.c: `const struct profile_spec profile_spec_<name>`, pure), its
 * daemon half (<name>.c: `const struct profile profile_<name>`, profile.h)
 * and a meson.build that adds them to the build. The one list that names
 * the profiles is `profile_names` in src/profiles/meson.build; meson writes
 * it into profiles/profile_list.h as PROFILE_LIST(X), and that macro is the
 * only way the rest of the code learns which profiles exist
 * (profile_spec_find(), profile_spec_names(), profile_find()).
 *
 * Threading: pure functions and constant tables; any thread.
 */
#ifndef UPLINKD_PROFILE_SPEC_H
#define UPLINKD_PROFILE_SPEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "profiles/profile_list.h" /* PROFILE_LIST(X): meson's list of the profiles */

struct conf_loader;
struct conf_uplink;
struct yaml_node_s;

/* What a profile's CONNECT carries that follows from the conf alone: the
 * daemon's session_cb and `uplinkctl diagnose` both use
 * profile_connect_id(), so diagnose sends what the daemon sends. JWT
 * claims (aud, sub, kid) need nothing here: the profile's section.c sets its
 * defaults in auth.jwt, which both sign from. */
#define PROFILE_CLIENT_ID_MAX 1024
struct profile_connect_id {
    char client_id[PROFILE_CLIENT_ID_MAX]; /* "" = uplinks[].client_id, else gateway.id */
    char username[512];                    /* "" = auth.username as configured (jwt: "unused") */
    const char *password; /* with a username: the password to send (borrowed from the conf) */
    bool clean_session;   /* true: clean session 1 whatever the conf says (Cumulocity) */
    /* A password the profile made now from the conf's files (Azure: a SAS
     * token from azure.key_file): @password points here, @token_expires_at
     * is when it stops being valid; @token_error says why none could be
     * made ("" = none needed or made). */
    char token[1400];
    long long token_expires_at;
    char token_error[256];
    bool c8y_bootstrap; /* Cumulocity bootstrap: the device's user and password are in
                             <state_dir>/credentials/<uplink> once received, else the
                             bootstrap user's are used (username/password above) */
};

/* One profile's descriptor. Every member but name is optional. */
struct profile_spec {
    const char *name; /* the uplinks[].profile value */

    /* Fill what CONNECT carries beyond the conf's own client id and user
     * (@out is zeroed first; strings may point into @uc). */
    void (*connect_id)(const struct conf_uplink *uc, struct profile_connect_id *out);

    /* A CONNACK return code (MQTT 3.1.1 §3.2.2.3) in the cloud's words, for
     * the daemon's log, or NULL for the generic text. */
    const char *(*connack_text)(const struct conf_uplink *uc, int rc);

    /* uplinkd diagnose, after CONNACK 4 or 5: what this cloud checks, with
     * the values this CONNECT carried (@client_id), as whole lines on @out. */
    void (*diagnose_refused)(const struct conf_uplink *uc, const char *client_id, FILE *out);

    /* The cloud's rules for a child id beyond mapping_child_check(): NULL
     * when @child is fine, else a static reason. */
    const char *(*child_check)(const char *child);
    /* The cloud's rules for a topic a device publishes to, for raw
     * cloud/<uplink>/<topic> pass-through (the profile checks the topics it
     * builds itself): NULL when the cloud takes it, else a static reason.
     * NULL hook: MQTT's rules only. */
    const char *(*cloud_topic_check)(const char *topic);
    /* uplinks[].<name>, the profile's own section (src/profiles/<name>/
     * section.c), read by conf_uplink.c after the uplink's common keys (tls, auth,
     * rate ...), so it may check and default them too. section_parse stores a
     * new struct in uplink->section (also when @section is NULL: the
     * uplink has no such key) and reports through conf_report();
     * section_free frees it; section_equal says whether two sections
     * give the same CONNECT (reload reconnects when not; NULL: always). */
    void (*section_parse)(struct conf_loader *ld, struct yaml_node_s *section,
                          struct yaml_node_s *uplink_node, const char *uplink_path,
                          struct conf_uplink *uplink);
    void (*section_free)(void *section);
    bool (*section_equal)(const void *a, const void *b);

    /* Non-NULL: the client id is built from these keys of the section, so
     * uplinks[].client_id is refused ("is set by profile gcp (from ...)"). */
    const char *client_id_from;

    /* auth.type jwt: true when auth.aud must be given (nothing in the
     * section supplies a default audience). */
    bool jwt_aud_required;

    /* auth.lifetime is capped at this many seconds; 0: 24 h. */
    uint32_t jwt_max_lifetime_s;

    /* The default of uplinks[].max_inflight when it is not set: the
     * cloud's limit of unacknowledged QoS 1 publishes (IoT Hub: 16); 0:
     * the generic default, 100. */
    unsigned max_inflight_default;
};

#define PROFILE_ONE(name) +1
enum { PROFILE_COUNT = 0 PROFILE_LIST(PROFILE_ONE) }; /* how many profiles the list names */
#undef PROFILE_ONE

#define PROFILE_SPEC_DECLARE(name) extern const struct profile_spec profile_spec_##name;
PROFILE_LIST(PROFILE_SPEC_DECLARE)
#undef PROFILE_SPEC_DECLARE

/**
 * profile_spec_find() - the descriptor of profile @name (NULL: "generic"),
 * or NULL when no profile has that name.
 */
const struct profile_spec *profile_spec_find(const char *name);

/**
 * profile_specs() - the PROFILE_COUNT descriptors in the list's order
 * (static).
 */
const struct profile_spec *const *profile_specs(void);

/**
 * profile_spec_names() - the profile names in the list's order,
 * NULL-terminated (static), for "expected one of" messages.
 */
const char *const *profile_spec_names(void);

/**
 * profile_connect_id() - fill @out for @uc (borrowed; @out may point into
 * it) through its profile's connect_id: gcp:
 * projects/<p>/locations/<r>/registries/<g>/devices/<d>; cumulocity:
 * d:<device_id>[:<template>], basic auth user <tenant>/<user> when
 * cumulocity.tenant is set, bootstrap; akenza: the device id; generic:
 * nothing beyond the conf.
 */
void profile_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out);

/**
 * profile_child_key_path() - a per-child key file pattern (gcp.child_key,
 * akenza.child_key) with every "%c" replaced by @child and "%%" by "%".
 * Returns the length, -ENAMETOOLONG.
 */
int profile_child_key_path(const char *pattern, const char *child, char *buf, size_t cap);

#endif
