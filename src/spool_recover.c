/* spool_recover.c - reading a spool directory back (spool_int.h): the
 * cursor, then every segment in order; damaged records are reported and
 * skipped without losing the valid ones after them, and a torn tail of the
 * newest segment is cut.
 */
#include "spool_int.h"

/* --- recovery ----------------------------------------------------------------- */

static int mkdir_p(const char *dir)
{
    char path[4096];

    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path))
        return -ENAMETOOLONG;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int read_whole(const char *path, uint8_t **out, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    uint8_t *data;
    size_t got = 0;

    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    data = malloc(st.st_size ? (size_t)st.st_size : 1);
    if (!data) {
        close(fd);
        return -ENOMEM;
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, data + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    *out = data;
    *len = got;
    return 0;
}

/* Scan one segment file and fill @seg. A damaged range with a valid record
 * after it is a hole (counted, logged, kept; the records after it stay).
 * *@valid is where the records end: @len, or the start of bytes after which
 * nothing validates (*@why says what was wrong there). Returns 0 or -ENOMEM. */
static int scan_segment(struct spool *spool, struct spool_seg *seg, const uint8_t *data, size_t len,
                        size_t *valid, const char **why)
{
    struct record_scan scan;
    struct record rec;
    enum record_scan_result result;
    int rc;

    *why = NULL;
    record_scan_init(&scan, data, len, SEG_HEADER_SIZE, seg->first_seq);
    for (;;) {
        size_t off = scan.off;
        result = record_scan_next(&scan, &rec);
        if (result == RECORD_SCAN_END)
            break;
        if (result == RECORD_SCAN_TORN) {
            *why = scan.why;
            break;
        }
        if (result == RECORD_SCAN_DAMAGED) {
            rc = spool_seg_damage(spool, seg, scan.bad_from, scan.bad_to, data + scan.bad_from,
                                  scan.lost_first, scan.lost_last, scan.why,
                                  "reading continues at the next valid record", true, false);
            if (rc < 0)
                return rc;
            off = scan.bad_to;
        }
        if (seg->records == 0)
            seg->first_time_ms = rec.time_ms;
        seg->records++;
        seg->last_seq = rec.seq;
        seg->last_time_ms = rec.time_ms;
        if (rec.seq > spool->acked_seq) {
            spool->stats.depth++;
            if (!spool->read.seg) {
                spool->read.seg = seg;
                spool->read.off = off;
            }
        }
    }
    *valid = scan.off;
    return 0;
}

/* Recovery, step 1: the directory and the cursor file; the newer valid
 * slot says what was acknowledged. */
static int recover_cursor(struct spool *spool)
{
    char path[4096];
    uint8_t slots[2 * CURSOR_SLOT_SIZE];
    ssize_t n;
    int rc;

    rc = mkdir_p(spool->dir);
    if (rc < 0) {
        log_uplink(LOG_ERR, spool->name, "spool: cannot create %s: %s", spool->dir, strerror(-rc));
        return rc;
    }
    snprintf(path, sizeof(path), "%s/cursor", spool->dir);
    spool->cursor_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (spool->cursor_fd < 0) {
        rc = -errno;
        log_uplink(LOG_ERR, spool->name, "spool: cannot open %s: %s", path, strerror(errno));
        return rc;
    }
    memset(slots, 0, sizeof(slots));
    n = pread(spool->cursor_fd, slots, sizeof(slots), 0);
    for (int i = 0; i < 2 && n > 0; i++) {
        uint64_t gen, seq;
        if ((i + 1) * CURSOR_SLOT_SIZE <= n &&
            spool_cursor_decode(slots + i * CURSOR_SLOT_SIZE, &gen, &seq) &&
            gen >= spool->cursor_gen) {
            spool->cursor_gen = gen;
            spool->acked_seq = seq;
        }
    }
    spool->persisted_seq = spool->acked_seq;
    return 0;
}

/* Recovery, step 2: the segments' first seqs from their names
 * (<16 hex digits>.seg), sorted. *@firsts is malloc'd (NULL when none). */
static int recover_list(struct spool *spool, uint64_t **firsts, size_t *count)
{
    size_t cap = 0;
    struct dirent *de;
    DIR *dir;
    int rc;

    *firsts = NULL;
    *count = 0;
    dir = opendir(spool->dir);
    if (!dir) {
        rc = -errno;
        log_uplink(LOG_ERR, spool->name, "spool: cannot read %s: %s", spool->dir, strerror(errno));
        return rc;
    }
    while ((de = readdir(dir)) != NULL) {
        char *end;
        uint64_t first;
        if (strlen(de->d_name) != 20 || strcmp(de->d_name + 16, ".seg") != 0)
            continue;
        errno = 0;
        first = strtoull(de->d_name, &end, 16);
        if (errno || end != de->d_name + 16)
            continue;
        if (*count == cap) {
            uint64_t *grown = realloc(*firsts, (cap ? cap * 2 : 16) * sizeof(*grown));
            if (!grown) {
                closedir(dir);
                free(*firsts);
                *firsts = NULL;
                return -ENOMEM;
            }
            *firsts = grown;
            cap = cap ? cap * 2 : 16;
        }
        (*firsts)[(*count)++] = first;
    }
    closedir(dir);
    if (*count)
        qsort(*firsts, *count, sizeof(**firsts), cmp_u64);
    return 0;
}

/* A torn tail (power loss) in the newest segment: cut it at @valid. */
static int recover_truncate(struct spool *spool, const char *path, size_t valid)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    int rc;

    if (fd < 0 || ftruncate(fd, (off_t)valid) < 0 || fdatasync(fd) < 0) {
        rc = -errno;
        log_uplink(LOG_ERR, spool->name, "spool: cannot truncate %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return rc;
    }
    close(fd);
    return 0;
}

/* What the segments read so far say about the next one. */
struct recover_state {
    uint64_t prev_last;
    bool prev_damaged;
};

/* A segment whose header is damaged and that holds no valid record: kept
 * aside as <path>.corrupt, skipped. */
static void recover_set_aside(struct spool *spool, const char *path, size_t len)
{
    char corrupt[4200];

    log_uplink(LOG_ERR, spool->name,
               "spool: %s has a damaged header and no valid record: the whole segment "
               "(%zu bytes) is skipped and kept as %s.corrupt for inspection",
               path, len, path);
    snprintf(corrupt, sizeof(corrupt), "%s.corrupt", path);
    if (rename(path, corrupt) < 0)
        log_uplink(LOG_ERR, spool->name, "spool: cannot rename %s: %s", path, strerror(errno));
}

/* Recovery, step 3, for segment @i of @count: scan it, report and skip
 * damage (records stay where a valid one follows), cut a torn tail of
 * the newest, and link what is valid. */
static int recover_segment(struct spool *spool, const uint64_t *firsts, size_t i, size_t count,
                           struct recover_state *st)
{
    bool last = i + 1 == count;
    char path[4096];
    uint8_t *data = NULL;
    size_t len = 0, valid = 0;
    uint64_t header_first;
    const char *why = NULL;
    struct spool_seg *seg;
    bool header_ok;
    int rc;

    spool_seg_path(spool, firsts[i], path, sizeof(path));
    rc = read_whole(path, &data, &len);
    if (rc < 0) {
        log_uplink(LOG_ERR, spool->name, "spool: cannot read %s: %s", path, strerror(-rc));
        return rc;
    }
    if (len < SEG_HEADER_SIZE && last) {
        /* Power loss while the segment was being created. */
        log_uplink(LOG_WARNING, spool->name,
                   "spool: torn tail: %s is %zu byte(s), shorter than a segment header; "
                   "deleted (%zu byte(s) dropped)",
                   path, len, len);
        spool->stats.recovered_torn_bytes += len;
        unlink(path);
        free(data);
        return 0;
    }
    header_ok =
        record_file_header_ok(data, len, SEG_MAGIC, &header_first) && header_first == firsts[i];
    seg = spool_seg_new(firsts[i]);
    if (!seg) {
        free(data);
        return -ENOMEM;
    }
    /* A damaged header does not make the records unreadable: the file's
     * name says which seq they start at. */
    rc = len < SEG_HEADER_SIZE ? 0 : scan_segment(spool, seg, data, len, &valid, &why);
    if (rc == 0 && !header_ok && seg->records > 0)
        rc = spool_seg_damage(spool, seg, 0, SEG_HEADER_SIZE, data, 1, 0, "damaged segment header",
                              "", false, false);
    if (rc < 0)
        goto err;
    if (!header_ok && seg->records == 0) {
        recover_set_aside(spool, path, len);
        st->prev_damaged = true;
        spool_seg_free(seg);
        free(data);
        return 0;
    }
    if (st->prev_damaged && st->prev_last && firsts[i] > st->prev_last + 1) {
        uint64_t from =
            st->prev_last + 1 > spool->acked_seq ? st->prev_last + 1 : spool->acked_seq + 1;
        uint64_t gap = firsts[i] > from ? firsts[i] - from : 0;
        log_uplink(LOG_WARNING, spool->name,
                   "spool: %" PRIu64 " record(s) (seq %" PRIu64 "..%" PRIu64
                   ") were lost to the damaged segment(s) reported above",
                   firsts[i] - st->prev_last - 1, st->prev_last + 1, firsts[i] - 1);
        spool->stats.dropped_corrupt += gap;
    }
    st->prev_damaged = false;
    if (valid < len && last) {
        /* Nothing valid after @valid: a torn tail (power loss). */
        log_uplink(LOG_WARNING, spool->name,
                   "spool: torn tail in %s at offset %zu (%s): truncated, %zu byte(s) "
                   "dropped; %" PRIu64 " whole record(s) before it are kept",
                   path, valid, why, len - valid, seg->records);
        spool->stats.recovered_torn_bytes += len - valid;
        rc = recover_truncate(spool, path, valid);
    } else if (valid < len) {
        /* Damage at the end of an older segment: the next segment's
         * name says where the lost records end. Never replayed. */
        rc = spool_seg_damage(spool, seg, valid, len, data + valid, seg->last_seq + 1,
                              firsts[i + 1] - 1, why, "the rest of the segment is skipped", false,
                              false);
    }
    if (rc < 0)
        goto err;
    free(data);
    seg->size = seg->file_len = valid;
    st->prev_last = valid < len && !last ? firsts[i + 1] - 1 : seg->last_seq;
    spool->bytes += seg->size;
    if (seg->last_seq >= spool->next_seq)
        spool->next_seq = seg->last_seq + 1;
    if (seg->first_seq > spool->next_seq)
        spool->next_seq = seg->first_seq;
    spool_seg_link_tail(spool, seg);
    return 0;

err:
    spool_seg_free(seg);
    free(data);
    return rc;
}

int spool_recover(struct spool *spool)
{
    struct recover_state st = {0};
    uint64_t *firsts;
    size_t count;
    int rc;

    rc = recover_cursor(spool);
    if (rc < 0)
        return rc;
    rc = recover_list(spool, &firsts, &count);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < count && rc == 0; i++)
        rc = recover_segment(spool, firsts, i, count, &st);
    free(firsts);
    if (rc < 0)
        return rc;
    if (spool->next_seq <= spool->acked_seq)
        spool->next_seq = spool->acked_seq + 1;
    /* Fully acknowledged segments left by the previous run. */
    spool_retire_acked(spool);
    if (spool->head && spool->head == spool->tail && spool->head->last_seq <= spool->acked_seq &&
        spool->head->records > 0)
        spool->head->damaged = true; /* start a fresh segment; this one goes once acked */
    if (spool->read.seg == NULL && spool->tail) {
        spool->read.seg = spool->tail;
        spool->read.off = spool->tail->size;
    }
    log_uplink(LOG_INFO, spool->name,
               "spool %s recovered: %" PRIu64 " record(s) waiting (%" PRIu64
               " bytes), next seq %" PRIu64 ", acknowledged up to %" PRIu64,
               spool->dir, spool->stats.depth, spool->bytes, spool->next_seq, spool->acked_seq);
    return 0;
}
