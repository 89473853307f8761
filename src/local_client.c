/* local_client.c - the MQTT protocol of one local client: input, keepalive,
 * the identity and password check, CONNECT, deferred acknowledgements,
 * PUBLISH, SUBSCRIBE and UNSUBSCRIBE (local_int.h lists the layers; this
 * file calls local_session.c and local_conn.c).
 *
 * It also decides what the end of a connection means for all of that: the
 * lower layer hands it up through local.client_event_cb, which
 * client_events_install() points at client_event_cb() (see the end of this
 * file).
 */
#include "local_int.h"

#include <string.h>

#include <openssl/crypto.h>

#include "json.h"

/* --- packet handlers ---------------------------------------------------------- */

void client_keepalive_cb(uv_timer_t *timer)
{
    struct local_client *client = container_of(timer, struct local_client, timer);
    char why[128];

    if (client_state_of(client) == CLIENT_NEW) {
        snprintf(why, sizeof(why), "no complete CONNECT within local.connect_deadline (%u ms)",
                 local_connect_deadline_ms(client->local));
        local_drop_note(client->local, client->listener, DROP_DEADLINE, client->peer, why);
        client->quiet_close = true;
        client_close(client, CLOSE_ABORT, false, why);
        return;
    }
    /* §3.1.2-24: nothing received for one and a half keepalive periods. */
    snprintf(why, sizeof(why), "keepalive expired (nothing received for 1.5 x %u s)",
             client->keepalive_s);
    log_warn(CLIENT_FMT ": %s", CLIENT_ARGS(client), why);
    client_close(client, CLOSE_ABORT, true, why);
}

static void client_arm_keepalive(struct local_client *client)
{
    if (client_state_of(client) == CLIENT_CONNECTED && client->keepalive_s)
        uv_timer_start(&client->timer, client_keepalive_cb, client->keepalive_s * 1500ull, 0);
}

static char *slice_strdup(const struct mqtt_slice *s)
{
    char *p = malloc(s->len + 1);

    if (p) {
        if (s->len)
            memcpy(p, s->data, s->len);
        p[s->len] = '\0';
    }
    return p;
}

static struct local_client *local_find_client(struct local *local, const char *id,
                                              const struct local_client *except)
{
    for (struct local_client *c = local->clients; c; c = c->next)
        if (c != except && client_state_of(c) == CLIENT_CONNECTED && strcmp(c->id, id) == 0)
            return c;
    return NULL;
}

/* A protocol violation by the client: §4.8 says close the connection. */
static void client_protocol_error(struct local_client *client, const char *what, const char *reason)
{
    char why[256];

    snprintf(why, sizeof(why), "protocol error in %s: %s", what, reason);
    if (client_before_connect(client)) {
        /* Before CONNECT: anyone can cause this, as often as they like. */
        local_drop_note(client->local, client->listener, DROP_PROTOCOL, client->peer, why);
        client->quiet_close = true;
    } else {
        log_warn(CLIENT_FMT ": protocol error in %s: %s; closing the connection",
                 CLIENT_ARGS(client), what, reason);
    }
    client_close(client, CLOSE_ABORT, true, why);
}

/* --- identity and access (access.h) -------------------------------------------- */

static void client_handle_packet(struct local_client *client, const uint8_t *data, size_t len);
static void client_process_input(struct local_client *client);

/* A password check on the libuv threadpool: PBKDF2 is slow on purpose and
 * must not stall the loop. It holds a reference on the client (open_handles)
 * so the client outlives it, and a copy of everything it reads, so a reload
 * that frees the conf meanwhile does not matter. */
struct auth_check {
    uv_work_t req;
    struct local_client *client;
    struct access_passwd_entry entry; /* .user unused (NULL) */
    bool known_user;
    bool ok;
    uint8_t *password;
    size_t password_len;
    uint8_t *packet; /* the CONNECT, handled again once the check is done */
    size_t packet_len;
};

static void auth_check_free(struct auth_check *check)
{
    if (check->password) {
        explicit_bzero(check->password, check->password_len);
        free(check->password);
    }
    free(check->packet);
    explicit_bzero(&check->entry, sizeof(check->entry));
    free(check);
}

static void auth_check_cancel(struct auth_check *check)
{
    uv_cancel((uv_req_t *)&check->req);
}

static void auth_work_cb(uv_work_t *req)
{
    struct auth_check *check = container_of(req, struct auth_check, req);

    check->ok = access_passwd_verify(check->known_user ? &check->entry : NULL, check->password,
                                     check->password_len);
    /* PBKDF2 left OpenSSL state (error queue) in this threadpool thread;
     * libuv's threads outlive OPENSSL_cleanup(), so release it now
     * (valgrind "definitely lost"; see conn_work_cb in uplink.c). */
    OPENSSL_thread_stop();
}

static void auth_after_work_cb(uv_work_t *req, int status)
{
    struct auth_check *check = container_of(req, struct auth_check, req);
    struct local_client *client = check->client;

    client->auth = NULL;
    if (--client->open_handles == 0) {
        /* Closed while the check ran; the handles are already gone. */
        auth_check_free(check);
        client_finish(client);
        return;
    }
    if (client_state_of(client) == CLIENT_CLOSING) {
        auth_check_free(check);
        return;
    }
    client->auth_ok = status == 0 && check->ok;
    /* Second pass: client_check_access() now knows the answer. */
    client_handle_packet(client, check->packet, check->packet_len);
    auth_check_free(check);
    if (client_state_of(client) == CLIENT_CLOSING)
        return;
    if (uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb) < 0) {
        client_close(client, CLOSE_ABORT, true, "cannot read after authentication");
        return;
    }
    client_process_input(client); /* packets that came right behind CONNECT */
}

static void client_refuse(struct local_client *client, uint8_t code, const char *why)
{
    char who[160];

    access_identity_describe(&client->identity, who, sizeof(who));
    log_warn(CLIENT_FMT ": refusing CONNECT with CONNACK %u: %s (%s)", CLIENT_ARGS(client), code,
             why, who);
    client_send_connack(client, code);
    client_close(client, CLOSE_FLUSH, false, why);
}

/* Queue the password check of @c; the client stops reading until it is done
 * (input behind the CONNECT stays in rbuf). Returns 1, or -1 after refusing. */
static int client_start_auth_check(struct local_client *client, const struct mqtt_connect *c,
                                   const uint8_t *packet, size_t len)
{
    const struct access_passwd_entry *entry = access_passwords_find(
        client->local->conf->local.passwords, (const char *)c->username.data, c->username.len);
    struct auth_check *check = calloc(1, sizeof(*check));

    if (check) {
        check->client = client;
        check->known_user = entry != NULL;
        if (entry) {
            check->entry = *entry;
            check->entry.user = NULL;
        }
        check->password_len = c->password.len;
        check->password = malloc(c->password.len ? c->password.len : 1);
        check->packet = malloc(len);
        check->packet_len = len;
    }
    if (!check || !check->password || !check->packet) {
        if (check)
            auth_check_free(check);
        client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "out of memory");
        return -1;
    }
    memcpy(check->password, c->password.data, c->password.len);
    memcpy(check->packet, packet, len);
    if (uv_queue_work(client->local->loop, &check->req, auth_work_cb, auth_after_work_cb) < 0) {
        auth_check_free(check);
        client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "cannot queue the password check");
        return -1;
    }
    client->auth = check;
    client->open_handles++;
    client_set_state(client, CLIENT_AUTHENTICATING);
    uv_read_stop(&client->conn.stream);
    /* The CONNECT is complete: local.connect_deadline is met. The check
     * ends by itself; meanwhile the connection stays pending, not evictable. */
    uv_timer_stop(&client->timer);
    return 1;
}

/*
 * Credentials and will of a CONNECT, before handle_connect() (§3.1.4: the
 * server authenticates the client before acting on the CONNECT). With
 * local.password_file set, TCP clients must log in: no username gives
 * CONNACK 5, a wrong one or a wrong password CONNACK 4 (§3.2.2.3). Unix
 * socket peers are known by their uid and need no password; credentials they
 * do send are checked all the same, so a username is only ever one that was
 * proven. Returns 0 to go on, 1 while a password check runs (the packet is
 * handled again afterwards), -1 after refusing the connection.
 */
static int client_check_access(struct local_client *client, const struct mqtt_connect *c,
                               const uint8_t *packet, size_t len)
{
    const struct conf_local *conf = &client->local->conf->local;
    int rule;

    bool authenticating = client_state_of(client) == CLIENT_AUTHENTICATING;

    if (authenticating && !client->auth_ok) {
        client_refuse(client, MQTT_CONNACK_BAD_CREDENTIALS, "wrong username or password");
        return -1;
    }
    if (!authenticating && conf->passwords && c->has_username) {
        if (!c->has_password) {
            client_refuse(client, MQTT_CONNACK_BAD_CREDENTIALS, "username without a password");
            return -1;
        }
        return client_start_auth_check(client, c, packet, len);
    }
    if (!authenticating && conf->passwords && client->kind == CONF_LISTEN_TCP) {
        client_refuse(client, MQTT_CONNACK_NOT_AUTHORIZED,
                      "no username and password, which this TCP listener requires "
                      "(local.password_file is set)");
        return -1;
    }
    if (authenticating && !client->username) {
        client->username = slice_strdup(&c->username);
        if (!client->username) {
            client_refuse(client, MQTT_CONNACK_SERVER_UNAVAILABLE, "out of memory");
            return -1;
        }
        client->identity.username = client->username;
    } else if (c->has_username && !conf->passwords) {
        log_debug(CLIENT_FMT ": ignoring the username: no local.password_file to check it against",
                  CLIENT_ARGS(client));
    }
    /* The will is published on the client's behalf later: the ACL decides
     * now, while the client can still be told (mosquitto does the same). */
    if (c->will &&
        access_acl_check(conf, &client->identity, ACCESS_PUBLISH, (const char *)c->will_topic.data,
                         c->will_topic.len, &rule) < 0) {
        client_refuse(client, MQTT_CONNACK_NOT_AUTHORIZED,
                      rule < 0 ? "will topic not allowed: no local.acl rule selects this client"
                               : "will topic not allowed by local.acl");
        return -1;
    }
    return 0;
}

/* Log a refused PUBLISH or SUBSCRIBE and tell local subscribers of
 * LOCAL_ERRORS_TOPIC, as JSON. */
static void client_report_denied(struct local_client *client, const char *action, const char *topic,
                                 size_t len, int rule, int rc)
{
    struct local *local = client->local;
    struct json_buf json;
    char who[160], reason[96], *copy;

    access_identity_describe(&client->identity, who, sizeof(who));
    if (rule < 0)
        snprintf(reason, sizeof(reason), "no local.acl rule selects this client");
    else if (rc == -EPERM)
        snprintf(reason, sizeof(reason), "denied by local.acl[%d].deny_%s", rule, action);
    else
        snprintf(reason, sizeof(reason), "not allowed by local.acl[%d]", rule);
    log_warn(CLIENT_FMT ": %s to '%.*s' denied: %s (%s)", CLIENT_ARGS(client), action,
             (int)(len > 200 ? 200 : len), topic, reason, who);
    copy = strndup(topic, len);
    json_buf_init(&json);
    json_append_raw(&json, "{\"error\":\"access denied\",\"action\":");
    json_append_string(&json, action);
    json_append_raw(&json, ",\"topic\":");
    json_append_string(&json, copy ? copy : "?");
    json_append_raw(&json, ",\"client_id\":");
    json_append_string(&json, client->id);
    json_append_raw(&json, ",\"identity\":");
    json_append_string(&json, who);
    json_append_raw(&json, ",\"reason\":");
    json_append_string(&json, reason);
    json_append_raw(&json, "}");
    if (!json.failed)
        local_dispatch(local, LOCAL_ERRORS_TOPIC, strlen(LOCAL_ERRORS_TOPIC), json.data, json.len,
                       0, false);
    json_buf_deinit(&json);
    free(copy);
}

/*
 * §3.3.5: a server that does not authorize a PUBLISH "has no way of informing
 * that Client. It MUST either make a positive acknowledgement, according to
 * the normal QoS rules, or close the Network Connection" [MQTT-3.3.5-2].
 * uplinkd acknowledges (PUBACK, or PUBREC then PUBCOMP for QoS 2) and drops
 * the message: closing would make the client re-send it for ever.
 */
static bool client_publish_denied(struct local_client *client, const struct mqtt_publish *p)
{
    int rule, rc;

    rc = access_acl_check(&client->local->conf->local, &client->identity, ACCESS_PUBLISH,
                          (const char *)p->topic.data, p->topic.len, &rule);
    if (rc == 0)
        return false;
    client_report_denied(client, "publish", (const char *)p->topic.data, p->topic.len, rule, rc);
    if (p->qos == 1)
        client_send_ack(client, MQTT_PUBACK, p->packet_id);
    else if (p->qos == 2)
        client_send_ack(client, MQTT_PUBREC, p->packet_id);
    return true;
}

/* §3.9.3: a refused filter gets return code 0x80 in SUBACK. */
static bool client_subscribe_denied(struct local_client *client, const char *filter, size_t len)
{
    int rule, rc;

    rc = access_acl_check(&client->local->conf->local, &client->identity, ACCESS_SUBSCRIBE, filter,
                          len, &rule);
    if (rc == 0)
        return false;
    client_report_denied(client, "subscribe", filter, len, rule, rc);
    return true;
}

static void handle_connect(struct local_client *client, const struct mqtt_connect *c)
{
    struct local *local = client->local;
    struct local_client *old;
    bool session_present = false;

    if (c->client_id.len == 0) {
        /* §3.1.3-7/8: an empty id is only allowed with a clean session. */
        if (!c->clean_session) {
            log_warn(CLIENT_FMT ": empty client id with clean session 0; refusing with "
                                "CONNACK 2 (§3.1.3-8)",
                     CLIENT_ARGS(client));
            client_send_connack(client, MQTT_CONNACK_ID_REJECTED);
            client_close(client, CLOSE_FLUSH, false, "empty client id without clean session");
            return;
        }
        client->id = malloc(40);
        for (unsigned tries = 0; client->id && tries < 100; tries++) {
            snprintf(client->id, 40, "uplinkd-auto-%llu",
                     (unsigned long long)++local->generated_ids);
            if (!local_find_client(local, client->id, client))
                break;
        }
    } else {
        client->id = slice_strdup(&c->client_id);
    }
    if (c->will) {
        client->will_topic = slice_strdup(&c->will_topic);
        client->will_payload = malloc(c->will_payload.len ? c->will_payload.len : 1);
        if (client->will_payload && c->will_payload.len)
            memcpy(client->will_payload, c->will_payload.data, c->will_payload.len);
        client->will_len = c->will_payload.len;
        client->will_qos = c->will_qos;
        client->will_retain = c->will_retain;
        client->has_will = true;
    }
    if (!client->id || (c->will && (!client->will_topic || !client->will_payload))) {
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, "out of memory");
        return;
    }
    /* §3.1.4-2: a second connection with the same id takes over. */
    old = local_find_client(local, client->id, client);
    if (old) {
        log_info(CLIENT_FMT ": takes over client id '%s' from [%s] (§3.1.4-2)", CLIENT_ARGS(client),
                 client->id, old->peer);
        client_close(old, CLOSE_ABORT, true, "taken over by a new connection with the same id");
    }
    /* Only connected clients count against local.max_clients, so pending
     * connections cannot take their slots; §3.2.2.3: CONNACK 3, server
     * unavailable. Counted and logged per burst like the other drops. */
    if (local->connected_count >= local->conf->local.max_clients) {
        char why[96];
        snprintf(why, sizeof(why), "local.max_clients (%u) reached",
                 local->conf->local.max_clients);
        local_drop_note(local, client->listener, DROP_MAX_CLIENTS, client->peer, why);
        client->quiet_close = true;
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, why);
        return;
    }
    if (session_attach(client, c->clean_session, &session_present) < 0) {
        client_send_connack(client, MQTT_CONNACK_SERVER_UNAVAILABLE);
        client_close(client, CLOSE_FLUSH, false, "no session available");
        return;
    }
    client->keepalive_s = c->keepalive_s;
    client_set_state(client, CLIENT_CONNECTED);
    client_send_connack_accepted(client, session_present);
    uv_timer_stop(&client->timer);
    client_arm_keepalive(client);
    log_info(CLIENT_FMT ": connected (keepalive %u s, clean session %d, session present %d, "
                        "%zu messages in flight and %zu queued)",
             CLIENT_ARGS(client), client->keepalive_s, c->clean_session, session_present,
             client->session->inflight.count, client->session->queue.count);
    session_resume(client->session);
}

/* --- deferred acknowledgements (local.h publish_async_cb) --------------------- */

static void client_ack_append(struct local_client *client, struct local_ack *ack)
{
    if (client->acks_tail)
        client->acks_tail->next = ack;
    else
        client->acks_head = ack;
    client->acks_tail = ack;
    if (!ack->done && ++client->acks_pending >= LOCAL_ACKS_PENDING_MAX && !client->acks_paused &&
        !client->detached) {
        /* Backpressure: the spool is slower than this client (or full with
         * overflow: block); stop reading until half the acks are done. */
        client->acks_paused = true;
        uv_read_stop(&client->conn.stream);
        log_debug(CLIENT_FMT ": %u acknowledgements pending; pausing input", CLIENT_ARGS(client),
                  client->acks_pending);
    } else if (!ack->done && client->acks_pending >= LOCAL_ACKS_PENDING_MAX) {
        client->acks_paused = true;
    }
}

/* Send the acknowledgements that are due, in order; a failed one closes. */
static void client_acks_pump(struct local_client *client)
{
    struct local_ack *ack;

    while ((ack = client->acks_head) != NULL && ack->done &&
           client_state_of(client) != CLIENT_CLOSING) {
        client->acks_head = ack->next;
        if (!client->acks_head)
            client->acks_tail = NULL;
        if (ack->status < 0) {
            char why[160];
            log_warn(CLIENT_FMT
                     ": QoS %u message (packet id %u) could not be stored (%s); not "
                     "acknowledging it, closing the connection so the client re-sends it",
                     CLIENT_ARGS(client), ack->qos, ack->packet_id, strerror(-ack->status));
            snprintf(why, sizeof(why), "a QoS %u message could not be stored: %s", ack->qos,
                     strerror(-ack->status));
            if (ack->qos == 2 && client->session)
                idset_del(&client->session->in_qos2, ack->packet_id);
            free(ack);
            client_close(client, CLOSE_ABORT, true, why);
            return;
        }
        client_send_ack(client, ack->qos == 1 ? MQTT_PUBACK : MQTT_PUBREC, ack->packet_id);
        free(ack);
    }
    if (client->acks_paused && client->acks_pending <= LOCAL_ACKS_PENDING_MAX / 2 &&
        client_state_of(client) == CLIENT_CONNECTED) {
        client->acks_paused = false;
        if (!client->detached &&
            uv_read_start(&client->conn.stream, client_alloc_cb, client_read_cb) < 0) {
            client_close(client, CLOSE_ABORT, true, "cannot resume reading");
            return;
        }
        client_process_input(client); /* what was read before the pause */
    }
}

void local_publish_done(struct local *local, struct local_ack *ack, int status)
{
    struct local_client *client = ack->client;

    if (!client) {
        free(ack);
        return;
    }
    ack->done = true;
    ack->status = status;
    client->acks_pending--;
    client_acks_pump(client);
}

static void handle_publish(struct local_client *client, const struct mqtt_publish *p)
{
    struct local *local = client->local;
    struct local_ack *ack = NULL;
    char *topic;
    int rc = 0;

    if (client_publish_denied(client, p))
        return;
    if (p->qos == 2) {
        /* §4.3.3 (method: deliver on PUBLISH, remember the id until PUBREL):
         * a re-sent PUBLISH with a remembered id is not delivered again. */
        struct idset *in_qos2 = &client->session->in_qos2;

        if (idset_has(in_qos2, p->packet_id)) {
            client_send_ack(client, MQTT_PUBREC, p->packet_id);
            return;
        }
        if (in_qos2->count >= LOCAL_INFLIGHT_MAX) {
            client_protocol_error(client, "PUBLISH", "too many QoS 2 messages awaiting PUBREL");
            return;
        }
        if (idset_add(in_qos2, p->packet_id) < 0) {
            client_close(client, CLOSE_ABORT, true, "out of memory");
            return;
        }
    }
    topic = slice_strdup(&p->topic);
    if (!topic) {
        client_close(client, CLOSE_ABORT, true, "out of memory");
        return;
    }
    /* The router first: when it cannot take a QoS>0 message, the client gets
     * no acknowledgement and the connection is closed, so the client keeps
     * the message and re-sends it (§4.4); delivering it locally now would
     * duplicate it on that re-send. */
    if (local->hooks.publish_async_cb && p->qos > 0) {
        ack = calloc(1, sizeof(*ack));
        if (!ack) {
            free(topic);
            client_close(client, CLOSE_ABORT, true, "out of memory");
            return;
        }
        ack->client = client;
        ack->packet_id = p->packet_id;
        ack->qos = p->qos;
        rc = local->hooks.publish_async_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                           p->payload.len, p->qos, p->retain, ack);
    } else if (local->hooks.publish_async_cb) {
        rc = local->hooks.publish_async_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                           p->payload.len, p->qos, p->retain, NULL);
    } else if (local->hooks.publish_cb) {
        rc = local->hooks.publish_cb(local->hooks.arg, client->id, topic, p->payload.data,
                                     p->payload.len, p->qos, p->retain);
    }
    if (ack && (rc == LOCAL_PUBLISH_PENDING || (rc == 0 && client->acks_head))) {
        /* Acknowledged later, or now but behind pending ones (§4.6 order). */
        ack->done = rc == 0;
        client_ack_append(client, ack);
        local_dispatch(local, topic, p->topic.len, p->payload.data, p->payload.len, p->qos,
                       p->retain);
        free(topic);
        if (rc == 0)
            client_acks_pump(client);
        return;
    }
    free(ack);
    if (rc > 0)
        rc = 0;
    if (rc < 0 && p->qos > 0) {
        char why[160];
        log_warn(CLIENT_FMT
                 ": QoS %u message to '%s' not accepted by the router (%s); not "
                 "acknowledging it, closing the connection so the client re-sends it later",
                 CLIENT_ARGS(client), p->qos, topic, strerror(-rc));
        snprintf(why, sizeof(why), "router refused a QoS %u message: %s", p->qos, strerror(-rc));
        if (p->qos == 2)
            idset_del(&client->session->in_qos2, p->packet_id);
        free(topic);
        client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    local_dispatch(local, topic, p->topic.len, p->payload.data, p->payload.len, p->qos, p->retain);
    free(topic);
    if (p->qos == 1)
        client_send_ack(client, MQTT_PUBACK, p->packet_id);
    else if (p->qos == 2)
        client_send_ack(client, MQTT_PUBREC, p->packet_id);
}

static void send_retained(struct local_client *client, const char *filter, size_t len, uint8_t qos)
{
    for (struct retained *r = client->local->retained; r; r = r->next)
        if (topic_match(filter, len, r->topic, r->topic_len) &&
            !session_delivery_denied(client->session, r->topic, r->topic_len))
            /* §3.3.1-8: RETAIN 1 for messages sent because of a new subscription. */
            session_deliver(client->session, r->topic, r->topic_len, r->payload, r->len,
                            qos < r->qos ? qos : r->qos, true);
}

static void handle_subscribe(struct local_client *client, const struct mqtt_subscribe *sub)
{
    struct local *local = client->local;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice filter;
    uint8_t qos, *codes;
    size_t i = 0, size;

    codes = malloc(sub->count);
    if (!codes) {
        client_close(client, CLOSE_ABORT, true, "out of memory");
        return;
    }
    while (i < sub->count && mqtt_subscribe_next(sub, &iter, &filter, &qos)) {
        const char *f = (const char *)filter.data, *reason;
        bool first = false;

        codes[i] = qos;
        if (topic_filter_check(f, filter.len, &reason) < 0) {
            /* §3.9.3: 0x80 refuses this filter; the rest still apply. */
            log_warn(CLIENT_FMT ": refusing subscription to '%.*s': %s", CLIENT_ARGS(client),
                     (int)filter.len, f, reason);
            codes[i] = MQTT_SUBACK_FAILURE;
        } else if (client_subscribe_denied(client, f, filter.len)) {
            codes[i] = MQTT_SUBACK_FAILURE;
        } else if (topic_table_add(&local->subs, client->session, f, filter.len, qos, &first) < 0) {
            log_warn(CLIENT_FMT ": refusing subscription to '%.*s': out of memory",
                     CLIENT_ARGS(client), (int)filter.len, f);
            codes[i] = MQTT_SUBACK_FAILURE;
        } else {
            log_debug(CLIENT_FMT ": subscribed to '%.*s' QoS %u", CLIENT_ARGS(client),
                      (int)filter.len, f, qos);
            if (first && is_cloud_filter(f, filter.len) && local->hooks.subscribe_cb) {
                char *copy = slice_strdup(&filter);
                if (copy)
                    local->hooks.subscribe_cb(local->hooks.arg, copy, qos);
                free(copy);
            }
        }
        i++;
    }
    if (mqtt_encode_suback(NULL, 0, sub->packet_id, codes, i, &size) == -ENOBUFS) {
        uint8_t *p = client_reserve(client, size);
        if (p) {
            mqtt_encode_suback(p, size, sub->packet_id, codes, i, &size);
            client_flush(client);
        }
    }
    /* §3.8.4-3: retained messages for every granted filter, also re-sent
     * when the subscription replaced an existing one. */
    iter.offset = 0;
    for (size_t k = 0; k < i && mqtt_subscribe_next(sub, &iter, &filter, &qos); k++)
        if (codes[k] != MQTT_SUBACK_FAILURE)
            send_retained(client, (const char *)filter.data, filter.len, codes[k]);
    free(codes);
}

static void handle_unsubscribe(struct local_client *client, const struct mqtt_subscribe *unsub)
{
    struct local *local = client->local;
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice filter;

    while (mqtt_unsubscribe_next(unsub, &iter, &filter)) {
        const char *f = (const char *)filter.data;
        bool last = false;

        if (topic_table_remove(&local->subs, client->session, f, filter.len, &last) < 0)
            continue; /* §3.10.4-5: UNSUBACK even when nothing matched */
        log_debug(CLIENT_FMT ": unsubscribed from '%.*s'", CLIENT_ARGS(client), (int)filter.len, f);
        if (last && is_cloud_filter(f, filter.len) && local->hooks.unsubscribe_cb) {
            char *copy = slice_strdup(&filter);
            if (copy)
                local->hooks.unsubscribe_cb(local->hooks.arg, copy);
            free(copy);
        }
    }
    client_send_ack(client, MQTT_UNSUBACK, unsub->packet_id);
}

static void client_handle_packet(struct local_client *client, const uint8_t *data, size_t len)
{
    struct mqtt_packet pkt;
    const char *reason = "";
    size_t consumed;
    int rc;

    rc = mqtt_decode(data, len, 0, &pkt, &consumed, &reason);
    if (rc == -EPROTONOSUPPORT && client_before_connect(client)) {
        /* §3.1.2.2: unsupported protocol level -> CONNACK 1, then close. */
        log_warn(CLIENT_FMT ": refusing CONNECT: %s (only MQTT 3.1.1 is supported); "
                            "CONNACK 1",
                 CLIENT_ARGS(client), reason);
        client_send_connack(client, MQTT_CONNACK_BAD_PROTOCOL);
        client_close(client, CLOSE_FLUSH, false, "unsupported protocol version");
        return;
    }
    if (rc < 0) {
        client_protocol_error(client, mqtt_packet_type_name(data[0] >> 4), reason);
        return;
    }
    /* §3.1.2.10: any control packet resets the keepalive deadline. */
    client_arm_keepalive(client);

    if (client_before_connect(client) && pkt.type != MQTT_CONNECT) {
        /* §3.1.0-1: CONNECT must be the first packet. */
        client_protocol_error(client, mqtt_packet_type_name(pkt.type),
                              "first packet is not CONNECT (§3.1.0-1)");
        return;
    }
    switch (pkt.type) {
    case MQTT_CONNECT:
        if (!client_before_connect(client))
            client_protocol_error(client, "CONNECT", "second CONNECT (§3.1.0-2)");
        else if (client_check_access(client, &pkt.u.connect, data, len) == 0)
            handle_connect(client, &pkt.u.connect);
        break;
    case MQTT_PUBLISH:
        handle_publish(client, &pkt.u.publish);
        break;
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBCOMP:
        session_ack(client, pkt.type, pkt.u.packet_id);
        break;
    case MQTT_PUBREL:
        /* §4.3.3: QoS 2 receiver: forget the id, answer PUBCOMP (also for an
         * id we no longer know: the sender is retrying after a lost PUBCOMP). */
        idset_del(&client->session->in_qos2, pkt.u.packet_id);
        client_send_ack(client, MQTT_PUBCOMP, pkt.u.packet_id);
        break;
    case MQTT_SUBSCRIBE:
        handle_subscribe(client, &pkt.u.subscribe);
        break;
    case MQTT_UNSUBSCRIBE:
        handle_unsubscribe(client, &pkt.u.unsubscribe);
        break;
    case MQTT_PINGREQ: {
        uint8_t buf[2];
        size_t n;
        if (mqtt_encode_simple(buf, sizeof(buf), MQTT_PINGRESP, &n) == 0)
            client_send_bytes(client, buf, n);
        break;
    }
    case MQTT_DISCONNECT:
        /* §3.14.4: discard the will, close. */
        client->has_will = false;
        client_close(client, CLOSE_FLUSH, false, "client sent DISCONNECT");
        break;
    default:
        client_protocol_error(client, mqtt_packet_type_name(pkt.type),
                              "server-to-client packet sent by a client");
        break;
    }
}

/* --- input ------------------------------------------------------------------- */

/* Handle every whole packet in the read buffer; keep the partial tail. */
static void client_process_input(struct local_client *client)
{
    size_t max_packet = local_max_packet(client->local);
    size_t off = 0;

    client->rneed = 0;
    while (client_state_of(client) != CLIENT_CLOSING && !client->auth && !client->acks_paused &&
           off < client->rlen) {
        struct mqtt_fixed_header fh;
        const char *reason = "";
        size_t total;
        int rc;

        rc = mqtt_decode_fixed_header(client->rbuf + off, client->rlen - off, max_packet, &fh,
                                      &reason);
        if (rc == -EAGAIN)
            break;
        if (rc == -EMSGSIZE) {
            char detail[160];
            snprintf(detail, sizeof(detail),
                     "packet of %zu bytes exceeds local.max_packet_size (%zu)",
                     fh.header_len + fh.remaining_length, max_packet);
            client_protocol_error(client, mqtt_packet_type_name(fh.type), detail);
            break;
        }
        if (rc < 0) {
            client_protocol_error(client, mqtt_packet_type_name(client->rbuf[off] >> 4), reason);
            break;
        }
        total = fh.header_len + fh.remaining_length;
        if (client->rlen - off < total) {
            client->rneed = total;
            break;
        }
        client_handle_packet(client, client->rbuf + off, total);
        off += total;
    }
    if (off) {
        memmove(client->rbuf, client->rbuf + off, client->rlen - off);
        client->rlen -= off;
    }
    if (client->rlen == 0 && client->rcap > LOCAL_BUF_KEEP) {
        free(client->rbuf);
        client->rbuf = NULL;
        client->rcap = 0;
    }
}

void client_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    struct local_client *client = container_of(handle, struct local_client, conn.handle);
    size_t want = client->rlen + LOCAL_READ_CHUNK;

    /* rneed is at most max_packet_size, so the buffer is bounded by it. */
    if (want < client->rneed)
        want = client->rneed;
    if (client->rcap < want) {
        uint8_t *p = realloc(client->rbuf, want);
        if (!p) {
            *buf = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
            return;
        }
        client->rbuf = p;
        client->rcap = want;
    }
    *buf =
        uv_buf_init((char *)client->rbuf + client->rlen, (unsigned)(client->rcap - client->rlen));
}

void client_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct local_client *client = container_of(stream, struct local_client, conn.stream);

    if (nread == 0 || client_state_of(client) == CLIENT_CLOSING)
        return;
    if (nread < 0) {
        char why[128];
        if (nread == UV_EOF)
            snprintf(why, sizeof(why), "connection closed by the client without DISCONNECT");
        else
            snprintf(why, sizeof(why), "read failed: %s", uv_strerror((int)nread));
        /* Anyone can open and close connections as fast as they like: before
         * CONNECT that is not worth a log line each. */
        client->quiet_close = client_before_connect(client);
        client_close(client, CLOSE_ABORT, true, why);
        return;
    }
    client->rlen += (size_t)nread;
    client_process_input(client);
}

/* --- the end of a connection (local.client_event_cb) -------------------------- */

/* client_close() has begun; the state is still NEW or CONNECTED. */
static void client_closing(struct local_client *client, bool abnormal)
{
    /* A password check still queued need not run (uv_cancel fails, harmlessly,
     * once it is running); auth_after_work_cb frees it either way. */
    if (client->auth)
        auth_check_cancel(client->auth);
    client->publish_will = abnormal && client_state_of(client) == CLIENT_CONNECTED;
    /* From now on messages for the session wait in its queue (persistent)
     * or are dropped (clean): a closing connection sends nothing more. */
    if (client->session && client->session->client == client)
        client->session->client = NULL;
}

/* Both handles are closed: publish the will if due, drop the session
 * (client_finish() frees the client right after). */
static void client_finished(struct local_client *client)
{
    struct local *local = client->local;

    /* §3.1.2.5: the will is published when the connection ends without
     * DISCONNECT; §3.14.4-3 discards it on DISCONNECT (has_will cleared). */
    if (client->publish_will && client->has_will && !local->closing) {
        log_info(CLIENT_FMT ": publishing will message to '%s'", CLIENT_ARGS(client),
                 client->will_topic);
        local_dispatch(local, client->will_topic, strlen(client->will_topic), client->will_payload,
                       client->will_len, client->will_qos, client->will_retain);
        if (local->hooks.publish_cb)
            local->hooks.publish_cb(local->hooks.arg, client->id, client->will_topic,
                                    client->will_payload, client->will_len, client->will_qos,
                                    client->will_retain);
    }
    client_acks_orphan(client);
    /* §3.1.2.4: a clean session ends with its connection (freed here, not
     * in client_close(), which may run inside a subscription walk). */
    if (client->session && client->session->clean)
        session_free(client->session, true);
    client->session = NULL;
}

/* local_conn.c tells what happened to a connection (enum client_event). */
static void client_event_cb(struct local_client *client, enum client_event event, bool abnormal)
{
    switch (event) {
    case CLIENT_EVENT_CLOSING:
        client_closing(client, abnormal);
        break;
    case CLIENT_EVENT_FINISHED:
        client_finished(client);
        break;
    }
}

void client_events_install(struct local *local)
{
    local->client_event_cb = client_event_cb;
}
