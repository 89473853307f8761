"""A fake AWS IoT Core for the aws profile tests: the Device Shadow and Jobs services.

The broker is a real mosquitto whose TLS listeners require a client certificate from the
test CA (harness.Broker with client_cert=True), optionally behind harness.SniFront with
ALPN x-amzn-mqtt-ca, which is how AWS serves mutual TLS on port 443. The services are a
paho client on the broker's plain listener that answers the reserved topics the way the AWS
IoT Core developer guide documents them ("Device Shadow service MQTT topics", "Jobs device
MQTT API operations"), independently of uplinkd's code:

- shadow get: get/accepted with the document ({"state":{"reported","desired"}, "version"}),
  or get/rejected {"code":404,...} when the shadow does not exist;
- shadow update: a document with a "state" object is merged (null deletes a key), answered on
  update/accepted, and update/delta carries the desired keys that reported does not match;
  anything else is answered on update/rejected {"code":400,...};
- fleet provisioning (enable_provisioning()): $aws/certificates/create/json issues a new key
  and a certificate signed by the test CA (so the broker accepts it) with a one-time
  certificateOwnershipToken; $aws/provisioning-templates/<t>/provision/json checks the token
  and the template and answers {"thingName": parameters["ThingName"]};
- jobs: $next/get answers {"execution": ...} (or {} when nothing is queued), start-next moves
  the next job to IN_PROGRESS, <id>/update with a terminal status removes it and sends
  notify-next with the job after it.
"""

import datetime
import json
import secrets
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import harness as h


def make_cert(pki, directory, cn):
    """A client certificate for `cn` signed by the test CA (a claim certificate): writes
    <cn>.pem and <cn>.key into `directory` and returns their paths."""
    cert_pem, key_pem = _signed(pki, cn)
    paths = []
    for ext, text in (("pem", cert_pem), ("key", key_pem)):
        path = "%s/%s.%s" % (directory, cn, ext)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return tuple(paths)


def _signed(pki, cn):
    with open(pki.path("ca.pem"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(pki.path("ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()).decode())


def _merge(into, patch):
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _delta(desired, reported):
    out = {}
    for key, value in desired.items():
        if isinstance(value, dict) and isinstance(reported.get(key), dict):
            sub = _delta(value, reported[key])
            if sub:
                out[key] = sub
        elif reported.get(key) != value:
            out[key] = value
    return out


class AwsServices:
    """Shadow and Jobs services on `broker` (its plain listener). `requests` records every
    (topic, parsed JSON payload or raw bytes) they received, in order."""

    def __init__(self, broker, reject_key="reject-me"):
        self.reject_key = reject_key  # a reported key the shadow service refuses (400)
        self.shadows = {}  # (thing, name or "") -> {"reported": {}, "desired": {}, "version": n}
        self.jobs = {}  # thing -> list of {"jobId", "status", "jobDocument"}
        self.requests = []
        self.issued = {}  # certificateOwnershipToken -> certificateId, until used
        self.registered = []  # (template, parameters, thingName) of every RegisterThing
        self._pki = self._template = None
        self._lock = threading.Lock()
        self.client = h.MqttClient("127.0.0.1", broker.plain_port).connect()
        self.client.client.on_message = self._on_message
        for filt in ("$aws/things/+/shadow/get", "$aws/things/+/shadow/update",
                     "$aws/things/+/shadow/name/+/get", "$aws/things/+/shadow/name/+/update",
                     "$aws/things/+/jobs/$next/get", "$aws/things/+/jobs/start-next",
                     "$aws/things/+/jobs/+/update"):
            self.client.subscribe(filt, qos=1)

    # -- what the tests set and read ------------------------------------------

    def enable_provisioning(self, pki, template):
        """Answer CreateKeysAndCertificate and RegisterThing for `template`."""
        self._pki, self._template = pki, template
        self.client.subscribe("$aws/certificates/create/json", qos=1)
        self.client.subscribe("$aws/provisioning-templates/+/provision/json", qos=1)

    def set_desired(self, thing, desired, name=""):
        with self._lock:
            shadow = self._shadow(thing, name)
            _merge(shadow["desired"], desired)
            shadow["version"] += 1
        self._send_delta(thing, name)

    def add_job(self, thing, job_id, document):
        with self._lock:
            queue = self.jobs.setdefault(thing, [])
            queue.append({"jobId": job_id, "status": "QUEUED", "jobDocument": document,
                          "versionNumber": 1, "executionNumber": 1})
            first = len(queue) == 1
        if first:
            self._notify_next(thing)

    def reported(self, thing, name=""):
        with self._lock:
            shadow = self.shadows.get((thing, name))
            return dict(shadow["reported"]) if shadow else None

    def job_status(self, thing, job_id):
        with self._lock:
            for job in self.jobs.get(thing, []):
                if job["jobId"] == job_id:
                    return job["status"]
        return None

    def wait_request(self, topic, timeout=h.TIMEOUT):
        return h.wait_for(lambda: next((r for r in list(self.requests) if r[0] == topic), None),
                          timeout, what=lambda: "request on %s (got %s)"
                          % (topic, [r[0] for r in self.requests][-8:]))

    def close(self):
        self.client.close()

    # -- the services -----------------------------------------------------------

    def _shadow(self, thing, name):
        return self.shadows.setdefault((thing, name), {"reported": {}, "desired": {},
                                                       "version": 0})

    def _publish(self, topic, doc):
        self.client.client.publish(topic, json.dumps(doc), 1)

    @staticmethod
    def _base(thing, name):
        if name:
            return "$aws/things/%s/shadow/name/%s" % (thing, name)
        return "$aws/things/%s/shadow" % thing

    def _send_delta(self, thing, name):
        with self._lock:
            shadow = self._shadow(thing, name)
            delta = _delta(shadow["desired"], shadow["reported"])
            version = shadow["version"]
        if delta:
            self._publish(self._base(thing, name) + "/update/delta",
                          {"state": delta, "version": version, "timestamp": int(time.time())})

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            payload = msg.payload
        self.requests.append((msg.topic, payload))
        levels = msg.topic.split("/")
        if levels[1] in ("certificates", "provisioning-templates"):
            self._provisioning_request(levels, payload)
            return
        thing = levels[2]
        if levels[3] == "shadow":
            name = levels[5] if levels[4] == "name" else ""
            self._shadow_request(thing, name, levels[-1], payload)
        elif levels[3] == "jobs":
            self._jobs_request(thing, levels[4:], payload)

    def _shadow_request(self, thing, name, op, payload):
        base = self._base(thing, name)
        if op == "get":
            with self._lock:
                shadow = self.shadows.get((thing, name))
                doc = None if shadow is None else {
                    "state": {"reported": shadow["reported"], "desired": shadow["desired"]},
                    "version": shadow["version"], "timestamp": int(time.time())}
            if doc is None:
                self._publish(base + "/get/rejected",
                              {"code": 404, "message": "No shadow exists with name: '%s'"
                               % (name or thing)})
            else:
                self._publish(base + "/get/accepted", doc)
            return
        state = payload.get("state") if isinstance(payload, dict) else None
        reported = state.get("reported", {}) if isinstance(state, dict) else None
        if not isinstance(reported, dict) or self.reject_key in reported:
            self._publish(base + "/update/rejected",
                          {"code": 400, "message": "Invalid JSON or refused state"})
            return
        with self._lock:
            shadow = self._shadow(thing, name)
            _merge(shadow["reported"], reported)
            _merge(shadow["desired"], state.get("desired") or {})
            shadow["version"] += 1
            version = shadow["version"]
        self._publish(base + "/update/accepted", {"state": state, "version": version})
        self._send_delta(thing, name)

    def _execution(self, thing, job):
        return {"jobId": job["jobId"], "thingName": thing, "status": job["status"],
                "jobDocument": job["jobDocument"], "versionNumber": job["versionNumber"],
                "executionNumber": job["executionNumber"]}

    def _next(self, thing):
        with self._lock:
            queue = self.jobs.get(thing, [])
            return self._execution(thing, queue[0]) if queue else None

    def _notify_next(self, thing):
        nxt = self._next(thing)
        self._publish("$aws/things/%s/jobs/notify-next" % thing,
                      {"timestamp": int(time.time()), **({"execution": nxt} if nxt else {})})

    def _jobs_request(self, thing, rest, payload):
        base = "$aws/things/%s/jobs/" % thing
        if rest == ["$next", "get"]:
            nxt = self._next(thing)
            self._publish(base + "$next/get/accepted",
                          {"timestamp": int(time.time()), **({"execution": nxt} if nxt else {})})
        elif rest == ["start-next"]:
            with self._lock:
                queue = self.jobs.get(thing, [])
                if queue:
                    queue[0]["status"] = "IN_PROGRESS"
            nxt = self._next(thing)
            self._publish(base + "start-next/accepted",
                          {"timestamp": int(time.time()), **({"execution": nxt} if nxt else {})})
        elif len(rest) == 2 and rest[1] == "update":
            job_id = rest[0]
            status = payload.get("status") if isinstance(payload, dict) else None
            with self._lock:
                queue = self.jobs.get(thing, [])
                job = next((j for j in queue if j["jobId"] == job_id), None)
                if job is not None and status:
                    job["status"] = status
            if job is None or not status:
                self._publish(base + job_id + "/update/rejected",
                              {"code": "ResourceNotFound" if job is None else "InvalidRequest",
                               "message": "Job Execution %s not found or no status" % job_id})
                return
            self._publish(base + job_id + "/update/accepted", {"timestamp": int(time.time())})
            if status in ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED"):
                with self._lock:
                    self.jobs[thing] = [j for j in self.jobs[thing] if j["jobId"] != job_id]
                self._notify_next(thing)

    # -- fleet provisioning ------------------------------------------------------

    def _provisioning_request(self, levels, payload):
        if levels[1] == "certificates":
            cert_id = secrets.token_hex(8)
            pem, key_pem = _signed(self._pki, "issued-" + cert_id)
            token = secrets.token_urlsafe(24)
            with self._lock:
                self.issued[token] = cert_id
            self._publish("$aws/certificates/create/json/accepted",
                          {"certificateId": cert_id, "certificatePem": pem,
                           "privateKey": key_pem, "certificateOwnershipToken": token})
            return
        template = levels[2]
        base = "$aws/provisioning-templates/%s/provision/json" % template
        token = payload.get("certificateOwnershipToken") if isinstance(payload, dict) else None
        params = payload.get("parameters", {}) if isinstance(payload, dict) else {}
        with self._lock:
            known = self.issued.pop(token, None) if token else None
        if template != self._template or known is None or "ThingName" not in params:
            self._publish(base + "/rejected",
                          {"statusCode": 400, "errorCode": "InvalidParameters",
                           "errorMessage": "unknown template, token or no ThingName"})
            return
        self.registered.append((template, params, params["ThingName"]))
        self._publish(base + "/accepted",
                      {"deviceConfiguration": {}, "thingName": params["ThingName"]})
