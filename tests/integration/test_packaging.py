"""Packages: build the .deb and the .rpm, install the .deb on this machine, check it.

It changes the machine (dpkg -i: a system user, files in /etc, /usr,
/var/lib; purged at the end), which is what CI's throw-away root machine is
for. So it runs only as root, refuses to touch a machine where an uplinkd
package is already installed, and can be turned off with
UPLINKD_TEST_PACKAGES=0. The package build (scripts/package --lintian: deb,
rpm, lintian) takes 25-70 s on 2 cores, once per run (module fixture).

Needs debhelper, lintian, rpm and systemd (scripts/deps DEPS_PACKAGE).
Set UPLINKD_TEST_PACKAGE_DIR to a directory that already holds the output
of scripts/package --lintian to skip the build.

The one version is the project version in meson.build; test_versions_agree
checks that --version, the man pages and both packages say the same.
"""

import glob
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

import harness as h

PACKAGE_SCRIPT = os.path.join(h.REPO, "scripts", "package")
PACKAGING_MD = os.path.join(h.REPO, "docs", "packaging.md")
STATE_DIR = "/var/lib/uplinkd"

pytestmark = [
    pytest.mark.skipif(os.environ.get("UPLINKD_TEST_PACKAGES") == "0",
                       reason="UPLINKD_TEST_PACKAGES=0"),
    pytest.mark.skipif(os.geteuid() != 0, reason="installing the .deb needs root"),
]


def run(cmd, timeout=120, check=False, **kwargs):
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s%s" % (" ".join(cmd), proc.returncode,
                                                         proc.stdout, proc.stderr))
    return proc


def project_version():
    with open(os.path.join(h.REPO, "meson.build")) as f:
        text = f.read()
    m = re.search(r"project\s*\((.*?)\n\)", text, re.S)
    v = re.search(r"\bversion\s*:\s*'([^']+)'", m.group(1))
    return v.group(1)


@pytest.fixture(scope="module")
def packages():
    """Directory with uplinkd_<ver>-1_<arch>.deb, the .rpm and lintian.txt."""
    if dpkg_status():
        pytest.skip("an uplinkd package is already installed (%s): this test would replace "
                    "and purge it" % dpkg_status())
    missing = [t for t in ("dpkg-buildpackage", "dh", "lintian", "rpmbuild", "systemd-analyze")
               if shutil.which(t) is None]
    if missing:
        pytest.fail("missing tools %s: apt-get install debhelper lintian rpm systemd" % missing)
    given = os.environ.get("UPLINKD_TEST_PACKAGE_DIR")
    if given:
        yield given
        return
    out = tempfile.mkdtemp(prefix="uplk-pkg-", dir="/tmp")
    try:
        started = time.monotonic()
        proc = run([PACKAGE_SCRIPT, "--lintian", out], timeout=1200)
        took = time.monotonic() - started
        print("scripts/package took %.0f s" % took)
        if proc.returncode != 0:
            pytest.fail("scripts/package failed (%d, %.0f s):\n%s%s"
                        % (proc.returncode, took, proc.stdout[-6000:], proc.stderr[-6000:]))
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def the_deb(directory):
    debs = [p for p in glob.glob(os.path.join(directory, "uplinkd_*.deb")) if "dbgsym" not in p]
    assert len(debs) == 1, debs
    return debs[0]


def the_rpm(directory):
    rpms = [p for p in glob.glob(os.path.join(directory, "uplinkd-*.rpm"))
            if "debug" not in p and not p.endswith(".src.rpm")]
    assert len(rpms) == 1, rpms
    return rpms[0]


def dpkg_status():
    proc = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "uplinkd"])
    return proc.stdout.strip() if proc.returncode == 0 else ""


def install(deb):
    run(["dpkg", "-i", deb], check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    assert dpkg_status().startswith("ii"), dpkg_status()


@pytest.fixture(scope="module")
def installed(packages):
    """The .deb installed with dpkg -i; purged at the end of the module."""
    deb = the_deb(packages)
    install(deb)
    try:
        yield deb
    finally:
        if dpkg_status():
            run(["dpkg", "-P", "uplinkd"])


def owner(path):
    st = os.stat(path)
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def test_lintian_clean(packages):
    """No lintian errors; every warning is listed in docs/packaging.md."""
    with open(os.path.join(packages, "lintian.txt")) as f:
        report = f.read()
    errors = [l for l in report.splitlines() if l.startswith("E:")]
    assert not errors, "lintian errors:\n" + "\n".join(errors)
    with open(PACKAGING_MD) as f:
        doc = f.read()
    tags = sorted({l.split()[2] for l in report.splitlines()
                   if l.startswith("W:") and len(l.split()) > 2})
    undocumented = [t for t in tags if t not in doc]
    assert not undocumented, "lintian warnings not explained in docs/packaging.md: %s" % undocumented


def test_rpmlint_clean(packages):
    """No rpmlint errors (packaging/rpm/rpmlint.toml filters the deliberate
    ones, each with its reason); every warning left is listed in
    docs/packaging.md."""
    path = os.path.join(packages, "rpmlint.txt")
    if not os.path.exists(path):
        pytest.skip("no rpmlint.txt: rpmlint not installed (apt-get install rpmlint)")
    with open(path) as f:
        report = f.read()
    findings = [l for l in report.splitlines() if re.match(r"^uplinkd\S*: [EW]: ", l)]
    errors = [l for l in findings if ": E: " in l]
    assert not errors, "rpmlint errors:\n" + report
    assert re.search(r"\b0 errors\b", report), report
    with open(PACKAGING_MD) as f:
        doc = f.read()
    tags = sorted({l.split(": W: ", 1)[1].split()[0] for l in findings})
    undocumented = [t for t in tags if t not in doc]
    assert not undocumented, "rpmlint warnings not explained in docs/packaging.md: %s" % undocumented


FILES = [
    # path, owner, group, mode
    ("/usr/sbin/uplinkd", "root", "root", 0o755),
    ("/usr/bin/uplinkctl", "root", "root", 0o755),
    ("/etc/uplinkd", "root", "uplinkd", 0o750),
    ("/etc/uplinkd/uplinkd.yaml", "root", "uplinkd", 0o640),
    ("/lib/systemd/system/uplinkd.service", "root", "root", 0o644),
    ("/lib/systemd/system/uplinkd.socket", "root", "root", 0o644),
    ("/usr/lib/sysusers.d/uplinkd.conf", "root", "root", 0o644),
    ("/usr/lib/tmpfiles.d/uplinkd.conf", "root", "root", 0o644),
    ("/usr/share/man/man8/uplinkd.8.gz", "root", "root", 0o644),
    ("/usr/share/man/man1/uplinkctl.1.gz", "root", "root", 0o644),
    ("/usr/share/man/man5/uplinkd.yaml.5.gz", "root", "root", 0o644),
    ("/var/lib/uplinkd", "uplinkd", "uplinkd", 0o750),
    ("/run/uplinkd", "uplinkd", "uplinkd", 0o755),
]


def test_files_owner_and_mode(installed):
    wrong = []
    for path, user, group, mode in FILES:
        if not os.path.exists(path):
            wrong.append("%s missing" % path)
            continue
        got = owner(path)
        if got != (user, group, mode):
            wrong.append("%s is %s:%s %04o, expected %s:%s %04o" % ((path,) + got + (user, group, mode)))
    assert not wrong, "\n".join(wrong)
    docs = glob.glob("/usr/share/doc/uplinkd/README.Debian*")
    assert docs, "README.Debian not installed"
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "uplinkd"], check=True).stdout
    assert "/etc/uplinkd/uplinkd.yaml" in conffiles, conffiles
    # The state directory is made by tmpfiles, not shipped: dpkg must not
    # own it, or removing the package would try to delete it.
    listed = run(["dpkg", "-L", "uplinkd"], check=True).stdout.split()
    assert STATE_DIR not in listed


def test_binaries_hardened(installed):
    """dpkg-buildflags hardening=+all reached the binaries: PIE, full RELRO
    (BIND_NOW), stack protector, fortified libc calls."""
    for path in ("/usr/sbin/uplinkd", "/usr/bin/uplinkctl"):
        header = run(["readelf", "-h", "-d", "-W", path], check=True).stdout
        assert "DYN (Position-Independent Executable" in header, path
        assert "BIND_NOW" in header or "Flags: NOW" in header, path
        syms = run(["readelf", "--dyn-syms", "-W", path], check=True).stdout
        assert "__stack_chk_fail" in syms, "%s: no stack protector" % path
    syms = run(["readelf", "--dyn-syms", "-W", "/usr/sbin/uplinkd"], check=True).stdout
    assert re.search(r"__\w+_chk@", syms.replace("__stack_chk_fail", "")), "uplinkd: not fortified"


def test_user_exists(installed):
    user = pwd.getpwnam("uplinkd")
    assert 0 < user.pw_uid < 1000, "not a system uid: %d" % user.pw_uid
    assert user.pw_dir == STATE_DIR and user.pw_shell.endswith("nologin"), user
    assert grp.getgrgid(user.pw_gid).gr_name == "uplinkd"


def test_check_config_passes_on_shipped_config(installed):
    # As the service runs it: as user uplinkd, with the default path.
    proc = run(["runuser", "-u", "uplinkd", "--", "/usr/sbin/uplinkd", "--check-config"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "/etc/uplinkd/uplinkd.yaml" in proc.stdout + proc.stderr
    # Others cannot read it (it may hold passwords).
    proc = run(["runuser", "-u", "nobody", "--", "cat", "/etc/uplinkd/uplinkd.yaml"])
    assert proc.returncode != 0, "user nobody can read /etc/uplinkd/uplinkd.yaml"


def test_installed_units_verify(installed):
    proc = run(["systemd-analyze", "verify", "/lib/systemd/system/uplinkd.service",
                "/lib/systemd/system/uplinkd.socket"], env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "uplinkd" not in out, "verify (rc %d):\n%s" % (proc.returncode, out)
    proc = run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                "/lib/systemd/system/uplinkd.service"])
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m and float(m.group(1)) <= 2.0, proc.stdout[-2000:]
    # ExecReload= runs kill(1), procps' on Debian, which is not Essential: a
    # minimal container without it fails every reload with 203/EXEC.
    depends = run(["dpkg-deb", "-f", installed, "Depends"], check=True).stdout
    assert re.search(r"\bprocps\b", depends), depends


def test_service_enabled_socket_not(installed):
    """dh_installsystemd enabled the service (a symlink, even without systemd
    running); the socket unit is opt-in."""
    assert os.path.islink("/etc/systemd/system/multi-user.target.wants/uplinkd.service")
    assert not os.path.exists("/etc/systemd/system/sockets.target.wants/uplinkd.socket")


def test_versions_agree(installed, packages):
    version = project_version()
    got = {}
    out = run(["/usr/sbin/uplinkd", "--version"], check=True).stdout
    got["uplinkd --version"] = out.split()[1] if out.startswith("uplinkd ") else out
    out = run(["/usr/bin/uplinkctl", "--version"], check=True).stdout
    got["uplinkctl --version"] = out.split()[1] if out.startswith("uplinkctl ") else out
    deb_version = run(["dpkg-query", "-W", "-f=${Version}", "uplinkd"], check=True).stdout
    got["deb"] = deb_version.rsplit("-", 1)[0]
    got["rpm"] = run(["rpm", "-qp", "--qf", "%{VERSION}", the_rpm(packages)], check=True).stdout
    for page in ("man8/uplinkd.8.gz", "man1/uplinkctl.1.gz", "man5/uplinkd.yaml.5.gz"):
        text = run(["zcat", "/usr/share/man/" + page], check=True).stdout
        th = next((l for l in text.splitlines() if l.startswith(".TH ")), "")
        m = re.search(r'"uplinkd ([^"]+)"', th)
        got[page] = m.group(1) if m else th
    wrong = {k: v for k, v in got.items() if v != version}
    assert not wrong, "meson.build says %s, but: %s" % (version, wrong)


def test_rpm_contents(packages):
    rpm = the_rpm(packages)
    conf = run(["rpm", "-qp", "--configfiles", rpm], check=True).stdout.split()
    assert conf == ["/etc/uplinkd/uplinkd.yaml"], conf
    listing = run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} "
                                         "%{FILEFLAGS:fflags} %{FILENAMES}\n]", rpm],
                  check=True).stdout
    lines = {l.split()[-1]: l.split() for l in listing.splitlines()}
    assert lines["/etc/uplinkd/uplinkd.yaml"][:3] == ["-rw-r-----", "root", "uplinkd"], listing
    assert "n" in lines["/etc/uplinkd/uplinkd.yaml"][3], "not %config(noreplace): " + listing
    assert lines["/etc/uplinkd"][:3] == ["drwxr-x---", "root", "uplinkd"], listing
    assert lines["/var/lib/uplinkd"][:3] == ["drwxr-x---", "uplinkd", "uplinkd"], listing
    for name in ("/usr/sbin/uplinkd", "/usr/bin/uplinkctl"):
        assert name in lines, listing
    for page in ("man8/uplinkd.8", "man1/uplinkctl.1", "man5/uplinkd.yaml.5"):
        assert any(re.search(r"/%s(\.gz)?$" % re.escape(page), p) for p in lines), \
            "no %s in the rpm:\n%s" % (page, listing)
    # ExecReload= runs kill(1): the package must pull it in.
    requires = run(["rpm", "-qp", "--requires", rpm], check=True).stdout
    assert "/usr/bin/kill" in requires, requires
    assert any(p.endswith("/systemd/system/uplinkd.service") for p in lines), listing
    scripts = run(["rpm", "-qp", "--scripts", rpm], check=True).stdout
    for needle in ("systemd-sysusers", "systemd-tmpfiles", "preset", "disable", "restart"):
        assert needle in scripts, "%r not in the scriptlets:\n%s" % (needle, scripts)


def test_installed_docs_links_resolve(installed):
    """The quick starts, troubleshooting, diagnostics and profiles are installed, and every
    relative link in an installed page points at an installed file (not at a .md.gz).
    Defined before test_remove_keeps_spool_purge_deletes_it, which purges the package."""
    root = "/usr/share/doc/uplinkd"
    for page in ("README.md", "docs/troubleshooting.md", "docs/quickstart-hivemq.md",
                 "docs/quickstart-cumulocity.md", "docs/quickstart-gcp.md",
                 "docs/quickstart-akenza.md", "docs/diagnostics.md", "docs/profiles.md"):
        assert os.path.isfile(os.path.join(root, page)), page + " not installed"
    broken = []
    for top, _dirs, names in os.walk(root):
        for name in (n for n in names if n.endswith(".md")):
            path = os.path.join(top, name)
            with open(path) as f:
                for target in re.findall(r"\]\(([^)\s]+)\)", f.read()):
                    if re.match(r"[a-z]+:", target) or target.startswith("#"):
                        continue
                    dest = os.path.normpath(os.path.join(top, target.split("#")[0]))
                    if not dest.startswith(root + "/") or not os.path.exists(dest):
                        broken.append("%s -> %s" % (os.path.relpath(path, root), target))
    assert not broken, "\n".join(broken)


def test_remove_keeps_spool_purge_deletes_it(installed):
    """Runs last: remove, check, purge, check (reinstalls first if needed)."""
    if not dpkg_status().startswith("ii"):
        install(installed)
    uplinkd = pwd.getpwnam("uplinkd")
    marker = os.path.join(STATE_DIR, "spool-marker")
    with open(marker, "w") as f:
        f.write("queued data\n")
    os.chown(marker, uplinkd.pw_uid, uplinkd.pw_gid)

    run(["dpkg", "-r", "uplinkd"], check=True)
    assert not os.path.exists("/usr/sbin/uplinkd")
    assert os.path.exists(marker), "dpkg -r deleted the spool"
    assert os.path.exists("/etc/uplinkd/uplinkd.yaml"), "dpkg -r deleted the conffile"
    assert dpkg_status().startswith("rc"), dpkg_status()

    run(["dpkg", "-P", "uplinkd"], check=True)
    assert not os.path.exists(STATE_DIR), "dpkg -P kept %s" % STATE_DIR
    assert not os.path.exists("/etc/uplinkd/uplinkd.yaml"), "dpkg -P kept the conffile"
    assert not os.path.exists("/etc/systemd/system/multi-user.target.wants/uplinkd.service")
    assert dpkg_status() == "", dpkg_status()
    # The user stays (Debian policy: its uid may still own files elsewhere).
    pwd.getpwnam("uplinkd")
