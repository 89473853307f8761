"""Malformed packets over a raw socket (MQTT 3.1.1 §4.8: the server closes
the connection) with the daemon still serving other clients afterwards:
each packet type truncated, oversize remaining lengths, invalid UTF-8."""

import struct

import pytest

import harness as h
import mqtt_raw as raw


def still_serving(hx, gw, watcher):
    """A healthy client's round trip still works after the abuse."""
    payload = "alive-%d" % len(watcher.received())
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "1", "-t", "probe/x",
                    "-m", payload)
    watcher.wait("probe/x", payload)


@pytest.fixture
def served(hx):
    gw = hx.gateway()
    watcher = hx.local_client(gw)
    watcher.subscribe("probe/#", qos=1)
    return gw, watcher


def truncate(pkt_bytes, cut):
    """Drop `cut` bytes from the end of the body and fix the remaining length,
    so the packet frames correctly but its contents are cut short."""
    first = pkt_bytes[0]
    i = 1
    while pkt_bytes[i] & 0x80:
        i += 1
    body = pkt_bytes[i + 1:]
    return raw.packet(first, body[:len(body) - cut])


CONNECT = raw.connect("trunc-client", will=("w/t", "bye", 1, False))
AFTER_CONNECT = {
    "PUBLISH-qos1": raw.publish("a/b", "", qos=1, packet_id=5),  # cut into the packet id
    "PUBLISH-topic": raw.publish("a/b", "", qos=0),
    "SUBSCRIBE": raw.subscribe(3, ("a/#", 1)),
    "UNSUBSCRIBE": raw.unsubscribe(4, "a/#"),
    "PUBACK": raw.ack("PUBACK", 1),
    "PUBREC": raw.ack("PUBREC", 1),
    "PUBREL": raw.ack("PUBREL", 1),
    "PUBCOMP": raw.ack("PUBCOMP", 1),
}


@pytest.mark.parametrize("cut", [1, 3])
def test_truncated_connect(hx, served, cut):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.send(truncate(CONNECT, cut))
    c.expect_closed()
    still_serving(hx, gw, watcher)


@pytest.mark.parametrize("kind", sorted(AFTER_CONNECT))
def test_truncated_packet_after_connect(hx, served, kind):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("trunc-" + kind)
    c.send(truncate(AFTER_CONNECT[kind], 1))
    c.expect_closed()
    gw.daemon.wait_log(r"client trunc-%s .*protocol error" % kind)
    still_serving(hx, gw, watcher)


def test_packet_cut_by_connection_close(hx, served):
    """Half a packet, then the socket closes: nothing is processed."""
    gw, watcher = served
    for n in range(1, 12):
        c = raw.RawClient(gw.tcp_port)
        c.connect("half-%d" % n)
        c.send(raw.publish("probe/x", "half", qos=1, packet_id=9)[:n])
        c.close()
    still_serving(hx, gw, watcher)
    assert all(m[1] != b"half" for m in watcher.received())


def test_remaining_length_with_five_bytes(hx, served):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("rl5")
    c.send(b"\x30\xff\xff\xff\xff\x7f")  # §2.2.3: at most four length bytes
    c.expect_closed()
    still_serving(hx, gw, watcher)


def test_remaining_length_above_max_packet_size(hx, served):
    """Refused as soon as the length is known; the body is never buffered."""
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("big")
    c.send(b"\x30" + raw.remaining_length(200 * 1024 * 1024) + b"\x00\x03a/b")
    c.expect_closed()
    gw.daemon.wait_log(r"client big .*exceeds local.max_packet_size")
    still_serving(hx, gw, watcher)


@pytest.mark.parametrize("topic", [b"a/\xff", b"a/\xc0\xaf", b"a/\xed\xa0\x80", b"a/\x00b"])
def test_invalid_utf8_topic_in_publish(hx, served, topic):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("utf8-pub")
    c.send(raw.packet(0x30, struct.pack(">H", len(topic)) + topic + b"payload"))
    c.expect_closed()
    still_serving(hx, gw, watcher)


def test_invalid_utf8_filter_in_subscribe(hx, served):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("utf8-sub")
    bad = b"a/\xfe"
    c.send(raw.packet(0x82, struct.pack(">HH", 1, len(bad)) + bad + b"\x00"))
    c.expect_closed()
    still_serving(hx, gw, watcher)


def test_invalid_filter_gets_suback_failure(hx, served):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("badfilter")
    c.send(raw.subscribe(7, ("a/#/b", 1), ("ok/+", 1)))
    assert c.expect("SUBACK").codes == [0x80, 1]  # §3.9.3


def test_second_connect_and_reserved_flags_close(hx, served):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.connect("twice")
    c.send(raw.connect("twice"))  # §3.1.0-2
    c.expect_closed()
    d = raw.RawClient(gw.tcp_port)
    hx.add_closer(d.close)
    d.connect("flags")
    d.send(raw.packet(0x80, struct.pack(">H", 1) + raw.mqtt_str("a") + b"\x01"))  # §3.8.1-1
    d.expect_closed()
    still_serving(hx, gw, watcher)


def test_unsupported_protocol_level_gets_connack_1(hx, served):
    gw, watcher = served
    c = raw.RawClient(gw.tcp_port)
    hx.add_closer(c.close)
    c.send(raw.connect("old", level=3))
    assert c.expect("CONNACK").code == 1  # §3.1.2.2
    c.expect_closed()


def test_garbage_before_connect(hx, served):
    gw, watcher = served
    for junk in (b"\x00\x00", b"GET / HTTP/1.1\r\n\r\n", b"\xf0\x00", b"\x30\x02\x00\x00"):
        c = raw.RawClient(gw.tcp_port)
        hx.add_closer(c.close)
        c.send(junk)
        c.expect_closed()
    still_serving(hx, gw, watcher)
