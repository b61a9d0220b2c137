"""Checks of bench/step.py's command line: a chosen subset of variants, the results file written after every
variant (atomically), and a clear error for a variant that does not exist. Small (--quick: batch 16, 2 reps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

STEP = Path(__file__).with_name("step.py")
ROOT = STEP.parent.parent


def run_step(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STEP), "--quick", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_a_subset_of_variants_is_timed_and_saved(tmp_path):
    out = tmp_path / "step.json"
    done = run_step("--variants", "fm,fused-torch", "--no-sampling", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert list(run["steps"]) == ["fused-torch", "fm"]  # the script's order, only those asked for
    for row in run["steps"].values():
        assert row["cpu_median_s"] > 0 and row["peak_mib"] > 0
    assert run["sampling"] == {}
    ratios = run["ratios"]["torch"]
    steps = run["steps"]
    assert ratios["imf_vs_fm"] == steps["fused-torch"]["cpu_median_s"] / steps["fm"]["cpu_median_s"]
    assert math.isnan(ratios["fused_vs_reference"]) and math.isnan(ratios["overhead"])  # not timed: n/a
    assert not out.with_name(out.name + ".tmp").exists()


def test_an_unknown_variant_is_refused_by_name(tmp_path):
    done = run_step("--variants", "fm,fused-nope", "--out", str(tmp_path / "step.json"))
    assert done.returncode == 2
    assert "--variants: fused-nope not among this run's variants" in done.stderr
    assert not (tmp_path / "step.json").exists()
