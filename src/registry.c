/* registry.c - persisted child registry (see registry.h). */
#include "registry.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"
#include "log.h"
#include "util.h"

#define REGISTRY_HEADER   "# uplinkd child registry 1\n"
#define REGISTRY_FILE_MAX (16u * 1024 * 1024)

struct registry_entry {
    char *child;
    enum registry_state state;
    bool persist;
};

struct registry {
    char *path; /* NULL: memory only */
    char *name;
    struct registry_entry *entries;
    size_t count;
    size_t cap;
};

static ssize_t entry_find(const struct registry *registry, const char *child)
{
    for (size_t i = 0; i < registry->count; i++) {
        if (strcmp(registry->entries[i].child, child) == 0)
            return (ssize_t)i;
    }
    return -1;
}

static int entry_add(struct registry *registry, const char *child, size_t len,
                     enum registry_state state, bool persist)
{
    if (registry->count == registry->cap) {
        size_t cap = registry->cap ? registry->cap * 2 : 16;
        struct registry_entry *grown = realloc(registry->entries, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        registry->entries = grown;
        registry->cap = cap;
    }
    char *copy = strndup(child, len);
    if (!copy)
        return -ENOMEM;
    registry->entries[registry->count++] =
        (struct registry_entry){.child = copy, .state = state, .persist = persist};
    return 0;
}

static void entry_remove(struct registry *registry, size_t index)
{
    free(registry->entries[index].child);
    registry->entries[index] = registry->entries[--registry->count];
}

static bool child_ok(const char *child, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)child[i] <= 0x20 || child[i] == 0x7f)
            return false;
    }
    return true;
}

static int registry_load(struct registry *registry, const char *text, size_t len)
{
    size_t pos = 0;
    unsigned line_no = 0;

    while (pos < len) {
        const char *line = text + pos;
        const char *end = memchr(line, '\n', len - pos);
        size_t line_len = end ? (size_t)(end - line) : len - pos;
        pos += line_len + (end ? 1 : 0);
        line_no++;
        if (line_len == 0 || line[0] == '#')
            continue;
        enum registry_state state;
        size_t skip;
        if (line_len > 5 && memcmp(line, "done ", 5) == 0) {
            state = REGISTRY_DONE;
            skip = 5;
        } else if (line_len > 8 && memcmp(line, "pending ", 8) == 0) {
            state = REGISTRY_PENDING;
            skip = 8;
        } else {
            log_uplink(LOG_ERR, registry->name,
                       "child registry %s line %u: expected \"done <child>\" or \"pending "
                       "<child>\"; remove the file to register every child again",
                       registry->path, line_no);
            return -EINVAL;
        }
        if (!child_ok(line + skip, line_len - skip)) {
            log_uplink(LOG_ERR, registry->name,
                       "child registry %s line %u: invalid child id; remove the file to "
                       "register every child again",
                       registry->path, line_no);
            return -EINVAL;
        }
        int rc = entry_add(registry, line + skip, line_len - skip, state, true);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int registry_open(const char *path, const char *name, struct registry **out)
{
    struct registry *registry;
    char *text = NULL;
    size_t len = 0;
    int rc;

    registry = calloc(1, sizeof(*registry));
    if (!registry)
        return -ENOMEM;
    registry->name = strdup(name ? name : "");
    if (!registry->name || (path && !(registry->path = strdup(path)))) {
        rc = -ENOMEM;
        goto err;
    }
    if (path) {
        rc = util_read_file(path, REGISTRY_FILE_MAX, &text, &len);
        if (rc == -ENOENT) {
            rc = 0;
        } else if (rc < 0) {
            log_uplink(LOG_ERR, registry->name, "cannot read the child registry %s: %s", path,
                       strerror(-rc));
            goto err;
        } else {
            rc = registry_load(registry, text, len);
            free(text);
            if (rc < 0)
                goto err;
        }
    }
    *out = registry;
    return 0;

err:
    registry_free(registry);
    return rc;
}

void registry_free(struct registry *registry)
{
    if (!registry)
        return;
    for (size_t i = 0; i < registry->count; i++)
        free(registry->entries[i].child);
    free(registry->entries);
    free(registry->path);
    free(registry->name);
    free(registry);
}

enum registry_state registry_get(const struct registry *registry, const char *child)
{
    ssize_t i = entry_find(registry, child);
    return i < 0 ? REGISTRY_UNKNOWN : registry->entries[i].state;
}

int registry_write_file(const char *path, const void *data, size_t len, unsigned mode)
{
    char tmp[4096], dir[4096];
    const char *bytes = data;
    int fd, rc = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return -errno;
    /* umask may have narrowed it; a wider existing file is narrowed too. */
    if (fchmod(fd, mode) < 0)
        goto err_errno;
    while (len > 0) {
        ssize_t n = write(fd, bytes, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto err_errno;
        bytes += n;
        len -= (size_t)n;
    }
    if (fsync(fd) < 0)
        goto err_errno;
    if (close(fd) < 0) {
        fd = -1;
        goto err_errno;
    }
    fd = -1;
    if (rename(tmp, path) < 0)
        goto err_errno;
    /* The rename itself must survive a power loss too. */
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *(slash == dir ? slash + 1 : slash) = '\0';
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    return 0;

err_errno:
    rc = -errno;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

static int registry_save(struct registry *registry)
{
    struct json_buf text; /* just a string builder here */
    int rc;

    if (!registry->path)
        return 0;
    json_buf_init(&text);
    json_append_raw(&text, REGISTRY_HEADER);
    for (size_t i = 0; i < registry->count; i++) {
        const struct registry_entry *e = &registry->entries[i];
        if (!e->persist || e->state == REGISTRY_UNKNOWN)
            continue;
        json_append_fmt(&text, "%s %s\n", e->state == REGISTRY_DONE ? "done" : "pending", e->child);
    }
    if (text.failed) {
        json_buf_deinit(&text);
        return -ENOMEM;
    }
    rc = registry_write_file(registry->path, text.data, text.len, 0600);
    json_buf_deinit(&text);
    if (rc < 0)
        log_uplink(LOG_ERR, registry->name,
                   "cannot write the child registry %s: %s (children may be registered again "
                   "after a restart)",
                   registry->path, strerror(-rc));
    return rc;
}

int registry_set(struct registry *registry, const char *child, enum registry_state state,
                 bool persist)
{
    ssize_t i = entry_find(registry, child);
    bool was_persistent = i >= 0 && registry->entries[i].persist;
    int rc;

    if (!child_ok(child, strlen(child)))
        return -EINVAL;
    if (state == REGISTRY_UNKNOWN) {
        if (i < 0)
            return 0;
        entry_remove(registry, (size_t)i);
        return was_persistent ? registry_save(registry) : 0;
    }
    if (i < 0) {
        rc = entry_add(registry, child, strlen(child), state, persist);
        if (rc < 0)
            return rc;
    } else {
        if (registry->entries[i].state == state && registry->entries[i].persist == persist)
            return 0;
        registry->entries[i].state = state;
        registry->entries[i].persist = persist;
    }
    return persist || was_persistent ? registry_save(registry) : 0;
}

void registry_forget_volatile(struct registry *registry)
{
    for (size_t i = 0; i < registry->count;) {
        if (!registry->entries[i].persist)
            entry_remove(registry, i);
        else
            i++;
    }
}

size_t registry_count(const struct registry *registry)
{
    return registry->count;
}

const char *registry_entry(const struct registry *registry, size_t index,
                           enum registry_state *state)
{
    if (state)
        *state = registry->entries[index].state;
    return registry->entries[index].child;
}
