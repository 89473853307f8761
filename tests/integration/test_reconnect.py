"""The cloud goes away and comes back: nothing queued may be lost."""

import threading

import harness as h

STREAM = "gw-test/stream/telemetry"


def _connects(broker):
    """How many times uplinkd (client id gw-test) completed CONNECT at the broker."""
    return broker.log_text().count(" as gw-test ")


def test_broker_restart_mid_stream_loses_nothing(hx):
    broker = hx.broker()
    gw = hx.gateway(broker)
    # A persistent QoS 1 session at the cloud, so the broker keeps what
    # arrives while this watcher is reconnecting after the restart.
    cloud = hx.cloud_client(broker, client_id="stream-watcher", clean_session=False)
    cloud.subscribe(STREAM, qos=1)
    local = hx.local_client(gw)

    total = 200
    expected = {("s%03d" % i).encode() for i in range(total)}
    stopped, started = threading.Event(), threading.Event()
    errors = []

    def publisher():
        # 0..99 before the restart (some in flight when the broker stops),
        # 100..149 while it is down (queued in uplinkd), 150..199 after.
        try:
            for i in range(total):
                if i == 100:
                    stopped.wait(h.TIMEOUT)
                elif i == 150:
                    started.wait(h.TIMEOUT)
                local.publish("dev/stream/telemetry", ("s%03d" % i).encode(), qos=1,
                              timeout=3 * h.TIMEOUT)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    def got():
        return {m[1] for m in cloud.received(STREAM)}

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        h.wait_for(lambda: len(got()) >= 50, what=lambda: "50 messages before the restart (got %d)"
                   % len(got()))
        broker.stop()
        stopped.set()
        broker.start()
        started.set()
        h.wait_for(lambda: got() >= expected, timeout=4 * h.TIMEOUT,
                   what=lambda: "all %d messages after the restart; missing: %s"
                   % (total, sorted(m.decode() for m in expected - got())[:20]))
    finally:
        stopped.set()
        started.set()
        thread.join(4 * h.TIMEOUT)
    assert not errors, "local publisher failed: %r" % errors
    assert got() == expected
    assert _connects(broker) >= 2, "uplinkd never reconnected after the restart"
    assert gw.daemon.running()


def test_cloud_down_at_start_then_up(hx):
    """Messages published while the cloud was never reachable are delivered
    once it appears."""
    broker = hx.broker()
    # Register a persistent session at the cloud, then take the cloud down:
    # the broker keeps the subscription across the restart.
    cloud = hx.cloud_client(broker, client_id="early-watcher", clean_session=False)
    cloud.subscribe("gw-test/early/telemetry", qos=1)
    broker.stop()
    gw = hx.gateway(broker)
    early = ["early-%d" % i for i in range(5)]
    for payload in early:
        h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/early/telemetry", "-m", payload)
    broker.start()
    for payload in early:
        cloud.wait("gw-test/early/telemetry", payload, timeout=2 * h.TIMEOUT)
    # QoS 1 allows duplicates after a reconnect, never loss or reordering.
    first_seen = list(dict.fromkeys(m[1].decode() for m in cloud.received("gw-test/early/telemetry")))
    assert first_seen == early
