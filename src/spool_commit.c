/* spool_commit.c - the spool's group commit (spool_int.h): appended records
 * are written and fdatasync'ed on the threadpool in batches, the cursor
 * after them, and the waiting acknowledgements are released when a batch
 * is on disk.
 */
#include "spool_int.h"

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
            spool_drop_head(spool, "disk full")) {
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
        spool_admit_blocked(spool);
    }
    spool_maybe_commit(spool);
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
    spool_maybe_commit(spool);
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
    spool_maybe_commit(spool);
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
        (c->seg_count == 0 || spool->closing ||
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

void spool_maybe_commit(struct spool *spool)
{
    uint64_t now, age;

    if (spool->opts.durability != SPOOL_DURABLE || spool->commit || spool->closed)
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
    if (!spool->closing) {
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
