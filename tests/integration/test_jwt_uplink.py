"""JWT auth end to end: uplinkd signs a token per connection and rotates it before exp.

The cloud is the fake JWT cloud (tests/fakecloud/, driven by fakecloud.py): a mosquitto broker
whose plugin verifies every CONNECT password as a JWT with keys made by Python's cryptography,
refuses a bad one with CONNACK 5, kicks a client at exp + skew, and logs each decision as a
JSON line that these tests read.

The container this suite usually runs in has no NTP sync (adjtimex reports STA_UNSYNC), so the
uplinks use `auth.clock_check: build-date` except in the test of the clock check itself.

Rotation runs with a 20 s lifetime (three lifetimes in about a minute) in the main run, and with
the issue's 2-minute lifetime (about 6 minutes) as a `slow` test: scripts/test runs it in a
background pytest process beside the rest; plain pytest skips it unless UPLINKD_SLOW_TESTS=1
(docs/testing.md).
"""

import ctypes
import ctypes.util
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import types

import pytest

import fakecloud
import harness as h

AUD = "test-project"
ALGS = ["RS256", "PS256", "ES256", "ES384"]

REFUSED_HINT = ("the server refused the JWT (CONNACK 5): check alg matches the registered key, "
                "aud, exp <= 24 h, and the clock")


def jwt_uplink(signing_key, **auth):
    """The uplink keys for auth.type jwt with `signing_key` (a fakecloud.Key)."""
    section = {"type": "jwt", "key": signing_key.private_path, "aud": AUD,
               "clock_check": "build-date"}
    section.update(auth)
    return {"auth": section}


def start_gateway(hx, cloud, key, **auth):
    conf = hx.config(cloud, uplink=jwt_uplink(key, **auth))
    daemon = hx.uplinkd(conf)
    return conf, daemon


def status(conf):
    proc = h.uplinkctl(conf["control"]["socket"], "status")
    assert proc.returncode in (0, 3), proc.stderr  # 3: an uplink is not ONLINE
    return json.loads(proc.stdout)


def uplink_status(conf, name="cloud"):
    for up in status(conf)["uplinks"]:
        if up["name"] == name:
            return up
    raise AssertionError("no uplink %s in status" % name)


def kernel_clock_unsynced():
    """True when adjtimex(2) says STA_UNSYNC (what auth.clock_check: sync waits for)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct timex is 208 bytes on x86_64; modes = 0
    rc = libc.adjtimex(buf)
    if rc < 0:
        pytest.skip("adjtimex failed")
    # TIME_ERROR (5) is returned exactly when the clock is unsynchronised (adjtimex(2)).
    return rc == 5


@pytest.mark.parametrize("alg", ALGS)
def test_every_algorithm_accepted_end_to_end(hx, alg):
    key = fakecloud.Key.generate(alg, hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5)
    conf, daemon = start_gateway(hx, cloud, key, alg=alg)
    observer = hx.cloud_client(cloud)
    observer.subscribe("gw-test/#", qos=1)

    line = cloud.wait_event("connect", client_id="gw-test", result="accepted")
    assert line["alg"] == alg
    assert line["username"] == "unused"
    assert line["claims"]["aud"] == AUD
    # auth.skew defaults to 60 s: iat is back-dated, exp = signing time + 60m.
    assert line["exp"] - line["iat"] == 3600 + 60, line

    payload = "hello-%s" % alg
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", "1",
                    "-t", "dev/sensor/telemetry", "-m", payload)
    observer.wait("gw-test/sensor/telemetry", payload)
    daemon.wait_log(r"signed a new JWT \(%s\)" % alg)

    up = uplink_status(conf)
    assert up["auth"] == "jwt" and up["clock"] == "ok"
    assert up["token_expires_at"] == line["exp"]
    assert up["token_refresh_at"] > time.time()


def test_kid_auto_and_extra_claims(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5, require_kid=True)
    start_gateway(hx, cloud, key, kid="auto", claims={"sub": "gw-test", "site": "north"},
                  username="gateway-user", lifetime="10m", skew="30s")
    line = cloud.wait_event("connect", client_id="gw-test", result="accepted")
    assert line["kid"] == key.kid
    assert line["username"] == "gateway-user"
    assert line["claims"]["sub"] == "gw-test" and line["claims"]["site"] == "north"
    assert line["exp"] - line["iat"] == 600 + 30


def test_refused_jwt_is_explained(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5)
    _, daemon = start_gateway(hx, cloud, key, aud="not-the-project")
    cloud.wait_event("connect", client_id="gw-test", result="refused", reason="wrong aud")
    daemon.wait_log(REFUSED_HINT.replace("(", r"\(").replace(")", r"\)"))
    daemon.wait_log(r'aud "not-the-project"')


def test_bad_key_refused_by_check_config(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cases = [
        # (auth overrides, words expected on stderr)
        ({"key": key.public_path}, "uplinks[0].auth.key:"),
        ({"alg": "ES384"}, "uplinks[0].auth.alg:"),
        ({"alg": "es256"}, "case-sensitive: write ES256"),
        ({"key": os.path.join(hx.dir, "missing.key")}, "No such file or directory"),
    ]
    cloud = hx.broker(start=False)
    for i, (auth, words) in enumerate(cases):
        conf = hx.config(cloud, uplink=jwt_uplink(key, **auth))
        path = hx.write_config(conf, "bad-%d.yaml" % i)
        proc = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", path],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=h.TIMEOUT)
        assert proc.returncode == 1, (auth, proc.stdout, proc.stderr)
        assert words in proc.stderr, (auth, proc.stderr)
        assert "bad-%d.yaml:" % i in proc.stderr  # FILE:LINE:COL
    # And the good one passes, having loaded the key and signed a trial token.
    path = hx.write_config(hx.config(cloud, uplink=jwt_uplink(key)), "good.yaml")
    proc = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", path],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=h.TIMEOUT)
    assert proc.returncode == 0, proc.stderr


def test_unsynchronised_clock_blocks_signing(hx):
    if not kernel_clock_unsynced():
        pytest.skip("the kernel clock is NTP-synchronised here; the wait cannot be shown")
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5)
    conf, daemon = start_gateway(hx, cloud, key, clock_check="sync")
    daemon.wait_log(r"not signing a JWT: .*unsynchron")
    h.wait_for(lambda: uplink_status(conf)["clock"] == "unsynchronised",
               what="status clock unsynchronised")
    up = uplink_status(conf)
    assert up["state"] == "BACKOFF" and up["token_expires_at"] == 0
    # Logged once as a warning, not on every re-check (every 5 s, at debug level).
    daemon.wait_log(r"state IDLE -> BACKOFF")
    daemon.wait_log(r"clock still unsynchronised; checking again in 5 s", timeout=15)
    lines = daemon.log_text().splitlines()
    assert len([x for x in lines if "not signing a JWT" in x]) == 1, daemon.log_tail()
    assert uplink_status(conf)["state"] == "BACKOFF"
    assert cloud.decisions("gw-test") == []


class TimedClient(h.MqttClient):
    """harness.MqttClient that also keeps the monotonic arrival time of every message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals = []  # time.monotonic() of messages[i]

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.arrivals.append(time.monotonic())
            self.messages.append((msg.topic, msg.payload, msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def timed(self, topic):
        """[(arrival time, payload)] on `topic`, in arrival order."""
        with self._cond:
            return [(t, m[1]) for t, m in zip(self.arrivals, self.messages) if m[0] == topic]


STREAM_TOPIC = "gw-test/stream/telemetry"
# The longest pause allowed in the stream, upstream (between two arrivals at the cloud) and
# locally (one publish waiting for its PUBACK), and the longest time offline per rotation.
# A rotation normally costs well under a second on loopback; the bound leaves room for a
# loaded 2-core CI machine (and grows with UPLINKD_TEST_TIMEOUT under valgrind).
GAP_MAX = max(5.0, h.TIMEOUT / 3)


def run_rotation(hx, lifetime_s, refresh_pct, lifetimes, rate=10):
    """A steady QoS 1 stream, one message in flight, paced at `rate`/s through the durable
    spool, for `lifetimes` token lifetimes; waits until everything sent arrived upstream.
    Returns a namespace with what was seen."""
    key = fakecloud.Key.generate("ES256", hx.dir)
    # skew 1: the kick comes 1 s after exp, so a rotation that is late by a second shows.
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=1)
    conf = hx.config(cloud, uplink=jwt_uplink(key, lifetime="%ds" % lifetime_s, skew="0s",
                                              refresh=refresh_pct))
    conf["uplinks"][0]["spool"] = {"durability": "fsync"}
    daemon = hx.uplinkd(conf)
    user, password = cloud.credentials
    observer = TimedClient("127.0.0.1", cloud.plain_port, username=user, password=password)
    hx.add_closer(observer.close)
    observer.connect()
    observer.subscribe(STREAM_TOPIC, qos=1)
    cloud.wait_event("connect", client_id="gw-test", result="accepted")
    local = hx.client("127.0.0.1", h.local_tcp_port(conf))

    sent = []
    publish_max = 0.0
    # Three whole lifetimes: with refresh at 80 % of 2 minutes the third rotation comes at
    # about 288 s and the stream goes on past the second token's exp (312 s).
    duration = lifetime_s * lifetimes + 2
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < duration:
        payload = ("m%06d" % i).encode()
        before = time.monotonic()
        local.publish("dev/stream/telemetry", payload, qos=1)  # waits for uplinkd's PUBACK
        publish_max = max(publish_max, time.monotonic() - before)
        sent.append(payload)
        i += 1
        # Pace the stream at `rate` per second (this is the load, not a wait for an event).
        delay = start + i / float(rate) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start

    def missing():
        return set(sent) - {m[1] for m in observer.received(STREAM_TOPIC)}

    h.wait_for(lambda: not missing(), timeout=30,
               what=lambda: "%d acknowledged messages still missing upstream" % len(missing()))
    return types.SimpleNamespace(cloud=cloud, daemon=daemon, conf=conf, sent=sent,
                                 observer=observer, elapsed=elapsed, rate=rate,
                                 publish_max=publish_max)


def check_rotation(run, lifetimes):
    """What issue #4 asks of rotation under a stream; returns numbers for the report."""
    cloud, daemon, conf = run.cloud, run.daemon, run.conf
    # No kick by the server: uplinkd always acts first.
    assert cloud.kicks("gw-test") == [], "the server kicked before uplinkd rotated: %s" % (
        cloud.kicks("gw-test"),)
    assert daemon.find_log(r"the token was not rotated in time") is None
    assert cloud.events("connect", client_id="gw-test", result="refused") == []

    # At least `lifetimes` rotations, each with a fresh token: one accepted CONNECT per token,
    # exp growing from one to the next, each session ended by our DISCONNECT before its exp.
    accepted = cloud.events("connect", client_id="gw-test", result="accepted")
    exps = [line["exp"] for line in accepted]
    assert len(accepted) >= lifetimes + 1, "only %d token CONNECTs: exp %s" % (len(accepted), exps)
    assert exps == sorted(exps) and len(set(exps)) == len(exps), exps
    disconnects = cloud.events("disconnect", client_id="gw-test")
    assert len(disconnects) >= len(accepted) - 1, disconnects
    for line in disconnects:
        assert line["left"] >= 0, line
    rotating = [x for x in daemon.log_text().splitlines() if "rotating the JWT" in x]
    assert len(rotating) >= lifetimes, rotating
    assert uplink_status(conf)["token_rotations"] >= lifetimes

    # Offline time per rotation, from the cloud's log: our DISCONNECT to the next CONNECT.
    offline = []
    for prev, nxt in zip(accepted, accepted[1:]):
        between = [d["ts"] for d in disconnects if prev["ts"] <= d["ts"] <= nxt["ts"]]
        offline.append(nxt["ts"] - max(between) if between else 0.0)
    assert max(offline) <= GAP_MAX, "offline for %.1f s during a rotation: %s" % (
        max(offline), offline)

    # Zero loss and in order: the first arrival of each message, in the order sent.
    arrivals = run.observer.timed(STREAM_TOPIC)
    seen, first = set(), []
    for _, payload in arrivals:
        if payload not in seen:
            seen.add(payload)
            first.append(payload)
    assert set(run.sent) <= seen, "%d acknowledged message(s) lost" % len(set(run.sent) - seen)
    assert first[:len(run.sent)] == run.sent, "messages arrived out of order upstream"

    # Steady: the stream kept its pace and never paused long, locally or upstream.
    assert len(run.sent) >= 0.8 * run.rate * run.elapsed, (len(run.sent), run.elapsed)
    assert run.publish_max <= GAP_MAX, "a local publish waited %.1f s" % run.publish_max
    times = [t for t, _ in arrivals]
    upstream_gap = max(b - a for a, b in zip(times, times[1:]))
    assert upstream_gap <= GAP_MAX, "the stream paused %.1f s upstream" % upstream_gap
    numbers = {"messages": len(run.sent), "duplicates": len(arrivals) - len(seen),
               "rotations": len(accepted) - 1, "seconds": round(run.elapsed, 1),
               "offline_max_s": round(max(offline), 3), "upstream_gap_max_s": round(upstream_gap, 3),
               "local_puback_max_s": round(run.publish_max, 3)}
    print("rotation under a QoS 1 stream: %s" % numbers)
    return numbers


def test_rotation_under_qos1_stream_loses_nothing(hx):
    run = run_rotation(hx, lifetime_s=20, refresh_pct=50, lifetimes=3)
    numbers = check_rotation(run, lifetimes=3)
    assert numbers["messages"] > 500


@pytest.mark.slow
def test_rotation_two_minute_lifetime(hx):
    """Issue #4/#6 as written: a 2-minute lifetime (refresh at the default 80 %), three
    lifetimes (about 6 minutes) of a steady QoS 1 stream: zero loss, no kick, >= 3 rotations.
    Marked slow: scripts/test runs it in a background pytest process beside the rest."""
    run = run_rotation(hx, lifetime_s=120, refresh_pct=80, lifetimes=3)
    numbers = check_rotation(run, lifetimes=3)
    assert numbers["messages"] > 3000


def test_tls_min_version_13_and_insecure_warning(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    # The server's certificate names wrong-host.invalid: only tls.insecure lets this connect.
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5, cert="wronghost")
    conf = hx.config(cloud, uplink=dict(jwt_uplink(key), tls={
        "ca": cloud.pki.ca, "min_version": "tls1.3", "insecure": True}))
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id="gw-test", result="accepted")
    daemon.wait_log(r"tls.insecure is true")


def test_tls_min_version_13_refuses_a_tls12_server(hx, pki):
    """A server that stops at TLS 1.2 cannot complete the handshake with min_version tls1.3."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.path("server.pem"), pki.path("server.key"))
    # Every loopback address: "localhost" is ::1 first where /etc/hosts says so.
    port, listeners = h.listen_loopback(4)
    stop = threading.Event()
    versions = []

    def handshake(conn):
        conn.settimeout(h.TIMEOUT)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                versions.append(tls.version())
        except (ssl.SSLError, OSError) as e:
            versions.append(str(e))

    thread = threading.Thread(target=h.accept_loop, args=(listeners, stop, handshake),
                              daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(5)
        for listener in listeners:
            listener.close()

    hx.add_closer(close)
    key = fakecloud.Key.generate("ES256", hx.dir)
    conf = hx.config(None, port=port, uplink=dict(
        jwt_uplink(key), tls={"ca": pki.ca, "min_version": "tls1.3"}))
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"TLS handshake with localhost:\d+ failed")
    h.wait_for(lambda: versions, what="a handshake attempt at the TLS 1.2 server")
    assert not any(v in ("TLSv1.2", "TLSv1.3") for v in versions), versions
