/* mapping.h - pure topic mapping between the local contract and clouds.
 *
 * The local topic contract (DESIGN.md):
 *   <local prefix>/<child>/<channel>[/<sub>]   channel: telemetry, state (upstream);
 *                                               config, commands (downstream)
 *   cloud/<uplink>/<cloud topic>               raw pass-through, both ways
 * The generic profile maps dev/<child>/<channel>[/<sub>] to
 * <cloud prefix>/<child>/<channel>[/<sub>] and back.
 *
 * Nothing here does I/O or keeps state, so every rule is unit-tested.
 */
#ifndef UPLINKD_MAPPING_H
#define UPLINKD_MAPPING_H

#include <stdbool.h>
#include <stddef.h>

#define MAPPING_CHILD_MAX 255

enum mapping_kind {
    MAPPING_LOCAL_ONLY, /* not for any cloud: local pub/sub only */
    MAPPING_DEV,        /* <prefix>/<child>/<channel>[/<sub>] for the cloud */
    MAPPING_RAW,        /* cloud/<uplink>/<cloud topic> */
};

enum mapping_channel {
    MAPPING_TELEMETRY,
    MAPPING_STATE,
    MAPPING_SMARTREST,
    MAPPING_CONFIG,
    MAPPING_COMMANDS,
    MAPPING_OPERATIONS,
};

/* The parsed form of a local topic. Pointers are borrowed from the topic
 * passed to mapping_parse_local(); child is NUL-terminated copy. */
struct mapping_local {
    enum mapping_kind kind;
    char child[MAPPING_CHILD_MAX + 1];
    enum mapping_channel channel;
    const char *sub;         /* after "<channel>/", or NULL */
    char uplink[65];         /* MAPPING_RAW: the uplink name */
    const char *cloud_topic; /* MAPPING_RAW: the cloud topic (borrowed) */
};

/**
 * mapping_channel_name() - "telemetry", "state", ... for a channel.
 */
const char *mapping_channel_name(enum mapping_channel channel);

/**
 * mapping_channel_is_upstream() - true for channels a local app publishes to
 * reach the cloud (telemetry, state, smartrest).
 */
bool mapping_channel_is_upstream(enum mapping_channel channel);

/**
 * mapping_child_check() - is @child a usable child device id?
 * Rules shared by every cloud: 1..255 bytes of printable ASCII without
 * space and without / + # , " ' \ (topic and CSV metacharacters).
 * Returns NULL when valid, or a static reason in words.
 */
const char *mapping_child_check(const char *child, size_t len);

/**
 * mapping_parse_local() - classify a local topic.
 * @local_prefix: conf local.topic_prefix, e.g. "dev" (borrowed).
 * @topic: the local topic (borrowed; out keeps pointers into it).
 * @reason: on -EINVAL, a static text saying what is wrong.
 *
 * Returns 0 with @out filled, or -EINVAL when the topic claims the contract
 * but breaks it (bad child id, unknown channel, empty uplink or cloud topic):
 * such a message must not be forwarded.
 */
int mapping_parse_local(const char *local_prefix, const char *topic, struct mapping_local *out,
                        const char **reason);

/**
 * mapping_generic_up() - the cloud topic of a MAPPING_DEV message for the
 * generic profile: "<cloud_prefix>/<child>/<channel>[/<sub>]". An empty
 * cloud_prefix leaves the prefix (and its '/') out.
 * Returns the length written, or -ENAMETOOLONG when @cap is too small, or
 * -EINVAL for a channel the generic profile does not carry (smartrest,
 * downstream channels), with @reason set.
 */
int mapping_generic_up(const char *cloud_prefix, const struct mapping_local *m, char *buf,
                       size_t cap, const char **reason);

/**
 * mapping_generic_down() - the local topic for a cloud topic received by a
 * generic uplink: "<cloud_prefix>/<child>/config" and
 * "<cloud_prefix>/<child>/commands[/<sub>]" become
 * "<local_prefix>/<child>/config|commands[/<sub>]".
 * Returns the length written, 0 when the topic is not a device topic (it may
 * still be delivered raw), -ENAMETOOLONG, or -EINVAL for a bad child id.
 */
int mapping_generic_down(const char *local_prefix, const char *cloud_prefix,
                         const char *cloud_topic, char *buf, size_t cap);

/**
 * mapping_raw_local() - "cloud/<uplink>/<cloud_topic>" into @buf.
 * Returns the length written or -ENAMETOOLONG.
 */
int mapping_raw_local(const char *uplink, const char *cloud_topic, char *buf, size_t cap);

/**
 * mapping_raw_filter() - for a local subscription filter, the uplink name and
 * the cloud filter it asks for. "cloud/<uplink>/<filter>" gives both;
 * anything else returns -ENOENT. @uplink receives at most 64 chars.
 * Returns 0, -ENOENT, or -EINVAL (wildcard in the uplink level, empty filter).
 */
int mapping_raw_filter(const char *local_filter, char uplink[65], const char **cloud_filter);

#endif
