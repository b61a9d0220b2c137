"""The cached Triton launch (`imf_kernels.triton._launch`) passes the C launcher what Triton's own launch path
passes, keys at least as finely as Triton specialises, and steps aside for hooks and defaulted parameters: checked
without a GPU by tests/triton_launch_check.py under a stand-in CUDA driver, with the Triton installed here and the
GPU image's (IMF_AOT_EXTRA_TRITON, as tests/test_triton_aot.py); on a GPU, the launches are run and compared."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_builds import BUILDS, compiling_env

import imf_kernels
from imf_kernels import reference

CHECK = Path(__file__).with_name("triton_launch_check.py")
CHECKS = (
    "check_cached_launches_pass_what_triton_passes",
    "check_the_key_is_as_fine_as_tritons_specialisation",
    "check_hooks_and_unfilled_parameters_take_tritons_path",
    "check_tangent_row_counts_share_one_compiled_kernel",
)


@pytest.mark.parametrize("triton_build", BUILDS)
def test_cached_launches_match_tritons_own_under_a_stand_in_driver(triton_build):
    env, _ = compiling_env(triton_build)
    done = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")] == list(CHECKS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_and_tritons_launches_compute_the_same_on_a_gpu(monkeypatch):
    """Every public op on the triton backend, with the cache off and on (three calls: the cache filled, then
    used), gives bit-identical outputs and gradients, in parity with the float64 reference."""
    from imf_kernels.triton import _launch

    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)  # noqa: E731
    x, dx = randn(3, 96, 5, 7), randn(2, 96, 5, 7)
    weight, bias, scale, shift = randn(96), randn(96), randn(3, 96), randn(3, 96)
    q, k, v, dq = randn(2, 3, 40, 64), randn(2, 3, 24, 64), randn(2, 3, 24, 64), randn(2, 3, 40, 64)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, q, k, v)]
        xl, wl, bl, ql, kl, vl = leaves
        y, dy = imf_kernels.group_norm_act_jvp(xl, dx, 32, wl, bl, scale=scale, shift=shift, backend="triton")
        o, do = imf_kernels.attention_jvp(ql, kl, vl, dq, backend="triton")
        grads = torch.autograd.grad((y.float().square().sum() + o.float().square().sum()), leaves)
        return [y, dy, o, do, *grads]

    monkeypatch.setattr(_launch, "ENABLED", False)
    expected = run()
    monkeypatch.setattr(_launch, "ENABLED", True)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(run(), expected, strict=True))
    truth = reference.group_norm_act(x.double(), 32, weight.double(), bias.double(), scale=scale.double(),
                                     shift=shift.double())  # fmt: skip
    baseline = reference.group_norm_act(x, 32, weight, bias, scale=scale, shift=shift)  # PyTorch in bf16
    reference.check_parity("y", expected[0], truth, baseline, 1e-3)
