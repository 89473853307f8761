"""Profile gcp (Google Cloud IoT Core / ClearBlade IoT Core) against the fake JWT cloud.

The cloud is tests/fakecloud (mosquitto + a plugin that verifies the JWT password, aud = the
project id); an observer on its plain listener plays the cloud's side: it sees every publish
uplinkd makes (attach, events, state, detach) in order, and publishes config, commands and
gateway errors. Local apps are paho clients and mosquitto_pub/mosquitto_sub on uplinkd's local
listeners.

Topic contract under test (docs/profiles.md, gcp):
  dev/<id>/telemetry[/<sub>] -> /devices/<id>/events[/<sub>]   QoS 1 (2 is downgraded)
  dev/<id>/state             -> /devices/<id>/state            1 per second, newest wins
  /devices/<id>/config       -> dev/<id>/config (retained)
  /devices/<id>/commands/<s> -> dev/<id>/commands/<s>
  gateway: /devices/<child>/attach before the child's first data, once per connection.
"""

import json
import os
import types

import jwt

import fakecloud
import harness as h

PROJECT = "test-project"
REGION = "europe-west1"
REGISTRY = "reg-1"
GW = "gw-test"
CLIENT_ID = "projects/%s/locations/%s/registries/%s/devices/%s" % (PROJECT, REGION, REGISTRY, GW)


def start(hx, gateway=True, gcp=None, observer_id=None, wait_accepted=True, **uplink):
    """Fake cloud + uplinkd with a gcp uplink; returns (cloud, daemon, conf, observer, keys).

    child-a has a key of its own (RS256) in the child_key directory; child-b has none.
    The observer has a persistent session, so it keeps its subscription (and gets what was
    published meanwhile) across a graceful broker restart.
    """
    gw_key = fakecloud.Key.generate("ES256", hx.dir, "gw")
    devices = os.path.join(hx.dir, "devices")
    os.makedirs(devices, exist_ok=True)
    child_a_key = fakecloud.Key.generate("RS256", devices, "child-a")
    cloud = fakecloud.start(hx, keys=[gw_key], aud=PROJECT, skew=5)
    section = {"project": PROJECT, "region": REGION, "registry": REGISTRY, "gateway": gateway}
    if gateway:
        section["child_key"] = os.path.join(devices, "%c.key")
    section.update(gcp or {})
    up = {"profile": "gcp",
          "auth": {"type": "jwt", "key": gw_key.private_path, "clock_check": "build-date"},
          "gcp": section}
    up.update(uplink)
    conf = hx.config(cloud, uplink=up)
    del conf["uplinks"][0]["generic"]
    conf["local"]["max_packet_size"] = "1MiB"  # room for a payload over GCP's 256 KiB
    observer = hx.cloud_client(cloud, client_id=observer_id or "observer-gcp",
                               clean_session=False)
    observer.subscribe("/devices/#", qos=2)
    daemon = hx.uplinkd(conf)
    if wait_accepted:
        cloud.wait_event("connect", client_id=CLIENT_ID, result="accepted")
    return cloud, daemon, conf, observer, {"gw": gw_key, "child-a": child_a_key}


def gw_ns(conf):
    """The bits of a hx.gateway() namespace that hx.local_client() and hx.local_sub() need."""
    return types.SimpleNamespace(tcp_port=h.local_tcp_port(conf), unix=h.local_unix_path(conf))


def topics(observer, prefix="/devices/"):
    return [m[0] for m in observer.received() if m[0].startswith(prefix)]


def pub(conf, topic, payload, qos=1):
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", str(qos), "-t", topic, "-m",
                    payload)


def test_gateway_and_two_children_attach_before_data(hx):
    cloud, daemon, conf, observer, keys = start(hx)
    line = cloud.events("connect", client_id=CLIENT_ID, result="accepted")[0]
    assert line["claims"]["aud"] == PROJECT and line["username"] == "unused"
    assert line["exp"] - line["iat"] <= 24 * 3600

    local = hx.local_client(gw_ns(conf))
    local.publish("dev/child-a/telemetry", b"a1", qos=1)
    local.publish("dev/child-b/telemetry/sub1", b"b1", qos=2)
    local.publish("dev/gw-test/telemetry", b"g1", qos=1)
    local.publish("dev/child-a/telemetry", b"a2", qos=1)
    local.publish("dev/child-b/state", b'{"s":1}', qos=1)
    for topic, payload in [("/devices/child-a/events", "a1"), ("/devices/child-a/events", "a2"),
                           ("/devices/child-b/events/sub1", "b1"),
                           ("/devices/gw-test/events", "g1"),
                           ("/devices/child-b/state", '{"s":1}')]:
        observer.wait(topic, payload)

    seen = topics(observer)
    # Exactly one attach per child, none for the gateway itself, each before its data.
    assert seen.count("/devices/child-a/attach") == 1, seen
    assert seen.count("/devices/child-b/attach") == 1, seen
    assert "/devices/gw-test/attach" not in seen
    assert seen.index("/devices/child-a/attach") < seen.index("/devices/child-a/events")
    assert seen.index("/devices/child-b/attach") < seen.index("/devices/child-b/events/sub1")
    # Nothing but these went up.
    assert sorted(set(seen)) == sorted({"/devices/child-a/attach", "/devices/child-b/attach",
                                        "/devices/child-a/events", "/devices/child-b/events/sub1",
                                        "/devices/gw-test/events", "/devices/child-b/state"})
    # Every data message at QoS 1 (the observer asked for 2: a QoS 2 publish would show).
    for t, payload, qos, _ in observer.received():
        assert qos == 1, (t, payload, qos)

    # child-a attaches with a token signed by its own key (aud = project); child-b with {}.
    attach_a = json.loads(observer.received("/devices/child-a/attach")[0][1])
    claims = jwt.decode(attach_a["authorization"],
                        open(keys["child-a"].public_path, "rb").read(), algorithms=["RS256"],
                        audience=PROJECT)
    assert claims["exp"] - claims["iat"] <= 24 * 3600
    assert observer.received("/devices/child-b/attach")[0][1] == b"{}"

    # The gateway subscribes each child's config and commands after its attach.
    h.wait_for(lambda: "/devices/child-b/commands/#" in cloud.log_text(),
               what="SUBSCRIBE /devices/child-b/commands/#")


def test_reattach_after_broker_restart(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    pub(conf, "dev/child-a/telemetry", "before")
    pub(conf, "dev/child-b/telemetry", "before-b")
    observer.wait("/devices/child-a/events", "before")
    observer.wait("/devices/child-b/events", "before-b")
    connects = len(cloud.events("connect", client_id=CLIENT_ID, result="accepted"))

    cloud.restart()
    cloud.wait_event("connect", client_id=CLIENT_ID, result="accepted", since=connects)
    observer.wait_connected()
    # Both children are attached again on the new connection, before any new data.
    h.wait_for(lambda: topics(observer).count("/devices/child-a/attach") == 2
               and topics(observer).count("/devices/child-b/attach") == 2,
               what=lambda: "re-attach of both children (seen %s)" % topics(observer))
    pub(conf, "dev/child-a/telemetry", "after")
    observer.wait("/devices/child-a/events", "after")
    seen = topics(observer)
    assert seen.count("/devices/child-a/attach") == 2, seen  # once per connection
    second_attach = len(seen) - 1 - seen[::-1].index("/devices/child-a/attach")
    assert second_attach < len(seen) - 1 - seen[::-1].index("/devices/child-a/events")
    daemon.wait_log(r"attaching 2 children again on the new connection")


def test_config_and_commands_reach_the_right_local_subscriber(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    gw = gw_ns(conf)
    sub_a = hx.local_sub(gw, "dev/child-a/#")
    sub_b = hx.local_sub(gw, "dev/child-b/#")
    sub_gw = hx.local_sub(gw, "dev/gw-test/#")
    pub(conf, "dev/child-a/telemetry", "x")
    pub(conf, "dev/child-b/telemetry", "y")
    observer.wait("/devices/child-b/events", "y")
    for child in ("child-a", "child-b"):
        h.wait_for(lambda c=child: "/devices/%s/commands/#" % c in cloud.log_text(),
                   what="SUBSCRIBE for %s" % child)

    observer.publish("/devices/child-a/config", b"cfg-a", qos=1)
    observer.publish("/devices/child-b/commands/reboot", b"now", qos=1)
    observer.publish("/devices/gw-test/commands", b"gw-cmd", qos=1)
    observer.publish("/devices/child-c/config", b"not-attached", qos=1)  # nobody subscribed
    sub_a.wait("dev/child-a/config", "cfg-a")
    sub_b.wait("dev/child-b/commands/reboot", "now")
    sub_gw.wait("dev/gw-test/commands", "gw-cmd")

    def downstream(sub):
        return [(m[0], m[1]) for m in sub.messages()
                if m[0].split("/")[2] in ("config", "commands")]

    assert downstream(sub_a) == [("dev/child-a/config", "cfg-a")]
    assert downstream(sub_b) == [("dev/child-b/commands/reboot", "now")]
    assert downstream(sub_gw) == [("dev/gw-test/commands", "gw-cmd")]
    # config is kept locally (retained) for an app that starts later.
    late = hx.local_sub(gw, "dev/child-a/config")
    topic, payload, _, retained = late.wait("dev/child-a/config", "cfg-a")
    assert retained


def test_bad_ids_and_oversized_payloads_are_refused(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    gw = gw_ns(conf)
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    local = hx.local_client(gw)
    local.publish("dev/goog-child/telemetry", b"bad1")
    local.publish("dev/ab/telemetry", b"bad2")
    local.publish("dev/9lives/telemetry", b"bad3")
    local.publish("dev/child-a/telemetry", b"E" * (256 * 1024 + 1))
    local.publish("dev/child-a/state", b"S" * (64 * 1024 + 1))
    local.publish("dev/child-a/telemetry", b"ok")  # the sentinel: everything before is done
    observer.wait("/devices/child-a/events", "ok")

    def reasons():
        return [json.loads(m[1]) for m in errors.messages()]

    h.wait_for(lambda: len(reasons()) >= 5, what=lambda: "5 errors (got %s)" % reasons())
    by_topic = {r["topic"]: r["error"] for r in reasons()}
    assert "must not start with \"goog\"" in by_topic["dev/goog-child/telemetry"]
    assert "3 to 255 characters" in by_topic["dev/ab/telemetry"]
    assert "start with a letter" in by_topic["dev/9lives/telemetry"]
    assert "262145 bytes" in by_topic["dev/child-a/telemetry"]
    assert "at most 262144" in by_topic["dev/child-a/telemetry"]
    assert "at most 65536 bytes for a state update" in by_topic["dev/child-a/state"]
    # Nothing of it went upstream: only child-a's attach and the sentinel.
    assert [m[0] for m in observer.received()] == ["/devices/child-a/attach",
                                                   "/devices/child-a/events"]
    assert observer.received("/devices/child-a/events")[0][1] == b"ok"


def test_state_is_coalesced_newest_wins(hx):
    cloud, daemon, conf, observer, _ = start(hx, gateway=False)
    local = hx.local_client(gw_ns(conf))
    for i in range(5):
        local.publish("dev/gw-test/state", ("s%d" % i).encode())
    observer.wait("/devices/gw-test/state", "s4")
    states = [m[1] for m in observer.received("/devices/gw-test/state")]
    # The first went at once, the newest after the second was over; the rest were replaced
    # (on a fast machine all five arrive within the second: exactly [s0, s4]).
    assert states[0] == b"s0" and states[-1] == b"s4", states
    assert len(states) < 5, states


def test_gateway_errors_are_explained(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    gw = gw_ns(conf)
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    h.wait_for(lambda: "/devices/gw-test/errors" in cloud.log_text(),
               what="SUBSCRIBE /devices/gw-test/errors")
    observer.publish("/devices/gw-test/errors", json.dumps(
        {"error_type": "GATEWAY_DEVICE_NOT_FOUND", "device_id": "child-x",
         "description": "device child-x not attached", "message_id": 7}).encode(), qos=1)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    report = json.loads(payload)
    assert report["topic"] == "/devices/gw-test/errors"
    assert report["error"].startswith("GATEWAY_DEVICE_NOT_FOUND for device child-x: device "
                                      "child-x not attached: ")
    assert "bind it to the gateway" in report["error"]
    daemon.wait_log(r"GATEWAY_DEVICE_NOT_FOUND for device child-x")


def test_idle_child_is_detached_and_attached_again(hx):
    cloud, daemon, conf, observer, _ = start(hx, gcp={"attach_idle": "1s"})
    pub(conf, "dev/child-b/telemetry", "first")
    observer.wait("/devices/child-b/detach", "{}")
    pub(conf, "dev/child-b/telemetry", "second")
    observer.wait("/devices/child-b/events", "second")
    seen = [t for t in topics(observer) if t.startswith("/devices/child-b/")]
    assert seen[:5] == ["/devices/child-b/attach", "/devices/child-b/events",
                        "/devices/child-b/detach", "/devices/child-b/attach",
                        "/devices/child-b/events"], seen


def test_children_refused_without_gateway_mode(hx):
    cloud, daemon, conf, observer, _ = start(hx, gateway=False)
    gw = gw_ns(conf)
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    pub(conf, "dev/child-a/telemetry", "nope")
    pub(conf, "dev/gw-test/telemetry", "mine")
    observer.wait("/devices/gw-test/events", "mine")
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "gcp.gateway is false" in json.loads(payload)["error"]
    assert topics(observer) == ["/devices/gw-test/events"]


def test_wrong_project_is_explained(hx):
    # The cloud expects aud = PROJECT; another project id is signed as the aud (the default).
    cloud, daemon, _, _, _ = start(hx, gcp={"project": "other-project"}, wait_accepted=False)
    line = cloud.wait_event("connect", result="refused", reason="wrong aud")
    assert line["client_id"] == CLIENT_ID.replace(PROJECT, "other-project")
    daemon.wait_log(r"the server refused the JWT \(CONNACK 5\)")
