"""The test tiers stay what they say: the fast tier (`python -m pytest -q -m fast`) holds no
test that starts Ray, an S3 server, a browser or reads the shared data; every test that starts
Ray is in the one xdist group that runs in a single process; `require` skips on a laptop and
fails in CI.

    python -m pytest -q tests/test_tiers.py

The suite is collected in a fresh pytest (a subprocess, `--collect-only -m fast`), with a
small plugin that writes down each test's fixtures (the transitive closure), markers and the
source of every fixture it uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HEAVY_FIXTURES, HEAVY_MARKERS, RAY_FIXTURES, require

REPO = Path(__file__).resolve().parents[1]

# What starts Ray, a server, a browser or reads the shared data, in a fixture's or a test's
# own source. A fixture that does any of it must be listed in HEAVY_FIXTURES; a test that
# does it itself must not be fast.
STARTS_SOMETHING = re.compile(
    r"ray\.init\(|start_local_ray\(|Cluster\(|\"start\", \"--head\"|moto\.server|"
    r"webdriver\.|\"mlflow\"\), \"server\"|SHARED_TAR|train\.fit\(|tune\.sweep\(|"
    r"fit_in_thread\(|gpu_check")

PLUGIN = textwrap.dedent("""
    import inspect, json, os

    import pytest

    deselected = []

    def pytest_deselected(items):
        deselected.extend(items)

    def _source(func):
        try:
            return inspect.getsource(func)
        except (OSError, TypeError):
            return ""

    def _row(item, selected):
        defs = item._fixtureinfo.name2fixturedefs
        return {"nodeid": item.nodeid, "selected": selected,
                "fixtures": list(item.fixturenames),
                "markers": sorted({m.name for m in item.iter_markers()}),
                "source": _source(getattr(item, "function", None)),
                "fixture_sources": {name: _source(d[-1].func) for name, d in defs.items()
                                    if d and _ours(d[-1].func)}}

    def _ours(func):
        try:
            return os.path.abspath(inspect.getfile(func)).startswith(os.environ["TIERS_TESTS"])
        except TypeError:
            return False

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(session):
        rows = [_row(i, True) for i in session.items] + [_row(i, False) for i in deselected]
        with open(os.environ["TIERS_DUMP"], "w") as f:
            json.dump(rows, f)
""")


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> list[dict]:
    """Every test of the suite, as `pytest --collect-only -q -m fast` sees it."""
    root = tmp_path_factory.mktemp("tiers")
    (root / "tiers_dump.py").write_text(PLUGIN)
    dump = root / "tests.json"
    env = {**os.environ, "TIERS_DUMP": str(dump), "TIERS_TESTS": str(REPO / "tests") + os.sep,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "fast",
                           "-n", "0", "-p", "tiers_dump", "-p", "no:cacheprovider"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(dump.read_text())


def test_the_fast_tier_selects_exactly_the_tests_with_no_heavy_fixture_or_marker(collected):
    selected = {r["nodeid"] for r in collected if r["selected"]}
    light = {r["nodeid"] for r in collected
             if not set(r["fixtures"]) & set(HEAVY_FIXTURES)
             and not set(r["markers"]) & set(HEAVY_MARKERS)}
    assert selected == light
    assert all("fast" in r["markers"] for r in collected if r["selected"])
    # Both tiers are there: the fast one is not empty, and the Ray tests are not in it.
    assert len(selected) >= 50 and len(collected) - len(selected) >= 20
    assert not any(r["nodeid"].startswith(("tests/test_train_ray.py", "tests/test_jobs_api.py",
                                           "tests/test_tune_ray.py")) for r in collected
                   if r["selected"])


def test_the_tests_that_start_ray_run_one_after_another_in_one_process(collected):
    # The suite runs in two processes (pyproject's addopts): the tests of the xdist group run
    # in one of them, one at a time; two Ray instances side by side would confuse Train V2.
    starts_ray = {r["nodeid"] for r in collected
                  if set(r["fixtures"]) & RAY_FIXTURES or "ray" in r["markers"]}
    grouped = {r["nodeid"] for r in collected if "xdist_group" in r["markers"]}
    assert starts_ray == grouped and len(grouped) >= 20
    assert not grouped & {r["nodeid"] for r in collected if r["selected"]}


def test_every_fixture_that_starts_a_server_or_reads_the_shared_data_is_listed_as_heavy(
        collected):
    sources: dict[str, str] = {}
    for r in collected:
        sources.update(r["fixture_sources"])
    starting = {name for name, src in sources.items() if STARTS_SOMETHING.search(src)}
    assert starting, "the pattern finds nothing: has the plugin stopped reading sources?"
    assert starting <= set(HEAVY_FIXTURES), (
        f"fixtures that start Ray, a server or a browser, or read the shared data, missing "
        f"from HEAVY_FIXTURES in tests/conftest.py: {sorted(starting - set(HEAVY_FIXTURES))}")


def test_no_fast_test_starts_ray_a_server_or_a_browser_by_itself(collected):
    starting = [r["nodeid"] for r in collected
                if r["selected"] and STARTS_SOMETHING.search(r["source"])]
    assert not starting, (f"fast tests that start something themselves (mark them `ray` or "
                          f"use a fixture of HEAVY_FIXTURES): {starting}")


def test_a_missing_resource_skips_on_a_laptop_and_fails_in_ci(monkeypatch):
    what = "apt-get install chromium chromium-driver"
    require(True, what)  # present: nothing happens, on a laptop and in CI
    monkeypatch.delenv("CIFAR_RAY_CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=what):
        require(False, what)
    monkeypatch.setenv("CIFAR_RAY_CI", "1")
    require(True, what)
    with pytest.raises(pytest.fail.Exception, match=f"CIFAR_RAY_CI=1.*{what}"):
        require(False, what)
