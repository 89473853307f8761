/* local_retain.c - the local server's retained messages (MQTT 3.1.1
 * §3.3.1.3): the set in memory and the retained store on disk. It calls no
 * other local_*.c file (local_int.h lists the layers).
 */
#include "local_int.h"

#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "record.h"

/* The retained store: file in gateway.state_dir, how long changes are
 * batched before one write, and the largest file loaded at start-up. */
#define RETAINED_FILE     "retained.db"
#define RETAINED_MAGIC    "UPLKRTN2"
#define RETAINED_FLUSH_MS 200
#define RETAINED_FILE_MAX (1024u * 1024 * 1024)

/* --- retained messages --------------------------------------------------------- */

static struct retained **retained_find(struct local *local, const char *topic, size_t len)
{
    struct retained **pp;

    for (pp = &local->retained; *pp; pp = &(*pp)->next)
        if ((*pp)->topic_len == len && memcmp((*pp)->topic, topic, len) == 0)
            return pp;
    return pp; /* the terminating NULL link, for insertion */
}

/* §3.3.1.3: a retained PUBLISH replaces the topic's retained message; an
 * empty payload deletes it (§3.3.1-10/11). */
void retained_store(struct local *local, const char *topic, size_t topic_len, const void *payload,
                    size_t len, uint8_t qos)
{
    struct retained **pp = retained_find(local, topic, topic_len), *r = *pp;
    uint8_t *copy = NULL;

    if (len == 0) {
        if (r) {
            *pp = r->next;
            free(r->payload);
            free(r);
            local->retained_count--;
            retained_changed(local);
        }
        return;
    }
    copy = malloc(len);
    if (!copy) {
        log_warn("cannot retain message on '%.*s': out of memory", (int)topic_len, topic);
        return;
    }
    memcpy(copy, payload, len);
    if (!r) {
        if (local->retained_count >= LOCAL_RETAINED_MAX) {
            log_warn("not retaining message on '%.*s': already %d retained topics", (int)topic_len,
                     topic, LOCAL_RETAINED_MAX);
            free(copy);
            return;
        }
        r = malloc(sizeof(*r) + topic_len + 1);
        if (!r) {
            log_warn("cannot retain message on '%.*s': out of memory", (int)topic_len, topic);
            free(copy);
            return;
        }
        memcpy(r->topic, topic, topic_len);
        r->topic[topic_len] = '\0';
        r->topic_len = topic_len;
        r->payload = NULL;
        r->next = NULL;
        *pp = r;
        local->retained_count++;
    }
    free(r->payload);
    r->payload = copy;
    r->len = len;
    r->qos = qos;
    retained_changed(local);
}

/* --- retained store ---------------------------------------------------------------
 *
 * Retained messages survive a daemon restart in <state_dir>/retained.db, a
 * snapshot of the whole set (the set is bounded by LOCAL_RETAINED_MAX), in
 * the record framing of the spool (record.h):
 *
 *   file header: "UPLKRTN2" | count (u64) | CRC-32C | 0
 *   count x record: seq 1..count, time 0, flags QoS | retain, topic, payload
 *
 * so one damaged retained message loses only itself: the reader skips to
 * the next valid record, logs the byte range, and keeps a copy of the bad
 * bytes in <state_dir>/damaged/. Changes are batched for RETAINED_FLUSH_MS,
 * then the snapshot is serialised on the loop thread and written on the
 * threadpool (never blocking the loop): temp file, fsync, rename over the
 * old file, fsync of the directory, so a crash leaves either the old or the
 * new file. At shutdown pending changes are written before local_close()
 * completes. The first format ("UPLKRTN1" | count u32 | records: topic
 * length u16, QoS u8, payload length u32, topic, payload | CRC-32 of all,
 * big-endian) is read once on upgrade and rewritten in the new one. A file
 * that is not a store at all is reported, renamed to retained.db.corrupt
 * and skipped; it never stops the daemon. */

struct retained_write {
    uv_work_t req;
    struct local *local;
    char *path; /* <state_dir>/retained.db */
    uint8_t *data;
    size_t len;
    int err;          /* errno of the failed step, 0 on success */
    const char *step; /* which step failed, for the log */
};

/* CRC-32 (IEEE) of the first format, read on upgrade only. */
static uint32_t legacy_crc32(uint32_t crc, const uint8_t *p, size_t len)
{
    static uint32_t table[256];

    if (!table[1]) /* built once, on the loop thread (the worker never calls this) */
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    while (len--)
        crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint32_t get_be(const uint8_t *p, int bytes)
{
    uint32_t value = 0;

    for (int i = 0; i < bytes; i++)
        value = value << 8 | p[i];
    return value;
}

static char *retained_path(const struct local *local, const char *suffix)
{
    char *path;

    if (asprintf(&path, "%s/%s%s", local->conf->state_dir, RETAINED_FILE, suffix) < 0)
        return NULL;
    return path;
}

/* Threadpool: write, fsync, rename, fsync the directory. */
static void retained_write_work_cb(uv_work_t *req)
{
    struct retained_write *w = container_of(req, struct retained_write, req);
    char *tmp = NULL, *dir = NULL, *slash;
    size_t off = 0;
    int fd;

    if (asprintf(&tmp, "%s.tmp", w->path) < 0) {
        tmp = NULL;
        w->err = ENOMEM, w->step = "allocating";
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        w->err = errno, w->step = "creating the temporary file";
        goto out;
    }
    while (off < w->len) {
        ssize_t n = write(fd, w->data + off, w->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            w->err = errno, w->step = "writing";
            break;
        }
        off += (size_t)n;
    }
    if (!w->err && fsync(fd) < 0)
        w->err = errno, w->step = "fsync";
    close(fd);
    if (!w->err && rename(tmp, w->path) < 0)
        w->err = errno, w->step = "renaming the temporary file";
    if (w->err) {
        unlink(tmp);
        goto out;
    }
    /* The rename is durable only once the directory is synced. */
    dir = strdup(w->path);
    slash = dir ? strrchr(dir, '/') : NULL;
    if (slash) {
        *slash = '\0';
        fd = open(*dir ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
            if (fsync(fd) < 0)
                w->err = errno, w->step = "fsync of the directory";
            close(fd);
        }
    }
out:
    free(dir);
    free(tmp);
}

static void retained_write_done_cb(uv_work_t *req, int status)
{
    struct retained_write *w = container_of(req, struct retained_write, req);
    struct local *local = w->local;

    local->retained_writing = false;
    if (status < 0)
        log_warn("retained store %s: write cancelled: %s", w->path, uv_strerror(status));
    else if (w->err)
        log_warn("retained store %s: %s failed: %s; retained messages changed since the last "
                 "successful write would be lost by a restart (check gateway.state_dir)",
                 w->path, w->step, strerror(w->err));
    else
        log_debug("retained store %s: wrote %zu bytes", w->path, w->len);
    free(w->path);
    free(w->data);
    free(w);
    if (local->retained_dirty) {
        if (local->closing)
            retained_write_start(local);
        else
            retained_changed(local); /* changed while writing: one more batch */
    }
    local_live_put(local);
}

/* Serialise the current set (loop thread) and hand it to the threadpool. */
void retained_write_start(struct local *local)
{
    struct retained_write *w;
    size_t len = RECORD_FILE_HEADER_SIZE;
    uint8_t *p;
    uint64_t count = 0;
    int rc;

    if (local->retained_writing || !local->retained_dirty || !local->conf->state_dir)
        return;
    for (const struct retained *r = local->retained; r; r = r->next)
        len += record_size(r->topic_len, r->len);
    w = calloc(1, sizeof(*w));
    if (!w || !(w->data = malloc(len)) || !(w->path = retained_path(local, ""))) {
        log_warn("retained store: out of memory; will retry");
        if (w)
            free(w->data);
        free(w);
        return; /* still dirty: the next change or shutdown retries */
    }
    p = w->data + RECORD_FILE_HEADER_SIZE;
    for (const struct retained *r = local->retained; r; r = r->next) {
        record_encode(p, ++count, 0, (uint8_t)(r->qos | RECORD_FLAG_RETAIN), r->topic, r->topic_len,
                      r->payload, r->len);
        p += record_size(r->topic_len, r->len);
    }
    record_file_header(w->data, RETAINED_MAGIC, count);
    w->len = len;
    w->local = local;
    rc = uv_queue_work(local->loop, &w->req, retained_write_work_cb, retained_write_done_cb);
    if (rc < 0) {
        log_warn("retained store %s: cannot queue the write: %s", w->path, uv_strerror(rc));
        free(w->path);
        free(w->data);
        free(w);
        return;
    }
    local->retained_dirty = false;
    local->retained_writing = true;
    local->live++; /* local_close() completes only after this write */
}

static void retained_timer_cb(uv_timer_t *timer)
{
    retained_write_start(container_of(timer, struct local, retained_timer));
}

/* The set changed: write it within RETAINED_FLUSH_MS (one write per batch). */
void retained_changed(struct local *local)
{
    local->retained_dirty = true;
    if (!local->conf->state_dir || !local->retained_loaded || local->closing ||
        local->retained_writing || uv_is_active((uv_handle_t *)&local->retained_timer))
        return;
    uv_timer_start(&local->retained_timer, retained_timer_cb, RETAINED_FLUSH_MS, 0);
}

/* The first format (upgrade): all or nothing; -EINVAL names the problem. */
static int retained_parse_v1(struct local *local, const uint8_t *data, size_t len, const char **why)
{
    size_t off = 12;
    uint32_t count;

    if (len < 16 || memcmp(data, "UPLKRTN1", 8) != 0)
        return *why = "not a retained store (bad header)", -EINVAL;
    if (get_be(data + len - 4, 4) != legacy_crc32(0, data, len - 4))
        return *why = "checksum mismatch (torn or damaged file)", -EINVAL;
    count = get_be(data + 8, 4);
    if (count > LOCAL_RETAINED_MAX)
        return *why = "more records than the server keeps", -EINVAL;
    for (uint32_t i = 0; i < count; i++) {
        size_t topic_len, payload_len;
        const char *topic;
        uint8_t qos;

        if (len - 4 - off < 7)
            return *why = "truncated record", -EINVAL;
        topic_len = get_be(data + off, 2);
        qos = data[off + 2];
        payload_len = get_be(data + off + 3, 4);
        off += 7;
        if (topic_len > len - 4 - off || payload_len > len - 4 - off - topic_len)
            return *why = "record longer than the file", -EINVAL;
        topic = (const char *)data + off;
        if (qos > 2 || payload_len == 0 || topic_name_check(topic, topic_len, NULL) < 0)
            return *why = "invalid record (QoS, empty payload or topic)", -EINVAL;
        retained_store(local, topic, topic_len, data + off + topic_len, payload_len, qos);
        off += topic_len + payload_len;
    }
    if (off != len - 4)
        return *why = "trailing bytes after the last record", -EINVAL;
    return 0;
}

/* Damaged bytes [from, to) of the store with @lost messages (-1: unknown)
 * in them: log and keep a copy for the operator. */
static void retained_damage(struct local *local, const char *path, const uint8_t *data, size_t from,
                            size_t to, long long lost, const char *why)
{
    char dir[4096], copy[4400];
    int rc = -ENAMETOOLONG;

    copy[0] = '\0';
    if (snprintf(dir, sizeof(dir), "%s/%s", local->conf->state_dir, RECORD_DAMAGED_DIR) <
        (int)sizeof(dir))
        rc = record_keep_damaged(dir, RETAINED_FILE, from, data + from, to - from, copy,
                                 sizeof(copy));
    if (rc < 0)
        copy[0] = '\0';
    if (lost >= 0)
        log_warn("retained store %s is damaged at bytes %zu..%zu (%zu byte(s), %s): %lld retained "
                 "message(s) lost, the others are kept%s%s",
                 path, from, to - 1, to - from, why, lost,
                 copy[0] ? "; damaged bytes kept in " : "", copy);
    else
        log_warn("retained store %s is damaged at bytes %zu..%zu (%zu byte(s), %s): the messages "
                 "in them are lost, the others are kept%s%s",
                 path, from, to - 1, to - from, why, copy[0] ? "; damaged bytes kept in " : "",
                 copy);
}

/* Load the file into an empty set. Damage loses only the records it covers
 * (*@rewrite: write the good set back). -EINVAL: not a store at all. */
static int retained_parse(struct local *local, const char *path, const uint8_t *data, size_t len,
                          bool *rewrite, const char **why)
{
    struct record_scan scan;
    struct record rec;
    enum record_scan_result result;
    uint64_t count = 0;
    size_t loaded = 0;
    bool header_ok;

    *rewrite = false;
    if (len >= 8 && memcmp(data, "UPLKRTN1", 8) == 0) {
        *rewrite = true; /* the first format: upgrade */
        return retained_parse_v1(local, data, len, why);
    }
    if (len < RECORD_FILE_HEADER_SIZE)
        return *why = "not a retained store (bad header)", -EINVAL;
    header_ok = record_file_header_ok(data, len, RETAINED_MAGIC, &count);
    record_scan_init(&scan, data, len, RECORD_FILE_HEADER_SIZE, 1);
    while ((result = record_scan_next(&scan, &rec)) != RECORD_SCAN_END) {
        if (result == RECORD_SCAN_TORN) {
            retained_damage(local, path, data, scan.bad_from, scan.bad_to,
                            header_ok && count > scan.last_seq ? (long long)(count - scan.last_seq)
                                                               : -1,
                            scan.why);
            *rewrite = true;
            break;
        }
        if (result == RECORD_SCAN_DAMAGED) {
            retained_damage(local, path, data, scan.bad_from, scan.bad_to,
                            (long long)(scan.lost_last - scan.lost_first + 1), scan.why);
            *rewrite = true;
        }
        if (rec.payload_len == 0 ||
            topic_name_check((const char *)rec.topic, rec.topic_len, NULL) < 0) {
            log_warn("retained store %s: skipping an invalid record (seq %" PRIu64
                     ": empty payload or bad topic)",
                     path, rec.seq);
            *rewrite = true;
            continue;
        }
        retained_store(local, (const char *)rec.topic, rec.topic_len, rec.payload, rec.payload_len,
                       rec.flags & RECORD_FLAG_QOS_MASK);
        loaded++;
    }
    if (!header_ok) {
        if (loaded == 0)
            return *why = "not a retained store (bad header)", -EINVAL;
        retained_damage(local, path, data, 0, RECORD_FILE_HEADER_SIZE, 0, "damaged file header");
        *rewrite = true;
    }
    return 0;
}

/* Start-up, before the listeners bind: load <state_dir>/retained.db. A bad
 * file is reported and moved aside; the server starts without it. */
bool retained_load(struct local *local)
{
    bool rewrite = false;
    char *path, *data = NULL;
    const char *why = NULL;
    size_t len = 0;
    int rc;

    if (!local->conf->state_dir)
        return false;
    path = retained_path(local, "");
    if (!path)
        return false;
    rc = util_read_file(path, RETAINED_FILE_MAX, &data, &len);
    if (rc == -ENOENT) {
        free(path);
        return false;
    }
    if (rc < 0) {
        log_err("retained store %s: cannot read: %s; starting without retained messages", path,
                strerror(-rc));
    } else if (retained_parse(local, path, (const uint8_t *)data, len, &rewrite, &why) < 0) {
        char *aside = retained_path(local, ".corrupt");

        log_err("retained store %s is corrupt: %s; starting without retained messages and "
                "keeping the file as %s for inspection",
                path, why, aside ? aside : "(out of memory)");
        if (aside && rename(path, aside) < 0)
            log_warn("retained store: cannot rename %s: %s", path, strerror(errno));
        free(aside);
        /* Drop whatever was loaded before the bad record: all or nothing. */
        while (local->retained) {
            struct retained *r = local->retained;
            local->retained = r->next;
            free(r->payload);
            free(r);
        }
        local->retained_count = 0;
        rewrite = false;
    } else {
        log_info("retained store %s: loaded %zu retained messages", path, local->retained_count);
    }
    local->retained_dirty = false;
    free(data);
    free(path);
    return rewrite;
}
