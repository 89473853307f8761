/* spool_seg.c - the spool's segments (spool_int.h): the in-memory list of
 * segment files, retiring acknowledged ones, the holes and damaged ranges
 * inside them, the two cursor slots, and growable buffers. Calls nothing
 * above it.
 */
#include "spool_int.h"

/* --- little helpers -------------------------------------------------------- */

int spool_buf_reserve(struct spool_buf *buf, size_t more)
{
    size_t cap;
    uint8_t *p;

    if (buf->len + more <= buf->cap)
        return 0;
    cap = buf->cap ? buf->cap : 4096;
    while (cap < buf->len + more)
        cap *= 2;
    p = realloc(buf->data, cap);
    if (!p)
        return -ENOMEM;
    buf->data = p;
    buf->cap = cap;
    return 0;
}

void spool_buf_free(struct spool_buf *buf)
{
    free(buf->data);
    buf->data = NULL;
    buf->len = buf->cap = 0;
}

void spool_seg_path(const struct spool *spool, uint64_t first_seq, char *out, size_t size)
{
    snprintf(out, size, "%s/%016" PRIx64 ".seg", spool->dir, first_seq);
}

/* --- segments ---------------------------------------------------------------- */

struct spool_seg *spool_seg_new(uint64_t first_seq)
{
    struct spool_seg *seg = calloc(1, sizeof(*seg));
    if (!seg)
        return NULL;
    seg->first_seq = first_seq;
    seg->last_seq = first_seq - 1;
    seg->fd = -1;
    return seg;
}

void spool_seg_free(struct spool_seg *seg)
{
    if (seg->fd >= 0)
        close(seg->fd);
    spool_buf_free(&seg->flush);
    spool_buf_free(&seg->fill);
    free(seg->holes);
    free(seg);
}

void spool_seg_link_tail(struct spool *spool, struct spool_seg *seg)
{
    seg->prev = spool->tail;
    seg->next = NULL;
    if (spool->tail)
        spool->tail->next = seg;
    else
        spool->head = seg;
    spool->tail = seg;
}

void spool_rb_drop(struct spool *spool)
{
    if (spool->rb_fd >= 0)
        close(spool->rb_fd);
    spool->rb_fd = -1;
    spool->rb_seg = NULL;
    spool->rb.len = 0;
}

static int queue_unlink(struct spool *spool, uint64_t first_seq)
{
    char path[4096];
    char *copy;

    if (spool->unlink_count == spool->unlink_cap) {
        size_t cap = spool->unlink_cap ? spool->unlink_cap * 2 : 8;
        char **items = realloc(spool->unlinks, cap * sizeof(*items));
        if (!items)
            return -ENOMEM;
        spool->unlinks = items;
        spool->unlink_cap = cap;
    }
    spool_seg_path(spool, first_seq, path, sizeof(path));
    copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    spool->unlinks[spool->unlink_count++] = copy;
    return 0;
}

void spool_seg_retire(struct spool *spool, struct spool_seg *seg)
{
    if (spool->read.seg == seg) {
        spool->read.seg = seg->next;
        spool->read.off = SEG_HEADER_SIZE;
    }
    if (spool->rb_seg == seg)
        spool_rb_drop(spool);
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        spool->head = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
    else
        spool->tail = seg->prev;
    spool->bytes -= seg->size;
    spool->fill_bytes -= seg->fill.len;
    if (spool->opts.durability == SPOOL_DURABLE && seg->size > 0 &&
        queue_unlink(spool, seg->first_seq) < 0)
        log_uplink(LOG_ERR, spool->name,
                   "spool: out of memory; segment %016" PRIx64
                   " stays on disk until the next start",
                   seg->first_seq);
    spool_seg_free(seg);
}

void spool_retire_acked(struct spool *spool)
{
    struct spool_seg *seg;

    while (spool->head && spool->head != spool->tail && !spool->head->busy &&
           spool->head->last_seq <= spool->acked_seq)
        spool_seg_retire(spool, spool->head);
    /* The newest segment too, once all of it is acknowledged and written,
     * when it is half full or appends wait for room: otherwise a spool
     * whose bound is one segment could never free anything. (Not always:
     * each new segment costs a file creation and a directory fsync.) */
    seg = spool->head;
    if (seg && seg == spool->tail && !seg->busy && seg->last_seq <= spool->acked_seq &&
        (spool->opts.durability == SPOOL_MEMORY || (seg->fill.len == 0 && seg->flush.len == 0)) &&
        (seg->size >= spool->segment_bytes / 2 || spool->blocked_head))
        spool_seg_retire(spool, seg);
}

uint64_t spool_seg_unacked(const struct spool *spool, const struct spool_seg *seg)
{
    uint64_t from = spool->acked_seq + 1 > seg->first_seq ? spool->acked_seq + 1 : seg->first_seq;
    uint64_t count = seg->last_seq >= from ? seg->last_seq - from + 1 : 0;

    /* Sequence numbers lost to damage found at start were never counted. */
    for (size_t i = 0; i < seg->hole_count; i++) {
        const struct spool_hole *hole = &seg->holes[i];
        uint64_t first = hole->lost_first > from ? hole->lost_first : from;
        if (!hole->in_depth && hole->lost_last >= first && hole->lost_last <= seg->last_seq)
            count -= hole->lost_last - first + 1;
    }
    return count;
}

uint64_t spool_seg_skip_hole(const struct spool_seg *seg, uint64_t off)
{
    for (size_t i = 0; i < seg->hole_count; i++)
        if (seg->holes[i].from == off)
            return seg->holes[i].to;
    return off;
}

int spool_seg_damage(struct spool *spool, struct spool_seg *seg, uint64_t from, uint64_t to,
                     const uint8_t *bytes, uint64_t lost_first, uint64_t lost_last, const char *why,
                     const char *after, bool hole, bool in_depth)
{
    char path[4096], copy[4400], name[300];
    uint64_t lost = lost_last >= lost_first ? lost_last - lost_first + 1 : 0;
    uint64_t unacked_first = lost_first > spool->acked_seq ? lost_first : spool->acked_seq + 1;
    uint64_t unacked = lost_last >= unacked_first ? lost_last - unacked_first + 1 : 0;
    int rc;

    spool_seg_path(spool, seg->first_seq, path, sizeof(path));
    copy[0] = '\0';
    if (spool->damaged_dir) {
        snprintf(name, sizeof(name), "spool-%s-%016" PRIx64 ".seg", spool->name, seg->first_seq);
        rc = record_keep_damaged(spool->damaged_dir, name, from, bytes, (size_t)(to - from), copy,
                                 sizeof(copy));
        if (rc < 0) {
            log_uplink(LOG_WARNING, spool->name,
                       "spool: cannot keep a copy of damaged bytes in %s: %s", spool->damaged_dir,
                       strerror(-rc));
            copy[0] = '\0';
        }
    }
    spool->stats.dropped_corrupt += unacked;
    if (lost)
        log_uplink(LOG_WARNING, spool->name,
                   "spool: %s is damaged at bytes %" PRIu64 "..%" PRIu64 " (%" PRIu64
                   " byte(s), %s): %" PRIu64 " record(s) lost (seq %" PRIu64 "..%" PRIu64
                   "%s), %s%s%s",
                   path, from, to - 1, to - from, why, lost, lost_first, lost_last,
                   unacked < lost ? ", some already acknowledged" : "", after,
                   copy[0] ? "; damaged bytes kept in " : "", copy);
    else
        log_uplink(LOG_WARNING, spool->name,
                   "spool: %s is damaged at bytes %" PRIu64 "..%" PRIu64 " (%" PRIu64
                   " byte(s), %s): no record lost%s%s",
                   path, from, to - 1, to - from, why, copy[0] ? "; damaged bytes kept in " : "",
                   copy);
    seg->damaged = true;
    if (!hole)
        return 0;
    struct spool_hole *holes = realloc(seg->holes, (seg->hole_count + 1) * sizeof(*holes));
    if (!holes)
        return -ENOMEM;
    seg->holes = holes;
    holes[seg->hole_count++] = (struct spool_hole){.from = from,
                                                   .to = to,
                                                   .lost_first = lost_first,
                                                   .lost_last = lost_last,
                                                   .in_depth = in_depth};
    return 0;
}

/* --- cursor file ------------------------------------------------------------- */

void spool_cursor_encode(uint8_t out[CURSOR_SLOT_SIZE], uint64_t gen, uint64_t seq)
{
    memset(out, 0, CURSOR_SLOT_SIZE);
    record_put_le(out, CURSOR_MAGIC, 4);
    record_put_le(out + 8, gen, 8);
    record_put_le(out + 16, seq, 8);
    record_put_le(out + 24, record_crc32c(0, out, 24), 4);
}

bool spool_cursor_decode(const uint8_t *p, uint64_t *gen, uint64_t *seq)
{
    if (record_get_le(p, 4) != CURSOR_MAGIC || record_get_le(p + 24, 4) != record_crc32c(0, p, 24))
        return false;
    *gen = record_get_le(p + 8, 8);
    *seq = record_get_le(p + 16, 8);
    return true;
}
