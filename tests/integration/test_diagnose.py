"""`uplinkctl diagnose UPLINK` against real brokers, and the start-up client
certificate checks (tlscheck.c) in uplinkd.

Each test builds the broken setup a user meets in the field and checks that
diagnose names the failing step (its exit code and the "STEP: FAILED" line)
and says why in words. The SNI case uses a real SNI-routing front, haproxy
with `req.ssl_sni` (Debian: apt-get install haproxy), as managed brokers
such as HiveMQ Cloud run one.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fakecloud
import harness as h

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

EXIT_OK, EXIT_USAGE, EXIT_DNS, EXIT_TCP, EXIT_TLS, EXIT_MQTT = 0, 2, 10, 11, 12, 13


def diagnose(hx, conf, *args, name="diagnose.yaml"):
    """Write `conf`, run uplinkctl diagnose on it; returns (exit code, stdout)."""
    path = hx.write_config(conf, name)
    proc = subprocess.run([h.UPLINKCTL_BIN, "diagnose", "-c", path, "--timeout", "5"]
                          + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=h.TIMEOUT + 30)
    return proc.returncode, proc.stdout + proc.stderr


def line(out, pattern):
    """The first output line matching regex `pattern` (asserting there is one)."""
    for text in out.splitlines():
        if re.search(pattern, text):
            return text
    raise AssertionError("no line /%s/ in diagnose output:\n%s" % (pattern, out))


def assert_ok_until(out, steps):
    for step in steps:
        line(out, r"^%s: OK" % step)


# --------------------------------------------------------------------------
# Helpers: an SNI-routing front, brokers that want client certificates,
# certificates with chosen dates
# --------------------------------------------------------------------------

class HaproxySniFront:
    """haproxy in TCP mode routing TLS by the ClientHello's SNI (no TLS
    termination): the name "localhost" goes to `backend_port`, anything
    else, or no SNI at all, is closed right after the ClientHello, as
    managed brokers' fronts do."""

    def __init__(self, hx, backend_port):
        self.port = h.free_port(("127.0.0.1",))
        self.conf_path = os.path.join(hx.dir, "haproxy.cfg")
        self.log_path = os.path.join(hx.dir, "haproxy.log")
        with open(self.conf_path, "w") as f:
            f.write("\n".join([
                "global",
                "    maxconn 100",
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 30s",
                "    timeout server 30s",
                "frontend sni_only",
                "    bind 127.0.0.1:%d" % self.port,
                "    tcp-request inspect-delay 5s",
                "    tcp-request content accept if { req_ssl_hello_type 1 }",
                "    use_backend cloud if { req.ssl_sni -i localhost }",
                "backend cloud",
                "    server broker 127.0.0.1:%d" % backend_port,
                ""]))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.conf_path],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        hx.add_closer(self.close)

        def accepting():
            if self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise h.HarnessError("haproxy exited (%s): %s"
                                         % (self.proc.returncode, f.read()))
            return h.tcp_accepts("127.0.0.1", self.port)

        h.wait_for(accepting, what="haproxy on port %d" % self.port)

    def close(self):
        h.terminate(self.proc)


def mtls_broker(hx, name="mtls"):
    """A broker whose TLS listeners require a client certificate from the test CA."""
    return hx.broker(name=name, client_cert=True)


def write_client_cert(hx, name, not_before, not_after, cn="gw-test"):
    """A client certificate signed by the test CA with the given validity,
    written as NAME.pem (leaf followed by the CA: the whole chain) and
    NAME.key. Returns (cert path, key path)."""
    with open(hx.pki.path("ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(hx.pki.ca, "rb") as f:
        ca_pem = f.read()
    ca = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "uplinkd test"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path = os.path.join(hx.dir, name + ".pem")
    key_path = os.path.join(hx.dir, name + ".key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def utc(days):
    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)) \
        .replace(microsecond=0)


# --------------------------------------------------------------------------
# Every step OK
# --------------------------------------------------------------------------

def test_all_steps_ok(hx):
    broker = hx.broker()
    rc, out = diagnose(hx, hx.config(broker), "cloud")
    assert rc == EXIT_OK, out
    assert_ok_until(out, ["DNS", "TCP", "TLS", "MQTT", "CONNACK"])
    # The server chain, SNI and ALPN are shown.
    line(out, r"SNI sent: localhost$")
    line(out, r"ALPN offered: none")
    line(out, r"0 subject: .*CN=localhost")
    line(out, r"issuer: .*CN=uplinkd test CA")
    line(out, r"valid: +\d{4}-\d\d-\d\d .* to \d{4}-\d\d-\d\d")
    line(out, r"^result: OK")
    assert "as gw-test" in broker.log_text()  # a real CONNECT reached the broker


def test_mutual_tls_chain_ok(hx):
    broker = mtls_broker(hx)
    cert, key = write_client_cert(hx, "device", utc(-1), utc(60))
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": key}})
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_OK, out
    line(out, r"client certificate: .*device\.pem \(2 certificates in the file\)")
    line(out, r"^CONNACK: OK")


def test_uplink_online_in_daemon_is_not_disturbed(hx):
    """With uplinkd online, a CONNECT with its client id would take its
    session over (MQTT 3.1.1 §3.1.4-2): diagnose stops before CONNECT."""
    gw = hx.gateway()
    h.wait_for(lambda: (h.status_uplink_state(
        json.loads(h.uplinkctl(gw.control, "status").stdout or "{}"), "cloud") or "").lower()
        == "online", what="uplink cloud online in uplinkctl status")
    connects = gw.broker.log_text().count("as gw-test")
    rc, out = diagnose(hx, gw.conf, "cloud")
    assert rc == EXIT_OK, out
    line(out, r"^MQTT: SKIPPED: the running uplinkd .* online")
    assert gw.broker.log_text().count("as gw-test") == connects, "diagnose sent a CONNECT"
    # Another client id is harmless: the whole way through.
    rc, out = diagnose(hx, gw.conf, "--client-id", "gw-test-diag", "cloud")
    assert rc == EXIT_OK, out
    line(out, r"^CONNACK: OK")
    assert gw.daemon.running()


# --------------------------------------------------------------------------
# One failing step each
# --------------------------------------------------------------------------

def test_dns_failure(hx):
    conf = hx.config(None, port=8883, uplink={"host": "no-such-broker.invalid",
                                              "tls": {"ca": hx.pki.ca}})
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_DNS, out
    line(out, r"^DNS: FAILED: no-such-broker\.invalid does not resolve")
    line(out, r"fix: .*uplinks\[\]\.host")
    line(out, r"^result: FAILED at the DNS step \(exit 10\)")
    assert "TCP:" not in out


def test_tcp_refused(hx):
    port = h.free_port(("127.0.0.1",))
    conf = hx.config(None, port=port, uplink={"host": "127.0.0.1", "tls": {"ca": hx.pki.ca}})
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_TCP, out
    line(out, r"^DNS: OK")
    line(out, r"^TCP: FAILED")
    line(out, r"127\.0\.0\.1 port %d: connection refused" % port)
    line(out, r"fix: check uplinks\[\]\.port")


def test_wrong_ca(hx):
    broker = hx.broker()
    rc, out = diagnose(hx, hx.config(broker, uplink={"tls": {"ca": hx.pki.other_ca}}), "cloud")
    assert rc == EXIT_TLS, out
    assert_ok_until(out, ["DNS", "TCP"])
    text = line(out, r"^TLS: FAILED")
    assert "unknown CA" in text and "other-ca.pem" in text, out
    line(out, r"issued by: .*CN=uplinkd test CA")
    line(out, r"fix: set tls.ca")
    # The chain is still shown, so the user sees who issued it.
    line(out, r"0 subject: .*CN=localhost")
    assert "as gw-test" not in broker.log_text(), "credentials were sent after a failed verify"


def test_hostname_mismatch(hx):
    broker = hx.broker(cert="wronghost")
    rc, out = diagnose(hx, hx.config(broker), "cloud")
    assert rc == EXIT_TLS, out
    line(out, r"^TLS: FAILED: hostname mismatch: .*\"localhost\"")
    line(out, r"certificate is for: DNS:wrong-host\.invalid")


@pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                    reason="haproxy not installed (apt-get install haproxy)")
def test_missing_sni_on_sni_only_listener(hx):
    broker = hx.broker()
    front = HaproxySniFront(hx, broker.tls_port)
    # By name: SNI "localhost" is sent and routed; everything works.
    rc, out = diagnose(hx, hx.config(broker, port=front.port), "cloud")
    assert rc == EXIT_OK, out
    # By IP literal: no SNI (RFC 6066 §3), the front hangs up after ClientHello.
    conf = hx.config(broker, port=front.port, uplink={"host": "127.0.0.1"})
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_TLS, out
    line(out, r"SNI sent: none \(host is an IP address\)")
    line(out, r"^TLS: FAILED: the server closed the connection right after our ClientHello")
    line(out, r"fix: no SNI was sent .*need SNI.*host name")


def test_wrong_credentials(hx):
    broker = hx.broker(users={"gw": "right-password"})
    conf = hx.config(broker, uplink={"auth": {"type": "basic", "username": "gw",
                                              "password": "wrong-password"}})
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_MQTT, out
    assert_ok_until(out, ["DNS", "TCP", "TLS", "MQTT"])
    text = line(out, r"^CONNACK: FAILED: [45], ")
    assert "not authorised" in text or "bad user name or password" in text
    line(out, r"fix: check .*auth\.username")
    assert "wrong-password" not in out, "diagnose printed the password"
    line(out, r"^result: FAILED at the MQTT CONNECT/CONNACK step \(exit 13\)")


def test_client_certificate_required_but_missing(hx):
    """TLS 1.3: the server judges the client certificate after the client's
    handshake is done, so its alert arrives instead of the CONNACK."""
    broker = mtls_broker(hx)
    rc, out = diagnose(hx, hx.config(broker), "cloud")
    assert rc == EXIT_TLS, out
    line(out, r"client certificate: none configured")
    line(out, r"(certificate required|rejected the client certificate)")
    line(out, r"fix: the server requires a client certificate: set tls.cert and tls.key")


def test_expired_client_certificate(hx):
    broker = mtls_broker(hx)
    cert, key = write_client_cert(hx, "expired", utc(-40), utc(-3))
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": key}})
    until = utc(-3).strftime("%Y-%m-%d")
    since = utc(-40).strftime("%Y-%m-%d")

    # uplinkd refuses to start, naming the file and both dates.
    daemon = hx.uplinkd(conf, ready=False)
    daemon.expect_exit = 1
    assert daemon.proc.wait(h.TIMEOUT) == 1
    text = daemon.find_log(r"expired\.pem expired on")
    assert text is not None, daemon.log_tail()
    assert until in text and since in text, text

    # --check-config says the same.
    check = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", daemon.conf_path],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=h.TIMEOUT)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "expired.pem expired on %s" % until in check.stderr

    # diagnose names the TLS step and the dates.
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_TLS, out
    line(out, r"client certificate problem: .*expired\.pem expired on %s" % until)
    line(out, r"^TLS: FAILED: the client certificate has a problem")


def test_client_key_does_not_match(hx):
    broker = mtls_broker(hx)
    cert, _ = write_client_cert(hx, "device", utc(-1), utc(60))
    _, other_key = write_client_cert(hx, "other", utc(-1), utc(60))
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": other_key}})
    check = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", hx.write_config(conf)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=h.TIMEOUT)
    assert check.returncode == 1
    assert re.search(r"does not belong to certificate .*device\.pem", check.stderr), check.stderr


def test_certificate_expiring_soon_is_a_warning(hx):
    """Within 30 days: a warning at start, from the running uplink in the log, and in status."""
    broker = mtls_broker(hx)
    cert, key = write_client_cert(hx, "soon", utc(-30), utc(20))
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": key}})
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"warning: .*soon\.pem expires on %s" % utc(20).strftime("%Y-%m-%d"))
    daemon.wait_log(r"warning: uplink cloud: client certificate .*soon\.pem expires at %s"
                    r".* \(in (19|20) days\); renew it" % utc(20).strftime("%Y-%m-%d"))
    daemon.wait_log(r"state \w+ -> ONLINE")
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    up = status["uplinks"][0]
    assert abs(up["cert_expires_at"] - (time.time() + 20 * 86400)) < 120, up
    assert re.fullmatch(r"expires in (19|20) day\(s\): renew it", up["cert_warning"]), up
    text = h.uplinkctl(conf["control"]["socket"], "status", json_output=False).stdout
    assert "cloud: client certificate %s" % up["cert_warning"] in text, text
    rc, out = diagnose(hx, conf, "--client-id", "gw-diag", "cloud")
    assert rc == EXIT_OK, out
    line(out, r"warning: certificate .*soon\.pem expires on")


def test_certificate_expiry_in_status(hx):
    """Far from expiry: the date in status, and no warning anywhere."""
    broker = mtls_broker(hx)
    cert, key = write_client_cert(hx, "later", utc(-1), utc(60))
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.ca, "cert": cert, "key": key}})
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"state \w+ -> ONLINE")
    up = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)["uplinks"][0]
    assert abs(up["cert_expires_at"] - (time.time() + 60 * 86400)) < 120, up
    assert "cert_warning" not in up
    assert "expires" not in daemon.log_text()


# --------------------------------------------------------------------------
# JWT: the token is decoded, never its signature
# --------------------------------------------------------------------------

def jwt_conf(hx, cloud, key, aud):
    return hx.config(cloud, uplink={"auth": {"type": "jwt", "key": key.private_path,
                                             "alg": key.alg, "aud": aud,
                                             "clock_check": "build-date"}})


def test_jwt_token_shown_and_accepted(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key.public_path], aud="my-project")
    rc, out = diagnose(hx, jwt_conf(hx, cloud, key, "my-project"), "cloud")
    assert rc == EXIT_OK, out
    line(out, r'header: \{.*"alg":"ES256".*\}')
    line(out, r'claims: \{.*"aud":"my-project".*\}')
    line(out, r"exp: \d+ = \d{4}-")
    line(out, r"signature: 64 bytes \(not shown\)")
    # No token (three base64url parts) anywhere in the output.
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", out), out


def test_jwt_wrong_aud_explained(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key.public_path], aud="my-project")
    rc, out = diagnose(hx, jwt_conf(hx, cloud, key, "other-project"), "cloud")
    assert rc == EXIT_MQTT, out
    line(out, r"^CONNACK: FAILED: [45], ")
    line(out, r"fix: .*(token|JWT)")


# --------------------------------------------------------------------------
# Profiles: diagnose sends the CONNECT the daemon's profile sends
# --------------------------------------------------------------------------

GCP_PROJECT = "diag-project"
GCP_CLIENT_ID = "projects/%s/locations/europe-west1/registries/reg-1/devices/gw-test" \
    % GCP_PROJECT


def gcp_conf(hx, cloud, key, project=GCP_PROJECT):
    conf = hx.config(cloud, uplink={
        "profile": "gcp",
        "auth": {"type": "jwt", "key": key.private_path, "clock_check": "build-date"},
        "gcp": {"project": project, "region": "europe-west1", "registry": "reg-1"}})
    del conf["uplinks"][0]["generic"]
    return conf


def test_gcp_uses_the_profile_client_id_and_token(hx):
    """No client_id and no aud are configured: both come from the gcp profile."""
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key.public_path], aud=GCP_PROJECT)
    rc, out = diagnose(hx, gcp_conf(hx, cloud, key), "cloud")
    assert rc == EXIT_OK, out
    line(out, r"client id: %s \(profile gcp\)$" % re.escape(GCP_CLIENT_ID))
    line(out, r"user name: unused, password: a JWT")
    line(out, r'claims: \{.*"aud":"%s".*\}' % GCP_PROJECT)
    line(out, r"^CONNACK: OK: 0")
    # The fake cloud saw exactly that CONNECT and accepted the token.
    event = cloud.wait_event("connect", client_id=GCP_CLIENT_ID, result="accepted")
    assert event["username"] == "unused" and event["claims"]["aud"] == GCP_PROJECT


def test_gcp_wrong_project_is_explained(hx):
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key.public_path], aud=GCP_PROJECT)
    rc, out = diagnose(hx, gcp_conf(hx, cloud, key, project="other-project"), "cloud")
    assert rc == EXIT_MQTT, out
    assert_ok_until(out, ["DNS", "TCP", "TLS", "MQTT"])
    line(out, r"client id: projects/other-project/locations/.*/devices/gw-test \(profile gcp\)")
    line(out, r"^CONNACK: FAILED: [45], ")
    line(out, r'GCP \(Google Cloud IoT Core / ClearBlade\): .*aud must be the project id '
              r'\(it is "other-project"; gcp.project is "other-project"\)')
    line(out, r"^result: FAILED at the MQTT CONNECT/CONNACK step \(exit 13\)")
    cloud.wait_event("connect", result="refused", reason="wrong aud")


def test_cumulocity_uses_device_client_id_and_tenant_user(hx):
    broker = hx.broker(users={"t100/gwuser": "gw-secret-pw"})
    conf = hx.config(broker, uplink={
        "profile": "cumulocity",
        "auth": {"type": "basic", "username": "gwuser", "password": "gw-secret-pw"},
        "cumulocity": {"device_id": "gw-test", "tenant": "t100"}})
    del conf["uplinks"][0]["generic"]
    rc, out = diagnose(hx, conf, "cloud")
    assert rc == EXIT_OK, out
    line(out, r"client id: d:gw-test(:\S+)? \(profile cumulocity\)$")
    line(out, r"user name: t100/gwuser \(profile cumulocity\), password: \(set, not shown\)")
    line(out, r"clean session 1")
    assert "gw-secret-pw" not in out
    h.wait_for(lambda: [l for l in broker.log_text().splitlines()
                        if "New client connected" in l and "d:gw-test" in l
                        and "u't100/gwuser'" in l],
               what="diagnose's CONNECT as d:gw-test, user t100/gwuser, in the broker log")


def test_usage_errors(hx):
    broker = hx.broker(start=False)
    rc, out = diagnose(hx, hx.config(broker), "no-such-uplink")
    assert rc == EXIT_USAGE
    assert 'no uplink named "no-such-uplink"' in out and "cloud" in out
    path = os.path.join(hx.dir, "missing.yaml")
    proc = subprocess.run([h.UPLINKCTL_BIN, "diagnose", "-c", path, "cloud"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=h.TIMEOUT)
    assert proc.returncode == EXIT_USAGE
