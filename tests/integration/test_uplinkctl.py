"""uplinkctl's online commands: status table and --json, reconnect, rotate, errors, and
`uplinkctl jwt UPLINK` (from the daemon, or signed locally from the configuration)."""

import json
import re
import os
import subprocess

import fakecloud
import harness as h


def _uplink(gw, name="cloud"):
    doc = json.loads(h.uplinkctl(gw.control, "status").stdout)
    return next(u for u in doc["uplinks"] if u["name"] == name)


def _wait_online(gw):
    h.wait_for(lambda: _uplink(gw)["state"].upper() == "ONLINE", what="uplink cloud ONLINE")


def test_status_table_for_people(hx):
    gw = hx.gateway()
    _wait_online(gw)
    proc = h.uplinkctl(gw.control, "status", json_output=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("uplinkd "), proc.stdout
    header = next(i for i, l in enumerate(lines) if l.startswith("UPLINK"))
    row = lines[header + 1].split()
    assert row[0] == "cloud" and row[1].upper() == "ONLINE", proc.stdout
    assert row[2].startswith("localhost:"), proc.stdout
    # Under the table: the spool line with the figures the JSON carries.
    assert re.search(r"^cloud: spool fsync, 0 record\(s\), 0 of \d+ bytes, oldest 0\.0 s, "
                     r"in [\d.]+/s, out [\d.]+/s, last fsync \d+ us$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^cloud: dropped: overflow 0, max_age 0, corrupt 0, qos0 offline 0, "
                     r"refused 0$", proc.stdout, re.M), proc.stdout
    # --json after the command works too and is the document itself.
    proc = subprocess.run([h.UPLINKCTL_BIN, "-s", gw.control, "status", "--json"],
                          capture_output=True, text=True, timeout=h.TIMEOUT)
    assert json.loads(proc.stdout)["uplinks"][0]["name"] == "cloud"


def test_reconnect_drops_and_restores_the_session(hx):
    gw = hx.gateway()
    _wait_online(gw)
    before = _uplink(gw)["connects"]
    proc = h.uplinkctl(gw.control, "reconnect", "cloud", json_output=False)
    assert proc.returncode == 0, proc.stderr
    assert "cloud: reconnect requested" in proc.stdout
    h.wait_for(lambda: _uplink(gw)["connects"] > before and _uplink(gw)["state"] == "ONLINE",
               what=lambda: "a new CONNACK after reconnect: %s" % _uplink(gw))
    gw.daemon.wait_log(r"reconnect requested with uplinkctl reconnect")


def test_rotate_refuses_an_uplink_without_jwt(hx):
    gw = hx.gateway()
    proc = h.uplinkctl(gw.control, "rotate", "cloud", json_output=False)
    assert proc.returncode == 1
    assert "does not use JWT auth" in proc.stderr, proc.stderr


def test_unknown_uplink_and_missing_name(hx):
    gw = hx.gateway()
    proc = h.uplinkctl(gw.control, "reconnect", "nope", json_output=False)
    assert proc.returncode == 1 and 'no uplink named "nope"' in proc.stderr, proc.stderr
    proc = h.uplinkctl(gw.control, "reconnect", json_output=False)
    assert proc.returncode == 2 and "name the uplink" in proc.stderr, proc.stderr


def test_daemon_not_running_is_explained(tmp_path):
    proc = h.uplinkctl(str(tmp_path / "control.sock"), "status", json_output=False)
    assert proc.returncode == 2
    assert "cannot reach uplinkd" in proc.stderr and "is uplinkd running" in proc.stderr


def test_permission_denied_is_explained(hx):
    gw = hx.gateway()
    # The control socket is 0660 root:root here; uid 1001 may not connect.
    proc = subprocess.run(["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups",
                           h.UPLINKCTL_BIN, "-s", gw.control, "status"],
                          capture_output=True, text=True, timeout=h.TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if os.access(gw.control, os.W_OK) and os.geteuid() != 0:
        return  # not root: cannot switch uid; the check needs root (CI is root)
    assert proc.returncode == 2, proc.stdout
    assert "permission denied" in proc.stderr and "group uplinkd" in proc.stderr, proc.stderr


def test_children_lists_what_published(hx):
    gw = hx.gateway()
    proc = h.uplinkctl(gw.control, "children", json_output=False)
    assert proc.returncode == 0 and "no child device" in proc.stdout, proc.stdout
    sub = hx.cloud_sub(gw.broker, "gw-test/#")
    # QoS 0 is dropped while the uplink is offline (spool.qos0_offline: drop);
    # under a slow UPLINKD_WRAPPER (valgrind) it may not be online yet.
    gw.daemon.wait_log(r"-> ONLINE")
    for child, count in (("pump-1", 2), ("meter-7", 1)):
        for n in range(count):
            h.mosquitto_pub("--unix", gw.unix, "-t", "dev/%s/telemetry" % child, "-m",
                            "%s-%d" % (child, n))
            sub.wait("gw-test/%s/telemetry" % child, "%s-%d" % (child, n))
    # A message that stays local (a downstream channel) does not make a child.
    h.mosquitto_pub("--unix", gw.unix, "-t", "dev/ghost/commands", "-m", "x")
    doc = json.loads(h.uplinkctl(gw.control, "children").stdout)
    by_id = {c["id"]: c for c in doc["children"]}
    assert set(by_id) == {"meter-7", "pump-1"}, doc
    assert by_id["pump-1"]["messages"] == 2 and by_id["meter-7"]["messages"] == 1
    assert by_id["pump-1"]["uplinks"] == [{"name": "cloud", "registration": "none"}]
    assert by_id["pump-1"]["last_seen"] > 0
    table = h.uplinkctl(gw.control, "children", json_output=False).stdout.splitlines()
    assert table[0].split()[0] == "CHILD"
    assert table[1].split()[:2] == ["meter-7", "1"] and table[2].split()[:2] == ["pump-1", "2"]
    assert "cloud(none)" in table[2]


# --------------------------------------------------------------------------
# uplinkctl jwt UPLINK: the token a configured uplink would send
# --------------------------------------------------------------------------

def _jwt(socket_path, *args):
    return subprocess.run([h.UPLINKCTL_BIN, "-s", socket_path, "jwt"] + list(args),
                          capture_output=True, text=True, timeout=h.TIMEOUT,
                          stdin=subprocess.DEVNULL)


def _jwt_json(socket_path, *args):
    return subprocess.run([h.UPLINKCTL_BIN, "-s", socket_path, "--json", "jwt"] + list(args),
                          capture_output=True, text=True, timeout=h.TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_jwt_for_an_uplink_from_the_daemon_then_from_the_config(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud="test-project", skew=5, require_kid=True)
    conf = hx.config(cloud, uplink={"auth": {
        "type": "jwt", "key": key.private_path, "aud": "test-project", "kid": "auto",
        "claims": {"site": "north"}, "lifetime": "10m", "clock_check": "build-date"}})
    daemon = hx.uplinkd(conf)
    sent = cloud.wait_event("connect", client_id="gw-test", result="accepted")
    sock = conf["control"]["socket"]

    proc = _jwt(sock, "cloud", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "signed by the running uplinkd" in proc.stderr, proc.stderr
    assert '"kid":"%s"' % key.kid in proc.stderr.replace(" ", ""), proc.stderr  # -v: header
    token = proc.stdout.strip()
    claims = fakecloud.jwt.decode(token, key.private_key.public_key(), algorithms=["ES256"],
                                  audience="test-project")
    assert fakecloud.jwt.get_unverified_header(token)["kid"] == key.kid
    # The same claims the uplink sent on its CONNECT (iat/exp aside: signed later).
    assert {k: v for k, v in claims.items() if k not in ("iat", "exp")} == \
        {k: v for k, v in sent["claims"].items() if k not in ("iat", "exp")}
    assert claims["exp"] - claims["iat"] == 600 + 60

    doc = json.loads(_jwt_json(sock, "cloud").stdout)
    assert doc["source"] == "daemon" and doc["uplink"] == "cloud"
    assert doc["header"]["alg"] == "ES256" and doc["claims"]["site"] == "north"
    assert doc["exp"] == doc["claims"]["exp"]

    proc = _jwt(sock, "nope")
    assert proc.returncode == 1 and 'no uplink named "nope" (known: cloud)' in proc.stderr, \
        proc.stderr
    proc = _jwt(sock, "cloud", "--key", key.private_path)
    assert proc.returncode == 2 and "give one or the other" in proc.stderr, proc.stderr

    # No daemon: signed here from the configuration file, the same way.
    daemon.stop()
    proc = _jwt(sock, "cloud", "--config", daemon.conf_path)
    assert proc.returncode == 0, proc.stderr
    assert "uplinkd is not running" in proc.stderr and "signed here" in proc.stderr, proc.stderr
    local = fakecloud.jwt.decode(proc.stdout.strip(), key.private_key.public_key(),
                                 algorithms=["ES256"], audience="test-project")
    assert {k: v for k, v in local.items() if k not in ("iat", "exp")} == \
        {k: v for k, v in claims.items() if k not in ("iat", "exp")}
    assert fakecloud.jwt.get_unverified_header(proc.stdout.strip()) == \
        fakecloud.jwt.get_unverified_header(token)


def test_jwt_profile_claims_and_errors_without_a_daemon(hx, tmp_path):
    gcp_key = fakecloud.Key.generate("RS256", hx.dir, "gcp")
    akenza_key = fakecloud.Key.generate("ES256", hx.dir, "akenza")
    conf = hx.config(None, port=8883)
    base = dict(conf["uplinks"][0])
    base.pop("generic", None)
    conf["uplinks"] = [
        dict(base, name="gcp", profile="gcp",
             auth={"type": "jwt", "key": gcp_key.private_path, "clock_check": "build-date"},
             gcp={"project": "my-project", "region": "europe-west1", "registry": "reg"}),
        dict(base, name="akenza", profile="akenza",
             auth={"type": "jwt", "key": akenza_key.private_path, "clock_check": "build-date"}),
        dict(base, name="plain"),
    ]
    path = hx.write_config(conf, "three.yaml")
    nowhere = str(tmp_path / "no-daemon.sock")

    proc = _jwt(nowhere, "gcp", "--config", path)
    assert proc.returncode == 0, proc.stderr
    claims = fakecloud.jwt.decode(proc.stdout.strip(), gcp_key.private_key.public_key(),
                                  algorithms=["RS256"], audience="my-project")
    assert claims["aud"] == "my-project"  # GCP: aud = the project id

    proc = _jwt(nowhere, "akenza", "--config", path)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    claims = fakecloud.jwt.decode(token, akenza_key.private_key.public_key(),
                                  algorithms=["ES256"], audience="https://akenza.io/devices/gw-test")
    assert claims["sub"] == "gw-test"
    assert fakecloud.jwt.get_unverified_header(token)["kid"] == akenza_key.kid

    proc = _jwt(nowhere, "plain", "--config", path)
    assert proc.returncode == 1 and 'uplink "plain" does not use JWT auth' in proc.stderr, \
        proc.stderr
    proc = _jwt(nowhere, "other", "--config", path)
    assert proc.returncode == 1 and "(known: gcp akenza plain)" in proc.stderr, proc.stderr


def _passwd(path, user, password):
    return subprocess.run([h.UPLINKCTL_BIN, "passwd", "--iterations", "10000", path, user],
                          input=password + "\n", capture_output=True, text=True,
                          timeout=h.TIMEOUT)


def test_passwd_keeps_owner_group_and_mode(hx):
    """Issue 12 §5: `uplinkctl passwd` run as root made the documented root:uplinkd 0640
    password file root:root 0600, and the daemon (not root) could no longer read it."""
    if os.geteuid() != 0:
        return  # chown to another uid needs root (CI is root)
    path = os.path.join(hx.dir, "local.passwd")
    p = _passwd(path, "alice", "first")
    assert p.returncode == 0, p.stderr
    # A new file: the directory's group, 0640.
    st = os.stat(path)
    assert (st.st_mode & 0o7777, st.st_gid) == (0o640, os.stat(hx.dir).st_gid), oct(st.st_mode)

    # As the packaging documents it: group of the daemon, 0640 (here uid/gid 1234 play
    # the daemon's user and group), then the password changed as root.
    os.chown(path, 1234, 1234)
    os.chmod(path, 0o640)
    conf = hx.config(None, port=1)  # the uplink is never reached
    conf["uplinks"][0]["tls"] = {"enabled": False}
    conf["local"]["password_file"] = path
    d = hx.uplinkd(conf)
    port = h.local_tcp_port(conf)
    p = _passwd(path, "alice", "second")
    assert p.returncode == 0, p.stderr
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 1234, 0o640), \
        (st.st_uid, st.st_gid, oct(st.st_mode))
    assert not [f for f in os.listdir(hx.dir) if f.startswith("local.passwd.")], \
        "temporary file left behind"
    # The daemon's group can still read it...
    os.chmod(hx.dir, 0o711)
    cat = subprocess.run(["setpriv", "--reuid=4321", "--regid=1234", "--clear-groups",
                          "cat", path], capture_output=True, text=True, timeout=h.TIMEOUT)
    assert cat.returncode == 0 and cat.stdout.startswith("alice:"), cat.stderr
    # ...and the reload takes the new password.
    since = d.log_size()
    d.reload()
    d.wait_log(r"reload done", since=since)
    c = h.MqttClient("127.0.0.1", port, username="alice", password="second")
    try:
        c.connect()
    finally:
        c.client.loop_stop()
        c.client.disconnect()

    # A caller that may not keep the owner changes nothing (uid 1001 owns neither).
    os.chown(path, 1234, 1234)
    os.chmod(path, 0o666)
    before = open(path).read()
    os.chmod(hx.dir, 0o777)
    p = subprocess.run(["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups",
                        h.UPLINKCTL_BIN, "passwd", "--iterations", "10000", path, "bob"],
                       input="x\n", capture_output=True, text=True, timeout=h.TIMEOUT)
    os.chmod(hx.dir, 0o700)
    assert p.returncode == 1, p.stderr
    assert "cannot keep the owner of %s (uid 1234, gid 1234)" % path in p.stderr, p.stderr
    assert open(path).read() == before


def test_status_exit_3_when_an_uplink_is_not_online(hx):
    """Issue 12 §5: `uplinkctl status` exited 0 with every uplink down; health checks
    (systemd, containers) need 3 = answered, not healthy. 0 once ONLINE is
    test_status_table_for_people."""
    conf = hx.config(None, port=1)  # nothing listens on port 1
    conf["uplinks"][0]["tls"] = {"enabled": False}
    d = hx.uplinkd(conf)
    d.wait_log(r"state \w+ -> BACKOFF")
    for json_output in (True, False):
        proc = h.uplinkctl(conf["control"]["socket"], "status", json_output=json_output)
        assert proc.returncode == 3, (json_output, proc.returncode, proc.stderr)
        assert "cloud" in proc.stdout, proc.stdout
