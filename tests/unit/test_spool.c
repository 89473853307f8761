/* test_spool.c - the durable spool: format, recovery, group commit, bounds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "loop_step.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "record.h"
#include "spool.h"

#define SEG_HEADER 24
#define REC_HEADER 28

static uv_loop_t loop;

struct done_count {
    int ok;
    int failed;
    int last_status;
};

static void done_cb(void *arg, int status)
{
    struct done_count *d = arg;
    if (status == 0)
        d->ok++;
    else
        d->failed++;
    d->last_status = status;
}

static void closed_cb(void *arg)
{
    *(bool *)arg = true;
}

static char *make_dir(void)
{
    char tmpl[] = "/tmp/test_spool.XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    char *path = malloc(strlen(dir) + 8);
    sprintf(path, "%s/sp", dir);
    return path;
}

static void remove_tree(const char *dir)
{
    char cmd[512];
    char parent[256];
    snprintf(parent, sizeof(parent), "%s", dir);
    char *slash = strrchr(parent, '/');
    if (slash)
        *slash = '\0';
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", parent);
    assert_int_equal(system(cmd), 0);
}

static struct spool *open_spool(const char *dir, uint64_t max_bytes, uint64_t segment_bytes,
                                enum spool_overflow overflow)
{
    struct spool_options opts = {
        .dir = dir,
        .name = "test",
        .durability = dir ? SPOOL_DURABLE : SPOOL_MEMORY,
        .overflow = overflow,
        .max_bytes = max_bytes,
        .commit_interval_ms = 5,
        .segment_bytes = segment_bytes,
    };
    struct spool *spool = NULL;
    assert_int_equal(spool_open(&loop, &opts, &spool), 0);
    assert_non_null(spool);
    return spool;
}

static void close_spool(struct spool *spool)
{
    bool closed = false;
    spool_close(spool, closed_cb, &closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(closed);
    spool_free(spool);
}

static void append_n(struct spool *spool, int from, int count, struct done_count *done)
{
    for (int i = from; i < from + count; i++) {
        char topic[32], payload[64];
        int n = snprintf(payload, sizeof(payload), "payload-%d", i);
        snprintf(topic, sizeof(topic), "t/%d", i % 7);
        int rc = spool_append(spool, topic, strlen(topic), payload, (size_t)n, 1, false, 0, done_cb,
                              done);
        assert_true(rc == 0 || rc == SPOOL_PENDING);
    }
}

/* Read everything available; check payloads are "payload-<k>" for
 * consecutive k starting at @first; return how many. Acks them when @ack. */
static int drain(struct spool *spool, int first, bool ack)
{
    struct spool_record rec;
    int count = 0;

    while (spool_next(spool, &rec) == 0) {
        char expect[64];
        int n = snprintf(expect, sizeof(expect), "payload-%d", first + count);
        assert_int_equal(rec.len, (size_t)n);
        assert_memory_equal(rec.payload, expect, (size_t)n);
        assert_int_equal(rec.qos, 1);
        if (ack)
            spool_ack(spool, rec.seq);
        count++;
    }
    return count;
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *data = malloc(size ? (size_t)size : 1);
    assert_int_equal(fread(data, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    *len = (size_t)size;
    return data;
}

static void write_file(const char *path, const uint8_t *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

/* Segment file names in @dir, sorted. */
static int list_segments(const char *dir, char names[][32], int max)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    int n = 0;

    assert_non_null(d);
    while ((de = readdir(d)) != NULL && n < max) {
        size_t len = strlen(de->d_name);
        if (len == 20 && strcmp(de->d_name + 16, ".seg") == 0)
            snprintf(names[n++], 32, "%s", de->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, 32, (int (*)(const void *, const void *))strcmp);
    return n;
}

/* ---------------------------------------------------------------------------- */

static void test_crc32c(void **state)
{
    /* RFC 3720 §B.4 test vector: 32 bytes of zeros -> 0x8a9136aa. */
    uint8_t zeros[32] = {0};
    assert_int_equal(record_crc32c(0, zeros, 32), 0x8a9136aa);
    assert_int_equal(record_crc32c(0, "123456789", 9), 0xe3069283);
    /* Incremental equals one-shot. */
    assert_int_equal(record_crc32c(record_crc32c(0, "1234", 4), "56789", 5), 0xe3069283);
}

static void test_memory_fifo(void **state)
{
    struct spool *spool = open_spool(NULL, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_stats st;

    append_n(spool, 0, 100, &done);
    assert_int_equal(done.ok + done.failed, 0); /* memory: no callbacks */
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 100);
    assert_false(st.durable);
    assert_int_equal(drain(spool, 0, false), 100);
    /* Nothing acked: a rewind hands all out again. */
    spool_rewind(spool);
    assert_int_equal(drain(spool, 0, true), 100);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 0);
    close_spool(spool);
}

static void test_rewind_out_of_order(void **state)
{
    struct spool *spool = open_spool(NULL, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;
    uint64_t seqs[5];

    append_n(spool, 0, 5, &done);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(spool_next(spool, &rec), 0);
        seqs[i] = rec.seq;
    }
    assert_int_equal(spool_next(spool, &rec), -EAGAIN);
    spool_ack(spool, seqs[0]);
    spool_ack(spool, seqs[2]); /* out of order: seq 1 still pending */
    spool_ack(spool, 9999);    /* unknown: ignored */
    spool_rewind(spool);
    /* Resumes at the first unacknowledged (payload-1), in order. */
    assert_int_equal(drain(spool, 1, true), 4);
    close_spool(spool);
}

/* payload-<k> for a record handed out. */
static void expect_payload(const struct spool_record *rec, int k)
{
    char expect[64];
    int n = snprintf(expect, sizeof(expect), "payload-%d", k);
    assert_int_equal(rec->len, (size_t)n);
    assert_memory_equal(rec->payload, expect, (size_t)n);
}

/* The uplink's batching look-ahead: take, give back, one PUBACK per run. */
static void test_unnext_and_ack_range(void **state)
{
    struct spool *spool = open_spool(NULL, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;
    struct spool_stats st;
    uint64_t first_b, last_b, first_c, last_c;

    assert_int_equal(spool_unnext(spool), -ENOENT); /* nothing handed out */
    append_n(spool, 0, 10, &done);
    /* Give back and take again: the same record. */
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 0);
    uint64_t seq0 = rec.seq;
    assert_int_equal(spool_unnext(spool), 0);
    assert_int_equal(spool_unnext(spool), -ENOENT); /* only one */
    assert_int_equal(spool_next(spool, &rec), 0);
    assert_int_equal(rec.seq, seq0);
    expect_payload(&rec, 0);

    /* Batch A = 0..2: the look-ahead takes 3 and gives it back. */
    assert_int_equal(spool_next(spool, &rec), 0);
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 2);
    uint64_t last_a = rec.seq;
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 3);
    assert_int_equal(spool_unnext(spool), 0);
    spool_ack_range(spool, seq0, last_a);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 7);
    assert_int_equal(st.acked, 3);

    /* B = 3..5 and C = 6..8 in flight; C's PUBACK first. */
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 3);
    first_b = rec.seq;
    assert_int_equal(spool_next(spool, &rec), 0);
    assert_int_equal(spool_next(spool, &rec), 0);
    last_b = rec.seq;
    assert_int_equal(spool_next(spool, &rec), 0);
    first_c = rec.seq;
    assert_int_equal(first_c, last_b + 1);
    assert_int_equal(spool_next(spool, &rec), 0);
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 8);
    last_c = rec.seq;
    spool_ack_range(spool, first_c, last_c);
    spool_ack_range(spool, 1000, 2000); /* unknown: ignored */
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 7); /* B still pending: the cursor waits */
    /* The newest handed-out entry is acknowledged: nothing to give back. */
    assert_int_equal(spool_unnext(spool), -ENOENT);
    /* A reconnect: everything after the cursor comes again, C too (at
     * least once: the spool persists a cursor, not a set), re-batched as
     * one run 3..8. */
    spool_rewind(spool);
    assert_int_equal(spool_next(spool, &rec), 0);
    assert_int_equal(rec.seq, first_b);
    expect_payload(&rec, 3);
    for (int i = 4; i <= 8; i++) {
        assert_int_equal(spool_next(spool, &rec), 0);
        expect_payload(&rec, i);
    }
    assert_int_equal(rec.seq, last_c);
    assert_int_equal(spool_next(spool, &rec), 0);
    expect_payload(&rec, 9);
    assert_int_equal(spool_unnext(spool), 0);
    spool_ack_range(spool, first_b, last_c);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 1);
    /* A rewind after a give-back: nothing handed out, nothing lost. */
    spool_rewind(spool);
    assert_int_equal(drain(spool, 9, true), 1);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 0);
    assert_int_equal(st.acked, 10);
    close_spool(spool);
}

/* Give-backs at every record of a durable spool read back from small
 * segment files (the reader crosses segments and refills its buffer):
 * every record comes exactly once, in order, and ranges retire them. */
static void test_unnext_durable_segments(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 4096, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;
    struct spool_stats st;
    int k = 0, runs = 0;

    append_n(spool, 0, 300, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 300);
    close_spool(spool);
    spool = open_spool(dir, 1 << 20, 4096, SPOOL_BLOCK); /* reads come from the files */
    while (spool_next(spool, &rec) == 0) {
        /* Runs of 5: take up to 5, look at a 6th, give it back. */
        uint64_t first = rec.seq, last = rec.seq;
        int taken = 1;
        expect_payload(&rec, k);
        while (spool_next(spool, &rec) == 0) {
            if (taken == 5) {
                assert_int_equal(spool_unnext(spool), 0);
                break;
            }
            expect_payload(&rec, k + taken);
            last = rec.seq;
            taken++;
        }
        spool_ack_range(spool, first, last);
        k += taken;
        runs++;
        assert_true(runs <= 60);
    }
    assert_int_equal(k, 300);
    assert_int_equal(runs, 60);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 0);
    close_spool(spool);
    spool = open_spool(dir, 1 << 20, 4096, SPOOL_BLOCK);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 0);
    assert_int_equal(drain(spool, 0, false), 0);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

static void test_durable_restart(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_stats st;
    struct spool_record rec;

    append_n(spool, 0, 50, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 50);
    spool_get_stats(spool, &st);
    assert_true(st.durable);
    /* Group commit: far fewer fsyncs than records. */
    assert_true(st.commits >= 1 && st.commits < 10);
    /* Ack the first 20. */
    for (int i = 0; i < 20; i++) {
        assert_int_equal(spool_next(spool, &rec), 0);
        spool_ack(spool, rec.seq);
    }
    close_spool(spool);

    spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 30);
    assert_int_equal(drain(spool, 20, false), 30);
    /* New appends continue the sequence. */
    append_n(spool, 50, 5, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 55);
    assert_int_equal(drain(spool, 50, false), 5);
    close_spool(spool);

    /* Not acked in the second run: all 35 come back. */
    spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    assert_int_equal(drain(spool, 20, true), 35);
    close_spool(spool);
    spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    spool_get_stats(spool, &st);
    assert_int_equal(st.depth, 0);
    assert_int_equal(drain(spool, 0, false), 0);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* Multi-segment: acked segments are deleted, reading crosses segments. */
static void test_segments_retired(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 1024, SPOOL_BLOCK);
    struct done_count done = {0};
    char names[64][32];

    append_n(spool, 0, 200, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 200);
    int before = list_segments(dir, names, 64);
    assert_true(before > 5);
    assert_int_equal(drain(spool, 0, true), 200);
    uv_run(&loop, UV_RUN_DEFAULT);
    close_spool(spool);
    int after = list_segments(dir, names, 64);
    assert_true(after <= 1);
    spool = open_spool(dir, 1 << 20, 1024, SPOOL_BLOCK);
    assert_int_equal(drain(spool, 0, false), 0);
    append_n(spool, 200, 3, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(drain(spool, 200, false), 3);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* Build a spool with @count records in one segment; return the segment's
 * bytes and the end offset of every record. */
static uint8_t *make_segment(const char *dir, int count, size_t *len, size_t *ends, char *seg_name)
{
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    char names[4][32], path[512];

    append_n(spool, 0, count, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, count);
    close_spool(spool);
    assert_int_equal(list_segments(dir, names, 4), 1);
    strcpy(seg_name, names[0]);
    snprintf(path, sizeof(path), "%s/%s", dir, names[0]);
    uint8_t *data = read_file(path, len);
    size_t off = SEG_HEADER;
    for (int i = 0; i < count; i++) {
        uint32_t rec_len = (uint32_t)data[off + 4] | (uint32_t)data[off + 5] << 8 |
                           (uint32_t)data[off + 6] << 16 | (uint32_t)data[off + 7] << 24;
        off += REC_HEADER + rec_len;
        ends[i] = off;
    }
    assert_int_equal(off, *len);
    return data;
}

/* Power loss at every byte: a segment cut at offset o keeps exactly the
 * records that end at or before o, reports o - kept as dropped, and the
 * spool stays usable (appends continue, a second restart agrees). */
static void test_torn_tail_every_offset(void **state)
{
    char *dir = make_dir();
    size_t len, ends[3];
    char seg_name[32], path[512];
    uint8_t *data = make_segment(dir, 3, &len, ends, seg_name);

    snprintf(path, sizeof(path), "%s/%s", dir, seg_name);
    for (size_t cut = 0; cut < len; cut++) {
        int whole = 0;
        size_t valid = SEG_HEADER;
        for (int i = 0; i < 3; i++)
            if (ends[i] <= cut) {
                whole = i + 1;
                valid = ends[i];
            }
        write_file(path, data, cut);
        struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
        struct spool_stats st;
        spool_get_stats(spool, &st);
        if (cut < SEG_HEADER) {
            assert_int_equal(st.recovered_torn_bytes, cut);
            assert_int_equal(st.depth, 0);
        } else {
            assert_int_equal(st.recovered_torn_bytes, cut - valid);
            assert_int_equal(st.depth, (uint64_t)whole);
        }
        assert_int_equal(drain(spool, 0, false), whole);
        /* Appending after recovery continues cleanly. */
        struct done_count done = {0};
        append_n(spool, whole, 1, &done);
        uv_run(&loop, UV_RUN_DEFAULT);
        assert_int_equal(done.ok, 1);
        close_spool(spool);
        spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
        spool_get_stats(spool, &st);
        assert_int_equal(st.recovered_torn_bytes, 0);
        assert_int_equal(drain(spool, 0, false), whole + 1);
        close_spool(spool);
        /* Back to the original single segment for the next cut. */
        char names[8][32];
        int n = list_segments(dir, names, 8);
        for (int i = 0; i < n; i++) {
            char p[512];
            snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
            unlink(p);
        }
    }
    free(data);
    remove_tree(dir);
    free(dir);
}

/* Read everything available; every record must be one we wrote
 * ("payload-<seq - 1>"), in order. Returns how many, and sets the bit of
 * each seq (1..64) seen in @seen. */
static int drain_seqs(struct spool *spool, uint64_t *seen)
{
    struct spool_record rec;
    uint64_t prev = 0;
    int count = 0;

    *seen = 0;
    while (spool_next(spool, &rec) == 0) {
        char expect[64];
        int n = snprintf(expect, sizeof(expect), "payload-%d", (int)rec.seq - 1);
        assert_int_equal(rec.len, (size_t)n);
        assert_memory_equal(rec.payload, expect, (size_t)n);
        assert_true(rec.seq > prev);
        prev = rec.seq;
        if (rec.seq <= 64)
            *seen |= 1ull << (rec.seq - 1);
        count++;
    }
    return count;
}

static void remove_segments(const char *dir)
{
    char names[64][32], p[4200];
    int n = list_segments(dir, names, 64);
    for (int i = 0; i < n; i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
}

/* A flipped byte anywhere in the last segment of three records: in the
 * header nothing is lost (the name says the first seq); in the first or
 * second record exactly that record is lost and counted; in the last
 * record nothing valid follows, so it is a torn tail (cut, not counted). */
static void test_corrupt_byte_every_offset(void **state)
{
    char *dir = make_dir();
    size_t len, ends[3];
    char seg_name[32], path[512];
    uint8_t *data = make_segment(dir, 3, &len, ends, seg_name);

    snprintf(path, sizeof(path), "%s/%s", dir, seg_name);
    for (size_t at = 0; at < len; at++) {
        int damaged = -1; /* record index, -1: the header */
        for (int i = 2; i >= 0; i--)
            if (at < ends[i])
                damaged = at >= (i ? ends[i - 1] : SEG_HEADER) ? i : damaged;
        uint8_t *copy = malloc(len);
        memcpy(copy, data, len);
        copy[at] ^= 0x5a;
        write_file(path, copy, len);
        free(copy);
        struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
        struct spool_stats st;
        uint64_t seen;
        spool_get_stats(spool, &st);
        int got = drain_seqs(spool, &seen);
        if (damaged < 0) {
            assert_int_equal(got, 3);
            assert_int_equal(st.dropped_corrupt, 0);
        } else if (damaged < 2) {
            assert_int_equal(got, 2);
            assert_int_equal(seen, 7ull & ~(1ull << damaged));
            assert_int_equal(st.dropped_corrupt, 1);
            assert_int_equal(st.recovered_torn_bytes, 0);
        } else {
            assert_int_equal(got, 2);
            assert_int_equal(st.dropped_corrupt, 0);
            assert_int_equal(st.recovered_torn_bytes, len - ends[1]);
        }
        close_spool(spool);
        remove_segments(dir);
    }
    free(data);
    remove_tree(dir);
    free(dir);
}

/* Segments of a few records each; returns their names. */
static int make_segments(const char *dir, int records, char names[][32], int max)
{
    struct spool *spool = open_spool(dir, 1 << 20, 512, SPOOL_BLOCK);
    struct done_count done = {0};

    append_n(spool, 0, records, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, records);
    close_spool(spool);
    return list_segments(dir, names, max);
}

static uint32_t rec_len_at(const uint8_t *data, size_t off)
{
    return (uint32_t)data[off + 4] | (uint32_t)data[off + 5] << 8 | (uint32_t)data[off + 6] << 16 |
           (uint32_t)data[off + 7] << 24;
}

/* Ten positions (issue 12): one flipped byte loses exactly the damaged
 * record and nothing else, also at a segment boundary; the damaged bytes
 * are copied to damaged_dir. */
static void test_flipped_byte_loses_one(void **state)
{
    /* Offsets inside a record: crc, len, seq, time, flags, topic_len, topic, payload. */
    static const size_t field[] = {1, 5, 9, 17, 24, 26, 28, 31};
    char *dir = make_dir();
    char names[64][32], path[4200], damaged[512];

    snprintf(damaged, sizeof(damaged), "%s/../damaged", dir);
    for (int pos = 0; pos < 11; pos++) {
        int n = make_segments(dir, 40, names, 64);
        assert_true(n >= 4);
        /* Segment 1 (of several): header, fields of its second record, its
         * first record; the last record of segment 1 (then segment 2). */
        int seg = 1;
        snprintf(path, sizeof(path), "%s/%s", dir, names[seg]);
        size_t len;
        uint8_t *data = read_file(path, &len);
        uint64_t first = strtoull(names[seg], NULL, 16);
        size_t second = SEG_HEADER + REC_HEADER + rec_len_at(data, SEG_HEADER);
        uint64_t lost = 0;
        size_t at;
        if (pos == 0) {
            at = 3; /* the segment header */
        } else if (pos <= 8) {
            at = second + field[pos - 1];
            lost = first + 1;
        } else if (pos == 9) {
            at = SEG_HEADER + 30; /* the first record after the boundary */
            lost = first;
        } else {
            size_t off = SEG_HEADER, last_off = SEG_HEADER;
            uint64_t k = first;
            while (off < len) {
                last_off = off;
                off += REC_HEADER + rec_len_at(data, off);
                k++;
            }
            at = last_off + 33; /* the last record before the boundary */
            lost = k - 1;
        }
        data[at] ^= 0x01;
        write_file(path, data, len);
        free(data);

        struct spool_options opts = {
            .dir = dir,
            .name = "test",
            .damaged_dir = damaged,
            .durability = SPOOL_DURABLE,
            .max_bytes = 1 << 20,
            .commit_interval_ms = 5,
            .segment_bytes = 512,
        };
        struct spool *spool = NULL;
        struct spool_stats st;
        uint64_t seen;
        assert_int_equal(spool_open(&loop, &opts, &spool), 0);
        spool_get_stats(spool, &st);
        assert_int_equal(st.dropped_corrupt, lost ? 1 : 0);
        assert_int_equal(st.recovered_torn_bytes, 0);
        assert_int_equal(drain_seqs(spool, &seen), lost ? 39 : 40);
        if (lost)
            assert_int_equal(seen, ((1ull << 40) - 1) & ~(1ull << (lost - 1)));
        /* A rewind (reconnect) also jumps over the damage. */
        spool_rewind(spool);
        assert_int_equal(drain_seqs(spool, &seen), lost ? 39 : 40);
        close_spool(spool);
        char cmd[1200];
        snprintf(cmd, sizeof(cmd), "test -n \"$(ls -A '%s')\"", damaged);
        assert_int_equal(system(cmd), 0);
        remove_segments(dir);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s' '%s'/*.corrupt '%s/cursor'", damaged, dir, dir);
        assert_int_equal(system(cmd), 0);
    }
    remove_tree(dir);
    free(dir);
}

/* A zeroed 4 KiB block in the middle of one large segment loses only the
 * records it touches. */
static void test_zeroed_block(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    char names[4][32], path[512];
    size_t len;

    append_n(spool, 0, 400, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    close_spool(spool);
    assert_int_equal(list_segments(dir, names, 4), 1);
    snprintf(path, sizeof(path), "%s/%s", dir, names[0]);
    uint8_t *data = read_file(path, &len);
    size_t from = 5000, to = from + 4096;
    assert_true(to < len);
    /* The records the block touches. */
    int touched = 0;
    for (size_t off = SEG_HEADER; off < len;) {
        size_t end = off + REC_HEADER + rec_len_at(data, off);
        if (end > from && off < to)
            touched++;
        off = end;
    }
    memset(data + from, 0, to - from);
    write_file(path, data, len);
    free(data);
    spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct spool_stats st;
    uint64_t seen;
    spool_get_stats(spool, &st);
    assert_int_equal(st.dropped_corrupt, (uint64_t)touched);
    assert_int_equal(drain_seqs(spool, &seen), 400 - touched);
    print_message("zeroed 4096 bytes at %zu of %zu: %d of 400 records kept\n", from, len,
                  400 - touched);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* Random bytes after the last record: nothing valid follows them, so they
 * are a torn tail (cut, counted as torn bytes, not as corrupt). */
static void test_garbage_tail(void **state)
{
    char *dir = make_dir();
    size_t len, ends[3];
    char seg_name[32], path[512];
    uint8_t *data = make_segment(dir, 3, &len, ends, seg_name);
    uint8_t *grown = malloc(len + 8192);

    memcpy(grown, data, len);
    srand(12);
    for (size_t i = len; i < len + 8192; i++)
        grown[i] = (uint8_t)rand();
    snprintf(path, sizeof(path), "%s/%s", dir, seg_name);
    write_file(path, grown, len + 8192);
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct spool_stats st;
    spool_get_stats(spool, &st);
    assert_int_equal(st.dropped_corrupt, 0);
    assert_int_equal(st.recovered_torn_bytes, 8192);
    assert_int_equal(drain(spool, 0, false), 3);
    close_spool(spool);
    free(grown);
    free(data);
    remove_tree(dir);
    free(dir);
}

/* Damage that appears while running (found by a read, not by recovery):
 * only that record is lost and counted, a rewind does not count it again. */
static void test_damage_found_by_read(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    char names[4][32], path[4200];
    struct spool_stats st;
    uint64_t seen;
    size_t len;

    append_n(spool, 0, 10, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 10);
    assert_int_equal(list_segments(dir, names, 4), 1);
    snprintf(path, sizeof(path), "%s/%s", dir, names[0]);
    uint8_t *data = read_file(path, &len);
    size_t off = SEG_HEADER;
    for (int i = 0; i < 4; i++)
        off += REC_HEADER + rec_len_at(data, off);
    data[off + REC_HEADER + 5] ^= 0x40; /* the payload of the fifth (seq 5) */
    write_file(path, data, len);
    free(data);
    assert_int_equal(drain_seqs(spool, &seen), 9);
    assert_int_equal(seen, 0x3ffull & ~(1ull << 4));
    spool_get_stats(spool, &st);
    assert_int_equal(st.dropped_corrupt, 1);
    spool_rewind(spool);
    assert_int_equal(drain_seqs(spool, &seen), 9);
    spool_get_stats(spool, &st);
    assert_int_equal(st.dropped_corrupt, 1);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* Damage inside an older segment: only the damaged record is lost, the rest
 * of that segment and the later segments are delivered. */
static void test_corrupt_middle_segment(void **state)
{
    char *dir = make_dir();
    char names[64][32], path[512];
    struct spool_stats st;
    uint64_t seen;

    int n = make_segments(dir, 60, names, 64);
    assert_true(n >= 4);
    /* Corrupt the payload of the second record in segment 1 (0-based). */
    snprintf(path, sizeof(path), "%s/%s", dir, names[1]);
    size_t len;
    uint8_t *data = read_file(path, &len);
    size_t second = SEG_HEADER + REC_HEADER + rec_len_at(data, SEG_HEADER);
    data[second + REC_HEADER + 3] ^= 0xff;
    write_file(path, data, len);
    free(data);

    struct spool *spool = open_spool(dir, 1 << 20, 512, SPOOL_BLOCK);
    spool_get_stats(spool, &st);
    assert_int_equal(st.dropped_corrupt, 1);
    assert_int_equal(drain_seqs(spool, &seen), 59);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* The cursor has two slots: a torn write of one keeps the other. */
static void test_cursor_slots(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;
    char path[512];

    append_n(spool, 0, 10, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(spool_next(spool, &rec), 0);
        spool_ack(spool, rec.seq);
        close_spool(spool); /* persists the cursor: one generation per close */
        spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
        spool_rewind(spool);
    }
    close_spool(spool);
    /* Generation 4 is in slot 0; destroy it: the previous (3 acked) wins. */
    snprintf(path, sizeof(path), "%s/cursor", dir);
    size_t len;
    uint8_t *data = read_file(path, &len);
    assert_int_equal(len, 64);
    data[16] ^= 1;
    write_file(path, data, len);
    free(data);
    spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    assert_int_equal(drain(spool, 3, false), 7);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* acked_seq of the newer of the two cursor slots in @dir/cursor. */
static uint64_t cursor_acked(const char *dir)
{
    char path[512];
    size_t len;
    uint64_t best_gen = 0, best_seq = 0;

    snprintf(path, sizeof(path), "%s/cursor", dir);
    uint8_t *data = read_file(path, &len);
    for (size_t off = 0; off + 32 <= len; off += 32) {
        uint64_t gen, seq;
        memcpy(&gen, data + off + 8, 8); /* little-endian host, as the format */
        memcpy(&seq, data + off + 16, 8);
        if (memcmp(data + off, "UPCR", 4) == 0 && gen >= best_gen) {
            best_gen = gen;
            best_seq = seq;
        }
    }
    free(data);
    return best_seq;
}

/* The cursor is lazy: a batch committed soon after the last cursor write
 * does not write it again (a second fdatasync per batch at a steady rate),
 * and a lagging cursor is written on its own within SPOOL_CURSOR_DELAY_MS,
 * without waiting for a close. */
static void test_cursor_lazy(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;

    append_n(spool, 0, 3, &done);
    LOOP_UNTIL(&loop, done.ok >= 3, 1000);
    assert_int_equal(done.ok, 3);
    /* Ack record 1: nothing was written yet, so the cursor is due now. */
    uv_update_time(&loop);
    uint64_t t0 = uv_now(&loop);
    assert_int_equal(spool_next(spool, &rec), 0);
    spool_ack(spool, rec.seq);
    append_n(spool, 3, 1, &done);
    LOOP_UNTIL(&loop, done.ok >= 4, 1000);
    assert_int_equal(done.ok, 4);
    assert_int_equal(cursor_acked(dir), 1);
    /* Ack record 2 and commit a batch at once: the cursor is not due. */
    assert_int_equal(spool_next(spool, &rec), 0);
    spool_ack(spool, rec.seq);
    append_n(spool, 4, 1, &done);
    LOOP_UNTIL(&loop, done.ok >= 5, 1000);
    assert_int_equal(done.ok, 5);
    uv_update_time(&loop);
    if (uv_now(&loop) - t0 < 200) /* else a slow disk made it due: no claim */
        assert_int_equal(cursor_acked(dir), 1);
    /* The commit timer writes it on its own (the loop ends when it has). */
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(cursor_acked(dir), 2);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

static void tick_cb(uv_timer_t *timer)
{
    (void)timer;
}

/* spool.commit_gap: after a commit, small batches wait until the gap has
 * passed since it started, so appends in many loop turns share one commit;
 * commit_interval still bounds the wait. */
static void test_commit_gap(void **state)
{
    char *dir = make_dir();
    struct spool_options opts = {
        .dir = dir,
        .name = "test",
        .durability = SPOOL_DURABLE,
        .overflow = SPOOL_BLOCK,
        .max_bytes = 1 << 20,
        .commit_interval_ms = 1000,
        .commit_gap_ms = 300,
    };
    struct spool *spool = NULL;
    struct done_count done = {0};
    struct spool_stats st;
    uv_timer_t tick;
    int turns = 0;

    (void)state;
    assert_int_equal(spool_open(&loop, &opts, &spool), 0);
    uv_update_time(&loop);
    uint64_t t0 = uv_now(&loop);
    /* The first append commits at the end of its turn: nothing ran before. */
    append_n(spool, 0, 1, &done);
    LOOP_UNTIL(&loop, done.ok >= 1, 1000);
    assert_int_equal(done.ok, 1);
    /* Ten appends, each in a loop turn of its own (a 10 ms timer between). */
    uv_timer_init(&loop, &tick);
    for (int i = 1; i <= 10; i++) {
        append_n(spool, i, 1, &done);
        uv_timer_start(&tick, tick_cb, 10, 0);
        uv_run(&loop, UV_RUN_ONCE);
        turns++;
    }
    uv_update_time(&loop);
    spool_get_stats(spool, &st);
    if (uv_now(&loop) - t0 < 250) { /* else a slow machine neared the gap: no claim */
        assert_int_equal(st.commits, 1);
        assert_int_equal(done.ok, 1);
    }
    LOOP_UNTIL(&loop, done.ok >= 11, 1000);
    assert_int_equal(done.ok, 11);
    uv_update_time(&loop);
    assert_true(uv_now(&loop) - t0 >= 300); /* held until the gap had passed */
    spool_get_stats(spool, &st);
    assert_true(st.commits <= 3); /* not one per turn */
    assert_int_equal(turns, 10);
    uv_close((uv_handle_t *)&tick, NULL);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

static void test_overflow_block(void **state)
{
    /* Memory spool of 4 KiB: records of ~45 bytes. */
    struct spool *spool = open_spool(NULL, 4096, 1024, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_stats st;
    int accepted = 0, pending = 0;

    for (int i = 0; i < 200; i++) {
        char payload[64];
        int n = snprintf(payload, sizeof(payload), "payload-%d", i);
        int rc = spool_append(spool, "t", 1, payload, (size_t)n, 1, false, 0, done_cb, &done);
        if (rc == 0)
            accepted++;
        else if (rc == SPOOL_PENDING)
            pending++;
        else
            break;
    }
    assert_true(accepted > 10 && accepted < 200);
    assert_true(pending > 0);
    spool_get_stats(spool, &st);
    assert_int_equal(st.blocked, (uint64_t)pending);
    assert_true(st.bytes <= 4096);
    /* QoS 0 style: no waiting. */
    assert_int_equal(spool_append(spool, "t", 1, "x", 1, 0, false, SPOOL_APPEND_NOWAIT, NULL, NULL),
                     -ENOBUFS);
    /* Send and acknowledge everything: the blocked ones get in, in order. */
    int got = 0;
    for (int round = 0; round < 100 && got < accepted + pending; round++) {
        got += drain(spool, got, true);
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    assert_int_equal(got, accepted + pending);
    assert_int_equal(done.ok, pending);
    close_spool(spool);
}

static void test_overflow_drop_oldest(void **state)
{
    struct spool *spool = open_spool(NULL, 4096, 1024, SPOOL_DROP_OLDEST);
    struct spool_stats st;
    struct spool_record rec;

    for (int i = 0; i < 500; i++) {
        char payload[64];
        int n = snprintf(payload, sizeof(payload), "payload-%d", i);
        assert_int_equal(spool_append(spool, "t", 1, payload, (size_t)n, 1, false, 0, NULL, NULL),
                         0);
    }
    spool_get_stats(spool, &st);
    assert_true(st.dropped_overflow > 0);
    assert_true(st.bytes <= 4096 + 1024);
    assert_int_equal(st.depth + st.dropped_overflow, 500);
    /* What is left is the newest, in order, ending with the last one. */
    uint64_t prev = 0, last = 0;
    while (spool_next(spool, &rec) == 0) {
        assert_true(rec.seq > prev);
        prev = last = rec.seq;
    }
    assert_int_equal(last, 500);
    close_spool(spool);
}

/* Durable + block: blocked appends complete once acks make room. */
static void test_durable_block(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 8192, 1024, SPOOL_BLOCK);
    struct done_count done = {0};
    int taken = 0, rc = 0;

    /* Appends wait once the log is full, until the waiting room (a quarter
     * of max_bytes) is full too: then -ENOBUFS. */
    for (int i = 0; i < 400; i++) {
        char payload[64];
        int n = snprintf(payload, sizeof(payload), "payload-%d", i);
        rc = spool_append(spool, "t", 1, payload, (size_t)n, 1, false, 0, done_cb, &done);
        if (rc != SPOOL_PENDING)
            break;
        taken++;
    }
    assert_int_equal(rc, -ENOBUFS);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(done.ok < taken);
    struct spool_stats st;
    spool_get_stats(spool, &st);
    assert_true(st.blocked > 0);
    int got = 0;
    for (int round = 0; round < 1000 && got < taken; round++) {
        got += drain(spool, got, true);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    assert_int_equal(got, taken);
    assert_int_equal(done.ok, taken);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

/* Large records straddle the read buffer; reading from files after restart. */
static void test_large_records(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 64 << 20, 0, SPOOL_BLOCK);
    struct done_count done = {0};
    struct spool_record rec;
    size_t sizes[] = {0, 1, 300000, 70000, 1 << 20, 5};
    uint8_t *big = malloc(1 << 20);

    for (size_t i = 0; i < sizeof(big[0]) * (1 << 20); i++)
        big[i] = (uint8_t)(i * 31 + 7);
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(spool_append(spool, "big", 3, big, sizes[i], 2, true, 0, done_cb, &done),
                         SPOOL_PENDING);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 6);
    close_spool(spool);
    spool = open_spool(dir, 64 << 20, 0, SPOOL_BLOCK);
    for (size_t i = 0; i < 6; i++) {
        assert_int_equal(spool_next(spool, &rec), 0);
        if (rec.len != sizes[i])
            fail_msg("record %zu: len %zu, expected %zu", i, rec.len, sizes[i]);
        assert_int_equal(rec.qos, 2);
        assert_true(rec.retain);
        assert_memory_equal(rec.topic, "big", 3);
        if (sizes[i])
            assert_memory_equal(rec.payload, big, sizes[i]);
    }
    assert_int_equal(spool_next(spool, &rec), -EAGAIN);
    close_spool(spool);
    free(big);
    remove_tree(dir);
    free(dir);
}

/* A record bigger than a quarter of max_bytes is refused outright. */
static void test_too_big(void **state)
{
    struct spool *spool = open_spool(NULL, 4096, 0, SPOOL_BLOCK);
    static uint8_t payload[2000];
    assert_int_equal(spool_append(spool, "t", 1, payload, sizeof(payload), 1, false, 0, NULL, NULL),
                     -EMSGSIZE);
    close_spool(spool);
}

/* An I/O error: the spool directory disappears under us (a read-only or
 * vanished mount behaves alike). Appends are not acknowledged, later ones are
 * refused with the error, and it recovers when the directory is back. */
static void test_io_error_recovers(void **state)
{
    char *dir = make_dir();
    struct spool *spool = open_spool(dir, 1 << 20, 1024, SPOOL_BLOCK);
    struct done_count done = {0};
    char cmd[600];

    append_n(spool, 0, 5, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done.ok, 5);
    /* Make creating the next segment fail: fill the first one, then remove
     * the directory's write permission... root ignores modes, so replace the
     * directory by a file instead. */
    snprintf(cmd, sizeof(cmd), "mv '%s' '%s.away' && touch '%s'", dir, dir, dir);
    assert_int_equal(system(cmd), 0);
    append_n(spool, 5, 40, &done); /* rolls over to a new segment */
    uv_run(&loop, UV_RUN_ONCE);
    LOOP_UNTIL(&loop, done.failed != 0, 100);
    assert_true(done.failed > 0);
    struct spool_stats st;
    spool_get_stats(spool, &st);
    assert_true(st.io_error < 0);
    assert_int_equal(spool_append(spool, "t", 1, "x", 1, 1, false, 0, done_cb, &done), st.io_error);
    snprintf(cmd, sizeof(cmd), "rm -f '%s' && mv '%s.away' '%s'", dir, dir, dir);
    assert_int_equal(system(cmd), 0);
    for (int i = 0; i < 1000 && st.io_error; i++) {
        uv_run(&loop, UV_RUN_ONCE);
        spool_get_stats(spool, &st);
    }
    assert_int_equal(st.io_error, 0);
    /* Everything appended is there, in order, once. */
    assert_int_equal(drain(spool, 0, false), 45);
    close_spool(spool);
    spool = open_spool(dir, 1 << 20, 1024, SPOOL_BLOCK);
    assert_int_equal(drain(spool, 0, false), 45);
    close_spool(spool);
    remove_tree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_memory_fifo),
        cmocka_unit_test(test_rewind_out_of_order),
        cmocka_unit_test(test_unnext_and_ack_range),
        cmocka_unit_test(test_unnext_durable_segments),
        cmocka_unit_test(test_durable_restart),
        cmocka_unit_test(test_segments_retired),
        cmocka_unit_test(test_torn_tail_every_offset),
        cmocka_unit_test(test_corrupt_byte_every_offset),
        cmocka_unit_test(test_corrupt_middle_segment),
        cmocka_unit_test(test_flipped_byte_loses_one),
        cmocka_unit_test(test_zeroed_block),
        cmocka_unit_test(test_garbage_tail),
        cmocka_unit_test(test_damage_found_by_read),
        cmocka_unit_test(test_cursor_slots),
        cmocka_unit_test(test_cursor_lazy),
        cmocka_unit_test(test_commit_gap),
        cmocka_unit_test(test_overflow_block),
        cmocka_unit_test(test_overflow_drop_oldest),
        cmocka_unit_test(test_durable_block),
        cmocka_unit_test(test_large_records),
        cmocka_unit_test(test_too_big),
        cmocka_unit_test(test_io_error_recovers),
    };

    log_init(LOG_ERR);
    uv_loop_init(&loop);
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    uv_loop_close(&loop);
    return rc;
}
