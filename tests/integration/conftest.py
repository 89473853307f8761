"""pytest fixtures for the uplinkd integration tests (see docs/testing.md).

The `hx` fixture gives each test a fresh short temp dir under /tmp (Unix
socket paths must stay under 108 bytes) and owns everything the test starts:
brokers, uplinkd processes, clients. At teardown it stops them in order
(clients, uplinkd, brokers) and turns a daemon that hangs on SIGTERM, exits
non-zero or reports a sanitizer/valgrind error into a test error.

When a test fails, the uplinkd and broker logs are attached to its report.
Set UPLINKD_TEST_KEEP=1 to keep the temp dirs of passing tests too.
"""

import os
import shutil
import signal
import tempfile
import types

import pytest

import harness as h
import parts


def pytest_report_header(config):
    return ["uplinkd: %s" % h.UPLINKD_BIN, "uplinkctl: %s" % h.UPLINKCTL_BIN]


SLOW = os.environ.get("UPLINKD_SLOW_TESTS") == "1"


def _sigterm_cb(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes minutes; skipped unless UPLINKD_SLOW_TESTS=1 (scripts/test runs "
        "them in a second pytest process in parallel with the rest, see docs/testing.md)")
    # SIGTERM (scripts/test stopping its background run, or its outer timeout)
    # ends the run like Ctrl-C: fixtures tear down, so no broker or uplinkd
    # is left behind. A background job of a script ignores SIGINT, so Ctrl-C
    # cannot be used for that.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_cb)


def pytest_collection_modifyitems(config, items):
    # Slow tests are opt-in, so a plain `pytest tests/integration` stays quick;
    # scripts/test runs them with `-m slow` and UPLINKD_SLOW_TESTS=1.
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow test (minutes): set UPLINKD_SLOW_TESTS=1, or run "
                            "scripts/test, which runs the slow tests in the background")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def pytest_collection_finish(session):
    # A part the selected tests need that is missing (tests/integration/parts.py) stops the
    # run here with one line, instead of failing every test that uses it one by one.
    if session.config.getoption("collectonly") and not os.environ.get("UPLINKD_CHECK_PARTS"):
        return
    modules = {os.path.splitext(os.path.basename(str(item.fspath)))[0]
               for item in session.items if item.get_closest_marker("skip") is None}
    if not modules:
        return
    lines = parts.missing(modules)
    if lines:
        pytest.exit("\n".join(lines), returncode=4)


@pytest.fixture(autouse=True)
def _require_uplinkd():
    # Fail (not skip) when the binary is missing, so a broken build can never
    # look like a green run.
    if not os.access(h.UPLINKD_BIN, os.X_OK):
        pytest.fail("uplinkd binary not found at %s (build it, or set UPLINKD_BIN)"
                    % h.UPLINKD_BIN, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
    if report.failed:
        env = getattr(item, "_uplinkd_env", None)
        if env is not None:
            for title, text in env.log_sections():
                report.sections.append((title, text))


@pytest.fixture(scope="session")
def pki():
    directory = tempfile.mkdtemp(prefix="uplk-pki-", dir="/tmp")
    try:
        yield h.Pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Env:
    """Everything one test starts; see the module docstring."""

    def __init__(self, request, pki):
        self.request = request
        self.pki = pki
        self.dir = tempfile.mkdtemp(prefix="uplk-", dir="/tmp")
        self._brokers = []
        self._daemons = []
        self._closers = []
        self._notify = None

    # -- building blocks ---------------------------------------------------

    def broker(self, name="cloud", start=True, **kwargs):
        """A mosquitto "cloud" (harness.Broker), started unless start=False."""
        broker = h.Broker(self.dir, self.pki, name=name, **kwargs)
        self._brokers.append(broker)
        return broker.start() if start else broker

    @property
    def notify(self):
        """The NOTIFY_SOCKET of this test (created on first use)."""
        if self._notify is None:
            self._notify = h.NotifySocket(os.path.join(self.dir, "notify.sock"))
        return self._notify

    def config(self, broker=None, **kwargs):
        """harness.make_config() in this test's directory."""
        return h.make_config(self.dir, broker, **kwargs)

    def write_config(self, conf, name="uplinkd.yaml"):
        return h.write_config(os.path.join(self.dir, name), conf)

    def uplinkd(self, conf, env=None, args=(), ready=True, name="uplinkd", notify=True,
                nofile=None):
        """Write `conf` (dict or YAML text), start uplinkd on it and, when
        `ready`, wait for READY=1. Returns a harness.Daemon with .conf (the
        dict) and .conf_path. `nofile`: (soft, hard) RLIMIT_NOFILE for it."""
        conf_path = self.write_config(conf, name + ".yaml")
        daemon = h.Daemon(self.dir, conf_path, notify=self.notify if notify else None,
                          env=env, args=args, name=name, nofile=nofile)
        daemon.conf = conf
        daemon.expect_exit = None  # set to an int when a test expects a non-zero exit
        self._daemons.append(daemon)
        since = self.notify.count() if notify else 0
        daemon.start()
        if ready:
            daemon.wait_ready(since=since)
        return daemon

    def gateway(self, broker=None, env=None, online=True, **conf_kwargs):
        """The common case: a started broker and a ready uplinkd forwarding to
        it with the default config. Returns a namespace with broker, daemon,
        conf, unix (local socket path), tcp_port, control (socket path).

        When the broker runs, this waits until the uplink is ONLINE (unless
        online=False): a QoS 0 message published before that is dropped by
        design (spool.qos0_offline: drop), so a test that publishes at once
        would depend on how fast the connect was (slow under valgrind)."""
        broker = broker or self.broker()
        conf = self.config(broker, **conf_kwargs)
        daemon = self.uplinkd(conf, env=env)
        if online and broker.proc is not None:
            daemon.wait_log(r"state \w+ -> ONLINE")
        return types.SimpleNamespace(broker=broker, daemon=daemon, conf=conf,
                                     unix=h.local_unix_path(conf), tcp_port=h.local_tcp_port(conf),
                                     control=conf["control"]["socket"])

    def add_closer(self, fn):
        self._closers.append(fn)

    def client(self, host, port, **kwargs):
        """A connected paho client (closed at teardown)."""
        c = h.MqttClient(host, port, **kwargs)
        self._closers.append(c.close)
        return c.connect()

    def local_client(self, gw, **kwargs):
        """A paho client connected to uplinkd's local TCP listener."""
        return self.client("127.0.0.1", gw.tcp_port, **kwargs)

    def cloud_client(self, broker, **kwargs):
        """A paho client connected to the broker's plain listener."""
        user, password = broker.credentials
        kwargs.setdefault("username", user)
        kwargs.setdefault("password", password)
        return self.client("127.0.0.1", broker.plain_port, **kwargs)

    def cloud_sub(self, broker, *topics, **kwargs):
        """mosquitto_sub at the cloud over TLS (closed at teardown)."""
        sub = broker.sub(*topics, **kwargs)
        self._closers.append(sub.close)
        return sub

    def local_sub(self, gw, *topics, **kwargs):
        """mosquitto_sub at uplinkd's local Unix socket (closed at teardown)."""
        path = os.path.join(self.dir, "local-sub-%d.out" % len(self._closers))
        sub = h.CliSub(["--unix", gw.unix], topics, path, **kwargs)
        self._closers.append(sub.close)
        return sub

    def sni_front(self, broker, **kwargs):
        front = h.SniFront(self.pki, broker.plain_port, **kwargs)
        self._closers.append(front.close)
        return front

    # -- reporting and teardown --------------------------------------------

    def log_sections(self):
        sections = []
        for d in self._daemons:
            sections.append(("%s log (%s)" % (os.path.basename(d.log_path), d.log_path),
                             d.log_tail(200)))
        for b in self._brokers:
            sections.append(("mosquitto %s log" % os.path.basename(b.dir), b.log_tail(60)))
        if self._notify is not None:
            sections.append(("NOTIFY_SOCKET", "\n".join(
                "%.3f %s" % (t, f) for t, f in self._notify.fields())))
        return sections

    def close(self):
        problems = []
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as e:  # a client that fails to close is not the daemon's fault
                problems.append("closing a test client: %r" % (e,))
        self._closers = []
        for d in self._daemons:
            try:
                rc, _ = d.stop()
            except h.HarnessError as e:
                problems.append(str(e))
                continue
            expected = d.expect_exit if d.expect_exit is not None else 0
            if rc != expected:
                problems.append("uplinkd (%s) exited with %s, expected %s; log tail:\n%s"
                                % (d.conf_path, rc, expected, d.log_tail()))
            reports = d.sanitizer_reports()
            if reports:
                problems.append("sanitizer/valgrind reports in %s:\n%s" % (d.log_path, reports))
        for b in self._brokers:
            try:
                b.stop()
            except h.HarnessError as e:
                problems.append(str(e))
        if self._notify is not None:
            self._notify.close()
        return problems

    def remove_dir(self):
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def hx(request, pki):
    env = Env(request, pki)
    request.node._uplinkd_env = env
    try:
        yield env
    finally:
        problems = env.close()
        call = getattr(request.node, "rep_call", None)
        passed = call is not None and call.passed and not problems
        if passed and not os.environ.get("UPLINKD_TEST_KEEP"):
            env.remove_dir()
        if problems:
            pytest.fail("teardown found problems (files kept in %s):\n%s"
                        % (env.dir, "\n\n".join(problems)), pytrace=False)
