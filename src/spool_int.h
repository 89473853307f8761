/* spool_int.h - the spool's internals, shared by its files and nothing else
 * (spool.h is the interface). The structs below are the whole state; the
 * prototypes are grouped by the file that defines them, so this header is
 * also the table of contents. The files are layered: each calls only the
 * ones below it.
 *
 *   spool.c          appending, the group commit, reading, acknowledging,
 *                    opening and closing (the top: spool.h's calls)
 *   spool_recover.c  reading a spool directory back after a restart or a
 *                    crash: the cursor, every segment, damage and torn tails
 *   spool_seg.c      segments and their files, damaged ranges, the cursor
 *                    slots, buffers (the bottom)
 *
 * The file format and the reasons are in docs/design/spool.md and at the
 * top of spool.c.
 */
#ifndef UPLINKD_SPOOL_INT_H
#define UPLINKD_SPOOL_INT_H
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "record.h"
#include "sm.h"
#include "util.h"

#define SEG_HEADER_SIZE     RECORD_FILE_HEADER_SIZE
#define SEG_MAGIC           "UPLKSPL1"
#define CURSOR_MAGIC        0x52435055u /* "UPCR" */
#define CURSOR_SLOT_SIZE    32
#define SEG_MIN_BYTES       (4u * 1024)
#define SEG_MAX_BYTES       (16u * 1024 * 1024)
#define SPOOL_BATCH_BYTES   (1024u * 1024)
#define SPOOL_BATCH_RECORDS 2048u
/* The cursor alone is not worth an fsync per acknowledgement. */
#define SPOOL_CURSOR_DELAY_MS 200
#define SPOOL_RETRY_MS        1000
#define SPOOL_READ_CHUNK      (256u * 1024)

/* OPEN --spool_close()--> CLOSING --last commit done, waiters answered--> CLOSED
 * (its handles are closing; done_cb runs when the last one has). */
enum spool_state {
    SPOOL_OPEN,
    SPOOL_CLOSING,
    SPOOL_CLOSED,
};

struct spool_buf {
    uint8_t *data;
    size_t len, cap;
};

/* A damaged range inside a segment with good records after it: the reader
 * jumps from @from to @to (also after a rewind), so only the records that
 * were in it are lost. */
struct spool_hole {
    uint64_t from, to;   /* byte offsets in the segment file */
    uint64_t lost_first; /* sequence numbers it held: lost_first..lost_last */
    uint64_t lost_last;  /* (lost_last < lost_first: none) */
    bool in_depth;       /* found by a read: its records were counted in depth */
};

struct spool_seg {
    struct spool_seg *prev, *next;
    uint64_t first_seq;
    uint64_t last_seq; /* first_seq - 1 while empty */
    uint64_t records;
    uint64_t first_time_ms;
    uint64_t last_time_ms;
    uint64_t size;          /* valid bytes: file_len + flush.len + fill.len */
    uint64_t file_len;      /* written by finished commits */
    struct spool_buf flush; /* owned by the running commit */
    struct spool_buf fill;  /* appended since */
    bool busy;              /* part of the running commit */
    bool damaged;           /* has damage (holes, a cut tail): never appended to */
    int fd;                 /* write fd (worker thread while busy), -1 */
    struct spool_hole *holes;
    size_t hole_count;
};

struct spool_pos {
    struct spool_seg *seg;
    uint64_t off;
};

/* A record handed out by spool_next() and not yet retired. */
struct spool_out {
    uint64_t seq;   /* last sequence number it stands for */
    uint64_t count; /* records it stands for (skipped ranges count many) */
    struct spool_pos pos;
    bool acked;
};

struct spool_waiter {
    void (*cb)(void *arg, int status);
    void *arg;
    int status;
};

struct spool_waiters {
    struct spool_waiter *items;
    size_t len, cap;
};

/* An append waiting for room (overflow: block). */
struct spool_blocked {
    struct spool_blocked *next;
    void (*cb)(void *arg, int status);
    void *arg;
    int qos;
    bool retain;
    size_t topic_len, len;
    uint8_t data[]; /* topic then payload */
};

struct spool_commit {
    uv_work_t work;
    struct spool *spool;
    struct spool_seg **segs;
    size_t seg_count;
    struct spool_waiters waiters;
    bool write_cursor;
    uint64_t cursor_seq;
    uint8_t cursor_slot[CURSOR_SLOT_SIZE];
    off_t cursor_off;
    char **unlinks;
    size_t unlink_count;
    int err;             /* positive errno */
    char err_what[4400]; /* what failed, with the path */
    uint64_t fsync_us;
};

struct spool {
    uv_loop_t *loop;
    char *dir;
    char *name;
    char *damaged_dir;         /* copies of damaged bytes go here; NULL: none kept */
    struct spool_options opts; /* dir/name point at the copies above */
    uint64_t segment_bytes;

    struct spool_seg *head, *tail;
    uint64_t next_seq;
    uint64_t acked_seq;     /* every seq <= this has left */
    uint64_t persisted_seq; /* acked_seq as last written to the cursor file */
    uint64_t cursor_gen;
    int cursor_fd;
    uint64_t bytes;

    struct spool_pos read; /* next record to hand out (seg NULL: at the end) */
    struct spool_out *outs;
    size_t out_head, out_len, out_cap;

    struct spool_waiters fill_waiters;
    uint64_t fill_bytes;
    uint64_t fill_since;        /* uv_now() of the first append in the fill buffers */
    uint64_t commit_started_ms; /* uv_now() when the last commit started */

    struct spool_blocked *blocked_head, *blocked_tail;
    uint64_t blocked_bytes;
    uint64_t blocked_count;

    struct spool_waiters deferred; /* callbacks to run from the loop */
    uv_timer_t commit_timer;
    uv_check_t turn_end; /* runs after the loop turn's I/O: starts a batch */
    bool turn_end_active;
    uv_timer_t deferred_timer;
    unsigned handles;
    bool timer_armed;
    bool batch_ready;   /* inside turn_end_cb */
    uint64_t timer_due; /* uv_now() when the commit timer fires */

    struct spool_commit *commit; /* running, or NULL */
    char **unlinks;
    size_t unlink_count, unlink_cap;
    uint64_t cursor_written_ms; /* uv_now() when a commit last took the cursor */

    int io_error; /* negative errno while writes fail */
    uint64_t retry_at;

    /* Read buffer over one segment file. */
    struct spool_seg *rb_seg;
    int rb_fd;
    uint64_t rb_start;
    struct spool_buf rb;

    struct sm sm; /* enum spool_state, see spool_states in spool.c */
    void (*done_cb)(void *arg);
    void *done_arg;

    struct spool_stats stats;
};

/* spool.c */

/* spool_seg.c */

/* Room for @more bytes at the end of @buf (it grows); 0 or -ENOMEM. */
int spool_buf_reserve(struct spool_buf *buf, size_t more);

/* Free the bytes of @buf and empty it. */
void spool_buf_free(struct spool_buf *buf);

/* <dir>/<first_seq as 16 hex digits>.seg into @out. */
void spool_seg_path(const struct spool *spool, uint64_t first_seq, char *out, size_t size);

/* A segment (in memory) starting at @first_seq, empty; NULL when out of memory. */
struct spool_seg *spool_seg_new(uint64_t first_seq);

/* Free a segment that is not (or no longer) linked. */
void spool_seg_free(struct spool_seg *seg);

/* Append @seg to the spool's list as its newest segment. */
void spool_seg_link_tail(struct spool *spool, struct spool_seg *seg);

/* Forget the read buffer (its segment is going away). */
void spool_rb_drop(struct spool *spool);

/* Unlink @seg from the list and free it (its file is deleted by the next
 * commit). The reader and the out list must not point into it. */
void spool_seg_retire(struct spool *spool, struct spool_seg *seg);

/* Retire fully acknowledged segments at the head (never the newest, which
 * takes the next appends). */
void spool_retire_acked(struct spool *spool);

/* Records of @seg not yet acknowledged. */
uint64_t spool_seg_unacked(const struct spool *spool, const struct spool_seg *seg);

/* The offset to read at @off: past a damaged range that starts there. */
uint64_t spool_seg_skip_hole(const struct spool_seg *seg, uint64_t off);

/* Damaged bytes [from, to) of @seg's file (@bytes, the damaged ones, for
 * the copy) with sequence numbers lost_first..lost_last in them: count,
 * log, keep a copy for the operator, and remember the range as a hole when
 * good records follow it in this segment (@hole). Returns 0 or -ENOMEM. */
int spool_seg_damage(struct spool *spool, struct spool_seg *seg, uint64_t from, uint64_t to,
                     const uint8_t *bytes, uint64_t lost_first, uint64_t lost_last, const char *why,
                     const char *after, bool hole, bool in_depth);

/* One cursor slot: magic, generation, acknowledged seq, CRC-32C. */
void spool_cursor_encode(uint8_t out[CURSOR_SLOT_SIZE], uint64_t gen, uint64_t seq);

/* Read a cursor slot; false when its magic or CRC is wrong. */
bool spool_cursor_decode(const uint8_t *p, uint64_t *gen, uint64_t *seq);

/* spool_recover.c */

/* Read the spool directory back (spool_open()): the cursor, then every
 * segment in order. Returns 0 or a negative errno (logged). */
int spool_recover(struct spool *spool);

#endif
