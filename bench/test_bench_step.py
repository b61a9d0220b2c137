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
    assert results["commit"] != "unknown" and results["date"] and results["torch"]  # which code made the numbers
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


def test_rounds_interleave_the_variants_and_report_medians_over_rounds(tmp_path):
    out = tmp_path / "step.json"
    done = run_step("--variants", "fm,mf", "--no-sampling", "--rounds", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    order = [line.split("] ")[1].split(":")[0] for line in done.stdout.splitlines() if "round" in line and "] " in line]
    assert order == ["fm", "mf", "fm", "mf"]  # interleaved, not one variant's rounds back to back
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert results["rounds"] == 2 and len(run["rounds"]) == 2
    for name, row in run["steps"].items():
        per_round = [rows[name]["cpu_median_s"] for rows in run["rounds"]]
        assert row["round_cpu_median_s"] == per_round
        assert row["cpu_median_s"] == sum(per_round) / 2  # the median of two
        assert row["peak_mib"] == run["rounds"][0][name]["peak_mib"] > 0  # measured once, in round 1
    assert [r["mf_vs_fm"] for r in run["round_ratios"]["torch"]] == [
        rows["mf"]["cpu_median_s"] / rows["fm"]["cpu_median_s"] for rows in run["rounds"]
    ]


def test_merge_rounds_skips_failed_rounds_and_keeps_an_error_that_never_ran():
    import step

    def row(t):
        return dict(variant="v", median_s=t, cpu_median_s=2 * t, min_s=t / 2, warmup_s=9.0 + t, peak_mib=100 + t)

    rounds = [
        {"a": row(3.0), "b": {"error": "boom"}},
        {"a": {"error": "crashed"}, "b": {"error": "boom again"}},
        {"a": row(1.0), "b": {"error": "boom"}},
        {"a": row(2.0), "b": {"error": "boom"}},
    ]
    merged = step.merge_rounds(rounds)
    assert merged["b"] == {"error": "boom"}
    a = merged["a"]
    assert (a["median_s"], a["cpu_median_s"], a["min_s"]) == (2.0, 4.0, 0.5)
    assert (a["warmup_s"], a["peak_mib"]) == (12.0, 103.0)  # the first round that ran: compile time, memory
    assert a["round_median_s"] == [3.0, 1.0, 2.0] and a["round_cpu_median_s"] == [6.0, 2.0, 4.0]


def test_an_unknown_variant_is_refused_by_name(tmp_path):
    done = run_step("--variants", "fm,fused-nope", "--out", str(tmp_path / "step.json"))
    assert done.returncode == 2
    assert "--variants: fused-nope not among this run's variants" in done.stderr
    assert not (tmp_path / "step.json").exists()


def test_compiled_modules_run_compiled_every_step_and_give_the_reference_loss():
    """The `compiled-modules` baseline: its compiled graphs run on every step (a compiled function called inside
    torch.func.jvp would be skipped by dynamo from then on, silently leaving an eager baseline), and its loss and
    gradients are those of the eager reference step."""
    import step
    import torch

    from imf.objectives import IMFObjective

    model, x, y, draws = step.build("gauss", 6, "cpu")
    graph_runs = []

    def counting_backend(gm, example_inputs):
        index = len(graph_runs)
        graph_runs.append(0)

        def run(*args):
            graph_runs[index] += 1
            return gm.forward(*args)

        return run

    modules = step.CompiledModules(model, backend=counting_backend)
    objective = IMFObjective(jvp="reference")
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss = step.official_style_loss(model, objective, x, y, draws, modules)
        loss.backward()
    # the targets' trunk and v-head (no grad), the primal trunk, u-head and v-head: five graphs, each run 3 times
    assert graph_runs == [3] * 5
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    eager = step.official_style_loss(model, objective, x, y, draws)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_whole_reference_step_compiles_with_the_norms_affine_outside():
    """The `compiled` baseline: torch.compile of the whole official-style step (torch.func.jvp inside) traces
    once the norms' affine is outside the norm (the JVP lands in a graph), its graphs run on every step, and its
    loss and gradients are those of the eager reference step; the patch is undone afterwards."""
    import step
    import torch
    import torch.nn.functional as F

    import imf.model
    from imf.objectives import IMFObjective

    model, x, y, draws = step.build("gauss", 6, "cpu")
    objective = IMFObjective(jvp="reference")
    eager = step.official_style_loss(model, objective, x, y, draws)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]

    graph_runs, graph_calls = [], []

    def counting_backend(gm, example_inputs):
        index = len(graph_runs)
        graph_runs.append(0)
        graph_calls.append({getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"})

        def run(*args):
            graph_runs[index] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    restore = step.norm_affine_outside(model)
    try:
        compiled = torch.compile(step.official_style_loss, backend=counting_backend)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss = compiled(model, objective, x, y, draws)
            loss.backward()
    finally:
        restore()
        torch._dynamo.reset()
    assert imf.model.F is F
    assert all("forward" not in vars(m) for m in model.modules())
    assert graph_runs and all(runs == 3 for runs in graph_runs), graph_runs
    assert any("_make_dual" in calls for calls in graph_calls)  # the JVP itself is in a graph, not run eagerly
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
