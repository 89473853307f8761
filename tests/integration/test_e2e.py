"""End to end: local clients -> uplinkd -> TLS -> mosquitto "cloud", and back.

Topic contract under test (docs/DESIGN.md, "Local topic contract", generic
profile with topic_prefix gw-test):
  dev/<child>/telemetry[/<sub>]   -> gw-test/<child>/telemetry[/<sub>]
  cloud/<uplink>/<topic>          -> <topic>            (raw pass-through)
  gw-test/<child>/commands[/<sub>], gw-test/<child>/config -> dev/<child>/...
  local subscription cloud/<uplink>/<filter> -> upstream subscription <filter>
"""

import itertools

import harness as h

_counter = itertools.count()


def unique(prefix="m"):
    return "%s-%d" % (prefix, next(_counter))


def test_unix_socket_telemetry_reaches_cloud(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "gw-test/#")
    # QoS 0 is dropped while the uplink is offline (spool.qos0_offline: drop);
    # under a slow UPLINKD_WRAPPER (valgrind) it may not be online yet.
    gw.daemon.wait_log(r"-> ONLINE")
    payload = unique("unix")
    h.mosquitto_pub("--unix", gw.unix, "-t", "dev/sensor-1/telemetry", "-m", payload)
    topic, got, _, _ = sub.wait("gw-test/sensor-1/telemetry", payload)
    assert got == payload


def test_tcp_telemetry_with_subtopic_reaches_cloud(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "gw-test/#")
    gw.daemon.wait_log(r"-> ONLINE")  # QoS 0 is dropped while offline (see above)
    payload = unique("tcp")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port),
                    "-t", "dev/sensor-2/telemetry/temperature", "-m", payload)
    sub.wait("gw-test/sensor-2/telemetry/temperature", payload)
    # Nothing else may have been invented on the way.
    assert [m[0] for m in sub.messages()] == ["gw-test/sensor-2/telemetry/temperature"]


def test_qos1_is_forwarded_as_qos1(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "gw-test/#", qos=1)
    payload = unique("qos1")
    # mosquitto_pub -q 1 exits 0 only after uplinkd's PUBACK.
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/pump/telemetry", "-m", payload)
    _, _, qos, _ = sub.wait("gw-test/pump/telemetry", payload)
    assert qos == 1, "upstream publish was QoS %d, expected 1" % qos


def test_qos1_burst_all_arrive_in_order(hx):
    gw = hx.gateway()
    cloud = hx.cloud_client(gw.broker)
    cloud.subscribe("gw-test/burst/telemetry", qos=1)
    local = hx.local_client(gw)
    payloads = [("b%03d" % i).encode() for i in range(50)]
    for p in payloads:
        local.publish("dev/burst/telemetry", p, qos=1)
    h.wait_for(lambda: len(cloud.received("gw-test/burst/telemetry")) >= len(payloads),
               what=lambda: "50 messages at the cloud (got %d)"
               % len(cloud.received("gw-test/burst/telemetry")))
    got = [m[1] for m in cloud.received("gw-test/burst/telemetry")]
    assert got == payloads, "lost, duplicated or reordered QoS 1 messages"


def test_cloud_passthrough_topic(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "vendor/#")
    payload = unique("raw")
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "cloud/cloud/vendor/raw/topic",
                    "-m", payload)
    sub.wait("vendor/raw/topic", payload)


def _publish_until(publish, wait, timeout=h.TIMEOUT):
    """Publish at the cloud until the local side sees it.

    uplinkd subscribes upstream asynchronously (after CONNACK, or after a
    local SUBSCRIBE), and MQTT gives the local client no signal for that, so
    the cloud side re-publishes (a fresh payload each time) until one arrives.
    """
    sent = []

    def attempt():
        payload = unique("down")
        sent.append(payload)
        publish(payload)
        try:
            return wait(sent, 0.5)
        except h.HarnessError:
            return None

    return h.wait_for(attempt, timeout, what=lambda: "any of %d cloud messages locally" % len(sent))


def _wait_any(client, topic):
    def wait(sent, timeout):
        def found():
            for m in client.received(topic):
                if m[1].decode() in sent:
                    return m
            return None
        return h.wait_for(found, timeout)
    return wait


def test_upstream_subscription_flows_back_to_local_subscriber(hx):
    gw = hx.gateway()
    local = hx.local_client(gw)
    local.subscribe("cloud/cloud/site/+/alerts", qos=1)
    cloud = hx.cloud_client(gw.broker)
    m = _publish_until(lambda p: cloud.publish("site/north/alerts", p, qos=1),
                       _wait_any(local, "cloud/cloud/site/north/alerts"))
    assert m[0] == "cloud/cloud/site/north/alerts"
    # The upstream subscription is visible at the broker too.
    assert "site/+/alerts" in gw.broker.log_text()


def test_commands_and_config_reach_the_child(hx):
    gw = hx.gateway()
    local = hx.local_client(gw)
    local.subscribe("dev/valve-7/commands/#", qos=1)
    local.subscribe("dev/valve-7/config", qos=1)
    cloud = hx.cloud_client(gw.broker)
    _publish_until(lambda p: cloud.publish("gw-test/valve-7/commands/open", p, qos=1),
                   _wait_any(local, "dev/valve-7/commands/open"))
    _publish_until(lambda p: cloud.publish("gw-test/valve-7/config", p, qos=1),
                   _wait_any(local, "dev/valve-7/config"))


def test_local_pub_sub_between_two_local_clients(hx):
    gw = hx.gateway()
    sub = hx.local_sub(gw, "app/+/events")  # mosquitto_sub over the Unix socket
    tcp = hx.local_client(gw)                 # paho over loopback TCP
    tcp.publish("app/hmi/events", b"door-open", qos=1)
    sub.wait("app/hmi/events", "door-open")
    # And the other way round, with a wildcard subscriber on TCP.
    tcp.subscribe("dev/+/telemetry", qos=1)
    h.mosquitto_pub("--unix", gw.unix, "-t", "dev/meter/telemetry", "-m", "42")
    tcp.wait("dev/meter/telemetry", b"42")


def test_basic_auth_upstream(hx):
    broker = hx.broker(users={"gw-user": "s3cret-pass"})
    gw = hx.gateway(broker)
    sub = hx.cloud_sub(broker, "gw-test/#")
    payload = unique("auth")
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/auth-child/telemetry", "-m", payload)
    sub.wait("gw-test/auth-child/telemetry", payload)
