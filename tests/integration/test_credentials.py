"""Renewed credentials on disk: SIGHUP and `uplinkctl reload-credentials` (issue #4).

The files a session was set up with (tls.cert, tls.key, tls.ca, the JWT auth.key) are
fingerprinted when the connection is set up. SIGHUP with an unchanged configuration, and
`uplinkctl reload-credentials [UPLINK]`, compare the files on disk with that: unchanged -> nothing
happens; changed -> the start-up checks run on the new files first, and only if they pass does
the uplink reconnect; a refused renewal keeps the running session.

SIGHUP with a changed uplink section (tls.cert now names another file...) runs the same start-up
checks on the new section before anything is applied; a failure refuses the whole reload, like
a file that does not validate, and the running sessions are left alone.

The broker requires a client certificate and uses its CN as the user name
(use_identity_as_username), so its log shows which certificate each connection presented.
"""

import copy
import json
import os
import re
import shutil

import fakecloud
import harness as h
import test_diagnose as diag

AUD = "test-project"


def replace_file(src, dst):
    """Install `src` at `dst` the way a renewal should: a new file renamed over the old one."""
    tmp = dst + ".new"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o600)
    os.rename(tmp, dst)


def identity_broker(hx):
    """A broker that requires a client certificate from the test CA; user name = its CN."""
    return hx.broker(name="mtls", client_cert=True)


def uplink(conf, name="cloud"):
    doc = json.loads(h.uplinkctl(conf["control"]["socket"], "status").stdout)
    return next(u for u in doc["uplinks"] if u["name"] == name)


def reload_credentials(conf, *args, json_output=False):
    return h.uplinkctl(conf["control"]["socket"], "reload-credentials", *args,
                       json_output=json_output)


def start_with_cert(hx):
    """uplinkd with tls.cert/tls.key = device.pem/device.key (CN gw-a), online."""
    broker = identity_broker(hx)
    cert_a, key_a = diag.write_client_cert(hx, "a", diag.utc(-1), diag.utc(30), cn="gw-a")
    cert = os.path.join(hx.dir, "device.pem")
    key = os.path.join(hx.dir, "device.key")
    replace_file(cert_a, cert)
    replace_file(key_a, key)
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": key}})
    daemon = hx.uplinkd(conf)
    h.wait_for(lambda: "u'gw-a'" in broker.log_text(), what="a connection with CN gw-a")
    h.wait_for(lambda: uplink(conf)["state"] == "ONLINE", what="uplink ONLINE")
    return broker, daemon, conf, cert, key


def test_renewed_certificate_reconnects_on_sighup_unchanged_does_nothing(hx):
    broker, daemon, conf, cert, key = start_with_cert(hx)
    connects = uplink(conf)["connects"]

    # Nothing changed: the command says so and the session stays.
    proc = reload_credentials(conf)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cloud: credentials unchanged", proc.stdout
    daemon.wait_log(r"cloud.*credentials unchanged")

    # Renewal on disk, same paths in the configuration: SIGHUP picks it up.
    cert_b, key_b = diag.write_client_cert(hx, "b", diag.utc(-1), diag.utc(60), cn="gw-b")
    replace_file(cert_b, cert)
    replace_file(key_b, key)
    since = daemon.log_size()
    daemon.reload()
    daemon.wait_log(r"credentials changed \(tls\.cert, tls\.key\); the new files passed the "
                    r"checks; reconnecting", since=since)
    h.wait_for(lambda: "u'gw-b'" in broker.log_text(), what="a connection with CN gw-b")
    h.wait_for(lambda: uplink(conf)["connects"] == connects + 1 and
               uplink(conf)["state"] == "ONLINE", what=lambda: "one reconnect: %s" % uplink(conf))
    # Data still flows on the new session (the broker's plain port needs a certificate too,
    # so the proof is uplinkd's count of PUBACKs).
    published = uplink(conf)["published"]
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", "1", "-t", "dev/s1/telemetry",
                    "-m", "after-renewal")
    h.wait_for(lambda: uplink(conf)["published"] == published + 1, what="a PUBACK")

    # A second SIGHUP finds nothing new.
    since = daemon.log_size()
    daemon.reload()
    daemon.wait_log(r"reload done", since=since)
    daemon.wait_log(r"credentials unchanged", since=since)
    assert uplink(conf)["connects"] == connects + 1


def test_broken_renewal_is_refused_and_the_session_kept(hx):
    broker, daemon, conf, cert, key = start_with_cert(hx)
    connects = uplink(conf)["connects"]

    # Only the certificate was replaced: its key is not device.key.
    cert_b, key_b = diag.write_client_cert(hx, "b", diag.utc(-1), diag.utc(60), cn="gw-b")
    replace_file(cert_b, cert)
    proc = reload_credentials(conf, "cloud")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("cloud: refused: new tls.cert refused, keeping the current "
                                  "session: "), proc.stdout
    assert cert in proc.stdout, proc.stdout
    daemon.wait_log(r"new tls\.cert refused, keeping the current session")
    # The same answer as JSON, with the same exit status.
    proc = reload_credentials(conf, "cloud", json_output=True)
    assert proc.returncode == 1
    (answer,) = json.loads(proc.stdout)["uplinks"]
    assert answer["name"] == "cloud" and answer["result"] == "refused", answer
    # An expired certificate is refused with its dates.
    cert_old, key_old = diag.write_client_cert(hx, "old", diag.utc(-30), diag.utc(-1), cn="gw-c")
    replace_file(cert_old, cert)
    replace_file(key_old, key)
    proc = reload_credentials(conf)
    assert proc.returncode == 1 and "expired on" in proc.stdout, proc.stdout
    # The running session was never touched.
    up = uplink(conf)
    assert up["state"] == "ONLINE" and up["connects"] == connects, up
    assert "u'gw-b'" not in broker.log_text() and "u'gw-c'" not in broker.log_text()

    # The complete renewal goes through.
    replace_file(cert_b, cert)
    replace_file(key_b, key)
    proc = reload_credentials(conf)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("cloud: changed: credentials changed (tls.cert, tls.key)")
    h.wait_for(lambda: "u'gw-b'" in broker.log_text(), what="a connection with CN gw-b")

    # Errors: an unknown uplink.
    proc = reload_credentials(conf, "nope")
    assert proc.returncode == 1 and 'no uplink named "nope"' in proc.stderr, proc.stderr


def test_changed_jwt_key_resigns_and_reconnects(hx):
    key1 = fakecloud.Key.generate("ES256", hx.dir, name="k1")
    key2 = fakecloud.Key.generate("ES256", hx.dir, name="k2")
    cloud = fakecloud.start(hx, keys=[key1, key2], aud=AUD, skew=5)
    auth_key = os.path.join(hx.dir, "auth.key")
    replace_file(key1.private_path, auth_key)
    conf = hx.config(cloud, uplink={"auth": {"type": "jwt", "key": auth_key, "aud": AUD,
                                             "clock_check": "build-date"}})
    daemon = hx.uplinkd(conf)
    first = cloud.wait_event("connect", client_id="gw-test", result="accepted")
    assert first["key"] == key1.public_path

    # The same key re-written (another PEM encoding of it) is no change.
    with open(auth_key + ".new", "wb") as f:
        f.write(key1.private_key.private_bytes(
            fakecloud.serialization.Encoding.PEM,
            fakecloud.serialization.PrivateFormat.TraditionalOpenSSL,
            fakecloud.serialization.NoEncryption()))
    os.rename(auth_key + ".new", auth_key)
    proc = reload_credentials(conf)
    assert proc.returncode == 0 and "credentials unchanged" in proc.stdout, proc.stdout

    # A new key: checked (it signs as ES256), then a new token and a new session with it.
    replace_file(key2.private_path, auth_key)
    proc = reload_credentials(conf, "cloud")
    assert proc.returncode == 0, proc.stdout
    assert "credentials changed (auth.key)" in proc.stdout, proc.stdout
    second = cloud.wait_event("connect", client_id="gw-test", result="accepted", since=1)
    assert second["key"] == key2.public_path, second
    assert cloud.events("connect", client_id="gw-test", result="refused") == []

    # A key that cannot sign with the uplink's alg (ES256) is refused; the session stays.
    rsa = fakecloud.Key.generate("RS256", hx.dir, name="rsa")
    replace_file(rsa.private_path, auth_key)
    proc = reload_credentials(conf)
    assert proc.returncode == 1, proc.stdout
    assert "new auth.key refused" in proc.stdout and "ES256" in proc.stdout, proc.stdout
    # Tokens keep coming from the accepted key 2 (uplinkctl jwt asks the daemon).
    proc = h.uplinkctl(conf["control"]["socket"], "jwt", "cloud", json_output=False)
    assert proc.returncode == 0, proc.stderr
    decoded = fakecloud.jwt.decode(proc.stdout.strip(), key2.private_key.public_key(),
                                   algorithms=["ES256"], audience=AUD)
    assert decoded["aud"] == AUD
    assert len(cloud.events("connect", client_id="gw-test", result="accepted")) == 2

    # SIGHUP with the key file changed (key 1 back) reconnects too (conf reload loads the key).
    replace_file(key1.private_path, auth_key)
    daemon.reload()
    third = cloud.wait_event("connect", client_id="gw-test", result="accepted", since=2)
    assert third["key"] == key1.public_path, third


def with_tls(conf, **tls):
    """A copy of `conf` whose uplink has these tls settings changed."""
    changed = copy.deepcopy(conf)
    changed["uplinks"][0]["tls"].update(tls)
    return changed


def assert_reload_refused(hx, daemon, conf, since, notify_since, connects, broker, cn):
    """The last SIGHUP was refused; the old session is untouched; returns the status JSON."""
    daemon.wait_log(r"reload failed; still running with the previous configuration: the "
                    r"credential check failed for uplink\(s\) cloud", since=since)
    doc = json.loads(h.uplinkctl(conf["control"]["socket"], "status").stdout)
    assert doc["last_reload"]["result"] == "refused", doc["last_reload"]
    assert "cloud" in doc["last_reload"]["error"], doc["last_reload"]
    h.wait_for(lambda: hx.notify.find("READY=1", notify_since) is not None, what="READY=1")
    h.wait_for(lambda: any("last reload refused" in f for _, f in hx.notify.fields(notify_since)
                           if f.startswith("STATUS=")), what="STATUS= saying the reload failed")
    up = uplink(conf)
    assert up["state"] == "ONLINE" and up["connects"] == connects, up
    assert "u'%s'" % cn not in broker.log_text()
    assert daemon.running()
    return doc


def test_sighup_changed_cert_path_is_checked_before_it_is_applied(hx):
    broker, daemon, conf, cert, key = start_with_cert(hx)
    connects = uplink(conf)["connects"]

    # tls.cert now names another file, whose certificate's key is not tls.key.
    cert_b, key_b = diag.write_client_cert(hx, "b", diag.utc(-1), diag.utc(60), cn="gw-b")
    new_cert = os.path.join(hx.dir, "device-b.pem")
    replace_file(cert_b, new_cert)
    h.write_config(daemon.conf_path, with_tls(conf, cert=new_cert))
    since, notify_since = daemon.log_size(), hx.notify.count()
    daemon.reload()
    # One line naming the uplink, the file, what is wrong and the fix.
    daemon.wait_log(r"uplink cloud: reload refused: \S+:\d+:\d+: key file %s: the private key .* does not "
                    r"belong to certificate %s .*the key and cert settings name files from "
                    r"different pairs" % (re.escape(key), re.escape(new_cert)), since=since)
    assert_reload_refused(hx, daemon, conf, since, notify_since, connects, broker, "gw-b")
    assert daemon.find_log(r"reload done|reconnecting", since=since) is None
    table = h.uplinkctl(conf["control"]["socket"], "status", json_output=False).stdout
    assert "last reload refused, still running the previous configuration: " in table, table

    # The key that goes with it arrives: the same SIGHUP now applies the new section.
    replace_file(key_b, key)
    since, notify_since = daemon.log_size(), hx.notify.count()
    daemon.reload()
    daemon.wait_log(r"reload done", since=since)
    h.wait_for(lambda: "u'gw-b'" in broker.log_text(), what="a connection with CN gw-b")
    h.wait_for(lambda: uplink(conf)["state"] == "ONLINE" and uplink(conf)["connects"] > connects,
               what=lambda: "reconnected: %s" % uplink(conf))
    doc = json.loads(h.uplinkctl(conf["control"]["socket"], "status").stdout)
    assert doc["last_reload"] == {"result": "done", "error": ""}, doc["last_reload"]


def test_sighup_expired_new_cert_is_refused(hx):
    broker, daemon, conf, cert, key = start_with_cert(hx)
    connects = uplink(conf)["connects"]

    old_cert, old_key = diag.write_client_cert(hx, "old", diag.utc(-30), diag.utc(-1), cn="gw-c")
    changed = with_tls(conf, cert=old_cert, key=old_key)
    h.write_config(daemon.conf_path, changed)
    since, notify_since = daemon.log_size(), hx.notify.count()
    daemon.reload()
    daemon.wait_log(r"uplink cloud: reload refused: \S+:\d+:\d+: certificate %s expired on .*install a "
                    r"renewed certificate" % re.escape(old_cert), since=since)
    assert_reload_refused(hx, daemon, conf, since, notify_since, connects, broker, "gw-c")

    # --check-config runs the same check on the same file.
    proc = h.subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", daemon.conf_path],
                            stdin=h.subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=h.TIMEOUT)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "certificate %s expired on" % old_cert in proc.stderr, proc.stderr
