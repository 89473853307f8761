"""Profile aws: mutual TLS (and ALPN x-amzn-mqtt-ca), AWS's topic rules, Device Shadow and Jobs.

The cloud is a real mosquitto whose TLS listeners require a client certificate from the test
CA, with the Shadow and Jobs services of tests/integration/fakeaws.py answering on the
reserved $aws/things/<thing>/ topics as AWS's developer guide documents them. Port 443's ALPN
is checked by harness.SniFront, which serves only a client offering x-amzn-mqtt-ca and
records the protocol and the client certificate's CN of each handshake.
"""

import json
import os
import re
import stat

import pytest

import fakeaws
import harness as h

THING = "gw-test"  # gateway.id in harness.make_config: the default thing name
ALPN = "x-amzn-mqtt-ca"  # AWS IoT Core's protocol for mutual TLS on port 443


def aws_config(hx, broker, port=None, **aws):
    uplink = {"profile": "aws",
              "tls": {"ca": hx.pki.ca, "cert": hx.pki.path("client.pem"),
                      "key": hx.pki.path("client.key")}}
    if aws:
        uplink["aws"] = aws
    conf = hx.config(broker, port=port, uplink=uplink)
    del conf["uplinks"][0]["generic"]
    return conf


def start(hx, port=None, alpn=None, before=None, **aws):
    broker = hx.broker(name="aws", client_cert=True)
    services = fakeaws.AwsServices(broker)
    hx.add_closer(services.close)
    if before:
        before(services)
    observer = hx.cloud_client(broker)
    observer.subscribe("dt/#", qos=1)
    observer.subscribe("plain/#", qos=1)
    conf = aws_config(hx, broker, port=port, **aws)
    if alpn:
        conf["uplinks"][0]["tls"]["alpn"] = alpn
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"state \w+ -> ONLINE")
    return broker, services, observer, conf, daemon


def gw(conf):
    return type("Gw", (), {"unix": h.local_unix_path(conf), "tcp_port": h.local_tcp_port(conf)})


def errors_of(sub):
    return [json.loads(m[1])["error"] for m in sub.messages() if m[0] == "uplinkd/cloud/errors"]


def wait_error(sub, words):
    return h.wait_for(lambda: next((e for e in errors_of(sub) if words in e), None),
                      what=lambda: "an error with %r (have %s)" % (words, errors_of(sub)))


def test_mutual_tls_behind_alpn_front(hx):
    """Port 443 the AWS way: the front serves only x-amzn-mqtt-ca and a client certificate."""
    broker = hx.broker(name="aws", client_cert=True)
    front = hx.sni_front(broker, alpn=ALPN, client_cert=True)
    observer = hx.cloud_client(broker)
    observer.subscribe("dt/#", qos=1)
    conf = aws_config(hx, broker, port=front.port)
    conf["uplinks"][0]["tls"]["alpn"] = ALPN
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"state \w+ -> ONLINE")
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % THING, b"21.5", qos=1)
    observer.wait("dt/%s/%s" % (THING, THING), "21.5")
    assert front.alpn and set(front.alpn) == {"x-amzn-mqtt-ca"}, front.alpn
    assert front.peers and set(front.peers) == {"gw-test"}, front.peers  # client.pem's CN


def test_port_443_offers_alpn_by_default(hx):
    """port: 443 and no tls.alpn: uplinkd offers x-amzn-mqtt-ca by itself (AWS serves HTTPS
    on 443 too and picks MQTT by ALPN). Needs port 443 on loopback: root, and free."""
    broker = hx.broker(name="aws", client_cert=True)
    try:
        front = hx.sni_front(broker, alpn=ALPN, client_cert=True, port=443)
    except OSError as e:
        pytest.skip("cannot listen on loopback port 443: %s" % e)
    conf = aws_config(hx, broker, port=443)
    assert "alpn" not in conf["uplinks"][0]["tls"]
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"state \w+ -> ONLINE")
    assert front.alpn and set(front.alpn) == {ALPN}, front.alpn


def test_telemetry_commands_and_topic_rules(hx):
    broker, services, observer, conf, daemon = start(hx, jobs=False)
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")

    local.publish("dev/%s/telemetry" % THING, b"21.5", qos=2)
    local.publish("dev/valve-1/telemetry/temp", b"7", qos=1)
    observer.wait("dt/%s/%s" % (THING, THING), "21.5")
    observer.wait("dt/%s/valve-1/temp" % THING, "7")
    assert all(m[2] == 1 for m in observer.received())  # AWS has no QoS 2

    # Refused before the spool: AWS would close the connection over each of them.
    local.publish("dev/valve-1/telemetry/a/b/c/d/e/f", b"deep", qos=1)
    wait_error(errors, "at most 7 '/'")
    local.publish("cloud/cloud/$aws/events/presence/connected/x", b"raw", qos=1)
    wait_error(errors, "topics starting with $ are reserved by AWS IoT Core")
    local.publish("dev/valve-1/telemetry", b"x" * (128 * 1024 + 1), qos=1)
    wait_error(errors, "at most 128 KiB")
    local.publish("cloud/cloud/plain/big", b"x" * (128 * 1024 + 1), qos=1)
    wait_error(errors, "larger than this cloud takes")
    local.publish("dev/%s/state/jobs" % THING, b"{}", qos=1)
    wait_error(errors, "aws.jobs is false")
    local.publish("cloud/cloud/plain/raw", b"raw ok", qos=1)
    observer.wait("plain/raw", "raw ok")
    assert sorted(m[0] for m in observer.received()) == [
        "dt/%s/%s" % (THING, THING), "dt/%s/valve-1/temp" % THING, "plain/raw"]

    # Commands: cmd/<gateway>/<child>[/<sub>] -> dev/<child>/commands[/<sub>].
    sub = hx.local_sub(gw(conf), "dev/+/commands/#", "dev/+/commands")
    h.wait_for(lambda: "cmd/%s/#" % THING in broker.log_text(), what="SUBSCRIBE cmd/gw-test/#")
    observer.publish("cmd/%s/valve-1/open" % THING, b"now", qos=1)
    observer.publish("cmd/%s/%s" % (THING, THING), b"reboot", qos=1)
    sub.wait("dev/valve-1/commands/open", "now")
    sub.wait("dev/%s/commands" % THING, "reboot")


def test_device_shadow(hx):
    """Classic and named shadow: fetched on connect, reported from dev/<id>/state, deltas."""
    broker, services, observer, conf, daemon = start(
        hx, before=lambda s: s.set_desired(THING, {"interval": 10}), shadows=["config"],
        jobs=False)
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    config = hx.local_sub(gw(conf), "dev/%s/config/#" % THING)

    # The document fetched on connect, retained locally for late subscribers.
    _, doc, _, _ = config.wait("dev/%s/config/shadow" % THING)
    assert json.loads(doc)["state"]["desired"] == {"interval": 10}
    # (The first subscriber may have been there before the document came, and then gets it
    # live, without the retain flag: a subscriber made after it must get the retained copy.)
    late = hx.local_sub(gw(conf), "dev/%s/config/shadow" % THING)
    assert late.wait("dev/%s/config/shadow" % THING, doc)[3]
    # The named shadow does not exist yet: no error, a line in the log.
    daemon.wait_log(r"the thing gw-test has no config shadow yet")

    local.publish("dev/%s/state" % THING, b'{"interval": 5, "fw": "1.0"}', qos=1)
    h.wait_for(lambda: services.reported(THING) == {"interval": 5, "fw": "1.0"},
               what=lambda: "reported state at the shadow (%s)" % services.reported(THING))
    update = services.wait_request("$aws/things/%s/shadow/update" % THING)
    assert update[1] == {"state": {"reported": {"interval": 5, "fw": "1.0"}}}
    _, delta, _, _ = config.wait("dev/%s/config/delta" % THING)
    assert json.loads(delta)["state"] == {"interval": 10}

    local.publish("dev/%s/state/shadow/config" % THING, b'{"mode": "eco"}', qos=1)
    h.wait_for(lambda: services.reported(THING, "config") == {"mode": "eco"},
               what="the named shadow's reported state")
    services.set_desired(THING, {"mode": "boost"}, name="config")
    _, delta, _, _ = config.wait("dev/%s/config/delta/config" % THING)
    assert json.loads(delta)["state"] == {"mode": "boost"}

    # Refused by the service: reported on the errors topic; refused locally: not sent.
    local.publish("dev/%s/state" % THING, b'{"reject-me": 1}', qos=1)
    wait_error(errors, "AWS IoT Core rejected the shadow update of thing gw-test")
    local.publish("dev/%s/state" % THING, b"not json", qos=1)
    wait_error(errors, "must be a JSON object of reported state")
    assert not [e for e in errors_of(errors) if "shadow get" in e]  # the 404 is no error
    updates = [r for r in services.requests if r[0].endswith("/shadow/update")]
    assert len(updates) == 2, updates  # "not json" never left


def test_jobs(hx):
    """The next job on connect and on notify-next, start-next, updates, and a restart."""
    broker, services, observer, conf, daemon = start(
        hx, before=lambda s: s.add_job(THING, "job-1", {"op": "reboot"}))
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    jobs = hx.local_sub(gw(conf), "dev/%s/commands/jobs/#" % THING)

    def nexts():
        return [json.loads(m[1]).get("execution", {}).get("jobId")
                for m in jobs.messages() if m[0] == "dev/%s/commands/jobs/next" % THING]

    h.wait_for(lambda: "job-1" in nexts(), what=lambda: "job-1 as the next job (%s)" % nexts())
    local.publish("dev/%s/state/jobs" % THING, b"", qos=1)  # start-next
    _, started, _, _ = jobs.wait("dev/%s/commands/jobs/started" % THING)
    assert json.loads(started)["execution"]["status"] == "IN_PROGRESS"
    assert services.job_status(THING, "job-1") == "IN_PROGRESS"

    services.add_job(THING, "job-2", {"op": "update"})
    local.publish("dev/%s/state/jobs/job-1" % THING, b'{"status": "SUCCEEDED"}', qos=1)
    h.wait_for(lambda: nexts()[-1:] == ["job-2"], what=lambda: "job-2 notified (%s)" % nexts())
    assert services.job_status(THING, "job-1") is None

    local.publish("dev/%s/state/jobs/nope" % THING, b'{"status": "SUCCEEDED"}', qos=1)
    wait_error(errors, "AWS IoT Core rejected the job nope update of thing gw-test")
    local.publish("dev/%s/state/jobs/bad:id" % THING, b"{}", qos=1)
    wait_error(errors, "a job id is 1 to 64 characters")

    # After a restart the pending job is fetched again.
    gets = len([r for r in services.requests if r[0].endswith("/jobs/$next/get")])
    mark = daemon.log_size()
    daemon.stop()
    daemon.start()
    daemon.wait_log(r"state \w+ -> ONLINE", since=mark)
    h.wait_for(lambda: len([r for r in services.requests if r[0].endswith("/jobs/$next/get")])
               > gets, what="a $next/get after the restart")
    late = hx.local_sub(gw(conf), "dev/%s/commands/jobs/next" % THING)
    _, doc, _, _ = late.wait("dev/%s/commands/jobs/next" % THING)
    assert json.loads(doc)["execution"]["jobId"] == "job-2"


def test_child_shadow_through_gateway(hx):
    broker, services, observer, conf, daemon = start(hx, jobs=False)
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    config = hx.local_sub(gw(conf), "dev/valve-1/config/#")

    # First message of the child on this connection: its shadow is fetched (none yet).
    local.publish("dev/valve-1/state", b'{"open": false}', qos=1)
    services.wait_request("$aws/things/valve-1/shadow/get")
    h.wait_for(lambda: services.reported("valve-1") == {"open": False},
               what="the child's reported state")
    daemon.wait_log(r"the thing valve-1 has no shadow yet")
    h.wait_for(lambda: "$aws/things/valve-1/shadow/update/delta" in broker.log_text(),
               what="SUBSCRIBE to the child's deltas")
    services.set_desired("valve-1", {"open": True})
    _, delta, _, _ = config.wait("dev/valve-1/config/delta")
    assert json.loads(delta)["state"] == {"open": True}

    # After a reconnect, the child's next message fetches its (now existing) shadow.
    mark = daemon.log_size()
    h.uplinkctl(conf["control"]["socket"], "reconnect", "cloud", json_output=False)
    daemon.wait_log(r"state \w+ -> ONLINE", since=mark)
    local.publish("dev/valve-1/telemetry", b"1", qos=1)
    _, doc, _, _ = config.wait("dev/valve-1/config/shadow")
    assert json.loads(doc)["state"]["reported"] == {"open": False}

    local.publish("dev/valve-1/state/shadow/x", b"{}", qos=1)
    wait_error(errors, "named shadows and jobs are the gateway's")


def test_child_shadows_off(hx):
    """aws.child_shadows: false, for a policy that allows the gateway's own shadow only: a
    child's telemetry goes up and nothing under $aws/things/<child>/ is sent."""
    broker, services, observer, conf, daemon = start(hx, jobs=False, child_shadows=False)
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    local.publish("dev/valve-1/telemetry", b"1", qos=1)
    local.publish("dev/valve-1/state", b'{"open": true}', qos=1)
    wait_error(errors, "aws.child_shadows is false")
    local.publish("dev/valve-1/telemetry", b"2", qos=1)
    observer.wait("dt/%s/valve-1" % THING, "2")
    assert not [r for r in services.requests if "/valve-1/" in r[0]], services.requests
    assert "$aws/things/valve-1/" not in broker.log_text()


def provisioning_setup(hx, template):
    broker = hx.broker(name="aws", client_cert=True)
    services = fakeaws.AwsServices(broker)
    hx.add_closer(services.close)
    services.enable_provisioning(hx.pki, "fleet-1")
    observer = hx.cloud_client(broker)
    observer.subscribe("dt/#", qos=1)
    conf = aws_config(hx, broker, provisioning={"template": template})
    claim_cert, claim_key = fakeaws.make_cert(hx.pki, hx.dir, "claim")
    conf["uplinks"][0]["tls"].update({"cert": claim_cert, "key": claim_key})
    return broker, services, observer, conf


def test_fleet_provisioning(hx):
    """Claim certificate -> CreateKeysAndCertificate -> RegisterThing -> the issued
    certificate, stored 0600 and used from then on; data published meanwhile waits."""
    broker, services, observer, conf = provisioning_setup(hx, "fleet-1")
    daemon = hx.uplinkd(conf)
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % THING, b"early", qos=1)  # while claiming: spooled
    daemon.wait_log(r"fleet provisioning: thing gw-test has its own certificate")
    observer.wait("dt/%s/%s" % (THING, THING), "early")
    assert services.registered == [("fleet-1", {"ThingName": THING}, THING)]

    log = broker.log_text()
    issued = re.search(r"New client connected .* as gw-test .*u'issued-", log)
    assert issued, "no connection with the issued certificate:\n" + broker.log_tail()
    # Nothing but provisioning went out with the claim certificate.
    assert log.index("'dt/gw-test/gw-test'") > issued.start()
    assert log.index("'$aws/things/gw-test/shadow/get'") > issued.start()
    assert "'$aws/certificates/create/json'" in log[:issued.start()]

    state = os.path.join(conf["gateway"]["state_dir"], "provisioned", "cloud")
    for name in ("certificate.pem", "private.key", "thing"):
        mode = stat.S_IMODE(os.stat(os.path.join(state, name)).st_mode)
        assert mode == 0o600, (name, oct(mode))
    with open(os.path.join(state, "thing")) as f:
        assert f.read() == THING + "\n"
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    assert status["uplinks"][0]["provisioning"] == {"template": "fleet-1", "state": "DONE",
                                                    "thing": THING}

    # A restart uses the stored certificate at once: no second CreateKeysAndCertificate.
    mark = daemon.log_size()
    daemon.stop()
    daemon.start()
    daemon.wait_log(r"using the certificate issued for thing gw-test", since=mark)
    daemon.wait_log(r"state \w+ -> ONLINE", since=mark)
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % THING, b"after restart", qos=1)
    observer.wait("dt/%s/%s" % (THING, THING), "after restart")
    creates = [r for r in services.requests if r[0] == "$aws/certificates/create/json"]
    assert len(creates) == 1, creates


def test_fleet_provisioning_refused(hx):
    """A template AWS does not know: the refusal is reported, the data stays spooled."""
    broker, services, observer, conf = provisioning_setup(hx, "no-such-template")
    daemon = hx.uplinkd(conf)
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    local = hx.local_client(gw(conf))
    local.publish("dev/%s/telemetry" % THING, b"kept", qos=1)
    wait_error(errors, "AWS IoT Core refused fleet provisioning (RegisterThing, template "
                       "no-such-template)")
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    up = status["uplinks"][0]
    assert up["provisioning"]["state"] == "CLAIM"
    assert observer.received() == []
    assert not os.path.exists(os.path.join(conf["gateway"]["state_dir"], "provisioned", "cloud",
                                           "thing"))


def test_child_with_its_own_certificate_is_a_thing_of_its_own(hx):
    """aws.child_cert/child_key: a child whose certificate exists connects as its own thing
    (the broker sees its certificate's CN), with telemetry, commands, its shadow and its jobs
    on its own connection; a child without one still goes through the gateway; a child whose
    certificate is unusable is refused with the reason."""
    things = os.path.join(hx.dir, "things")
    os.makedirs(things)
    fakeaws.make_cert(hx.pki, things, "valve-1")
    for ext in ("pem", "key"):
        with open(os.path.join(things, "bad-1." + ext), "w") as f:
            f.write("not PEM\n")
    broker, services, observer, conf, daemon = start(
        hx, child_cert=os.path.join(things, "%c.pem"), child_key=os.path.join(things, "%c.key"),
        before=lambda s: s.add_job("valve-1", "job-v", {"op": "open"}))
    local = hx.local_client(gw(conf))
    errors = hx.local_sub(gw(conf), "uplinkd/cloud/errors")
    config = hx.local_sub(gw(conf), "dev/valve-1/config/#")
    commands = hx.local_sub(gw(conf), "dev/valve-1/commands/#")

    local.publish("dev/valve-1/telemetry", b"7", qos=1)
    observer.wait("dt/valve-1/valve-1", "7")
    h.wait_for(lambda: re.search(r"as valve-1 \(.*u'valve-1'\)", broker.log_text()),
               what="the child's connection, authenticated by its own certificate")
    local.publish("dev/valve-2/telemetry", b"8", qos=1)
    observer.wait("dt/%s/valve-2" % THING, "8")

    # Its shadow and its jobs, on its own connection.
    services.wait_request("$aws/things/valve-1/shadow/get")
    services.set_desired("valve-1", {"open": True})
    config.wait("dev/valve-1/config/delta")
    local.publish("dev/valve-1/state", b'{"open":true}', qos=1)
    h.wait_for(lambda: services.reported("valve-1") == {"open": True},
               what=lambda: "the child's reported state (%s)" % services.reported("valve-1"))
    h.wait_for(lambda: any(json.loads(m[1]).get("execution", {}).get("jobId") == "job-v"
                           for m in commands.messages()
                           if m[0] == "dev/valve-1/commands/jobs/next"),
               what=lambda: "job-v as the child's next job (%s)" % commands.messages())
    local.publish("dev/valve-1/state/jobs/job-v", b'{"status": "SUCCEEDED"}', qos=1)
    h.wait_for(lambda: services.job_status("valve-1", "job-v") is None,
               what="the child's job done")
    observer.publish("cmd/valve-1/valve-1/close", b"now", qos=1)
    commands.wait("dev/valve-1/commands/close", "now")
    local.publish("dev/valve-1/state/shadow/extra", b"{}", qos=1)
    wait_error(errors, "named shadows are the gateway's")

    # A certificate that cannot be used: refused, with the reason.
    local.publish("dev/bad-1/telemetry", b"x", qos=1)
    wait_error(errors, "AWS IoT Core authenticates each thing by its certificate, and this "
                       "child's cannot be used")
    assert not [m for m in observer.received() if m[0].endswith("/bad-1")]
    status = json.loads(h.uplinkctl(conf["control"]["socket"], "--json", "status").stdout)
    sessions = status["uplinks"][0]["sessions"]
    assert sessions["online"] == 1 and sessions["no_key"] == 1, sessions
