"""imf_loss and meanflow_loss on every backend against the float64 reference (DESIGN 2.2, 2.3, 4.3).

Each case checks the loss, its stats and grad_u (and grad_v): the kernel's error against float64 must be at
most 2x the error of the reference computed in the kernel's dtype, plus a small floor; du, v_target, t and r
get no gradient.
"""

import re

import numpy as np
import pytest
import torch

import imf_kernels
from imf_kernels import dispatch, reference

BACKENDS = list(dispatch.BACKENDS)
# per-sample shapes (B, ...): latent-like maps with odd sizes, batch 1, and flat 2-D data
SHAPES = [(3, 4, 5, 7), (1, 3, 8, 8), (5, 17)]
INTERPRETED_SHAPES = SHAPES[:2]
# (c, p): the paper's default and a softer weighting
WEIGHTINGS = [(0.01, 1.0), (0.5, 0.5)]
FLOOR = reference.FLOOR


# NaN-fill every torch.empty while a test runs (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")


def skip_unless_runs(backend: str, op: str, args: dict) -> None:
    """Skip with the backend's own words when it is not usable here or does not take this call."""
    reasons = dispatch.not_supported_reasons(backend, op, args)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def cases(dtypes):
    """The backends x shapes x dtypes; bfloat16 on the torch backend too (the interpreter has no bf16 arithmetic,
    the cuda backend needs a GPU, whose own tests hold their bf16 cases)."""
    for backend in BACKENDS:
        for shape in INTERPRETED_SHAPES if backend == "triton" else SHAPES:
            for c, p in WEIGHTINGS:
                for dtype in (*dtypes, torch.bfloat16) if backend == "torch" else dtypes:
                    yield pytest.param(backend, shape, c, p, dtype, id=f"{backend}-{shape}-c{c}-p{p}-{dtype}")


def make_inputs(shape, dtype, device="cpu"):
    """Fresh random u, du, v, v_target in `dtype`, and times in float32: r <= t, some rows with r = t (flow
    matching) and, from the second row on, every fourth with r > t (the MeanFlow target clips t - r to 0 there;
    the iMF coefficient changes sign)."""
    inputs = {name: torch.randn(shape, device=device).to(dtype) for name in ("u", "du", "v", "v_target")}
    t = torch.rand(shape[0], device=device)
    r = t * torch.rand(shape[0], device=device)
    r[::2] = t[::2]  # flow-matching rows
    r[1::4] = t[1::4] + (1 - t[1::4]) * torch.rand(r[1::4].shape, device=device)  # r > t
    return inputs, t, r


def loss_and_grads(fn, inputs, t, r, c, p, names, **backend):
    """(loss, stats, {name: gradient}) for one implementation; gradients of u, v and the constants."""
    inputs = {name: inputs[name].detach().clone().requires_grad_() for name in names}
    loss, stats = fn(*inputs.values(), t, r, c=c, p=p, **backend)
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return loss, stats, dict(zip(names, grads, strict=True))


def check_against_reference(op, backend, shape, c, p, dtype, device="cpu"):
    differentiable = ("u", "v") if op == "imf_loss" else ("u",)
    names = ("u", "du", "v", "v_target") if op == "imf_loss" else ("u", "du", "v_target")
    inputs, t, r = make_inputs(shape, dtype, device)
    skip_unless_runs(backend, op, {**{name: inputs[name] for name in names}, "t": t, "r": r, "c": c, "p": p})

    kernel = loss_and_grads(getattr(imf_kernels, op), inputs, t, r, c, p, names, backend=backend)
    reference_fn = getattr(reference, op)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    truth = loss_and_grads(reference_fn, inputs64, t.double(), r.double(), c, p, names)
    baseline = loss_and_grads(reference_fn, inputs, t, r, c, p, names)

    floor = FLOOR[dtype]
    loss, stats, grads = kernel
    assert loss.shape == () and loss.dtype == torch.float32
    reference.check_parity("loss", loss, truth[0], baseline[0], floor)
    assert set(stats) == set(truth[1])
    for name, value in stats.items():
        assert value.shape == () and not value.requires_grad, name
        reference.check_parity(f"stats[{name}]", value, truth[1][name], baseline[1][name], floor)
    for name in differentiable:
        assert grads[name].dtype == dtype, name
        reference.check_parity(f"grad_{name}", grads[name], truth[2][name], baseline[2][name], floor)
    for name in set(names) - set(differentiable):
        assert grads[name] is None or not grads[name].any(), f"{name} is a constant, got a gradient"


@pytest.mark.parametrize(("backend", "shape", "c", "p", "dtype"), cases((torch.float32, torch.float16)))
def test_imf_loss_matches_reference(backend, shape, c, p, dtype):
    check_against_reference("imf_loss", backend, shape, c, p, dtype)


@pytest.mark.parametrize(("backend", "shape", "c", "p", "dtype"), cases((torch.float32, torch.float16)))
def test_meanflow_loss_matches_reference(backend, shape, c, p, dtype):
    check_against_reference("meanflow_loss", backend, shape, c, p, dtype)


def test_imf_loss_value_by_hand():
    """One sample, one element: V = u + (t - r) du = 1 + 0.5 * 2 = 2, L_u = (2 - 1)^2 = 1, L_v = (3 - 1)^2 = 4;
    with c = 0, p = 1 each weighted term is 1, so the loss is 2 and grad_u = 2 (V - v_target) / L_u = 2."""
    u = torch.tensor([[1.0]], requires_grad=True)
    v = torch.tensor([[3.0]], requires_grad=True)
    loss, stats = imf_kernels.imf_loss(
        u, torch.tensor([[2.0]]), v, torch.tensor([[1.0]]), torch.tensor([0.75]), torch.tensor([0.25]), c=0.0
    )
    loss.backward()
    assert loss.item() == 2.0 and stats["loss_u"].item() == 1.0 and stats["loss_v"].item() == 4.0
    assert u.grad.item() == 2.0 and v.grad.item() == 1.0


@pytest.mark.parametrize(("dtype", "loss_dtype"), [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("op", ["imf_loss", "meanflow_loss"])
def test_loss_and_stats_come_in_the_accumulation_dtype(op, dtype, loss_dtype):
    """As the docstrings say: float64 inputs (the torch backend) give a float64 loss and stats, bfloat16 ones
    float32; the values match the float64 reference (2x the same-dtype reference's error plus a floor)."""
    names = ("u", "du", "v", "v_target") if op == "imf_loss" else ("u", "du", "v_target")
    inputs, t, r = make_inputs((3, 4, 5, 7), dtype)
    if dtype == torch.float64:  # times float32 cannot hold: they were rounded to float32 (a 1e-7 relative loss)
        t = torch.rand(3, dtype=dtype)
        r = t * torch.rand(3, dtype=dtype)
    inputs["du"] = 100 * inputs["du"]  # (t - r) du weighs in V
    tensors = [inputs[name].requires_grad_() for name in names]
    loss, stats = getattr(imf_kernels, op)(*tensors, t, r, backend="torch")
    (grad_u,) = torch.autograd.grad(loss, tensors[0])
    tensors64 = [tensor.detach().double().requires_grad_() for tensor in tensors]
    truth = getattr(reference, op)(*tensors64, t.double(), r.double())
    (truth_grad_u,) = torch.autograd.grad(truth[0], tensors64[0])
    baseline = getattr(reference, op)(*tensors, t, r)
    (baseline_grad_u,) = torch.autograd.grad(baseline[0], tensors[0])
    floor = {torch.float64: 1e-12, torch.bfloat16: FLOOR[torch.bfloat16]}[dtype]
    assert loss.dtype == loss_dtype and all(value.dtype == loss_dtype for value in stats.values())
    reference.check_parity("loss", loss, truth[0], baseline[0], floor)
    for name, value in stats.items():
        reference.check_parity(f"stats[{name}]", value, truth[1][name], baseline[1][name], floor)
    reference.check_parity("grad_u", grad_u, truth_grad_u, baseline_grad_u, floor)


# A batch above the Triton finish program's 256 samples (it loops), and samples of several chunks (17500 elements:
# 9 chunks of 2048, the last one partial).
TOTALS_SHAPES = [(300, 5), (2, 5, 3500)]


@pytest.mark.parametrize("shape", TOTALS_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["imf_loss", "meanflow_loss"])
def test_loss_and_stats_are_the_float64_batch_means(op, backend, shape):
    """loss = mean_b(w L) (summed over both losses) and stats = mean_b L, against those means of per-sample
    sums in float64; all come from the launcher's totals, so they share its one buffer (no kernel of their
    own)."""
    names = ("u", "du", "v", "v_target") if op == "imf_loss" else ("u", "du", "v_target")
    inputs, t, r = make_inputs(shape, torch.float32)
    tensors = [inputs[name] for name in names]
    skip_unless_runs(backend, op, {**dict(zip(names, tensors, strict=True)), "t": t, "r": r, "c": 0.01, "p": 1.0})
    loss, stats = getattr(imf_kernels, op)(*tensors, t, r, backend=backend)

    u, du, v, v_target = (inputs[name].double() for name in ("u", "du", "v", "v_target"))
    gap = (t.double() - r.double()).view(-1, *[1] * (len(shape) - 1))
    if op == "imf_loss":
        per_sample = {"loss_u": u + gap * du - v_target, "loss_v": v - v_target}
    else:
        per_sample = {"loss": u - (v_target - gap.clamp(0, 1) * du)}
    sums = {name: (residual**2).flatten(1).sum(1) for name, residual in per_sample.items()}
    expected_loss = sum(loss_sum / (loss_sum + 0.01) for loss_sum in sums.values()).mean()
    baseline_loss, baseline_stats = getattr(reference, op)(*tensors, t, r)

    assert set(stats) == set(sums)
    reference.check_parity("loss", loss, expected_loss, baseline_loss, FLOOR[torch.float32])
    for name, value in stats.items():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad, name
        reference.check_parity(f"stats[{name}]", value, sums[name].mean(), baseline_stats[name], FLOOR[torch.float32])
        assert value.untyped_storage().data_ptr() == loss.untyped_storage().data_ptr(), name


# ------------------------------------------------------------------------------------------------ bad input


def loss_inputs(**overrides):
    tensors = {name: torch.randn(2, 3, 4) for name in ("u", "du", "v", "v_target")}
    tensors.update(t=torch.rand(2), r=torch.rand(2) * 0.1)
    tensors.update(overrides)
    return tensors


BAD_CALLS = [
    ("flat u", lambda: imf_kernels.imf_loss(**loss_inputs(u=torch.randn(2))), "u must be (B, ...) with at least"),
    ("v shape", lambda: imf_kernels.imf_loss(**loss_inputs(v=torch.randn(2, 3, 5))), "v must have shape"),
    (
        "dtype",
        lambda: imf_kernels.imf_loss(**loss_inputs(du=torch.randn(2, 3, 4, dtype=torch.float16))),
        "du must have the dtype of u",
    ),
    ("t shape", lambda: imf_kernels.imf_loss(**loss_inputs(t=torch.rand(3))), "t must be a floating tensor of shape"),
    ("r type", lambda: imf_kernels.imf_loss(**loss_inputs(r=0.5)), "r must be a floating tensor of shape (B,)"),
    ("c", lambda: imf_kernels.imf_loss(**loss_inputs(), c=-1.0), "c must be >= 0"),
    (
        "integer t",
        lambda: imf_kernels.imf_loss(**loss_inputs(t=torch.ones(2, dtype=torch.int64))),
        "t must be a floating tensor of shape (B,) = (2,), got (2,) torch.int64",
    ),
    (  # the shape is the mistake to name, not the layout a slice of the right shape would have
        "du shape before layout",
        lambda: imf_kernels.imf_loss(**loss_inputs(du=torch.randn(2, 3, 4)[:, :2])),
        "du must have shape (B, ...) like u = (2, 3, 4), got (2, 2, 4)",
    ),
]


def test_numpy_scalars_are_numbers():
    tensors = loss_inputs()
    got, _ = imf_kernels.imf_loss(**tensors, c=np.float32(0.01), p=np.float64(1.0), backend="torch")
    want, _ = imf_kernels.imf_loss(**tensors, c=0.01, p=1.0, backend="torch")
    assert torch.equal(got, want)


@pytest.mark.parametrize(("case", "bad_call", "message"), BAD_CALLS, ids=[case for case, _, _ in BAD_CALLS])
def test_bad_input_raises_a_clear_value_error(case, bad_call, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"imf_loss: {message}")):
        bad_call()


def test_meanflow_bad_input_names_its_op():
    tensors = loss_inputs()
    with pytest.raises(
        ValueError, match=re.escape("meanflow_loss: v_target must be 3-D (B, ...) like u, got shape (2, 4)")
    ):
        imf_kernels.meanflow_loss(tensors["u"], tensors["du"], torch.randn(2, 4), tensors["t"], tensors["r"])


# ------------------------------------------------------------------------------------------------------ GPU

# latent-b: (8, 4, 32, 32) latents, and a larger batch
GPU_SHAPES = [(8, 4, 32, 32), (64, 4, 32, 32), (3, 4, 5, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["imf_loss", "meanflow_loss"])
def test_losses_on_gpu(backend, shape, dtype, op):
    check_against_reference(op, backend, shape, 0.01, 1.0, dtype, device="cuda")
