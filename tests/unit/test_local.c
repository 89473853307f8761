/* test_local.c - the local server's session logic (MQTT 3.1.1 §3.1.2.4,
 * §4.3, §4.4), queue limits and the retained store, driven through the
 * socket-less seam of local.h on a real libuv loop. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "loop_step.h"

#include "conf.h"
#include "local.h"
#include "log.h"
#include "mqtt_codec.h"

struct fixture {
    uv_loop_t loop;
    struct conf conf;
    struct local *local;
    char state_dir[64];
};

/* A test client: the seam client plus what it has received, unparsed. */
struct tc {
    struct local_client *client;
    uint8_t *buf;
    size_t len, off;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    log_init(LOG_ERR);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    f->conf.local.max_packet_size = 4096;
    f->conf.local.max_clients = 16;
    f->conf.local.max_inflight = 10;
    f->conf.local.max_queued = 100;
    f->conf.local.max_queued_bytes = 1024 * 1024;
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
    *state = f;
    return 0;
}

static void done_cb(void *arg)
{
    *(int *)arg = 1;
}

static void close_local(struct fixture *f)
{
    int done = 0;

    local_close(f->local, done_cb, &done);
    LOOP_UNTIL(&f->loop, done, 1000);
    assert_true(done);
    local_free(f->local);
    f->local = NULL;
}

static int teardown(void **state)
{
    struct fixture *f = *state;

    if (f->local)
        close_local(f);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

static void run_loop(struct fixture *f)
{
    uv_run(&f->loop, UV_RUN_NOWAIT);
}

static void tc_send(struct tc *t, const uint8_t *data, size_t len)
{
    local_test_client_input(t->client, data, len);
}

/* The next packet the server sent to @t, or false when there is none. */
static bool tc_next(struct tc *t, struct mqtt_packet *pkt)
{
    size_t consumed;

    if (t->off == t->len) {
        free(t->buf);
        t->buf = NULL;
        t->off = 0;
        local_test_client_output(t->client, &t->buf, &t->len);
        if (t->len == 0)
            return false;
    }
    assert_int_equal(mqtt_decode(t->buf + t->off, t->len - t->off, 0, pkt, &consumed, NULL), 0);
    t->off += consumed;
    return true;
}

static void tc_expect_none(struct tc *t)
{
    struct mqtt_packet pkt;

    if (tc_next(t, &pkt))
        fail_msg("unexpected %s", mqtt_packet_type_name(pkt.type));
}

static void tc_free(struct tc *t)
{
    free(t->buf);
    memset(t, 0, sizeof(*t));
}

static bool tc_connect(struct fixture *f, struct tc *t, const char *id, bool clean)
{
    struct mqtt_connect c = {.protocol_level = 4, .clean_session = clean, .keepalive_s = 0};
    uint8_t buf[256];
    size_t len;
    struct mqtt_packet pkt;

    tc_free(t);
    c.client_id.data = (const uint8_t *)id;
    c.client_id.len = strlen(id);
    assert_int_equal(local_test_client_new(f->local, &t->client), 0);
    assert_int_equal(mqtt_encode_connect(buf, sizeof(buf), &c, &len), 0);
    tc_send(t, buf, len);
    assert_true(tc_next(t, &pkt));
    assert_int_equal(pkt.type, MQTT_CONNACK);
    assert_int_equal(pkt.u.connack.code, 0);
    return pkt.u.connack.session_present;
}

static void tc_lose(struct fixture *f, struct tc *t)
{
    local_test_client_lose(t->client);
    run_loop(f);
    tc_free(t);
}

static void tc_subscribe(struct tc *t, const char *filter, uint8_t qos)
{
    uint8_t buf[256];
    size_t len;
    struct mqtt_packet pkt;

    assert_int_equal(mqtt_encode_subscribe(buf, sizeof(buf), 1, &filter, &qos, 1, &len), 0);
    tc_send(t, buf, len);
    assert_true(tc_next(t, &pkt));
    assert_int_equal(pkt.type, MQTT_SUBACK);
    assert_int_equal(pkt.u.suback.codes[0], qos);
}

static void tc_publish(struct tc *t, const char *topic, const char *payload, uint8_t qos,
                       bool retain, bool dup, uint16_t id)
{
    uint8_t buf[512];
    size_t len;

    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), topic, strlen(topic), payload,
                                         strlen(payload), qos, retain, dup, id, &len),
                     0);
    tc_send(t, buf, len);
}

static void tc_ack(struct tc *t, uint8_t type, uint16_t id)
{
    uint8_t buf[4];
    size_t len;

    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), type, id, &len), 0);
    tc_send(t, buf, len);
}

static void expect_ack(struct tc *t, uint8_t type, uint16_t id)
{
    struct mqtt_packet pkt;

    assert_true(tc_next(t, &pkt));
    assert_int_equal(pkt.type, type);
    assert_int_equal(pkt.u.packet_id, id);
}

/* The next packet is a PUBLISH of @payload; returns its packet id. */
static uint16_t expect_publish(struct tc *t, const char *payload, uint8_t qos, bool dup,
                               bool retain)
{
    struct mqtt_packet pkt;

    assert_true(tc_next(t, &pkt));
    assert_int_equal(pkt.type, MQTT_PUBLISH);
    assert_int_equal(pkt.u.publish.payload.len, strlen(payload));
    assert_memory_equal(pkt.u.publish.payload.data, payload, strlen(payload));
    assert_int_equal(pkt.u.publish.qos, qos);
    assert_int_equal(pkt.u.publish.dup, dup);
    assert_int_equal(pkt.u.publish.retain, retain);
    return pkt.u.publish.packet_id;
}

/* §3.1.2.4, §3.2.2.2: subscriptions and QoS>0 messages outlive the
 * connection of a clean-session-0 client; session present says so. */
static void test_persistent_session_queue(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};

    assert_false(tc_connect(f, &sub, "keeper", false));
    tc_subscribe(&sub, "q/#", 2);
    tc_lose(f, &sub);

    tc_connect(f, &pub, "pub", true);
    tc_publish(&pub, "q/a", "one", 1, false, false, 1);
    expect_ack(&pub, MQTT_PUBACK, 1);
    tc_publish(&pub, "q/b", "two", 2, false, false, 2);
    expect_ack(&pub, MQTT_PUBREC, 2);
    tc_ack(&pub, MQTT_PUBREL, 2);
    expect_ack(&pub, MQTT_PUBCOMP, 2);
    tc_publish(&pub, "q/c", "zero", 0, false, false, 0); /* QoS 0: not queued */

    assert_true(tc_connect(f, &sub, "keeper", false));
    uint16_t id1 = expect_publish(&sub, "one", 1, false, false);
    uint16_t id2 = expect_publish(&sub, "two", 2, false, false);
    assert_int_not_equal(id1, id2);
    tc_expect_none(&sub);
    tc_ack(&sub, MQTT_PUBACK, id1);
    tc_ack(&sub, MQTT_PUBREC, id2);
    expect_ack(&sub, MQTT_PUBREL, id2);
    tc_ack(&sub, MQTT_PUBCOMP, id2);
    /* The subscription is still there while connected. */
    tc_publish(&pub, "q/d", "live", 1, false, false, 3);
    expect_ack(&pub, MQTT_PUBACK, 3);
    expect_publish(&sub, "live", 1, false, false);
    tc_free(&sub);
    tc_free(&pub);
}

/* §4.4: unacknowledged PUBLISH re-sent with DUP and the same id, PUBREL
 * re-sent, after the client reconnects with clean session 0. */
static void test_redelivery_with_dup(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};
    uint16_t id1, id2;

    tc_connect(f, &sub, "redeliver", false);
    tc_subscribe(&sub, "r", 2);
    tc_connect(f, &pub, "pub", true);
    tc_publish(&pub, "r", "q1", 1, false, false, 1);
    tc_publish(&pub, "r", "q2", 2, false, false, 2);
    id1 = expect_publish(&sub, "q1", 1, false, false);
    id2 = expect_publish(&sub, "q2", 2, false, false);
    tc_ack(&sub, MQTT_PUBREC, id2);
    expect_ack(&sub, MQTT_PUBREL, id2);
    tc_lose(f, &sub); /* neither PUBACK for q1 nor PUBCOMP for q2 */

    assert_true(tc_connect(f, &sub, "redeliver", false));
    assert_int_equal(expect_publish(&sub, "q1", 1, true, false), id1);
    expect_ack(&sub, MQTT_PUBREL, id2);
    tc_expect_none(&sub);
    tc_ack(&sub, MQTT_PUBACK, id1);
    tc_ack(&sub, MQTT_PUBCOMP, id2);
    tc_lose(f, &sub);
    assert_true(tc_connect(f, &sub, "redeliver", false));
    tc_expect_none(&sub); /* everything acknowledged: nothing re-sent */
    tc_free(&sub);
    tc_free(&pub);
}

/* §4.3.3: an inbound QoS 2 PUBLISH re-sent with DUP after a reconnect (the
 * client never saw PUBREC) is acknowledged but not delivered again. */
static void test_inbound_qos2_exactly_once_across_reconnect(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};

    tc_connect(f, &sub, "watcher", true);
    tc_subscribe(&sub, "x", 2);
    tc_connect(f, &pub, "sender", false);
    tc_publish(&pub, "x", "once", 2, false, false, 7);
    expect_ack(&pub, MQTT_PUBREC, 7);
    tc_lose(f, &pub);
    assert_true(tc_connect(f, &pub, "sender", false));
    tc_publish(&pub, "x", "once", 2, false, true, 7);
    expect_ack(&pub, MQTT_PUBREC, 7);
    tc_ack(&pub, MQTT_PUBREL, 7);
    expect_ack(&pub, MQTT_PUBCOMP, 7);
    /* After PUBREL the id is free: the same id is a new message. */
    tc_publish(&pub, "x", "again", 2, false, false, 7);
    expect_ack(&pub, MQTT_PUBREC, 7);

    uint16_t id = expect_publish(&sub, "once", 2, false, false);
    expect_publish(&sub, "again", 2, false, false);
    tc_expect_none(&sub); /* "once" exactly once */
    tc_ack(&sub, MQTT_PUBREC, id);
    expect_ack(&sub, MQTT_PUBREL, id);
    tc_ack(&sub, MQTT_PUBCOMP, id);
    tc_expect_none(&sub);
    tc_free(&sub);
    tc_free(&pub);
}

/* §3.1.2.4: clean session 1 discards the stored session. */
static void test_clean_session_discards(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};

    tc_connect(f, &sub, "c", false);
    tc_subscribe(&sub, "d", 1);
    tc_lose(f, &sub);
    assert_false(tc_connect(f, &sub, "c", true)); /* §3.2.2-1: present 0 */
    tc_lose(f, &sub);
    assert_false(tc_connect(f, &sub, "c", false)); /* nothing left to resume */
    tc_connect(f, &pub, "p", true);
    tc_publish(&pub, "d", "gone", 1, false, false, 1);
    expect_ack(&pub, MQTT_PUBACK, 1);
    tc_expect_none(&sub);
    tc_free(&sub);
    tc_free(&pub);
}

/* Takeover (§3.1.4-2) hands the persistent session to the new connection. */
static void test_takeover_keeps_session(void **state)
{
    struct fixture *f = *state;
    struct tc a = {0}, b = {0}, pub = {0};

    tc_connect(f, &a, "dup", false);
    tc_subscribe(&a, "t", 1);
    assert_true(tc_connect(f, &b, "dup", false));
    assert_true(local_test_client_closing(a.client));
    run_loop(f);
    tc_free(&a);
    tc_connect(f, &pub, "p", true);
    tc_publish(&pub, "t", "to-b", 1, false, false, 1);
    expect_publish(&b, "to-b", 1, false, false);
    tc_free(&b);
    tc_free(&pub);
}

/* The in-flight window: at most max_inflight unacknowledged, the rest waits
 * and follows as acknowledgements arrive; ids are reused only when free. */
static void test_inflight_window(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};
    uint16_t ids[12];
    char payload[8];

    f->conf.local.max_inflight = 3;
    tc_connect(f, &sub, "slowish", true);
    tc_subscribe(&sub, "w", 1);
    tc_connect(f, &pub, "p", true);
    for (int i = 0; i < 6; i++) {
        snprintf(payload, sizeof(payload), "m%d", i);
        tc_publish(&pub, "w", payload, 1, false, false, (uint16_t)(i + 1));
    }
    for (int i = 0; i < 3; i++) {
        snprintf(payload, sizeof(payload), "m%d", i);
        ids[i] = expect_publish(&sub, payload, 1, false, false);
    }
    tc_expect_none(&sub);
    tc_ack(&sub, MQTT_PUBACK, ids[1]); /* out of order is fine */
    expect_publish(&sub, "m3", 1, false, false);
    tc_expect_none(&sub);
    tc_ack(&sub, MQTT_PUBACK, ids[0]);
    tc_ack(&sub, MQTT_PUBACK, ids[2]);
    expect_publish(&sub, "m4", 1, false, false);
    expect_publish(&sub, "m5", 1, false, false);
    tc_expect_none(&sub);
    tc_free(&sub);
    tc_free(&pub);
}

/* Queue policy: an offline persistent session keeps the newest max_queued
 * messages (drop-oldest); a connected client whose queue overflows is
 * disconnected as a slow consumer, and its session keeps the queue. */
static void test_queue_limits(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};
    char payload[8];

    f->conf.local.max_queued = 3;
    f->conf.local.max_inflight = 1;
    tc_connect(f, &sub, "away", false);
    tc_subscribe(&sub, "l", 1);
    tc_lose(f, &sub);
    tc_connect(f, &pub, "p", true);
    for (int i = 0; i < 5; i++) {
        snprintf(payload, sizeof(payload), "m%d", i);
        tc_publish(&pub, "l", payload, 1, false, false, (uint16_t)(i + 1));
    }
    assert_true(tc_connect(f, &sub, "away", false));
    uint16_t id = expect_publish(&sub, "m2", 1, false, false); /* m0, m1 dropped */
    tc_expect_none(&sub);                                      /* window of 1 */
    tc_ack(&sub, MQTT_PUBACK, id);
    expect_publish(&sub, "m3", 1, false, false); /* not acknowledged: stuck */
    /* m4 waits; m5..m7 fill the queue; m8 overflows it: disconnect. */
    for (int i = 5; i < 9; i++) {
        snprintf(payload, sizeof(payload), "m%d", i);
        tc_publish(&pub, "l", payload, 1, false, false, (uint16_t)(i + 1));
    }
    assert_true(local_test_client_closing(sub.client));
    run_loop(f);
    tc_free(&sub);
    assert_true(tc_connect(f, &sub, "away", false));
    expect_publish(&sub, "m3", 1, true, false); /* §4.4 redelivery */
    tc_free(&sub);
    tc_free(&pub);
}

/* Overlapping subscriptions: one copy at the highest granted QoS (§3.3.5). */
static void test_overlap_one_copy(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};

    tc_connect(f, &sub, "o", true);
    tc_subscribe(&sub, "a/+", 0);
    tc_subscribe(&sub, "a/#", 1);
    tc_subscribe(&sub, "#", 0);
    tc_connect(f, &pub, "p", true);
    tc_publish(&pub, "a/b", "x", 2, false, false, 1);
    expect_ack(&pub, MQTT_PUBREC, 1);
    expect_publish(&sub, "x", 1, false, false);
    tc_expect_none(&sub);
    tc_free(&sub);
    tc_free(&pub);
}

static void make_state_dir(struct fixture *f)
{
    snprintf(f->state_dir, sizeof(f->state_dir), "/tmp/uplk-unit-XXXXXX");
    assert_non_null(mkdtemp(f->state_dir));
    f->conf.state_dir = f->state_dir;
}

static void remove_state_dir(struct fixture *f)
{
    char path[128];

    snprintf(path, sizeof(path), "%s/retained.db", f->state_dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/retained.db.corrupt", f->state_dir);
    unlink(path);
    rmdir(f->state_dir);
}

/* Retained messages are written to state_dir and come back after a restart. */
/* local.max_clients counts connected clients only (issue 12): connections
 * still waiting for CONNECT take no slot, and a CONNECT over the limit gets
 * CONNACK 3 (§3.2.2.3) instead of a silent close. */
static void test_max_clients_counts_connected_only(void **state)
{
    struct fixture *f = *state;
    struct local_client *idle[10];
    struct tc a = {0}, b = {0}, over = {0};
    struct mqtt_connect c = {.protocol_level = 4, .clean_session = true};
    struct local_stats stats;
    struct mqtt_packet pkt;
    uint8_t buf[64];
    size_t len;

    f->conf.local.max_clients = 2;
    for (size_t i = 0; i < 10; i++)
        assert_int_equal(local_test_client_new(f->local, &idle[i]), 0);
    tc_connect(f, &a, "a", true);
    tc_connect(f, &b, "b", true);

    assert_int_equal(local_test_client_new(f->local, &over.client), 0);
    c.client_id.data = (const uint8_t *)"over";
    c.client_id.len = 4;
    assert_int_equal(mqtt_encode_connect(buf, sizeof(buf), &c, &len), 0);
    tc_send(&over, buf, len);
    assert_true(tc_next(&over, &pkt));
    assert_int_equal(pkt.type, MQTT_CONNACK);
    assert_int_equal(pkt.u.connack.code, MQTT_CONNACK_SERVER_UNAVAILABLE);
    assert_true(local_test_client_closing(over.client));
    local_get_stats(f->local, &stats);
    assert_int_equal(stats.connected, 2);
    assert_int_equal(stats.max_clients, 1);

    /* A slot freed is a slot for the next CONNECT. */
    tc_lose(f, &a);
    tc_connect(f, &a, "a2", true);
    tc_free(&a);
    tc_free(&b);
    tc_free(&over);
}

/* local.connect_deadline runs from accept to a complete CONNECT: bytes that
 * trickle in do not extend it. */
static void test_connect_deadline_not_extended(void **state)
{
    struct fixture *f = *state;
    struct mqtt_connect c = {.protocol_level = 4, .clean_session = true};
    struct local_client *slow;
    struct local_stats stats;
    uint8_t buf[128];
    size_t len, sent = 0;

    f->conf.local.connect_deadline_ms = 100;
    c.client_id.data = (const uint8_t *)"slowloris-with-a-long-client-id";
    c.client_id.len = strlen((const char *)c.client_id.data);
    assert_int_equal(mqtt_encode_connect(buf, sizeof(buf), &c, &len), 0);
    assert_int_equal(local_test_client_new(f->local, &slow), 0);
    /* One byte every 20 ms, never the last: 40 bytes would take 800 ms.
     * Once closed, the loop frees the client: watch the count instead. */
    local_get_stats(f->local, &stats);
    while (sent + 1 < len && stats.deadline == 0) {
        local_test_client_input(slow, buf + sent++, 1);
        uv_sleep(20);
        uv_update_time(&f->loop);
        run_loop(f);
        local_get_stats(f->local, &stats);
    }
    assert_int_equal(stats.deadline, 1);
    assert_true(sent + 1 < len); /* closed long before the packet was whole */
}

static void test_retained_store_survives_restart(void **state)
{
    struct fixture *f = *state;
    struct tc sub = {0}, pub = {0};

    make_state_dir(f);
    assert_int_equal(local_start(f->local), 0);
    tc_connect(f, &pub, "p", true);
    tc_publish(&pub, "cfg/a", "A", 1, true, false, 1);
    tc_publish(&pub, "cfg/b", "B", 0, true, false, 0);
    tc_publish(&pub, "cfg/c", "C", 0, true, false, 0);
    tc_publish(&pub, "cfg/c", "", 0, true, false, 0); /* cleared (§3.3.1-10) */
    tc_free(&pub);
    close_local(f); /* flushes the store */

    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
    assert_int_equal(local_start(f->local), 0);
    tc_connect(f, &sub, "s", true);
    tc_subscribe(&sub, "cfg/#", 1);
    struct mqtt_packet pkt;
    int seen = 0;
    while (tc_next(&sub, &pkt)) {
        assert_int_equal(pkt.type, MQTT_PUBLISH);
        assert_true(pkt.u.publish.retain);
        assert_int_equal(pkt.u.publish.payload.len, 1);
        assert_true(pkt.u.publish.payload.data[0] == 'A' || pkt.u.publish.payload.data[0] == 'B');
        seen++;
    }
    assert_int_equal(seen, 2);
    tc_free(&sub);
    close_local(f);
    remove_state_dir(f);
    f->local = NULL;
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
}

/* Retained payloads a fresh subscriber to cfg/# gets, as a string of their
 * first bytes (sorted by arrival). */
static void retained_seen(struct fixture *f, char *out, size_t size)
{
    struct tc sub = {0};
    struct mqtt_packet pkt;
    size_t n = 0;

    tc_connect(f, &sub, "s", true);
    tc_subscribe(&sub, "cfg/#", 1);
    while (tc_next(&sub, &pkt) && n + 1 < size) {
        assert_int_equal(pkt.type, MQTT_PUBLISH);
        assert_true(pkt.u.publish.retain);
        out[n++] = (char)pkt.u.publish.payload.data[0];
    }
    out[n] = '\0';
    tc_free(&sub);
}

static void restart_local(struct fixture *f)
{
    close_local(f);
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
    assert_int_equal(local_start(f->local), 0);
}

static int count_chars(const char *s, const char *set)
{
    int n = 0;
    for (; *s; s++)
        n += strchr(set, *s) != NULL;
    return n;
}

/* One flipped byte in the store loses only that retained message (issue 12
 * item 4); the damaged bytes are kept in <state_dir>/damaged/ and the store
 * is rewritten without them. */
static void test_retained_store_flipped_byte(void **state)
{
    struct fixture *f = *state;
    struct tc pub = {0};
    char path[128], seen[16], cmd[300];

    make_state_dir(f);
    assert_int_equal(local_start(f->local), 0);
    tc_connect(f, &pub, "p", true);
    tc_publish(&pub, "cfg/a", "A-payload", 0, true, false, 0);
    tc_publish(&pub, "cfg/b", "B-payload", 0, true, false, 0);
    tc_publish(&pub, "cfg/c", "C-payload", 0, true, false, 0);
    tc_free(&pub);
    close_local(f);

    snprintf(path, sizeof(path), "%s/retained.db", f->state_dir);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    uint8_t data[256];
    size_t len = fread(data, 1, sizeof(data), fp);
    /* Header 24 bytes, then three records of 28 + 5 + 9 bytes: flip a
     * payload byte of the second. */
    assert_int_equal(len, 24 + 3 * 42);
    data[24 + 42 + 28 + 5 + 4] ^= 0x20;
    fseek(fp, 0, SEEK_SET);
    fwrite(data, 1, len, fp);
    fclose(fp);

    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
    assert_int_equal(local_start(f->local), 0);
    retained_seen(f, seen, sizeof(seen));
    assert_int_equal(strlen(seen), 2);
    assert_int_equal(count_chars(seen, "AC"), 2);
    snprintf(cmd, sizeof(cmd), "test -s %s/damaged/retained.db-66.bin", f->state_dir);
    assert_int_equal(system(cmd), 0);
    /* Rewritten without the damage: the next start loads the same two. */
    restart_local(f);
    retained_seen(f, seen, sizeof(seen));
    assert_int_equal(count_chars(seen, "AC"), 2);
    close_local(f);
    snprintf(cmd, sizeof(cmd), "rm -rf %s/damaged", f->state_dir);
    assert_int_equal(system(cmd), 0);
    remove_state_dir(f);
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
}

static uint32_t ieee_crc32(const uint8_t *p, size_t len)
{
    uint32_t crc = ~0u;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? 0xEDB88320u ^ (crc >> 1) : crc >> 1;
    }
    return ~crc;
}

/* A store in the first format ("UPLKRTN1", CRC-32) still loads, and is
 * rewritten in the new one. */
static void test_retained_store_old_format(void **state)
{
    struct fixture *f = *state;
    uint8_t data[64];
    size_t n = 0;
    char path[128], seen[16];

    make_state_dir(f);
    memcpy(data, "UPLKRTN1\0\0\0\2", 12);
    n = 12;
    static const char *const topics[] = {"cfg/x", "cfg/y"};
    for (int i = 0; i < 2; i++) {
        uint8_t rec[] = {0, 5, 1, 0, 0, 0, 1};
        memcpy(data + n, rec, sizeof(rec));
        n += sizeof(rec);
        memcpy(data + n, topics[i], 5);
        n += 5;
        data[n++] = (uint8_t)('X' + i);
    }
    uint32_t crc = ieee_crc32(data, n);
    for (int i = 3; i >= 0; i--)
        data[n++] = (uint8_t)(crc >> (8 * i));
    snprintf(path, sizeof(path), "%s/retained.db", f->state_dir);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fwrite(data, 1, n, fp);
    fclose(fp);

    assert_int_equal(local_start(f->local), 0);
    retained_seen(f, seen, sizeof(seen));
    assert_int_equal(count_chars(seen, "XY"), 2);
    close_local(f);
    fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fread(data, 1, 8, fp), 8);
    fclose(fp);
    assert_memory_equal(data, "UPLKRTN2", 8);
    remove_state_dir(f);
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
}

/* A damaged store is reported and moved aside; the server still starts. */
static void test_retained_store_corrupt(void **state)
{
    struct fixture *f = *state;
    static const char *const garbage[] = {
        "not a store",
        "UPLKRTN1\x00\x00\x00\x01\x00\x05\x00\x00\x00\x00\x01topicX\x12\x34\x56\x78",
    };
    char path[128], aside[128];
    struct stat st;

    make_state_dir(f);
    snprintf(path, sizeof(path), "%s/retained.db", f->state_dir);
    snprintf(aside, sizeof(aside), "%s/retained.db.corrupt", f->state_dir);
    for (size_t i = 0; i < 2; i++) {
        FILE *fp = fopen(path, "wb");
        assert_non_null(fp);
        fwrite(garbage[i], 1, i == 0 ? strlen(garbage[i]) : 29, fp);
        fclose(fp);
        close_local(f);
        assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
        assert_int_equal(local_start(f->local), 0);
        assert_int_equal(stat(aside, &st), 0);
        assert_int_not_equal(stat(path, &st), 0);
        unlink(aside);
    }
    close_local(f);
    remove_state_dir(f);
    assert_int_equal(local_new(&f->loop, &f->conf, NULL, &f->local), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_persistent_session_queue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_redelivery_with_dup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inbound_qos2_exactly_once_across_reconnect, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_clean_session_discards, setup, teardown),
        cmocka_unit_test_setup_teardown(test_takeover_keeps_session, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inflight_window, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queue_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_overlap_one_copy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_clients_counts_connected_only, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_deadline_not_extended, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retained_store_survives_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retained_store_corrupt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retained_store_flipped_byte, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retained_store_old_format, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
