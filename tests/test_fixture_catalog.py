"""The fixture catalogue: every fixture module is listed, and one whose library is missing is listed as skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT
from fixtures.catalog import discover

# Imports of the blocked libraries fail and find_spec finds nothing, as when they are not installed.
WITHOUT_LIBRARIES = """
import importlib.util, json, sys
BLOCKED = {"flow_matching", "torchcfm", "ot"}
for name in BLOCKED:
    sys.modules[name] = None
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in BLOCKED else real_find_spec(name, package))
from fixtures.catalog import discover
print(json.dumps({f.name: [f.skip, f.correct, f.expect] for f in discover()}))
"""


def test_library_fixtures_are_listed_with_their_expectations():
    fixtures = {f.name: f for f in discover()}
    libs = {name: f for name, f in fixtures.items() if name.startswith("libs.")}
    for prefix in ("libs.flow_matching_", "libs.torchcfm_", "libs.diffusers_", "libs.rectified_flow_"):
        assert any(name.startswith(prefix) and f.correct for name, f in libs.items()), prefix
        assert not any(name.startswith(prefix + "_") for name in libs), "private modules are not fixtures"
    for fixture in libs.values():
        assert fixture.correct or any(v in ("fail", "warn") for v in fixture.check_verdicts.values()), fixture.name


def test_a_fixture_whose_library_is_missing_is_listed_as_skipped_with_the_install_line():
    result = subprocess.run([sys.executable, "-c", WITHOUT_LIBRARIES], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = json.loads(result.stdout.strip().splitlines()[-1])
    everything = {f.name for f in discover()}
    assert set(listed) == everything, "a fixture was dropped instead of skipped"
    skip, correct, expect = listed["libs.torchcfm_exact_ot"]
    assert correct and expect and skip.startswith("needs torchcfm") and "--no-deps" in skip
    assert listed["libs.flow_matching_target_sign_flipped"][0].startswith("needs flow_matching")
    assert listed["libs.rectified_flow_plain"][0] is None and listed["libs.diffusers_sd3_plain"][0] is None
    assert listed["digits"][0] is None
