"""Integration test harness for uplinkd.

Everything here talks to real processes on loopback: a real mosquitto broker
(the "cloud", TLS with certificates made by scripts/pki), the real uplinkd
binary, real MQTT clients (mosquitto_pub/mosquitto_sub and paho-mqtt), and a
NOTIFY_SOCKET datagram socket standing in for systemd.

Rules kept throughout: never sleep a fixed time to wait for something, poll a
condition with a deadline (wait_for); every subprocess call has a timeout;
every process started here is stopped by its owner's stop()/close().
"""

import json
import os
import random
import re
import resource
import select
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as paho

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UPLINKD_BIN = os.path.abspath(os.environ.get("UPLINKD_BIN", os.path.join(REPO, "build", "uplinkd")))
UPLINKCTL_BIN = os.path.abspath(
    os.environ.get("UPLINKCTL_BIN", os.path.join(os.path.dirname(UPLINKD_BIN), "uplinkctl")))
MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")
PKI_SCRIPT = os.path.join(REPO, "scripts", "pki")

# Generous default: a loaded 2-core CI box running sanitizer builds is slow,
# and a deadline only costs time when something is already broken.
TIMEOUT = float(os.environ.get("UPLINKD_TEST_TIMEOUT", "15"))

# Environment variables that would change how uplinkd behaves (journald,
# systemd notification, socket activation) and must come only from the test.
_SYSTEMD_ENV = ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "INVOCATION_ID")


# uplinkd --check-config run as root checks the files again as the service
# user (uplinkd, if it exists). Test directories are the test's own (0700),
# so only the tests of that check name a user.
os.environ["UPLINKD_SERVICE_USER"] = ""


class HarnessError(AssertionError):
    """A condition the test waited for did not happen (reported as a failure)."""


def wait_for(cond, timeout=TIMEOUT, interval=0.02, what=None):
    """Poll cond() until it returns something truthy; return that value.

    Raises HarnessError naming `what` (or the function) after `timeout` s;
    `what` may be a callable, evaluated only then (to show the final state).
    The interval grows to at most 0.2 s so long waits do not spin.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            if callable(what):
                what = what()
            raise HarnessError("timed out after %.1f s waiting for %s"
                               % (timeout, what or getattr(cond, "__name__", "condition")))
        time.sleep(min(interval, deadline - now))
        interval = min(interval * 1.5, 0.2)


def localhost_has_ipv6():
    """True when "localhost" resolves to ::1 here (then brokers listen on both)."""
    try:
        infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(info[0] == socket.AF_INET6 and info[4][0] == "::1" for info in infos)


def loopback_addresses():
    """Addresses a server for "localhost" must listen on."""
    return ["127.0.0.1", "::1"] if localhost_has_ipv6() else ["127.0.0.1"]


def _test_port_range():
    """(low, high) from UPLINKD_TEST_PORTS="LOW-HIGH", or None when unset."""
    text = os.environ.get("UPLINKD_TEST_PORTS", "").strip()
    if not text:
        return None
    m = re.match(r"^(\d+)-(\d+)$", text)
    if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
        raise HarnessError("UPLINKD_TEST_PORTS=%r: expected LOW-HIGH, e.g. 20000-27999" % text)
    return int(m.group(1)), int(m.group(2))


_port_random = random.Random()  # seeded from os.urandom; tests may seed `random` itself
_ports_given = []  # the latest ports handed out, not handed out again soon


def _port_free_everywhere(port, addresses):
    for addr in addresses:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        try:
            s.bind((addr, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_port(addresses=("127.0.0.1",)):
    """A TCP port that is free on every address in `addresses`.

    By default the kernel picks a port on the first address; it is checked
    on the others. There is a window before the caller binds it; loopback
    ports in the ephemeral range are rarely taken in that time, but the
    kernel may offer the same port twice in a row, so the last 64 ports
    given out are never given again.

    With UPLINKD_TEST_PORTS="LOW-HIGH" the port is drawn at random from that
    range instead. scripts/test gives each of its parallel pytest processes
    its own range, below the kernel's ephemeral range (32768-60999 by default), so
    neither the other process nor an outgoing connection can take a port in
    that window.
    """
    port_range = _test_port_range()
    if port_range is not None:
        for _ in range(200):
            port = _port_random.randint(*port_range)
            if port not in _ports_given and _port_free_everywhere(port, addresses):
                # A caller may take two ports before binding either (Broker).
                _ports_given.append(port)
                del _ports_given[:-64]
                return port
        raise HarnessError("no free port in UPLINKD_TEST_PORTS=%d-%d on %s"
                           % (port_range + (addresses,)))
    for _ in range(50):
        first = socket.socket(socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET)
        try:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            ok = True
            for addr in addresses[1:]:
                other = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
                try:
                    other.bind((addr, port))
                except OSError:
                    ok = False
                finally:
                    other.close()
            # The kernel may hand out the same port again until someone binds it,
            # and a caller may take two ports before binding either (Broker).
            if ok and port not in _ports_given:
                _ports_given.append(port)
                del _ports_given[:-64]
                return port
        finally:
            first.close()
    raise HarnessError("no free port on %s" % (addresses,))


def terminate(proc, timeout=10):
    """SIGTERM `proc` and reap it; SIGKILL it after `timeout` s. Returns False
    when it had to be killed (the caller decides whether that is an error)."""
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False


def listen_loopback(backlog=16, port=None):
    """Listening TCP sockets on one free port (or `port`) of every loopback address, for
    the test's own servers (a TLS front, a throttling proxy). Returns (port, sockets);
    raises OSError when `port` cannot be bound (in use, or below 1024 without root)."""
    addresses = loopback_addresses()
    if port is None:
        port = free_port(addresses)
    listeners = []
    try:
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            listeners.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            s.listen(backlog)
    except OSError:
        for s in listeners:
            s.close()
        raise
    return port, listeners


def accept_loop(listeners, stop, on_accept, on_error=None):
    """Accept connections on `listeners` (from listen_loopback()) until the Event `stop` is
    set or the listeners are closed, and hand each new socket to on_accept(sock). A failed
    accept() goes to on_error(exc) when given, else it is skipped. select() wakes every 0.2 s
    to see `stop`: the loop is bounded by the test's own teardown."""
    while not stop.is_set():
        try:
            ready, _, _ = select.select(listeners, [], [], 0.2)
        except (OSError, ValueError):
            return
        for listener in ready:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if on_error:
                    on_error(e)
                continue
            on_accept(conn)


def tcp_accepts(host, port, timeout=0.5):
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_accepts(path):
    """True when a stream connect to the Unix socket `path` succeeds."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# --------------------------------------------------------------------------
# YAML: a tiny block-style emitter, so generated configs look like the ones
# users write (and so line numbers in error tests are predictable).
# --------------------------------------------------------------------------

def _yaml_scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return "null"
    # A JSON string is a valid YAML double-quoted scalar for the characters
    # used in test configs.
    return json.dumps(str(value))


def yaml_dump(value, indent=0):
    """Render dicts, lists and scalars as block-style YAML text."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append("%s%s:" % (pad, key))
                lines.append(yaml_dump(item, indent + 2))
            elif isinstance(item, (dict, list)):
                lines.append("%s%s: %s" % (pad, key, "{}" if isinstance(item, dict) else "[]"))
            else:
                lines.append("%s%s: %s" % (pad, key, _yaml_scalar(item)))
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                inner = yaml_dump(item, indent + 2).split("\n")
                lines.append("%s- %s" % (pad, inner[0].lstrip()))
                lines.extend(inner[1:])
            elif isinstance(item, list) and item:
                lines.append("%s-" % pad)
                lines.append(yaml_dump(item, indent + 2))
            else:
                lines.append("%s- %s" % (pad, _yaml_scalar(item)))
    else:
        lines.append(pad + _yaml_scalar(value))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------

class Pki:
    """The throw-away PKI made by scripts/pki (see that script for the files)."""

    def __init__(self, directory):
        self.dir = directory
        subprocess.run([PKI_SCRIPT, directory], check=True, timeout=60,
                       stdin=subprocess.DEVNULL, capture_output=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def ca(self):
        return self.path("ca.pem")

    @property
    def other_ca(self):
        return self.path("other-ca.pem")


# --------------------------------------------------------------------------
# The cloud: a real mosquitto broker
# --------------------------------------------------------------------------

class Broker:
    """A mosquitto broker on loopback playing the cloud.

    Listeners: TLS on `tls_port` (127.0.0.1, and ::1 when localhost resolves
    to it) serving `cert` (default server.pem, valid for "localhost"), and a
    plain listener on 127.0.0.1:`plain_port` for the test's own clients and
    for the SNI front. Persistence is on, so a graceful restart keeps
    persistent sessions and queued QoS 1 messages. restart() reuses the
    same ports.
    """

    def __init__(self, workdir, pki, name="cloud", cert="server", users=None, client_cert=False):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.pki = pki
        self.cert = cert
        # TLS listeners require a certificate from the test CA; True: and its CN is the
        # user name (use_identity_as_username), "require": the CONNECT's user name is kept.
        self.client_cert = client_cert
        self.users = dict(users or {})
        self.addresses = loopback_addresses()
        self.tls_port = free_port(self.addresses)
        self.plain_port = free_port(("127.0.0.1",))
        self.conf_path = os.path.join(self.dir, "mosquitto.conf")
        self.log_path = os.path.join(self.dir, "mosquitto.log")
        self.stderr_path = os.path.join(self.dir, "mosquitto.stderr")
        self.proc = None
        self.starts = 0
        self._write_conf()

    def _write_conf(self):
        lines = [
            "per_listener_settings false",
            "user root",  # when run as root, do not drop to 'mosquitto' (it could not read our files)
            "persistence true",
            "persistence_location %s/" % self.dir,
            "log_dest file %s" % self.log_path,
            "log_type all",
            "log_timestamp true",
            "connection_messages true",
            "max_queued_messages 10000",
        ]
        if self.users:
            pw = os.path.join(self.dir, "passwd")
            open(pw, "w").close()
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", pw, user, password], check=True,
                               timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
            lines += ["allow_anonymous false", "password_file %s" % pw]
        else:
            lines.append("allow_anonymous true")
        for addr in self.addresses:
            lines += [
                "listener %d %s" % (self.tls_port, addr),
                "certfile %s" % self.pki.path(self.cert + ".pem"),
                "keyfile %s" % self.pki.path(self.cert + ".key"),
            ]
            if self.client_cert:
                lines += ["cafile %s" % self.pki.ca, "require_certificate true"]
            if self.client_cert is True:  # "require": the CONNECT's user name stays the client's
                lines.append("use_identity_as_username true")
        lines.append("listener %d 127.0.0.1" % self.plain_port)
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def credentials(self):
        """(username, password) of the first user, or (None, None)."""
        for user, password in self.users.items():
            return user, password
        return None, None

    def start(self):
        assert self.proc is None, "broker already running"
        err = open(self.stderr_path, "ab")
        try:
            # Debian's mosquitto speaks sd_notify itself; keep it off any
            # NOTIFY_SOCKET the test runner may have inherited.
            env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
            self.proc = subprocess.Popen([MOSQUITTO_BIN, "-c", self.conf_path], env=env,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        finally:
            err.close()
        self.starts += 1

        def accepting():
            if self.proc.poll() is not None:
                raise HarnessError("mosquitto exited with %s: %s"
                                   % (self.proc.returncode, self.log_tail()))
            # mosquitto logs "running" once every listener is bound (one line
            # per start; the log survives restarts). Probing the TLS ports
            # with bare TCP would only add handshake errors to the log.
            if self.log_text().count(" running\n") < self.starts:
                return False
            return tcp_accepts("127.0.0.1", self.plain_port)

        wait_for(accepting, what="mosquitto to accept on %s" % (self.endpoints(),))
        return self

    def endpoints(self):
        return [(a, self.tls_port) for a in self.addresses] + [("127.0.0.1", self.plain_port)]

    def stop(self, timeout=10):
        """Graceful stop (SIGTERM; mosquitto saves its persistence file)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if not terminate(proc, timeout):
            raise HarnessError("mosquitto ignored SIGTERM for %d s" % timeout)

    def restart(self):
        self.stop()
        wait_for(lambda: not any(tcp_accepts(a, p) for a, p in self.endpoints()),
                 what="broker ports to close")
        return self.start()

    def log_text(self):
        text = ""
        for path in (self.stderr_path, self.log_path):
            try:
                with open(path, errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client(self, **kwargs):
        """A connected paho client on the plain listener (the cloud side)."""
        user, password = self.credentials
        kwargs.setdefault("username", user)
        kwargs.setdefault("password", password)
        return MqttClient("127.0.0.1", self.plain_port, **kwargs).connect()

    def sub(self, *topics, **kwargs):
        """A running mosquitto_sub on the TLS listener, subscribed to `topics`."""
        user, password = self.credentials
        args = ["-h", "localhost", "-p", str(self.tls_port), "--cafile", self.pki.ca]
        if user:
            args += ["-u", user, "-P", password]
        return CliSub(args, topics, os.path.join(self.dir, "sub-%d.out" % time.monotonic_ns()),
                      **kwargs)


# --------------------------------------------------------------------------
# SNI front: a TLS terminator that records the server name each client sent
# --------------------------------------------------------------------------

class SniFront:
    """A TLS server on loopback that records the SNI of every handshake and
    relays the decrypted bytes to a plain TCP backend (the broker's plain
    listener). It is the "broker-side" view of what uplinkd sends: Python's
    ssl sni_callback sees exactly the server_name extension of ClientHello.
    With `alpn`, it serves only a client that offers that protocol (as AWS IoT
    Core does on port 443) and records what was agreed; with `client_cert`,
    it requires a client certificate from the test CA and records its CN.
    """

    def __init__(self, pki, backend_port, cert="server", alpn=None, client_cert=False, port=None):
        self.backend_port = backend_port
        self.server_names = []  # one entry per handshake: str, or None when no SNI was sent
        self.alpn = []  # one entry per handshake: the protocol agreed, or None
        self.peers = []  # one entry per handshake with client_cert: the client's CN
        self.handshakes = 0
        self._require_alpn = alpn
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.path(cert + ".pem"), pki.path(cert + ".key"))
        ctx.sni_callback = self._sni_cb
        if alpn:
            # Like AWS IoT Core on 443: only a client offering this protocol is served.
            ctx.set_alpn_protocols([alpn])
        if client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(pki.ca)
        self._ctx = ctx
        self.port, self._listeners = listen_loopback(port=port)
        self._thread = threading.Thread(target=self._accept_loop, name="sni-front", daemon=True)
        self._thread.start()

    def _sni_cb(self, sslsock, server_name, ctx):
        with self._lock:
            self.server_names.append(server_name)
        return None

    def _accept_loop(self):
        accept_loop(self._listeners, self._stop,
                    lambda conn: threading.Thread(target=self._serve, args=(conn,),
                                                  daemon=True).start())

    def _serve(self, conn):
        tls = plain = None
        try:
            conn.settimeout(TIMEOUT)
            tls = self._ctx.wrap_socket(conn, server_side=True)
            peer = tls.getpeercert()
            with self._lock:
                self.handshakes += 1
                self.alpn.append(tls.selected_alpn_protocol())
                if peer:
                    self.peers.append(dict(x[0] for x in peer["subject"]).get("commonName"))
            if self._require_alpn and tls.selected_alpn_protocol() != self._require_alpn:
                return
            plain = socket.create_connection(("127.0.0.1", self.backend_port), timeout=TIMEOUT)
            with self._lock:
                self._conns += [tls, plain]
            tls.settimeout(30)
            plain.settimeout(30)
            while not self._stop.is_set():
                if tls.pending():
                    ready = [tls]
                else:
                    ready, _, _ = select.select([tls, plain], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (plain if s is tls else tls).sendall(data)
        except (OSError, ValueError, ssl.SSLError) as e:
            if not self._stop.is_set():
                with self._lock:
                    self.errors.append(repr(e))
        finally:
            for s in (tls or conn, plain):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for s in self._listeners:
            s.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------
# systemd notification socket
# --------------------------------------------------------------------------

class NotifySocket:
    """A unix datagram socket playing systemd's NOTIFY_SOCKET.

    Every datagram is kept as (monotonic time, [KEY=VALUE lines]).
    """

    def __init__(self, path):
        self.path = path
        self.messages = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.2)
                if not ready:
                    continue
                data = self._sock.recv(65536)
            except OSError:
                return
            fields = data.decode("utf-8", "replace").split("\n")
            with self._cond:
                self.messages.append((time.monotonic(), [f for f in fields if f]))
                self._cond.notify_all()

    def fields(self, since=0):
        """[(time, "KEY=VALUE")] for every field received from message index `since`."""
        with self._cond:
            return [(t, f) for t, fs in self.messages[since:] for f in fs]

    def count(self):
        with self._cond:
            return len(self.messages)

    def find(self, field, since=0):
        """Time of the first field equal to `field` (or matching a KEY= prefix
        when `field` ends with "="), or None."""
        for t, f in self.fields(since):
            if f == field or (field.endswith("=") and f.startswith(field)):
                return t
        return None

    def wait(self, field, since=0, timeout=TIMEOUT):
        """Wait for `field` (see find()) in messages from index `since`."""
        return wait_for(lambda: self.find(field, since), timeout,
                        what=lambda: "%s on NOTIFY_SOCKET (got %s)"
                        % (field, [f for _, f in self.fields(since)][-10:]))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


# --------------------------------------------------------------------------
# uplinkd
# --------------------------------------------------------------------------

class Daemon:
    """One uplinkd process. stderr goes to `log_path`; stdout to `out_path`.

    UPLINKD_WRAPPER (e.g. "valgrind --error-exitcode=99 --leak-check=full")
    is put in front of the command line when set.
    """

    def __init__(self, workdir, conf_path, notify=None, env=None, args=(), name="uplinkd",
                 nofile=None):
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE for the daemon, or None
        self.workdir = workdir
        self.conf_path = conf_path
        self.notify = notify
        self.log_path = os.path.join(workdir, name + ".log")
        self.out_path = os.path.join(workdir, name + ".out")
        self.proc = None
        self.returncode = None
        self.stopped = False
        self.extra_env = dict(env or {})
        self.args = list(args)

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.path
        env.update(self.extra_env)
        cmd = shlex.split(os.environ.get("UPLINKD_WRAPPER", ""))
        cmd += [UPLINKD_BIN, "-c", self.conf_path] + self.args
        with open(self.log_path, "ab") as log, open(self.out_path, "ab") as out:
            limit = self.nofile
            preexec = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit)) if limit else None
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                         env=env, cwd=self.workdir, preexec_fn=preexec)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, since=0, timeout=TIMEOUT):
        """Wait for READY=1 on the notify socket (fails early if uplinkd exits)."""
        assert self.notify is not None

        def ready():
            if self.notify.find("READY=1", since) is not None:
                return True
            if not self.running():
                raise HarnessError("uplinkd exited with %s before READY=1:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            return False

        wait_for(ready, timeout, what="READY=1 from uplinkd")
        return self

    def signal(self, signum):
        self.proc.send_signal(signum)

    def reload(self):
        self.signal(signal.SIGHUP)

    def stop(self, timeout=None):
        """SIGTERM, then wait. Returns (exit code, seconds taken).

        A daemon that does not exit within `timeout` is killed with SIGKILL
        and a HarnessError is raised: hanging at shutdown is a bug.
        """
        if self.proc is None or self.stopped:
            return self.returncode, 0.0
        self.stopped = True
        if timeout is None:
            timeout = float(os.environ.get("UPLINKD_STOP_TIMEOUT", "10"))
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.returncode = self.proc.returncode
            raise HarnessError("uplinkd did not exit within %.0f s of SIGTERM; killed it. Log:\n%s"
                               % (timeout, self.log_tail()))
        return self.returncode, time.monotonic() - started

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stopped = True

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_size(self):
        """Current length of the log (pass as `since` to wait_log)."""
        return len(self.log_text())

    def log_tail(self, lines=60):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def find_log(self, pattern, since=0, flags=re.IGNORECASE):
        """First log line (after character offset `since`) matching `pattern`."""
        rx = re.compile(pattern, flags)
        for line in self.log_text()[since:].splitlines():
            if rx.search(line):
                return line
        return None

    def wait_log(self, pattern, since=0, timeout=TIMEOUT, flags=re.IGNORECASE):
        """Wait for a log line matching regex `pattern`; return the line."""

        def found():
            line = self.find_log(pattern, since, flags)
            if line is None and not self.running():
                # One last look: the line may have been written just before exit.
                line = self.find_log(pattern, since, flags)
                if line is None:
                    raise HarnessError("uplinkd exited (%s) without logging /%s/:\n%s"
                                       % (self.proc.returncode, pattern, self.log_tail()))
            return line

        return wait_for(found, timeout, what=lambda: "uplinkd log line /%s/; log tail:\n%s"
                        % (pattern, self.log_tail()))

    def sanitizer_reports(self):
        """ASan/UBSan/valgrind findings in the log, as text ("" when clean)."""
        rx = re.compile(r"ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:|"
                        r"==\d+== (Invalid|Conditional|Use of uninit|.*definitely lost: [1-9])")
        return "\n".join(line for line in self.log_text().splitlines() if rx.search(line))


def make_config(workdir, broker=None, port=None, gateway_id="gw-test", topic_prefix="gw-test",
                uplink=None, **top):
    """The default test configuration as a dict (see yaml_dump()).

    The local listeners are a loopback TCP port and `workdir`/local.sock; the
    one uplink "cloud" points at `broker`'s TLS listener as "localhost"
    (override with `port`, or replace keys through `uplink`).
    """
    state = os.path.join(workdir, "state")
    os.makedirs(state, exist_ok=True)
    local_port = free_port(("127.0.0.1",))
    up = {
        "name": "cloud",
        "host": "localhost",
        "port": port if port is not None else broker.tls_port,
        "tls": {"ca": broker.pki.ca if broker else None},
        "reconnect": {"base": "100ms", "cap": "1s"},
        "generic": {"topic_prefix": topic_prefix},
    }
    if broker is not None and broker.users:
        user, password = broker.credentials
        up["auth"] = {"type": "basic", "username": user, "password": password}
    up.update(uplink or {})
    conf = {
        "gateway": {"id": gateway_id, "state_dir": state},
        "log": {"level": "debug"},
        "shutdown_timeout": "5s",
        "local": {"listen": ["tcp://127.0.0.1:%d" % local_port,
                             "unix://" + os.path.join(workdir, "local.sock")]},
        "control": {"socket": os.path.join(workdir, "control.sock")},
        "uplinks": [up],
    }
    conf.update(top)
    return conf


def write_config(path, conf):
    with open(path, "w") as f:
        f.write(conf if isinstance(conf, str) else yaml_dump(conf) + "\n")
    return path


def local_tcp_port(conf):
    for url in conf["local"]["listen"]:
        m = re.match(r"tcp://127\.0\.0\.1:(\d+)$", url)
        if m:
            return int(m.group(1))
    raise KeyError("no tcp://127.0.0.1 listener in conf")


def local_unix_path(conf):
    for url in conf["local"]["listen"]:
        if url.startswith("unix://"):
            return url[len("unix://"):]
    raise KeyError("no unix:// listener in conf")


def uplinkctl(control_socket, *args, timeout=TIMEOUT, json_output=True):
    """Run uplinkctl -s SOCKET [--json] ARGS...; returns CompletedProcess (text).

    Tests read the JSON answer by default; json_output=False gives the table
    printed for people."""
    options = ["-s", control_socket] + (["--json"] if json_output else [])
    return subprocess.run([UPLINKCTL_BIN] + options + list(args),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def status_uplink_state(status, name):
    """The state string of uplink `name` in `uplinkctl status` JSON, or None.

    Looks for any JSON object whose "name" (or "uplink") is `name` and that
    has a "state" key, wherever it sits, so the test does not pin the exact
    document layout (an object keyed by uplink name also works).
    """
    def walk(node, key=None):
        if isinstance(node, dict):
            if "state" in node and (node.get("name") == name or node.get("uplink") == name
                                    or key == name):
                return str(node["state"])
            for k, v in node.items():
                found = walk(v, k)
                if found is not None:
                    return found
        elif isinstance(node, list):
            for v in node:
                found = walk(v)
                if found is not None:
                    return found
        return None

    return walk(status)


# --------------------------------------------------------------------------
# MQTT clients
# --------------------------------------------------------------------------

def mosquitto_pub(*args, timeout=TIMEOUT, check=True):
    """Run mosquitto_pub ARGS...; fail with its output when it fails."""
    proc = subprocess.run(["mosquitto_pub"] + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise HarnessError("mosquitto_pub %s failed (%d): %s%s"
                           % (" ".join(args), proc.returncode, proc.stdout, proc.stderr))
    return proc


class CliSub:
    """mosquitto_sub in the background; messages parsed from its output.

    `conn_args` select the broker (-h/-p/--cafile or --unix PATH). Waits for
    SUBACK (from -d output, made line-buffered with stdbuf) before returning.
    """

    MARK = "MSG\t"

    def __init__(self, conn_args, topics, out_path, qos=1, client_id=None, extra=()):
        self.out_path = out_path
        cmd = ["stdbuf", "-oL", "-eL", "mosquitto_sub", "-d", "-q", str(qos),
               "-F", self.MARK + "%q\t%r\t%t\t%p"] + list(conn_args) + list(extra)
        if client_id:
            cmd += ["-i", client_id]
        for t in topics:
            cmd += ["-t", t]
        self.cmd = cmd
        with open(out_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

        def subscribed():
            if self.proc.poll() is not None:
                raise HarnessError("mosquitto_sub exited (%s): %s"
                                   % (self.proc.returncode, self.text()))
            return "received SUBACK" in self.text()

        wait_for(subscribed, what="SUBACK for mosquitto_sub %s" % " ".join(cmd))

    def text(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def messages(self):
        """[(topic, payload str, qos int, retain bool)] received so far."""
        out = []
        for line in self.text().splitlines():
            if line.startswith(self.MARK):
                parts = line[len(self.MARK):].split("\t", 3)
                if len(parts) == 4:
                    qos, retain, topic, payload = parts
                    out.append((topic, payload, int(qos), retain == "1"))
        return out

    def wait(self, topic, payload=None, timeout=TIMEOUT):
        """Wait for a message on `topic` (with `payload` when given); return it."""

        def found():
            for m in self.messages():
                if m[0] == topic and (payload is None or m[1] == payload):
                    return m
            return None

        return wait_for(found, timeout, what=lambda: "%r %r at mosquitto_sub (got %s)"
                        % (topic, payload, self.messages()[-5:]))

    def close(self):
        terminate(self.proc)


class MqttClient:
    """A paho-mqtt 1.6 client running its network loop in a thread.

    Keeps every received message as (topic, payload bytes, qos, retain).
    Reconnects by itself (0.1 s .. 1 s) while not closed.
    """

    _seq = 0

    def __init__(self, host, port, client_id=None, clean_session=True, username=None,
                 password=None, keepalive=30):
        MqttClient._seq += 1
        self.client_id = client_id or "test-%d-%d" % (os.getpid(), MqttClient._seq)
        self.host, self.port, self.keepalive = host, port, keepalive
        self.messages = []
        self.connects = 0
        self._cond = threading.Condition()
        self._subacks = {}
        self._topics = {}
        self._connected = False
        c = paho.Client(client_id=self.client_id, clean_session=clean_session,
                        protocol=paho.MQTTv311)
        if username:
            c.username_pw_set(username, password)
        c.reconnect_delay_set(0.1, 1)
        c.max_inflight_messages_set(1000)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    def _on_connect(self, client, userdata, flags, rc):
        with self._cond:
            if rc == 0:
                self._connected = True
                self.connects += 1
                self.session_present = bool(flags.get("session present"))
            self.connect_rc = rc
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, rc):
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, msg.payload, msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, granted):
        with self._cond:
            self._subacks[mid] = granted
            self._cond.notify_all()

    def connect(self, timeout=TIMEOUT):
        self.connect_rc = None
        self.client.connect_async(self.host, self.port, self.keepalive)
        self.client.loop_start()

        def up():
            if self.connect_rc not in (None, 0):
                raise HarnessError("CONNACK %s from %s:%s" % (self.connect_rc, self.host, self.port))
            return self._connected

        wait_for(up, timeout, what="MQTT connection to %s:%s" % (self.host, self.port))
        return self

    def wait_connected(self, timeout=TIMEOUT):
        wait_for(lambda: self._connected, timeout, what="MQTT reconnect of %s" % self.client_id)

    def subscribe(self, topic, qos=1, timeout=TIMEOUT):
        rc, mid = self.client.subscribe(topic, qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise HarnessError("subscribe %s: %s" % (topic, paho.error_string(rc)))
        granted = wait_for(lambda: self._subacks.get(mid), timeout, what="SUBACK for %s" % topic)
        if granted[0] == 128:
            raise HarnessError("subscription to %s refused (SUBACK 0x80)" % topic)
        return granted[0]

    def publish(self, topic, payload, qos=1, retain=False, timeout=TIMEOUT):
        """Publish; for QoS >= 1 wait for the acknowledgement."""
        info = self.client.publish(topic, payload, qos, retain)
        if qos > 0:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise HarnessError("no PUBACK for %s within %s s" % (topic, timeout))
        return info

    def received(self, topic=None):
        with self._cond:
            return [m for m in self.messages if topic is None or m[0] == topic]

    def wait(self, topic, payload=None, timeout=TIMEOUT):
        """Wait for a message on `topic` (with `payload` bytes/str when given)."""
        if isinstance(payload, str):
            payload = payload.encode()

        def found():
            for m in self.received(topic):
                if payload is None or m[1] == payload:
                    return m
            return None

        return wait_for(found, timeout, what=lambda: "%r %r at client %s (got %s)"
                        % (topic, payload, self.client_id, self.received()[-5:]))

    def close(self):
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
