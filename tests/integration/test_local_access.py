"""Identity and access on the local side (issue 3): local.acl by uid and by
username, local.password_file over TCP, plain-text password files refused,
and systemd socket activation.

The peer-credential rules need a client running as another uid: the tests
run mosquitto_pub/mosquitto_sub through `setpriv --reuid=1001` and so need
root (they are skipped otherwise). The socket activation test needs
systemd-socket-activate (Debian package systemd).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import types

import pytest

import harness as h

POLLER_UID = 1001
UPLINKCTL = h.UPLINKCTL_BIN

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run clients as uid 1001")


def as_uid(uid, argv):
    """argv run with uid/gid `uid` and no supplementary groups."""
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups"] + list(argv)


def run(argv, timeout=h.TIMEOUT, stdin_text=None):
    return subprocess.run(argv, input=stdin_text, capture_output=True, text=True,
                          timeout=timeout, stdin=None if stdin_text is not None
                          else subprocess.DEVNULL)


def open_socket_dir(hx):
    """Let uid 1001 reach the Unix socket in the (0700) test directory."""
    os.chmod(hx.dir, 0o711)


def acl_config(hx, acl, **local):
    conf = hx.config(None, port=1)  # the uplink is never reached; not needed here
    conf["uplinks"][0]["tls"] = {"enabled": False}
    conf["local"]["socket_mode"] = "0666"
    conf["local"]["acl"] = acl
    conf["local"].update(local)
    return conf


POLLER_RULES = [
    {"uid": POLLER_UID, "children": ["modbus-*"], "publish": ["dev/%c/#"],
     "subscribe": ["dev/%c/commands/#"]},
    # Everyone else (root in these tests, TCP clients) may do everything.
    {"publish": ["#"], "subscribe": ["#"]},
]


@needs_root
def test_acl_peer_uid_publish_and_subscribe(hx):
    open_socket_dir(hx)
    conf = acl_config(hx, POLLER_RULES)
    d = hx.uplinkd(conf)
    sock = h.local_unix_path(conf)
    observer = hx.client("127.0.0.1", h.local_tcp_port(conf))
    observer.subscribe("dev/#")
    observer.subscribe("uplinkd/local/errors")

    # Allowed: the poller publishes as one of its children.
    p = run(as_uid(POLLER_UID, ["mosquitto_pub", "--unix", sock, "-q", "1",
                                "-t", "dev/modbus-1/telemetry", "-m", "21.5"]))
    assert p.returncode == 0, p.stderr
    observer.wait("dev/modbus-1/telemetry", "21.5")
    d.wait_log(r"pid \d+ uid %d" % POLLER_UID)

    # Denied: another child. QoS 1 is still acknowledged (MQTT-3.3.5-2), so
    # mosquitto_pub succeeds, but nobody receives the message.
    since = d.log_size()
    p = run(as_uid(POLLER_UID, ["mosquitto_pub", "--unix", sock, "-q", "1",
                                "-t", "dev/plc-1/telemetry", "-m", "forged"]))
    assert p.returncode == 0, p.stderr
    line = d.wait_log(r"publish to 'dev/plc-1/telemetry' denied: not allowed by local.acl\[0\] "
                      r"\(uid %d gid %d" % (POLLER_UID, POLLER_UID), since)
    assert "pid" in line
    _, payload, _, _ = observer.wait("uplinkd/local/errors")
    report = json.loads(payload)
    assert report["action"] == "publish"
    assert report["topic"] == "dev/plc-1/telemetry"
    assert report["reason"] == "not allowed by local.acl[0]"
    # Ordering: a later allowed message arrives, the denied one never did.
    run(as_uid(POLLER_UID, ["mosquitto_pub", "--unix", sock, "-q", "1",
                            "-t", "dev/modbus-1/telemetry", "-m", "after"]))
    observer.wait("dev/modbus-1/telemetry", "after")
    assert observer.received("dev/plc-1/telemetry") == []

    # Subscribe: its own commands are granted, another child's get 0x80.
    p = run(as_uid(POLLER_UID, ["mosquitto_sub", "--unix", sock, "-d", "-q", "1",
                                "-t", "dev/modbus-1/commands/#", "-t", "dev/+/commands/#",
                                "-C", "1", "-W", "2"]))
    assert "Subscribed (mid: 1): 1, 128" in p.stdout, p.stdout + p.stderr
    d.wait_log(r"subscribe to 'dev/\+/commands/#' denied", since)

    # Root (rule 1) may still do everything over the same socket.
    h.mosquitto_pub("--unix", sock, "-q", "1", "-t", "dev/plc-1/telemetry", "-m", "root")
    observer.wait("dev/plc-1/telemetry", "root")


@needs_root
def test_acl_peer_uid_over_loopback_tcp(hx):
    """Issue 12: the uid rule holds on tcp://127.0.0.1 exactly as on the Unix
    socket; the peer's uid comes from sock_diag. Before, uid 1001 was
    anonymous over TCP and the catch-all rule let it do everything."""
    conf = acl_config(hx, POLLER_RULES)
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    observer = hx.client("127.0.0.1", port)
    observer.subscribe("dev/#")

    tcp = ["-h", "127.0.0.1", "-p", str(port)]
    p = run(as_uid(POLLER_UID, ["mosquitto_pub"] + tcp + ["-q", "1", "-t",
                                "dev/modbus-1/telemetry", "-m", "tcp-ok"]))
    assert p.returncode == 0, p.stderr
    observer.wait("dev/modbus-1/telemetry", "tcp-ok")

    since = d.log_size()
    p = run(as_uid(POLLER_UID, ["mosquitto_pub"] + tcp + ["-q", "1", "-t",
                                "dev/plc-1/telemetry", "-m", "forged"]))
    assert p.returncode == 0, p.stderr
    d.wait_log(r"publish to 'dev/plc-1/telemetry' denied: not allowed by local.acl\[0\] "
               r"\(uid %d \(tcp\)" % POLLER_UID, since)
    run(as_uid(POLLER_UID, ["mosquitto_pub"] + tcp + ["-q", "1", "-t",
                            "dev/modbus-1/telemetry", "-m", "after"]))
    observer.wait("dev/modbus-1/telemetry", "after")
    assert observer.received("dev/plc-1/telemetry") == []

    p = run(as_uid(POLLER_UID, ["mosquitto_sub"] + tcp + ["-d", "-q", "1",
                                "-t", "dev/modbus-1/commands/#", "-t", "dev/+/commands/#",
                                "-C", "1", "-W", "2"]))
    assert "Subscribed (mid: 1): 1, 128" in p.stdout, p.stdout + p.stderr

    # root over the same TCP listener is uid 0: rule 1, unrestricted.
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t",
                    "dev/plc-1/telemetry", "-m", "root")
    observer.wait("dev/plc-1/telemetry", "root")


def non_loopback_address():
    """An IPv4 address of this host that is not on loopback, or None."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


@needs_root
def test_acl_unidentified_tcp_peer_gets_only_selectorless_rules(hx):
    """A peer on a non-loopback listener address cannot be identified: even
    root gets only rules without uid/gid, and the log says why."""
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address")
    other = h.free_port((addr,))
    rules = [{"uid": 0, "publish": ["#"], "subscribe": ["#"]},
             {"publish": ["public/#"], "subscribe": ["public/#"]}]
    conf = acl_config(hx, rules)
    conf["local"]["listen"].append("tcp://%s:%d" % (addr, other))
    d = hx.uplinkd(conf)
    observer = hx.client("127.0.0.1", h.local_tcp_port(conf))  # root, identified
    observer.subscribe("#")

    since = d.log_size()
    h.mosquitto_pub("-h", addr, "-p", str(other), "-q", "1", "-t", "dev/x/telemetry",
                    "-m", "anon")
    d.wait_log(r"peer not identified \(the peer address %s is not on loopback\)"
               % addr.replace(".", r"\."), since)
    d.wait_log(r"publish to 'dev/x/telemetry' denied: not allowed by local.acl\[1\] "
               r"\(anonymous\)", since)
    h.mosquitto_pub("-h", addr, "-p", str(other), "-q", "1", "-t", "public/x", "-m", "ok")
    observer.wait("public/x", "ok")
    assert observer.received("dev/x/telemetry") == []


def check_config(path):
    env = {k: v for k, v in os.environ.items() if k not in h._SYSTEMD_ENV}
    return subprocess.run([h.UPLINKD_BIN, "-c", path, "--check-config"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=h.TIMEOUT, env=env)


SIDESTEP = (r"local\.listen tcp://0\.0\.0\.0:\d+: peers that connect to it from a "
            r"non-loopback address cannot be identified, so a local process can side-step "
            r"local\.acl\[0\] \(uid 1001\) .* gets local\.acl\[1\].*Fix: bind the listener "
            r"to 127\.0\.0\.1 .*local\.password_file")


def test_acl_sidestep_warning(hx):
    """Issue 12: a uid rule plus a TCP listener on 0.0.0.0 (no password) can
    be side-stepped by connecting to the host's own network address: said
    at --check-config and at start, and not for a loopback listener."""
    conf = acl_config(hx, POLLER_RULES)
    port = h.local_tcp_port(conf)
    lo = hx.write_config(conf, "lo.yaml")
    p = check_config(lo)
    assert p.returncode == 0, p.stderr
    assert "side-step" not in p.stderr and "warning" not in p.stdout, p.stdout + p.stderr

    conf["local"]["listen"] = ["tcp://0.0.0.0:%d" % h.free_port(("0.0.0.0",))
                               if u == "tcp://127.0.0.1:%d" % port else u
                               for u in conf["local"]["listen"]]
    anywhere = hx.write_config(conf, "anywhere.yaml")
    p = check_config(anywhere)
    assert p.returncode == 0, p.stderr  # a warning, not an error
    assert re.search(r"warning: " + SIDESTEP, p.stderr), p.stderr
    assert "1 warning(s) on stderr" in p.stdout, p.stdout

    d = hx.uplinkd(conf)
    d.wait_log(SIDESTEP)


def passthrough_gateway(hx, rules):
    broker = hx.broker()
    conf = hx.config(broker)
    conf["local"]["acl"] = rules
    d = hx.uplinkd(conf)
    d.wait_log(r"state \w+ -> ONLINE")
    return broker, d, h.local_unix_path(conf)


def test_acl_raw_passthrough_needs_explicit_grant(hx):
    """Issue 12: cloud/<uplink>/<topic> goes upstream raw, past the
    profile's child-id rules; "#" alone no longer grants it once any
    local.acl rule exists (cloud/c8y/s/us/victim was forwarded)."""
    me = os.geteuid()
    broker, d, sock = passthrough_gateway(
        hx, [{"uid": me, "publish": ["#"], "subscribe": ["#"]}])
    upstream = hx.cloud_sub(broker, "#")

    since = d.log_size()
    h.mosquitto_pub("--unix", sock, "-q", "1", "-t", "cloud/cloud/s/us/victim", "-m", "forged")
    d.wait_log(r"publish to 'cloud/cloud/s/us/victim' denied: not allowed by local\.acl\[0\]",
               since)
    # Sent after the refused one, over the same uplink: once it is
    # upstream, the refused one would have been too.
    h.mosquitto_pub("--unix", sock, "-q", "1", "-t", "dev/x/telemetry", "-m", "after")
    upstream.wait("gw-test/x/telemetry", "after")
    assert [m for m in upstream.messages() if m[0] == "s/us/victim"] == []

    # Subscribing through to the cloud is refused the same way (SUBACK 0x80).
    p = run(["mosquitto_sub", "--unix", sock, "-d", "-q", "1", "-t", "cloud/cloud/s/ds",
             "-t", "dev/x/commands", "-C", "1", "-W", "2"])
    assert "Subscribed (mid: 1): 128, 1" in p.stdout, p.stdout + p.stderr


def test_acl_raw_passthrough_granted_by_a_cloud_pattern(hx):
    me = os.geteuid()
    broker, d, sock = passthrough_gateway(
        hx, [{"uid": me, "publish": ["cloud/cloud/#", "#"], "subscribe": ["cloud/cloud/#"]}])
    upstream = hx.cloud_sub(broker, "s/#")
    h.mosquitto_pub("--unix", sock, "-q", "1", "-t", "cloud/cloud/s/us/mine", "-m", "raw")
    upstream.wait("s/us/mine", "raw")
    p = run(["mosquitto_sub", "--unix", sock, "-d", "-q", "1", "-t", "cloud/cloud/s/ds",
             "-C", "1", "-W", "1"])
    assert "Subscribed (mid: 1): 1" in p.stdout, p.stdout + p.stderr


DENY_RULES = [{"publish": ["#"], "subscribe": ["#"], "deny_subscribe": ["test/nosubscribe"],
               "deny_publish": ["test/nopublish"]}]


def test_acl_deny_subscribe_paho_subscribe_failure(hx):
    """Issue 12: the Paho 3.1.1 interoperability suite's test_subscribe_failure,
    done the same way with paho-mqtt: a config that allows "#" but denies
    test/nosubscribe answers that SUBSCRIBE with 0x80. Before, local.acl
    could not say "everything but this filter" (deny_subscribe was an
    unknown key)."""
    import threading
    import paho.mqtt.client as paho

    conf = acl_config(hx, DENY_RULES)
    d = hx.uplinkd(conf)
    subscribeds = []
    done = threading.Event()

    def on_subscribe(client, userdata, mid, granted_qos):
        subscribeds.append((mid, granted_qos))
        done.set()

    aclient = paho.Client("myclientid", protocol=paho.MQTTv311)
    aclient.on_subscribe = on_subscribe
    aclient.connect("127.0.0.1", h.local_tcp_port(conf))
    aclient.loop_start()
    hx.add_closer(aclient.loop_stop)
    hx.add_closer(aclient.disconnect)
    since = d.log_size()
    aclient.subscribe("test/nosubscribe", 2)
    assert done.wait(h.TIMEOUT), "no SUBACK"
    assert subscribeds[0][1][0] == 0x80, "return code should be 0x80 %s" % subscribeds
    d.wait_log(r"subscribe to 'test/nosubscribe' denied: denied by "
               r"local\.acl\[0\]\.deny_subscribe", since)

    # A wildcard that only overlaps the denied topic is granted.
    c = hx.client("127.0.0.1", h.local_tcp_port(conf))
    for granted in ("#", "test/+", "+/nosubscribe", "test/nosubscribe/below"):
        assert c.subscribe(granted) == 1
    assert c.subscribe("test/other", qos=2) == 2


def test_acl_deny_subscribe_wildcards_never_carry_the_denied_topic(hx):
    """Paho's test_retained_messages subscribes "+/+" and its cleanup "#",
    under a config that denies test/nosubscribe: both are granted, and
    neither the retained nor a live message on the denied topic reaches
    them, while every other topic does."""
    conf = acl_config(hx, DENY_RULES)
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    for topic in ("test/nosubscribe", "test/retained", "other/retained"):
        h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-r", "-t", topic,
                        "-m", "kept " + topic)
    c = hx.client("127.0.0.1", port)
    assert c.subscribe("+/+") == 1
    c.wait("test/retained", "kept test/retained")
    c.wait("other/retained", "kept other/retained")
    everything = hx.client("127.0.0.1", port)
    assert everything.subscribe("#") == 1
    everything.wait("other/retained", "kept other/retained")
    for topic in ("test/nosubscribe", "test/live"):
        h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-m", "live")
    c.wait("test/live", "live")
    everything.wait("test/live", "live")
    # test/nosubscribe was published before test/live, and one connection
    # delivers in order: had it been delivered, it would be here by now.
    assert c.received("test/nosubscribe") == []
    assert everything.received("test/nosubscribe") == []


def test_acl_deny_publish(hx):
    """A publish to a deny_publish topic is acknowledged and dropped like
    one outside the allow-list, although "#" allows it."""
    conf = acl_config(hx, DENY_RULES)
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    observer = hx.client("127.0.0.1", port)
    observer.subscribe("test/nopublish")
    observer.subscribe("test/ok")
    since = d.log_size()
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", "test/nopublish",
                    "-m", "dropped")
    d.wait_log(r"publish to 'test/nopublish' denied: denied by local\.acl\[0\]\.deny_publish",
               since)
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", "test/ok", "-m", "after")
    observer.wait("test/ok", "after")
    assert observer.received("test/nopublish") == []


def test_acl_closed_world_and_will(hx):
    """A client no rule selects may do nothing; a will it may not publish
    is refused at CONNECT with CONNACK 5."""
    conf = acl_config(hx, [{"uid": 4242, "publish": ["#"]}])
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    c = hx.client("127.0.0.1", port)
    with pytest.raises(h.HarnessError, match="refused"):
        c.subscribe("dev/#")
    c.publish("dev/x/telemetry", "dropped", qos=1)  # acknowledged, dropped
    d.wait_log(r"publish to 'dev/x/telemetry' denied: no local.acl rule selects this client")

    p = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "a",
                        "-m", "x", "--will-topic", "dev/x/status", "--will-payload", "gone"],
                       capture_output=True, text=True, timeout=h.TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "not authorised" in (p.stdout + p.stderr).lower() or \
        "not authorized" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    d.wait_log(r"refusing CONNECT with CONNACK 5: will topic not allowed")


def make_passwd(hx, users):
    path = os.path.join(hx.dir, "local.passwd")
    for user, password in users.items():
        p = run([UPLINKCTL, "passwd", "--iterations", "10000", path, user],
                stdin_text=password + "\n")
        assert p.returncode == 0, p.stderr
    return path


def connack(port, **kwargs):
    """CONNACK code for a paho connection attempt to 127.0.0.1:port."""
    c = h.MqttClient("127.0.0.1", port, **kwargs)
    try:
        c.connect()
        return 0
    except h.HarnessError as e:
        text = str(e)
        if text.startswith("CONNACK "):
            return int(text.split()[1])
        raise
    finally:
        c.client.loop_stop()
        c.client.disconnect()


def test_password_auth_tcp(hx):
    path = make_passwd(hx, {"alice": "correct horse", "bob": "battery staple"})
    assert os.stat(path).st_mode & 0o777 == 0o640  # new file: the directory's group
    text = open(path).read()
    assert "correct horse" not in text
    assert text.startswith("alice:$pbkdf2-sha512$10000$")
    # Changing a password replaces the line, keeps the others.
    make_passwd(hx, {"alice": "new secret"})
    lines = open(path).read().splitlines()
    assert [l.split(":")[0] for l in lines] == ["alice", "bob"]

    conf = acl_config(hx, [{"user": "alice", "publish": ["users/%u/#"],
                            "subscribe": ["users/%u/#"]},
                           {"publish": ["#"], "subscribe": ["#"]}],
                      password_file=path)
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)

    assert connack(port, username="alice", password="new secret") == 0
    assert connack(port, username="alice", password="correct horse") == 4
    assert connack(port, username="mallory", password="x") == 4
    assert connack(port) == 5
    d.wait_log(r"refusing CONNECT with CONNACK 4: wrong username or password")
    d.wait_log(r"refusing CONNECT with CONNACK 5: no username and password, which this TCP "
               r"listener requires")

    # %u: alice may use her own subtree only.
    alice = hx.client("127.0.0.1", port, username="alice", password="new secret")
    alice.subscribe("users/alice/#")
    with pytest.raises(h.HarnessError, match="refused"):
        alice.subscribe("users/bob/#")
    bob = hx.client("127.0.0.1", port, username="bob", password="battery staple")
    bob.subscribe("users/#")
    alice.publish("users/alice/x", "mine")
    alice.publish("users/bob/x", "not mine")
    bob.wait("users/alice/x", "mine")
    d.wait_log(r"publish to 'users/bob/x' denied: not allowed by local.acl\[0\] "
               r"\(uid 0 \(tcp\) user alice\)")
    assert bob.received("users/bob/x") == []

    # The Unix socket needs no password: its peers are known by uid.
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-t", "users/bob/y", "-m", "unix", "-q", "1")
    bob.wait("users/bob/y", "unix")


def test_persistent_session_never_changes_hands(hx):
    """A clean-session-0 session left by alice is not resumed by bob with the same
    client id: its subscription was granted to alice (local.acl), its queue is hers."""
    path = make_passwd(hx, {"alice": "a-secret", "bob": "b-secret"})
    conf = acl_config(hx, [{"user": "alice", "publish": ["users/%u/#"],
                            "subscribe": ["users/%u/#"]},
                           {"user": "bob", "publish": ["users/%u/#"],
                            "subscribe": ["users/%u/#"]},
                           {"uid": 0, "publish": ["users/bob/sync"]}],
                      password_file=path)
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    alice = dict(username="alice", password="a-secret")
    first = hx.client("127.0.0.1", port, client_id="shared", clean_session=False, **alice)
    first.subscribe("users/alice/#")
    first.close()
    # Alice herself resumes it: the control case.
    again = hx.client("127.0.0.1", port, client_id="shared", clean_session=False, **alice)
    assert again.session_present
    again.close()

    bob = hx.client("127.0.0.1", port, client_id="shared", clean_session=False,
                    username="bob", password="b-secret")
    assert not bob.session_present
    d.wait_log(r"session shared: discarding the persistent session of uid 0 \(tcp\) user "
               r"alice: this CONNECT is from uid 0 \(tcp\) user bob, and a session never "
               r"changes hands")
    bob.subscribe("users/bob/#")
    writer = hx.client("127.0.0.1", port, **alice)
    writer.publish("users/alice/x", "private")
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-t", "users/bob/sync", "-m", "sync",
                    "-q", "1")
    bob.wait("users/bob/sync", "sync")  # delivered after alice's message, in order
    assert bob.received("users/alice/x") == []


def test_plaintext_password_file_refused(hx):
    path = os.path.join(hx.dir, "plain.passwd")
    with open(path, "w") as f:
        f.write("alice:hunter2\n")
    conf = acl_config(hx, [], password_file=path)
    d = hx.uplinkd(conf, ready=False)
    h.wait_for(lambda: not d.running(), what="uplinkd to exit on a plain-text password file")
    d.expect_exit = d.proc.returncode
    assert d.proc.returncode != 0
    line = d.wait_log(r"local.password_file")
    assert "line 1: user \"alice\": the password is in plain text" in line
    assert "uplinkctl passwd" in line
    assert "hunter2" not in d.log_text()

    # uplinkctl never takes the password from the command line or a TTY-less
    # empty stdin.
    p = run([UPLINKCTL, "passwd", path, "bob"], stdin_text="")
    assert p.returncode == 1 and "no password" in p.stderr


class ActivatedDaemon(h.Daemon):
    """uplinkd started by systemd-socket-activate, which binds `listen` and
    launches uplinkd on the first connection, passing the sockets with
    LISTEN_FDS / LISTEN_FDNAMES (as a .socket unit would)."""

    def __init__(self, *args, listen=(), names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.listen = list(listen)
        self.names = list(names)

    def start(self):
        env = {k: v for k, v in os.environ.items() if k not in h._SYSTEMD_ENV}
        env["NOTIFY_SOCKET"] = self.notify.path
        cmd = ["systemd-socket-activate"]
        for addr in self.listen:
            cmd += ["-l", addr]
        if self.names:
            cmd.append("--fdname=" + ":".join(self.names))
        # It hands the child only the variables named with -E.
        for var in ("NOTIFY_SOCKET", "PATH", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
            if var in env:
                cmd += ["-E", var]
        cmd += shlex.split(os.environ.get("UPLINKD_WRAPPER", ""))
        cmd += [h.UPLINKD_BIN, "-c", self.conf_path]
        with open(self.log_path, "ab") as log, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                         env=env, cwd=self.workdir)
        return self


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (apt-get install systemd)")
def test_socket_activation(hx):
    conf = acl_config(hx, [])
    del conf["local"]["acl"]
    sock = h.local_unix_path(conf)
    port = h.local_tcp_port(conf)
    extra = os.path.join(hx.dir, "extra.sock")  # passed, but in no local.listen entry
    conf_path = hx.write_config(conf, "activated.yaml")
    d = ActivatedDaemon(hx.dir, conf_path, notify=hx.notify, name="activated",
                        listen=[sock, "127.0.0.1:%d" % port, extra],
                        names=["local", "tcp", "extra"])
    d.conf = conf
    d.expect_exit = None
    hx._daemons.append(d)
    since = hx.notify.count()
    d.start()
    h.wait_for(lambda: h.unix_accepts(sock) if d.running() else
               pytest.fail("systemd-socket-activate exited: " + d.log_tail()),
               what="systemd-socket-activate to listen on %s" % sock)
    assert hx.notify.find("READY=1", since) is None  # uplinkd is not running yet

    # The first client's connection starts uplinkd and is served by it.
    h.mosquitto_pub("--unix", sock, "-q", "1", "-t", "dev/a/telemetry", "-m", "first")
    d.wait_ready(since=since)
    d.wait_log(r"listener unix://%s: using the socket passed by systemd \(fd \d+\)" % sock)
    d.wait_log(r"listener tcp://127.0.0.1:%d: using the socket passed by systemd" % port)
    d.wait_log(r"socket passed by systemd as fd \d+, named extra \(unix://%s\) matches no "
               r"local.listen entry; serving it anyway" % extra)
    assert d.find_log(r"cannot bind|removing stale socket") is None

    sub = hx.local_sub(types.SimpleNamespace(unix=sock), "dev/#")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", "dev/b/telemetry",
                    "-m", "tcp")
    sub.wait("dev/b/telemetry", "tcp")
    h.mosquitto_pub("--unix", extra, "-q", "1", "-t", "dev/c/telemetry", "-m", "extra")
    sub.wait("dev/c/telemetry", "extra")

    # The socket belongs to the .socket unit: uplinkd does not remove it.
    d.stop()
    assert os.path.exists(sock)



@needs_root
def test_socket_mode_and_group(hx):
    """local.socket_mode and local.socket_group decide who may connect at
    all; a reload applies new values to the socket in place."""
    import grp
    open_socket_dir(hx)
    group = grp.getgrnam("daemon")
    conf = acl_config(hx, [])
    del conf["local"]["acl"]
    conf["local"]["socket_mode"] = "0660"
    conf["local"]["socket_group"] = "daemon"
    d = hx.uplinkd(conf)
    sock = h.local_unix_path(conf)
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == group.gr_gid
    pub = ["mosquitto_pub", "--unix", sock, "-t", "dev/x/telemetry", "-m", "1"]
    assert run(as_uid(POLLER_UID, pub)).returncode != 0  # not owner, not in group
    # In the group: allowed.
    p = run(["setpriv", "--reuid=%d" % POLLER_UID, "--regid=%d" % POLLER_UID,
             "--groups=%d" % group.gr_gid] + pub)
    assert p.returncode == 0, p.stderr

    conf["local"]["socket_mode"] = "0666"
    since = hx.notify.count()
    hx.write_config(conf, "uplinkd.yaml")
    d.reload()
    d.wait_ready(since=since)
    h.wait_for(lambda: os.stat(sock).st_mode & 0o777 == 0o666, what="mode 0666 after reload")
    assert run(as_uid(POLLER_UID, pub)).returncode == 0
