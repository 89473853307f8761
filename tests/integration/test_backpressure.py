"""A slow cloud (issue #6): the spool fills to max_bytes and backpressure reaches the publisher.

uplinkd talks TLS to a real mosquitto through ThrottleProxy, a transparent TCP proxy on
loopback that passes bytes through untouched (so TLS, SNI and hostname verification are those
of the real broker: uplinkd still connects to "localhost") and throttles the cloud-bound
direction. A local paho publisher sends QoS 1 as fast as its in-flight window allows.

- overflow: block: once the spool holds max_bytes, uplinkd stops acknowledging: the
  publisher's window stays full and its PUBACKs come only as fast as the cloud takes messages,
  so what is acknowledged but not yet upstream never exceeds what the spool holds.
  `uplinkctl status` shows the spool blocked, nothing is dropped, and when the cloud speeds up
  every acknowledged message arrives, in order.
- overflow: drop-oldest: the publisher is never held back; the oldest records are dropped,
  counted in status (`dropped.overflow`), and what arrives is still in order.

test_spool.py::test_full_spool_blocks_then_drains covers a cloud that is down; this file
covers one that is up but slower than the publisher.
"""

import json
import re
import select
import socket
import threading
import time

import paho.mqtt.client as paho

import harness as h

MAX_BYTES = 256 * 1024
THROTTLE = 20 * 1024  # cloud-bound bytes per second while the cloud is slow
PAYLOAD = 1000  # bytes; a spool record is this plus the topic and a 28-byte header
WINDOW = 20  # the publisher's in-flight window (well inside the spool's waiting room)
TOPIC = "gw-test/bp/telemetry"


class ThrottleProxy:
    """A transparent TCP proxy on loopback: listens where "localhost" resolves (127.0.0.1,
    and ::1 when localhost has it, like harness.Broker) and relays every connection to
    127.0.0.1:`backend_port`. Bytes towards the backend are paced at `rate` bytes/s (one
    budget shared by all connections; None = full speed); bytes back are not paced.
    set_rate() changes the pace at once, also for a relay that is waiting."""

    def __init__(self, backend_port, rate=None):
        self.backend_port = backend_port
        self.rate = rate
        self.up_bytes = 0
        self.connections = 0
        self.errors = []
        self._cond = threading.Condition()
        self._due = 0.0  # monotonic time before which no more cloud-bound bytes may go
        self._stop = threading.Event()
        self._socks = []
        self.port, self._listeners = h.listen_loopback()
        self._thread = threading.Thread(target=self._accept_loop, name="throttle-proxy",
                                        daemon=True)
        self._thread.start()

    def set_rate(self, rate):
        with self._cond:
            self.rate = rate
            self._due = 0.0
            self._cond.notify_all()

    def _accept_loop(self):
        h.accept_loop(self._listeners, self._stop, self._connect,
                      on_error=lambda e: self.errors.append(repr(e)))

    def _connect(self, client):
        """A new connection from uplinkd: open one to the broker and relay both ways."""
        try:
            cloud = socket.create_connection(("127.0.0.1", self.backend_port), timeout=h.TIMEOUT)
        except OSError as e:
            self.errors.append(repr(e))
            client.close()
            return
        with self._cond:
            self.connections += 1
            self._socks += [client, cloud]
        for src, dst, paced in ((client, cloud, True), (cloud, client, False)):
            threading.Thread(target=self._relay, args=(src, dst, paced), daemon=True).start()

    def _pace(self, n):
        """Wait until `n` more cloud-bound bytes fit the rate (pacing, not an event wait)."""
        with self._cond:
            if self.rate is None:
                return
            start = max(self._due, time.monotonic())
            self._due = start + n / float(self.rate)
            while not self._stop.is_set() and self.rate is not None:
                remaining = start - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _relay(self, src, dst, paced):
        try:
            src.settimeout(None)
            dst.settimeout(30)  # a peer that stops reading for 30 s ends the relay
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                # Small reads while paced, so the pace is smooth and a change applies soon.
                data = src.recv(1024 if paced and self.rate is not None else 65536)
                if not data:
                    break
                if paced:
                    self._pace(len(data))
                    with self._cond:
                        self.up_bytes += len(data)
                dst.sendall(data)
        except (OSError, ValueError) as e:
            if not self._stop.is_set():
                self.errors.append(repr(e))
        finally:
            for s in (src, dst):  # either side gone: the whole connection goes
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            socks = list(self._socks)
        self._thread.join(5)
        for s in self._listeners + socks:
            try:
                s.close()
            except OSError:
                pass


class Publisher:
    """A paho QoS 1 publisher on uplinkd's local TCP port, publishing payloads "<n>:" padded
    to PAYLOAD bytes as fast as its in-flight window (WINDOW) allows, in a thread, until
    stopped. Records which n were acknowledged (PUBACK)."""

    def __init__(self, port):
        self.lock = threading.Lock()
        self.acked = set()
        self.sent = 0
        self.mids = {}
        self.early = set()
        self.error = None
        self.stop = threading.Event()
        c = paho.Client(client_id="bp-pub", clean_session=True, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(WINDOW)
        c.max_queued_messages_set(WINDOW)  # publish() says MQTT_ERR_QUEUE_SIZE when full
        c.on_publish = self._on_publish
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        self.client = c
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_publish(self, client, userdata, mid):
        # paho holds its own lock here: never call publish() with self.lock held (the PUBACK
        # may come before the mid is recorded, hence `early`).
        with self.lock:
            n = self.mids.pop(mid, None)
            if n is None:
                self.early.add(mid)
            else:
                self.acked.add(n)

    def _run(self):
        try:
            n = 0
            while not self.stop.is_set():
                payload = ("%d:" % n).ljust(PAYLOAD, "x")
                info = self.client.publish("dev/bp/telemetry", payload, qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    self.stop.wait(0.002)  # window full (or reconnecting): try again
                    continue
                with self.lock:
                    if info.mid in self.early:
                        self.early.discard(info.mid)
                        self.acked.add(n)
                    else:
                        self.mids[info.mid] = n
                    self.sent += 1
                n += 1
        except Exception as e:  # reported by the test
            self.error = e

    def counts(self):
        """(sent, acknowledged)."""
        with self.lock:
            return self.sent, len(self.acked)

    def halt(self):
        """Stop publishing and wait for the acknowledgements of what was sent."""
        self.stop.set()
        self.thread.join(h.TIMEOUT)
        h.wait_for(lambda: self.counts()[0] == self.counts()[1], timeout=2 * h.TIMEOUT,
                   what=lambda: "PUBACKs for everything sent (sent, acked) = %s" % (self.counts(),))

    def close(self):
        self.stop.set()
        self.thread.join(h.TIMEOUT)
        self.client.disconnect()
        self.client.loop_stop()


def spool_status(conf):
    proc = h.uplinkctl(conf["control"]["socket"], "status")
    assert proc.returncode in (0, 3), proc.stderr  # 3: an uplink is not ONLINE
    for up in json.loads(proc.stdout)["uplinks"]:
        if up["name"] == "cloud":
            return up["spool"]
    raise AssertionError("no uplink cloud in status: %s" % proc.stdout)


def first_arrivals(cloud):
    """The n of each message's first arrival at the cloud, in arrival order."""
    seen, out = set(), []
    for _topic, payload, _qos, _retain in cloud.received(TOPIC):
        n = int(payload.split(b":", 1)[0])
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def slow_cloud(hx, overflow):
    """A broker behind a throttled proxy, uplinkd with a small spool, a cloud-side watcher,
    and a publisher going as fast as it can."""
    broker = hx.broker()
    proxy = ThrottleProxy(broker.tls_port, rate=THROTTLE)
    hx.add_closer(proxy.close)
    # host stays "localhost" (SNI and the certificate's name), only the port is the proxy's.
    conf = hx.config(broker, port=proxy.port)
    conf["uplinks"][0]["spool"] = {"durability": "fsync", "max_bytes": "256KiB",
                                   "overflow": overflow}
    conf["log"] = {"level": "info"}
    cloud = hx.cloud_client(broker, client_id="bp-watch")
    cloud.subscribe(TOPIC, qos=1)
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"state CONNECTING -> ONLINE")
    pub = Publisher(h.local_tcp_port(conf))
    hx.add_closer(pub.close)
    return proxy, conf, cloud, daemon, pub


def test_slow_cloud_fills_spool_and_blocks_publisher(hx):
    proxy, conf, cloud, daemon, pub = slow_cloud(hx, "block")
    # Messages the full spool can hold: what may be acknowledged but not yet upstream. A
    # record is a bit bigger than PAYLOAD, which leaves a few messages of slack for those on
    # their way from the broker to the watcher.
    capacity = MAX_BYTES // PAYLOAD

    h.wait_for(lambda: spool_status(conf)["blocked"] > 0, timeout=2 * h.TIMEOUT,
               what=lambda: "the spool full and blocking: %s" % spool_status(conf))
    daemon.wait_log(r"spool full \(\d+ of max_bytes 262144 bytes, overflow: block\)")
    full = spool_status(conf)
    assert full["bytes"] <= MAX_BYTES and full["bytes"] > MAX_BYTES * 3 // 4, full
    # The table for people says so too (the JSON has it as spool.blocked).
    def table():
        return h.uplinkctl(conf["control"]["socket"], "status", json_output=False).stdout

    h.wait_for(lambda: re.search(r"^cloud: spool full: \d+ publish\(es\) from local clients "
                                 r"held back", table(), re.M),
               what=lambda: "the status table to say the spool is full: %s" % table())
    assert full["dropped"]["overflow"] == 0 and full["dropped"]["refused"] == 0, full

    # While the cloud is slow the publisher is held to the cloud's pace: watch until the
    # cloud has taken another 40 messages (about 2 s at THROTTLE).
    samples = []
    base = len(first_arrivals(cloud))

    def cloud_took_more():
        sent, acked = pub.counts()
        with pub.lock:
            acked_set = set(pub.acked)
        upstream = first_arrivals(cloud)
        ahead = len(acked_set - set(upstream))  # acknowledged, not yet upstream
        samples.append((sent - acked, ahead))
        assert ahead <= capacity, (
            "%d messages acknowledged but not upstream: more than the spool holds (%d); "
            "no backpressure" % (ahead, capacity))
        return len(upstream) >= base + 40

    h.wait_for(cloud_took_more, timeout=4 * h.TIMEOUT,
               what=lambda: "the slow cloud to take 40 more messages (samples %s)" % samples[-3:])
    window_full = sum(1 for inflight, _ in samples if inflight == WINDOW)
    assert window_full >= len(samples) // 2, (
        "the publisher's window was full in only %d of %d samples: %s"
        % (window_full, len(samples), samples))
    st = spool_status(conf)
    assert st["bytes"] <= MAX_BYTES, st
    assert st["dropped"]["overflow"] == 0 and st["dropped"]["refused"] == 0, st
    assert proxy.connections == 1, "uplinkd reconnected while the cloud was slow"

    # The cloud speeds up: PUBACKs flow again, the spool drains, nothing is lost.
    _, acked_before = pub.counts()
    proxy.set_rate(None)
    h.wait_for(lambda: pub.counts()[1] > acked_before + 2 * capacity, timeout=4 * h.TIMEOUT,
               what=lambda: "PUBACKs flowing again (acked %d, was %d)"
               % (pub.counts()[1], acked_before))
    pub.halt()
    assert pub.error is None, pub.error
    acked = set(pub.acked)
    h.wait_for(lambda: acked <= set(first_arrivals(cloud)), timeout=4 * h.TIMEOUT,
               what=lambda: "%d acknowledged messages still missing upstream"
               % len(acked - set(first_arrivals(cloud))))
    order = first_arrivals(cloud)
    assert order == sorted(order), "messages arrived out of order upstream"
    h.wait_for(lambda: spool_status(conf)["depth"] == 0, what=lambda: "the spool to drain: %s"
               % spool_status(conf))
    st = spool_status(conf)
    assert st["blocked"] == 0 and st["dropped"]["overflow"] == 0, st
    assert not proxy.errors, proxy.errors
    print("slow cloud, overflow block: %d acknowledged, all upstream in order; spool full at "
          "%d bytes; while full %d samples, window full in %d, at most %d acknowledged ahead "
          "of the cloud (spool holds %d); proxy carried %d bytes"
          % (len(acked), full["bytes"], len(samples), window_full,
             max(a for _, a in samples), capacity, proxy.up_bytes))


def test_slow_cloud_drop_oldest_counts_drops(hx):
    proxy, conf, cloud, daemon, pub = slow_cloud(hx, "drop-oldest")
    capacity = MAX_BYTES // PAYLOAD
    h.wait_for(lambda: spool_status(conf)["dropped"]["overflow"] > 0, timeout=2 * h.TIMEOUT,
               what=lambda: "drop-oldest on a full spool: %s" % spool_status(conf))
    daemon.wait_log(r"spool full \(max_bytes\): dropped the oldest \d+ record\(s\)")
    # The publisher is not held back: its PUBACKs keep coming far faster than the cloud
    # takes messages (several spools' worth while the cloud is slow).
    _, acked_before = pub.counts()
    h.wait_for(lambda: pub.counts()[1] > acked_before + 3 * capacity, timeout=4 * h.TIMEOUT,
               what=lambda: "PUBACKs while dropping (acked %d, was %d)"
               % (pub.counts()[1], acked_before))
    st = spool_status(conf)
    assert st["blocked"] == 0, st
    # drop-oldest may overshoot by less than one record while only the newest segment is left.
    assert st["bytes"] <= MAX_BYTES + PAYLOAD + 64, st

    proxy.set_rate(None)
    pub.halt()
    assert pub.error is None, pub.error
    acked = set(pub.acked)
    h.wait_for(lambda: spool_status(conf)["depth"] == 0, timeout=4 * h.TIMEOUT,
               what=lambda: "the spool to drain: %s" % spool_status(conf))
    # The newest message was never dropped, so once it is upstream everything that will
    # arrive has.
    newest = max(acked)
    h.wait_for(lambda: newest in set(first_arrivals(cloud)), timeout=2 * h.TIMEOUT,
               what="the newest message upstream")
    order = first_arrivals(cloud)
    assert order == sorted(order), "messages arrived out of order upstream"
    lost = acked - set(order)
    dropped = spool_status(conf)["dropped"]["overflow"]
    assert lost, "nothing was lost, so nothing was dropped: the test did not fill the spool"
    # Every loss is a counted drop (a dropped record already in flight may still arrive).
    assert len(lost) <= dropped, (len(lost), dropped)
    assert not proxy.errors, proxy.errors
    print("slow cloud, overflow drop-oldest: %d acknowledged, %d dropped (counted), %d lost, "
          "spool at %d bytes while dropping" % (len(acked), dropped, len(lost), st["bytes"]))
