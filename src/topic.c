/* topic.c - topic name/filter rules (MQTT 3.1.1 §4.7) and the subscription tree. */
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

/* --- the topic tree ----------------------------------------------------------- */

struct topic_node {
    struct topic_node *parent;
    struct topic_node **children; /* exact levels, sorted by (len, bytes) */
    size_t child_count, child_cap;
    struct topic_node *plus; /* the '+' child */
    struct topic_node *hash; /* the '#' child (a leaf in a valid filter) */
    struct topic_sub *subs;  /* subscriptions whose filter ends here */
    size_t sub_count;
    size_t level_len;
    char level[]; /* not NUL-terminated */
};

/* A pending step of the match walk: @node matched the levels before @offset. */
struct match_step {
    const struct topic_node *node;
    size_t offset; /* start of the next level in the name; name_len + 1 = all consumed */
};

struct match_hit {
    void *owner;
    uint8_t qos;
};

static int level_cmp(const struct topic_node *n, const char *level, size_t len)
{
    if (n->level_len != len)
        return n->level_len < len ? -1 : 1;
    return memcmp(n->level, level, len);
}

/* Binary search among the exact children; *pos is the insertion point. */
static struct topic_node *node_find_child(const struct topic_node *node, const char *level,
                                          size_t len, size_t *pos)
{
    size_t lo = 0, hi = node->child_count;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = level_cmp(node->children[mid], level, len);
        if (c == 0) {
            if (pos)
                *pos = mid;
            return node->children[mid];
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (pos)
        *pos = lo;
    return NULL;
}

static struct topic_node *node_new(struct topic_node *parent, const char *level, size_t len)
{
    struct topic_node *n = calloc(1, sizeof(*n) + len);

    if (!n)
        return NULL;
    n->parent = parent;
    n->level_len = len;
    memcpy(n->level, level, len);
    return n;
}

/* The child for one filter level, created when @create. */
static struct topic_node *node_child(struct topic_node *node, const char *level, size_t len,
                                     bool create)
{
    struct topic_node **special = NULL, *child;
    size_t pos;

    if (len == 1 && level[0] == '+')
        special = &node->plus;
    else if (len == 1 && level[0] == '#')
        special = &node->hash;
    if (special) {
        if (!*special && create)
            *special = node_new(node, level, len);
        return *special;
    }
    child = node_find_child(node, level, len, &pos);
    if (child || !create)
        return child;
    if (node->child_count == node->child_cap) {
        size_t cap = node->child_cap ? node->child_cap * 2 : 4;
        struct topic_node **grown = realloc(node->children, cap * sizeof(*grown));
        if (!grown)
            return NULL;
        node->children = grown;
        node->child_cap = cap;
    }
    child = node_new(node, level, len);
    if (!child)
        return NULL;
    memmove(node->children + pos + 1, node->children + pos,
            (node->child_count - pos) * sizeof(*node->children));
    node->children[pos] = child;
    node->child_count++;
    return child;
}

static bool node_unused(const struct topic_node *n)
{
    return !n->subs && !n->child_count && !n->plus && !n->hash;
}

/* Detach @node from its parent and free it (it must be unused). */
static void node_free_one(struct topic_table *table, struct topic_node *node)
{
    struct topic_node *parent = node->parent;

    if (!parent) {
        table->head = NULL;
    } else if (parent->plus == node) {
        parent->plus = NULL;
    } else if (parent->hash == node) {
        parent->hash = NULL;
    } else {
        size_t pos;
        if (node_find_child(parent, node->level, node->level_len, &pos) == node) {
            memmove(parent->children + pos, parent->children + pos + 1,
                    (parent->child_count - pos - 1) * sizeof(*parent->children));
            parent->child_count--;
        }
    }
    free(node->children);
    free(node);
}

/* Free @node and its now-empty ancestors; the root goes too when empty. */
static void node_prune(struct topic_table *table, struct topic_node *node)
{
    while (node && node_unused(node)) {
        struct topic_node *parent = node->parent;
        node_free_one(table, node);
        node = parent;
    }
}

/* Walk (or build) the path of @filter; NULL when absent (or out of memory). */
static struct topic_node *node_for_filter(struct topic_table *table, const char *filter, size_t len,
                                          bool create)
{
    struct topic_node *node = table->head;
    size_t start = 0;

    if (!node) {
        if (!create)
            return NULL;
        node = table->head = node_new(NULL, "", 0);
        if (!node)
            return NULL;
    }
    for (;;) {
        size_t end = start;
        struct topic_node *child;

        while (end < len && filter[end] != '/')
            end++;
        child = node_child(node, filter + start, end - start, create);
        if (!child) {
            if (create)
                node_prune(table, node); /* out of memory: undo empty nodes */
            return NULL;
        }
        node = child;
        if (end == len)
            return node;
        start = end + 1;
    }
}

int topic_table_add(struct topic_table *table, void *owner, const char *filter, size_t filter_len,
                    uint8_t qos, bool *first)
{
    struct topic_node *node = node_for_filter(table, filter, filter_len, true);
    struct topic_sub *sub;

    if (!node)
        return -ENOMEM;
    if (first)
        *first = node->sub_count == 0;
    for (sub = node->subs; sub; sub = sub->next) {
        if (sub->owner == owner) {
            sub->qos = qos; /* §3.8.4-3: replace the existing subscription */
            return 0;
        }
    }
    sub = malloc(sizeof(*sub));
    if (!sub) {
        node_prune(table, node);
        return -ENOMEM;
    }
    sub->owner = owner;
    sub->qos = qos;
    sub->next = node->subs;
    node->subs = sub;
    node->sub_count++;
    table->count++;
    return 0;
}

/* Unlink @owner's subscription from @node; true when there was one. */
static bool node_remove_owner(struct topic_table *table, struct topic_node *node, void *owner)
{
    for (struct topic_sub **pp = &node->subs; *pp; pp = &(*pp)->next) {
        struct topic_sub *sub = *pp;
        if (sub->owner == owner) {
            *pp = sub->next;
            free(sub);
            node->sub_count--;
            table->count--;
            return true;
        }
    }
    return false;
}

int topic_table_remove(struct topic_table *table, void *owner, const char *filter,
                       size_t filter_len, bool *last)
{
    struct topic_node *node = node_for_filter(table, filter, filter_len, false);

    if (!node || !node_remove_owner(table, node, owner))
        return -ENOENT;
    if (last)
        *last = node->sub_count == 0;
    node_prune(table, node);
    return 0;
}

/* The filter a node stands for, rebuilt from the levels up to the root. */
static char *node_filter(const struct topic_node *node, size_t *len_out)
{
    size_t len = 0;
    char *filter, *p;

    for (const struct topic_node *n = node; n->parent; n = n->parent)
        len += n->level_len + (n->parent->parent ? 1 : 0);
    filter = malloc(len + 1);
    if (!filter)
        return NULL;
    p = filter + len;
    *p = '\0';
    for (const struct topic_node *n = node; n->parent; n = n->parent) {
        p -= n->level_len;
        memcpy(p, n->level, n->level_len);
        if (n->parent->parent)
            *--p = '/';
    }
    *len_out = len;
    return filter;
}

/* Every node of the tree, depth first, into a malloc'd array (iterative: a
 * filter may have 32,768 levels, too deep to recurse). */
static struct topic_node **tree_nodes(const struct topic_table *table, size_t *count_out)
{
    struct topic_node **nodes = NULL;
    size_t count = 0, cap = 0, next = 0;

    if (table->head) {
        cap = 64;
        nodes = malloc(cap * sizeof(*nodes));
        if (!nodes)
            return NULL;
        nodes[count++] = table->head;
    }
    /* Breadth first over the array itself: nodes[next..count) are unvisited. */
    while (next < count) {
        struct topic_node *n = nodes[next++];
        size_t need = count + n->child_count + 2;

        if (need > cap) {
            struct topic_node **grown;
            while (cap < need)
                cap *= 2;
            grown = realloc(nodes, cap * sizeof(*nodes));
            if (!grown) {
                free(nodes);
                return NULL;
            }
            nodes = grown;
        }
        for (size_t i = 0; i < n->child_count; i++)
            nodes[count++] = n->children[i];
        if (n->plus)
            nodes[count++] = n->plus;
        if (n->hash)
            nodes[count++] = n->hash;
    }
    *count_out = count;
    return nodes;
}

void topic_table_remove_owner(struct topic_table *table, void *owner,
                              void (*last_cb)(void *arg, const char *filter, size_t len), void *arg)
{
    size_t count = 0, hits = 0;
    struct topic_node **nodes = tree_nodes(table, &count);

    if (!nodes)
        return; /* empty, or out of memory: the subscriptions stay (harmless, logged by caller) */
    /* Keep only the nodes holding one of @owner's subscriptions, then remove
     * them: pruning while walking would free nodes still in the array. */
    for (size_t i = 0; i < count; i++) {
        bool has = false;
        for (const struct topic_sub *sub = nodes[i]->subs; sub && !has; sub = sub->next)
            has = sub->owner == owner;
        if (has)
            nodes[hits++] = nodes[i];
    }
    for (size_t i = 0; i < hits; i++) {
        struct topic_node *node = nodes[i];

        node_remove_owner(table, node, owner);
        if (node->sub_count == 0 && last_cb) {
            size_t len;
            char *filter = node_filter(node, &len);
            if (filter)
                last_cb(arg, filter, len);
            free(filter);
        }
    }
    free(nodes);
    if (hits == 0)
        return;
    /* Prune the emptied nodes and their empty ancestors: walk the whole tree
     * deepest first (the array is breadth first, so backwards), freeing each
     * unused node once, so no node is freed while still listed. */
    nodes = tree_nodes(table, &count);
    for (size_t i = count; nodes && i-- > 0;)
        if (node_unused(nodes[i]))
            node_free_one(table, nodes[i]);
    free(nodes);
}

/* --- matching ------------------------------------------------------------------ */

/* The scratch area: steps at the front, hits at the back, as two arrays. */
struct match_scratch {
    struct match_step *steps;
    size_t step_count, step_cap;
    struct match_hit *hits;
    size_t hit_count, hit_cap;
};

static int hit_cmp(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t)((const struct match_hit *)a)->owner;
    uintptr_t y = (uintptr_t)((const struct match_hit *)b)->owner;
    return x < y ? -1 : x > y;
}

static bool grow(void **array, size_t *cap, size_t need, size_t size)
{
    size_t want = *cap ? *cap : 16;
    void *p;

    if (need <= *cap)
        return true;
    while (want < need)
        want *= 2;
    p = realloc(*array, want * size);
    if (!p)
        return false;
    *array = p;
    *cap = want;
    return true;
}

/* Record every subscription of @node; without memory, deliver directly
 * (an owner may then get a duplicate, which beats losing the message). */
static void collect(struct match_scratch *m, const struct topic_node *node,
                    void (*match_cb)(void *arg, void *owner, uint8_t qos), void *arg)
{
    if (!node)
        return;
    for (const struct topic_sub *sub = node->subs; sub; sub = sub->next) {
        if (!grow((void **)&m->hits, &m->hit_cap, m->hit_count + 1, sizeof(*m->hits))) {
            match_cb(arg, sub->owner, sub->qos);
            continue;
        }
        m->hits[m->hit_count].owner = sub->owner;
        m->hits[m->hit_count].qos = sub->qos;
        m->hit_count++;
    }
}

static bool push(struct match_scratch *m, const struct topic_node *node, size_t offset)
{
    if (!node)
        return true;
    if (!grow((void **)&m->steps, &m->step_cap, m->step_count + 1, sizeof(*m->steps)))
        return false;
    m->steps[m->step_count].node = node;
    m->steps[m->step_count].offset = offset;
    m->step_count++;
    return true;
}

void topic_table_match(struct topic_table *table, const char *name, size_t name_len,
                       void (*match_cb)(void *arg, void *owner, uint8_t qos), void *arg)
{
    struct match_scratch *m = table->scratch;
    bool dollar = name_len > 0 && name[0] == '$';

    if (!table->head || table->matching)
        return;
    if (!m) {
        m = table->scratch = calloc(1, sizeof(*m));
        if (!m)
            return;
    }
    table->matching = true;
    m->step_count = m->hit_count = 0;
    push(m, table->head, 0);
    while (m->step_count) {
        struct match_step step = m->steps[--m->step_count];
        const struct topic_node *node = step.node;
        size_t end = step.offset, next;

        if (step.offset > name_len) {
            /* Every level matched: subscriptions ending here, and "a/#"
             * also matches "a" (§4.7.1-2). */
            collect(m, node, match_cb, arg);
            collect(m, node->hash, match_cb, arg);
            continue;
        }
        while (end < name_len && name[end] != '/')
            end++;
        next = end + 1; /* == name_len + 1 after the last level */
        /* §4.7.2-1: a leading wildcard does not match a '$' topic. */
        if (!(dollar && node == table->head)) {
            collect(m, node->hash, match_cb, arg);
            if (!push(m, node->plus, next))
                break;
        }
        if (!push(m, node_find_child(node, name + step.offset, end - step.offset, NULL), next))
            break;
    }
    /* One delivery per owner at the highest QoS (§3.3.5). */
    if (m->hit_count > 1)
        qsort(m->hits, m->hit_count, sizeof(*m->hits), hit_cmp);
    for (size_t i = 0; i < m->hit_count;) {
        void *owner = m->hits[i].owner;
        uint8_t best = 0;
        for (; i < m->hit_count && m->hits[i].owner == owner; i++)
            if (m->hits[i].qos > best)
                best = m->hits[i].qos;
        match_cb(arg, owner, best);
    }
    table->matching = false;
}

void topic_table_deinit(struct topic_table *table)
{
    size_t count = 0;
    struct topic_node **nodes = tree_nodes(table, &count);
    struct match_scratch *m = table->scratch;

    /* tree_nodes() fails only without memory; then leak rather than recurse. */
    for (size_t i = 0; nodes && i < count; i++) {
        struct topic_sub *sub = nodes[i]->subs;
        while (sub) {
            struct topic_sub *next = sub->next;
            free(sub);
            sub = next;
        }
        free(nodes[i]->children);
        free(nodes[i]);
    }
    free(nodes);
    if (m) {
        free(m->steps);
        free(m->hits);
        free(m);
    }
    table->head = NULL;
    table->count = 0;
    table->scratch = NULL;
}
