/* record.h - the record framing both on-disk logs share: spool segments
 * (spool.c) and the retained store (local_retain.c).
 *
 * A file is a 24-byte header (an 8-byte magic, a u64 value, CRC-32C of those
 * 16 bytes, 4 zero bytes) followed by records, all little-endian:
 *
 *   crc32c u32 | len u32 | seq u64 | time_ms u64 | flags u8 | 0 u8 | topic_len u16
 *   topic (topic_len bytes) | payload (len - topic_len bytes)
 *
 * The CRC (Castagnoli, RFC 3720 §B.4) covers everything after the CRC field.
 * Sequence numbers grow by one per record; the reader uses them to tell how
 * many records a damaged range held, and to refuse a stray byte run that
 * happens to look like a record. docs/design/spool.md has the reasons.
 */
#ifndef UPLINKD_RECORD_H
#define UPLINKD_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RECORD_FILE_HEADER_SIZE 24
#define RECORD_HEADER_SIZE      28
/* The smallest record: a header and a one-byte topic, no payload. */
#define RECORD_MIN_SIZE (RECORD_HEADER_SIZE + 1)
/* MQTT 3.1.1 §2.2.3: no packet is larger than this; neither is a record. */
#define RECORD_MAX_LEN        (268435455u)
#define RECORD_FLAG_QOS_MASK  0x03
#define RECORD_FLAG_RETAIN    0x04
#define RECORD_DAMAGED_DIR    "damaged"
#define RECORD_DAMAGED_COPY   (1024u * 1024)      /* bytes kept per damaged range */
#define RECORD_DAMAGED_BUDGET (16u * 1024 * 1024) /* bytes kept in damaged/ in all */

/* A parsed record. topic and payload point into the buffer it was read from. */
struct record {
    uint32_t crc;
    uint32_t len; /* topic + payload */
    uint64_t seq;
    uint64_t time_ms;
    uint8_t flags;
    uint16_t topic_len;
    const uint8_t *topic;
    const uint8_t *payload;
    size_t payload_len;
};

/* Little-endian fields of @bytes (<= 8) bytes, as both file formats store them. */
static inline void record_put_le(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint64_t record_get_le(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/** record_crc32c() - CRC-32C of @len bytes, continuing from @crc (start with 0). */
uint32_t record_crc32c(uint32_t crc, const void *data, size_t len);

/** record_size() - bytes a record with @topic_len + @len bytes of body takes. */
static inline size_t record_size(size_t topic_len, size_t len)
{
    return RECORD_HEADER_SIZE + topic_len + len;
}

/** record_file_header() - write a file header with @magic (8 bytes) and @value. */
void record_file_header(uint8_t out[RECORD_FILE_HEADER_SIZE], const char *magic, uint64_t value);

/**
 * record_file_header_ok() - check a file header (@len bytes available).
 * Returns true and sets *@value when the magic and CRC match.
 */
bool record_file_header_ok(const uint8_t *p, size_t len, const char *magic, uint64_t *value);

/**
 * record_encode() - write one record at @p (record_size() bytes).
 * @flags: QoS and RECORD_FLAG_RETAIN.
 */
void record_encode(uint8_t *p, uint64_t seq, uint64_t time_ms, uint8_t flags, const void *topic,
                   size_t topic_len, const void *payload, size_t len);

/**
 * record_header_parse() - parse a record header (RECORD_HEADER_SIZE bytes at
 * @p) and check what can be checked without the body. Returns NULL, or why
 * it is damaged ("record length out of range", ...). Sets @rec's header
 * fields; not topic/payload.
 */
const char *record_header_parse(const uint8_t *p, struct record *rec);

/**
 * record_read() - the whole record at @off in @data (@len bytes): header
 * checks, the body within @len, the CRC. Returns NULL and fills @rec, or
 * why it is damaged.
 */
const char *record_read(const uint8_t *data, size_t len, size_t off, struct record *rec);

/**
 * record_resync() - after a bad record at @from, the next offset in
 * @from+1..@len where a whole record validates and whose seq is after
 * @last_seq by at most as many records as the skipped bytes could have held
 * (seq in last_seq+1 .. last_seq + (skipped / RECORD_MIN_SIZE) + 1): random
 * bytes do not pass for a record, nor do stale records from an earlier life
 * of the file. Returns true with *@found and @rec set, false when no record
 * follows (a torn tail).
 */
bool record_resync(const uint8_t *data, size_t len, size_t from, uint64_t last_seq, size_t *found,
                   struct record *rec);

/* One step of a scan: what record_scan_next() found. */
enum record_scan_result {
    RECORD_SCAN_END,     /* at the end of the data */
    RECORD_SCAN_OK,      /* the next record, in sequence */
    RECORD_SCAN_DAMAGED, /* a damaged range, then a good record (both reported) */
    RECORD_SCAN_TORN,    /* bad bytes to the end: no valid record after them */
};

/* A sequential reader over a buffer holding a whole file. */
struct record_scan {
    const uint8_t *data; /* borrowed */
    size_t len;
    size_t off;        /* next record */
    uint64_t last_seq; /* seq of the last good record (first seq - 1 at the start) */
    /* Set by RECORD_SCAN_DAMAGED and RECORD_SCAN_TORN: */
    size_t bad_from, bad_to; /* damaged bytes: [bad_from, bad_to) */
    uint64_t lost_first;     /* RECORD_SCAN_DAMAGED: seqs lost_first..lost_last were in it */
    uint64_t lost_last;      /* (lost_last < lost_first: none, e.g. only a stray byte run) */
    const char *why;         /* what was wrong at bad_from */
};

/** record_scan_init() - scan @data (borrowed) from @off; the first record should be @first_seq. */
void record_scan_init(struct record_scan *scan, const uint8_t *data, size_t len, size_t off,
                      uint64_t first_seq);

/**
 * record_scan_next() - the next record (@rec) in sequence, skipping a
 * damaged range when a valid record follows it (RECORD_SCAN_DAMAGED: the
 * range in @scan, @rec the record after it). RECORD_SCAN_TORN: nothing valid
 * follows @scan->bad_from; the scan stays there (the caller truncates or
 * reports).
 */
enum record_scan_result record_scan_next(struct record_scan *scan, struct record *rec);

/**
 * record_keep_damaged() - keep a copy of damaged bytes for the operator in
 * @dir (created, mode 0700) as "<name>-<offset>.bin": at most
 * RECORD_DAMAGED_COPY bytes of @data (@len), and the oldest copies in @dir are
 * removed while it holds more than RECORD_DAMAGED_BUDGET bytes. An existing
 * copy of the same range is kept (the range is found again at each start).
 * Writes @path (@path_size bytes) for the log. Returns 0 or a negative errno.
 */
int record_keep_damaged(const char *dir, const char *name, uint64_t offset, const uint8_t *data,
                        size_t len, char *path, size_t path_size);

#endif
