"""`uplinkctl jwt` and `uplinkctl keygen`, cross-checked with python3-jwt.

PyJWT (with python3-cryptography) is an implementation independent of
uplinkd's jwt.c: a token it accepts has the right base64url, header, claims
and signature encoding (raw R||S for ECDSA, RFC 7518 §3.4). Keys are made
here with cryptography, never by the code under test (except in the keygen
tests, whose output is checked the same way).
"""

import base64
import hashlib
import json
import os
import stat
import subprocess
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import harness as h

ALGS = ["RS256", "PS256", "ES256", "ES384"]


@pytest.fixture(autouse=True)
def _require_uplinkctl():
    if not os.access(h.UPLINKCTL_BIN, os.X_OK):
        pytest.fail("uplinkctl not found at %s (build it, or set UPLINKCTL_BIN)" % h.UPLINKCTL_BIN)


def uplinkctl(*args):
    return subprocess.run([h.UPLINKCTL_BIN] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=h.TIMEOUT)


def make_key(alg, bits=2048):
    if alg.startswith("ES"):
        return ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(path, key, fmt=serialization.PrivateFormat.PKCS8, password=None):
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, fmt, enc))
    return str(path)


def fingerprint(public_key):
    """What `openssl pkey -pubin -outform DER | sha256sum` prints."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def b64url_decode(text):
    assert "=" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("fmt", ["pkcs8", "traditional"])
def test_jwt_verifies_with_pyjwt(tmp_path, alg, fmt):
    key = make_key(alg)
    path = write_key(tmp_path / "key.pem", key,
                     serialization.PrivateFormat.PKCS8 if fmt == "pkcs8"
                     else serialization.PrivateFormat.TraditionalOpenSSL)
    before = int(time.time())
    r = uplinkctl("jwt", "--key", path, "--alg", alg, "--aud", "my-project",
                  "--lifetime", "60m", "--kid", "auto", "--claim", "sub=gw-0001")
    after = int(time.time())
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert "\n" not in token

    # RFC 7515 §2: base64url without padding, in all three parts.
    assert "=" not in token
    header_b64, claims_b64, sig_b64 = token.split(".")
    header = json.loads(b64url_decode(header_b64))
    assert header == {"alg": alg, "typ": "JWT", "kid": fingerprint(key.public_key())}
    sig = b64url_decode(sig_b64)
    if alg.startswith("ES"):
        assert len(sig) == (64 if alg == "ES256" else 96)  # raw R||S, never DER
    else:
        assert len(sig) == 256

    claims = jwt.decode(token, key.public_key(), algorithms=[alg], audience="my-project",
                        options={"require": ["iat", "exp", "aud"]})
    assert claims["sub"] == "gw-0001"
    assert claims["aud"] == "my-project"
    # iat back-dated by the default 60 s skew; exp = now + 60 min.
    assert before - 60 <= claims["iat"] <= after - 60
    assert before + 3600 <= claims["exp"] <= after + 3600


def test_jwt_wrong_key_or_alg_rejected_by_pyjwt(tmp_path):
    """The cross-check has teeth: PyJWT refuses a token for another key/alg."""
    key = make_key("ES256")
    other = make_key("ES256")
    path = write_key(tmp_path / "key.pem", key)
    r = uplinkctl("jwt", "--key", path, "--aud", "p")  # alg from the key: ES256
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "JWT"}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, other.public_key(), algorithms=["ES256"], audience="p")
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="q")


def test_jwt_configured_kid_and_lifetime(tmp_path):
    key = make_key("ES384")
    path = write_key(tmp_path / "key.pem", key)
    r = uplinkctl("jwt", "--key", path, "--alg", "ES384", "--aud", "p", "--lifetime", "2m",
                  "--skew", "0", "--kid", "device-key-7", "-v")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert jwt.get_unverified_header(token)["kid"] == "device-key-7"
    claims = jwt.decode(token, key.public_key(), algorithms=["ES384"], audience="p")
    assert claims["exp"] - claims["iat"] == 120
    assert "exp: %d" % claims["exp"] in r.stderr


def test_jwt_encrypted_key(tmp_path):
    key = make_key("RS256")
    path = write_key(tmp_path / "key.pem", key, password=b"correct horse")
    pass_file = tmp_path / "pass"
    pass_file.write_text("correct horse\n")
    r = uplinkctl("jwt", "--key", path, "--alg", "PS256", "--aud", "p",
                  "--passphrase-file", pass_file)
    assert r.returncode == 0, r.stderr
    jwt.decode(r.stdout.strip(), key.public_key(), algorithms=["PS256"], audience="p")

    r = uplinkctl("jwt", "--key", path, "--alg", "PS256", "--aud", "p")
    assert r.returncode == 1
    assert "encrypted" in r.stderr and "passphrase_file" in r.stderr
    pass_file.write_text("wrong\n")
    r = uplinkctl("jwt", "--key", path, "--alg", "PS256", "--aud", "p",
                  "--passphrase-file", pass_file)
    assert r.returncode == 1
    assert "does not decrypt" in r.stderr


def test_jwt_refusals(tmp_path):
    small = write_key(tmp_path / "small.pem", make_key("RS256", bits=1024))
    r = uplinkctl("jwt", "--key", small, "--alg", "RS256", "--aud", "p")
    assert r.returncode == 1
    assert "1024 bits" in r.stderr and "2048" in r.stderr

    ec_key = write_key(tmp_path / "ec.pem", make_key("ES256"))
    r = uplinkctl("jwt", "--key", ec_key, "--alg", "ES384", "--aud", "p")
    assert r.returncode == 1 and "P-384" in r.stderr

    r = uplinkctl("jwt", "--key", ec_key, "--aud", "p", "--lifetime", "25h",
                  "--max-lifetime", "24h")
    assert r.returncode == 1 and "lifetime" in r.stderr

    # A clock that was never set (1970) or is before the build date.
    r = uplinkctl("jwt", "--key", ec_key, "--aud", "p", "--now", "1000")
    assert r.returncode == 1
    assert "before this uplinkd was built" in r.stderr

    r = uplinkctl("jwt", "--key", tmp_path / "missing.pem", "--aud", "p")
    assert r.returncode == 1 and "missing.pem" in r.stderr and "No such file" in r.stderr

    r = uplinkctl("jwt", "--key", ec_key, "--alg", "HS256")
    assert r.returncode == 2 and "HS256" in r.stderr


@pytest.mark.parametrize("key_type,alg", [("ec", "ES256"), ("rsa", "RS256")])
def test_keygen(tmp_path, key_type, alg):
    out = tmp_path / "keys"
    r = uplinkctl("keygen", "--type", key_type, "--out", out)
    assert r.returncode == 0, r.stderr
    private_path = out / ("%s_private.pem" % key_type)
    public_path = out / ("%s_public.pem" % key_type)
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600

    public_pem = public_path.read_bytes()
    public_key = serialization.load_pem_public_key(public_pem)
    lines = r.stdout.splitlines()
    assert "alg: %s" % alg in lines
    assert "kid: %s" % fingerprint(public_key) in lines
    assert public_pem.decode() in r.stdout  # printed, ready to paste

    private_key = serialization.load_pem_private_key(private_path.read_bytes(), None)
    assert fingerprint(private_key.public_key()) == fingerprint(public_key)

    # The new key signs tokens that verify against the printed public key.
    r2 = uplinkctl("jwt", "--key", private_path, "--aud", "p", "--kid", "auto")
    assert r2.returncode == 0, r2.stderr
    token = r2.stdout.strip()
    jwt.decode(token, public_key, algorithms=[alg], audience="p")
    assert jwt.get_unverified_header(token)["kid"] == fingerprint(public_key)

    # Never overwrites an existing key.
    r3 = uplinkctl("keygen", "--type", key_type, "--out", out)
    assert r3.returncode == 1
    assert "never overwrites" in r3.stderr
    assert private_path.read_bytes() == private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def test_keygen_p384_signs_es384(tmp_path):
    r = uplinkctl("keygen", "--type", "ec", "--curve", "P-384", "--out", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    assert "alg: ES384" in r.stdout.splitlines()
    public_key = serialization.load_pem_public_key((tmp_path / "k" / "ec_public.pem").read_bytes())
    assert isinstance(public_key.curve, ec.SECP384R1)
    r2 = uplinkctl("jwt", "--key", tmp_path / "k" / "ec_private.pem", "--aud", "p")
    assert r2.returncode == 0, r2.stderr
    token = r2.stdout.strip()
    assert len(b64url_decode(token.split(".")[2])) == 96
    jwt.decode(token, public_key, algorithms=["ES384"], audience="p")



SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def test_jwt_pkcs11_softhsm(tmp_path):
    """A key generated inside a softhsm2 token signs tokens PyJWT accepts."""
    tools = [SOFTHSM_MODULE, "/usr/bin/softhsm2-util", "/usr/bin/pkcs11-tool",
             "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"]
    missing = [t for t in tools if not os.path.exists(t)]
    if missing:
        pytest.skip("not installed: %s (apt-get install softhsm2 opensc "
                    "libengine-pkcs11-openssl)" % ", ".join(missing))
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("directories.tokendir = %s\nobjectstore.backend = file\n"
                    % (tmp_path / "tokens"))
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))

    def run(*cmd):
        r = subprocess.run(list(cmd), env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
        assert r.returncode == 0, "%s: %s%s" % (cmd, r.stdout, r.stderr)
        return r

    run("softhsm2-util", "--init-token", "--free", "--label", "gw", "--pin", "1234",
        "--so-pin", "5678")
    run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw", "--login",
        "--pin", "1234", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "jwt",
        "--id", "01")
    # Only the public key leaves the token.
    der_path = tmp_path / "pub.der"
    run("pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "gw", "--read-object",
        "--type", "pubkey", "--label", "jwt", "--output-file", str(der_path))
    public_key = serialization.load_der_public_key(der_path.read_bytes())
    pin = tmp_path / "pin"
    pin.write_text("1234\n")

    r = subprocess.run([h.UPLINKCTL_BIN, "jwt", "--key", "pkcs11:token=gw;object=jwt;type=private",
                        "--pkcs11-module", SOFTHSM_MODULE, "--passphrase-file", str(pin),
                        "--aud", "p", "--kid", "auto"],
                       env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=h.TIMEOUT)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "JWT",
                                                "kid": fingerprint(public_key)}
    assert len(b64url_decode(token.split(".")[2])) == 64
    jwt.decode(token, public_key, algorithms=["ES256"], audience="p")
