/* record.c - the record framing of the spool and the retained store (see record.h).
 *
 * Corruption and torn tails are different events: power loss ends a log in
 * the middle of a write (nothing valid follows), a flipped bit or a bad
 * sector damages bytes in the middle of good data. The scanner tells them
 * apart by looking for a valid record after the damage: a whole record
 * whose length fits, whose CRC-32C matches and whose sequence number is the
 * next one or a few later (as many as the skipped bytes could have held).
 * A random 28-byte run passes the header checks (flags, zero byte, lengths)
 * rarely and then the CRC about once in 2^32; the sequence bound makes it
 * rarer still and keeps out whole stale records.
 */
#include "record.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* --- CRC-32C ------------------------------------------------------------- */

static uint32_t crc32c_table[8][256];
static bool crc32c_ready;

static void crc32c_init(void)
{
    /* Castagnoli polynomial, reflected (RFC 3720 §B.4). Slicing-by-8. */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc32c_table[t][i] =
                (crc32c_table[t - 1][i] >> 8) ^ crc32c_table[0][crc32c_table[t - 1][i] & 0xff];
    crc32c_ready = true;
}

uint32_t record_crc32c(uint32_t crc, const void *data, size_t len)
{
    const uint8_t *p = data;

    if (!crc32c_ready)
        crc32c_init();
    crc = ~crc;
    while (len >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = crc32c_table[7][lo & 0xff] ^ crc32c_table[6][(lo >> 8) & 0xff] ^
              crc32c_table[5][(lo >> 16) & 0xff] ^ crc32c_table[4][lo >> 24] ^
              crc32c_table[3][p[4]] ^ crc32c_table[2][p[5]] ^ crc32c_table[1][p[6]] ^
              crc32c_table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ crc32c_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

/* --- encoding ------------------------------------------------------------ */

void record_file_header(uint8_t out[RECORD_FILE_HEADER_SIZE], const char *magic, uint64_t value)
{
    memcpy(out, magic, 8);
    record_put_le(out + 8, value, 8);
    record_put_le(out + 16, record_crc32c(0, out, 16), 4);
    record_put_le(out + 20, 0, 4);
}

bool record_file_header_ok(const uint8_t *p, size_t len, const char *magic, uint64_t *value)
{
    if (len < RECORD_FILE_HEADER_SIZE || memcmp(p, magic, 8) != 0 ||
        record_get_le(p + 16, 4) != record_crc32c(0, p, 16) || record_get_le(p + 20, 4) != 0)
        return false;
    *value = record_get_le(p + 8, 8);
    return true;
}

void record_encode(uint8_t *p, uint64_t seq, uint64_t time_ms, uint8_t flags, const void *topic,
                   size_t topic_len, const void *payload, size_t len)
{
    record_put_le(p + 4, topic_len + len, 4);
    record_put_le(p + 8, seq, 8);
    record_put_le(p + 16, time_ms, 8);
    p[24] = flags;
    p[25] = 0;
    record_put_le(p + 26, topic_len, 2);
    memcpy(p + RECORD_HEADER_SIZE, topic, topic_len);
    if (len)
        memcpy(p + RECORD_HEADER_SIZE + topic_len, payload, len);
    record_put_le(p, record_crc32c(0, p + 4, RECORD_HEADER_SIZE - 4 + topic_len + len), 4);
}

/* --- reading ------------------------------------------------------------- */

const char *record_header_parse(const uint8_t *p, struct record *rec)
{
    rec->crc = (uint32_t)record_get_le(p, 4);
    rec->len = (uint32_t)record_get_le(p + 4, 4);
    rec->seq = record_get_le(p + 8, 8);
    rec->time_ms = record_get_le(p + 16, 8);
    rec->flags = p[24];
    rec->topic_len = (uint16_t)record_get_le(p + 26, 2);
    if (rec->len > RECORD_MAX_LEN)
        return "record length out of range";
    if (rec->topic_len == 0 || rec->topic_len > rec->len)
        return "topic length out of range";
    if ((rec->flags & ~(RECORD_FLAG_QOS_MASK | RECORD_FLAG_RETAIN)) ||
        (rec->flags & RECORD_FLAG_QOS_MASK) == 3 || p[25])
        return "unknown flags";
    return NULL;
}

const char *record_read(const uint8_t *data, size_t len, size_t off, struct record *rec)
{
    const char *why;

    if (off > len || len - off < RECORD_HEADER_SIZE)
        return "short record header";
    if ((why = record_header_parse(data + off, rec)) != NULL)
        return why;
    if (len - off - RECORD_HEADER_SIZE < rec->len)
        return "short record";
    if (record_crc32c(0, data + off + 4, RECORD_HEADER_SIZE - 4 + rec->len) != rec->crc)
        return "CRC mismatch";
    rec->topic = data + off + RECORD_HEADER_SIZE;
    rec->payload = rec->topic + rec->topic_len;
    rec->payload_len = rec->len - rec->topic_len;
    return NULL;
}

bool record_resync(const uint8_t *data, size_t len, size_t from, uint64_t last_seq, size_t *found,
                   struct record *rec)
{
    for (size_t at = from + 1; at < len && len - at >= RECORD_MIN_SIZE; at++) {
        const uint8_t *p = data + at;
        uint64_t max_seq = last_seq + (at - from) / RECORD_MIN_SIZE + 1;

        /* The cheap checks first: most offsets fail on flags or lengths. */
        if (p[25] != 0 || record_header_parse(p, rec) != NULL)
            continue;
        if (rec->seq <= last_seq || rec->seq > max_seq)
            continue;
        if (len - at - RECORD_HEADER_SIZE < rec->len)
            continue;
        if (record_read(data, len, at, rec) != NULL)
            continue;
        *found = at;
        return true;
    }
    return false;
}

void record_scan_init(struct record_scan *scan, const uint8_t *data, size_t len, size_t off,
                      uint64_t first_seq)
{
    memset(scan, 0, sizeof(*scan));
    scan->data = data;
    scan->len = len;
    scan->off = off;
    scan->last_seq = first_seq - 1;
}

enum record_scan_result record_scan_next(struct record_scan *scan, struct record *rec)
{
    size_t found;

    if (scan->off >= scan->len)
        return RECORD_SCAN_END;
    scan->why = record_read(scan->data, scan->len, scan->off, rec);
    /* A whole, valid record with a later seq than expected is not damage:
     * the spool continues after the acknowledged cursor when records were
     * sent before their fsync and then lost to power loss (nothing was
     * written for the missing numbers). */
    if (!scan->why && rec->seq <= scan->last_seq)
        scan->why = "out-of-sequence record";
    if (!scan->why) {
        scan->off += RECORD_HEADER_SIZE + rec->len;
        scan->last_seq = rec->seq;
        return RECORD_SCAN_OK;
    }
    scan->bad_from = scan->off;
    if (!record_resync(scan->data, scan->len, scan->off, scan->last_seq, &found, rec)) {
        scan->bad_to = scan->len;
        return RECORD_SCAN_TORN;
    }
    scan->bad_to = found;
    scan->lost_first = scan->last_seq + 1;
    scan->lost_last = rec->seq - 1;
    scan->off = found + RECORD_HEADER_SIZE + rec->len;
    scan->last_seq = rec->seq;
    return RECORD_SCAN_DAMAGED;
}

/* --- copies of damaged bytes ------------------------------------------------ */

struct damaged_file {
    char name[256];
    off_t size;
    struct timespec mtime;
};

static int damaged_cmp(const void *a, const void *b)
{
    const struct damaged_file *x = a, *y = b;

    if (x->mtime.tv_sec != y->mtime.tv_sec)
        return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec)
        return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Remove the oldest copies while @dir holds more than the budget. */
static void damaged_trim(const char *dir, const char *keep)
{
    struct damaged_file *files = NULL;
    size_t count = 0, cap = 0;
    uint64_t total = 0;
    struct dirent *de;
    DIR *d = opendir(dir);

    if (!d)
        return;
    while ((de = readdir(d)) != NULL) {
        char path[4096];
        struct stat st;
        size_t n = strlen(de->d_name);
        if (n < 5 || n >= sizeof(files->name) || strcmp(de->d_name + n - 4, ".bin") != 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
            continue;
        if (count == cap) {
            size_t grown_cap = cap ? cap * 2 : 32;
            struct damaged_file *grown = realloc(files, grown_cap * sizeof(*grown));
            if (!grown)
                break;
            files = grown;
            cap = grown_cap;
        }
        snprintf(files[count].name, sizeof(files[count].name), "%s", de->d_name);
        files[count].size = st.st_size;
        files[count].mtime = st.st_mtim;
        total += (uint64_t)st.st_size;
        count++;
    }
    closedir(d);
    if (count)
        qsort(files, count, sizeof(*files), damaged_cmp);
    for (size_t i = 0; i < count && total > RECORD_DAMAGED_BUDGET; i++) {
        char path[4096];
        if (strcmp(files[i].name, keep) == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, files[i].name);
        if (unlink(path) == 0)
            total -= (uint64_t)files[i].size;
    }
    free(files);
}

int record_keep_damaged(const char *dir, const char *name, uint64_t offset, const uint8_t *data,
                        size_t len, char *path, size_t path_size)
{
    char base[300];
    struct stat st;
    size_t done = 0;
    int fd, rc = 0;

    if (snprintf(base, sizeof(base), "%s-%" PRIu64 ".bin", name, offset) >= (int)sizeof(base) ||
        snprintf(path, path_size, "%s/%s", dir, base) >= (int)path_size)
        return -ENAMETOOLONG;
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return -errno;
    if (stat(path, &st) == 0)
        return 0; /* kept at an earlier start */
    if (len > RECORD_DAMAGED_COPY)
        len = RECORD_DAMAGED_COPY;
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    while (done < len) {
        ssize_t n = write(fd, data + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = n < 0 ? -errno : -EIO;
            break;
        }
        done += (size_t)n;
    }
    close(fd);
    if (rc < 0) {
        unlink(path);
        return rc;
    }
    damaged_trim(dir, base);
    return 0;
}
