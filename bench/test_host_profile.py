"""bench/host_profile.py: it profiles a real fused step with the Triton kernels stubbed, and restores them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("host_profile.py")
sys.path.insert(0, str(SCRIPT.parent))

import host_profile  # noqa: E402


def test_a_profiled_step_launches_every_family_and_the_kernels_come_back(capsys):
    from imf_kernels.triton import attention, group_norm, loss

    kernels = (group_norm._gn_fwd_kernel, attention._attn_fwd_kernel, loss._loss_bwd_kernel)
    threads = torch.get_num_threads()
    result = host_profile.main(["--width", "32", "--resolution", "8", "--steps", "1", "--top", "0"])
    assert (group_norm._gn_fwd_kernel, attention._attn_fwd_kernel, loss._loss_bwd_kernel) == kernels
    assert torch.get_num_threads() == threads
    # GroupNorm (forward, backward, parameter sums), attention (forward, 3 backward) and loss (2 forward, 1 backward)
    # launches, counted by the stubs: more than the 3 loss launches, and the same every step
    assert result["triton_launches"] > 3 + 4 + 3
    assert set(result["split_ms"]) <= {
        "ours: imf", "ours: imf_kernels", "torch (Python)", "torch (C calls)", "autograd engine", "other"
    }  # fmt: skip
    assert result["split_ms"]["ours: imf_kernels"] > 0 and result["split_ms"]["autograd engine"] > 0
    assert "ms of thread CPU time a step" in capsys.readouterr().out


def test_stubs_count_launches_and_are_removed_on_error():
    from imf_kernels.triton import group_norm

    kernel = group_norm._gn_fwd_kernel
    with pytest.raises(RuntimeError, match="boom"), host_profile.stubbed_triton_kernels() as stubs:
        group_norm._gn_fwd_kernel[(1,)](1, 2, BLOCK=3)
        assert stubs["_gn_fwd_kernel"].launches == 1
        raise RuntimeError("boom")
    assert group_norm._gn_fwd_kernel is kernel


@pytest.mark.parametrize(
    ("filename", "name", "expected"),
    [
        (os.path.join(host_profile.REPO, "imf_kernels", "api.py"), "_apply", "ours: imf_kernels"),
        (os.path.join(host_profile.REPO, "imf", "layers.py"), "film", "ours: imf"),
        ("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>", "autograd engine"),
        ("~", "<built-in method torch.conv2d>", "torch (C calls)"),
        ("/usr/lib/python3/site-packages/torch/nn/modules/module.py", "_call_impl", "torch (Python)"),
        ("/usr/lib/python3.11/inspect.py", "_bind", "other"),
    ],
)
def test_category_of_a_profile_entry(filename, name, expected):
    assert host_profile.category(filename, name) == expected


@pytest.mark.parametrize(("args", "message"), [(["--width", "48"], "multiple of 32"), (["--steps", "0"], ">= 1")])
def test_bad_options_are_named(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_the_cached_launch_ab_runs_the_step_through_tritons_real_launch_path():
    """--cached-launch-ab compiles the kernels (stand-in CUDA driver) and times the step with the cache on and off."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [host_profile.REPO, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cached-launch-ab", "1"], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cached launch" in done.stdout and "Triton's launch" in done.stdout
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--cached-launch-ab", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TRITON_INTERPRET": "1"},
    )
    assert refused.returncode == 2 and "unset TRITON_INTERPRET" in refused.stderr
