/* registry.h - which children a cloud already knows (per uplink).
 *
 * A profile that must register a child before its first message
 * (Cumulocity 101) records here that it did, so a restart does not register
 * every child again. Entries are "pending" (the registration is queued, not
 * yet acknowledged by the cloud) or "done" (acknowledged). Persistent
 * entries live in one small text file, rewritten atomically (temporary file,
 * fsync, rename, fsync of the directory) with mode 0600 on every change;
 * volatile entries (registrations that hold for one connection, such as GCP
 * attach) are kept in memory only.
 *
 * File format, one entry a line: "done <child>\n" or "pending <child>\n",
 * after a first line "# uplinkd child registry 1". Child ids never contain
 * white space (mapping_child_check()).
 *
 * The write runs on the loop thread: it is a few hundred bytes and happens
 * once per new child, not per message.
 */
#ifndef UPLINKD_REGISTRY_H
#define UPLINKD_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>

struct registry;

enum registry_state {
    REGISTRY_UNKNOWN, /* never registered (or forgotten) */
    REGISTRY_PENDING, /* registration queued, not yet acknowledged */
    REGISTRY_DONE,    /* the cloud acknowledged the registration */
};

/**
 * registry_open() - load the registry at @path (borrowed; copied). A missing
 * file is an empty registry; NULL @path keeps everything in memory.
 * @name: for log lines (the uplink name), copied.
 * Returns 0, -ENOMEM, or a negative errno when the file exists but cannot be
 * read or is not a registry (logged with the path and line).
 */
int registry_open(const char *path, const char *name, struct registry **out);

/** registry_free() - free it; NULL is allowed. */
void registry_free(struct registry *registry);

/** registry_get() - the state of @child (REGISTRY_UNKNOWN when absent). */
enum registry_state registry_get(const struct registry *registry, const char *child);

/**
 * registry_set() - set @child's state (REGISTRY_UNKNOWN removes it).
 * @persist: keep it in the file (rewritten now when anything persistent
 * changed); false: memory only.
 * Returns 0, -EINVAL (a child id with white space or empty), -ENOMEM, or
 * the error of the file write (logged; the memory state is set anyway).
 */
int registry_set(struct registry *registry, const char *child, enum registry_state state,
                 bool persist);

/** registry_forget_volatile() - drop every memory-only entry (connection ended). */
void registry_forget_volatile(struct registry *registry);

/** registry_count() - number of entries. */
size_t registry_count(const struct registry *registry);

/**
 * registry_entry() - the @index-th entry: child id (borrowed, valid until
 * the next change) and state. @index < registry_count().
 */
const char *registry_entry(const struct registry *registry, size_t index,
                           enum registry_state *state);

/**
 * registry_write_file() - write @len bytes to @path atomically: a
 * temporary file in the same directory with mode @mode, fsync, rename over
 * @path, fsync of the directory. The directory must exist.
 * Returns 0 or a negative errno (the temporary file is removed).
 */
int registry_write_file(const char *path, const void *data, size_t len, unsigned mode);

#endif
