"""`uplinkd --check-config` prints, byte for byte, what it printed before.

Every fixture in tests/unit/data/conf and every file in conf/ is checked,
and its standard output, standard error and exit status are compared with
tests/unit/data/conf/expected/<file>.out. This is the safety net of the
House redesign (issue 13): moving the config sections into the profile
folders must not change one character an operator sees.

Machine-specific parts are normalised before the comparison: the absolute
path of the checkout becomes ROOT, a process id in "uplinkd[PID]" becomes
PID, and the list of profiles (src/profiles/meson.build, as "expected one
of" messages print it) becomes PROFILES, so adding a profile changes no
expected file. conf/demo.yaml is rendered the way scripts/demo renders it, with fixed
values for its placeholders.

After an intended change of a message, rewrite the expected files with
    UPLINKD_GOLDEN_UPDATE=1 /usr/bin/python3 -m pytest tests/integration/test_check_config_golden.py
and review the diff (git diff tests/unit/data/conf/expected) before committing.
"""
import glob
import os
import re
import subprocess

import pytest

import harness as h

FIXTURES = os.path.join(h.REPO, "tests", "unit", "data", "conf")
EXPECTED = os.path.join(FIXTURES, "expected")
DEMO_VALUES = {"@DEMO_DIR@": "/nonexistent/uplinkd-demo", "@CLOUD_PORT@": "18883",
               "@LOCAL_PORT@": "11883"}


def config_files():
    files = sorted(glob.glob(os.path.join(FIXTURES, "*.yaml")))
    files += sorted(glob.glob(os.path.join(h.REPO, "conf", "*.yaml")))
    return [os.path.relpath(f, h.REPO) for f in files]


def profile_names():
    """The one list of profiles, from src/profiles/meson.build."""
    with open(os.path.join(h.REPO, "src", "profiles", "meson.build")) as f:
        match = re.search(r"^profile_names = \[([^\]]*)\]", f.read(), re.M)
    assert match, "no profile_names list in src/profiles/meson.build"
    return re.findall(r"'([^']+)'", match.group(1))


def normalise(text):
    text = text.replace(h.REPO, "ROOT")
    text = text.replace(", ".join(profile_names()), "PROFILES")
    return re.sub(r"uplinkd\[\d+\]", "uplinkd[PID]", text)


def check(rel, tmp_path):
    path = rel
    if rel == os.path.join("conf", "demo.yaml"):
        with open(os.path.join(h.REPO, rel)) as f:
            text = f.read()
        for key, value in DEMO_VALUES.items():
            text = text.replace(key, value)
        path = os.path.join(tmp_path, "demo.yaml")
        with open(path, "w") as f:
            f.write(text)
    env = dict(os.environ, UPLINKD_SERVICE_USER="")
    proc = subprocess.run([h.UPLINKD_BIN, "--check-config", "-c", path], cwd=h.REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=h.TIMEOUT)
    out = "--- stdout\n%s--- stderr\n%s--- exit %d\n" % (proc.stdout, proc.stderr,
                                                          proc.returncode)
    return normalise(out.replace(str(path), rel) if path != rel else out)


@pytest.mark.parametrize("rel", config_files())
def test_check_config_output_unchanged(rel, tmp_path):
    got = check(rel, str(tmp_path))
    expected_path = os.path.join(EXPECTED, os.path.basename(rel) + ".out")
    if rel.startswith("conf" + os.sep):
        expected_path = os.path.join(EXPECTED, "conf-" + os.path.basename(rel) + ".out")
    if os.environ.get("UPLINKD_GOLDEN_UPDATE"):
        os.makedirs(EXPECTED, exist_ok=True)
        with open(expected_path, "w") as f:
            f.write(got)
    assert os.path.exists(expected_path), (
        "no expected output for %s: run with UPLINKD_GOLDEN_UPDATE=1 and review it" % rel)
    with open(expected_path) as f:
        assert got == f.read(), "--check-config output of %s changed" % rel


def test_every_expected_file_has_a_config():
    """A fixture that was removed leaves no stale expectation behind."""
    names = {os.path.basename(r) + ".out" if not r.startswith("conf" + os.sep)
             else "conf-" + os.path.basename(r) + ".out" for r in config_files()}
    stale = sorted(set(os.listdir(EXPECTED)) - names)
    assert stale == [], "expected outputs without a config file: %s" % stale
