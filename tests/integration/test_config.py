"""Configuration: --check-config, errors with FILE:LINE:COL, reload on SIGHUP."""

import os
import re
import subprocess

import pytest

import harness as h


def run_uplinkd(*args, timeout=h.TIMEOUT):
    """Run uplinkd to completion (for --check-config and start-up failures)."""
    env = {k: v for k, v in os.environ.items() if k not in h._SYSTEMD_ENV}
    return subprocess.run([h.UPLINKD_BIN] + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=env)


def bad_config(hx, key_line, value):
    """A config whose line `key_line` (1-based) is `value`; returns its path.

    Lines 1-8 are a valid skeleton; the uplink's keys start at line 7.
    """
    lines = [
        "gateway:",                                                   # 1
        "  id: gw-test",                                              # 2
        "  state_dir: %s" % os.path.join(hx.dir, "state"),            # 3
        "local:",                                                     # 4
        '  listen: [ "unix://%s" ]' % os.path.join(hx.dir, "l.sock"),  # 5
        "uplinks:",                                                   # 6
        "  - name: cloud",                                            # 7
        "    host: localhost",                                        # 8
        "    tls: { ca: %s }" % hx.pki.ca,                            # 9
        "    port: 8883",                                             # 10
    ]
    while len(lines) < key_line:
        lines.append("")
    lines[key_line - 1] = value
    os.makedirs(os.path.join(hx.dir, "state"), exist_ok=True)
    return hx.write_config("\n".join(lines) + "\n", "bad.yaml")


BAD_CASES = [
    # (line, text, what the message must mention)
    (10, "    port: not-a-port", "port"),
    (10, "    port: 70000", "port"),
    (10, "    reconnect: { base: soon }", "base"),
    (2, "  id: [ not, a, string ]", "id"),
    (11, "    no_such_key: 1", "no_such_key"),
]


def _assert_located(stderr, path, line, key):
    rx = re.compile(r"^%s:(\d+):(\d+): (.*)$" % re.escape(path), re.MULTILINE)
    found = rx.findall(stderr)
    assert found, "no '%s:LINE:COL: ...' line on stderr:\n%s" % (path, stderr)
    assert any(int(l) == line and int(c) >= 1 and key in msg for l, c, msg in found), \
        "expected an error at line %d naming %r, got:\n%s" % (line, key, stderr)


def test_check_config_ok(hx):
    broker = hx.broker(start=False)
    path = hx.write_config(hx.config(broker))
    proc = run_uplinkd("-c", path, "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    # --check-config must not start anything.
    assert not os.path.exists(os.path.join(hx.dir, "local.sock"))


@pytest.mark.parametrize("line,text,key", BAD_CASES, ids=[c[2] + "-" + str(i)
                                                          for i, c in enumerate(BAD_CASES)])
def test_check_config_reports_file_line_column(hx, line, text, key):
    path = bad_config(hx, line, text)
    proc = run_uplinkd("-c", path, "--check-config")
    assert proc.returncode == 1, "%r: exit %d, stderr %s" % (text, proc.returncode, proc.stderr)
    _assert_located(proc.stderr, path, line, key)
    assert "configuration OK" not in proc.stdout


def test_yaml_syntax_error_is_located(hx):
    path = bad_config(hx, 10, "    port: [ 8883")  # unclosed flow sequence
    proc = run_uplinkd("-c", path, "--check-config")
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"^%s:\d+:\d+: " % re.escape(path), proc.stderr, re.MULTILINE), proc.stderr


def test_missing_file_is_reported(hx):
    path = os.path.join(hx.dir, "does-not-exist.yaml")
    proc = run_uplinkd("-c", path, "--check-config")
    assert proc.returncode == 1
    assert path in proc.stderr


def test_bad_config_at_start_exits_1(hx):
    path = bad_config(hx, 10, "    port: not-a-port")
    proc = run_uplinkd("-c", path)
    assert proc.returncode == 1, "exit %d, stderr %s" % (proc.returncode, proc.stderr)
    _assert_located(proc.stderr, path, 10, "port")


def test_sighup_with_broken_file_keeps_old_config(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "gw-test/#")
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/r1/telemetry", "-m", "before")
    sub.wait("gw-test/r1/telemetry", "before")

    with open(gw.daemon.conf_path, "a") as f:
        f.write("uplinks: [ this is : not valid\n")
    since = gw.daemon.log_size()
    gw.daemon.reload()
    line = gw.daemon.wait_log(r"%s:\d+:\d+" % re.escape(gw.daemon.conf_path), since=since)
    assert gw.daemon.running(), "a broken reload must not stop uplinkd"
    assert line

    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/r1/telemetry", "-m", "after")
    sub.wait("gw-test/r1/telemetry", "after")


def test_sighup_with_changed_file_applies_it(hx):
    gw = hx.gateway()
    sub = hx.cloud_sub(gw.broker, "gw-test/#", "gw-new/#")
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/r2/telemetry", "-m", "old-prefix")
    sub.wait("gw-test/r2/telemetry", "old-prefix")

    conf = dict(gw.conf)
    conf["uplinks"] = [dict(gw.conf["uplinks"][0], generic={"topic_prefix": "gw-new"})]
    h.write_config(gw.daemon.conf_path, conf)
    since = hx.notify.count()
    gw.daemon.reload()
    reloading = hx.notify.wait("RELOADING=1", since)
    h.wait_for(lambda: any(f == "READY=1" and t >= reloading for t, f in hx.notify.fields(since)),
               what="READY=1 after RELOADING=1")

    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/r2/telemetry", "-m", "new-prefix")
    sub.wait("gw-new/r2/telemetry", "new-prefix")
    assert not [m for m in sub.messages() if m[0] == "gw-test/r2/telemetry" and m[1] == "new-prefix"]


@pytest.mark.parametrize("key", ["ca", "cert"])
def test_certificate_file_errors_name_the_line(hx, key):
    """Issue 12 §5: `tls.ca: /etc/shadow` (readable by root, not a certificate) was refused
    without FILE:LINE. The checks that read the files (src/tlscheck.c) now name the line
    of the key, like the parser does."""
    junk = os.path.join(hx.dir, "junk.pem")
    with open(junk, "w") as f:
        f.write("not a certificate\n")
    tls = {"ca": "    tls: { ca: %s }" % junk,
           "cert": "    tls: { ca: %s, cert: %s, key: %s }" % (hx.pki.ca, junk, junk)}[key]
    path = bad_config(hx, 9, tls)
    for args in (("--check-config",), ()):
        proc = run_uplinkd("-c", path, *args)
        assert proc.returncode == 1, proc.stderr
        col = tls.index(key + ":") + 1
        assert re.search(r"error: uplink cloud: %s:9:%d: " % (re.escape(path), col + len(key) + 2),
                         proc.stderr), (args, col, proc.stderr)


def test_check_config_as_root_checks_files_as_the_service_user(hx):
    """Issue 12 §5: `uplinkd --check-config` run as root passed a tls.ca that the service
    user could not read; the service then failed at start. As root it now checks again as
    the service user ($UPLINKD_SERVICE_USER; "nobody" here, as the packaged uplinkd user
    may not exist) and names the file and line."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")
    ca = os.path.join(hx.dir, "root-only-ca.pem")
    with open(hx.pki.ca) as src, open(ca, "w") as dst:
        dst.write(src.read())
    os.chmod(ca, 0o600)
    os.chmod(hx.dir, 0o755)
    path = bad_config(hx, 9, "    tls: { ca: %s }" % ca)
    os.chmod(path, 0o644)
    env = dict(os.environ, UPLINKD_SERVICE_USER="nobody")
    run = lambda: subprocess.run([h.UPLINKD_BIN, "-c", path, "--check-config"], env=env,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=h.TIMEOUT)
    proc = run()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    _assert_located(proc.stderr, path, 9, "tls.ca")
    assert "Permission denied" in proc.stderr, proc.stderr
    assert "valid for root, but the service user nobody" in proc.stderr, proc.stderr
    assert "configuration OK" not in proc.stdout, proc.stdout
    os.chmod(ca, 0o644)
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout, proc.stdout
