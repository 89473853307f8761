"""The front door: the README's two commands in either order, and the docs the packages ship.

- scripts/test reconfigures a build dir made without the fake cloud plugin (as scripts/demo
  used to leave it on a fresh machine) instead of reusing it and failing 71 tests.
- A part the tests need that is missing stops the run at collection with one line
  (tests/integration/parts.py), not one failure per test.
- Every relative link in the docs the .deb and .rpm ship resolves to a file they also ship.
"""

import os
import re
import subprocess
import sys

import harness as h


def test_scripts_test_reconfigures_a_build_without_the_plugin(tmp_path):
    build = str(tmp_path / "build")
    subprocess.run(["meson", "setup", "-Dfakecloud=disabled", "-Dtests=false", build],
                   cwd=h.REPO, check=True, capture_output=True, timeout=300)
    assert not os.path.exists(os.path.join(build, "tests", "fakecloud", "fakecloud.so"))
    env = dict(os.environ, SKIP_DEPS="1", BUILD_DIR=build, TEST_BUILD_ONLY="1")
    r = subprocess.run([os.path.join(h.REPO, "scripts", "test")], cwd=h.REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "reconfiguring" in r.stdout
    assert os.path.exists(os.path.join(build, "tests", "fakecloud", "fakecloud.so"))


def test_missing_plugin_stops_the_run_with_one_line(tmp_path):
    env = dict(os.environ, FAKECLOUD_PLUGIN=str(tmp_path / "nothing.so"),
               UPLINKD_CHECK_PARTS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "tests/integration/test_fakecloud.py",
                        "tests/integration/test_profile_gcp.py"],
                       cwd=h.REPO, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    lines = [ln for ln in out.splitlines() if "missing for the tests:" in ln]
    assert r.returncode == 4, out
    assert len(lines) == 1 and "fakecloud plugin" in lines[0] and "nothing.so" in lines[0], out


def shipped_docs(listing):
    """The doc files a packaging list names (files, or directories taken whole), repo-relative."""
    files = set()
    for entry in listing:
        path = os.path.join(h.REPO, entry)
        if os.path.isdir(path):
            for top, _dirs, names in os.walk(path):
                files.update(os.path.relpath(os.path.join(top, n), h.REPO) for n in names)
        else:
            files.add(entry)
    return files


LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(files):
    broken = []
    for name in sorted(f for f in files if f.endswith(".md")):
        with open(os.path.join(h.REPO, name)) as f:
            text = f.read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            rel = os.path.normpath(os.path.join(os.path.dirname(name), target.split("#")[0]))
            if rel not in files and not any(f.startswith(rel + "/") for f in files):
                broken.append("%s -> %s" % (name, target))
    return broken


WANTED = {"docs/troubleshooting.md", "docs/quickstart-hivemq.md", "docs/quickstart-cumulocity.md",
          "docs/quickstart-gcp.md", "docs/quickstart-akenza.md", "docs/diagnostics.md",
          "docs/profiles.md", "docs/configuration.md", "docs/operations.md"}


def test_deb_docs_shipped_and_links_resolve():
    with open(os.path.join(h.REPO, "packaging", "debian", "uplinkd.docs")) as f:
        files = shipped_docs(ln.strip() for ln in f if ln.strip() and not ln.startswith("#"))
    assert WANTED <= files, sorted(WANTED - files)
    assert broken_links(files) == []


def test_rpm_docs_shipped_and_links_resolve():
    with open(os.path.join(h.REPO, "packaging", "rpm", "uplinkd.spec")) as f:
        docs = [ln.split()[1:] for ln in f if ln.startswith("%doc ")]
    files = shipped_docs(e for line in docs for e in line)
    assert WANTED <= files, sorted(WANTED - files)
    assert broken_links(files) == []


def test_cumulocity_quickstart_describes_the_device_token():
    """cumulocity.token is implemented (src/profiles/cumulocity/cumulocity.c,
    test_profile_c8y.py): the quick start must document it, not list it as
    missing."""
    with open(os.path.join(h.REPO, "docs", "quickstart-cumulocity.md")) as f:
        text = f.read()
    assert "cumulocity.token: true" in text
    missing = text[text.index("Not implemented yet"):]
    assert "s/uat" not in missing and "device token" not in missing
