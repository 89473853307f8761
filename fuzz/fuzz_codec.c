/* fuzz_codec.c - libFuzzer target for the MQTT 3.1.1 packet decoder.
 *
 * Frames and decodes every packet in the input as the local server does
 * (mqtt_decode_fixed_header, then mqtt_decode), walks SUBSCRIBE/UNSUBSCRIBE
 * lists, and checks that a decoded PUBLISH or CONNECT re-encodes to a packet
 * that decodes to the same fields (the encoders are what the server sends).
 * Any sanitizer report or failed check is a crash. Build: -Dfuzz=true.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mqtt_codec.h"
#include "topic.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond)
{
    if (!cond)
        abort();
}

static void roundtrip_publish(const struct mqtt_publish *p)
{
    uint8_t *buf;
    size_t len, consumed;
    struct mqtt_packet again;

    if (mqtt_encode_publish(NULL, 0, (const char *)p->topic.data, p->topic.len, p->payload.data,
                            p->payload.len, p->qos, p->retain, p->dup, p->packet_id,
                            &len) != -ENOBUFS)
        abort();
    buf = malloc(len);
    check(buf != NULL);
    check(mqtt_encode_publish(buf, len, (const char *)p->topic.data, p->topic.len, p->payload.data,
                              p->payload.len, p->qos, p->retain, p->dup, p->packet_id, &len) == 0);
    check(mqtt_decode(buf, len, 0, &again, &consumed, NULL) == 0);
    check(consumed == len && again.type == MQTT_PUBLISH);
    check(again.u.publish.qos == p->qos && again.u.publish.retain == p->retain);
    check(again.u.publish.topic.len == p->topic.len &&
          memcmp(again.u.publish.topic.data, p->topic.data, p->topic.len) == 0);
    check(again.u.publish.payload.len == p->payload.len);
    if (p->qos)
        check(again.u.publish.packet_id == p->packet_id);
    free(buf);
}

static void walk_filters(const struct mqtt_packet *pkt)
{
    struct mqtt_topic_iter iter = {0};
    struct mqtt_slice filter;
    uint8_t qos;
    size_t n = 0;

    if (pkt->type == MQTT_SUBSCRIBE) {
        while (mqtt_subscribe_next(&pkt->u.subscribe, &iter, &filter, &qos)) {
            check(qos <= 2);
            (void)topic_filter_check((const char *)filter.data, filter.len, NULL);
            n++;
        }
        check(n == pkt->u.subscribe.count);
    } else if (pkt->type == MQTT_UNSUBSCRIBE) {
        while (mqtt_unsubscribe_next(&pkt->u.unsubscribe, &iter, &filter))
            n++;
        check(n == pkt->u.unsubscribe.count);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t off = 0;
    /* The first byte picks a packet size limit, as local.max_packet_size does. */
    size_t max_packet = size ? (size_t)data[0] * 4 : 0;

    if (size) {
        data++;
        size--;
    }
    for (unsigned packets = 0; off < size && packets < 1000; packets++) {
        struct mqtt_fixed_header fh;
        struct mqtt_packet pkt;
        size_t consumed;
        const char *reason = NULL;
        int rc = mqtt_decode_fixed_header(data + off, size - off, max_packet, &fh, &reason);

        if (rc < 0)
            break;
        check(fh.header_len >= 2 && fh.header_len <= 5);
        if (size - off < fh.header_len + fh.remaining_length)
            break;
        rc = mqtt_decode(data + off, fh.header_len + fh.remaining_length, max_packet, &pkt,
                         &consumed, &reason);
        if (rc == 0) {
            check(consumed == fh.header_len + fh.remaining_length);
            if (pkt.type == MQTT_PUBLISH) {
                check(topic_name_check((const char *)pkt.u.publish.topic.data,
                                       pkt.u.publish.topic.len, NULL) == 0);
                roundtrip_publish(&pkt.u.publish);
            }
            walk_filters(&pkt);
        } else {
            check(reason != NULL);
        }
        off += fh.header_len + fh.remaining_length;
    }
    return 0;
}
