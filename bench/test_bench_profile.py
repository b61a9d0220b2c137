"""Checks of bench/profile_step.py: the kind of each kernel/operator name, and a real profile of a small CPU step
(its totals add up, rows are ordered, the results file is what was reported, bad arguments are refused)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import profile_step
import pytest

SCRIPT = Path(__file__).with_name("profile_step.py")


@pytest.mark.parametrize(
    "name, kind",
    [
        ("_gn_bwd_kernel", "GroupNorm (ours)"),
        ("void group_norm_act_fwd_kernel<__nv_bfloat16, true>(Params)", "GroupNorm (ours)"),
        ("_attn_bwd_dkdv_kernel", "attention (ours)"),
        ("_loss_partial_kernel", "loss (ours)"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "matmul / conv"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul / conv"),
        ("aten::convolution_backward", "matmul / conv"),
        ("aten::native_group_norm", "norms (PyTorch)"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copies / casts"),
        ("Memcpy DtoD (Device -> Device)", "copies / casts"),
        ("aten::copy_", "copies / casts"),
        ("aten::_softmax", "softmax (PyTorch)"),
        ("void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "softmax (PyTorch)"),
        (
            "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*)",
            "norms (PyTorch)",
        ),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "norms (PyTorch)"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention (PyTorch)"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention (PyTorch)"),
        ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda...>", "copies / casts"),
        ("aten::view", "views / allocation"),
        ("aten::transpose", "views / allocation"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel...>",
            "elementwise / reductions (PyTorch)",
        ),
        ("aten::silu_backward", "elementwise / reductions (PyTorch)"),
        (
            "void at::native::vectorized_elementwise_kernel<4, MulFunctor<float>> (broadcast)",
            "elementwise / reductions (PyTorch)",
        ),
        ("_param_sums_kernel", "GroupNorm (ours)"),
        (
            "void imf::(anonymous namespace)::group_norm_param_grads_kernel<__nv_bfloat16>(imf::GroupNormBwdParams)",
            "GroupNorm (ours)",
        ),
        (
            "void imf::(anonymous namespace)::attention_bwd_reduce_kernel<float>(imf::AttentionBwdParams)",
            "attention (ours)",
        ),
        ("imf::(anonymous namespace)::loss_totals_kernel(imf::LossFwdParams)", "loss (ours)"),
        (
            "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>",
            "layout transposes (cuDNN)",
        ),
        (
            "void cudnn::ops::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>",
            "layout transposes (cuDNN)",
        ),
        ("some_other_kernel", "other"),
    ],
)
def test_kind_of_a_name(name, kind):
    assert profile_step.kind_of(name) == kind


def test_a_cpu_profile_adds_up_and_is_saved(tmp_path, capsys):
    out = tmp_path / "profile.json"
    result = profile_step.main(["--batch", "4", "--steps", "2", "--top", "5", "--out", str(out)])
    rows = result["rows"]
    assert rows and all(row["self_us"] > 0 and row["calls"] >= 1 for row in rows)
    assert [row["self_us"] for row in rows] == sorted((row["self_us"] for row in rows), reverse=True)
    assert math.isclose(sum(result["kinds_ms"].values()), result["device_ms"], rel_tol=1e-9)
    assert math.isclose(result["device_ms"], sum(row["self_us"] for row in rows) / 1e3, rel_tol=1e-9)
    assert math.isclose(result["busy"], result["device_ms"] / result["wall_ms"], rel_tol=1e-9)
    # a U-Net step on CPU: convolutions run (forward and backward), and the host and wall times are measured
    assert result["kinds_ms"]["matmul / conv"] > 0
    assert {"aten::convolution_backward"} <= {row["name"] for row in rows}
    assert 0 < result["host_ms"] <= result["wall_ms"] * 1.0001
    assert result["variant"] == "fused-torch" and result["preset"] == "digits" and result["commit"]
    assert result["syncs"] is None and result["ops"] is None and result["host"] is None  # GPU only
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "time by kind" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudaLaunchKernel", "CUDA runtime / driver calls (launches, copies, allocation)"),
        ("cuLaunchKernelEx", "CUDA runtime / driver calls (launches, copies, allocation)"),
        ("cudaMemcpyAsync", "CUDA runtime / driver calls (launches, copies, allocation)"),
        ("autograd::engine::evaluate_function: ConvolutionBackward0", "autograd engine (backward nodes)"),
        ("ConvolutionBackward0", "autograd engine (backward nodes)"),
        ("aten::cudnn_convolution", "aten operators (dispatch, checks, kernel setup)"),
        ("aten::empty", "aten operators (dispatch, checks, kernel setup)"),
        ("ProfilerStep#1", "other profiled events"),
        ("cuda_graph_replay", "other profiled events"),  # not a runtime call: a lower-case word after "cuda"
    ],
)
def test_host_kind_of_a_cpu_event(name, kind):
    assert profile_step.host_kind(name) == kind


def test_the_host_summary_splits_the_profiled_host_time_and_leaves_out_the_final_sync():
    """host_rows: the CPU-side events by self CPU time (CUDA kernels and events without self time left out, and the
    profiler's torch.cuda.synchronize after the step); host_summary: their sum by kind, and the rest of the profiled
    host time as Python and the profiler's overhead (never negative)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    event = lambda key, device_type, us, count=1: SimpleNamespace(
        key=key, device_type=device_type, self_cpu_time_total=us, count=count
    )
    prof = SimpleNamespace(
        key_averages=lambda: [
            event("aten::add", DeviceType.CPU, 300.0, 30),
            event("cudaLaunchKernel", DeviceType.CPU, 500.0, 100),
            event("cudaDeviceSynchronize", DeviceType.CPU, 9000.0),  # the profiler's wait after the step
            event("void at::elementwise_kernel<128, 2>", DeviceType.CUDA, 40.0, 7),
            event("AddBackward0", DeviceType.CPU, 200.0, 10),
            event("aten::view", DeviceType.CPU, 0.0, 90),
        ]
    )
    rows = profile_step.host_rows(prof)
    assert [row["name"] for row in rows] == ["cudaLaunchKernel", "aten::add", "AddBackward0"]
    assert rows[0] == {
        "name": "cudaLaunchKernel",
        "calls": 100,
        "self_us": 500.0,
        "kind": "CUDA runtime / driver calls (launches, copies, allocation)",
    }
    summary = profile_step.host_summary(rows, profiled_host_ms=2.5)
    assert summary["kinds_ms"] == {
        "CUDA runtime / driver calls (launches, copies, allocation)": 0.5,
        "aten operators (dispatch, checks, kernel setup)": 0.3,
        "autograd engine (backward nodes)": 0.2,
        "outside profiled events: Python, the profiler": 1.5,
    }
    short = profile_step.host_summary(rows, profiled_host_ms=0.5)["kinds_ms"]
    assert short["outside profiled events: Python, the profiler"] == 0.0  # the events outlast a short host time
    assert summary["profiled_host_ms"] == 2.5 and summary["rows"] is rows


def test_the_report_prints_the_host_split(capsys):
    rows = [{"name": "cudaLaunchKernel", "calls": 4, "self_us": 40.0, "kind": "CUDA runtime / driver calls"}]
    result = {
        "on_gpu": True, "preset": "latent-b", "variant": "fused-triton", "batch": 2, "steps": 1, "wall_ms": 1.0,
        "host_ms": 0.9, "device_ms": 0.5, "busy": 0.5, "kinds_ms": {"matmul / conv": 0.5},
        "rows": [{"name": "k", "calls": 1, "self_us": 500.0, "kind": "matmul / conv"}], "ops": None, "syncs": [],
        "host": profile_step.host_summary(rows, profiled_host_ms=0.1),
    }  # fmt: skip
    profile_step.print_report(result, "GPU", top=5)
    printed = capsys.readouterr().out
    assert "host time by kind" in printed and "cudaLaunchKernel" in printed and "10.0" in printed  # us per call
    assert "outside profiled events" in printed


def test_launching_ops_ranks_aten_operators_by_the_device_time_they_launch():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    event = lambda key, device_type, us, count=1: SimpleNamespace(
        key=key, device_type=device_type, self_device_time_total=us, count=count
    )
    prof = SimpleNamespace(
        key_averages=lambda: [
            event("aten::copy_", DeviceType.CPU, 40.0, 7),
            event("aten::view", DeviceType.CPU, 0.0, 90),  # launches nothing
            event("void at::elementwise_kernel<128, 2>", DeviceType.CUDA, 40.0, 7),  # the kernel itself: not an op
            event("aten::convolution", DeviceType.CPU, 300.0, 3),
            event("ProfilerStep#1", DeviceType.CPU, 340.0),  # not an aten operator
        ]
    )
    assert profile_step.launching_ops(prof) == [
        {"name": "aten::convolution", "calls": 3, "device_us": 300.0},
        {"name": "aten::copy_", "calls": 7, "device_us": 40.0},
    ]


def test_step_syncs_lists_where_the_sync_debug_mode_warned():
    """One step under the sync debug mode ("warn" set, "default" restored even when the step raises): each warning
    that names a synchronising operation, with the file and line that asked for it; other warnings are not syncs, the
    mode's own notice that it is a prototype among them (torch 2.11 on the H200 gives it on the first "warn")."""
    import warnings

    modes = []

    def step():
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("TensorFloat32 tensor cores available but not enabled", stacklevel=1)
        warnings.warn(
            "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations "
            "(Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)",
            stacklevel=1,
        )

    syncs = profile_step.step_syncs(step, set_mode=modes.append)
    assert modes == ["warn", "default"]
    assert len(syncs) == 2 and all(s.startswith("test_bench_profile.py:") for s in syncs)  # the warning's line
    assert syncs[0].endswith(": called a synchronizing CUDA operation")

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        profile_step.step_syncs(failing, set_mode=modes.append)
    assert modes[-1] == "default"


@pytest.mark.parametrize(
    "args, message",
    [(["--steps", "0"], "--steps: at least 1, got 0"), (["--batch", "0"], "--batch: at least 1, got 0")],
)
def test_bad_arguments_are_refused(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize(
    "variant, message",
    [
        ("bogus", "--variant bogus: not a bench/step.py variant"),
        ("graph-torch", "--variant graph-torch: a CUDA graph needs a GPU"),
        ("fused-cuda", "--variant fused-cuda: the cuda backend does not run here (usable: torch)"),
    ],
)
def test_a_variant_this_machine_cannot_run_is_one_line(variant, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--variant", variant])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
