"""systemd integration: unit files, hardening score, sysusers/tmpfiles, socket activation.

These run without systemd as PID 1 (CI and the dev box are containers):
`systemd-analyze verify` and `systemd-analyze security --offline=true` read
unit files, systemd-sysusers/systemd-tmpfiles work on a --root directory,
and systemd-socket-activate plays systemd's part in socket activation.
They need the systemd package (systemd-analyze, systemd-socket-activate,
systemd-sysusers, systemd-tmpfiles); a missing tool skips, naming it.

The watchdog interval (WATCHDOG=1 every WATCHDOG_USEC/2) is tested in
test_lifecycle.py::test_watchdog_pings_at_half_the_interval; the units
installed by the .deb are verified in test_packaging.py.
"""

import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile

import pytest

import harness as h

SYSTEMD_DIR = os.path.join(h.REPO, "systemd")
SERVICE_IN = os.path.join(SYSTEMD_DIR, "uplinkd.service.in")
SOCKET_UNIT = os.path.join(SYSTEMD_DIR, "uplinkd.socket")
BUILD_DIR = os.path.dirname(h.UPLINKD_BIN)
OPERATIONS_MD = os.path.join(h.REPO, "docs", "operations.md")
# The target: `systemd-analyze security` says "OK" (2.0 or lower).
MAX_EXPOSURE = 2.0


def need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.skip("%s not installed (apt-get install systemd)" % tool)
    return path


def run(cmd, timeout=60, **kwargs):
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def unit_directives(text, section):
    """[(key, value)] of `section` in unit-file `text`, in order."""
    out, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line and not line.startswith(("#", ";")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


@pytest.fixture
def units_dir():
    """The units as meson generated them (build dir) plus the static ones,
    with ExecStart's @sbindir@ pointing at the uplinkd under test and the man
    pages reachable through MANPATH, so verify can check both."""
    generated = os.path.join(BUILD_DIR, "systemd", "uplinkd.service")
    if not os.path.exists(generated):
        pytest.fail("%s missing: build with meson first (UPLINKD_BIN=%s)" % (generated, h.UPLINKD_BIN))
    d = tempfile.mkdtemp(prefix="uplk-units-", dir="/tmp")
    try:
        with open(generated) as f:
            text = f.read()
        m = re.search(r"^ExecStart=(\S+)/uplinkd ", text, re.M)
        assert m, "no ExecStart=.../uplinkd in the generated unit:\n" + text
        text = text.replace(m.group(1) + "/uplinkd", h.UPLINKD_BIN)
        with open(os.path.join(d, "uplinkd.service"), "w") as f:
            f.write(text)
        shutil.copy(SOCKET_UNIT, d)
        for section, page in (("8", "uplinkd.8"), ("1", "uplinkctl.1"), ("5", "uplinkd.yaml.5")):
            mandir = os.path.join(d, "man", "man" + section)
            os.makedirs(mandir, exist_ok=True)
            built = os.path.join(BUILD_DIR, page)
            shutil.copy(built if os.path.exists(built) else os.path.join(h.REPO, "docs", page), mandir)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_units_verify(units_dir):
    tool = need("systemd-analyze")
    env = dict(os.environ, MANPATH=os.path.join(units_dir, "man"), SYSTEMD_LOG_COLOR="0")
    man = [] if shutil.which("man") else ["--man=no"]
    proc = run([tool, "verify"] + man + [os.path.join(units_dir, "uplinkd.service"),
                                         os.path.join(units_dir, "uplinkd.socket")], env=env)
    out = proc.stdout + proc.stderr
    ours = [l for l in out.splitlines() if "uplinkd" in l]
    assert proc.returncode == 0 and not ours, "systemd-analyze verify (rc %d):\n%s" % (
        proc.returncode, out)


def exposure(unit_path):
    proc = run([need("systemd-analyze"), "security", "--offline=true", "--no-pager", unit_path])
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", proc.stdout)
    assert m, "no exposure level in systemd-analyze security output (rc %d):\n%s%s" % (
        proc.returncode, proc.stdout, proc.stderr)
    return float(m.group(1)), m.group(2), proc.stdout


def test_security_exposure_ok_and_documented(units_dir):
    level, verdict, out = exposure(os.path.join(units_dir, "uplinkd.service"))
    assert level <= MAX_EXPOSURE, "exposure %.1f %s > %.1f:\n%s" % (level, verdict, MAX_EXPOSURE, out)
    # docs/operations.md records the score; a unit change that moves it
    # must update the page.
    with open(OPERATIONS_MD) as f:
        doc = f.read()
    recorded = re.search(r"[Oo]verall exposure level[^\n]*?: (\d+\.\d+)", doc)
    assert recorded, "docs/operations.md does not record the exposure level"
    assert float(recorded.group(1)) == level, \
        "docs/operations.md records %s, systemd-analyze now says %.1f: update the page" % (
            recorded.group(1), level)


def test_tpm_drop_in_keeps_score_ok(units_dir):
    """The drop-in docs/operations.md gives for a TPM must not push the unit
    past the target either (checked on the unit with the drop-in appended)."""
    with open(OPERATIONS_MD) as f:
        doc = f.read()
    m = re.search(r"# /etc/systemd/system/uplinkd\.service\.d/tpm\.conf\n(.*?)```", doc, re.S)
    assert m, "docs/operations.md has no tpm.conf drop-in block"
    path = os.path.join(units_dir, "uplinkd.service")
    with open(path, "a") as f:
        f.write("\n" + m.group(1))
    level, verdict, out = exposure(path)
    assert level <= MAX_EXPOSURE, "with the TPM drop-in: %.1f %s\n%s" % (level, verdict, out)


REQUIRED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "Restart": "on-failure",
    "User": "uplinkd",
    "StateDirectory": "uplinkd",
    "StateDirectoryMode": "0750",
    "RuntimeDirectory": "uplinkd",
    "ConfigurationDirectory": "uplinkd",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "MemoryDenyWriteExecute": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
}


def test_service_has_the_required_lines_each_with_a_reason():
    with open(SERVICE_IN) as f:
        text = f.read()
    directives = unit_directives(text, "Service")
    values = {}
    for key, value in directives:
        values.setdefault(key, []).append(value)
    for key, value in REQUIRED_SERVICE.items():
        assert value in values.get(key, []), "%s=%s missing from uplinkd.service.in" % (key, value)
    assert "@system-service" in values.get("SystemCallFilter", []), values.get("SystemCallFilter")
    assert any("--check-config" in v for v in values.get("ExecStartPre", [])), "no ExecStartPre check"
    assert any("-HUP" in v for v in values.get("ExecReload", [])), "ExecReload does not send HUP"
    assert "WatchdogSec" in values and "LimitNOFILE" in values
    # Every hardening line belongs to a group of lines headed by a comment
    # saying why it is safe.
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# --- Hardening"))
    for i in range(start + 1, len(lines)):
        line = lines[i].strip()
        if line.startswith("["):
            break
        if line and not line.startswith("#"):
            j = i - 1
            while j > start and lines[j].strip() and not lines[j].startswith("#"):
                j -= 1
            assert lines[j].startswith("#") and j > start, \
                "uplinkd.service.in:%d: %s has no comment saying why it is safe" % (i + 1, line)


def test_socket_unit_matches_default_config():
    """uplinkd.socket must hand over the socket the shipped configuration
    listens on, with the same mode, or uplinkd would bind a second one."""
    with open(SOCKET_UNIT) as f:
        sock = dict(unit_directives(f.read(), "Socket"))
    with open(os.path.join(h.REPO, "conf", "uplinkd.yaml")) as f:
        conf = f.read()
    unix = re.findall(r"^\s*-\s*unix://(\S+)", conf, re.M)
    assert sock["ListenStream"] in unix, (sock["ListenStream"], unix)
    mode = re.search(r"^\s*socket_mode:\s*\"?(0[0-7]+)", conf, re.M)
    assert mode and sock["SocketMode"] == mode.group(1), (sock.get("SocketMode"), mode)
    assert sock["SocketUser"] == "uplinkd" and sock["SocketGroup"] == "uplinkd"
    assert sock.get("Service", "uplinkd.service") == "uplinkd.service"


def test_sysusers_and_tmpfiles_in_a_root(tmp_path):
    """systemd-sysusers makes the uplinkd user, systemd-tmpfiles its
    directories with the modes the service expects (in a throw-away root)."""
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = tmp_path / "root"
    for d in ("etc", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d"):
        (root / d).mkdir(parents=True)
    shutil.copy(os.path.join(SYSTEMD_DIR, "uplinkd.sysusers"), root / "usr/lib/sysusers.d/uplinkd.conf")
    shutil.copy(os.path.join(SYSTEMD_DIR, "uplinkd.tmpfiles"), root / "usr/lib/tmpfiles.d/uplinkd.conf")
    proc = run([sysusers, "--root=%s" % root, "uplinkd.conf"])
    assert proc.returncode == 0, proc.stderr
    passwd = [l.split(":") for l in (root / "etc/passwd").read_text().splitlines()]
    user = next((p for p in passwd if p[0] == "uplinkd"), None)
    assert user, passwd
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert 0 < uid < 1000, "uplinkd is not a system user: uid %d" % uid
    assert home == "/var/lib/uplinkd" and shell.endswith("nologin"), user
    groups = [l.split(":") for l in (root / "etc/group").read_text().splitlines()]
    assert any(g[0] == "uplinkd" and int(g[2]) == gid for g in groups), groups

    proc = run([tmpfiles, "--root=%s" % root, "--create", "uplinkd.conf"])
    assert proc.returncode == 0, proc.stderr
    for path, mode in (("var/lib/uplinkd", 0o750), ("run/uplinkd", 0o755)):
        st = os.stat(root / path)
        assert stat.S_IMODE(st.st_mode) == mode, "%s mode %o" % (path, stat.S_IMODE(st.st_mode))
        assert (st.st_uid, st.st_gid) == (uid, gid), "%s owner %d:%d" % (path, st.st_uid, st.st_gid)


def uplinkd_supports_socket_activation():
    """True when the binary imports sd_listen_fds (or its _with_names form)."""
    with open(h.UPLINKD_BIN, "rb") as f:
        return b"sd_listen_fds" in f.read()


class ActivatedDaemon(h.Daemon):
    """uplinkd started through systemd-socket-activate, which binds the Unix
    socket, waits for the first connection and then execs uplinkd (same pid)
    with LISTEN_FDS=1 / LISTEN_FDNAMES=local, as uplinkd.socket would."""

    def __init__(self, workdir, conf_path, notify, socket_path):
        super().__init__(workdir, conf_path, notify=notify, name="uplinkd-activated")
        self.socket_path = socket_path

    def start(self):
        # systemd-socket-activate passes on only the variables named with -E.
        passed = ["NOTIFY_SOCKET=" + self.notify.path]
        for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "PATH"):
            if name in os.environ:
                passed.append(name)
        cmd = [need("systemd-socket-activate"), "-l", self.socket_path, "--fdname=local"]
        for item in passed:
            cmd += ["-E", item]
        cmd += shlex.split(os.environ.get("UPLINKD_WRAPPER", ""))
        cmd += [h.UPLINKD_BIN, "-c", self.conf_path]
        with open(self.log_path, "ab") as log, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                         cwd=self.workdir)
        return self


def test_socket_activation_serves_queued_client(hx):
    """A client that connects before uplinkd runs is queued on the socket
    systemd-socket-activate bound, and uplinkd serves it from that very
    socket (same inode: not unlinked and bound again)."""
    need("systemd-socket-activate")
    if not uplinkd_supports_socket_activation():
        pytest.xfail("uplinkd does not call sd_listen_fds() yet: socket activation of "
                     "local.listen is not implemented (src/activation.c, src/local.c)")
    broker = hx.broker()
    conf = hx.config(broker)
    path = h.local_unix_path(conf)
    conf_path = hx.write_config(conf)
    daemon = ActivatedDaemon(hx.dir, conf_path, hx.notify, path)
    daemon.conf, daemon.expect_exit = conf, None
    if isinstance(getattr(hx, "_daemons", None), list):
        # Teardown then stops it, checks its exit code and sanitizer
        # reports, and attaches its log to a failure, as for hx.uplinkd().
        hx._daemons.append(daemon)
    else:
        hx.add_closer(lambda: daemon.stop())
    daemon.start()
    h.wait_for(lambda: os.path.exists(path) or not daemon.running(),
               what="systemd-socket-activate to bind %s" % path)
    assert daemon.running(), daemon.log_tail()
    inode = os.stat(path).st_ino
    cloud = hx.cloud_sub(broker, "gw-test/#")

    # This connection starts uplinkd; mosquitto_pub only exits 0 once its
    # QoS 1 PUBLISH was acknowledged, i.e. uplinkd accepted the queued
    # connection on the inherited socket.
    h.mosquitto_pub("--unix", path, "-q", "1", "-t", "dev/sa-child/telemetry", "-m", "queued",
                    timeout=h.TIMEOUT + 10)
    daemon.wait_ready()
    assert os.stat(path).st_ino == inode, "uplinkd replaced the activated socket with its own"
    cloud.wait("gw-test/sa-child/telemetry", "queued")

    # Later clients use the same socket, and the TCP listener (not passed)
    # was bound by uplinkd itself.
    h.mosquitto_pub("--unix", path, "-q", "1", "-t", "dev/sa-child/telemetry", "-m", "second")
    cloud.wait("gw-test/sa-child/telemetry", "second")
    assert h.tcp_accepts("127.0.0.1", h.local_tcp_port(conf))

    rc, _ = daemon.stop()
    assert rc == 0, "uplinkd exited with %s:\n%s" % (rc, daemon.log_tail())
    reports = daemon.sanitizer_reports()
    assert not reports, reports
    # The path belongs to the socket unit, which keeps listening on it while
    # uplinkd restarts: uplinkd must not unlink it.
    assert os.path.exists(path) and os.stat(path).st_ino == inode, "uplinkd removed %s" % path


# --------------------------------------------------------------------------
# The sandbox at run time. Without systemd as PID 1 the unit cannot be run
# here, so the next test checks the part most likely to break a working
# daemon: it traces uplinkd through a normal life (start, local publishes
# over both listeners, forwarding over TLS, uplinkctl, reload, stop) and
# checks every system call against the unit's SystemCallFilter= and every
# socket() against RestrictAddressFamilies=.
# --------------------------------------------------------------------------

def syscall_groups():
    out = run([need("systemd-analyze"), "syscall-filter", "--no-pager"]).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = set()
        elif current and line.strip() and not line.lstrip().startswith("#"):
            groups[current].add(line.strip())
    return groups


def expand(groups, item):
    if not item.startswith("@"):
        return {item}
    assert item in groups, "unknown syscall group %s" % item
    out = set()
    for member in groups[item]:
        out |= expand(groups, member)
    return out


def unit_syscall_allow_list():
    """The unit's SystemCallFilter= lines evaluated in order, as systemd
    does when the first one is an allow list."""
    with open(SERVICE_IN) as f:
        lines = [v for k, v in unit_directives(f.read(), "Service") if k == "SystemCallFilter"]
    assert lines and not lines[0].startswith("~"), "first SystemCallFilter= is not an allow list"
    groups = syscall_groups()
    allowed = set()
    for value in lines:
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(groups, item)
        if value.startswith("~"):
            allowed -= names
        else:
            allowed |= names
    return allowed


def unit_address_families():
    with open(SERVICE_IN) as f:
        values = [v for k, v in unit_directives(f.read(), "Service") if k == "RestrictAddressFamilies"]
    return set(" ".join(values).split())


def child_pid(pid):
    """The first child of process `pid` (the program strace started)."""
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids = f.read().split()
        except OSError:
            continue
        if kids:
            return int(kids[0])
    return None


def test_syscalls_and_socket_families_fit_the_unit(hx, monkeypatch):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace not installed (apt-get install strace)")
    if os.environ.get("UPLINKD_WRAPPER"):
        pytest.skip("uplinkd already runs under UPLINKD_WRAPPER")
    allowed = unit_syscall_allow_list()
    families = unit_address_families()
    trace = os.path.join(hx.dir, "strace.out")
    monkeypatch.setenv("UPLINKD_WRAPPER", "%s -f -qq -o %s" % (strace, trace))
    # LeakSanitizer cannot run under ptrace; the other tests check leaks.
    asan = os.environ.get("ASAN_OPTIONS", "")
    monkeypatch.setenv("ASAN_OPTIONS", (asan + ":" if asan else "") + "detect_leaks=0")

    gw = hx.gateway()
    pid = h.wait_for(lambda: child_pid(gw.daemon.pid), what="uplinkd under strace")
    cloud = hx.cloud_sub(gw.broker, "gw-test/#")
    h.mosquitto_pub("--unix", gw.unix, "-q", "1", "-t", "dev/c1/telemetry", "-m", "over-unix")
    h.mosquitto_pub("-h", "127.0.0.1", "-p", str(gw.tcp_port), "-q", "1",
                    "-t", "dev/c1/telemetry", "-m", "over-tcp")
    cloud.wait("gw-test/c1/telemetry", "over-unix")
    cloud.wait("gw-test/c1/telemetry", "over-tcp")
    h.uplinkctl(gw.control, "status")
    since = hx.notify.count()
    os.kill(pid, h.signal.SIGHUP)
    hx.notify.wait("RELOADING=1", since)
    h.wait_for(lambda: hx.notify.find("READY=1", since), what="READY=1 after the reload")
    os.kill(pid, h.signal.SIGTERM)
    gw.daemon.proc.wait(h.TIMEOUT)
    assert gw.daemon.proc.returncode == 0, gw.daemon.log_tail()

    used, sockets = set(), set()
    rx = re.compile(r"^\d+\s+([a-z_][a-z0-9_]*)\((.*)")
    with open(trace, errors="replace") as f:
        for line in f:
            m = rx.match(line)
            if not m:
                continue  # "<... resumed>", signals, exits
            used.add(m.group(1))
            if m.group(1) == "socket":
                sockets.add(m.group(2).split(",")[0].strip())
    assert "socket" in used and ("epoll_wait" in used or "epoll_pwait" in used), sorted(used)
    # execve is strace starting uplinkd (systemd applies the filter before it).
    outside = sorted(used - allowed - {"execve"})
    assert not outside, ("system calls the unit's SystemCallFilter= would refuse (EPERM): %s"
                         % outside)
    # glibc's getaddrinfo() may probe AF_NETLINK for the configured address
    # families; refused, it assumes both (see the unit's comment).
    bad = sorted(sockets - families - {"AF_NETLINK"})
    assert not bad, "socket families outside RestrictAddressFamilies=: %s" % bad
