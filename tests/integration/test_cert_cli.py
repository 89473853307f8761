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


def test_create_with_a_key_made_in_a_pkcs11_token(tmp_path):
    """--key pkcs11:...: the key pair is generated inside a softhsm2 token (never extractable)
    and the certificate signed there; its public key, read out of the token with pkcs11-tool,
    is the certificate's. A second run uses the key the token already holds; a wrong PIN is
    refused in words."""
    from test_pkcs11 import PIN, SOFTHSM_MODULE, SoftHsm
    token = SoftHsm(str(tmp_path))
    env = dict(os.environ, **token.env)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    uri = "pkcs11:token=gw;object=dev-1-key"

    def run(*args):
        return subprocess.run([h.UPLINKCTL_BIN, "cert", "create", "--cn", "dev-1", "--out",
                               str(out_dir), *args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)

    made = run("--key", uri, "--pin-file", token.pin_path)
    assert made.returncode == 0, made.stderr
    assert "generated in the token" in made.stdout, made.stdout
    assert not (out_dir / "dev-1.key").exists()  # nothing of the key outside the token
    listing = token.run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw",
                        "--login", "--pin", PIN, "--list-objects").stdout
    private = listing[listing.index("Private Key Object"):]
    assert "label:      dev-1-key" in private and "never extractable" in private, listing
    der = tmp_path / "dev-1.pub.der"
    token.run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw", "--read-object",
              "--type", "pubkey", "--label", "dev-1-key", "--output-file", str(der))
    public = serialization.load_der_public_key(der.read_bytes())
    c = x509.load_pem_x509_certificate((out_dir / "dev-1.pem").read_bytes())
    assert c.public_key().public_numbers() == public.public_numbers()
    c.public_key().verify(c.signature, c.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert c.subject.rfc4514_string() == "CN=dev-1"

    # Again, for a CSR, through an explicit module: the same key, not a new one.
    again = run("--key", uri, "--pin-file", token.pin_path, "--module", SOFTHSM_MODULE, "--csr")
    assert again.returncode == 0, again.stderr
    assert "already in the token, used as it is" in again.stdout, again.stdout
    csr = x509.load_pem_x509_csr((out_dir / "dev-1.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == public.public_numbers()

    wrong = tmp_path / "wrong.pin"
    wrong.write_text("9999\n")
    refused = run("--key", "pkcs11:token=gw;object=other", "--pin-file", str(wrong), "--force")
    assert refused.returncode == 1
    assert "the token refused the user PIN" in refused.stderr, refused.stderr
    bad = run("--key", "/etc/key.pem")
    assert bad.returncode == 2 and "is not a pkcs11: URI" in bad.stderr, bad.stderr
