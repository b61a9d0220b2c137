"""The CPU-runnable kernel benchmarks, and checks of the benchmark code itself.

    pytest bench --benchmark-only   # the timings: torch backend and the eager / func.jvp / compile baselines
    pytest bench                    # the same, plus the checks below (shapes, byte counts, verdicts, files)

Every timed variant is a case of `bench/ops.py` (the same code the script times), and every test asserts that
the timed call computes the reference's outputs on the same inputs, so a benchmark never compares unlike work.
"""

from __future__ import annotations

import collections
import json

import common
import ops
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from imf_kernels.torch_ops import attention as torch_attention
from imf_kernels.torch_ops import group_norm as torch_group_norm
from imf_kernels.torch_ops import loss as torch_loss

CPU = torch.device("cpu")
# Small, odd shapes: channels not a multiple of 32, lengths not powers of two.
GN_SHAPE = ops.GroupNormShape(4, 48, 12, 12, 8)
CROSS_SHAPE = ops.AttentionShape(2, 3, 40, 20, 32, "cross")
SELF_SHAPE = ops.AttentionShape(2, 2, 50, 50, 16, "self")
LOSS_SHAPE = ops.LossShape(6, 3, 10)
# (family, shape, op, variant): the variant's outputs are checked against REFERENCE[op's pass]
VARIANTS = [
    *[("group_norm", GN_SHAPE, "gn.fwd", v) for v in ("torch", "eager", "compile")],
    *[("group_norm", GN_SHAPE, "gn.jvp", v) for v in ("torch", "func.jvp")],
    *[("group_norm", GN_SHAPE, "gn.bwd", v) for v in ("torch", "eager")],
    *[("group_norm", GN_SHAPE, op, "torch") for op in ("gn.jvp.cl", "gn.bwd.cl")],
    *[("group_norm", GN_SHAPE, "gn.jvp.half", v) for v in ("torch", "func.jvp")],
    *[("attention", CROSS_SHAPE, "attn.fwd", v) for v in ("torch", "eager", "compile")],
    *[("attention", shape, "attn.jvp", v) for shape in (CROSS_SHAPE, SELF_SHAPE) for v in ("torch", "math-jvp")],
    *[("attention", CROSS_SHAPE, "attn.bwd", v) for v in ("torch", "eager")],
    *[("loss", LOSS_SHAPE, "imf_loss.fwd", v) for v in ("torch", "eager", "compile")],
    *[("loss", LOSS_SHAPE, "imf_loss.bwd", v) for v in ("torch", "eager")],
]


@pytest.fixture(autouse=True)
def one_thread():
    """As bench/ops.py on a CPU: one thread, so a shared machine's scheduler does not dominate the times."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _case(family: str, shape, op: str) -> ops.Case:
    torch.manual_seed(0)
    cases = ops.CASE_BUILDERS[family](shape, ("test",), CPU, torch.float32)
    return next(case for case in cases if case.op == op)


def _thunk(case: ops.Case, variant: str):
    return case.run(variant) if variant == "torch" else case.baselines[variant][1]()


def _tensors(result) -> list[torch.Tensor]:
    """The tensors of an op's result: a tensor, a tuple of tensors, or (loss, stats dict)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[key] for key in sorted(result)]
    return [tensor for part in result for tensor in _tensors(part)]


def _is_jvp(op: str) -> bool:
    return op.split(".")[1] == "jvp"  # (gn.jvp, gn.jvp.cl, gn.jvp.half, attn.jvp, ...)


def _reference_name(op: str) -> str:
    return "func.jvp" if _is_jvp(op) else "eager"


@pytest.mark.parametrize(
    "family, shape, op, variant", VARIANTS, ids=[f"{op}-{v}-{s.label.replace(' ', '_')}" for _, s, op, v in VARIANTS]
)
def test_bench(benchmark, family, shape, op, variant):
    case = _case(family, shape, op)
    thunk = _thunk(case, variant)  # compiles here, before the timed calls
    benchmark.extra_info.update(op=op, shape=shape.label, variant=variant, floor_bytes=case.nbytes)
    outputs = _tensors(benchmark(thunk))
    expected = _tensors(_thunk(case, _reference_name(op))())
    # A primal-only baseline of a .jvp op (eager, compile) computes the first output, the primal.
    assert len(outputs) == len(expected) or (_is_jvp(op) and len(outputs) == 1)
    for index, (actual, wanted) in enumerate(zip(outputs, expected, strict=False)):
        error = (actual.double() - wanted.double()).abs().max().item()
        assert error <= 1e-4 * max(1.0, wanted.abs().max().item()), f"{op} {variant} output {index}: error {error:.3g}"


# ------------------------------------------------------------------------------------- the benchmark's own code


class _LayerRecorder(TorchFunctionMode):
    """Records the input shapes of F.group_norm and of the score einsum of imf.model.attention."""

    def __init__(self):
        super().__init__()
        self.group_norm, self.attention = collections.Counter(), collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.group_norm:
            x, groups = args[0], args[1]
            self.group_norm[ops.GroupNormShape(*x.shape, groups)] += 1
        if func is torch.einsum and args[0] == "bhqd,bhkd->bhqk":
            (batch, heads, lq, head_dim), lk = args[1].shape, args[2].shape[2]
            self.attention[(batch, heads, lq, lk, head_dim)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset_name", ["latent-b", "cifar", "digits"])
def test_model_layers_match_a_traced_forward(preset_name):
    """ops.model_layers walks the U-Net as IMFNet builds it: the same shapes, as often, as the model's own
    reference forward (trunk, u-head, v-head) on the meta device."""
    from imf.config import get_preset
    from imf.model import Cond, IMFNet

    preset = get_preset(preset_name)
    cfg, batch = preset.model, 3
    recorder = _LayerRecorder()
    with torch.device("meta"):
        model = IMFNet(cfg)
        z = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size)
        ones = torch.ones(batch)
        cond = Cond(h=ones, y=torch.zeros(batch, dtype=torch.long), omega=ones, t_min=0 * ones, t_max=ones, t=ones)
        with recorder:
            features = model.trunk(z, cond)
            model.u_head(features)
            if cfg.v_head == "aux":
                model.v_head(features)
    layers = ops.model_layers(cfg, batch)
    assert recorder.group_norm == layers.group_norm
    attention = collections.Counter(
        {(s.batch, s.heads, s.lq, s.lk, s.head_dim): n for s, n in layers.attention.items()}
    )
    assert recorder.attention == attention
    assert sum(layers.group_norm.values()) > 0 and sum(layers.attention.values()) > 0


@pytest.mark.parametrize("preset_name", ["latent-b", "cifar"])
def test_triton_aot_shapes_are_the_presets_group_norm_layers(preset_name):
    """The GroupNorm shapes whose launch configurations tests/test_triton_aot.py compiles for sm_90 are those of
    the presets as configured: a preset change cannot leave its new tiles out of the static check."""
    from imf.config import get_preset
    from imf_kernels.triton import group_norm

    preset = get_preset(preset_name)
    layers = ops.model_layers(preset.model, preset.train.batch_size).group_norm
    assert {(s.channels, s.height) for s in layers} == set(group_norm.PRESET_LAYERS[preset_name])
    assert {(s.groups, s.height == s.width) for s in layers} == {(32, True)}


def _nbytes(*tensors) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_floor_bytes_are_every_launcher_input_read_once_and_output_written_once(dtype):
    """Each case's byte count equals the bytes of the tensors its torch launcher reads and writes."""
    torch.manual_seed(0)
    g, (b, c, h, w) = GN_SHAPE.groups, (GN_SHAPE.batch, GN_SHAPE.channels, GN_SHAPE.height, GN_SHAPE.width)
    x, dx, grad_y = (torch.randn(b, c, h, w, dtype=dtype) for _ in range(3))
    weight, bias = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    scale, shift, dscale, dshift = (torch.randn(b, c, dtype=dtype) for _ in range(4))
    gn = {case.op: case.nbytes for case in ops.group_norm_cases(GN_SHAPE, ("test",), CPU, dtype)}
    y, mean, rstd = torch_group_norm.gn_act_fwd(x, g, weight, bias, scale, shift, 1e-5, "silu")
    assert gn["gn.fwd"] == _nbytes(x, weight, bias, scale, shift) + _nbytes(y, mean, rstd)
    outputs = torch_group_norm.gn_act_jvp_fwd(x, dx, g, weight, bias, scale, shift, dscale, dshift, 1e-5, "silu")
    assert gn["gn.jvp"] == _nbytes(x, dx, weight, bias, scale, shift, dscale, dshift) + _nbytes(*outputs)
    grads = torch_group_norm.gn_act_bwd(grad_y, x, g, weight, bias, scale, shift, mean, rstd, "silu")
    assert gn["gn.bwd"] == _nbytes(grad_y, x, weight, bias, scale, shift, mean, rstd) + _nbytes(*grads)
    assert gn["gn.jvp.cl"] == gn["gn.jvp"] and gn["gn.bwd.cl"] == gn["gn.bwd"]  # (the same bytes, laid out otherwise)
    half = b // 2  # the tangent on the first half of the samples
    first = (dx[:half], dscale[:half], dshift[:half])
    outputs = torch_group_norm.gn_act_jvp_fwd(x, first[0], g, weight, bias, scale, shift, *first[1:], 1e-5, "silu")
    assert outputs[1].shape[0] == half
    assert gn["gn.jvp.half"] == _nbytes(x, weight, bias, scale, shift, *first) + _nbytes(*outputs)

    shape = CROSS_SHAPE
    q, dq, grad_o = (torch.randn(shape.batch, shape.heads, shape.lq, shape.head_dim, dtype=dtype) for _ in range(3))
    k, v, dk, dv = (torch.randn(shape.batch, shape.heads, shape.lk, shape.head_dim, dtype=dtype) for _ in range(4))
    attn = {case.op: case.nbytes for case in ops.attention_cases(shape, ("test",), CPU, dtype)}
    o, lse = torch_attention.attention_fwd(q, k, v, 0.2)
    assert attn["attn.fwd"] == _nbytes(q, k, v) + _nbytes(o, lse)
    assert attn["attn.jvp"] == _nbytes(q, k, v, dq, dk, dv) + _nbytes(
        *torch_attention.attention_jvp_fwd(q, k, v, dq, dk, dv, 0.2)
    )
    grads = torch_attention.attention_bwd(grad_o, q, k, v, o, lse, 0.2)
    assert attn["attn.bwd"] == _nbytes(grad_o, q, k, v, o, lse) + _nbytes(*grads)

    shape = LOSS_SHAPE
    u, du, v, v_target = (
        torch.randn(shape.batch, shape.channels, shape.size, shape.size, dtype=dtype) for _ in range(4)
    )
    t = torch.rand(shape.batch)
    r = t * torch.rand(shape.batch)
    loss = {case.op: case.nbytes for case in ops.loss_cases(shape, ("test",), CPU, dtype)}
    loss_u, loss_v, w_u, w_v, _ = torch_loss.imf_loss_fwd(u, du, v, v_target, t, r, 0.01, 1.0)
    assert loss["imf_loss.fwd"] == _nbytes(u, du, v, v_target, t, r) + _nbytes(loss_u, loss_v, w_u, w_v)
    grads = torch_loss.imf_loss_bwd(torch.tensor(1.0), u, du, v, v_target, t, r, w_u, w_v)
    assert loss["imf_loss.bwd"] == _nbytes(u, du, v, v_target, t, r, w_u, w_v) + _nbytes(*grads)
    loss_per_sample, weight, _ = torch_loss.meanflow_loss_fwd(u, du, v_target, t, r, 0.01, 1.0)
    assert loss["mf_loss.fwd"] == _nbytes(u, du, v_target, t, r) + _nbytes(loss_per_sample, weight)
    grad_u = torch_loss.meanflow_loss_bwd(torch.tensor(1.0), u, du, v_target, t, r, weight)
    assert loss["mf_loss.bwd"] == _nbytes(u, du, v_target, t, r, weight) + _nbytes(grad_u)


def test_attention_flops_are_4_b_h_lq_lk_d_and_3x_with_the_tangent():
    shape = CROSS_SHAPE
    flops = {case.op: case.flops for case in ops.attention_cases(shape, ("test",), CPU, torch.float32)}
    forward = 4 * shape.batch * shape.heads * shape.lq * shape.lk * shape.head_dim
    assert flops == {"attn.fwd": forward, "attn.jvp": 3 * forward, "attn.bwd": 2.5 * forward}


def test_run_cases_rows_speedups_and_failures():
    """Rows carry the case's floor bytes per second, the copy fraction and speed-up = baseline / backend time;
    a variant that raises becomes a row with its reason, and a baseline shared by key is timed once."""
    calls = collections.Counter()

    def shared_baseline():
        calls["shared"] += 1
        return lambda: sum(range(20000))

    def broken_backend(name):
        raise ValueError(f"op: backend {name!r} cannot take this call: too large")

    cases = [
        ops.Case(
            "x.fwd",
            "s",
            {},
            ("test",),
            10**6,
            2e9,
            lambda name: lambda: sum(range(2000)),
            {"eager": ("k", shared_baseline)},
        ),
        ops.Case("x.jvp", "s", {}, ("test",), 10**6, None, broken_backend, {"eager": ("k", shared_baseline)}),
    ]
    rows = ops.run_cases(cases, ["torch"], CPU, budget_s=0.01, copy_gbps=2.0)
    assert calls["shared"] == 1
    by = {(row["op"], row["variant"]): row for row in rows}
    backend, baseline = by[("x.fwd", "torch")], by[("x.fwd", "eager")]
    assert backend["speedup"]["eager"] == pytest.approx(baseline["median_ms"] / backend["median_ms"])
    assert backend["gbps"] == pytest.approx(1e6 / (backend["median_ms"] * 1e-3) / 1e9)
    assert backend["copy_fraction"] == pytest.approx(backend["gbps"] / 2.0)
    # and against a copy of the case's own floor bytes, measured once per size in the same run
    same_size = ops.same_size_copy_gbps(CPU, 10**6)
    assert backend["same_copy_fraction"] == pytest.approx(backend["gbps"] / same_size)
    assert backend["tflops"] == pytest.approx(2e9 / (backend["median_ms"] * 1e-3) / 1e12)
    failed = by[("x.jvp", "torch")]
    assert failed["median_ms"] is None and failed["speedup"] == {}
    assert failed["note"] == "ValueError: op: backend 'torch' cannot take this call: too large"
    assert by[("x.jvp", "eager")]["median_ms"] == baseline["median_ms"]
    rows = ops.run_cases(cases[:1], ["torch"], CPU, budget_s=0.0, copy_gbps=2.0, skip_baselines=("eager",))
    assert [row["variant"] for row in rows] == ["torch"] and rows[0]["speedup"] == {}


def _target_row(op, variant, sources, dims, copy_fraction=None, speedup=None, note=None, shape="s"):
    return {
        "op": op,
        "variant": variant,
        "sources": sources,
        "dims": dims,
        "shape": shape,
        "copy_fraction": copy_fraction,
        "speedup": speedup or {},
        "note": note,
    }


def test_targets_take_the_worst_matching_shape_per_backend():
    gn_target = ops.TARGETS[0]  # GroupNorm+SiLU forward-with-tangent >= 80% of copy bandwidth
    rows = [
        _target_row("gn.jvp", "triton", ["latent-b"], {}, copy_fraction=0.9, shape="big"),
        _target_row("gn.jvp", "triton", ["latent-b", "cifar"], {}, copy_fraction=0.7, shape="small"),
        _target_row("gn.jvp", "triton", ["sweep"], {}, copy_fraction=0.1, shape="sweep only"),
        _target_row("gn.jvp", "cuda", ["latent-b"], {}, copy_fraction=0.85, shape="big"),
        _target_row("gn.jvp", "cuda", ["latent-b"], {}, note="ValueError: no", shape="small"),
        _target_row("gn.jvp", "eager", ["latent-b"], {}, copy_fraction=0.2),
    ]
    verdicts = {(v["target"], v["backend"]): v for v in ops.evaluate_targets(rows)}
    triton = verdicts[(gn_target.text, "triton")]
    assert (triton["value"], triton["shape"], triton["met"]) == (0.7, "small", False)
    assert triton["status"] == "70% at small (MISSED)"
    cuda = verdicts[(gn_target.text, "cuda")]
    assert cuda["met"] is None and cuda["status"] == "not measured (small: ValueError: no)"
    rows = [_target_row("gn.jvp", "cuda", ["latent-b"], {}, copy_fraction=0.8)]
    assert {v["backend"]: v["met"] for v in ops.evaluate_targets(rows) if v["target"] == gn_target.text} == {
        "cuda": True,
        "triton": None,
    }


def test_copy_targets_have_a_same_size_twin_that_leaves_the_issue_verdict_alone():
    """Each copy-bandwidth target is followed by its twin against a copy of the same bytes; the issue's own target
    still reads copy_fraction (the 512 MiB copy)."""
    copy_targets = [t for t in ops.TARGETS if t.metric == "copy_fraction"]
    assert len(copy_targets) == 5
    for target in copy_targets:
        twin = ops.TARGETS[ops.TARGETS.index(target) + 1]
        assert (twin.metric, twin.op, twin.source, twin.minimum, twin.dims) == (
            "same_copy_fraction",
            target.op,
            target.source,
            target.minimum,
            target.dims,
        )
        assert twin.text == f"{target.text}, of a same-size copy"
    rows = [
        {
            **_target_row("gn.bwd", "triton", ["latent-b"], {}, copy_fraction=0.3, shape="small"),
            "same_copy_fraction": 0.75,
        },
        {
            **_target_row("gn.bwd", "triton", ["latent-b"], {}, copy_fraction=0.6, shape="big"),
            "same_copy_fraction": 0.72,
        },
    ]
    verdicts = {v["target"]: v for v in ops.evaluate_targets(rows, ("triton",))}
    issue = verdicts["GroupNorm+SiLU backward >= 70% of copy bandwidth"]
    twin = verdicts["GroupNorm+SiLU backward >= 70% of copy bandwidth, of a same-size copy"]
    assert (issue["value"], issue["shape"], issue["met"]) == (0.3, "small", False)
    assert (twin["value"], twin["shape"], twin["met"], twin["status"]) == (0.72, "big", True, "72% at big (met)")


def test_cross_attention_target_reads_the_24_token_shape_and_the_math_jvp_speedup():
    target = next(t for t in ops.TARGETS if t.metric == "speedup:math-jvp" and ("lk", 24) in t.dims)
    dims = {"kind": "cross", "lq": 1024, "lk": 24}
    rows = [
        _target_row("attn.jvp", "cuda", ["latent-b(t)"], dims, speedup={"math-jvp": 6.0}),
        _target_row("attn.jvp", "cuda", ["latent-b(t)"], {**dims, "lq": 256}, speedup={"math-jvp": 1.0}),
        _target_row("attn.jvp", "cuda", ["latent-b"], {**dims, "lk": 20}, speedup={"math-jvp": 1.0}),
    ]
    verdict = next(v for v in ops.evaluate_targets(rows, ("cuda",)) if v["target"] == target.text)
    assert (verdict["value"], verdict["met"], verdict["status"]) == (6.0, True, "6.00x at s (met)")


def test_preset_layers_include_the_24_token_cross_attention_of_the_target():
    layers = ops.preset_layers("latent-b")
    assert {s.lk for s in layers["latent-b"].attention if s.kind == "cross"} == {20}
    assert {(s.lq, s.lk) for s in layers["latent-b(t)"].attention} == {(1024, 24), (256, 24), (64, 24)}


def test_measure_on_cpu_times_between_min_and_max_reps_after_warmup():
    calls = []
    timing = common.measure(lambda: calls.append(1), CPU, budget_s=0.0, warmup=2, min_reps=7, max_reps=50)
    assert (timing.reps, len(calls)) == (7, 9)
    timing = common.measure(lambda: calls.append(1), CPU, budget_s=10.0, warmup=0, min_reps=1, max_reps=12)
    assert timing.reps == 12 and timing.median_ms >= 0
    ticks = iter(range(10**6))  # a clock that advances one second per reading: every call reads as 1000 ms
    timing = common.measure(lambda: None, CPU, budget_s=100.0, min_reps=3, max_reps=4, clock=lambda: next(ticks))
    assert (timing.median_ms, timing.reps) == (1000.0, 4)


def test_the_gpu_busy_wait_covers_twice_the_hosts_time_within_bounds():
    rate = 1.98e9  # cycles per second of an H200's clock
    assert common.queue_fill_cycles(20e-6, rate) == common.QUEUE_FILL_CYCLES  # a quick call: the floor (~0.5 ms)
    assert common.queue_fill_cycles(1e-3, rate) == 3_960_000  # a 1 ms host side: 2 ms of busy-wait
    assert common.queue_fill_cycles(10.0, rate) == common.MAX_QUEUE_FILL_CYCLES  # a call that syncs: the cap
    assert common.MAX_QUEUE_FILL_CYCLES / rate < 0.06  # the cap stays a moment (~50 ms)


def test_results_are_appended_one_tagged_row_per_line(tmp_path):
    path = tmp_path / "results" / "cpu-test.json"
    tags = common.run_tags(CPU, bench="ops")
    assert {"bench", "device", "date", "commit", "dirty", "torch", "triton", "cuda", "python"} <= set(tags)
    common.append_results(path, [{"op": "a", "median_ms": 1.0}], tags)
    common.append_results(path, [{"op": "b"}, {"op": "c"}], {**tags, "date": "later"})
    rows = json.loads(path.read_text())
    assert [row["op"] for row in rows] == ["a", "b", "c"]
    assert rows[0]["date"] == tags["date"] and rows[2]["date"] == "later"
    assert all(row["device"] == common.device_name(CPU) and row["bench"] == "ops" for row in rows)
    assert len(path.read_text().splitlines()) == 2 + len(rows)
    assert common.device_slug(CPU) == common.results_path(CPU).stem


def test_markdown_summary_shows_the_latest_run_with_targets_and_backend_rows(tmp_path):
    path = tmp_path / "gpu.json"
    tags = {"bench": "ops", "device": "Card", "commit": "abc", "dirty": False, "torch": "2.11", "triton": "3.6"}
    copy = {"op": "copy", "kind": "reference", "gbps": 3000.0}
    backend = {
        "op": "gn.jvp",
        "kind": "backend",
        "dtype": "bf16",
        "shape": "B1",
        "sources": ["latent-b"],
        "variant": "triton",
        "median_ms": 0.5,
        "gbps": 2500.0,
        "copy_fraction": 2500 / 3000,
        "same_copy_fraction": 0.9,
        "tflops": None,
        "speedup": {"func.jvp": 6.0},
        "note": None,
    }
    baseline = {**backend, "kind": "baseline", "variant": "func.jvp", "median_ms": 3.0, "speedup": {}}
    target = {"op": "target", "kind": "target", "target": "T", "backend": "triton", "status": "83% at B1 (met)"}
    common.append_results(path, [copy, {**backend, "variant": "old"}], {**tags, "date": "2026-01-01T00:00:00+00:00"})
    common.append_results(path, [copy, baseline, backend, target], {**tags, "date": "2026-02-01T00:00:00+00:00"})
    summary = ops.markdown_summary(common.read_results(path))
    assert summary.splitlines()[0].startswith("Card, 2026-02-01T00:00:00+00:00, commit abc, torch 2.11")
    assert "| T | triton | 83% at B1 (met) |" in summary
    assert "| gn.jvp | B1 | latent-b | triton | 0.500 | 2500.0 | 83% | 90% |  | 6.00x |" in summary
    assert "| old |" not in summary and "| func.jvp | 3.000" not in summary


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_problems_of_a_default_run_are_distinct_shapes_with_every_source(device_type):
    """The shape lists of both devices build (no tensors are made), and a shape two sources share runs once."""
    layer_sets = {**ops.preset_layers("latent-b"), **ops.preset_layers("cifar")}
    layer_sets["sweep"] = ops.sweep_layers(torch.device(device_type))
    problems = ops.collect_problems(layer_sets)
    assert len({(family, shape) for family, shape, _ in problems}) == len(problems)
    assert {family for family, _, _ in problems} == {"group_norm", "attention", "loss"}
    sources = {shape: names for _, shape, names in problems}
    assert sources[ops.AttentionShape(256, 4, 1024, 24, 64, "cross")] == ("latent-b(t)",)
    assert all(set(names) <= set(layer_sets) for names in sources.values())


def test_main_on_cpu_writes_tagged_rows_and_reports_a_shape_that_cannot_be_built(tmp_path, monkeypatch, capsys):
    """A CPU run end to end (digits shapes, no compile, minimal timing): every attention and loss case has a row
    per variant, a GroupNorm shape whose inputs cannot be made is one row with the reason, and the GPU targets
    are said to be not evaluated."""

    def out_of_memory(shape, sources, device, dtype):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(ops.CASE_BUILDERS, "group_norm", out_of_memory)
    path = tmp_path / "cpu.json"
    argv = ["--cpu", "--presets", "digits", "--no-sweep", "--no-compile", "--budget", "0", "--out", str(path)]
    assert ops.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GPU targets: not evaluated" in printed
    rows = common.read_results(path)
    assert {row["bench"] for row in rows} == {"ops"} and len({row["date"] for row in rows}) == 1
    failed = [row for row in rows if row["kind"] == "failed"]
    gn_shapes = ops.preset_layers("digits")["digits"].group_norm
    assert len(failed) == len(gn_shapes)
    assert all(row["note"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" for row in failed)
    timed = [row for row in rows if row["kind"] in ("backend", "baseline")]
    assert {row["op"] for row in timed} == {"attn.fwd", "attn.jvp", "attn.bwd"} | {
        f"{loss}.{p}" for loss in ("imf_loss", "mf_loss") for p in ("fwd", "bwd")
    }
    assert all(row["median_ms"] > 0 and row["note"] is None for row in timed)
    assert not any(row["variant"] == "compile" for row in timed)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_quick_runs_the_presets_and_of_the_sweep_only_its_losses(device_type):
    device = torch.device(device_type)
    preset = "latent-b" if device_type == "cuda" else "digits"
    quick = ops.run_layer_sets([preset], device, quick=True, no_sweep=False)
    full = ops.run_layer_sets([preset], device, quick=False, no_sweep=False)
    assert quick["sweep"] == ops.Layers(loss=ops.sweep_layers(device).loss)
    assert quick["sweep"].loss and full["sweep"] == ops.sweep_layers(device)
    assert {k: v for k, v in quick.items() if k != "sweep"} == ops.preset_layers(preset)
    assert "sweep" not in ops.run_layer_sets([preset], device, quick=True, no_sweep=True)


def test_a_run_cut_short_keeps_the_rows_of_every_shape_it_finished(tmp_path, monkeypatch):
    """Rows are saved after each shape: a run killed at its losses (a lease's deadline) keeps the copy, GroupNorm
    and attention rows, as one run in a whole JSON file."""

    def killed(shape, sources, device, dtype):
        raise KeyboardInterrupt  # not an Exception: main does not catch it, as it would not catch a SIGTERM

    monkeypatch.setitem(ops.CASE_BUILDERS, "loss", killed)
    path = tmp_path / "cpu.json"
    argv = ["--cpu", "--presets", "digits", "--no-sweep", "--no-compile", "--budget", "0", "--out", str(path)]
    with pytest.raises(KeyboardInterrupt):
        ops.main(argv)
    rows = common.read_results(path)
    assert len({row["date"] for row in rows}) == 1 and rows[0]["op"] == "copy"
    assert {row["op"] for row in rows if row["kind"] in ("backend", "baseline")} == {
        f"{family}.{p}" for family in ("gn", "attn") for p in ("fwd", "jvp", "bwd")
    } | {"gn.jvp.cl", "gn.bwd.cl", "gn.jvp.half"}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("backend, reason", [("cuda", "cuda ("), ("bogus", "bogus (no such backend)")])
def test_a_backend_that_does_not_run_here_is_refused_before_any_timing(backend, reason, capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert ops.main(["--quick", "--backends", backend, "--out", str(out)]) == 2
    assert f"ops.py: error: --backends: {reason}" in capsys.readouterr().err and not out.exists()
