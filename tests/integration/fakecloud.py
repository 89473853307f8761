"""The fake JWT cloud for integration tests: mosquitto + tests/fakecloud/fakecloud.so.

The plugin (see tests/fakecloud/README.md) checks every CONNECT password as a JWT, answers
CONNACK 5 to a bad one, kicks clients whose token passed exp + skew, and appends one JSON line
per decision to a log that this module reads.

    cloud = fakecloud.start(hx, keys=[key.public_path], aud="my-project", skew=1)
    token = key.token(aud="my-project", lifetime=60)
    c = fakecloud.TlsClient(cloud, client_id="dev1", username="unused", password=token)
    assert c.probe() == 0
    cloud.wait_event(event="connect", client_id="dev1", result="accepted")

Keys (`Key.generate("ES256")`) and tokens come from Python's cryptography and python3-jwt, an
implementation independent of uplinkd's. `encode_token()` signs by hand and can reproduce the
classic client bugs (padding, standard base64 alphabet, DER ECDSA signatures) for negative tests.

Everything reuses harness.py: FakeCloud is a harness.Broker (same TLS and plain listeners,
same start/stop/restart, same log attachment on failure) with the plugin lines added, and its
`credentials` are the plugin's "observer" user, so hx.cloud_client()/hx.cloud_sub() work on it
as on any broker.
"""

import base64
import hashlib
import json
import os
import ssl
import time

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import harness as h

PLUGIN_NAME = os.path.join("tests", "fakecloud", "fakecloud.so")


def plugin_path():
    """Where fakecloud.so is: $FAKECLOUD_PLUGIN, else beside UPLINKD_BIN's build dir, else build/.

    Returns the first candidate that exists, or the first candidate (for the error message).
    """
    if os.environ.get("FAKECLOUD_PLUGIN"):
        return os.path.abspath(os.environ["FAKECLOUD_PLUGIN"])
    candidates = [os.path.join(os.path.dirname(h.UPLINKD_BIN), PLUGIN_NAME),
                  os.path.join(h.REPO, "build", PLUGIN_NAME)]
    for path in candidates:
        if os.path.exists(path):
            return path
    return candidates[0]


# --------------------------------------------------------------------------
# Keys and tokens
# --------------------------------------------------------------------------

def b64url(data, pad=False, standard=False):
    """base64url of `data`; pad/standard reproduce the classic encoder bugs."""
    text = (base64.b64encode(data) if standard else base64.urlsafe_b64encode(data)).decode()
    return text if pad else text.rstrip("=")


_ALGS = {
    # alg: (key kind, hash, ECDSA R/S size)
    "RS256": ("rsa", hashes.SHA256, None),
    "PS256": ("rsa", hashes.SHA256, None),
    "ES256": ("ec", hashes.SHA256, 32),
    "ES384": ("ec", hashes.SHA384, 48),
}


class Key:
    """A private key and its public PEM file, for one JWS algorithm."""

    def __init__(self, alg, private_key, directory, name):
        self.alg = alg
        self.private_key = private_key
        self.private_path = os.path.join(directory, name + ".key")
        self.public_path = os.path.join(directory, name + ".pub.pem")
        with open(self.private_path, "wb") as f:
            f.write(self.private_pem)
        os.chmod(self.private_path, 0o600)
        with open(self.public_path, "wb") as f:
            f.write(private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    @classmethod
    def generate(cls, alg, directory, name=None, rsa_bits=2048):
        """A fresh key for `alg` (RS256/PS256: RSA, ES256: P-256, ES384: P-384)."""
        if alg in ("RS256", "PS256"):
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        elif alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            private_key = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError("unsupported alg %r" % alg)
        return cls(alg, private_key, directory, name or alg.lower())

    @property
    def private_pem(self):
        """PKCS#8 PEM, unencrypted."""
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    @property
    def kid(self):
        """Lowercase hex SHA-256 of the SubjectPublicKeyInfo DER (akenza's kid)."""
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    def claims(self, aud, iat=None, exp=None, lifetime=3600, **extra):
        now = int(time.time())
        iat = now if iat is None else iat
        claims = {"iat": iat, "exp": iat + lifetime if exp is None else exp, "aud": aud}
        claims.update(extra)
        return claims

    def token(self, aud, iat=None, exp=None, lifetime=3600, alg=None, kid=None, **extra):
        """A correct JWT made by python3-jwt (an implementation independent of uplinkd's)."""
        headers = {"kid": kid} if kid else None
        return jwt.encode(self.claims(aud, iat, exp, lifetime, **extra), self.private_pem,
                          algorithm=alg or self.alg, headers=headers)


def encode_token(key, claims, alg=None, header=None, pad=False, standard_alphabet=False,
                 der_signature=False):
    """Sign by hand, optionally with a classic bug; the signing input is exactly what is sent.

    pad: keep base64 '=' padding; standard_alphabet: '+' and '/' instead of '-' and '_';
    der_signature: ECDSA signature as OpenSSL's DER instead of RFC 7518 §3.4 R||S.
    """
    alg = alg or key.alg
    kind, hash_cls, half = _ALGS[alg]
    head = {"alg": alg, "typ": "JWT"}
    head.update(header or {})

    def enc(data):
        return b64url(data, pad=pad, standard=standard_alphabet)

    signing_input = (enc(json.dumps(head, separators=(",", ":")).encode()) + "."
                     + enc(json.dumps(claims, separators=(",", ":")).encode()))
    data = signing_input.encode()
    if kind == "rsa":
        if alg == "PS256":
            pad_scheme = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size)
        else:
            pad_scheme = padding.PKCS1v15()
        sig = key.private_key.sign(data, pad_scheme, hash_cls())
    else:
        der = key.private_key.sign(data, ec.ECDSA(hash_cls()))
        if der_signature:
            sig = der
        else:
            r, s = decode_dss_signature(der)
            sig = r.to_bytes(half, "big") + s.to_bytes(half, "big")
    return signing_input + "." + enc(sig)


def decode_unverified(token):
    """(header, claims) of a token, without checking anything (for assertions)."""
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


# --------------------------------------------------------------------------
# The fake cloud broker
# --------------------------------------------------------------------------

class FakeCloud(h.Broker):
    """A harness.Broker whose every client must log in with a JWT (or as the observer).

    keys: public PEM paths (or Key objects) the "device registry" knows; aud: the expected
    audience (GCP: the project id); skew, max_lifetime: seconds (plugin defaults 600 and 86400
    when None); require_kid: the header kid must be the key's SHA-256 fingerprint.
    The observer user (credentials) logs in with a plain password and is never kicked.
    """

    def __init__(self, workdir, pki, keys, aud, name="fakecloud", cert="server", skew=None,
                 max_lifetime=None, require_kid=False, plugin=None, extra_options=None,
                 client_cert=False):
        self.plugin = plugin or plugin_path()
        if not os.path.exists(self.plugin):
            raise h.HarnessError(
                "fakecloud plugin not found at %s: build it (ninja -C BUILD "
                "tests/fakecloud/fakecloud.so; needs mosquitto-dev and libjansson-dev) "
                "or set FAKECLOUD_PLUGIN" % self.plugin)
        self.keys = [k.public_path if isinstance(k, Key) else k for k in keys]
        self.aud = aud
        self.skew = skew
        self.max_lifetime = max_lifetime
        self.require_kid = require_kid
        self.extra_options = dict(extra_options or {})
        self.observer = ("observer", "observer-%d" % os.getpid())
        # Broker.__init__ writes the config, so everything _write_conf needs is set first.
        self.plugin_log_path = os.path.join(workdir, name, "fakecloud.jsonl")
        super().__init__(workdir, pki, name=name, cert=cert, client_cert=client_cert)

    # -- configuration ------------------------------------------------------

    def plugin_options(self):
        """The plugin_opt_* values, in the order written."""
        opts = {"keys": ",".join(self.keys), "aud": self.aud, "log": self.plugin_log_path,
                "observer_user": self.observer[0], "observer_password": self.observer[1]}
        if self.skew is not None:
            opts["skew"] = str(self.skew)
        if self.max_lifetime is not None:
            opts["max_lifetime"] = str(self.max_lifetime)
        if self.require_kid:
            opts["require_kid"] = "true"
        opts.update(self.extra_options)
        return opts

    def _write_conf(self):
        super()._write_conf()
        with open(self.conf_path) as f:
            lines = f.read().splitlines()
        # Global settings (per_listener_settings false): the plugin guards every listener,
        # including the plain one, exactly as a cloud guards all its ports.
        plugin_lines = ["plugin %s" % self.plugin]
        plugin_lines += ["plugin_opt_%s %s" % kv for kv in self.plugin_options().items()]
        at = lines.index("per_listener_settings false") + 1
        lines[at:at] = plugin_lines
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def reconfigure(self, **changes):
        """Change keys/aud/skew/max_lifetime/require_kid and restart on the same ports.

        mosquitto does not reload plugins on SIGHUP, so this is a restart; connected clients
        see the broker go away.
        """
        for name, value in changes.items():
            if name == "keys":
                value = [k.public_path if isinstance(k, Key) else k for k in value]
            if not hasattr(self, name):
                raise AttributeError(name)
            setattr(self, name, value)
        self._write_conf()
        return self.restart()

    @property
    def credentials(self):
        """The observer's (username, password): the tests' own cloud-side clients."""
        return self.observer

    # -- the plugin's log -------------------------------------------------

    def events(self, event=None, **match):
        """Every complete JSON line of the plugin log, optionally filtered.

        event: "start", "connect", "kick" or "disconnect"; match: field=value pairs
        (e.g. client_id="dev1", result="refused", reason="padding").
        """
        try:
            with open(self.plugin_log_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        # The plugin flushes whole lines; a partial last line is still being written.
        for raw in data.split(b"\n")[:-1]:
            if not raw.strip():
                continue
            line = json.loads(raw)
            if event is not None and line.get("event") != event:
                continue
            if all(line.get(k) == v for k, v in match.items()):
                out.append(line)
        return out

    def wait_event(self, event=None, timeout=h.TIMEOUT, since=0, **match):
        """Wait for a log line like events(event, **match) past the first `since`; return it."""

        def found():
            lines = self.events(event, **match)
            return lines[since] if len(lines) > since else None

        return h.wait_for(found, timeout, what=lambda: "fakecloud %s %s (last lines: %s)" % (
            event, match, self.events()[-4:]))

    def decisions(self, client_id=None):
        """The connect lines, for one client id when given."""
        if client_id is None:
            return self.events("connect")
        return self.events("connect", client_id=client_id)

    def kicks(self, client_id=None):
        if client_id is None:
            return self.events("kick")
        return self.events("kick", client_id=client_id)

    def log_text(self):
        text = super().log_text()
        try:
            with open(self.plugin_log_path, errors="replace") as f:
                text += "--- fakecloud.jsonl ---\n" + f.read()
        except FileNotFoundError:
            pass
        return text


def start(hx, keys, aud, **kwargs):
    """A started FakeCloud owned by the `hx` fixture (stopped after uplinkd at teardown, and
    its logs attached to a failing test's report, like hx.broker())."""
    cloud = FakeCloud(hx.dir, hx.pki, keys, aud, **kwargs)
    # conftest's Env keeps brokers in _brokers for ordered teardown and failure reports;
    # joining that list is the whole integration (see the coordinator note in the README).
    hx._brokers.append(cloud)
    return cloud.start()


# --------------------------------------------------------------------------
# A device: paho-mqtt over TLS with a token as password
# --------------------------------------------------------------------------

class TlsClient(h.MqttClient):
    """harness.MqttClient over TLS to the cloud's TLS listener, recording disconnect times.

    paho reconnects by itself (0.1 s .. 1 s) with the same password, so after a kick the
    expired token is offered again, and refused: tests may assert both.
    """

    def __init__(self, cloud, client_id, password, username="unused", host="localhost",
                 keepalive=30, ca=None, **kwargs):
        super().__init__(host, cloud.tls_port, client_id=client_id, username=username,
                         password=password, keepalive=keepalive, **kwargs)
        # A context of our own: paho 1.6's tls_set() builds one with the deprecated
        # ssl.PROTOCOL_TLS, which warns on every test.
        self.client.tls_set_context(ssl.create_default_context(cafile=ca or cloud.pki.ca))
        self.connack_codes = []
        self.disconnected_at = []  # time.time() of each disconnect after a CONNACK 0

    def _on_connect(self, client, userdata, flags, rc):
        with self._cond:
            self.connack_codes.append(rc)
        super()._on_connect(client, userdata, flags, rc)

    def _on_disconnect(self, client, userdata, rc):
        with self._cond:
            was_connected = self._connected
        super()._on_disconnect(client, userdata, rc)
        if was_connected:
            with self._cond:
                self.disconnected_at.append(time.time())

    @property
    def connected(self):
        with self._cond:
            return self._connected

    def probe(self, timeout=h.TIMEOUT):
        """Connect once; return the CONNACK code (0 accepted, 5 not authorised), then close."""
        self.connect_rc = None
        self.client.connect_async(self.host, self.port, self.keepalive)
        self.client.loop_start()
        try:
            return h.wait_for(lambda: self.connack_codes and [self.connack_codes[0]], timeout,
                              what="CONNACK for %s" % self.client_id)[0]
        finally:
            self.close()


# --------------------------------------------------------------------------
# The fake Azure IoT Hub: the same plugin with plugin_opt_hub (SAS tokens)
# --------------------------------------------------------------------------

class FakeHub(FakeCloud):
    """mosquitto + fakecloud.so playing Azure IoT Hub: every CONNECT must carry the user name
    "<hub>/<client id>/?api-version=..." and a SAS token signed with that device's key from
    `devices` ({device id: path of a file with its base64 key}); the plugin verifies it with
    its own HMAC-SHA256, refuses with CONNACK 5 and kicks a session whose token expired (after
    `skew` seconds). The log lines are FakeCloud's, with alg "SAS" and exp = the token's se.
    A device given as "x509:ca" or "x509:<thumbprint>" instead of a key file authenticates by
    its client certificate (with client_cert="require": the TLS listener asks for one)."""

    def __init__(self, workdir, pki, hub, devices, name="fakehub", skew=0, **kwargs):
        self.hub = hub
        self.devices = dict(devices)
        super().__init__(workdir, pki, keys=[], aud=None, name=name, skew=skew, **kwargs)

    def plugin_options(self):
        opts = {"hub": self.hub,
                "sas_keys": ",".join("%s=%s" % kv for kv in sorted(self.devices.items())),
                "log": self.plugin_log_path,
                "observer_user": self.observer[0], "observer_password": self.observer[1]}
        if self.skew is not None:
            opts["skew"] = str(self.skew)
        opts.update(self.extra_options)
        return opts


def start_hub(hx, hub, devices, **kwargs):
    """A started FakeHub owned by `hx`, like start()."""
    cloud = FakeHub(hx.dir, hx.pki, hub, devices, **kwargs)
    hx._brokers.append(cloud)
    return cloud.start()


def device_key(workdir, name):
    """A new random 32-byte device key, base64 in <workdir>/<name>.key as the portal shows it;
    returns (path, raw key bytes)."""
    raw = os.urandom(32)
    path = os.path.join(workdir, name + ".key")
    with open(path, "w") as f:
        f.write(base64.b64encode(raw).decode() + "\n")
    os.chmod(path, 0o600)
    return path, raw
