"""bench/launch_overhead.py: its replays launch what the launcher launched, with the same result, and it refuses
what it cannot measure (here: the Triton interpreter on CPU; the timings themselves need a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("launch_overhead.py")
sys.path.insert(0, str(SCRIPT.parent))

import launch_overhead  # noqa: E402

from imf_kernels import reference  # noqa: E402

ON_GPU = torch.cuda.is_available()


def test_a_replayed_launch_writes_what_the_launcher_wrote():
    """The captured GroupNorm launch, replayed into its poisoned output, writes the launcher's y again (float64
    reference; odd channel count, batch 1)."""
    from imf_kernels.triton import group_norm as gn

    device = "cuda" if ON_GPU else "cpu"
    x = torch.randn(1, 12, 3, 5, device=device)
    weight, bias = torch.randn(12, device=device), torch.randn(12, device=device)
    scale, shift = torch.randn(2, 1, 12, device=device)
    out = {}
    launch = lambda: out.setdefault("y", gn.gn_act_fwd(x, 4, weight, bias, scale, shift, 1e-5, "silu")[0])  # noqa: E731
    launches = launch_overhead.captured_launches(gn, ("_gn_fwd_kernel",), launch)
    assert gn._gn_fwd_kernel is launches[0][0]  # restored
    assert len(launches) == 1
    (kernel, grid, args, kwargs) = launches[0]
    y = out["y"]
    assert args[2] is y  # the kernel's y argument is the launcher's output
    truth = reference.group_norm_act(
        x.double(), 4, weight.double(), bias.double(), scale=scale.double(), shift=shift.double()
    )
    baseline = reference.group_norm_act(x, 4, weight, bias, scale=scale, shift=shift)
    reference.check_parity("y", y, truth, baseline, 1e-5)
    expected = y.clone()
    y.fill_(float("nan"))
    launch_overhead.jit_replay(launches)()
    assert torch.equal(y, expected)
    arguments = launch_overhead.kernel_arguments(kernel, args, kwargs)
    assert len(arguments) == len(kernel.arg_names)
    assert arguments[: len(args)] == list(args)
    assert arguments[kernel.arg_names.index("BLOCK_C")] == kwargs["BLOCK_C"]


def test_kernel_arguments_name_what_a_launch_left_out():
    from imf_kernels.triton import group_norm as gn

    names = gn._gn_fwd_kernel.arg_names
    with pytest.raises(ValueError, match=rf"_gn_fwd_kernel misses arguments \['{names[-1]}'\]"):  # (the last)
        launch_overhead.kernel_arguments(gn._gn_fwd_kernel, tuple(range(len(names) - 1)), {})


def test_the_recorders_are_removed_when_the_call_fails():
    from imf_kernels.triton import group_norm as gn

    kernel = gn._gn_fwd_kernel
    with pytest.raises(ZeroDivisionError):
        launch_overhead.captured_launches(gn, ("_gn_fwd_kernel",), lambda: 1 / 0)
    assert gn._gn_fwd_kernel is kernel


def test_host_time_rows_are_per_call_medians():
    calls = []
    times = launch_overhead.host_us({"a": lambda: calls.append(1)}, calls=7, rounds=3, device=torch.device("cpu"))
    assert len(calls) == 10 + 7 * 3  # warm-up, then 3 rounds of 7
    assert len(times["a"]["rounds_us"]) == 3 and times["a"]["median_us"] == sorted(times["a"]["rounds_us"])[1]


@pytest.mark.skipif(ON_GPU, reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--calls", "0"], "--calls and --rounds must be >= 1"), (["--backends", "triton,tpu"], "got tpu")],
)
def test_bad_options_are_named(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_on_a_gpu_every_row_is_measured(tmp_path):
    result = launch_overhead.main(["--calls", "5", "--rounds", "1", "--out", str(tmp_path / "launch.json")])
    triton_rows = [row for row in result["rows"] if row["backend"] == "triton"]
    assert len(triton_rows) == 4 and all("compiled launch" in row and "binder" in row for row in triton_rows)
    assert (tmp_path / "launch.json").exists()


def test_every_variant_runs():
    """Each op's variants run as built (here: triton through the interpreter, and the torch backend; the compiled
    launches only exist on a GPU)."""
    for backend in ("triton", "torch"):
        rows = launch_overhead.cases(torch.device("cuda" if ON_GPU else "cpu"), backend)
        assert list(rows) == ["group_norm_act", "group_norm_act_jvp", "attention", "attention_jvp"]
        for variants in rows.values():
            expected = {"torch add", "public grad", "public no_grad", "launcher"}
            if backend == "triton":
                expected |= {"launcher uncached", "jit launch"}
                expected |= {"compiled launch", "binder"} if ON_GPU else set()
            assert set(variants) == expected
            for fn in variants.values():
                fn()


@pytest.mark.skipif(ON_GPU, reason="the stand-in driver is for a machine without a GPU")
def test_the_stand_in_driver_times_every_triton_launch_path(tmp_path):
    """Without a GPU, --stand-in-driver compiles the kernels for sm_90 and times each launch path's Python: the
    cached launcher below the uncached one is what the next GPU run should confirm."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parents[1]), env.get("PYTHONPATH")]))
    out = tmp_path / "launch.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stand-in-driver", "--calls", "3", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["op"] for row in rows] == ["group_norm_act", "group_norm_act_jvp", "attention", "attention_jvp"]
    columns = {"torch add", "launcher", "launcher uncached", "jit launch", "compiled launch", "binder"}
    assert all(columns <= set(row) for row in rows)
