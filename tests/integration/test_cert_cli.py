"""uplinkctl cert create / show: a device key and certificate (or CSR) and their thumbprints.

Checked with Python's cryptography, independently of uplinkd's OpenSSL code: the subject,
the self-signature, that the key belongs to the certificate, the thumbprints `show` prints,
and the CSR's signature.
"""

import os
import re
import stat
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import harness as h


def cert(*args):
    return subprocess.run([h.UPLINKCTL_BIN, "cert", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)


def test_create_and_show(tmp_path):
    out = cert("create", "--cn", "dev-1", "--out", str(tmp_path), "--days", "20")
    assert out.returncode == 0, out.stderr
    key_path, pem_path = tmp_path / "dev-1.key", tmp_path / "dev-1.pem"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    c = x509.load_pem_x509_certificate(pem_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP256R1)
    assert c.subject.rfc4514_string() == "CN=dev-1" == c.issuer.rfc4514_string()
    assert c.public_key().public_numbers() == key.public_key().public_numbers()
    c.public_key().verify(c.signature, c.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    days = (c.not_valid_after - c.not_valid_before).days
    assert days == 20, days
    assert c.serial_number > 0

    shown = cert("show", str(pem_path))
    assert shown.returncode == 0, shown.stderr
    assert out.stdout.endswith(shown.stdout)  # create shows what it made
    sha1 = c.fingerprint(hashes.SHA1()).hex().upper()
    assert re.search(r"^sha1 +%s$" % sha1, shown.stdout, re.M), shown.stdout
    assert re.search(r"^sha256 +%s$" % c.fingerprint(hashes.SHA256()).hex().upper(),
                     shown.stdout, re.M)
    assert re.search(r"^days left +(19|20) \(renew it soon\)$", shown.stdout, re.M), shown.stdout
    assert "primary thumbprint %s" % sha1 in shown.stdout

    # Existing files are kept without --force.
    before = key_path.read_bytes()
    again = cert("create", "--cn", "dev-1", "--out", str(tmp_path))
    assert again.returncode == 1
    assert "dev-1.key: File exists (kept; --force replaces it)" in again.stderr
    assert key_path.read_bytes() == before


def test_csr(tmp_path):
    out = cert("create", "--cn", "thing-7", "--out", str(tmp_path), "--csr")
    assert out.returncode == 0, out.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "thing-7.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=thing-7"
    key = serialization.load_pem_private_key((tmp_path / "thing-7.key").read_bytes(), None)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    assert not (tmp_path / "thing-7.pem").exists()


def test_bad_input(tmp_path):
    assert cert("create", "--cn", "a/b", "--out", str(tmp_path)).returncode == 2
    assert cert("create", "--cn", "a", "--out", str(tmp_path), "--days", "0").returncode == 2
    assert cert("create", "--out", str(tmp_path)).returncode == 2
    missing = cert("create", "--cn", "x", "--out", str(tmp_path / "nonesuch"))
    assert missing.returncode == 1 and "No such file or directory" in missing.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    shown = cert("show", str(tmp_path / "junk.pem"))
    assert shown.returncode == 1 and "holds no PEM certificate" in shown.stderr
    assert os.listdir(tmp_path) == ["junk.pem"]
