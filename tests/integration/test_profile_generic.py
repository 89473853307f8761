"""Generic profile: template rules in both directions, QoS per rule.

    generic:
      up:   [{local: telemetry, cloud: "gw/{child}/t/{sub}", qos: 1},
             {local: state, cloud: "things/{child}/shadow", qos: 0}]
      down: [{cloud: "gw/{child}/cmd/{sub}", local: commands},
             {cloud: "cfg/{child}", local: config}]

(The prefix-only default is covered by test_e2e.py.)
"""

import json

import harness as h

RULES = {
    "up": [{"local": "telemetry", "cloud": "gw/{child}/t/{sub}", "qos": 1},
           {"local": "state", "cloud": "things/{child}/shadow", "qos": 0}],
    "down": [{"cloud": "gw/{child}/cmd/{sub}", "local": "commands"},
             {"cloud": "cfg/{child}", "local": "config"}],
}


def start(hx):
    return hx.gateway(uplink={"generic": RULES})


def test_up_rules_map_topics_and_qos(hx):
    gw = start(hx)
    cloud = hx.cloud_client(gw.broker)
    cloud.subscribe("#", qos=1)
    local = hx.local_client(gw)
    local.publish("dev/pump-1/telemetry/flow", b"12", qos=0)
    local.publish("dev/pump-1/telemetry", b"13", qos=0)
    local.publish("dev/pump-2/state", b'{"on":true}', qos=1)
    _, _, qos, _ = cloud.wait("gw/pump-1/t/flow", b"12")
    assert qos == 1, "the rule's qos 1 applies to a QoS 0 local publish"
    cloud.wait("gw/pump-1/t", b"13")  # no sub-topic: the {sub} level is left out
    _, _, qos, _ = cloud.wait("things/pump-2/shadow", b'{"on":true}')
    assert qos == 0
    # Nothing else reached the cloud (status topics stay local).
    assert sorted(m[0] for m in cloud.received()) == ["gw/pump-1/t", "gw/pump-1/t/flow",
                                                       "things/pump-2/shadow"]


def test_sub_topic_without_sub_level_is_refused(hx):
    gw = hx.gateway(uplink={"generic": {"up": [{"local": "telemetry", "cloud": "x/{child}"}]}})
    errors = hx.local_sub(gw, "uplinkd/cloud/errors")
    cloud = hx.cloud_client(gw.broker)
    cloud.subscribe("#", qos=1)
    local = hx.local_client(gw)
    local.publish("dev/a/telemetry/deep", b"1")
    local.publish("dev/a/state", b"2")
    h.wait_for(lambda: len(errors.messages()) >= 2, what="2 refusals")
    reasons = [json.loads(m[1])["error"] for m in errors.messages()]
    assert "{sub}" in reasons[0], reasons
    assert "no generic.up rule" in reasons[1], reasons
    local.publish("dev/a/telemetry", b"marker")
    cloud.wait("x/a", b"marker")
    assert [m[0] for m in cloud.received()] == ["x/a"]


def test_down_rules_reach_the_right_local_subscriber(hx):
    gw = start(hx)
    gw.daemon.wait_log(r'subscribed to "gw/\+/cmd/#"')
    gw.daemon.wait_log(r'subscribed to "cfg/\+"')
    cloud = hx.cloud_client(gw.broker)
    app = hx.local_client(gw)
    app.subscribe("dev/#")
    cloud.publish("gw/pump-1/cmd/reboot", b"now")
    cloud.publish("cfg/pump-2", b'{"rate":5}')
    cloud.publish("gw/pump-1/other", b"ignored")
    app.wait("dev/pump-1/commands/reboot", b"now")
    _, _, _, retain = app.wait("dev/pump-2/config", b'{"rate":5}')
    # config is kept (retained) locally: a late subscriber still gets it.
    late = hx.local_client(gw)
    late.subscribe("dev/pump-2/config")
    late.wait("dev/pump-2/config", b'{"rate":5}')
    assert sorted(m[0] for m in app.received()) == ["dev/pump-1/commands/reboot",
                                                     "dev/pump-2/config"]


def test_reload_to_rules_moves_the_subscriptions(hx):
    gw = hx.gateway()
    gw.daemon.wait_log(r'subscribed to "gw-test/\+/config"')
    app = hx.local_client(gw)
    app.subscribe("dev/#")
    cloud = hx.cloud_client(gw.broker)
    conf = dict(gw.conf)
    conf["uplinks"] = [dict(gw.conf["uplinks"][0], generic={"down": RULES["down"]})]
    hx.write_config(conf, "uplinkd.yaml")
    since = gw.daemon.log_size()
    gw.daemon.reload()
    gw.daemon.wait_log(r'subscribed to "cfg/\+"', since=since)
    gw.daemon.wait_log(r"reload done", since=since)
    # The old prefix filters are gone upstream (UNSUBSCRIBE went out before
    # "reload done"); the new rule works.
    cloud.publish("gw-test/pump-1/config", b"old")
    cloud.publish("cfg/pump-1", b"new")
    app.wait("dev/pump-1/config", b"new")
    assert [m[1] for m in app.received()] == [b"new"], app.received()


def test_connack_5_over_tls_mentions_sni_and_client_certificate(hx):
    broker = hx.broker(users={"someone": "secret"})
    conf = hx.config(broker)
    conf["uplinks"][0].pop("auth", None)  # no credentials: the broker answers CONNACK 5
    daemon = hx.uplinkd(conf)
    daemon.wait_log(r"refused the connection: CONNACK 5 not authorized: the server may require "
                    r"SNI .* or a client certificate \(tls.cert and tls.key\)")
