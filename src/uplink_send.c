/* uplink_send.c - what an online uplink sends (uplink_int.h): records from
 * the spool within max_inflight and the rate, runs of them joined where the
 * profile allows, control messages ahead of the spool, and the
 * subscriptions after CONNACK.
 */
#include "uplink_int.h"

/* --- sending --------------------------------------------------------------- */

/* Take a token for one message of @bytes (0: the size is not known yet);
 * false when the rate limit says wait. The sender tries again on the next
 * event: a PUBACK, a new message, or the 1 s tick. */
static bool uplink_rate_take(struct uplink *uplink, size_t bytes)
{
    const struct conf_rate *rate = &uplink->conf->rate;
    uint64_t now = uv_now(uplink->loop);
    double elapsed = (double)(now - uplink->tokens_at) / 1000.0;

    if (!rate->max_msgs_per_s && !rate->max_bytes_per_s)
        return true;
    uplink->tokens_at = now;
    /* A bucket holds at most one second's worth, so a burst after a quiet
     * spell stays within a per-second quota. */
    if (rate->max_msgs_per_s) {
        uplink->msg_tokens += elapsed * rate->max_msgs_per_s;
        if (uplink->msg_tokens > rate->max_msgs_per_s)
            uplink->msg_tokens = rate->max_msgs_per_s;
        if (uplink->msg_tokens < 1)
            return false;
    }
    if (rate->max_bytes_per_s) {
        uplink->byte_tokens += elapsed * (double)rate->max_bytes_per_s;
        if (uplink->byte_tokens > (double)rate->max_bytes_per_s)
            uplink->byte_tokens = (double)rate->max_bytes_per_s;
        /* Sent on credit: the bucket may go negative by one message, so a
         * message larger than the bucket still goes out eventually. */
        if (uplink->byte_tokens <= 0)
            return false;
    }
    if (rate->max_msgs_per_s)
        uplink->msg_tokens -= 1;
    if (rate->max_bytes_per_s)
        uplink->byte_tokens -= (double)bytes;
    return true;
}

/* Size of a whole PUBLISH packet (MQTT 3.1.1 §3.3): fixed header byte,
 * Remaining Length (1-4 bytes, §2.2.3), topic name with its 2-byte length
 * (§3.3.2.1), packet identifier for QoS > 0 (§3.3.2.2), payload. */
static size_t publish_packet_size(size_t topic_len, size_t payload_len, int qos)
{
    size_t remaining = 2 + topic_len + (qos > 0 ? 2 : 0) + payload_len;
    size_t width = remaining < 128 ? 1 : remaining < 16384 ? 2 : remaining < 2097152 ? 3 : 4;

    return 1 + width + remaining;
}

/* The publish that starts with @first (just taken from the spool; its topic
 * is in topic_buf) may carry the records queued right behind it when the
 * profile allows (profile.batch_separator_cb): consecutive records with the same
 * topic, QoS and retain flag, payloads joined by its separator, while the
 * whole packet stays within its limit. Only what is already queued is
 * joined: a lone record goes out at once. A batch is a run of consecutive
 * records, so the spool's order (and each topic's) is kept, and the
 * look-ahead holds one record at a time (spool_unnext() gives back the one
 * that does not fit). On return *@payload and *@len are what to send and
 * *@last_seq the last record taken. Returns the number of records taken. */
static size_t uplink_batch_take(struct uplink *uplink, const struct spool_record *first, int qos,
                                const void **payload, size_t *len, uint64_t *last_seq)
{
    struct spool_record next;
    const char *sep;
    size_t sep_len, max_packet = 0, total, count = 1;

    *payload = first->payload;
    *len = first->len;
    *last_seq = first->seq;
    sep = uplink_ask_batch(uplink, uplink->topic_buf, &max_packet);
    if (!sep)
        return 1;
    if (!max_packet || max_packet > UPLINK_BATCH_MAX_BYTES)
        max_packet = UPLINK_BATCH_MAX_BYTES;
    sep_len = strlen(sep);
    /* Not even one more byte would fit: send it as it is (a record over
     * the limit was not made by the profile, which refuses those; it goes
     * alone, as without batching). */
    if (publish_packet_size(first->topic_len, first->len + sep_len + 1, qos) > max_packet)
        return 1;
    if (uplink->batch_cap < max_packet) {
        char *buf = realloc(uplink->batch_buf, max_packet);
        if (!buf)
            return 1; /* unbatched still works */
        uplink->batch_buf = buf;
        uplink->batch_cap = max_packet;
    }
    /* Copy now: @first's pointers die with the next call into the spool. */
    memcpy(uplink->batch_buf, first->payload, first->len);
    total = first->len;
    while (count < UPLINK_BATCH_MAX_RECORDS && spool_next(uplink->spool, &next) == 0) {
        if (next.topic_len != first->topic_len ||
            memcmp(next.topic, uplink->topic_buf, next.topic_len) != 0 ||
            (next.qos ? 1 : 0) != qos || next.retain != first->retain ||
            publish_packet_size(next.topic_len, total + sep_len + next.len, qos) > max_packet) {
            /* Just handed out, so it can be given back (spool.h). */
            if (spool_unnext(uplink->spool) < 0)
                log_uplink(LOG_ERR, uplink->name,
                           "BUG: spool record %" PRIu64 " could not be given back; it is sent "
                           "after the next reconnect",
                           next.seq);
            break;
        }
        memcpy(uplink->batch_buf + total, sep, sep_len);
        memcpy(uplink->batch_buf + total + sep_len, next.payload, next.len);
        total += sep_len + next.len;
        *last_seq = next.seq;
        count++;
    }
    *payload = uplink->batch_buf;
    *len = total;
    return count;
}

/* Hand spooled records to libmosquitto, in order, within the window and the
 * rate limit (one token per PUBLISH: that is what the cloud counts). */
/* TCP_CORK on (@on) or off the connection's socket; off sends what it held
 * at once. Returns whether it is corked now. Only a cost, never a
 * correctness matter: a failure just leaves the socket as it was. */
static bool conn_cork(struct uplink_conn *conn, bool on)
{
    int fd = mosquitto_socket(conn->mosq), value = on;

    if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_CORK, &value, sizeof(value)) < 0)
        return false;
    return on;
}

void uplink_conn_flush(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct spool_record rec;
    const void *payload;
    size_t len, records;
    uint64_t last_seq;
    int rc, mid = 0, err, qos;
    unsigned published = 0;
    bool corked = false;

    while (uplink->inflight < conn->window && !conn->failed) {
        if (!uplink_rate_take(uplink, 0))
            break;
        if (spool_next(uplink->spool, &rec) < 0) {
            if (uplink->conf->rate.max_msgs_per_s)
                uplink->msg_tokens += 1; /* nothing sent: give the token back */
            break;
        }
        memcpy(uplink->topic_buf, rec.topic, rec.topic_len);
        uplink->topic_buf[rec.topic_len] = '\0';
        /* Spooled QoS 1 and 2 go up at QoS 1: at least once is what holds
         * across reconnects anyway (see the top of this file). */
        qos = rec.qos ? 1 : 0;
        records = uplink_batch_take(uplink, &rec, qos, &payload, &len, &last_seq);
        if (uplink->conf->rate.max_bytes_per_s)
            uplink->byte_tokens -= (double)(len + rec.topic_len);
        /* libmosquitto writes every PUBLISH with its own SSL_write(); when
         * several go out together, cork the socket so they leave in a few
         * segments and the broker reads them in one go (conn_cork). */
        if (++published == 2)
            corked = conn_cork(conn, true);
        uplink->in_io = true;
        errno = 0;
        rc = mosquitto_publish(conn->mosq, &mid, uplink->topic_buf, (int)len, payload, qos,
                               rec.retain);
        err = errno;
        uplink->in_io = false;
        switch (rc) {
        case MOSQ_ERR_SUCCESS:
            if (qos == 0) {
                uplink->stats.published += records;
                uplink->stats.publishes++;
                uplink->out_count += records;
                spool_ack_range(uplink->spool, rec.seq, last_seq);
            } else {
                struct uplink_inflight *e =
                    &uplink->inflight_tab[(uplink->inflight_head + uplink->inflight) %
                                          uplink->inflight_cap];
                e->mid = mid;
                e->first_seq = rec.seq;
                e->last_seq = last_seq;
                e->records = records;
                uplink->inflight++;
                uplink->inflight_records += records;
            }
            break;
        case MOSQ_ERR_INVAL:
        case MOSQ_ERR_PAYLOAD_SIZE:
        case MOSQ_ERR_MALFORMED_UTF8:
        case MOSQ_ERR_OVERSIZE_PACKET:
        case MOSQ_ERR_QOS_NOT_SUPPORTED:
            /* Cannot ever be sent: drop it rather than block the queue. */
            log_uplink(LOG_ERR, uplink->name, "dropping %zu message(s) for \"%s\" (%zu bytes): %s",
                       records, uplink->topic_buf, len, mosquitto_strerror(rc));
            uplink->stats.dropped += records;
            spool_ack_range(uplink->spool, rec.seq, last_seq);
            break;
        default:
            /* Out of memory or a write error: the records stay in the spool
             * and the next connection sends them again (spool_rewind). */
            uplink_conn_check(conn, rc, err);
            if (!conn->failed)
                uplink_conn_fail(conn, "sending to %s:%d failed: %s", conn->host, conn->port,
                                 mosquitto_strerror(rc));
            return; /* the socket is closed: nothing corked to send */
        }
    }
    if (corked)
        conn_cork(conn, false);
}

/* --- control messages (uplink_publish_control) ----------------------------
 * A short in-memory list that goes out before the spool: a profile's
 * registration and start-up messages must precede the data they are about,
 * including data spooled before a reconnect or a restart. */

void uplink_control_free(struct uplink_control *c)
{
    free(c->topic);
    free(c->payload);
    free(c);
}

/* Unlink-then-call: done_cb may add new control messages. */
static void control_finish(struct uplink_control *c, int status)
{
    void (*done_cb)(void *, int) = c->done_cb;
    void *arg = c->arg;

    uplink_control_free(c);
    if (done_cb)
        done_cb(arg, status);
}

bool uplink_control_acked(struct uplink *uplink, int mid)
{
    struct uplink_control **link, *c;

    for (link = &uplink->controls; (c = *link) != NULL; link = &c->next) {
        if (c->sent && c->qos > 0 && c->mid == mid) {
            *link = c->next;
            control_finish(c, 0);
            return true;
        }
    }
    return false;
}

void uplink_control_reset(struct uplink *uplink, bool drop_all, int status)
{
    struct uplink_control **link = &uplink->controls, *c;

    while ((c = *link) != NULL) {
        if (drop_all || (c->flags & UPLINK_CONTROL_CONNECTION)) {
            *link = c->next;
            control_finish(c, status);
            link = &uplink->controls; /* done_cb may have changed the list */
            continue;
        }
        c->sent = false;
        link = &c->next;
    }
}

bool uplink_conn_flush_control(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct uplink_control **link = &uplink->controls, *c;
    bool gate = false;
    int rc, err, mid;

    while ((c = *link) != NULL && !conn->failed) {
        if (!c->sent) {
            /* Control messages count against rate.* like data: the cloud
             * counts them (GCP: an attach is one of the 100 messages/s of
             * the connection), and a reconnect re-attaching many children
             * must not burst past it. Out of tokens: the rest waits for
             * the next event (a PUBACK or the 1 s tick), and a gate among
             * them keeps the spool held. */
            if (!uplink_rate_take(uplink, strlen(c->topic) + c->len)) {
                for (; c != NULL; c = c->next)
                    gate = gate || (c->flags & UPLINK_CONTROL_GATE);
                return gate;
            }
            mid = 0;
            uplink->in_io = true;
            errno = 0;
            rc = mosquitto_publish(conn->mosq, &mid, c->topic, (int)c->len, c->payload, c->qos,
                                   false);
            err = errno;
            uplink->in_io = false;
            if (rc == MOSQ_ERR_SUCCESS) {
                c->sent = true;
                c->mid = mid;
                if (c->qos == 0) {
                    *link = c->next;
                    control_finish(c, 0);
                    link = &uplink->controls;
                    continue;
                }
            } else if (rc == MOSQ_ERR_INVAL || rc == MOSQ_ERR_PAYLOAD_SIZE ||
                       rc == MOSQ_ERR_MALFORMED_UTF8 || rc == MOSQ_ERR_OVERSIZE_PACKET) {
                log_uplink(LOG_ERR, uplink->name, "dropping control message for \"%s\": %s",
                           c->topic, mosquitto_strerror(rc));
                *link = c->next;
                control_finish(c, -EINVAL);
                link = &uplink->controls;
                continue;
            } else {
                uplink_conn_check(conn, rc, err);
                if (!conn->failed)
                    uplink_conn_fail(conn, "sending to %s:%d failed: %s", conn->host, conn->port,
                                     mosquitto_strerror(rc));
                return true;
            }
        }
        if (c->flags & UPLINK_CONTROL_GATE)
            gate = true;
        link = &c->next;
    }
    return gate;
}

void uplink_conn_subscribe_all(struct uplink_conn *conn)
{
    struct uplink_sub *sub;
    int rc;

    for (sub = conn->uplink->subs; sub; sub = sub->next) {
        rc = mosquitto_subscribe(conn->mosq, &sub->mid, sub->filter, sub->qos);
        if (rc)
            log_uplink(LOG_ERR, conn->uplink->name, "cannot subscribe to \"%s\": %s", sub->filter,
                       mosquitto_strerror(rc));
    }
}

void uplink_conn_write(struct uplink_conn *conn)
{
    int rc, err;

    if (conn->failed || conn_phase_of(conn) == CONN_TCP || !conn->mosq ||
        !mosquitto_want_write(conn->mosq))
        return;
    conn->uplink->in_io = true;
    errno = 0;
    rc = mosquitto_loop_write(conn->mosq, 1);
    err = errno;
    conn->uplink->in_io = false;
    uplink_conn_check(conn, rc, err);
}

bool uplink_durable(const struct uplink *uplink)
{
    struct spool_stats st;

    if (!uplink->spool)
        return false;
    spool_get_stats(uplink->spool, &st);
    return st.durable;
}

size_t uplink_unsent(const struct uplink *uplink)
{
    struct spool_stats st;

    if (!uplink->spool)
        return 0;
    spool_get_stats(uplink->spool, &st);
    return st.durable ? uplink->inflight : (size_t)st.depth;
}
