"""Tests of the fake JWT cloud itself (tests/fakecloud/fakecloud.so in a real mosquitto).

Tokens come from python3-jwt and Python's cryptography, so these tests do not depend on
uplinkd's JWT code: they show the fake cloud accepts what an independent implementation
signs correctly and refuses each classic mistake with its own reason in the log, before
uplinkd's own tests rely on it. Devices are paho-mqtt clients over TLS.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import jwt
import pytest

import fakecloud as fc
import harness as h

AUD = "fake-project"
ALGS = ("RS256", "PS256", "ES256", "ES384")


@pytest.fixture
def _require_uplinkd():
    """These tests do not run uplinkd: overrides conftest's fixture that fails every test
    when the uplinkd binary is missing (a missing plugin fails them instead, see FakeCloud)."""


@pytest.fixture(scope="module")
def keys():
    """One key per algorithm and unrelated P-256 and RSA keys, generated once per module."""
    directory = tempfile.mkdtemp(prefix="uplk-fckeys-", dir="/tmp")
    try:
        out = {alg: fc.Key.generate(alg, directory) for alg in ALGS}
        out["other-ES256"] = fc.Key.generate("ES256", directory, name="other-es256")
        out["other-RS256"] = fc.Key.generate("RS256", directory, name="other-rs256")
        yield out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def device_id(name):
    """A GCP-style client id (slashes and all), as uplinkd's gcp profile sends."""
    return "projects/%s/locations/us-central1/registries/reg/devices/%s" % (AUD, name)


def cloud_for(hx, keys, **kwargs):
    return fc.start(hx, [keys[alg] for alg in ALGS], AUD, **kwargs)


@pytest.mark.parametrize("alg", ALGS)
def test_each_algorithm_accepted(hx, keys, alg):
    cloud = cloud_for(hx, keys)
    key = keys[alg]
    token = key.token(AUD, lifetime=600)
    header, claims = fc.decode_unverified(token)
    client_id = device_id("dev-" + alg.lower())

    client = fc.TlsClient(cloud, client_id, token)
    hx.add_closer(client.close)
    client.connect()

    line = cloud.wait_event("connect", client_id=client_id)
    assert line["result"] == "accepted", line
    assert line["reason"] == "ok"
    assert line["alg"] == alg
    assert line["username"] == "unused"
    assert line["aud"] == AUD
    assert (line["iat"], line["exp"]) == (claims["iat"], claims["exp"])
    assert line["key"] == key.public_path
    assert line["key_kid"] == key.kid
    assert line["header"] == header

    # Still there: publish round trip through the cloud to the observer.
    observer = hx.cloud_client(cloud)
    observer.subscribe("/devices/+/events")
    client.publish("/devices/dev/events", "hello-" + alg)
    observer.wait("/devices/dev/events", "hello-" + alg)


def _standard_alphabet_token(key):
    """A token in standard base64 that really contains '+' or '/' (which depends on the random
    signature; each character is one of them with p = 1/32, so a few tries suffice)."""
    for _ in range(50):
        token = fc.encode_token(key, key.claims(AUD), standard_alphabet=True)
        if "+" in token or "/" in token:
            return token
    raise AssertionError("no '+' or '/' in 50 standard-base64 tokens")


# name: (make the token from the keys, the reason the plugin must log)
REFUSALS = {
    "padding": (lambda k: fc.encode_token(k["ES256"], k["ES256"].claims(AUD), pad=True),
                "padding"),
    "standard base64": (lambda k: _standard_alphabet_token(k["RS256"]), "base64url alphabet"),
    "DER signature ES256": (lambda k: fc.encode_token(k["ES256"], k["ES256"].claims(AUD),
                                                      der_signature=True), "DER signature"),
    "DER signature ES384": (lambda k: fc.encode_token(k["ES384"], k["ES384"].claims(AUD),
                                                      der_signature=True), "DER signature"),
    "wrong aud": (lambda k: k["ES256"].token("other-project"), "wrong aud"),
    "no aud": (lambda k: fc.encode_token(k["ES256"], {"iat": int(time.time()),
                                                      "exp": int(time.time()) + 60}),
               "aud missing"),
    "expired": (lambda k: k["ES256"].token(AUD, iat=int(time.time()) - 7200, lifetime=3600),
                "expired"),
    # max_lifetime 3600 + skew 60 in this cloud
    "lifetime too long": (lambda k: k["ES256"].token(AUD, lifetime=3600 + 60 + 1),
                          "lifetime too long"),
    "iat in future": (lambda k: k["ES256"].token(AUD, iat=int(time.time()) + 3600, lifetime=60),
                      "iat in future"),
    "wrong key": (lambda k: k["other-ES256"].token(AUD), "bad signature"),
    "wrong RSA key": (lambda k: k["other-RS256"].token(AUD), "bad signature"),
    "wrong RSA key PS256": (lambda k: k["other-RS256"].token(AUD, alg="PS256"), "bad signature"),
    # An RSA signature (256 bytes) under an ES256 header: neither R||S of 64 bytes nor DER.
    "RSA signature under ES256": (lambda k: fc.encode_token(
        k["RS256"], k["RS256"].claims(AUD), header={"alg": "ES256"}, alg="RS256"),
        "signature length"),
    "HS256": (lambda k: jwt.encode(k["ES256"].claims(AUD), "secret", algorithm="HS256"),
              "alg unsupported"),
    "not a JWT": (lambda k: "hunter2", "not a JWT"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_token_refused_with_connack_5_and_a_reason(hx, keys, case):
    make, reason = REFUSALS[case]
    token = make(keys)
    cloud = cloud_for(hx, keys, max_lifetime=3600, skew=60)
    client_id = device_id("bad-" + case.replace(" ", "-"))

    assert fc.TlsClient(cloud, client_id, token).probe() == 5

    line = cloud.wait_event("connect", client_id=client_id)
    assert line["result"] == "refused", line
    assert line["reason"] == reason, line
    assert line["detail"]
    assert cloud.events("connect", result="accepted") == []


def test_alg_without_a_registered_key_of_its_type_refused(hx, keys):
    cloud = fc.start(hx, [keys["ES256"]], AUD)
    assert fc.TlsClient(cloud, "rsa-dev", keys["RS256"].token(AUD)).probe() == 5
    assert cloud.wait_event("connect", client_id="rsa-dev")["reason"] == "no key for alg"


def test_der_signature_is_refused_even_though_it_verifies(hx, keys):
    """The DER form of a valid ES256 signature is still refused: GCP wants R||S."""
    es = keys["ES256"]
    cloud = cloud_for(hx, keys)
    claims = es.claims(AUD)
    good = fc.encode_token(es, claims)
    bad = fc.encode_token(es, claims, der_signature=True)
    assert fc.TlsClient(cloud, device_id("der-good"), good).probe() == 0
    assert fc.TlsClient(cloud, device_id("der-bad"), bad).probe() == 5
    line = cloud.wait_event("connect", client_id=device_id("der-bad"))
    assert line["reason"] == "DER signature"
    assert "R||S" in line["detail"]


def test_hand_signed_and_pyjwt_tokens_agree(keys):
    """encode_token (used for the negative cases) makes tokens python3-jwt accepts."""
    for alg in ALGS:
        key = keys[alg]
        token = fc.encode_token(key, key.claims(AUD))
        pub = key.private_key.public_key()
        assert jwt.decode(token, pub, algorithms=[alg], audience=AUD)["aud"] == AUD


def test_lifetime_limit_is_max_lifetime_plus_skew(hx, keys):
    """GCP: "the maximum lifetime of a token is 24 hours + skew"; a client that back-dates
    iat by the skew and asks for the full lifetime must still be accepted."""
    es = keys["ES256"]
    cloud = cloud_for(hx, keys, max_lifetime=3600, skew=60)
    now = int(time.time())
    edge = es.token(AUD, iat=now - 60, lifetime=3600 + 60)
    over = es.token(AUD, iat=now - 60, lifetime=3600 + 60 + 1)
    assert fc.TlsClient(cloud, "edge", edge).probe() == 0
    assert fc.TlsClient(cloud, "over", over).probe() == 5
    assert cloud.wait_event("connect", client_id="over")["reason"] == "lifetime too long"


def test_client_is_kicked_when_its_token_expires(hx, keys):
    """A session outliving exp + skew is closed by the server (GCP does this); another
    client with a longer token stays; the kicked client's retry with the same token is
    refused as expired."""
    es = keys["ES256"]
    skew = 1
    cloud = cloud_for(hx, keys, skew=skew)
    now = int(time.time())
    short = es.token(AUD, iat=now, lifetime=3)
    long_ = es.token(AUD, iat=now, lifetime=600)
    _, claims = fc.decode_unverified(short)

    doomed = fc.TlsClient(cloud, device_id("doomed"), short)
    hx.add_closer(doomed.close)
    doomed.connect()
    survivor = fc.TlsClient(cloud, device_id("survivor"), long_)
    hx.add_closer(survivor.close)
    survivor.connect()

    h.wait_for(lambda: doomed.disconnected_at, timeout=3 + skew + h.TIMEOUT,
               what="the server to kick the client with the expired token")
    kick = cloud.wait_event("kick", client_id=device_id("doomed"))
    assert kick["exp"] == claims["exp"] and kick["found"] is True
    # Not before exp + skew (the plugin works in whole seconds of the wall clock).
    assert doomed.disconnected_at[0] >= claims["exp"] + skew
    assert kick["now"] >= claims["exp"] + skew

    # paho retries with the same token: refused, and the log says why.
    retry = cloud.wait_event("connect", client_id=device_id("doomed"), result="refused")
    assert retry["reason"] == "expired"
    assert 5 in doomed.connack_codes

    assert survivor.connected
    assert cloud.kicks(device_id("survivor")) == []


def test_fresh_token_replaces_the_old_one(hx, keys):
    """Rotation as uplinkd does it (disconnect, reconnect with a new token) and a takeover by
    a connection with a fresh token: neither is kicked at the old token's exp. A canary with
    the old exp shows the deadline has passed (its kick is in the same tick as theirs would be).
    """
    es = keys["ES256"]
    skew = 1
    cloud = cloud_for(hx, keys, skew=skew)
    now = int(time.time())
    short = es.token(AUD, iat=now, lifetime=3)

    canary = fc.TlsClient(cloud, "canary", short)
    hx.add_closer(canary.close)
    canary.connect()

    rotating = fc.TlsClient(cloud, "rotating", short)
    rotating.connect()
    rotating.close()
    gone = cloud.wait_event("disconnect", client_id="rotating")
    assert gone["left"] >= 0
    rotating = fc.TlsClient(cloud, "rotating", es.token(AUD, lifetime=600))
    hx.add_closer(rotating.close)
    rotating.connect()

    old = fc.TlsClient(cloud, "taken-over", short)
    hx.add_closer(old.close)
    old.connect()
    old.client.reconnect_delay_set(3600, 3600)  # it must not take the session back
    new = fc.TlsClient(cloud, "taken-over", es.token(AUD, lifetime=600))
    hx.add_closer(new.close)
    new.connect()
    h.wait_for(lambda: old.disconnected_at, what="the old connection to be taken over")

    cloud.wait_event("kick", client_id="canary", timeout=3 + skew + h.TIMEOUT)
    assert cloud.kicks("rotating") == [] and cloud.kicks("taken-over") == []
    assert rotating.connected and new.connected


def test_takeover_by_a_short_token_is_kicked(hx, keys):
    """The old connection's disconnect (after the takeover) must not make the server forget
    the new connection's token: the new one is kicked at its own exp."""
    es = keys["ES256"]
    skew = 1
    cloud = cloud_for(hx, keys, skew=skew)
    old = fc.TlsClient(cloud, "dev", es.token(AUD, lifetime=600))
    hx.add_closer(old.close)
    old.connect()
    old.client.reconnect_delay_set(3600, 3600)
    short = es.token(AUD, lifetime=3)
    new = fc.TlsClient(cloud, "dev", short)
    hx.add_closer(new.close)
    new.connect()
    h.wait_for(lambda: old.disconnected_at, what="the old connection to be taken over")

    kick = cloud.wait_event("kick", client_id="dev", timeout=3 + skew + h.TIMEOUT)
    assert kick["exp"] == fc.decode_unverified(short)[1]["exp"] and kick["found"] is True
    h.wait_for(lambda: new.disconnected_at, what="the new connection to be kicked")


def test_kid_must_be_the_key_fingerprint_when_required(hx, keys):
    es = keys["ES256"]
    cloud = cloud_for(hx, keys, require_kid=True)
    # The fingerprint is the one `openssl pkey -pubin -outform DER | sha256sum` prints.
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", es.public_path, "-outform", "DER"],
                         check=True, capture_output=True, timeout=30).stdout
    assert es.kid == hashlib.sha256(der).hexdigest()
    start = cloud.wait_event("start")
    assert {"path": es.public_path, "type": "P-256", "kid": es.kid} in start["keys"]

    assert fc.TlsClient(cloud, "with-kid", es.token(AUD, kid=es.kid)).probe() == 0
    assert fc.TlsClient(cloud, "wrong-kid", es.token(AUD, kid="0" * 64)).probe() == 5
    assert fc.TlsClient(cloud, "no-kid", es.token(AUD)).probe() == 5
    assert cloud.wait_event("connect", client_id="with-kid")["kid"] == es.kid
    assert cloud.wait_event("connect", client_id="wrong-kid")["reason"] == "kid mismatch"
    assert cloud.wait_event("connect", client_id="no-kid")["reason"] == "kid mismatch"


def test_observer_and_anonymous(hx, keys):
    cloud = cloud_for(hx, keys)
    hx.cloud_client(cloud)  # the observer, on the plain listener
    assert cloud.wait_event("connect", reason="observer")["result"] == "accepted"

    anonymous = h.MqttClient("127.0.0.1", cloud.plain_port, client_id="anon")
    with pytest.raises(h.HarnessError, match="CONNACK 5"):
        anonymous.connect()
    anonymous.close()
    assert cloud.wait_event("connect", client_id="anon")["reason"] == "no password"

    intruder = h.MqttClient("127.0.0.1", cloud.plain_port, client_id="intruder",
                            username=cloud.observer[0], password="guess")
    with pytest.raises(h.HarnessError, match="CONNACK 5"):
        intruder.connect()
    intruder.close()
    assert cloud.wait_event("connect", client_id="intruder")["reason"] == "observer password"


@pytest.mark.parametrize("problem", ["missing key file", "unknown option", "no aud"])
def test_bad_plugin_config_stops_the_broker(hx, keys, problem):
    """A plugin configuration mistake must stop mosquitto, never weaken a check."""
    key_list = [keys["ES256"]]
    extra = {}
    if problem == "missing key file":
        key_list = [os.path.join(hx.dir, "nope.pem")]
    elif problem == "unknown option":
        extra = {"max_lifetme": "60"}  # sic: a typo of max_lifetime
    cloud = fc.FakeCloud(hx.dir, hx.pki, key_list, AUD, extra_options=extra)
    if problem == "no aud":
        with open(cloud.conf_path) as f:
            lines = f.read().splitlines(True)
        with open(cloud.conf_path, "w") as f:
            f.write("".join(x for x in lines if not x.startswith("plugin_opt_aud ")))
    hx._brokers.append(cloud)  # stopped and reported like any broker (see fakecloud.start)

    with pytest.raises(h.HarnessError, match="mosquitto exited"):
        cloud.start()
    expected = {"missing key file": "cannot open key", "unknown option": "unknown option",
                "no aud": "plugin_opt_aud are required"}[problem]
    assert expected in cloud.log_text()
