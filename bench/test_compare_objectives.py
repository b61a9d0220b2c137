"""Checks of bench/compare_objectives.py's command line on a 2-step budget: every run records each of its metrics
(iMF at omega 1 with both interval inputs), the table lists them, the model options reach every run alike, and an
existing results file is refused rather than appended to."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compare_objectives.py")
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(SCRIPT.parent))


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_steps_of_two_runs_record_every_metric(tmp_path):
    out = tmp_path / "results.jsonl"
    common = ("--minutes", "1", "--steps", "2", "--eval-every", "1", "--n-eval", "8", "--out", str(out))
    done = run_script("--runs", "imf", "mf", "--width", "16", "--context-dim", "32", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    header = records[0]
    assert header["kind"] == "args" and header["args"]["runs"] == ["imf", "mf"]
    assert (header["args"]["width"], header["args"]["context_dim"]) == (16, 32)
    evals = [r for r in records if r["kind"] == "eval"]
    expected = {"imf": {"w1", "w1_full", "w2"}, "mf": {"w1"}}
    for name, keys in expected.items():
        steps = [r["step"] for r in evals if r["run"] == name and not r["final"]]
        assert steps == [1, 2]  # only the 1-NFE metrics at checkpoints: these runs have no others
        (final,) = [r for r in evals if r["run"] == name and r["final"]]
        assert final["step"] == 2 and set(final["errors"]) == keys
        assert all(math.isfinite(e) and e > 0 for e in final["errors"].values())

    table = run_script("--table", str(out), "--markdown")
    assert table.returncode == 0, table.stderr[-2000:]
    assert "gauss (width 16, context_dim 32)" in table.stdout
    rows = [line.split(" | ")[:2] for line in table.stdout.splitlines() if line.startswith(("| imf ", "| mf "))]
    assert rows == [["| imf", "w1"], ["| imf", "w1_full"], ["| imf", "w2"], ["| mf", "w1"]]

    again = run_script("--runs", "mf", *common)
    assert again.returncode != 0 and "exists; choose a new file" in again.stderr


def test_model_options_apply_to_every_run():
    from compare_objectives import RUNS, build_model

    for name in RUNS:
        model = build_model(name, {"width": 16, "context_dim": 32})
        assert (model.cfg.width, model.cfg.context_dim) == (16, 32)
        assert model.cfg.v_head == RUNS[name]["v_head"]
    assert build_model("imf").cfg.width == 32  # the gauss preset's when not overridden


def test_defaults_are_the_benchmarked_shared_settings(tmp_path):
    out = tmp_path / "results.jsonl"
    done = run_script("--runs", "fm", "--minutes", "1", "--steps", "1", "--n-eval", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    args = json.loads(out.read_text().splitlines()[0])["args"]
    assert (args["width"], args["cooldown"], args["batch"], args["lr"], args["ema_decay"]) == (24, 0.3, 64, 2e-3, 0.995)
    table = run_script("--table", str(out))
    assert table.returncode == 0 and "gauss (width 24)" in table.stdout
    assert "cool-down over the last 30%" in table.stdout


def test_table_of_a_file_that_is_not_its_results_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not json\n")
    for path, reason in ((tmp_path / "none.jsonl", "No such file"), (tmp_path / "notes.txt", "Expecting value")):
        done = run_script("--table", str(path))
        assert done.returncode == 2 and "not a results file of this script" in done.stderr and reason in done.stderr
