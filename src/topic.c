/* topic.c - topic name/filter rules (MQTT 3.1.1 §4.7) and the subscription table. */
#include "topic.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "mqtt_codec.h"

static int reject(const char **reason, const char *why)
{
    if (reason)
        *reason = why;
    return -EINVAL;
}

/* The checks both names and filters share: length (§4.7.3-1) and UTF-8. */
static int check_common(const char *s, size_t len, const char **reason)
{
    if (len == 0)
        return reject(reason, "empty topic (§4.7.3-1)");
    if (len > TOPIC_MAX_LEN)
        return reject(reason, "topic longer than 65535 bytes");
    if (mqtt_utf8_check((const uint8_t *)s, len) < 0)
        return reject(reason, "topic is not valid UTF-8 or contains U+0000 (§1.5.3)");
    return 0;
}

int topic_name_check(const char *name, size_t len, const char **reason)
{
    int rc = check_common(name, len, reason);

    if (rc < 0)
        return rc;
    if (memchr(name, '+', len) || memchr(name, '#', len))
        return reject(reason, "wildcard in a topic name (§4.7.1-1)");
    return 0;
}

int topic_filter_check(const char *filter, size_t len, const char **reason)
{
    int rc = check_common(filter, len, reason);

    if (rc < 0)
        return rc;
    for (size_t i = 0; i < len; i++) {
        bool level_start = i == 0 || filter[i - 1] == '/';
        bool level_end = i + 1 == len || filter[i + 1] == '/';

        if (filter[i] == '#') {
            if (!level_start || i + 1 != len)
                return reject(reason, "'#' must be a whole last level (§4.7.1-2)");
        } else if (filter[i] == '+') {
            if (!level_start || !level_end)
                return reject(reason, "'+' must occupy a whole level (§4.7.1-3)");
        }
    }
    return 0;
}

bool topic_match(const char *filter, size_t filter_len, const char *name, size_t name_len)
{
    size_t fi = 0, ni = 0;

    /* §4.7.2-1: "$SYS/..." and friends are invisible to leading wildcards. */
    if (name_len > 0 && name[0] == '$' && filter_len > 0 && (filter[0] == '+' || filter[0] == '#'))
        return false;

    for (;;) {
        size_t fe = fi, ne = ni;
        bool filter_done, name_done;

        /* A valid filter has '#' only as its whole last level. */
        if (fi < filter_len && filter[fi] == '#')
            return true;
        while (fe < filter_len && filter[fe] != '/')
            fe++;
        while (ne < name_len && name[ne] != '/')
            ne++;
        if (!(fe - fi == 1 && filter[fi] == '+')) {
            if (fe - fi != ne - ni || memcmp(filter + fi, name + ni, fe - fi) != 0)
                return false;
        }
        filter_done = fe == filter_len;
        name_done = ne == name_len;
        if (filter_done && name_done)
            return true;
        if (name_done) /* "a/#" also matches "a" (§4.7.1-2) */
            return filter_len - fe == 2 && filter[fe + 1] == '#';
        if (filter_done)
            return false;
        fi = fe + 1;
        ni = ne + 1;
    }
}

static bool sub_is(const struct topic_sub *sub, const char *filter, size_t len)
{
    return sub->filter_len == len && memcmp(sub->filter, filter, len) == 0;
}

int topic_table_add(struct topic_table *table, void *owner, const char *filter, size_t filter_len,
                    uint8_t qos, bool *first)
{
    struct topic_sub **insert_at = &table->head, *sub;
    bool seen_filter = false;

    for (struct topic_sub **pp = &table->head; *pp; pp = &(*pp)->next) {
        sub = *pp;
        if (sub->owner == owner) {
            if (sub_is(sub, filter, filter_len)) {
                sub->qos = qos; /* §3.8.4-3: replace, keep the table shape */
                if (first)
                    *first = false;
                return 0;
            }
            insert_at = &sub->next; /* keep this owner's entries adjacent */
        } else if (sub_is(sub, filter, filter_len)) {
            seen_filter = true;
        }
    }
    sub = malloc(sizeof(*sub) + filter_len + 1);
    if (!sub)
        return -ENOMEM;
    sub->owner = owner;
    sub->qos = qos;
    sub->filter_len = filter_len;
    memcpy(sub->filter, filter, filter_len);
    sub->filter[filter_len] = '\0';
    sub->next = *insert_at;
    *insert_at = sub;
    table->count++;
    if (first)
        *first = !seen_filter;
    return 0;
}

static bool filter_in_use(const struct topic_table *table, const char *filter, size_t len)
{
    for (const struct topic_sub *sub = table->head; sub; sub = sub->next)
        if (sub_is(sub, filter, len))
            return true;
    return false;
}

int topic_table_remove(struct topic_table *table, void *owner, const char *filter,
                       size_t filter_len, bool *last)
{
    for (struct topic_sub **pp = &table->head; *pp; pp = &(*pp)->next) {
        struct topic_sub *sub = *pp;

        if (sub->owner != owner || !sub_is(sub, filter, filter_len))
            continue;
        *pp = sub->next;
        table->count--;
        free(sub);
        if (last)
            *last = !filter_in_use(table, filter, filter_len);
        return 0;
    }
    return -ENOENT;
}

void topic_table_remove_owner(struct topic_table *table, void *owner,
                              void (*last_cb)(void *arg, const char *filter, size_t len), void *arg)
{
    struct topic_sub **pp = &table->head;

    while (*pp) {
        struct topic_sub *sub = *pp;

        if (sub->owner != owner) {
            pp = &sub->next;
            continue;
        }
        *pp = sub->next;
        table->count--;
        if (last_cb && !filter_in_use(table, sub->filter, sub->filter_len))
            last_cb(arg, sub->filter, sub->filter_len);
        free(sub);
    }
}

void topic_table_match(const struct topic_table *table, const char *name, size_t name_len,
                       void (*match_cb)(void *arg, void *owner, uint8_t qos), void *arg)
{
    const struct topic_sub *sub = table->head;

    while (sub) {
        void *owner = sub->owner;
        int best = -1;

        /* Entries of one owner are adjacent (topic_table_add keeps them so). */
        for (; sub && sub->owner == owner; sub = sub->next)
            if (sub->qos > best && topic_match(sub->filter, sub->filter_len, name, name_len))
                best = sub->qos;
        if (best >= 0)
            match_cb(arg, owner, (uint8_t)best);
    }
}

void topic_table_deinit(struct topic_table *table)
{
    struct topic_sub *sub = table->head;

    while (sub) {
        struct topic_sub *next = sub->next;
        free(sub);
        sub = next;
    }
    table->head = NULL;
    table->count = 0;
}
