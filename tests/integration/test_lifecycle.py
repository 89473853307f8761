"""Process life cycle: sd_notify, watchdog, SIGTERM, --version, uplinkctl."""

import json
import re
import subprocess

import harness as h


def test_ready_and_status_notifications(hx):
    gw = hx.gateway()
    fields = [f for _, f in hx.notify.fields()]
    assert "READY=1" in fields
    # STATUS= comes with or after READY=1 and is one line of words.
    h.wait_for(lambda: hx.notify.find("STATUS="), what="STATUS= on NOTIFY_SOCKET")
    status = [f for _, f in hx.notify.fields() if f.startswith("STATUS=")]
    assert all(len(s) > len("STATUS=") for s in status), status
    # READY=1 means the listeners are bound: both accept right away.
    assert h.unix_accepts(gw.unix)
    assert h.tcp_accepts("127.0.0.1", gw.tcp_port)


def test_reload_notifies_reloading_then_ready(hx):
    gw = hx.gateway()
    since = hx.notify.count()
    gw.daemon.reload()
    reloading = hx.notify.wait("RELOADING=1", since)
    h.wait_for(lambda: any(f == "READY=1" and t >= reloading for t, f in hx.notify.fields(since)),
               what="READY=1 after RELOADING=1")
    assert gw.daemon.running()


def test_sigterm_stops_cleanly_with_stopping(hx):
    gw = hx.gateway()
    # A connected local client and an online uplink must not delay shutdown.
    hx.local_client(gw)
    since = hx.notify.count()
    rc, took = gw.daemon.stop(timeout=5 + 5)  # shutdown_timeout 5s + slack
    assert rc == 0, "exit code %s\n%s" % (rc, gw.daemon.log_tail())
    assert took < 5 + 2, "took %.1f s to stop (shutdown_timeout is 5 s)" % took
    assert hx.notify.find("STOPPING=1", since) is not None, "no STOPPING=1"


def test_sigterm_while_cloud_unreachable(hx):
    broker = hx.broker(start=False)  # nothing listens on the uplink's port
    gw = hx.gateway(broker)
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/x/telemetry", "-m", "queued")
    rc, took = gw.daemon.stop(timeout=5 + 5)
    assert rc == 0
    assert took < 5 + 2, "took %.1f s to stop (shutdown_timeout is 5 s)" % took


def test_watchdog_pings_at_half_the_interval(hx):
    usec = 1000000
    broker = hx.broker()
    daemon = hx.uplinkd(hx.config(broker), env={"WATCHDOG_USEC": str(usec)})
    since = hx.notify.count()

    def pings():
        return [t for t, f in hx.notify.fields(since) if f == "WATCHDOG=1"]

    h.wait_for(lambda: len(pings()) >= 6, timeout=10, what=lambda: "6 WATCHDOG=1 (got %d)"
               % len(pings()))
    times = pings()
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    median = gaps[len(gaps) // 2]
    # Expected 0.5 s; generous bounds for a loaded machine, but it must be
    # well inside the 1 s watchdog and not a busy loop.
    assert 0.2 <= median <= 0.8, "median WATCHDOG=1 interval %.3f s (gaps %s)" % (median, gaps)
    assert daemon.running()


def _pkg_version(name):
    try:
        out = subprocess.run(["pkg-config", "--modversion", name], capture_output=True,
                             text=True, timeout=10, stdin=subprocess.DEVNULL)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def test_version_lists_libraries():
    proc = subprocess.run([h.UPLINKD_BIN, "--version"], capture_output=True, text=True,
                          timeout=h.TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"uplinkd\D*\d+\.\d+", out), out
    for name, pkg in (("libuv", "libuv"), ("mosquitto", "libmosquitto"),
                      ("openssl", "openssl"), ("yaml", "yaml-0.1"), ("systemd", "libsystemd")):
        line = next((l for l in out.splitlines() if name in l.lower()), None)
        assert line, "--version does not mention %s:\n%s" % (name, out)
        version = _pkg_version(pkg)
        if version:
            assert version in line or version.split(".")[0] in line, \
                "%s line %r does not show version %s" % (name, line, version)


def test_uplinkctl_status_shows_uplink_online(hx):
    gw = hx.gateway()

    def state():
        proc = h.uplinkctl(gw.control, "status")
        if proc.returncode not in (0, 3):
            return None
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            raise h.HarnessError("uplinkctl status did not print JSON:\n%s" % proc.stdout)
        st = h.status_uplink_state(doc, "cloud")
        return st if st and st.upper() == "ONLINE" else None

    h.wait_for(state, what=lambda: "uplink 'cloud' ONLINE in uplinkctl status:\n%s"
               % h.uplinkctl(gw.control, "status").stdout)


def test_uplinkctl_status_shows_offline_uplink_and_error(hx):
    broker = hx.broker()
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.other_ca}})
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"\berror: .*certificate verify failed")
    proc = h.uplinkctl(conf["control"]["socket"], "status")
    # Exit status 3: answered, but an uplink is not ONLINE (health checks use it).
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    st = h.status_uplink_state(doc, "cloud")
    assert st and st.upper() != "ONLINE", proc.stdout
    assert "certificate verify failed" in proc.stdout, "last error missing from status:\n%s" % proc.stdout


def test_refused_connect_is_logged_as_refused(hx):
    """Issue 12 §5: a refused TCP connect was logged as "closed the connection before
    CONNACK", which sends the operator after client ids and certificates. Nothing
    listened: say so, with and without TLS."""
    broker = hx.broker(start=False)  # nothing listens on the uplink's port
    for tls in (True, False):
        conf = hx.config(broker)
        if not tls:
            conf["uplinks"][0]["tls"] = {"enabled": False}
        daemon = hx.uplinkd(conf)
        daemon.wait_log(r"state \w+ -> BACKOFF")
        log = daemon.log_text()
        assert re.search(r"error: uplink cloud: connection to \S+:%d failed: Connection refused "
                         r"\(nothing listens there" % conf["uplinks"][0]["port"], log), (tls, log)
        assert "before CONNACK" not in log, (tls, log)
        daemon.stop()
