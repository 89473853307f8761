/* local_session.c - the local server's MQTT sessions and the fan-out of a
 * message to them (local_int.h lists the layers; this file calls
 * local_retain.c and local_conn.c).
 *
 * Sessions (MQTT 3.1.1 §3.1.2.4) are struct local_session, separate from
 * the connection: the subscription tree's owners are sessions, and every
 * outbound QoS>0 message lives in its session (queued, then in flight until
 * PUBACK/PUBCOMP) so a persistent session (clean session 0) keeps its
 * subscriptions and messages while its client is away, and re-sends what was
 * not acknowledged with DUP after a reconnect (§4.4). Inbound QoS 2 packet
 * ids awaiting PUBREL are kept in the session too, so a PUBLISH re-sent with
 * DUP after a reconnect is not delivered twice (§4.3.3). Sessions live in
 * memory only; retained messages are also kept on disk (the retained store,
 * local_retain.c).
 *
 * Queue policy (documented in docs/configuration.md): a session holds at most
 * local.max_inflight messages in flight and local.max_queued waiting, and all
 * sessions together at most local.max_queued_bytes. When a message does not
 * fit, a connected client is disconnected as a slow consumer, and the oldest
 * waiting message of that session is dropped (logged, counted) to make room;
 * QoS 0 messages are never queued for an absent client.
 */
#include "local_int.h"

#include <string.h>

#define SESSION_FMT     "session %s"
#define SESSION_ARGS(s) (s)->id

static unsigned local_max_inflight(const struct local *local)
{
    unsigned max = local->conf->local.max_inflight;
    return max ? max : LOCAL_DEFAULT_MAX_INFLIGHT;
}

static unsigned local_max_queued(const struct local *local)
{
    unsigned max = local->conf->local.max_queued;
    return max ? max : LOCAL_DEFAULT_MAX_QUEUED;
}

static size_t local_max_queued_bytes(const struct local *local)
{
    size_t max = local->conf->local.max_queued_bytes;
    return max ? max : LOCAL_DEFAULT_MAX_QUEUED_BYTES;
}

/* --- sets of packet ids ---------------------------------------------------------- */

bool idset_has(const struct idset *set, uint16_t id)
{
    return set->bits && (set->bits[id / 64] >> (id % 64)) & 1;
}

int idset_add(struct idset *set, uint16_t id)
{
    if (!set->bits) {
        set->bits = calloc(65536 / 64, sizeof(uint64_t));
        if (!set->bits)
            return -ENOMEM;
    }
    if (!idset_has(set, id)) {
        set->bits[id / 64] |= UINT64_C(1) << (id % 64);
        set->count++;
    }
    return 0;
}

bool idset_del(struct idset *set, uint16_t id)
{
    if (!idset_has(set, id))
        return false;
    set->bits[id / 64] &= ~(UINT64_C(1) << (id % 64));
    set->count--;
    return true;
}

static void idset_free(struct idset *set)
{
    free(set->bits);
    set->bits = NULL;
    set->count = 0;
}

/* --- sessions (§3.1.2.4, §4.4) ------------------------------------------------- */

static void msg_list_append(struct msg_list *list, struct session_msg *msg)
{
    msg->next = NULL;
    if (list->tail)
        list->tail->next = msg;
    else
        list->head = msg;
    list->tail = msg;
    list->count++;
}

static struct session_msg *msg_list_pop(struct msg_list *list)
{
    struct session_msg *msg = list->head;

    if (msg) {
        list->head = msg->next;
        if (!list->head)
            list->tail = NULL;
        list->count--;
        msg->next = NULL;
    }
    return msg;
}

static void msg_free(struct local *local, struct session_msg *msg)
{
    local->queued_bytes -= msg->size;
    free(msg);
}

static void msg_list_free(struct local *local, struct msg_list *list)
{
    struct session_msg *msg;

    while ((msg = msg_list_pop(list)))
        msg_free(local, msg);
}

static bool session_online(const struct local_session *session)
{
    return session->client && client_state_of(session->client) == CLIENT_CONNECTED;
}

/* §2.3.1: a non-zero id not used by another message in flight. */
static int session_alloc_id(struct local_session *session, uint16_t *out)
{
    /* Bounded: local.max_inflight <= 65535 ids are in use, so one is free. */
    for (unsigned tries = 0; tries < 65535; tries++) {
        uint16_t id = ++session->next_packet_id;
        if (id == 0)
            id = session->next_packet_id = 1;
        if (!idset_has(&session->inflight_ids, id)) {
            if (idset_add(&session->inflight_ids, id) < 0)
                return -ENOMEM;
            *out = id;
            return 0;
        }
    }
    return -ENOBUFS;
}

/* Give @msg (not in any list) a packet id, put it in flight and send it. */
static void session_send(struct local_session *session, struct session_msg *msg)
{
    if (session_alloc_id(session, &msg->packet_id) < 0) {
        log_warn(SESSION_FMT ": no packet id free; dropping a message to '%s'",
                 SESSION_ARGS(session), msg->topic);
        msg_free(session->local, msg);
        return;
    }
    msg->state = MSG_SENT;
    msg_list_append(&session->inflight, msg);
    client_write_publish(session->client, msg->topic, msg->topic_len, msg->payload, msg->len,
                         msg->qos, msg->retain, false, msg->packet_id);
}

/* Fill the in-flight window from the queue (stops when the client closes). */
static void session_pump(struct local_session *session)
{
    unsigned max = local_max_inflight(session->local);

    while (session_online(session) && session->queue.head && session->inflight.count < max)
        session_send(session, msg_list_pop(&session->queue));
    if (!session->queue.head)
        session->drop_logged = false;
}

static void session_drop_oldest(struct local_session *session, const char *limit)
{
    struct session_msg *msg = msg_list_pop(&session->queue);

    if (!msg)
        return;
    session->dropped++;
    session->local->dropped_messages++;
    if (!session->drop_logged) {
        log_warn(SESSION_FMT ": %s reached: dropping the oldest queued message (to '%s'); "
                             "%llu dropped for this session, %llu in all",
                 SESSION_ARGS(session), limit, msg->topic, (unsigned long long)session->dropped,
                 (unsigned long long)session->local->dropped_messages);
        session->drop_logged = true; /* again once the queue has drained */
    }
    msg_free(session->local, msg);
}

/* A message does not fit: a connected client is a slow consumer and goes
 * (its persistent session keeps the queue), then the oldest waiting message
 * makes room (the policy at the top of this file). */
static void session_overflow(struct local_session *session, const char *limit)
{
    if (session->client) {
        char why[160];
        log_warn(CLIENT_FMT ": slow consumer: %s reached (%zu messages in flight, %zu queued); "
                            "disconnecting",
                 CLIENT_ARGS(session->client), limit, session->inflight.count,
                 session->queue.count);
        snprintf(why, sizeof(why), "slow consumer (%s reached)", limit);
        client_close(session->client, CLOSE_ABORT, true, why);
    }
    session_drop_oldest(session, limit);
}

/* Queue a QoS>0 message for @session; sent at once when the window allows. */
static void session_enqueue(struct local_session *session, const char *topic, size_t topic_len,
                            const void *payload, size_t len, uint8_t qos, bool retain)
{
    struct local *local = session->local;
    size_t size = sizeof(struct session_msg) + topic_len + 1 + len;
    size_t max_bytes = local_max_queued_bytes(local);
    bool direct = session_online(session) && !session->queue.head &&
                  session->inflight.count < local_max_inflight(local);
    struct session_msg *msg;

    if (!direct && session->queue.count >= local_max_queued(local))
        session_overflow(session, "local.max_queued");
    while (local->queued_bytes + size > max_bytes && session->queue.head)
        session_overflow(session, "local.max_queued_bytes");
    if (!session->client && session->clean)
        return; /* its connection is closing: nothing will ever read it */
    if (local->queued_bytes + size > max_bytes) {
        session->dropped++;
        local->dropped_messages++;
        log_warn(SESSION_FMT ": local.max_queued_bytes (%zu) reached by all sessions together: "
                             "dropping a message to '%.*s'",
                 SESSION_ARGS(session), max_bytes, (int)topic_len, topic);
        return;
    }
    msg = malloc(size);
    if (!msg) {
        log_warn(SESSION_FMT ": out of memory: dropping a message to '%.*s'", SESSION_ARGS(session),
                 (int)topic_len, topic);
        return;
    }
    msg->next = NULL;
    msg->state = MSG_QUEUED;
    msg->packet_id = 0;
    msg->qos = qos;
    msg->retain = retain;
    msg->size = size;
    msg->topic_len = topic_len;
    msg->len = len;
    memcpy(msg->topic, topic, topic_len);
    msg->topic[topic_len] = '\0';
    msg->payload = (uint8_t *)msg->topic + topic_len + 1;
    if (len)
        memcpy(msg->payload, payload, len);
    local->queued_bytes += size;
    if (direct && session_online(session))
        session_send(session, msg);
    else
        msg_list_append(&session->queue, msg);
}

/* Deliver to a session: QoS 0 only to a connected client, QoS>0 through
 * the session's queue (kept while a persistent session is away). */
void session_deliver(struct local_session *session, const char *topic, size_t topic_len,
                     const void *payload, size_t len, uint8_t qos, bool retain)
{
    if (qos == 0) {
        if (session_online(session))
            client_write_publish(session->client, topic, topic_len, payload, len, 0, retain, false,
                                 0);
        return;
    }
    session_enqueue(session, topic, topic_len, payload, len, qos, retain);
}

/* The in-flight message with @packet_id, unlinked when @unlink. */
static struct session_msg *session_inflight(struct local_session *session, uint16_t packet_id,
                                            bool unlink)
{
    struct session_msg *prev = NULL;

    for (struct session_msg *msg = session->inflight.head; msg; prev = msg, msg = msg->next) {
        if (msg->packet_id != packet_id)
            continue;
        if (unlink) {
            if (prev)
                prev->next = msg->next;
            else
                session->inflight.head = msg->next;
            if (session->inflight.tail == msg)
                session->inflight.tail = prev;
            session->inflight.count--;
            idset_del(&session->inflight_ids, packet_id);
        }
        return msg;
    }
    return NULL;
}

/* PUBACK, PUBREC or PUBCOMP from the client for one of our messages (§4.3). */
void session_ack(struct local_client *client, uint8_t type, uint16_t packet_id)
{
    struct local_session *session = client->session;
    struct session_msg *msg = session_inflight(session, packet_id, false);
    bool done = false;

    switch (type) {
    case MQTT_PUBACK:
        done = msg && msg->qos == 1 && msg->state == MSG_SENT;
        break;
    case MQTT_PUBREC:
        /* §4.3.3: PUBREC -> PUBREL, also when the PUBREC is repeated. */
        if (msg && msg->qos == 2) {
            msg->state = MSG_RELEASED;
            client_send_ack(client, MQTT_PUBREL, packet_id);
            return;
        }
        break;
    case MQTT_PUBCOMP:
        done = msg && msg->state == MSG_RELEASED;
        break;
    }
    if (!done) {
        log_debug(CLIENT_FMT ": %s for unknown packet id %u", CLIENT_ARGS(client),
                  mqtt_packet_type_name(type), packet_id);
        return;
    }
    msg_free(session->local, session_inflight(session, packet_id, true));
    session_pump(session);
}

/* §4.4: on a resumed session re-send every unacknowledged PUBLISH with DUP
 * and every unanswered PUBREL, with their original packet ids, in order;
 * then continue with the queue. */
void session_resume(struct local_session *session)
{
    for (struct session_msg *msg = session->inflight.head; msg && session_online(session);
         msg = msg->next) {
        if (msg->state == MSG_RELEASED)
            client_send_ack(session->client, MQTT_PUBREL, msg->packet_id);
        else
            client_write_publish(session->client, msg->topic, msg->topic_len, msg->payload,
                                 msg->len, msg->qos, msg->retain, true, msg->packet_id);
    }
    session_pump(session);
}

static struct local_session *session_find(struct local *local, const char *id)
{
    for (struct local_session *s = local->sessions; s; s = s->next)
        if (strcmp(s->id, id) == 0)
            return s;
    return NULL;
}

static void session_unlink(struct local_session *session)
{
    struct local *local = session->local;

    if (!session->linked)
        return;
    if (session->prev)
        session->prev->next = session->next;
    else
        local->sessions = session->next;
    if (session->next)
        session->next->prev = session->prev;
    session->prev = session->next = NULL;
    session->linked = false;
    local->session_count--;
}

static void subs_last_cb(void *arg, const char *filter, size_t len)
{
    struct local *local = arg;

    if (is_cloud_filter(filter, len) && local->hooks.unsubscribe_cb)
        local->hooks.unsubscribe_cb(local->hooks.arg, filter);
}

/* Free a session. @notify: remove its subscriptions (telling the router
 * about the last subscriber of a cloud/ filter); false at teardown, where
 * the whole tree goes. Never call it from inside a subscription walk. */
void session_free(struct local_session *session, bool notify)
{
    struct local *local = session->local;

    session_unlink(session);
    if (notify)
        topic_table_remove_owner(&local->subs, session, subs_last_cb, local);
    if (session->client)
        session->client->session = NULL;
    msg_list_free(local, &session->inflight);
    msg_list_free(local, &session->queue);
    idset_free(&session->inflight_ids);
    idset_free(&session->in_qos2);
    free(session->username);
    free(session->id);
    free(session);
}

/* The session now belongs to @client's identity. Returns 0 or -ENOMEM. */
static int session_take_identity(struct local_session *session, const struct local_client *client)
{
    char *username = NULL;

    if (client->username && !(username = strdup(client->username)))
        return -ENOMEM;
    free(session->username);
    session->username = username;
    session->identity = client->identity;
    session->identity.username = username;
    return 0;
}

/* The client is going away: its pending entries are orphaned (freed by
 * local_publish_done()), finished ones freed. A QoS 2 id whose PUBREC never
 * went out is forgotten so the re-sent PUBLISH is stored again (§4.3.3).
 * The acknowledgements are local_client.c's, but this is here, in the
 * session's layer: session_attach() needs it when a session leaves an old
 * connection, and a layer does not call the one above it. */
void client_acks_orphan(struct local_client *client)
{
    struct local_ack *ack, *next;

    for (ack = client->acks_head; ack; ack = next) {
        next = ack->next;
        if (ack->qos == 2 && client->session)
            idset_del(&client->session->in_qos2, ack->packet_id);
        if (ack->done) {
            free(ack);
        } else {
            ack->client = NULL;
            ack->next = NULL;
        }
    }
    client->acks_head = client->acks_tail = NULL;
    client->acks_pending = 0;
}

/*
 * CONNECT accepted: give @client its session (§3.1.2.4). A clean CONNECT
 * discards any previous session of that id; a persistent one resumes the
 * previous persistent session (*present = true) or starts a new one. A
 * persistent session never changes hands: one left by another identity is
 * discarded, as its subscriptions were granted by local.acl to that
 * identity and its queue holds what that identity may read. Any other
 * connection with this id has already been closed (takeover).
 * Returns 0, -ENOMEM or -EUSERS (too many sessions).
 */
int session_attach(struct local_client *client, bool clean, bool *present)
{
    struct local *local = client->local;
    struct local_session *session = session_find(local, client->id);
    bool discard = clean, handed_over = false;

    *present = false;
    if (session && !clean && !session->clean &&
        !access_identity_same(&session->identity, &client->identity)) {
        char was[160], now[160];
        access_identity_describe(&session->identity, was, sizeof(was));
        access_identity_describe(&client->identity, now, sizeof(now));
        log_notice(SESSION_FMT ": discarding the persistent session of %s: this CONNECT is "
                               "from %s, and a session never changes hands",
                   SESSION_ARGS(session), was, now);
        discard = handed_over = true; /* below, like one a clean CONNECT ends */
    }
    if (session && (discard || session->clean)) {
        /* Discarded. Still referenced by a closing connection? Then that
         * connection's client_finish() frees it (marked clean, unlinked). */
        bool referenced = false;
        for (struct local_client *c = local->clients; c && !referenced; c = c->next)
            referenced = c != client && c->session == session;
        session_unlink(session);
        if (referenced) {
            session->clean = true;
        } else {
            if (!session->clean && !handed_over)
                log_info(SESSION_FMT ": discarding the persistent session (clean session 1, "
                                     "§3.1.2.4)",
                         SESSION_ARGS(session));
            session_free(session, true);
        }
        session = NULL;
    }
    if (session) {
        if (session_take_identity(session, client) < 0)
            return -ENOMEM;
        for (struct local_client *c = local->clients; c; c = c->next) {
            if (c != client && c->session == session) {
                /* The old connection's QoS 2 ids whose PUBREC never went out
                 * must leave the session now, while it can still find them,
                 * so their re-sent PUBLISH is stored again (§4.3.3). */
                client_acks_orphan(c);
                c->session = NULL; /* the old connection no longer owns it */
            }
        }
        *present = true;
    } else {
        if (local->session_count >= LOCAL_SESSIONS_MAX) {
            log_warn(CLIENT_FMT ": refusing: already %d sessions", CLIENT_ARGS(client),
                     LOCAL_SESSIONS_MAX);
            return -EUSERS;
        }
        session = calloc(1, sizeof(*session));
        if (!session)
            return -ENOMEM;
        session->id = strdup(client->id);
        if (!session->id || session_take_identity(session, client) < 0) {
            free(session->id);
            free(session);
            return -ENOMEM;
        }
        session->local = local;
        session->clean = clean;
        session->next = local->sessions;
        if (local->sessions)
            local->sessions->prev = session;
        local->sessions = session;
        session->linked = true;
        local->session_count++;
    }
    session->client = client;
    client->session = session;
    return 0;
}

/* --- fan-out ------------------------------------------------------------------- */

struct dispatch {
    const char *topic;
    size_t topic_len;
    const void *payload;
    size_t len;
    uint8_t qos;
};

/* A granted wildcard subscription meets a local.acl deny_subscribe topic:
 * that message is not for this session (access_delivery_denied()). */
bool session_delivery_denied(const struct local_session *session, const char *topic,
                             size_t topic_len)
{
    if (!access_delivery_denied(&session->local->conf->local, &session->identity, topic, topic_len))
        return false;
    log_debug(SESSION_FMT ": not delivering '%.*s': local.acl deny_subscribe",
              SESSION_ARGS(session), (int)topic_len, topic);
    return true;
}

static void dispatch_match_cb(void *arg, void *owner, uint8_t sub_qos)
{
    const struct dispatch *d = arg;
    struct local_session *session = owner;

    if (session_delivery_denied(session, d->topic, d->topic_len))
        return;

    /* §3.3.5: delivered at min(granted QoS, message QoS); §3.3.1-9: RETAIN 0
     * on messages that match an established subscription. */
    session_deliver(session, d->topic, d->topic_len, d->payload, d->len,
                    sub_qos < d->qos ? sub_qos : d->qos, false);
}

/* Store (if retained) and deliver to every matching local subscriber. */
void local_dispatch(struct local *local, const char *topic, size_t topic_len, const void *payload,
                    size_t len, uint8_t qos, bool retain)
{
    struct dispatch d = {
        .topic = topic, .topic_len = topic_len, .payload = payload, .len = len, .qos = qos};

    if (retain)
        retained_store(local, topic, topic_len, payload, len, qos);
    topic_table_match(&local->subs, topic, topic_len, dispatch_match_cb, &d);
}
