"""One PKCS#11 key (softhsm2) for both JWT signing and mutual TLS, against a real mosquitto.

The key is generated inside a softhsm2 token in the test's temp dir (SOFTHSM2_CONF) and never
leaves it: only its public key is read out, to issue the client certificate (signed by the test
CA with Python's cryptography) and to give the fake cloud's JWT plugin the key it verifies with.

The cloud is the fake JWT cloud (fakecloud.py) with client certificates required on its TLS
listeners, plus one more TLS listener that takes the certificate's CN as the username
(use_identity_as_username; mosquitto then skips the password check, so that listener shows the
identity and the other one the token). uplinkd has two uplinks with the same token key:
  - "jwt": auth.type jwt, auth.key and tls.key the same pkcs11: URI; the PIN from
    auth.passphrase_file, which a pkcs11: tls.key shares (docs/configuration.md, tls.key).
  - "x509": no auth, tls.key the URI with pin-source=file:... (a PIN file with a newline).
Needs softhsm2, opensc (pkcs11-tool) and libengine-pkcs11-openssl; skipped when missing.
"""

import datetime
import os
import re
import subprocess

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import fakecloud
import harness as h

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOOLS = [SOFTHSM_MODULE, "/usr/bin/softhsm2-util", "/usr/bin/pkcs11-tool",
         "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"]
PIN = "1234"
URI = "pkcs11:token=gw;object=gwkey;type=private"
DEVICE_CN = "gw-pkcs11-device"
AUD = "test-project"


class SoftHsm:
    """A softhsm2 token "gw" (user PIN 1234) in `directory` with one EC P-256 key pair "gwkey".

    env: the environment that makes softhsm2 use this token directory (pass it to uplinkd);
    public_key: the key pair's public half (cryptography), read out of the token;
    public_path: it as a PEM file; pin_path: the PIN and a newline, as an editor writes it.
    """

    def __init__(self, directory):
        missing = [t for t in TOOLS if not os.path.exists(t)]
        if missing:
            pytest.skip("not installed: %s (apt-get install softhsm2 opensc "
                        "libengine-pkcs11-openssl)" % ", ".join(missing))
        self.dir = os.path.join(directory, "softhsm")
        os.makedirs(os.path.join(self.dir, "tokens"))
        conf = os.path.join(self.dir, "softhsm2.conf")
        with open(conf, "w") as f:
            f.write("directories.tokendir = %s\nobjectstore.backend = file\n"
                    % os.path.join(self.dir, "tokens"))
        self.env = {"SOFTHSM2_CONF": conf}
        self.run("softhsm2-util", "--init-token", "--free", "--label", "gw", "--pin", PIN,
                 "--so-pin", "5678")
        self.run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw", "--login",
                 "--pin", PIN, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "gwkey",
                 "--id", "01")
        der = os.path.join(self.dir, "pub.der")
        self.run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw",
                 "--read-object", "--type", "pubkey", "--label", "gwkey", "--output-file", der)
        with open(der, "rb") as f:
            self.public_key = serialization.load_der_public_key(f.read())
        self.public_path = os.path.join(self.dir, "gwkey.pub.pem")
        with open(self.public_path, "wb") as f:
            f.write(self.public_key.public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
        self.pin_path = os.path.join(self.dir, "pin")
        with open(self.pin_path, "w") as f:
            f.write(PIN + "\n")
        os.chmod(self.pin_path, 0o600)

    def run(self, *cmd):
        r = subprocess.run(list(cmd), env=dict(os.environ, **self.env), capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
        assert r.returncode == 0, "%s: %s%s" % (cmd, r.stdout, r.stderr)
        return r

    def issue_cert(self, pki, cn=DEVICE_CN):
        """A client certificate for the token's public key, signed by the test CA; its path."""
        with open(pki.path("ca.key"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(pki.ca, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_cert.subject)
                .public_key(self.public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        path = os.path.join(self.dir, "client.pem")
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        return path


class MtlsFakeCloud(fakecloud.FakeCloud):
    """The fake JWT cloud, its TLS listeners requiring a client certificate issued by the test
    CA, plus a TLS listener on `identity_port` that uses the certificate's CN as the username."""

    def __init__(self, workdir, pki, keys, aud, **kwargs):
        # Broker.__init__ writes the config: set what _write_conf needs first.
        self.identity_port = h.free_port(h.loopback_addresses())
        super().__init__(workdir, pki, keys, aud, **kwargs)

    def _write_conf(self):
        super()._write_conf()
        with open(self.conf_path) as f:
            lines = f.read().splitlines()
        client_auth = ["cafile %s" % self.pki.ca, "require_certificate true"]
        out = []
        for line in lines:
            out.append(line)
            if line.startswith("keyfile "):  # the end of each TLS listener block
                out += client_auth
        for addr in self.addresses:
            out += ["listener %d %s" % (self.identity_port, addr),
                    "certfile %s" % self.pki.path(self.cert + ".pem"),
                    "keyfile %s" % self.pki.path(self.cert + ".key")]
            out += client_auth + ["use_identity_as_username true"]
        with open(self.conf_path, "w") as f:
            f.write("\n".join(out) + "\n")


def start_cloud(hx, token):
    cloud = MtlsFakeCloud(hx.dir, hx.pki, keys=[token.public_path], aud=AUD, skew=5)
    hx._brokers.append(cloud)  # as fakecloud.start(): stopped and reported by the fixture
    return cloud.start()


def test_one_token_key_for_jwt_and_mtls(hx):
    token = SoftHsm(hx.dir)
    cert = token.issue_cert(hx.pki)
    cloud = start_cloud(hx, token)
    observer = hx.cloud_client(cloud)
    observer.subscribe("#", qos=1)

    conf = hx.config(cloud, uplink={
        "name": "jwt",
        "tls": {"ca": hx.pki.ca, "cert": cert, "key": URI},
        "auth": {"type": "jwt", "key": URI, "passphrase_file": token.pin_path,
                 "pkcs11_module": SOFTHSM_MODULE, "aud": AUD, "clock_check": "build-date"},
        "generic": {"topic_prefix": "gw-jwt"},
    })
    conf["uplinks"].append({
        "name": "x509", "host": "localhost", "port": cloud.identity_port,
        "client_id": "gw-x509", "reconnect": {"base": "100ms", "cap": "1s"},
        # No module of its own: it shares the one auth.pkcs11_module loaded.
        "tls": {"ca": hx.pki.ca, "cert": cert,
                "key": URI + ";pin-source=file:" + token.pin_path},
        "generic": {"topic_prefix": "gw-x509"},
    })
    # --check-config opens the token key for both and checks it against the certificate.
    conf_path = hx.write_config(conf, "check.yaml")
    r = subprocess.run([h.UPLINKD_BIN, "-c", conf_path, "--check-config"],
                       env=dict(os.environ, **token.env), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
    assert r.returncode == 0, r.stderr
    # uplinkctl diagnose makes its own TLS connection with the same key (and its own JWT).
    for uplink in ("jwt", "x509"):
        r = subprocess.run([h.UPLINKCTL_BIN, "diagnose", "-c", conf_path, "--timeout", "5",
                            "--client-id", "diag-" + uplink, uplink],
                           env=dict(os.environ, **token.env), capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "subject: CN=%s" % DEVICE_CN in r.stdout, r.stdout
    daemon = hx.uplinkd(conf, env=token.env)

    # The JWT listener required the client certificate (or there would be no CONNECT), and the
    # plugin verified the token with the public key read out of the token.
    line = cloud.wait_event("connect", client_id="gw-test", result="accepted")
    assert line["alg"] == "ES256" and line["key"] == token.public_path, line
    # The identity listener saw the certificate's CN as the user name.
    h.wait_for(lambda: re.search(r"New client connected from \S+ as gw-x509 \(.*u'%s'\)"
                                 % DEVICE_CN, cloud.log_text()),
               what=lambda: "gw-x509 with identity %s; broker log:\n%s"
               % (DEVICE_CN, cloud.log_tail()))

    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", "1",
                    "-t", "dev/sensor/telemetry", "-m", "via-token")
    observer.wait("gw-jwt/sensor/telemetry", "via-token")
    observer.wait("gw-x509/sensor/telemetry", "via-token")
    assert daemon.find_log(r"uplinkd\[\d+\]: error:") is None, daemon.log_tail()

    # A token from the same key, verified by python3-jwt with the exported public key.
    r = subprocess.run([h.UPLINKCTL_BIN, "jwt", "--key", URI + ";pin-source=file:" + token.pin_path,
                        "--pkcs11-module", SOFTHSM_MODULE, "--aud", AUD],
                       env=dict(os.environ, **token.env), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), token.public_key, algorithms=["ES256"], audience=AUD)
    assert claims["aud"] == AUD


def check_config(hx, token, tls_key, env=None):
    """uplinkd --check-config on an x509-only uplink with `tls_key`; (returncode, stderr)."""
    cert = token.issue_cert(hx.pki)
    conf = hx.config(None, port=8883, uplink={"tls": {"ca": hx.pki.ca, "cert": cert,
                                                      "key": tls_key}})
    conf_path = hx.write_config(conf)
    r = subprocess.run([h.UPLINKD_BIN, "-c", conf_path, "--check-config"],
                       env=dict(os.environ, **token.env, **(env or {})), capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
    return r.returncode, r.stderr


@pytest.mark.parametrize("uri", [URI + ";pin-value=9999", URI.replace("gwkey", "nokey")
                                 + ";pin-value=" + PIN])
def test_wrong_pin_or_object_is_explained(hx, uri):
    token = SoftHsm(hx.dir)
    rc, err = check_config(hx, token, uri)
    assert rc == 1, err
    shown = uri.replace("pin-value=9999", "pin-value=***").replace("pin-value=" + PIN,
                                                                   "pin-value=***")
    # One line: the URI (PIN hidden), the likely causes and how to look.
    line = next((l for l in err.splitlines() if "no private key at " + shown in l), None)
    assert line is not None, err
    assert "the PIN may be wrong, or no object matches" in line
    assert "pkcs11-tool --list-objects --login" in line
    assert "9999" not in err and "pin-value=" + PIN not in err


def test_pin_source_file_unreadable_and_engine_missing(hx):
    token = SoftHsm(hx.dir)
    missing = os.path.join(hx.dir, "no-such-pin")
    rc, err = check_config(hx, token, URI + ";pin-source=file:" + missing)
    assert rc == 1 and "passphrase file %s: No such file" % missing in err, err
    # OPENSSL_ENGINES pointing nowhere: as if libengine-pkcs11-openssl were not installed.
    rc, err = check_config(hx, token, URI, env={"OPENSSL_ENGINES": hx.dir})
    assert rc == 1, err
    assert re.search(r"uplinks\[0\]\.tls\.key: pkcs11: keys need the OpenSSL PKCS#11 engine.*"
                     r"apt-get install libengine-pkcs11-openssl", err), err
