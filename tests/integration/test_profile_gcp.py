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
import time
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


def arrival_times(observer):
    """Record the monotonic arrival time of every message the observer gets, as
    [(time, topic, payload)], from now on."""
    times = []
    on_message = observer.client.on_message

    def stamp(client, userdata, msg):
        times.append((time.monotonic(), msg.topic, msg.payload))
        on_message(client, userdata, msg)

    observer.client.on_message = stamp
    return times


def test_state_is_coalesced_newest_wins(hx):
    """One state per second and device: a burst goes out as its first and its newest
    member, the newest one second after the first; another device is not held up."""
    cloud, daemon, conf, observer, _ = start(hx)
    times = arrival_times(observer)
    local = hx.local_client(gw_ns(conf))
    for i in range(5):
        local.publish("dev/gw-test/state", ("s%d" % i).encode())
    local.publish("dev/child-b/state", b"b0")
    observer.wait("/devices/gw-test/state", "s4")
    observer.wait("/devices/child-b/state", "b0")
    states = [m[1] for m in observer.received("/devices/gw-test/state")]
    # The first went at once, the newest after the second was over; the rest were replaced
    # (on a fast machine all five arrive within the second: exactly [s0, s4]).
    assert states[0] == b"s0" and states[-1] == b"s4", states
    assert len(states) < 5, states
    at = {(t, p): when for when, t, p in times}
    gap = at[("/devices/gw-test/state", b"s4")] - at[("/devices/gw-test/state", b"s0")]
    assert gap >= 0.9, "the newest state followed the first after %.2f s, not 1 s" % gap
    # child-b's own second: its state did not wait for the gateway's.
    assert at[("/devices/child-b/state", b"b0")] < at[("/devices/gw-test/state", b"s4")]


def test_rate_is_held_for_gateway_and_children_together(hx):
    """GCP takes 100 messages/s per connection, all children together: the uplink's token
    bucket (rate.max_msgs_per_s, 100 by default for gcp; 50 here to keep the test short)
    is shared by the gateway and every attached child."""
    rate = 50
    cloud, daemon, conf, observer, _ = start(hx, rate={"max_msgs_per_s": rate})
    local = hx.local_client(gw_ns(conf))
    # Attach both children first, so only data is measured.
    local.publish("dev/child-a/telemetry", b"warm-a")
    local.publish("dev/child-b/telemetry", b"warm-b")
    observer.wait("/devices/child-a/events", "warm-a")
    observer.wait("/devices/child-b/events", "warm-b")
    times = arrival_times(observer)
    count = 210
    devices = ["gw-test", "child-a", "child-b"]
    infos = [local.client.publish("dev/%s/telemetry" % devices[i % 3], b"m%03d" % i, qos=1)
             for i in range(count)]
    h.wait_for(lambda: all(i.is_published() for i in infos), what="local PUBACKs")
    h.wait_for(lambda: len([t for t in times if "/events" in t[1]]) >= count,
               timeout=h.TIMEOUT + count / rate,
               what=lambda: "%d events upstream (got %d)" % (
                   count, len([t for t in times if "/events" in t[1]])))
    events = [t for t in times if "/events" in t[1]]
    # Every device took part, so one bucket is shared (three per-device buckets would let
    # three times the rate through).
    assert {t[1].split("/")[2] for t in events} == set(devices)
    # A full bucket lets one second's worth through at once; after that the rate holds
    # (tolerance for tokens refilled while the burst drained; unlimited would be >1000/s).
    steady = events[rate:]
    took = steady[-1][0] - steady[0][0]
    measured = (len(steady) - 1) / took
    assert measured <= rate * 1.25, "%.1f messages/s upstream, limit %d" % (measured, rate)
    # And in no window of one second did more than two seconds' worth arrive.
    stamps = [t[0] for t in events]
    for i, start_at in enumerate(stamps):
        in_window = sum(1 for s in stamps[i:] if s - start_at < 1.0)
        assert in_window <= 2 * rate + 2, "%d messages within 1 s" % in_window


def test_child_taken_away_by_reload_is_detached(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    pub(conf, "dev/child-a/telemetry", "a")
    pub(conf, "dev/child-b/telemetry", "b")
    observer.wait("/devices/child-b/events", "b")
    observer.wait("/devices/child-a/events", "a")
    # Routes now send child-b nowhere: it is detached at once (not after attach_idle).
    conf["routes"] = [{"children": "child-a", "uplinks": ["cloud"]},
                      {"children": GW, "uplinks": ["cloud"]}]
    hx.write_config(conf, "uplinkd.yaml")
    daemon.reload()
    observer.wait("/devices/child-b/detach", "{}")
    daemon.wait_log(r"child-b.*detaching: the routes no longer send it to this uplink")
    pub(conf, "dev/child-a/telemetry", "a2")
    observer.wait("/devices/child-a/events", "a2")
    assert "/devices/child-a/detach" not in topics(observer)


def test_reattach_uses_the_cached_child_token(hx):
    """The re-attach after a reconnect signs nothing on the loop: child-a's token, signed
    for its first attach, is sent again while it has life left."""
    cloud, daemon, conf, observer, keys = start(hx)
    pub(conf, "dev/child-a/telemetry", "one")
    observer.wait("/devices/child-a/events", "one")
    first = json.loads(observer.received("/devices/child-a/attach")[0][1])["authorization"]
    iat = jwt.decode(first, options={"verify_signature": False})["iat"]
    # A token signed again now would carry another iat.
    h.wait_for(lambda: int(time.time()) - 60 > iat, timeout=3, what="the next second")
    connects = len(cloud.events("connect", client_id=CLIENT_ID, result="accepted"))
    cloud.restart()
    cloud.wait_event("connect", client_id=CLIENT_ID, result="accepted", since=connects)
    observer.wait_connected()
    h.wait_for(lambda: len(observer.received("/devices/child-a/attach")) == 2,
               what="the re-attach of child-a")
    again = json.loads(observer.received("/devices/child-a/attach")[1][1])["authorization"]
    assert again == first


def test_child_key_error_is_reported_and_attach_falls_back(hx):
    cloud, daemon, conf, observer, _ = start(hx)
    errors = hx.local_sub(gw_ns(conf), "uplinkd/cloud/errors")
    with open(os.path.join(hx.dir, "devices", "child-c.key"), "w") as f:
        f.write("not a key\n")
    pub(conf, "dev/child-c/telemetry", "c")
    observer.wait("/devices/child-c/events", "c")
    assert observer.received("/devices/child-c/attach")[0][1] == b"{}"
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "cannot sign the attach token for child-c" in json.loads(payload)["error"]


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
    # One line: GCP's checklist (the profile's CONNACK text) and what the token carried.
    daemon.wait_log(r"the server refused the JWT \(CONNACK 5\): GCP/ClearBlade IoT Core "
                    r"rejected the JWT: check alg against the key registered for the device, "
                    r"aud = the project id, exp <= 24 h after iat, and the clock \(sent: alg "
                    r"ES256, aud \"other-project\", iat .* UTC, exp .* UTC; local clock .* UTC\)")


def uplink_state(conf):
    """The cloud uplink's state in `uplinkctl status` (upper case), or None."""
    proc = h.uplinkctl(conf["control"]["socket"], "status")
    if proc.returncode not in (0, 3):
        return None
    return (h.status_uplink_state(json.loads(proc.stdout or "{}"), "cloud") or "").upper()


def wait_offline(conf):
    h.wait_for(lambda: uplink_state(conf) not in (None, "ONLINE"),
               what="uplink cloud to notice the cloud is gone")


def publish_acked(local, messages):
    """Publish [(topic, payload)] at QoS 1 and wait for every local PUBACK (spooled)."""
    infos = [local.client.publish(topic, payload, qos=1) for topic, payload in messages]
    h.wait_for(lambda: all(i.is_published() for i in infos),
               what=lambda: "local PUBACKs (%d of %d)" % (
                   sum(1 for i in infos if i.is_published()), len(infos)))


def test_children_spooled_before_a_crash_are_attached_after_restart(hx):
    """A child's attachment holds for one connection. Data acknowledged for children while
    the cloud was away, then kill -9: the restarted daemon attaches each of them (it kept
    them in <state_dir>/gcp/<uplink>) before any of their spooled events goes up, so the
    bridge takes every acknowledged message."""
    cloud, daemon, conf, observer, _ = start(hx)
    local = hx.local_client(gw_ns(conf))
    cloud.stop()
    wait_offline(conf)
    sent = [("dev/%s/telemetry" % dev, ("%s-%d" % (dev, i)).encode())
            for i in range(3) for dev in ("child-a", GW, "child-b")]
    publish_acked(local, sent)
    known = os.path.join(conf["gateway"]["state_dir"], "gcp", "cloud")
    assert os.stat(known).st_mode & 0o777 == 0o600
    with open(known) as f:
        assert sorted(line for line in f.read().splitlines() if not line.startswith("#")) == \
            ["child-a", "child-b"]
    local.close()
    daemon.kill()
    daemon.expect_exit = daemon.returncode = daemon.proc.returncode

    daemon2 = hx.uplinkd(conf, name="uplinkd2")
    daemon2.wait_log(r"2 children known before the restart")
    cloud.start()
    observer.wait_connected()
    for topic, payload in sent:
        observer.wait("/devices/%s/events" % topic.split("/")[1], payload)
    seen = topics(observer)
    for child in ("child-a", "child-b"):
        attach, events = "/devices/%s/attach" % child, "/devices/%s/events" % child
        assert attach in seen, "no attach for %s after the restart: %s" % (child, seen)
        assert seen.index(attach) < seen.index(events), seen
    assert "/devices/%s/attach" % GW not in seen
    # Every acknowledged message arrived (in order per device; once: nothing was in flight).
    for dev in ("child-a", GW, "child-b"):
        got = [m[1] for m in observer.received("/devices/%s/events" % dev)]
        assert got == [p for t, p in sent if t.split("/")[1] == dev], (dev, got)


def test_reattach_burst_keeps_the_rate(hx):
    """Attaches count against rate.max_msgs_per_s like data (GCP counts every incoming
    message): after a reconnect, 40 children are attached again over two seconds at
    20 messages/s, not all at once, and each child's spooled data still waits for its
    attach."""
    rate, count = 20, 40
    children = ["kid-%02d" % i for i in range(count)]
    # A long backoff: the uplink reconnects only when told to (uplinkctl reconnect), once
    # the observer is back, so every arrival is timed.
    cloud, daemon, conf, observer, _ = start(hx, rate={"max_msgs_per_s": rate},
                                             reconnect={"base": "60s", "cap": "60s"})
    local = hx.local_client(gw_ns(conf))
    publish_acked(local, [("dev/%s/telemetry" % c, b"first") for c in children])
    h.wait_for(lambda: len(topics(observer)) >= 2 * count, timeout=h.TIMEOUT + 2 * count / rate,
               what=lambda: "%d attaches and events (got %d)" % (2 * count,
                                                                  len(topics(observer))))
    cloud.stop()
    wait_offline(conf)
    publish_acked(local, [("dev/%s/telemetry" % c, b"second") for c in children])
    cloud.start()
    observer.wait_connected()
    times = arrival_times(observer)
    mark = len(observer.received())
    proc = h.uplinkctl(conf["control"]["socket"], "reconnect", "cloud", json_output=False)
    assert proc.returncode == 0, proc.stderr
    h.wait_for(lambda: len([t for t in times if t[2] == b"second"]) >= count,
               timeout=h.TIMEOUT + 3 * count / rate,
               what=lambda: "%d spooled events (got %d)" % (
                   count, len([t for t in times if t[2] == b"second"])))

    after = [m[0] for m in observer.received()[mark:]]
    for child in children:
        attach, events = "/devices/%s/attach" % child, "/devices/%s/events" % child
        assert after.count(attach) == 1, (child, after)
        assert after.index(attach) < after.index(events), (child, after)
    attaches = [t[0] for t in times if t[1].endswith("/attach")]
    assert len(attaches) == count
    # A full bucket lets one second's worth go at once, the rest waits for tokens: the
    # attaches take about (count - rate) / rate seconds (unlimited: a few milliseconds).
    spread = attaches[-1] - attaches[0]
    assert spread >= 0.8 * (count - rate) / rate, "%d attaches within %.3f s" % (count, spread)
    # No window of one second carries more than the bucket plus one second's refill.
    stamps = [t[0] for t in times]
    busiest = max(sum(1 for s in stamps[i:] if s - at < 1.0) for i, at in enumerate(stamps))
    print("re-attach of %d children at %d/s: attaches over %.2f s, at most %d messages in 1 s"
          % (count, rate, spread, busiest))
    assert busiest <= 2 * rate + 2, "%d messages within 1 s" % busiest
