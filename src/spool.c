/* spool.c - durable store-and-forward queue (see spool.h, docs/design/spool.md).
 *
 * Files in the spool directory
 * ----------------------------
 *   %016llx.seg  segments, named by the sequence number of their first record
 *   cursor       the acknowledged cursor, two slots written alternately
 *
 * A segment is a 24-byte header (magic "UPLKSPL1", first_seq, CRC-32C of
 * those 16 bytes, 4 zero bytes) followed by records:
 *
 *   crc32c u32 | len u32 | seq u64 | time_ms u64 | flags u8 | 0 u8 | topic_len u16
 *   topic (topic_len bytes) | payload (len - topic_len bytes)
 *
 * all little-endian; the CRC covers everything after the CRC field, so a
 * record torn anywhere (power loss in the middle of a write) fails its check.
 * Sequence numbers are consecutive inside a segment. The framing and the
 * reader are record.c's (shared with the retained store): a damaged range
 * with a valid record after it loses only the records in it (a "hole" the
 * reader jumps over, counted in dropped_corrupt, bytes copied to
 * damaged_dir); bad bytes with nothing valid after them at the end of the
 * last segment are a torn tail and are cut.
 *
 * Why a segmented log and not a database file: appends are sequential writes
 * with one fdatasync per batch, space is reclaimed by deleting whole files
 * (no compaction, no rewrite of live data), and recovery is a linear scan
 * whose failure modes are easy to state (see docs/design/spool.md).
 *
 * Memory: the spool keeps only what is not yet written (the fill and flush
 * buffers of the newest segment, bounded by the batch size) and the records
 * handed out to the uplink and not yet acknowledged. Older records are read
 * back from the segment files when they are sent; on a running system they
 * are still in the page cache. These reads are plain pread() on the loop
 * thread: they hit the page cache or a local disk and take microseconds;
 * only the fdatasync, which can take tens of milliseconds, is moved to the
 * threadpool.
 *
 * Group commit: appends go into the newest segment's fill buffer. A commit
 * moves every fill buffer to its flush buffer and hands them to the
 * threadpool, which writes them, fdatasyncs the files (and the directory
 * when a segment was created), writes the cursor (when it is due: at most
 * every SPOOL_CURSOR_DELAY_MS, and at close) and unlinks retired
 * segments. Only one commit runs at a time; appends made meanwhile form the
 * next batch. A batch is started at the end of the loop turn that appended
 * it (turn_end_cb), at once when it is large (SPOOL_BATCH_BYTES/RECORDS) or
 * the spool is closing, and at the latest commit_interval after its first
 * append. commit_gap (off by default) holds a small batch until that long
 * after the previous commit started: fewer fdatasyncs at a steady rate.
 *
 * The spool is three layered files around one private header, spool_int.h
 * (its table of contents): this one, spool_recover.c (reading a directory
 * back) and spool_seg.c (segments, damage, the cursor slots).
 */
#include "spool_int.h"

static const struct sm_state spool_states[] = {
    [SPOOL_OPEN] = {"OPEN", SM_TO(SPOOL_CLOSING)},
    [SPOOL_CLOSING] = {"CLOSING", SM_TO(SPOOL_CLOSED)},
    [SPOOL_CLOSED] = {"CLOSED", 0},
};

static const char *spool_sm_uplink(const struct sm *sm)
{
    return container_of(sm, struct spool, sm)->name;
}

/* A spool only closes its handles when no commit runs and nobody waits. */
static bool spool_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct spool *spool = container_of(sm, struct spool, sm);

    if (sm_state(sm) == SPOOL_CLOSED && (spool->commit || spool->fill_waiters.len)) {
        snprintf(why, size, "closed with %s", spool->commit ? "a commit running" : "waiters");
        return false;
    }
    return true;
}

static const struct sm_conf spool_sm = {
    .states = spool_states,
    .count = ARRAY_SIZE(spool_states),
    .level = LOG_DEBUG,
    .log_name = spool_sm_uplink,
    .invariant = spool_sm_invariant,
};

/* Closing or closed: spool_close() was called. */
static bool spool_closing(const struct spool *spool)
{
    return sm_state(&spool->sm) != SPOOL_OPEN;
}

static void maybe_commit(struct spool *spool);
static void admit_blocked(struct spool *spool);
static void spool_check_closed(struct spool *spool);

static uint64_t realtime_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int waiters_push(struct spool_waiters *w, void (*cb)(void *, int), void *arg, int status)
{
    if (w->len == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        struct spool_waiter *items = realloc(w->items, cap * sizeof(*items));
        if (!items)
            return -ENOMEM;
        w->items = items;
        w->cap = cap;
    }
    w->items[w->len++] = (struct spool_waiter){.cb = cb, .arg = arg, .status = status};
    return 0;
}

/* --- deferred callbacks ---------------------------------------------------- */

static void deferred_cb(uv_timer_t *timer)
{
    struct spool *spool = container_of(timer, struct spool, deferred_timer);
    struct spool_waiters run = spool->deferred;

    spool->deferred = (struct spool_waiters){0};
    for (size_t i = 0; i < run.len; i++)
        if (run.items[i].cb)
            run.items[i].cb(run.items[i].arg, run.items[i].status);
    free(run.items);
    spool_check_closed(spool);
}

static void defer(struct spool *spool, void (*cb)(void *, int), void *arg, int status)
{
    if (!cb)
        return;
    if (waiters_push(&spool->deferred, cb, arg, status) < 0) {
        /* Cannot queue: run it now rather than never (the contract breaks
         * only under memory exhaustion). */
        cb(arg, status);
        return;
    }
    if (spool->deferred.len == 1)
        uv_timer_start(&spool->deferred_timer, deferred_cb, 0, 0);
}

/* overflow: drop-oldest. Returns false when the head cannot go. */
static bool drop_head(struct spool *spool, const char *why)
{
    struct spool_seg *seg = spool->head;
    uint64_t lost;

    if (!seg || seg == spool->tail || seg->busy)
        return false;
    lost = spool_seg_unacked(spool, seg);
    /* Handed-out records of that segment are forgotten: a late PUBACK for
     * them is ignored by spool_ack(). */
    while (spool->out_len && spool->outs[spool->out_head].pos.seg == seg) {
        spool->out_head++;
        spool->out_len--;
    }
    if (spool->out_len == 0)
        spool->out_head = 0;
    if (seg->last_seq > spool->acked_seq)
        spool->acked_seq = seg->last_seq;
    spool->stats.depth -= lost;
    spool->stats.dropped_overflow += lost;
    if (lost)
        log_uplink(LOG_WARNING, spool->name,
                   "spool: %s: dropped the oldest %" PRIu64 " record(s) (seq %" PRIu64 "..%" PRIu64
                   ", overflow: drop-oldest)",
                   why, lost, seg->last_seq - lost + 1, seg->last_seq);
    spool_seg_retire(spool, seg);
    return true;
}

/* --- commit (threadpool) ---------------------------------------------------- */

static int write_all(int fd, const uint8_t *p, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

static void commit_fail(struct spool_commit *c, int err, const char *what, const char *path)
{
    if (c->err)
        return;
    c->err = err;
    snprintf(c->err_what, sizeof(c->err_what), "%s %s", what, path);
}

static void commit_work_cb(uv_work_t *req)
{
    struct spool_commit *c = container_of(req, struct spool_commit, work);
    struct spool *spool = c->spool;
    char path[4096];
    bool new_file = false;
    uint64_t t0;
    int rc;

    /* Retired segments first: their records are acknowledged; if we crash
     * before the cursor below is durable, the older cursor just points
     * before the first remaining segment. */
    for (size_t i = 0; i < c->unlink_count; i++)
        if (unlink(c->unlinks[i]) < 0 && errno != ENOENT)
            commit_fail(c, errno, "cannot delete", c->unlinks[i]);

    for (size_t i = 0; i < c->seg_count && !c->err; i++) {
        struct spool_seg *seg = c->segs[i];
        spool_seg_path(spool, seg->first_seq, path, sizeof(path));
        if (seg->fd < 0) {
            seg->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
            if (seg->fd < 0) {
                commit_fail(c, errno, "cannot create", path);
                break;
            }
        }
        if (seg->file_len == 0)
            new_file = true;
        rc = write_all(seg->fd, seg->flush.data, seg->flush.len, (off_t)seg->file_len);
        if (rc < 0) {
            commit_fail(c, -rc, "cannot write to", path);
            /* Take back a partial write so the file ends on a whole record
             * (recovery would cut it too, but the retry appends here). */
            if (ftruncate(seg->fd, (off_t)seg->file_len) < 0)
                (void)0;
            break;
        }
    }
    t0 = uv_hrtime();
    for (size_t i = 0; i < c->seg_count && !c->err; i++) {
        struct spool_seg *seg = c->segs[i];
        if (fdatasync(seg->fd) < 0) {
            spool_seg_path(spool, seg->first_seq, path, sizeof(path));
            commit_fail(c, errno, "cannot fsync", path);
        }
    }
    if (!c->err && new_file) {
        /* A new file's directory entry must be durable too. */
        int dfd = open(spool->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) < 0)
            commit_fail(c, errno, "cannot fsync the directory", spool->dir);
        if (dfd >= 0)
            close(dfd);
    }
    if (!c->err && c->write_cursor) {
        snprintf(path, sizeof(path), "%s/cursor", spool->dir);
        rc = write_all(spool->cursor_fd, c->cursor_slot, CURSOR_SLOT_SIZE, c->cursor_off);
        if (rc < 0)
            commit_fail(c, -rc, "cannot write", path);
        else if (fdatasync(spool->cursor_fd) < 0)
            commit_fail(c, errno, "cannot fsync", path);
    }
    c->fsync_us = (uv_hrtime() - t0) / 1000;
}

static void commit_after_cb(uv_work_t *req, int status)
{
    struct spool_commit *c = container_of(req, struct spool_commit, work);
    struct spool *spool = c->spool;
    int result = c->err ? -c->err : 0;

    spool->commit = NULL;
    for (size_t i = 0; i < c->seg_count; i++) {
        struct spool_seg *seg = c->segs[i];
        seg->busy = false;
        if (result == 0) {
            seg->file_len += seg->flush.len;
            seg->flush.len = 0;
            if (seg->flush.cap > SPOOL_BATCH_BYTES * 2)
                spool_buf_free(&seg->flush);
        } else {
            /* Not written: put the bytes back in front of what was appended
             * since, to be written by the retry. */
            struct spool_buf merged = seg->flush;
            if (spool_buf_reserve(&merged, seg->fill.len) == 0) {
                if (seg->fill.len)
                    memcpy(merged.data + merged.len, seg->fill.data, seg->fill.len);
                merged.len += seg->fill.len;
                spool->fill_bytes += seg->flush.len;
                free(seg->fill.data);
                seg->fill = merged;
                seg->flush = (struct spool_buf){0};
            } else {
                seg->flush = merged;
                log_uplink(LOG_ERR, spool->name, "spool: out of memory keeping a failed batch");
            }
        }
    }
    for (size_t i = 0; i < c->unlink_count; i++)
        free(c->unlinks[i]);
    free(c->unlinks);
    if (result == 0) {
        spool->stats.commits++;
        spool->stats.last_fsync_us = c->fsync_us;
        if (c->write_cursor)
            spool->persisted_seq = c->cursor_seq;
        if (spool->io_error) {
            log_uplink(LOG_NOTICE, spool->name, "spool: %s is writable again; accepting messages",
                       spool->dir);
            spool->io_error = 0;
        }
    } else {
        if (spool->io_error == 0)
            log_uplink(LOG_ERR, spool->name,
                       "spool: %s: %s; local publishes are not acknowledged until it can be "
                       "written again (retrying every %d s)",
                       c->err_what, strerror(c->err), SPOOL_RETRY_MS / 1000);
        spool->io_error = result;
        spool->retry_at = uv_now(spool->loop) + SPOOL_RETRY_MS;
        if (c->err == ENOSPC && spool->opts.overflow == SPOOL_DROP_OLDEST &&
            drop_head(spool, "disk full")) {
            spool->retry_at = uv_now(spool->loop); /* room was made: retry now */
        }
    }
    for (size_t i = 0; i < c->waiters.len; i++)
        if (c->waiters.items[i].cb)
            c->waiters.items[i].cb(c->waiters.items[i].arg, result);
    free(c->waiters.items);
    free(c->segs);
    free(c);
    if (result == 0) {
        spool_retire_acked(spool);
        admit_blocked(spool);
    }
    maybe_commit(spool);
    spool_check_closed(spool);
}

/* The loop has handled every read that was ready: what was appended in this
 * turn is the batch; waiting longer would only add latency for publishers
 * that wait for their acknowledgements (their window is full). */
static void turn_end_cb(uv_check_t *check)
{
    struct spool *spool = container_of(check, struct spool, turn_end);

    uv_check_stop(check);
    spool->turn_end_active = false;
    spool->batch_ready = true;
    maybe_commit(spool);
    spool->batch_ready = false;
}

static void commit_timer_cb(uv_timer_t *timer)
{
    struct spool *spool = container_of(timer, struct spool, commit_timer);

    /* Due now (commit_interval or commit_gap has passed): a check handle
     * does not end the poll phase, so waiting for the turn's end would
     * wait for the next I/O or timer. */
    spool->timer_armed = false;
    spool->batch_ready = true;
    maybe_commit(spool);
    spool->batch_ready = false;
}

static void arm_timer(struct spool *spool, uint64_t delay)
{
    uint64_t due = uv_now(spool->loop) + delay;

    if (spool->timer_armed && spool->timer_due <= due)
        return;
    spool->timer_armed = true;
    spool->timer_due = due;
    uv_timer_start(&spool->commit_timer, commit_timer_cb, delay, 0);
}

static void start_commit(struct spool *spool)
{
    struct spool_commit *c;
    size_t n = 0;
    int rc;

    c = calloc(1, sizeof(*c));
    if (!c)
        goto err_alloc;
    for (struct spool_seg *seg = spool->head; seg; seg = seg->next)
        n += seg->fill.len > 0;
    c->segs = calloc(n ? n : 1, sizeof(*c->segs));
    if (!c->segs)
        goto err_alloc;
    c->spool = spool;
    for (struct spool_seg *seg = spool->head; seg; seg = seg->next) {
        if (seg->fill.len == 0)
            continue;
        struct spool_buf swap = seg->flush;
        seg->flush = seg->fill;
        seg->fill = swap;
        seg->fill.len = 0;
        seg->busy = true;
        c->segs[c->seg_count++] = seg;
    }
    spool->fill_bytes = 0;
    c->waiters = spool->fill_waiters;
    spool->fill_waiters = (struct spool_waiters){0};
    /* The cursor goes with a batch only when it is due (SPOOL_CURSOR_DELAY_MS
     * after the last one) or the spool is closing: at a steady rate every
     * batch would otherwise pay a second pwrite and fdatasync for it, half
     * the disk work of a commit. A cursor that lags only re-sends. */
    if (spool->acked_seq != spool->persisted_seq &&
        (c->seg_count == 0 || spool_closing(spool) ||
         uv_now(spool->loop) - spool->cursor_written_ms >= SPOOL_CURSOR_DELAY_MS)) {
        spool->cursor_written_ms = uv_now(spool->loop);
        c->write_cursor = true;
        c->cursor_seq = spool->acked_seq;
        spool_cursor_encode(c->cursor_slot, ++spool->cursor_gen, spool->acked_seq);
        c->cursor_off = (off_t)((spool->cursor_gen & 1) * CURSOR_SLOT_SIZE);
    }
    c->unlinks = spool->unlinks;
    c->unlink_count = spool->unlink_count;
    spool->unlinks = NULL;
    spool->unlink_count = spool->unlink_cap = 0;
    spool->commit = c;
    spool->commit_started_ms = uv_now(spool->loop);
    rc = uv_queue_work(spool->loop, &c->work, commit_work_cb, commit_after_cb);
    if (rc < 0) {
        /* Run it here rather than lose the batch: slow, but correct. */
        log_uplink(LOG_WARNING, spool->name,
                   "spool: cannot use the threadpool (%s); committing "
                   "on the loop thread",
                   uv_strerror(rc));
        commit_work_cb(&c->work);
        commit_after_cb(&c->work, 0);
    }
    return;

err_alloc:
    if (c)
        free(c->segs);
    free(c);
    log_uplink(LOG_ERR, spool->name, "spool: out of memory starting a commit; retrying");
    arm_timer(spool, SPOOL_RETRY_MS);
}

static void maybe_commit(struct spool *spool)
{
    uint64_t now, age;

    if (spool->opts.durability != SPOOL_DURABLE || spool->commit ||
        sm_state(&spool->sm) == SPOOL_CLOSED)
        return;
    bool data = spool->fill_bytes > 0;
    bool meta = spool->acked_seq != spool->persisted_seq || spool->unlink_count > 0;
    if (!data && !meta)
        return;
    now = uv_now(spool->loop);
    if (spool->io_error && now < spool->retry_at) {
        arm_timer(spool, spool->retry_at - now);
        return;
    }
    if (!spool_closing(spool)) {
        if (data) {
            age = now - spool->fill_since;
            uint64_t since = now - spool->commit_started_ms;
            bool small = spool->fill_bytes < SPOOL_BATCH_BYTES &&
                         spool->fill_waiters.len < SPOOL_BATCH_RECORDS;
            if (small && since < spool->opts.commit_gap_ms &&
                age < spool->opts.commit_interval_ms) {
                /* commit_gap: fewer, larger commits at a steady rate (one
                 * fdatasync per gap, not per message), never later than
                 * commit_interval after the first append. */
                uint64_t wait = spool->opts.commit_gap_ms - since;
                uint64_t left = spool->opts.commit_interval_ms - age;
                arm_timer(spool, wait < left ? wait : left);
                return;
            }
            if (!spool->batch_ready && age < spool->opts.commit_interval_ms && small) {
                /* Commit at the end of this loop turn (or after
                 * commit_interval at the latest, should the turn not end). */
                if (!spool->turn_end_active) {
                    spool->turn_end_active = true;
                    uv_check_start(&spool->turn_end, turn_end_cb);
                }
                arm_timer(spool, spool->opts.commit_interval_ms - age);
                return;
            }
        } else if (now - spool->cursor_written_ms < SPOOL_CURSOR_DELAY_MS) {
            arm_timer(spool, SPOOL_CURSOR_DELAY_MS - (now - spool->cursor_written_ms));
            return;
        }
    }
    start_commit(spool);
}

/* --- appending ------------------------------------------------------------------ */

static bool has_room(const struct spool *spool, uint64_t size)
{
    return spool->bytes + size <= spool->opts.max_bytes;
}

/* Drop whole expired segments at the head (max_age). */
static void expire_head(struct spool *spool)
{
    uint64_t now;

    if (!spool->opts.max_age_ms)
        return;
    now = realtime_ms();
    while (spool->head && spool->head != spool->tail && !spool->head->busy &&
           spool->head->last_time_ms + spool->opts.max_age_ms < now) {
        struct spool_seg *seg = spool->head;
        uint64_t lost = spool_seg_unacked(spool, seg);
        while (spool->out_len && spool->outs[spool->out_head].pos.seg == seg) {
            spool->out_head++;
            spool->out_len--;
        }
        if (seg->last_seq > spool->acked_seq)
            spool->acked_seq = seg->last_seq;
        spool->stats.depth -= lost;
        spool->stats.dropped_age += lost;
        if (lost)
            log_uplink(LOG_WARNING, spool->name,
                       "spool: dropped %" PRIu64 " record(s) older than max_age", lost);
        spool_seg_retire(spool, seg);
    }
}

/* Put one encoded record at the end. The caller checked room. */
static int append_record(struct spool *spool, const char *topic, size_t topic_len,
                         const void *payload, size_t len, int qos, bool retain)
{
    struct spool_seg *seg = spool->tail;
    size_t size = RECORD_HEADER_SIZE + topic_len + len;
    uint64_t now = realtime_ms();

    if (!seg || seg->damaged || (seg->records > 0 && seg->size + size > spool->segment_bytes)) {
        seg = spool_seg_new(spool->next_seq);
        if (!seg || spool_buf_reserve(&seg->fill, SEG_HEADER_SIZE + size) < 0) {
            if (seg)
                spool_seg_free(seg);
            return -ENOMEM;
        }
        record_file_header(seg->fill.data, SEG_MAGIC, seg->first_seq);
        seg->fill.len = SEG_HEADER_SIZE;
        seg->size = SEG_HEADER_SIZE;
        spool->bytes += SEG_HEADER_SIZE;
        spool->fill_bytes += SEG_HEADER_SIZE;
        spool_seg_link_tail(spool, seg);
        if (!spool->read.seg) {
            spool->read.seg = seg;
            spool->read.off = SEG_HEADER_SIZE;
        }
    } else if (spool_buf_reserve(&seg->fill, size) < 0) {
        return -ENOMEM;
    }
    if (spool->fill_bytes == 0)
        spool->fill_since = uv_now(spool->loop);
    record_encode(seg->fill.data + seg->fill.len, spool->next_seq, now,
                  (uint8_t)((qos & RECORD_FLAG_QOS_MASK) | (retain ? RECORD_FLAG_RETAIN : 0)),
                  topic, topic_len, payload, len);
    seg->fill.len += size;
    seg->size += size;
    if (seg->records == 0)
        seg->first_time_ms = now;
    seg->records++;
    seg->last_seq = spool->next_seq;
    seg->last_time_ms = now;
    spool->next_seq++;
    spool->bytes += size;
    spool->fill_bytes += size;
    spool->stats.depth++;
    spool->stats.appended++;
    if (!spool->read.seg) {
        spool->read.seg = seg;
        spool->read.off = seg->size - size;
    }
    return 0;
}

/* After room was made: admit blocked appends in order. */
static void admit_blocked(struct spool *spool)
{
    struct spool_blocked *b;

    while ((b = spool->blocked_head) != NULL && !spool->io_error) {
        size_t size = RECORD_HEADER_SIZE + b->topic_len + b->len;
        if (!has_room(spool, size))
            break;
        if (append_record(spool, (const char *)b->data, b->topic_len, b->data + b->topic_len,
                          b->len, b->qos, b->retain) < 0)
            break;
        spool->blocked_head = b->next;
        if (!b->next)
            spool->blocked_tail = NULL;
        spool->blocked_bytes -= size;
        spool->blocked_count--;
        if (spool->opts.durability == SPOOL_DURABLE) {
            if (waiters_push(&spool->fill_waiters, b->cb, b->arg, 0) < 0)
                defer(spool, b->cb, b->arg, -ENOMEM);
        } else {
            defer(spool, b->cb, b->arg, 0);
        }
        free(b);
    }
    spool->stats.blocked = spool->blocked_count;
    maybe_commit(spool);
}

int spool_append(struct spool *spool, const char *topic, size_t topic_len, const void *payload,
                 size_t len, int qos, bool retain, unsigned flags,
                 void (*done_cb)(void *arg, int status), void *arg)
{
    size_t size = RECORD_HEADER_SIZE + topic_len + len;
    struct spool_blocked *b;
    int rc;

    if (spool_closing(spool))
        return -ESHUTDOWN;
    if (qos < 0 || qos > 2 || topic_len == 0 || topic_len > 65535)
        return -EINVAL;
    if (len > RECORD_MAX_LEN - topic_len || size > spool->opts.max_bytes / 4)
        return -EMSGSIZE;
    if (spool->io_error)
        return spool->io_error;
    if (spool->blocked_head || !has_room(spool, size)) {
        expire_head(spool);
        spool_retire_acked(spool);
    }
    if (!spool->blocked_head && !has_room(spool, size) &&
        spool->opts.overflow == SPOOL_DROP_OLDEST) {
        while (!has_room(spool, size) && drop_head(spool, "spool full (max_bytes)"))
            ;
        /* Only the newest segment is left: accept a small overshoot. */
    } else if (spool->blocked_head || !has_room(spool, size)) {
        /* overflow: block. The append waits (its local client gets no
         * acknowledgement, so it stops sending); the waiting room itself is
         * bounded so memory stays bounded. */
        uint64_t room = spool->opts.max_bytes / 4 > 64u * 1024 * 1024 ? 64u * 1024 * 1024
                                                                      : spool->opts.max_bytes / 4;
        if ((flags & SPOOL_APPEND_NOWAIT) || spool->blocked_bytes + size > room)
            return -ENOBUFS;
        b = malloc(sizeof(*b) + topic_len + len);
        if (!b)
            return -ENOMEM;
        b->next = NULL;
        b->cb = done_cb;
        b->arg = arg;
        b->qos = qos;
        b->retain = retain;
        b->topic_len = topic_len;
        b->len = len;
        memcpy(b->data, topic, topic_len);
        if (len)
            memcpy(b->data + topic_len, payload, len);
        if (spool->blocked_tail)
            spool->blocked_tail->next = b;
        else
            spool->blocked_head = b;
        spool->blocked_tail = b;
        spool->blocked_bytes += size;
        if (spool->blocked_count++ == 0)
            log_uplink(LOG_WARNING, spool->name,
                       "spool full (%" PRIu64 " of max_bytes %" PRIu64 " bytes, overflow: block): "
                       "local publishes wait and are not acknowledged until the cloud takes "
                       "messages",
                       spool->bytes, spool->opts.max_bytes);
        spool->stats.blocked = spool->blocked_count;
        return SPOOL_PENDING;
    }
    rc = append_record(spool, topic, topic_len, payload, len, qos, retain);
    if (rc < 0)
        return rc;
    if (spool->opts.durability != SPOOL_DURABLE)
        return 0;
    if (waiters_push(&spool->fill_waiters, done_cb, arg, 0) < 0) {
        /* The record is in; only its notification is lost: report it as
         * failed so the local client re-sends (a duplicate, never a loss). */
        defer(spool, done_cb, arg, -ENOMEM);
        return SPOOL_PENDING;
    }
    maybe_commit(spool);
    return SPOOL_PENDING;
}

/* --- reading ------------------------------------------------------------------ */

/* Read up to @want bytes of @seg's file from @off into the read buffer. */
static int rb_fill(struct spool *spool, struct spool_seg *seg, uint64_t off, size_t want)
{
    size_t got = 0;

    if (want > seg->file_len - off)
        want = (size_t)(seg->file_len - off);
    spool->rb.len = 0;
    if (spool_buf_reserve(&spool->rb, want) < 0)
        return -ENOMEM;
    while (got < want) {
        ssize_t n = pread(spool->rb_fd, spool->rb.data + got, want - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    spool->rb.len = got;
    spool->rb_start = off;
    return 0;
}

/* Pointer to the record at @pos and its header. Returns 0, -EAGAIN at the
 * end of the segment, -EBADMSG for a damaged record (the reason in *why),
 * or an I/O errno. */
static int read_at(struct spool *spool, const struct spool_pos *pos, struct record *h,
                   const uint8_t **rec, const char **why)
{
    struct spool_seg *seg = pos->seg;
    uint64_t off = pos->off;
    const uint8_t *p;
    size_t avail;
    bool from_file = false;

    if (off >= seg->size)
        return -EAGAIN;
    if (off >= seg->file_len + seg->flush.len) {
        p = seg->fill.data + (off - seg->file_len - seg->flush.len);
        avail = (size_t)(seg->size - off);
    } else if (off >= seg->file_len) {
        p = seg->flush.data + (off - seg->file_len);
        avail = (size_t)(seg->file_len + seg->flush.len - off);
    } else {
        char path[4096];
        from_file = true;
        if (spool->rb_seg != seg) {
            spool_rb_drop(spool);
            spool_seg_path(spool, seg->first_seq, path, sizeof(path));
            spool->rb_fd = open(path, O_RDONLY | O_CLOEXEC);
            if (spool->rb_fd < 0)
                return -errno;
            spool->rb_seg = seg;
        }
        if (!(off >= spool->rb_start &&
              off + RECORD_HEADER_SIZE <= spool->rb_start + spool->rb.len)) {
            int rc = rb_fill(spool, seg, off, SPOOL_READ_CHUNK);
            if (rc < 0)
                return rc;
        }
        p = spool->rb.data + (off - spool->rb_start);
        avail = (size_t)(spool->rb_start + spool->rb.len - off);
        if (avail >= RECORD_HEADER_SIZE && record_header_parse(p, h) == NULL &&
            avail < RECORD_HEADER_SIZE + (size_t)h->len) {
            /* The record goes past the buffer: read it whole from @off. */
            size_t want = RECORD_HEADER_SIZE + (size_t)h->len;
            int rc = rb_fill(spool, seg, off, want > SPOOL_READ_CHUNK ? want : SPOOL_READ_CHUNK);
            if (rc < 0)
                return rc;
            p = spool->rb.data;
            avail = spool->rb.len;
        }
    }

    if (avail < RECORD_HEADER_SIZE) {
        *why = "short record header";
        return -EBADMSG;
    }
    *why = record_header_parse(p, h);
    if (*why)
        return -EBADMSG;
    if (avail < RECORD_HEADER_SIZE + (size_t)h->len) {
        *why = "short record";
        return -EBADMSG;
    }
    if (from_file && record_crc32c(0, p + 4, RECORD_HEADER_SIZE - 4 + (size_t)h->len) != h->crc) {
        *why = "CRC mismatch";
        return -EBADMSG;
    }
    *rec = p;
    return 0;
}

static int out_push(struct spool *spool, uint64_t seq, uint64_t count, struct spool_pos pos,
                    bool acked)
{
    if (spool->out_head + spool->out_len == spool->out_cap) {
        if (spool->out_head > 0) {
            memmove(spool->outs, spool->outs + spool->out_head,
                    spool->out_len * sizeof(*spool->outs));
            spool->out_head = 0;
        }
        if (spool->out_len == spool->out_cap) {
            size_t cap = spool->out_cap ? spool->out_cap * 2 : 128;
            struct spool_out *outs = realloc(spool->outs, cap * sizeof(*outs));
            if (!outs)
                return -ENOMEM;
            spool->outs = outs;
            spool->out_cap = cap;
        }
    }
    spool->outs[spool->out_head + spool->out_len++] =
        (struct spool_out){.seq = seq, .count = count, .pos = pos, .acked = acked};
    return 0;
}

/* Retire the acknowledged prefix of the out list. */
static void out_pop_acked(struct spool *spool)
{
    bool moved = false;

    while (spool->out_len && spool->outs[spool->out_head].acked) {
        struct spool_out *o = &spool->outs[spool->out_head];
        if (o->seq > spool->acked_seq)
            spool->acked_seq = o->seq;
        spool->stats.depth -= o->count;
        spool->stats.acked += o->count;
        spool->out_head++;
        spool->out_len--;
        moved = true;
    }
    if (spool->out_len == 0)
        spool->out_head = 0;
    if (moved) {
        /* Nothing handed out is pending: everything before the reader is acked. */
        spool_retire_acked(spool);
        admit_blocked(spool);
        maybe_commit(spool);
    }
}

/* A damaged record at @pos (a segment file's part) whose seq should be
 * @expect: read the rest of the file, find the next valid record, make the
 * range a hole and hand its records out as lost (an acknowledged out entry,
 * so the cursor moves over them). Returns 0, or a negative errno when the
 * file cannot be read (the reader stays). */
static int read_damaged(struct spool *spool, const struct spool_pos *pos, uint64_t expect,
                        const char *why)
{
    struct spool_seg *seg = pos->seg;
    size_t len = (size_t)(seg->file_len - pos->off), got = 0, found = 0;
    uint64_t to = seg->size, lost_last = seg->last_seq;
    uint8_t *data = malloc(len ? len : 1);
    struct record rec;
    int rc;

    if (!data)
        return -ENOMEM;
    spool_rb_drop(spool);
    char path[4096];
    spool_seg_path(spool, seg->first_seq, path, sizeof(path));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd >= 0 && got < len) {
        ssize_t n = pread(fd, data + got, len - got, (off_t)(pos->off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (fd >= 0)
        close(fd);
    if (got < len) {
        log_uplink(LOG_ERR, spool->name, "spool: cannot read %s: %s", path,
                   fd < 0 ? strerror(errno) : "short read");
        free(data);
        return -EIO;
    }
    if (record_resync(data, len, 0, expect - 1, &found, &rec)) {
        to = pos->off + found;
        lost_last = rec.seq - 1;
    } else if (seg->size > seg->file_len) {
        /* Written and still in memory: the records after the file's end. */
        struct spool_pos next = {.seg = seg, .off = seg->file_len};
        const uint8_t *p;
        const char *ignored;
        to = seg->file_len;
        if (read_at(spool, &next, &rec, &p, &ignored) == 0)
            lost_last = rec.seq - 1;
    }
    rc = spool_seg_damage(spool, seg, pos->off, to, data, expect, lost_last, why,
                          to < seg->size ? "reading continues at the next valid record"
                                         : "the rest of the segment is skipped",
                          true, true);
    free(data);
    if (rc < 0)
        return rc;
    spool->read.off = to;
    if (lost_last >= expect && out_push(spool, lost_last, lost_last - expect + 1, *pos, true) == 0)
        out_pop_acked(spool);
    return 0;
}

int spool_next(struct spool *spool, struct spool_record *out)
{
    struct record h;
    const uint8_t *rec;
    const char *why = NULL;
    uint64_t now = 0;
    int rc;

    for (unsigned rounds = 0; rounds < 100000; rounds++) {
        struct spool_pos pos = spool->read;
        if (!pos.seg)
            return -EAGAIN;
        if (pos.seg->hole_count)
            spool->read.off = pos.off = spool_seg_skip_hole(pos.seg, pos.off);
        rc = read_at(spool, &pos, &h, &rec, &why);
        if (rc == -EAGAIN) {
            if (!pos.seg->next)
                return -EAGAIN;
            spool->read.seg = pos.seg->next;
            spool->read.off = SEG_HEADER_SIZE;
            continue;
        }
        if (rc == -EBADMSG) {
            /* Damage found after start-up (bit rot, someone else's write):
             * never send it; skip to the next valid record. */
            uint64_t expect = pos.seg->first_seq;
            if (spool->acked_seq + 1 > expect)
                expect = spool->acked_seq + 1;
            if (spool->out_len &&
                spool->outs[spool->out_head + spool->out_len - 1].seq + 1 > expect)
                expect = spool->outs[spool->out_head + spool->out_len - 1].seq + 1;
            if (read_damaged(spool, &pos, expect, why) < 0)
                return -EAGAIN;
            continue;
        }
        if (rc < 0) {
            log_uplink(LOG_ERR, spool->name, "spool: cannot read segment %016" PRIx64 ": %s",
                       pos.seg->first_seq, strerror(-rc));
            return -EAGAIN;
        }
        spool->read.off += RECORD_HEADER_SIZE + h.len;
        if (spool->opts.max_age_ms) {
            if (!now)
                now = realtime_ms();
            if (h.time_ms + spool->opts.max_age_ms < now) {
                spool->stats.dropped_age++;
                if (out_push(spool, h.seq, 1, pos, true) == 0)
                    out_pop_acked(spool);
                continue;
            }
        }
        if (out_push(spool, h.seq, 1, pos, false) < 0) {
            spool->read = pos;
            return -EAGAIN;
        }
        out->seq = h.seq;
        out->time_ms = h.time_ms;
        out->qos = h.flags & RECORD_FLAG_QOS_MASK;
        out->retain = (h.flags & RECORD_FLAG_RETAIN) != 0;
        out->topic = (const char *)rec + RECORD_HEADER_SIZE;
        out->topic_len = h.topic_len;
        out->payload = rec + RECORD_HEADER_SIZE + h.topic_len;
        out->len = h.len - h.topic_len;
        return 0;
    }
    return -EAGAIN;
}

int spool_unnext(struct spool *spool)
{
    struct spool_out *last;

    /* Only a record spool_next() handed out last and nobody acknowledged:
     * the tail of the out list. An acknowledged tail is a skipped record
     * (max_age, damage) or an early PUBACK, and stays skipped. */
    if (spool->out_len == 0)
        return -ENOENT;
    last = &spool->outs[spool->out_head + spool->out_len - 1];
    if (last->acked || last->count != 1)
        return -ENOENT;
    spool->read = last->pos;
    if (--spool->out_len == 0)
        spool->out_head = 0;
    return 0;
}

void spool_ack_range(struct spool *spool, uint64_t first, uint64_t last)
{
    size_t lo = 0, hi = spool->out_len;
    bool hit = false;

    /* The out list is sorted by seq: binary search for the first entry in
     * range, then walk (a batch is a run of consecutive entries). */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (spool->outs[spool->out_head + mid].seq < first)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (; lo < spool->out_len && spool->outs[spool->out_head + lo].seq <= last; lo++) {
        spool->outs[spool->out_head + lo].acked = true;
        hit = true;
    }
    if (hit)
        out_pop_acked(spool);
}

void spool_ack(struct spool *spool, uint64_t seq)
{
    spool_ack_range(spool, seq, seq);
}

void spool_rewind(struct spool *spool)
{
    if (spool->out_len == 0)
        return;
    spool->read = spool->outs[spool->out_head].pos;
    spool->out_len = 0;
    spool->out_head = 0;
}

/* --- life cycle ------------------------------------------------------------------ */

static void options_apply(struct spool *spool, const struct spool_options *opts)
{
    spool->opts.overflow = opts->overflow;
    spool->opts.max_bytes = opts->max_bytes ? opts->max_bytes : SPOOL_DEFAULT_MAX_BYTES;
    spool->opts.max_age_ms = opts->max_age_ms;
    spool->opts.commit_interval_ms = opts->commit_interval_ms;
    spool->opts.commit_gap_ms = opts->commit_gap_ms;
}

int spool_open(uv_loop_t *loop, const struct spool_options *opts, struct spool **out)
{
    struct spool *spool;
    int rc;

    *out = NULL;
    spool = calloc(1, sizeof(*spool));
    if (!spool)
        return -ENOMEM;
    spool->loop = loop;
    sm_init(&spool->sm, &spool_sm, SPOOL_OPEN);
    spool->cursor_fd = -1;
    spool->rb_fd = -1;
    spool->next_seq = 1;
    spool->opts.durability = opts->durability;
    options_apply(spool, opts);
    spool->name = strdup(opts->name ? opts->name : "?");
    if (opts->damaged_dir && !(spool->damaged_dir = strdup(opts->damaged_dir))) {
        rc = -ENOMEM;
        goto err_free;
    }
    spool->dir = strdup(opts->dir ? opts->dir : "");
    if (!spool->name || !spool->dir) {
        rc = -ENOMEM;
        goto err_free;
    }
    spool->opts.name = spool->name;
    spool->opts.dir = spool->dir;
    if (opts->durability == SPOOL_DURABLE && !spool->dir[0]) {
        rc = -EINVAL;
        goto err_free;
    }
    spool->segment_bytes = opts->segment_bytes ? opts->segment_bytes : spool->opts.max_bytes / 8;
    if (!opts->segment_bytes) {
        if (spool->segment_bytes < SEG_MIN_BYTES)
            spool->segment_bytes = SEG_MIN_BYTES;
        if (spool->segment_bytes > SEG_MAX_BYTES)
            spool->segment_bytes = SEG_MAX_BYTES;
    }
    if (opts->durability == SPOOL_DURABLE) {
        rc = spool_recover(spool);
        if (rc < 0)
            goto err_free;
    }
    /* uv_timer_init() cannot fail (it only fills in the handle). */
    uv_timer_init(loop, &spool->commit_timer);
    uv_check_init(loop, &spool->turn_end);
    spool->turn_end.data = spool;
    uv_timer_init(loop, &spool->deferred_timer);
    spool->handles = 3;
    spool->commit_timer.data = spool;
    spool->deferred_timer.data = spool;
    spool->stats.durable = opts->durability == SPOOL_DURABLE;
    *out = spool;
    return 0;

err_free:
    spool_free(spool);
    return rc;
}

void spool_set_limits(struct spool *spool, const struct spool_options *opts)
{
    options_apply(spool, opts);
    admit_blocked(spool);
}

bool spool_full(const struct spool *spool, size_t bytes)
{
    return spool->blocked_head || !has_room(spool, RECORD_HEADER_SIZE + bytes);
}

void spool_get_stats(const struct spool *spool, struct spool_stats *out)
{
    *out = spool->stats;
    out->bytes = spool->bytes;
    out->io_error = spool->io_error;
    out->oldest_ms = 0;
    for (const struct spool_seg *seg = spool->head; seg; seg = seg->next) {
        if (seg->last_seq > spool->acked_seq && seg->records) {
            out->oldest_ms = seg->first_time_ms; /* segment granularity */
            break;
        }
    }
}

static void handle_closed_cb(uv_handle_t *handle)
{
    struct spool *spool = handle->data;

    if (--spool->handles == 0 && spool->done_cb)
        spool->done_cb(spool->done_arg);
}

static void spool_check_closed(struct spool *spool)
{
    if (sm_state(&spool->sm) != SPOOL_CLOSING || spool->commit)
        return;
    if (spool->opts.durability == SPOOL_DURABLE && !spool->io_error &&
        (spool->fill_bytes || spool->acked_seq != spool->persisted_seq || spool->unlink_count)) {
        maybe_commit(spool);
        if (spool->commit)
            return;
    }
    /* Appends whose batch could not be written (I/O error) are answered. */
    for (size_t i = 0; i < spool->fill_waiters.len; i++)
        defer(spool, spool->fill_waiters.items[i].cb, spool->fill_waiters.items[i].arg,
              spool->io_error ? spool->io_error : -ECANCELED);
    spool->fill_waiters.len = 0;
    if (spool->deferred.len)
        return; /* deferred_cb() comes back here once they have run */
    sm_move(&spool->sm, SPOOL_CLOSED, "the last commit is done");
    uv_timer_stop(&spool->commit_timer);
    uv_check_stop(&spool->turn_end);
    uv_close((uv_handle_t *)&spool->turn_end, handle_closed_cb);
    uv_timer_stop(&spool->deferred_timer);
    uv_close((uv_handle_t *)&spool->commit_timer, handle_closed_cb);
    uv_close((uv_handle_t *)&spool->deferred_timer, handle_closed_cb);
}

void spool_close(struct spool *spool, void (*done_cb)(void *arg), void *arg)
{
    struct spool_blocked *b;

    spool->done_cb = done_cb;
    spool->done_arg = arg;
    if (sm_state(&spool->sm) == SPOOL_OPEN)
        sm_move(&spool->sm, SPOOL_CLOSING, "closing");
    while ((b = spool->blocked_head) != NULL) {
        spool->blocked_head = b->next;
        defer(spool, b->cb, b->arg, -ECANCELED);
        free(b);
    }
    spool->blocked_tail = NULL;
    spool->blocked_bytes = spool->blocked_count = 0;
    spool->stats.blocked = 0;
    spool_check_closed(spool);
}

void spool_free(struct spool *spool)
{
    struct spool_seg *seg, *next;
    struct spool_blocked *b, *bn;

    if (!spool)
        return;
    if (spool->commit) {
        log_err("spool %s: BUG: spool_free() while a commit runs; leaking it", spool->name);
        return;
    }
    for (seg = spool->head; seg; seg = next) {
        next = seg->next;
        spool_seg_free(seg);
    }
    for (b = spool->blocked_head; b; b = bn) {
        bn = b->next;
        free(b);
    }
    spool_rb_drop(spool);
    spool_buf_free(&spool->rb);
    if (spool->cursor_fd >= 0)
        close(spool->cursor_fd);
    for (size_t i = 0; i < spool->unlink_count; i++)
        free(spool->unlinks[i]);
    free(spool->unlinks);
    free(spool->outs);
    free(spool->fill_waiters.items);
    free(spool->deferred.items);
    free(spool->name);
    free(spool->dir);
    free(spool->damaged_dir);
    free(spool);
}
