"""TLS towards the cloud: SNI, CA verification, host name verification."""

import harness as h


def test_sni_is_the_configured_host(hx):
    """Managed brokers (HiveMQ Cloud) drop clients that send no SNI; uplinkd
    must always send the configured host. The SNI front terminates TLS with
    the "localhost" certificate, records the server_name of each ClientHello
    and relays to mosquitto's plain listener."""
    broker = hx.broker()
    front = hx.sni_front(broker)
    conf = hx.config(broker, port=front.port)
    gw = hx.uplinkd(conf)
    sub = hx.cloud_sub(broker, "gw-test/#")
    h.mosquitto_pub("--unix", h.local_unix_path(conf), "-q", "1",
                    "-t", "dev/sni-child/telemetry", "-m", "via-front")
    sub.wait("gw-test/sni-child/telemetry", "via-front")
    assert front.server_names, "no TLS handshake reached the front (errors: %s)" % front.errors
    assert all(name == "localhost" for name in front.server_names), \
        "SNI sent: %r, expected 'localhost' every time" % front.server_names
    assert gw.running()


def test_wrong_ca_is_reported_in_words(hx):
    broker = hx.broker()
    conf = hx.config(broker, uplink={"tls": {"ca": hx.pki.other_ca}})
    daemon = hx.uplinkd(conf)
    # One error-level line must say what failed and name the host (library
    # debug lines saying only "certificate verify failed" do not count).
    daemon.wait_log(r"^(?=.*\b(error|warning): )(?=.*certificate verify failed)(?=.*localhost)")
    # A TLS failure is not fatal: uplinkd keeps running and retrying.
    assert daemon.running()
    assert "as gw-test" not in broker.log_text(), "uplinkd got through with the wrong CA"


def test_hostname_mismatch_is_reported(hx):
    # The broker serves a certificate from the trusted CA, but for
    # wrong-host.invalid; uplinkd connects to "localhost" and must refuse.
    broker = hx.broker(cert="wronghost")
    daemon = hx.uplinkd(hx.config(broker))
    daemon.wait_log(r"^(?=.*\b(error|warning): )"
                    r"(?=.*(mismatch|does not match|host ?name verification))(?=.*localhost)")
    assert daemon.running()
    assert "as gw-test" not in broker.log_text(), \
        "uplinkd completed an MQTT CONNECT to a broker with the wrong host name"
