"""uplinkctl's online commands: status table and --json, reconnect, rotate, errors."""

import json
import os
import subprocess

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
