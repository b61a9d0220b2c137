"""bench/count_launches.py: the step it counts is the objective's step, and its options say what they take."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("count_launches.py")


def test_a_counted_step_takes_its_bf16_weights_in_one_copy():
    """With bf16 targets the fused step's weights reach bf16 in one multi-tensor copy (no cast of a weight is left,
    tests/test_objectives.py), and the count is the step's: the same ops each time."""
    sys.path.insert(0, str(SCRIPT.parent))
    import count_launches

    bf16 = count_launches.count_step("digits", 16, 4, "torch", bf16=True, objective="imf")
    fp32 = count_launches.count_step("digits", 16, 4, "torch", bf16=False, objective="imf")
    assert bf16.count("_foreach_copy_") == 1 and fp32.count("_foreach_copy_") == 0
    assert count_launches.count_step("digits", 16, 4, "torch", bf16=True, objective="imf") == bf16
    assert "convolution" in fp32 and "convolution_backward" in fp32


def test_bf16_with_the_interpreter_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--bf16"], capture_output=True, text=True)
    assert done.returncode == 2 and "--bf16 needs --backend torch" in done.stderr


@pytest.mark.parametrize("flag", ["--backend", "--objective"])
def test_unknown_choices_are_refused(flag):
    done = subprocess.run([sys.executable, str(SCRIPT), flag, "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_each_launch_is_given_its_call_site():
    """--sites: every launch's call site, in order: the innermost frame in imf / imf_kernels (a convolution's is
    `imf.layers.conv2d`), the autograd node in the backward; a Triton kernel's (interpreter) its launcher's."""
    sys.path.insert(0, str(SCRIPT.parent))
    import count_launches
    from launches import recorded

    import imf_kernels

    sites: list[str] = []
    launched = count_launches.count_step("digits", 16, 4, "torch", bf16=False, objective="imf", sites=sites)
    assert len(sites) == len(launched)
    by_op = {}
    for name, site in zip(launched, sites, strict=True):
        by_op.setdefault(name, set()).add(site.split(":")[0] if not site.startswith("backward") else site)
    assert by_op["convolution"] == {"layers.py"}
    assert by_op["convolution_backward"] == {"backward: ConvolutionBackward0"}
    assert "?" not in sites
    x = torch.randn(2, 8, 4, 4)
    triton_sites: list[str] = []
    with recorded(triton_sites) as launches:
        imf_kernels.group_norm_act(x, 2, backend="triton")
    assert launches == ["triton:_gn_fwd_kernel"]
    assert triton_sites[0].startswith("group_norm.py:"), triton_sites


def test_a_negative_site_count_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--sites", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--sites must be a count >= 0, got -1" in done.stderr
