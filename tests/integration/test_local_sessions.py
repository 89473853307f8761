"""Local server sessions against the real daemon (MQTT 3.1.1 §3.1.2.4, §4.3,
§4.4): persistent-session queues, QoS 2 exactly-once across a reconnect,
retained messages across a daemon restart, wills of killed clients,
takeover, and a slow consumer that cannot hurt the others."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import harness as h
import mqtt_raw as raw


def local_gateway(hx, **local_keys):
    """hx.gateway() with extra local.* keys."""
    broker = hx.broker()
    conf = hx.config(broker)
    conf["local"].update(local_keys)
    daemon = hx.uplinkd(conf)
    return types.SimpleNamespace(broker=broker, daemon=daemon, conf=conf,
                                   unix=h.local_unix_path(conf), tcp_port=h.local_tcp_port(conf))


def raw_client(hx, gw, **kwargs):
    c = raw.RawClient(gw.tcp_port, **kwargs)
    hx.add_closer(c.close)
    return c


def test_persistent_session_queue_delivered_after_reconnect(hx):
    gw = hx.gateway()
    sub = raw_client(hx, gw)
    assert not sub.connect("keeper", clean=False).session_present
    sub.send(raw.subscribe(1, ("app/q/#", 1)))
    sub.expect("SUBACK")
    sub.send(raw.packet(0xE0, b""))  # DISCONNECT: the session stays (clean session 0)
    sub.expect_closed()

    for i in range(5):
        h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "1",
                        "-t", "app/q/%d" % i, "-m", "m%d" % i)
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "0",
                    "-t", "app/q/zero", "-m", "qos0")  # QoS 0 is not queued

    again = raw_client(hx, gw)
    assert again.connect("keeper", clean=False).session_present  # §3.2.2.2
    got = [again.expect("PUBLISH") for _ in range(5)]
    assert [p.payload for p in got] == [b"m%d" % i for i in range(5)]
    assert all(p.qos == 1 and not p.dup for p in got)
    assert len({p.packet_id for p in got}) == 5
    for p in got:
        again.send(raw.ack("PUBACK", p.packet_id))
    again.send(raw.packet(0xC0, b""))  # PINGREQ: nothing else queued before it
    assert again.expect("PINGRESP")

    # Clean session 1 discards it (§3.1.2.4): no session present afterwards.
    again.close()
    clean = raw_client(hx, gw)
    assert not clean.connect("keeper", clean=True).session_present


def test_mosquitto_sub_persistent_session(hx):
    """The same with real clients: mosquitto_sub -c keeps its session."""
    gw = hx.gateway()
    sub = hx.local_sub(gw, "app/p/#", qos=1, client_id="cli-keeper", extra=["-c"])
    sub.close()
    for i in range(3):
        h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "app/p/x", "-m", "p%d" % i)
    sub2 = hx.local_sub(gw, "app/p/#", qos=1, client_id="cli-keeper", extra=["-c"])
    for i in range(3):
        sub2.wait("app/p/x", "p%d" % i)


def test_qos2_exactly_once_across_client_reconnect(hx):
    gw = hx.gateway()
    watcher = hx.local_client(gw)
    watcher.subscribe("eo/#", qos=2)

    # Inbound: PUBREC received, connection lost before PUBREL; the client
    # re-sends the PUBLISH with DUP after reconnecting (§4.4).
    pub = raw_client(hx, gw)
    pub.connect("eo-pub", clean=False)
    pub.send(raw.publish("eo/in", "once", qos=2, packet_id=42))
    assert pub.expect("PUBREC").packet_id == 42
    pub.close()
    pub = raw_client(hx, gw)
    assert pub.connect("eo-pub", clean=False).session_present
    pub.send(raw.publish("eo/in", "once", qos=2, packet_id=42, dup=True))
    assert pub.expect("PUBREC").packet_id == 42
    pub.send(raw.ack("PUBREL", 42))
    assert pub.expect("PUBCOMP").packet_id == 42

    # Outbound: the subscriber gets PUBLISH, answers PUBREC, loses the
    # connection before PUBCOMP: after reconnecting it gets the PUBREL again
    # (not the PUBLISH). A second message it never acknowledged comes again
    # with DUP and the same packet id.
    sub = raw_client(hx, gw)
    sub.connect("eo-sub", clean=False)
    sub.send(raw.subscribe(1, ("eo/out", 2)))
    sub.expect("SUBACK")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "2", "-t", "eo/out",
                    "-m", "first")
    first = sub.expect("PUBLISH")
    sub.send(raw.ack("PUBREC", first.packet_id))
    assert sub.expect("PUBREL").packet_id == first.packet_id
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "2", "-t", "eo/out",
                    "-m", "second")
    second = sub.expect("PUBLISH")
    sub.close()
    sub = raw_client(hx, gw)
    assert sub.connect("eo-sub", clean=False).session_present
    rel = sub.expect("PUBREL")
    assert rel.packet_id == first.packet_id
    again = sub.expect("PUBLISH")
    assert (again.payload, again.dup, again.packet_id) == (b"second", True, second.packet_id)
    sub.send(raw.ack("PUBCOMP", first.packet_id))
    sub.send(raw.ack("PUBREC", again.packet_id))
    assert sub.expect("PUBREL").packet_id == again.packet_id
    sub.send(raw.ack("PUBCOMP", again.packet_id))

    h.wait_for(lambda: watcher.received("eo/in"), what="eo/in at the watcher")
    h.wait_for(lambda: len(watcher.received("eo/out")) >= 2, what="eo/out at the watcher")
    # Exactly once: a PING round trip through the server orders after any duplicate.
    probe = raw_client(hx, gw)
    probe.connect("probe")
    probe.send(raw.publish("eo/end", "end", qos=1, packet_id=1))
    probe.expect("PUBACK")
    watcher.wait("eo/end")
    assert [m[1] for m in watcher.received("eo/in")] == [b"once"]
    assert [m[1] for m in watcher.received("eo/out")] == [b"first", b"second"]


def test_retained_messages_survive_daemon_restart(hx):
    gw = hx.gateway()
    port = str(gw.tcp_port)
    h.mosquitto_pub("-h", "127.0.0.1", "-p", port, "-r", "-q", "1", "-t", "dev/a/config",
                    "-m", "cfg-a")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", port, "-r", "-t", "dev/b/config", "-m", "cfg-b")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", port, "-r", "-t", "dev/c/config", "-m", "gone")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", port, "-r", "-t", "dev/c/config", "-n")  # cleared
    rc, _ = gw.daemon.stop()
    assert rc == 0
    store = os.path.join(gw.conf["gateway"]["state_dir"], "retained.db")
    assert os.path.getsize(store) > 0

    daemon = hx.uplinkd(gw.conf, name="uplinkd-restarted")
    daemon.wait_log(r"retained store .*: loaded \d+ retained messages")
    sub = hx.local_sub(gw, "dev/+/config", qos=1)
    sub.wait("dev/a/config", "cfg-a")
    sub.wait("dev/b/config", "cfg-b")
    assert all(m[3] for m in sub.messages()), "retained flag missing: %s" % sub.messages()
    assert "dev/c/config" not in [m[0] for m in sub.messages()]


def test_corrupt_retained_store_is_reported_and_skipped(hx):
    broker = hx.broker()
    conf = hx.config(broker)
    store = os.path.join(conf["gateway"]["state_dir"], "retained.db")
    with open(store, "wb") as f:
        f.write(b"UPLKRTN1\x00\x00\x00\x05garbage")
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"retained store .* is corrupt")
    assert os.path.exists(store + ".corrupt")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(h.local_tcp_port(conf)), "-t", "still/ok",
                    "-m", "x")


WILL_CLIENT = textwrap.dedent("""
    import sys, time
    import paho.mqtt.client as paho
    c = paho.Client(client_id="doomed", clean_session=True, protocol=paho.MQTTv311)
    c.will_set("wills/doomed", b"gone", qos=1, retain=True)
    def on_connect(client, userdata, flags, rc):
        print("connected", rc, flush=True)
    c.on_connect = on_connect
    c.connect("127.0.0.1", int(sys.argv[1]), keepalive=60)
    c.loop_forever()
""")


def test_will_published_when_client_is_killed(hx):
    gw = hx.gateway()
    watcher = hx.local_client(gw)
    watcher.subscribe("wills/#", qos=1)
    proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, str(gw.tcp_port)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    hx.add_closer(lambda: (proc.kill(), proc.wait(10)))
    line = proc.stdout.readline()
    assert line.startswith("connected 0"), line
    assert not watcher.received("wills/doomed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _, payload, qos, _ = watcher.wait("wills/doomed", "gone")
    assert qos == 1
    # Retain honoured (§3.1.2.17): a new subscriber gets it too.
    sub = hx.local_sub(gw, "wills/doomed", qos=1)
    _, _, _, retained = sub.wait("wills/doomed", "gone")
    assert retained


def test_no_will_after_disconnect(hx):
    gw = hx.gateway()
    watcher = hx.local_client(gw)
    watcher.subscribe("wills/#", qos=1)
    c = raw_client(hx, gw)
    c.connect("polite", will=("wills/polite", "gone", 1, False))
    c.send(raw.packet(0xE0, b""))
    c.expect_closed()
    probe = raw_client(hx, gw)
    probe.connect("probe")
    probe.send(raw.publish("wills/marker", "m", qos=1, packet_id=1))
    probe.expect("PUBACK")
    watcher.wait("wills/marker")
    assert not watcher.received("wills/polite")


def test_takeover_closes_old_connection_and_keeps_session(hx):
    gw = hx.gateway()
    first = raw_client(hx, gw)
    first.connect("twin", clean=False)
    first.send(raw.subscribe(1, ("tk/#", 1)))
    first.expect("SUBACK")
    second = raw_client(hx, gw)
    assert second.connect("twin", clean=False).session_present  # §3.1.4-2
    first.expect_closed()
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "1", "-t", "tk/x",
                    "-m", "to-second")
    assert second.expect("PUBLISH").payload == b"to-second"
    gw.daemon.wait_log(r"takes over client id 'twin'")


def test_slow_consumer_cannot_hurt_the_others(hx):
    """A subscriber that never reads is cut off at its output bound; a
    healthy QoS 1 subscriber, whose output the in-flight window bounds, gets
    every message, and the server keeps serving."""
    # A window of 10 x 32 KiB keeps the healthy client's output under 1 MiB.
    gw = local_gateway(hx, max_inflight=10)
    healthy = hx.local_client(gw)
    healthy.subscribe("flood/#", qos=1)
    stuck = raw_client(hx, gw, rcvbuf=4096)  # never reads
    stuck.connect("stuck")
    stuck.send(raw.subscribe(1, ("flood/#", 0)))
    publisher = hx.local_client(gw)
    payload = b"x" * 32768
    # 12.8 MiB: more than loopback socket buffers plus the 1 MiB of output a
    # client may have queued.
    n = 400
    for i in range(n):
        publisher.publish("flood/data", payload + b"%d" % i, qos=1)
    h.wait_for(lambda: len(healthy.received("flood/data")) >= n,
               what=lambda: "%d of %d at the healthy subscriber"
               % (len(healthy.received("flood/data")), n))
    gw.daemon.wait_log(r"client stuck .*slow consumer")
    got = [m[1][len(payload):] for m in healthy.received("flood/data")]
    assert got == [b"%d" % i for i in range(n)], "lost or reordered"
    # Still serving: a new client round trip works.
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "1", "-t", "flood/end",
                    "-m", "end")
    healthy.wait("flood/end")


def test_stuck_qos1_subscriber_is_bounded(hx):
    """A QoS 1 subscriber that never acknowledges fills its window and its
    queue, then is disconnected with a log line (local.max_queued)."""
    gw = local_gateway(hx, max_queued=20, max_inflight=5)
    stuck = raw_client(hx, gw)
    stuck.connect("noack")
    stuck.send(raw.subscribe(1, ("slow/#", 1)))
    stuck.expect("SUBACK")
    publisher = hx.local_client(gw)
    for i in range(30):
        publisher.publish("slow/x", b"%d" % i, qos=1)
    gw.daemon.wait_log(r"client noack .*slow consumer: local.max_queued reached")
    stuck.expect_closed()
