"""A tiny raw MQTT 3.1.1 client over a socket, for tests that must control
every byte (exact packet ids, DUP, dropping a connection between two steps of
a QoS 2 exchange, malformed packets). Used by test_local_sessions.py and
test_local_protocol.py."""

import socket
import struct
import time

import harness as h


def remaining_length(n):
    out = b""
    while True:
        digit, n = n % 128, n // 128
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def mqtt_str(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def packet(first_byte, body):
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect(client_id, clean=True, keepalive=30, will=None, level=4):
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += mqtt_str(topic) + mqtt_str(message)
    return packet(0x10, mqtt_str("MQTT") + bytes([level, flags]) + struct.pack(">H", keepalive)
                  + payload)


def publish(topic, payload, qos=0, packet_id=0, dup=False, retain=False):
    if isinstance(payload, str):
        payload = payload.encode()
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = mqtt_str(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    return packet(first, body)


def subscribe(packet_id, *filters_qos):
    body = struct.pack(">H", packet_id)
    for f, q in filters_qos:
        body += mqtt_str(f) + bytes([q])
    return packet(0x82, body)


def unsubscribe(packet_id, *filters):
    return packet(0xA2, struct.pack(">H", packet_id) + b"".join(mqtt_str(f) for f in filters))


def ack(kind, packet_id):
    first = {"PUBACK": 0x40, "PUBREC": 0x50, "PUBREL": 0x62, "PUBCOMP": 0x70}[kind]
    return packet(first, struct.pack(">H", packet_id))


TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
         7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}


class Packet:
    def __init__(self, first, body):
        self.type = TYPES.get(first >> 4, "?")
        self.flags = first & 0x0F
        self.body = body
        self.dup = bool(first & 0x08)
        self.qos = (first >> 1) & 3
        self.retain = bool(first & 1)
        if self.type == "PUBLISH":
            n = struct.unpack(">H", body[:2])[0]
            self.topic = body[2:2 + n].decode()
            rest = body[2 + n:]
            self.packet_id = struct.unpack(">H", rest[:2])[0] if self.qos else 0
            self.payload = rest[2:] if self.qos else rest
        elif self.type in ("PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "UNSUBACK"):
            self.packet_id = struct.unpack(">H", body[:2])[0]
        elif self.type == "CONNACK":
            self.session_present = bool(body[0] & 1)
            self.code = body[1]
        elif self.type == "SUBACK":
            self.packet_id = struct.unpack(">H", body[:2])[0]
            self.codes = list(body[2:])

    def __repr__(self):
        return "<%s %r>" % (self.type, self.__dict__)


class RawClient:
    def __init__(self, port, host="127.0.0.1", rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(h.TIMEOUT)
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return None
        return chunk

    def read(self, timeout=h.TIMEOUT):
        """The next packet, or None on EOF; raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf) and i <= 4:
                    n += (self.buf[i] & 0x7F) * mult
                    mult *= 128
                    if not self.buf[i] & 0x80:
                        break
                    i += 1
                if i < len(self.buf) and not self.buf[i] & 0x80 and len(self.buf) >= i + 1 + n:
                    pkt = Packet(self.buf[0], self.buf[i + 1:i + 1 + n])
                    self.buf = self.buf[i + 1 + n:]
                    return pkt
            if time.monotonic() >= deadline:
                raise h.HarnessError("no packet within %.1f s (have %r)" % (timeout, self.buf))
            chunk = self._fill(deadline)
            if chunk == b"":
                return None
            if chunk:
                self.buf += chunk

    def expect(self, kind, timeout=h.TIMEOUT):
        pkt = self.read(timeout)
        if pkt is None or pkt.type != kind:
            raise h.HarnessError("expected %s, got %r" % (kind, pkt))
        return pkt

    def expect_closed(self, timeout=h.TIMEOUT):
        """The server closes the connection (packets before the close are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self._fill(deadline)
            except (ConnectionResetError, BrokenPipeError):
                return
            if chunk == b"":
                return
        raise h.HarnessError("connection still open after %.1f s" % timeout)

    def connect(self, client_id, clean=True, **kwargs):
        self.send(connect(client_id, clean, **kwargs))
        pkt = self.expect("CONNACK")
        assert pkt.code == 0, pkt
        return pkt

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
