"""Profile azure: the SAS token, its renewal, device-to-cloud and cloud-to-device messages.

Azure IoT Hub ("Communicate with an IoT hub using the MQTT protocol"; "Control access to IoT
Hub by using shared access signatures"): client id = device id, user name
"<hub>/<device>/?api-version=2021-04-12", password "SharedAccessSignature sr=...&sig=...&se=...".
The token is checked twice, by implementations independent of uplinkd's: Python's hmac on a
password captured from a CONNECT, and the fake IoT Hub (tests/fakecloud with plugin_opt_hub),
which also kicks a session whose token expired.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import ssl
import subprocess
import time
import urllib.parse

import fakecloud
import harness as h
from test_profile_akenza import ConnectCapture

HUB = "testhub.azure-devices.net"
DEVICE = "gw-test"


def azure_uplink(key_path, **azure):
    section = {"hub": HUB, "key_file": key_path}
    section.update(azure)
    return {"profile": "azure", "azure": section}


def azure_config(hx, cloud, key_path, port=None, **azure):
    conf = hx.config(cloud, port=port, uplink=azure_uplink(key_path, **azure))
    del conf["uplinks"][0]["generic"]
    conf["uplinks"][0].pop("auth", None)
    return conf


def start(hx, subscribe=(), **azure):
    key_path, raw = fakecloud.device_key(hx.dir, DEVICE)
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: key_path})
    conf = azure_config(hx, cloud, key_path, **azure)
    observer = hx.cloud_client(cloud)
    for topic in ("devices/%s/messages/events/#" % DEVICE,) + tuple(subscribe):
        observer.subscribe(topic, qos=1)
    daemon = hx.uplinkd(conf)
    line = cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    return cloud, daemon, conf, observer, raw, line


def gw(conf):
    return type("Gw", (), {"unix": h.local_unix_path(conf), "tcp_port": h.local_tcp_port(conf)})


class TlsCapture(ConnectCapture):
    """ConnectCapture behind TLS (the test PKI's server.pem, valid for localhost): IoT Hub
    takes MQTT over TLS only, so the profile refuses a plain uplink."""

    def __init__(self, pki):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.path("server.pem"), pki.path("server.key"))
        super().__init__()

    def _serve(self, raw):
        raw.settimeout(h.TIMEOUT)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                self.connects.append(self._read_connect(conn))
        except (OSError, ValueError):
            raw.close()


def test_sas_token_verified_by_python(hx):
    key_path, raw = fakecloud.device_key(hx.dir, DEVICE)
    capture = TlsCapture(hx.pki)
    hx.add_closer(capture.close)
    conf = azure_config(hx, None, key_path, port=capture.port)
    conf["uplinks"][0].update({"tls": {"ca": hx.pki.ca}})
    before = int(time.time())
    hx.uplinkd(conf)
    connect = h.wait_for(lambda: capture.connects and capture.connects[0],
                         what="a CONNECT at the TLS capture listener")
    assert connect["client_id"] == DEVICE
    assert connect["username"] == "%s/%s/?api-version=2021-04-12" % (HUB, DEVICE)
    prefix = "SharedAccessSignature "
    assert connect["password"].startswith(prefix)
    fields = dict(kv.split("=", 1) for kv in connect["password"][len(prefix):].split("&"))
    assert set(fields) == {"sr", "sig", "se"}
    resource = urllib.parse.quote("%s/devices/%s" % (HUB, DEVICE), safe="")
    assert fields["sr"] == resource
    se = int(fields["se"])
    assert before + 3600 - 5 <= se <= int(time.time()) + 3600 + 5  # one hour by default
    sig = base64.b64encode(hmac.new(raw, ("%s\n%d" % (resource, se)).encode(),
                                    hashlib.sha256).digest()).decode()
    assert urllib.parse.unquote(fields["sig"]) == sig


def test_bad_azure_sections_refused(hx, tmp_path):
    key_path, _ = fakecloud.device_key(hx.dir, DEVICE)
    cases = [
        ({"tls": {"enabled": False}}, "IoT Hub accepts MQTT only over TLS"),
        ({"auth": {"type": "basic", "username": "u", "password": "p"}},
         "profile azure makes its own user name and SAS token: remove auth"),
        ({"azure": {"hub": HUB}}, "azure.key_file: missing: IoT Hub needs the device's key"),
        ({"azure": {"hub": HUB, "key_file": key_path, "device_id": "bad id"}},
         'azure.device_id: "bad id": an IoT Hub device id holds only'),
        ({"azure": {"hub": HUB, "key_file": key_path, "token_lifetime": "1s"}},
         "azure.token_lifetime"),
        ({"azure": {"hub": HUB, "key_file": key_path, "child_key": "keys/%c.key"}},
         'azure.child_key: "keys/%c.key" is not an absolute path with %c'),
        ({"azure": {"hub": HUB, "key_file": key_path, "child_key": "/k/%c.key",
                    "group_key_file": key_path}},
         "set either azure.child_key (a key file per child) or azure.group_key_file"),
        ({"azure": {"hub": HUB, "key_file": key_path, "group_key_file": key_path + ".none"}},
         "azure.group_key_file: cannot read"),
        ({"azure": {"hub": HUB, "key_file": key_path, "session_idle": "1m"}},
         "azure.session_idle: is only used with child_key or group_key_file"),
    ]
    for i, (change, words) in enumerate(cases):
        conf = azure_config(hx, None, key_path, port=8883)
        conf["uplinks"][0].update({"tls": {"ca": hx.pki.ca}})
        conf["uplinks"][0].update(change)
        path = hx.write_config(conf, "bad-%d.yaml" % i)
        proc = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", path], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=h.TIMEOUT,
                              env=dict(os.environ, UPLINKD_SERVICE_USER=""))
        assert proc.returncode == 1, (change, proc.stdout, proc.stderr)
        assert words in proc.stderr, (change, proc.stderr)
    conf = azure_config(hx, None, key_path, port=8883)
    conf["uplinks"][0].update({"tls": {"ca": hx.pki.ca}})
    proc = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", hx.write_config(conf, "ok.yaml")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=h.TIMEOUT, env=dict(os.environ, UPLINKD_SERVICE_USER=""))
    assert proc.returncode == 0, proc.stderr


def test_d2c_and_c2d(hx):
    cloud, daemon, conf, observer, _, _ = start(hx)
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % DEVICE, b'{"t":21.5}', qos=1)
    local.publish("dev/%s/telemetry/line 2" % DEVICE, b"plain", qos=2)
    observer.wait("devices/%s/messages/events/%%24.ct=application%%2Fjson&%%24.ce=utf-8" % DEVICE,
                  '{"t":21.5}')
    observer.wait("devices/%s/messages/events/subject=line%%202" % DEVICE, "plain")
    assert all(m[2] == 1 for m in observer.received())  # QoS 2 goes up as 1

    # Another child: one device per connection, so it is refused with the reason.
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    local.publish("dev/other/telemetry", b"x", qos=1)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "IoT Hub takes one device per connection" in json.loads(payload)["error"]

    # Cloud to device: the property bag is the local sub-topic.
    sub = hx.local_sub(gw(conf), "dev/%s/commands/#" % DEVICE)
    h.wait_for(lambda: "devices/%s/messages/devicebound/#" % DEVICE in cloud.log_text(),
               what="SUBSCRIBE devices/%s/messages/devicebound/#" % DEVICE)
    observer.publish("devices/%s/messages/devicebound/%%24.to=%%2Fdevices%%2F%s&k=v"
                     % (DEVICE, DEVICE), b"reboot", qos=1)
    observer.publish("devices/%s/messages/devicebound/" % DEVICE, b"bare", qos=1)
    sub.wait("dev/%s/commands" % DEVICE, "bare")
    got = [(m[0], m[1]) for m in sub.messages()]
    assert got == [("dev/%s/commands/%%24.to=%%2Fdevices%%2F%s&k=v" % (DEVICE, DEVICE), "reboot"),
                   ("dev/%s/commands" % DEVICE, "bare")]


def test_wrong_key_refused_and_explained(hx):
    key_path, _ = fakecloud.device_key(hx.dir, DEVICE)
    other_path, _ = fakecloud.device_key(hx.dir, "other")
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: key_path})
    conf = azure_config(hx, cloud, other_path)
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id=DEVICE, result="refused", reason="bad signature")
    daemon.wait_log(r"refused the token \(CONNACK 5\): IoT Hub did not authorise the device: "
                    r".* \(it expires at ")


def test_unreadable_key_logged_once(hx):
    key_path, _ = fakecloud.device_key(hx.dir, DEVICE)
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: key_path})
    bad = key_path + ".bad"
    with open(bad, "w") as f:
        f.write("not base64 !\n")
    conf = azure_config(hx, cloud, bad)
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id=DEVICE, result="refused", reason="not a SAS token")
    cloud.wait_event("connect", client_id=DEVICE, result="refused", since=1)
    daemon.wait_log(r"azure.key_file: .* does not hold a key")
    assert daemon.log_text().count("does not hold a key") == 1


def test_token_renewed_before_expiry_without_loss(hx):
    """A 12 s token is renewed at 80 % of its life, twice in this test: a QoS 1 stream
    meanwhile loses nothing, and the hub never has to kick the session."""
    cloud, daemon, conf, observer, _, first = start(hx, token_lifetime="12s")
    local = hx.local_client(gw(conf))
    sent = []
    deadline = time.monotonic() + 60
    while len(cloud.decisions(DEVICE)) < 3 and time.monotonic() < deadline:
        for _ in range(50):  # a batch, then wait for it: the stream spans the rotations
            payload = b"m%d" % len(sent)
            local.publish("dev/%s/telemetry" % DEVICE, payload, qos=1)
            sent.append(payload.decode())
        h.wait_for(lambda: len(observer.received()) >= len(sent),
                   what=lambda: "the stream keeps flowing (%d sent, %d at the hub)"
                   % (len(sent), len(observer.received())))
    accepted = [d for d in cloud.decisions(DEVICE) if d["result"] == "accepted"]
    assert len(accepted) >= 3, cloud.decisions(DEVICE)
    assert len({d["exp"] for d in accepted}) == len(accepted)  # a new token each time
    def at_hub():
        return [m[1].decode() for m in observer.received()]

    h.wait_for(lambda: set(sent) <= set(at_hub()),
               what=lambda: "all %d messages at the hub (missing %s)" % (
                   len(sent), sorted(set(sent) - set(at_hub()))[:5]))
    # At least once, in order; a duplicate only where a PUBACK was lost at a rotation.
    seen, first = set(), []
    for m in at_hub():
        if m not in seen:
            seen.add(m)
            first.append(m)
    assert first == sent
    assert cloud.kicks(DEVICE) == []
    daemon.wait_log(r"the profile made a new token, expires at ")
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    up = status["uplinks"][0]
    assert up["auth"] == "token"
    assert up["token_rotations"] >= 2
    assert up["token_expires_at"] > up["token_refresh_at"] > 0


def test_twin_and_direct_methods(hx):
    """The hub side is the observer: it answers the twin GET, takes reported patches (204,
    then a 400), sends a desired-properties update and calls a direct method."""
    cloud, daemon, conf, observer, _, _ = start(
        hx, subscribe=("$iothub/twin/GET/#", "$iothub/twin/PATCH/properties/reported/#",
                       "$iothub/methods/res/#"))

    def first(prefix):
        return h.wait_for(lambda: next((m for m in observer.received()
                                        if m[0].startswith(prefix)), None),
                          what=lambda: "a message on %s... (have %s)"
                          % (prefix, [m[0] for m in observer.received()]))

    # After CONNACK: the twin GET, answered with the document -> config/twin, retained.
    observer.publish("fakehub/to/%s" % DEVICE, b"", qos=0)  # the hub's answers: to this device
    get = first("$iothub/twin/GET/?$rid=")
    assert get[1] == b""
    rid = get[0].split("$rid=", 1)[1]
    twin = b'{"desired":{"interval":5,"$version":3},"reported":{"$version":1}}'
    sub = hx.local_sub(gw(conf), "dev/%s/config/#" % DEVICE)
    observer.publish("$iothub/twin/res/200/?$rid=%s" % rid, twin, qos=0)
    sub.wait("dev/%s/config/twin" % DEVICE, twin.decode())
    late = hx.local_sub(gw(conf), "dev/%s/config/twin" % DEVICE)
    assert late.wait("dev/%s/config/twin" % DEVICE, twin.decode())[3]  # retained locally

    # Desired-property updates.
    observer.publish("$iothub/twin/PATCH/properties/desired/?$version=4", b'{"interval":10}',
                     qos=0)
    sub.wait("dev/%s/config/desired" % DEVICE, '{"interval":10}')

    # Reported properties from dev/<device>/state; a refused patch is reported.
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/state" % DEVICE, b'{"fw":"1.2"}', qos=1)
    patch = first("$iothub/twin/PATCH/properties/reported/?$rid=")
    assert patch[1] == b'{"fw":"1.2"}'
    observer.publish("$iothub/twin/res/204/?$rid=%s&$version=2" % patch[0].split("$rid=")[1],
                     b"", qos=0)
    local.publish("dev/%s/state" % DEVICE, b'{"fw":"bad"}', qos=1)
    h.wait_for(lambda: len([m for m in observer.received()
                            if m[0].startswith("$iothub/twin/PATCH/")]) == 2,
               what="the second reported patch")
    second = [m for m in observer.received() if m[0].startswith("$iothub/twin/PATCH/")][1]
    assert second[0] != patch[0]  # a new request id
    observer.publish("$iothub/twin/res/400/?$rid=%s" % second[0].split("$rid=")[1],
                     b'{"message":"bad"}', qos=0)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    assert "IoT Hub answered 400 to the twin reported-properties patch" in \
        json.loads(payload)["error"]
    local.publish("dev/%s/state" % DEVICE, b"not an object", qos=1)
    h.wait_for(lambda: any("must be a JSON object" in json.loads(m[1])["error"]
                           for m in errors.messages()),
               what=lambda: "the refusal of a non-object patch: %s" % errors.messages())

    # A direct method and its answer.
    calls = hx.local_sub(gw(conf), "dev/%s/commands/methods/#" % DEVICE)
    observer.publish("$iothub/methods/POST/reboot/?$rid=42", b'{"delay":1}', qos=0)
    calls.wait("dev/%s/commands/methods/reboot/42" % DEVICE, '{"delay":1}')
    local.publish("dev/%s/state/methods/42/200" % DEVICE, b'{"ok":true}', qos=1)
    answer = first("$iothub/methods/res/")
    assert answer[0] == "$iothub/methods/res/200/?$rid=42"
    assert answer[1] == b'{"ok":true}'
    # Nothing of this went to the telemetry topic.
    assert not [m for m in observer.received() if m[0].startswith("devices/")]


def run_diagnose(hx, conf):
    path = hx.write_config(conf, "diagnose.yaml")
    proc = subprocess.run([h.UPLINKCTL_BIN, "diagnose", "-c", path, "--timeout", "5", "cloud"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=h.TIMEOUT + 30)
    return proc.returncode, proc.stdout + proc.stderr


def test_diagnose_sends_the_same_token(hx):
    key_path, _ = fakecloud.device_key(hx.dir, DEVICE)
    other_path, _ = fakecloud.device_key(hx.dir, "other")
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: key_path})
    rc, out = run_diagnose(hx, azure_config(hx, cloud, key_path))
    assert rc == 0, out
    assert "password: a token made now (not shown)" in out, out
    assert re.search(r"token: expires at \d+ = \d{4}-", out), out
    assert "SharedAccessSignature" not in out and "sig=" not in out, out
    cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    # With the wrong key the hub refuses, and diagnose says what IoT Hub checks.
    rc, out = run_diagnose(hx, azure_config(hx, cloud, other_path))
    assert rc == 13, out  # the MQTT step failed
    assert 'azure: the device "%s" must exist and be enabled in hub %s' % (DEVICE, HUB) in out, out
    cloud.wait_event("connect", client_id=DEVICE, result="refused", reason="bad signature")


def child_key(hx, child):
    """A key file for `child` where azure.child_key (<dir>/children/%c.key) looks."""
    os.makedirs(os.path.join(hx.dir, "children"), exist_ok=True)
    return fakecloud.device_key(os.path.join(hx.dir, "children"), child)[0]


def iothub_from(cloud, client_id, prefix):
    """The $iothub topics `client_id` published that start with `prefix` (the fake hub logs
    them with the sender)."""
    return [e["topic"] for e in cloud.events("iothub", client_id=client_id)
            if e["topic"].startswith(prefix)]


def test_children_have_sessions_of_their_own(hx):
    """IoT Hub takes one device per connection: a child with a key file is a session of its
    own, authenticated by the hub with that key, with the whole contract (D2C, C2D, twin,
    direct methods) on its own dev/<child>/ topics; a child without a key is refused."""
    gw_key, _ = fakecloud.device_key(hx.dir, DEVICE)
    valve_key = child_key(hx, "valve-1")
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: gw_key, "valve-1": valve_key})
    conf = azure_config(hx, cloud, gw_key,
                        child_key=os.path.join(hx.dir, "children", "%c.key"))
    observer = hx.cloud_client(cloud)
    observer.subscribe("devices/+/messages/events/#", qos=1)
    daemon = hx.uplinkd(conf)
    cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    local = hx.local_client(gw(conf))
    config = hx.local_sub(gw(conf), "dev/+/config/#")
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")

    local.publish("dev/valve-1/telemetry", b'{"open":true}', qos=1)
    cloud.wait_event("connect", client_id="valve-1", result="accepted")
    observer.wait("devices/valve-1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
                  '{"open":true}')
    daemon.wait_log(r"child valve-1: opening a session of its own as cloud.valve-1 \(key .*"
                    r"children/valve-1.key\)")

    # A child without a key file: refused with the reason, nothing sent.
    local.publish("dev/valve-2/telemetry", b"x", qos=1)
    _, payload, _, _ = errors.wait("uplinkd/cloud/errors")
    error = json.loads(payload)["error"]
    assert ("IoT Hub takes one device per connection, and this child has no usable key for its "
            "own (azure.child_key or azure.group_key_file): cannot read " in error), error
    assert cloud.decisions("valve-2") == []

    # Cloud to device, on the child's own connection.
    commands = hx.local_sub(gw(conf), "dev/+/commands/#")
    h.wait_for(lambda: "devices/valve-1/messages/devicebound/#" in cloud.log_text(),
               what="the child's session subscribed to its cloud-to-device messages")
    observer.publish("devices/valve-1/messages/devicebound/k=v", b"close", qos=1)
    commands.wait("dev/valve-1/commands/k=v", "close")

    # The child's twin: its session asks for it; the answer goes to that connection only.
    get = h.wait_for(lambda: iothub_from(cloud, "valve-1", "$iothub/twin/GET/?$rid="),
                     what="the child's twin GET")[0]
    twin = b'{"desired":{"limit":7},"reported":{}}'
    observer.publish("fakehub/to/valve-1", b"", qos=0)
    observer.publish("$iothub/twin/res/200/?$rid=%s" % get.split("$rid=")[1], twin, qos=0)
    config.wait("dev/valve-1/config/twin", twin.decode())

    # A direct method for the child and its answer, on the child's connection.
    observer.publish("$iothub/methods/POST/close/?$rid=77", b"{}", qos=0)
    commands.wait("dev/valve-1/commands/methods/close/77", "{}")
    local.publish("dev/valve-1/state/methods/77/200", b'{"done":1}', qos=1)
    h.wait_for(lambda: iothub_from(cloud, "valve-1", "$iothub/methods/res/200/?$rid=77"),
               what="the method's answer from the child's session")
    local.publish("dev/valve-1/state", b'{"position":3}', qos=1)
    h.wait_for(lambda: iothub_from(cloud, "valve-1", "$iothub/twin/PATCH/properties/reported/"),
               what="the child's reported patch from its own session")

    # Nothing of the child's went through the gateway's connection, nor to its topics.
    assert not iothub_from(cloud, DEVICE, "$iothub/methods/res/")
    assert not iothub_from(cloud, DEVICE, "$iothub/twin/PATCH/")
    assert not [m for m in config.messages() if m[0].startswith("dev/%s/" % DEVICE)]
    assert not [m for m in commands.messages() if m[0].startswith("dev/%s/" % DEVICE)]
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    sessions = status["uplinks"][0]["sessions"]
    assert sessions["open"] == 1 and sessions["online"] == 1, sessions


def test_group_key_children_rotate_without_loss(hx):
    """azure.group_key_file: each child's key is HMAC-SHA256(group key, child id), derived
    here with Python's hmac for the fake hub. Its 12 s tokens are renewed at 80 % of their
    life under a QoS 1 stream: nothing lost, no kick."""
    gw_key, _ = fakecloud.device_key(hx.dir, DEVICE)
    group_path, group_raw = fakecloud.device_key(hx.dir, "group")
    derived = os.path.join(hx.dir, "sensor-7.derived")
    with open(derived, "w") as f:
        f.write(base64.b64encode(hmac.new(group_raw, b"sensor-7", hashlib.sha256).digest())
                .decode() + "\n")
    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: gw_key, "sensor-7": derived})
    conf = azure_config(hx, cloud, gw_key, group_key_file=group_path, token_lifetime="12s")
    observer = hx.cloud_client(cloud)
    observer.subscribe("devices/sensor-7/messages/events/#", qos=1)
    hx.uplinkd(conf)
    local = hx.local_client(gw(conf))
    sent = []
    deadline = time.monotonic() + 60
    while (len([d for d in cloud.decisions("sensor-7") if d["result"] == "accepted"]) < 2
           and time.monotonic() < deadline):
        for _ in range(20):
            payload = b"s%d" % len(sent)
            local.publish("dev/sensor-7/telemetry", payload, qos=1)
            sent.append(payload.decode())
        h.wait_for(lambda: len(observer.received()) >= len(sent),
                   what=lambda: "the child's stream keeps flowing (%d sent, %d at the hub)"
                   % (len(sent), len(observer.received())))
    accepted = [d for d in cloud.decisions("sensor-7") if d["result"] == "accepted"]
    assert len(accepted) >= 2 and accepted[0]["exp"] != accepted[1]["exp"], accepted
    assert [d for d in cloud.decisions("sensor-7") if d["result"] != "accepted"] == []
    h.wait_for(lambda: set(sent) <= {m[1].decode() for m in observer.received()},
               what="every message of the child at the hub")
    assert cloud.kicks("sensor-7") == []


def test_x509_device_ca_signed_or_by_thumbprint(hx):
    """X.509 instead of a SAS token: the fake hub takes the client certificate (its chain
    verified by the broker against the test CA) and checks what IoT Hub checks: a CA-signed
    certificate's CN is the device id, or the certificate has the registered thumbprint
    (computed here with Python's cryptography). No password is sent. A wrong thumbprint is
    refused and explained."""
    import fakeaws
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes

    cert_path, key_path = fakeaws.make_cert(hx.pki, hx.dir, DEVICE)
    with open(cert_path, "rb") as f:
        thumb = cx509.load_pem_x509_certificate(f.read()).fingerprint(hashes.SHA256()).hex()
    for i, (registered, result) in enumerate([("x509:ca", "accepted"),
                                              ("x509:" + thumb.upper(), "accepted"),
                                              ("x509:" + "00" * 32, "refused")]):
        cloud = fakecloud.start_hub(hx, HUB, {DEVICE: registered}, client_cert="require",
                                    name="hub%d" % i)
        conf = hx.config(cloud, uplink={"profile": "azure", "azure": {"hub": HUB},
                                        "tls": {"ca": hx.pki.ca, "cert": cert_path,
                                                "key": key_path}})
        del conf["uplinks"][0]["generic"]
        conf["uplinks"][0].pop("auth", None)
        observer = hx.cloud_client(cloud)
        observer.subscribe("devices/%s/messages/events/#" % DEVICE, qos=1)
        daemon = hx.uplinkd(conf, name="uplinkd%d" % i)
        line = cloud.wait_event("connect", client_id=DEVICE, result=result)
        assert line["alg"] == "X509", line
        assert line["username"].startswith("%s/%s/?api-version=" % (HUB, DEVICE)), line
        if result == "accepted":
            local = hx.local_client(gw(conf))
            local.publish("dev/%s/telemetry" % DEVICE, b"x509 %d" % i, qos=1)
            observer.wait("devices/%s/messages/events/" % DEVICE, "x509 %d" % i)
        else:
            assert line["reason"] == "bad thumbprint", line
            daemon.wait_log(r"IoT Hub did not authorise the device")
        daemon.stop()


def test_sas_key_inside_a_pkcs11_token(hx):
    """azure.key_file as a pkcs11: URI: the device key is imported into a softhsm2 token
    (uplinkctl cert import-secret) and every SAS token is signed there (CKM_SHA256_HMAC); the
    fake hub checks it with the key file it was given, and a renewed token is signed again."""
    from test_pkcs11 import SoftHsm
    token = SoftHsm(hx.dir)
    key_path, _ = fakecloud.device_key(hx.dir, DEVICE)
    uri = "pkcs11:token=gw;object=hub-key"
    imported = subprocess.run([h.UPLINKCTL_BIN, "cert", "import-secret", "--from", key_path,
                               "--key", uri, "--pin-file", token.pin_path], capture_output=True,
                              text=True, env=dict(os.environ, **token.env),
                              stdin=subprocess.DEVNULL, timeout=h.TIMEOUT)
    assert imported.returncode == 0, imported.stderr
    assert "stored in the token" in imported.stdout
    listing = token.run("pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so",
                        "--token-label", "gw", "--login", "--pin", "1234",
                        "--list-objects").stdout
    assert "Secret Key Object; Generic secret length 32" in listing, listing

    cloud = fakecloud.start_hub(hx, HUB, {DEVICE: key_path})
    conf = azure_config(hx, cloud, key_path, token_lifetime="12s")
    conf["uplinks"][0]["azure"]["key_file"] = "%s;pin-source=file:%s" % (uri, token.pin_path)
    observer = hx.cloud_client(cloud)
    observer.subscribe("devices/%s/messages/events/#" % DEVICE, qos=1)
    hx.uplinkd(conf, env=token.env)
    cloud.wait_event("connect", client_id=DEVICE, result="accepted")
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % DEVICE, b"signed in the token", qos=1)
    observer.wait("devices/%s/messages/events/" % DEVICE, "signed in the token")
    second = cloud.wait_event("connect", client_id=DEVICE, result="accepted", since=1,
                              timeout=30)
    assert second["exp"] != cloud.decisions(DEVICE)[0]["exp"]
    assert [d for d in cloud.decisions(DEVICE) if d["result"] != "accepted"] == []
