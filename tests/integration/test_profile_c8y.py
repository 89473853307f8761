"""Cumulocity profile against a mosquitto playing Cumulocity.

The "cloud" is a real mosquitto broker; a paho client on its plain listener
plays the platform: it subscribes to s/us/# (everything devices send) and
publishes operations on s/ds, errors on s/e and, for the bootstrap flow,
answers s/ucr with 70,<tenant>,<user>,<password> on s/dcr.

Asserted (issue 5, Cumulocity): client id d:<device id>, clean session,
basic auth as <tenant>/<user>, the last will, start-up 100/114/117 once per
connection, 101 exactly once per child before its data (and not again after
a restart when the registry says so), data for child X on s/us/X, JSON
measurements converted, SmartREST passing through, the 16184-byte packet
split, operations routed by field 2 to the right local subscriber only,
s/e republished on uplinkd/<uplink>/errors, bad input refused with a reason
and nothing upstream, the bootstrap flow. Batching: lines queued while the
cloud is away go up joined by "\n" in few PUBLISHes (runs of one topic, at
most 64 lines, whole packet <= 16184 bytes, order per topic kept, nothing
lost), and a lone line is never held back.
"""

import json
import os
import signal
import stat
import types

import harness as h

TENANT = "t100"
USER = "gwuser"
PASSWORD = "gw-secret-pw"
WILL = b'400,c8y_ConnectionEvent,"Device connection was lost."'


def c8y_uplink(broker, **cumulocity):
    c8y = {"device_id": "gw-test", "tenant": TENANT, "supported_operations": ["c8y_Restart"],
           "required_interval": 5}
    c8y.update(cumulocity)
    return {
        "profile": "cumulocity",
        "auth": {"type": "basic", "username": USER, "password": PASSWORD},
        "cumulocity": c8y,
        "generic": None,
    }


def start(hx, broker=None, **cumulocity):
    broker = broker or hx.broker(users={"%s/%s" % (TENANT, USER): PASSWORD, "cloud": "cloudpw"})
    conf = hx.config(broker, uplink=c8y_uplink(broker, **cumulocity))
    del conf["uplinks"][0]["generic"]
    # The test's own "platform" client logs in as its own user.
    platform = hx.cloud_client(broker, username="cloud", password="cloudpw")
    platform.subscribe("s/us/#", qos=1)
    daemon = hx.uplinkd(conf)
    gw = types.SimpleNamespace(broker=broker, daemon=daemon, conf=conf,
                                 unix=h.local_unix_path(conf), tcp_port=h.local_tcp_port(conf))
    return gw, platform


def packets(platform, topic=None):
    """[(topic, payload)] PUBLISHes seen at the platform on s/us and s/us/<child>."""
    return [(m[0], m[1]) for m in platform.received() if topic is None or m[0] == topic]


def up(platform, topic=None):
    """[(topic, line)] SmartREST lines seen at the platform: uplinkd may join
    queued lines for one topic into one PUBLISH, separated by line breaks,
    and Cumulocity reads each line on its own."""
    return [(t, line) for t, p in packets(platform, topic) for line in p.split(b"\n")]


def packet_size(topic, payload, qos=1):
    """Bytes of a whole MQTT 3.1.1 PUBLISH: fixed header, Remaining Length
    (1-4 bytes, §2.2.3), topic with its length, packet id (QoS > 0), payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    width = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + width + remaining


def wait_up(platform, topic, payload, count=1):
    h.wait_for(lambda: up(platform).count((topic, payload)) >= count,
               what=lambda: "%r on %s at the platform; got %r" % (payload, topic, up(platform)))


def local_pub(gw, topic, payload, qos=1):
    h.mosquitto_pub("--unix", gw.unix, "-q", str(qos), "-t", topic, "-m", payload)


def clear(client):
    with client._cond:
        client.messages.clear()


def wait_subscribed(gw, topic):
    gw.daemon.wait_log(r'subscribed to "%s"' % topic)


def test_startup_client_id_and_will(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    wait_up(platform, "s/us", b"114,c8y_Restart")
    wait_up(platform, "s/us", b"117,5")
    # Client id d:<device id>, clean session 1, user <tenant>/<user>.
    line = h.wait_for(lambda: [l for l in gw.broker.log_text().splitlines()
                               if "New client connected" in l and "d:gw-test" in l],
                      what="uplinkd's CONNECT in the broker log")[0]
    assert "c1" in line and "u'%s/%s'" % (TENANT, USER) in line, line
    # The last will is published when the connection dies without DISCONNECT.
    gw.daemon.expect_exit = -signal.SIGKILL
    gw.daemon.signal(signal.SIGKILL)
    wait_up(platform, "s/us", WILL)


def test_gateway_and_two_children(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    local_pub(gw, "dev/gw-test/smartrest", "200,c8y_Temperature,T,21.5")
    local_pub(gw, "dev/child-a/telemetry", '{"c8y_Temperature": {"T": {"value": 20, "unit": "C"}}}')
    local_pub(gw, "dev/child-b/smartrest", "400,c8y_Event,hello")
    local_pub(gw, "dev/child-a/smartrest", "200,c8y_Humidity,H,40")
    local_pub(gw, "dev/child-b/smartrest", "400,c8y_Event,again")
    wait_up(platform, "s/us", b"200,c8y_Temperature,T,21.5")
    wait_up(platform, "s/us/child-a", b"200,c8y_Temperature,T,20,C")
    wait_up(platform, "s/us/child-a", b"200,c8y_Humidity,H,40")
    wait_up(platform, "s/us/child-b", b"400,c8y_Event,hello")
    wait_up(platform, "s/us/child-b", b"400,c8y_Event,again")
    got = up(platform)
    for child in ("child-a", "child-b"):
        reg = ("s/us", ("101,%s,%s,c8y_MQTTChildDevice" % (child, child)).encode())
        assert got.count(reg) == 1, "101 for %s sent %d times: %r" % (child, got.count(reg), got)
        first_data = next(i for i, m in enumerate(got) if m[0] == "s/us/" + child)
        assert got.index(reg) < first_data, "101 for %s came after its data: %r" % (child, got)
    # Nothing else was invented on the way.
    topics = {m[0] for m in got}
    assert topics == {"s/us", "s/us/child-a", "s/us/child-b"}, topics
    # The registry is a 0600 file in the state directory.
    path = os.path.join(gw.conf["gateway"]["state_dir"], "registry", "cloud")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = open(path).read()
    assert "done child-a" in text and "done child-b" in text, text


def test_registration_not_repeated_after_restart(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    local_pub(gw, "dev/child-a/smartrest", "200,c8y_T,T,1")
    wait_up(platform, "s/us/child-a", b"200,c8y_T,T,1")
    gw.daemon.wait_log(r"child child-a: registration acknowledged")
    assert gw.daemon.stop()[0] == 0
    clear(platform)
    d2 = hx.uplinkd(gw.conf, name="uplinkd2")
    gw.daemon = d2
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    local_pub(gw, "dev/child-a/smartrest", "200,c8y_T,T,2")
    local_pub(gw, "dev/child-c/smartrest", "200,c8y_T,T,3")
    wait_up(platform, "s/us/child-a", b"200,c8y_T,T,2")
    wait_up(platform, "s/us/child-c", b"200,c8y_T,T,3")
    got = up(platform, "s/us")
    assert (b"101,child-a,child-a,c8y_MQTTChildDevice") not in [p for _, p in got], got
    assert [p for _, p in got].count(b"101,child-c,child-c,c8y_MQTTChildDevice") == 1, got


def test_nested_child_registers_on_parent_topic(hx):
    gw, platform = start(hx, children=[{"match": "sensor-*", "parent": "plc-1",
                                        "name": "Sensor {child}", "type": "c8y_Sensor"}])
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    local_pub(gw, "dev/sensor-7/smartrest", "200,c8y_T,T,7")
    wait_up(platform, "s/us/sensor-7", b"200,c8y_T,T,7")
    got = up(platform)
    parent = ("s/us", b"101,plc-1,plc-1,c8y_MQTTChildDevice")
    nested = ("s/us/plc-1", b"101,sensor-7,Sensor sensor-7,c8y_Sensor")
    assert parent in got and nested in got, got
    assert got.index(parent) < got.index(nested) < got.index(("s/us/sensor-7", b"200,c8y_T,T,7"))


def test_operations_routed_to_the_right_child_only(hx):
    gw, platform = start(hx)
    wait_subscribed(gw, "s/ds")
    # paho, not mosquitto_sub: an operation may hold a line break.
    apps = {}
    for c in ("gw-test", "child-a", "child-b"):
        apps[c] = hx.local_client(gw)
        apps[c].subscribe("dev/%s/operations" % c)
    every = hx.local_client(gw)
    every.subscribe("dev/#")
    shell = b'511,gw-test,"ls -l\nand \\"this\\""'
    platform.publish("s/ds", b"510,child-a")
    platform.publish("s/ds", shell)
    platform.publish("s/ds", b"510,child-b\n510,child-a")
    apps["gw-test"].wait("dev/gw-test/operations", shell)
    apps["child-b"].wait("dev/child-b/operations", b"510,child-b")
    h.wait_for(lambda: len(apps["child-a"].received()) >= 2, what="two operations for child-a")
    h.wait_for(lambda: len(every.received()) >= 4, what="4 operations under dev/#")
    assert [m[1] for m in apps["child-a"].received()] == [b"510,child-a", b"510,child-a"]
    assert [m[1] for m in apps["child-b"].received()] == [b"510,child-b"]
    assert [m[1] for m in apps["gw-test"].received()] == [shell]
    assert sorted(m[0] for m in every.received()) == sorted(
        ["dev/child-a/operations"] * 2 + ["dev/child-b/operations", "dev/gw-test/operations"])


def test_s_e_republished_on_errors(hx):
    gw, platform = start(hx)
    wait_subscribed(gw, "s/e")
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    platform.publish("s/e", b"41,100,Device already existing")
    topic, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    doc = json.loads(payload)
    assert doc["topic"] == "s/e" and doc["error"] == "41,100,Device already existing", doc
    gw.daemon.wait_log(r"s/e: 41,100,Device already existing")


def test_packets_split_at_16184_bytes(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    lines = ["400,c8y_Event,%04d-%s" % (i, "x" * 90) for i in range(400)]  # ~40 KB
    local_pub(gw, "dev/child-a/smartrest", "\n".join(lines))
    h.wait_for(lambda: sum(p.count(b"\n") + 1 for t, p in up(platform, "s/us/child-a"))
               >= len(lines), what="all 400 lines at the platform")
    got = [p for t, p in packets(platform, "s/us/child-a")]
    assert len(got) >= 3
    for p in got:
        # fixed header 1 + remaining length 2 + topic 2+12 + packet id 2
        assert 1 + 2 + 2 + len("s/us/child-a") + 2 + len(p) <= 16184, len(p)
    assert b"\n".join(got).decode().split("\n") == lines


def test_bad_input_refused_with_a_reason(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    local_pub(gw, "dev/bad:id/smartrest", "200,c8y_T,T,1")
    local_pub(gw, "dev/child-a/telemetry", '{"temperature": ')
    local_pub(gw, "dev/child-a/smartrest", '200,"unterminated')
    local_pub(gw, "dev/child-a/smartrest", "400,c8y_Event," + "y" * 17000)
    h.wait_for(lambda: len(errors.messages()) >= 4, what="4 refusals on uplinkd/cloud/errors")
    docs = [json.loads(m[1]) for m in errors.messages()]
    assert "':'" in docs[0]["error"], docs[0]
    assert docs[1]["topic"] == "dev/child-a/telemetry" and docs[1]["error"], docs[1]
    assert "quote" in docs[2]["error"].lower(), docs[2]
    assert "16184" in docs[3]["error"] or "fit" in docs[3]["error"], docs[3]
    # A marker proves the stream moved on; nothing before it was sent.
    local_pub(gw, "dev/gw-test/smartrest", "200,c8y_Marker,M,1")
    wait_up(platform, "s/us", b"200,c8y_Marker,M,1")
    assert [m for m in up(platform) if m[0].startswith("s/us/")] == [], up(platform)
    assert not any(b"101," in p for _, p in up(platform)), up(platform)


def test_bootstrap_flow(hx):
    broker = hx.broker(users={"management/devicebootstrap": "bs-secret",
                              "%s/device_gw-test" % TENANT: "issued-pw-123",
                              "cloud": "cloudpw"})
    platform = hx.cloud_client(broker, username="cloud", password="cloudpw")
    platform.subscribe("s/us/#", qos=1)

    # The scripted platform: answer the credentials request.
    def on_request(client, userdata, msg):
        if msg.topic == "s/ucr":
            client.publish("s/dcr", ("70,%s,device_gw-test,issued-pw-123" % TENANT).encode(),
                           qos=1)
    requester = hx.cloud_client(broker, username="cloud", password="cloudpw")
    requester.client.message_callback_add("s/ucr", on_request)
    requester.subscribe("s/ucr", qos=0)

    up_conf = c8y_uplink(broker, bootstrap={"password": "bs-secret", "interval": "200ms"})
    conf = hx.config(broker, uplink=up_conf)
    del conf["uplinks"][0]["generic"]
    del conf["uplinks"][0]["auth"]
    daemon = hx.uplinkd(conf)
    gw = types.SimpleNamespace(daemon=daemon, unix=h.local_unix_path(conf))
    # Data published before the device has credentials waits for them.
    local_pub(gw, "dev/gw-test/smartrest", "200,c8y_T,T,1")
    daemon.wait_log(r"bootstrap: received device credentials for user %s/device_gw-test" % TENANT)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    wait_up(platform, "s/us", b"200,c8y_T,T,1")
    assert any("u'%s/device_gw-test'" % TENANT in l and "d:gw-test" in l
               for l in broker.log_text().splitlines() if "New client connected" in l)
    path = os.path.join(conf["gateway"]["state_dir"], "credentials", "cloud")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read() == "%s/device_gw-test\nissued-pw-123\n" % TENANT
    assert "issued-pw-123" not in daemon.log_text()
    assert "bs-secret" not in daemon.log_text()
    # A restart uses the stored credentials: no bootstrap again.
    assert daemon.stop()[0] == 0
    d2 = hx.uplinkd(conf, name="uplinkd2")
    d2.wait_log(r"using the device credentials in")
    clear(platform)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    assert "bootstrapping" not in d2.log_text()


def test_x509_cn_must_be_the_device_id(hx, pki):
    broker = hx.broker()
    up_conf = {"profile": "cumulocity", "tls": {"ca": pki.ca, "cert": pki.path("client.pem"),
                                                "key": pki.path("client.key")},
               "cumulocity": {"device_id": "other-device"}}
    conf = hx.config(broker, uplink=up_conf)
    del conf["uplinks"][0]["generic"]
    # client.pem has CN=gw-test: refused at start, in words.
    result = h.subprocess.run([h.UPLINKD_BIN, "-t", "-c", hx.write_config(conf)],
                              capture_output=True, text=True, timeout=h.TIMEOUT)
    assert result.returncode == 1, result
    assert "other-device" in result.stderr and "CN" in result.stderr, result.stderr
    # With the matching device id it connects as d:gw-test without a password.
    conf["uplinks"][0]["cumulocity"]["device_id"] = "gw-test"
    platform = hx.cloud_client(broker)
    platform.subscribe("s/us/#", qos=1)
    hx.uplinkd(conf)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")


def _jwt(iat, exp):
    import base64

    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return "%s.%s.%s" % (part({"alg": "none"}), part({"iat": iat, "exp": exp}), "sig")


def test_device_token_kept_and_retained_locally(hx):
    import time
    broker = hx.broker(users={"%s/%s" % (TENANT, USER): PASSWORD, "cloud": "cloudpw"})
    token = _jwt(int(time.time()), int(time.time()) + 3600)
    requests = []

    def on_request(client, userdata, msg):
        requests.append(msg.payload)
        client.publish("s/dat", ("71," + token).encode(), qos=1)
    platform = hx.cloud_client(broker, username="cloud", password="cloudpw")
    platform.client.message_callback_add("s/uat", on_request)
    platform.subscribe("s/uat", qos=0)
    conf = hx.config(broker, uplink=c8y_uplink(broker, token=True))
    del conf["uplinks"][0]["generic"]
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"received a device token \(valid for 3600 s\); asking again in 1[78]\d\d s")
    assert requests and requests[0] == b""
    # Retained: an app that subscribes later still gets it.
    app = hx.client("127.0.0.1", h.local_tcp_port(conf))
    app.subscribe("uplinkd/cloud/c8y/token")
    _, payload, _, retain = app.wait("uplinkd/cloud/c8y/token")
    assert payload == token.encode() and retain
    assert token not in daemon.log_text()


def test_reload_switches_profile(hx):
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    conf = dict(gw.conf)
    up_conf = dict(gw.conf["uplinks"][0])
    del up_conf["cumulocity"]
    up_conf["profile"] = "generic"
    up_conf["auth"] = dict(up_conf["auth"], username="%s/%s" % (TENANT, USER))
    up_conf["generic"] = {"topic_prefix": "gw-test"}
    conf["uplinks"] = [up_conf]
    hx.write_config(conf, "uplinkd.yaml")
    since = gw.daemon.log_size()
    gw.daemon.reload()
    gw.daemon.wait_log(r"profile changed from cumulocity to generic", since=since)
    gw.daemon.wait_log(r"state CONNECTING -> ONLINE", since=since)
    platform.subscribe("gw-test/#", qos=1)
    local_pub(gw, "dev/child-a/telemetry", "21")
    platform.wait("gw-test/child-a/telemetry", b"21")
    assert not any(t.startswith("s/us/") for t, _ in up(platform))


# Batching (issue 5 / 6): queued SmartREST lines for one topic share a PUBLISH.
C8Y_MAX_PACKET = 16184
BATCH_MAX_RECORDS = 64  # UPLINK_BATCH_MAX_RECORDS


def expected_publishes(records):
    """What uplinkd must send for `records` [(topic, line)] queued in this
    order: runs of consecutive records for one topic, at most 64 lines per
    PUBLISH, joined by "\n" while the whole packet stays <= 16184 bytes."""
    out = []
    for topic, line in records:
        if out and out[-1][0] == topic and len(out[-1][1]) < BATCH_MAX_RECORDS and packet_size(
                topic, b"\n".join(out[-1][1] + [line])) <= C8Y_MAX_PACKET:
            out[-1][1].append(line)
        else:
            out.append((topic, [line]))
    return out


def fill_line(prefix, total):
    """A valid SmartREST line of exactly `total` bytes."""
    line = prefix + b"y" * (total - len(prefix))
    assert len(line) == total
    return line


def test_queued_lines_batched_into_few_publishes(hx):
    broker = hx.broker(users={"%s/%s" % (TENANT, USER): PASSWORD, "cloud": "cloudpw"})
    # A persistent platform session keeps s/us/# across the broker restart.
    platform = hx.cloud_client(broker, username="cloud", password="cloudpw",
                               client_id="platform-batch", clean_session=False)
    platform.subscribe("s/us/#", qos=1)
    broker.stop()
    conf = hx.config(broker, uplink=c8y_uplink(broker))
    del conf["uplinks"][0]["generic"]
    daemon = hx.uplinkd(conf)
    gw = types.SimpleNamespace(broker=broker, daemon=daemon, conf=conf,
                               tcp_port=h.local_tcp_port(conf), unix=h.local_unix_path(conf))
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")

    topic_of = {"gw-test": "s/us", "child-a": "s/us/child-a", "child-b": "s/us/child-b"}
    # Runs of one device's lines; 80 and 70 exceed 64 lines per PUBLISH.
    runs = [("gw-test", 1), ("child-a", 5), ("child-b", 40), ("gw-test", 80), ("child-a", 2),
            ("child-b", 1), ("gw-test", 3), ("child-a", 70), ("child-b", 50), ("gw-test", 20),
            ("child-a", 28)]
    records, n = [], 0
    for child, count in runs:
        for _ in range(count):
            records.append((child, b"200,c8y_Seq,S,%d" % n))
            n += 1
    assert len(records) == 300
    # Lines at the limit. s/us/child-b at QoS 1: 16184 - 1 - 2 - 2 - 12 - 2 = 16165
    # bytes of payload. A line of exactly that goes alone and splits its run;
    # one byte more is refused at route time, in words.
    at_b = records.index(("child-b", b"200,c8y_Seq,S,30"))
    records.insert(at_b, ("child-b", fill_line(b"400,c8y_Big,b", 16165)))
    # s/us: 16173 bytes of payload. Two lines of 8000 and 8172 at the start of
    # a run, joined by "\n", fill a PUBLISH to the byte; the next line of the
    # run needs a new one.
    at_gw = records.index(("gw-test", b"200,c8y_Seq,S,129"))
    records[at_gw:at_gw] = [("gw-test", fill_line(b"400,c8y_Big,g1", 8000)),
                            ("gw-test", fill_line(b"400,c8y_Big,g2", 8172))]
    too_big = fill_line(b"400,c8y_Big,refused", 16166)

    local = hx.local_client(gw)
    infos = [local.client.publish("dev/%s/smartrest" % child, line, qos=1)
             for child, line in records]
    refused = local.client.publish("dev/child-b/smartrest", too_big, qos=1)
    for info in infos + [refused]:
        info.wait_for_publish(h.TIMEOUT)
        assert info.is_published(), "no local PUBACK"
    # The refusal names the limit; nothing of it is queued.
    h.wait_for(lambda: errors.messages(), what="the refusal on uplinkd/cloud/errors")
    doc = json.loads(errors.messages()[0][1])
    assert "16184" in doc["error"] and "16166" in doc["error"], doc

    broker.start()
    want = [(topic_of[c], line) for c, line in records]
    data = lambda: [(t, p) for t, p in packets(platform)  # noqa: E731
                    if p.startswith((b"200,c8y_Seq", b"400,c8y_Big"))]
    h.wait_for(lambda: sum(p.count(b"\n") + 1 for _, p in data()) >= len(want),
               timeout=2 * h.TIMEOUT,
               what=lambda: "%d lines at the platform; got %d in %d publishes"
               % (len(want), sum(p.count(b"\n") + 1 for _, p in data()), len(data())))
    got = data()
    for t, p in got:
        assert packet_size(t, p) <= C8Y_MAX_PACKET, (t, len(p))
    # Nothing lost, nothing garbled, nothing twice, order kept per topic.
    lines = [(t, line) for t, p in got for line in p.split(b"\n")]
    assert sorted(lines) == sorted(want)
    for topic in topic_of.values():
        assert [l for t, l in lines if t == topic] == [l for t, l in want if t == topic], topic
    # Exactly the expected PUBLISHes: runs, 64-line caps and the byte limit.
    expected = expected_publishes(want)
    for topic in topic_of.values():
        assert [p.split(b"\n") for t, p in got if t == topic] == \
            [ls for t, ls in expected if t == topic], topic
    assert len(got) == len(expected) < len(want) // 10, (len(got), len(expected))
    full = [p for t, p in got if t == "s/us" and p.startswith(b"400,c8y_Big,g1")]
    assert len(full) == 1 and packet_size("s/us", full[0]) == C8Y_MAX_PACKET
    big = [p for t, p in got if p.startswith(b"400,c8y_Big,b")]
    assert len(big) == 1 and packet_size("s/us/child-b", big[0]) == C8Y_MAX_PACKET
    assert not any(b"refused" in p for _, p in packets(platform))
    # Status: records counted as messages, PUBLISHes on their own.
    def counters():
        doc = json.loads(h.uplinkctl(conf["control"]["socket"], "status").stdout)
        up_doc = next(u for u in doc["uplinks"] if u["name"] == "cloud")
        return up_doc["published"], up_doc["publishes"], up_doc["queued"]
    published, publishes, queued = h.wait_for(
        lambda: (lambda c: c if c[0] >= len(want) and c[2] == 0 else None)(counters()),
        what=lambda: "status to count %d records; got %r" % (len(want), counters()))
    assert published == len(want) and publishes == len(expected), (published, publishes)


def test_lone_line_not_held_back(hx):
    import time
    gw, platform = start(hx)
    wait_up(platform, "s/us", b"100,gw-test,c8y_MQTTDevice")
    local = hx.local_client(gw)
    for i in range(3):
        line = b"200,c8y_Lone,L,%d" % i
        began = time.monotonic()
        local.publish("dev/gw-test/smartrest", line)
        # Sent at once, alone: nothing waits for company.
        platform.wait("s/us", line, timeout=5)
        assert time.monotonic() - began < 2, "a lone line waited %.2f s" % (time.monotonic() - began)


def test_refused_credentials_explained_in_cumulocity_terms(hx):
    """CONNACK 5 (mosquitto's answer to a wrong password) with Cumulocity's reading of it."""
    broker = hx.broker(users={"%s/%s" % (TENANT, USER): "the-right-one"})
    conf = hx.config(broker, uplink=c8y_uplink(broker))
    del conf["uplinks"][0]["generic"]
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"refused the connection: CONNACK 5 not authorized: a user without device "
                    r"permissions, or a certificate problem: the CN must be the device id, the CA "
                    r"must be trusted by the tenant, and tls.cert must hold the whole chain "
                    r"including that CA")
