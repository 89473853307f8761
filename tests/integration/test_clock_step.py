"""A JWT refused because the clock was wrong is signed again as soon as the clock is stepped.

Issue #4: "A token rejected with CONNACK 4 or 5 right after a clock step triggers an immediate
re-sign rather than a long backoff." The clock here is really stepped for the daemon: uplinkd runs
under libfaketime (Debian package faketime), which answers time()/clock_gettime(CLOCK_REALTIME)
from an offset in a file read on every call (FAKETIME_NO_CACHE=1); the monotonic clock stays real
(FAKETIME_DONT_FAKE_MONOTONIC=1), so libuv's timers and the daemon's step detection (wall clock
minus monotonic clock since the token was signed) see what they would see when NTP steps a
clock. The fake JWT cloud is not preloaded: it judges iat and exp by the real time.

The clock starts two hours *ahead*: the token's iat lies in the cloud's future and it is refused
with CONNACK 5 ("iat in future"). Ahead rather than behind because the daemon refuses to sign
before its build date, and an offset into the future can never cross that (behind by two hours
would, on a binary built in the first two hours of a UTC day), and because the test PKI's
certificates are valid from the moment they were made, so a clock behind would fail TLS first.
"""

import os
import re
import time

import pytest

import fakecloud

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
AUD = "test-project"
OFFSET_S = 2 * 3600
BACKOFF_BASE_S = 60  # the backoff the re-sign must not wait out


def write_offset(path, seconds):
    """libfaketime's relative offset ("+7200", "+0"), replaced atomically: with NO_CACHE the
    daemon reads the file on every time() call and must never see half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("%+d\n" % seconds)
    os.rename(tmp, path)


@pytest.fixture
def faketime_env(hx):
    if not os.path.exists(FAKETIME_LIB):
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    path = os.path.join(hx.dir, "faketime.rc")
    write_offset(path, OFFSET_S)
    env = {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME_TIMESTAMP_FILE": path,
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    # An ASan build wants its runtime first in the library list; libfaketime only wraps the
    # time calls, which ASan does not intercept, so the order does not matter here.
    asan = os.environ.get("ASAN_OPTIONS", "")
    env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
    return path, env


def test_clock_step_after_refused_jwt_resigns_at_once(hx, faketime_env):
    offset_file, env = faketime_env
    key = fakecloud.Key.generate("ES256", hx.dir)
    cloud = fakecloud.start(hx, keys=[key], aud=AUD, skew=5)
    conf = hx.config(cloud, uplink={
        "auth": {"type": "jwt", "key": key.private_path, "aud": AUD,
                 "clock_check": "build-date"},
        "reconnect": {"base": "%ds" % BACKOFF_BASE_S, "cap": "%ds" % (3 * BACKOFF_BASE_S)},
    })
    daemon = hx.uplinkd(conf, env=env)

    # The preload works: the token was signed two hours in the cloud's future and refused.
    refused = cloud.wait_event("connect", client_id="gw-test", result="refused")
    assert refused["reason"] == "iat in future", refused
    assert refused["iat"] - refused["now"] > OFFSET_S - 120, refused
    daemon.wait_log(r"the server refused the JWT \(CONNACK 5\)")
    # ... and the uplink is now in a long backoff (at least reconnect.base).
    line = daemon.wait_log(r"-> BACKOFF .*next attempt in ([0-9.]+) s")
    assert float(re.search(r"next attempt in ([0-9.]+) s", line).group(1)) >= BACKOFF_BASE_S
    assert daemon.find_log(r"wall clock was stepped") is None

    # NTP steps the clock back to the right time.
    write_offset(offset_file, 0)
    stepped_at = time.monotonic()
    accepted = cloud.wait_event("connect", client_id="gw-test", result="accepted", timeout=15)
    waited = time.monotonic() - stepped_at
    assert waited < 5, "re-signed %.1f s after the step (backoff was %d s)" % (
        waited, BACKOFF_BASE_S)
    # A freshly signed token: iat is the real time minus the default 60 s skew.
    assert abs(accepted["iat"] + 60 - accepted["now"]) <= 5, accepted
    assert len(cloud.events("connect", client_id="gw-test", result="refused")) == 1
    # The log says why it did not wait.
    step = daemon.find_log(r"the wall clock was stepped by -\d+ s since the refused JWT was "
                           r"signed; signing a new JWT now instead of waiting out the backoff")
    assert step is not None, daemon.log_tail()
    seconds = int(re.search(r"stepped by (-\d+) s", step).group(1))
    assert abs(seconds + OFFSET_S) < 30, step
