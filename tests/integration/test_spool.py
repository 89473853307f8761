"""Store-and-forward (issue 6): an acknowledged local QoS 1 publish reaches
the cloud, at least once and in order per child, across kill -9, restarts,
broker restarts and a full disk. See docs/design/spool.md.

Every test here uses real processes: uplinkd, mosquitto as the cloud, paho
clients. Nothing sleeps a fixed time; every wait polls with a deadline.
"""

import glob
import json
import os
import re
import subprocess
import threading

import paho.mqtt.client as paho
import pytest

import harness as h

CHILDREN = ("c0", "c1", "c2", "c3")


class Publisher:
    """A paho QoS 1 publisher on uplinkd's local TCP port that records which
    messages were acknowledged (PUBACK), in a thread. Payload "<child>:<n>"
    with n counting per child, so order per child can be checked."""

    def __init__(self, port, total, client_id="spool-pub", window=200):
        self.total = total
        self.acked = set()
        self.sent = 0
        self.lock = threading.Lock()
        self.mids = {}
        self.early = set()
        self.stop = threading.Event()
        self.error = None
        c = paho.Client(client_id=client_id, clean_session=True, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(window)
        c.max_queued_messages_set(window)
        c.reconnect_delay_set(0.1, 0.5)
        c.on_publish = self._on_publish
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        self.client = c
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, client, userdata, mid):
        # Never hold self.lock around client.publish(): paho calls this with
        # its own lock held (a lock-order deadlock). The PUBACK may thus come
        # before the publisher has recorded the mid: keep it in `early`.
        with self.lock:
            payload = self.mids.pop(mid, None)
            if payload is not None:
                self.acked.add(payload)
            else:
                self.early.add(mid)

    def _run(self):
        try:
            counters = {c: 0 for c in CHILDREN}
            for i in range(self.total):
                if self.stop.is_set():
                    return
                child = CHILDREN[i % len(CHILDREN)]
                payload = "%s:%d" % (child, counters[child])
                counters[child] += 1
                while not self.stop.is_set():
                    info = self.client.publish("dev/%s/telemetry" % child, payload, qos=1)
                    if info.rc == paho.MQTT_ERR_SUCCESS:
                        with self.lock:
                            if info.mid in self.early:
                                self.early.discard(info.mid)
                                self.acked.add(payload)
                            else:
                                self.mids[info.mid] = payload
                            self.sent += 1
                        break
                    # Queue full or not connected: wait for room.
                    self.stop.wait(0.005)
        except Exception as e:  # reported by the test
            self.error = e

    def start(self):
        self.thread.start()
        return self

    def acked_count(self):
        with self.lock:
            return len(self.acked)

    def close(self):
        self.stop.set()
        self.thread.join(h.TIMEOUT)
        self.client.disconnect()
        self.client.loop_stop()


def received_by_child(cloud):
    """{child: [n, ...]} in arrival order, from a cloud subscriber."""
    out = {c: [] for c in CHILDREN}
    for topic, payload, _qos, _retain in cloud.received():
        m = re.match(r"gw-test/(c\d)/telemetry$", topic)
        if m:
            child, n = payload.decode().split(":")
            out[child].append(int(n))
    return out


def check_delivery(cloud, acked):
    """Every acknowledged message arrived; per child, first arrivals are in
    order. Returns the number of duplicates (allowed, counted)."""
    got = received_by_child(cloud)
    seen = set()
    duplicates = 0
    for child, numbers in got.items():
        first = []
        for n in numbers:
            key = "%s:%d" % (child, n)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            first.append(n)
        assert first == sorted(first), "child %s out of order: %s" % (child, first[:50])
    missing = acked - seen
    assert not missing, "%d acknowledged message(s) lost, e.g. %s" % (
        len(missing), sorted(missing)[:10])
    return duplicates


def wait_delivered(cloud, acked, timeout):
    def done():
        got = received_by_child(cloud)
        seen = {"%s:%d" % (c, n) for c, ns in got.items() for n in ns}
        return acked <= seen

    h.wait_for(done, timeout=timeout, what=lambda: "all %d acknowledged messages upstream (have %d)"
               % (len(acked), sum(len(v) for v in received_by_child(cloud).values())))


def spool_conf(hx, broker, **spool):
    conf = hx.config(broker)
    conf["uplinks"][0]["spool"] = spool or {"durability": "fsync"}
    conf["log"] = {"level": "info"}
    return conf


def status(gw_conf):
    out = h.uplinkctl(gw_conf["control"]["socket"], "--json", "status")
    return out.stdout


def spool_status(conf):
    """The spool object of uplink "cloud" from the control socket."""
    text = status(conf)
    start = text.find("{")
    data = json.loads(text[start:])
    for up in data["uplinks"]:
        if up["name"] == "cloud":
            return up["spool"]
    raise AssertionError("no uplink cloud in status: %s" % text)


@pytest.mark.parametrize("cloud_up", [False, True], ids=["cloud-down", "cloud-up"])
def test_kill9_during_stream_loses_nothing_acknowledged(hx, cloud_up):
    total = 20000
    broker = hx.broker(start=cloud_up)
    conf = spool_conf(hx, broker)
    cloud = None
    if cloud_up:
        cloud = hx.cloud_client(broker, client_id="spool-watch")
        cloud.subscribe("gw-test/+/telemetry", qos=0)
    daemon = hx.uplinkd(conf)
    pub = Publisher(h.local_tcp_port(conf), total).start()
    hx.add_closer(pub.close)
    try:
        h.wait_for(lambda: pub.acked_count() >= total // 3, timeout=6 * h.TIMEOUT,
                   what=lambda: "a third acknowledged (have %d)" % pub.acked_count())
        daemon.proc.kill()  # kill -9 in the middle of the stream
        daemon.proc.wait(h.TIMEOUT)
    finally:
        pub.close()
    daemon.stopped = True
    daemon.returncode = daemon.expect_exit = daemon.proc.returncode
    acked = set(pub.acked)
    assert pub.error is None, pub.error
    assert len(acked) < total, "the stream finished before the kill; nothing was tested"

    if not cloud_up:
        broker.start()
        cloud = hx.cloud_client(broker, client_id="spool-watch")
        cloud.subscribe("gw-test/+/telemetry", qos=0)
    daemon2 = hx.uplinkd(conf, name="uplinkd2")
    wait_delivered(cloud, acked, timeout=10 * h.TIMEOUT)
    dups = check_delivery(cloud, acked)
    print("kill -9 (%s): %d acknowledged of %d sent, all delivered, %d duplicate(s)"
          % ("cloud up" if cloud_up else "cloud down", len(acked), pub.sent, dups))
    assert daemon2.find_log(r"spool .* recovered: \d+ record") is not None


def test_broker_killed_three_times_during_stream(hx):
    total = 6000
    broker = hx.broker()
    conf = spool_conf(hx, broker)
    cloud = hx.cloud_client(broker, client_id="spool-watch", clean_session=False)
    cloud.subscribe("gw-test/+/telemetry", qos=1)
    hx.uplinkd(conf)
    pub = Publisher(h.local_tcp_port(conf), total).start()
    hx.add_closer(pub.close)
    for k in range(3):
        h.wait_for(lambda: pub.acked_count() >= (k + 1) * total // 5, timeout=6 * h.TIMEOUT,
                   what=lambda: "progress before broker kill %d (have %d)" % (k, pub.acked_count()))
        broker.proc.kill()
        broker.proc.wait(h.TIMEOUT)
        broker.proc = None
        broker.start()
        cloud.wait_connected()
    h.wait_for(lambda: pub.acked_count() == total, timeout=10 * h.TIMEOUT,
               what=lambda: "all %d acknowledged locally (have %d)" % (total, pub.acked_count()))
    acked = set(pub.acked)
    pub.close()
    # The watcher's persistent session at a SIGKILLed broker loses what the
    # broker had not saved, so check against a fresh subscription too: the
    # messages must have left uplinkd's spool (depth 0) after PUBACKs.
    h.wait_for(lambda: spool_status(conf)["depth"] == 0, timeout=4 * h.TIMEOUT,
               what=lambda: "spool drained: %s" % spool_status(conf))
    st = spool_status(conf)
    assert st["durability"] == "fsync"
    print("3 broker kills: %d acknowledged, spool drained, status %s" % (len(acked), st))


def test_torn_tail_is_cut_and_the_rest_delivered(hx):
    broker = hx.broker(start=False)
    conf = spool_conf(hx, broker)
    daemon = hx.uplinkd(conf)
    local = hx.local_client(types_ns(conf))
    for i in range(50):
        local.publish("dev/c0/telemetry", "c0:%d" % i, qos=1)
    local.close()
    daemon.stop()
    segs = sorted(glob.glob(os.path.join(conf["gateway"]["state_dir"], "spool", "cloud", "*.seg")))
    assert segs
    size = os.path.getsize(segs[-1])
    with open(segs[-1], "r+b") as f:
        f.truncate(size - 7)  # the last record loses its tail
    broker.start()
    cloud = hx.cloud_client(broker, client_id="spool-watch")
    cloud.subscribe("gw-test/+/telemetry", qos=0)
    daemon2 = hx.uplinkd(conf, name="uplinkd2")
    assert daemon2.find_log(r"torn tail in .*truncated, \d+ byte\(s\) dropped") is not None
    expected = {"c0:%d" % i for i in range(49)}
    wait_delivered(cloud, expected, timeout=4 * h.TIMEOUT)
    check_delivery(cloud, expected)


def types_ns(conf):
    import types
    return types.SimpleNamespace(tcp_port=h.local_tcp_port(conf))


def test_memory_durability_shows_in_status(hx):
    broker = hx.broker(start=False)
    conf = spool_conf(hx, broker, durability="none")
    hx.uplinkd(conf)
    local = hx.local_client(types_ns(conf))
    for i in range(10):
        local.publish("dev/c0/telemetry", "c0:%d" % i, qos=1)
    st = spool_status(conf)
    assert st["durability"] == "none"
    assert st["depth"] == 10
    assert not os.path.exists(os.path.join(conf["gateway"]["state_dir"], "spool", "cloud"))


def test_full_spool_blocks_then_drains(hx):
    """overflow: block with the cloud down: the publisher stops getting
    PUBACKs (backpressure), nothing is dropped; the cloud comes up and all
    of it is delivered."""
    broker = hx.broker(start=False)
    conf = spool_conf(hx, broker, durability="fsync", max_bytes="64KiB", overflow="block")
    # The uplink waits in BACKOFF until the test asks it to reconnect, once
    # the cloud subscriber below is subscribed: what it sent earlier would
    # reach a broker with nobody subscribed, and be gone.
    conf["uplinks"][0]["reconnect"] = {"base": "1h", "cap": "1h"}
    hx.uplinkd(conf)
    pub = Publisher(h.local_tcp_port(conf), 4000, window=50).start()
    hx.add_closer(pub.close)
    h.wait_for(lambda: spool_status(conf)["blocked"] > 0, timeout=4 * h.TIMEOUT,
               what=lambda: "spool full and blocking: %s" % spool_status(conf))
    stalled = pub.acked_count()
    assert stalled < 4000
    st = spool_status(conf)
    assert st["bytes"] <= 64 * 1024
    assert st["dropped"]["overflow"] == 0
    broker.start()
    cloud = hx.cloud_client(broker, client_id="spool-watch")
    cloud.subscribe("gw-test/+/telemetry", qos=0)
    h.uplinkctl(conf["control"]["socket"], "reconnect", "cloud", json_output=False)
    h.wait_for(lambda: pub.acked_count() == 4000, timeout=10 * h.TIMEOUT,
               what=lambda: "all 4000 acknowledged after the cloud came up (have %d)"
               % pub.acked_count())
    acked = set(pub.acked)
    pub.close()
    wait_delivered(cloud, acked, timeout=4 * h.TIMEOUT)
    check_delivery(cloud, acked)


@pytest.fixture
def tiny_fs(hx):
    """A 1 MiB tmpfs for the state directory (the test runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = os.path.join(hx.dir, "tinyfs")
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], check=True,
                   timeout=30)
    yield path
    subprocess.run(["umount", "-l", path], check=False, timeout=30)


def fill(path, leave_bytes):
    """Fill the file system at `path` up to `leave_bytes` free; return the file."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = os.path.join(path, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


@pytest.mark.parametrize("overflow", ["block", "drop-oldest"])
def test_disk_full(hx, tiny_fs, overflow):
    broker = hx.broker(start=False)
    # Segments of 128 KiB (max_bytes / 8) and about 400 KiB free: the disk
    # fills before max_bytes, after a few segments (drop-oldest needs an old
    # segment to drop).
    conf = spool_conf(hx, broker, durability="fsync", max_bytes="1MiB", overflow=overflow)
    conf["gateway"]["state_dir"] = tiny_fs
    conf["uplinks"][0]["spool"]["commit_interval"] = "1ms"
    daemon = hx.uplinkd(conf)
    filler = fill(tiny_fs, 400 * 1024)
    pub = Publisher(h.local_tcp_port(conf), 100000, window=20).start()
    hx.add_closer(pub.close)
    since = 0
    if overflow == "block":
        daemon.wait_log(r"No space left on device; local publishes are not acknowledged",
                        timeout=4 * h.TIMEOUT)
        h.wait_for(lambda: spool_status(conf)["io_error"] != "", what="io_error in status")
        before = pub.acked_count()
        # Space comes back: the spool resumes by itself and acks flow again.
        since = daemon.log_size()
        os.unlink(filler)
        daemon.wait_log(r"writable again", since=since, timeout=4 * h.TIMEOUT)
        h.wait_for(lambda: pub.acked_count() > before + 100, timeout=4 * h.TIMEOUT,
                   what=lambda: "acks after space returned (had %d, have %d)"
                   % (before, pub.acked_count()))
    else:
        h.wait_for(lambda: spool_status(conf)["dropped"]["overflow"] > 0, timeout=6 * h.TIMEOUT,
                   what=lambda: "drop-oldest on a full disk: %s" % spool_status(conf))
        before = pub.acked_count()
        h.wait_for(lambda: pub.acked_count() > before + 100, timeout=4 * h.TIMEOUT,
                   what="acks continue while dropping the oldest")
    pub.close()
    assert daemon.running()


def test_rate_limit_spaces_publishes(hx):
    """rate.max_msgs_per_s: 150 messages at 50/s take at least two seconds
    upstream (a bucket holds one second's worth). Only a lower bound is
    checked, so a slow machine cannot make it fail."""
    import time
    broker = hx.broker()
    conf = spool_conf(hx, broker)
    conf["uplinks"][0]["rate"] = {"max_msgs_per_s": 50}
    cloud = hx.cloud_client(broker, client_id="spool-watch")
    cloud.subscribe("gw-test/+/telemetry", qos=0)
    gw = hx.uplinkd(conf)
    h.wait_for(lambda: gw.find_log(r"state CONNECTING -> ONLINE"), what="uplink online")
    local = hx.local_client(types_ns(conf))
    started = time.monotonic()
    for i in range(150):
        local.publish("dev/c0/telemetry", "c0:%d" % i, qos=1)
    expected = {"c0:%d" % i for i in range(150)}
    wait_delivered(cloud, expected, timeout=4 * h.TIMEOUT)
    assert time.monotonic() - started >= 2.0
    check_delivery(cloud, expected)


@pytest.mark.parametrize("window", [None, 7], ids=["default-100", "max_inflight-7"])
def test_inflight_window(hx, window):
    """uplinks[].max_inflight bounds the QoS 1 publishes awaiting the cloud's PUBACK. The
    broker is stopped (SIGSTOP: its socket still takes bytes, no PUBACK comes back) while
    300 messages are queued: exactly the window goes out, the rest waits in the spool. After
    SIGCONT everything arrives, in order."""
    import signal
    total = 300
    expected_window = window or 100
    broker = hx.broker()
    conf = spool_conf(hx, broker)
    if window:
        conf["uplinks"][0]["max_inflight"] = window
    cloud = hx.cloud_client(broker, client_id="spool-watch")
    cloud.subscribe("gw-test/+/telemetry", qos=1)
    gw = hx.uplinkd(conf)
    h.wait_for(lambda: gw.find_log(r"state CONNECTING -> ONLINE"), what="uplink online")
    os.kill(broker.proc.pid, signal.SIGSTOP)
    hx.add_closer(lambda: os.kill(broker.proc.pid, signal.SIGCONT))
    local = hx.local_client(types_ns(conf))
    for i in range(total):
        local.publish("dev/c0/telemetry", "c0:%d" % i, qos=1)
    h.wait_for(lambda: spool_status(conf)["inflight"] >= expected_window,
               what=lambda: "the window in flight: %s" % spool_status(conf))
    st = spool_status(conf)
    assert st["inflight"] == expected_window, st
    assert st["depth"] == total, st
    os.kill(broker.proc.pid, signal.SIGCONT)
    expected = {"c0:%d" % i for i in range(total)}
    wait_delivered(cloud, expected, timeout=4 * h.TIMEOUT)
    check_delivery(cloud, expected)
    h.wait_for(lambda: spool_status(conf)["inflight"] == 0 and spool_status(conf)["depth"] == 0,
               what=lambda: "the spool empty: %s" % spool_status(conf))


def segment_records(path):
    """[(start, end, payload)] of a spool segment (docs/design/spool.md)."""
    import struct
    data = open(path, "rb").read()
    out, off = [], 24
    while off + 28 <= len(data):
        length, = struct.unpack_from("<I", data, off + 4)
        topic_len, = struct.unpack_from("<H", data, off + 26)
        end = off + 28 + length
        out.append((off, end, data[off + 28 + topic_len:end].decode()))
        off = end
    return out


def test_flipped_byte_loses_only_its_record(hx):
    """Issue 12 item 4: one flipped byte in the middle of the newest segment
    loses that record only; it is counted, logged with its byte range, and
    the damaged bytes are kept under <state_dir>/damaged/."""
    total = 5000
    broker = hx.broker(start=False)
    conf = spool_conf(hx, broker)
    daemon = hx.uplinkd(conf)
    pub = Publisher(h.local_tcp_port(conf), total).start()
    hx.add_closer(pub.close)
    try:
        h.wait_for(lambda: pub.acked_count() >= total, timeout=6 * h.TIMEOUT,
                   what=lambda: "all acknowledged (have %d)" % pub.acked_count())
        daemon.proc.kill()  # kill -9: no clean shutdown
        daemon.proc.wait(h.TIMEOUT)
    finally:
        pub.close()
    daemon.stopped = True
    daemon.returncode = daemon.expect_exit = daemon.proc.returncode
    acked = set(pub.acked)
    assert pub.error is None, pub.error
    assert len(acked) == total

    state = conf["gateway"]["state_dir"]
    segs = sorted(glob.glob(os.path.join(state, "spool", "cloud", "*.seg")))
    assert segs
    size = os.path.getsize(segs[-1])
    at = size // 2
    victim = [p for s, e, p in segment_records(segs[-1]) if s <= at < e]
    assert len(victim) == 1
    with open(segs[-1], "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))

    broker.start()
    cloud = hx.cloud_client(broker, client_id="spool-watch")
    cloud.subscribe("gw-test/+/telemetry", qos=0)
    daemon2 = hx.uplinkd(conf, name="uplinkd2")
    expected = acked - set(victim)
    wait_delivered(cloud, expected, timeout=6 * h.TIMEOUT)
    check_delivery(cloud, expected)
    got = received_by_child(cloud)
    seen = {"%s:%d" % (c, n) for c, ns in got.items() for n in ns}
    assert victim[0] not in seen, "the damaged record was sent"
    assert len(seen) == total - 1
    assert spool_status(conf)["dropped"]["corrupt"] == 1
    assert daemon2.find_log(r"spool: .*\.seg is damaged at bytes \d+\.\.\d+ .*1 record\(s\) lost") \
        is not None
    assert glob.glob(os.path.join(state, "damaged", "*.bin"))
    print("flipped byte at %d of %d: %d of %d delivered, dropped.corrupt 1"
          % (at, size, len(seen), total))
