"""Profile akenza: the device's JWT, its uplink topics and downlink delivery.

akenza ("MQTT device connectivity", JWT): client id = device id, password a JWT with
aud https://akenza.io/devices/<id>, sub = <id>, header kid = hex SHA-256 of the public key's
DER; uplink /up/device/id/<id>[/<sub>], downlink /down/device/id/<id>/#.

The token is checked twice, by implementations independent of uplinkd's: python3-jwt on the
password captured from a CONNECT (a plain-TCP listener in this file), and the fake cloud's
plugin (tests/fakecloud) with require_kid, whose log shows the decoded claims.
"""

import json
import os
import socket
import struct
import threading

import jwt
import pytest

import fakecloud
import harness as h

DEVICE = "gw-test"
AUD = "https://akenza.io/devices/" + DEVICE


def akenza_uplink(key, **auth):
    section = {"type": "jwt", "key": key.private_path, "clock_check": "build-date"}
    section.update(auth)
    return {"profile": "akenza", "auth": section}


class ConnectCapture:
    """A TCP listener on every loopback address (localhost may resolve to ::1 first, as it
    does on a fresh Debian) that reads one MQTT CONNECT per connection, keeps its fields and
    hangs up."""

    def __init__(self):
        self.port, self._listeners = h.listen_loopback(4)
        self._stop = threading.Event()
        self.connects = []
        self.thread = threading.Thread(target=h.accept_loop,
                                       args=(self._listeners, self._stop, self._serve),
                                       daemon=True)
        self.thread.start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(h.TIMEOUT)
            try:
                self.connects.append(self._read_connect(conn))
            except (OSError, ValueError):
                pass

    @staticmethod
    def _read_exact(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ValueError("closed")
            data += chunk
        return data

    def _read_connect(self, conn):
        first = self._read_exact(conn, 1)[0]
        if first != 0x10:
            raise ValueError("not CONNECT")
        length, shift = 0, 0
        while True:
            b = self._read_exact(conn, 1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        body = self._read_exact(conn, length)
        pos = 0

        def string():
            nonlocal pos
            (n,) = struct.unpack_from(">H", body, pos)
            pos += 2 + n
            return body[pos - n:pos]

        assert string() == b"MQTT"
        flags = body[pos + 1]
        pos += 4  # level, flags, keepalive
        fields = {"client_id": string().decode()}
        if flags & 0x04:  # MQTT 3.1.1 §3.1.2.5: will topic and message follow
            string()
            string()
        if flags & 0x80:
            fields["username"] = string().decode()
        if flags & 0x40:
            fields["password"] = string().decode()
        return fields

    def close(self):
        self._stop.set()
        self.thread.join(5)
        for s in self._listeners:
            s.close()


def test_token_verified_by_pyjwt(hx):
    key = fakecloud.Key.generate("ES256", hx.dir, "device")
    capture = ConnectCapture()
    hx.add_closer(capture.close)
    up = akenza_uplink(key)
    up.update({"host": "127.0.0.1", "port": capture.port, "tls": {"enabled": False}})
    conf = hx.config(None, port=capture.port, uplink=up)
    del conf["uplinks"][0]["generic"]
    hx.uplinkd(conf)
    connect = h.wait_for(lambda: capture.connects and capture.connects[0],
                         what="a CONNECT at the capture listener")
    assert connect["client_id"] == DEVICE
    assert connect["username"] == "unused"
    token = connect["password"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["kid"] == key.kid
    claims = jwt.decode(token, open(key.public_path, "rb").read(), algorithms=["ES256"],
                        audience=AUD)
    assert claims["sub"] == DEVICE
    assert claims["aud"] == AUD
    assert 0 < claims["exp"] - claims["iat"] <= 24 * 3600


def start(hx, key_alg="RS256", **auth):
    key = fakecloud.Key.generate(key_alg, hx.dir, "device")
    cloud = fakecloud.start(hx, keys=[key], aud=auth.get("aud", AUD), skew=5, require_kid=True)
    conf = hx.config(cloud, uplink=akenza_uplink(key, **auth))
    del conf["uplinks"][0]["generic"]
    observer = hx.cloud_client(cloud)
    observer.subscribe("/up/#", qos=2)
    daemon = hx.uplinkd(conf)
    line = cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    return cloud, daemon, conf, observer, key, line


def test_fake_cloud_accepts_kid_aud_sub(hx):
    _, _, _, _, key, line = start(hx, "RS256")
    assert line["alg"] == "RS256"
    assert line["kid"] == key.kid == line["key_kid"]
    assert line["claims"]["aud"] == AUD
    assert line["claims"]["sub"] == DEVICE


def test_bare_id_audience_from_config(hx):
    _, _, _, _, _, line = start(hx, "ES256", aud=DEVICE)
    assert line["claims"]["aud"] == DEVICE and line["claims"]["sub"] == DEVICE


def test_refused_token_explained_in_akenza_terms(hx):
    key = fakecloud.Key.generate("ES256", hx.dir, "device")
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5, require_kid=True)
    conf = hx.config(cloud, uplink=akenza_uplink(key, aud="not-" + DEVICE))
    del conf["uplinks"][0]["generic"]
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id=DEVICE, result="refused", reason="wrong aud")
    # The profile's checklist and the token's facts in one line (kid = the key's SHA-256).
    daemon.wait_log(r"the server refused the JWT \(CONNACK 5\): akenza rejected the JWT: check "
                    r"alg \(RS256 or ES256\) against the key uploaded to akenza, .* sub = the "
                    r"device id, kid = SHA-256 of the public key, and the clock \(sent: alg "
                    r"ES256, kid %s, aud \"not-%s\"" % (key.kid, DEVICE))


def test_uplink_topics_and_downlink_delivery(hx):
    cloud, daemon, conf, observer, _, _ = start(hx)
    unix = h.local_unix_path(conf)
    gw = type("Gw", (), {"unix": unix, "tcp_port": h.local_tcp_port(conf)})
    local = hx.local_client(gw)
    local.publish("dev/gw-test/telemetry", b'{"t":21.5}', qos=1)
    local.publish("dev/gw-test/telemetry/env", b"e1", qos=2)
    local.publish("dev/gw-test/state", b"s1", qos=1)
    observer.wait("/up/device/id/gw-test", '{"t":21.5}')
    observer.wait("/up/device/id/gw-test/env", "e1")
    observer.wait("/up/device/id/gw-test/state", "s1")
    assert all(m[2] == 1 for m in observer.received())  # QoS 2 goes up as 1

    # Another child: akenza has no gateways, so it is refused with the reason.
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    local.publish("dev/other/telemetry", b"x", qos=1)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "akenza has no gateways" in json.loads(payload)["error"]

    sub = hx.local_sub(gw, "dev/#")
    h.wait_for(lambda: "/down/device/id/gw-test/#" in cloud.log_text(),
               what="SUBSCRIBE /down/device/id/gw-test/#")
    observer.publish("/down/device/id/gw-test/config", b"cfg", qos=1)
    observer.publish("/down/device/id/gw-test/reboot", b"now", qos=1)
    observer.publish("/down/device/id/gw-test", b"bare", qos=1)
    observer.publish("/down/device/id/someone-else/reboot", b"not-ours", qos=1)
    sub.wait("dev/gw-test/commands", "bare")
    got = [(m[0], m[1]) for m in sub.messages() if "/telemetry" not in m[0]]
    assert got == [("dev/gw-test/config", "cfg"), ("dev/gw-test/commands/reboot", "now"),
                   ("dev/gw-test/commands", "bare")]
    late = hx.local_sub(gw, "dev/gw-test/config")
    assert late.wait("dev/gw-test/config", "cfg")[3]  # retained locally
    assert [m[0] for m in observer.received()] == [
        "/up/device/id/gw-test", "/up/device/id/gw-test/env", "/up/device/id/gw-test/state"]


# --------------------------------------------------------------------------
# Per-device sessions (akenza.child_key): one upstream session per child
# --------------------------------------------------------------------------

def child_keys(hx, *specs):
    """{child: Key} in hx.dir/devices, named <child>.key as akenza.child_key expects."""
    devices = os.path.join(hx.dir, "devices")
    os.makedirs(devices, exist_ok=True)
    return {child: fakecloud.Key.generate(alg, devices, child) for child, alg in specs}


def test_child_session_token_verified_by_pyjwt(hx):
    key = fakecloud.Key.generate("ES256", hx.dir, "device")
    keys = child_keys(hx, ("child-1", "RS256"))
    capture = ConnectCapture()
    hx.add_closer(capture.close)
    up = akenza_uplink(key)
    up.update({"host": "127.0.0.1", "port": capture.port, "tls": {"enabled": False},
               "akenza": {"child_key": os.path.join(hx.dir, "devices", "%c.key")}})
    conf = hx.config(None, port=capture.port, uplink=up)
    del conf["uplinks"][0]["generic"]
    hx.uplinkd(conf)
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", "1", "-t",
                    "dev/child-1/telemetry", "-m", "x")
    connect = h.wait_for(lambda: next((c for c in capture.connects
                                       if c["client_id"] == "child-1"), None),
                         what="a CONNECT from child-1's session")
    token = connect["password"]
    assert jwt.get_unverified_header(token)["kid"] == keys["child-1"].kid
    claims = jwt.decode(token, open(keys["child-1"].public_path, "rb").read(),
                        algorithms=["RS256"], audience="https://akenza.io/devices/child-1")
    assert claims["sub"] == "child-1"


def start_sessions(hx, idle=None):
    gw_key = fakecloud.Key.generate("ES256", hx.dir, "device")
    keys = child_keys(hx, ("child-1", "ES256"), ("child-2", "RS256"))
    # One aud for every session: the fake cloud checks a single audience.
    cloud = fakecloud.start(hx, keys=[gw_key] + list(keys.values()), aud="akenza-test", skew=5,
                            require_kid=True)
    up = akenza_uplink(gw_key, aud="akenza-test")
    up["akenza"] = {"child_key": os.path.join(hx.dir, "devices", "%c.key")}
    if idle:
        up["akenza"]["session_idle"] = idle
    conf = hx.config(cloud, uplink=up)
    del conf["uplinks"][0]["generic"]
    observer = hx.cloud_client(cloud)
    observer.subscribe("/up/#", qos=1)
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    gw = type("Gw", (), {"unix": h.local_unix_path(conf), "tcp_port": h.local_tcp_port(conf)})
    return cloud, daemon, conf, observer, keys, gw


def test_per_device_sessions(hx):
    cloud, daemon, conf, observer, keys, gw = start_sessions(hx)
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    local = hx.local_client(gw)
    local.publish("dev/child-1/telemetry", b"c1", qos=1)
    local.publish("dev/child-2/telemetry/x", b"c2", qos=1)
    local.publish("dev/gw-test/telemetry", b"gw", qos=1)
    observer.wait("/up/device/id/child-1", "c1")
    observer.wait("/up/device/id/child-2/x", "c2")
    observer.wait("/up/device/id/gw-test", "gw")
    for child, alg in (("child-1", "ES256"), ("child-2", "RS256")):
        line = cloud.wait_event("connect", client_id=child, result="accepted")
        assert line["alg"] == alg and line["kid"] == keys[child].kid
        assert line["claims"]["sub"] == child and line["claims"]["aud"] == "akenza-test"
    # One session each, however many messages.
    local.publish("dev/child-1/telemetry", b"c1-again", qos=1)
    observer.wait("/up/device/id/child-1", "c1-again")
    assert len(cloud.events("connect", client_id="child-1")) == 1
    # uplinkctl: the sessions in status, each child's own in children.
    h.wait_for(lambda: status_sessions(conf)["online"] == 2
               and status_sessions(conf)["queued"] == 0,
               what=lambda: "2 sessions online, drained: %s" % status_sessions(conf))
    out = h.uplinkctl(conf["control"]["socket"], "children")
    by_id = {c["id"]: c["uplinks"][0] for c in json.loads(out.stdout)["children"]}
    assert by_id["child-1"]["session"] == {"state": "ONLINE", "queued": 0, "published": 2,
                                           "connects": 1}
    assert "session" not in by_id["gw-test"]  # the uplink's own device

    # A child without a key file is refused with the reason; nothing goes up.
    local.publish("dev/child-3/telemetry", b"c3", qos=1)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "no usable key" in json.loads(payload)["error"]
    assert not cloud.events("connect", client_id="child-3")

    # Downlink on a child's session reaches that child's local topic only.
    sub = hx.local_sub(gw, "dev/+/commands/#", "dev/+/config")
    h.wait_for(lambda: "/down/device/id/child-2/#" in cloud.log_text(),
               what="SUBSCRIBE /down/device/id/child-2/#")
    observer.publish("/down/device/id/child-2/cmd", b"go", qos=1)
    observer.publish("/down/device/id/child-1/config", b"cfg1", qos=1)
    sub.wait("dev/child-1/config", "cfg1")
    sub.wait("dev/child-2/commands/cmd", "go")
    assert sorted((m[0], m[1]) for m in sub.messages()) == [
        ("dev/child-1/config", "cfg1"), ("dev/child-2/commands/cmd", "go")]


def test_idle_session_closes_and_reopens(hx):
    cloud, daemon, conf, observer, keys, gw = start_sessions(hx, idle="1s")
    pub = ["--unix", h.local_unix_path(conf), "-q", "1", "-t", "dev/child-1/telemetry", "-m"]
    h.mosquitto_pub(*(pub + ["one"]))
    observer.wait("/up/device/id/child-1", "one")
    daemon.wait_log(r"child-1.*closing its session: idle")
    cloud.wait_event("disconnect", client_id="child-1")
    # An idle, empty session leaves no spool directory behind (no fds, nothing to scan).
    spool = os.path.join(conf["gateway"]["state_dir"], "spool", "cloud", "devices", "child-1")
    h.wait_for(lambda: not os.path.exists(spool), what="child-1's empty spool directory removed")
    h.mosquitto_pub(*(pub + ["two"]))
    observer.wait("/up/device/id/child-1", "two")
    assert len(cloud.events("connect", client_id="child-1", result="accepted")) == 2


# --------------------------------------------------------------------------
# Per-device sessions keep what they acknowledged: one durable spool each
# --------------------------------------------------------------------------

def status_sessions(conf):
    out = h.uplinkctl(conf["control"]["socket"], "status")
    assert out.returncode in (0, 3), out.stderr  # 3: an uplink is not ONLINE
    return json.loads(out.stdout)["uplinks"][0].get("sessions")


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_child_sessions_keep_acknowledged_messages_across_restart(hx, stop):
    """Cloud down: QoS 1 messages of two children are acknowledged; uplinkd dies (kill -9)
    or stops; the restarted one reopens both sessions from their spools by itself (no new
    local message) and, once the cloud is back, every acknowledged message arrives, in order
    per child."""
    gw_key = fakecloud.Key.generate("ES256", hx.dir, "device")
    keys = child_keys(hx, ("child-1", "ES256"), ("child-2", "RS256"))
    cloud = fakecloud.FakeCloud(hx.dir, hx.pki, [gw_key] + list(keys.values()),
                                "akenza-test", skew=5, require_kid=True)
    hx._brokers.append(cloud)  # stopped and reported by the fixture, like fakecloud.start()
    # The observer's persistent subscription outlives the cloud's downtime (the broker
    # saves it at a graceful stop), so nothing published while it reconnects is missed.
    cloud.start()
    observer = hx.cloud_client(cloud, client_id="akenza-observer", clean_session=False)
    observer.subscribe("/up/#", qos=1)
    cloud.stop()

    up = akenza_uplink(gw_key, aud="akenza-test")
    up["akenza"] = {"child_key": os.path.join(hx.dir, "devices", "%c.key")}
    conf = hx.config(cloud, uplink=up)
    del conf["uplinks"][0]["generic"]
    daemon = hx.uplinkd(conf)
    gw = type("Gw", (), {"unix": h.local_unix_path(conf), "tcp_port": h.local_tcp_port(conf)})
    local = hx.local_client(gw)
    sent = {"child-1": [], "child-2": []}
    for i in range(15):
        for child in sent:
            payload = "%s:%d" % (child, i)
            local.publish("dev/%s/telemetry" % child, payload, qos=1)  # waits for the PUBACK
            sent[child].append(payload.encode())
    local.close()
    devices = os.path.join(conf["gateway"]["state_dir"], "spool", "cloud", "devices")
    assert sorted(os.listdir(devices)) == ["child-1", "child-2"]
    sessions = status_sessions(conf)
    assert sessions["open"] == 2 and sessions["online"] == 0 and sessions["queued"] == 30

    if stop == "kill9":
        daemon.proc.kill()
        daemon.proc.wait(h.TIMEOUT)
        daemon.stopped = True
        daemon.returncode = daemon.expect_exit = daemon.proc.returncode
    else:
        assert daemon.stop()[0] == 0
        assert daemon.find_log(r"15 message\(s\) stay in .*devices/child-1") is not None

    daemon2 = hx.uplinkd(conf, name="uplinkd2")
    for child in sent:
        daemon2.wait_log(r"%s.*15 message\(s\) recovered from .*; opening its session" % child)
    assert status_sessions(conf)["open"] == 2
    cloud.start()

    def arrived(child):
        return [m[1] for m in observer.received("/up/device/id/" + child)]

    h.wait_for(lambda: all(len(arrived(c)) >= len(sent[c]) for c in sent),
               timeout=4 * h.TIMEOUT,
               what=lambda: "every acknowledged message upstream (have %s)"
               % {c: len(arrived(c)) for c in sent})
    for child in sent:
        assert arrived(child) == sent[child], child
    h.wait_for(lambda: status_sessions(conf)["queued"] == 0,
               what=lambda: "both session spools drained: %s" % status_sessions(conf))
    children = json.loads(h.uplinkctl(conf["control"]["socket"], "children").stdout)
    assert children["children"] == []  # uplinkctl children lists children seen this run
