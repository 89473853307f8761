"""The outside parts the integration tests need, checked once before any test runs.

A missing part (the fake cloud plugin, softhsm2, haproxy, ...) would otherwise fail or skip
every test that uses it, one by one. conftest.py calls missing() after collection with the
test files selected and stops the run with one line naming what is missing and the fix;
scripts/test runs this file (`/usr/bin/python3 tests/integration/parts.py`) right after the
build, for the whole suite.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fakecloud  # noqa: E402  (after the sys.path line, for the command-line use)

ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def _plugin():
    path = fakecloud.plugin_path()
    return [] if os.path.exists(path) else [path]


def _programs(*names):
    return lambda: [n for n in names if shutil.which(n) is None and not os.path.exists(n)]


def _files(*paths):
    return lambda: [p for p in paths if not os.path.exists(p)]


# (what, the check: returns what is missing, the fix, the test files that need it or None
# for every file)
PARTS = [
    ("mosquitto broker and clients", _programs("mosquitto", "mosquitto_pub", "mosquitto_sub"),
     "apt-get install mosquitto mosquitto-clients", None),
    ("openssl", _programs("openssl"), "apt-get install openssl", None),
    ("fakecloud plugin", _plugin,
     "apt-get install mosquitto-dev libjansson-dev, then meson configure "
     "--clearcache -Dfakecloud=enabled BUILD && ninja -C BUILD (scripts/test does this), "
     "or set FAKECLOUD_PLUGIN",
     {"test_clock_step", "test_credentials", "test_diagnose", "test_fakecloud",
      "test_jwt_uplink", "test_pkcs11", "test_profile_akenza", "test_profile_gcp",
      "test_uplinkctl"}),
    ("softhsm2 / PKCS#11", lambda: _files(SOFTHSM, ENGINE)() +
     _programs("/usr/bin/softhsm2-util", "/usr/bin/pkcs11-tool")(),
     "apt-get install softhsm2 opensc libengine-pkcs11-openssl", {"test_jwt_cli", "test_pkcs11"}),
    ("haproxy", _programs("haproxy", "/usr/sbin/haproxy"), "apt-get install haproxy",
     {"test_diagnose"}),
]


def missing(modules=None):
    """One line per missing part needed by the test files `modules` (names without .py;
    None means the whole suite): "missing for the tests: WHAT (PATHS): FIX"."""
    lines = []
    for what, check, fix, users in PARTS:
        if modules is not None and users is not None and not (users & set(modules)):
            continue
        gone = check()
        if gone:
            lines.append("missing for the tests: %s (%s): %s" % (what, ", ".join(gone), fix))
    return lines


if __name__ == "__main__":
    found = missing()
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)
