/* spool.h - per-uplink store-and-forward queue: a durable FIFO on disk.
 *
 * One spool per uplink, in its own directory (<state_dir>/spool/<uplink>).
 * Records (topic, payload, QoS, retain, append time) get consecutive
 * sequence numbers and are kept in an append-only segmented log; the
 * "acknowledged" cursor (every record up to it has left) is persisted in a
 * separate file. docs/design/spool.md describes the format and the reasons.
 *
 * Durability: with SPOOL_DURABLE an append completes (done_cb) only once the
 * record has been written and fsync'ed. Appends are group-committed: the
 * write and the fdatasync of a whole batch run on the libuv threadpool; a
 * batch is committed when the previous commit has finished, at the end of
 * the loop turn that appended it, at once when it is large, and at the
 * latest commit_interval_ms after its first append. commit_gap_ms (0: off)
 * holds a small batch until that long after the previous commit started.
 * With SPOOL_MEMORY the segments live in memory and appends complete at once.
 *
 * Reading: the spool keeps one read position for its consumer (the uplink).
 * spool_next() hands out records in order (spool_unnext() gives the last one
 * back, for a one-record look-ahead), spool_ack() and spool_ack_range()
 * retire them (in any order; the cursor advances over the acknowledged
 * prefix) and
 * spool_rewind() makes every handed-out, unacknowledged record come again
 * (after a reconnect). Records can be read before they are durable, so
 * sending upstream does not wait for the fsync.
 *
 * Threading: every function must be called on the loop thread; callbacks run
 * on the loop thread, never from inside the call that caused them.
 */
#ifndef UPLINKD_SPOOL_H
#define UPLINKD_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct spool;

enum spool_durability {
    SPOOL_DURABLE, /* durability: fsync (default) */
    SPOOL_MEMORY,  /* durability: none; lost on restart */
};

enum spool_overflow {
    SPOOL_BLOCK,       /* overflow: block (default): appends wait for room */
    SPOOL_DROP_OLDEST, /* overflow: drop-oldest: whole oldest segments go */
};

/* Defaults used when an option is 0. */
#define SPOOL_DEFAULT_MAX_BYTES       (256ull * 1024 * 1024)
#define SPOOL_DEFAULT_COMMIT_INTERVAL 5 /* ms */

struct spool_options {
    const char *dir;  /* SPOOL_DURABLE: directory (created, mode 0700); borrowed */
    const char *name; /* for log lines (the uplink name); borrowed */
    /* Copies of damaged bytes found in the segments go here (created when
     * needed; <state_dir>/damaged). NULL: none kept. Borrowed. */
    const char *damaged_dir;
    enum spool_durability durability;
    enum spool_overflow overflow;
    uint64_t max_bytes;          /* bound on the log's bytes (0: default) */
    uint64_t max_age_ms;         /* 0: records never expire */
    unsigned commit_interval_ms; /* longest wait for a batch to fill */
    unsigned commit_gap_ms;      /* shortest time between commit starts (0: none) */
    uint64_t segment_bytes;      /* 0: max_bytes / 8, between 64 KiB and 16 MiB */
};

/* A record as handed out by spool_next(). Pointers stay valid until the next
 * call into the spool. */
struct spool_record {
    uint64_t seq;
    uint64_t time_ms; /* CLOCK_REALTIME at append, ms */
    int qos;
    bool retain;
    const char *topic; /* not NUL-terminated: topic_len bytes */
    size_t topic_len;
    const void *payload;
    size_t len;
};

/* Drops by reason, and other figures for status. */
struct spool_stats {
    uint64_t depth;                /* records not yet acknowledged upstream */
    uint64_t bytes;                /* bytes the log occupies (on disk or in memory) */
    uint64_t oldest_ms;            /* CLOCK_REALTIME ms of the oldest unacked record, 0 if none */
    uint64_t appended;             /* records appended since start */
    uint64_t acked;                /* records acknowledged since start */
    uint64_t dropped_overflow;     /* drop-oldest */
    uint64_t dropped_age;          /* older than max_age */
    uint64_t dropped_corrupt;      /* lost to damage found by recovery or reads */
    uint64_t blocked;              /* appends waiting for room now */
    uint64_t commits;              /* group commits done */
    uint64_t last_fsync_us;        /* duration of the last commit's fdatasync */
    uint64_t recovered_torn_bytes; /* bytes cut from a torn tail at start */
    int io_error;                  /* 0, or the negative errno the spool is stuck on */
    bool durable;
};

/* Return value of spool_append(): done_cb will be called later. */
#define SPOOL_PENDING 1

/* spool_append() flag: do not wait for room; return -ENOBUFS instead. */
#define SPOOL_APPEND_NOWAIT 0x1

/**
 * spool_open() - open (or create) a spool and recover it.
 * Recovery runs synchronously (call it before READY=1): every segment is
 * scanned. Damage with a valid record after it (a flipped bit, a bad
 * sector) loses only the records it covers: they are counted in
 * dropped_corrupt, logged with the file, byte range and seq range, the
 * bytes are copied to damaged_dir, and reading jumps over the range. A
 * damaged end of an older segment is skipped the same way. Bad bytes at
 * the end of the last segment with nothing valid after them are a torn
 * tail (power loss): truncated away and logged with the number of bytes
 * dropped (recovered_torn_bytes). Reading resumes after the persisted
 * cursor.
 * @opts: copied (strings too).
 * Returns 0, -ENOMEM, or a negative errno when the directory or a file
 * cannot be created or read (logged with the path).
 */
int spool_open(uv_loop_t *loop, const struct spool_options *opts, struct spool **out);

/**
 * spool_append() - add one record at the end.
 * @topic/@payload: copied.
 * @done_cb: called exactly once, from the loop, when the function returned
 *           SPOOL_PENDING: status 0 once the record is durable, or a negative
 *           errno (-ENOSPC, -EIO, ...: it was not made durable; -ECANCELED:
 *           the spool was closed first). May be NULL.
 * Returns 0 when the record is stored and nothing more will happen
 * (SPOOL_MEMORY), SPOOL_PENDING, or a negative errno and the record is not
 * stored: -EMSGSIZE (larger than max_bytes / 4), -ENOBUFS (full and
 * SPOOL_APPEND_NOWAIT, or the waiting room for blocked appends is full),
 * the stuck I/O error (-ENOSPC, -EIO, ...) while the spool cannot write,
 * -ESHUTDOWN after spool_close(), -ENOMEM.
 */
int spool_append(struct spool *spool, const char *topic, size_t topic_len, const void *payload,
                 size_t len, int qos, bool retain, unsigned flags,
                 void (*done_cb)(void *arg, int status), void *arg);

/**
 * spool_next() - the next record not yet handed out. Records older than
 * max_age are skipped (counted). Returns 0, or -EAGAIN when there is none.
 */
int spool_next(struct spool *spool, struct spool_record *out);

/**
 * spool_unnext() - give back the record the last spool_next() handed out,
 * unacknowledged: the next spool_next() hands it out again (re-checked
 * against max_age). For a consumer that looks one record ahead, e.g. the
 * uplink joining consecutive records into one publish: it takes the next
 * record, and gives it back when it does not fit. Nothing is copied and
 * the look-ahead holds no more than one record.
 * Returns 0, or -ENOENT when there is nothing to give back (nothing handed
 * out, or the newest handed-out entry is acknowledged or was skipped).
 */
int spool_unnext(struct spool *spool);

/**
 * spool_ack() - the record @seq (handed out by spool_next()) has left: the
 * cloud acknowledged it. Unknown or already dropped sequence numbers are
 * ignored.
 */
void spool_ack(struct spool *spool, uint64_t seq);

/**
 * spool_ack_range() - spool_ack() for every handed-out record with a
 * sequence number in @first..@last (inclusive): one acknowledgement that
 * covers a batch of consecutive records sent as one publish. Numbers in
 * the range that were skipped (max_age, damage) or are unknown are ignored.
 */
void spool_ack_range(struct spool *spool, uint64_t first, uint64_t last);

/** spool_rewind() - hand out every unacknowledged record again, in order. */
void spool_rewind(struct spool *spool);

/**
 * spool_set_limits() - adopt new bounds after a reload (max_bytes, max_age,
 * overflow, commit_interval, commit_gap; durability and dir stay as opened).
 */
void spool_set_limits(struct spool *spool, const struct spool_options *opts);

/** spool_full() - true when a new record of @bytes would have to wait. */
bool spool_full(const struct spool *spool, size_t bytes);

/** spool_get_stats() - figures for status. */
void spool_get_stats(const struct spool *spool, struct spool_stats *out);

/**
 * spool_close() - finish: waits for a running commit, commits what is
 * pending, persists the cursor, fails waiting appends with -ECANCELED. Then
 * @done_cb runs from the loop and spool_free() may be called.
 */
void spool_close(struct spool *spool, void (*done_cb)(void *arg), void *arg);

/** spool_free() - free after spool_close() finished, or after a failed use. NULL allowed. */
void spool_free(struct spool *spool);

#endif
